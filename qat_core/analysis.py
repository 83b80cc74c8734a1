"""See the quantization: histograms, per-layer error, sensitivity and mixed-precision suggestions.

Everything here reads a finished run (:func:`qat_core.runner.load`) and returns pandas DataFrames
or small dataclasses that :mod:`qat_core.plots` turns into figures. Definitions used throughout::

    grid       = (k - z) * s  for the integer codes k in [qmin, qmax]      (the values a tensor can take)
    clip range = [(qmin - z) * s, (qmax - z) * s]                          (the ends of the grid)
    clipped    = values whose code round(x/s + z) is outside [qmin, qmax]  (saturated to a grid end;
                 i.e. beyond the clip range by more than half a step, where the STE passes no gradient)
    SQNR (dB)  = 10 log10( sum x^2 / sum (x - fq(x))^2 )                   (quant_math.sqnr_db)

Activations are captured through forward hooks on each layer's output quantizer (its input is
the float activation, its output the fake-quantized one) and binned as they stream into a fixed
number of bins (:class:`StreamingHistogram`), so memory does not grow with the data seen.
"""

from __future__ import annotations

import copy
import io
import itertools
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from qat_core import cpu, train
from qat_core.config import MAX_BITS, MIN_BITS, LayerPlan, QuantOverride
from qat_core.errors import CancelledError, ConfigError, StoreError
from qat_core.modules import QATModel, QuantConv2d, QuantLinear, QuantOutput
from qat_core.prepare import prepare, size_bytes
from qat_core.quant_math import sqnr_db
from qat_core.quantizers import FakeQuantizer, quantizers, set_enabled
from qat_core.store import RunStore, atomic_write_text

if TYPE_CHECKING:
    from qat_core.runner import Loaded

Batch = tuple[torch.Tensor, torch.Tensor]
OnProgress = Callable[[dict[str, Any]], None]
STAGES = ("ptq", "qat")  # before / after the fine-tune
DEFAULT_BINS = 256
HISTOGRAM_MARGIN = 0.25  # bins start on the clip range widened by this share on each side
ANALYSIS_DIR = "analysis"  # sub-folder of a run that analyze_run writes into


# --- layers ------------------------------------------------------------------------------------

def layer_names(model: QATModel) -> list[str]:
    """Every quantizable layer of a prepared model, in execution order (``input`` first)."""
    return [row["name"] for row in model.layers]


def _row(model: QATModel, layer: str) -> dict:
    for row in model.layers:
        if row["name"] == layer:
            return row
    raise ConfigError(f"layer {layer!r} does not exist in this model; its layers are: {', '.join(layer_names(model))}")


def _weight_module(model: QATModel, layer: str) -> QuantConv2d | QuantLinear:
    row = _row(model, layer)
    module = model.layer(layer)
    if not isinstance(module, (QuantConv2d, QuantLinear)):
        with_weights = [r["name"] for r in model.layers if r["has_weights"]]
        raise ConfigError(f"layer {layer!r} ({row['kind']}) has no weights to show; layers with weights: "
                          f"{', '.join(with_weights)}")
    return module


def activation_quantizer(model: QATModel, layer: str) -> FakeQuantizer | None:
    """The quantizer of a layer's output activation (``input``: the input quantizer), or None."""
    _row(model, layer)
    module = model.layer(layer)
    if isinstance(module, FakeQuantizer):
        return module
    if isinstance(module, (QuantConv2d, QuantLinear, QuantOutput)):
        return module.act_quant
    return None


def activation_layers(model: QATModel) -> list[str]:
    """Layers whose output is quantized (the logits, and layers with activation bits off, are not)."""
    return [name for name in layer_names(model) if activation_quantizer(model, name) is not None]


def weight_layers(model: QATModel) -> list[str]:
    return [row["name"] for row in model.layers if row["has_weights"]]


# --- histograms --------------------------------------------------------------------------------

