"""Benchmark settings, machine info and one short real timing run (not a timed test)."""

from __future__ import annotations

import pytest

from qat_core import cli, cpu
from qat_core.bench import bench_run, check_settings, machine_info
from qat_core.errors import ExportError


def test_machine_info_names_the_cpu_and_its_int8_flags():
    info = machine_info()
    assert info["cpu"] and info["cores"] >= 1
    assert set(info["flags"]) == {"avx2", "avx512f", "avx512_vnni", "avxvnni"}


@pytest.mark.parametrize("batches, threads, message", [
    ((0,), (1,), r"batch size must be a whole number from 1"),
    ((1,), (0,), r"threads must be a whole number >= 1 or 'all'"),
    ((1,), ("many",), r"threads must be .* got 'many'"),
    ((), (1,), r"at least one batch size"),
    ((1,), (), r"at least one thread count"),
])
def test_out_of_range_settings_are_refused(batches, threads, message):
    with pytest.raises(ExportError, match=message):
        check_settings(batches, threads, warmup=1, iters=1)


def test_all_threads_means_every_core():
    assert check_settings((1,), ("all",), 0, 1)[1] == [cpu.cores()]  # the cores this process may run on


def test_bench_run_times_three_backends_and_saves_the_result(workspace, digits_run):
    result = bench_run(workspace, digits_run, batch_sizes=(1, 4), threads=(1,), warmup=1, iters=3)
    backends = {r["backend"] for r in result["rows"]}  # and OpenVINO's where installed (tests/test_runtimes.py)
    assert {"ort_fp32", "ort_int8", "torch_fp32"} <= backends
    assert len(result["rows"]) == 2 * len(backends) and all(r["median_ms"] > 0 for r in result["rows"])
    assert result["files"]["int8_bytes"] < result["files"]["fp32_bytes"]
    assert workspace.read_result(digits_run, "bench")["settings"]["batch_sizes"] == [1, 4]
    assert "speedup" in workspace.get(digits_run)["metrics"]["bench"]


def test_cli_bench_rejects_zero_batch(workspace, digits_run, capsys):
    code = cli.main(["--workspace", str(workspace.root), "bench", digits_run, "--batch", "0"])
    assert code == 2
    assert "batch size must be" in capsys.readouterr().err
