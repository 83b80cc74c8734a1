"""Hugging Face models saved with ``save_pretrained``, no code: ``hf:FOLDER`` loads offline, a head for
another number of classes is replaced, and the int8 ONNX model predicts what the simulation said."""

from __future__ import annotations

import os
import sys

import pytest

from qat_core import export, runner, zoo
from qat_core.config import DataConfig
from qat_core.errors import ConfigError
from qat_core.store import RunStore
from tests.conftest import save_hf_models, write_image_folder, write_text_table

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    text, image = save_hf_models(root)
    return {"text": text, "image": image, "texts": write_text_table(root / "texts.csv"),
            "images": write_image_folder(root / "digits", classes=4, per_class=40)}


def _run_and_export(config, tmp_path):
    """Train the run, export it and compare ONNX Runtime's int8 model with the simulation."""
    store = RunStore(tmp_path / "ws")
    run_id = runner.execute(config, store)
    return export.export_run(store, run_id), export.parity(store, run_id)


def test_a_text_classifier_and_its_tokenizer_train_quantize_and_export(hf, tmp_path):
    config = runner.default_config(f"hf:{hf['text']}", data={"path": str(hf["texts"]), "label_column": "topic",
                                                            "max_length": 32})
    assert config.data.dataset == "text-table"  # a text model takes a text table by default
    model, data = zoo.build(config.model, config.data)
    assert data.num_classes == 4 and model.layer_notes == {
        "model.classifier": "new head for 4 classes (the weights had 2), trained with the FP32 baseline"}
    config = config.model_copy(update={"baseline": config.baseline.model_copy(update={"epochs": 12})})
    exported, parity = _run_and_export(config, tmp_path)
    assert parity["sim_accuracy"] >= 0.9  # the topic words were learned: not a chance-level pipeline check
    assert parity["agreement"] >= 0.99 and abs(parity["accuracy"] - parity["sim_accuracy"]) <= 0.01
    assert "model.bert.encoder.layer.0.attention.self.query" in exported["integer_layers"]
    assert set(exported["float_layers"]) == {f"model.bert.embeddings.{e}_embeddings" for e in
                                             ("word", "token_type", "position")}  # no QAT layer for Embedding


def test_an_image_classifier_trains_on_an_image_folder_and_exports(hf, tmp_path):
    config = runner.default_config(f"hf:{hf['image']}", data={"dataset": "image-folder", "path": str(hf["images"])})
    assert (config.data.image_size, config.data.resize_size) == (32, 32)  # the ViT's own input size
    exported, parity = _run_and_export(config, tmp_path)
    assert parity["agreement"] >= 0.99 and abs(parity["accuracy"] - parity["sim_accuracy"]) <= 0.01
    assert "model.vit.embeddings.patch_embeddings.projection" in exported["integer_layers"]


def test_folders_that_are_not_saved_models_say_what_to_fix(hf, tmp_path):
    with pytest.raises(ConfigError, match=r"is not a folder saved with save_pretrained \(it has no config.json\)"):
        zoo.build(f"hf:{tmp_path}", DataConfig(dataset="generated-images"))
    no_tokenizer = tmp_path / "bare"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((hf["text"] / name).read_bytes())
    with pytest.raises(ConfigError, match=r"no tokenizer saved in .*; save it beside the model with "
                                          r"tokenizer.save_pretrained"):
        zoo.build(f"hf:{no_tokenizer}", DataConfig(dataset="text-table", path=str(hf["texts"]), label_column="topic"))
    with pytest.raises(ConfigError, match=r"dataset text-table is tokenized by a Hugging Face text classifier's own "
                                          r"tokenizer \(hf:FOLDER\); torchvision:resnet18 takes images"):
        zoo.build("torchvision:resnet18", DataConfig(dataset="text-table", path=str(hf["texts"])))
    with pytest.raises(ConfigError, match=r"has no text column 'words'; its columns are text, topic. Set "
                                          r"data.text_column"):
        zoo.build(f"hf:{hf['text']}", DataConfig(dataset="text-table", path=str(hf["texts"]), label_column="topic",
                                                 text_column="words"))
    with pytest.raises(ConfigError, match=r"a Hugging Face model brings its weights in its folder"):
        zoo.build(f"hf:{hf['image']}", DataConfig(dataset="image-folder", path=str(hf["images"])), weights="DEFAULT")


def test_without_transformers_the_message_names_the_extra(monkeypatch, hf):
    monkeypatch.setitem(sys.modules, "transformers", None)  # what Python does for a package that is not installed
    with pytest.raises(ConfigError, match=r"model ids hf:FOLDER need the transformers package; install it with "
                                          r"pip install -e \"\.\[hf\]\""):
        zoo.build(f"hf:{hf['image']}", DataConfig(dataset="image-folder", path=str(hf["images"])))