class StreamingHistogram:
    """A histogram with a fixed number of equal bins whose range grows as data arrives.

    When a value falls outside ``[lo, hi)`` the bin width doubles and the range is extended
    (downwards or upwards); because the new edges are a subset of the old ones, old counts are
    merged pairwise exactly. Memory is ``bins`` integers whatever the amount of data; the count of
    every finite value seen lands in exactly one bin (non-finite values are counted apart).
    """

    def __init__(self, lo: float, hi: float, bins: int = DEFAULT_BINS):
        if bins < 2 or bins % 2:
            raise ConfigError(f"bins must be an even number of at least 2, got {bins}")
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ConfigError(f"histogram range must be finite, got [{lo}, {hi}]")
        self.bins = bins
        span = max(hi - lo, 1e-6)
        self.lo, self.width = float(lo), span / bins
        self.counts = torch.zeros(bins, dtype=torch.int64)
        self.nonfinite = 0

    @property
    def hi(self) -> float:
        return self.lo + self.width * self.bins

    @property
    def edges(self) -> np.ndarray:
        return self.lo + self.width * np.arange(self.bins + 1)

    def _grow(self, down: bool) -> None:
        n = self.bins
        old = torch.arange(n)
        target = (old + n) // 2 if down else old // 2  # old bin j -> new bin
        merged = torch.zeros_like(self.counts).index_add_(0, target, self.counts)
        if down:
            self.lo -= n * self.width
        self.width *= 2
        self.counts = merged

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1).float()
        if x.numel() == 0:
            return
        lo, hi = (float(v) for v in torch.aminmax(x))
        if not (math.isfinite(lo) and math.isfinite(hi)):  # NaN/inf: count them apart, bin the rest
            finite = torch.isfinite(x)
            self.nonfinite += int((~finite).sum())
            x = x[finite]
            if x.numel() == 0:
                return
            lo, hi = (float(v) for v in torch.aminmax(x))
        while lo < self.lo:
            self._grow(down=True)
        while hi >= self.hi:
            self._grow(down=False)
        idx = ((x - self.lo) / self.width).floor_().long().clamp_(0, self.bins - 1)  # (N,)
        self.counts += torch.bincount(idx, minlength=self.bins)

    @property
    def total(self) -> int:
        return int(self.counts.sum())


@dataclass
class Histogram:
    """A binned tensor with its quantizer's marks (grid, clip range, share clipped)."""

    layer: str
    tensor: str  # "weight" or "activation"
    stage: str  # "ptq" (before the fine-tune), "qat" (after), or "" (a model given directly)
    edges: np.ndarray  # (bins + 1,)
    counts: np.ndarray  # (bins,) int64
    total: int  # values seen (= counts.sum() + below + above)
    clipped: int  # values the quantizer saturates (exact, per channel for per-channel weights)
    bits: int | None  # None: the tensor is not quantized (no marks)
    granularity: str  # "per_tensor" / "per_channel" / "" when not quantized
    scale: float | None  # the step of the grid that is drawn (per-channel: the widest channel's)
    zero_point: float | None
    qmin: int | None
    qmax: int | None
    clip_lo: float | None  # per-channel: the widest extent over channels
    clip_hi: float | None
    value_min: float
    value_max: float
    channels: pd.DataFrame | None = None  # per-channel weights: one row a channel (ranges, clip, scale)
    below: int = 0  # values left of the first bin (weights only: bins cover the clip range + margin)
    above: int = 0  # values right of the last bin; total = counts.sum() + below + above
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def share_clipped(self) -> float:
        return self.clipped / self.total if self.total else 0.0

    @property
    def grid(self) -> np.ndarray:
        """Dequantized grid positions ``(k - z) * s`` for k in [qmin, qmax] (empty when not quantized)."""
        if self.scale is None:
            return np.zeros(0)
        return (np.arange(self.qmin, self.qmax + 1) - self.zero_point) * self.scale

    def frame(self) -> pd.DataFrame:
        """The bins as rows: layer, tensor, stage, bin_left, bin_right, count."""
        return pd.DataFrame({"layer": self.layer, "tensor": self.tensor, "stage": self.stage,
                             "bin_left": self.edges[:-1], "bin_right": self.edges[1:], "count": self.counts})

    def marks(self) -> dict[str, Any]:
        """The quantizer's marks and totals as one flat row."""
        return {"layer": self.layer, "tensor": self.tensor, "stage": self.stage, "bits": self.bits,
                "granularity": self.granularity, "scale": self.scale, "zero_point": self.zero_point,
                "qmin": self.qmin, "qmax": self.qmax, "clip_lo": self.clip_lo, "clip_hi": self.clip_hi,
                "value_min": self.value_min, "value_max": self.value_max, "total": self.total,
                "below": self.below, "above": self.above,
                "clipped": self.clipped, "share_clipped": self.share_clipped}


def _qparams(q: FakeQuantizer) -> tuple[torch.Tensor, torch.Tensor]:
    return q.scale.detach().float().reshape(-1), q.zero_point.detach().round().float().reshape(-1)


def clip_range(q: FakeQuantizer) -> tuple[torch.Tensor, torch.Tensor]:
    """The ends of a quantizer's grid, ``(qmin - z) s`` and ``(qmax - z) s`` (per channel: (C,))."""
    s, z = _qparams(q)
    return (q.qmin - z) * s, (q.qmax - z) * s


def clipped_mask(x: torch.Tensor, q: FakeQuantizer) -> torch.Tensor:
    """Where ``q`` saturates ``x``: its code ``round(x/s + z)`` falls outside ``[qmin, qmax]`` (per
    channel along ``q.axis``). These are the values the STE passes no gradient to."""
    s, z = _qparams(q)
    if q.axis is not None and s.numel() > 1:
        shape = [1] * x.dim()
        shape[q.axis] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    codes = torch.round(x / s + z)
    return (codes < q.qmin) | (codes > q.qmax)


