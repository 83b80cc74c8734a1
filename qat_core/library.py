"""Architectures no one on the team wrote, by name: ``torchvision:NAME``, ``timm:NAME``.

Each library is an optional extra, imported only when its ids are used. Pretrained weights come from
the library's local cache only (nothing is downloaded); a head for another number of classes is
replaced and named, and an image folder's preprocessing comes from the weights' metadata.
"""

from __future__ import annotations

import difflib
import importlib
import math
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from qat_core import files
from qat_core.config import IMAGE_FIELDS, MIN_IMAGE_SIDE, DataConfig
from qat_core.data import DATASETS, IMAGENET_PRESET, Data, text_table, typical_side
from qat_core.errors import ConfigError
from qat_core.graph import first_line

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


LIBRARIES = {"torchvision": "vision", "timm": "vision", "hf": "hf"}  # model id prefix → the extra that installs it
PACKAGES = {"torchvision": "torchvision", "timm": "timm", "hf": "transformers"}


def library_of(model_id: str) -> str | None:
    """``torchvision`` for ``torchvision:resnet18``: a model library's architecture by name, or None."""
    prefix, sep, _ = model_id.partition(":")
    return prefix if sep and prefix in LIBRARIES else None


def _library(prefix: str) -> Any:
    try:
        if prefix == "torchvision":
            return import_torchvision()
        try:
            import_torchvision()  # timm needs it, transformers imports it where installed
        except ImportError:
            pass
        return importlib.import_module(PACKAGES[prefix])
    except ImportError:
        raise ConfigError(f"model ids {prefix}:{'FOLDER' if prefix == 'hf' else 'NAME'} need the {PACKAGES[prefix]} "
                          f"package; install it with pip install -e \".[{LIBRARIES[prefix]}]\"") from None


def _unknown_name(library: str, name: str, names: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, names, n=4, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; it has {len(names)}, e.g. {', '.join(names[:4])}"
    return ConfigError(f"{library} has no classification model {name!r}{hint}")


def ids_for(name: str) -> list[str]:
    """The library ids of a bare architecture name (``mobilenet_v3_small`` → ``torchvision:…``, ``timm:…``),
    among the libraries installed here: what a user who typed the name alone meant."""
    found = []
    for prefix in ("torchvision", "timm"):
        try:
            lib = _library(prefix)
        except ConfigError:  # not installed: nothing to suggest from it
            continue
        known = (name in lib.models.list_models(module=lib.models)) if prefix == "torchvision" else lib.is_model(name)
        found += [f"{prefix}:{name}"] if known else []
    return found


def library_model(model_id: str, data: Data, weights: str | None = None) -> nn.Module:
    """A library's architecture by name, its head sized for the data's classes: randomly initialised
    (``load_checkpoint`` then loads the user's trained weights), or with the library's pretrained
    ``weights`` read from the local cache, a head for another number of classes replaced."""
    prefix, _, name = model_id.partition(":")
    lib = _library(prefix)
    if prefix == "hf":
        if weights:
            raise ConfigError(f"weights {weights!r}: a Hugging Face model brings its weights in its folder; leave "
                              "weights empty")
        return hf_model(model_id, data)
    if prefix == "torchvision":
        names = lib.models.list_models(module=lib.models)  # the classification models only
        if name not in names:
            raise _unknown_name("torchvision", name, names)
        if weights is None:
            return lib.models.get_model(name, weights=None, num_classes=data.num_classes)
        pretrained = _torchvision_weights(lib, name, weights)
        _require_cached(Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(pretrained.url).path).name,
                        f"torchvision's {name} weights {pretrained.name}", pretrained.url)
        model = lib.models.get_model(name, weights=pretrained)  # from the cache: the file is there
        return replace_head(model, data.num_classes, len(pretrained.meta["categories"]), model_id)
    if not lib.is_model(name):
        raise _unknown_name("timm", name, lib.list_models())
    if weights is None:
        return lib.create_model(name, pretrained=False, num_classes=data.num_classes)
    pretrained = lib.get_pretrained_cfg(name if weights == "DEFAULT" else f"{name}.{weights}")
    if pretrained is None or not pretrained.hf_hub_id:
        raise ConfigError(f"timm has no pretrained weights {weights!r} for {name}; use weights: DEFAULT or a tag "
                          f"timm lists (timm.list_pretrained('{name}*'))")
    from huggingface_hub import try_to_load_from_cache

    found = [try_to_load_from_cache(pretrained.hf_hub_id, f) for f in ("model.safetensors", "pytorch_model.bin")]
    file = next((f for f in found if isinstance(f, str)), None)
    _require_cached(Path(file) if file else None, f"timm's {pretrained.hf_hub_id} weights",
                    f"https://huggingface.co/{pretrained.hf_hub_id}")
    # timm drops a classifier for another number of classes and starts a new one
    model = lib.create_model(name, pretrained=True, num_classes=data.num_classes, pretrained_cfg_overlay={"file": file})
    if data.num_classes != pretrained.num_classes:
        note_new_head(model, pretrained.classifier, data.num_classes, pretrained.num_classes)
    return model


