"""The layer plan as an editable table: config ↔ one row a quantizable layer, presets, a one-line summary.

The Plan page shows :func:`plan_frame` in a data editor and turns the edited table back into a config
with :func:`plan_from_frame`, which validates every cell on the server (the browser's column limits
are no guard) and names the layer and column of a bad cell. ``rows`` are the model's layers as
``prepare.layer_table`` lists them (name, kind, fused, params, has_weights).

Not imported by ``runner`` or ``cli train``, so pandas stays out of a training process's start-up.
"""

from __future__ import annotations

import numbers
from typing import Any

import pandas as pd

from qat_core import config as cfg
from qat_core import cpu
from qat_core.errors import ConfigError

Rows = list[dict[str, Any]]

PLAN_FIELDS = ("weight_bits", "act_bits", "granularity", "symmetric", "range_method")  # editable spec columns
FIRST_LAST_8 = "First/last at 8"  # keep the current widths, first and last weight layer at 8 bits
PRESETS = {  # name → (weight bits, activation bits, first/last weight layer at 8 bits)
    "All 8-bit": (8, 8, False),
    "W4A8": (4, 8, False),
    "W4A4": (4, 4, False),
}
PRESET_NAMES = (*PRESETS, FIRST_LAST_8)


def weight_layers(rows: Rows) -> list[str]:
    """Names of the layers with weights (convolutions, linears), in execution order."""
    return [r["name"] for r in rows if r["has_weights"]]


def _widths(weight_bits: int | None, act_bits: int | None) -> str:
    return f"W{weight_bits or 'fp'}A{act_bits or 'fp'}"


def plan_summary(config: dict[str, Any] | cfg.RunConfig) -> str:
    """The plan in a few words, the one way every page, table and report names it: ``W8A8``,
    ``W2A4, 2 layers W8A8`` (layers that differ from the default, by their widths), ``W4A4, 3 layers differ``.
    An override that repeats the default (a sweep's uniform plan lists every layer) differs in nothing."""
    plan = (config if isinstance(config, cfg.RunConfig) else cfg.RunConfig.model_validate(config)).plan
    text = _widths(plan.default.weight_bits, plan.default.act_bits)
    differing = [name for name in plan.overrides if plan.spec_for(name) != plan.default]
    if not differing:
        return text
    count = len(differing)
    layers = f"{count} layer{'s' if count > 1 else ''}"
    widths = {_widths(plan.spec_for(name).weight_bits, plan.spec_for(name).act_bits) for name in differing}
    if len(widths) == 1 and text not in widths:
        return f"{text}, {layers} {widths.pop()}"
    return f"{text}, {layers} differ"


def default_name(config: dict[str, Any] | cfg.RunConfig) -> str:
    """What a run is, for people: its model and plan (``digits-cnn · W8A8``); runs of two models never look alike."""
    model = config.model if isinstance(config, cfg.RunConfig) else config.get("model", "?")
    return f"{model} · {plan_summary(config)}"


def run_title(config: dict[str, Any] | cfg.RunConfig) -> str:
    """A run's name for people: the name the user gave it, else its model and plan."""
    name = config.name if isinstance(config, cfg.RunConfig) else config.get("name", "")
    return name or default_name(config)


def data_summary(data: cfg.DataConfig) -> str:
    """The data a run trains on, in a few words: ``image-folder /photos · 64 px crop · at most 500 samples``."""
    text = data.dataset + (f" {data.path}" if data.path else "")
    text += f" · {data.image_size} px crop" if data.image_size else ""
    return text + (f" · at most {data.max_samples:,} samples" if data.max_samples else " · all samples")


def settings_summary(config: cfg.RunConfig) -> str:
    """A run's settings in one line, to tell two runs (or a draft and a run) apart: model, plan, data, training."""
    ft = config.finetune
    return (f"{default_name(config)} · data: {data_summary(config.data)} · fine-tune {ft.epochs:g} epochs, "
            f"lr {ft.lr:g}, batch {ft.batch_size} · baseline {config.baseline.epochs} epochs · seed {config.seed}")


SETTINGS = {"model": "model", "weights": "weights", "checkpoint": "checkpoint", "data": "data", "plan": "plan",
            "baseline": "baseline training", "finetune": "fine-tune settings", "seed": "seed", "device": "device"}


