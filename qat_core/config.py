"""The versioned, validated description of a run: ``RunConfig``.

A config is plain data (pydantic models, ``extra="forbid"``): it is saved with every run, rebuilt
from widgets, and read/written as YAML or JSON. Every error names the field and what is allowed.

Reading is bounded and total: input size, nesting depth and the values that YAML aliases expand to
are limited while parsing (before anything is built), and every message quotes at most a short
excerpt of the input. Whatever the text, ``parse`` returns a ``RunConfig`` or raises ``ConfigError``.
"""

from __future__ import annotations

import json
import os
import reprlib
import stat
from collections.abc import Hashable, Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from qat_core.errors import ConfigError

SCHEMA_VERSION = 1
MIN_BITS, MAX_BITS = 2, 8
RangeMethod = Literal["minmax", "moving_average", "percentile", "mse", "lsq"]
RANGE_METHODS: tuple[str, ...] = RangeMethod.__args__
Granularity = Literal["per_tensor", "per_channel"]
# the zoo's data sets (``zoo.ZooEntry.dataset``); plugins bring their own data and ignore this field
Dataset = Literal["digits", "generated-images", "generated-sequences", "table", "image-folder", "text-table"]
FROM_DISK = ("table", "image-folder", "text-table")  # data sets read from data.path
IMAGE_FIELDS = ("image_size", "resize_size", "mean", "std")  # an image folder's preprocessing
TEXT_FIELDS = ("text_column", "max_length")  # a text table's
DATASETS: tuple[str, ...] = Dataset.__args__
MAX_SEED = 2**32 - 1  # NumPy and PyTorch seeds are 32-bit
MIN_IMAGE_SIDE = 8  # pixels: the smallest crop an image model is given

# Input limits: a real config is a few KB, four levels deep, with a few hundred values.
MAX_INPUT_SIZE = 1_000_000  # characters of text, bytes of a file
MAX_DEPTH = 64
MAX_VALUES = 100_000  # counted with each alias (*name) standing for the whole node it repeats
MAX_NUMBER_CHARS = 100  # int() on longer YAML numbers is slow (1:2:3:… is base 60) or refused (> 4300 digits)
EXCERPT_CHARS = 80  # the most of the user's input a message quotes
MAX_LISTED_ERRORS = 5  # with each line clipped, keeps a message under 2 KB whatever the input


