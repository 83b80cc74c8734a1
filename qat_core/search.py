"""What to try next: how much each layer suffers at each width (sensitivity), mixed-precision plans
for a size budget (suggestions), and the Pareto front of size against accuracy.

Sensitivity and suggestions are proxies measured after calibration alone (no fine-tune), one layer
at a time; :mod:`qat_core.sweep` trains the candidates instead. Everything reads a finished run
(:func:`qat_core.runner.load`) or a :class:`~qat_core.runner.Loaded` built from a baseline.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from qat_core import train
from qat_core.analysis import (
    Batch,
    OnProgress,
    activation_layers,
    calibration_batches,
    layer_names,
    weight_layers,
    work_threads,
)
from qat_core.config import MAX_BITS, MIN_BITS, LayerPlan, QuantOverride
from qat_core.errors import CancelledError, ConfigError, StoreError
from qat_core.prepare import prepare, size_bytes
from qat_core.progress import Pace
from qat_core.quantizers import quantizers, set_enabled

if TYPE_CHECKING:
    from qat_core.runner import Loaded


# --- sensitivity -----------------------------------------------------------------------------

def check_bits(bits: Sequence[int]) -> list[int]:
    out = []
    for b in bits:
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not MIN_BITS <= int(b) <= MAX_BITS:
            raise ConfigError(f"bit widths must be whole numbers from {MIN_BITS} to {MAX_BITS}, got {b!r}")
        out.append(int(b))
    if not out:
        raise ConfigError(f"give at least one bit width ({MIN_BITS}..{MAX_BITS})")
    return sorted(set(out), reverse=True)


def _held_out(loaded: Loaded, batches: int | None) -> list[Batch]:
    data = list(loaded.data.test_loader())
    if batches is not None:
        if batches < 1:
            raise ConfigError(f"held-out batches must be at least 1, got {batches}")
        data = data[:batches]
    if not data:
        raise StoreError("the held-out (test) set of this run is empty; use a larger data.test_fraction")
    return data


def _check_layers(names: Sequence[str], allowed: list[str], what: str) -> list[str]:
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ConfigError(f"layer(s) {', '.join(map(repr, unknown))} do not exist or have no {what}; "
                          f"choose from: {', '.join(allowed)}")
    return list(names)


def width_plan(base: LayerPlan, layers: Sequence[str], bits: dict[str, int | None],
                act_bits: int | None | str = "keep") -> LayerPlan:
    """``base`` with each layer's weight bits set from ``bits`` (and, unless "keep", act bits)."""
    overrides = dict(base.overrides)
    for name in layers:
        spec = base.spec_for(name)
        changes: dict[str, Any] = spec.model_dump()
        if name in bits:
            changes["weight_bits"] = bits[name]
        if act_bits != "keep":
            changes["act_bits"] = act_bits
        overrides[name] = QuantOverride(**{k: ("off" if v is None and k.endswith("_bits") else v)
                                           for k, v in changes.items()})
    return LayerPlan(default=base.default, overrides=overrides)


def progress(on_progress: OnProgress | None, cancel: train.Cancel | None, what: str, pace: Pace | None = None,
             **info: Any) -> None:
    """Stop if cancelled, else tell ``on_progress`` how far ``what`` is (with its time left, given its ``pace``)."""
    if cancel is not None and cancel.is_set():
        raise CancelledError(f"{what} cancelled after {info.get('done', 0)} of {info.get('total', '?')} steps")
    if on_progress is not None:
        on_progress(pace.payload(what, **info) if pace is not None else {"task": what, **info})


@torch.no_grad()
def sensitivity(loaded: Loaded, bits: Sequence[int] = (4, 2), layers: Sequence[str] | None = None,
                include_activations: bool = False, batches: int | None = None,
                on_progress: OnProgress | None = None, cancel: train.Cancel | None = None) -> pd.DataFrame:
    """Quantize one layer at a time (everything else FP32) at each width and measure the damage.

    For each width a copy of the FP32 model is prepared with every chosen layer's weights at that
    width (granularity, symmetry and range method from the run's plan; activations stay float
    unless ``include_activations``), calibrated with all quantizers off (so each range sees FP32
    inputs), then each layer's quantizers are switched on alone and the model is evaluated on
    ``batches`` held-out (test) batches (None: all).

    Returns one row per (layer, bits): layer, bits, params, loss, accuracy, loss_increase,
    accuracy_drop (a fraction), rank (1 = most sensitive at that width, by loss increase).
    ``df.attrs``: baseline_loss, baseline_accuracy. Progress: ``onprogress({"task", "done",
    "total", "elapsed", "seconds_left", "layer", "bits"})``; ``cancel.is_set()`` stops with CancelledError.
    """
    with work_threads():
        return _sensitivity(loaded, bits, layers, include_activations, batches, on_progress, cancel)


