"""Latency of a run's models on this CPU: ONNX Runtime FP32 and int8, and PyTorch eager FP32.

Each setting (backend × batch size × intra-op threads) is warmed up, then timed call by call
with ``time.perf_counter``; we report the median, p90 and p99 latency and the throughput at the
median. The machine (CPU name, cores, AVX2/AVX-512/VNNI flags) is saved with the result: int8
speed-ups depend on it (u8×s8 dot products are 2× the FP32 FMA rate on AVX2, 4× with VNNI).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from qat_core import cpu
from qat_core.errors import ExportError

CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avxvnni")
MAX_BATCH = 4096
OVERHEAD_BOUND_MS = 1.0  # below this FP32 latency a model is dominated by per-call overhead


def machine_info() -> dict[str, Any]:
    """CPU name, logical cores, SIMD flags that matter for int8, and library versions."""
    name, flags = cpu.name_and_flags()
    import onnxruntime

    return {"cpu": name, "cores": os.cpu_count() or 1, "flags": {f: f in flags for f in CPU_FLAGS},
            "platform": platform.platform(), "onnxruntime": onnxruntime.__version__, "torch": torch.__version__}


def check_settings(batch_sizes: Any, threads: Any, warmup: int, iters: int) -> tuple[list[int], list[int]]:
    """Validated batch sizes and thread counts (``"all"`` → every core); ExportError says what to fix."""
    cores = cpu.cores()
    batches = list(batch_sizes)
    if not batches:
        raise ExportError("give at least one batch size, e.g. --batch 1 32")
    for b in batches:
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= MAX_BATCH:
            raise ExportError(f"batch size must be a whole number from 1 to {MAX_BATCH}; got {b!r}")
    counts = []
    for t in list(threads):
        if t == "all":
            counts.append(cores)
        elif isinstance(t, bool) or not isinstance(t, int) or t < 1:
            raise ExportError(f"threads must be a whole number >= 1 or 'all' (every core: {cores}); got {t!r}")
        else:
            counts.append(cpu.check_threads(t))
    if not counts:
        raise ExportError("give at least one thread count, e.g. --threads 1 all")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ExportError(f"warmup must be a whole number >= 0; got {warmup!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ExportError(f"iters must be a whole number >= 1; got {iters!r}")
    return sorted(set(batches)), sorted(set(counts))


def time_calls(fn: Callable[[], Any], warmup: int, iters: int) -> dict[str, float]:
    """Warm up, then time ``iters`` calls: median/p90/p99 in milliseconds."""
    for _ in range(warmup):
        fn()
    times = np.empty(iters)
    for i in range(iters):
        start = time.perf_counter()
        fn()
        times[i] = time.perf_counter() - start
    ms = times * 1e3
    return {"median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())}


def _batch(example: torch.Tensor, batch: int) -> torch.Tensor:
    reps = -(-batch // len(example))
    return example.repeat(reps, *([1] * (example.dim() - 1)))[:batch].contiguous()


def bench_run(store: Any, run_id: str, batch_sizes: Any = (1, 32), threads: Any = (1, "all"), warmup: int = 10,
              iters: int = 50) -> dict[str, Any]:
    """Time ORT FP32, ORT int8 and PyTorch eager FP32 for a run; saved as result ``bench``.

    Exports the run first when its ONNX files are missing.
    """
    from qat_core import export, runner

    batches, counts = check_settings(batch_sizes, threads, warmup, iters)
    loaded = runner.load(store, run_id)
    fp32_path, int8_path = export._ensure_exported(store, run_id)
    examples = loaded.data.test_x if len(loaded.data.test_x) else loaded.data.example(2)
    rows = []
    torch_threads = torch.get_num_threads()
    try:
        for t in counts:
            sessions = {"ort_fp32": export.session(fp32_path, threads=t), "ort_int8": export.session(int8_path, threads=t)}
            torch.set_num_threads(t)
            for b in batches:
                x = _batch(examples, b)
                feed = {export.INPUT_NAME: x.numpy()}
                fns: dict[str, Callable[[], Any]] = {name: (lambda s=s, feed=feed: s.run(None, feed)) for name, s in sessions.items()}

                def eager(x: torch.Tensor = x) -> Any:
                    with torch.inference_mode():
                        return loaded.fp32(x)

                fns["torch_fp32"] = eager
                for backend, fn in fns.items():
                    stats = time_calls(fn, warmup, iters)
                    rows.append({"backend": backend, "batch": b, "threads": t, **stats,
                                 "throughput": b / (stats["median_ms"] / 1e3)})
    finally:
        torch.set_num_threads(torch_threads)
    comparisons = []
    for t in counts:
        for b in batches:
            pick = {r["backend"]: r for r in rows if r["batch"] == b and r["threads"] == t}
            fp32_ms, int8_ms = pick["ort_fp32"]["median_ms"], pick["ort_int8"]["median_ms"]
            comparisons.append({"batch": b, "threads": t, "int8_over_fp32": int8_ms / fp32_ms,
                                "speedup": fp32_ms / int8_ms,
                                "overhead_bound": int8_ms >= fp32_ms and fp32_ms < OVERHEAD_BOUND_MS * b})
    sizes = {"fp32_bytes": fp32_path.stat().st_size, "int8_bytes": int8_path.stat().st_size}
    sizes["ratio"] = sizes["int8_bytes"] / sizes["fp32_bytes"]
    result = {"machine": machine_info(), "settings": {"batch_sizes": batches, "threads": counts, "warmup": warmup,
                                                      "iters": iters},
              "rows": rows, "comparisons": comparisons, "files": sizes,
              "overhead_bound": any(c["overhead_bound"] for c in comparisons)}
    if result["overhead_bound"]:
        result["note"] = ("this model is so small that per-call overhead, not arithmetic, sets its latency: "
                          "int8 cannot be faster here; compare on a larger model or batch")
    store.write_result(run_id, "bench", result)
    first = comparisons[0]
    store.update_metrics(run_id, bench={"batch": first["batch"], "threads": first["threads"],
                                       "speedup": first["speedup"], "overhead_bound": result["overhead_bound"],
                                       "size_ratio": sizes["ratio"], "cpu": result["machine"]["cpu"]})
    return result
