"""The versioned, validated description of a run: ``RunConfig``.

A config is plain data (pydantic models, ``extra="forbid"``): it is saved with every run, rebuilt
from widgets, and read/written as YAML or JSON. Every error names the field and what is allowed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, field_validator, model_validator

from qat_core.errors import ConfigError

SCHEMA_VERSION = 1
MIN_BITS, MAX_BITS = 2, 8
RangeMethod = Literal["minmax", "moving_average", "percentile", "mse", "lsq"]
RANGE_METHODS: tuple[str, ...] = RangeMethod.__args__
Granularity = Literal["per_tensor", "per_channel"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check_bits(value: Any) -> int | None:
    """Bits are an integer 2..8, or off (``None``/``"off"``/``false``)."""
    if value is None or value is False or (isinstance(value, str) and value.lower() == "off"):
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be a whole number from {MIN_BITS} to {MAX_BITS}, or off; got {value!r}")
    if not MIN_BITS <= value <= MAX_BITS:
        raise ValueError(f"must be from {MIN_BITS} to {MAX_BITS} bits, or off; got {value}")
    return value


class QuantSpec(_Strict):
    """How one layer is quantized."""

    weight_bits: int | None = 8  # 2..8, or None: weights stay FP32
    act_bits: int | None = 8  # 2..8, or None: output activations stay FP32
    granularity: Granularity = "per_channel"  # weight scales: one per tensor or per output channel
    symmetric: bool = True  # zero point fixed at 0 (weights) / mid-range (signed activations)
    range_method: RangeMethod = "lsq"  # how ranges are found (observers) or learned (LSQ)
    percentile: float = Field(99.99, gt=50.0, le=100.0)  # used by range_method="percentile"

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
    percentile: float | None = Field(None, gt=50.0, le=100.0)

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
                f"plan.overrides names layer(s) {', '.join(unknown)} that the model does not have; "
                f"its quantizable layers are: {', '.join(layer_names)}"
            )


class DataConfig(_Strict):
    dataset: str = "digits"  # zoo data set id (ignored for plugins, which bring their own loaders)
    test_fraction: float = Field(0.25, gt=0.0, lt=1.0)  # share of samples held out for testing
    split_seed: int = 0  # seed of the train/test split (independent of the training seed)


class BaselineConfig(_Strict):
    """How the FP32 baseline is trained (once per model, data and seed, then reused)."""

    epochs: int = Field(20, ge=1, le=1000)
    batch_size: int = Field(128, ge=1, le=65536)
    lr: float = Field(1e-2, gt=0.0, le=10.0)
    max_steps: int | None = Field(None, ge=1)  # cap for the large zoo models on generated data


class FineTuneConfig(_Strict):
    """The QAT fine-tune after calibration."""

    epochs: float = Field(6, ge=0, le=1000)  # 0 = PTQ only
    max_steps: int | None = Field(None, ge=1)  # stop after this many steps even mid-epoch
    batch_size: int = Field(64, ge=1, le=65536)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0.0, le=10.0)  # weights; LSQ scales use the same rate
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    calibration_batches: int = Field(8, ge=1, le=10000)  # batches seen by observers before training
    # stop updating BN statistics from this epoch; 0: BN folded with frozen statistics from the start
    # (fine-tuning a trained model: the simulated network is the deployed one at every step)
    freeze_bn_epoch: float | None = Field(0, ge=0)
    freeze_ranges_epoch: float | None = Field(None, ge=0)  # stop observers / LSQ scale updates from this epoch
    eval_every_epochs: float = Field(1.0, gt=0)  # how often test accuracy is measured during the fine-tune


class RunConfig(_Strict):
    """Everything that defines a run; saved with it, so the run can be reproduced."""

    version: int = SCHEMA_VERSION
    name: str = ""  # a label for people; not part of identity
    model: str = "digits-cnn"  # zoo id, or a plugin path "package.module:factory"
    checkpoint: str | None = None  # optional state_dict file (loaded with weights_only=True)
    data: DataConfig = DataConfig()
    plan: LayerPlan = LayerPlan()
    baseline: BaselineConfig = BaselineConfig()
    finetune: FineTuneConfig = FineTuneConfig()
    seed: int = Field(0, ge=0)
    device: Literal["cpu", "cuda", "auto"] = "cpu"  # where training runs; "auto": CUDA when present

    @field_validator("version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != SCHEMA_VERSION:
            raise ValueError(f"this QAT Studio reads config version {SCHEMA_VERSION}; the file says {v}")
        return v

    @model_validator(mode="after")
    def _model_id(self) -> RunConfig:
        if not self.model.strip():
            raise ValueError("model must be a zoo id or a plugin path 'package.module:factory'")
        return self

    # --- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "config"
        if e["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown key; remove it or check its spelling")
        elif e["type"] == "literal_error":
            lines.append(f"{where}: {e['msg'].replace('Input should be', 'must be')}; got {e['input']!r}")
        elif e["type"].startswith("value_error"):
            lines.append(f"{where}: {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"{where}: {e['msg'].replace('Input should be', 'must be')}; got {e['input']!r}")
    return "invalid config:\n  " + "\n  ".join(lines)


def from_dict(data: Any) -> RunConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of keys to values, got {type(data).__name__}")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err)) from None


def parse(text: str, source: str = "config") -> RunConfig:
    """Parse YAML or JSON text (JSON is YAML) into a validated config."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{source} is not valid YAML/JSON{where}: {getattr(err, 'problem', err)}") from None
    if data is None:
        raise ConfigError(f"{source} is empty; start from `qat-studio config init --model digits-cnn`")
    return from_dict(data)


def load(path: str | Path) -> RunConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text file; a config is YAML or JSON") from None
    return parse(text, source=str(path))


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
