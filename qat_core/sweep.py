"""Sweeps: a base config × variations, each trained for real, in parallel, resumable.

The sensitivity scan (:mod:`qat_core.search`) predicts which plan suits a budget; a sweep trains
the candidates and lets the measured Pareto front answer. A spec (YAML, versioned and validated
like a ``RunConfig``)::

    version: 1
    name: digits-plans            # the sweep's id in the workspace: running it again resumes it
    base: base.yaml               # a RunConfig, inline or a file beside the spec
    vary:
      weight_bits: [8, 4, 3, 2]   # every quantized weight layer at one width (activations as in base)
      plans:                      # named plans over the base's: a default and per-layer overrides
        ends-8: {default: {weight_bits: 3}, overrides: {conv1: {weight_bits: 8}, fc: {weight_bits: 8}}}
      suggested:                  # search.suggest_plan at each budget, from the shared baseline
        average_bits: [3]
        widths: [8, 4, 3, 2]
      range_method: [minmax, lsq]
      lr: [0.001, 0.0003]
      seed: [0, 1, 2]
    executor: {workers: 2, threads: 1, ray: null}
    latency: true                 # int8 latency of each run (ONNX Runtime, batch 1), one run at a time

Plans (uniform widths, named plans, suggestions; the base plan when none is given) are crossed with
range methods, learning rates and seeds. Each variation is an ordinary run in the store, its id
derived from its config (so a variation is trained once however often the sweep runs) and its
``metrics.sweep`` naming the sweep. Before training, the driver trains each distinct FP32 baseline
once; the runs then find it cached. Runs go to a local pool of worker processes (threads per run ×
workers ≤ cores) or, with ``executor.ray``, to Ray tasks. A run that did not finish (a crash, a
kill -9, a cancel) is deleted and trained again when the sweep runs again; finished runs are kept.
A sweep ends ``done`` only when every run is done, else ``incomplete``, saying how many are not.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import importlib
import itertools
import json
import math
import multiprocessing
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import pandas as pd
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from qat_core import bench, cpu, files, planning, progress, report, runner, search, train, zoo
from qat_core import config as cfg
from qat_core.config import LayerPlan, QuantOverride, RangeMethod, RunConfig
from qat_core.errors import CancelledError, ConfigError, QATError, StoreError
from qat_core.prepare import layer_table
from qat_core.store import CANCEL_FLAG, SWEEP_ID, SWEEP_ID_RULE, RunStore, atomic_write_text, new_log

SPEC_VERSION = 1
MAX_RUNS = 256  # variations in one sweep: more is a typo in a list, or a job for a cluster's own scheduler
SPEC_FILE, PLAN_FILE, STATE_FILE, SUGGESTED_FILE = "spec.yaml", "plan.json", "state.json", "suggested.json"
LATENCY = {"batch_sizes": (1,), "warmup": 10, "iters": 50}  # batch 1, as bench_run's defaults
POLL_SECONDS = 0.5  # how often the driver looks for finished runs and a cancel request
RAY_CONNECT_SECONDS = 15  # to reach a Ray cluster, which answers in 1-3 s: refused well within 30 s
RAY_EXTRA = "pip install -e '.[ray]'"
WORKER_DIED = ("a worker process was killed (out of memory, or kill -9) and the pool stopped: this run did not "
               "finish")
LOG_LIMIT = 64 * files.KB  # of a driver's log, the end is read: its last line says why it stopped
Event = dict[str, Any]

Bits = Annotated[int, Field(ge=cfg.MIN_BITS, le=cfg.MAX_BITS)]
Positive = Annotated[float, Field(gt=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PlanChange(_Strict):
    """A named plan over the base's: changes to its default spec and per-layer overrides."""

    default: QuantOverride = QuantOverride()
    overrides: dict[str, QuantOverride] = {}


class Suggested(_Strict):
    """Plans suggested from the base's sensitivity (no fine-tune), one per budget."""

    average_bits: list[Positive] = []  # mean weight width, weighted by weight parameters
    budget_bytes: list[Positive] = []  # predicted model size (bit-packed)
    widths: list[Bits] = [8, 6, 4, 3, 2]  # the widths the sensitivity scan tries per layer


class Vary(_Strict):
    weight_bits: list[Bits] = []  # uniform: every quantized weight layer at this width
    plans: dict[str, PlanChange] = {}
    suggested: Suggested | None = None
    range_method: list[RangeMethod] = []
    lr: list[Positive] = []
    seed: list[cfg.Seed] = []


class Executor(_Strict):
    workers: int | None = Field(None, ge=1)  # runs at a time (default: cores // threads; Ray: as it schedules)
    threads: int | None = Field(None, ge=1)  # torch threads per run (default: cpu.training_threads)
    ray: str | None = None  # a Ray cluster's address ("auto", "HOST:6379", "ray://HOST:10001"); "local" starts one


