"""What the run store's damage handling costs: listing N runs from the index, rebuilding the index
from the run folders (a corrupt or deleted index), and recording a run (index row + run.json, fsynced).

    .venv/bin/python benchmarks/bench_store.py [--runs 300]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from qat_core.config import RunConfig
from qat_core.store import RunStore


def timed(fn, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_store_")) / "ws"
    store = RunStore(root)
    config = RunConfig()
    t0 = time.perf_counter()
    for i in range(args.runs):
        run_id = store.create_run(config)
        store.update_metrics(run_id, fp32={"accuracy": 0.99}, ptq={"accuracy": 0.98}, qat={"accuracy": 0.985 + i * 1e-6})
        store.finish(run_id)
    record_s = (time.perf_counter() - t0) / args.runs
    listing = timed(lambda: store.list())

    def rebuild() -> None:
        (root / "index.sqlite").write_bytes(b"damaged" * 100)
        RunStore(root)

    rebuilding = timed(rebuild, repeat=3)
    for old in root.glob("index.sqlite.damaged-*"):
        old.unlink()
    assert len(RunStore(root).list()) == args.runs
    print(f"{args.runs} runs")
    print(f"  record a run (create, metrics, finish; 3 fsynced writes each) {record_s * 1e3:8.2f} ms")
    print(f"  list every run from the index                               {listing * 1e3:8.2f} ms")
    print(f"  rebuild a damaged index from the run folders               {rebuilding * 1e3:8.2f} ms"
          f"  (x{rebuilding / listing:.1f} a listing)")


if __name__ == "__main__":
    main()
