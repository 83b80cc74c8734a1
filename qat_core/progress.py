"""How far long work has come and how long it has left: one arithmetic for the engine, the pages and the CLI.

Time left is the pace measured so far times the work left, the first step excluded where it can be: it
allocates and dispatches for the first time (a training step of mobilenet_v3_small: several times the
next ones), and counting it would announce the rest of a run as several times too long.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

STAGES = {"fp32": "training the FP32 baseline", "ptq": "calibrating (PTQ)", "qat": "QAT fine-tune"}


def seconds_left(done: float, total: float, elapsed: float, warmup: tuple[float, float] | None = None) -> float | None:
    """Seconds until ``total`` steps are done, at the pace of the ``done`` steps that took ``elapsed`` seconds;
    ``warmup`` = (steps, seconds) at the end of the warm-up: the pace is then measured after it. None until a
    step has been timed (nothing to go on: the pages say what is being done instead)."""
    if not total or done <= 0 or elapsed < 0 or not math.isfinite(elapsed):
        return None
    if done >= total:
        return 0.0
    start_done, start_elapsed = warmup if warmup is not None and done > warmup[0] else (0.0, 0.0)
    return max(0.0, (elapsed - start_elapsed) / (done - start_done)) * (total - done)


def duration(seconds: float) -> str:
    """``0.4 s``, ``12 s``, ``3 min 20 s``, ``1 h 5 min``."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


def left_text(seconds: float | None) -> str:
    """``about 40 s left``; ``""`` while nothing has been timed yet."""
    if seconds is None:
        return ""
    return "under a second left" if seconds < 1 else f"about {duration(seconds)} left"


class Pace:
    """The clock of one task of ``total`` steps, started when made: :meth:`payload` is what an
    ``on_progress`` callback receives, its time left included."""

    def __init__(self, total: int, clock: Callable[[], float] = time.perf_counter):
        self.total, self.clock, self.started = total, clock, clock()
        self.warmup: tuple[float, float] | None = None

    def payload(self, task: str, done: int, **info: Any) -> dict[str, Any]:
        elapsed = self.clock() - self.started
        if done >= 1 and self.warmup is None:
            self.warmup = (done, elapsed)
        left = seconds_left(done, self.total, elapsed, self.warmup)
        return {"task": task, "done": done, "total": self.total, "elapsed": elapsed, "seconds_left": left, **info}


def step_seconds_left(events: Sequence[dict[str, Any]]) -> float | None:
    """Time left in the training phase of the last step event (a run's ``events.jsonl``), from the
    ``elapsed`` seconds its steps recorded, its first step excluded."""
    steps = [e for e in events if "step" in e]
    if not steps:
        return None
    last = steps[-1]
    phase = [e for e in steps if e.get("phase") == last.get("phase") and "elapsed" in e]
    if not phase or "elapsed" not in last:
        return None
    first = phase[0]
    return seconds_left(last["step"], last["total"], last["elapsed"], (first["step"], first["elapsed"]))


def run_progress(events: Sequence[dict[str, Any]]) -> tuple[float, str]:
    """A running run's overall progress 0..1 and what it is doing (of: FP32 baseline, PTQ, QAT fine-tune),
    with the time left in its current stage."""
    done = {e["phase"] for e in events if e.get("done")}
    steps = [e for e in events if "step" in e]
    last = steps[-1] if steps else None
    if last is not None and last["phase"] not in done:
        frac = last["step"] / last["total"]
        stage, overall = (1, 0.4 * frac) if last["phase"] == "fp32" else (3, 0.5 + 0.5 * frac)
        left = left_text(step_seconds_left(events))
        return min(overall, 1.0), (f"Stage {stage} of 3 · {STAGES.get(last['phase'], last['phase'])}: step "
                                   f"{last['step']}/{last['total']}, loss {last['loss']:.4f}"
                                   + (f" · {left} in this stage" if left else ""))
    if "ptq" in done:
        return 0.5, "Stage 3 of 3 · QAT fine-tune: preparing the model…"
    calibration = [e for e in events if "calibrated" in e]
    if "fp32" in done and calibration:
        last, first = calibration[-1], calibration[0]
        left = left_text(seconds_left(last["calibrated"], last["of"], last["elapsed"],
                                      (first["calibrated"], first["elapsed"])))
        if last["calibrated"] >= last["of"]:
            return 0.45, "Stage 2 of 3 · measuring PTQ accuracy on the test set…"
        return 0.4 + 0.05 * last["calibrated"] / last["of"], (
            f"Stage 2 of 3 · calibrating (PTQ): batch {last['calibrated']} of {last['of']}"
            + (f" · {left} in this stage" if left else ""))
    if "fp32" in done:
        return 0.4, "Stage 2 of 3 · calibrating and measuring PTQ (the FP32 baseline is ready)…"
    return 0.0, "Stage 1 of 3 · starting: loading PyTorch, the data and the FP32 baseline…"


def runs_progress(total: int, done: int, running: Sequence[float], elapsed: float | None) -> tuple[float, float | None]:
    """A sweep's share of runs trained, each running run counting by its own progress (so the bar moves
    while the first runs train), and the time left at the pace since training began (``elapsed`` s)."""
    if not total:
        return 0.0, None
    share = min(1.0, (done + sum(running)) / total)
    return share, seconds_left(share, 1.0, elapsed) if elapsed is not None else None


def task_text(payload: dict[str, Any], what: str) -> str:
    """A progress payload (:meth:`Pace.payload`) as one line: ``what: 3 of 12 · about 40 s left``."""
    left = left_text(payload.get("seconds_left"))
    return f"{what}: {payload['done']} of {payload['total']}" + (f" · {left}" if left else "")
