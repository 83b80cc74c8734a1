"""Reading a config is bounded and total: any text or data gives a RunConfig or a short ConfigError.

First each failure found by attacking the loader (issue 10), reproduced; then hypothesis generates
documents (random nested data, mutations of a valid config, YAML token soup) and checks the
loader's contract on every one: a valid config or a ConfigError under 2 KB, nothing else.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from qat_core import config as cfg
from qat_core import zoo
from qat_core.errors import ConfigError
from qat_core.runner import default_config

MAX_MESSAGE = 2048


def refused(text: str, match: str) -> None:
    """``text`` is refused with a ConfigError that matches ``match`` and is short."""
    with pytest.raises(ConfigError, match=match) as info:
        cfg.parse(text)
    assert len(str(info.value)) < MAX_MESSAGE


# --- the failures issue 10 lists, one test each -----------------------------------------------------

def billion_laughs(levels: int = 9, width: int = 9) -> str:
    """A few hundred bytes that expand to width**levels values: each anchor repeats the one before."""
    lines = [f"a0: &a0 [{','.join(['lol'] * width)}]"]
    lines += [f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join([*lines, f"name: *a{levels - 1}"])


# Parses in a child whose address space is capped: if the loader expands the aliases again, the
# child fails with MemoryError instead of taking the machine's memory with it.
_MEASURE = textwrap.dedent("""
    import json, resource, sys, time, tracemalloc
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    from qat_core import config
    tracemalloc.start()
    start = time.perf_counter()
    try:
        config.parse(sys.stdin.read())
        outcome = "accepted"
    except Exception as err:
        outcome = f"{type(err).__name__}: {err}"[:10000]
    seconds, peak = time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
    print(json.dumps({"seconds": seconds, "peak": peak, "outcome": outcome}))
