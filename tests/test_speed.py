"""Long work says how long it has left, and the slow parts do bounded work: the report measures each
layer once a run, analysis runs on one torch thread, the estimate counts what a run does."""

from __future__ import annotations

import os

import pandas as pd
import pytest
import torch

from qat_core import analysis, progress, report, runner, search, sweep, train
from tests.conftest import quick_config


@pytest.fixture
def loaded(workspace, digits_run):
    return runner.load(workspace, digits_run)


def _count_forwards(*models: torch.nn.Module) -> tuple[list[int], list]:
    counts, handles = [0] * len(models), []
    for i, model in enumerate(models):
        def hook(module, inputs, output, i=i):
            counts[i] += 1
        handles.append(model.register_forward_hook(hook))
    return counts, handles


def test_the_report_measures_every_layer_once_a_run_with_the_same_numbers(workspace, digits_run, loaded):
    saved = workspace.run_dir(digits_run) / "results" / f"{analysis.ERRORS_RESULT}.json"
    saved.unlink(missing_ok=True)
    expected = {stage: analysis.error_table(loaded, stage) for stage in analysis.STAGES}
    test_batches = len(loaded.data.test_loader())
    counts, handles = _count_forwards(loaded.fp32, loaded.ptq, loaded.qat)
    try:
        report.report_html(workspace, digits_run, loaded)
        fp32_passes = counts[0]
        counts[:] = [0, 0, 0]
        second = report.report_html(workspace, digits_run, loaded)
        again = counts[:]
    finally:
        for h in handles:
            h.remove()
    assert fp32_passes == test_batches  # the FP32 logits once for both stages (they were predicted twice)
    assert again == [0, 0, 0] and len(second) > 0  # saved with the run: nothing is run again
    tables = analysis.run_error_tables(workspace, digits_run)
    for stage in analysis.STAGES:  # the same numbers, to the last bit, as measured directly
        pd.testing.assert_frame_equal(tables[stage], expected[stage])
        assert tables[stage].attrs == expected[stage].attrs


def test_saved_error_tables_are_measured_again_when_the_weights_change(workspace, digits_run, loaded):
    analysis.run_error_tables(workspace, digits_run, loaded)
    weights = workspace.artifact(digits_run, "qat.pt")
    info = weights.stat()
    os.utime(weights, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000))  # as if written again
    counts, handles = _count_forwards(loaded.qat)
    try:
        analysis.run_error_tables(workspace, digits_run, loaded)
    finally:
        handles[0].remove()
    assert counts[0] > 0


def test_analysis_runs_on_one_thread_and_says_how_long_it_has_left(loaded):
    threads, payloads = [], []

    def on_progress(p):
        threads.append(torch.get_num_threads())
        payloads.append(p)

    before = torch.get_num_threads()
    torch.set_num_threads(2)  # torch's default on 2 cores: each op waits for a descheduled thread
    try:
        search.sensitivity(loaded, [4], on_progress=on_progress)
        assert torch.get_num_threads() == 2  # restored for the caller
    finally:
        torch.set_num_threads(before)
    assert set(threads) == {1}
    assert all("seconds_left" in p and "elapsed" in p for p in payloads)
    assert payloads[0]["seconds_left"] is None  # nothing timed yet: no guess
    assert all(p["seconds_left"] is not None and p["seconds_left"] >= 0 for p in payloads[1:])
    assert payloads[-1]["done"] == payloads[-1]["total"] and payloads[-1]["seconds_left"] == 0


def test_suggestion_progress_has_time_left(loaded):
    sens = search.sensitivity(loaded, [8, 4])
    payloads = []
    search.suggest_plan(loaded, sens, average_bits=6.0, measure=2, on_progress=payloads.append)
    assert len(payloads) >= 2 and all("seconds_left" in p for p in payloads)
    assert payloads[-1]["seconds_left"] == 0


def test_time_left_from_recorded_step_events_excludes_the_first_step():
    events = [{"phase": "fp32", "done": True, "test_accuracy": 0.9},
              {"phase": "qat", "step": 1, "total": 10, "loss": 1.0, "elapsed": 2.0},  # warm-up: slow
              {"phase": "qat", "step": 2, "total": 10, "loss": 0.9, "elapsed": 2.5},
              {"phase": "qat", "step": 3, "total": 10, "loss": 0.8, "elapsed": 3.0}]
    assert progress.step_seconds_left(events) == pytest.approx(0.5 * 7)
    frac, text = progress.run_progress(events)
    assert frac == pytest.approx(0.5 + 0.5 * 0.3)
    assert "step 3/10" in text and "about 3.5 s left" in text
    assert progress.step_seconds_left(events[:2]) == pytest.approx(2.0 * 9)  # one step: its own pace


