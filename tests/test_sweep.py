"""Sweeps: specs are validated, variations expand as written, runs train in worker processes (and as
Ray tasks) with the same results as one after another, and a killed sweep resumes where it stopped."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

from qat_core import cli, runner, sweep, zoo
from qat_core.errors import ConfigError, StoreError
from qat_core.prepare import layer_table
from qat_core.store import RunStore
from tests.conftest import full_disk_for, small_base


def spec_of(name: str, **vary) -> sweep.SweepSpec:
    return sweep.SweepSpec(name=name, base=small_base(), vary=sweep.Vary(**vary), latency=False)


def rows():
    model, data = zoo.build("digits-mlp", small_base().data)
    return layer_table(model, data.example())


# --- specs ------------------------------------------------------------------------------------------

def test_spec_round_trips_and_reads_its_base_from_a_file_beside_it(tmp_path):
    spec = spec_of("rt", weight_bits=[8, 4], seed=[0, 1])
    assert sweep.parse_spec(spec.to_yaml()) == spec
    (tmp_path / "base.yaml").write_text(small_base().to_yaml())
    (tmp_path / "sweep.yaml").write_text("version: 1\nname: from-file\nbase: base.yaml\nvary: {lr: [0.01]}\n")
    loaded = sweep.load_spec(tmp_path / "sweep.yaml")
    assert loaded.base == small_base() and loaded.vary.lr == [0.01]


@pytest.mark.parametrize("text, message", [
    ("name: x\nbase: {}\nvary: {weight_bits: [9]}", r"vary\.weight_bits\.0: must be less than or equal to 8"),
    ("name: x\nbase: {}\nvary: {widths: [4]}", r"vary\.widths: unknown key"),
    ("name: Big Sweep\nbase: {}", r"name: use 1 to 40 lower-case letters, digits, .-. or ._., starting with a letter or "
                                   r"digit, e.g. .big-sweep.; got .Big Sweep."),
    ("name: x\nbase: {}\nversion: 2", r"reads sweep version 1"),
    ("name: x\nbase: {finetune: {lr: -1}}", r"base\.finetune\.lr"),
    ("name: x\nbase: missing.yaml", r"config file .*missing\.yaml does not exist"),
    ("- a list", r"must be a mapping with name, base and vary"),
    ("name: x\nbase: {}\nvary: {seed: " + str(list(range(300))) + "}", r"asks for 300 runs; a sweep trains at most"),
])
def test_bad_specs_say_what_to_fix(tmp_path, text, message):
    (tmp_path / "s.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        sweep.load_spec(tmp_path / "s.yaml")


def test_variations_expand_as_written_and_each_config_once():
    spec = spec_of("ex", weight_bits=[8, 3], plans={"ends-8": {"default": {"weight_bits": 3},
                                                              "overrides": {"fc1.linear": {"weight_bits": 8}}}},
                   range_method=["minmax"], lr=[0.01, 0.001], seed=[0, 2])
    items = sweep.expand(spec, sweep.plan_variations(spec, rows(), {}))
    assert len(items) == 3 * 1 * 2 * 2
    first = items[0]
    assert first.label == "8-bit weights · minmax ranges · lr 0.01 · seed 0"
    assert first.config.name == f"ex: {first.label}" and first.config.finetune.lr == 0.01
    ends = next(i for i in items if i.label.startswith("ends-8"))
    assert ends.config.plan.spec_for("fc1.linear").weight_bits == 8 and ends.config.plan.spec_for("fc3").weight_bits == 3
    assert {i.config.plan.default.range_method for i in items} == {"minmax"}
    assert {i.config.seed for i in items} == {0, 2}
    three = next(i for i in items if i.label.startswith("3-bit"))
    weights = [r["name"] for r in rows() if r["has_weights"]]
    assert all(three.config.plan.spec_for(n).weight_bits == 3 for n in weights)  # every layer, ends included
    # ids come from the config: the same plan under two labels trains once; the name does not count
    again = sweep.expand(spec, {"3-bit weights": three.config.plan, "another name": three.config.plan})
    assert len(again) == len(items) // 3
    assert sweep.run_id_for("ex", three.config) == three.run_id
    assert sweep.run_id_for("ex", three.config.model_copy(update={"name": "x"})) == three.run_id


def test_a_plan_naming_a_missing_layer_is_refused():
    spec = spec_of("bad", plans={"typo": {"overrides": {"fc9": {"weight_bits": 4}}}})
    with pytest.raises(ConfigError, match=r"'typo' names layer\(s\) fc9 that digits-mlp does not have; its layers: "):
        sweep.plan_variations(spec, rows(), {})


def test_workers_times_threads_may_not_exceed_the_cores(monkeypatch):
    monkeypatch.setattr(sweep.cpu, "cores", lambda: 2)
    spec = spec_of("cores")
    assert sweep.executor_settings(spec, 10_000) == {"workers": 2, "threads": 1, "ray": None}
    assert sweep.executor_settings(spec, 10_000, threads=2) == {"workers": 1, "threads": 2, "ray": None}
    with pytest.raises(ConfigError, match=r"2 workers × 2 threads is more than this machine's 2 cores"):
        sweep.executor_settings(spec, 10_000, workers=2, threads=2)
    assert sweep.executor_settings(spec, 10_000, workers=8, ray="local")["workers"] == 8  # Ray places them


# --- running ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A sweep of 4 plans with 2 workers, and the same configs trained one after another in this process."""
    store = RunStore(tmp_path_factory.mktemp("sweep"))
    spec = spec_of("plans", weight_bits=[8, 4, 3, 2])
    events = []
    frame = sweep.run_sweep(spec, store, workers=2, threads=1, on_event=events.append)
    alone = RunStore(tmp_path_factory.mktemp("alone"))
    sequential = {}
    for item in sweep.expand(spec, sweep.plan_variations(spec, rows(), {})):
        run_id = runner.execute(item.config, alone, threads=1)
        sequential[item.label] = alone.get(run_id)["metrics"]["qat"]["accuracy"]
    return store, spec, frame, events, sequential