def _sensitivity(loaded: Loaded, bits: Sequence[int], layers: Sequence[str] | None, include_activations: bool,
                 batches: int | None, on_progress: OnProgress | None, cancel: train.Cancel | None) -> pd.DataFrame:
    widths = check_bits(bits)
    probe = loaded.qat
    allowed = weight_layers(probe) if not include_activations else [
        n for n in layer_names(probe) if n in weight_layers(probe) or n in activation_layers(probe)]
    names = allowed if layers is None else _check_layers(layers, allowed, "weights" if not include_activations
                                                         else "weights or quantized activations")
    if not names:
        raise ConfigError("there are no layers to measure; the model has no quantizable layers")
    held = _held_out(loaded, batches)
    base = train.evaluate(loaded.fp32, held)
    params = {r["name"]: r["params"] for r in probe.layers}
    total, done, rows = len(widths) * len(names), 0, []
    pace = Pace(total)
    cal = calibration_batches(loaded)
    for b in widths:
        if include_activations:
            plan = width_plan(loaded.config.plan, names, dict.fromkeys(names, b), b)
            cal_batches = cal
        else:  # weights only: no activation quantizers anywhere, and one batch sets the weight ranges
            everyone = layer_names(probe)
            plan = width_plan(width_plan(loaded.config.plan, everyone, {}, None), names, dict.fromkeys(names, b))
            cal_batches = cal[:1]
        model = prepare(loaded.fp32, plan, loaded.data.example())
        set_enabled(model, False)  # calibrate every range on FP32 inputs
        train.calibrate(model, cal_batches, max(1, len(cal_batches)), cancel or train.NeverCancel())
        for name in names:
            progress(on_progress, cancel, "sensitivity", pace, done=done, layer=name, bits=b)
            module = model.layer(name)
            qs = quantizers(module)
            for q in qs:
                q.enabled = True
            m = train.evaluate(model, held)
            for q in qs:
                q.enabled = False
            rows.append({"layer": name, "bits": b, "params": params.get(name, 0), "loss": m["loss"],
                         "accuracy": m["accuracy"], "loss_increase": m["loss"] - base["loss"],
                         "accuracy_drop": base["accuracy"] - m["accuracy"]})
            done += 1
    progress(on_progress, None, "sensitivity", pace, done=done, layer="", bits=None)
    df = pd.DataFrame(rows)
    df["rank"] = df.groupby("bits")["loss_increase"].rank(ascending=False, method="first").astype(int)
    df = df.sort_values(["bits", "rank"], ascending=[False, True], ignore_index=True)
    df.attrs.update({"baseline_loss": base["loss"], "baseline_accuracy": base["accuracy"]})
    return df


# --- mixed-precision suggestion --------------------------------------------------------------

EXHAUSTIVE_LIMIT = 50_000  # plans enumerated exactly up to this many; beyond, a greedy path
TOP_FEASIBLE = 4  # the best predicted plans within budget that are measured (the choice is among them)


@dataclass
class Suggestion:
    """A mixed-precision plan for a budget, and the trade-off of the candidates looked at."""

    plan: LayerPlan  # accepted by RunConfig as is: config.model_copy(update={"plan": plan})
    widths: dict[str, int]  # weight bits chosen per layer
    size_bytes: float  # predicted model size (prepare.size_bytes)
    average_bits: float  # weight-parameter-weighted average weight width (float layers count 32)
    predicted_loss_increase: float  # sum of the layers' one-at-a-time loss increases
    accuracy: float  # measured after calibration (PTQ, no fine-tune) on the held-out batches
    budget: str  # the budget that was met, in words ("average <= 3 weight bits", "<= 12,000 bytes")
    candidates: pd.DataFrame  # every measured candidate; ``pareto`` marks the size/accuracy front

    @property
    def pareto(self) -> pd.DataFrame:
        return self.candidates[self.candidates["pareto"]].sort_values("size_bytes", ignore_index=True)


