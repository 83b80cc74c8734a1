"""Model page (FP32 size as the Plan page counts it, a layer table for people, a baseline that trains fast with
stages) and the progress of Inspect's plan suggestion (search.suggest_plan's callback)."""

from __future__ import annotations

import io
import time

import pandas as pd
import pytest
import torch

from qat_core import report, runner, search, summary, train
from tests import apptest
from tests.apptest import AppTest, common, ok

MISSING = {"None", "nan", "NaN", "<NA>", "NaT"}


@pytest.fixture(autouse=True)
def _workspace(workspace, monkeypatch):
    """The pages use the tests' session workspace unless a test sets another."""
    monkeypatch.setenv("QAT_STUDIO_HOME", str(workspace.root))


def app(page: str | None = None) -> AppTest:
    return apptest.app(page, timeout=120)  # a baseline trains inside one of these runs


def metric(at: AppTest, label: str):
    found = [m for m in at.metric if m.label == label]
    assert len(found) == 1, [m.label for m in at.metric]
    return found[0]


def shown_table(el) -> pd.DataFrame:
    """A st.dataframe's shown columns, in their order, under their labels. The browser prints a missing cell
    as "None" even where a Styler formats it, so the data itself must hold what is shown."""
    proto = el.proto
    config = pd.read_json(io.StringIO(proto.columns), typ="series").to_dict() if proto.columns else {}
    order = list(proto.column_order) or list(el.value.columns)
    return el.value[order].rename(columns={c: config.get(c, {}).get("label", c) for c in order})


# --- the Model page -----------------------------------------------------------------------------
def test_model_page_fp32_size_is_the_plan_pages(workspace):
    at = ok(app("model"))
    rows = common.model_info("digits-cnn")["rows"]
    config = workspace.load_draft(at.query_params[common.DRAFT_PARAM])
    draft = report.draft_size(workspace, config, rows)  # predicted, or an exported run's file of the same plan
    size = metric(at, f"FP32 size ({draft.fp32_label})")
    assert size.value == summary.size_text(draft.fp32_bytes)
    params = int(metric(at, "Parameters").value.replace(",", ""))
    assert size.value != summary.size_text(params * 4)  # digits-cnn has BatchNorm: params × 4 is more
    assert "BatchNorm" in size.help and "Plan page" in size.help
    at.switch_page(common.PAGES["plan"]).run()
    ok(at)
    assert metric(at, f"FP32 size ({draft.fp32_label})").value == size.value


def test_model_page_layer_table_has_human_headers_and_no_missing_markers():
    at = ok(app("model"))
    for model in ("digits-cnn", "digits-mlp"):
        if at.selectbox(key="zoo_model").value != model:
            at.selectbox(key="zoo_model").select(model).run()
            ok(at)
        table = shown_table(at.dataframe[0])
        headers = list(table.columns)
        assert headers[:3] == ["Layer", "Kind", "Parameters"], headers
        assert not any("_" in h or h.islower() for h in headers), headers  # no raw field names
        assert not {"has_weights", "is_output", "Has weights", "Is output"} & set(headers)
        assert not table.isna().to_numpy().any(), table
        cells = {str(v) for v in table.to_numpy().ravel()}
        assert not cells & MISSING, cells & MISSING
        assert table.set_index("Layer").loc["input", "Output channels"] == "—"  # no weights: no channels
        assert at.dataframe[0].value["name"].iloc[0] == "input"  # the data keeps its field names


