"""Built-in models, the plugin hook for a user's own model, and ``build``: a config's model and data.

The zoo's models are small factories sized by their data. A model id is a zoo id, a library's
architecture by name (``library.py``) or a plugin path ``package.module:factory``.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import sys
import traceback
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qat_core import plugins
from qat_core.config import DataConfig
from qat_core.data import DATASETS, Data, digits, images224, sequences, table
from qat_core.errors import ConfigError, PluginError
from qat_core.library import (
    head,
    hf_task,
    ids_for,
    image_preset,
    library_data,
    library_model,
    library_of,
    note_new_head,
    resolve_data,
)
from qat_core.modules import Add, MatMul

# --- models --------------------------------------------------------------------------------------


def conv_bn_relu(c_in: int, c_out: int, k: int = 3, stride: int = 1, groups: int = 1, relu: bool = True) -> nn.Sequential:
    """Conv → BN (→ ReLU) in one Sequential, the pattern ``prepare`` fuses; the layer is ``<name>.conv``."""
    layers = {"conv": nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False), "bn": nn.BatchNorm2d(c_out)}
    if relu:
        layers["relu"] = nn.ReLU()
    return nn.Sequential(OrderedDict(layers))


def digits_cnn(num_classes: int = 10) -> nn.Module:
    """A 3-conv CNN for 8×8 digits (~24k parameters)."""
    return nn.Sequential(OrderedDict(
        conv1=conv_bn_relu(1, 16),  # (B, 16, 8, 8)
        conv2=conv_bn_relu(16, 32),  # (B, 32, 8, 8)
        pool=nn.MaxPool2d(2),  # (B, 32, 4, 4)
        conv3=conv_bn_relu(32, 64),  # (B, 64, 4, 4)
        gap=nn.AdaptiveAvgPool2d(1),  # (B, 64, 1, 1)
        flatten=nn.Flatten(),  # (B, 64)
        fc=nn.Linear(64, num_classes),
    ))


def mlp(num_classes: int = 10, in_features: int = 64, hidden: tuple[int, int] = (256, 128)) -> nn.Module:
    """Flatten, two ReLU layers, a linear head: digits' MLP, and any table's (sized by its features)."""
    return nn.Sequential(OrderedDict(
        flatten=nn.Flatten(),  # (B, in_features)
        fc1=nn.Sequential(OrderedDict(linear=nn.Linear(in_features, hidden[0]), relu=nn.ReLU())),
        fc2=nn.Sequential(OrderedDict(linear=nn.Linear(hidden[0], hidden[1]), relu=nn.ReLU())),
        fc3=nn.Linear(hidden[1], num_classes),
    ))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3×3 convs and a (projected) shortcut, summed then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = conv_bn_relu(c_in, c_out, 3, stride)
        self.conv2 = conv_bn_relu(c_out, c_out, 3, 1, relu=False)
        self.shortcut = conv_bn_relu(c_in, c_out, 1, stride, relu=False) if stride != 1 or c_in != c_out else None
        self.add = Add(relu=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.shortcut(x) if self.shortcut is not None else x
        return self.add(self.conv2(self.conv1(x)), identity)


def resnet18(num_classes: int = 10) -> nn.Module:
    """ResNet-18 layout (He et al. 2016) for 3×224×224 inputs, 11.2M parameters."""
    blocks, c_in = [], 64
    for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        blocks += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
        c_in = c_out
    return nn.Sequential(
        conv_bn_relu(3, 64, 7, 2),  # (B, 64, 112, 112)
        nn.MaxPool2d(3, 2, 1),  # (B, 64, 56, 56)
        *blocks,  # (B, 512, 7, 7)
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(512, num_classes),
    )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1×1 expand, 3×3 depthwise, 1×1 linear projection (+ shortcut)."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        layers = [conv_bn_relu(c_in, hidden, 1)] if expand != 1 else []
        layers += [conv_bn_relu(hidden, hidden, 3, stride, groups=hidden), conv_bn_relu(hidden, c_out, 1, relu=False)]
        self.body = nn.Sequential(*layers)
        self.add = Add() if stride == 1 and c_in == c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return self.add(y, x) if self.add is not None else y


def mobilenetv2(num_classes: int = 10) -> nn.Module:
    """MobileNetV2 layout (Sandler et al. 2018), width 1.0, with ReLU in place of ReLU6
    (a quantization-friendly variant: the clip at 6 is left to the activation quantizer)."""
    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1)]
    layers, c_in = [conv_bn_relu(3, 32, 3, 2)], 32
    for expand, c_out, repeats, stride in settings:
        for i in range(repeats):
            layers.append(InvertedResidual(c_in, c_out, stride if i == 0 else 1, expand))
            c_in = c_out
    layers += [conv_bn_relu(c_in, 1280, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1280, num_classes)]
    return nn.Sequential(*layers)


class EncoderLayer(nn.Module):
    """Pre-norm Transformer encoder layer written with Linear/MatMul modules so each is quantizable."""

    def __init__(self, d: int, heads: int, ffn: int):
        super().__init__()
        self.heads, self.dk = heads, d // heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))
        with torch.no_grad():  # attention's 1/sqrt(dk) lives in q, so q's quantizer sees the scaled
            self.q.weight.mul_(1.0 / math.sqrt(self.dk))  # queries and q @ k^T exports as QLinearMatMul
            self.q.bias.mul_(1.0 / math.sqrt(self.dk))
        self.scores, self.mix = MatMul(), MatMul()
        self.softmax = nn.Softmax(dim=-1)
        self.ffn1, self.ffn2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.gelu = nn.GELU()
        self.add1, self.add2 = Add(), Add()

    def _split(self, t: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, H, T, dk)
        b, n, _ = t.shape
        return t.reshape(b, n, self.heads, self.dk).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D)
        b, n, d = x.shape
        h = self.norm1(x)
        q, k, v = self._split(self.q(h)), self._split(self.k(h)), self._split(self.v(h))
        att = self.softmax(self.scores(q, k.transpose(-2, -1)))  # (B, H, T, T); q carries 1/sqrt(dk)
        mixed = self.mix(att, v).transpose(1, 2).reshape(b, n, d)
        x = self.add1(x, self.out(mixed))
        return self.add2(x, self.ffn2(self.gelu(self.ffn1(self.norm2(x)))))


class TransformerClassifier(nn.Module):
    def __init__(self, features: int = 64, d: int = 256, heads: int = 4, ffn: int = 1024, depth: int = 4,
                 num_classes: int = 10):
        super().__init__()
        self.embed = nn.Linear(features, d)
        self.layers = nn.Sequential(*(EncoderLayer(d, heads, ffn) for _ in range(depth)))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, F) -> (B, classes)
        return self.head(self.norm(self.layers(self.embed(x))).mean(dim=1))


@dataclass(frozen=True)
class ZooEntry:
    model: Callable[[Data], nn.Module]  # sized by the data: its classes (and features, for tables)
    data: Callable[[DataConfig], Data]
    description: str
    dataset: str
    baseline_defaults: dict[str, Any] = field(default_factory=dict)  # sensible BaselineConfig for this model
    finetune_defaults: dict[str, Any] = field(default_factory=dict)


# settings that keep a 224×224 CNN on generated data to seconds on a CPU (its accuracy means nothing)
VISION_BASELINE = {"epochs": 1, "batch_size": 16, "max_steps": 6, "lr": 1e-3}


VISION_FINETUNE = {"epochs": 1, "batch_size": 8, "max_steps": 4}

# a user's images or texts: a few epochs to fit a new head (or more), one to recover from quantization
USER_DATA_BASELINE = {"epochs": 3, "batch_size": 32, "lr": 1e-3}


USER_DATA_FINETUNE = {"epochs": 1, "batch_size": 32, "lr": 1e-4}

MODELS: dict[str, ZooEntry] = {
    "digits-cnn": ZooEntry(lambda d: digits_cnn(d.num_classes), digits, "3-conv CNN + BN on 8×8 digits", "digits"),
    "digits-mlp": ZooEntry(lambda d: mlp(d.num_classes), digits, "3-layer MLP on 8×8 digits", "digits"),
    "table-mlp": ZooEntry(lambda d: mlp(d.num_classes, d.train_x.shape[1], (64, 32)), table,
                          "3-layer MLP for a CSV/Parquet table (data.path, data.label_column)", "table",
                          {"epochs": 60, "batch_size": 64, "lr": 3e-3}, {"epochs": 4, "batch_size": 64}),
    "resnet18": ZooEntry(lambda d: resnet18(d.num_classes), images224, "ResNet-18-style CNN, 3×224×224 (generated data)",
                         "generated-images", VISION_BASELINE, VISION_FINETUNE),
    "mobilenetv2": ZooEntry(lambda d: mobilenetv2(d.num_classes), images224, "MobileNetV2-style CNN, 3×224×224 (generated data)",
                            "generated-images", VISION_BASELINE, VISION_FINETUNE),
    "transformer": ZooEntry(lambda d: TransformerClassifier(num_classes=d.num_classes), sequences, "Transformer encoder classifier, 128×64 sequences "
                            "(generated data)", "generated-sequences", {"epochs": 2, "batch_size": 32, "lr": 1e-3},
                            {"epochs": 1, "batch_size": 32, "lr": 1e-4}),
}


def is_plugin(model_id: str) -> bool:
    return ":" in model_id and library_of(model_id) is None


def default_dataset(model_id: str) -> str:
    """The data set a model trains on unless the config says otherwise: a zoo model's own, image data for
    a library's image classifiers, a text table for a Hugging Face text classifier (its path is the
    user's to give), digits otherwise (plugins bring their own data)."""
    entry = MODELS.get(model_id)
    if entry is not None:
        return entry.dataset
    if library_of(model_id) == "hf" and hf_task(model_id) == "text":
        return "text-table"
    return "generated-images" if library_of(model_id) else "digits"