HF_HEADS = {"image": "AutoModelForImageClassification", "text": "AutoModelForSequenceClassification"}


class HFClassifier(nn.Module):
    """A Hugging Face classifier as a plain ``inputs → logits`` module, the shape every other model has:
    pixel values for an image model, token ids for a text model (``pad_id`` masked out of attention)."""

    def __init__(self, model: nn.Module, task: str, pad_id: int = 0):
        super().__init__()
        self.model, self.task, self.pad_id = model, task, pad_id

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.task == "image":
            return self.model(pixel_values=x).logits
        return self.model(input_ids=x, attention_mask=(x != self.pad_id).long()).logits


TOKENIZER_LIMIT = 256 * files.MB  # a large vocabulary's tokenizer.json: tens of MB
HF_CODE_FILES = ("config.json", "tokenizer_config.json", "preprocessor_config.json")  # where auto_map asks for code


def _hf_folder(model_id: str) -> tuple[Path, dict[str, dict[str, Any]]]:
    """The folder of ``hf:FOLDER`` and its JSON files of ``HF_CODE_FILES`` (those it has), checked before
    transformers reads anything: a folder that asks to run its own Python code (``auto_map``) is refused."""
    folder = Path(model_id.partition(":")[2]).expanduser()
    config_file = folder / "config.json"
    if not os.path.lexists(config_file):
        raise ConfigError(f"{model_id}: {folder} is not a folder saved with save_pretrained (it has no config.json); "
                          "save the model with model.save_pretrained(FOLDER) and give hf:FOLDER")
    found: dict[str, dict[str, Any]] = {}
    for name in HF_CODE_FILES:
        if name == "config.json" or os.path.lexists(folder / name):
            found[name] = files.read_json(folder / name, f"{model_id}: the model's {name}", ConfigError)
            if not isinstance(found[name], dict):
                raise ConfigError(f"{model_id}: {folder / name} holds a JSON {type(found[name]).__name__}, not the "
                                  "object save_pretrained writes: it is damaged; save the model again")
            if "auto_map" in found[name]:
                raise ConfigError(f"{model_id}: {folder / name} asks to run the folder's own Python code (auto_map), "
                                  "and QAT Studio never runs code from a model folder. Save the model as one of "
                                  "transformers' own architectures (without custom code) and give that folder")
    model_type = found["config.json"].get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ConfigError(f"{model_id}: {config_file} has no model_type; it is damaged or not a transformers model's "
                          "config: save the model again with model.save_pretrained(FOLDER)")
    return folder, found


def _hf_config(model_id: str) -> Any:
    """The folder's config as transformers reads it (no remote code), its damage a ConfigError."""
    _library("hf")
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    folder, found = _hf_folder(model_id)
    model_type = found["config.json"]["model_type"]
    if model_type not in CONFIG_MAPPING_NAMES:
        raise ConfigError(f"{model_id}: model_type {model_type!r} is not an architecture this transformers "
                          "knows; save the model as one of transformers' own architectures (or update transformers)")
    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as err:  # whatever transformers makes of a damaged file: the folder's problem, named
        raise ConfigError(f"{model_id}: {folder / 'config.json'} cannot be read by transformers "
                          f"({first_line(err)}); save the model again with "
                          "model.save_pretrained(FOLDER)") from None


def hf_task(model_id: str) -> str:
    """``image`` or ``text``: which kind of classifier a saved Hugging Face model is."""
    config = _hf_config(model_id)  # first: it says which extra to install where transformers is missing
    from transformers.models.auto import modeling_auto

    if config.model_type in modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES:
        return "image"
    if config.model_type in modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        return "text"
    raise ConfigError(f"{model_id}: a {config.model_type} model is neither an image nor a sequence classifier in "
                      "transformers; QAT Studio takes *ForImageClassification and *ForSequenceClassification models")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model")  # what tokenizer.save_pretrained writes, one at least