def test_baseline_button_trains_with_one_thread_and_throttled_stages(tmp_path, monkeypatch):
    monkeypatch.setenv("QAT_STUDIO_HOME", str(tmp_path))  # empty: no cached baseline
    import streamlit as st
    from streamlit.delta_generator import DeltaGenerator

    updates: list[tuple[float, float, str]] = []
    threads: list[int] = []
    update, start, fit = DeltaGenerator.progress, st.progress, train.train_fp32

    def recorded(self, value, text=None, **kwargs):
        updates.append((time.monotonic(), value, text or ""))
        return update(self, value, text=text, **kwargs)

    def recorded_start(value, text=None, **kwargs):
        updates.append((time.monotonic(), value, text or ""))
        return start(value, text=text, **kwargs)

    def counted(*args, **kwargs):
        threads.append(torch.get_num_threads())
        return fit(*args, **kwargs)

    monkeypatch.setattr(DeltaGenerator, "progress", recorded)
    monkeypatch.setattr(st, "progress", recorded_start)
    monkeypatch.setattr(train, "train_fp32", counted)
    at = ok(app("model"))
    next(n for n in at.number_input if n.label == "Baseline epochs").set_value(3).run()  # short: 36 steps
    ok(at)
    assert not at.success
    before = torch.get_num_threads()
    at.button(key="train_baseline").click().run()
    ok(at)
    assert [s.value for s in at.success if "FP32 baseline ready: test accuracy" in s.value]
    assert threads == [1] and torch.get_num_threads() == before  # trained with one thread, then restored
    texts = [t for _, _, t in updates]
    assert "loading the data" in texts[0]
    steps = [(t, v) for t, v, text in updates if "training: step" in text]
    assert steps and "evaluating" in texts[-2] and texts[-1] == "Done", texts
    assert [v for _, v in steps] == sorted(v for _, v in steps)
    gaps = [b[0] - a[0] for a, b in zip(steps, steps[1:])]
    assert all(g >= 0.19 for g in gaps), gaps  # at most ~5 updates a second
    assert len(steps) < 36


# --- Inspect: the suggestion's progress -----------------------------------------------------------
def test_suggest_plan_reports_each_candidate_and_otherwise_is_unchanged(workspace, digits_run):
    torch.set_num_threads(1)
    loaded = runner.load(workspace, digits_run)
    sens = search.sensitivity(loaded, bits=(4, 2), batches=2)
    events: list[dict] = []
    sug = search.suggest_plan(loaded, sens, average_bits=3.0, measure=2, top=2, batches=2,
                                on_progress=events.append)
    assert events and {e["task"] for e in events} == {"suggestion"}
    total = events[0]["total"]
    assert total == len(sug.candidates)  # one event per distinct plan measured
    assert [e["done"] for e in events] == list(range(total + 1))
    assert all(e["total"] == total for e in events)
    for e in events[:-1]:
        assert e["candidate"] in {"fits", "front"} or e["candidate"].startswith("uniform")
        assert e["widths"].count(":") == len(sug.widths)
    plain = search.suggest_plan(loaded, sens, average_bits=3.0, measure=2, top=2, batches=2)
    assert plain.widths == sug.widths and plain.plan == sug.plan
    pd.testing.assert_frame_equal(plain.candidates, sug.candidates)


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_table_path_that_is_not_a_file_is_a_message_not_a_blocked_session(tmp_path, fifo, kind):
    path = tmp_path / "table.csv"
    if kind == "fifo":
        fifo(path)
    else:
        path.mkdir()
    at = apptest.app("model", timeout=30)  # pandas reading a FIFO waited for a writer: the run timed out
    at.selectbox(key="zoo_model").select("table-mlp").run()
    at.text_input(key="data_path").input(str(path)).run(timeout=30)
    ok(at)
    assert any("table.csv is not a regular file" in e.value or "table.csv is a directory" in e.value
               for e in at.error), [e.value for e in at.error]


def test_an_hf_folder_without_its_config_is_a_message_not_a_traceback(tmp_path):
    folder = tmp_path / "not-saved"  # a folder, but not one save_pretrained wrote
    folder.mkdir()
    at = apptest.app("model", timeout=60)
    at.radio(key="model_source").set_value("By name or path").run()
    at.text_input(key="plugin_path").input(f"hf:{folder}").run(timeout=60)
    ok(at)  # Streamlit's own error box (an exception) was shown here
    assert any("no config.json" in e.value for e in at.error), [e.value for e in at.error]