def count_clipped(x: torch.Tensor, q: FakeQuantizer) -> int:
    """How many values of ``x`` ``q`` saturates (see :func:`clipped_mask`)."""
    return int(clipped_mask(x, q).sum())


@torch.no_grad()
def _folded_weight(module: QuantConv2d | QuantLinear) -> torch.Tensor:
    w, _ = module.folded()
    return w.detach().float()


@torch.no_grad()
def weight_histogram(model: QATModel, layer: str, stage: str = "", bins: int = DEFAULT_BINS,
                     value_range: tuple[float, float] | None = None) -> Histogram:
    """The BN-folded weights of ``layer`` binned, with its weight quantizer's grid and clip range.

    Per-channel layers also get ``channels``: each output channel's min/max, clip range, scale and
    share clipped; the grid drawn is the widest channel's. ``value_range`` fixes the bin range
    (so two stages share bins); by default it covers the weights and the clip range.
    """
    if bins < 1:
        raise ConfigError(f"bins must be at least 1, got {bins}")
    module = _weight_module(model, layer)
    w = _folded_weight(module)  # (C_out, ...)
    q = module.weight_quant
    marks: dict[str, Any] = {"bits": None, "granularity": "", "scale": None, "zero_point": None, "qmin": None,
                             "qmax": None, "clip_lo": None, "clip_hi": None}
    clipped, channels = 0, None
    if q is not None:
        lo, hi = clip_range(q)
        s, z = _qparams(q)
        widest = int(torch.argmax(s))
        marks = {"bits": q.bits, "granularity": "per_channel" if q.axis is not None else "per_tensor",
                 "scale": float(s[widest]), "zero_point": float(z[widest]), "qmin": q.qmin, "qmax": q.qmax,
                 "clip_lo": float(lo.min()), "clip_hi": float(hi.max())}
        clipped = count_clipped(w, q)
        if q.axis is not None:
            flat = w.reshape(w.shape[0], -1)  # (C, K)
            w_lo, w_hi = torch.aminmax(flat, dim=1)
            per_clip = clipped_mask(w, q).reshape(w.shape[0], -1).sum(dim=1)
            channels = pd.DataFrame({"layer": layer, "stage": stage, "channel": np.arange(w.shape[0]),
                                     "w_min": w_lo.numpy(), "w_max": w_hi.numpy(), "clip_lo": lo.numpy(),
                                     "clip_hi": hi.numpy(), "scale": s.numpy(), "zero_point": z.numpy(),
                                     "clipped": per_clip.numpy(), "share_clipped": (per_clip / flat.shape[1]).numpy()})
    v_lo, v_hi = float(w.min()), float(w.max())
    if value_range is None:
        value_range = _weight_bin_range(v_lo, v_hi, q)
    lo_r, hi_r = value_range
    if hi_r <= lo_r:
        hi_r = lo_r + 1e-6
    flat = w.reshape(-1)
    below, above = int((flat < lo_r).sum()), int((flat > hi_r).sum())
    counts, edges = np.histogram(flat.numpy(), bins=bins, range=(lo_r, hi_r))  # values outside: below/above
    return Histogram(layer, "weight", stage, edges, counts.astype(np.int64), int(w.numel()), clipped,
                     value_min=v_lo, value_max=v_hi, channels=channels, below=below, above=above, **marks)


def _weight_bin_range(v_lo: float, v_hi: float, q: FakeQuantizer | None) -> tuple[float, float]:
    """Bins over the clip range widened by HISTOGRAM_MARGIN (where the grid is), or the data when
    unquantized; a few far outliers (a BN-folded channel with tiny variance) then cannot squeeze
    the whole grid into one bin: they are counted as ``below``/``above``."""
    if q is None:
        return v_lo, v_hi
    lo, hi = clip_range(q)
    c_lo, c_hi = float(lo.min()), float(hi.max())
    margin = HISTOGRAM_MARGIN * (c_hi - c_lo)
    return max(v_lo, c_lo - margin), min(v_hi, c_hi + margin)


def weight_histograms(loaded: Loaded, layer: str, bins: int = DEFAULT_BINS) -> list[Histogram]:
    """``layer``'s weight histogram before (PTQ) and after (QAT) the fine-tune, on shared bins."""
    models = {"ptq": loaded.ptq, "qat": loaded.qat}
    lo, hi = math.inf, -math.inf
    for model in models.values():
        module = _weight_module(model, layer)
        w = _folded_weight(module)
        r_lo, r_hi = _weight_bin_range(float(w.min()), float(w.max()), module.weight_quant)
        lo, hi = min(lo, r_lo), max(hi, r_hi)
    return [weight_histogram(model, layer, stage, bins, (lo, hi)) for stage, model in models.items()]


