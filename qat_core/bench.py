"""Latency of a run's models on this CPU: ONNX Runtime FP32 and int8, PyTorch eager FP32, and OpenVINO
FP32 and int8 when it is installed (``runtimes``: the same int8.onnx, compiled unchanged).

Each setting (batch size × threads) warms every backend up, then times them call by call with
``time.perf_counter`` in interleaved rounds, so drifting machine load hits them all alike; we report
the median, p90 and p99 latency and the throughput at the median. The machine (CPU name, cores,
AVX2/AVX-512/VNNI flags) is saved with the result: int8 speed-ups depend on it (u8×s8 dot products
are 2× the FP32 FMA rate on AVX2, 4× with VNNI).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from qat_core import cpu, runtimes
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


ROUNDS = 5  # interleaved timing rounds: each backend's calls are split into this many blocks


def _stats(ms: np.ndarray) -> dict[str, float]:
    return {"median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())}


def time_interleaved(fns: dict[str, Callable[[], Any]], warmup: int, iters: int,
                     rounds: int = ROUNDS) -> dict[str, dict[str, float]]:
    """Warm every function up, then time ``iters`` calls of each in ``rounds`` interleaved blocks (the order
    rotated each round): median/p90/p99 in milliseconds, per name."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    rounds = max(1, min(rounds, iters))
    for r in range(rounds):
        calls = iters // rounds + (r < iters % rounds)
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = fns[name]
            for _ in range(calls):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: _stats(np.asarray(t) * 1e3) for name, t in times.items()}


def time_calls(fn: Callable[[], Any], warmup: int, iters: int) -> dict[str, float]:
    """Warm up, then time ``iters`` calls: median/p90/p99 in milliseconds."""
    return time_interleaved({"fn": fn}, warmup, iters, rounds=1)["fn"]


def _batch(example: torch.Tensor, batch: int) -> torch.Tensor:
    reps = -(-batch // len(example))
    return example.repeat(reps, *([1] * (example.dim() - 1)))[:batch].contiguous()


def _openvino(loaded: Any, fp32_path: Any, int8_path: Any, counts: list[int]) -> tuple[list[dict], dict]:
    """OpenVINO's entries of a bench result (one per precision hint, FP32 and int8 compiled per thread
    count) and their compiled models by backend name and thread count; one entry saying why when it cannot."""
    if not runtimes.installed():
        return [{"runtime": "OpenVINO", "error": runtimes.NOT_INSTALLED}], {}
    layers = [r["name"] for r in loaded.qat.layers]
    entries, compiled = [], {}
    try:
        for hint in runtimes.HINTS:
            key = "ov" if hint == "f32" else f"ov_{hint}"
            for t in counts:
                compiled[f"{key}_fp32", t] = runtimes.compile_model(fp32_path, t, hint)
                compiled[f"{key}_int8", t] = runtimes.compile_model(int8_path, t, hint)
            int8 = compiled[f"{key}_int8", counts[-1]]
            used = runtimes.precision(compiled[f"{key}_fp32", counts[-1]])
            if hint != "f32" and used == "f32":  # the default is f32 on this CPU: the f32 entry says so
                entries[0]["default_is_f32"] = True
                compiled = {k: v for k, v in compiled.items() if not k[0].startswith(key)}
                continue
            entries.append({"runtime": "OpenVINO", "version": runtimes.version(), "key": key, "hint": hint,
                            "precision": used, "fp32": f"{key}_fp32", "int8": f"{key}_int8",
                            "kernels": runtimes.kernels(int8, layers)})
        found = runtimes.parity(loaded.qat, loaded.data.test_loader(256),
                                {e["key"]: runtimes.runner(compiled[e["int8"], counts[-1]]) for e in entries})
    except ExportError as err:  # OpenVINO cannot take this model: said on the page, ONNX Runtime still timed
        return [{"runtime": "OpenVINO", "error": str(err)}], {}
    for entry in entries:
        entry["parity"] = found[entry["key"]]
    return entries, compiled


def bench_run(store: Any, run_id: str, batch_sizes: Any = (1, 32), threads: Any = (1, "all"), warmup: int = 10,
              iters: int = 50) -> dict[str, Any]:
    """Time ORT FP32 and int8, PyTorch eager FP32 and, when installed, OpenVINO FP32 and int8 for a run
    (interleaved); OpenVINO's parity with the run's evaluation and its int8 kernels go with its timings, in
    ``runtimes``. Saved as result ``bench``.

    Exports the run first when its ONNX files are missing.
    """
    from qat_core import export, runner

    batches, counts = check_settings(batch_sizes, threads, warmup, iters)
    loaded = runner.load(store, run_id)
    fp32_path, int8_path = export._ensure_exported(store, run_id)
    examples = loaded.data.test_x if len(loaded.data.test_x) else loaded.data.example(2)
    import onnxruntime

    ort = {"runtime": "ONNX Runtime", "version": onnxruntime.__version__, "key": "ort", "precision": "f32",
           "fp32": "ort_fp32", "int8": "ort_int8"}
    others, compiled = _openvino(loaded, fp32_path, int8_path, counts)
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
                fns |= {name: (lambda run=runtimes.runner(model), x=x.numpy(): run(x))
                        for (name, count), model in compiled.items() if count == t}
                for backend, stats in time_interleaved(fns, warmup, iters).items():
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
              "rows": rows, "comparisons": comparisons, "files": sizes, "runtimes": [ort, *others],
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