class SweepSpec(_Strict):
    """What a sweep trains; saved in its folder, so it can be resumed and reproduced."""

    version: int = SPEC_VERSION
    name: str  # the sweep's id: SWEEP_ID_RULE
    base: RunConfig
    vary: Vary = Vary()
    executor: Executor = Executor()
    latency: bool = True

    @field_validator("version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != SPEC_VERSION:
            raise ValueError(f"this QAT Studio reads sweep version {SPEC_VERSION}; the file says {v!r}")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not SWEEP_ID.match(v):  # said in words, with a name that would do: a regex tells people nothing
            hint = re.sub(r"[^a-z0-9_-]+", "-", v.lower()).strip("-_")[:40]
            raise ValueError(f"use {SWEEP_ID_RULE}" + (f", e.g. {hint!r}" if hint else "") + f"; got {v[:60]!r}")
        return v

    def to_yaml(self) -> str:
        """The spec as YAML: the whole base config (defaults change between versions), the variations set."""
        return yaml.safe_dump({"version": self.version, "name": self.name,
                               "vary": self.vary.model_dump(mode="json", exclude_defaults=True),
                               "executor": self.executor.model_dump(mode="json"), "latency": self.latency,
                               "base": self.base.to_dict()}, sort_keys=False)


def parse_spec(text: str, source: str = "sweep spec", folder: Path | None = None) -> SweepSpec:
    """A sweep spec from YAML or JSON text. ``base`` given as a file name is read from ``folder``."""
    data = cfg.parse_yaml(text, source)
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a mapping with name, base and vary; start from "
                          "`qat-studio sweep --example`")
    if isinstance(data.get("base"), str):
        path = Path(data["base"])
        data = data | {"base": cfg.load(path if path.is_absolute() or folder is None else folder / path).to_dict()}
    return from_dict(data, f"sweep spec {source}")


def from_dict(data: dict[str, Any], source: str = "sweep spec") -> SweepSpec:
    """A validated spec from a mapping (a parsed file, or the Sweep page's choices)."""
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as err:
        raise ConfigError(cfg.describe(err, source)) from None
    count = variation_count(spec)
    if count > MAX_RUNS:
        raise ConfigError(f"{source} asks for {count:,} runs; a sweep trains at most {MAX_RUNS}: shorten the lists "
                          "under vary (their product is the number of runs)")
    return spec


def load_spec(path: str | Path) -> SweepSpec:
    path = Path(path)
    return parse_spec(cfg.read_text(path), str(path), path.parent)


def saved_spec(store: RunStore, sweep_id: str) -> SweepSpec:
    """The spec a sweep last ran with (to resume it)."""
    try:
        return load_spec(store.sweep_dir(sweep_id) / SPEC_FILE)
    except ConfigError as err:
        raise StoreError(f"sweep {sweep_id}'s saved spec cannot be used: {err}. Start the sweep again from its spec "
                         "file (`qat-studio sweep SPEC`): that replaces the saved one and keeps the finished runs") \
            from None


def example_spec(base: RunConfig, name: str = "widths") -> SweepSpec:
    """A first sweep over ``base``: uniform 8/4/3/2-bit weights and the suggestion at 3 bits."""
    return SweepSpec(name=name, base=base, vary=Vary(weight_bits=[8, 4, 3, 2],
                                                     suggested=Suggested(average_bits=[3.0], widths=[8, 4, 3, 2])))


def variation_count(spec: SweepSpec) -> int:
    v = spec.vary
    plans = len(v.weight_bits) + len(v.plans) + (len(v.suggested.average_bits) + len(v.suggested.budget_bytes)
                                                 if v.suggested else 0)
    return max(plans, 1) * max(len(v.range_method), 1) * max(len(v.lr), 1) * max(len(v.seed), 1)


# --- expansion ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Item:
    """One run of a sweep: its label for people, its config, and its id (from the config)."""

    run_id: str
    label: str
    config: RunConfig


def run_id_for(sweep_id: str, config: RunConfig) -> str:
    """The same config gets the same id (its name, a label, left out): a finished one is never trained twice."""
    identity = json.dumps(config.to_dict() | {"name": ""}, sort_keys=True)
    return f"{sweep_id}-{hashlib.sha256(identity.encode()).hexdigest()[:10]}"


def _with_range_method(plan: LayerPlan, method: str) -> LayerPlan:
    overrides = {n: o.model_copy(update={"range_method": method}) if o.range_method else o
                 for n, o in plan.overrides.items()}
    return LayerPlan(default=plan.default.model_copy(update={"range_method": method}), overrides=overrides)


def _named_plan(base: LayerPlan, change: PlanChange) -> LayerPlan:
    default = cfg.QuantSpec.model_validate(base.default.model_dump() | change.default.changes())
    return LayerPlan(default=default, overrides=dict(base.overrides) | change.overrides)


def plan_variations(spec: SweepSpec, rows: list[dict], suggested: dict[str, LayerPlan]) -> dict[str, LayerPlan]:
    """The plans a sweep tries, by label: uniform widths, named plans, suggestions (else the base's).
    ``rows``: the base model's ``prepare.layer_table``."""
    base = spec.base.plan
    plans = {f"{b}-bit weights": planning.plain_plan(spec.base.model_copy(update={"plan": search.uniform_widths(
        base, rows, b)}), rows).plan for b in spec.vary.weight_bits}  # a 2-bit plan is named W2A8, not W8A8 + 4 layers
    known = {r["name"] for r in rows}
    for name, change in spec.vary.plans.items():
        unknown = sorted(set(change.overrides) - known)
        if unknown:
            raise ConfigError(f"sweep plan {name!r} names layer(s) {', '.join(unknown)} that {spec.base.model} "
                              f"does not have; its layers: {', '.join(r['name'] for r in rows)}")
        plans[name] = _named_plan(base, change)
    plans |= suggested
    return plans or {"base plan": base}