def _check_fits(model: nn.Module, data: Data, model_id: str, dataset: str, weights: str | None = None) -> None:
    """A model and data that do not fit (channels, sizes) fail here with both named, not mid-training."""
    x = data.example(2)
    try:
        out = _out_features(model, x)
    except Exception as err:  # whatever the model's forward raises on a wrong input
        raise ConfigError(f"{model_id} cannot run on {dataset} inputs of shape {tuple(x.shape[1:])} "
                          f"({type(err).__name__}: {str(err)[:200]}); {_fit_hint(model_id, dataset, weights)}") from None
    if out != data.num_classes:
        raise ConfigError(f"{model_id} gives {out} outputs for {data.num_classes} classes")


def _fit_hint(model_id: str, dataset: str, weights: str | None) -> str:
    """What to change when a model cannot run on the data: an image folder's crop size for a library's image
    model (the size its weights expect; a ViT's position embeddings take that size only), else other data."""
    if dataset != "image-folder" or not library_of(model_id):
        return "choose data that fits it, e.g. data.dataset: generated-images for an image model"
    preset = image_preset(model_id, weights)
    side = preset["image_size"]
    only = " only" if preset.get("min_side", side) >= side else ""
    return (f"{model_id} takes {side}×{side} images{only}: set data.image_size: {side} "
            f"(qat-studio config init … --image-size {side})")


