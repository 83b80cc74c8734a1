"""Built-in models and data sets, all offline, and the plugin hook for a user's own model.

``digits`` is scikit-learn's real ``load_digits`` (1,797 8×8 images). The latency-scale models
(ResNet-18-style, MobileNetV2-style, Transformer encoder) train on generated data: their
accuracy only shows that training ran, never how good the architecture is.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qat_core.config import DataConfig
from qat_core.errors import ConfigError, PluginError
from qat_core.modules import Add, MatMul

Batch = tuple[torch.Tensor, torch.Tensor]


class TensorLoader:
    """Batches from in-memory tensors; reshuffled each epoch from its own seeded generator."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool, seed: int = 0):
        self.x, self.y, self.batch_size, self.shuffle = x, y, batch_size, shuffle
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        n = len(self.x)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            idx = order[start:start + self.batch_size]
            yield self.x[idx], self.y[idx]



@dataclass
class Data:
    """A data set split for training and testing."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    generated: bool  # True: synthetic data, accuracy is not meaningful
    description: str
    train_loader_fn: Callable[[int, bool, int], Iterable[Batch]] | None = None  # plugins bring loaders
    test_loader_fn: Callable[[int], Iterable[Batch]] | None = None

    def train_loader(self, batch_size: int, shuffle: bool = True, seed: int = 0) -> Iterable[Batch]:
        if self.train_loader_fn is not None:
            return self.train_loader_fn(batch_size, shuffle, seed)
        return TensorLoader(self.train_x, self.train_y, batch_size, shuffle, seed)

    def test_loader(self, batch_size: int = 512) -> Iterable[Batch]:
        if self.test_loader_fn is not None:
            return self.test_loader_fn(batch_size)
        return TensorLoader(self.test_x, self.test_y, batch_size, shuffle=False)

    def example(self, n: int = 2) -> torch.Tensor:
        return self.train_x[:n]


def _split(x: torch.Tensor, y: torch.Tensor, cfg: DataConfig) -> tuple[torch.Tensor, ...]:
    """Stratified train/test split: each class keeps the same share in both parts, fixed by the seed."""
    g = torch.Generator().manual_seed(cfg.split_seed)
    test_idx = []
    for label in torch.unique(y):
        members = torch.nonzero(y == label).flatten()
        members = members[torch.randperm(len(members), generator=g)]
        test_idx.append(members[: round(len(members) * cfg.test_fraction)])
    is_test = torch.zeros(len(y), dtype=torch.bool)
    is_test[torch.cat(test_idx)] = True
    return x[~is_test], y[~is_test], x[is_test], y[is_test]


def _digits_array() -> np.ndarray:
    """scikit-learn's digits table (1797 rows: 64 pixel values 0..16, then the label).

    Read from the file scikit-learn ships rather than through ``sklearn.datasets``, whose import
    alone costs about a second — a sixth of a whole digits run.
    """
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if spec else None
    if path is None or not path.exists():  # a scikit-learn that moved its data: its public loader
        from sklearn.datasets import load_digits

        raw = load_digits()
        return np.column_stack([raw.data, raw.target])
    return np.loadtxt(path, delimiter=",")


def digits(cfg: DataConfig) -> Data:
    """scikit-learn's handwritten digits: (N, 1, 8, 8) in [0, 1], 10 classes."""
    table = torch.from_numpy(_digits_array()).float()
    x = table[:, :64].reshape(-1, 1, 8, 8) / 16.0  # (N, 1, 8, 8)
    y = table[:, 64].long()
    tr_x, tr_y, te_x, te_y = _split(x, y, cfg)
    return Data(tr_x, tr_y, te_x, te_y, 10, generated=False,
                description="scikit-learn load_digits: 8×8 handwritten digits, 10 classes")


