"""The layer plan as an editable table: every cell is checked on the server, errors name the layer
and column, rows cannot be added or removed, and presets survive a round trip through the table."""

from __future__ import annotations

import pandas as pd
import pytest

from qat_core import planning, prepare, runner, zoo
from qat_core.errors import ConfigError


@pytest.fixture(scope="module")
def base():
    return runner.default_config("digits-cnn")


@pytest.fixture(scope="module")
def rows(base):
    model, data = zoo.build(base.model, base.data)
    return prepare.layer_table(model, data.example())


def edited(rows, plan, layer: str, **cells) -> pd.DataFrame:
    frame = planning.plan_frame(rows, plan).astype(object)  # as a browser may send anything
    i = [r["name"] for r in rows].index(layer)
    for column, value in cells.items():
        frame.at[i, column] = value
    return frame


def test_the_table_lists_every_layer_with_its_spec(base, rows):
    frame = planning.plan_frame(rows, base.plan)
    assert list(frame["layer"]) == [r["name"] for r in rows]
    assert list(frame.columns) == ["layer", "kind", "params", "quantize", *planning.PLAN_FIELDS, "note"]
    weightless = [r["name"] for r in rows if not r["has_weights"]]
    assert weightless and frame.set_index("layer").loc[weightless, "weight_bits"].isna().all()
    assert planning.weight_layers(rows) == [r["name"] for r in rows if r["has_weights"]]


def test_an_unchanged_table_gives_back_the_same_plan(base, rows):
    again = planning.plan_from_frame(base, rows, planning.plan_frame(rows, base.plan))
    assert all(again.plan.spec_for(r["name"]) == base.plan.spec_for(r["name"]) for r in rows)
    assert again.model_copy(update={"plan": base.plan}) == base  # nothing but the plan is touched


def test_a_valid_edit_becomes_a_compact_override(base, rows):
    new = planning.plan_from_frame(base, rows, edited(rows, base.plan, "conv2.conv", weight_bits=4))
    assert new.plan.spec_for("conv2.conv").weight_bits == 4
    assert set(new.plan.overrides) - set(base.plan.overrides) == {"conv2.conv"}
    off = planning.plan_from_frame(base, rows, edited(rows, base.plan, "conv2.conv", quantize=False))
    spec = off.plan.spec_for("conv2.conv")
    assert spec.weight_bits is None and spec.act_bits is None and not spec.enabled


@pytest.mark.parametrize("value", [99, 1, 2.5, "x", True])
@pytest.mark.parametrize(("column", "label"), [("weight_bits", "weight bits"), ("act_bits", "activation bits")])
def test_bad_bit_cells_name_the_layer_and_column(base, rows, column, label, value):
    frame = edited(rows, base.plan, "conv2.conv", **{column: value})
    with pytest.raises(ConfigError, match=rf"layer conv2\.conv: {label} must be a whole number from 2 to 8 "
                                          rf"\(empty keeps it FP32\); got {value!r}"):
        planning.plan_from_frame(base, rows, frame)


def test_weight_bits_on_a_layer_without_weights_is_rejected(base, rows):
    layer = next(r for r in rows if not r["has_weights"])
    with pytest.raises(ConfigError, match=rf"layer {layer['name']} \({layer['kind']}\) has no weights: "
                                          "leave its weight bits empty"):
        planning.plan_from_frame(base, rows, edited(rows, base.plan, layer["name"], weight_bits=4))


def test_other_bad_cells_name_the_layer(base, rows):
    with pytest.raises(ConfigError, match=r"layer conv2\.conv: quantize must be ticked or not; got 'yes'"):
        planning.plan_from_frame(base, rows, edited(rows, base.plan, "conv2.conv", quantize="yes"))
    with pytest.raises(ConfigError, match=r"^layer conv2\.conv: range_method: must be .*; got 'bogus'$"):
        planning.plan_from_frame(base, rows, edited(rows, base.plan, "conv2.conv", range_method="bogus"))


def test_rows_cannot_be_added_removed_or_reordered(base, rows):
    frame = planning.plan_frame(rows, base.plan)
    message = "must list the model's layers in order; rows cannot be added or removed"
    added = pd.concat([frame, frame.iloc[[1]].assign(layer="extra")], ignore_index=True)
    for bad in (frame.iloc[:-1], added, frame.iloc[::-1].reset_index(drop=True)):
        with pytest.raises(ConfigError, match=message):
            planning.plan_from_frame(base, rows, bad)


