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


# --- Fine-tune: a cancel in words -----------------------------------------------------------------
class CancelAfter:
    """A cancel that is set after ``checks`` looks: the user pressed Cancel at that step."""

    def __init__(self, checks: int):
        self.left = checks

    def is_set(self) -> bool:
        self.left -= 1
        return self.left < 0


@pytest.mark.parametrize(("steps", "said"), [(0, "Cancelled before the first fine-tune step"),
                                             (16, "Cancelled at step 16 of 40 (fine-tune)")])
def test_a_cancelled_run_says_where_it_stopped_in_words(store, steps, said):
    import torch

    from qat_core import train
    from qat_core.errors import CancelledError

    model = torch.nn.Linear(4, 2)
    batches = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(10)]
    with pytest.raises(CancelledError) as err:
        train._fit(model, batches, 4, None, torch.optim.SGD(model.parameters(), 0.1), "qat", lambda e: None,
                   CancelAfter(steps))
    assert str(err.value) == said
    run_id = store.create_run(small_base())
    store.fail(run_id, str(err.value), cancelled=True)  # as runner.execute records it
    at = page("finetune")
    ok(at)
    warning = " ".join(w.value for w in at.warning)
    assert f"{said}. Its partial weights were discarded" in warning and "Run cancelled: Cancelled" not in warning


# --- Model & data ---------------------------------------------------------------------------------
def test_a_folder_of_small_images_is_cropped_at_their_size_not_224(tmp_path):
    from qat_core import library, runner
    from qat_core.config import DataConfig
    from tests.conftest import write_image_folder

    folder = write_image_folder(tmp_path / "small", classes=3, per_class=8, size=32)
    data = {"dataset": "image-folder", "path": str(folder)}
    config = runner.default_config("torchvision:mobilenet_v3_small", data=data)
    assert (config.data.image_size, config.data.resize_size) == (32, 32)  # was 224 after 256: 49× the pixels
    assert config.data.mean == pytest.approx((0.485, 0.456, 0.406))  # the weights' statistics stay
    # a ViT's position embeddings fix its input: its own 224 stays
    vit = library.resolve_data("timm:vit_tiny_patch16_224", DataConfig.model_validate(data))
    assert vit.image_size == 224


@pytest.fixture()
def folder_draft(tmp_path, monkeypatch) -> RunStore:
    from qat_core import runner
    from tests.conftest import write_image_folder

    monkeypatch.setenv("QAT_STUDIO_HOME", str(tmp_path / "ws"))
    store = RunStore(tmp_path / "ws")
    folder = write_image_folder(tmp_path / "small", classes=3, per_class=8, size=32)
    store.save_draft("formdraft", runner.default_config("torchvision:mobilenet_v3_small",
                                                        data={"dataset": "image-folder", "path": str(folder)}))
    return store


@pytest.mark.parametrize(("key", "value", "message"), [
    ("image_size", 0, "must be greater than or equal to 8; got 0"),
    ("image_size", 5000, "must be less than or equal to 1024; got 5000"),
    ("max_samples", -5, "must be greater than or equal to 4; got -5"),
])
def test_model_and_data_refuse_bad_numbers_in_words_and_keep_the_draft(folder_draft, key, value, message):
    at = page("model")
    assert at.number_input(key="image_size").value == 32  # the folder's own size, shown
    before = folder_draft.load_draft("formdraft")
    at.number_input(key=key).set_value(value).run()
    ok(at)
    assert f"**: {message}. The draft keeps its last valid settings" in errors(at), errors(at)
    assert folder_draft.load_draft("formdraft") == before
    assert at.dataframe  # the page goes on: the draft's layers are still shown


