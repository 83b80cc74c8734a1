"""Models no one on the team wrote, end to end: W8A8 QAT → export → ONNX Runtime parity.

torchvision ``resnet18``, ``mobilenet_v2``, ``mobilenet_v3_small``, ``efficientnet_b0``, a small
``VisionTransformer`` (3×32×32 class templates + noise) and a tiny Hugging Face BERT classifier
(token sequences), random init, through the plugin hook (``tests/plugins/third_party.py``), the
same runner, export and parity the app uses. Prints per model: conv/linear/matmul layers that run
as integer kernels, BatchNorms folded, top-1 agreement of ORT int8 with the run's evaluation, the
accuracies (``fq``: the fake-quantized float simulation), output codes that differ from ONNX
Runtime's (integer kernels / float ops), and every conv/linear/matmul left in float with its reason.

    .venv/bin/python benchmarks/bench_any_model.py [--models resnet18 bert ...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.plugins

from torch import nn  # noqa: E402

from qat_core import export, runner  # noqa: E402
from qat_core.config import RunConfig  # noqa: E402
from qat_core.modules import QuantConv2d  # noqa: E402
from qat_core.store import RunStore  # noqa: E402

MODELS = ("resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "vit", "bert")
BASELINE = {"epochs": 10, "lr": 3e-3}
# torchvision's MobileNetV3 keeps BN running statistics with momentum 0.01: they need ~500 steps to
# describe the data, or the evaluated model (BN in eval) sits at chance whatever it learned
LONGER = {"mobilenet_v3_small": {"epochs": 40}}
FINETUNE = {"epochs": 2, "lr": 1e-4, "calibration_batches": 4}


def bench(store: RunStore, model: str) -> dict:
    started = time.perf_counter()
    config = RunConfig.model_validate({"model": f"tests.plugins.third_party:{model}",
                                       "baseline": BASELINE | LONGER.get(model, {}), "finetune": FINETUNE})
    run_id = runner.execute(config, store)
    parity = export.parity(store, run_id)
    loaded = runner.load(store, run_id)
    heavy = [r["name"] for r in loaded.qat.layers if export.is_heavy(r)]
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in loaded.fp32.modules())
    folded = sum(isinstance(m, QuantConv2d) and m.bn is not None for m in loaded.qat.modules())
    metrics = store.get(run_id)["metrics"]
    return {"model": model, "heavy": len(heavy), "integer": len(set(heavy) & set(parity["integer_layers"])),
            "bn": bns, "folded": folded, "agreement": parity["agreement"], "fp32": metrics["fp32"]["accuracy"],
            "ptq": metrics["ptq"]["accuracy"], "qat": metrics["qat"]["accuracy"], "ort": parity["accuracy"],
            "fq": parity["fake_quant_accuracy"],
            "codes": [sum(r["differing"] for r in parity["layers"] if (r["layer"] in parity["integer_layers"]) == kind)
                      for kind in (True, False)],
            "float": {k: v for k, v in parity["float_layers"].items() if k in heavy},
            "seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    args = p.parse_args(argv)
    print(f"{'model':<19} {'int/heavy':>9} {'cover':>6} {'BN fold':>8} {'agree':>7} {'FP32':>6} {'PTQ':>6} "
          f"{'QAT':>6} {'ORT':>6} {'fq':>6} {'codes≠':>9} {'s':>5}")
    with tempfile.TemporaryDirectory(prefix="qat-any-") as tmp:
        store = RunStore(Path(tmp))
        for model in args.models:
            r = bench(store, model)
            print(f"{model:<19} {r['integer']:>4}/{r['heavy']:<4} {r['integer'] / r['heavy']:6.1%} "
                  f"{r['folded']:>3}/{r['bn']:<4} {r['agreement']:7.2%} {r['fp32']:6.1%} {r['ptq']:6.1%} "
                  f"{r['qat']:6.1%} {r['ort']:6.1%} {r['fq']:6.1%} {r['codes'][0]:>4}/{r['codes'][1]:<4} "
                  f"{r['seconds']:5.0f}", flush=True)
            for name, why in r["float"].items():
                print(f"    float: {name}: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
