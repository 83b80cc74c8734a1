"""RunConfig: round trips, defaults, and a clear message for every kind of bad input."""

import pytest

from qat_core import config as cfg
from qat_core.errors import ConfigError
from qat_core.prepare import prepare
from qat_core.runner import default_config
from qat_core.zoo import digits_cnn


def test_yaml_and_json_round_trip(tmp_path):
    config = default_config("digits-cnn", 4, 4)
    for name in ("c.yaml", "c.json"):
        cfg.save(config, tmp_path / name)
        assert cfg.load(tmp_path / name) == config


def test_default_plan_keeps_first_and_last_layer_at_8_bits():
    plan = default_config("digits-cnn", weight_bits=2, act_bits=4).plan
    assert plan.spec_for("conv1.conv").weight_bits == 8
    assert plan.spec_for("fc").weight_bits == 8
    assert (plan.spec_for("conv2.conv").weight_bits, plan.spec_for("conv2.conv").act_bits) == (2, 4)


def test_override_inherits_unset_fields_and_off_means_float():
    plan = cfg.LayerPlan.model_validate(
        {"default": {"weight_bits": 4, "range_method": "mse"}, "overrides": {"a": {"act_bits": "off"}}})
    spec = plan.spec_for("a")
    assert (spec.weight_bits, spec.act_bits, spec.range_method) == (4, None, "mse")


@pytest.mark.parametrize("text,expected", [
    ("model: [digits", "not valid YAML/JSON at line 1"),
    ("modle: digits-cnn", "modle: unknown key"),
    ("plan: {default: {weight_bits: 1}}", "plan.default.weight_bits: must be from 2 to 8 bits, or off; got 1"),
    ("plan: {default: {act_bits: 9}}", "plan.default.act_bits: must be from 2 to 8 bits, or off; got 9"),
    ("plan: {overrides: {fc: {weight_bits: 12}}}", "plan.overrides.fc.weight_bits: must be from 2 to 8"),
    ("plan: {default: {granularity: per_row}}", "must be 'per_tensor' or 'per_channel'"),
    ("finetune: {lr: 0}", "finetune.lr: must be greater than 0"),
    ("version: 7", "reads config version 1; the file says 7"),
    ("", "is empty"),
    ("- a\n- b", "must be a mapping"),
])
def test_bad_configs_name_the_field_and_what_is_allowed(text, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        cfg.parse(text)


def test_unknown_layer_lists_the_real_names():
    plan = cfg.LayerPlan.model_validate({"overrides": {"conv9": {"weight_bits": 4}}})
    import torch

    with pytest.raises(ConfigError, match=r"conv9.*its quantizable layers are: input, conv1.conv, conv2.conv, conv3.conv, gap, fc"):
        prepare(digits_cnn(), plan, torch.zeros(2, 1, 8, 8))


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        cfg.load(tmp_path / "nope.yaml")
    (tmp_path / "bin.yaml").write_bytes(b"\x80\x81\xff\x00")
    with pytest.raises(ConfigError, match="not a text file"):
        cfg.load(tmp_path / "bin.yaml")