# --- Export: downloads named for people, one zip, refusals said -----------------------------------
def test_safe_filenames_keep_what_people_read_and_drop_what_a_file_system_refuses():
    from qat_core.export import file_stem, safe_filename

    assert safe_filename("W2A4, 2 layers W8A8") == "W2A4_2_layers_W8A8"
    assert safe_filename("../../etc/passwd") == "etc_passwd" and safe_filename("CON") == "CON_"
    assert safe_filename(" :/* ") == "run" and len(safe_filename("x" * 500)) == 80
    assert file_stem({"name": "", "model": "torchvision:mobilenet_v3_small", "plan": {}}) == "mobilenet_v3_small_W8A8"
    assert file_stem({"name": "careful lr: v2", "model": "digits-cnn", "plan": {}}) == "careful_lr_v2"


def test_the_zip_of_a_run_holds_its_config_metrics_models_and_report(workspace, digits_run):
    import io
    import zipfile

    import yaml

    from qat_core import export

    if not workspace.artifact(digits_run, export.INT8_FILE).exists():
        export.export_run(workspace, digits_run)
    stem = export.file_stem(workspace.get(digits_run)["config"])
    assert stem == "digits-cnn_W8A8"
    bundle = zipfile.ZipFile(io.BytesIO(export.run_bundle(workspace, digits_run, b"<html>report</html>")))
    names = {f"{stem}/{stem}{end}" for end in (".yaml", "_metrics.json", "_int8.onnx", "_fp32.onnx", "_report.html")}
    assert set(bundle.namelist()) == names
    assert yaml.safe_load(bundle.read(f"{stem}/{stem}.yaml")) == workspace.config(digits_run).to_dict()
    assert bundle.read(f"{stem}/{stem}_int8.onnx") == workspace.artifact(digits_run, export.INT8_FILE).read_bytes()
    assert json.loads(bundle.read(f"{stem}/{stem}_metrics.json"))["qat"] == workspace.get(digits_run)["metrics"]["qat"]
    without = zipfile.ZipFile(io.BytesIO(export.run_bundle(workspace, digits_run)))
    assert f"{stem}/{stem}_report.html" not in without.namelist()


def test_export_offers_named_downloads_and_says_why_an_upload_is_refused(workspace, digits_run, monkeypatch):
    monkeypatch.setenv("QAT_STUDIO_HOME", str(workspace.root))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.switch_page(common.PAGES["export"]).run()
    at.selectbox(key=common.RUN_PICKER).set_value(digits_run).run()
    ok(at)
    assert "Download everything (.zip)" in {b.label for b in at.get("download_button")}
    uploader = at.get("file_uploader")[0]
    assert not uploader.allowed_type  # the browser refuses nothing on its own, with a note seen only on hover
    uploader.set_value(("model.pt", b"\x80\x04\x95 pickle bytes \xff", "application/octet-stream")).run()
    assert "model.pt is not a text file" in errors(at), errors(at)


def test_a_checkpoint_upload_of_another_kind_is_refused_in_words(store):
    at = page("model")
    at.radio(key="weights_source").set_value("checkpoint").run()
    uploader = at.get("file_uploader")[0]  # the checkpoint's
    assert not uploader.allowed_type  # not refused in the browser, with a note seen only on hover
    uploader.set_value(("notes.txt", b"not a checkpoint", "text/plain")).run()
    ok(at)
    assert "notes.txt is not a .pt, .pth or .bin file" in errors(at), errors(at)


def test_every_bad_sweep_setting_is_said_at_once(store):
    at = page("sweep")
    at.text_input(key="sw_name").set_value("Digits Sweep")
    at.number_input(key="sw_seeds").set_value(0).run()
    assert "Sweep name**: use 1 to 40" in errors(at) and "Seeds per plan**: give a whole number" in errors(at)


def test_baseline_epochs_out_of_range_are_refused_in_words(store):
    at = page("model")
    epochs = next(n for n in at.number_input if n.label == "Baseline epochs")
    epochs.set_value(0).run()
    ok(at)
    assert "Baseline epochs**: must be greater than or equal to 1; got 0. Training keeps 4 epochs" in errors(at)
    assert store.load_draft("formdraft").baseline.epochs == 4