def mean_weight_bits(rows: list[dict], plan: LayerPlan) -> float:
    num = den = 0.0
    for row in rows:
        if row["has_weights"]:
            b = plan.spec_for(row["name"]).weight_bits
            num += row["weight_params"] * (b if b is not None else 32)
            den += row["weight_params"]
    return num / den if den else math.nan


def pareto_mask(size: np.ndarray, acc: np.ndarray) -> np.ndarray:
    """Points on the size/accuracy front: no other point is as small and as accurate and strictly better
    in one of them. Equal points are all on it; a point with a NaN is never on it and dominates nothing
    (comparisons with NaN are false, which used to leave such points on the front)."""
    size, acc = np.asarray(size, dtype=float), np.asarray(acc, dtype=float)
    known = ~(np.isnan(size) | np.isnan(acc))
    s, a = size[:, None], acc[:, None]  # row i: the point judged; column j: the other point
    dominated = ((size <= s) & (acc >= a) & ((size < s) | (acc > a)) & known).any(axis=1)
    return known & ~dominated


def suggest_plan(loaded: Loaded, sens: pd.DataFrame, budget_bytes: float | None = None,
                 average_bits: float | None = None, measure: int = 8, top: int = TOP_FEASIBLE,
                 batches: int | None = None,
                 on_progress: OnProgress | None = None, cancel: train.Cancel | None = None) -> Suggestion:
    """Per-layer weight widths that fit a budget at the least predicted damage.

    Budget: ``budget_bytes`` (predicted model size, as prepare.size_bytes counts) or
    ``average_bits`` (mean weight width, weighted by weight parameters). The widths tried are
    those in ``sens`` (from :func:`sensitivity`); layers whose weights are off in the run's plan
    stay off, activations keep the run's plan.

    1. The predicted damage of a plan is the sum of its layers' loss increases (one at a time).
    2. Up to ``EXHAUSTIVE_LIMIT`` plans are enumerated exactly; beyond that a greedy path lowers the
       layer that costs least damage per byte (or bit) saved.
    3. The ``top`` best predicted plans within budget and, when ``measure`` > 0, the uniform plans and
       up to ``measure`` plans along the predicted front are prepared, calibrated and evaluated on
       the held-out batches.
    4. The suggestion is the measured plan within budget with the lowest held-out loss;
       ``candidates`` (``pareto`` marks the front) is the measured size/accuracy trade-off.

    Progress (step 3 takes nearly all the time): ``onprogress({"task": "suggestion", "done", "total",
    "candidate", "widths", "layer": "", "bits": None})`` before each distinct plan is measured (``done`` of
    ``total`` measured so far; ``candidate``: why it is measured — "fits", "uniform 4-bit", "front";
    ``widths``: "layer:bits ..."; ``elapsed`` and ``seconds_left`` as :class:`progress.Pace` measures them),
    then once with ``done == total``. ``cancel.is_set()`` stops with CancelledError. Without them nothing
    changes.
    """
    with work_threads():
        return _suggest_plan(loaded, sens, budget_bytes, average_bits, measure, top, batches, on_progress, cancel)


