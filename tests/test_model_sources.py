"""The Model & data page and the engine behind it: a model, its weights and its data chosen without code,
uploads kept in the workspace, and the time a run will take, estimated from measured steps."""

from __future__ import annotations

import pytest
import torch

from qat_core import runner
from qat_core.data import validation_size
from qat_core.library import import_torchvision
from qat_core.store import RunStore
from tests.apptest import app, common, ok
from tests.conftest import write_image_folder, write_table


@pytest.fixture(autouse=True)
def _workspace(workspace, monkeypatch):
    monkeypatch.setenv("QAT_STUDIO_HOME", str(workspace.root))


def draft(at, workspace):
    return workspace.load_draft(at.query_params[common.DRAFT_PARAM])


def test_a_checkpoint_and_an_image_folder_typed_on_the_model_page(workspace, tmp_path):
    folder = write_image_folder(tmp_path / "digits", classes=3, per_class=12)
    checkpoint = tmp_path / "imagenet.pt"
    torch.save(import_torchvision().models.mobilenet_v3_small(num_classes=1000).state_dict(), checkpoint)
    at = ok(app("model", 120))
    at.radio(key="model_source").set_value("By name or path").run()
    at.text_input(key="plugin_path").input("torchvision:mobilenet_v3_small").run()
    at.radio(key="weights_source").set_value("checkpoint").run()
    at.text_input(key="checkpoint_path").input(str(checkpoint)).run()
    at.radio(key="data_source").set_value("image-folder").run()
    at.text_input(key="data_path").input(str(folder)).run()
    ok(at)
    config = draft(at, workspace)
    assert (config.model, config.checkpoint, config.data.dataset) == (
        "torchvision:mobilenet_v3_small", str(checkpoint), "image-folder")
    assert config.data.image_size == 32 and config.baseline.epochs == 3  # the 32-px images, not 224; real data's epochs
    at.number_input(key="image_size").set_value(48).run()
    ok(at)
    assert draft(at, workspace).data.image_size == 48
    assert any("classifier.3** is a new head for 3 classes (the weights had 1000)" in i.value for i in at.info)
    assert "Baseline training" not in {m.label for m in at.metric}  # timing steps costs seconds: on request
    at.button(key="estimate_time").click().run()
    labels = {m.label: m.value for m in at.metric}
    assert labels["Classes"] == "3" and labels["Baseline training"].endswith(" s")
    assert next(n for n in at.number_input if n.label == "Baseline epochs").value == 3  # not the old model's


def test_a_folder_that_is_not_one_is_a_message_and_keeps_the_draft(workspace, tmp_path):
    at = ok(app("model", 120))
    at.radio(key="model_source").set_value("By name or path").run()
    at.text_input(key="plugin_path").input("torchvision:mobilenet_v3_small").run()
    before = draft(at, workspace)
    (tmp_path / "empty").mkdir()
    at.radio(key="data_source").set_value("image-folder").run()
    at.text_input(key="data_path").input(str(tmp_path / "empty")).run()
    ok(at)
    assert any("has no class folders: put each class's images in a sub-folder" in e.value for e in at.error)
    assert draft(at, workspace) == before


def test_a_table_picks_its_label_column_from_the_file(workspace, tmp_path):
    csv = write_table(tmp_path / "cancer.csv")
    at = ok(app("model", 120))
    at.selectbox(key="zoo_model").select("table-mlp").run()
    at.text_input(key="data_path").input(str(csv)).run()
    ok(at)
    assert at.selectbox(key="label_column").value == "diagnosis"  # the last column, offered first
    config = draft(at, workspace)
    assert (config.data.dataset, config.data.label_column) == ("table", "diagnosis")
    assert {m.label: m.value for m in at.metric}["Classes"] == "2"


def test_uploads_are_kept_once_under_a_safe_name(tmp_path):
    store = RunStore(tmp_path / "ws")
    first = store.save_upload("../../etc/my model.pt", b"weights")
    assert first.parent.parent == store.root / "uploads" and first.name == "my_model.pt"
    assert store.save_upload("my model.pt", b"weights") == first and first.read_bytes() == b"weights"
    assert store.save_upload("my model.pt", b"other") != first


def test_the_time_estimate_is_measured_steps_times_the_steps_to_run():
    config = runner.default_config("digits-cnn")
    per_step = runner.seconds_per_step(config)
    assert per_step["train_samples"] == 1347 - per_step["validation_samples"]  # the guard's split held out
    assert abs(per_step["validation_samples"] - validation_size(1347, config.finetune.validation_fraction)) <= 5
    assert 0 < per_step["baseline"] < 5 and 0 < per_step["finetune"] < 5
    est = runner.time_estimate(config, per_step)
    batches = -(-per_step["train_samples"] // config.finetune.batch_size)  # ceil
    assert est["finetune_epoch"] == pytest.approx(batches * per_step["finetune"])
    assert est["finetune_total"] == pytest.approx(config.finetune.epochs * est["finetune_epoch"])
    # the first calibration batch also searches the weights' ranges; the others only the activations'
    assert est["calibration_total"] == pytest.approx(
        per_step["calibration"] + (config.finetune.calibration_batches - 1) * per_step["calibration_next"])
    capped = config.model_copy(update={"finetune": config.finetune.model_copy(update={"max_steps": 3})})
    assert runner.time_estimate(capped, per_step)["finetune_total"] == pytest.approx(3 * per_step["finetune"])
