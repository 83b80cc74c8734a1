"""Deployed = evaluated: ONNX Runtime's int8 model against the run's own evaluation, at every width.

Each row is a real run (``runner.execute``) exported and checked by ``export.parity``:
``eval`` is the run's reported accuracy (its integer arithmetic), ``ORT`` ONNX Runtime's,
``agree`` their top-1 agreement, ``fq`` the fake-quantized float simulation's accuracy and
``fq-agree`` its agreement with ONNX Runtime; ``differing codes`` sums every compared layer's
differing output codes (integer kernels / float ops between them).

Sections (all by default):
  widths   digits CNN, seeds × W8A8 W4A8 W4A4 W2A4 W2A2 × per-tensor/per-channel (default plans)
  w2a2     digits CNN, every layer at W2A2, every range method × granularity × symmetry (seed 0)
  zoo      the zoo's ResNet-18, MobileNetV2 and Transformer, W8A8 and W4A4, a few steps each
  latency  W4A4 ResNet-18 / MobileNetV2: int8.onnx against the same file as the previous export wrote
           it (no Clip on narrow codes, every weight uint8 on a CPU without VNNI), interleaved rounds

    .venv/bin/python benchmarks/bench_parity.py [--sections widths w2a2 zoo latency] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from qat_core import cpu, export, runner
from qat_core.bench import machine_info, time_calls
from qat_core.config import RANGE_METHODS, RunConfig
from qat_core.store import RunStore

WIDTHS = [(8, 8), (4, 8), (4, 4), (2, 4), (2, 2)]
HEADER = (f"{'run':<44} {'eval':>7} {'ORT':>7} {'agree':>7} {'fq':>7} {'fq-agree':>8}  differing codes "
          "(integer / float)")


def _with_spec(config: RunConfig, uniform: bool = False, **spec) -> RunConfig:
    plan = config.plan
    plan = plan.model_copy(update={"default": plan.default.model_copy(update=spec),
                                   **({"overrides": {}} if uniform else {})})
    return config.model_copy(update={"plan": plan})


def _short(config: RunConfig, steps: int) -> RunConfig:
    return config.model_copy(update={
        "baseline": config.baseline.model_copy(update={"epochs": 1, "max_steps": steps}),
        "finetune": config.finetune.model_copy(update={"epochs": 1, "max_steps": steps, "calibration_batches": 2})})


def check(store: RunStore, label: str, config: RunConfig) -> dict:
    run_id = runner.execute(config, store)
    result = export.parity(store, run_id)
    integer_layers = set(result["integer_layers"])
    split = [sum(r["differing"] for r in result["layers"] if (r["layer"] in integer_layers) == kind)
             for kind in (True, False)]
    print(f"{label:<44} {result['sim_accuracy']:7.2%} {result['accuracy']:7.2%} {result['agreement']:7.2%} "
          f"{result['fake_quant_accuracy']:7.2%} {result['fake_quant_agreement']:8.2%}  {split[0]} / {split[1]}",
          flush=True)
    if result["explanation"]:
        print(f"    {result['explanation']}")
    return result | {"label": label, "integer_differing": split[0], "float_differing": split[1], "run": run_id}


def widths(store: RunStore, seeds: list[int]) -> list[dict]:
    out = []
    for seed in seeds:
        for wb, ab in WIDTHS:
            for granularity in ("per_tensor", "per_channel"):
                config = _with_spec(runner.default_config("digits-cnn", wb, ab), granularity=granularity)
                out.append(check(store, f"digits seed {seed} W{wb}A{ab} {granularity}",
                                 config.model_copy(update={"seed": seed})))
    return out


def w2a2(store: RunStore) -> list[dict]:
    out = []
    for method in RANGE_METHODS:
        for granularity in ("per_tensor", "per_channel"):
            for symmetric in (True, False):
                config = _with_spec(runner.default_config("digits-cnn", 2, 2), uniform=True, granularity=granularity,
                                    symmetric=symmetric, range_method=method)
                label = f"W2A2 all {method} {granularity} {'sym' if symmetric else 'asym'}"
                out.append(check(store, label, config))
    return out


def zoo(store: RunStore) -> list[dict]:
    return [check(store, f"{model} W{w}A{a}", _short(runner.default_config(model, w, a), 3))
            for model in ("resnet18", "mobilenetv2", "transformer") for w, a in ((8, 8), (4, 4))]


def previous_export(path: Path, out: Path) -> Path:
    """``path`` as the previous export wrote it: narrow activations not clipped, and (on a CPU without
    VNNI) every int8 weight stored as uint8 + 128."""
    model = onnx.load(str(path))
    g = model.graph
    for clip in [n for n in g.node if n.op_type == "Clip" and n.name.endswith("act_quant/Clip")]:
        for node in g.node:
            node.input[:] = [clip.input[0] if i == clip.output[0] else i for i in node.input]
        g.node.remove(clip)
    if cpu.int8_weights_saturate():
        inits = {t.name: t for t in g.initializer}
        for dq in [n for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]:
            w, zp = inits[dq.input[0]], inits.get(dq.input[2])
            if w.data_type == onnx.TensorProto.INT8 and zp is not None and numpy_helper.to_array(w).ndim >= 2:
                w.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(w).astype(np.int16) + 128).astype(np.uint8),
                                                   w.name))
                zp.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(zp).astype(np.int16) + 128)
                                                    .astype(np.uint8), zp.name))
    onnx.save(model, str(out))
    return out


def latency(store: RunStore, threads: int, rounds: int, tmp: Path) -> list[dict]:
    out = []
    print(f"{'model':<22} {'now ms':>8} {'before ms':>10} {'now/before':>11}  Clip nodes")
    for model in ("resnet18", "mobilenetv2"):
        run_id = runner.execute(_short(runner.default_config(model, 4, 4), 2), store)
        export.export_run(store, run_id)
        now = store.artifact(run_id, "int8.onnx")
        before = previous_export(now, tmp / f"{model}_before.onnx")
        loaded = runner.load(store, run_id)
        x = {export.INPUT_NAME: loaded.data.example(1).numpy()}
        sessions = {"now": export.session(now, threads=threads), "before": export.session(before, threads=threads)}
        ms: dict[str, list[float]] = {k: [] for k in sessions}
        for _ in range(rounds):  # interleaved: drifting load hits both alike
            for name, sess in sessions.items():
                ms[name].append(time_calls(lambda sess=sess, x=x: sess.run(None, x), 10, 50)["median_ms"])
        ratio = float(np.median(np.asarray(ms["now"]) / np.asarray(ms["before"])))
        clips = sum(n.op_type == "Clip" for n in export.optimized_graph(now).graph.node)
        print(f"{model + ' W4A4':<22} {statistics.median(ms['now']):8.2f} {statistics.median(ms['before']):10.2f} "
              f"{ratio:11.3f}  {clips}", flush=True)
        out.append({"model": model, "ms": ms, "ratio": ratio})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", nargs="+", choices=["widths", "w2a2", "zoo", "latency"],
                   default=["widths", "w2a2", "zoo", "latency"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    info = machine_info()
    print(f"{info['cpu']}, {info['cores']} cores; onnxruntime {info['onnxruntime']}; "
          f"u8s8 saturates here: {cpu.int8_weights_saturate()}")
    with tempfile.TemporaryDirectory(prefix="qat-parity-") as tmp:
        store = RunStore(Path(tmp) / "ws")
        for section in args.sections:
            print(f"\n## {section}")
            if section == "latency":
                latency(store, args.threads, args.rounds, Path(tmp))
                continue
            print(HEADER)
            rows = widths(store, args.seeds) if section == "widths" else w2a2(store) if section == "w2a2" else zoo(store)
            worst = min(rows, key=lambda r: r["agreement"])
            gap = max(abs(r["accuracy"] - r["fake_quant_accuracy"]) for r in rows)
            print(f"{len(rows)} runs: agreement min {worst['agreement']:.2%} ({worst['label']}); "
                  f"ORT = eval in {sum(r['accuracy'] == r['sim_accuracy'] for r in rows)}; integer-layer codes "
                  f"differing {sum(r['integer_differing'] for r in rows)}; max |ORT - fake-quant| {gap:.2%}; "
                  f"fq-agree min {min(r['fake_quant_agreement'] for r in rows):.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