def differences(a: cfg.RunConfig, b: cfg.RunConfig) -> list[str]:
    """What makes two configs train different models, for people (``["model", "data"]``); the name does not."""
    return [label for field, label in SETTINGS.items() if getattr(a, field) != getattr(b, field)]


def _most_common(values: list[Any], current: Any) -> Any:
    """The most frequent value; ``current`` when it is among the most frequent (or there are no values)."""
    if not values or values.count(current) == max(map(values.count, values)):
        return current
    return max(dict.fromkeys(values), key=values.count)


def plan_frame(rows: Rows, plan: cfg.LayerPlan) -> pd.DataFrame:
    """One row a quantizable layer: what the plan does to it (layer, kind, params, quantize, PLAN_FIELDS, and a
    note saying why a layer stays float or how the layers were found).

    Bit columns are nullable integers: empty means FP32 (and always empty for weights of a layer
    without weights).
    """
    out = []
    for row in rows:
        spec = plan.spec_for(row["name"])
        kind = row["kind"] + (f" +{row['fused']}" if row["fused"] else "")
        if row.get("is_output"):
            kind += " (output: logits stay FP32)"
        out.append({"layer": row["name"], "kind": kind, "note": row.get("note", ""),
                    "params": row["params"], "quantize": spec.enabled,
                    "weight_bits": spec.weight_bits if row["has_weights"] else None,
                    "act_bits": None if row.get("is_output") else spec.act_bits, "granularity": spec.granularity, "symmetric": spec.symmetric,
                    "range_method": spec.range_method})
    frame = pd.DataFrame(out, columns=["layer", "kind", "params", "quantize", *PLAN_FIELDS, "note"])
    return frame.astype({"weight_bits": "Int64", "act_bits": "Int64"})


def _bits_cell(value: Any, layer: str, column: str) -> int | None:
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    whole = not isinstance(value, bool) and isinstance(value, numbers.Real) and float(value).is_integer()
    if not whole or not cfg.MIN_BITS <= int(value) <= cfg.MAX_BITS:
        raise ConfigError(f"layer {layer}: {column} must be a whole number from {cfg.MIN_BITS} to {cfg.MAX_BITS} "
                          f"(empty keeps it FP32); got {value!r}")
    return int(value)


def plan_from_frame(base: cfg.RunConfig, rows: Rows, frame: pd.DataFrame) -> cfg.RunConfig:
    """The edited table → ``base`` with the table's plan, validated.

    Raises ConfigError naming the layer and column of a bad cell (a width outside 2..8 or not a whole
    number, weight bits on a layer without weights, rows added, removed or reordered). Only cells that
    differ from the plan default become overrides, so the saved plan stays compact.
    """
    by_name = {r["name"]: r for r in rows}
    if "layer" not in frame.columns or list(frame["layer"]) != [r["name"] for r in rows]:
        raise ConfigError("the plan table must list the model's layers in order; rows cannot be added or removed")
    default = base.plan.default.model_dump()
    overrides: dict[str, dict[str, Any]] = {}
    for record in frame.to_dict("records"):
        name = record["layer"]
        quantize = record["quantize"]
        if not isinstance(quantize, bool):
            raise ConfigError(f"layer {name}: quantize must be ticked or not; got {quantize!r}")
        spec = {k: record[k] for k in PLAN_FIELDS}
        spec["weight_bits"] = _bits_cell(record["weight_bits"], name, "weight bits")
        spec["act_bits"] = _bits_cell(record["act_bits"], name, "activation bits")
        if not by_name[name]["has_weights"]:
            if spec["weight_bits"] is not None:
                raise ConfigError(f"layer {name} ({by_name[name]['kind']}) has no weights: leave its weight bits empty")
            spec["weight_bits"] = default["weight_bits"]  # not used by the layer; keep the plan compact
        if by_name[name].get("is_output"):  # its logits stay FP32: the cell is empty and stays so
            if spec["act_bits"] is not None:
                raise ConfigError(f"layer {name} is the model's output: its logits stay FP32, so activation bits do "
                                  "not apply; leave the cell empty")
            spec["act_bits"] = base.plan.spec_for(name).act_bits
        if not quantize:
            spec["weight_bits"] = spec["act_bits"] = None
        changes = {k: ("off" if v is None and k.endswith("_bits") else v) for k, v in spec.items() if v != default[k]}
        if changes:
            overrides[name] = changes
    data = base.to_dict()
    data["plan"] = {"default": default, "overrides": overrides}
    try:
        return plain_plan(cfg.from_dict(data), rows)
    except ConfigError as err:  # a cell the config rejects (an unknown range method): name layer and column
        text = str(err).removeprefix("invalid config:").strip()
        for name in overrides:
            text = text.replace(f"plan.overrides.{name}.", f"layer {name}: ")
        raise ConfigError(text) from None


