"""Digits CNN accuracy at each bit width, PTQ beside QAT, over seeds; and the default run's time.

Each run is the real pipeline (`runner.execute`): FP32 baseline (cached per seed), PTQ
(calibration only) and QAT (calibration + fine-tune) with the default plan for the width
(first and last layer at 8 bits). Bars (issue 2): FP32 ≥ 99.0%; W8A8 QAT within 0.3 points of
FP32; W4A4 QAT ≥ 99.0%; W2A4 QAT ≥ 98.0% and ≥ 5 points above PTQ on average; the default run
(`config init` + `train`, FP32 baseline included) in ≤ 8 s.

    python benchmarks/bench_digits_widths.py [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time

from qat_core import runner
from qat_core.store import RunStore

WIDTHS = [(8, 8), (4, 8), (4, 4), (2, 4)]


def default_run_seconds(workspace: str) -> float:
    """Wall time of the README path: `config init` then `train`, in fresh processes."""
    cfg = subprocess.run([sys.executable, "-m", "qat_core.cli", "config", "init", "--model", "digits-cnn"],
                         capture_output=True, text=True, check=True).stdout
    path = f"{workspace}/default.yaml"
    with open(path, "w") as f:
        f.write(cfg)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "qat_core.cli", "--workspace", f"{workspace}/ws", "train", path, "--quiet"],
                   check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(f"default digits run (config init + train, FP32 baseline included): {default_run_seconds(tmp):.1f} s")
        store = RunStore(f"{tmp}/widths")
        table: dict[tuple[int, int], dict[str, list[float]]] = {w: {"fp32": [], "ptq": [], "qat": []} for w in WIDTHS}
        for seed in args.seeds:
            for wb, ab in WIDTHS:
                config = runner.default_config("digits-cnn", wb, ab).model_copy(update={"seed": seed})
                m = store.get(runner.execute(config, store))["metrics"]
                for phase in ("fp32", "ptq", "qat"):
                    table[(wb, ab)][phase].append(100 * m[phase]["accuracy"])
                print(f"seed {seed} W{wb}A{ab}: FP32 {m['fp32']['accuracy']:.2%}  PTQ {m['ptq']['accuracy']:.2%}  "
                      f"QAT {m['qat']['accuracy']:.2%}  size {m['size']['ratio']:.3f}× FP32", flush=True)
        print(f"\nmean over seeds {args.seeds} (test split of 450):")
        print(f"{'width':<6} {'FP32':>7} {'PTQ':>7} {'QAT':>7} {'QAT-PTQ':>8} {'QAT-FP32':>9}")
        for (wb, ab), cols in table.items():
            fp32, ptq, qat = (statistics.mean(cols[k]) for k in ("fp32", "ptq", "qat"))
            print(f"W{wb}A{ab}  {fp32:7.2f} {ptq:7.2f} {qat:7.2f} {qat - ptq:+8.2f} {qat - fp32:+9.2f}")
        print("per-seed minimum QAT:", {f"W{w}A{a}": min(c["qat"]) for (w, a), c in table.items()})


if __name__ == "__main__":
    main()
