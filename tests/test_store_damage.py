"""The run store under damage: a bad row, a NULL, an extra column, a corrupt, truncated or deleted
index, a deleted run folder, damaged run files, a full disk. Every healthy run stays listed and
usable; each damaged one is named with the reason; commands on it give one clear message."""

from __future__ import annotations

import errno
import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qat_core import cli
from qat_core import store as store_module
from qat_core.errors import DiskFullError, StoreError
from qat_core.report import runs_frame
from qat_core.store import RunStore
from tests.conftest import full_disk_for, quick_config, small_base


def run_cli(capsys, root: Path, *args: str) -> tuple[int, str, str]:
    code = cli.main(["--workspace", str(root), *args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and len(err) < 2000
    return code, out, err


@pytest.fixture
def copied(workspace, digits_run, tmp_path):
    """A copy of the session's workspace (a real finished digits run in it) plus a victim run to damage."""
    root = tmp_path / "ws"
    shutil.copytree(workspace.root, root, ignore=shutil.ignore_patterns("*.onnx", "analysis", "index.sqlite-*"))
    store = RunStore(root)
    victim = store.create_run(quick_config())
    store.update_metrics(victim, fp32={"accuracy": 0.9}, ptq={"accuracy": 0.8}, qat={"accuracy": 0.85})
    store.finish(victim)
    healthy = {r["id"]: r for r in store.list() if r["id"] != victim}
    assert digits_run in healthy
    return root, victim, healthy


def sql(root: Path, statement: str, *params) -> None:
    db = sqlite3.connect(root / "index.sqlite")
    with db:
        db.execute(statement, params)
    db.close()


def damage_record_file(root: Path, run_id: str) -> None:
    (root / "runs" / run_id / "run.json").write_bytes(b"\x00\xffnot json")


DAMAGE = {
    # name: (damage, the victim's status afterwards, words in the reason)
    "bad JSON in a row": (lambda root, v: sql(root, "UPDATE runs SET metrics='{\"qat\": ' WHERE id=?", v), "done", None),
    "bad JSON in a row and its run.json": (
        lambda root, v: (sql(root, "UPDATE runs SET metrics='{\"qat\": ' WHERE id=?", v), damage_record_file(root, v)),
        "damaged", "index row is damaged"),
    "a NULL": (lambda root, v: sql(root, "UPDATE runs SET config=NULL, created=NULL WHERE id=?", v), "done", None),
    "a NULL and no run.json": (
        lambda root, v: (sql(root, "UPDATE runs SET config=NULL WHERE id=?", v), (root / "runs" / v / "run.json").unlink()),
        "damaged", "run.json is missing"),
    "a metric of the wrong type": (
        lambda root, v: (sql(root, "UPDATE runs SET metrics='{\"qat\": {\"accuracy\": \"high\"}}' WHERE id=?", v),
                         damage_record_file(root, v)), "damaged", "metrics.qat.accuracy"),
    "an extra column": (lambda root, v: sql(root, "ALTER TABLE runs ADD COLUMN extra TEXT DEFAULT 'x'"), "done", None),
    "a corrupt index": (lambda root, v: (root / "index.sqlite").write_bytes(b"\x13garbage" * 512), "done", None),
    "a truncated index": (lambda root, v: (root / "index.sqlite").write_bytes((root / "index.sqlite").read_bytes()[:3000]),
                          "done", None),
    "a deleted index": (lambda root, v: (root / "index.sqlite").unlink(), "done", None),
    "a missing column": (lambda root, v: sql(root, "ALTER TABLE runs DROP COLUMN metrics"), "done", None),
    "a deleted run folder": (lambda root, v: shutil.rmtree(root / "runs" / v), "damaged", "is missing"),
}


@pytest.mark.parametrize("name", list(DAMAGE))
def test_damage_hides_no_healthy_run_and_names_the_damaged_one(copied, capsys, name):
    root, victim, healthy = copied
    damage, status, reason = DAMAGE[name]
    damage(root, victim)

    code, out, _ = run_cli(capsys, root, "runs", "--json")
    assert code == 0
    listed = {r["id"]: r for r in json.loads(out)}
    for run_id, record in healthy.items():  # nothing healthy is lost
        assert listed[run_id]["status"] == record["status"] and listed[run_id]["metrics"] == record["metrics"]
    assert listed[victim]["status"] == status
    if status == "done":  # repaired from the run's folder, metrics and all
        assert listed[victim]["metrics"]["qat"] == {"accuracy": 0.85}
        return
    assert reason in listed[victim]["error"]

    code, out, _ = run_cli(capsys, root, "runs")
    assert code == 0 and f"{victim}  damaged" in out and reason in out
    code, out, _ = run_cli(capsys, root, "show", victim)
    assert code == 0 and "(damaged)" in out and reason in out
    for command in ("export", "report", "eval"):
        code, _, err = run_cli(capsys, root, command, victim)
        assert code == cli.EXIT_USER_ERROR and err.count("\n") == 1 and "damaged" in err, (command, err)


def test_a_rebuilt_index_keeps_the_damaged_file_and_every_run_works(copied, capsys, digits_run):
    root, victim, healthy = copied
    (root / "index.sqlite").write_bytes(b"not a database at all" * 100)
    assert {r["id"] for r in RunStore(root).list()} == set(healthy) | {victim}
    assert len(list(root.glob("index.sqlite.damaged-*"))) == 1
    code, out, _ = run_cli(capsys, root, "report", digits_run, "-o", str(root / "r.html"))
    assert code == 0 and "Per-layer error (after fine-tune)" in (root / "r.html").read_text()


def test_damage_while_the_store_is_open_is_repaired_on_the_next_query(copied):
    root, victim, healthy = copied
    store = RunStore(root)  # the app holds one store for its lifetime
    (root / "index.sqlite").write_bytes(b"\x00" * 4096)
    assert {r["id"] for r in store.list()} == set(healthy) | {victim}


def test_damaged_run_files_give_one_message_and_leave_the_listing_whole(copied, capsys, digits_run):
    root, victim, healthy = copied
    store = RunStore(root)
    results = root / "runs" / digits_run / "results"
    # a binary results file, one of the wrong shape, and bad lines in the progress log
    store.update_metrics(digits_run, bench={"speedup": 1.0})
    (results / "bench.json").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    layers = (results / "layers.json").read_text()
    with (root / "runs" / digits_run / "events.jsonl").open("ab") as f:
        f.write(b'\xff\xfe{"phase": \n[1, 2]\n{"phase": "qat", "step": "x", "total": 1, "loss": 1}\n')

    frame = runs_frame(store)  # the Home and Compare tables
    assert set(frame["run"]) == set(healthy) | {victim}
    assert "bench.json is damaged" in frame.set_index("run").loc[digits_run, "error"]
    code, _, err = run_cli(capsys, root, "report", digits_run)
    assert code == cli.EXIT_USER_ERROR and "bench.json is damaged" in err and "benchmark the run again" in err
    (results / "bench.json").unlink()
    (results / "layers.json").write_text('{"rows": "not a list"}')
    code, _, err = run_cli(capsys, root, "report", digits_run)
    assert code == cli.EXIT_USER_ERROR and "layers.json is damaged" in err and "train the run again" in err

    (results / "layers.json").write_text(layers)
    events = store.events(digits_run)
    assert events and all(isinstance(e["phase"], str) for e in events)
    assert run_cli(capsys, root, "report", digits_run)[0] == 0  # the bad event lines are skipped


def test_an_old_config_that_no_longer_validates_is_a_message(copied, capsys):
    root, victim, _ = copied
    sql(root, "UPDATE runs SET config=json_set(config, '$.seed', 4294967296) WHERE id=?", victim)
    with pytest.raises(StoreError, match=r"is damaged: its config is no longer valid \(seed: .*from 0 to 4294967295"):
        RunStore(root).config(victim)
    assert runs_frame(RunStore(root)).set_index("run").loc[victim, "status"] == "damaged"
    code, _, err = run_cli(capsys, root, "report", victim)
    assert code == cli.EXIT_USER_ERROR and "no longer valid" in err


# --- a full disk ------------------------------------------------------------------------------
def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_writing_files_is_said_plainly_and_changes_nothing(copied, capsys, monkeypatch, digits_run):
    root, _, _ = copied
    run_dir = root / "runs" / digits_run
    before = {p.name: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    monkeypatch.setattr(store_module.os, "fsync", enospc)
    code, _, err = run_cli(capsys, root, "export", digits_run)
    assert code == cli.EXIT_USER_ERROR and err.startswith("error: disk full: could not write") and "Free some space" in err
    after = {p.name: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert after == before  # no partial file, no temporary left behind
    monkeypatch.undo()
    assert run_cli(capsys, root, "export", digits_run)[0] == 0


def test_disk_full_in_the_index_is_said_plainly_and_keeps_the_row(copied, monkeypatch):
    root, victim, _ = copied
    store = RunStore(root)
    connect = store._connect

    def full_database() -> sqlite3.Connection:  # as SQLite reports a full disk: SQLITE_FULL
        db = connect()
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count={pages}")
        return db

    monkeypatch.setattr(store, "_connect", full_database)
    with pytest.raises(StoreError, match="disk full: could not write .*index.sqlite"):
        store.update_metrics(victim, notes={"text": "x" * 200_000})
    monkeypatch.undo()
    assert "notes" not in store.get(victim)["metrics"] and store.get(victim)["status"] == "done"


def test_a_real_full_disk_on_a_small_tmpfs(workspace, digits_run, tmp_path, capsys):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN); the simulated ENOSPC tests above still run")
    try:
        root = mount / "ws"
        shutil.copytree(workspace.root / "runs" / digits_run, root / "runs" / digits_run,
                        ignore=shutil.ignore_patterns("*.onnx", "analysis", "*.html"))
        assert {r["id"] for r in RunStore(root).list()} == {digits_run}  # index rebuilt from the folder
        filler = mount / "filler"
        with filler.open("wb", buffering=0) as f:  # fill the disk to the last byte
            try:
                while True:
                    f.write(b"\0" * 65536)
            except OSError as err:
                assert err.errno == errno.ENOSPC
        code, _, err = run_cli(capsys, root, "export", digits_run)
        assert code == cli.EXIT_USER_ERROR and "disk full" in err
        code, out, _ = run_cli(capsys, root, "runs")
        assert code == 0 and digits_run in out and "done" in out
        filler.unlink()
        assert run_cli(capsys, root, "export", digits_run)[0] == 0
        assert not list(root.rglob("*.tmp"))
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_inside_torch_save_is_disk_full(tmp_path, monkeypatch, capsys):
    """torch.save reports a failed write as RuntimeError("unexpected pos ..."): `train` said "internal error".
    Here every checkpoint lands on /dev/full, where each write fails with the kernel's ENOSPC."""
    (tmp_path / "c.yaml").write_text(small_base().to_yaml())
    root = tmp_path / "ws"
    full_disk_for(monkeypatch, lambda path: path.suffix == ".pt")
    code, _, err = run_cli(capsys, root, "train", str(tmp_path / "c.yaml"), "--quiet")
    assert code == cli.EXIT_USER_ERROR and "error: disk full: could not write" in err and ".pt" in err, err
    [run] = RunStore(root).list()
    assert run["status"] == "failed" and run["error"].startswith("disk full")
    assert not list(root.rglob("*.pt")) and not list(root.rglob("*.tmp"))


def test_a_checkpoint_larger_than_a_small_tmpfs_is_disk_full(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN); the /dev/full tests above still run")
    try:
        store = RunStore(mount / "ws")
        run = store.create_run(quick_config())
        with pytest.raises(DiskFullError, match="disk full: could not write .*fp32.pt"):
            store.save_state(run, "fp32.pt", {"weight": torch.zeros(1_000_000)})  # 4 MB
        assert not (store.run_dir(run) / "fp32.pt").exists() and not list(mount.rglob("*.tmp"))
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_temporary_folder_during_eval_is_disk_full(copied, digits_run, monkeypatch, capsys):
    """eval writes a probe model to the temporary folder; on a full one onnx.save raised a bare OSError."""
    root, _, _ = copied
    assert run_cli(capsys, root, "export", digits_run)[0] == 0
    full_disk_for(monkeypatch, lambda path: path.name == "probe.onnx")
    code, _, err = run_cli(capsys, root, "eval", digits_run)
    assert code == cli.EXIT_USER_ERROR and "disk full: could not write" in err and "probe.onnx" in err, err


# --- temporary files after kill -9 ------------------------------------------------------------
def test_orphan_temporary_files_are_removed_when_the_store_opens(tmp_path):
    store = RunStore(tmp_path / "ws")
    run_id = store.create_run(quick_config())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = store.run_dir(run_id)
    orphans = [folder / f".qat.pt.{dead.pid}.x1y2z3.tmp", folder / "results" / f".bench.json.{dead.pid}.abc.tmp",
               store.root / "baselines" / f".k.pt.{dead.pid}.q.tmp"]
    live = folder / f".fp32.pt.{sys.modules['os'].getpid()}.abc.tmp"  # a writer still at work: kept
    for path in [*orphans, live]:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"half")
    RunStore(store.root)
    assert not any(p.exists() for p in orphans) and live.exists()


# --- workspaces that are not ------------------------------------------------------------------
def test_a_folder_with_other_files_is_not_made_a_workspace(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, tmp_path, "runs")
    assert code == cli.EXIT_USER_ERROR and "holds other files and is not a QAT Studio workspace" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # nothing written into it


@pytest.mark.skipif(Path("/runs").is_dir() or Path("/index.sqlite").exists(), reason="/ looks like a workspace here")
def test_the_root_folder_is_not_made_a_workspace(capsys):
    code, _, err = run_cli(capsys, Path("/"), "runs")
    assert code == cli.EXIT_USER_ERROR and "/ holds other files" in err and not Path("/index.sqlite").exists()
