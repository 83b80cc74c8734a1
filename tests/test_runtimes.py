"""OpenVINO beside ONNX Runtime: the run's own int8.onnx timed, checked against the run's evaluation, its int8
kernels read from OpenVINO, shown on the Benchmark page, the CLI and the report, and exported as IR."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest

from qat_core import bench, cli, export, report, runner, runtimes
from tests.apptest import app, ok

needs_openvino = pytest.mark.skipif(not runtimes.installed(), reason=runtimes.NOT_INSTALLED)


@pytest.fixture(autouse=True)
def _workspace(workspace, monkeypatch):
    """The pages use the tests' session workspace (shared with tests/conftest.py's runs)."""
    monkeypatch.setenv("QAT_STUDIO_HOME", str(workspace.root))


@pytest.fixture(scope="module")
def benched(workspace, digits_run) -> dict:
    return bench.bench_run(workspace, digits_run, batch_sizes=(1, 4), threads=(1,), warmup=1, iters=3)


@needs_openvino
def test_bench_times_openvino_fp32_and_int8_beside_onnx_runtime(benched, workspace, digits_run):
    timed = {(r["backend"], r["batch"]) for r in benched["rows"] if r["median_ms"] > 0 and r["p99_ms"] > 0}
    assert {(b, n) for b in ("ort_fp32", "ort_int8", "ov_fp32", "ov_int8") for n in (1, 4)} <= timed
    ov = [e for e in benched["runtimes"] if e["runtime"] == "OpenVINO"]
    assert ov[0]["hint"] == "f32" and ov[0]["precision"] == "f32"
    assert all((e["fp32"], 1) in timed and (e["int8"], 1) in timed for e in ov)  # the default hint too
    saved = workspace.read_result(digits_run, "bench")
    assert [e["runtime"] for e in saved["runtimes"]] == ["ONNX Runtime"] + ["OpenVINO"] * len(ov)


@needs_openvino
def test_openvino_agrees_with_the_evaluation_and_runs_the_layers_in_int8(benched, workspace, digits_run):
    ov = next(e for e in benched["runtimes"] if e.get("hint") == "f32")
    found = ov["parity"]
    assert found["evaluated_accuracy"] == workspace.get(digits_run)["metrics"]["qat"]["accuracy"]
    assert found["agreement"] == 1.0 or len(found["differing"]) == min(found["disagreements"], 20), found
    kernels = ov["kernels"]
    assert kernels["int8_types"] == {"Convolution": 3, "FullyConnected": 1} and not kernels["float"]
    assert {k["layer"] for k in kernels["int8"]} == {"conv1.conv", "conv2.conv", "conv3.conv", "fc"}
    assert all(k["precision"] in ("u8", "i8") for k in kernels["int8"])


def test_differing_predictions_are_named():
    evaluated = np.eye(3)[[0, 1, 2, 1]]
    logits = np.eye(3)[[0, 2, 2, 0]]
    found = runtimes.agreement(logits, evaluated, np.array([0, 1, 2, 0]))
    assert found["agreement"] == 0.5 and found["accuracy"] == 0.75 and found["disagreements"] == 2
    assert found["differing"] == [{"sample": 1, "label": 1, "evaluated": 1, "runtime": 2},
                                  {"sample": 3, "label": 0, "evaluated": 1, "runtime": 0}]
    entry = {"runtime": "OpenVINO", "version": "1", "hint": "f32", "precision": "f32", "parity": found}
    [note] = report.runtime_notes({"runtimes": [entry]})
    assert note.level == "warning" and "2 of 4 predictions differ" in note.text
    assert "sample 1 (label 1): evaluated 1, OpenVINO 2" in note.text


def test_without_openvino_the_bench_says_how_to_install_it(workspace, digits_run, monkeypatch):
    monkeypatch.setattr(runtimes, "installed", lambda: False)
    result = bench.bench_run(workspace, digits_run, batch_sizes=(1,), threads=(1,), warmup=0, iters=1)
    assert not any(r["backend"].startswith("ov") for r in result["rows"])
    assert [(n.level, n.text) for n in report.runtime_notes(result)] == [
        ("info", "OpenVINO not installed — pip install '.[openvino]'")]
    assert list(report.runtime_frame(result)["runtime"]) == [f"ONNX Runtime {result['runtimes'][0]['version']}"]


def test_a_bench_result_from_before_runtimes_still_loads(workspace, digits_run, tmp_path):
    from qat_core.store import RunStore

    store = RunStore(tmp_path / "ws")
    run_id = store.create_run(workspace.config(digits_run))
    old = {"machine": {"cpu": "x"}, "rows": [
        {"backend": b, "batch": 1, "threads": 1, "median_ms": ms, "p90_ms": ms, "p99_ms": ms, "throughput": 1 / ms}
        for b, ms in (("ort_fp32", 2.0), ("ort_int8", 1.0))], "comparisons": [{"batch": 1, "threads": 1, "speedup": 2.0}]}
    store.write_result(run_id, "bench", old)
    frame = report.runtime_frame(store.read_result(run_id, "bench"))
    assert list(frame["runtime"]) == ["ONNX Runtime"] and frame["int8 speed-up"].tolist() == [2.0]
    assert report.runtime_notes(old) == []


@needs_openvino
def test_benchmark_page_shows_the_openvino_rows(workspace, digits_run):
    at = ok(app("benchmark"))
    at.selectbox(key="run_picker").set_value(digits_run).run()
    at.button(key="bench_run").click().run()
    ok(at)
    frame = next(d.value for d in at.dataframe if "runtime" in d.value.columns)
    names = list(frame["runtime"])
    assert names[0].startswith("ONNX Runtime") and any(n.startswith("OpenVINO") and "f32 hint" in n for n in names)
    ov = frame[frame["runtime"].str.contains("f32 hint")].iloc[0]
    assert ov["int8 p50 (ms)"] > 0 and ov["FP32 p50 (ms)"] > 0 and ov["agreement"] == "100.00%", ov.to_dict()
    assert ov["int8 kernels"].startswith("4/4 nodes")
    ort = frame.iloc[0]  # ONNX Runtime's parity: the page's Parity section, measured by the same click
    assert ort["agreement"] == f"{workspace.read_result(digits_run, 'parity')['agreement']:.2%}"


def test_benchmark_page_says_openvino_is_not_installed(workspace, digits_run, monkeypatch):
    monkeypatch.setattr(runtimes, "installed", lambda: False)
    at = ok(app("benchmark"))
    at.selectbox(key="run_picker").set_value(digits_run).run()
    at.button(key="bench_run").click().run()
    ok(at)
    assert "OpenVINO not installed — pip install '.[openvino]'" in [i.value for i in at.info]


@needs_openvino
def test_cli_bench_prints_each_runtime_and_its_parity(workspace, digits_run, capsys):
    args = ["--workspace", str(workspace.root), "bench", digits_run, "--batch", "1", "--threads", "1",
            "--warmup", "1", "--iters", "3"]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    line = next(t for t in text.splitlines() if "OpenVINO" in t and "f32 hint" in t and "int8 p50" in t)
    assert "agreement 100.00%" in line and "int8 kernels 4/4 nodes" in line
    assert cli.main([*args, "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert [e["runtime"] for e in found["runtimes"]][:2] == ["ONNX Runtime", "OpenVINO"]


@needs_openvino
def test_openvino_ir_loads_back_and_predicts_as_the_onnx_file(workspace, digits_run, tmp_path, capsys):
    import openvino

    payload = runtimes.ir_zip(workspace, digits_run)
    with zipfile.ZipFile(io.BytesIO(payload)) as bundle:
        names = sorted(bundle.namelist())
        bundle.extractall(tmp_path)
    assert names == ["digits-cnn_W8A8_int8_openvino.bin", "digits-cnn_W8A8_int8_openvino.xml"]
    x = runner.load(workspace, digits_run).data.test_x[:64].numpy()
    from_ir = runtimes.runner(openvino.Core().compile_model(str(tmp_path / names[1]), "CPU",
                                                            {"INFERENCE_PRECISION_HINT": "f32"}))(x)
    from_onnx = runtimes.runner(runtimes.compile_model(workspace.artifact(digits_run, "int8.onnx"), 1))(x)
    np.testing.assert_array_equal(from_ir, from_onnx)
    ort = export.session(workspace.artifact(digits_run, "int8.onnx")).run(None, {export.INPUT_NAME: x})[0]
    assert (from_ir.argmax(1) == ort.argmax(1)).all()
    assert cli.main(["--workspace", str(workspace.root), "export", digits_run]) == 0
    assert f"OpenVINO IR: {workspace.artifact(digits_run, 'int8_openvino.xml')}" in capsys.readouterr().out


@needs_openvino
def test_export_page_offers_the_openvino_ir(workspace, digits_run):
    export.export_run(workspace, digits_run)
    at = ok(app("export"))
    at.selectbox(key="run_picker").set_value(digits_run).run()
    ok(at)
    labels = [b.label for b in at.get("download_button")]
    assert "Download int8 as OpenVINO IR (.zip)" in labels, labels


@needs_openvino
def test_where_openvino_defaults_to_f32_it_is_timed_once_and_labelled_so(workspace, digits_run, monkeypatch):
    monkeypatch.setattr(runtimes, "precision", lambda compiled: "f32")  # a CPU without bf16: the default is f32
    result = bench.bench_run(workspace, digits_run, batch_sizes=(1,), threads=(1,), warmup=0, iters=1)
    assert not any(r["backend"].startswith("ov_default") for r in result["rows"])
    names = list(report.runtime_frame(result)["runtime"])
    assert names[1:] == [f"OpenVINO {runtimes.version()} · f32 hint (also its default here)"]


@needs_openvino
def test_a_damaged_file_is_refused_with_what_to_do(tmp_path):
    from qat_core.errors import ExportError

    damaged = tmp_path / "int8.onnx"
    damaged.write_bytes(b"\x08\x07not onnx at all")
    with pytest.raises(ExportError, match=r"OpenVINO cannot read int8.onnx .*run `qat-studio export RUN` again"):
        runtimes.compile_model(damaged, 1)
