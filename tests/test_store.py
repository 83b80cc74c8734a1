"""The run store: listing, atomic files, crashed and failed runs."""

import json
import os
import subprocess
import sys

import pytest

from qat_core.config import RunConfig
from qat_core.errors import StoreError
from qat_core.store import RunStore


def test_a_crashed_process_leaves_a_failed_run_not_a_broken_store(tmp_path):
    store = RunStore(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run_id = store.create_run(RunConfig(), pid=dead.pid)
    (store.run_dir(run_id) / ".qat.pt.abc.tmp").write_bytes(b"half")  # what a crash mid-write leaves
    record = store.list()[0]
    assert record["status"] == "failed" and "stopped before it finished" in record["error"]
    with pytest.raises(StoreError, match="is failed: the process running it stopped"):
        store.require_done(run_id)


def test_unknown_run_and_damaged_files(tmp_path):
    store = RunStore(tmp_path)
    with pytest.raises(StoreError, match="no run 'nope'"):
        store.get("nope")
    run_id = store.create_run(RunConfig())
    store.write_result(run_id, "notes", {"x": 1})
    assert store.read_result(run_id, "notes") == {"x": 1}
    (store.run_dir(run_id) / "results" / "notes.json").write_text("{trunc")
    with pytest.raises(StoreError, match="damaged"):
        store.read_result(run_id, "notes")
    (store.run_dir(run_id) / "qat.pt").write_bytes(b"not a torch file")
    with pytest.raises(StoreError, match="damaged"):
        store.load_state(run_id, "qat.pt")


def test_events_skip_a_line_being_written(tmp_path):
    store = RunStore(tmp_path)
    run_id = store.create_run(RunConfig())
    log = store.event_log(run_id)
    log({"phase": "qat", "step": 1, "total": 2, "loss": 1.0})
    log.flush()
    with (store.run_dir(run_id) / "events.jsonl").open("a") as f:
        f.write('{"phase": "qat", "st')  # a writer mid-line
    assert [e["step"] for e in store.events(run_id)] == [1]


def test_workspace_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot use workspace"):
        RunStore(blocker / "ws")


def test_runs_are_listed_newest_first_with_metrics(tmp_path):
    store = RunStore(tmp_path)
    first = store.create_run(RunConfig(name="a"))
    second = store.create_run(RunConfig(name="b"))
    store.update_metrics(second, qat={"accuracy": 0.5})
    store.finish(second)
    listed = store.list()
    assert [r["id"] for r in listed] == [second, first]
    assert listed[0]["metrics"] == {"qat": {"accuracy": 0.5}} and listed[0]["status"] == "done"
    assert json.loads(RunConfig().to_json()) == listed[1]["config"] | {"name": ""}
    assert os.path.isdir(listed[0]["path"])


def test_drafts_round_trip_and_ids_are_checked(tmp_path):
    from qat_core.errors import ConfigError

    store = RunStore(tmp_path)
    config = RunConfig(model="digits-mlp", seed=7)
    assert not store.has_draft("tab-1")
    store.save_draft("tab-1", config)
    assert store.has_draft("tab-1") and store.load_draft("tab-1") == config
    store.save_draft("tab-1", config.model_copy(update={"seed": 8}))  # replaced, atomically
    assert store.load_draft("tab-1").seed == 8
    for bad in ("../escape", "a/b", "", ".hidden", "x" * 65, "tab 1", None):
        assert not store.has_draft(bad)
        with pytest.raises(StoreError, match="is not a draft id: use 1 to 64 letters, digits"):
            store.save_draft(bad, config)
    assert not (tmp_path / "escape.yaml").exists()
    with pytest.raises(StoreError, match="no draft 'gone'"):
        store.load_draft("gone")
    store.draft_path("broken").write_text("finetune: {epochs: -1}\n")
    with pytest.raises(ConfigError, match="finetune.epochs"):
        store.load_draft("broken")