_loading_plugin = False  # a plugin whose factory loads a plugin again (QAT Studio's own CLI, say) would recurse


def check_plugin(model_id: str) -> None:
    """Refuse a plugin path that is malformed or that the user did not allow (``plugins.check``), before
    anything is imported; a zoo or library model passes. Called wherever a config arrives to be built."""
    if not is_plugin(model_id):
        return
    module_name, _, attr = model_id.partition(":")
    if not (all(part.isidentifier() for part in module_name.split(".")) and attr.isidentifier()):
        raise PluginError(f"plugin path {model_id!r} must look like 'package.module:factory'")
    plugins.check(model_id)


def load_plugin(path: str) -> tuple[nn.Module, Data]:
    """Call ``package.module:factory``; it returns ``(model, train_loader, test_loader)``.

    ``train_loader``/``test_loader`` are re-iterable sequences of ``(inputs, labels)`` batches; the train
    loader has a length (its batches an epoch). Only a factory the user allowed runs (``plugins.check``),
    within a time limit, and it cannot end the process: every fault of its code is a PluginError.
    """
    global _loading_plugin
    check_plugin(path)
    if _loading_plugin:
        raise PluginError(f"plugin {path!r} was asked for while another plugin's factory was running; a factory "
                          "must build its model and loaders, not start QAT Studio again")
    _loading_plugin = True
    try:
        return plugins.run(path, lambda: _call_plugin(path))
    finally:
        _loading_plugin = False


