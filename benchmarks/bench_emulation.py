"""Emulated evaluation (ONNX Runtime's integer arithmetic, ``QATModel.integer_arithmetic``) against the
fake-quantized forward it replaces in a run's evaluation, side by side; then export + parity of a run.

1. torchvision's resnet18 (random init, 10 classes) at 3×224×224, the default W8A8 plan, calibrated on
   generated samples; batches of ``--batch``. Each round times one fake-quant forward and one emulated
   forward of the same batch, interleaved, so machine noise hits both alike; the medians and the median
   per-round ratio emulated / fake-quant are printed. Target: ≤ 1.5.
2. export: a short torchvision:resnet18 run (``runner.execute``, generated images), then
   ``export.export_run`` and ``export.parity`` timed. Target: ≤ 60 s on an idle machine.

Threads: what a run of this model chooses (``cpu.training_threads``), or ``--threads``.

    python benchmarks/bench_emulation.py [--sections emulation export] [--rounds 7] [--batch 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from qat_core import cpu, export, library, runner, train
from qat_core.prepare import prepare
from qat_core.store import RunStore

warnings.filterwarnings("ignore")
SIZE = 224


def emulation(rounds: int, batch: int, threads: int | None) -> None:
    tv = library.import_torchvision()
    torch.manual_seed(0)
    fp32 = tv.models.resnet18(num_classes=10).eval()
    threads = cpu.training_threads(sum(p.numel() for p in fp32.parameters()), threads)
    torch.set_num_threads(threads)
    plan = runner.default_config("digits-cnn").plan.model_copy(update={"overrides": {}})  # W8A8 everywhere
    calibration = torch.randn(4, 3, SIZE, SIZE)
    qat = prepare(fp32, plan, calibration[:2])
    train.calibrate(qat, [(calibration, None)], 1)
    qat.eval()
    x = torch.randn(batch, 3, SIZE, SIZE)

    def fake_quant() -> None:
        qat(x)

    def emulated() -> None:
        with qat.integer_arithmetic():
            qat(x)

    print(f"torch {torch.__version__}, {threads} threads, {cpu.cores()} cores; resnet18 at {SIZE}, batch {batch}, "
          f"default W8A8 plan; median of {rounds} interleaved rounds", flush=True)
    times: dict[str, list[float]] = {"fake-quant": [], "emulated": []}
    with torch.no_grad():
        fake_quant(), emulated()  # warm-up
        for _ in range(rounds):
            for name, run in (("fake-quant", fake_quant), ("emulated", emulated)):
                started = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - started)
    ratio = statistics.median(e / f for e, f in zip(times["emulated"], times["fake-quant"], strict=True))
    print(f"fake-quant forward {statistics.median(times['fake-quant']):7.3f} s   emulated "
          f"{statistics.median(times['emulated']):7.3f} s   emulated / fake-quant {ratio:.2f}", flush=True)


def export_and_parity() -> None:
    with tempfile.TemporaryDirectory(prefix="qat-emulation-") as tmp:
        store = RunStore(Path(tmp) / "ws")
        config = runner.default_config("torchvision:resnet18")
        config = config.model_copy(update={
            "baseline": config.baseline.model_copy(update={"epochs": 1, "max_steps": 1}),
            "finetune": config.finetune.model_copy(update={"epochs": 1, "max_steps": 1, "calibration_batches": 1})})
        run_id = runner.execute(config, store)
        started = time.perf_counter()
        export.export_run(store, run_id)
        exported = time.perf_counter()
        result = export.parity(store, run_id)
        done = time.perf_counter()
        print(f"resnet18 ({torch.get_num_threads()} threads) export {exported - started:6.1f} s   parity {done - exported:6.1f} s ({result['samples']} "
              f"samples, agreement {result['agreement']:.2%})   total {done - started:6.1f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds (the median is printed)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: what a run would use)")
    ap.add_argument("--sections", nargs="+", choices=["emulation", "export"], default=["emulation", "export"])
    args = ap.parse_args()
    if "emulation" in args.sections:
        emulation(args.rounds, args.batch, args.threads)
    if "export" in args.sections:
        export_and_parity()


if __name__ == "__main__":
    main()