def hf_tokenizer(model_id: str) -> Any:
    from transformers import AutoTokenizer

    folder, _ = _hf_folder(model_id)
    present = [name for name in TOKENIZER_FILES if os.path.lexists(folder / name)]
    if not present:  # transformers would build an empty one
        raise ConfigError(f"{model_id}: no tokenizer saved in {folder} (it has none of "
                          f"{', '.join(TOKENIZER_FILES[:3])}, …); save it beside the model with "
                          "tokenizer.save_pretrained(FOLDER)")
    for name in present:  # typed and bounded first: transformers would block on a FIFO
        files.read_bytes(folder / name, TOKENIZER_LIMIT, f"{model_id}: the tokenizer's {name}", ConfigError)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as err:  # a damaged file, whatever transformers or tokenizers raise for it
        raise ConfigError(f"{model_id}: the tokenizer saved in {folder} cannot be loaded ({first_line(err)}); save it "
                          "again beside the model with tokenizer.save_pretrained(FOLDER)") from None
    if tokenizer.pad_token is None:  # GPT-2's: texts of a batch are padded with its end-of-text token
        if tokenizer.eos_token is None:
            raise ConfigError(f"{model_id}: the tokenizer saved in {folder} has neither a padding nor an end-of-text "
                              "token to pad a batch's texts with; set tokenizer.pad_token and save it again")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def hf_model(model_id: str, data: Data) -> nn.Module:
    """A model saved with ``save_pretrained``, loaded offline, its head sized for the data's classes."""
    import transformers

    task = hf_task(model_id)
    folder, _ = _hf_folder(model_id)
    auto = getattr(transformers, HF_HEADS[task])
    old = _hf_config(model_id).num_labels
    verbosity, bars = transformers.logging.get_verbosity(), transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()  # its load report is a table on stdout; a new head is named below
    transformers.utils.logging.disable_progress_bar()
    try:
        model = auto.from_pretrained(folder, local_files_only=True, num_labels=data.num_classes,
                                     ignore_mismatched_sizes=True, trust_remote_code=False)
    except Exception as err:  # a missing or damaged weights file, whatever transformers or safetensors raise
        raise ConfigError(f"{model_id}: its weights cannot be loaded from {folder} ({first_line(err)}); save the "
                          "model with model.save_pretrained(FOLDER)") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()
    model.eval()
    pad = hf_tokenizer(model_id).pad_token_id if task == "text" else None  # the ids the data is padded with
    if pad is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad  # GPT-2's classifier reads the logits at each text's last token before it
    pad = pad if pad is not None else getattr(model.config, "pad_token_id", None)
    wrapped = HFClassifier(model, task, pad if pad is not None else 0)
    if old != data.num_classes:
        note_new_head(wrapped, "model." + head(model)[0], data.num_classes, old)
    return wrapped


def _torchvision_weights(tv: Any, name: str, tag: str) -> Any:
    try:
        enum = tv.models.get_model_weights(name)
    except (ValueError, KeyError):
        raise ConfigError(f"torchvision has no pretrained weights for {name}; leave weights empty") from None
    if tag not in enum.__members__:
        raise ConfigError(f"torchvision's {name} has no weights {tag!r}; it has {', '.join(enum.__members__)}")
    return enum[tag]


def _require_cached(path: Path | None, what: str, url: str) -> None:
    """Pretrained weights come from the local cache only: a missing file is a message, never a download
    (which would hang or fail on a machine without internet)."""
    if path is None or not path.is_file():
        where = f" ({path})" if path else ""
        raise ConfigError(f"{what} are not in the local cache{where}, and QAT Studio downloads nothing. Fetch "
                          f"them on a connected machine ({url}) into the same cache, or save them with "
                          "torch.save(model.state_dict(), FILE) and give that file as the checkpoint")


def head(model: nn.Module) -> tuple[str, nn.Module]:
    """The classifier: the last Linear (or 1×1 Conv2d, SqueezeNet's) the model registers."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not found:
        raise ConfigError(f"{type(model).__name__} has no Linear or Conv2d layer to act as its classifier")
    return found[-1]


def replace_head(model: nn.Module, num_classes: int, old_classes: int, model_id: str) -> nn.Module:
    """``model`` with a new, randomly initialised head for ``num_classes`` when its head has another size
    (the FP32 baseline then trains it); the layer's row in the plan table says so."""
    if num_classes == old_classes:
        return model
    name, old = head(model)
    if isinstance(old, nn.Linear):
        new: nn.Module = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride, old.padding, bias=old.bias is not None)
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)
    note_new_head(model, name, num_classes, old_classes)
    return model


def note_new_head(model: nn.Module, name: str, classes: int, old_classes: int) -> None:
    model.new_head = name
    model.layer_notes = {name: f"new head for {classes} classes (the weights had {old_classes}), trained with the FP32 "
                               "baseline"}


def new_head(model: nn.Module) -> str | None:
    """The name of a head that ``replace_head`` started afresh, or None."""
    return getattr(model, "new_head", None)


