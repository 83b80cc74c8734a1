"""Sweeps, measured side by side in one run (issue 13's bars):

1. 8 digits-CNN plans, 1 thread a run: one after another in one process (``runner.execute``), and as a
   sweep with 2 workers; each from a workspace with the FP32 baseline cached (the training of the runs
   alone) and from a new one (the baseline trained first, as a user starts). And, as people start runs
   one after another, one ``qat-studio train`` per run. Bar: 2 workers ≤ 0.6× one after another.
2. The same 8 plans on a local Ray instance: the same accuracy, run for run.
3. The trained Pareto front at ≤ 3 average weight bits over 3 seeds: uniform widths, the sensitivity
   suggestions at 3 and 2.5 bits and hand-made mixed plans, each trained; the best trained plan against
   the suggestion (trained, and as the sensitivity scan measured it after calibration alone).

Run: .venv/bin/python benchmarks/bench_sweep.py [--skip-timing] [--skip-ray] [--skip-pareto]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qat_core import runner, search, sweep, zoo  # noqa: E402
from qat_core.prepare import layer_table  # noqa: E402
from qat_core.store import RunStore  # noqa: E402

MIXED = {  # hand-made plans over the digits CNN's layers: the small first and last layers wider
    "ends-8 rest-2": {"default": {"weight_bits": 2},
                      "overrides": {"conv1.conv": {"weight_bits": 8}, "fc": {"weight_bits": 8}}},
    "conv3-2 rest-4": {"default": {"weight_bits": 4}, "overrides": {"conv3.conv": {"weight_bits": 2}}},
}


def eight_plans() -> sweep.SweepSpec:
    return sweep.SweepSpec(name="eight", base=runner.default_config("digits-cnn"), latency=False,
                           vary=sweep.Vary(weight_bits=[8, 7, 6, 5, 4, 3, 2], plans={"ends-8 rest-2": MIXED["ends-8 rest-2"]}))


def workspace(tmp: Path, spec: sweep.SweepSpec | None = None) -> RunStore:
    """A new workspace; with ``spec``, its FP32 baseline already cached."""
    store = RunStore(Path(tempfile.mkdtemp(dir=tmp)))
    if spec is not None:
        runner.baseline(spec.base, store)
    return store


def accuracies(store: RunStore, frame) -> list[float]:
    return [store.get(r)["metrics"]["qat"]["accuracy"] for r in frame["run"]]


def one_after_another(items: list[sweep.Item], store: RunStore) -> float:
    started = time.perf_counter()
    for item in items:
        runner.execute(item.config, store, threads=1)
    return time.perf_counter() - started


def by_cli(items: list[sweep.Item], store: RunStore, tmp: Path) -> float:
    """`qat-studio train` per run, as a user (or the app's Fine-tune page) starts runs one after another."""
    started = time.perf_counter()
    for k, item in enumerate(items):
        path = tmp / f"run{k}.yaml"
        path.write_text(item.config.to_yaml())
        subprocess.run([sys.executable, "-m", "qat_core.cli", "--workspace", str(store.root), "train", str(path),
                        "--quiet", "--threads", "1"], check=True, capture_output=True, cwd=ROOT)
    return time.perf_counter() - started


def swept(spec: sweep.SweepSpec, store: RunStore, **executor) -> tuple[float, object]:
    started = time.perf_counter()
    frame = sweep.run_sweep(spec, store, threads=1, **executor)
    return time.perf_counter() - started, frame


def timing(tmp: Path, skip_ray: bool) -> None:
    spec = eight_plans()
    model, data = zoo.build(spec.base.model, spec.base.data)
    items = sweep.expand(spec, sweep.plan_variations(spec, layer_table(model, data.example()), {}))
    print(f"1. {len(items)} digits-CNN plans, 1 thread a run, each contender in a new workspace:")
    rows = [("one after another in one process, baseline cached", one_after_another(items, workspace(tmp, spec))),
            ("sweep, 2 workers, baseline cached", swept(spec, workspace(tmp, spec), workers=2)[0]),
            ("one after another in one process, baseline trained first", one_after_another(items, workspace(tmp))),
            ("sweep, 2 workers, baseline trained first", swept(spec, workspace(tmp), workers=2)[0]),
            ("one `qat-studio train` after another, baseline trained first", by_cli(items, workspace(tmp), tmp))]
    for k, (what, took) in enumerate(rows):
        reference = rows[0][1] if k < 2 else rows[2][1]
        print(f"   {what:<62} {took:6.1f} s  x{took / reference:.2f} of one process, one after another")
    store = workspace(tmp, spec)
    _, frame = swept(spec, store, workers=2)
    print("   QAT accuracy: " + ", ".join(f"{label} {acc:.2%}" for label, acc in
                                          zip(frame["label"], accuracies(store, frame), strict=True)))
    if skip_ray:
        return
    ray_store = workspace(tmp, spec)
    took, on_ray = swept(spec, ray_store, ray="local")
    same = accuracies(ray_store, on_ray) == accuracies(store, frame)
    print(f"2. on a local Ray instance (1 CPU a task): {took:.1f} s (Ray's start included); "
          f"accuracies {'identical' if same else 'DIFFERENT'} run for run")


def pareto(tmp: Path) -> None:
    spec = sweep.SweepSpec(name="pareto", base=runner.default_config("digits-cnn"), latency=False,
                           vary=sweep.Vary(weight_bits=[4, 3, 2], plans=MIXED, seed=[0, 1, 2],
                                           suggested=sweep.Suggested(average_bits=[3.0, 2.5], widths=[8, 4, 3, 2])))
    store = RunStore(Path(tempfile.mkdtemp(dir=tmp)))
    started = time.perf_counter()
    frame = sweep.run_sweep(spec, store)
    print(f"3. {len(frame)} runs (7 plans × 3 seeds) in {time.perf_counter() - started:.1f} s; "
          "QAT accuracy by plan and seed:")
    frame["plan"] = frame["label"].str.split(" · ").str[0]
    frame["seed"] = frame["label"].str.split(" · seed ").str[1].astype(int)
    frame["acc"] = accuracies(store, frame)
    table = frame.pivot_table(index=["plan", "avg weight bits"], columns="seed", values="acc")
    table["mean"] = table.mean(axis=1)
    print(table.map(lambda v: f"{v:.2%}").to_string())
    within = table[table.index.get_level_values("avg weight bits") <= 3.0]
    best = within["mean"].idxmax()
    suggested = next(i for i in within.index if i[0] == "suggested ≤ 3 bits")
    print(f"   best trained plan at ≤ 3 bits (by mean over seeds): {best[0]} ({best[1]:.2f} bits), "
          f"{within.loc[best, 'mean']:.2%}")
    print(f"   the sensitivity suggestion at ≤ 3 bits, trained: {suggested[1]:.2f} bits, "
          f"{within.loc[suggested, 'mean']:.2%}; best minus suggestion "
          f"{(within.loc[best, 'mean'] - within.loc[suggested, 'mean']) * 100:+.2f} points")
    means = within["mean"].to_numpy()
    bits = within.index.get_level_values("avg weight bits").to_numpy()
    front = search.pareto_mask(bits, means)
    print("   the trained front at ≤ 3 bits (mean accuracy vs average weight bits): " + ", ".join(
        f"{plan} ({b:.2f} bits, {m:.2%})" for (plan, b), m, on in zip(within.index, means, front, strict=True) if on))
    per_seed = [within[s].max() - within.loc[suggested, s] for s in (0, 1, 2)]
    print(f"   per seed, best at ≤ 3 bits minus suggestion: {', '.join(f'{d * 100:+.2f}' for d in per_seed)} points "
          f"(mean {statistics.mean(per_seed) * 100:+.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--skip-pareto", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_timing:
            timing(Path(tmp), args.skip_ray)
        if not args.skip_pareto:
            pareto(Path(tmp))


if __name__ == "__main__":
    main()