""")


@pytest.mark.skipif(sys.platform == "win32", reason="the memory cap uses the resource module")
def test_alias_bomb_is_refused_in_milliseconds_without_being_expanded():
    bomb = billion_laughs()
    assert len(bomb.encode()) < 450  # the size of the one in the issue (422 bytes)
    child = subprocess.run([sys.executable, "-c", _MEASURE], input=bomb, capture_output=True, text=True,
                           timeout=20, cwd=Path(__file__).parents[1])
    result = json.loads(child.stdout)
    assert result["outcome"].startswith("ConfigError: config is refused at line ")
    assert "more than 100,000 values" in result["outcome"] and len(result["outcome"]) < MAX_MESSAGE
    assert result["seconds"] < 1.0
    assert result["peak"] < 200e6


def test_an_alias_inside_its_own_anchor_is_refused():
    refused("name: &a [1, *a]", r"at line 1, column 14: alias \*a does not follow a complete &a node")


def test_anchors_and_merge_keys_that_repeat_little_still_work():
    config = cfg.parse("baseline: &b {epochs: 3, batch_size: 32}\n"
                       "finetune: {<<: *b, epochs: 2}\n"
                       "plan: {default: &d {weight_bits: 4}, overrides: {fc: *d, conv1.conv: *d}}")
    assert (config.finetune.epochs, config.finetune.batch_size) == (2, 32)  # the merge's key overridden
    assert config.plan.spec_for("fc").weight_bits == 4


@pytest.mark.parametrize("text,key,first,second", [
    ("finetune: {epochs: 1}\nseed: 3\nfinetune: {lr: 0.1}", "finetune", 1, 3),  # the second silently won
    ("finetune:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2", "lr", 2, 4),
    ('{"seed": 1,\n "seed": 2}', "seed", 1, 2),
])
def test_a_key_given_twice_is_an_error_naming_the_key_and_both_lines(text, key, first, second):
    refused(text, rf"at line {second}, column \d+: key '{key}' is given twice in one mapping \(first at line {first}\)")


@pytest.mark.parametrize("text,field", [
    ("version: true", "version"),
    ("seed: false", "seed"),
    ("finetune: {epochs: true}", "finetune.epochs"),
    ("finetune: {lr: true}", "finetune.lr"),
    ("baseline: {batch_size: true}", "baseline.batch_size"),
])
def test_true_and_false_are_not_numbers(text, field):
    refused(text, rf"{field}: must be a number, not (true|false)")


@pytest.mark.parametrize("text,field", [
    ("seed: 4294967296", "seed"),
    ("seed: -1", "seed"),
    ("data: {split_seed: 1000000000000000000000000000000}", "data.split_seed"),
])
def test_seeds_must_fit_32_bits(text, field):
    refused(text, rf"{field}: must be from 0 to 4294967295 \(NumPy and PyTorch seeds are 32-bit\)")


def test_the_largest_32_bit_seeds_are_accepted():
    config = cfg.parse("seed: 4294967295\ndata: {split_seed: 4294967295}")
    assert config.seed == config.data.split_seed == 2**32 - 1


def test_an_unknown_dataset_is_refused_naming_the_zoo_data_sets():
    refused("data: {dataset: imagenet}",
            r"data.dataset: must be 'digits', 'generated-images', 'generated-sequences', 'table', 'image-folder' or "
            r"'text-table'; got 'imagenet'")


def test_every_zoo_data_set_is_allowed_in_a_config():
    assert {entry.dataset for entry in zoo.MODELS.values()} <= set(cfg.DATASETS)


@pytest.mark.parametrize("text", [
    "name: " + "[" * 500 + "]" * 500,
    "name: " + "{a: " * 500 + "}" * 500,
    "".join(f"{'  ' * i}k:\n" for i in range(500)) + "  " * 500 + "v",
    "- " * 500 + "x",
])
def test_deep_nesting_is_refused_not_a_recursion_error(text):
    refused(text, r"at line \d+, column \d+: it nests more than 64 levels deep")


def test_aliases_that_stack_nesting_past_any_limit_give_a_short_error():
    lines = ["a0: &a0 " + "[" * 60 + "x" + "]" * 60]
    lines += [f"a{i}: &a{i} " + "[" * 60 + f"*a{i - 1}" + "]" * 60 for i in range(1, 40)]  # 2,400 levels in all
    refused("\n".join([*lines, "finetune: {lr: *a39}"]), r"finetune.lr: must be a valid number; got \[\[\[\[...\]\]\]\]")


def test_deep_python_data_is_refused_with_a_short_message():
    deep: Any = "x"
    for _ in range(10_000):
        deep = [deep]
    with pytest.raises(ConfigError, match="name: must be a valid string") as info:
        cfg.from_dict({"name": deep})
    assert len(str(info.value)) < MAX_MESSAGE


def test_huge_text_is_refused_before_parsing():
    start = time.perf_counter()
    refused("name: x\n" + "#" * cfg.MAX_INPUT_SIZE, r"has 1,000,008 characters; a config has at most 1,000,000")
    assert time.perf_counter() - start < 0.5


def test_many_values_are_refused_while_parsing():
    refused("name: [" + ", ".join(["0"] * (cfg.MAX_VALUES + 1)) + "]", "holds more than 100,000 values")


def test_a_huge_file_is_refused_after_reading_one_byte_too_many(tmp_path):
    (tmp_path / "big.yaml").write_text("name: x\n" + "#" * cfg.MAX_INPUT_SIZE)
    with pytest.raises(ConfigError, match="is over 1,000,000 bytes; a config is a few KB"):
        cfg.load(tmp_path / "big.yaml")


@pytest.mark.parametrize("name,match", [
    ("", "is a directory; give the config file"),
    ("x" * 300 + ".yaml", "cannot be opened: File name too long"),
    ("bad\0name.yaml", "is not a valid path"),
])
def test_paths_that_are_not_a_config_file_are_refused_by_name(tmp_path, name, match):
    with pytest.raises(ConfigError, match=match) as info:
        cfg.load(tmp_path / name)
    assert len(str(info.value)) < 400


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero here")
def test_an_endless_device_is_refused_without_reading_it():
    with pytest.raises(ConfigError, match="/dev/zero is not a regular file"):
        cfg.load("/dev/zero")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    messages: list[str] = []

    def load() -> None:
        with pytest.raises(ConfigError) as info:
            cfg.load(fifo)
        messages.append(str(info.value))

    reader = threading.Thread(target=load, daemon=True)  # a hang blocks only this thread
    reader.start()
    reader.join(timeout=5)
    assert not reader.is_alive(), "loading a FIFO hangs"
    assert messages and "is not a regular file" in messages[0]


@pytest.mark.parametrize("text,match", [
    ("seed: 0x" + "f" * 5000, r"refused at line 1, column 7: a number of 5,002 characters"),
    ("seed: " + ":".join(["1"] * 50_000), "a number of 99,999 characters"),  # base 60: int() would be quadratic
    ("name: 2001-13-45", "at line 1, column 7: '2001-13-45' is not a valid !!timestamp: month must be in 1..12"),
    ("name: !!bool maybe", "at line 1, column 7: 'maybe' is not a valid !!bool"),
    ("name: !!python/object/apply:os.system ['" + "x" * 10_000 + "']", "could not determine a constructor"),
    ("name: \ud800", "character 7 is a lone surrogate|unacceptable character #xd800"),  # libyaml | PyYAML
    ("name: *" + "a" * 10_000, r"refused at line 1, column 7: alias \*a{79}… does not follow"),
])
def test_values_that_cannot_be_read_are_errors_with_their_line(text, match):
    refused(text, match)


@pytest.mark.parametrize("data", [
    {"x" * 1_000_000: 1},
    {"name": ["y" * 1_000_000] * 1000},
    {"version": 10**5000},
    {"seed": 10**5000},
    {"plan": {"overrides": {f"layer{i}" + "z" * 1000: {"weight_bits": "q" * 10_000, "bad": 1} for i in range(3000)}}},
])
def test_messages_quote_only_a_short_excerpt_of_the_input(data):
    with pytest.raises(ConfigError) as info:
        cfg.from_dict(data)
    message = str(info.value)
    assert len(message) < MAX_MESSAGE
    assert "…" in message or "-bit number" in message


def test_an_unknown_layer_message_lists_a_bounded_number_of_names():
    plan = cfg.LayerPlan.model_validate({"overrides": {f"missing{i}": {"weight_bits": 4} for i in range(2000)}})
    with pytest.raises(ConfigError, match=r"missing0, missing1, .* and \d+ more that the model") as info:
        plan.check_names([f"layer{i}" for i in range(5000)])
    assert len(str(info.value)) < MAX_MESSAGE


# --- property-based: whatever the input, a valid config or a short ConfigError ------------------------

@functools.cache
def valid_config() -> dict[str, Any]:
    return default_config("digits-cnn").to_dict()


def check_contract(load: Any, arg: Any) -> None:
    """``load(arg)`` returns a RunConfig that survives a YAML round trip, or raises a short ConfigError."""
    try:
        config = load(arg)
    except ConfigError as err:
        assert len(str(err)) < MAX_MESSAGE, str(err)[:300]
        return
    assert isinstance(config, cfg.RunConfig)
    assert cfg.parse(config.to_yaml()) == config


# numbers near every limit in the schema (seeds, bits, version), and floats with inf and nan
numbers = st.one_of(st.integers(-2**70, 2**70), st.sampled_from([0, 1, 2, 8, 9, 2**32 - 1, 2**32, -1]),
                    st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none())
words = st.sampled_from(["off", "lsq", "mse", "percentile", "per_tensor", "digits", "generated-images", "adam",
                         "digits-cnn", "fc", "conv1.conv", "sys:exit", "", "1e-3", "true", "~"])
field_names = sorted({name for model in (cfg.RunConfig, cfg.DataConfig, cfg.LayerPlan, cfg.QuantSpec,
                                          cfg.BaselineConfig, cfg.FineTuneConfig) for name in model.model_fields})
keys = st.one_of(st.sampled_from(field_names), st.text(max_size=12))
long_text = st.builds(str.__mul__, st.text(min_size=1, max_size=3), st.integers(700, 5000))  # cheap to make
scalars = st.one_of(numbers, words, st.text(max_size=30), long_text)


def containers(inner: st.SearchStrategy) -> st.SearchStrategy:
    """Lists and mappings of ``inner``: what YAML and JSON documents are built from."""
    return st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5)


documents = st.recursive(scalars, containers, max_leaves=25)

FAST = settings(deadline=timedelta(seconds=2))  # a case over 2 s counts as a hang


@settings(FAST, max_examples=300)
@given(documents)
def test_any_data_gives_a_config_or_a_short_error(data):
    check_contract(cfg.from_dict, data)
    check_contract(cfg.parse, json.dumps(data))
    check_contract(cfg.parse, yaml.safe_dump(data))


def _slots(node: dict[str, Any]):
    """(container, key) for every entry of a nested dict, so a mutation can reach any field."""
    for key, value in node.items():
        yield node, key
        if isinstance(value, dict):
            yield from _slots(value)


@st.composite
def mutated_configs(draw) -> dict[str, Any]:
    """A valid config with one to three fields replaced, removed, renamed or added."""
    data = copy.deepcopy(valid_config())
    for _ in range(draw(st.integers(1, 3))):
        container, key = draw(st.sampled_from(list(_slots(data))))
        action = draw(st.sampled_from(["replace", "replace", "delete", "rename", "add"]))
        if action == "replace":
            container[key] = draw(documents)
        elif action == "delete":
            del container[key]
        elif action == "rename":
            container[draw(keys)] = container.pop(key)
        else:
            container[draw(keys)] = draw(documents)
    return data


@settings(FAST, max_examples=500)
@given(mutated_configs())
def test_mutated_configs_give_a_config_or_a_short_error(data):
    check_contract(cfg.from_dict, data)
    check_contract(cfg.parse, yaml.safe_dump(data, sort_keys=False))


# pieces of YAML that have broken loaders: anchors, aliases, merges, tags, flow and block nesting,
# duplicate keys, long numbers, timestamps, base-60 numbers; and odd characters between them
tokens = st.sampled_from([
    "[", "]", "{", "}", ", ", ": ", "- ", "\n", "  ", "? ", "&a ", "&b ", "*a", "*b", "<<: ", "!!binary ",
    "!!python/object:os.system ", "!!set ", "!!omap ", "!!timestamp ", "!!int ", "!!float ", "'", '"', "|\n", ">\n",
    "#", "---\n", "...\n", "%YAML 1.1\n", "\t", "name", "seed", "version", "finetune", "plan",
    "overrides", "weight_bits", "data", "dataset", "0x" + "f" * 120, "1:2:3", "2001-13-45", "2001-12-14t21:59:43.10+99:00",
    "true", "null", ".nan", "-.inf", "4294967296", "1", "8", "off",
])
odd_characters = st.characters(categories=["Cc", "Cf", "Cs", "Co", "Zl", "Zp"])  # controls, BOM, surrogates…
yaml_soup = st.lists(tokens | odd_characters, max_size=40).map("".join) | st.text(max_size=200)


@settings(FAST, max_examples=400)
@given(yaml_soup)
def test_any_text_gives_a_config_or_a_short_error(text):
    check_contract(cfg.parse, text)
