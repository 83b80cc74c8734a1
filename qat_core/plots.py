"""Plotly figures from the analysis tables, so pages only place them (and tests can read them).

Every figure has a title, axis titles with units, and hover text that names the layer, stage
and value. Figures are ``plotly.graph_objects.Figure``; :func:`page` turns a list of them into
one HTML page that loads ``plotly.min.js`` from its own folder (written by ``analyze_run``).
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from qat_core.errors import ConfigError
from qat_core.search import pareto_mask  # the one front rule

if TYPE_CHECKING:
    from qat_core.analysis import Histogram

PLOTLY_JS = "plotly.min.js"
STAGE_COLORS = {"ptq": "#636EFA", "qat": "#EF553B", "": "#636EFA", "fp32": "#00A000"}
STAGE_NAMES = {"ptq": "before fine-tune (PTQ)", "qat": "after fine-tune (QAT)", "": "", "fp32": "FP32"}
MAX_GRID_LINES = 512  # grids with more levels are drawn with every n-th line
MAX_TICK_DECIMALS = 4
LABEL_ALL_UP_TO = 4  # runs on a Pareto chart that are all labelled; with more, only the front's


def _need(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise ConfigError(f"{what} needs a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ConfigError(f"{what} needs the column(s) {', '.join(missing)}; pass the table from qat_core.analysis")


def _label(stage: str) -> str:
    return STAGE_NAMES.get(stage, stage)


def _finite(values: Iterable[float]) -> np.ndarray:
    v = np.asarray(list(values), dtype=float)
    return v[np.isfinite(v)]


def accuracy_tickformat(span: float, percent: bool = False) -> dict[str, str]:
    """Tick format for an accuracy axis showing ``span`` (fractions, or percent when ``percent``) whose
    labels all differ: plotly's automatic tick step is at least span/10 rounded up to 2, 5 or 10 × 10^k,
    so ``d`` decimals (of a percent) suffice once the span exceeds 5·10^-d points."""
    points = span * (1 if percent else 100)
    decimals = 0
    if math.isfinite(points) and points > 0:  # no span to go by: whole points
        while decimals < MAX_TICK_DECIMALS and points <= 5.000001 * 10.0 ** -decimals:  # at the edge: one more
            decimals += 1
    return {"tickformat": f".{decimals}f", "ticksuffix": "%"} if percent else {"tickformat": f".{decimals}%"}


def _accuracy_axis(values: Iterable[float], percent: bool = False) -> dict:
    """Axis settings for accuracies: a range padded around ``values`` (within 0..100 %, at least a point
    wide so one value still gets a readable axis) and the tick format that keeps labels distinct there."""
    full = 100.0 if percent else 1.0
    v = _finite(values)
    lo, hi = (float(v.min()), float(v.max())) if len(v) else (0.0, full)
    pad = max(0.1 * (hi - lo), 0.005 * full)
    lo, hi = max(0.0, lo - pad), min(full, hi + pad)
    return {"range": [lo, hi], **accuracy_tickformat(hi - lo, percent)}


def _nonnegative_range(values: Iterable[float]) -> list[float] | None:
    """A range for sizes and latencies: never below 0 (plotly's autorange goes negative around a single
    point), padded so end points fit; one value (or all equal) is shown as 0 .. 1.2× it."""
    v = _finite(values)
    if not len(v):
        return None
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return [0.0, 1.2 * hi if hi > 0 else 1.0]
    pad = 0.1 * (hi - lo)
    return [max(0.0, lo - pad), hi + pad]


def _inward_positions(x: Sequence[float], y: Sequence[float], x_range: Sequence[float],
                      y_range: Sequence[float]) -> list[str]:
    """A ``textposition`` per point that puts its label toward the middle of the plot, so labels of
    points near an edge are not cut off: below points in the upper half, left of those in the right
    third, right of those in the left third."""
    out = []
    for xi, yi in zip(x, y):
        fx = (xi - x_range[0]) / ((x_range[1] - x_range[0]) or 1)
        fy = (yi - y_range[0]) / ((y_range[1] - y_range[0]) or 1)
        side = "right" if fx < 1 / 3 else "left" if fx > 2 / 3 else "center"
        out.append(f"{'bottom' if fy > 0.5 else 'top'} {side}")
    return out


def histogram_figure(hists: Sequence[Histogram], log_y: bool = False) -> go.Figure:
    """One layer's histogram(s) — typically before and after the fine-tune — as step lines, with
    each stage's quantization grid (toggle in the legend) and clip range marked, share clipped in the legend."""
    if not hists:
        raise ConfigError("histogram_figure needs at least one histogram")
    first = hists[0]
    fig = go.Figure()
    ymax = max(int(h.counts.max()) if len(h.counts) else 1 for h in hists) or 1
    for i, h in enumerate(hists):
        color = STAGE_COLORS.get(h.stage, None)
        centres = (h.edges[:-1] + h.edges[1:]) / 2
        name = _label(h.stage) or h.layer
        clipped = f", {h.share_clipped:.3%} clipped" if h.bits is not None else ""
        fig.add_trace(go.Scatter(
            x=centres, y=h.counts, mode="lines", line={"shape": "hvh", "color": color}, name=f"{name}{clipped}",
            customdata=np.stack([h.edges[:-1], h.edges[1:]], axis=1),
            hovertemplate=(f"{html.escape(name)}<br>[%{{customdata[0]:.4g}}, %{{customdata[1]:.4g}})"
                           "<br>%{y} values<extra></extra>")))
        if h.bits is None:
            continue
        grid = h.grid
        if len(grid) > MAX_GRID_LINES:
            grid = grid[:: math.ceil(len(grid) / MAX_GRID_LINES)]
        xs = np.repeat(grid, 3).astype(object)
        xs[2::3] = None
        ys = np.tile(np.array([0, ymax, None], dtype=object), len(grid))
        which = " (widest channel)" if h.granularity == "per_channel" else ""
        fig.add_trace(go.Scatter(
            x=xs, y=ys, mode="lines", line={"width": 0.5, "color": color}, opacity=0.35,
            name=f"{name} grid: {h.bits}-bit, step {h.scale:.3g}{which}", hoverinfo="skip",
            visible=True if i == len(hists) - 1 else "legendonly"))
        for x, side in ((h.clip_lo, "low"), (h.clip_hi, "high")):
            fig.add_trace(go.Scatter(
                x=[x, x], y=[0, ymax], mode="lines", line={"dash": "dash", "color": color, "width": 2},
                name=f"{name} clip range", legendgroup=f"clip{i}", showlegend=side == "low",
                hovertemplate=f"{html.escape(name)}: clip {side} end %{{x:.4g}}<extra></extra>"))
    what = "folded weights" if first.tensor == "weight" else "output activations"
    total = f"{first.total:,} values" + (" per stage" if len(hists) > 1 else "")
    outside = max(h.below + h.above for h in hists)
    if outside:
        lo = min(h.value_min for h in hists)
        hi = max(h.value_max for h in hists)
        total += f"; {outside:,} beyond the plotted range, from {lo:.3g} to {hi:.3g}"
    fig.update_layout(title=f"{first.layer}: {what} ({total})", xaxis_title="value (real units, after BN folding)"
                      if first.tensor == "weight" else "value (real units)", yaxis_title="count (values per bin)",
                      legend={"orientation": "h", "y": -0.25}, hovermode="closest")
    if log_y:
        fig.update_yaxes(type="log")
    return fig


