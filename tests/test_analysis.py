"""Analysis: exact numerics on known signals, then the tables on real digits runs."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from qat_core import analysis, cli, report, runner, search
from qat_core.config import RunConfig
from qat_core.errors import CancelledError, ConfigError, StoreError
from qat_core.prepare import size_bytes
from qat_core.quantizers import FakeQuantizer
from tests.conftest import quick_config


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small tensors: one thread is faster, and stays fast when other jobs share the machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def loaded(workspace, digits_run):
    return runner.load(workspace, digits_run)


def _quantizer(bits: int, scale: float, signed: bool = True, channels: int = 1, axis: int | None = None):
    q = FakeQuantizer(bits, signed=signed, symmetric=True, method="minmax", channels=channels, axis=axis)
    q.scale.fill_(scale)
    return q.eval()


def _stream(q: FakeQuantizer, x: torch.Tensor, chunk: int = 10_000) -> analysis.ActivationStats:
    lo, hi = analysis.clip_range(q)
    st = analysis.ActivationStats("t", q, analysis.StreamingHistogram(float(lo[0]), float(hi[0]), 64))
    for part in x.split(chunk):
        st.update(part, q(part))
    return st


# --- closed forms ----------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 4, 8])
def test_sqnr_of_full_scale_signals_matches_closed_form(bits):
    # a b-bit signed grid of step s has 2^b rounding cells covering [-A - s/2, A - s/2), A = s·2^(b-1).
    # A signal filling them has a rounding error uniform on ±s/2 (power s²/12). Full-scale uniform
    # signal: power (2A)²/12 (+ the cells' offset (s/2)²) → 6.02·b dB; full-scale sine: A²/2 → 6.02·b + 1.76 dB
    amplitude = 1.0
    step = amplitude / 2 ** (bits - 1)
    q = _quantizer(bits, step)
    g = torch.Generator().manual_seed(bits)
    uniform = (torch.rand(400_000, generator=g, dtype=torch.float64) * 2 * amplitude - amplitude - step / 2).float()
    st = _stream(q, uniform)
    noise = step**2 / 12
    assert st.sqnr_db == pytest.approx(10 * math.log10((amplitude**2 / 3 + step**2 / 4) / noise), abs=0.05)
    phase = torch.rand(400_000, generator=g, dtype=torch.float64) * 2 * math.pi
    sine = (amplitude * (1 - 1e-6) * torch.sin(phase) - step / 2).float()  # the top cell edge rounds up
    st_sine = _stream(q, sine)
    if bits == 8:  # the sine's error is uniform only approximately (it dwells at its peaks): many cells needed
        assert st_sine.sqnr_db == pytest.approx(10 * math.log10((amplitude**2 / 2 + step**2 / 4) / noise), abs=0.2)
    assert st.clipped == st_sine.clipped == 0  # full scale, nothing saturates
    if bits == 8:  # the textbook forms, where the offset is negligible
        assert st.sqnr_db == pytest.approx(6.02 * bits, abs=0.05)
        assert st_sine.sqnr_db == pytest.approx(6.02 * bits + 1.76, abs=0.2)


def test_clipped_share_is_exact_with_planted_outliers():
    q = _quantizer(4, 0.125)  # grid ends -1.0 and 0.875: codes saturate below -1.0625 and above 0.9375
    x = torch.rand(50_000, generator=torch.Generator().manual_seed(0)) * 1.8 - 0.9  # inside [-0.9, 0.9)
    planted = torch.tensor([-1.07, -7.0, 0.95, 3.0, 100.0])
    x[torch.arange(5) * 997] = planted
    x[1] = 0.93  # beyond the grid end but rounds onto it: not clipped
    st = _stream(q, x, chunk=7_000)
    assert st.clipped == 5
    hist = st.to_histogram()
    assert hist.share_clipped == 5 / 50_000
    assert hist.total == 50_000
    # per channel: each channel has its own clip range
    qc = _quantizer(8, 0.01, channels=3, axis=0)
    qc.scale.copy_(torch.tensor([0.01, 0.02, 0.04]))
    w = torch.zeros(3, 100)
    w[0, :4] = 1.5  # beyond channel 0's 1.27 end, inside the others'
    w[1, :4] = 1.5
    w[2, 0] = -5.2  # beyond channel 2's -5.12
    assert analysis.count_clipped(w, qc) == 5


def test_streaming_histogram_counts_every_value_and_bins_exactly():
    g = torch.Generator().manual_seed(3)
    h = analysis.StreamingHistogram(-1.0, 1.0, bins=128)
    chunks = [torch.randint(-2**10, 2**10, (5_000,), generator=g) / 2**10 * scale for scale in (1, 3, 40, 0.5)]
    chunks.append(torch.tensor([float("nan"), float("inf"), 2.0]))
    for c in chunks:
        h.add(c)
    values = torch.cat(chunks)
    finite = values[torch.isfinite(values)]
    assert h.total == finite.numel() and h.nonfinite == 2
    assert h.lo <= float(finite.min()) and h.hi > float(finite.max())
    assert h.counts.numel() == 128  # fixed memory, whatever the range grew to
    # the merged counts equal a direct histogram of everything on the final edges (dyadic data: exact)
    direct = torch.histc(finite.double(), bins=128, min=h.lo, max=h.hi)
    idx = ((finite.double() - h.lo) / h.width).floor().long()
    direct = torch.bincount(idx, minlength=128)
    assert torch.equal(h.counts, direct)


# --- real runs -------------------------------------------------------------------------------

def test_histograms_of_a_real_run(loaded):
    for layer in analysis.weight_layers(loaded.qat):
        ptq, qat = analysis.weight_histograms(loaded, layer, bins=64)
        numel = loaded.qat.layer(layer).folded()[0].numel()
        assert ptq.total == qat.total == numel == int(ptq.counts.sum()) + ptq.below + ptq.above
        assert np.array_equal(ptq.edges, qat.edges)  # shared bins, so the stages compare
        assert qat.bits == 8 and qat.clip_lo < 0 < qat.clip_hi and len(qat.grid) == 256
        assert qat.channels is not None and len(qat.channels) == loaded.qat.layer(layer).weight_quant.scale.numel()
        assert qat.clipped == int(qat.channels["clipped"].sum())
    batches = analysis.calibration_batches(loaded)
    samples = sum(len(x) for x, _ in batches)
    for layer in analysis.activation_layers(loaded.qat):
        ptq, qat = analysis.activation_histograms(loaded, layer)
        assert ptq.total == qat.total == int(qat.counts.sum())
    ptq, qat = analysis.activation_histograms(loaded, "input")
    assert qat.total == samples * 64  # 8×8 images
    assert len(analysis.capture_activations(loaded.qat, batches)) == len(analysis.activation_layers(loaded.qat))


def test_error_table_on_real_runs(workspace, loaded, digits_run_w4a4):
    table = analysis.error_table(loaded, "qat")
    layers = [r["name"] for r in loaded.qat.layers]
    assert table["layer"].tolist() == [*layers, "(network)"]
    weights = table[table["layer"].isin(analysis.weight_layers(loaded.qat))]
    assert (weights["weight_bits"] == 8).all() and weights["weight_sqnr_db"].notna().all()
    assert (weights["granularity"] == "per_channel").all()
    acts = table[table["layer"].isin(analysis.activation_layers(loaded.qat))]
    assert (acts["act_sqnr_db"] > 30).all() and acts["act_share_clipped"].between(0, 1).all()
    net = table.iloc[-1]
    assert net["size_bytes"] == pytest.approx(table["size_bytes"].iloc[:-1].sum())
    assert net["size_bytes"] == size_bytes(loaded.qat.layers, loaded.config.plan)["quantized_bytes"]
    assert net["output_sqnr_db"] == table.attrs["output_sqnr_db"] > 10
    csv = analysis.to_csv(table)
    assert pd.read_csv(__import__("io").StringIO(csv)).shape == table.shape
    w4 = analysis.error_table(runner.load(workspace, digits_run_w4a4), "ptq")
    inner = ["conv2.conv", "conv3.conv"]  # the ends stay at 8 bits
    assert (w4.set_index("layer").loc[inner, "weight_bits"] == 4).all()
    assert (w4.set_index("layer").loc[inner, "act_bits"] == 4).all()


def test_sensitivity_ranks_layers_with_progress_and_cancel(loaded):
    events = []
    sens = search.sensitivity(loaded, bits=(4, 2), on_progress=events.append)
    names = analysis.weight_layers(loaded.qat)
    assert len(sens) == 2 * len(names)
    for _, part in sens.groupby("bits"):
        assert sorted(part["rank"]) == list(range(1, len(names) + 1))
        assert part.sort_values("rank")["loss_increase"].is_monotonic_decreasing
    two = sens[sens["bits"] == 2].set_index("layer")
    four = sens[sens["bits"] == 4].set_index("layer")
    assert two["loss_increase"].max() > four["loss_increase"].max()  # fewer bits hurt more
    assert sens.attrs["baseline_accuracy"] > 0.95
    assert [e["done"] for e in events] == list(range(len(sens) + 1))

    class CancelAfter:
        def __init__(self, n):
            self.calls, self.n = 0, n

        def is_set(self):
            self.calls += 1
            return self.calls > self.n

    with pytest.raises(CancelledError, match="sensitivity cancelled"):
        search.sensitivity(loaded, bits=(4,), cancel=CancelAfter(3))
    both = search.sensitivity(loaded, bits=(2,), include_activations=True)  # outputs quantized too
    assert {"input", "gap"} <= set(both["layer"]) and "fc" in set(both["layer"])


def test_suggestion_respects_budget_and_runs_as_a_normal_run(workspace, loaded, monkeypatch):
    sens = search.sensitivity(loaded, bits=(4, 3, 2))
    sug = search.suggest_plan(loaded, sens, average_bits=3.0, measure=1, top=2)
    assert sug.average_bits <= 3.0 + 1e-9
    assert set(sug.widths) == set(analysis.weight_layers(loaded.qat))
    config = loaded.config.model_copy(update={"plan": sug.plan})
    assert RunConfig.model_validate(config.to_dict()).plan == sug.plan  # RunConfig takes it as is
    assert sug.size_bytes == size_bytes(loaded.qat.layers, sug.plan)["quantized_bytes"]
    assert sug.candidates["pareto"].any() and (sug.candidates["kind"] == "suggested").sum() == 1
    budget = 0.6 * size_bytes(loaded.qat.layers, loaded.config.plan)["quantized_bytes"]
    by_bytes = search.suggest_plan(loaded, sens, budget_bytes=budget, measure=0, top=1)
    assert by_bytes.size_bytes <= budget
    monkeypatch.setattr(search, "EXHAUSTIVE_LIMIT", 1)  # many layers: the greedy path
    greedy = search.suggest_plan(loaded, sens, budget_bytes=budget, measure=0, top=1)
    assert greedy.size_bytes <= budget
    # the suggestion fine-tunes as a normal run
    short = quick_config().model_copy(update={"plan": sug.plan})
    short = short.model_copy(update={"finetune": short.finetune.model_copy(update={"max_steps": 5})})
    run_id = runner.execute(short, workspace)
    assert workspace.get(run_id)["status"] == "done"
    assert runner.load(workspace, run_id).qat.layer("conv3.conv").weight_quant.bits == sug.widths["conv3.conv"]


# --- bad inputs ------------------------------------------------------------------------------

def test_unknown_or_unsuitable_layers_list_the_real_names(loaded):
    with pytest.raises(ConfigError, match=r"'conv9' does not exist.*input, conv1\.conv, conv2\.conv"):
        analysis.weight_histogram(loaded.qat, "conv9")
    with pytest.raises(ConfigError, match=r"'gap' \(AdaptiveAvgPool2d\) has no weights.*conv1\.conv"):
        analysis.weight_histogram(loaded.qat, "gap")
    with pytest.raises(ConfigError, match=r"'fc' has no activation quantizer.*input, conv1\.conv"):
        analysis.activation_histograms(loaded, "fc")
    with pytest.raises(ConfigError, match=r"'nope' do not exist or have no weights; choose from: conv1\.conv"):
        search.sensitivity(loaded, bits=(4,), layers=["nope"])
    with pytest.raises(ConfigError, match="from 2 to 8"):
        search.sensitivity(loaded, bits=(1,))
    with pytest.raises(ConfigError, match="stage must be one of ptq, qat"):
        analysis.error_table(loaded, "fp16")


def test_budget_below_the_smallest_model_says_how_small_it_can_go(loaded):
    sens = search.sensitivity(loaded, bits=(4, 2))
    with pytest.raises(ConfigError, match=r"average of 1.5 weight bits is below the smallest possible model \(2 bits"):
        search.suggest_plan(loaded, sens, average_bits=1.5)
    with pytest.raises(ConfigError, match=r"budget of 1,000 bytes is below the smallest possible model \([\d,]+ bytes"):
        search.suggest_plan(loaded, sens, budget_bytes=1000)
    with pytest.raises(ConfigError, match="exactly one budget"):
        search.suggest_plan(loaded, sens)
    with pytest.raises(ConfigError, match="lacks layer"):
        search.suggest_plan(loaded, sens[sens["layer"] != "fc"], average_bits=4)


def test_runs_without_a_model_are_refused(workspace):
    failed = workspace.create_run(quick_config())
    workspace.fail(failed, "training diverged at step 3")
    with pytest.raises(StoreError, match=r"is failed: training diverged.*only finished runs have a model"):
        report.analyze_run(workspace, failed)
    with pytest.raises(StoreError, match="no run 'missing-run'"):
        report.analyze_run(workspace, "missing-run")


def test_cli_analyze_writes_tables_and_figures(workspace, digits_run, capsys):
    code = cli.main(["--workspace", str(workspace.root), "analyze", digits_run, "--bits", "4", "--budget-bits", "5",
                     "--quiet"])
    assert code == 0
    paths = capsys.readouterr().out.split()
    folder = workspace.run_dir(digits_run) / report.ANALYSIS_DIR
    names = {p.rsplit("/", 1)[-1] for p in paths}
    assert {"errors.csv", "histograms.csv", "sensitivity.csv", "suggestion.csv", "sqnr.html", "weights.html",
            "activations.html", "training.html", "pareto.html", "plotly.min.js"} <= names
    errors = pd.read_csv(folder / "errors.csv")
    assert set(errors["stage"]) == {"ptq", "qat"}
    assert 'src="plotly.min.js"' in (folder / "sqnr.html").read_text()
    assert workspace.read_result(digits_run, "analysis")["output_sqnr_db"]["qat"] > 10
    assert cli.main(["--workspace", str(workspace.root), "analyze", "no-such-run"]) == cli.EXIT_USER_ERROR
