"""Runs on disk: one folder a run, and an SQLite index over them. The only module that owns run files.

Layout of a workspace::

    index.sqlite               one row a run: id, status, error, config, metrics (a cache of the folders)
    runs/<id>/                 config.yaml, run.json, events.jsonl, fp32.pt, qat.pt, results/*.json, *.onnx
    baselines/<key>.pt         FP32 baselines, reused across runs of the same model, data and seed
    drafts/<id>.yaml           configs being edited in the app (one a browser tab), not yet runs

Every file is written to a temporary name and renamed into place, and a run is ``done`` only
after all of its files are: a crash or a cancel leaves a run marked failed/cancelled (or a
``running`` row whose process is gone, which listing marks ``failed``), never a half-written one.

Damage is contained to the run it hits. Each row is also kept as ``run.json`` in its run's folder,
so a damaged row is repaired from it and a damaged or deleted index is rebuilt from the folders;
a run that cannot be read either way is listed as ``damaged`` with the reason, and every other
run stays usable. A full disk is reported as such, and leaves what was saved before untouched.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Literal, TextIO, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Json, TypeAdapter, ValidationError

from qat_core import files
from qat_core.config import RunConfig
from qat_core.config import load as load_config
from qat_core.errors import DiskFullError, QATError, StoreError

WORKSPACE_ENV = "QAT_STUDIO_HOME"
STATUSES = ("running", "done", "failed", "cancelled", "damaged")
CANCEL_FLAG = "CANCEL"
WORKSPACE_PARTS = ("index.sqlite", "runs", "baselines", "drafts", "uploads", "sweeps")  # any of them: a workspace already
RECORD_FILE = "run.json"  # the run's index row, kept in its folder: the index can be rebuilt from the folders
DRAFT_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # a draft id: safe as a file name and in a URL
NAME_LIMIT = 80  # characters of a run's name: it heads tables and pickers
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
SWEEP_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")  # short: its runs' ids start with it
SWEEP_ID_RULE = "1 to 40 lower-case letters, digits, '-' or '_', starting with a letter or digit"  # SWEEP_ID in words
COLUMNS = ("id", "created", "updated", "name", "model", "status", "error", "pid", "config", "metrics")
SCHEMA_VERSION = 1  # 1: run.json beside each run (older workspaces get theirs when first opened)
_SELECT = f"SELECT {', '.join(COLUMNS)} FROM runs"  # by name: an extra column added by hand is ignored
_INSERT = f"INSERT INTO runs ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
NO_TABLE = "it has no table of runs"
SWEEP_LOCK_WAIT = 3.0  # seconds a new sweep driver waits for a killed one's workers to exit
STALE_TMP_SECONDS = 3600  # a temporary file without a live writer's pid is left over from a crash after this
EVENTS_LIMIT = 8 * files.MB  # the newest part of a progress log read for curves: ~50,000 steps (a step's line: ~150 B)
UPLOAD_LIMIT = 500 * files.MB  # an uploaded file is held in memory (the browser's copy, then the saved one): a
#                               ViT-B or ResNet-152 checkpoint fits; a larger file is given by its path instead
T = TypeVar("T")


def default_workspace() -> Path:
    return Path(os.environ.get(WORKSPACE_ENV) or Path.home() / ".qat-studio")


def is_disk_full(err: BaseException, where: Path | None = None) -> bool:
    """Whether an error means the disk is full. SQLite says so (SQLITE_FULL) when its database grows, but
    only "disk I/O error" when it cannot size its shared-memory file: then the free space tells."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    if not isinstance(err, sqlite3.OperationalError):
        return False
    if "full" in str(err):
        return True
    try:
        return "I/O error" in str(err) and where is not None and shutil.disk_usage(where).free < 1 << 20
    except OSError:
        return False


def is_damaged_index(err: sqlite3.Error) -> bool:
    """SQLITE_CORRUPT and SQLITE_NOTADB (plain DatabaseError), or a table without the columns asked for."""
    return type(err) is sqlite3.DatabaseError or str(err).startswith(("no such table", "no such column"))


def disk_full(what: str | Path) -> DiskFullError:
    return DiskFullError(f"disk full: could not write {what}. Free some space on that disk and try again; "
                         "what was saved before is unchanged")


@contextmanager
def _disk_errors(what: str | Path) -> Iterator[None]:
    """An error writing ``what`` (a full disk, a folder in the way, no permission) becomes one plain message."""
    try:
        yield
    except (OSError, sqlite3.OperationalError) as err:
        if is_disk_full(err):
            raise disk_full(what) from None
        if isinstance(err, OSError):
            raise StoreError(f"cannot write {what}: {err.strerror or err}") from None
        raise