def test_every_preset_round_trips_through_the_table(base, rows):
    for preset in planning.PRESET_NAMES:
        config = planning.apply_preset(base, rows, preset)
        again = planning.plan_from_frame(config, rows, planning.plan_frame(rows, config.plan))
        for r in rows:
            assert again.plan.spec_for(r["name"]).act_bits == config.plan.spec_for(r["name"]).act_bits
            if r["has_weights"]:
                assert again.plan.spec_for(r["name"]).weight_bits == config.plan.spec_for(r["name"]).weight_bits
    w4a4 = planning.apply_preset(base, rows, "W4A4")
    assert planning.plan_summary(w4a4) == "W4A4" and planning.plan_summary(w4a4.to_dict()) == "W4A4"
    ends = planning.apply_preset(w4a4, rows, planning.FIRST_LAST_8)
    first, *_, last = planning.weight_layers(rows)
    assert ends.plan.spec_for(first).weight_bits == 8 and ends.plan.spec_for(last).weight_bits == 8
    assert ends.plan.spec_for("conv2.conv").weight_bits == 4
    assert planning.plan_summary(ends) == "W4A4, 2 layers W8A8"
    with pytest.raises(ConfigError, match="unknown preset 'W1A1'; choose one of All 8-bit, W4A8"):
        planning.apply_preset(base, rows, "W1A1")


def test_a_plan_is_named_by_the_widths_most_layers_use(base, rows):
    """Issue 11: a W2A4 plan (first/last at 8) edited in the table over a W4A4 default was "W4A4 +4 override(s)"."""
    ends = planning.apply_preset(planning.apply_preset(base, rows, "W4A4"), rows, planning.FIRST_LAST_8)
    table = planning.plan_frame(rows, ends.plan)
    inner = table["layer"].isin(planning.weight_layers(rows)[1:-1])
    table.loc[inner, "weight_bits"] = 2
    w2a4 = planning.plan_from_frame(ends, rows, table)
    assert planning.plan_summary(w2a4) == "W2A4, 2 layers W8A8"
    assert w2a4.plan.default.weight_bits == 2 and len(w2a4.plan.overrides) == 2
    again = planning.plan_frame(rows, w2a4.plan)  # the same plan as the table, only written more plainly
    for column in ("weight_bits", "act_bits"):
        assert again[column].equals(table[column])
    assert planning.run_title(w2a4) == f"{w2a4.model} · W2A4, 2 layers W8A8"  # an unnamed run: its model and plan
    assert planning.run_title(w2a4.model_copy(update={"name": "low-bit try"})) == "low-bit try"


def test_with_plan_makes_an_unnamed_draft(base, rows):
    named = base.model_copy(update={"name": "a run"})
    plan = planning.apply_preset(base, rows, "W4A8").plan
    for given in (plan, plan.model_dump(mode="json")):
        new = planning.with_plan(named, given)
        assert new.plan == plan and new.name == "" and new.model == base.model
    with pytest.raises(ConfigError, match="weight_bits"):
        planning.with_plan(base, {"default": {"weight_bits": 99}})


@pytest.mark.parametrize("saturates", [True, False])
def test_reduce_range_is_offered_only_where_8bit_weights_can_saturate(base, rows, monkeypatch, saturates):
    monkeypatch.setattr(planning.cpu, "int8_weights_saturate", lambda: saturates)
    assert (planning.reduce_range_advice(base.plan, rows) is not None) is saturates
    reduced = planning.reduce_range(base)
    assert planning.reduce_range_advice(reduced.plan, rows) is None  # nothing left to reduce
    assert {reduced.plan.spec_for(n).weight_bits for n in planning.weight_layers(rows)} == {7}


def test_reduce_range_leaves_narrower_and_float_weights_alone(base, rows):
    names = planning.weight_layers(rows)
    w4 = planning.apply_preset(planning.apply_preset(base, rows, "W4A4"), rows, planning.FIRST_LAST_8)
    frame = edited(rows, w4.plan, names[1], quantize=False)
    mixed = planning.plan_from_frame(w4, rows, frame)
    reduced = planning.reduce_range(mixed.model_copy(update={"name": "mine"}))
    assert [reduced.plan.spec_for(n).weight_bits for n in names] == [7, None, 4, 7]
    assert reduced.name == "mine" and reduced.plan.default.act_bits == 4
