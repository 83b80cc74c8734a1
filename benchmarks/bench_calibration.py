"""Preparation + calibration of torchvision's resnet18 at 3×224×224: ours against torch.ao's, side by side.

The same random-init FP32 weights and the same generated calibration samples (2 batches of 8) for each:
  - ours: ``prepare`` with the default plan (LSQ: MSE-searched ranges, per-channel weights), then
    ``train.calibrate`` as a run calibrates;
  - torch.ao QAT: ``prepare_qat_fx`` with the fbgemm QAT qconfig mapping (moving-average min-max fake
    quantizers, per-channel weights), the batches through it in train mode (its observers run there);
  - torch.ao PTQ: ``prepare_fx`` with the fbgemm qconfig mapping (histogram observers: a range search
    like ours), the batches through it in eval mode;
  - NNCF, where it can be imported (it is not a dependency: install it apart, e.g. ``pip install --target DIR
    nncf`` and put DIR on PYTHONPATH): ``nncf.quantize`` on the same two batches (its defaults: min-max
    ranges, fast bias correction). Its first use compiles a C++ extension (over 10 minutes on a loaded
    2-core machine: set NNCF_EXTENSION_LOAD_TIMEOUT=0 and let one run finish before timing).
Rounds are interleaved so machine noise hits all alike; medians and the ratios ours / torch.ao are printed.
Threads: what a run of this model chooses (``cpu.training_threads``), or ``--threads``.

    python benchmarks/bench_calibration.py [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from qat_core import cpu, library, runner, train
from qat_core.prepare import prepare

warnings.filterwarnings("ignore")
BATCH, BATCHES, SIZE = 8, 2, 224


def ours(fp32: nn.Module, batches: list[torch.Tensor]) -> tuple[float, float]:
    plan = runner.default_config("digits-cnn").plan.model_copy(update={"overrides": {}})
    started = time.perf_counter()
    model = prepare(fp32, plan, batches[0][:2])
    prepared = time.perf_counter()
    train.calibrate(model, [(x, None) for x in batches], len(batches))
    return prepared - started, time.perf_counter() - prepared


def torch_ao(qat: bool) -> Callable[[nn.Module, list[torch.Tensor]], tuple[float, float]]:
    from torch.ao.quantization import get_default_qat_qconfig_mapping, get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx, prepare_qat_fx

    def run(fp32: nn.Module, batches: list[torch.Tensor]) -> tuple[float, float]:
        started = time.perf_counter()
        model = copy.deepcopy(fp32)
        if qat:
            model = prepare_qat_fx(model.train(), get_default_qat_qconfig_mapping("fbgemm"), (batches[0][:2],))
        else:
            model = prepare_fx(model.eval(), get_default_qconfig_mapping("fbgemm"), (batches[0][:2],))
        prepared = time.perf_counter()
        with torch.no_grad():
            for x in batches:
                model(x)
        return prepared - started, time.perf_counter() - prepared
    return run


def nncf_quantize(fp32: nn.Module, batches: list[torch.Tensor]) -> tuple[float, float]:
    """Preparation and calibration are one call in NNCF: all of it is counted as calibration."""
    import nncf

    started = time.perf_counter()
    nncf.quantize(copy.deepcopy(fp32).eval(), nncf.Dataset(batches), subset_size=len(batches))
    return 0.0, time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the median is printed)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: what a run would use)")
    args = ap.parse_args()
    tv = library.import_torchvision()
    torch.manual_seed(0)
    fp32 = tv.models.resnet18(num_classes=10).eval()
    threads = cpu.training_threads(sum(p.numel() for p in fp32.parameters()), args.threads)
    torch.set_num_threads(threads)
    batches = list(torch.randn(BATCHES * BATCH, 3, SIZE, SIZE).split(BATCH))
    contenders = {"ours": ours, "torch.ao QAT": torch_ao(qat=True), "torch.ao PTQ": torch_ao(qat=False)}
    if importlib.util.find_spec("nncf") is not None:
        contenders["NNCF"] = nncf_quantize
    print(f"torch {torch.__version__}, {threads} threads, {cpu.cores()} cores; resnet18 at {SIZE}, "
          f"{BATCHES}×{BATCH} calibration samples; median of {args.rounds} interleaved rounds", flush=True)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, run in contenders.items():
            times[name].append(run(fp32, batches))
    total = {name: statistics.median(p + c for p, c in t) for name, t in times.items()}
    for name, t in times.items():
        ratio = "" if name == "ours" else f"   ours / this: {total['ours'] / total[name]:.2f}"
        print(f"{name:<13} prepare {statistics.median(p for p, _ in t):6.2f} s  calibrate "
              f"{statistics.median(c for _, c in t):6.2f} s  total {total[name]:6.2f} s{ratio}", flush=True)


if __name__ == "__main__":
    main()
