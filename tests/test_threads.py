"""Threads chosen, not inherited: torch's default (every core) makes a small model wait at every OpenMP
barrier for a thread that another busy process has descheduled (benchmarks/bench_threads.py measures it)."""

from __future__ import annotations

import pytest

from qat_core import cli, cpu


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
