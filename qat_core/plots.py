"""Plotly figures from the analysis tables, so pages only place them (and tests can read them).

Every figure has a title, axis titles with units, and hover text that names the layer, stage
and value. Figures are ``plotly.graph_objects.Figure``; :func:`page` turns a list of them into
one HTML page that loads ``plotly.min.js`` from its own folder (written by ``analyze_run``).
"""

from __future__ import annotations

import html
import itertools
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
FIGURE_FRAME_PX = 170  # a per-layer chart's title, legend and x axis
MIN_PLOT_PX = 240  # a per-layer chart's plot area for a few layers
LAYER_ROW_PX, BAR_PX = 18, 8  # a layer's row in a per-layer bar chart: at least this, or this a bar
LAYER_FONT_PX = 11
LEGEND_BELOW = {"orientation": "h", "y": -0.25}  # a legend under the plot, which keeps the whole width
MAX_GRID_LINES = 512  # grids with more levels are drawn with every n-th line
MAX_TICK_DECIMALS = 4
FRONT_COLOR, OFF_FRONT_COLOR = "#1f77b4", "#7f7f7f"  # runs on the Pareto front, and the others
PARETO_PLOT_HEIGHT = 420  # px of a runs Pareto chart without its legend
PARETO_TOP_PX, PARETO_BOTTOM_PX = 60, 70  # its margins: the title; tick labels and the x-axis title
PARETO_AREA_PX = PARETO_PLOT_HEIGHT - PARETO_TOP_PX - PARETO_BOTTOM_PX  # its plot area, whatever the legend
LEGEND_TWO_COLUMNS_UP_TO = 34  # a runs Pareto chart's legend (below the plot) has two columns up to this many chars
MARKER_RADIUS_PX = 6
LABEL_FONT_PX = 12
LABEL_RINGS, LABEL_RING_PX = 6, 16  # a label tries rings this far apart around its marker, nearest first
LABEL_PLOT_WIDTH_PX = 540  # the plot area a Pareto chart's labels are placed for: full width at 800 px (wider only helps)
LEGEND_ROW_PX = 22
LEGEND_GAP_PX = 60  # from the plot area's bottom to the legend: room for tick labels and the axis title
LEGEND_NAME_CHARS = 40  # longer run names are cut in the legend (whole in the hover)


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


def share_text(share: float) -> str:
    """A share (0..1) as people read it: a percentage to 3 significant digits ("9.72%", "0.0433%"), "0%"
    for none and "<0.001%" below that (the tables and the histogram legend say clipped shares so)."""
    percent = share * 100
    return "0%" if percent == 0 else "<0.001%" if percent < 0.001 else f"{percent:.3g}%"


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


def histogram_figure(hists: Sequence[Histogram], log_y: bool = False) -> go.Figure:
    """One layer's histogram(s) — typically before and after the fine-tune — as step lines, with
    each stage's quantization grid (toggle in the legend) and clip range marked; the share clipped in the
    legend, and what it means in the subtitle (how many values of how many, saturated to which range).
    Counts are whole: the count axis ticks at whole steps."""
    if not hists:
        raise ConfigError("histogram_figure needs at least one histogram")
    first = hists[0]
    fig = go.Figure()
    ymax = max(int(h.counts.max()) if len(h.counts) else 1 for h in hists) or 1
    for i, h in enumerate(hists):
        color = STAGE_COLORS.get(h.stage, None)
        centres = (h.edges[:-1] + h.edges[1:]) / 2
        name = _label(h.stage) or h.layer
        clipped = f": {share_text(h.share_clipped)} clipped" if h.bits is not None else ""
        fig.add_trace(go.Scatter(
            x=centres, y=h.counts, mode="lines", line={"shape": "hvh", "color": color}, name=f"{name}{clipped}",
            customdata=np.stack([h.edges[:-1], h.edges[1:]], axis=1),
            hovertemplate=(f"{html.escape(name)}<br>[%{{customdata[0]:.4g}}, %{{customdata[1]:.4g}})"
                           "<br>%{y:,} values<extra></extra>")))
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
    subtitle = _clipped_text(hists)
    fig.update_layout(title={"text": f"{first.layer}: {what} ({total})", "subtitle": {"text": subtitle},
                             "yref": "container", "y": 1, "yanchor": "top", "pad": {"t": 15}},
                      xaxis_title="value (real units, after BN folding)" if first.tensor == "weight"
                      else "value (real units)", yaxis_title="count (values per bin)",
                      margin={"t": 75 + 18 * subtitle.count("<br>")}, height=450 + 18 * subtitle.count("<br>"),
                      legend=LEGEND_BELOW, hovermode="closest")
    if log_y:
        fig.update_yaxes(type="log")
    else:
        fig.update_yaxes(rangemode="tozero", tick0=0, dtick=count_dtick(ymax), tickformat=",d")
    return fig