def _call_plugin(path: str) -> tuple[nn.Module, Data]:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as err:  # any import-time failure is the plugin's, reported with its cause
        raise PluginError(f"cannot import plugin module {module_name!r}: {type(err).__name__}: {err}. "
                          "Check the name and that its package is installed or on PYTHONPATH") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise PluginError(f"plugin module {module_name!r} has no callable {attr!r}")
    result = factory()  # its exceptions, exits and hangs: plugins.run reports them
    if not (isinstance(result, tuple) and len(result) == 3 and isinstance(result[0], nn.Module)):
        raise PluginError(f"plugin factory {path} must return (model, train_loader, test_loader); "
                          f"got {type(result).__name__}")
    model, train, test = result
    try:
        batches = len(train)  # training counts an epoch's steps
    except Exception as err:
        raise PluginError(f"plugin {path}: train_loader has no length ({type(err).__name__}: {err}); return a list "
                          "of (inputs, labels) batches or a torch DataLoader") from None
    if not batches:
        raise PluginError(f"plugin {path}: train_loader has no batches")
    try:
        first_x, first_y = next(iter(train))
        classes = int(first_y.max()) + 1
    except Exception as err:
        raise PluginError(f"plugin {path}: train_loader must yield (inputs, labels) batches "
                          f"({type(err).__name__}: {err})") from None
    try:
        outputs = _out_features(model, first_x)
    except Exception as err:
        raise PluginError(f"plugin {path}: its model's forward fails on a batch of its own train_loader "
                          f"({type(err).__name__}: {str(err)[:200]})") from None
    data = Data(first_x, first_y, first_x[:0], first_y[:0], max(classes, outputs), generated=False,
                description=f"plugin {path}", train_loader_fn=lambda bs, shuffle, seed: train,
                test_loader_fn=lambda bs: test)
    return model, data


def plugin_fault(model_id: str, err: BaseException) -> PluginError | None:
    """``err`` as a PluginError when the plugin's own code raised it (its model's forward, its loaders, while
    training), else None: a fault of the user's code is theirs to fix, not a bug in QAT Studio."""
    if not is_plugin(model_id):
        return None
    module = sys.modules.get(model_id.partition(":")[0].split(".")[0])  # its top-level package or module
    roots = tuple(os.path.join(p, "") for p in getattr(module, "__path__", ())) or \
        tuple(f for f in [getattr(module, "__file__", None)] if f)
    where = [(f.f_code.co_filename, line) for f, line in traceback.walk_tb(err.__traceback__)
             if roots and f.f_code.co_filename.startswith(roots)]
    if not where:
        return None
    return PluginError(f"plugin {model_id}: its code raised {type(err).__name__}: {str(err)[:300]} (at "
                       f"{where[-1][0]}:{where[-1][1]}); fix the plugin's model or loaders")


