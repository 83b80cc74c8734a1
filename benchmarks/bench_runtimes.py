"""Our int8.onnx in ONNX Runtime and in OpenVINO, beside the peer routes to an int8 model, in one run.

For torchvision's ``resnet18`` and ``mobilenet_v2`` at 3×224×224 (random init, a few training steps: the
weights only need realistic shapes), batch 1: a quick run is trained and exported, then timed side by side
in interleaved rounds (``bench.time_interleaved``, what the Benchmark page uses):

- ``ort_fp32`` / ``ort_ours``: fp32.onnx and our int8.onnx in ONNX Runtime;
- ``ov_fp32`` / ``ov_ours`` (f32 precision hint) and ``ov_fp32_default`` / ``ov_ours_default`` (OpenVINO's
  default hint, bf16 on CPUs with AVX-512 BF16 or AMX): the same files compiled unchanged by OpenVINO
  (``runtimes.compile_model``, what the page uses);
- ``ort_qs``: ORT's own ``quantize_static`` of fp32.onnx (QDQ, per-channel int8 weights, uint8 activations,
  calibrated on the same 32 training samples), in ONNX Runtime;
- ``ov_nncf``: ``nncf.quantize`` of fp32.onnx on the same samples, in OpenVINO — only where nncf imports.

Then each runtime's parity on the run's test split (top-1 agreement with the run's evaluation) and the
int8 kernels OpenVINO ran. Prints medians and ratios; ``--json`` keeps everything.

    .venv/bin/python benchmarks/bench_runtimes.py [--models tv-resnet18 tv-mobilenet_v2] [--threads 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.plugins (the models) and benchmarks

from benchmarks.bench_int8 import TORCHVISION, ort_own_int8  # noqa: E402
from qat_core import bench, export, plugins, runner, runtimes  # noqa: E402
from qat_core.store import RunStore  # noqa: E402

OURS = ("ov_ours", "ov_ours_default", "ort_ours")  # our int8.onnx: its parity is with the run's evaluation


def quick_run(store: RunStore, model: str) -> str:
    """A finished run of ``model``: two baseline steps, calibrated on two batches, one fine-tune step at a learning
    rate too small to move the weights (two steps at the default rate can collapse a random-init net to one class,
    which the fine-tune refuses)."""
    config = runner.default_config(TORCHVISION[model])
    config = config.model_copy(update={
        "baseline": config.baseline.model_copy(update={"epochs": 1, "max_steps": 2}),
        "finetune": config.finetune.model_copy(update={"epochs": 1, "max_steps": 1, "calibration_batches": 2,
                                                       "lr": 1e-7}),
    })
    return runner.execute(config, store)


def nncf_int8(fp32_path: Path, calib: np.ndarray, threads: int, hint: str) -> object:
    """NNCF's post-training quantization of fp32.onnx (OpenVINO's own route), compiled like ours."""
    import nncf
    import openvino

    model = nncf.quantize(openvino.Core().read_model(str(fp32_path)),
                          nncf.Dataset([calib[i:i + 1] for i in range(len(calib))]), subset_size=len(calib))
    settings = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    if hint == "f32":
        settings["INFERENCE_PRECISION_HINT"] = "f32"
    return openvino.Core().compile_model(model, "CPU", settings)


def first_code_difference(int8_path: Path, layers: list[str], x: np.ndarray) -> dict | None:
    """Where OpenVINO's codes first differ from ONNX Runtime's on ``x``: every quantized layer's output codes made
    graph outputs (as ``export.compare_codes`` does), both runtimes run on the probe; the first layer in execution
    order whose codes differ, how many and by how much (differences after it include what it spread)."""
    import onnx

    proto = onnx.load(str(int8_path))
    tensors = export._code_outputs(proto, layers)
    proto.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in tensors.values())
    with tempfile.TemporaryDirectory(prefix="qat-probe-") as tmp:
        probe = Path(tmp) / "probe.onnx"
        onnx.save(proto, str(probe))
        sess = export.session(probe)
        ort = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {export.INPUT_NAME: x}), strict=True))
        compiled = runtimes.compile_model(probe, 1, "f32")
        found = compiled({0: x})
        ov = {name: found[out] for out in compiled.outputs for name in out.get_names()}
    for layer in layers:
        t = tensors.get(layer)
        if t in ort and t in ov:
            diff = np.abs(ort[t].astype(np.int32) - ov[t].astype(np.int32))
            if diff.any():
                return {"layer": layer, "differing": int((diff > 0).sum()), "codes": int(diff.size),
                        "max_code_diff": int(diff.max())}
    return None


def bench_model(store: RunStore, model: str, threads: int, warmup: int, iters: int, rounds: int, tmp: Path,
                run_id: str | None) -> dict:
    run_id = run_id or quick_run(store, model)
    export.export_run(store, run_id)
    loaded = runner.load(store, run_id)
    fp32_path, int8_path = store.artifact(run_id, "fp32.onnx"), store.artifact(run_id, "int8.onnx")
    calib = loaded.data.train_x[:32].numpy()
    qs_path = ort_own_int8(fp32_path, calib, tmp / f"{model}_ort_qs.onnx")
    x = next(iter(loaded.data.test_loader(1)))[0][:1].numpy()
    compiled = {"ov_fp32": runtimes.compile_model(fp32_path, threads, "f32"),
                "ov_ours": runtimes.compile_model(int8_path, threads, "f32"),
                "ov_fp32_default": runtimes.compile_model(fp32_path, threads, "default"),
                "ov_ours_default": runtimes.compile_model(int8_path, threads, "default")}
    if importlib.util.find_spec("nncf") is not None:
        compiled["ov_nncf"] = nncf_int8(fp32_path, calib, threads, "default")
    sessions = {"ort_fp32": export.session(fp32_path, threads), "ort_ours": export.session(int8_path, threads),
                "ort_qs": export.session(qs_path, threads)}
    runs = {name: runtimes.runner(c) for name, c in compiled.items()}
    runs |= {name: (lambda v, s=s: s.run(None, {export.INPUT_NAME: v})[0]) for name, s in sessions.items()}
    stats = bench.time_interleaved({name: (lambda run=run: run(x)) for name, run in runs.items()}, warmup, iters,
                                   rounds)
    median = {name: s["median_ms"] for name, s in stats.items()}
    # parity: every int8 route against the run's evaluation (its integer arithmetic) on the test split
    found = runtimes.parity(loaded.qat, loaded.data.test_loader(8), {n: runs[n] for n in OURS})
    layers = [r["name"] for r in loaded.qat.layers]
    kernels = runtimes.kernels(compiled["ov_ours"], layers)
    differing = sorted({d["sample"] for n in ("ov_ours", "ov_ours_default") for d in found[n]["differing"]})
    test_x = np.concatenate([b.numpy() for b, _ in loaded.data.test_loader(8)])
    first = first_code_difference(int8_path, layers, test_x[differing]) if differing else None
    return {"model": model, "run": run_id, "median_ms": median, "p99_ms": {n: s["p99_ms"] for n, s in stats.items()},
            "default_precision": runtimes.precision(compiled["ov_fp32_default"]), "first_code_difference": first,
            "parity": {n: {k: p[k] for k in ("samples", "agreement", "max_logit_diff", "differing")}
                       for n, p in found.items()},
            "ov_kernels": {"int8": len(kernels["int8"]), "float": [k["layer"] for k in kernels["float"]],
                           "types": kernels["int8_types"], "kernels": sorted({k["kernel"] for k in kernels["int8"]})}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=list(TORCHVISION), default=list(TORCHVISION))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=70)
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    p.add_argument("--runs", nargs="+", default=[], metavar="MODEL=RUN", help="finished runs in --workspace to time")
    p.add_argument("--workspace", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    if not runtimes.installed():
        print(runtimes.NOT_INSTALLED)
        return 2
    plugins.allow(["tests"])  # the torchvision models come through the suite's plugin module
    info = bench.machine_info()
    flags = " ".join(f for f, on in info["flags"].items() if on)
    print(f"{info['cpu']}, {info['cores']} cores, flags: {flags or 'none'}; onnxruntime {info['onnxruntime']}, "
          f"openvino {runtimes.version()}; nncf {'yes' if importlib.util.find_spec('nncf') else 'not installed'}; "
          f"batch 1, {args.threads} threads, {args.rounds} interleaved rounds of {args.iters} calls each")
    results = []
    given = dict(item.split("=", 1) for item in args.runs)
    with tempfile.TemporaryDirectory(prefix="qat-runtimes-") as tmp:
        store = RunStore(args.workspace or Path(tmp) / "ws")
        for model in args.models:
            r = bench_model(store, model, args.threads, args.warmup, args.iters, args.rounds, Path(tmp),
                            given.get(model))
            results.append(r)
            m = r["median_ms"]
            print(f"\n{model} (OpenVINO's default hint here: {r['default_precision']}) — median ms (p99), "
                  "and ratio to our int8.onnx in OpenVINO (f32 hint)")
            for name in sorted(m, key=m.get):
                agree = r["parity"].get(name)
                line = f"  {name:<16} {m[name]:8.2f} ({r['p99_ms'][name]:7.2f})  x{m[name] / m['ov_ours']:.2f}"
                if agree:
                    line += f"  agreement {agree['agreement']:.2%} on {agree['samples']}, max logit diff " \
                            f"{agree['max_logit_diff']:.3g}"
                print(line)
            fastest_ours = min(m["ov_ours"], m["ov_ours_default"], m["ort_ours"])
            peers = {n: m[n] for n in ("ort_qs", "ov_nncf") if n in m}
            best = min(peers, key=peers.get)
            print(f"  ours in ORT / ours in OpenVINO: x{m['ort_ours'] / m['ov_ours']:.2f}; ours fastest / fastest "
                  f"peer ({best}): x{fastest_ours / peers[best]:.2f}; FP32/int8 ORT x{m['ort_fp32'] / m['ort_ours']:.2f}, "
                  f"OpenVINO f32 x{m['ov_fp32'] / m['ov_ours']:.2f}, default x{m['ov_fp32_default'] / m['ov_ours_default']:.2f}")
            if r["first_code_difference"]:
                f = r["first_code_difference"]
                print(f"  OpenVINO vs ONNX Runtime on the differing samples: codes first differ at {f['layer']} "
                      f"({f['differing']} of {f['codes']}, by up to {f['max_code_diff']} step(s))")
            for name in OURS:
                for d in r["parity"][name]["differing"]:
                    print(f"  {name}: sample {d['sample']} (label {d['label']}): evaluated {d['evaluated']}, "
                          f"runtime {d['runtime']}")
            k = r["ov_kernels"]
            print(f"  OpenVINO int8 kernels: {k['int8']} nodes {k['types']} ({', '.join(k['kernels'])}); "
                  f"float: {k['float'] or 'none'}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "results": results}, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