def channel_ranges_figure(channels: pd.DataFrame) -> go.Figure:
    """Per-channel weight ranges (min..max bars) with each channel's clip range, for one layer and stage(s)."""
    _need(channels, ["layer", "stage", "channel", "w_min", "w_max", "clip_lo", "clip_hi", "share_clipped"],
          "channel_ranges_figure")
    fig = go.Figure()
    for stage, part in channels.groupby("stage", sort=False):
        color = STAGE_COLORS.get(stage)
        fig.add_trace(go.Bar(
            x=part["channel"], y=part["w_max"] - part["w_min"], base=part["w_min"], marker_color=color, opacity=0.6,
            name=f"{_label(stage)} weight range",
            customdata=np.stack([part["w_min"], part["w_max"], part["share_clipped"]], axis=1),
            hovertemplate="channel %{x}<br>min %{customdata[0]:.4g}, max %{customdata[1]:.4g}"
                          "<br>%{customdata[2]:.2%} clipped<extra></extra>"))
        for col in ("clip_lo", "clip_hi"):
            fig.add_trace(go.Scatter(x=part["channel"], y=part[col], mode="markers",
                                     marker={"symbol": "line-ew-open", "size": 10, "color": color},
                                     name=f"{_label(stage)} clip range", legendgroup=f"clip{stage}",
                                     showlegend=col == "clip_lo",
                                     hovertemplate=f"channel %{{x}}: {col.replace('_', ' ')} %{{y:.4g}}<extra></extra>"))
    layer = channels["layer"].iloc[0] if len(channels) else ""
    fig.update_layout(title=f"{layer}: per-channel weight ranges and clip ranges", barmode="overlay",
                      xaxis_title="output channel", yaxis_title="weight value (real units, after BN folding)")
    return fig


