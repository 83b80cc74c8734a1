"""Figures are built from the analysis tables and carry titles, axis units and hover text."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

from qat_core import analysis, plots, runner
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
    assert "network output vs FP32" in fig.layout.title.text
    assert fig.layout.yaxis.title.text == "SQNR (dB, higher is better)"
    assert {t.name for t in fig.data} == {"before fine-tune (PTQ)", "after fine-tune (QAT)"}
    assert all("dB" in t.hovertemplate for t in fig.data)

    sens = analysis.sensitivity(loaded, bits=(4, 2))
    fig = plots.sensitivity_figure(sens)
    _titled(fig)
    assert [t.name for t in fig.data] == ["4-bit", "2-bit"]
    top = sens[sens["bits"] == 2].sort_values("rank").iloc[0]["layer"]
    assert fig.data[1].y[-1] == top  # horizontal bars: the most sensitive on top
    assert plots.sensitivity_figure(sens, "accuracy_drop").layout.xaxis.tickformat == ".1%"

    sug = analysis.suggest_plan(loaded, sens, average_bits=4, measure=1, top=1)
    fig = plots.pareto_figure(sug.candidates)
    _titled(fig)
    assert {"Pareto front", "suggested", "uniform"} <= {t.name for t in fig.data}

    curves = analysis.training_curves(workspace.events(digits_run))
    assert set(curves["phase"]) >= {"qat"} and curves["loss"].notna().all()
    fig = plots.training_figure(curves)
    assert fig.layout.title.text.startswith("Training curves")
    assert fig.layout.yaxis.title.text == "cross-entropy (nats)" and fig.layout.yaxis2.tickformat == ".0%"
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
