"""Hugging Face models saved with ``save_pretrained``, no code: ``hf:FOLDER`` loads offline, a head for
another number of classes is replaced, and the int8 ONNX model predicts what the simulation said."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qat_core import export, runner, train, zoo
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


def test_config_init_makes_a_text_table_config_for_a_text_model(hf, capsys):
    from qat_core.cli import main

    assert main(["config", "init", "--model", f"hf:{hf['text']}", "--data", str(hf["texts"]),
                 "--label-column", "topic"]) == 0  # before: a numeric table, "no label column" on the texts (exit 2)
    data = yaml.safe_load(capsys.readouterr().out)["data"]
    assert (data["dataset"], data["text_column"], data["label_column"]) == ("text-table", "text", "topic")
    assert main(["config", "init", "--model", "table-mlp", "--data", str(hf["texts"]), "--label-column", "topic",
                 "--text-column", "text"]) == 2  # a named text column makes a text table, which table-mlp refuses
    assert "model table-mlp is built for the table data set, not text-table" in capsys.readouterr().err


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


def _copy(folder, to):
    import shutil

    return Path(shutil.copytree(folder, to))


def test_a_folder_that_asks_to_run_its_own_code_is_refused_and_runs_nothing(hf, tmp_path):
    """The issue's reproduction: "y" on stdin would have run the folder's Python (transformers' prompt)."""
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.json").write_text(json.dumps({"model_type": "evilnet",
                                                  "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}))
    ran = tmp_path / "RAN"
    (evil / "configuration_evil.py").write_text(f"import pathlib\npathlib.Path({str(ran)!r}).write_text('x')\n")
    done = subprocess.run([sys.executable, "-m", "qat_core.cli", "config", "init", "--model", f"hf:{evil}", "--data",
                           str(hf["images"])], input="y\n", capture_output=True, text=True, timeout=120,
                          env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2 and done.stdout == ""  # no prompt, no half config
    assert "asks to run the folder's own Python code (auto_map), and QAT Studio never runs code from a model " \
           "folder" in done.stderr
    assert not ran.exists()
    for name in ("tokenizer_config.json", "preprocessor_config.json"):  # the same asked for by another file
        folder = _copy(hf["image"], tmp_path / name)
        (folder / name).write_text(json.dumps({"auto_map": {"AutoTokenizer": ["x.Tok", None]}}))
        with pytest.raises(ConfigError, match=rf"{name} asks to run the folder's own Python code"):
            zoo.build(f"hf:{folder}", DataConfig(dataset="image-folder", path=str(hf["images"])))


def _set(folder, name, text):
    (folder / name).unlink(missing_ok=True)
    (folder / name).write_text(text)


def _fifo(folder, name):
    (folder / name).unlink(missing_ok=True)
    os.mkfifo(folder / name)


def _edit_config(**changes):
    def edit(folder, name):
        config = json.loads((folder / name).read_text())
        config.update(changes)
        config = {k: v for k, v in config.items() if v is not None}
        _set(folder, name, json.dumps(config))
    return edit


@pytest.mark.parametrize(("model", "name", "damage", "message"), [
    ("image", "config.json", lambda f, n: _set(f, n, "{nope"), r"config.json .* is not valid JSON"),
    ("image", "config.json", lambda f, n: _set(f, n, "[1, 2]"), r"config.json holds a JSON list, not the object"),
    ("image", "config.json", _edit_config(model_type=None), r"config.json has no model_type; it is damaged"),
    ("image", "config.json", _edit_config(model_type="nosuchnet"), r"model_type 'nosuchnet' is not an architecture"),
    ("image", "config.json", _edit_config(hidden_size="big"), r"config.json cannot be read by transformers"),
    ("image", "config.json", lambda f, n: ((f / n).unlink(), (f / n).mkdir()), r"config.json .* is a directory"),
    ("image", "config.json", _fifo, r"config.json .* is not a regular file"),
    ("image", "model.safetensors", lambda f, n: _set(f, n, "garbage"), r"its weights cannot be loaded from .*"
                                                                       r"SafetensorError"),
    ("image", "preprocessor_config.json", lambda f, n: _set(f, n, "{nope"), r"preprocessor_config.json .* is not "
                                                                            r"valid JSON"),
    ("image", "preprocessor_config.json", lambda f, n: _set(f, n, '{"size": "big", "image_mean": 3}'),
     r"the image size, mean or std in .* cannot be used"),
    ("image", "preprocessor_config.json", _fifo, r"preprocessor_config.json .* is not a regular file"),
    ("text", "tokenizer.json", lambda f, n: _set(f, n, "{nope"), r"the tokenizer saved in .* cannot be loaded"),
    ("text", "tokenizer.json", _fifo, r"tokenizer.json .* is not a regular file"),
    ("text", "tokenizer_config.json", lambda f, n: _set(f, n, "[]"), r"tokenizer_config.json holds a JSON list"),
])
def test_damaged_folders_are_named_damage(hf, tmp_path, model, name, damage, message):
    folder = _copy(hf[model], tmp_path / "model")
    damage(folder, name)
    data = DataConfig(dataset="image-folder", path=str(hf["images"])) if model == "image" else \
        DataConfig(dataset="text-table", path=str(hf["texts"]), label_column="topic")
    with pytest.raises(ConfigError, match=message):
        runner.default_config(f"hf:{folder}", data=data.model_dump(exclude_unset=True))


def _save_gpt2(folder, eos: str | None = "<|endoftext|>"):
    """A tiny GPT-2 text classifier whose tokenizer, like GPT-2's, has an end-of-text token but no padding token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2ForSequenceClassification, PreTrainedTokenizerFast

    from tests.conftest import FILLER, TOPICS

    words = ["<|endoftext|>"] + FILLER + " ".join(TOPICS.values()).split()
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos, unk_token="<|endoftext|>").save_pretrained(folder)
    GPT2ForSequenceClassification(GPT2Config(vocab_size=len(words), n_embd=32, n_layer=1, n_head=2, n_positions=64,
                                             bos_token_id=0, eos_token_id=0, num_labels=2)).save_pretrained(folder)
    return folder


def test_a_tokenizer_without_a_padding_token_pads_with_its_end_of_text_token(hf, tmp_path):
    folder = _save_gpt2(tmp_path / "gpt2")
    data = {"path": str(hf["texts"]), "label_column": "topic", "max_length": 32}
    config = runner.default_config(f"hf:{folder}", data=data)  # before: "Asking to pad but the tokenizer …" (exit 70)
    model, built = zoo.build(config.model, config.data)
    assert model.pad_id == model.model.config.pad_token_id == 0  # the classifier finds each text's last real token
    assert (built.train_x == 0).any()  # the shorter texts of a batch were padded
    assert train.evaluate(model, built.test_loader(16))["accuracy"] >= 0  # batches of several texts run
    _save_gpt2(tmp_path / "no-eos", eos=None)
    with pytest.raises(ConfigError, match="neither a padding nor an end-of-text token"):
        zoo.build(f"hf:{tmp_path / 'no-eos'}", config.data)


def test_a_decoder_with_a_key_value_cache_exports_to_int8(hf, tmp_path):
    """GPT-2 concatenates each layer's keys and values to its cache, which starts as an empty tensor: torch skips
    it, the trace kept it as a constant the ONNX exporter cannot skip (before: "All tensors must have the same
    rank", exit 2 on every GPT-2). The empty part is dropped, and the cat of one tensor is no layer."""
    import numpy as np

    from qat_core.config import LayerPlan, QuantSpec
    from qat_core.prepare import prepare

    config = runner.default_config(f"hf:{_save_gpt2(tmp_path / 'gpt2')}",
                                   data={"path": str(hf["texts"]), "label_column": "topic", "max_length": 32})
    model, data = zoo.build(config.model, config.data)
    qat = prepare(model, LayerPlan(default=QuantSpec(range_method="minmax")), data.example(2))
    assert not [r["name"] for r in qat.layers if r["kind"] == "cat"]
    train.calibrate(qat, [(data.example(8), None)], 1)
    path = tmp_path / "int8.onnx"
    path.write_bytes(export.int8_onnx(qat.eval(), data.example(1)))
    x = data.example(8)
    logits = export.session(path).run(None, {export.INPUT_NAME: x.numpy()})[0]
    assert logits.shape == (8, data.num_classes) and np.isfinite(logits).all()
