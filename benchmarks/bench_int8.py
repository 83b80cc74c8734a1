"""Our int8.onnx against ONNX Runtime's own static quantization of the same FP32 model.

For the ResNet-18-style, MobileNetV2-style and Transformer zoo models, and torchvision's own
``resnet18`` and ``mobilenet_v2`` (3×224×224, through the plugin hook): train a quick run (a few
steps: the weights only need to be realistic in shape, not accurate), export it, quantize its
``fp32.onnx`` with ``onnxruntime.quantization.quantize_static`` (QDQ, per-channel int8 weights,
uint8 activations, calibrated on the same training data), and time the three side by side.

    .venv/bin/python benchmarks/bench_int8.py [--models resnet18 ...] [--threads 2] [--iters 100]

Prints latency at batch 1, the ratios ours/ORT-own and ours/FP32, and the file size ratio. On a CPU
where ORT's uint8×int8 kernels saturate (AVX2 without VNNI), our export stores weights as uint8
and runs exact uint8×uint8 kernels; ``ours-s8/ORT`` then times our model with int8 weights too,
like for like with ORT's own (which may saturate here).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from unittest import mock

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.plugins: the torchvision models

from qat_core import cpu, export, runner
from qat_core.bench import machine_info, time_calls
from qat_core.store import RunStore

# zoo models, and torchvision's own definitions through the plugin hook (traced-graph preparation)
TORCHVISION = {"tv-resnet18": "tests.plugins.third_party:resnet18_224",
               "tv-mobilenet_v2": "tests.plugins.third_party:mobilenet_v2_224"}
MODELS = ("resnet18", "mobilenetv2", "transformer", *TORCHVISION)


def quick_run(store: RunStore, model: str) -> str:
    """A finished run of ``model`` trained for a handful of steps."""
    config = runner.default_config(TORCHVISION.get(model, model))
    config = config.model_copy(update={
        "baseline": config.baseline.model_copy(update={"epochs": 1, "max_steps": 2}),
        "finetune": config.finetune.model_copy(update={"epochs": 1, "max_steps": 2, "calibration_batches": 2}),
    })
    return runner.execute(config, store)


class _Calibration:
    """ORT's CalibrationDataReader protocol over the run's training samples."""

    def __init__(self, x: np.ndarray):
        self.items = iter([{export.INPUT_NAME: x[i:i + 1]} for i in range(len(x))])

    def get_next(self) -> dict | None:
        return next(self.items, None)


def ort_own_int8(fp32_path: Path, calib: np.ndarray, out: Path) -> Path:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(str(fp32_path), str(out), _Calibration(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    return out


def bench_model(store: RunStore, model: str, threads: int, warmup: int, iters: int, rounds: int, tmp: Path,
                run_id: str | None = None) -> dict:
    started = time.perf_counter()
    run_id = run_id or quick_run(store, model)
    trained = time.perf_counter() - started
    export.export_run(store, run_id)
    loaded = runner.load(store, run_id)
    fp32_path, int8_path = store.artifact(run_id, "fp32.onnx"), store.artifact(run_id, "int8.onnx")
    own_path = ort_own_int8(fp32_path, loaded.data.train_x[:32].numpy(), tmp / f"{model}_ort_own.onnx")
    x = {export.INPUT_NAME: next(iter(loaded.data.test_loader(1)))[0][:1].numpy()}  # plugins bring loaders
    paths = {"ort_fp32": fp32_path, "ours_int8": int8_path, "ort_own_int8": own_path}
    if cpu.int8_weights_saturate():  # like for like with ORT's int8 weights, which saturate on this CPU
        with mock.patch.object(cpu, "int8_weights_saturate", return_value=False):
            paths["ours_s8"] = tmp / f"{model}_ours_s8.onnx"
            paths["ours_s8"].write_bytes(export.int8_onnx(loaded.qat, loaded.data.example(1)))
    sessions = {name: export.session(path, threads=threads) for name, path in paths.items()}
    rounds_ms: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):  # interleaved rounds: drifting machine load hits the three models alike
        for name, sess in sessions.items():
            rounds_ms[name].append(time_calls(lambda sess=sess: sess.run(None, x), warmup, iters)["median_ms"])
    medians = {name: float(np.median(ms)) for name, ms in rounds_ms.items()}

    def ratio(a: str, b: str) -> float:  # the median of the per-round ratios: each round's load cancels
        return float(np.median(np.asarray(rounds_ms[a]) / np.asarray(rounds_ms[b])))

    sizes = {name: path.stat().st_size for name, path in
             (("fp32", fp32_path), ("ours_int8", int8_path), ("ort_own_int8", own_path))}
    coverage = store.read_result(run_id, "export")
    kernels = {name: dict(sorted(Counter(n.op_type for n in export.optimized_graph(paths[name]).graph.node).items()))
               for name in ("ours_int8", "ort_own_int8")}
    return {"model": model, "run": run_id, "train_s": trained, "median_ms": medians,
            "rounds_ms": rounds_ms,
            "ours_over_ort_own": ratio("ours_int8", "ort_own_int8"), "ours_over_fp32": ratio("ours_int8", "ort_fp32"),
            "ours_s8_over_ort_own": ratio("ours_s8", "ort_own_int8") if "ours_s8" in sessions else None,
            "ort_own_over_fp32": ratio("ort_own_int8", "ort_fp32"),
            "file_ratio": sizes["ours_int8"] / sizes["fp32"], "ort_own_file_ratio": sizes["ort_own_int8"] / sizes["fp32"],
            "integer_layers": len(coverage["integer_layers"]), "float_layers": coverage["float_layers"],
            "kernels": kernels}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds; medians are reported")
    p.add_argument("--runs", nargs="+", default=[], metavar="MODEL=RUN",
                   help="time these finished runs in --workspace instead of training new ones")
    p.add_argument("--workspace", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    info = machine_info()
    flags = " ".join(f for f, on in info["flags"].items() if on)
    print(f"{info['cpu']}, {info['cores']} cores, flags: {flags or 'none'}; onnxruntime {info['onnxruntime']}; "
          f"batch 1, {args.threads} threads")
    results = []
    with tempfile.TemporaryDirectory(prefix="qat-bench-") as tmp:
        store = RunStore(args.workspace or Path(tmp) / "ws")
        print(f"{'model':<15} {'FP32 ms':>8} {'ours ms':>8} {'ORT ms':>8} {'ours/ORT':>9} {'ours/FP32':>10} "
              f"{'ORT/FP32':>9} {'file':>6}  float layers  ours-s8/ORT")
        given = dict(item.split("=", 1) for item in args.runs)
        for model in args.models:
            r = bench_model(store, model, args.threads, args.warmup, args.iters, args.rounds, Path(tmp), given.get(model))
            results.append(r)
            m = r["median_ms"]
            s8 = f"{r['ours_s8_over_ort_own']:.3f}" if r["ours_s8_over_ort_own"] is not None else "-"
            print(f"{model:<15} {m['ort_fp32']:8.3f} {m['ours_int8']:8.3f} {m['ort_own_int8']:8.3f} "
                  f"{r['ours_over_ort_own']:9.3f} {r['ours_over_fp32']:10.3f} {r['ort_own_over_fp32']:9.3f} "
                  f"{r['file_ratio']:6.3f}  {len(r['float_layers']):>12}  {s8}", flush=True)
            for name, ops in r["kernels"].items():  # what ONNX Runtime runs, for ours and its own
                print(f"    {name}: {ops}")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "results": results}, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