def expand(spec: SweepSpec, plans: dict[str, LayerPlan]) -> list[Item]:
    """Every run of the sweep: plans × range methods × learning rates × seeds, each config once."""
    v = spec.vary
    items: dict[str, Item] = {}
    for (label, plan), method, lr, seed in itertools.product(plans.items(), v.range_method or [None],
                                                             v.lr or [None], v.seed or [None]):
        parts, config = [label], spec.base
        if method is not None:
            plan = _with_range_method(plan, method)
            parts.append(f"{method} ranges")
        if lr is not None:
            config = config.model_copy(update={"finetune": config.finetune.model_copy(update={"lr": lr})})
            parts.append(f"lr {lr:g}")
        if seed is not None:
            config = config.model_copy(update={"seed": seed})
            parts.append(f"seed {seed}")
        label = " · ".join(parts)
        config = cfg.from_dict(config.model_copy(update={"plan": plan, "name": f"{spec.name}: {label}"}).to_dict())
        run_id = run_id_for(spec.name, config)
        items.setdefault(run_id, Item(run_id, label, config))  # the same config twice (uniform 3 = suggested): once
    return list(items.values())


# --- the driver's files ----------------------------------------------------------------------------

class SweepCancel:
    """Cancel for a whole sweep: its folder's flag file (the page and other processes can set it)."""

    def __init__(self, folder: Path):
        self.path = folder / CANCEL_FLAG

    def is_set(self) -> bool:
        return self.path.exists()


class _AnyCancel:
    def __init__(self, *flags: train.Cancel):
        self.flags = flags

    def is_set(self) -> bool:
        return any(f.is_set() for f in self.flags)


def request_cancel(store: RunStore, sweep_id: str) -> None:
    """Stop a sweep: runs not started are dropped, running ones stop at their next step (recorded cancelled)."""
    atomic_write_text(store.sweep_dir(sweep_id) / CANCEL_FLAG, "cancel requested\n")
    for record in store.sweep_runs(sweep_id):
        if record["status"] == "running":
            store.request_cancel(record["id"])


class _SavedState(BaseModel):
    model_config = ConfigDict(extra="allow")  # the executor settings, start time: shown as they are

    state: str
    message: str = ""
    error: str | None = None
    pid: int | None = None
    total: int | None = None


class _Planned(_Strict):
    run: str
    label: str


class _SavedSuggestions(_Strict):
    key: str
    plans: dict[str, LayerPlan]


_STATE, _PLANNED, _SUGGESTED = TypeAdapter(_SavedState), TypeAdapter(list[_Planned]), TypeAdapter(_SavedSuggestions)


def _damaged(path: Path, reason: str) -> StoreError:
    """A sweep file that cannot be used; running the sweep again writes it anew."""
    return StoreError(f"{path} is damaged ({reason}); delete it and run the same sweep again (`qat-studio sweep "
                      "SPEC`, or Resume on the Sweep page): the finished runs are kept")


def _read(path: Path, shape: TypeAdapter) -> Any:
    """A sweep file checked to have ``shape``; :func:`_damaged` if it is not a small regular file of it."""
    try:
        return shape.validate_python(files.read_json(path, "sweep file", StoreError))
    except StoreError as err:
        raise _damaged(path, err.reason) from None
    except ValidationError as err:  # valid JSON, but not what the driver writes there
        where = ".".join(str(p) for p in err.errors()[0]["loc"])
        raise _damaged(path, f"not what QAT Studio writes there{f', at {where}' if where else ''}") from None


def state(store: RunStore, sweep_id: str) -> dict[str, Any]:
    """What the sweep's driver last wrote: ``state`` (preparing, training, latency, done, cancelled,
    failed, stopped: its process died; damaged: the file is, ``error`` says how), ``pid``, ``total``,
    ``message``, ``error``, ``updated``."""
    path = store.sweep_dir(sweep_id) / STATE_FILE
    if not os.path.lexists(path):
        return {"state": "unknown", "message": "", "error": None}
    try:
        saved = _read(path, _STATE).model_dump()
    except StoreError as err:
        return {"state": "damaged", "message": "", "error": str(err)}
    if saved["state"] in ("preparing", "training", "latency") and not _alive(saved["pid"]):
        why = _last_line(path.with_name("driver.log")) or "crash, kill or shutdown"
        saved |= {"state": "stopped", "error": f"the process running the sweep stopped ({why}); run the sweep "
                                               "again to train the runs that are missing"}
    return saved


def _last_line(path: Path) -> str:
    """The last line a launched driver wrote (its error, when it stopped on one)."""
    try:
        lines = files.read_tail(path, LOG_LIMIT, "sweep log").decode("utf-8", errors="replace").strip().splitlines()
    except QATError:  # none, or not a file: the caller says what it knows without it
        return ""
    return lines[-1][:300] if lines else ""


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def planned(store: RunStore, sweep_id: str) -> list[dict[str, str]]:
    """The sweep's runs as expanded last (``[{"run", "label"}]``), before or while they train;
    StoreError if its file is damaged."""
    path = store.sweep_dir(sweep_id) / PLAN_FILE
    if not os.path.lexists(path):
        return []
    return [p.model_dump() for p in _read(path, _PLANNED)]


