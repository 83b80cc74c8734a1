"""The Sweep page in a real browser: a new user's first sweep from the defaults (digits-CNN at uniform
8/4/3/2-bit weights) starts, its runs finish while the page watches, and the table and the Pareto front
show them; Compare lists them with the other runs. To keep the suite short, the suggestion at 3 bits and
the latency timing are switched off here (tests/test_sweep.py trains suggestions; tests/test_pages_sweep.py
draws the latency front)."""

from __future__ import annotations

import re

import pytest

from tests.browser.test_app_flow import RUN_TIMEOUT_MS, nav, no_exception, shot, shown

pytestmark = pytest.mark.browser


def test_a_first_sweep_from_the_defaults(app_server, page):
    page.goto(app_server)
    nav(page, "Sweep")
    shown(page, "No sweeps yet")
    shown(page, "5 runs")
    page.get_by_role("button", name="Remove 3.0", exact=True).click()  # Streamlit 1.67's chip buttons
    shown(page, "4 runs")
    page.get_by_text("Time int8 models").click()
    page.get_by_role("button", name="Start sweep").click()
    page.get_by_role("button", name="Cancel sweep").wait_for(timeout=60_000)  # watching it run
    page.get_by_text("Done: 4 of 4 runs trained.").wait_for(timeout=RUN_TIMEOUT_MS)
    no_exception(page)
    for label in ("8-bit weights", "4-bit weights", "3-bit weights", "2-bit weights"):
        shown(page, label)
    page.locator(".js-plotly-plot").first.wait_for(state="visible", timeout=30_000)
    titles = page.locator(".js-plotly-plot .gtitle").all_text_contents()
    assert set(titles) == {"Accuracy vs int8.onnx file size"}  # no latency chart (a live redraw may leave a copy)
    # a point a run, once the last redraw is in: the chart may first show a live frame with fewer
    page.wait_for_function("document.querySelectorAll('.js-plotly-plot .scatterlayer .point').length >= 4",
                           timeout=30_000)
    chart = page.locator(".js-plotly-plot").first
    table = page.locator('[data-testid="stDataFrame"]').first
    assert chart.bounding_box()["width"] >= 0.95 * table.bounding_box()["width"]  # full width, not half
    legend = chart.locator(".legendtext").all_text_contents()
    for label in ("8-bit weights", "4-bit weights", "3-bit weights", "2-bit weights"):  # every run named
        assert any(re.fullmatch(rf"\d+\. {label} · [\d.]+% · [\d.,]+ KB", entry) for entry in legend), legend
    numbers = [a for a in chart.locator("g.annotation").all() if re.fullmatch(r"[\d,]+", a.text_content())]
    boxes = [n.bounding_box() for n in numbers]
    assert sorted(int(k) for n in numbers for k in n.text_content().split(",")) == [1, 2, 3, 4]  # on the chart
    for i, a in enumerate(boxes):  # and readable: no number drawn over another
        for b in boxes[i + 1:]:
            assert (a["x"] + a["width"] <= b["x"] or b["x"] + b["width"] <= a["x"]
                    or a["y"] + a["height"] <= b["y"] or b["y"] + b["height"] <= a["y"]), (a, b)
    assert any(t.startswith("FP32 ") for t in chart.locator("g.annotation").all_text_contents())  # the reference
    shown(page, "No int8 latency measured in this sweep.")
    shot(page, "sweep")
    nav(page, "Compare", "Compare runs")
    shown(page, "digits-cnn-sweep: 2-bit weights")
    no_exception(page)
