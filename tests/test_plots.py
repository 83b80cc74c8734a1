"""Figures are built from the analysis tables and carry titles, axis units and hover text."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

from qat_core import analysis, plots, runner, search
from qat_core.errors import ConfigError


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def loaded(workspace, digits_run):
    return runner.load(workspace, digits_run)


def _titled(fig: go.Figure) -> None:
    assert fig.layout.title.text
    for axis in (fig.layout.xaxis, fig.layout.yaxis):
        assert axis.title.text, "every axis names what it shows"


def test_histogram_figure_marks_grid_and_clip_range(loaded):
    hists = analysis.weight_histograms(loaded, "conv2.conv", bins=64)
    fig = plots.histogram_figure(hists)
    _titled(fig)
    assert "conv2.conv" in fig.layout.title.text and "(real units" in fig.layout.xaxis.title.text
    names = [t.name for t in fig.data]
    assert any("before fine-tune" in n and "clipped" in n for n in names)
    grids = [t for t in fig.data if "grid: 8-bit" in (t.name or "")]
    assert len(grids) == 2 and grids[1].visible is True and grids[0].visible == "legendonly"
    clip_x = {round(float(t.x[0]), 6) for t in fig.data if "clip range" in (t.name or "")}
    assert round(hists[1].clip_lo, 6) in clip_x and round(hists[1].clip_hi, 6) in clip_x
    assert all(t.hovertemplate or t.hoverinfo == "skip" for t in fig.data)
    acts = plots.histogram_figure(analysis.activation_histograms(loaded, "conv1.conv"), log_y=True)
    assert "output activations" in acts.layout.title.text and acts.layout.yaxis.type == "log"
    ranges = plots.channel_ranges_figure(pd.concat([h.channels for h in hists]))
    _titled(ranges)
    assert len(ranges.data) == 6  # per stage: range bars and the two clip ends


def test_table_figures(workspace, digits_run, loaded):
    errors = pd.concat([analysis.error_table(loaded, s) for s in analysis.STAGES], ignore_index=True)
    fig = plots.sqnr_figure(errors)
    assert "network output vs FP32" in fig.layout.title.subtitle.text and "higher is better" in fig.layout.title.text
    assert fig.layout.xaxis.title.text == "SQNR (dB)" and fig.layout.yaxis.title.text == "layer (network order)"
    assert {t.name for t in fig.data} == {"before fine-tune (PTQ)", "after fine-tune (QAT)"}
    assert all("dB" in t.hovertemplate for t in fig.data)

    sens = search.sensitivity(loaded, bits=(4, 2))
    fig = plots.sensitivity_figure(sens)
    _titled(fig)
    assert [t.name for t in fig.data] == ["2-bit", "4-bit"] and fig.layout.legend.traceorder == "reversed"
    top = sens[sens["bits"] == 2].sort_values("rank").iloc[0]["layer"]
    assert fig.layout.yaxis.categoryarray[-1] == top  # plotly lists categories bottom up: the most sensitive on top
    drops = [*sens["accuracy_drop"], 0.0]  # the bars start at 0
    assert plots.sensitivity_figure(sens, "accuracy_drop").layout.xaxis.tickformat == \
        plots.accuracy_tickformat(max(drops) - min(drops))["tickformat"]

    sug = search.suggest_plan(loaded, sens, average_bits=4, measure=1, top=1)
    fig = plots.pareto_figure(sug.candidates)
    _titled(fig)
    assert {"Pareto front", "suggested", "uniform"} <= {t.name for t in fig.data}

    curves = analysis.training_curves(workspace.events(digits_run))
    assert set(curves["phase"]) >= {"qat"} and curves["loss"].notna().all()
    fig = plots.training_figure(curves)
    assert fig.layout.title.text.startswith("Training curves")
    assert fig.layout.yaxis.title.text == "cross-entropy (nats)"
    lo, hi = fig.layout.yaxis2.range
    assert fig.layout.yaxis2.tickformat == plots.accuracy_tickformat(hi - lo)["tickformat"]
    assert lo <= curves["test_accuracy"].min() and curves["test_accuracy"].max() <= hi
    empty = plots.training_figure(analysis.training_curves([]))
    assert "no step events" in empty.layout.title.text

    html = plots.page([fig], "run <x>")
    assert f'src="{plots.PLOTLY_JS}"' in html and "run &lt;x&gt;" in html


def test_figures_reject_tables_they_cannot_draw():
    with pytest.raises(ConfigError, match="needs the column"):
        plots.sqnr_figure(pd.DataFrame({"layer": ["a"]}))
    with pytest.raises(ConfigError, match="needs a pandas DataFrame"):
        plots.pareto_figure([1, 2])
    with pytest.raises(ConfigError, match="at least one histogram"):
        plots.histogram_figure([])


# --- chart defects a first-time user reported ------------------------------------------------------

def _curves(accuracies: list[float]) -> pd.DataFrame:
    """Synthetic step events: a QAT phase whose test accuracy moves within a narrow band."""
    n = len(accuracies)
    return pd.DataFrame({"phase": ["qat"] * n, "step": list(range(n)), "epoch": [0] * n,
                         "loss": [0.1] * n, "test_accuracy": accuracies})


def _runs(rows: list[tuple[str, float, float]], x: str = "int8 latency ms") -> pd.DataFrame:
    return pd.DataFrame([{"run": r, "plan": f"W8A8 {r}", "QAT acc %": acc, x: v} for r, v, acc in rows])


def _auto_tick_labels(lo: float, hi: float, nt: float, ticks: dict) -> list[str]:
    """The labels plotly.js draws on a linear axis over [lo, hi] with ``nt`` ticks wanted: its step is
    range/nt rounded up to 2, 5 or 10 × 10^k, formatted with the axis' tickformat (fixed decimals)."""
    rough = (hi - lo) / nt
    base = 10 ** math.floor(math.log10(rough))
    step = next(m for m in (2, 5, 10) if m * base >= rough) * base
    fmt = ticks["tickformat"]
    scale = 100 if fmt.endswith("%") else 1
    decimals = int(fmt.strip(".f%"))
    values = [k * step for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]
    return [f"{v * scale:.{decimals}f}" for v in values]


