"""The demo's long waits, timed against the issue's bars, on an idle machine and beside one busy process.

    .venv/bin/python benchmarks/bench_demo_timings.py [--workspace DIR] [--conditions idle busy]

1. "Suggest a plan" on digits-cnn (Inspect: the sensitivity table is there already; average <= 3 weight
   bits, 4 front samples, as the page asks): bar <= 10 s. Beside it, the same with torch's default
   threads (QAT_STUDIO_THREADS = every core), which is what the server used before.
2. The HTML report of a torchvision mobilenet_v3_small run, its per-layer errors not yet measured (the run
   loaded as the Export page has it, then the report): bar <= 20 s. Again beside torch's default threads.
3. The Model & data estimate of a whole run against the run launched as the app launches it (a new
   process, 1 thread, no cached baseline), for digits-cnn and mobilenet_v3_small: bar 1/1.5 .. 1.5.

"busy" runs one `python -c "while True: pass"` beside each measurement. Every measurement is a fresh
process, so nothing is cached in memory. The load average is printed beside: other work on the machine
shows there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BARS = {"suggest": 10.0, "report": 20.0, "estimate": 1.5}
MODELS = {"digits": "digits-cnn", "mobilenet": "torchvision:mobilenet_v3_small"}

CHILD = r"""
import json, sys, time
sys.path.insert(0, {root!r})
from qat_core import analysis, report, runner, search, train
from qat_core.store import RunStore
store, what, run_id = RunStore({workspace!r}), {what!r}, {run_id!r}
out = {{}}
if what == "suggest":
    loaded = runner.load(store, run_id)
    sens = search.sensitivity(loaded, [4, 2])  # the page has it saved already: not timed
    started = time.perf_counter()
    search.suggest_plan(loaded, sens, average_bits=3.0, measure=4)
    out["seconds"] = time.perf_counter() - started
elif what == "report":
    (store.run_dir(run_id) / "results" / (analysis.ERRORS_RESULT + ".json")).unlink(missing_ok=True)
    started = time.perf_counter()
    report.report_html(store, run_id, runner.load(store, run_id))
    out["seconds"] = time.perf_counter() - started
elif what == "estimate":
    config = runner.default_config({model!r})
    timed = config.model_copy(update={{"baseline": config.baseline.model_copy(update={{"epochs": 1}}),
                                       "finetune": config.finetune.model_copy(update={{"epochs": 1}})}})
    started = time.perf_counter()
    with train.torch_threads(1):
        est = runner.time_estimate(config, runner.seconds_per_step(timed, 1))
    out = {{"estimate": est["run_total"], "timing": time.perf_counter() - started, "config": config.to_yaml()}}
print(json.dumps(out))
"""


def child(workspace: Path, what: str, run_id: str = "", model: str = "", threads: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "QAT_STUDIO_THREADS"} | (
        {"QAT_STUDIO_THREADS": threads} if threads else {})  # unset: analysis chooses (1 thread)
    code = CHILD.format(root=str(ROOT), workspace=str(workspace), what=what, run_id=run_id, model=model)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def launched_run(config_yaml: str) -> float:
    """Wall seconds of a run started as the app starts one (runner.launch: a new process, 1 thread)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(config_yaml)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "qat_core.cli", "--workspace", str(Path(tmp) / "ws"), "train", str(path),
                        "--quiet"], check=True, env=os.environ | {"QAT_STUDIO_THREADS": "1"}, cwd=ROOT,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - started


def train_runs(workspace: Path) -> dict[str, str]:
    sys.path.insert(0, str(ROOT))
    from qat_core import runner
    from qat_core.store import RunStore

    store = RunStore(workspace)
    return {name: runner.execute(runner.default_config(model), store, threads=1) for name, model in MODELS.items()}


def measure(workspace: Path, runs: dict[str, str]) -> dict[str, float]:
    cores = str(os.cpu_count() or 1)
    out = {"load": os.getloadavg()[0]}
    out["suggest"] = child(workspace, "suggest", runs["digits"])["seconds"]
    out["suggest_default_threads"] = child(workspace, "suggest", runs["digits"], threads=cores)["seconds"]
    out["report"] = child(workspace, "report", runs["mobilenet"])["seconds"]
    out["report_default_threads"] = child(workspace, "report", runs["mobilenet"], threads=cores)["seconds"]
    for name, model in MODELS.items():
        est = child(workspace, "estimate", model=model)
        out[f"estimate_{name}"], out[f"estimate_{name}_timing"] = est["estimate"], est["timing"]
        out[f"run_{name}"] = launched_run(est["config"])
    return out


def show(condition: str, m: dict[str, float]) -> None:
    def verdict(ok: bool) -> str:
        return "meets the bar" if ok else "MISSES the bar"

    print(f"\n{condition} (load average {m['load']:.1f} at the start)")
    print(f"  Suggest a plan, digits     {m['suggest']:6.1f} s  (torch's default threads: "
          f"{m['suggest_default_threads']:.1f} s, {m['suggest_default_threads'] / m['suggest']:.1f}x)  "
          f"bar {BARS['suggest']:.0f} s: {verdict(m['suggest'] <= BARS['suggest'])}")
    print(f"  HTML report, mobilenet     {m['report']:6.1f} s  (torch's default threads: "
          f"{m['report_default_threads']:.1f} s, {m['report_default_threads'] / m['report']:.1f}x)  "
          f"bar {BARS['report']:.0f} s: {verdict(m['report'] <= BARS['report'])}")
    for name in MODELS:
        ratio = m[f"run_{name}"] / m[f"estimate_{name}"]
        ok = 1 / BARS["estimate"] <= ratio <= BARS["estimate"]
        print(f"  estimate, {name:<10}       {m[f'estimate_{name}']:6.1f} s, run {m[f'run_{name}']:6.1f} s: "
              f"run/estimate {ratio:.2f}  (timing it took {m[f'estimate_{name}_timing']:.1f} s)  "
              f"bar 1/{BARS['estimate']}..{BARS['estimate']}: {verdict(ok)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, help="an empty folder (default: a temporary one)")
    parser.add_argument("--conditions", nargs="+", choices=["idle", "busy"], default=["idle", "busy"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workspace = args.workspace or Path(tmp) / "ws"
        runs = train_runs(workspace)
        print(f"{os.cpu_count()} cores; runs: {runs}")
        for condition in args.conditions:
            busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if condition == "busy" else None
            try:
                show(condition, measure(workspace, runs))
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()


if __name__ == "__main__":
    main()