def _generated(shape: tuple[int, ...], n: int, cfg: DataConfig, classes: int = 10) -> Data:
    """Class templates plus noise: learnable, deterministic, and meaningless as accuracy."""
    g = torch.Generator().manual_seed(1000 + cfg.split_seed)
    templates = torch.randn((classes, *shape), generator=g)
    y = torch.arange(n) % classes
    x = 0.5 * templates[y] + torch.randn((n, *shape), generator=g)
    tr_x, tr_y, te_x, te_y = _split(x, y, cfg)
    return Data(tr_x, tr_y, te_x, te_y, classes, generated=True,
                description=f"generated {shape} samples (class template + noise); accuracy is not meaningful")


def _subset(x: torch.Tensor, y: torch.Tensor, cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """At most ``cfg.max_samples`` rows, drawn at random (seeded by the split seed) before the split."""
    if cfg.max_samples is None or len(y) <= cfg.max_samples:
        return x, y
    keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(cfg.split_seed))[:cfg.max_samples]
    return x[keep], y[keep]


def table(cfg: DataConfig) -> Data:
    """A CSV or Parquet table: one row a sample, numeric feature columns and a label column (any values,
    mapped to classes 0..C-1 in sorted order). Features are standardised with the training split's mean
    and standard deviation; rows with a missing value are skipped and counted."""
    import pandas as pd

    path = Path(cfg.path or "")
    kind = "Parquet" if path.suffix.lower() in (".parquet", ".pq") else "CSV"
    if not path.is_file():
        raise ConfigError(f"data.path {path}: no such file; give a {kind} table with a label column")
    try:
        frame = pd.read_parquet(path) if kind == "Parquet" else pd.read_csv(path)
    except Exception as err:  # pandas raises many kinds: the file is not a table it can read
        raise ConfigError(f"data.path {path} cannot be read as a {kind} table ({type(err).__name__}: "
                          f"{str(err)[:200]})") from None
    label = cfg.label_column
    if label not in frame.columns:
        shown = ", ".join(map(str, frame.columns[:12])) + (", …" if len(frame.columns) > 12 else "")
        raise ConfigError(f"{path} has no label column {label!r}; its columns are {shown}. Set data.label_column")
    features = frame.drop(columns=[label])
    text = [str(c) for c in features.columns if not pd.api.types.is_numeric_dtype(features[c])
            or pd.api.types.is_bool_dtype(features[c])]
    if text:
        raise ConfigError(f"{path}: feature columns must be numbers; {', '.join(text[:8])} "
                          f"{'is' if len(text) == 1 else 'are'} not. Encode them as numbers or drop them")
    if features.shape[1] == 0:
        raise ConfigError(f"{path} has only the label column; a model needs at least one feature column")
    complete = features.notna().all(axis=1) & frame[label].notna()
    skipped = int((~complete).sum())
    features, labels = features[complete], frame[label][complete]
    classes = sorted(labels.unique(), key=str)
    if len(classes) < 2:
        raise ConfigError(f"{path}: the label column {label!r} has {len(classes)} class(es) in its complete rows; "
                          "classification needs at least 2")
    x = torch.tensor(features.to_numpy(dtype=np.float32))
    y = torch.tensor(labels.map({c: i for i, c in enumerate(classes)}).to_numpy(dtype=np.int64))
    x, y = _subset(x, y, cfg)
    tr_x, tr_y, te_x, te_y = _split(x, y, cfg)
    if len(te_y) == 0 or len(tr_y) == 0:
        raise ConfigError(f"{path}: {len(y)} rows are too few to hold out a test split; add rows or raise "
                          "data.test_fraction")
    mean, std = tr_x.mean(dim=0), tr_x.std(dim=0).clamp_min(1e-6)
    tr_x, te_x = (tr_x - mean) / std, (te_x - mean) / std
    note = f", {skipped} row(s) with a missing value skipped" if skipped else ""
    return Data(tr_x, tr_y, te_x, te_y, len(classes), generated=False,
                description=f"{path.name}: {len(y)} rows, {x.shape[1]} features (standardised), {len(classes)} "
                            f"classes from column {label!r}{note}")


def images224(cfg: DataConfig) -> Data:
    return _generated((3, 224, 224), 160, cfg)


def sequences(cfg: DataConfig) -> Data:
    return _generated((128, 64), 320, cfg)


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