def test_a_real_runs_events_give_the_fine_tune_time_left(workspace, digits_run):
    events = workspace.events(digits_run)
    qat = [e for e in events if e.get("phase") == "qat" and "step" in e]
    midway = events[:events.index(qat[len(qat) // 2]) + 1]
    left = progress.step_seconds_left(midway)
    assert left is not None and left > 0
    assert "left in this stage" in progress.run_progress(midway)[1]


def test_sweep_progress_moves_with_running_runs_and_says_what_it_prepares(workspace):
    share, left = progress.runs_progress(4, 1, [0.5], elapsed=30.0)
    assert share == pytest.approx(1.5 / 4) and left == pytest.approx(30.0 / 0.375 * 0.625)
    assert progress.runs_progress(4, 0, [], elapsed=5.0) == (0.0, None)
    frac, text = sweep.progress_of(workspace, {"state": "preparing", "total": 4, "message":
                                               "measuring each layer's sensitivity at [4] bits: 3 of 8 · about 5 s "
                                               "left"}, None)
    assert frac == 0 and "sensitivity" in text and "about 5 s left" in text


def test_the_estimate_counts_the_evaluations_the_run_makes(workspace, digits_run):
    config = quick_config()
    events = workspace.events(digits_run)
    for phase, every in (("qat", config.finetune.eval_every_epochs),
                         ("fp32", train.baseline_eval_every(config.baseline.epochs))):
        steps = [e for e in events if e.get("phase") == phase and "step" in e]
        if not steps:  # the baseline was cached by an earlier run of the session
            continue
        per_epoch = round(steps[-1]["step"] / steps[-1]["epoch"])
        evaluated = [e["step"] for e in steps if "test_accuracy" in e]
        assert train.evaluation_steps(steps[-1]["total"], per_epoch, every) == evaluated
    per_step = {"baseline": 0.01, "finetune": 0.02, "calibration": 0.05, "train_samples": 1347, "fp32_eval": 0.1,
                "quantized_eval": 0.4, "bn_batch": 0.005, "build": 0.2, "prepare": 0.3, "startup": 3.0}
    est = runner.time_estimate(config, per_step)
    parts = ["baseline_total", "baseline_evaluation", "calibration_total", "finetune_total", "quantized_evaluation",
             "overhead"]
    assert est["run_total"] == pytest.approx(sum(est[p] for p in parts))
    assert est["overhead"] == pytest.approx(3.5) and est["baseline_evaluation"] > 0 and est["quantized_evaluation"] > 0
    cached = runner.time_estimate(config, per_step, train_baseline=False)
    assert cached["run_total"] == pytest.approx(est["run_total"] - est["baseline_total"] - est["baseline_evaluation"])


def test_a_damaged_saved_error_table_is_measured_again_not_an_error(workspace, digits_run, loaded):
    saved = workspace.run_dir(digits_run) / "results" / f"{analysis.ERRORS_RESULT}.json"
    saved.write_text('{"key": 3}')
    tables = analysis.run_error_tables(workspace, digits_run, loaded)
    assert set(tables) == set(analysis.STAGES) and "(network)" in set(tables["qat"]["layer"])
    assert analysis.run_error_tables(workspace, digits_run)["qat"].equals(tables["qat"])  # and saved again


def test_a_runs_calibration_says_its_batch_and_time_left(workspace):
    run_id = runner.execute(quick_config(epochs=1), workspace)  # a new run: the fixtures' may predate the events
    events = workspace.events(run_id)
    calibration = [e for e in events if "calibrated" in e]
    assert [e["calibrated"] for e in calibration] == list(range(1, calibration[0]["of"] + 1))
    midway = events[:events.index(calibration[2]) + 1]
    frac, text = progress.run_progress(midway)
    assert 0.4 < frac < 0.45 and f"calibrating (PTQ): batch 3 of {calibration[0]['of']}" in text and "left" in text
    assert not analysis.training_curves(events).empty and "calibrated" not in analysis.training_curves(events)
