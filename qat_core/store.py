"""Runs on disk: an SQLite index plus one folder a run. The only module that owns run files.

Layout of a workspace::

    index.sqlite               one row a run: id, status, error, config, metrics
    runs/<id>/                 config.yaml, events.jsonl, fp32.pt, qat.pt, results/*.json, *.onnx
    baselines/<key>.pt         FP32 baselines, reused across runs of the same model, data and seed
    drafts/<id>.yaml           configs being edited in the app (one a browser tab), not yet runs

Every file is written to a temporary name and renamed into place, and a run is ``done`` only
after all of its files are: a crash or a cancel leaves a run marked failed/cancelled (or a
``running`` row whose process is gone, which listing marks ``failed``), never a half-written one.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from qat_core.config import RunConfig
from qat_core.config import load as load_config
from qat_core.errors import StoreError

WORKSPACE_ENV = "QAT_STUDIO_HOME"
STATUSES = ("running", "done", "failed", "cancelled")
CANCEL_FLAG = "CANCEL"
DRAFT_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # a draft id: safe as a file name and in a URL


def default_workspace() -> Path:
    return Path(os.environ.get(WORKSPACE_ENV) or Path.home() / ".qat-studio")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunStore:
    """A workspace folder of runs; safe to share between the app's threads and worker processes."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_workspace()
        try:
            (self.root / "runs").mkdir(parents=True, exist_ok=True)
            (self.root / "baselines").mkdir(exist_ok=True)
        except OSError as err:
            raise StoreError(f"cannot use workspace {self.root}: {err.strerror}; choose another with "
                             f"--workspace or ${WORKSPACE_ENV}") from None
        with self._db() as db:
            db.execute("""CREATE TABLE IF NOT EXISTS runs (
                id TEXT PRIMARY KEY, created REAL, updated REAL, name TEXT, model TEXT,
                status TEXT, error TEXT, pid INTEGER, config TEXT, metrics TEXT)""")

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.root / "index.sqlite", timeout=30)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            with db:
                yield db
        finally:
            db.close()

    # --- runs ---------------------------------------------------------------------------------
    def create_run(self, config: RunConfig, pid: int | None = None) -> str:
        run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
        folder = self.run_dir(run_id)
        folder.mkdir(parents=True)
        atomic_write_text(folder / "config.yaml", config.to_yaml())
        now = time.time()
        with self._db() as db:
            db.execute("INSERT INTO runs VALUES (?,?,?,?,?,?,?,?,?,?)",
                       (run_id, now, now, config.name, config.model, "running", None, pid or os.getpid(),
                        config.to_json(), "{}"))
        return run_id

    def set_pid(self, run_id: str, pid: int) -> None:
        with self._db() as db:
            db.execute("UPDATE runs SET pid=? WHERE id=?", (pid, run_id))

    def run_dir(self, run_id: str) -> Path:
        if not run_id or "/" in run_id or run_id.startswith("."):
            raise StoreError(f"{run_id!r} is not a run id")
        return self.root / "runs" / run_id

    def _row_to_record(self, row: tuple) -> dict[str, Any]:
        run_id, created, updated, name, model, status, error, pid, config, metrics = row
        if status == "running" and not _pid_alive(pid):
            status, error = "failed", "the process running it stopped before it finished (crash or shutdown)"
            self._set_status(run_id, status, error)
        return {"id": run_id, "path": str(self.run_dir(run_id)), "status": status, "error": error,
                "name": name, "model": model, "created": created, "updated": updated,
                "config": json.loads(config), "metrics": json.loads(metrics)}

    def get(self, run_id: str) -> dict[str, Any]:
        with self._db() as db:
            row = db.execute("SELECT * FROM runs WHERE id=?", (run_id,)).fetchone()
        if row is None:
            raise StoreError(f"no run {run_id!r} in workspace {self.root}; `qat-studio runs` lists them")
        return self._row_to_record(row)

    def list(self) -> list[dict[str, Any]]:
        with self._db() as db:
            rows = db.execute("SELECT * FROM runs ORDER BY created DESC").fetchall()
        return [self._row_to_record(r) for r in rows]

    def config(self, run_id: str) -> RunConfig:
        return RunConfig.model_validate(self.get(run_id)["config"])

    def _set_status(self, run_id: str, status: str, error: str | None) -> None:
        with self._db() as db:
            db.execute("UPDATE runs SET status=?, error=?, updated=? WHERE id=?", (status, error, time.time(), run_id))

    def update_metrics(self, run_id: str, **sections: Any) -> dict[str, Any]:
        """Merge sections (``fp32=…``, ``bench=…``) into the run's metrics."""
        with self._db() as db:
            row = db.execute("SELECT metrics FROM runs WHERE id=?", (run_id,)).fetchone()
            if row is None:
                raise StoreError(f"no run {run_id!r}")
            metrics = json.loads(row[0]) | sections
            db.execute("UPDATE runs SET metrics=?, updated=? WHERE id=?", (json.dumps(metrics), time.time(), run_id))
        return metrics

    def finish(self, run_id: str) -> None:
        self._set_status(run_id, "done", None)

    def fail(self, run_id: str, error: str, cancelled: bool = False) -> None:
        """Record the failure and drop weights that may be partial; config, events and error stay."""
        for name in ("qat.pt", "ptq.pt", "fp32.pt"):
            (self.run_dir(run_id) / name).unlink(missing_ok=True)
        self._set_status(run_id, "cancelled" if cancelled else "failed", error)

    def delete(self, run_id: str) -> None:
        self.get(run_id)
        with self._db() as db:
            db.execute("DELETE FROM runs WHERE id=?", (run_id,))
        shutil.rmtree(self.run_dir(run_id), ignore_errors=True)

    def require_done(self, run_id: str) -> dict[str, Any]:
        record = self.get(run_id)
        if record["status"] != "done":
            why = f": {record['error']}" if record["error"] else ""
            raise StoreError(f"run {run_id} is {record['status']}{why}; only finished runs have a model to use")
        return record

    # --- cancel -------------------------------------------------------------------------------
    def request_cancel(self, run_id: str) -> None:
        atomic_write_text(self.run_dir(run_id) / CANCEL_FLAG, "cancel requested\n")

    def cancel_flag(self, run_id: str) -> RunCancel:
        return RunCancel(self.run_dir(run_id) / CANCEL_FLAG)

    # --- files of a run -----------------------------------------------------------------------
    def save_state(self, run_id: str, name: str, state: dict[str, torch.Tensor]) -> None:
        path = self.run_dir(run_id) / name
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{name}.", suffix=".tmp")
        os.close(fd)
        try:
            torch.save(state, tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load_state(self, run_id: str, name: str) -> dict[str, torch.Tensor]:
        path = self.run_dir(run_id) / name
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise StoreError(f"run {run_id} has no {name}; it did not finish, or its folder was changed") from None
        except Exception as err:
            raise StoreError(f"{path} is damaged ({type(err).__name__}); train the run again") from None

    def write_result(self, run_id: str, name: str, data: Any) -> Path:
        path = self.run_dir(run_id) / "results" / f"{name}.json"
        atomic_write_text(path, json.dumps(data, indent=2))
        return path

    def read_result(self, run_id: str, name: str) -> Any | None:
        path = self.run_dir(run_id) / "results" / f"{name}.json"
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise StoreError(f"{path} is damaged; run that step again") from None

    def artifact(self, run_id: str, name: str) -> Path:
        """Path for a file the run owns (ONNX models, reports); write it with ``atomic_write_bytes``."""
        return self.run_dir(run_id) / name

    def events(self, run_id: str, since: int = 0) -> list[dict[str, Any]]:
        """Progress events of a run (steps, losses, accuracies), from line ``since`` on."""
        path = self.run_dir(run_id) / "events.jsonl"
        if not path.exists():
            return []
        out = []
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f):
                if i >= since and line.endswith("\n"):  # a line still being written is left for later
                    out.append(json.loads(line))
        return out

    def event_log(self, run_id: str) -> EventLog:
        return EventLog(self.run_dir(run_id) / "events.jsonl")

    # --- drafts: configs being edited, not yet runs ---------------------------------------------
    def draft_path(self, draft_id: str) -> Path:
        if not isinstance(draft_id, str) or not DRAFT_ID.match(draft_id):
            raise StoreError(f"{draft_id!r} is not a draft id: use 1 to 64 letters, digits, '-' or '_'")
        return self.root / "drafts" / f"{draft_id}.yaml"

    def has_draft(self, draft_id: str | None) -> bool:
        """Whether a draft with this id was saved; False for a malformed id (e.g. one edited in a URL)."""
        return bool(draft_id) and isinstance(draft_id, str) and DRAFT_ID.match(draft_id) is not None \
            and self.draft_path(draft_id).exists()

    def save_draft(self, draft_id: str, config: RunConfig) -> Path:
        """Save (or replace) a draft config as YAML; raises StoreError for a malformed id."""
        path = self.draft_path(draft_id)
        atomic_write_text(path, config.to_yaml())
        return path

    def load_draft(self, draft_id: str) -> RunConfig:
        """A saved draft; StoreError if the id is malformed or unknown, ConfigError if the file is invalid."""
        path = self.draft_path(draft_id)
        if not path.exists():
            raise StoreError(f"no draft {draft_id!r} in workspace {self.root}; it was never saved or was deleted")
        return load_config(path)

    # --- FP32 baselines -----------------------------------------------------------------------
    def baseline_path(self, key: str) -> Path:
        return self.root / "baselines" / f"{key}.pt"

    def load_baseline(self, key: str) -> dict[str, Any] | None:
        path = self.baseline_path(key)
        if not path.exists():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a damaged cache entry is retrained, not fatal
            path.unlink(missing_ok=True)
            return None

    def save_baseline(self, key: str, payload: dict[str, Any]) -> None:
        path = self.baseline_path(key)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        torch.save(payload, tmp)
        os.replace(tmp, path)


class RunCancel:
    """Cooperative cancel through a flag file, so another process (the app) can cancel a run."""

    def __init__(self, path: Path):
        self.path = path

    def is_set(self) -> bool:
        return self.path.exists()


class EventLog:
    """Appends events as JSON lines; flushed often enough for a live chart, not every step."""

    FLUSH_SECONDS = 0.25

    def __init__(self, path: Path):
        self.path = path
        self._buffer: list[str] = []
        self._last = 0.0

    def __call__(self, event: dict[str, Any]) -> None:
        self._buffer.append(json.dumps(event) + "\n")
        now = time.monotonic()
        if now - self._last >= self.FLUSH_SECONDS or "test_accuracy" in event or event.get("step") == event.get("total"):
            self.flush()
            self._last = now

    def flush(self) -> None:
        if self._buffer:
            with self.path.open("a", encoding="utf-8") as f:
                f.write("".join(self._buffer))
            self._buffer.clear()