def sqnr_figure(errors: pd.DataFrame) -> go.Figure:
    """Weight and activation SQNR per layer (dB; higher is better), one colour per stage."""
    _need(errors, ["layer", "weight_sqnr_db", "act_sqnr_db"], "sqnr_figure")
    df = errors[errors["layer"] != "(network)"]
    stages = list(df["stage"].unique()) if "stage" in df.columns else [""]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("weights", "output activations"), shared_yaxes=True)
    for stage in stages:
        part = df[df["stage"] == stage] if "stage" in df.columns else df
        for col, column, bits in ((1, "weight_sqnr_db", "weight_bits"), (2, "act_sqnr_db", "act_bits")):
            y = part[column].replace([np.inf], np.nan)
            fig.add_trace(go.Bar(
                x=part["layer"], y=y, name=_label(stage) or "SQNR", marker_color=STAGE_COLORS.get(stage),
                legendgroup=stage, showlegend=col == 1,
                customdata=part[bits].astype("float").to_numpy() if bits in part.columns else None,
                hovertemplate=(f"%{{x}} ({html.escape(_label(stage))})<br>{column.split('_')[0]} SQNR "
                               "%{y:.1f} dB<br>%{customdata}-bit<extra></extra>")), row=1, col=col)
    net = errors[errors["layer"] == "(network)"]
    out = "; ".join(f"{_label(r['stage'])} {r['output_sqnr_db']:.1f} dB" for _, r in net.iterrows()) \
        if "output_sqnr_db" in errors.columns and "stage" in errors.columns else ""
    fig.update_layout(title="Per-layer SQNR" + (f" — network output vs FP32: {out}" if out else ""),
                      barmode="group", yaxis_title="SQNR (dB, higher is better)")
    fig.update_xaxes(title_text="layer")
    return fig


def sensitivity_figure(sens: pd.DataFrame, metric: str = "loss_increase") -> go.Figure:
    """Layers ranked by the damage of quantizing them alone (horizontal bars, most sensitive on top)."""
    _need(sens, ["layer", "bits", metric, "accuracy_drop", "loss_increase"], "sensitivity_figure")
    if metric not in ("loss_increase", "accuracy_drop"):
        raise ConfigError(f"metric must be loss_increase or accuracy_drop, got {metric!r}")
    order = (sens.groupby("layer")[metric].max().sort_values(ascending=True).index.tolist())
    fig = go.Figure()
    for bits, part in sorted(sens.groupby("bits"), key=lambda kv: -kv[0]):
        part = part.set_index("layer").reindex(order)
        fig.add_trace(go.Bar(
            y=order, x=part[metric], orientation="h", name=f"{bits}-bit",
            customdata=np.stack([part["loss_increase"], part["accuracy_drop"]], axis=1),
            hovertemplate=(f"%{{y}} at {bits} bits (rest FP32)<br>loss +%{{customdata[0]:.4f}} nats"
                           "<br>accuracy −%{customdata[1]:.2%}<extra></extra>")))
    unit = "loss increase (nats per sample)" if metric == "loss_increase" else "accuracy drop (fraction)"
    fig.update_layout(title="Sensitivity: one layer quantized at a time, the rest FP32", barmode="group",
                      xaxis_title=unit, yaxis_title="layer (most sensitive on top)")
    if metric == "accuracy_drop":  # bars start at 0, so the axis spans from 0 to the extreme drops
        drops = np.append(_finite(sens[metric]), 0.0)
        fig.update_xaxes(**accuracy_tickformat(drops.max() - drops.min()))
    return fig