@pytest.mark.parametrize("percent", [False, True])
def test_accuracy_tick_labels_differ_at_any_span(percent):
    full = 100.0 if percent else 1.0
    for span in np.logspace(-5, 0, 41) * full:
        ticks = plots.accuracy_tickformat(span, percent=percent)
        assert ticks.get("ticksuffix", "") == ("%" if percent else "")
        for lo in (0.0, 0.5 * full, full - span, 0.991 * full - span / 3):
            for nt in np.linspace(5, 10, 11):  # plotly wants 5..10 ticks, depending on the axis length
                labels = _auto_tick_labels(lo, lo + span, nt, ticks)
                assert len(set(labels)) == len(labels), (span, lo, nt, ticks, labels)
    assert plots.accuracy_tickformat(0.007) == {"tickformat": ".1%"}  # 99.1–99.8 %: one decimal
    assert plots.accuracy_tickformat(0.5) == {"tickformat": ".0%"}


def test_every_accuracy_axis_gets_distinct_ticks():
    narrow = [0.991, 0.993, 0.995, 0.998]
    fig = plots.training_figure(_curves(narrow))
    assert fig.layout.yaxis2.tickformat == ".1%"  # was ".0%": 99%, 99%, 99%
    lo, hi = fig.layout.yaxis2.range
    assert lo < min(narrow) and max(narrow) < hi <= 1

    cand = pd.DataFrame({"kind": ["front", "front", "suggested"], "widths": ["a:4", "a:6", "a:8"],
                         "size_bytes": [1000, 1500, 2000], "average_bits": [4.0, 6.0, 8.0],
                         "accuracy": [0.991, 0.995, 0.998], "pareto": [True, True, True]})
    fig = plots.pareto_figure(cand)
    assert fig.layout.yaxis.tickformat == ".1%"

    fig = plots.runs_pareto_figure(_runs([("a", 10.0, 99.1), ("b", 20.0, 99.8)], "size KB"), "size KB", "t")
    assert fig.layout.yaxis.tickformat == ".1f" and fig.layout.yaxis.ticksuffix == "%"