@dataclass
class ActivationStats:
    """What streamed through one activation quantizer: its histogram and error accumulators."""

    layer: str
    quantizer: FakeQuantizer
    histogram: StreamingHistogram
    values: int = 0
    clipped: int = 0
    signal: float = 0.0  # sum x^2 (float64 accumulation)
    noise: float = 0.0  # sum (x - fq(x))^2
    v_min: float = math.inf
    v_max: float = -math.inf

    @torch.no_grad()
    def update(self, x: torch.Tensor, out: torch.Tensor) -> None:
        x = x.detach()
        self.histogram.add(x)
        self.values += x.numel()
        lo, hi = (float(v) for v in torch.aminmax(x))
        c_lo, c_hi = (float(v[0]) for v in clip_range(self.quantizer))
        if lo < c_lo or hi > c_hi:  # only values beyond the grid ends can saturate
            self.clipped += count_clipped(x, self.quantizer)
        self.signal += float(x.pow(2).sum(dtype=torch.float64))
        self.noise += float((x - out.detach()).pow(2).sum(dtype=torch.float64))
        self.v_min, self.v_max = min(self.v_min, lo), max(self.v_max, hi)

    @property
    def sqnr_db(self) -> float:
        if self.noise == 0:
            return math.inf
        if self.signal == 0:
            return -math.inf
        return 10.0 * math.log10(self.signal / self.noise)

    @property
    def mse(self) -> float:
        return self.noise / self.values if self.values else math.nan

    def to_histogram(self, stage: str = "") -> Histogram:
        q = self.quantizer
        s, z = _qparams(q)
        lo, hi = clip_range(q)
        h = self.histogram
        return Histogram(self.layer, "activation", stage, h.edges, h.counts.numpy().copy(), h.total, self.clipped,
                         bits=q.bits, granularity="per_tensor", scale=float(s[0]), zero_point=float(z[0]),
                         qmin=q.qmin, qmax=q.qmax, clip_lo=float(lo[0]), clip_hi=float(hi[0]),
                         value_min=self.v_min, value_max=self.v_max,
                         extra={"sqnr_db": self.sqnr_db, "mse": self.mse})




@torch.no_grad()
def capture_activations(model: QATModel, batches: Iterable[Batch], layers: Sequence[str] | None = None,
                        bins: int = DEFAULT_BINS, cancel: train.Cancel | None = None) -> dict[str, ActivationStats]:
    """Run ``batches`` through ``model`` (eval mode) and stream every chosen layer's activations
    into a histogram plus SQNR/clipping accumulators. Memory stays at ``bins`` counts a layer."""
    names = activation_layers(model) if layers is None else list(layers)
    stats: dict[str, ActivationStats] = {}
    for name in names:
        q = activation_quantizer(model, name)
        if q is None:
            raise ConfigError(f"layer {name!r} has no activation quantizer (the logits stay float, and so do layers "
                              f"with act_bits off); layers with one: {', '.join(activation_layers(model))}")
        lo, hi = clip_range(q)
        margin = HISTOGRAM_MARGIN * float(hi[0] - lo[0])
        stats[name] = ActivationStats(name, q, StreamingHistogram(float(lo[0]) - margin, float(hi[0]) + margin, bins))
    handles = []
    for st in stats.values():
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor, st: ActivationStats = st) -> None:
            st.update(inputs[0], output)
        handles.append(st.quantizer.register_forward_hook(hook))
    was = model.training
    model.eval()
    device = train.device_of(model)
    seen = 0
    try:
        for x, _ in batches:
            if cancel is not None and cancel.is_set():
                raise CancelledError(f"activation capture cancelled after {seen} batches")
            model(x.to(device))
            seen += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    if seen == 0:
        raise StoreError("activation capture saw no batches: the data loader is empty")
    return stats


def calibration_batches(loaded: Loaded, batches: int | None = None) -> list[Batch] | Iterable[Batch]:
    """The batches the run calibrated on (same order and size); ``batches=None``: the config's count,
    ``batches=0``: the whole training set (streamed, not held in memory)."""
    ft, config = loaded.config.finetune, loaded.config
    loader = loaded.data.train_loader(ft.batch_size, True, config.seed)
    if batches == 0:
        return loader
    n = ft.calibration_batches if batches is None else batches
    if n < 0:
        raise ConfigError(f"batches must be 0 (whole training set) or more, got {n}")
    return list(itertools.islice(iter(loader), n))