TORCHVISION_OPS = {"nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
                   "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"}


def import_torchvision() -> Any:
    """``import torchvision``, also where its C++ ops cannot load.

    PyPI's torchvision wheel is built against the CUDA torch; beside the CPU wheel its C++ ops do not
    load and the import dies with ``operator torchvision::nms does not exist``. Its model definitions
    need neither op, so the two it registers meta kernels for are declared (schema only) and the
    import is tried again. Import it through here before ``timm`` or ``transformers``, which import it.
    """
    import sys

    try:
        import torchvision
    except RuntimeError as err:
        if "does not exist" not in str(err):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        for op, schema in TORCHVISION_OPS.items():
            try:
                torch.library.define(f"torchvision::{op}", schema)
            except RuntimeError:  # declared already (by an earlier call)
                pass
        import torchvision
    return torchvision


DATASETS: dict[str, Callable[[DataConfig], Data]] = {  # data.dataset → its loader
    "digits": digits, "generated-images": images224, "generated-sequences": sequences, "table": table,
}
LIBRARIES = {"torchvision": "vision", "timm": "vision"}  # model id prefix → the extra that installs it


def library_of(model_id: str) -> str | None:
    """``torchvision`` for ``torchvision:resnet18``: a model library's architecture by name, or None."""
    prefix, sep, _ = model_id.partition(":")
    return prefix if sep and prefix in LIBRARIES else None


def is_plugin(model_id: str) -> bool:
    return ":" in model_id and library_of(model_id) is None


def default_dataset(model_id: str) -> str:
    """The data set a model trains on unless the config says otherwise: a zoo model's own, image data for
    a library's (image classifiers), digits otherwise (plugins bring their own data)."""
    entry = MODELS.get(model_id)
    return entry.dataset if entry else "generated-images" if library_of(model_id) else "digits"


def _library(prefix: str) -> Any:
    try:
        if prefix == "torchvision":
            return import_torchvision()
        import_torchvision()  # timm imports it
        import timm

        return timm
    except ImportError:
        raise ConfigError(f"model ids {prefix}:NAME need the {prefix} package; install it with "
                          f"pip install -e \".[{LIBRARIES[prefix]}]\"") from None