def pareto_figure(candidates: pd.DataFrame) -> go.Figure:
    """Size against accuracy of measured mixed-precision plans; the front is joined, the choice starred."""
    _need(candidates, ["kind", "widths", "size_bytes", "average_bits", "accuracy", "pareto"], "pareto_figure")
    df = candidates.sort_values("size_bytes")
    fig = go.Figure()
    hover = ("%{customdata[0]}<br>%{x:,.0f} bytes, %{customdata[1]:.2f} avg weight bits"
             "<br>accuracy %{y:.2%}<extra>%{customdata[2]}</extra>")

    def custom(part: pd.DataFrame) -> np.ndarray:
        return np.stack([part["widths"], part["average_bits"], part["kind"]], axis=1)

    front = df[df["pareto"]]
    fig.add_trace(go.Scatter(x=front["size_bytes"], y=front["accuracy"], mode="lines", name="Pareto front",
                             line={"color": "#888", "dash": "dot"}, hoverinfo="skip"))
    for kind, symbol, size in (("front", "circle", 9), ("fits", "diamond", 10), ("uniform", "square", 11),
                               ("suggested", "star", 16)):
        part = df[df["kind"].str.startswith(kind)]
        if len(part):
            fig.add_trace(go.Scatter(x=part["size_bytes"], y=part["accuracy"], mode="markers", name=kind,
                                     marker={"symbol": symbol, "size": size}, customdata=custom(part),
                                     hovertemplate=hover))
    fig.update_layout(title="Mixed precision: model size vs accuracy (calibrated, before fine-tune)",
                      xaxis_title="bit-packed size (bytes; not a file yet)", yaxis_title="test accuracy")
    fig.update_xaxes(range=_nonnegative_range(df["size_bytes"]))
    fig.update_yaxes(**_accuracy_axis(df["accuracy"]))
    fig.update_traces(cliponaxis=False)  # points on the padded range's edge stay whole
    return fig


def _references(reference: Mapping[str, float | None] | None) -> dict[str, float]:
    """The reference accuracies worth a line: None and NaN are skipped; a value outside 0..1 is refused
    (a percent passed for a fraction would stretch the axis 100×)."""
    refs = {}
    for label, value in (reference or {}).items():
        if value is None or math.isnan(value := float(value)):
            continue
        if not 0 <= value <= 1:
            raise ConfigError(f"reference accuracy {label!r} must be a fraction 0..1, got {value:g}")
        refs[str(label)] = value
    return refs


