"""The CLI's contract under generated input (hypothesis): whatever the arguments, files, run ids and
workspaces, ``qat-studio`` ends with exit code 0 or 2 and at most one short message: never a
traceback, an internal error (70), a hang or unbounded memory."""

from __future__ import annotations

import json
import os
import resource
import shutil
import sqlite3
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qat_core import cli
from qat_core import config as cfg
from qat_core.errors import ConfigError
from qat_core.store import RunStore
from tests.test_config_hardening import documents, yaml_soup

MAX_MESSAGE = 2000
MAX_GROWTH_MB = 200


@pytest.fixture(scope="module")
def places(workspace, digits_run, tmp_path_factory) -> dict[str, str]:
    """A workspace with a finished, a failed and a damaged run; hostile files and folders beside it."""
    base = tmp_path_factory.mktemp("cli_properties")
    root = base / "ws"
    shutil.copytree(workspace.root, root, ignore=shutil.ignore_patterns("*.onnx", "analysis", "index.sqlite-*"))
    store = RunStore(root)
    failed = store.create_run(workspace.config(digits_run))
    store.fail(failed, "stopped")
    damaged = store.create_run(workspace.config(digits_run))
    with sqlite3.connect(root / "index.sqlite") as db:
        db.execute("UPDATE runs SET config='[' WHERE id=?", (damaged,))
    (root / "runs" / damaged / "run.json").unlink()
    (base / "other").mkdir()
    (base / "other" / "notes.txt").write_text("not a workspace")
    (base / "a_file").write_text("x")
    (base / "binary.yaml").write_bytes(os.urandom(256))
    os.mkfifo(base / "fifo.yaml")
    return {"ws": str(root), "done": digits_run, "failed": failed, "damaged": damaged, "base": str(base)}


def run_ids(p: dict[str, str]) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from([p["failed"], p["damaged"], "nope", "../..", ".hidden", "-x", "a" * 300, "",
                                      "run\x00id", "20261126-000000-zzzzzz", "runs", "/etc/passwd"]),
                     st.text(max_size=20))


def workspaces(p: dict[str, str]) -> st.SearchStrategy[list[str]]:
    base = p["base"]
    hostile = [f"{base}/other", f"{base}/a_file", f"{base}/a_file/ws", "/proc/self", "/dev/null", "", "\x00",
               f"{base}/" + "w" * 300, f"{base}/fifo.yaml"]
    return st.one_of(st.just(["--workspace", p["ws"]]), st.just(["--workspace", p["ws"]]),
                     st.sampled_from(hostile).map(lambda w: ["--workspace", w]))


numbers_text = st.one_of(st.integers(-5, 10).map(str), st.sampled_from(["0", "-1", "1e9", "nan", "inf", "all", "",
                                                                         "2" * 400, "0x10", "1.5", "off"]),
                         st.text(max_size=6))
models = st.sampled_from(["digits-cnn", "digits-mlp", "nope", "sys:exit", "qat_core.cli:main", "tiny_plugin:absent",
                          ":", "a:", ":b", "x" * 300, "json:loads", "math:pi", "", "\x00"])


def unparseable(text: str) -> bool:
    """Config texts for `train` that do not parse: a valid one would start a real training run."""
    try:
        cfg.parse(text)
    except ConfigError:
        return True
    return False


@st.composite
def commands(draw, p: dict[str, str]) -> list[str]:
    run = draw(run_ids(p))
    flag = st.sampled_from(["--json", "--quiet", "--bogus", "-o", "--batch", "--threads"])
    choices = {
        "models": lambda: ["models"],
        "init": lambda: ["config", "init", "--model", draw(models), "--weight-bits", draw(numbers_text),
                         "--act-bits", draw(numbers_text)],
        "runs": lambda: ["runs"] + draw(st.lists(flag, max_size=2)),
        "show": lambda: ["show", draw(st.one_of(run_ids(p), st.just(p["done"])))] + draw(st.lists(flag, max_size=1)),
        "analyze": lambda: ["analyze", run, "--bits", *draw(st.lists(numbers_text, max_size=3)),
                            "--batches", draw(numbers_text)],
        "budget": lambda: ["analyze", run, "--budget-bits", draw(numbers_text), "--budget-bytes", draw(numbers_text)],
        "export": lambda: ["export", run] + draw(st.lists(flag, max_size=1)),
        "eval": lambda: ["eval", run, "--backend", draw(st.sampled_from(["onnxruntime", "tensorrt", ""]))],
        "bench": lambda: ["bench", run, "--batch", *draw(st.lists(numbers_text, min_size=1, max_size=2)), "--threads",
                          draw(numbers_text), "--warmup", draw(numbers_text), "--iters", draw(numbers_text)],
        "report": lambda: ["report", run, "-o", draw(st.sampled_from([f"{p['base']}/other", "/proc/x/r.html", "",
                                                                     f"{p['base']}/a_file/r.html"]))],
        "train": lambda: ["train", draw(st.sampled_from([f"{p['base']}/binary.yaml", f"{p['base']}/fifo.yaml",
                                                         f"{p['base']}/other", "/dev/zero", "/nonexistent.yaml",
                                                         "x" * 300, f"{p['base']}/generated.yaml"])),
                          "--run-id", draw(st.one_of(run_ids(p), st.just(p["done"])))],
        "noise": lambda: draw(st.lists(st.text(max_size=10), max_size=4)),
    }
    argv = draw(workspaces(p)) + choices[draw(st.sampled_from(sorted(choices)))]()
    if "train" in argv:
        text = draw(st.one_of(yaml_soup, documents.map(json.dumps)).filter(unparseable))
        Path(p["base"], "generated.yaml").write_text(text, encoding="utf-8", errors="surrogatepass")
    return argv


def call(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = cli.main(argv)
    except SystemExit as stop:  # argparse's usage errors
        code = stop.code
    return code, capsys.readouterr().err


def test_the_cli_keeps_its_contract_for_any_arguments(places, capsys):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cases = []

    @settings(deadline=timedelta(seconds=5), max_examples=300, suppress_health_check=list(HealthCheck))
    @given(commands(places))
    def check(argv: list[str]) -> None:
        code, err = call(argv, capsys)
        cases.append(argv)
        assert code in (0, 2), (argv, code, err[-600:])
        assert "Traceback" not in err and len(err) < MAX_MESSAGE, (argv, err[:600])

    check()
    growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(f"\n[cli properties] {len(cases)} command lines, peak memory grew {growth_mb:.0f} MB")
    assert len(cases) >= 300 and growth_mb < MAX_GROWTH_MB
    # the finished run is untouched by all of it
    assert RunStore(places["ws"]).get(places["done"])["status"] == "done"
    assert yaml.safe_load(Path(places["ws"], "runs", places["done"], "config.yaml").read_text())
