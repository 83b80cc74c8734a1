"""The default digits run (`config init` + `train`, FP32 baseline included) on an idle machine and beside one
other CPU-bound process, with the threads QAT Studio chooses (1 for a model this small) and with torch's
default (every core). Side by side in one run; each run on a fresh workspace.

The bar (issue 13): under contention the chosen threads keep the run within 1.5x of its idle time.
Run: .venv/bin/python benchmarks/bench_threads.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "qat_core.cli"]
LIMIT_S = 180  # a run slower than this is stopped and reported as "> LIMIT_S"


def digits_run(tmp: Path, threads: int | None) -> float:
    """Seconds of `qat-studio train` on the default digits config in a new workspace."""
    config = tmp / "digits.yaml"
    if not config.exists():
        config.write_text(subprocess.run([*CLI, "config", "init", "--model", "digits-cnn"], cwd=ROOT, check=True,
                                         capture_output=True, text=True).stdout)
    workspace = Path(tempfile.mkdtemp(dir=tmp))
    env = {k: v for k, v in os.environ.items() if k not in ("QAT_STUDIO_THREADS", "OMP_NUM_THREADS")}
    args = [*CLI, "--workspace", str(workspace), "train", str(config), "--quiet"]
    if threads is not None:
        args += ["--threads", str(threads)]
    started = time.perf_counter()
    try:
        subprocess.run(args, cwd=ROOT, check=True, capture_output=True, env=env, timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        return float("inf")
    return time.perf_counter() - started


def busy() -> subprocess.Popen:
    """One other CPU-bound process (a pure-Python loop: one core)."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def show(seconds: float) -> str:
    return f"> {LIMIT_S} s" if seconds == float("inf") else f"{seconds:6.1f} s"


def main() -> None:
    cores = len(os.sched_getaffinity(0))
    choices = {"chosen (1 thread)": None, f"torch default ({cores} threads)": cores}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        digits_run(tmp, None)  # warm the file cache (imports, wheels)
        rows = []
        for name, threads in choices.items():
            idle = digits_run(tmp, threads)
            competitor = busy()
            try:
                contended = digits_run(tmp, threads)
            finally:
                competitor.kill()
                competitor.wait()
            rows.append((name, idle, contended))
    print(f"default digits run (config init + train), {cores} cores, one competing CPU-bound process:")
    for name, idle, contended in rows:
        print(f"  {name:<26} idle {show(idle)}   contended {show(contended)}   ratio {contended / idle:5.2f}x")
    chosen = rows[0]
    print(f"bar: chosen threads under contention <= 1.5x idle: {chosen[2] / chosen[1]:.2f}x "
          f"({'met' if chosen[2] / chosen[1] <= 1.5 else 'NOT met'})")


if __name__ == "__main__":
    main()