def delete_run(store: RunStore, run_id: str) -> None:
    """Delete a run (``store.delete``: a running one is refused). A sweep's run also leaves the sweep's list,
    so the sweep shows the runs it still has, not a "pending" one that nothing trains; while the sweep runs
    it is refused. Running the sweep again trains the missing run anew."""
    sweep_id = (store.get(run_id)["metrics"].get("sweep") or {}).get("id")
    if not sweep_id or not store.sweep_dir(sweep_id).is_dir():  # not a sweep's, or its sweep is gone
        store.delete(run_id)
        return
    if running(store, sweep_id):
        raise StoreError(f"run {run_id} belongs to sweep {sweep_id}, which is running; cancel the sweep (Sweep page) "
                         "or wait for it to finish, then delete the run")
    with store.sweep_lock(sweep_id):  # no driver starts meanwhile
        store.delete(run_id)
        with contextlib.suppress(StoreError):  # a damaged list is rewritten when the sweep runs again
            kept = [p for p in planned(store, sweep_id) if p["run"] != run_id]
            atomic_write_text(store.sweep_dir(sweep_id) / PLAN_FILE, json.dumps(kept))


def sweep_frame(store: RunStore, sweep_id: str) -> pd.DataFrame:
    """One row per planned run: ``label``, ``status`` (``pending`` until it starts) and the Compare
    columns of ``report.runs_frame``, plus ``avg weight bits``."""
    plan = planned(store, sweep_id)
    records = {r["id"]: r for r in store.sweep_runs(sweep_id)}
    frame = report.runs_frame(store, [records[p["run"]] for p in plan if p["run"] in records])
    layers = {}
    for rid in frame["run"]:
        with contextlib.suppress(StoreError):
            layers[rid] = store.read_result(rid, "layers")
    frame["avg weight bits"] = [
        search.mean_weight_bits(layers[rid], LayerPlan.model_validate(records[rid]["config"]["plan"]))
        if layers.get(rid) else math.nan for rid in frame["run"]]
    frame = frame.set_index("run")
    rows = []
    for p in plan:
        row = frame.loc[p["run"]].to_dict() if p["run"] in frame.index else {"status": "pending"}
        rows.append({"label": p["label"], "run": p["run"]} | row)
    columns = ["label", "run", "status", *[c for c in report.RUN_COLUMNS if c not in ("run", "status")],
               "avg weight bits"]
    return pd.DataFrame(rows, columns=columns).round({"avg weight bits": 2})


def progress_of(store: RunStore, state: dict[str, Any], frame: pd.DataFrame | None) -> tuple[float, str]:
    """A live sweep's bar (0..1) and text: what it is doing (the driver's message: a baseline's steps, the
    sensitivity scan, each with its time left), then runs done, running runs counting by their own steps,
    and the time left at the pace since training began (``progress.runs_progress``)."""
    total = (0 if frame is None else len(frame)) or state.get("total") or 0
    done = 0 if frame is None else int((frame["status"] == "done").sum())
    share = done / total if total else 0.0
    if state.get("state") != "training" or "training_started" not in state or frame is None:
        return share, f"{state.get('message') or 'starting'} · {done} of {total} runs done"
    running = frame.loc[frame["status"] == "running", "run"]
    partial = []
    for run_id in running:
        with contextlib.suppress(QATError):  # a damaged log: that run counts as just started
            partial.append(progress.run_progress(store.events(run_id))[0])
    todo = state.get("training_total") or total
    kept = total - todo  # trained before this start (a resumed sweep): not part of this pace
    share_now, left = progress.runs_progress(todo, done - kept, partial, time.time() - state["training_started"])
    text = f"Training: {done} of {total} runs done, {len(running)} running"
    left_text = progress.left_text(left if share_now > 0 else None)
    return (kept + share_now * todo) / total if total else 0.0, text + (f" · {left_text}" if left_text else
                                                                         " · timing the first steps…")


class _State:
    def __init__(self, folder: Path):
        self.path, self.data = folder / STATE_FILE, {"pid": os.getpid(), "started": time.time()}

    def write(self, **changes: Any) -> None:
        self.data |= changes | {"updated": time.time()}
        atomic_write_text(self.path, json.dumps(self.data, indent=1))


# --- executors ------------------------------------------------------------------------------------

def train_one(workspace: str, sweep_id: str, item: dict[str, str], threads: int) -> dict[str, Any]:
    """A worker's task: create the run (its id from the sweep) and train it. Runs in a pool process
    or a Ray task; errors are recorded on the run, and returned rather than raised."""
    if not (Path(workspace) / "index.sqlite").exists():  # a Ray node without the workspace mounted
        raise StoreError(f"this worker ({os.uname().nodename}) cannot see the workspace {workspace}; a Ray sweep "
                         "writes its runs there, so the workspace must be on a file system every node mounts")
    store = RunStore(workspace)
    sweep_cancel = SweepCancel(store.sweep_dir(sweep_id))
    if sweep_cancel.is_set():
        return {"run": item["run"], "status": "skipped", "error": None}
    config = RunConfig.model_validate_json(item["config"])
    run_id = store.create_run(config, os.getpid(), item["run"], {"sweep": {"id": sweep_id, "label": item["label"]}})
    with contextlib.suppress(QATError):  # recorded on the run by execute
        runner.execute(config, store, run_id, cancel=_AnyCancel(store.cancel_flag(run_id), sweep_cancel),
                       threads=threads)
    record = store.get(run_id)
    return {"run": run_id, "status": record["status"], "error": record["error"],
            "accuracy": (record["metrics"].get("qat") or {}).get("accuracy"),
            "seconds": record["metrics"].get("seconds")}


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(POLL_SECONDS)
    os._exit(1)  # the driver died (kill -9): its runs are left unfinished, to be trained again on resume