def activation_histograms(loaded: Loaded, layer: str, batches: int | None = None,
                          bins: int = DEFAULT_BINS) -> list[Histogram]:
    """``layer``'s output activations on the calibration batches, before (PTQ) and after (QAT) the fine-tune."""
    data = calibration_batches(loaded, batches)
    out = []
    for stage, model in (("ptq", loaded.ptq), ("qat", loaded.qat)):
        stats = capture_activations(model, data, [layer], bins)
        out.append(stats[layer].to_histogram(stage))
    return out


# --- per-layer error -----------------------------------------------------------------------

@torch.no_grad()
def output_sqnr(fp32: nn.Module, model: nn.Module, loader: Iterable[Batch]) -> float:
    """SQNR (dB) of the quantized network's logits against the FP32 network's, over ``loader``."""
    return sqnr_db(train.predict(fp32, loader), train.predict(model, loader))


def quantization_only(model: QATModel) -> nn.Module:
    """The same weights (BN folded, fine-tuned) with every quantizer off: the reference that
    isolates quantization noise from what the fine-tune changed. A copy: models may be shared."""
    reference = copy.deepcopy(model)
    set_enabled(reference, False)
    return reference


def _scale_summary(q: FakeQuantizer | None) -> dict[str, float]:
    if q is None:
        return {"scale": math.nan, "scale_min": math.nan, "scale_max": math.nan, "zero_point": math.nan}
    s, z = _qparams(q)
    return {"scale": float(s.median()), "scale_min": float(s.min()), "scale_max": float(s.max()),
            "zero_point": float(z.median())}


def _plan_of(model: QATModel) -> LayerPlan:
    """The plan a model was prepared with, rebuilt from its layer rows (each row carries its spec)."""
    overrides = {row["name"]: QuantOverride(**{k: ("off" if v is None and k.endswith("_bits") else v)
                                               for k, v in row["spec"].items()}) for row in model.layers}
    return LayerPlan(overrides=overrides)


@torch.no_grad()
def error_table(loaded: Loaded, stage: str = "qat", batches: int | None = None,
                stats: dict[str, ActivationStats] | None = None) -> pd.DataFrame:
    """One row per quantizable layer of the ``stage`` model ("ptq" or "qat"), then a ``(network)`` row.

    Columns: stage, layer, kind, fused, weight_bits, act_bits, granularity, weight_scale (median over
    channels), weight_scale_min/max, weight_zero_point, act_scale, act_zero_point, params,
    weight_params, size_bytes (at its bit width, as prepare.size_bytes counts), fp32_bytes,
    weight_sqnr_db, weight_mse, weight_share_clipped, weight_zero_channels (output channels whose
    quantized weights are all 0: pruned by a collapsed scale; their BN-folded float weights can be
    huge when BN's running variance collapsed with them, which drags weight SQNR down), act_sqnr_db,
    act_mse, act_share_clipped
    (on ``batches`` calibration batches), and on the network row, over the test set: output_sqnr_db
    (logits against the same weights in float: quantization noise alone) and
    output_sqnr_vs_baseline_db (against the FP32 baseline: quantization plus what the fine-tune
    changed). ``df.attrs`` holds output_sqnr_db and stage.
    """
    model = _stage_model(loaded, stage)
    if stats is None:
        stats = capture_activations(model, calibration_batches(loaded, batches))
    plan = _plan_of(model)
    rows = []
    for row in model.layers:
        name = row["name"]
        module = model.layer(name)
        wq = module.weight_quant if isinstance(module, (QuantConv2d, QuantLinear)) else None
        aq = activation_quantizer(model, name)
        w_err = {"weight_sqnr_db": math.nan, "weight_mse": math.nan, "weight_share_clipped": math.nan,
                 "weight_zero_channels": math.nan}
        if wq is not None:
            w = _folded_weight(module)
            wq_out = wq(w)
            zero = (wq_out.reshape(wq_out.shape[0], -1) == 0).all(dim=1)  # channels quantized away entirely
            w_err = {"weight_sqnr_db": sqnr_db(w, wq_out), "weight_mse": float((w - wq_out).double().pow(2).mean()),
                     "weight_share_clipped": count_clipped(w, wq) / w.numel(),
                     "weight_zero_channels": int(zero.sum())}
        ws, a = _scale_summary(wq), _scale_summary(aq)
        st = stats.get(name)
        rows.append({
            "stage": stage, "layer": name, "kind": row["kind"], "fused": row["fused"],
            "weight_bits": wq.bits if wq is not None else None, "act_bits": aq.bits if aq is not None else None,
            "granularity": ("per_channel" if wq.axis is not None else "per_tensor") if wq is not None else "",
            "weight_scale": ws["scale"], "weight_scale_min": ws["scale_min"], "weight_scale_max": ws["scale_max"],
            "weight_zero_point": ws["zero_point"], "act_scale": a["scale"], "act_zero_point": a["zero_point"],
            "params": row["params"], "weight_params": row["weight_params"],
            "size_bytes": size_bytes([row], plan)["quantized_bytes"], "fp32_bytes": 4.0 * row["params"],
            **w_err,
            "act_sqnr_db": st.sqnr_db if st is not None else math.nan,
            "act_mse": st.mse if st is not None else math.nan,
            "act_share_clipped": st.clipped / st.values if st is not None and st.values else math.nan,
            "output_sqnr_db": math.nan, "output_sqnr_vs_baseline_db": math.nan,
        })
    test = loaded.data.test_loader()
    out_sqnr = output_sqnr(quantization_only(model), model, test)
    drift = output_sqnr(loaded.fp32, model, test)
    total = size_bytes(model.layers, plan)
    rows.append({"stage": stage, "layer": "(network)", "kind": "network", "fused": "",
                 "params": sum(r["params"] for r in model.layers),
                 "weight_params": sum(r["weight_params"] for r in model.layers),
                 "size_bytes": total["quantized_bytes"], "fp32_bytes": total["fp32_bytes"],
                 "output_sqnr_db": out_sqnr, "output_sqnr_vs_baseline_db": drift})
    df = pd.DataFrame(rows)
    df["weight_bits"] = df["weight_bits"].astype("Int64")
    df["act_bits"] = df["act_bits"].astype("Int64")
    df["weight_zero_channels"] = df["weight_zero_channels"].astype("Int64")
    df.attrs.update({"stage": stage, "output_sqnr_db": out_sqnr})
    return df


