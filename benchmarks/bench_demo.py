"""The stakeholder demo, timed in a real browser from an empty workspace: a finished fine-tune, the
Inspect page and a benchmark, on real data.

1. digits: Home → Quick start → (fine-tune runs) → Inspect → Benchmark → Export and benchmark.
2. a user's image folder (8 digit classes as PNGs) and a torchvision mobilenet_v3_small checkpoint:
   Model & data (source, checkpoint path, folder path, a 64-px crop) → Fine-tune → Start → Inspect →
   Benchmark → Export and benchmark.

Each step prints the seconds since the first page was open (the server is already running, as after
the README's first command). Needs Debian's chromium. Run: .venv/bin/python benchmarks/bench_demo.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qat_core.library import import_torchvision  # noqa: E402
from tests.browser.conftest import CHROMIUM, CHROMIUM_ARGS, VIEWPORT, running_server  # noqa: E402
from tests.browser.test_app_flow import nav, set_number, wait_finished  # noqa: E402
from tests.browser.test_your_model import type_into  # noqa: E402
from tests.conftest import write_image_folder  # noqa: E402

LIMIT_S = 120  # the bar for the whole demo


class Clock:
    def __init__(self, title: str):
        self.start, self.title = time.perf_counter(), title
        print(f"\n{title}")

    def mark(self, what: str) -> float:
        elapsed = time.perf_counter() - self.start
        print(f"  {elapsed:6.1f} s  {what}")
        return elapsed


def inspect_and_benchmark(page, clock: Clock) -> float:
    nav(page, "Inspect")
    page.locator(".js-plotly-plot .main-svg").first.wait_for(state="visible", timeout=180_000)
    clock.mark("Inspect: histograms and per-layer error drawn")
    nav(page, "Benchmark")
    page.get_by_role("button", name="Export and benchmark").click()
    page.get_by_text("Speed-up of int8 (ORT, median)").wait_for(timeout=300_000)
    return clock.mark("Benchmark: exported, parity checked, latency measured")


def digits_demo(page, url: str) -> float:
    page.goto(url, wait_until="domcontentloaded")
    page.get_by_role("heading", name="QAT Studio").wait_for(timeout=60_000)
    clock = Clock("digits (Quick start), from an empty workspace: 4 clicks")
    page.get_by_role("button", name="Quick start: fine-tune digits-cnn at 8 bits").click()
    wait_finished(page)
    clock.mark("Quick start: FP32 baseline trained and fine-tune finished")
    return inspect_and_benchmark(page, clock)


def image_folder_demo(page, url: str, folder: Path, checkpoint: Path) -> float:
    page.goto(url, wait_until="domcontentloaded")
    page.get_by_role("heading", name="QAT Studio").wait_for(timeout=60_000)
    clock = Clock("an 8-class image folder and a mobilenet_v3_small checkpoint, from an empty workspace: "
                  "9 clicks, 4 fields typed")
    nav(page, "Model & data")
    page.get_by_text("By name or path").click()
    type_into(page, "Architecture, folder or plugin", "torchvision:mobilenet_v3_small")
    page.get_by_text("Checkpoint file").click()
    type_into(page, "Checkpoint (a state_dict saved with torch.save)", str(checkpoint))
    page.get_by_text("Image folder", exact=True).click()
    type_into(page, "Image folder path", str(folder))
    page.get_by_label("Image size (pixels)", exact=True).wait_for(timeout=120_000)
    set_number(page, "Image size (pixels)", "64")
    page.get_by_role("button", name="Estimate the training time on this machine").click()
    page.get_by_text("Baseline training").wait_for(timeout=120_000)
    clock.mark("Model & data: model, checkpoint, folder and crop set; time estimate shown")
    nav(page, "Fine-tune")
    page.get_by_role("button", name="Start fine-tune").click()
    wait_finished(page)
    clock.mark("Fine-tune: new head trained with the baseline, QAT finished")
    return inspect_and_benchmark(page, clock)


def main() -> None:
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        sys.exit(f"{CHROMIUM} is missing: apt-get install -y chromium")
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as pw:
        tmp = Path(tmp)
        folder = write_image_folder(tmp / "digits", classes=8, per_class=60)
        checkpoint = tmp / "mobilenet_v3_small.pt"
        torch.save(import_torchvision().models.mobilenet_v3_small(num_classes=1000).state_dict(), checkpoint)
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        totals = {}
        for name, demo in (("digits", lambda p, u: digits_demo(p, u)),
                           ("image folder", lambda p, u: image_folder_demo(p, u, folder, checkpoint))):
            with running_server(tmp / f"home-{len(totals)}", tmp / f"server-{len(totals)}.log") as url:
                page = browser.new_page(viewport=VIEWPORT)
                totals[name] = demo(page, url)
                page.close()
        browser.close()
    print("\n" + "  ".join(f"{name}: {seconds:.0f} s ({seconds / LIMIT_S:.2f}× the {LIMIT_S}-s bar)"
                           for name, seconds in totals.items()))


if __name__ == "__main__":
    main()