def _init_worker(parent: int, threads: int) -> None:
    torch.set_num_threads(threads)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    importlib.import_module("torch._dynamo")  # a torch optimizer's first use imports it (1-2 s): do it while the
    # driver trains the baseline, not in each worker's first run


def start_method(threads: int) -> str:
    """How worker processes start. Forked, they are ready at once with the driver's torch imported
    (spawned, each spends 3-5 s importing it): with 1 thread a run only, as torch's DataLoader workers,
    since GNU OpenMP cannot run a team of threads in a child forked after the parent used one."""
    return "fork" if threads == 1 and sys.platform == "linux" else "spawn"


class LocalPool:
    """Worker processes on this machine, each training one run at a time with ``threads`` threads."""

    def __init__(self, workers: int, threads: int):
        self.pool = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(start_method(threads)),
                                           initializer=_init_worker, initargs=(os.getpid(), threads))
        for _ in range(workers):  # start them now: they import torch while the driver trains the baseline
            self.pool.submit(int)

    def submit(self, *args: Any) -> cf.Future:
        try:
            return self.pool.submit(train_one, *args)
        except BrokenProcessPool as err:  # a worker died before the runs were handed out: each run fails with it
            failed: cf.Future = cf.Future()
            failed.set_exception(err)
            return failed

    def wait(self, handles: list, timeout: float) -> list:
        return list(cf.wait(handles, timeout, return_when=cf.FIRST_COMPLETED).done)

    def result(self, handle: cf.Future) -> dict[str, Any]:
        return handle.result()

    def cancel(self, handle: cf.Future) -> None:
        handle.cancel()  # only one that has not started; started ones stop through their cancel flag

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


RAY_QUIET = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}


def _ray_unreachable(address: str, why: str) -> ConfigError:
    return ConfigError(f"cannot connect to the Ray cluster at {address!r}: {why}. Check the address (`ray status` on "
                       "the head node prints it, e.g. HOST:6379 or ray://HOST:10001) and that this machine can reach "
                       "that port, or use ray: local (--ray local) to start Ray here")


def _connect_ray(ray: Any, address: str) -> None:
    """``ray.init(address)`` within ``RAY_CONNECT_SECONDS``: a HOST:PORT that refuses or does not answer is
    refused at once; the connection itself (also "auto", and a port that answers but is not Ray) gets the rest."""
    parts = urllib.parse.urlsplit(address if "://" in address else f"//{address}")
    if address != "auto":
        try:
            host, port = parts.hostname, parts.port
        except ValueError:  # a port that is not a number from 0 to 65535
            host = port = None
        if parts.scheme not in ("", "ray") or not host or not port:
            raise _ray_unreachable(address, "it is not an address (auto, HOST:PORT or ray://HOST:PORT)")
        try:
            socket.create_connection((host, port), timeout=RAY_CONNECT_SECONDS / 4).close()
        except OSError as err:
            raise _ray_unreachable(address, f"{host} port {port}: {err.strerror or err}") from None
    outcome: list[BaseException | None] = []

    def connect() -> None:
        try:
            ray.init(address=address, **RAY_QUIET)
            outcome.append(None)
        except BaseException as err:  # reported by the caller's thread
            outcome.append(err)

    waiting = threading.Thread(target=connect, name="ray-connect", daemon=True)  # left behind if it never returns
    waiting.start()
    waiting.join(RAY_CONNECT_SECONDS)
    if not outcome:
        raise _ray_unreachable(address, f"no Ray cluster answered within {RAY_CONNECT_SECONDS} s")
    if outcome[0] is not None:
        raise outcome[0]


