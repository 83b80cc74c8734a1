"""Runs a user can manage (issue 21 item 4): rename and delete from the CLI and the store, a running run
refused, a sweep's run deleted cleanly, and a draft that starts one run however often Start is pressed."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest
import yaml

from qat_core import planning, runner, sweep
from qat_core.cli import main
from qat_core.errors import DiskFullError, StoreError
from qat_core.store import RunStore
from tests.conftest import full_disk_for
from tests.test_cli import cli


def finished_run(store: RunStore, name: str = "", **metrics) -> str:
    """A run with a real default config, marked done without training (renaming and deleting need no weights)."""
    config = runner.default_config("digits-cnn").model_copy(update={"name": name})
    run_id = store.create_run(config, metrics=metrics or None)
    store.finish(run_id)
    return run_id


@pytest.fixture
def sleeper():
    """A live process whose pid a run can carry: that run is running until the process ends."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_rename_from_the_cli_changes_the_index_and_the_run_folder(tmp_path, capsys):
    store = RunStore(tmp_path / "ws")
    run_id = finished_run(store)
    done = cli("rename", run_id, "first try", workspace=store.root)
    assert done.returncode == 0, done.stderr
    assert "'first try'" in done.stdout
    record = store.get(run_id)
    assert record["name"] == "first try" and record["config"]["name"] == "first try"
    assert yaml.safe_load((store.run_dir(run_id) / "config.yaml").read_text())["name"] == "first try"
    assert json.loads((store.run_dir(run_id) / "run.json").read_text())["name"] == "first try"
    (store.root / "index.sqlite").unlink()  # rebuilt from the folders: the name is kept there too
    assert RunStore(store.root).get(run_id)["name"] == "first try"

    assert main(["--workspace", str(store.root), "runs"]) == 0
    assert "first try" in capsys.readouterr().out
    assert main(["--workspace", str(store.root), "rename", run_id, ""]) == 0  # back to its model and plan
    assert planning.run_title(store.get(run_id)["config"]) == "digits-cnn · W8A8"
    assert main(["--workspace", str(store.root), "rename", run_id, "two\nlines"]) == 2
    assert "one line of printable text" in capsys.readouterr().err
    assert main(["--workspace", str(store.root), "rename", run_id, "x" * 81]) == 2
    assert "at most 80 characters" in capsys.readouterr().err


def test_a_rename_that_cannot_be_saved_changes_nothing(tmp_path, monkeypatch):
    store = RunStore(tmp_path / "ws")
    run_id = finished_run(store, "kept")
    full_disk_for(monkeypatch, lambda path: path.name == "run.json")
    with pytest.raises(DiskFullError):
        store.rename(run_id, "lost")
    assert store.get(run_id)["name"] == "kept"
    assert yaml.safe_load((store.run_dir(run_id) / "config.yaml").read_text())["name"] == "kept"


def test_delete_asks_for_yes_and_never_waits_for_an_answer(tmp_path, capsys):
    store = RunStore(tmp_path / "ws")
    run_id, other = finished_run(store), finished_run(store)
    asked = cli("delete", run_id, workspace=store.root)  # stdin is the terminal's, or nothing: never read
    assert asked.returncode == 2 and "add --yes" in asked.stderr and "Traceback" not in asked.stderr
    assert store.run_dir(run_id).is_dir()
    assert main(["--workspace", str(store.root), "delete", run_id, "--yes"]) == 0
    assert f"deleted run {run_id}" in capsys.readouterr().out
    assert [r["id"] for r in store.list()] == [other] and not store.run_dir(run_id).exists()
    assert main(["--workspace", str(store.root), "delete", run_id, "--yes"]) == 2
    assert "no run" in capsys.readouterr().err


def test_a_running_run_is_neither_renamed_nor_deleted(tmp_path, sleeper, capsys):
    store = RunStore(tmp_path / "ws")
    run_id = store.create_run(runner.default_config("digits-cnn"), pid=sleeper)
    for args in (["rename", run_id, "new"], ["delete", run_id, "--yes"]):
        assert main(["--workspace", str(store.root), *args]) == 2
        err = capsys.readouterr().err
        assert f"run {run_id} is running: cancel it" in err and "then " + args[0] in err
    assert store.get(run_id)["status"] == "running" and store.get(run_id)["name"] is not None
    assert store.get(run_id)["config"]["name"] == ""


def test_deleting_a_sweeps_run_leaves_the_sweep_readable(tmp_path, sleeper):
    store = RunStore(tmp_path / "ws")
    runs = [finished_run(store, f"widths: {b}-bit weights", sweep={"id": "widths", "label": f"{b}-bit weights"})
            for b in (8, 4)]
    folder = store.sweep_dir("widths")
    folder.mkdir(parents=True)
    (folder / "plan.json").write_text(json.dumps([{"run": r, "label": f"{b}-bit weights"}
                                                  for r, b in zip(runs, (8, 4), strict=True)]))
    (folder / "state.json").write_text(json.dumps({"state": "training", "pid": sleeper, "message": "training"}))
    with pytest.raises(StoreError, match=f"run {runs[0]} belongs to sweep widths, which is running"):
        sweep.delete_run(store, runs[0])
    (folder / "state.json").write_text(json.dumps({"state": "done", "message": "done"}))
    sweep.delete_run(store, runs[0])
    frame = sweep.sweep_frame(store, "widths")
    assert list(frame["run"]) == [runs[1]] and list(frame["status"]) == ["done"]  # no "pending" left behind


def test_a_draft_starts_one_run_however_often_start_is_pressed(tmp_path, monkeypatch):
    """Two clicks, two reruns or two tabs on one draft: one run. The same draft changed starts another."""
    store = RunStore(tmp_path / "ws")
    config = runner.default_config("digits-cnn")
    store.save_draft("d1", config)
    started = []

    def start(c):
        started.append(finished_run(store))
        return started[-1]

    results = []
    threads = [threading.Thread(target=lambda: results.append(store.start_draft("d1", config, start)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(started) == 1 and {r for r, _ in results} == {started[0]}
    assert sorted(new for _, new in results) == [False, False, False, True]
    assert store.draft_started("d1", config) == started[0]
    changed = config.model_copy(update={"name": "again"})
    assert store.draft_started("d1", changed) is None
    assert store.start_draft("d1", changed, start) == (started[1], True)
    store.fail(started[1], "cancelled", cancelled=True)  # a cancelled run: the draft may start again
    assert store.draft_started("d1", changed) is None
    assert store.start_draft("d1", changed, start) == (started[2], True)
    store.delete(started[2])  # so may a deleted one
    assert store.draft_started("d1", changed) is None