def _stage_model(loaded: Loaded, stage: str) -> QATModel:
    if stage not in STAGES:
        raise ConfigError(f"stage must be one of {', '.join(STAGES)} (before / after the fine-tune), got {stage!r}")
    return loaded.ptq if stage == "ptq" else loaded.qat


# --- sensitivity -----------------------------------------------------------------------------

def _check_bits(bits: Sequence[int]) -> list[int]:
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


def _width_plan(base: LayerPlan, layers: Sequence[str], bits: dict[str, int | None],
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


def _progress(on_progress: OnProgress | None, cancel: train.Cancel | None, what: str, **info: Any) -> None:
    if cancel is not None and cancel.is_set():
        raise CancelledError(f"{what} cancelled after {info.get('done', 0)} of {info.get('total', '?')} steps")
    if on_progress is not None:
        on_progress({"task": what, **info})


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
    ``df.attrs``: baseline_loss, baseline_accuracy. Progress: ``on_progress({"task", "done",
    "total", "layer", "bits"})``; ``cancel.is_set()`` stops with CancelledError.
    """
    widths = _check_bits(bits)
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
    cal = calibration_batches(loaded)
    for b in widths:
        if include_activations:
            plan = _width_plan(loaded.config.plan, names, dict.fromkeys(names, b), b)
            cal_batches = cal
        else:  # weights only: no activation quantizers anywhere, and one batch sets the weight ranges
            everyone = layer_names(probe)
            plan = _width_plan(_width_plan(loaded.config.plan, everyone, {}, None), names, dict.fromkeys(names, b))
            cal_batches = cal[:1]
        model = prepare(loaded.fp32, plan, loaded.data.example())
        set_enabled(model, False)  # calibrate every range on FP32 inputs
        train.calibrate(model, cal_batches, max(1, len(cal_batches)), cancel or train.NeverCancel())
        for name in names:
            _progress(on_progress, cancel, "sensitivity", done=done, total=total, layer=name, bits=b)
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
    _progress(on_progress, None, "sensitivity", done=done, total=total, layer="", bits=None)
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


def _avg_bits(rows: list[dict], plan: LayerPlan) -> float:
    num = den = 0.0
    for row in rows:
        if row["has_weights"]:
            b = plan.spec_for(row["name"]).weight_bits
            num += row["weight_params"] * (b if b is not None else 32)
            den += row["weight_params"]
    return num / den if den else math.nan


def _pareto_mask(size: np.ndarray, acc: np.ndarray) -> np.ndarray:
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

    Progress (step 3 takes nearly all the time): ``on_progress({"task": "suggestion", "done", "total",
    "candidate", "widths", "layer": "", "bits": None})`` before each distinct plan is measured (``done`` of
    ``total`` measured so far; ``candidate``: why it is measured — "fits", "uniform 4-bit", "front";
    ``widths``: "layer:bits ..."), then once with ``done == total``. ``cancel.is_set()`` stops with
    CancelledError. Without them nothing changes.
    """
    if (budget_bytes is None) == (average_bits is None):
        raise ConfigError("give exactly one budget: budget_bytes (model size) or average_bits (mean weight width)")
    need = {"layer", "bits", "loss_increase"}
    if not isinstance(sens, pd.DataFrame) or not need <= set(sens.columns) or sens.empty:
        raise ConfigError("sens must be the DataFrame that analysis.sensitivity returns (layer, bits, loss_increase)")
    config = loaded.config
    rows = loaded.qat.layers
    varied = [r["name"] for r in rows if r["has_weights"] and config.plan.spec_for(r["name"]).weight_bits is not None]
    if not varied:
        raise ConfigError("no layer of this run has quantized weights, so there is nothing to choose widths for")
    widths = _check_bits(sens["bits"].unique().tolist())
    table = sens.pivot_table(index="layer", columns="bits", values="loss_increase", aggfunc="first")
    missing = [n for n in varied if n not in table.index or table.loc[n, widths].isna().any()]
    if missing:
        raise ConfigError(f"the sensitivity table lacks layer(s) {', '.join(missing)} at some of the widths "
                          f"{widths}; run sensitivity over all weight layers at the same widths")
    # 1. cost of every (layer, width): bytes, and bit-parameters for the average
    row_of = {r["name"]: r for r in rows}
    fixed_plan = _width_plan(config.plan, varied, {})
    fixed_bytes = sum(size_bytes([r], fixed_plan)["quantized_bytes"] for r in rows if r["name"] not in varied)
    nbytes = np.array([[size_bytes([row_of[n]], _width_plan(config.plan, [n], {n: b}))["quantized_bytes"]
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
    for k, (key, kind) in enumerate(todo.items()):
        bits = {n: widths[w] for n, w in zip(varied, key)}
        _progress(on_progress, cancel, "suggestion", done=k, total=len(todo), layer="", bits=None, candidate=kind,
                  widths=" ".join(f"{n}:{b}" for n, b in bits.items()))
        plan = _width_plan(config.plan, varied, bits)
        model = prepare(loaded.fp32, plan, loaded.data.example())
        train.calibrate(model, cal, max(1, len(cal)), cancel or train.NeverCancel())
        m = train.evaluate(model, held)
        seen[key] = {"kind": kind, "plan": plan, "widths": " ".join(f"{n}:{b}" for n, b in bits.items()),
                     "size_bytes": size_bytes(rows, plan)["quantized_bytes"], "average_bits": _avg_bits(rows, plan),
                     "predicted_loss_increase": float(damage[idx, np.array(key)].sum()),
                     "accuracy": m["accuracy"], "loss": m["loss"], "within_budget": bool(cost[idx, np.array(key)].sum()
                                                                                        <= limit + 1e-9)}
    _progress(on_progress, None, "suggestion", done=len(todo), total=len(todo), layer="", bits=None, candidate="",
              widths="")
    # 4. the choice: the measured plan within budget with the lowest held-out loss
    fits = [k for k, c in seen.items() if c["within_budget"]]
    pick = min(fits, key=lambda k: (seen[k]["loss"], seen[k]["predicted_loss_increase"]))
    seen[pick]["kind"] = "suggested"
    cand = pd.DataFrame([{k: v for k, v in c.items() if k != "plan"} for c in seen.values()])
    cand["pareto"] = _pareto_mask(cand["size_bytes"].to_numpy(), cand["accuracy"].to_numpy())
    chosen = seen[pick]
    plan = chosen["plan"]
    return Suggestion(plan=plan, widths={n: widths[w] for n, w in zip(varied, pick)},
                      size_bytes=chosen["size_bytes"], average_bits=chosen["average_bits"],
                      predicted_loss_increase=chosen["predicted_loss_increase"], accuracy=chosen["accuracy"],
                      budget=(f"average <= {average_bits:g} weight bits" if average_bits is not None
                              else f"<= {budget_bytes:,.0f} bytes"),
                      candidates=cand)


def uniform_plan(loaded: Loaded, bits: int) -> LayerPlan:
    """The run's plan with every quantized weight layer at ``bits`` (activations as in the run)."""
    (b,) = _check_bits([bits])
    varied = [r["name"] for r in loaded.qat.layers
              if r["has_weights"] and loaded.config.plan.spec_for(r["name"]).weight_bits is not None]
    return _width_plan(loaded.config.plan, varied, dict.fromkeys(varied, b))


# --- training curves -------------------------------------------------------------------------

def training_curves(events: list[dict[str, Any]]) -> pd.DataFrame:
    """Step events of a run (``store.events(run_id)``) as rows: phase, step, epoch, loss, test_accuracy."""
    rows = [{"phase": e["phase"], "step": e["step"], "epoch": e.get("epoch", math.nan), "loss": e.get("loss", math.nan),
             "test_accuracy": e.get("test_accuracy", math.nan)} for e in events if "step" in e and "phase" in e]
    df = pd.DataFrame(rows, columns=["phase", "step", "epoch", "loss", "test_accuracy"])
    finals = {e["phase"]: e["test_accuracy"] for e in events if e.get("done") and "test_accuracy" in e}
    df.attrs["final_accuracy"] = finals
    return df


# --- persistence -----------------------------------------------------------------------------

def to_csv(df: pd.DataFrame) -> str:
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    return buf.getvalue()


def analyze_run(store: RunStore, run_id: str, bits: Sequence[int] = (4, 2), budget_bytes: float | None = None,
                average_bits: float | None = None, batches: int | None = None, bins: int = DEFAULT_BINS,
                on_progress: OnProgress | None = None, cancel: train.Cancel | None = None) -> dict[str, Path]:
    """Analyse a finished run and write tables (CSV) and figures (HTML) into ``runs/<id>/analysis/``.

    Writes errors.csv (both stages), histograms.csv + histogram_marks.csv + channel_ranges.csv,
    training.csv, sensitivity.csv (when ``bits``), suggestion.csv + suggested_plan.json (when a
    budget is given), and one HTML page per figure group (they share ``plotly.min.js`` in the same
    folder, so they open offline). Returns the written paths by name.
    """
    from qat_core import plots
    from qat_core.runner import load

    loaded = load(store, run_id)
    torch.set_num_threads(cpu.training_threads(sum(p.numel() for p in loaded.fp32.parameters())))  # as execute
    widths = _check_bits(bits) if bits else []
    if (budget_bytes is not None or average_bits is not None) and not widths:
        raise ConfigError("a mixed-precision suggestion needs sensitivity widths to choose from; give bits, "
                          "e.g. (8, 6, 4, 3, 2)")
    written: dict[str, Path] = {}

    def put(name: str, text: str) -> None:
        path = store.artifact(run_id, f"{ANALYSIS_DIR}/{name}")
        atomic_write_text(path, text)
        written[name] = path

    # 1. histograms and per-layer error, before and after the fine-tune
    cal = calibration_batches(loaded, batches)
    tables, hists = [], []
    for stage in STAGES:
        _progress(on_progress, cancel, "analysis", done=len(tables), total=2, layer="", bits=None)
        model = _stage_model(loaded, stage)
        stats = capture_activations(model, cal, bins=bins, cancel=cancel)
        tables.append(error_table(loaded, stage, stats=stats))
        hists += [st.to_histogram(stage) for st in stats.values()]
    for layer in weight_layers(loaded.qat):
        hists += weight_histograms(loaded, layer, bins)
    errors = pd.concat(tables, ignore_index=True)
    put("errors.csv", to_csv(errors))
    put("histograms.csv", to_csv(pd.concat([h.frame() for h in hists], ignore_index=True)))
    put("histogram_marks.csv", to_csv(pd.DataFrame([h.marks() for h in hists])))
    channels = [h.channels for h in hists if h.channels is not None]
    if channels:
        put("channel_ranges.csv", to_csv(pd.concat(channels, ignore_index=True)))
    curves = training_curves(store.events(run_id))
    put("training.csv", to_csv(curves))
    figures: dict[str, list] = {
        "sqnr.html": [plots.sqnr_figure(errors)],
        "weights.html": [plots.histogram_figure([h for h in hists if h.tensor == "weight" and h.layer == layer])
                         for layer in weight_layers(loaded.qat)],
        "activations.html": [plots.histogram_figure([h for h in hists if h.tensor == "activation" and h.layer == layer])
                             for layer in activation_layers(loaded.qat)],
        "training.html": [plots.training_figure(curves)],
    }
    summary: dict[str, Any] = {"output_sqnr_db": {t.attrs["stage"]: t.attrs["output_sqnr_db"] for t in tables}}
    # 2. sensitivity and, with a budget, a mixed-precision suggestion
    if widths:
        sens = sensitivity(loaded, widths, batches=None, on_progress=on_progress, cancel=cancel)
        put("sensitivity.csv", to_csv(sens))
        figures["sensitivity.html"] = [plots.sensitivity_figure(sens)]
        if budget_bytes is not None or average_bits is not None:
            sug = suggest_plan(loaded, sens, budget_bytes, average_bits, on_progress=on_progress, cancel=cancel)
            put("suggestion.csv", to_csv(sug.candidates))
            put("suggested_plan.json", json.dumps(sug.plan.model_dump(mode="json"), indent=2))
            figures["pareto.html"] = [plots.pareto_figure(sug.candidates)]
            summary["suggestion"] = {"widths": sug.widths, "size_bytes": sug.size_bytes,
                                     "average_bits": sug.average_bits, "accuracy_ptq": sug.accuracy}
    put(plots.PLOTLY_JS, plots.plotly_js())
    for name, figs in figures.items():
        put(name, plots.page(figs, title=f"run {run_id}: {name.removesuffix('.html')}"))
    summary["files"] = {k: str(v) for k, v in written.items()}
    store.write_result(run_id, "analysis", summary)
    return written