def _suggest_plan(loaded: Loaded, sens: pd.DataFrame, budget_bytes: float | None, average_bits: float | None,
                  measure: int, top: int, batches: int | None, on_progress: OnProgress | None,
                  cancel: train.Cancel | None) -> Suggestion:
    if (budget_bytes is None) == (average_bits is None):
        raise ConfigError("give exactly one budget: budget_bytes (model size) or average_bits (mean weight width)")
    need = {"layer", "bits", "loss_increase"}
    if not isinstance(sens, pd.DataFrame) or not need <= set(sens.columns) or sens.empty:
        raise ConfigError("sens must be the DataFrame that search.sensitivity returns (layer, bits, loss_increase)")
    config = loaded.config
    rows = loaded.qat.layers
    varied = quantized_weight_layers(rows, config.plan)
    if not varied:
        raise ConfigError("no layer of this run has quantized weights, so there is nothing to choose widths for")
    widths = check_bits(sens["bits"].unique().tolist())
    table = sens.pivot_table(index="layer", columns="bits", values="loss_increase", aggfunc="first")
    missing = [n for n in varied if n not in table.index or table.loc[n, widths].isna().any()]
    if missing:
        raise ConfigError(f"the sensitivity table lacks layer(s) {', '.join(missing)} at some of the widths "
                          f"{widths}; run sensitivity over all weight layers at the same widths")
    # 1. cost of every (layer, width): bytes, and bit-parameters for the average
    row_of = {r["name"]: r for r in rows}
    fixed_plan = width_plan(config.plan, varied, {})
    fixed_bytes = sum(size_bytes([r], fixed_plan)["quantized_bytes"] for r in rows if r["name"] not in varied)
    nbytes = np.array([[size_bytes([row_of[n]], width_plan(config.plan, [n], {n: b}))["quantized_bytes"]
                        for b in widths] for n in varied])  # (L, W)
    wparams = np.array([row_of[n]["weight_params"] for n in varied], dtype=float)
    all_wparams = sum(r["weight_params"] for r in rows if r["has_weights"])
    fixed_bitparams = sum(r["weight_params"] * 32 for r in rows if r["has_weights"] and r["name"] not in varied)
    damage = np.array([[max(float(table.loc[n, b]), 0.0) for b in widths] for n in varied])  # (L, W)
    if average_bits is not None:
        if not average_bits > 0:
            raise ConfigError(f"average_bits must be positive, got {average_bits}")
        cost = wparams[:, None] * np.array(widths)[None, :]
        limit = average_bits * all_wparams - fixed_bitparams
        smallest = (fixed_bitparams + cost[:, -1].sum()) / all_wparams
        if cost[:, -1].sum() > limit + 1e-9:
            raise ConfigError(f"an average of {average_bits:g} weight bits is below the smallest possible model "
                              f"({smallest:.3g} bits: every quantized layer at {widths[-1]} bits); raise the budget "
                              f"to at least {smallest:.3g} or add narrower widths to the sensitivity run")
    else:
        if not budget_bytes > 0:
            raise ConfigError(f"budget_bytes must be positive, got {budget_bytes}")
        cost, limit = nbytes, budget_bytes - fixed_bytes
        smallest = fixed_bytes + nbytes[:, -1].sum()
        if smallest > budget_bytes + 1e-9:
            raise ConfigError(f"a budget of {budget_bytes:,.0f} bytes is below the smallest possible model "
                              f"({smallest:,.0f} bytes: every quantized layer at {widths[-1]} bits); raise it to "
                              f"at least {smallest:,.0f} bytes")
    # 2. the predicted front: exact enumeration, or a greedy path for many layers
    n_layers, n_widths = damage.shape
    if n_widths ** n_layers <= EXHAUSTIVE_LIMIT:
        choice = np.array(list(itertools.product(range(n_widths), repeat=n_layers)), dtype=int).reshape(-1, n_layers)
    else:
        state, path = np.zeros(n_layers, dtype=int), []
        path.append(state.copy())
        while (state < n_widths - 1).any():
            best, best_ratio = -1, math.inf
            for i in np.flatnonzero(state < n_widths - 1):
                saved = cost[i, state[i]] - cost[i, state[i] + 1]
                extra = damage[i, state[i] + 1] - damage[i, state[i]]
                ratio = extra / saved if saved > 0 else math.inf
                if ratio < best_ratio:
                    best, best_ratio = i, ratio
            if best < 0:
                break
            state[best] += 1
            path.append(state.copy())
        choice = np.array(path)
    idx = np.arange(n_layers)
    c_cost = cost[idx, choice].sum(axis=1)  # (P,)
    c_damage = damage[idx, choice].sum(axis=1)
    feasible = c_cost <= limit + 1e-9
    order = np.lexsort((c_cost, c_damage))
    by_size = np.argsort(c_cost, kind="stable")
    front, best_damage = [], math.inf
    for i in by_size:  # predicted front: each step larger is strictly less damaging
        if c_damage[i] < best_damage - 1e-12:
            front.append(int(i))
            best_damage = c_damage[i]
    picks = [front[int(round(k))] for k in np.linspace(0, len(front) - 1, min(measure, len(front)))] if measure else []
    # 3. measure: the choice, uniform plans, and front samples
    fitting = [int(i) for i in order if feasible[i]][:max(1, top)]  # the best predicted plans that fit
    named: list[tuple[str, np.ndarray]] = [("fits", choice[i]) for i in fitting]
    if measure:
        named += [(f"uniform {widths[w]}-bit", np.full(n_layers, w)) for w in range(n_widths)]
    named += [("front", choice[i]) for i in picks]
    held = _held_out(loaded, batches)
    cal = calibration_batches(loaded)
    todo: dict[tuple, str] = {}  # each distinct plan once, named by the first reason it was picked
    for kind, ch in named:
        todo.setdefault(tuple(int(v) for v in ch), kind)
    seen: dict[tuple, dict[str, Any]] = {}
    pace = Pace(len(todo))
    for k, (key, kind) in enumerate(todo.items()):
        bits = {n: widths[w] for n, w in zip(varied, key)}
        progress(on_progress, cancel, "suggestion", pace, done=k, layer="", bits=None, candidate=kind,
                 widths=" ".join(f"{n}:{b}" for n, b in bits.items()))
        plan = width_plan(config.plan, varied, bits)
        model = prepare(loaded.fp32, plan, loaded.data.example())
        train.calibrate(model, cal, max(1, len(cal)), cancel or train.NeverCancel())
        m = train.evaluate(model, held)
        seen[key] = {"kind": kind, "plan": plan, "widths": " ".join(f"{n}:{b}" for n, b in bits.items()),
                     "size_bytes": size_bytes(rows, plan)["quantized_bytes"], "average_bits": mean_weight_bits(rows, plan),
                     "predicted_loss_increase": float(damage[idx, np.array(key)].sum()),
                     "accuracy": m["accuracy"], "loss": m["loss"], "within_budget": bool(cost[idx, np.array(key)].sum()
                                                                                        <= limit + 1e-9)}
    progress(on_progress, None, "suggestion", pace, done=len(todo), layer="", bits=None, candidate="", widths="")
    # 4. the choice: the measured plan within budget with the lowest held-out loss
    fits = [k for k, c in seen.items() if c["within_budget"]]
    pick = min(fits, key=lambda k: (seen[k]["loss"], seen[k]["predicted_loss_increase"]))
    seen[pick]["kind"] = "suggested"
    cand = pd.DataFrame([{k: v for k, v in c.items() if k != "plan"} for c in seen.values()])
    cand["pareto"] = pareto_mask(cand["size_bytes"].to_numpy(), cand["accuracy"].to_numpy())
    chosen = seen[pick]
    plan = chosen["plan"]
    return Suggestion(plan=plan, widths={n: widths[w] for n, w in zip(varied, pick)},
                      size_bytes=chosen["size_bytes"], average_bits=chosen["average_bits"],
                      predicted_loss_increase=chosen["predicted_loss_increase"], accuracy=chosen["accuracy"],
                      budget=(f"average <= {average_bits:g} weight bits" if average_bits is not None
                              else f"<= {budget_bytes:,.0f} bytes"),
                      candidates=cand)


def quantized_weight_layers(rows: list[dict], plan: LayerPlan) -> list[str]:
    """The layers (rows of ``prepare.layer_table``) whose weights ``plan`` quantizes."""
    return [r["name"] for r in rows if r["has_weights"] and plan.spec_for(r["name"]).weight_bits is not None]


def uniform_plan(loaded: Loaded, bits: int) -> LayerPlan:
    """The run's plan with every quantized weight layer at ``bits`` (activations as in the run)."""
    return uniform_widths(loaded.config.plan, loaded.qat.layers, bits)


def uniform_widths(plan: LayerPlan, rows: list[dict], bits: int) -> LayerPlan:
    """``plan`` with every layer whose weights it quantizes at ``bits`` (activations unchanged)."""
    (b,) = check_bits([bits])
    varied = quantized_weight_layers(rows, plan)
    return width_plan(plan, varied, dict.fromkeys(varied, b))