def _out_features(model: nn.Module, x: torch.Tensor) -> int:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(x[:2]).shape[-1]
    finally:
        model.train(was)


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load a user's state_dict safely (``weights_only=True``: nothing in the file is executed)."""
    path = Path(path)
    if path.is_dir():
        raise PluginError(f"checkpoint {path} is a folder; give the file saved with torch.save(model.state_dict(), path)")
    if not path.is_file():
        raise PluginError(f"checkpoint {path} does not exist" if not path.exists() else
                          f"checkpoint {path} is not a regular file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise PluginError(f"checkpoint {path} cannot be read as a weights-only PyTorch file "
                          f"({type(err).__name__}); save it with torch.save(model.state_dict(), path)") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PluginError(f"checkpoint {path} is not a state_dict (a mapping of names to tensors)")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [k for k, v in expected.items() if k in state and state[k].shape != v.shape]
    head_name = head(model)[0] if reshaped else ""
    if reshaped and not missing and not unexpected and all(k.startswith(head_name + ".") for k in reshaped):
        # trained for another number of classes: everything but the head loads, the head starts afresh
        old_classes = state[reshaped[0]].shape[0]
        model.load_state_dict({k: v for k, v in state.items() if k not in reshaped}, strict=False)
        note_new_head(model, head_name, expected[reshaped[0]].shape[0], old_classes)
        return
    if missing or unexpected or reshaped:
        def first(keys: list[str]) -> str:
            return ", ".join(keys[:3]) + (f" … ({len(keys)} in all)" if len(keys) > 3 else "")

        problems = ([f"missing {first(missing)}"] if missing else []) + \
                   ([f"unexpected {first(unexpected)}"] if unexpected else []) + \
                   [f"{k} is {tuple(state[k].shape)} in the file, {tuple(expected[k].shape)} in the model"
                    for k in reshaped[:2]]
        raise PluginError(f"checkpoint {path} does not fit the model (is it for another architecture, or another "
                          f"number of classes?): {'; '.join(problems)}")
    model.load_state_dict(state)


def build(model_id: str, data_cfg: DataConfig, weights: str | None = None,
          checkpoint: str | None = None) -> tuple[nn.Module, Data]:
    """The float model and its data for a config's ``model`` (zoo id, library architecture, plugin path),
    with its ``weights`` (a library's, by name) or ``checkpoint`` (the user's file) loaded."""
    if weights and not library_of(model_id):
        raise ConfigError(f"weights {weights!r} name a library's pretrained weights (torchvision:NAME, timm:NAME); "
                          f"{model_id} takes a checkpoint file instead")
    if is_plugin(model_id):
        model, data = load_plugin(model_id)
    elif library_of(model_id):
        data_cfg = resolve_data(model_id, data_cfg, weights)
        data = library_data(model_id, data_cfg)
        model = library_model(model_id, data, weights)
    else:
        entry = MODELS.get(model_id)
        if entry is None:
            meant = ids_for(model_id) if re.fullmatch(r"[A-Za-z0-9_.]{1,100}", model_id) else []
            hint = f"; did you mean {' or '.join(meant)}?" if meant else ""
            raise ConfigError(f"model {model_id!r} is not in the zoo ({', '.join(MODELS)}) "
                              f"and is not a plugin path 'package.module:factory'{hint}")
        if data_cfg.dataset != entry.dataset and not (entry.dataset == "generated-images"
                                                      and data_cfg.dataset == "image-folder"):
            raise ConfigError(f"model {model_id} is built for the {entry.dataset} data set, not {data_cfg.dataset}; "
                              f"set data.dataset: {entry.dataset}")
        data = DATASETS[data_cfg.dataset](resolve_data(model_id, data_cfg))
        model = entry.model(data)
    if checkpoint:
        load_checkpoint(model, checkpoint)
    if not is_plugin(model_id):
        _check_fits(model, data, model_id, data_cfg.dataset, weights)
    return model, data