def plain_plan(config: cfg.RunConfig, rows: Rows) -> cfg.RunConfig:
    """The same plan with the widths most layers use as its default and only the layers that differ from it as
    overrides, so its name says what it is: every layer set to 2 bits in the table over a W4 default is a W2
    plan, not "W4 with 4 overrides". The first and last weight layers do not vote when there are others (they
    are often kept at 8 bits)."""
    plan = config.plan
    names = weight_layers(rows)
    voters = names[1:-1] or names
    acts = [r["name"] for r in rows if not r.get("is_output")]
    weight_bits = _most_common([plan.spec_for(n).weight_bits for n in voters], plan.default.weight_bits)
    act_bits = _most_common([plan.spec_for(n).act_bits for n in acts if n in voters or n not in names],
                            plan.default.act_bits)
    default = plan.default.model_copy(update={"weight_bits": weight_bits, "act_bits": act_bits})
    overrides = {}
    for row in rows:
        spec = plan.spec_for(row["name"]).model_dump()
        changes = {k: ("off" if v is None and k.endswith("_bits") else v) for k, v in spec.items()
                   if v != getattr(default, k) and not (k == "weight_bits" and not row["has_weights"])}
        if changes:
            overrides[row["name"]] = changes
    data = config.to_dict()
    data["plan"] = {"default": default.model_dump(mode="json"), "overrides": overrides}
    return cfg.from_dict(data)


def apply_preset(base: cfg.RunConfig, rows: Rows, preset: str) -> cfg.RunConfig:
    """``base`` with one of :data:`PRESET_NAMES` applied to the model's weight layers."""
    names = weight_layers(rows)
    if preset == FIRST_LAST_8:
        d = base.plan.default
        return cfg.with_uniform_plan(base, names, d.weight_bits, d.act_bits, keep_ends_8bit=True)
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESET_NAMES)}")
    weight_bits, act_bits, ends = PRESETS[preset]
    return cfg.with_uniform_plan(base, names, weight_bits, act_bits, keep_ends_8bit=ends)


def has_8bit_weights(plan: cfg.LayerPlan, rows: Rows) -> bool:
    return any(plan.spec_for(name).weight_bits == 8 for name in weight_layers(rows))


def reduce_range_advice(plan: cfg.LayerPlan, rows: Rows) -> str | None:
    """Why 7-bit weights would pay off on this CPU, when the plan has 8-bit ones and they would."""
    if not (cpu.int8_weights_saturate() and has_8bit_weights(plan, rows)):
        return None
    return ("This CPU has AVX2 but no VNNI: ONNX Runtime's fast uint8×int8 kernels add pairs of products in 16 bits, "
            "which 8-bit weights can overflow. The export keeps results exact by storing such layers as uint8 for "
            "ONNX Runtime's slower uint8×uint8 kernels. 7-bit weights (reduce range: codes within ±64) cannot "
            "overflow and keep the fast kernels; the parity check on the Benchmark page proves the result.")


def reduce_range(base: cfg.RunConfig) -> cfg.RunConfig:
    """``base`` with every 8-bit weight at 7 bits (the default and each override): the weight range
    that ONNX Runtime's uint8×int8 kernels cannot saturate on a CPU without VNNI (see ``cpu``)."""
    plan = base.plan
    default = plan.default.model_copy(update={"weight_bits": 7}) if plan.default.weight_bits == 8 else plan.default
    overrides = {name: o.model_copy(update={"weight_bits": 7}) if o.weight_bits == 8 else o
                 for name, o in plan.overrides.items()}
    data = base.to_dict()
    data["plan"] = cfg.LayerPlan(default=default, overrides=overrides).model_dump(mode="json")
    return cfg.from_dict(data)


def with_plan(base: cfg.RunConfig, plan: cfg.LayerPlan | dict[str, Any]) -> cfg.RunConfig:
    """A new draft: ``base`` (a run's config) with another layer plan and no name, validated."""
    data = base.to_dict()
    data["plan"] = plan.model_dump(mode="json") if isinstance(plan, cfg.LayerPlan) else plan
    data["name"] = ""
    return cfg.from_dict(data)
