"""What this CPU is, and what that means for ONNX Runtime's integer kernels.

On x86 without VNNI, ONNX Runtime's uint8 × int8 kernels (AVX2 ``vpmaddubsw``) add each pair of
products in 16 bits, which saturates once ``|a1·w1 + a2·w2| > 32767`` — reachable with 8-bit weights
(255·127·2 = 64770), never with 7-bit ones. Its uint8 × uint8 kernels widen first and are exact, so
on such a CPU the int8 export stores weights as uint8 with their zero point moved by 128: the same
values, computed exactly (what was simulated is what runs).
"""

from __future__ import annotations

import os
import platform
from functools import lru_cache
from pathlib import Path

from qat_core.errors import ConfigError


@lru_cache(maxsize=1)
def name_and_flags() -> tuple[str, frozenset[str]]:
    """The CPU's model name and its feature flags (empty where /proc/cpuinfo is not readable)."""
    name, flags = platform.processor() or platform.machine(), frozenset()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            name = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = frozenset(value.split())
    return name, flags


SAFE_INT8_WEIGHT = 64  # |w| <= 64 never saturates a pair sum: 2 * 255 * 64 = 32640 <= 32767


def int8_weights_saturate() -> bool:
    """Whether ONNX Runtime's u8×s8 kernels can saturate here: x86 with AVX2 but without VNNI."""
    _, flags = name_and_flags()
    return "avx2" in flags and not flags & {"avx512_vnni", "avxvnni"}


THREADS_ENV = "QAT_STUDIO_THREADS"  # intra-op threads for training and evaluation, where nothing else sets them
SMALL_MODEL_PARAMS = 2_000_000  # below this a layer's work is too small to share between threads


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_threads(count: int, source: str = "--threads") -> int:
    """``count`` threads for work on this machine: 1 to its cores. More never runs faster (each op waits at an
    OpenMP barrier for threads the kernel has descheduled: see :func:`training_threads`), and thousands exhaust
    memory before the first step; the app offers 1 to the cores too. ``source`` names the setting."""
    if not 1 <= count <= cores():
        raise ConfigError(f"{source} asks for {count} threads; give 1 to {cores()} (this machine's cores: more "
                          "threads than cores only wait for each other)")
    return count


def requested_threads(requested: int | None = None) -> int | None:
    """``requested`` (``--threads``), else ``$QAT_STUDIO_THREADS``, checked for this machine; None when neither."""
    if requested is not None:
        return check_threads(requested)
    text = os.environ.get(THREADS_ENV, "").strip()
    if not text:
        return None
    if not text.isdecimal():
        raise ConfigError(f"{THREADS_ENV}={text[:40]!r} is not a number of threads: set it to a whole number from 1 "
                          f"to {cores()} (this machine's cores), or unset it to let QAT Studio choose")
    return check_threads(int(text), THREADS_ENV)


def training_threads(params: int, requested: int | None = None) -> int:
    """Intra-op threads for training a model of ``params`` parameters, chosen rather than inherited.

    ``requested`` (``--threads``), else ``$QAT_STUDIO_THREADS``, else 1 for a small model and every core
    (at most 4) for a larger one. torch's default (every core) makes each op wait at an OpenMP barrier
    for all its threads: with one other busy process on 2 cores, the digits run took 88–264 s, not 6 s.
    """
    requested = requested_threads(requested)
    if requested is not None:
        return requested
    return 1 if params < SMALL_MODEL_PARAMS else min(cores(), 4)