def test_training_figure_draws_reference_lines():
    curves = _curves([0.95, 0.97])
    assert not plots.training_figure(curves).layout.shapes  # no reference: as before
    fig = plots.training_figure(curves, reference={"FP32": 0.99, "PTQ": 0.9, "QAT": float("nan"), "x": None})
    lines = {s.y0: s for s in fig.layout.shapes}
    assert set(lines) == {0.99, 0.9}  # NaN / None are skipped
    assert all(s.line.dash == "dash" and s.yref == "y2" and s.y0 == s.y1 for s in lines.values())
    texts = [a.text for a in fig.layout.annotations if a.yref == "y2"]
    assert any(t.startswith("FP32") for t in texts) and any(t.startswith("PTQ") for t in texts)
    lo, hi = fig.layout.yaxis2.range
    assert lo < 0.9 and 0.99 < hi  # the lines are inside the accuracy plot
    empty = plots.training_figure(analysis.training_curves([]), reference={"FP32": 0.99})
    assert [s.y0 for s in empty.layout.shapes] == [0.99]  # drawn even before any step event
    with pytest.raises(ConfigError, match="fraction"):
        plots.training_figure(curves, reference={"FP32": 99.0})


def test_training_figure_text_does_not_overlap():
    fig = plots.training_figure(_curves([0.9, 0.95]))
    # the loss plot shares the step axis: no tick labels or title under it, where "test accuracy" sits
    assert fig.layout.xaxis.title.text is None and fig.layout.xaxis.showticklabels is False
    assert fig.layout.xaxis2.title.text
    plot_px = fig.layout.height - fig.layout.margin.t - fig.layout.margin.b
    title = next(a for a in fig.layout.annotations if a.text == "test accuracy")
    assert title.y == fig.layout.yaxis2.domain[1] and title.yanchor == "bottom"
    gap_px = (fig.layout.yaxis.domain[0] - fig.layout.yaxis2.domain[1]) * plot_px
    assert gap_px >= 1.5 * title.font.size  # room for the subplot title between the plots
    top = next(a for a in fig.layout.annotations if a.text == "training loss")
    assert top.y == 1 and fig.layout.margin.t >= 2 * top.font.size + 20  # figure title above it


def test_runs_pareto_axes_never_go_below_zero():
    one = plots.runs_pareto_figure(_runs([("a", 0.25, 98.0)]), "int8 latency ms", "latency")
    assert list(one.layout.xaxis.range) == pytest.approx([0, 0.3])
    same = plots.runs_pareto_figure(_runs([("a", 0.5, 98.0), ("b", 0.5, 97.0)]), "int8 latency ms", "latency")
    assert list(same.layout.xaxis.range) == pytest.approx([0, 0.6])
    many = plots.runs_pareto_figure(_runs([("a", 0.01, 98.0), ("b", 2.0, 99.0)]), "int8 latency ms", "latency")
    lo, hi = many.layout.xaxis.range
    assert lo == 0 and hi > 2.0
    y_lo, y_hi = one.layout.yaxis.range
    assert 0 <= y_lo < 98.0 < y_hi <= 100


def test_pareto_mask_drops_dominated_tied_and_nan_points():
    size = np.array([1.0, 2.0, 2.0, 3.0, 3.0, np.nan, 1.0, 3.0])
    acc = np.array([0.9, 0.95, 0.95, 0.94, 0.99, 0.99, np.nan, 0.97])
    # 3 is beaten by 1 (smaller, more accurate), 7 by 4 (same size, more accurate); 1 and 2 tie: both
    # stay; a NaN anywhere is never on the front and beats nothing (0 stays despite 6's smaller size)
    assert search.pareto_mask(size, acc).tolist() == [True, True, True, False, True, False, False, False]
    assert search.pareto_mask(np.array([]), np.array([])).tolist() == []


def test_runs_pareto_front_has_no_dominated_run():
    runs = _runs([("a", 10.0, 95.0), ("b", 10.0, 97.0), ("c", 20.0, 96.0), ("d", 30.0, 98.0), ("e", 5.0, np.nan)],
                 "size KB")
    fig = plots.runs_pareto_figure(runs, "size KB", "size")
    front = next(t for t in fig.data if t.name.startswith("Pareto front"))
    assert list(zip(front.x, front.y)) == [(10.0, 97.0), (30.0, 98.0)]  # a: as small as b but less accurate