def _clip(text: str, limit: int = EXCERPT_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class _ExcerptRepr(reprlib.Repr):
    """``repr`` that looks at a few items of a few levels only: cheap for any input, even a huge one."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxdict, self.maxlist, self.maxtuple, self.maxset = 3, 4, 4, 4, 4
        self.maxstring = self.maxother = EXCERPT_CHARS

    def repr_int(self, x: int, level: int) -> str:
        # repr() of an int over 4300 digits raises ValueError
        return super().repr_int(x, level) if x.bit_length() <= 1000 else f"<a {x.bit_length()}-bit number>"


def _excerpt(value: Any) -> str:
    """A short quote of a user's value for a message."""
    return _clip(_ExcerptRepr().repr(value))


def _names(names: list[str], limit: int = 600) -> str:
    """Names joined by commas, as many as fit in ``limit`` characters, then how many were left out."""
    shown: list[str] = []
    size = 0
    for name in map(_clip, names):
        size += len(name) + 2
        if size > limit:
            break
        shown.append(name)
    rest = len(names) - len(shown)
    return ", ".join(shown) + (f" and {rest} more" if rest else "")


def _not_bool(value: Any) -> Any:
    """YAML ``true`` is not the number 1 (pydantic's lax mode would read it as one)."""
    if isinstance(value, bool):
        raise ValueError(f"must be a number, not {str(value).lower()}")
    return value


def _seed_range(value: int) -> int:
    if not 0 <= value <= MAX_SEED:
        raise ValueError(f"must be from 0 to {MAX_SEED} (NumPy and PyTorch seeds are 32-bit); got {_excerpt(value)}")
    return value


Int = Annotated[int, BeforeValidator(_not_bool)]
Float = Annotated[float, BeforeValidator(_not_bool)]
Seed = Annotated[int, BeforeValidator(_not_bool), AfterValidator(_seed_range)]
Positive = Annotated[float, BeforeValidator(_not_bool), Field(gt=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check_bits(value: Any) -> int | None:
    """Bits are an integer 2..8, or off (``None``/``"off"``/``false``)."""
    if value is None or value is False or (isinstance(value, str) and value.lower() == "off"):
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be a whole number from {MIN_BITS} to {MAX_BITS}, or off; got {_excerpt(value)}")
    if not MIN_BITS <= value <= MAX_BITS:
        raise ValueError(f"must be from {MIN_BITS} to {MAX_BITS} bits, or off; got {_excerpt(value)}")
    return value


class QuantSpec(_Strict):
    """How one layer is quantized."""

    weight_bits: int | None = 8  # 2..8, or None: weights stay FP32
    act_bits: int | None = 8  # 2..8, or None: output activations stay FP32
    granularity: Granularity = "per_channel"  # weight scales: one per tensor or per output channel
    symmetric: bool = True  # zero point fixed at 0 (weights) / mid-range (signed activations)
    range_method: RangeMethod = "lsq"  # how ranges are found (observers) or learned (LSQ)
    percentile: Float = Field(99.99, gt=50.0, le=100.0)  # used by range_method="percentile"

    @field_validator("weight_bits", "act_bits", mode="before")
    @classmethod
    def _bits(cls, v: Any) -> int | None:
        return _check_bits(v)

    @property
    def enabled(self) -> bool:
        return self.weight_bits is not None or self.act_bits is not None


class QuantOverride(_Strict):
    """A partial ``QuantSpec`` for one layer: fields left out come from the plan's default."""

    weight_bits: int | Literal["off"] | None = None  # None: inherit; "off": keep FP32
    act_bits: int | Literal["off"] | None = None
    granularity: Granularity | None = None
    symmetric: bool | None = None
    range_method: RangeMethod | None = None
    percentile: Float | None = Field(None, gt=50.0, le=100.0)

    @field_validator("weight_bits", "act_bits", mode="before")
    @classmethod
    def _bits(cls, v: Any) -> Any:
        if v is None:
            return None
        return _check_bits(v) or "off"

    def changes(self) -> dict[str, Any]:
        """The fields this override sets, with "off" bits as ``None`` (QuantSpec's form)."""
        return {k: (None if v == "off" else v) for k, v in self.model_dump(exclude_none=True).items()}


class LayerPlan(_Strict):
    """A default spec for every quantizable layer, plus overrides by module name."""

    default: QuantSpec = QuantSpec()
    overrides: dict[str, QuantOverride] = {}

    @field_serializer("overrides")
    def _compact(self, overrides: dict[str, QuantOverride]) -> dict[str, dict[str, Any]]:
        return {name: o.model_dump(exclude_none=True) for name, o in overrides.items()}

    def spec_for(self, name: str) -> QuantSpec:
        override = self.overrides.get(name)
        if override is None:
            return self.default
        return QuantSpec(**(self.default.model_dump() | override.changes()))

    def check_names(self, layer_names: list[str]) -> None:
        """Reject overrides for layers the model does not have, listing the real names."""
        unknown = sorted(set(self.overrides) - set(layer_names))
        if unknown:
            raise ConfigError(
                f"plan.overrides names layer(s) {_names(unknown)} that the model does not have; "
                f"its quantizable layers are: {_names(layer_names)}"
            )


class DataConfig(_Strict):
    dataset: Dataset = "digits"  # zoo data set id (ignored for plugins, which bring their own loaders)
    path: str | None = Field(None, max_length=4096)  # (text-)table: a CSV or Parquet file; image-folder: a folder
    label_column: str = Field("label", min_length=1, max_length=256)  # (text-)table: the class of each row
    text_column: str = Field("text", min_length=1, max_length=256)  # text-table: the text of each row
    max_length: Int = Field(128, ge=2, le=8192)  # text-table: tokens a text is cut to
    max_samples: Int | None = Field(None, ge=4)  # a seeded random subset, for short fine-tunes on a CPU
    test_fraction: Float = Field(0.25, gt=0.0, lt=1.0)  # share of samples held out for testing
    split_seed: Seed = 0  # seed of the train/test split (independent of the training seed)
    # image-folder preprocessing (resize the shorter side, center-crop, normalise); None: from the model's
    # weights metadata when it has some, else ImageNet's 256 → 224 and mean/std
    image_size: Int | None = Field(None, ge=MIN_IMAGE_SIDE, le=1024)  # side of the center crop the model sees
    resize_size: Int | None = Field(None, ge=8, le=2048)  # the shorter side before the crop
    mean: tuple[Float, Float, Float] | None = None  # per RGB channel, of pixel values in [0, 1]
    std: tuple[Positive, Positive, Positive] | None = None

    @model_validator(mode="after")
    def _path_for_files_only(self) -> DataConfig:
        what = {"table": "a CSV or Parquet file with a label column",
                "image-folder": "a folder with one sub-folder of images per class",
                "text-table": "a CSV or Parquet file with a text column and a label column"}
        if self.dataset in FROM_DISK and not self.path:
            raise ValueError(f"dataset {self.dataset} needs data.path: {what[self.dataset]}")
        if self.dataset not in FROM_DISK and self.path:
            raise ValueError(f"data.path is for datasets {', '.join(FROM_DISK)}; dataset {self.dataset} is built in")
        image_fields = [f for f in IMAGE_FIELDS if getattr(self, f) is not None]
        if image_fields and self.dataset != "image-folder":
            raise ValueError(f"data.{image_fields[0]} is for dataset image-folder only")
        if self.image_size and self.resize_size and self.resize_size < self.image_size:
            raise ValueError(f"data.resize_size {self.resize_size} is smaller than the {self.image_size}-pixel crop; "
                             "make it at least data.image_size")
        return self


class BaselineConfig(_Strict):
    """How the FP32 baseline is trained (once per model, data and seed, then reused)."""

    epochs: Int = Field(20, ge=1, le=1000)
    batch_size: Int = Field(128, ge=1, le=65536)
    lr: Float = Field(1e-2, gt=0.0, le=10.0)
    max_steps: Int | None = Field(None, ge=1)  # cap for the large zoo models on generated data


class FineTuneConfig(_Strict):
    """The QAT fine-tune after calibration."""

    epochs: Float = Field(6, ge=0, le=1000)  # 0 = PTQ only
    max_steps: Int | None = Field(None, ge=1)  # stop after this many steps even mid-epoch
    batch_size: Int = Field(64, ge=1, le=65536)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: Float = Field(1e-3, gt=0.0, le=10.0)  # weights; LSQ scales use the same rate
    weight_decay: Float = Field(0.0, ge=0.0, le=1.0)
    calibration_batches: Int = Field(8, ge=1, le=10000)  # batches seen by observers before training
    # stop updating BN statistics from this epoch; 0: BN folded with frozen statistics from the start
    # (fine-tuning a trained model: the simulated network is the deployed one at every step)
    freeze_bn_epoch: Float | None = Field(0, ge=0)
    freeze_ranges_epoch: Float | None = Field(None, ge=0)  # stop observers / LSQ scale updates from this epoch
    eval_every_epochs: Float = Field(1.0, gt=0)  # how often test accuracy is measured during the fine-tune
    # share of the training split held out from the fine-tune (at most data.MAX_VALIDATION_SAMPLES samples) on
    # which the guard judges it; 0: no split, and the guard watches the training loss only
    validation_fraction: Float = Field(0.1, ge=0.0, lt=1.0)
    # keep the fine-tune from ending worse than its PTQ start: a loss that rises well above its start stops it, and
    # validation accuracy that falls below its start rolls it back to its best point (off: keep the last weights,
    # and a diverged or collapsed fine-tune fails the run)
    guard: bool = True
    distill: bool = False  # learn from the FP32 model's softened outputs as well as from the labels


class RunConfig(_Strict):
    """Everything that defines a run; saved with it, so the run can be reproduced."""

    version: Int = SCHEMA_VERSION
    name: str = ""  # a label for people; not part of identity
    model: str = "digits-cnn"  # zoo id, or a plugin path "package.module:factory"
    checkpoint: str | None = None  # optional state_dict file (loaded with weights_only=True)
    # a library model's pretrained weights by name (torchvision: DEFAULT, IMAGENET1K_V1, …; timm: DEFAULT),
    # read from the local cache only; a head for another number of classes is replaced
    weights: str | None = Field(None, min_length=1, max_length=128)
    data: DataConfig = DataConfig()
    plan: LayerPlan = LayerPlan()
    baseline: BaselineConfig = BaselineConfig()
    finetune: FineTuneConfig = FineTuneConfig()
    seed: Seed = 0
    device: Literal["cpu", "cuda", "auto"] = "cpu"  # where training runs; "auto": CUDA when present

    @field_validator("version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != SCHEMA_VERSION:
            raise ValueError(f"this QAT Studio reads config version {SCHEMA_VERSION}; the file says {_excerpt(v)}")
        return v

    @model_validator(mode="after")
    def _model_id(self) -> RunConfig:
        if not self.model.strip():
            raise ValueError("model must be a zoo id or a plugin path 'package.module:factory'")
        if self.weights and self.checkpoint:
            raise ValueError("give weights (a library's pretrained weights by name) or checkpoint (your own file), "
                             "not both")
        return self

    # --- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def describe(err: ValidationError, what: str = "config") -> str:
    """A validation error as one line per problem (at most a few), each naming its field."""
    errors = err.errors(include_url=False)
    lines = [_describe_one(e) for e in errors[:MAX_LISTED_ERRORS]]
    if len(errors) > MAX_LISTED_ERRORS:
        lines.append(f"… and {len(errors) - MAX_LISTED_ERRORS} more problems; fix these first")
    return f"invalid {what}:\n  " + "\n  ".join(lines)


def _describe_one(e: ErrorDetails) -> str:
    where = _clip(".".join(str(p) for p in e["loc"]), 100) or "config"
    if e["type"] == "extra_forbidden":
        return f"{where}: unknown key; remove it or check its spelling"
    if e["type"].startswith("value_error"):
        return f"{where}: {_clip(e['msg'].removeprefix('Value error, '), 240)}"
    return f"{where}: {_clip(e['msg'].replace('Input should be', 'must be'), 160)}; got {_excerpt(e['input'])}"


def field_errors(data: dict[str, Any]) -> dict[str, str]:
    """What is wrong with each field of a config given as a mapping (``{"finetune.lr": "must be greater
    than 0; got 0.0"}``), empty when it is valid: for forms that show each message beside its control."""
    try:
        RunConfig.model_validate(data)
    except ValidationError as err:
        return by_field(err)
    return {}


def by_field(err: ValidationError) -> dict[str, str]:
    """A validation error as ``{field: message}``, the first message of each field (see :func:`field_errors`)."""
    out: dict[str, str] = {}
    for e in err.errors(include_url=False):
        where, _, message = _describe_one(e).partition(": ")
        out.setdefault(where, message)
    return out


def from_dict(data: Any) -> RunConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of keys to values, got {type(data).__name__}")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(describe(err)) from None


class _LimitExceeded(yaml.MarkedYAMLError):
    """Valid YAML, but larger or deeper than any config: refused before it is built."""


def _check_limits(events: Iterable[yaml.Event]) -> None:
    """Walk the parser's events (nothing built yet) and refuse a document deeper than ``MAX_DEPTH``
    or holding more than ``MAX_VALUES`` values, each alias (*name) counting the values it repeats:
    a "billion laughs" document is refused after a few hundred bytes, never expanded."""
    depth = values = 0
    open_nodes: list[tuple[str | None, int]] = []  # (anchor, values before it) per open mapping/sequence
    anchored: dict[str, int] = {}  # anchor → values in its node, aliases inside it counted in full
    for event in events:
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise _LimitExceeded(None, None, f"it nests more than {MAX_DEPTH} levels deep (a config needs 4)",
                                     event.start_mark)
            open_nodes.append((event.anchor, values))
            values += 1
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
            anchor, before = open_nodes.pop()
            if anchor is not None:
                anchored[anchor] = values - before
        elif isinstance(event, yaml.ScalarEvent):
            values += 1
            if event.anchor is not None:
                anchored[event.anchor] = 1
        elif isinstance(event, yaml.AliasEvent):
            if event.anchor not in anchored:  # undefined, or inside the very node it names (a loop)
                raise _LimitExceeded(None, None, f"alias *{_clip(event.anchor)} does not follow a complete "
                                     f"&{_clip(event.anchor)} node; define the anchor first, outside the alias",
                                     event.start_mark)
            values += anchored[event.anchor]
        if values > MAX_VALUES:
            raise _LimitExceeded(None, None, f"it holds more than {MAX_VALUES:,} values, counting each alias "
                                 "(*name) as the values it repeats; a config has a few hundred", event.start_mark)


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml if built: pure Python takes seconds a MB
    """PyYAML's safe loader, stricter: a key given twice in one mapping is an error (not a silent
    last-wins), too long a number is refused before ``int()`` sees it, and a value that does not fit
    its type (the date 2001-13-45) is a YAML error with its line."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:  # always deep: a collection is filled here, inside the try, so its errors carry its line
            return super().construct_object(node, deep=True)
        except (ValueError, TypeError, LookupError, AttributeError, ArithmeticError) as err:
            # PyYAML's own errors when a value does not fit its type: 2001-13-45, `!!bool maybe`
            what = _excerpt(node.value) if isinstance(node, yaml.ScalarNode) else f"this {node.id}"
            why = f": {_clip(str(err), 120)}" if isinstance(err, ValueError) else ""
            problem = f"{what} is not a valid {node.tag.replace('tag:yaml.org,2002:', '!!')}{why}"
            raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark) from None

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):  # PyYAML refuses any other node with its own message
            self._check_unique_keys(node)
        return super().construct_mapping(node, deep)

    def _check_unique_keys(self, node: yaml.MappingNode) -> None:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` merges may repeat keys on purpose
            key = self.construct_object(key_node)
            if not isinstance(key, Hashable):
                continue  # PyYAML refuses it with its own message
            if key in first_line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {_excerpt(key)} is given twice in one mapping (first at line "
                    f"{first_line[key] + 1}); keep one: YAML would silently use the last", key_node.start_mark)
            first_line[key] = key_node.start_mark.line


def _construct_int(loader: _Loader, node: yaml.ScalarNode) -> int:
    if len(node.value) > MAX_NUMBER_CHARS:
        raise _LimitExceeded(None, None, f"a number of {len(node.value):,} characters (a config's numbers have "
                             f"at most {MAX_NUMBER_CHARS})", node.start_mark)
    return yaml.constructor.SafeConstructor.construct_yaml_int(loader, node)


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def _where(err: yaml.YAMLError, text: str) -> str:
    mark = getattr(err, "problem_mark", None)
    if mark is None:
        return ""
    line, column = mark.line, mark.column
    if mark.index >= len(text):  # libyaml puts the end of a text without a final newline on a line after it
        line, column = text.count("\n"), len(text) - text.rfind("\n") - 1
    return f" at line {line + 1}, column {column + 1}"


def parse(text: str, source: str = "config") -> RunConfig:
    """Parse YAML or JSON text (JSON is YAML) into a validated config."""
    data = parse_yaml(text, source)
    if data is None:
        raise ConfigError(f"{_clip(source, 200)} is empty; start from `qat-studio config init --model digits-cnn`")
    return from_dict(data)


def parse_yaml(text: str, source: str) -> Any:
    """YAML or JSON text as Python data, within the size and nesting limits; None for an empty text."""
    source = _clip(source, 200)
    if len(text) > MAX_INPUT_SIZE:
        raise ConfigError(f"{source} has {len(text):,} characters; a config has at most {MAX_INPUT_SIZE:,} "
                          "(a few thousand is usual): is it the right file?")
    try:
        _check_limits(yaml.parse(text, Loader=_Loader))
        data = yaml.load(text, Loader=_Loader)
    except _LimitExceeded as err:
        raise ConfigError(f"{source} is refused{_where(err, text)}: {err.problem}") from None
    except yaml.YAMLError as err:
        problem = _clip(str(getattr(err, "problem", err)), 200)
        raise ConfigError(f"{source} is not valid YAML/JSON{_where(err, text)}: {problem}") from None
    except UnicodeEncodeError as err:  # libyaml reads UTF-8; only a str built in Python can hold these
        raise ConfigError(f"{source} is not valid text: character {err.start + 1:,} is a lone surrogate, "
                          "which UTF-8 cannot hold") from None
    return data


def read_text(path: Path) -> str:
    """A small regular file's text. Opened without blocking and checked before reading: a FIFO would
    hang the read and /dev/zero never ends."""
    name = _clip(str(path), 200)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise ConfigError(f"config file {name} does not exist") from None
    except OSError as err:
        raise ConfigError(f"config file {name} cannot be opened: {err.strerror}") from None
    except ValueError:  # a NUL character in the name
        raise ConfigError(f"config file name {name!r} is not a valid path") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        what = ("a directory; give the config file (YAML or JSON) inside it" if stat.S_ISDIR(mode)
                else "not a regular file (a device, pipe or socket); a config is a YAML or JSON file")
        raise ConfigError(f"{name} is {what}")
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_INPUT_SIZE + 1)  # one byte more than allowed tells a file that is too large
    if len(data) > MAX_INPUT_SIZE:
        raise ConfigError(f"{name} is over {MAX_INPUT_SIZE:,} bytes; a config is a few KB: is it the right file?")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{name} is not a text file; a config is YAML or JSON") from None


def load(path: str | Path) -> RunConfig:
    path = Path(path)
    return parse(read_text(path), source=str(path))


def save(config: RunConfig, path: str | Path) -> None:
    path = Path(path)
    path.write_text(config.to_json() if path.suffix == ".json" else config.to_yaml(), encoding="utf-8")


def with_uniform_plan(
    base: RunConfig, layer_names: list[str], weight_bits: int | None, act_bits: int | None, keep_ends_8bit: bool = True
) -> RunConfig:
    """The common plan: every layer at the chosen widths, the first and last at 8 bits."""
    default = base.plan.default.model_copy(update={"weight_bits": weight_bits, "act_bits": act_bits})
    overrides = {}
    if keep_ends_8bit and layer_names:
        ends = {}  # only what differs from the default: an all-8-bit plan has no overrides
        if weight_bits not in (None, 8):
            ends["weight_bits"] = 8
        if act_bits not in (None, 8):
            ends["act_bits"] = 8
        if ends:
            overrides = {name: QuantOverride(**ends) for name in dict.fromkeys((layer_names[0], layer_names[-1]))}
    plan = LayerPlan(default=QuantSpec.model_validate(default.model_dump()), overrides=overrides)
    return base.model_copy(update={"plan": plan})