def _temp_path(path: Path) -> Path:
    """A fresh temporary name beside ``path``; the pid in it lets a later cleanup know its writer died."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    with _disk_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_path(path)
        try:
            write(tmp)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


class _KeptWriteError:
    """The file torch.save writes to. Its C++ writer turns a failed write into RuntimeError("unexpected
    pos ..."), losing the OSError (a full disk); this keeps it, for :func:`_torch_save` to raise instead."""

    def __init__(self, file: BinaryIO):
        self.file, self.error = file, None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.file.flush()


def _torch_save(obj: Any, tmp: Path) -> None:
    with tmp.open("wb") as f:
        out = _KeptWriteError(f)
        try:
            torch.save(obj, out)
        except RuntimeError:
            if out.error is not None:
                raise out.error from None
            raise
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    _write_atomically(path, write)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _open_lock(path: Path) -> TextIO:
    """A lock file (for ``flock``), its folder made if missing."""
    with _disk_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.open("a")


def new_log(path: Path) -> BinaryIO:
    """An empty log file for a launched process's output."""
    with _disk_errors(path):
        return path.open("wb")


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def _digest(config: RunConfig) -> str:
    return hashlib.sha256(config.to_json().encode()).hexdigest()


def _first_error(err: ValidationError) -> str:
    e = err.errors()[0]
    where = ".".join(str(p) for p in e["loc"])
    return (f"{where}: " if where else "") + e["msg"][:300]


# --- what a run's row and result files must look like to be used ---------------------------------
class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow")


class _Accuracy(_Loose):
    accuracy: float


class _Metrics(_Loose):
    """The metric sections that listings and pages read; other sections pass as they are."""

    fp32: _Accuracy | None = None
    ptq: _Accuracy | None = None
    qat: _Accuracy | None = None
    parity: _Accuracy | None = None
    size: dict[str, float] | None = None
    bench: dict[str, Any] | None = None


class _Row(BaseModel):
    id: str
    created: float
    updated: float
    name: str | None
    model: str
    status: Literal[STATUSES]  # type: ignore[valid-type]
    error: str | None
    pid: int | None
    config: Json[dict[str, Any]]
    metrics: Json[_Metrics]


class _BenchRow(_Loose):
    backend: str
    batch: int
    threads: int
    median_ms: float
    p90_ms: float
    p99_ms: float
    throughput: float


class _Comparison(_Loose):
    batch: int
    threads: int
    speedup: float
    overhead_bound: bool = False


class _RuntimeParity(_Loose):
    accuracy: float
    agreement: float
    disagreements: int
    differing: list[dict[str, int]] = []


class _Runtime(_Loose):
    """A runtime a bench timed (its backends' names in ``rows``) or why it could not (``error``)."""

    runtime: str
    error: str | None = None
    fp32: str | None = None
    int8: str | None = None
    parity: _RuntimeParity | None = None
    kernels: dict[str, Any] | None = None


class _Bench(_Loose):
    machine: dict[str, Any]
    rows: list[_BenchRow]
    comparisons: list[_Comparison]
    note: str | None = None
    runtimes: list[_Runtime] = []  # results before OpenVINO was timed have none


class _ParityLayer(_Loose):
    layer: str
    differing: int


class _Parity(_Loose):
    accuracy: float
    agreement: float
    layers: list[_ParityLayer] = []
    integer_layers: list[str] = []
    float_layers: dict[str, str] | list[str] = {}
    explanation: str | None = None


class _Export(_Loose):
    files: dict[str, int]
    size_ratio: float
    integer_layers: list[str]
    float_layers: dict[str, str] | list[str]
    notes: list[str] = []


class _Layer(_Loose):
    name: str
    kind: str
    has_weights: bool
    params: int


RESULT_SHAPES: dict[str, TypeAdapter] = {
    "bench": TypeAdapter(_Bench), "parity": TypeAdapter(_Parity), "export": TypeAdapter(_Export),
    "layers": TypeAdapter(list[_Layer]),
}
ANY_RESULT = TypeAdapter(dict[str, Any] | list[Any])  # tables and suggestions the pages save


class RunStore:
    """A workspace folder of runs; safe to share between the app's threads and worker processes."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_workspace()
        self.index = self.root / "index.sqlite"
        if "\x00" in str(self.root):  # no file system takes one; Python raises ValueError at first use
            raise StoreError(f"workspace path {str(self.root)[:200]!r} contains a NUL character")
        try:
            self._check_workspace()
            (self.root / "runs").mkdir(parents=True, exist_ok=True)
            (self.root / "baselines").mkdir(exist_ok=True)
        except OSError as err:
            if is_disk_full(err):
                raise disk_full(self.root) from None
            raise StoreError(f"cannot use workspace {self.root}: {err.strerror}; choose another with "
                             f"--workspace or ${WORKSPACE_ENV}") from None
        try:
            self._open_index()
        except DiskFullError:  # until there is room again, runs are read from their folders (see _rows)
            pass
        self.remove_orphan_temp_files()

    def _check_workspace(self) -> None:
        """Refuse to scatter a workspace's files into a folder that holds other things (``/``, a home)."""
        if not self.root.is_dir() or any((self.root / part).exists() for part in WORKSPACE_PARTS):
            return
        if next(self.root.iterdir(), None) is not None:
            raise StoreError(f"{self.root} holds other files and is not a QAT Studio workspace; give "
                             f"--workspace (or ${WORKSPACE_ENV}) a new or empty folder, e.g. {self.root / 'qat-studio'}")

    # --- the index ------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.index, timeout=30, isolation_level=None)  # transactions are explicit
        db.execute("PRAGMA journal_mode=WAL")
        return db

    def _open_index(self) -> None:
        """Check the index when the store opens: create, migrate, or rebuild it from the run folders."""
        problem = self._index_problem()
        if problem == NO_TABLE and not self._run_folders():
            self._create_table()
        elif problem is not None:
            self._rebuild_index(problem)
        elif self._transaction(lambda db: db.execute("PRAGMA user_version").fetchone()[0]) < SCHEMA_VERSION:
            self._write_missing_record_files()

    def _index_problem(self) -> str | None:
        """None for a usable index, else what is wrong with it (``NO_TABLE`` for a new one)."""
        if not self.index.exists():
            return NO_TABLE
        if not self.index.is_file():  # SQLite would block on a FIFO or fail with "disk I/O error"
            return "it is not a regular file"
        try:
            db = self._connect()
            try:
                check = db.execute("PRAGMA quick_check").fetchone()[0]
                columns = {r[1] for r in db.execute("PRAGMA table_info(runs)")}
            finally:
                db.close()
        except sqlite3.DatabaseError as err:
            if is_damaged_index(err):
                return f"it is damaged: {err}"
            raise self._index_error(err) from None
        if check != "ok":
            return f"it is damaged: {check[:200]}"
        if not columns:
            return NO_TABLE
        missing = [c for c in COLUMNS if c not in columns]
        return f"its table lacks the columns {', '.join(missing)}" if missing else None

    def _create_table(self, db: sqlite3.Connection | None = None) -> None:
        own = db is None
        db = db or self._connect()
        try:
            db.execute("""CREATE TABLE IF NOT EXISTS runs (
                id TEXT PRIMARY KEY, created REAL, updated REAL, name TEXT, model TEXT,
                status TEXT, error TEXT, pid INTEGER, config TEXT, metrics TEXT)""")
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        finally:
            if own:
                db.close()

    def _run_folders(self) -> list[Path]:
        return sorted(p for p in (self.root / "runs").iterdir() if p.is_dir() and RUN_ID.match(p.name))

    @contextmanager
    def _index_lock(self) -> Iterator[None]:
        """One process at a time rebuilds the index (others wait, then find it rebuilt)."""
        with _open_lock(self.root / ".index.lock") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _rebuild_index(self, reason: str) -> None:
        """Move a damaged index aside (kept for inspection) and rebuild it from the run folders."""
        with self._index_lock(), _disk_errors(self.index):
            if self._index_problem() is None:  # another process rebuilt it while this one waited
                return
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for suffix in ("", "-wal", "-shm"):
                part = Path(f"{self.index}{suffix}")
                if part.exists():
                    os.replace(part, part.with_name(f"{part.name}.damaged-{stamp}"))
            db = self._connect()
            try:
                db.execute("BEGIN IMMEDIATE")
                self._create_table(db)
                for folder in self._run_folders():
                    db.execute(_INSERT,
                               self._row_from_folder(folder, f"the index was rebuilt ({reason})"))
                db.execute("COMMIT")
            finally:
                db.close()

    def _row_from_folder(self, folder: Path, why: str) -> tuple:
        """An index row from a run's folder: its ``run.json`` and ``config.yaml``; damaged if they cannot be read."""
        run_id, record = folder.name, folder / RECORD_FILE
        saved: Any = {}
        problem = None
        try:
            saved = files.read_json(record, RECORD_FILE, StoreError)
            if not isinstance(saved, dict):
                raise TypeError("not a JSON object")
            _Row.model_validate(saved | {"config": "{}", "metrics": json.dumps(saved.get("metrics"))})
        except StoreError as err:
            problem = f"{why}, and the run's {RECORD_FILE} " + \
                (f"is damaged ({err.reason})" if os.path.lexists(record) else "is missing")
        except (ValueError, TypeError, RecursionError) as err:  # ValidationError is a ValueError
            detail = _first_error(err) if isinstance(err, ValidationError) else str(err)[:200]
            problem = f"{why}, and the run's {RECORD_FILE} is damaged ({detail})"
        config = "{}"
        try:
            config = load_config(folder / "config.yaml").to_json()
        except (QATError, OSError) as err:
            problem = problem or f"its config.yaml cannot be used: {str(err)[:300]}"
        if problem:
            mtime = folder.stat().st_mtime
            return (run_id, mtime, mtime, None, json.loads(config).get("model", "?"), "damaged", problem, None, config,
                    "{}")
        return (run_id, saved["created"], saved["updated"], saved["name"], saved["model"], saved["status"],
                saved["error"], saved["pid"], config, json.dumps(saved["metrics"]))

    def _write_missing_record_files(self) -> None:
        """Workspaces from before ``run.json``: write each run's, so its index can be rebuilt later."""
        def migrate(db: sqlite3.Connection) -> None:
            for (run_id,) in db.execute("SELECT id FROM runs").fetchall():
                if isinstance(run_id, str) and RUN_ID.match(run_id) and self.run_dir(run_id).is_dir() \
                        and not (self.run_dir(run_id) / RECORD_FILE).exists():
                    with contextlib.suppress(ValueError, TypeError):  # a damaged row: listing names it
                        self._write_record_file(db, run_id)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

        self._transaction(migrate, write=True)

    def _transaction(self, work: Callable[[sqlite3.Connection], T], write: bool = False) -> T:
        """Run ``work`` in one transaction; a damaged index is rebuilt from the run folders and ``work`` retried."""
        for attempt in range(2):
            try:
                db = self._connect()
                try:
                    db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                    result = work(db)
                    db.execute("COMMIT")
                    return result
                finally:
                    db.close()  # without COMMIT: rolled back
            except OSError as err:
                if is_disk_full(err):
                    raise disk_full(err.filename) from None
                raise
            except sqlite3.DatabaseError as err:
                if attempt == 1 or not is_damaged_index(err):
                    raise self._index_error(err) from None
                self._rebuild_index(str(err))
        raise AssertionError("unreachable")

    def _index_error(self, err: sqlite3.DatabaseError) -> StoreError:
        if is_disk_full(err, self.root):
            return disk_full(self.index)
        return StoreError(f"the run index {self.index} cannot be used ({err}); close other QAT Studio processes, "
                          "or move it aside to have it rebuilt from the run folders")

    def _write_record_file(self, db: sqlite3.Connection, run_id: str) -> None:
        row = db.execute(_SELECT + " WHERE id=?", (run_id,)).fetchone()
        saved = dict(zip(COLUMNS, row))
        saved.pop("config")
        saved["metrics"] = json.loads(saved["metrics"])
        atomic_write_text(self.run_dir(run_id) / RECORD_FILE, json.dumps(saved, indent=1))

    def _update(self, run_id: str, change: Callable[[sqlite3.Connection], None]) -> None:
        """Change a run's row and its ``run.json`` together (the row only if the file was written)."""
        def work(db: sqlite3.Connection) -> None:
            if db.execute("SELECT 1 FROM runs WHERE id=?", (run_id,)).fetchone() is None:
                raise StoreError(f"no run {run_id!r} in workspace {self.root}")
            try:
                change(db)
                if self.run_dir(run_id).is_dir():
                    self._write_record_file(db, run_id)
            except (ValueError, TypeError):  # its row cannot be read: listing repairs it or names the damage
                raise StoreError(f"run {run_id} is damaged; `qat-studio runs` says why") from None

        self._transaction(work, write=True)

    # --- runs ---------------------------------------------------------------------------------
    def create_run(self, config: RunConfig, pid: int | None = None, run_id: str | None = None,
                   metrics: dict[str, Any] | None = None) -> str:
        """A new run, ``running``; ``run_id`` (a sweep's, derived from its config) else a timestamp.
        ``metrics``: sections it starts with (a sweep's id), written in the same transaction."""
        run_id = run_id or time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
        folder = self.run_dir(run_id)
        with _disk_errors(folder):
            try:
                folder.mkdir(parents=True)
            except FileExistsError:  # not ours to clean up
                raise StoreError(f"run {run_id} exists already in {self.root}") from None
        try:
            atomic_write_text(folder / "config.yaml", config.to_yaml())
            now = time.time()

            def insert(db: sqlite3.Connection) -> None:
                db.execute(_INSERT,
                           (run_id, now, now, config.name, config.model, "running", None, pid or os.getpid(),
                            config.to_json(), json.dumps(metrics or {})))
                self._write_record_file(db, run_id)

            self._transaction(insert, write=True)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return run_id

    def set_pid(self, run_id: str, pid: int) -> None:
        self._update(run_id, lambda db: db.execute("UPDATE runs SET pid=? WHERE id=?", (pid, run_id)))

    def run_dir(self, run_id: str) -> Path:
        if not isinstance(run_id, str) or not RUN_ID.match(run_id):
            raise StoreError(f"{str(run_id)[:80]!r} is not a run id; `qat-studio runs` lists them")
        return self.root / "runs" / run_id

    def _record(self, raw: tuple) -> dict[str, Any]:
        """A row as a record; a row that cannot be used is repaired from its folder, else marked damaged."""
        values = dict(zip(COLUMNS, raw))
        try:
            row = _Row.model_validate(values)
            folder = self.run_dir(row.id)
        except (ValidationError, StoreError) as err:
            reason = _first_error(err) if isinstance(err, ValidationError) else str(err)
            return self._repair(values, f"its index row is damaged ({reason})")
        if not folder.is_dir():
            return self._damaged(values, f"its folder {folder} is missing (deleted or moved)")
        try:
            RunConfig.model_validate(row.config)
        except ValidationError as err:  # saved by an older QAT Studio, or edited by hand
            return self._damaged(values, f"its config is no longer valid ({_first_error(err)}); start a new run "
                                         "from an edited copy of its config.yaml")
        status, error = row.status, row.error
        if status == "running" and not _pid_alive(row.pid):
            status, error = "failed", "the process running it stopped before it finished (crash or shutdown)"
            with contextlib.suppress(DiskFullError):  # recorded when there is room; listed as failed anyway
                self._set_status(row.id, status, error)
        return {"id": row.id, "path": str(folder), "status": status, "error": error, "name": row.name,
                "model": row.model, "created": row.created, "updated": row.updated,
                "config": row.config, "metrics": json.loads(values["metrics"])}

    def _repair(self, values: dict[str, Any], why: str) -> dict[str, Any]:
        """Rewrite a damaged row from its run's folder; a ``damaged`` record when the folder cannot say either."""
        run_id = values.get("id")
        if not isinstance(run_id, str) or not RUN_ID.match(run_id) or not self.run_dir(run_id).is_dir():
            return self._damaged(values, why)
        row = self._row_from_folder(self.run_dir(run_id), why)
        if row[5] == "damaged":
            return self._damaged(values, row[6])

        def rewrite(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM runs WHERE id=?", (run_id,))
            db.execute(_INSERT, row)

        with contextlib.suppress(DiskFullError):  # repaired when there is room; listed from the folder anyway
            self._transaction(rewrite, write=True)
        return self._record(row)

    def _damaged(self, values: dict[str, Any], reason: str) -> dict[str, Any]:
        def text(v: Any, default: str = "?") -> str:
            return v if isinstance(v, str) else default

        def number(v: Any) -> float:
            return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0.0

        run_id = text(values.get("id"), repr(values.get("id"))[:80])
        return {"id": run_id, "path": str(self.root / "runs" / run_id) if RUN_ID.match(run_id) else "",
                "status": "damaged", "error": reason, "name": None, "model": text(values.get("model")),
                "created": number(values.get("created")), "updated": number(values.get("updated")),
                "config": {}, "metrics": {}}

    def _rows(self, run_id: str | None = None) -> list[tuple]:
        """Index rows, all or one run's; read from the run folders when a full disk leaves SQLite no room
        even to open the index (it needs a shared-memory file)."""
        try:
            if run_id is None:
                return self._transaction(lambda db: db.execute(_SELECT).fetchall())
            return self._transaction(lambda db: db.execute(_SELECT + " WHERE id=?", (run_id,)).fetchall())
        except DiskFullError:
            folders = self._run_folders() if run_id is None else [self.run_dir(run_id)]
            return [self._row_from_folder(f, "the disk is full") for f in folders if f.is_dir()]

    def get(self, run_id: str) -> dict[str, Any]:
        rows = self._rows(run_id)
        if not rows:
            raise StoreError(f"no run {str(run_id)[:80]!r} in workspace {self.root}; `qat-studio runs` lists them")
        return self._record(rows[0])

    def list(self) -> list[dict[str, Any]]:
        """Every run, newest first; damaged ones too (status ``damaged``, the reason as ``error``)."""
        records = [self._record(r) for r in self._rows()]
        return sorted(records, key=lambda r: r["created"], reverse=True)

    def config(self, run_id: str) -> RunConfig:
        record = self.get(run_id)
        if record["status"] == "damaged":
            raise StoreError(f"run {run_id} is damaged: {record['error']}")
        return RunConfig.model_validate(record["config"])

    def _set_status(self, run_id: str, status: str, error: str | None) -> None:
        self._update(run_id, lambda db: db.execute("UPDATE runs SET status=?, error=?, updated=? WHERE id=?",
                                                   (status, error, time.time(), run_id)))

    def update_metrics(self, run_id: str, **sections: Any) -> dict[str, Any]:
        """Merge sections (``fp32=…``, ``bench=…``) into the run's metrics."""
        merged: dict[str, Any] = {}

        def merge(db: sqlite3.Connection) -> None:
            (current,) = db.execute("SELECT metrics FROM runs WHERE id=?", (run_id,)).fetchone()
            merged.update(json.loads(current) | sections)
            db.execute("UPDATE runs SET metrics=?, updated=? WHERE id=?", (json.dumps(merged), time.time(), run_id))

        self._update(run_id, merge)
        return merged

    def finish(self, run_id: str) -> None:
        self._set_status(run_id, "done", None)

    def fail(self, run_id: str, error: str, cancelled: bool = False) -> None:
        """Record the failure and drop weights that may be partial; config, events and error stay."""
        for name in ("qat.pt", "ptq.pt", "fp32.pt"):
            (self.run_dir(run_id) / name).unlink(missing_ok=True)
        self._set_status(run_id, "cancelled" if cancelled else "failed", error)

    def _refuse_running(self, record: dict[str, Any], doing: str) -> None:
        """A running run's process writes its folder and row until it ends: it is not renamed or deleted."""
        if record["status"] == "running":  # a listed run is running only while its process lives
            raise StoreError(f"run {record['id']} is running: cancel it (Fine-tune page, or `touch "
                             f"{self.run_dir(record['id']) / CANCEL_FLAG}`) and wait for it to stop, then {doing} it")

    def delete(self, run_id: str) -> None:
        """Remove a run's row and folder; a running run is refused (StoreError)."""
        self._refuse_running(self.get(run_id), "delete")
        self._transaction(lambda db: db.execute("DELETE FROM runs WHERE id=?", (run_id,)), write=True)
        shutil.rmtree(self.run_dir(run_id), ignore_errors=True)

    def rename(self, run_id: str, name: str) -> dict[str, Any]:
        """Give a run another name (its config's ``name``; empty: its model and plan name it). The index row,
        ``run.json`` and ``config.yaml`` change in one transaction: the row only once both files are written."""
        record = self.get(run_id)
        if record["status"] == "damaged":
            raise StoreError(f"run {run_id} is damaged ({record['error']}); it cannot be renamed, only deleted")
        self._refuse_running(record, "rename")
        name = name.strip()
        if len(name) > NAME_LIMIT:
            raise StoreError(f"a run name is at most {NAME_LIMIT} characters; this one has {len(name)}")
        if any(not c.isprintable() for c in name):
            raise StoreError(f"a run name is one line of printable text; {name[:40]!r} is not")
        before = RunConfig.model_validate(record["config"])
        config = before.model_copy(update={"name": name})

        def change(db: sqlite3.Connection) -> None:
            db.execute("UPDATE runs SET name=?, config=?, updated=? WHERE id=?",
                       (config.name, config.to_json(), time.time(), run_id))
            atomic_write_text(self.run_dir(run_id) / "config.yaml", config.to_yaml())

        try:
            self._update(run_id, change)
        except BaseException:  # the row was rolled back: so is its config.yaml
            with contextlib.suppress(QATError):
                atomic_write_text(self.run_dir(run_id) / "config.yaml", before.to_yaml())
            raise
        return self.get(run_id)

    def require_done(self, run_id: str) -> dict[str, Any]:
        record = self.get(run_id)
        if record["status"] != "done":
            why = f": {record['error']}" if record["error"] else ""
            raise StoreError(f"run {run_id} is {record['status']}{why}; only finished runs have a model to use")
        return record

    def remove_orphan_temp_files(self) -> int:
        """Delete temporary files whose writer died (kill -9, power loss); returns how many."""
        removed = 0
        now = time.time()
        for pattern in (".*.tmp", "*/.*.tmp", "*/*/.*.tmp", "*/*/*/.*.tmp"):
            for tmp in self.root.glob(pattern):
                pid = re.search(r"\.(\d+)\.\w+\.tmp$", tmp.name)
                try:
                    orphan = not _pid_alive(int(pid.group(1))) if pid else now - tmp.stat().st_mtime > STALE_TMP_SECONDS
                    if orphan:
                        tmp.unlink()
                        removed += 1
                except OSError:  # gone already, or not ours to delete
                    pass
        return removed

    # --- cancel -------------------------------------------------------------------------------
    def request_cancel(self, run_id: str) -> None:
        atomic_write_text(self.run_dir(run_id) / CANCEL_FLAG, "cancel requested\n")

    def cancel_flag(self, run_id: str) -> RunCancel:
        return RunCancel(self.run_dir(run_id) / CANCEL_FLAG)

    # --- files of a run -----------------------------------------------------------------------
    def save_state(self, run_id: str, name: str, state: dict[str, torch.Tensor]) -> None:
        _write_atomically(self.run_dir(run_id) / name, lambda tmp: _torch_save(state, tmp))

    def state_path(self, run_id: str, name: str) -> Path:
        """Where the run's weights file ``name`` lies; StoreError when it is not there."""
        path = self.run_dir(run_id) / name
        if not os.path.lexists(path):
            raise StoreError(f"run {run_id} has no {name}; it did not finish, or its folder was changed")
        return path

    def load_state(self, run_id: str, name: str) -> dict[str, torch.Tensor]:
        path = self.state_path(run_id, name)
        try:
            with files.open_regular(path, f"run {run_id}'s weights", StoreError) as f:
                return torch.load(f, map_location="cpu", weights_only=True)
        except StoreError as err:
            raise StoreError(f"{err}; train the run again") from None
        except Exception as err:
            raise StoreError(f"{path} is damaged ({type(err).__name__}); train the run again") from None

    def write_result(self, run_id: str, name: str, data: Any) -> Path:
        path = self.run_dir(run_id) / "results" / f"{name}.json"
        atomic_write_text(path, json.dumps(data, indent=2))
        return path

    def read_result(self, run_id: str, name: str) -> Any | None:
        """A result the run saved (``bench``, ``parity``, …), checked to have the shape its readers use;
        None if never saved, StoreError if damaged."""
        path = self.run_dir(run_id) / "results" / f"{name}.json"
        if not os.path.lexists(path):
            return None
        try:
            data = files.read_json(path, "result", StoreError)
            RESULT_SHAPES.get(name, ANY_RESULT).validate_python(data)
        except StoreError as err:  # not a regular file, too large, not UTF-8, not JSON
            raise StoreError(f"{path} is damaged ({err.reason}); {REDO.get(name, 'run that step again')}") from None
        except ValidationError as err:
            raise StoreError(f"{path} is damaged ({_first_error(err)}); {REDO.get(name, 'run that step again')}") from None
        return data

    def artifact(self, run_id: str, name: str) -> Path:
        """Path for a file the run owns (ONNX models, reports); write it with ``atomic_write_bytes``."""
        return self.run_dir(run_id) / name

    def events(self, run_id: str) -> list[dict[str, Any]]:
        """Progress events of a run (steps, losses, accuracies): the newest ``EVENTS_LIMIT`` bytes of its log.

        A damaged line (a disk error, an edit) is skipped: the curve loses one point, not the run.
        A log that is not a regular file (a FIFO, a link to a device) is damage: StoreError.
        """
        path = self.run_dir(run_id) / "events.jsonl"
        if not os.path.lexists(path):
            return []
        try:
            data = files.read_tail(path, EVENTS_LIMIT, "progress log", StoreError)
        except StoreError as err:
            raise StoreError(f"{err}; delete it: the run keeps its results and loses only its training curves") \
                from None
        lines = data.decode("utf-8", errors="replace").split("\n")[:-1]  # the last is still being written (or "")
        return [event for event in map(_event, lines) if event is not None]

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

    def _started_path(self, draft_id: str) -> Path:
        return self.draft_path(draft_id).with_suffix(".started.json")

    def draft_started(self, draft_id: str, config: RunConfig) -> str | None:
        """The run this draft started last, if the draft is still ``config`` and the run is running or done
        (a failed, cancelled or deleted one may be started again)."""
        try:
            started = json.loads(self._started_path(draft_id).read_text())
            if started["config"] != _digest(config) or self.get(started["run"])["status"] not in ("running", "done"):
                return None
            return started["run"]
        except (OSError, ValueError, TypeError, KeyError, StoreError):  # none yet, or unreadable: not started
            return None

    def start_draft(self, draft_id: str, config: RunConfig, start: Callable[[RunConfig], str]) -> tuple[str, bool]:
        """Start a run from a draft once: ``start(config)`` → run id, unless this draft, unchanged, started one
        already (a second click, a rerun, another tab). Under a lock on the draft, so two at once start one run.
        Returns (run id, whether it was started now)."""
        with _open_lock(self.draft_path(draft_id).with_suffix(".lock")) as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                run_id = self.draft_started(draft_id, config)
                if run_id is not None:
                    return run_id, False
                run_id = start(config)
                atomic_write_text(self._started_path(draft_id), json.dumps({"config": _digest(config), "run": run_id}))
                return run_id, True
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # --- uploads ---------------------------------------------------------------------------------
    def save_upload(self, name: str, data: bytes) -> Path:
        """A file uploaded in the app (a checkpoint, a table), kept where a config can name it:
        ``uploads/<its SHA-256, 12 hex>/<its name>``. The same file uploaded twice is stored once."""
        if len(data) > UPLOAD_LIMIT:
            raise StoreError(f"{name[:100]} is {len(data) / files.MB:,.0f} MB; an upload may be "
                             f"{UPLOAD_LIMIT // files.MB} MB at most. Give the file's path on this machine instead")
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", Path(name).name)[:128].lstrip(".") or "upload"
        path = self.root / "uploads" / hashlib.sha256(data).hexdigest()[:12] / safe
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, data)
        return path

    # --- sweeps -------------------------------------------------------------------------------
    def sweep_dir(self, sweep_id: str) -> Path:
        """A sweep's folder: its spec, its expansion and its state (the runs are ordinary runs)."""
        if not isinstance(sweep_id, str) or not SWEEP_ID.match(sweep_id):
            raise StoreError(f"{str(sweep_id)[:80]!r} is not a sweep name: use {SWEEP_ID_RULE}")
        return self.root / "sweeps" / sweep_id

    def sweeps(self) -> list[str]:
        """The ids of the sweeps started in this workspace, newest first."""
        folder = self.root / "sweeps"
        found = [p for p in folder.iterdir() if SWEEP_ID.match(p.name) and (p / "spec.yaml").is_file()] \
            if folder.is_dir() else []
        return [p.name for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]

    def sweep_runs(self, sweep_id: str) -> list[dict[str, Any]]:
        """The runs that a sweep trained (``metrics.sweep.id``), newest first."""
        return [r for r in self.list() if (r["metrics"].get("sweep") or {}).get("id") == sweep_id]

    @contextmanager
    def sweep_lock(self, sweep_id: str) -> Iterator[None]:
        """Held while a process drives the sweep, and by the workers it forks (they share the open file);
        the kernel drops it when they have all exited, kill -9 too. A driver's workers exit within a
        second of it, so a new driver waits ``SWEEP_LOCK_WAIT`` seconds before it says the sweep is running."""
        folder = self.sweep_dir(sweep_id)
        with _open_lock(folder / "lock") as f:
            deadline = time.monotonic() + SWEEP_LOCK_WAIT
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise StoreError(f"sweep {sweep_id} is running in another process; cancel it (Sweep page, "
                                         f"or touch {folder / CANCEL_FLAG}) or wait for it to finish") from None
                    time.sleep(0.1)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # --- FP32 baselines -----------------------------------------------------------------------
    def baseline_path(self, key: str) -> Path:
        return self.root / "baselines" / f"{key}.pt"

    def load_baseline(self, key: str) -> dict[str, Any] | None:
        path = self.baseline_path(key)
        if not os.path.lexists(path):
            return None
        try:
            with files.open_regular(path, "FP32 baseline", StoreError) as f:
                return torch.load(f, map_location="cpu", weights_only=True)
        except Exception:  # a damaged cache entry (a FIFO or a link too) is retrained, not fatal
            with contextlib.suppress(OSError):  # a folder in its place stays: saving the new one names it
                path.unlink()
            return None

    def save_baseline(self, key: str, payload: dict[str, Any]) -> None:
        _write_atomically(self.baseline_path(key), lambda tmp: _torch_save(payload, tmp))


REDO = {"bench": "benchmark the run again", "parity": "evaluate the run again (qat-studio eval)",
        "export": "export the run again", "layers": "train the run again"}


def _event(line: str) -> dict[str, Any] | None:
    """One events.jsonl line, or None when it is not an event the curves can use."""
    try:
        event = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(event, dict) or not isinstance(event.get("phase"), str):
        return None
    numbers = ("step", "total", "loss", "epoch", "test_accuracy", "elapsed")
    if any(k in event and (isinstance(event[k], bool) or not isinstance(event[k], (int, float))) for k in numbers):
        return None
    if "step" in event and not ("total" in event and "loss" in event):
        return None
    return event


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
            with _disk_errors(self.path), self.path.open("a", encoding="utf-8") as f:
                f.write("".join(self._buffer))
            self._buffer.clear()
