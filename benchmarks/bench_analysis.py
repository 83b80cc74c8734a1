"""Analysis benchmarks on the digits CNN: speed, the mixed-precision suggestion, and memory.

    .venv/bin/python benchmarks/bench_analysis.py [--workspace DIR] [--seeds 0 1 2] [--threads 1]

1. Histograms (weights and activations, both stages) + the per-layer error table (both stages)
   for all layers: median wall time of 5 after a warm-up (bar: <= 1 s).
2. Sensitivity of all weight layers at 4 and 2 bits: median of 3 (bar: <= 10 s).
3. The suggestion at an average of <= 3 weight bits, and the uniform plan of the same size, each
   fine-tuned as a normal run (the run's settings) for every seed: test accuracies.
4. Peak RSS (resource.getrusage, in fresh subprocesses, its peak reset after loading the run
   through /proc/self/clear_refs so that loading's own peak does not mask it) of a forward pass over the whole training
   set with and without activation capture, with capture over 10 passes (flat memory), and, for
   contrast, of keeping every activation (what capture avoids).
Prints a JSON report on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qat_core import analysis, runner, search  # noqa: E402
from qat_core.store import RunStore  # noqa: E402

MEMORY_CHILD = """
import resource, sys, itertools, torch
sys.path.insert(0, {root!r})
torch.set_num_threads({threads})
from qat_core import analysis, runner, train
from qat_core.store import RunStore
loaded = runner.load(RunStore({workspace!r}), {run_id!r})
mode, passes = {mode!r}, {passes}
batches = lambda: itertools.chain.from_iterable(
    loaded.data.train_loader(64, True, p) for p in range(passes))
load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.no_grad():  # warm-up: allocator pools and kernels exist before the measured phase
    loaded.qat.eval()(loaded.data.train_x[:64])
with open("/proc/self/clear_refs", "w") as f:  # Linux: reset the peak, so ru_maxrss covers what follows
    f.write("5")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if mode == "capture":
    stats = analysis.capture_activations(loaded.qat, batches())
    values = sum(s.values for s in stats.values())
elif mode == "store":  # the naive way, for contrast: keep every activation the quantizers see
    kept = []
    qs = [analysis.activation_quantizer(loaded.qat, n) for n in analysis.activation_layers(loaded.qat)]
    hs = [q.register_forward_hook(lambda m, i, o: kept.append(i[0].detach().clone())) for q in qs]
    with torch.no_grad():
        loaded.qat.eval()
        for x, _ in batches():
            loaded.qat(x)
    values = sum(t.numel() for t in kept)
else:
    with torch.no_grad():
        loaded.qat.eval()
        values = sum(loaded.qat(x).numel() for x, _ in batches())
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(load_peak, before, after, values)
"""

MEMORY = (("forward", 1), ("capture", 1), ("capture", 10), ("store", 1))


def _median_time(fn, repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def histograms_and_errors(loaded: runner.Loaded) -> None:
    cal = analysis.calibration_batches(loaded)
    for stage in analysis.STAGES:
        model = loaded.ptq if stage == "ptq" else loaded.qat
        stats = analysis.capture_activations(model, cal)
        [s.to_histogram(stage) for s in stats.values()]
        analysis.error_table(loaded, stage, stats=stats)
    for layer in analysis.weight_layers(loaded.qat):
        analysis.weight_histograms(loaded, layer)


def memory(workspace: Path, run_id: str, mode: str, passes: int, threads: int) -> dict:
    code = MEMORY_CHILD.format(root=str(ROOT), workspace=str(workspace), run_id=run_id, mode=mode, passes=passes,
                               threads=threads)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    load_peak, before, after, values = (int(v) for v in out[-4:])
    return {"mode": mode, "passes": passes, "values_seen": values, "load_peak_rss_mib": round(load_peak / 1024, 1),
            "rss_at_start_mib": round(before / 1024, 1), "peak_rss_mib": round(after / 1024, 1),
            "growth_mib": round((after - before) / 1024, 1),
            "if_stored_whole_mib": round(values * 4 / 2**20, 1) if mode != "forward" else 0.0}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workspace", type=Path, default=None)
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--memory-only", metavar="RUN_ID", default=None,
                   help="only the memory measurements, on this finished run of --workspace")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    workspace = args.workspace or Path(tempfile.mkdtemp(prefix="qat-bench-analysis-"))
    store = RunStore(workspace)
    report: dict = {"threads": args.threads, "torch": torch.__version__, "workspace": str(workspace)}
    if args.memory_only:
        report["memory"] = [memory(workspace, args.memory_only, mode, passes, args.threads) for mode, passes in MEMORY]
        print(json.dumps(report, indent=2))
        return

    config = runner.default_config("digits-cnn", 8, 8)  # the run a user gets by default
    start = time.perf_counter()
    run_id = runner.execute(config, store)
    report["train_seconds"] = round(time.perf_counter() - start, 1)
    report["run_metrics"] = {k: store.get(run_id)["metrics"][k]["accuracy"] for k in ("fp32", "ptq", "qat")}
    loaded = runner.load(store, run_id)

    # 1-2. speed
    t, times = _median_time(lambda: histograms_and_errors(loaded), 5)
    report["histograms_and_error_table_s"] = {"median": round(t, 3), "runs": [round(x, 3) for x in times],
                                              "bar": 1.0, "layers": len(loaded.qat.layers)}
    t, times = _median_time(lambda: search.sensitivity(loaded, bits=(4, 2)), 3)
    report["sensitivity_4_and_2_bits_s"] = {"median": round(t, 3), "runs": [round(x, 3) for x in times], "bar": 10.0}

    # 3. suggestion at <= 3 average weight bits vs the uniform plan of the same size, fine-tuned
    start = time.perf_counter()
    sens = search.sensitivity(loaded, bits=(8, 6, 4, 3, 2))
    sug = search.suggest_plan(loaded, sens, average_bits=3.0)
    report["suggestion_seconds"] = round(time.perf_counter() - start, 2)
    uniform = search.uniform_plan(loaded, 3)
    from qat_core.prepare import size_bytes

    rows = loaded.qat.layers
    report["suggestion"] = {"widths": sug.widths, "average_bits": sug.average_bits, "size_bytes": sug.size_bytes,
                            "ptq_accuracy": sug.accuracy,
                            "uniform_3bit_size_bytes": size_bytes(rows, uniform)["quantized_bytes"],
                            "same_as_uniform": sug.plan.model_dump() == uniform.model_dump(),
                            "candidates": json.loads(sug.candidates.to_json(orient="records"))}
    finetuned = {"suggested": [], "uniform_3bit": []}
    for seed in args.seeds:
        for name, plan in (("suggested", sug.plan), ("uniform_3bit", uniform)):
            rid = runner.execute(config.model_copy(update={"plan": plan, "seed": seed}), store)
            finetuned[name].append(store.get(rid)["metrics"]["qat"]["accuracy"])
    report["finetuned_accuracy"] = {k: {"per_seed": v, "mean": statistics.mean(v)} for k, v in finetuned.items()}

    # 4. memory, each in a fresh process
    report["memory"] = [memory(workspace, run_id, mode, passes, args.threads) for mode, passes in MEMORY]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