def image_preset(model_id: str, weights: str | None = None) -> dict[str, Any]:
    """How an image model's inputs are prepared (resize, crop, mean, std): from its weights' metadata —
    torchvision's weight enums, timm's pretrained configs — else ImageNet's usual 256 → 224. ``min_side``:
    the smallest crop the model runs on (a ViT's position embeddings fix its size)."""
    prefix = library_of(model_id)
    name = model_id.partition(":")[2]
    if prefix == "torchvision":
        tv = _library(prefix)
        try:
            found = _torchvision_weights(tv, name, weights or "DEFAULT")
        except ConfigError:  # no pretrained weights: nothing says otherwise
            return dict(IMAGENET_PRESET)
        t = found.transforms()
        return {"resize_size": t.resize_size[0], "image_size": t.crop_size[0], "mean": tuple(t.mean),
                "std": tuple(t.std), "min_side": found.meta.get("min_size", (1,))[0]}
    if prefix == "hf":
        return _hf_preset(model_id)
    if prefix == "timm":
        pretrained = _library(prefix).get_pretrained_cfg(name if weights in (None, "DEFAULT") else f"{name}.{weights}")
        if pretrained is not None:
            size = pretrained.input_size[-1]
            return {"resize_size": math.floor(size / pretrained.crop_pct), "image_size": size,
                    "mean": tuple(pretrained.mean), "std": tuple(pretrained.std),
                    "min_side": size if pretrained.fixed_input_size else 1}
    return dict(IMAGENET_PRESET)


def _hf_preset(model_id: str) -> dict[str, Any]:
    """From the folder's ``preprocessor_config.json`` (saved with the image processor), else the model's
    input size with ImageNet's statistics."""
    folder, found = _hf_folder(model_id)
    size = found["config.json"].get("image_size", IMAGENET_PRESET["image_size"])
    size = size[-1] if isinstance(size, list | tuple) and size else size
    preset = dict(IMAGENET_PRESET) | {"image_size": size, "resize_size": size}
    p = found.get("preprocessor_config.json")
    if p is not None:
        resize, crop = p.get("size"), p.get("crop_size")
        preset["image_size"] = _side(crop, "height") or _side(resize, "height", "shortest_edge") or size
        preset["resize_size"] = _side(resize, "shortest_edge", "height") or preset["image_size"]
        preset |= {k: p[f"image_{k}"] for k in ("mean", "std") if p.get(f"image_{k}")}
    sides = [preset[k] for k in ("image_size", "resize_size")]
    stats = [preset[k] for k in ("mean", "std")]
    if not (all(type(v) is int and v > 0 for v in sides) and all(
            isinstance(v, list | tuple) and len(v) == 3 and all(type(c) in (int, float) for c in v) for v in stats)):
        raise ConfigError(f"{model_id}: the image size, mean or std in {folder}'s config.json or "
                          f"preprocessor_config.json cannot be used (sides {sides}, mean and std {stats}): the file is "
                          "damaged; save the model and its image processor again with save_pretrained(FOLDER)")
    return preset | {k: tuple(preset[k]) for k in ("mean", "std")}


def _side(entry: Any, *keys: str) -> Any:
    """A side in pixels from an image processor's ``size``/``crop_size``: ``{"height": h, …}``, ``{"shortest_edge":
    s}``, or a plain number (older processors)."""
    if isinstance(entry, dict):
        return next((entry[k] for k in keys if entry.get(k)), None)
    return entry


def library_data(model_id: str, data_cfg: DataConfig) -> Data:
    """A library model's data: a built-in or image data set, or a text table in its own tokenizer's ids."""
    if data_cfg.dataset != "text-table":
        return DATASETS[data_cfg.dataset](data_cfg)
    if library_of(model_id) != "hf" or hf_task(model_id) != "text":
        raise ConfigError(f"dataset text-table is tokenized by a Hugging Face text classifier's own tokenizer "
                          f"(hf:FOLDER); {model_id} takes images")
    return text_table(data_cfg, hf_tokenizer(model_id))


def resolve_data(model_id: str, data_cfg: DataConfig, weights: str | None = None) -> DataConfig:
    """``data_cfg`` with an image folder's unset preprocessing taken from the model (``image_preset``), so a
    config records what its run used."""
    unset = [f for f in IMAGE_FIELDS if getattr(data_cfg, f) is None]
    if data_cfg.dataset != "image-folder" or not unset:
        return data_cfg
    preset = image_preset(model_id, weights)
    side = typical_side(Path(data_cfg.path or "")) if data_cfg.image_size is None and library_of(model_id) != "hf" \
        else None  # a Hugging Face model's config fixes its size
    if side is not None and max(preset.get("min_side", 1), MIN_IMAGE_SIDE) <= side < preset["image_size"]:
        preset |= {"image_size": side, "resize_size": side}  # small images, used whole
    if data_cfg.image_size is not None and data_cfg.resize_size is None:  # a crop of its own: keep the ratio
        preset["resize_size"] = max(data_cfg.image_size,
                                    round(data_cfg.image_size * preset["resize_size"] / preset["image_size"]))
    return data_cfg.model_copy(update={f: preset[f] for f in unset})