def test_a_sweep_trains_every_run_in_workers_as_one_after_another_would(swept):
    store, spec, frame, events, sequential = swept
    assert list(frame["status"]) == ["done"] * 4
    assert list(frame["label"]) == ["8-bit weights", "4-bit weights", "3-bit weights", "2-bit weights"]
    assert list(frame["avg weight bits"]) == [8.0, 4.0, 3.0, 2.0]
    assert frame["size KB"].nunique() == 1  # int8.onnx stores 2..8-bit weights a byte each: one file size
    packed = list(frame["bit-packed KB"][1:])  # 8-bit packs to no less than its file: no bit-packed figure
    assert frame["bit-packed KB"].isna().iloc[0] and packed == sorted(packed, reverse=True) and len(set(packed)) == 3
    assert accuracies(store, frame) == sequential  # same seeds, same numbers, whichever process trains them
    assert {store.get(r)["metrics"]["sweep"]["id"] for r in frame["run"]} == {"plans"}
    assert len(list((store.root / "baselines").glob("*.pt"))) == 1  # trained once, by the driver, and shared
    assert [e["event"] for e in events].count("baseline") == 1
    assert sweep.state(store, "plans")["state"] == "done"


def test_running_a_finished_sweep_again_trains_nothing(swept):
    store, spec, frame, _, _ = swept
    events = []
    again = sweep.run_sweep(spec, store, workers=2, threads=1, on_event=events.append)
    assert [e["event"] for e in events] == ["kept"] * 4
    assert list(again["run"]) == list(frame["run"])


def test_a_second_driver_of_the_same_sweep_is_refused(swept, monkeypatch):
    store, spec, _, _, _ = swept
    monkeypatch.setattr("qat_core.store.SWEEP_LOCK_WAIT", 0.2)
    with store.sweep_lock("plans"), pytest.raises(StoreError, match="sweep plans is running in another process"):
        sweep.run_sweep(spec, store)


