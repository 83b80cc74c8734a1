"""The Sweep page in a real browser: a new user's first sweep from the defaults (digits-CNN at uniform
8/4/3/2-bit weights and the sensitivity suggestion at 3 bits) starts, its runs finish while the page
watches, and the table and both Pareto fronts show them; Compare lists them with the other runs."""

from __future__ import annotations

import pytest

from tests.browser.test_app_flow import RUN_TIMEOUT_MS, nav, no_exception, shot, shown

pytestmark = pytest.mark.browser


def test_a_first_sweep_from_the_defaults(app_server, page):
    page.goto(app_server)
    nav(page, "Sweep")
    shown(page, "No sweeps yet")
    shown(page, "5 runs")
    page.get_by_role("button", name="Start sweep").click()
    page.get_by_role("button", name="Cancel sweep").wait_for(timeout=60_000)  # watching it run
    page.get_by_text("Done: 5 of 5 runs trained.").wait_for(timeout=RUN_TIMEOUT_MS)
    no_exception(page)
    for label in ("8-bit weights", "2-bit weights", "suggested ≤ 3 bits"):
        shown(page, label)
    charts = page.locator(".js-plotly-plot")
    charts.nth(1).wait_for(state="visible", timeout=30_000)
    titles = page.locator(".js-plotly-plot .gtitle").all_text_contents()
    assert "Accuracy vs model size (bit-packed)" in titles and "Accuracy vs int8 latency (ONNX Runtime, batch 1)" in titles
    assert page.locator(".js-plotly-plot .scatterlayer .point").count() >= 10  # 5 runs on each chart
    shot(page, "sweep")
    nav(page, "Compare", "Compare runs")
    shown(page, "digits-cnn-sweep: 2-bit weights")
    no_exception(page)
