"""The Sweep page, headless: a sweep started from the page runs in its own process, the table and the
Pareto charts fill in, Cancel stops it, Resume finishes it; impossible settings are refused beside them."""

from __future__ import annotations

import json
import os
import time

import pytest

from qat_core import report, sweep
from qat_core.store import RunStore
from tests.apptest import ROOT, AppTest, common, ok
from tests.conftest import small_base


@pytest.fixture()
def store(tmp_path, monkeypatch) -> RunStore:
    monkeypatch.setenv("QAT_STUDIO_HOME", str(tmp_path))
    store = RunStore(tmp_path)
    store.save_draft("sweepdraft", small_base())  # digits-mlp, short training: a run takes seconds
    return store


def sweep_page() -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.query_params[common.DRAFT_PARAM] = "sweepdraft"
    at.switch_page(common.PAGES["sweep"])
    return ok(at.run())


def wait_for(check, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_impossible_settings_are_refused_beside_the_controls(store, monkeypatch):
    monkeypatch.setattr(sweep.cpu, "cores", lambda: 2)
    at = sweep_page()
    assert any("No sweeps yet" in i.value for i in at.info)
    at.number_input(key="sw_workers").set_value(2)
    at.number_input(key="sw_threads").set_value(2).run()
    assert any("2 workers × 2 threads is more than this machine's 2 cores" in e.value for e in at.error)
    assert at.button(key="sw_start").disabled
    at.number_input(key="sw_threads").set_value(0)
    at.text_input(key="sw_name").set_value("Not A Name").run()
    assert any("Sweep name**: use 1 to 40 lower-case letters" in e.value for e in at.error)
    at.text_input(key="sw_name").set_value("ok").run()
    assert not at.error and not at.button(key="sw_start").disabled
    caption = next(c.value for c in at.caption if "runs**" in c.value)
    assert caption.startswith("**5 runs**, 2 at a time × 1 thread")  # 4 widths and the suggestion at 3 bits


def test_a_sweep_from_the_page_fills_the_table_and_the_front_and_cancel_then_resume_finish_it(store):
    at = sweep_page()
    at.text_input(key="sw_name").set_value("page")
    at.multiselect(key="sw_widths").set_value([8, 2])
    at.multiselect(key="sw_budgets").set_value([])
    at.number_input(key="sw_workers").set_value(1)  # one at a time: the cancel lands with runs left to train
    at.button(key="sw_start").click().run()
    ok(at)
    assert at.selectbox(key=common.SWEEP_PICKER).value == "page"
    wait_for(lambda: any(r["status"] == "done" for r in store.sweep_runs("page")))
    at.run()
    assert at.get("progress") and "runs done" in at.get("progress")[0].proto.text
    at.button(key="sw_cancel").click().run()
    wait_for(lambda: not sweep.running(store, "page"))
    at.run()
    assert any("Sweep cancelled" in w.value and "Resume" in w.value for w in at.warning)
    at.button(key="sw_resume").click().run()
    wait_for(lambda: sweep.state(store, "page")["state"] == "done", 180)
    at.run()
    ok(at)
    assert any("Done: 2 of 2 runs trained" in s.value for s in at.success)
    table = at.dataframe[0].value
    assert list(table["variation"]) == ["8-bit weights", "2-bit weights"]
    assert table["int8 latency ms"].notna().all()
    charts = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    assert [c["layout"]["xaxis"]["title"]["text"] for c in charts] == [report.SIZE_AXIS, "int8 latency ms"]
    named = [t["name"] for t in charts[0]["data"] if t["mode"] == "markers"]  # each variation in the legend, numbered
    assert sorted(n.split(". ", 1)[1].split(" · ")[0] for n in named) == sorted(table["variation"])
    assert not any(c.get("plotly_chart") for c in at.columns)  # full width


def test_a_sweep_whose_runs_failed_shows_incomplete_and_how_to_finish_it(store):
    spec = sweep.SweepSpec(name="bad", base=small_base(lr=10.0, guard=False), vary=sweep.Vary(weight_bits=[4]),
                           latency=False)
    sweep.run_sweep(spec, store, workers=1, threads=1)  # its one run diverges
    at = sweep_page()
    assert not at.success  # not "Done: 0 of 1 runs trained"
    warning = next(w.value for w in at.warning if "Sweep incomplete" in w.value)
    assert "1 of 1 runs did not finish (1 failed)" in warning and "training diverged" in warning
    assert "Resume" in warning and "run the same `qat-studio sweep` command again" in warning
    assert at.button(key="sw_resume")


@pytest.mark.parametrize(("name", "text"), [("state.json", "[]"), ("plan.json", "[1, 2]"),
                                            ("state.json", '{"state": "training", "total": "x"}')])
def test_a_damaged_sweep_file_is_named_beside_resume_not_a_crash(store, name, text):
    spec = sweep.from_dict({"name": "damaged", "base": small_base().to_dict(), "vary": {"weight_bits": [8, 4]}})
    folder = store.sweep_dir("damaged")
    folder.mkdir(parents=True)
    (folder / sweep.SPEC_FILE).write_text(spec.to_yaml())
    (folder / name).write_text(text)
    at = sweep_page()
    warning = " ".join(w.value for w in at.warning)
    assert f"{name} is damaged" in warning and "run the same sweep again" in warning, warning
    assert at.button(key="sw_resume").label == "Resume"


def test_a_training_sweep_moves_its_bar_with_the_running_runs_steps_and_says_the_time_left(store):
    spec = sweep.from_dict({"name": "live", "base": small_base().to_dict(), "vary": {"weight_bits": [8, 4]}})
    folder = store.sweep_dir("live")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / sweep.SPEC_FILE).write_text(spec.to_yaml())
    runs = [("live-a", "8-bit weights"), ("live-b", "4-bit weights")]
    (folder / sweep.PLAN_FILE).write_text(json.dumps([{"run": r, "label": label} for r, label in runs]))
    (folder / sweep.STATE_FILE).write_text(json.dumps({  # its driver (this process) trains since 10 s
        "state": "training", "message": "training 2 runs, 1 at a time", "pid": os.getpid(), "total": 2,
        "training_started": time.time() - 10, "training_total": 2}))
    run_id = store.create_run(small_base(), os.getpid(), "live-a", {"sweep": {"id": "live", "label": "8-bit weights"}})
    log = store.event_log(run_id)
    for step in range(1, 6):  # the fine-tune half way: 5 of 10 steps
        log({"phase": "qat", "step": step, "total": 10, "epoch": step / 10, "loss": 1.0, "elapsed": 0.5 * step})
    log.flush()
    at = sweep_page()
    bar = at.get("progress")[0].proto
    assert 0 < bar.value < 100  # not 0% while the first run trains (0.75 of one run of 2)
    assert "0 of 2 runs done, 1 running" in bar.text and "left" in bar.text