def count_dtick(most: int) -> int:
    """A tick step for a count axis from 0 to ``most``: about five ticks at 1, 2 or 5 × 10^k, never
    below 1 (a count has no halves; plotly's own step for counts up to 4 is 0.5)."""
    rough = max(most / 5, 1)
    base = 10 ** math.floor(math.log10(rough))
    return int(next(m * base for m in (1, 2, 5, 10) if m * base >= rough))


def _clipped_text(hists: Sequence[Histogram]) -> str:
    """What "clipped" means on a histogram: per stage, how many of its values lay beyond the quantizer's
    clip range (its channel's, for per-channel weights) and were saturated to it."""
    parts = []
    for h in hists:
        if h.bits is None:
            continue
        where = ("their channel's clip range" if h.granularity == "per_channel"
                 else f"the clip range [{h.clip_lo:.3g}, {h.clip_hi:.3g}]")
        seen = "weights" if h.tensor == "weight" else "values seen on the calibration batches"
        parts.append(f"{_label(h.stage) or h.layer}: {h.clipped:,} of {h.total:,} {seen} ({share_text(h.share_clipped)}) "
                     f"beyond {where}")
    return "<br>".join(["Clipped (saturated to the nearest end of the grid):", *parts]) if parts else ""


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
                      xaxis_title="output channel", yaxis_title="weight value (real units, after BN folding)",
                      legend=LEGEND_BELOW)
    return fig


def _layer_rows_height(layers: int, bars: int) -> int:
    """The height (px) of a chart with a row per layer of ``bars`` horizontal bars each: the rows keep
    their size, so 150 layers make a tall chart that scrolls, not 150 squeezed rows."""
    return FIGURE_FRAME_PX + max(MIN_PLOT_PX, layers * max(LAYER_ROW_PX, BAR_PX * bars + 4))


def _layer_axis(layers: Sequence[str]) -> dict:
    """A layer axis with every layer named (top to bottom in ``layers`` order), its labels given room."""
    return {"categoryorder": "array", "categoryarray": list(layers)[::-1], "tickmode": "array",
            "tickvals": list(layers), "tickfont": {"size": LAYER_FONT_PX}, "automargin": True}


def sqnr_figure(errors: pd.DataFrame) -> go.Figure:
    """Weight and activation SQNR per layer (dB; higher is better), one colour per stage: horizontal
    bars, a row per layer in network order (first on top), weights left and activations right; the
    height grows with the layers so every layer keeps a readable, named row."""
    _need(errors, ["layer", "weight_sqnr_db", "act_sqnr_db"], "sqnr_figure")
    df = errors[errors["layer"] != "(network)"]
    stages = list(df["stage"].unique()) if "stage" in df.columns else [""]
    layers = list(dict.fromkeys(df["layer"]))
    fig = make_subplots(rows=1, cols=2, subplot_titles=("weights", "output activations"), shared_yaxes=True,
                        horizontal_spacing=0.04)
    for stage in stages[::-1]:  # a horizontal group draws its first bar lowest: the first stage on top
        part = df[df["stage"] == stage] if "stage" in df.columns else df
        for col, column, bits in ((1, "weight_sqnr_db", "weight_bits"), (2, "act_sqnr_db", "act_bits")):
            x = part[column].replace([np.inf], np.nan)
            fig.add_trace(go.Bar(
                y=part["layer"], x=x, orientation="h", name=_label(stage) or "SQNR",
                marker_color=STAGE_COLORS.get(stage), legendgroup=stage, showlegend=col == 1,
                customdata=part[bits].astype("float").to_numpy() if bits in part.columns else None,
                hovertemplate=(f"%{{y}} ({html.escape(_label(stage))})<br>{column.split('_')[0]} SQNR "
                               "%{x:.1f} dB<br>%{customdata}-bit<extra></extra>")), row=1, col=col)
    net = errors[errors["layer"] == "(network)"]
    out = "; ".join(f"{_label(r['stage'])} {r['output_sqnr_db']:.1f} dB" for _, r in net.iterrows()) \
        if "output_sqnr_db" in errors.columns and "stage" in errors.columns else ""
    height = _layer_rows_height(len(layers), len(stages))
    fig.update_layout(title={"text": "Per-layer SQNR (dB, higher is better)", "subtitle": {
                          "text": f"network output vs FP32: {out}" if out else ""}, "yref": "container", "y": 1,
                          "yanchor": "top", "pad": {"t": 12}},
                      barmode="group", height=height, margin={"t": 110, "b": 50},
                      legend={"orientation": "h", "yref": "container", "y": 1 - 62 / height, "yanchor": "top",
                              "x": 1, "xanchor": "right", "traceorder": "reversed"}, bargap=0.25)
    fig.update_yaxes(**_layer_axis(layers))
    fig.update_yaxes(title_text="layer (network order)", row=1, col=1)
    fig.update_xaxes(title_text="SQNR (dB)", rangemode="tozero")
    return fig


