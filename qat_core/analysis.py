"""See the quantization: histograms and per-layer error of a run, before and after its fine-tune.

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

import contextlib
import copy
import hashlib
import io
import itertools
import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from qat_core import cpu, progress, train
from qat_core.config import LayerPlan, QuantOverride, RunConfig
from qat_core.data import data_fingerprint
from qat_core.errors import CancelledError, ConfigError, StoreError
from qat_core.modules import QATModel, QuantConv2d, QuantLinear, QuantOutput
from qat_core.prepare import size_bytes
from qat_core.quant_math import sqnr_db
from qat_core.quantizers import FakeQuantizer, set_enabled
from qat_core.store import RunStore

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

@contextlib.contextmanager
def work_threads() -> Iterator[None]:
    """torch threads for analysis (per-layer error, sensitivity, suggestions, the report): 1 unless
    ``$QAT_STUDIO_THREADS`` says otherwise. It runs in the web server, beside the browser and other jobs;
    on 2 shared cores torch's default of 2 threads made "Suggest a plan" on digits 10x slower beside one
    busy process (36 s, against 3.6 s with 1), and the report of a mobilenet_v3_small 2.4x slower."""
    with train.torch_threads(cpu.requested_threads() or 1):
        yield


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
                stats: dict[str, ActivationStats] | None = None,
                fp32_logits: torch.Tensor | None = None) -> pd.DataFrame:
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
    changed). ``df.attrs`` holds output_sqnr_db and stage. ``fp32_logits``: the FP32 baseline's test
    logits (``train.predict``), where the caller has them already (both stages share them).
    """
    with work_threads():
        return _error_table(loaded, stage, batches, stats, fp32_logits)


def _error_table(loaded: Loaded, stage: str, batches: int | None, stats: dict[str, ActivationStats] | None,
                 fp32_logits: torch.Tensor | None) -> pd.DataFrame:
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
    logits = train.predict(model, test)  # once: against the same weights in float, and against FP32
    out_sqnr = sqnr_db(train.predict(quantization_only(model), test), logits)
    drift = sqnr_db(train.predict(loaded.fp32, test) if fp32_logits is None else fp32_logits, logits)
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


ERRORS_RESULT = "error_tables"  # a run's per-layer error tables, both stages, saved with the run
ERRORS_VERSION = 1  # raise when error_table's columns or definitions change: saved tables are then remade


def _errors_key(store: RunStore, run_id: str, config: RunConfig, batches: int | None) -> str:
    """What a run's saved error tables were computed from: its weights files (as written), config, data
    files and calibration batches. Anything else, and they are computed again."""
    weights = {}
    for name in ("fp32.pt", "ptq.pt", "qat.pt"):
        try:
            info = store.state_path(run_id, name).stat()
        except OSError as err:
            raise StoreError(f"run {run_id}'s {name} cannot be read ({err.strerror}); train the run again") from None
        weights[name] = [info.st_size, info.st_mtime_ns]
    identity = {"version": ERRORS_VERSION, "weights": weights, "config": config.model_dump(mode="json", exclude={"name"}),
                "data": data_fingerprint(config.data), "batches": batches, "torch": torch.__version__}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _frame_payload(df: pd.DataFrame) -> dict[str, Any]:
    """A table as JSON-able lists: floats exactly (JSON keeps NaN and inf), missing values as null."""
    rows = df.astype(object).where(df.notna(), None).to_numpy().tolist()
    return {"columns": list(df.columns), "dtypes": [str(t) for t in df.dtypes], "rows": rows, "attrs": df.attrs}


def _frame_from(payload: dict[str, Any]) -> pd.DataFrame:
    df = pd.DataFrame(payload["rows"], columns=payload["columns"])
    for column, dtype in zip(payload["columns"], payload["dtypes"]):
        df[column] = df[column].astype(dtype) if dtype != "object" else df[column].where(df[column].notna(), np.nan)
    df.attrs.update(payload["attrs"])
    return df


def run_error_tables(store: RunStore, run_id: str, loaded: Loaded | None = None, batches: int | None = None,
                     on_progress: OnProgress | None = None) -> dict[str, pd.DataFrame]:
    """The error tables (:func:`error_table`) of a finished run before and after its fine-tune, by stage.

    Computed once and saved with the run (``results/error_tables.json``), keyed by what they depend on
    (:func:`_errors_key`), so Inspect and the report share one measurement; the FP32 logits are
    predicted once for both stages. ``loaded``: the run's models, where the caller has them already.
    Progress: ``on_progress({"task": "per-layer error", "done", "total", "seconds_left"})`` per stage.
    """
    from qat_core import runner  # runner builds the models; it sits above this module

    store.require_done(run_id)
    config = store.config(run_id)
    key = _errors_key(store, run_id, config, batches)
    with contextlib.suppress(StoreError, KeyError, TypeError, ValueError):  # damaged or older: measured again
        saved = store.read_result(run_id, ERRORS_RESULT)
        if saved is not None and saved["key"] == key and set(saved["stages"]) == set(STAGES):
            return {stage: _frame_from(saved["stages"][stage]) for stage in STAGES}
    pace = progress.Pace(len(STAGES))
    if on_progress is not None:
        on_progress(pace.payload("per-layer error", 0))
    loaded = loaded or runner.load(store, run_id)
    with work_threads():
        reference = train.predict(loaded.fp32, loaded.data.test_loader())
        tables = {}
        for k, stage in enumerate(STAGES):
            tables[stage] = _error_table(loaded, stage, batches, None, reference)
            if on_progress is not None:
                on_progress(pace.payload("per-layer error", k + 1))
    store.write_result(run_id, ERRORS_RESULT, {"key": key, "stages": {s: _frame_payload(t) for s, t in tables.items()}})
    return tables


def _stage_model(loaded: Loaded, stage: str) -> QATModel:
    if stage not in STAGES:
        raise ConfigError(f"stage must be one of {', '.join(STAGES)} (before / after the fine-tune), got {stage!r}")
    return loaded.ptq if stage == "ptq" else loaded.qat


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
