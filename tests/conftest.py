"""Shared fixtures: one workspace with small real digits runs, trained once per test session."""

from __future__ import annotations

import pytest

from qat_core import plugins, runner
from qat_core.config import RunConfig
from qat_core.store import RunStore

# the suite's own model factories (tests/plugins/, also on sys.path as tiny_plugin): allowed through the
# environment, which the CLI subprocesses, forked sweep workers and the browser tests' app server inherit
plugins.allow(["tests", "tiny_plugin"])


def quick_config(model: str = "digits-cnn", weight_bits: int | None = 8, act_bits: int | None = 8, **finetune):
    """The default config for ``model`` (its FP32 baseline, cached once per session) with a short
    fine-tune: real, but seconds."""
    data = runner.default_config(model, weight_bits, act_bits).to_dict()
    data["finetune"] |= {"epochs": 2, **finetune}
    return RunConfig.model_validate(data)


def small_base(seed: int = 0, **finetune) -> RunConfig:
    """digits-mlp with a short baseline and fine-tune: a run takes a few seconds (sweeps train many).
    ``finetune``: other fine-tune settings (``lr=10.0, guard=False``: every run diverges within a few steps and
    fails; with the guard, it is stopped and rolled back to its PTQ start)."""
    data = runner.default_config("digits-mlp").to_dict()
    data["baseline"] |= {"epochs": 4}
    data["finetune"] |= {"epochs": 1, "calibration_batches": 2, **finetune}
    data["seed"] = seed
    return RunConfig.model_validate(data)


def full_disk_for(monkeypatch, picks) -> None:
    """Atomic writes of the paths ``picks(path)`` chooses land on /dev/full, where every write fails with the
    kernel's ENOSPC: a full disk, without root or a small file system. Forked workers inherit it."""
    from qat_core import store

    temp_path = store._temp_path

    def on_a_full_disk(path):
        tmp = temp_path(path)
        if picks(path):
            tmp.unlink()
            tmp.symlink_to("/dev/full")
        return tmp

    monkeypatch.setattr(store, "_temp_path", on_a_full_disk)


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> RunStore:
    return RunStore(tmp_path_factory.mktemp("workspace"))


@pytest.fixture(scope="session")
def digits_run(workspace) -> str:
    """A finished digits-cnn W8A8 run (its FP32 baseline is cached for other runs)."""
    return runner.execute(quick_config(), workspace)


@pytest.fixture(scope="session")
def digits_run_w4a4(workspace) -> str:
    return runner.execute(quick_config(weight_bits=4, act_bits=4), workspace)


def write_table(path, rows: int | None = None):
    """scikit-learn's breast-cancer table (569 rows, 30 numeric features) as a CSV with a text label
    column "diagnosis": a real table no one on the team made, shipped with scikit-learn."""
    from sklearn.datasets import load_breast_cancer

    frame = load_breast_cancer(as_frame=True).frame
    frame["diagnosis"] = frame.pop("target").map({0: "malignant", 1: "benign"})
    frame = frame if rows is None else frame.head(rows)
    if str(path).endswith(".parquet"):
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)
    return path


def write_image_folder(root, classes: int = 8, per_class: int = 30, size: int = 32, corrupt: int = 0):
    """scikit-learn's handwritten digits as an image folder (``root/<digit>/<n>.png``, RGB, upscaled to
    ``size`` px): real images no one on the team made, in torchvision's ImageFolder layout. ``corrupt``
    files per class are not images, though named like them."""
    from pathlib import Path

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = Path(root)
    for label in range(classes):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        for n, pixels in enumerate(digits.images[digits.target == label][:per_class]):
            gray = Image.fromarray((pixels * 255 / 16).astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR)
            gray.convert("RGB").save(folder / f"{n}.png")
        for n in range(corrupt):
            (folder / f"broken{n}.jpg").write_bytes(b"\xff\xd8 this is not a JPEG")
    return root


TOPICS = {"sport": "goal match team score coach league", "food": "bread soup cheese bake spice dinner",
          "space": "orbit rocket planet star moon launch", "music": "guitar song drum chord band concert"}
FILLER = "the a of and to in is it that was for on with as at by this".split()


def write_text_table(path, rows: int = 400, seed: int = 0):
    """Short texts of filler words carrying two words of their topic, as a CSV (columns text, topic)."""
    import csv
    import random

    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["text", "topic"])
        for i in range(rows):
            topic = list(TOPICS)[i % len(TOPICS)]
            words = [rng.choice(FILLER) for _ in range(rng.randint(6, 14))]
            for _ in range(2):
                words.insert(rng.randrange(len(words)), rng.choice(TOPICS[topic].split()))
            out.writerow([" ".join(words), topic])
    return path


def save_hf_models(root):
    """A tiny BERT text classifier (with a word-level tokenizer) and a tiny ViT image classifier for
    32×32 inputs, each saved with ``save_pretrained`` in its own folder under ``root``; built from configs
    offline, the way a user's fine-tuned models arrive. Returns the two folders."""
    from pathlib import Path

    from qat_core.library import import_torchvision

    import_torchvision()  # transformers imports it
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        PreTrainedTokenizerFast,
        ViTConfig,
        ViTForImageClassification,
    )

    words = ["[PAD]", "[UNK]"] + FILLER + " ".join(TOPICS.values()).split()
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    text, image = Path(root) / "bert", Path(root) / "vit"
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(text)
    BertForSequenceClassification(BertConfig(vocab_size=len(words), hidden_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=128, max_position_embeddings=64,
                                             num_labels=2)).save_pretrained(text)
    ViTForImageClassification(ViTConfig(image_size=32, patch_size=4, num_hidden_layers=2, num_attention_heads=4,
                                        hidden_size=64, intermediate_size=128, num_labels=5)).save_pretrained(image)
    return text, image


FIFO_RELEASE_SECONDS = 30.0  # after this, a reader blocked on a test's FIFO is a hang: it is released (and fails)


@pytest.fixture
def fifo():
    """``fifo(path)`` makes a named pipe there. A reader blocked on one (a regression: a hang that a
    streamlit script thread would never leave) gets end-of-file after ``FIFO_RELEASE_SECONDS`` and at
    teardown, so the test fails instead of hanging the test run."""
    import contextlib
    import os
    import threading

    made, stop = [], threading.Event()

    def release() -> None:
        for path in made:
            with contextlib.suppress(OSError):  # ENXIO: no reader waiting
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))

    def watch() -> None:
        if not stop.wait(FIFO_RELEASE_SECONDS):
            while not stop.wait(0.5):
                release()

    def make(path):
        os.mkfifo(path)
        made.append(path)
        return path

    threading.Thread(target=watch, daemon=True).start()
    yield make
    stop.set()
    release()
