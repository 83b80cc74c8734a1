"""Driving the app's pages headless (streamlit.testing.v1.AppTest), shared by the page tests."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `app_pages._common`, as the app imports it

from app_pages import _common as common  # noqa: E402

logging.getLogger("streamlit.runtime.scriptrunner_utils.script_run_context").setLevel(logging.ERROR)
AppTest = pytest.importorskip("streamlit.testing.v1").AppTest


def app(page: str | None = None, timeout: float = 60) -> AppTest:
    """The app, run once, on ``page`` (a key of ``common.PAGES``) or Home."""
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=timeout)
    if page:
        at.switch_page(common.PAGES[page])
    return at.run()


def ok(at: AppTest) -> AppTest:
    assert not at.exception, [e.value for e in at.exception]
    return at


def wait_done(store, run_id: str, timeout: float = 120) -> dict:
    """The run's record once it no longer runs (a page started it in a worker)."""
    t0 = time.monotonic()
    while (record := store.get(run_id))["status"] == "running":
        assert time.monotonic() - t0 < timeout, f"run {run_id} still running after {timeout} s"
        time.sleep(0.2)
    return record
