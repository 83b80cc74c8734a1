"""A user's own model and data from the browser alone: a torchvision mobilenet_v3_small checkpoint
(ImageNet-shaped: its 1000-class head is replaced) and an 8-class image folder → plan → fine-tune →
export → benchmark; the downloaded config is the run's own.
The test writes the files a user would bring; everything after that is clicks and typing."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import yaml

from qat_core.library import import_torchvision
from qat_core.store import RunStore
from tests.browser.conftest import running_server
from tests.browser.test_app_flow import RUN_TIMEOUT_MS, nav, no_exception, query, set_number, shot, wait_finished
from tests.conftest import write_image_folder

pytestmark = pytest.mark.browser


@pytest.fixture
def users_files(tmp_path):
    folder = write_image_folder(tmp_path / "digits", classes=8, per_class=40, corrupt=1)
    checkpoint = tmp_path / "mobilenet_v3_small.pt"
    torch.manual_seed(0)
    torch.save(import_torchvision().models.mobilenet_v3_small(num_classes=1000).state_dict(), checkpoint)
    return folder, checkpoint


def type_into(page, label: str, text: str) -> None:
    box = page.get_by_label(label, exact=True)
    box.fill(text)
    box.press("Enter")


def test_a_library_checkpoint_and_an_image_folder_from_the_browser(users_files, tmp_path, page):
    folder, checkpoint = users_files
    home = tmp_path / "home"
    started = time.perf_counter()

    def lap(what: str) -> None:
        print(f"\n[timing] {time.perf_counter() - started:6.1f} s  {what}", end="")

    with running_server(home, tmp_path / "server.log") as url:
        page.goto(url, wait_until="domcontentloaded")
        page.get_by_role("heading", name="QAT Studio").wait_for(timeout=60_000)
        nav(page, "Model & data")
        # each step waits for the page to show its result before the next click, as a person would
        page.get_by_text("By name or path").click()
        type_into(page, "Architecture, folder or plugin", "torchvision:mobilenet_v3_small")
        page.get_by_text("Checkpoint file").wait_for(timeout=60_000)
        page.get_by_text("Checkpoint file").click()
        page.get_by_text("Give the checkpoint's path, or upload it.").wait_for(timeout=60_000)
        type_into(page, "Checkpoint (a state_dict saved with torch.save)", str(checkpoint))
        try:
            page.get_by_text("Quantized layers", exact=True).wait_for(timeout=120_000)
        except Exception:
            shot(page, "failure-checkpoint")
            raise
        page.get_by_text("Image folder", exact=True).click()
        page.get_by_text("Give the image folder's path.").wait_for(timeout=60_000)
        type_into(page, "Image folder path", str(folder))
        try:
            page.get_by_label("Image size (pixels)", exact=True).wait_for(timeout=120_000)  # the weights' 224 crop
        except Exception:
            shot(page, "failure-image-size")
            raise
        set_number(page, "Image size (pixels)", "64")  # a faster crop for this CPU
        page.get_by_text("new head for 8 classes (the weights had 1000)").wait_for(timeout=120_000)  # also in the layer table
        page.get_by_text("8 file(s) in the folder could not be read").wait_for()  # one broken file a class
        page.get_by_role("button", name="Estimate the training time on this machine").click()
        page.get_by_text("Baseline training").wait_for(timeout=120_000)
        no_exception(page)
        lap("Model & data set up, time estimated")
        shot(page, "model-image-folder")

        nav(page, "Quantization plan")
        page.get_by_text("Size (int8.onnx").first.wait_for(timeout=60_000)
        no_exception(page)
        nav(page, "Fine-tune")
        page.get_by_role("button", name="Start fine-tune").click()
        page.wait_for_function("() => new URLSearchParams(location.search).get('run')", timeout=60_000)
        wait_finished(page)
        no_exception(page)
        lap("fine-tune finished (baseline included)")
        shot(page, "finetune-image-folder")
        run_id = query(page)["run"]

        nav(page, "Benchmark")
        page.get_by_role("button", name="Export and benchmark").click()
        page.get_by_text("Agreement", exact=True).wait_for(timeout=RUN_TIMEOUT_MS)
        # the metric's label (the runtime table below has a column of that name)
        page.get_by_test_id("stMetricLabel").get_by_text("int8 speed-up", exact=True).wait_for(timeout=RUN_TIMEOUT_MS)
        no_exception(page)
        lap("exported and benchmarked")
        shot(page, "benchmark-image-folder")

        nav(page, "Export")
        with page.expect_download() as download:
            page.get_by_role("button", name="Download config (YAML)").click()
        exported = tmp_path / "config.yaml"
        exported.write_bytes(Path(download.value.path()).read_bytes())

    config = yaml.safe_load(exported.read_text())
    assert config["model"] == "torchvision:mobilenet_v3_small" and config["checkpoint"] == str(checkpoint)
    assert config["data"].items() >= {"dataset": "image-folder", "path": str(folder), "image_size": 64,
                                      "resize_size": 73}.items()  # torchvision's 256/224 ratio, at a 64-px crop
    in_app = RunStore(home).get(run_id)["metrics"]
    assert in_app["fp32"]["accuracy"] >= 0.8  # the new head and the body learned the digits

    # the downloaded YAML is the run's config, so `qat-studio train` on it reproduces the run (a config's
    # training is deterministic: tests/test_train.py); retraining it here would double this test's time
    assert config == RunStore(home).config(run_id).to_dict()
    print(f"\n[your model] FP32 {in_app['fp32']['accuracy']:.2%}  PTQ {in_app['ptq']['accuracy']:.2%}  "
          f"QAT {in_app['qat']['accuracy']:.2%}")