def _unknown_name(library: str, name: str, names: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, names, n=4, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; it has {len(names)}, e.g. {', '.join(names[:4])}"
    return ConfigError(f"{library} has no classification model {name!r}{hint}")


def library_model(model_id: str, data: Data) -> nn.Module:
    """A library's architecture by name, randomly initialised, its head sized for the data's classes
    (``checkpoint`` then loads the user's trained weights into it)."""
    prefix, _, name = model_id.partition(":")
    lib = _library(prefix)
    if prefix == "torchvision":
        names = lib.models.list_models(module=lib.models)  # the classification models only
        if name not in names:
            raise _unknown_name("torchvision", name, names)
        return lib.models.get_model(name, weights=None, num_classes=data.num_classes)
    if not lib.is_model(name):
        raise _unknown_name("timm", name, lib.list_models())
    return lib.create_model(name, pretrained=False, num_classes=data.num_classes)


def _check_fits(model: nn.Module, data: Data, model_id: str, dataset: str) -> None:
    """A model and data that do not fit (channels, sizes) fail here with both named, not mid-training."""
    x = data.example(2)
    try:
        out = _out_features(model, x)
    except Exception as err:  # whatever the model's forward raises on a wrong input
        raise ConfigError(f"{model_id} cannot run on {dataset} inputs of shape {tuple(x.shape[1:])} "
                          f"({type(err).__name__}: {str(err)[:200]}); choose data that fits it, e.g. "
                          "data.dataset: generated-images for an image model") from None
    if out != data.num_classes:
        raise ConfigError(f"{model_id} gives {out} outputs for {data.num_classes} classes")


_loading_plugin = False  # a plugin whose factory loads a plugin again (QAT Studio's own CLI, say) would recurse


def load_plugin(path: str) -> tuple[nn.Module, Data]:
    """Call ``package.module:factory``; it returns ``(model, train_loader, test_loader)``.

    ``train_loader``/``test_loader`` are re-iterable sequences of ``(inputs, labels)`` batches.
    A plugin cannot end the process: ``sys.exit`` in it becomes a PluginError like any other failure.
    """
    global _loading_plugin
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise PluginError(f"plugin path {path!r} must look like 'package.module:factory'")
    if module_name.split(".")[0] == __name__.split(".")[0]:
        raise PluginError(f"plugin {path!r} is part of QAT Studio itself; a plugin is your own module whose "
                          "factory returns (model, train_loader, test_loader)")
    if _loading_plugin:
        raise PluginError(f"plugin {path!r} was asked for while another plugin's factory was running; a factory "
                          "must build its model and loaders, not start QAT Studio again")
    _loading_plugin = True
    try:
        return _call_plugin(path, module_name, attr)
    finally:
        _loading_plugin = False


def _call_plugin(path: str, module_name: str, attr: str) -> tuple[nn.Module, Data]:
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as err:  # any import-time failure is the plugin's, reported with its cause
        raise PluginError(f"cannot import plugin module {module_name!r}: {type(err).__name__}: {err}. "
                          "Check the name and that its package is installed or on PYTHONPATH") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise PluginError(f"plugin module {module_name!r} has no callable {attr!r}")
    try:
        result = factory()
    except SystemExit as err:
        raise PluginError(f"plugin factory {path} tried to end the process (SystemExit: {err.code!r}); it must "
                          "return (model, train_loader, test_loader)") from None
    except Exception as err:
        raise PluginError(f"plugin factory {path} raised {type(err).__name__}: {err}") from None
    if not (isinstance(result, tuple) and len(result) == 3 and isinstance(result[0], nn.Module)):
        raise PluginError(f"plugin factory {path} must return (model, train_loader, test_loader); "
                          f"got {type(result).__name__}")
    model, train, test = result
    try:
        first_x, first_y = next(iter(train))
    except Exception as err:
        raise PluginError(f"plugin {path}: train_loader must yield (inputs, labels) batches ({err})") from None
    num_classes = int(max(int(first_y.max()) + 1, _out_features(model, first_x)))
    data = Data(first_x, first_y, first_x[:0], first_y[:0], num_classes, generated=False,
                description=f"plugin {path}", train_loader_fn=lambda bs, shuffle, seed: train,
                test_loader_fn=lambda bs: test)
    return model, data


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
    reshaped = [f"{k} is {tuple(state[k].shape)} in the file, {tuple(v.shape)} in the model"
                for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or reshaped:
        def first(keys: list[str]) -> str:
            return ", ".join(keys[:3]) + (f" … ({len(keys)} in all)" if len(keys) > 3 else "")

        problems = ([f"missing {first(missing)}"] if missing else []) + \
                   ([f"unexpected {first(unexpected)}"] if unexpected else []) + reshaped[:2]
        raise PluginError(f"checkpoint {path} does not fit the model (is it for another architecture, or another "
                          f"number of classes?): {'; '.join(problems)}")
    model.load_state_dict(state)


def build(model_id: str, data_cfg: DataConfig) -> tuple[nn.Module, Data]:
    """The float model and its data for a config's ``model`` (zoo id, library architecture, plugin path)."""
    if is_plugin(model_id):
        return load_plugin(model_id)
    if library_of(model_id):
        data = DATASETS[data_cfg.dataset](data_cfg)
        model = library_model(model_id, data)
        _check_fits(model, data, model_id, data_cfg.dataset)
        return model, data
    entry = MODELS.get(model_id)
    if entry is None:
        raise ConfigError(f"model {model_id!r} is not in the zoo ({', '.join(MODELS)}) "
                          "and is not a plugin path 'package.module:factory'")
    if data_cfg.dataset != entry.dataset:
        raise ConfigError(f"model {model_id} is built for the {entry.dataset} data set, not {data_cfg.dataset}; "
                          f"set data.dataset: {entry.dataset}")
    data = entry.data(data_cfg)
    return entry.model(data), data