def test_the_same_sweep_on_ray_gives_the_same_accuracies(swept, tmp_path):
    store, spec, frame, _, _ = swept
    two = spec.model_copy(update={"vary": spec.vary.model_copy(update={"weight_bits": [4, 2]})})  # Ray starts slowly
    ray_store = RunStore(tmp_path)
    on_ray = sweep.run_sweep(two, ray_store, threads=1, ray="local")
    assert list(on_ray["status"]) == ["done"] * 2
    pool = accuracies(store, frame)
    assert accuracies(ray_store, on_ray) == {label: pool[label] for label in ("4-bit weights", "2-bit weights")}
    assert set(on_ray["run"]) <= set(frame["run"])  # the same configs: the same ids


def test_without_ray_a_ray_sweep_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what Python does for a package that is not installed
    with pytest.raises(ConfigError, match=r"needs Ray, which is not installed; pip install -e '.\[ray\]'"):
        sweep.RayPool("local", 1)


def accuracies(store, frame) -> dict[str, float]:
    return {label: store.get(run_id)["metrics"]["qat"]["accuracy"]
            for label, run_id in zip(frame["label"], frame["run"], strict=True)}


def _cli(workspace, *args, **kwargs):
    env = os.environ | {"PYTHONPATH": os.getcwd()}
    return subprocess.Popen([sys.executable, "-m", "qat_core.cli", "--workspace", str(workspace), "sweep", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kwargs)


def _wait_for(check, seconds: float = 120):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError("timed out")


def test_kill_9_then_run_again_trains_only_the_missing_runs(tmp_path):
    spec = spec_of("killed", weight_bits=[8, 4, 3, 2])
    path = tmp_path / "sweep.yaml"
    path.write_text(spec.to_yaml())
    store = RunStore(tmp_path / "ws")
    proc = _cli(store.root, str(path), "--workers", "2", "--threads", "1")
    done = lambda: [r for r in store.sweep_runs("killed") if r["status"] == "done"]  # noqa: E731
    _wait_for(lambda: len(done()) >= 1 and any(r["status"] == "running" for r in store.sweep_runs("killed")))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _wait_for(lambda: not any(r["status"] == "running" for r in store.sweep_runs("killed")), 10)  # workers exit too
    finished = {r["id"] for r in done()}
    assert sweep.state(store, "killed")["state"] == "stopped"
    events = []
    frame = sweep.run_sweep(sweep.load_spec(path), store, on_event=events.append)
    assert {e["run"] for e in events if e["event"] == "kept"} == finished
    assert {e["run"] for e in events if e["event"] == "finished"} == set(frame["run"]) - finished
    assert list(frame["status"]) == ["done"] * 4
    ids = [r["id"] for r in store.list()]
    assert sorted(ids) == sorted(frame["run"])  # every run listed once: the half-trained ones were replaced
    assert not list(store.root.rglob("*.tmp"))
    for run_id in ids:
        runner.load(store, run_id)  # each one's files are whole


def test_cancel_stops_the_sweep_and_a_second_run_finishes_it(tmp_path):
    spec = spec_of("stop", weight_bits=[8, 4, 2])
    path = tmp_path / "sweep.yaml"
    path.write_text(spec.to_yaml())
    store = RunStore(tmp_path / "ws")
    threads = "2" if sweep.cpu.cores() >= 2 else "1"  # more than one: the spawned workers' path
    proc = _cli(store.root, str(path), "--workers", "1", "--threads", threads)
    _wait_for(lambda: any(r["status"] == "running" for r in store.sweep_runs("stop")))
    sweep.request_cancel(store, "stop")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert "sweep stop cancelled" in err and "run the same command again" in err
    assert sweep.state(store, "stop")["state"] == "cancelled"
    assert {r["status"] for r in store.sweep_runs("stop")} <= {"done", "cancelled"}
    assert len(store.sweep_runs("stop")) < 3
    frame = sweep.run_sweep(spec, store, workers=2)
    assert list(frame["status"]) == ["done"] * 3


def test_cli_prints_an_example_that_it_can_run(tmp_path, capsys):
    assert cli.main(["sweep", "--example", "--model", "digits-mlp"]) == 0
    out = capsys.readouterr().out
    (tmp_path / "example.yaml").write_text(out)
    spec = sweep.load_spec(tmp_path / "example.yaml")
    assert spec.base.model == "digits-mlp" and spec.vary.weight_bits == [8, 4, 3, 2]
    assert yaml.safe_load(out)["vary"]["suggested"]["average_bits"] == [3.0]


def test_suggested_plans_are_measured_once_and_trained(tmp_path):
    store = RunStore(tmp_path)
    spec = spec_of("sug", suggested={"average_bits": [3.0], "widths": [8, 4, 2]})
    frame = sweep.run_sweep(spec, store, workers=2)
    assert list(frame["label"]) == ["suggested ≤ 3 bits"] and list(frame["status"]) == ["done"]
    assert frame["avg weight bits"].iloc[0] <= 3.0
    saved = json.loads((store.sweep_dir("sug") / sweep.SUGGESTED_FILE).read_text())
    assert list(saved["plans"]) == ["suggested ≤ 3 bits"]
    events = []
    sweep.run_sweep(spec, store, on_event=events.append)  # resumed: the saved suggestion, not a new scan
    assert [e["event"] for e in events] == ["kept"]


# --- statuses: a sweep is done only when every run is ----------------------------------------------

def test_a_sweep_whose_runs_all_fail_ends_incomplete_and_exits_2(tmp_path, capsys):
    spec = sweep.SweepSpec(name="diverges", base=small_base(lr=10.0, guard=False), vary=sweep.Vary(weight_bits=[8, 4]),
                           latency=False)
    path = tmp_path / "sweep.yaml"
    path.write_text(spec.to_yaml())
    store = RunStore(tmp_path / "ws")
    code = cli.main(["--workspace", str(store.root), "sweep", str(path), "--workers", "1", "--threads", "1", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "sweep diverges incomplete: 2 of 2 runs did not finish (2 failed)" in err and "training diverged" in err
    assert "run the same command again" in err
    assert sweep.state(store, "diverges")["state"] == "incomplete"


REAL_EXECUTE = runner.execute


def _killed_at_4_bits(config, *args, **kwargs):
    """runner.execute in a forked worker, which the kernel kills (as the OOM killer would) on the 4-bit run."""
    if "4-bit" in config.name:
        os.kill(os.getpid(), signal.SIGKILL)
    return REAL_EXECUTE(config, *args, **kwargs)


def test_a_killed_worker_leaves_the_sweep_incomplete_and_running_it_again_finishes_it(tmp_path, monkeypatch):
    store = RunStore(tmp_path)
    spec = spec_of("oom", weight_bits=[8, 4, 2])
    monkeypatch.setattr(runner, "execute", _killed_at_4_bits)  # the workers fork from this process: they see it
    frame = sweep.run_sweep(spec, store, workers=1, threads=1)  # no traceback: the driver reports what happened
    state = sweep.state(store, "oom")
    assert state["state"] == "incomplete" and "2 of 3 runs did not finish" in state["error"], state
    assert list(frame["status"]) == ["done", "failed", "pending"]
    monkeypatch.undo()
    events = []
    frame = sweep.run_sweep(spec, store, on_event=events.append)
    assert [e["event"] for e in events].count("kept") == 1
    assert list(frame["status"]) == ["done"] * 3 and sweep.state(store, "oom")["state"] == "done"


def test_a_run_folder_that_a_killed_worker_left_unlisted_is_trained_again(tmp_path):
    store = RunStore(tmp_path)
    spec = spec_of("orphan", weight_bits=[4])
    [item] = sweep.expand(spec, sweep.plan_variations(spec, rows(), {}))
    store.run_dir(item.run_id).mkdir(parents=True)  # killed between the run's mkdir and its index row
    frame = sweep.run_sweep(spec, store, workers=1, threads=1)
    assert list(frame["status"]) == ["done"] and sweep.state(store, "orphan")["state"] == "done"


# --- Ray: an address is reached or refused within seconds; a run no node can place is refused -------

def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # free once closed: nothing listens there


def test_sweep_ray_at_a_closed_port_is_refused_in_seconds(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(spec_of("closed").to_yaml())
    proc = _cli(tmp_path / "ws", str(path), "--ray", f"127.0.0.1:{_closed_port()}", "--quiet")
    try:
        _, err = proc.communicate(timeout=120)  # Ray alone retried 127.0.0.1:1 for 845 s
    finally:
        proc.kill()
    assert proc.returncode == 2 and "cannot connect to the Ray cluster at '127.0.0.1:" in err, err
    assert "Connection refused" in err and "`ray status` on the head node" in err and "ray: local" in err


@pytest.mark.parametrize("address, why", [("ray://127.0.0.1:{port}", "Connection refused"),
                                          ("head-node", "it is not an address"), ("head:port", "it is not an address"),
                                          ("http://head:6379", "it is not an address")])
def test_a_ray_address_that_cannot_be_reached_is_refused_at_once(address, why):
    address = address.format(port=_closed_port())
    started = time.monotonic()
    with pytest.raises(ConfigError, match=f"cannot connect to the Ray cluster at '{address}': .*{why}") as err:
        sweep.RayPool(address, 1)
    assert time.monotonic() - started < 20  # no connection attempt: a closed port or a malformed address
    assert "`ray status` on the head node" in str(err.value) and "ray: local" in str(err.value)


@pytest.mark.slow
def test_a_port_that_answers_but_is_not_ray_is_refused_within_the_connect_limit(tmp_path):
    """A spec's executor.ray, through the CLI: the connection is given RAY_CONNECT_SECONDS, then refused."""
    with socket.socket() as silent:  # accepts connections (the kernel does), never speaks
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        spec = spec_of("silent").model_copy(update={"executor": sweep.Executor(ray=f"127.0.0.1:{silent.getsockname()[1]}")})
        (tmp_path / "s.yaml").write_text(spec.to_yaml())
        started = time.monotonic()
        proc = _cli(tmp_path / "ws", str(tmp_path / "s.yaml"), "--quiet")
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and f"no Ray cluster answered within {sweep.RAY_CONNECT_SECONDS} s" in err, err
    assert time.monotonic() - started < 90  # the limit and the CLI's start; Ray alone never gave up
    assert RunStore(tmp_path / "ws").list() == []  # refused before anything trained


def test_runs_that_no_ray_node_can_place_are_refused_before_they_are_submitted():
    ray = pytest.importorskip("ray")
    too_many = sweep.cpu.cores() + 1
    with pytest.raises(ConfigError, match=f"each run asks for {too_many} CPUs .* the largest node .* has "
                                          f"{sweep.cpu.cores()}"):
        sweep.RayPool("local", too_many)  # a local Ray has this machine's cores
    assert not ray.is_initialized()  # and is shut down again
    with pytest.raises(ConfigError, match=f"executor.threads asks for {too_many} threads"):
        sweep.executor_settings(spec_of("x").model_copy(update={"executor": sweep.Executor(threads=too_many,
                                                                                            ray="local")}), 10_000)


def test_a_sweep_whose_disk_fills_ends_incomplete_and_says_disk_full(tmp_path, monkeypatch, capsys):
    """Each run's checkpoints land on /dev/full (the kernel's ENOSPC on every write); the shared baseline
    does not. The workers fork from this process, so they write through the same patch."""
    full_disk_for(monkeypatch, lambda path: path.suffix == ".pt" and path.parent.parent.name == "runs")
    path = tmp_path / "sweep.yaml"
    path.write_text(spec_of("full", weight_bits=[8, 4]).to_yaml())
    code = cli.main(["--workspace", str(tmp_path / "ws"), "sweep", str(path), "--workers", "1", "--threads", "1",
                     "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "sweep full incomplete: 2 of 2 runs did not finish (2 failed)" in err, err
    assert "the first error: disk full: could not write" in err and "internal error" not in err