def training_figure(curves: pd.DataFrame, *, reference: Mapping[str, float | None] | None = None) -> go.Figure:
    """Loss and test accuracy against step, one colour per phase (FP32 baseline, QAT fine-tune).

    ``reference`` maps a label (e.g. ``"FP32"``, ``"PTQ"``) to an accuracy fraction, drawn as a dashed,
    labelled horizontal line on the accuracy plot; None or NaN values are skipped."""
    _need(curves, ["phase", "step", "loss", "test_accuracy"], "training_figure")
    refs = _references(reference)
    # one shared step axis, labelled under the accuracy plot only: the loss plot's own axis title sat
    # where the "test accuracy" subplot title is drawn
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.12,
                        subplot_titles=("training loss", "test accuracy"))
    for phase, part in curves.groupby("phase", sort=False):
        color = STAGE_COLORS.get(phase)
        label = _label(phase) or phase
        fig.add_trace(go.Scatter(x=part["step"], y=part["loss"], mode="lines", name=f"{label} loss",
                                 line={"color": color}, legendgroup=phase,
                                 hovertemplate=f"{label}<br>step %{{x}}<br>loss %{{y:.4f}}<extra></extra>"),
                      row=1, col=1)
        acc = part.dropna(subset=["test_accuracy"])
        fig.add_trace(go.Scatter(x=acc["step"], y=acc["test_accuracy"], mode="lines+markers",
                                 name=f"{label} test accuracy", line={"color": color, "dash": "dot"},
                                 legendgroup=phase,
                                 hovertemplate=f"{label}<br>step %{{x}}<br>accuracy %{{y:.2%}}<extra></extra>"),
                      row=2, col=1)
    title = "Training curves"
    if curves.empty:
        title += " (no step events: the FP32 baseline came from the cache and the fine-tune had 0 steps)"
    elif "fp32" not in set(curves["phase"]):
        title += " (FP32 baseline reused from the cache: only the fine-tune is shown)"
    acc_axis = _accuracy_axis([*curves["test_accuracy"], *refs.values()])
    middle = sum(acc_axis["range"]) / 2
    for i, (label, value) in enumerate(sorted(refs.items(), key=lambda kv: kv[1])):
        color = STAGE_COLORS.get(label.lower(), "#555")
        # labels sit on the plot's inner side of their line (none spills over the subplot title), and
        # neighbouring lines label opposite ends, so close values do not print over each other
        where = f"{'bottom' if value > middle else 'top'} {'left' if i % 2 else 'right'}"
        fig.add_hline(y=value, row=2, col=1, exclude_empty_subplots=False, line={"dash": "dash", "color": color,
                      "width": 1}, annotation_text=f"{html.escape(label)} {value:.2%}", annotation_position=where,
                      annotation_font_color=color)
    # the top margin holds the figure title above the "training loss" subplot title
    fig.update_layout(title=title, hovermode="x unified", height=560, margin={"t": 80, "b": 60})
    fig.update_xaxes(title_text="step (optimizer updates in the phase)", row=2, col=1)
    fig.update_yaxes(title_text="cross-entropy (nats)", row=1, col=1)
    fig.update_yaxes(title_text="accuracy", row=2, col=1, **acc_axis)
    return fig


def plotly_js() -> str:
    """The plotly.js bundle that :func:`page` loads from its folder (so pages open offline)."""
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def page(figures: Sequence[go.Figure], title: str) -> str:
    """An HTML page showing ``figures``; it loads ``plotly.min.js`` from the same folder."""
    divs = "\n".join(f.to_html(full_html=False, include_plotlyjs=False) for f in figures)
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<script src=\"{PLOTLY_JS}\"></script></head>\n<body><h2>{html.escape(title)}</h2>\n{divs}\n</body></html>\n")


def runs_pareto_figure(runs: pd.DataFrame, x: str, title: str) -> go.Figure:
    """QAT accuracy of runs against ``x`` (a column of ``report.runs_frame``, smaller is better: size,
    latency); the Pareto-optimal runs joined by a dashed line. Points are labelled with their names:
    all of them up to ``LABEL_ALL_UP_TO`` runs, else those on the front (labels of nearby points
    overlap); every name is in the hover."""
    _need(runs, ["run", "plan", "QAT acc %", x], "runs_pareto_figure")
    data = runs.dropna(subset=[x, "QAT acc %"]).sort_values([x, "QAT acc %"], ascending=[True, False])
    xs, acc = data[x].to_numpy(dtype=float), data["QAT acc %"].to_numpy(dtype=float)
    x_range, y_axis = _nonnegative_range(xs), _accuracy_axis(acc, percent=True)
    fig = go.Figure()
    labels = data["name"] if "name" in data else data["plan"]  # the user's name for a run, else its plan
    on_front = pareto_mask(xs, acc)
    shown = [str(label) if front or len(data) <= LABEL_ALL_UP_TO else "" for label, front in zip(labels, on_front)]
    fig.add_scatter(x=xs, y=acc, mode="markers+text", text=shown, hovertext=labels, name="runs",
                    customdata=data["run"],
                    textposition=_inward_positions(xs, acc, x_range, y_axis["range"]) if len(data) else None,
                    cliponaxis=False, hovertemplate="%{hovertext}<br>%{customdata}<br>%{x:.2f}<br>%{y:.2f}%")
    if on_front.any():
        fig.add_scatter(x=xs[on_front], y=acc[on_front], mode="lines", name="Pareto front", line={"dash": "dash"})
    fig.update_layout(title=title, xaxis_title=x, yaxis_title="QAT test accuracy (%)", height=380)
    fig.update_xaxes(range=x_range)
    fig.update_yaxes(**y_axis)
    return fig
