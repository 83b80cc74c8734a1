"""Every read of a workspace or user file is typed and bounded (issue 20): a FIFO, a link to /dev/zero,
a directory or JSON of the wrong shape where QAT Studio expects its own file (a run's record, results,
progress log, weights; a sweep's state, plan and suggestions) or the user's (a table, an image) is a
named damage or a ConfigError within seconds: never a hang, an unbounded read or an internal error (70)."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from qat_core import cli, sweep
from qat_core import data as datasets
from qat_core.config import DataConfig
from qat_core.errors import ConfigError, StoreError
from qat_core.store import RunStore
from tests import test_store_damage
from tests.conftest import small_base, write_image_folder, write_table

HANG = 60.0  # seconds: a generous bound under load; a hang is forever

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes (FIFOs) are POSIX")


def within(fn, *args, seconds: float = HANG):
    """``fn(*args)`` in a thread (a hang blocks only that thread); its result, or its exception re-raised."""
    outcome: list = []

    def target() -> None:
        try:
            outcome.append((True, fn(*args)))
        except BaseException as err:  # noqa: B036 - handed to the test's thread
            outcome.append((False, err))

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"{getattr(fn, '__name__', fn)}{args} hangs"
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


@contextlib.contextmanager
def memory_cap(extra: int = 2 << 30):
    """At most ``extra`` more bytes of address space while the body runs: an unbounded read (a link to
    /dev/zero read to its end, as before issue 20) fails with MemoryError instead of taking the machine's memory."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    used = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (used + extra, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def run_cli(capsys, root: Path, *args: str) -> tuple[int, str, str]:
    with memory_cap():
        code = within(cli.main, ["--workspace", str(root), *args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and err.count("\n") <= 1, err
    return code, out, err


KINDS = ("fifo", "dev-zero", "link-to-folder", "dangling", "directory")


def replace(path: Path, damage: str | bytes) -> None:
    """``path`` (a file or a folder) replaced by ``damage``: one of ``KINDS``, else the text or bytes written there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()
    if damage == "fifo":
        os.mkfifo(path)
    elif damage == "dev-zero":
        path.symlink_to("/dev/zero")
    elif damage == "link-to-folder":
        path.symlink_to(path.parent)
    elif damage == "dangling":
        path.symlink_to(path.parent / "gone")
    elif damage == "directory":
        path.mkdir()
    else:
        path.write_bytes(damage if isinstance(damage, bytes) else damage.encode("utf-8", "surrogatepass"))


# --- the run store ---------------------------------------------------------------------------------

copied = test_store_damage.copied  # a copy of the session's workspace (its digits run) and a victim run

RECORD_DAMAGE = {  # run.json beside a damaged index: the cases, and the other forms of the same
    "a FIFO": ("fifo", "is not a regular file"),
    "a link to /dev/zero": ("dev-zero", "is not a regular file"),
    "a directory": ("directory", "is a directory"),
    "a dangling link": ("dangling", "does not exist"),
    "a JSON list": ("[]", "not a JSON object"),
    "200,000 nested brackets": ("[" * 200_000 + "]" * 200_000, "is not valid JSON"),
    "a JSON string": ('"done"', "not a JSON object"),
    "an object of the wrong fields": ('{"created": "yesterday"}', "Field required"),
}


@pytest.mark.parametrize("name", list(RECORD_DAMAGE))
def test_a_run_json_that_is_not_a_record_beside_a_damaged_index_is_one_damaged_run(copied, digits_run, capsys, name):
    root, victim, _ = copied
    healthy = digits_run
    kind, reason = RECORD_DAMAGE[name]
    (root / "index.sqlite").write_bytes(b"not a database" * 100)
    replace(root / "runs" / victim / "run.json", kind)

    code, out, err = run_cli(capsys, root, "runs", "--json")
    assert code == 0, err
    listed = {r["id"]: r for r in json.loads(out)}
    assert listed[healthy]["status"] == "done" and listed[victim]["status"] == "damaged"
    assert "run.json is damaged" in listed[victim]["error"] and reason in listed[victim]["error"]
    code, out, _ = run_cli(capsys, root, "show", victim)
    assert code == 0 and "(damaged)" in out
    code, _, err = run_cli(capsys, root, "report", victim, "-o", str(root / "r.html"))
    assert code == cli.EXIT_USER_ERROR and "damaged" in err
    assert run_cli(capsys, root, "show", healthy)[0] == 0


RUN_FILE_DAMAGE = [  # a file of a finished run, the command that reads it, and what its message names
    ("results/layers.json", "fifo", "report", "layers.json is damaged (is not a regular file"),
    ("results/layers.json", "dev-zero", "report", "layers.json is damaged (is not a regular file"),
    ("results/layers.json", "directory", "report", "layers.json is damaged (is a directory"),
    ("events.jsonl", "fifo", "report", "events.jsonl is not a regular file"),
    ("events.jsonl", "dev-zero", "report", "events.jsonl is not a regular file"),
    ("events.jsonl", "directory", "report", "events.jsonl is a directory"),
    ("qat.pt", "fifo", "export", "qat.pt is not a regular file"),
    ("qat.pt", "dev-zero", "export", "qat.pt is not a regular file"),
    ("qat.pt", "directory", "export", "qat.pt is a directory"),
    ("fp32.pt", "fifo", "eval", "fp32.pt is not a regular file"),
]


@pytest.mark.parametrize(("name", "kind", "command", "message"), RUN_FILE_DAMAGE)
def test_a_run_file_that_is_not_a_file_is_named_with_the_fix(copied, digits_run, capsys, name, kind, command, message):
    root, healthy = copied[0], digits_run
    replace(root / "runs" / healthy / name, kind)
    args = [command, healthy] + (["-o", str(root / "r.html")] if command == "report" else [])
    code, _, err = run_cli(capsys, root, *args)
    assert code == cli.EXIT_USER_ERROR and message in err, err
    assert "again" in err or "delete it" in err  # the fix
    assert run_cli(capsys, root, "runs")[0] == 0


def test_the_progress_log_is_read_from_its_end_and_bounded(copied, digits_run, monkeypatch):
    root, healthy = copied[0], digits_run
    store = RunStore(root)
    events = store.events(healthy)
    log = root / "runs" / healthy / "events.jsonl"
    size = log.stat().st_size
    monkeypatch.setattr("qat_core.store.EVENTS_LIMIT", size // 2)
    newest = store.events(healthy)
    assert 0 < len(newest) < len(events) and newest == events[-len(newest):]  # whole lines, the newest
    with log.open("a") as f:
        f.write('{"phase": "qat", "step": 1, "total": 9, "loss": 0.5')  # a line still being written
    assert store.events(healthy)[-1] == events[-1]


def test_an_index_that_is_not_a_file_is_rebuilt_from_the_run_folders(copied, digits_run, capsys):
    root, victim, _ = copied
    healthy = digits_run
    replace(root / "index.sqlite", "fifo")
    code, out, err = run_cli(capsys, root, "runs")
    assert code == 0 and healthy in out and victim in out, err
    assert len(list(root.glob("index.sqlite.damaged-*"))) == 1


def test_a_cached_baseline_that_is_not_a_file_is_trained_again(tmp_path):
    store = RunStore(tmp_path / "ws")
    replace(store.baseline_path("k"), "fifo")
    assert within(store.load_baseline, "k") is None and not os.path.lexists(store.baseline_path("k"))


def test_an_upload_over_the_limit_is_refused_before_it_is_saved(tmp_path, monkeypatch):
    store = RunStore(tmp_path / "ws")
    monkeypatch.setattr("qat_core.store.UPLOAD_LIMIT", 1000)
    with pytest.raises(StoreError, match=r"model.pt is 0 MB; an upload may be 0 MB at most. Give the file's path"):
        store.save_upload("model.pt", b"x" * 1001)
    assert not (tmp_path / "ws" / "uploads").exists()
    assert store.save_upload("model.pt", b"x" * 1000).read_bytes() == b"x" * 1000


# --- sweeps --------------------------------------------------------------------------------------------

def sweep_folder(store: RunStore, name: str = "damaged", **vary) -> Path:
    """A sweep's folder as a driver leaves it: its spec saved, nothing trained."""
    spec = sweep.from_dict({"name": name, "base": small_base().to_dict(), "vary": vary, "latency": False})
    folder = store.sweep_dir(name)
    folder.mkdir(parents=True)
    (folder / sweep.SPEC_FILE).write_text(spec.to_yaml())
    return folder


STATE_DAMAGE = ["[]", '{"state": ["training"]}', '{"state": "training", "total": "many"}', "{", "fifo", "dev-zero",
                "directory"]


@pytest.mark.parametrize("kind", STATE_DAMAGE)
def test_a_damaged_sweep_state_is_named_with_the_fix(tmp_path, kind):
    store = RunStore(tmp_path / "ws")
    folder = sweep_folder(store)
    replace(folder / sweep.STATE_FILE, kind)
    with memory_cap():
        state = within(sweep.state, store, "damaged")
    assert state["state"] == "damaged" and "state.json is damaged" in state["error"]
    assert "run the same sweep again" in state["error"] and not within(sweep.running, store, "damaged")


@pytest.mark.parametrize("kind", ["[1, 2]", '[{"run": "x"}]', '{"run": "x", "label": "y"}', "fifo", "dev-zero"])
def test_a_damaged_sweep_plan_is_named_with_the_fix(tmp_path, kind):
    store = RunStore(tmp_path / "ws")
    folder = sweep_folder(store)
    replace(folder / sweep.PLAN_FILE, kind)
    with memory_cap(), pytest.raises(StoreError, match=r"plan.json is damaged \(.*\); delete it and run the same "
                                                       r"sweep again"):
        within(sweep.sweep_frame, store, "damaged")


@pytest.mark.parametrize("kind", ["[]", '{"key": 1}', '{"key": "k", "plans": [1]}', "null", "fifo"])
def test_a_damaged_suggestion_file_fails_the_rerun_with_exit_2_naming_it(tmp_path, capsys, kind):
    store = RunStore(tmp_path / "ws")
    folder = sweep_folder(store, "sug", suggested={"average_bits": [3.0], "widths": [8, 4]})
    replace(folder / sweep.SUGGESTED_FILE, kind)
    code, _, err = run_cli(capsys, store.root, "sweep", str(folder / sweep.SPEC_FILE), "--quiet")
    assert code == cli.EXIT_USER_ERROR and "suggested.json is damaged" in err and "delete it" in err, err
    assert not store.list()  # refused before training anything


def test_a_damaged_sweep_log_is_no_reason_given(tmp_path):
    store = RunStore(tmp_path / "ws")
    folder = sweep_folder(store)
    (folder / sweep.STATE_FILE).write_text(json.dumps({"state": "training", "pid": 2 ** 22 + 1}))  # no such pid
    replace(folder / "driver.log", "fifo")
    state = within(sweep.state, store, "damaged")
    assert state["state"] == "stopped" and "crash, kill or shutdown" in state["error"]


def test_a_damaged_saved_spec_says_how_to_start_again(tmp_path):
    store = RunStore(tmp_path / "ws")
    folder = sweep_folder(store)
    (folder / sweep.SPEC_FILE).write_text("name: damaged\nbase: [")
    with pytest.raises(StoreError, match=r"saved spec cannot be used: .*qat-studio sweep SPEC"):
        sweep.saved_spec(store, "damaged")


# --- the user's tables and images -------------------------------------------------------------------------

def table_config(path) -> DataConfig:
    return DataConfig.model_validate({"dataset": "table", "path": str(path), "label_column": "diagnosis"})


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory"])
def test_a_table_path_that_is_not_a_file_is_refused_before_pandas_reads_it(tmp_path, kind):
    path = tmp_path / "table.csv"
    replace(path, kind)
    for read in (datasets.table_columns, lambda p: datasets.table(table_config(p))):
        with memory_cap(), pytest.raises(ConfigError, match=r"data.path .*table.csv (is not a regular file|is a "
                                                            r"directory)"):
            within(read, str(path))


def test_a_table_over_the_size_limit_is_refused_unread(tmp_path, monkeypatch):
    csv = write_table(tmp_path / "t.csv")
    monkeypatch.setattr(datasets, "TABLE_LIMIT", csv.stat().st_size - 1)
    with pytest.raises(ConfigError, match=r"t.csv is over .*; is it the right file"):
        datasets.table(table_config(csv))


def test_infinite_values_in_a_table_are_named_by_column_and_rows(tmp_path):
    csv = write_table(tmp_path / "t.csv")
    frame = pd.read_csv(csv)
    frame.loc[:2, "mean radius"] = np.inf
    frame.loc[5, "mean texture"] = 1e39  # past float32's range: inf once it is a tensor
    frame.to_csv(csv, index=False)
    with pytest.raises(ConfigError, match=r"column 'mean radius' has inf values in 3 row\(s\); column 'mean texture' "
                                          r"has inf values in 1 row\(s\) .*Replace them with finite numbers"):
        datasets.table(table_config(csv))
    frame.loc[:2, "mean radius"] = np.nan  # missing: the row is skipped and counted, by column
    frame.loc[5:6, "mean texture"] = np.nan
    frame.to_csv(csv, index=False)
    assert "5 row(s) with a missing value skipped (by column: 'mean radius' 3, 'mean texture' 2)" in \
        datasets.table(table_config(csv)).description


def test_an_image_declaring_a_huge_size_is_refused_from_its_header(tmp_path):
    folder = write_image_folder(tmp_path / "digits", classes=2, per_class=4)
    bomb = folder / "0" / "bomb.png"
    Image.new("1", (12000, 12000)).save(bomb)  # a small file (1 bit a pixel, compressed) of 144 Mpx
    assert bomb.stat().st_size < 500_000
    config = DataConfig.model_validate({"dataset": "image-folder", "path": str(folder), "image_size": 32})
    with memory_cap(1 << 30), pytest.raises(ConfigError, match=r"bomb.png has more than 50 million pixels"):
        within(datasets.image_folder, config, seconds=20)
    Image.new("1", (8000, 8000)).save(bomb)  # 64 Mpx: under PIL's own limit, over ours
    with pytest.raises(ConfigError, match=r"bomb.png has more than 50 million pixels \(8000×8000\): .*Downscale it"):
        datasets.image_folder(config)