class RayPool:
    """The same runs as Ray tasks, each asking for ``threads`` CPUs (Ray schedules them on the cluster).
    An address is reached, or refused, within ``RAY_CONNECT_SECONDS``: Ray itself retries an unreachable
    one for 14 minutes; a task that no node can place (more CPUs than any has) is refused, not queued forever."""

    def __init__(self, address: str, threads: int):
        try:
            import ray
        except ImportError:
            raise ConfigError(f"executor.ray needs Ray, which is not installed; {RAY_EXTRA}") from None
        self.ray, self.started = ray, not ray.is_initialized()
        if self.started:
            try:
                if address == "local":
                    ray.init(num_cpus=cpu.cores(), **RAY_QUIET)
                else:
                    _connect_ray(ray, address)
            except (ConnectionError, RuntimeError, ValueError) as err:
                first = next(iter(str(err).strip().splitlines()), type(err).__name__)
                raise _ray_unreachable(address, first[:300].rstrip(".")) from None
        try:
            most = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)
            if threads > most:
                raise ConfigError(f"each run asks for {threads} CPUs (threads per run), and the largest node of the "
                                  f"Ray cluster ({address}) has {most:g}: Ray would wait for a node that never comes. "
                                  f"Lower executor.threads (or --threads) to at most {int(most)}, or add larger nodes")
        except BaseException:
            self.close()
            raise
        self.task = ray.remote(num_cpus=threads, max_retries=0)(train_one)

    def submit(self, *args: Any) -> Any:
        return self.task.remote(*args)

    def wait(self, handles: list, timeout: float) -> list:
        return self.ray.wait(handles, num_returns=1, timeout=timeout)[0] if handles else []

    def result(self, handle: Any) -> dict[str, Any]:
        return self.ray.get(handle)

    def cancel(self, handle: Any) -> None:
        self.ray.cancel(handle)

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def executor_settings(spec: SweepSpec, params: int, workers: int | None = None, threads: int | None = None,
                      ray: str | None = None) -> dict[str, Any]:
    """Workers, threads per run and Ray address: the arguments over the spec's ``executor``, else chosen
    for this machine (a small model: 1 thread a run and a run a core). Locally, threads × workers may
    not exceed the cores: oversubscribed OpenMP threads wait at every barrier for a descheduled sibling."""
    ex = spec.executor
    ray = ray or ex.ray
    if ray in (None, "local"):  # runs on this machine: at most its cores
        if not threads and ex.threads:
            threads = cpu.check_threads(ex.threads, "executor.threads")
        threads = cpu.training_threads(params, threads)
    else:  # a cluster's node runs it: RayPool checks the threads against the nodes' CPUs once connected
        threads = threads or ex.threads or cpu.training_threads(params)
    workers = workers or ex.workers
    if ray is None:
        cores = cpu.cores()
        workers = workers or max(1, cores // threads)
        if threads * workers > cores:
            raise ConfigError(f"{_plural(workers, 'worker')} × {_plural(threads, 'thread')} is more than this "
                              f"machine's {_plural(cores, 'core')}; lower executor.workers or executor.threads "
                              "(or --workers/--threads)")
    return {"workers": workers, "threads": threads, "ray": ray}


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def seed_list(first: int, count: int) -> list[int]:
    """``count`` seeds from ``first`` for ``vary.seed`` (the Sweep page's "seeds per plan"); [] for one: the
    base's own seed, no variation."""
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_RUNS:
        raise ConfigError(f"seeds per plan: give a whole number from 1 to {MAX_RUNS}; got {count!r}")
    return list(range(first, first + count)) if count > 1 else []


def from_form(data: dict[str, Any], params: int, seeds: int = 1) -> tuple[SweepSpec | None, dict[str, str]]:
    """The Sweep page's form as a spec, or None and what is wrong, by field (``name``, ``vary.lr``,
    ``vary.seed``, ``vary``: too many runs, ``executor``: this machine's cores). ``data`` is a spec's
    mapping without ``vary.seed``; ``seeds``: the form's seeds per plan (:func:`seed_list`); ``params``: the
    base model's parameters. The rules are :func:`from_dict`'s and :func:`executor_settings`'s, so the page
    refuses what the CLI refuses, each message beside its control."""
    problems: dict[str, str] = {}
    try:
        seed = seed_list(data["base"].get("seed", 0), seeds)
    except ConfigError as err:  # said beside the other fields' problems
        seed, problems = [], {"vary.seed": str(err).removeprefix("seeds per plan: ")}
    try:
        spec = SweepSpec.model_validate(data | {"vary": data.get("vary", {}) | {"seed": seed}})
    except ValidationError as err:  # a list's item (vary.lr.1) is reported on its list, the first message kept
        return None, {re.sub(r"\.\d+$", "", k): v for k, v in reversed(cfg.by_field(err).items())} | problems
    if problems:
        return None, problems
    try:
        spec = from_dict(spec.model_dump())  # its number of runs
    except ConfigError as err:
        return None, {"vary": str(err)}
    try:
        executor_settings(spec, params)
    except ConfigError as err:
        return None, {"executor": str(err)}
    return spec, {}


# --- the driver -------------------------------------------------------------------------------------

def running(store: RunStore, sweep_id: str) -> bool:
    return state(store, sweep_id)["state"] in ("preparing", "training", "latency")


def launch(spec: SweepSpec, store: RunStore) -> None:
    """Run the sweep in a separate process (the app's background job, as ``runner.launch``): it outlives
    the page, and its output goes to the sweep's ``driver.log``. Running it again resumes it."""
    zoo.check_plugin(spec.base.model)
    if running(store, spec.name):
        raise StoreError(f"sweep {spec.name} is running already; cancel it first, or give the new one another name")
    folder = store.sweep_dir(spec.name)
    atomic_write_text(folder / SPEC_FILE, spec.to_yaml())  # its folder made too
    (folder / CANCEL_FLAG).unlink(missing_ok=True)
    status = _State(folder)
    status.write(state="preparing", message="starting", error=None, total=variation_count(spec))
    with new_log(folder / "driver.log") as log:
        proc = subprocess.Popen([sys.executable, "-m", "qat_core.cli", "--workspace", str(store.root), "sweep",
                                 str(folder / SPEC_FILE), "--quiet"], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    status.write(pid=proc.pid)  # until the driver writes its own

def _suggestions(spec: SweepSpec, store: RunStore, folder: Path, emit: Callable[[Event], None],
                 cancel: train.Cancel) -> dict[str, LayerPlan]:
    """search.suggest_plan at each budget, from the base's baseline; kept in the sweep's folder so a
    resumed sweep trains the same plans."""
    s = spec.vary.suggested
    if s is None or not (s.average_bits or s.budget_bytes):
        return {}
    key = hashlib.sha256(json.dumps([spec.base.to_dict(), s.model_dump()], sort_keys=True).encode()).hexdigest()
    path = folder / SUGGESTED_FILE
    if os.path.lexists(path):
        saved = _read(path, _SUGGESTED)
        if saved.key == key:  # else suggested for another base or budget: chosen again
            return saved.plans
    if runner.cached_baseline(spec.base, store) is None:
        emit({"event": "baseline", "message": "training the FP32 baseline (for the sensitivity scan and the runs)"})
    loaded = runner.calibrated(spec.base, store, cancel=cancel, on_event=_step_notes(
        emit, "training the FP32 baseline (for the sensitivity scan and the runs)"))
    what = f"measuring each layer's sensitivity at {s.widths} bits"
    emit({"event": "sensitivity", "message": what})
    sens = search.sensitivity(loaded, s.widths, cancel=cancel, on_progress=_task_notes(emit, what))
    budgets = [(f"suggested ≤ {b:g} bits", {"average_bits": b}) for b in s.average_bits]
    budgets += [(f"suggested ≤ {b:,.0f} B", {"budget_bytes": b}) for b in s.budget_bytes]
    plans = {}
    for label, budget in budgets:
        what = f"choosing the plan {label} (measuring candidate plans)"
        emit({"event": "suggestion", "message": what})
        plans[label] = search.suggest_plan(loaded, sens, **budget, cancel=cancel,
                                           on_progress=_task_notes(emit, what)).plan
    atomic_write_text(path, json.dumps({"key": key, "plans": {k: p.model_dump(mode="json") for k, p in plans.items()}}))
    return plans


def _baselines(items: list[Item], store: RunStore, emit: Callable[[Event], None], cancel: train.Cancel) -> None:
    """Train each distinct FP32 baseline once, before the runs (which then find it cached)."""
    todo = {runner.baseline_key(i.config): i.config for i in items}
    for k, config in enumerate(todo.values()):
        if runner.cached_baseline(config, store) is None:
            what = f"training FP32 baseline {k + 1} of {len(todo)} (seed {config.seed})"
            emit({"event": "baseline", "message": what})
            runner.baseline(config, store, _step_notes(emit, what), cancel)


NOTE_SECONDS = 1.0  # at most one progress message a second in the sweep's state file (the page polls it)


def _throttled(emit: Callable[[Event], None]) -> Callable[[str, bool], None]:
    """``note(message, final)``: a "progress" event, at most one each NOTE_SECONDS (and the last one)."""
    last = [0.0]

    def note(message: str, final: bool) -> None:
        if final or time.monotonic() - last[0] >= NOTE_SECONDS:
            last[0] = time.monotonic()
            emit({"event": "progress", "message": message})

    return note


def _step_notes(emit: Callable[[Event], None], what: str) -> train.OnEvent:
    """Training events (a baseline the driver trains) as messages: what, the step, the time left."""
    note, first = _throttled(emit), []

    def on_event(event: Event) -> None:
        if "step" in event:
            first[:] = first or [event]  # the pace is measured after the first step
            left = progress.step_seconds_left([first[0], event])
            note(progress.task_text({"done": event["step"], "total": event["total"], "seconds_left": left}, what),
                 event["step"] == event["total"])

    return on_event


def _task_notes(emit: Callable[[Event], None], what: str) -> Callable[[Event], None]:
    """Progress payloads of sensitivity and suggestions (with their time left) as messages."""
    note = _throttled(emit)
    return lambda payload: note(progress.task_text(payload, what), payload["done"] >= payload["total"])


def _reconcile(store: RunStore, sweep_id: str, items: list[Item], emit: Callable[[Event], None]) -> list[Item]:
    """The items still to train. A run that did not finish is deleted: its folder may be half-written."""
    records = {r["id"]: r for r in store.sweep_runs(sweep_id)}
    todo = []
    for item in items:
        record = records.get(item.run_id)
        if record is not None and record["status"] == "done":
            emit({"event": "kept", "run": item.run_id, "label": item.label})
            continue
        if record is not None and record["status"] == "running":  # its process lives: a killed driver's worker
            raise StoreError(f"run {item.run_id} of sweep {sweep_id} is still being trained by another process; "
                             "wait a few seconds for it to stop, then run the sweep again")
        if record is not None:
            store.delete(item.run_id)
        else:  # a worker killed while it created the run (mkdir, then the index) leaves a folder nothing lists
            shutil.rmtree(store.run_dir(item.run_id), ignore_errors=True)
        todo.append(item)
    return todo


def run_sweep(spec: SweepSpec, store: RunStore, workers: int | None = None, threads: int | None = None,
              ray: str | None = None, on_event: Callable[[Event], None] | None = None) -> pd.DataFrame:
    """Train every run of ``spec`` that the store lacks, then (``spec.latency``) time the int8 models.
    Returns :func:`sweep_frame`. Events: ``{"event": …, "message"?, "run"?, "label"?, "done"?, "total"?}``.
    Cancel: :func:`request_cancel`, from any process."""
    emit = on_event or (lambda e: None)
    zoo.check_plugin(spec.base.model)  # before the sweep is recorded
    folder = store.sweep_dir(spec.name)
    with store.sweep_lock(spec.name):
        (folder / CANCEL_FLAG).unlink(missing_ok=True)
        atomic_write_text(folder / SPEC_FILE, spec.to_yaml())
        status, cancel = _State(folder), SweepCancel(folder)
        status.write(state="preparing", message="building the model", error=None, total=variation_count(spec))
        try:
            _drive(spec, store, folder, status, cancel, emit, workers, threads, ray)
        except (CancelledError, KeyboardInterrupt) as err:
            status.write(state="cancelled", message="cancelled")
            if isinstance(err, KeyboardInterrupt):
                raise
        except BaseException as err:
            status.write(state="failed", error=str(err) if isinstance(err, QATError) else
                         f"internal error: {type(err).__name__}: {err}")
            raise
    return sweep_frame(store, spec.name)


def _drive(spec: SweepSpec, store: RunStore, folder: Path, status: _State, cancel: SweepCancel,
           emit: Callable[[Event], None], workers: int | None, threads: int | None, ray: str | None) -> None:
    model, data = zoo.build(spec.base.model, spec.base.data, spec.base.weights, spec.base.checkpoint)
    rows = layer_table(model, data.example())
    params = sum(p.numel() for p in model.parameters())
    settings = executor_settings(spec, params, workers, threads, ray)
    status.write(**settings)

    def note(event: Event) -> None:  # what the driver is doing, for the page
        if "message" in event:
            status.write(message=event["message"])
        emit(event)

    with contextlib.ExitStack() as pools:
        ray_pool = None
        if settings["ray"]:  # connected, or refused, before anything trains
            note({"event": "ray", "message": f"connecting to Ray ({settings['ray']})"})
            ray_pool = RayPool(settings["ray"], settings["threads"])
            pools.callback(ray_pool.close)
        with train.torch_threads(cpu.training_threads(params)):
            plans = plan_variations(spec, rows, _suggestions(spec, store, folder, note, cancel))
        items = expand(spec, plans)
        atomic_write_text(folder / PLAN_FILE, json.dumps([{"run": i.run_id, "label": i.label} for i in items]))
        todo = _reconcile(store, spec.name, items, emit)
        status.write(total=len(items), message=f"{len(todo)} of {len(items)} runs to train")
        if todo:  # local workers start now, and import torch while the baselines train
            pool = ray_pool or LocalPool(settings["workers"], settings["threads"])
            if pool is not ray_pool:
                pools.callback(pool.close)
            try:
                with train.torch_threads(cpu.training_threads(params)):
                    _baselines(todo, store, note, cancel)
                at_once = settings["workers"] or "as many as Ray places"
                status.write(state="training", message=f"training {len(todo)} runs, {at_once} at a time",
                             training_started=time.time(), training_total=len(todo))
                _train(pool, todo, store, spec.name, settings, cancel, emit)
            except KeyboardInterrupt:  # Ctrl-C: every run stops at its next step and is recorded cancelled
                request_cancel(store, spec.name)
                raise
    if cancel.is_set():
        raise CancelledError(f"sweep {spec.name} cancelled")
    if spec.latency:
        status.write(state="latency", message="timing the int8 models")
        _latency(store, spec.name, settings["threads"], cancel, emit)
    unfinished = _unfinished(store, spec.name, items)
    status.write(state="incomplete" if unfinished else "done", message="incomplete" if unfinished else "done",
                 error=unfinished)


def _unfinished(store: RunStore, sweep_id: str, items: list[Item]) -> str | None:
    """What did not finish of the sweep's runs (failed, killed with its worker, never started), or None."""
    records = {r["id"]: r for r in store.sweep_runs(sweep_id)}
    left = [records.get(i.run_id, {"status": "not started", "error": None}) for i in items]
    left = [r for r in left if r["status"] != "done"]
    if not left:
        return None
    counts = Counter(r["status"] for r in left)
    errors = [r["error"] for r in left if r["error"]]
    return (f"{len(left)} of {len(items)} runs did not finish ({', '.join(f'{n} {s}' for s, n in counts.items())})"
            + (f"; the first error: {errors[0]}" if errors else ""))


def _train(pool: LocalPool | RayPool, todo: list[Item], store: RunStore, sweep_id: str, settings: dict[str, Any],
           cancel: SweepCancel, emit: Callable[[Event], None]) -> None:
    handles = {pool.submit(str(store.root), sweep_id, {"run": i.run_id, "label": i.label, "config": i.config.to_json()},
                           settings["threads"]): i for i in todo}
    pending, stopping, done = list(handles), False, 0
    while pending:
        if cancel.is_set() and not stopping:  # drop what has not started; started runs see the sweep's flag
            stopping = True
            for h in pending:
                pool.cancel(h)
        for h in pool.wait(pending, POLL_SECONDS):
            pending.remove(h)
            item, done = handles[h], done + 1
            try:
                result = pool.result(h)
            except BrokenProcessPool:  # a worker was killed (kill -9, out of memory): the pool ran no more runs
                result = {"run": item.run_id, "status": "failed", "error": WORKER_DIED}
            except (cf.CancelledError, Exception) as err:  # a cancelled task, or a bug recorded on its run
                result = {"run": item.run_id, "status": "cancelled" if stopping else "failed", "error": str(err)}
            emit({"event": "finished", "run": item.run_id, "label": item.label, "done": done, "total": len(todo),
                  **{k: v for k, v in result.items() if k != "run"}})


def _latency(store: RunStore, sweep_id: str, threads: int, cancel: SweepCancel, emit: Callable[[Event], None]) -> None:
    runs = [r for r in store.sweep_runs(sweep_id) if r["status"] == "done" and "bench" not in r["metrics"]]
    for k, record in enumerate(runs):
        if cancel.is_set():
            raise CancelledError(f"sweep {sweep_id} cancelled while timing the int8 models")
        emit({"event": "latency", "run": record["id"], "label": (record["metrics"].get("sweep") or {}).get("label"),
              "done": k, "total": len(runs)})
        try:
            bench.bench_run(store, record["id"], threads=(threads,), **LATENCY)
        except QATError as err:  # a model ONNX cannot export: its row shows no latency, and why
            emit({"event": "latency failed", "run": record["id"], "error": str(err)})
