"""Forms, headless: every bad value is refused on the server with a message in words beside its control
(Model & data, Sweep), a refused sweep is said at the top of the page, and a cancel is said in words."""

from __future__ import annotations

import json
import os

import pytest

from qat_core import sweep
from qat_core.store import RunStore
from tests.apptest import ROOT, AppTest, common, ok
from tests.conftest import small_base


@pytest.fixture()
def store(tmp_path, monkeypatch) -> RunStore:
    monkeypatch.setenv("QAT_STUDIO_HOME", str(tmp_path))
    store = RunStore(tmp_path)
    store.save_draft("formdraft", small_base())  # digits-mlp: builds in a second
    return store


def page(name: str) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.query_params[common.DRAFT_PARAM] = "formdraft"
    at.switch_page(common.PAGES[name])
    return ok(at.run())


def errors(at: AppTest) -> str:
    return " | ".join(e.value for e in at.error)


# --- Sweep ----------------------------------------------------------------------------------------
def test_a_sweep_refused_in_a_second_tab_is_said_at_the_top_and_the_page_stays(store):
    spec = sweep.from_dict({"name": "busy", "base": small_base().to_dict(), "vary": {"weight_bits": [8, 4]}})
    folder = store.sweep_dir("busy")
    folder.mkdir(parents=True)
    (folder / sweep.SPEC_FILE).write_text(spec.to_yaml())
    # the first tab's sweep is training: its driver (this process, alive) wrote its state
    (folder / sweep.STATE_FILE).write_text(json.dumps({"state": "training", "pid": os.getpid(), "total": 2,
                                                       "message": "training 2 runs"}))
    at = page("sweep")  # the second tab: a sweep exists, so the form is folded away
    at.text_input(key="sw_name").set_value("busy").run()
    at.button(key="sw_start").click().run()
    ok(at)
    refusal = [e.value for e in at.main.error if "was not started" in e.value]
    assert refusal and "running already" in refusal[0] and "cancel it first" in refusal[0], errors(at)
    assert not [e for e in at.expander[0].error if "was not started" in e.value]  # not in the folded form
    assert at.selectbox(key=common.SWEEP_PICKER).value == "busy"  # the rest of the page is drawn


@pytest.mark.parametrize(("key", "value", "message"), [
    ("sw_name", "Digits Sweep", "Sweep name**: use 1 to 40 lower-case letters, digits, '-' or '_', starting with a "
                                "letter or digit, e.g. 'digits-sweep'; got 'Digits Sweep'"),
    ("sw_seeds", -1, "Seeds per plan**: give a whole number from 1 to 256"),
    ("sw_threads", 64, "executor.threads asks for 64 threads; give 1 to"),
    ("sw_workers", -2, "Runs at a time**: must be greater than or equal to 1; got -2"),
    ("sw_lrs", "1e-3, fast", "Learning rates**: must be a valid number"),
])
def test_sweep_settings_are_refused_in_words_beside_the_control(store, key, value, message):
    at = page("sweep")
    widget = at.text_input(key=key) if key in ("sw_name", "sw_lrs") else at.number_input(key=key)
    widget.set_value(value).run()
    ok(at)
    assert message in errors(at), errors(at)
    assert "pattern" not in errors(at)
    assert at.button(key="sw_start").disabled


def test_too_many_threads_for_this_machine_is_said_with_singular_and_plural(store, monkeypatch):
    monkeypatch.setattr(sweep.cpu, "cores", lambda: 2)
    at = page("sweep")
    at.number_input(key="sw_workers").set_value(1)
    at.number_input(key="sw_threads").set_value(2).run()
    assert not at.error  # 1 × 2 fits 2 cores
    at.number_input(key="sw_workers").set_value(3)
    at.number_input(key="sw_threads").set_value(1).run()
    assert "3 workers × 1 thread is more than this machine's 2 cores" in errors(at), errors(at)