def sensitivity_figure(sens: pd.DataFrame, metric: str = "loss_increase", top: int | None = None) -> go.Figure:
    """Layers ranked by the damage of quantizing them alone (horizontal bars, most sensitive on top), a
    row per layer whose height does not shrink with the layer count; ``top``: only the ``top`` most
    sensitive layers (the title says how many of how many)."""
    _need(sens, ["layer", "bits", metric, "accuracy_drop", "loss_increase"], "sensitivity_figure")
    if metric not in ("loss_increase", "accuracy_drop"):
        raise ConfigError(f"metric must be loss_increase or accuracy_drop, got {metric!r}")
    if top is not None and top < 1:
        raise ConfigError(f"top must be at least 1 layer, got {top}")
    ranked = sens.groupby("layer")[metric].max().sort_values(ascending=False).index.tolist()
    shown = ranked[:top] if top else ranked
    sens = sens[sens["layer"].isin(shown)]
    fig = go.Figure()
    widths = sorted(sens["bits"].unique(), reverse=True)
    for bits, part in sorted(sens.groupby("bits")):  # the first bar of a group is drawn lowest: widest on top
        part = part.set_index("layer").reindex(shown)
        fig.add_trace(go.Bar(
            y=shown, x=part[metric], orientation="h", name=f"{bits}-bit",
            customdata=np.stack([part["loss_increase"], part["accuracy_drop"]], axis=1),
            hovertemplate=(f"%{{y}} at {bits} bits (rest FP32)<br>loss +%{{customdata[0]:.4f}} nats"
                           "<br>accuracy −%{customdata[1]:.2%}<extra></extra>")))
    unit = "loss increase (nats per sample)" if metric == "loss_increase" else "accuracy drop"
    which = f"the {len(shown)} most sensitive of {len(ranked)} layers" if len(shown) < len(ranked) else \
        f"all {len(ranked)} layers"
    height = _layer_rows_height(len(shown), len(widths))
    fig.update_layout(title={"text": "Sensitivity: one layer quantized at a time, the rest FP32",
                             "subtitle": {"text": f"{which}, most sensitive on top"}, "yref": "container", "y": 1,
                             "yanchor": "top", "pad": {"t": 12}},
                      barmode="group", height=height, margin={"t": 110, "b": 50}, bargap=0.25,
                      legend={"orientation": "h", "yref": "container", "y": 1 - 62 / height, "yanchor": "top",
                              "x": 1, "xanchor": "right", "traceorder": "reversed"},
                      xaxis_title=unit, yaxis_title="layer")
    fig.update_yaxes(**_layer_axis(shown))
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
                      xaxis_title="bit-packed size (bytes; not a file yet)", yaxis_title="test accuracy",
                      legend=LEGEND_BELOW)
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
    # the legend goes under the plots, in the bottom margin, so the plots keep the whole width
    fig.update_layout(title=title, hovermode="x unified", height=620, margin={"t": 80, "b": 120},
                      legend={"orientation": "h", "yref": "container", "y": 0, "yanchor": "bottom", "x": 0,
                              "xanchor": "left"})
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


