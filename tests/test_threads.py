"""Threads chosen, not inherited: torch's default (every core) makes a small model wait at every OpenMP
barrier for a thread that another busy process has descheduled (benchmarks/bench_threads.py measures it)."""

from __future__ import annotations

import pytest

from qat_core import cli, cpu
from qat_core.store import RunStore


def test_small_models_train_with_one_thread_and_larger_ones_with_the_cores(monkeypatch):
    monkeypatch.delenv(cpu.THREADS_ENV, raising=False)
    monkeypatch.setattr(cpu, "cores", lambda: 8)
    assert cpu.training_threads(23_000) == 1  # digits-cnn
    assert cpu.training_threads(11_000_000) == 4  # resnet18: every core, at most 4
    assert cpu.training_threads(11_000_000, requested=2) == 2  # --threads wins
    monkeypatch.setenv(cpu.THREADS_ENV, "3")  # the app's worker sets 1, to leave a core to the server
    assert cpu.training_threads(23_000) == 3 and cpu.training_threads(23_000, requested=1) == 1


def test_a_run_records_the_threads_it_used(workspace, tmp_path, capsys):
    from tests.conftest import quick_config

    config = tmp_path / "c.yaml"
    config.write_text(quick_config(epochs=1).to_yaml())
    assert cli.main(["--workspace", str(workspace.root), "train", str(config), "--quiet", "--threads", "2"]) in (0, None)
    run_id = capsys.readouterr().out.strip().splitlines()[-1]
    assert workspace.get(run_id)["metrics"]["threads"] == 2


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_threads_must_be_a_whole_number_of_at_least_one(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "x.yaml", "--threads", value])
    assert exit_info.value.code == 2 and "--threads: must be a whole number of at least 1" in capsys.readouterr().err


# --- a thread count is a number from 1 to the cores, wherever it comes from ------------------------

def test_a_threads_variable_that_is_not_a_number_is_a_user_error(monkeypatch, tmp_path, capsys):
    from tests.conftest import small_base

    config = tmp_path / "c.yaml"
    config.write_text(small_base().to_yaml())
    monkeypatch.setenv(cpu.THREADS_ENV, "abc")
    assert cli.main(["--workspace", str(tmp_path / "ws"), "train", str(config), "--quiet"]) == 2
    assert f"{cpu.THREADS_ENV}='abc' is not a number of threads" in capsys.readouterr().err
    assert RunStore(tmp_path / "ws").list() == []  # refused before a run was made for it


@pytest.mark.parametrize("command", [["train", "CONFIG", "--threads", "5000"], ["sweep", "SPEC", "--threads", "5000"],
                                     ["bench", "some-run", "--threads", "5000"], ["train", "CONFIG", "ENV=5000"],
                                     ["sweep", "SPEC_5000"]], ids=["train", "sweep", "bench", "env", "spec"])
def test_more_threads_than_cores_are_refused_on_every_command(command, monkeypatch, tmp_path, capsys):
    from qat_core import sweep
    from tests.conftest import small_base

    monkeypatch.delenv(cpu.THREADS_ENV, raising=False)
    (tmp_path / "c.yaml").write_text(small_base().to_yaml())
    for name, threads in (("s.yaml", None), ("s5000.yaml", 5000)):
        spec = sweep.SweepSpec(name="t", base=small_base(), executor=sweep.Executor(threads=threads))
        (tmp_path / name).write_text(spec.to_yaml())
    if "ENV=5000" in command:
        monkeypatch.setenv(cpu.THREADS_ENV, "5000")
    paths = {"CONFIG": "c.yaml", "SPEC": "s.yaml", "SPEC_5000": "s5000.yaml"}
    argv = [str(tmp_path / paths[a]) if a in paths else a for a in command if a != "ENV=5000"]
    assert cli.main(["--workspace", str(tmp_path / "ws"), *argv]) == 2
    err = capsys.readouterr().err
    assert f"asks for 5000 threads; give 1 to {cpu.cores()} (this machine's cores" in err, err