def _sweep_like(n: int = 23) -> pd.DataFrame:
    """``n`` runs in clusters (widths 8/4/3/2, several learning rates and seeds), two at the same point."""
    rng = np.random.default_rng(0)
    rows = [{"run": f"r{i}", "plan": f"W{b}A8", "name": f"W{b}A8 · lr {1e-3 / (1 + i // 4):.0e} · seed {i % 3}",
             "QAT acc %": round(90 + b + rng.normal(0, 0.8), 2), "size KB": 3 * b + rng.normal(0, 0.3),
             "FP32 acc %": 98.9, "model": "digits-cnn"} for i, b in enumerate([8, 4, 3, 2] * (n // 4) + [8] * (n % 4))]
    return pd.DataFrame(rows[:-1] + [rows[0] | {"run": "twin"}])


def _label_boxes(fig: go.Figure) -> list[tuple[float, float, float, float]]:
    """Each number label's box in px on the plot area the labels are placed for (y up)."""
    (x0, x1), (y0, y1) = fig.layout.xaxis.range, fig.layout.yaxis.range
    width, height = plots.LABEL_PLOT_WIDTH_PX, fig.layout.height - fig.layout.margin.t - fig.layout.margin.b
    out = []
    for a in fig.layout.annotations:
        if a.xref != "x":
            continue  # the FP32 line's label
        dx, dy = (a.ax, -a.ay) if a.showarrow else (a.xshift, a.yshift)
        w, h = plots._label_box(a.text)
        cx, cy = (a.x - x0) / (x1 - x0) * width + dx, (a.y - y0) / (y1 - y0) * height + dy
        out.append((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
    return out


def test_runs_pareto_names_every_run_with_a_number_and_a_legend_entry():
    runs = _sweep_like()
    fig = plots.runs_pareto_figure(runs, "size KB", "size")
    points = [t for t in fig.data if t.mode == "markers"]
    assert len(points) == len(runs)  # every run: its own legend entry, named, with its accuracy and size
    ordered = runs.sort_values(["size KB", "QAT acc %"], ascending=[True, False])
    for i, (trace, (_, row)) in enumerate(zip(points, ordered.iterrows(), strict=True), start=1):
        assert trace.name.startswith(f"{i}. {row['name']} · {row['QAT acc %']:.2f}% · ")
        assert trace.name.endswith(f"{row['size KB']:,.1f} KB") and trace.customdata[0] == row["run"]
    numbers = [n for a in fig.layout.annotations if a.xref == "x" for n in a.text.split(",")]
    assert sorted(numbers, key=int) == [str(i) for i in range(1, len(runs) + 1)]  # each number on the chart once
    assert any("," in a.text for a in fig.layout.annotations)  # the twins share one label
    assert fig.layout.legend.orientation == "h" and fig.layout.legend.y < 0  # below the plot, not a third of it
    few = plots.runs_pareto_figure(_runs([("a", 10.0, 95.0), ("b", 20.0, 94.0)], "size KB"), "size KB", "size")
    assert few.layout.height < fig.layout.height  # the legend's rows add height; the plot keeps its own
    assert few.layout.height - few.layout.margin.t - few.layout.margin.b == \
        fig.layout.height - fig.layout.margin.t - fig.layout.margin.b


def test_runs_pareto_number_labels_do_not_overlap():
    fig = plots.runs_pareto_figure(_sweep_like(), "size KB", "size")
    boxes = _label_boxes(fig)
    r = plots.MARKER_RADIUS_PX
    (x0, x1), (y0, y1) = fig.layout.xaxis.range, fig.layout.yaxis.range
    height = fig.layout.height - fig.layout.margin.t - fig.layout.margin.b
    markers = [((x - x0) / (x1 - x0) * plots.LABEL_PLOT_WIDTH_PX, (y - y0) / (y1 - y0) * height)
               for t in fig.data if t.mode == "markers" for x, y in zip(t.x, t.y)]
    markers = [(x - r, y - r, x + r, y + r) for x, y in markers]

    def overlap(a, b):
        return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]

    for i, box in enumerate(boxes):
        assert not any(overlap(box, other) for other in boxes[i + 1:]), box
        assert not any(overlap(box, m) for m in markers), box
        assert -20 <= box[0] and box[2] <= plots.LABEL_PLOT_WIDTH_PX + 20 and -10 <= box[1] and box[3] <= height + 10


def test_runs_pareto_draws_the_fp32_reference_line():
    fig = plots.runs_pareto_figure(_sweep_like(), "size KB", "size")
    assert [s.y0 for s in fig.layout.shapes] == [98.9]
    assert any(a.text == "FP32 98.90%" for a in fig.layout.annotations)
    assert fig.layout.yaxis.range[1] > 98.9  # the line is on the plot
    two = _runs([("a", 10.0, 95.0), ("b", 20.0, 94.0)], "size KB").assign(**{"FP32 acc %": [96.0, 99.0],
                                                                            "model": ["cnn", "mlp"]})
    fig = plots.runs_pareto_figure(two, "size KB", "size")
    assert sorted(a.text for a in fig.layout.annotations if a.xref != "x") == ["FP32 cnn 96.00%", "FP32 mlp 99.00%"]


def _deep(layers: int = 150) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A per-layer error table and a sensitivity table of a ``layers``-layer network (mobilenet-like names)."""
    rng = np.random.default_rng(0)
    names = [f"features.{i // 5}.block.{i % 5}.{('conv', 'fc1', 'fc2', 'proj', 'dw')[i % 5]}" for i in range(layers)]
    errors = pd.DataFrame([{"stage": stage, "layer": name, "weight_sqnr_db": rng.uniform(10, 45),
                            "act_sqnr_db": rng.uniform(5, 40), "weight_bits": 8, "act_bits": 8}
                           for stage in ("ptq", "qat") for name in names])
    sens = pd.DataFrame([{"layer": name, "bits": bits, "loss_increase": rng.exponential(0.05),
                          "accuracy_drop": rng.exponential(0.01)} for name in names for bits in (4, 2)])
    return errors, sens


def test_per_layer_charts_give_each_of_150_layers_a_named_readable_row():
    errors, sens = _deep(150)
    for fig, bars in ((plots.sqnr_figure(errors), 2), (plots.sensitivity_figure(sens), 2)):
        axis = fig.layout.yaxis
        assert all(t.orientation == "h" for t in fig.data)  # layer names on the side, never rotated under bars
        assert len(axis.tickvals) == 150 and axis.tickfont.size >= 10 and axis.automargin
        plot_px = fig.layout.height - fig.layout.margin.t - fig.layout.margin.b
        assert plot_px / 150 >= max(plots.LAYER_ROW_PX, plots.BAR_PX * bars)  # rows do not shrink with the count
        assert fig.layout.legend.orientation == "h"
    short = plots.sqnr_figure(_deep(6)[0])
    assert 300 <= short.layout.height < 600  # a small network keeps a small chart
    top = plots.sensitivity_figure(sens, top=30)
    assert len(top.layout.yaxis.tickvals) == 30 and "the 30 most sensitive of 150 layers" in top.layout.title.subtitle.text
    most = sens.groupby("layer")["loss_increase"].max().sort_values(ascending=False).index[:30]
    assert list(top.layout.yaxis.tickvals) == list(most)
    with pytest.raises(ConfigError, match="top must be at least 1"):
        plots.sensitivity_figure(sens, top=0)


def test_histogram_counts_tick_at_whole_numbers_and_clipping_is_explained(loaded):
    hists = analysis.weight_histograms(loaded, "conv1.conv", bins=512)  # 144 weights: a few a bin at most
    fig = plots.histogram_figure(hists)
    most = max(int(h.counts.max()) for h in hists)
    assert most <= 4  # where plotly ticks 0, 0.5, 1, … by itself
    assert fig.layout.yaxis.dtick == 1 and fig.layout.yaxis.tickformat == ",d" and fig.layout.yaxis.rangemode == "tozero"
    assert all(float(c).is_integer() for t in fig.data if t.line.shape == "hvh" for c in t.y)
    assert plots.count_dtick(7) == 2 and plots.count_dtick(254_832) == 100_000 and plots.count_dtick(0) == 1
    after = hists[-1]
    share = plots.share_text(after.share_clipped)
    assert any(t.name == f"after fine-tune (QAT): {share} clipped" for t in fig.data)
    assert (f"after fine-tune (QAT): {after.clipped:,} of {after.total:,} weights ({share}) beyond their channel's "
            "clip range") in fig.layout.title.subtitle.text
    acts = analysis.activation_histograms(loaded, "conv3.conv")
    text = plots.histogram_figure(acts).layout.title.subtitle.text
    assert f"values seen on the calibration batches ({plots.share_text(acts[-1].share_clipped)}) beyond the clip range [" \
        in text
    assert [plots.share_text(v) for v in (0, 1e-7, 0.097222, 0.000433, 1)] == ["0%", "<0.001%", "9.72%", "0.0433%",
                                                                               "100%"]