def _value_text(value: float, column: str) -> str:
    """A value of a runs-table column for a legend, with the unit its name ends with ("size KB" → "23.8 KB")."""
    words = column.split()
    if "KB" in words:  # also "int8.onnx KB (predicted until exported)"
        return f"{value:,.1f} KB"
    return f"{value:,.4g} {words[-1] if len(words) > 1 else ''}".rstrip()


def _short(text: str, limit: int = LEGEND_NAME_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def runs_pareto_figure(runs: pd.DataFrame, x: str, title: str) -> go.Figure:
    """QAT accuracy of runs against ``x`` (a column of ``report.runs_frame``, smaller is better: size,
    latency), for a room to read: every run is a numbered marker (filled on the Pareto front, hollow off
    it) named in the legend below the plot ("3. W4A8 · 97.50% · 12.1 KB", one entry a run, two columns),
    the front joined by a dashed line, and the FP32 accuracy (column ``FP32 acc %`` when present; one line
    per distinct value, with the model when several) drawn as a labelled horizontal line. Runs at the same
    point share one marker numbered "3,4". The height grows with the legend, so the plot keeps its size."""
    _need(runs, ["run", "plan", "QAT acc %", x], "runs_pareto_figure")
    data = runs.dropna(subset=[x, "QAT acc %"]).sort_values([x, "QAT acc %"], ascending=[True, False])
    xs, acc = data[x].to_numpy(dtype=float), data["QAT acc %"].to_numpy(dtype=float)
    labels = [str(v) for v in (data["name"] if "name" in data else data["plan"])]  # the user's name, else the plan
    fp32 = _fp32_lines(data if len(data) else runs)
    x_range, y_axis = _nonnegative_range(xs), _accuracy_axis([*acc, *(v for _, v in fp32)], percent=True)
    on_front = pareto_mask(xs, acc)
    fig = go.Figure()
    if on_front.any():
        fig.add_scatter(x=xs[on_front], y=acc[on_front], mode="lines", name="Pareto front (dashed)",
                        line={"dash": "dash", "color": FRONT_COLOR}, hoverinfo="skip")
    at: dict[tuple[float, float], list[str]] = {}  # a point → the numbers of the runs drawn there
    for i, point in enumerate(zip(xs, acc)):
        at.setdefault(point, []).append(str(i + 1))
    for i, (xi, yi, label, front) in enumerate(zip(xs, acc, labels, on_front)):
        color = FRONT_COLOR if front else OFF_FRONT_COLOR
        fig.add_scatter(
            x=[xi], y=[yi], mode="markers", cliponaxis=False,
            marker={"size": 2 * MARKER_RADIUS_PX, "color": color if front else "white", "line": {"color": color, "width": 2}},
            name=f"{i + 1}. {html.escape(_short(label))} · {yi:.2f}% · {_value_text(xi, x)}",
            customdata=[data["run"].iloc[i]], hovertext=[html.escape(label)],
            hovertemplate=f"{i + 1}. %{{hovertext}}<br>run %{{customdata}}<br>{html.escape(x)} %{{x:,.4g}}"
                          "<br>QAT accuracy %{y:.2f}%<extra></extra>")
    points = list(at)
    texts = [",".join(at[p]) for p in points]
    for (xi, yi), text, (dx, dy), ring in zip(points, texts, *_place_labels(points, texts, x_range, y_axis["range"])):
        near = {"showarrow": False, "xshift": dx, "yshift": dy}  # beside its marker
        far = {"showarrow": True, "ax": dx, "ay": -dy, "arrowhead": 0, "arrowwidth": 1, "arrowcolor": OFF_FRONT_COLOR}
        fig.add_annotation(x=xi, y=yi, xref="x", yref="y", text=text, font={"size": LABEL_FONT_PX, "color": "#222"},
                           bgcolor="rgba(255,255,255,0.8)", **(far if ring else near))
    for label, value in fp32:
        fig.add_hline(y=value, line={"dash": "dot", "color": STAGE_COLORS["fp32"], "width": 1.5},
                      annotation_text=f"{html.escape(label)} {value:.2f}%", annotation_position="top left",
                      annotation_font_color=STAGE_COLORS["fp32"])
    longest = max((len(t.name) for t in fig.data), default=0)
    columns = 2 if longest <= LEGEND_TWO_COLUMNS_UP_TO else 1  # two columns of long names overlap at 800 px
    rows = math.ceil(len(fig.data) / columns)
    fig.update_layout(
        title=title, xaxis_title=x, yaxis_title="QAT test accuracy (%)",
        height=PARETO_PLOT_HEIGHT + LEGEND_ROW_PX * rows,
        margin={"t": PARETO_TOP_PX, "b": PARETO_BOTTOM_PX + LEGEND_ROW_PX * rows},
        # the legend starts under the x-axis title: the plot area is the same height whatever the rows
        legend={"orientation": "h", "x": 0, "xanchor": "left", "y": -LEGEND_GAP_PX / PARETO_AREA_PX,
                "yanchor": "top", "entrywidth": 1 / columns, "entrywidthmode": "fraction", "font": {"size": 12}},
        hovermode="closest")
    fig.update_xaxes(range=x_range)
    fig.update_yaxes(**y_axis)
    return fig


def _label_box(text: str) -> tuple[float, float]:
    """A number label's width and height in px at ``LABEL_FONT_PX`` (digits ~0.62 em, plus padding)."""
    return 0.62 * LABEL_FONT_PX * len(text) + 4, LABEL_FONT_PX + 4


def _place_labels(points: Sequence[tuple[float, float]], texts: Sequence[str], x_range: Sequence[float],
                  y_range: Sequence[float]) -> tuple[list[tuple[float, float]], list[int]]:
    """Where each point's label goes, as a px offset (dx, dy; y up) from its point, and the ring it
    took (0: touching its marker, no leader line needed). Greedy, in the order given: the first ring
    and direction whose box overlaps no marker, no label placed before and stays near the plot wins,
    on a plot area of ``LABEL_PLOT_WIDTH_PX`` by the chart's fixed plot height."""
    width, height = LABEL_PLOT_WIDTH_PX, PARETO_AREA_PX
    px = [((x - x_range[0]) / ((x_range[1] - x_range[0]) or 1) * width,
           (y - y_range[0]) / ((y_range[1] - y_range[0]) or 1) * height) for x, y in points]
    r = MARKER_RADIUS_PX + 1
    boxes = [(x - r, y - r, x + r, y + r) for x, y in px]  # markers, then the labels placed so far

    def free(box: tuple[float, float, float, float]) -> bool:
        inside = box[0] >= -20 and box[2] <= width + 20 and box[1] >= -10 and box[3] <= height + 10
        return inside and not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in boxes)

    def spot(x: float, y: float, w: float, h: float, ring: int, angle: int) -> tuple[float, float, tuple]:
        c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        gap = r + 1 + LABEL_RING_PX * ring
        dx, dy = c * (gap + w / 2), s * (gap + h / 2)
        return dx, dy, (x + dx - w / 2, y + dy - h / 2, x + dx + w / 2, y + dy + h / 2)

    offsets, rings = [], []
    for (x, y), text in zip(px, texts):
        w, h = _label_box(text)
        for ring, angle in itertools.product(range(LABEL_RINGS), (45, 135, -45, -135, 90, -90, 0, 180)):
            dx, dy, box = spot(x, y, w, h, ring, angle)
            if free(box):
                break
        else:  # nowhere free: the outer ring, up and to the right
            dx, dy, box = spot(x, y, w, h, LABEL_RINGS - 1, 45)
        boxes.append(box)
        offsets.append((round(dx, 1), round(dy, 1)))
        rings.append(ring)
    return offsets, rings


def _fp32_lines(runs: pd.DataFrame) -> list[tuple[str, float]]:
    """The FP32 reference accuracies (%) of ``runs`` (column ``FP32 acc %``), one per distinct value, as
    (label, value): "FP32" when they share one value, else "FP32 <the models at it>"."""
    if "FP32 acc %" not in runs.columns:
        return []
    known = runs.dropna(subset=["FP32 acc %"])
    models = known["model"] if "model" in known else known["run"]
    at: dict[float, list[str]] = {}
    for model, value in zip(models, known["FP32 acc %"].astype(float)):
        at.setdefault(value, []).append(str(model))
    if len(at) == 1:
        return [("FP32", next(iter(at)))]
    return [(f"FP32 {', '.join(dict.fromkeys(names))}", value) for value, names in at.items()]
