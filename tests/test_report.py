"""Runs as tables and a run as a self-contained HTML report (qat_core.report, `qat-studio report`)."""

from __future__ import annotations

import base64
import math
import os
import re
import stat

import pytest

from qat_core import plots, report, summary
from qat_core.cli import main
from qat_core.errors import StoreError


def test_report_of_a_finished_run_is_self_contained(workspace, digits_run):
    page = report.report_html(workspace, digits_run).decode("utf-8")
    assert page.startswith("<!DOCTYPE html>") and digits_run in page
    m = workspace.get(digits_run)["metrics"]
    for stage in ("fp32", "ptq", "qat"):  # the accuracy table, in percent with two decimals
        assert f"{m[stage]['accuracy'] * 100:.2f}" in page
    assert f"Size: <b>{summary.run_size(m).text()}</b>" in page  # the file, or its prediction before export
    for heading in ("Accuracy", "Training curves", "Per-layer error (after fine-tune)", "Layer plan", "Config"):
        assert f"<h2>{heading}</h2>" in page
    assert "conv2.conv" in page and "weight SQNR (dB)" in page  # the per-layer error table
    assert page.count(plots.plotly_js()) == 1  # plotly.js inlined once, shared by every figure
    assert page.count('class="plotly-graph-div"') == 2  # training curves, SQNR
    assert not re.search(r"<script[^>]*\ssrc\s*=", page)  # nothing fetched from elsewhere
    assert "model: digits-cnn" in page  # the config, as YAML


def _text(page: str) -> str:
    """The page without its scripts (plotly.js and the figures' data): what people read."""
    return re.sub(r"<script.*?</script>", "", page, flags=re.S)


def test_report_reads_as_people_expect_and_fits_an_a4_page(workspace, digits_run):
    from qat_core import analysis, config, runner

    page = report.report_html(workspace, digits_run).decode("utf-8")
    text = _text(page)
    assert "<NA>" not in text and "&lt;NA&gt;" not in text and ">nan<" not in text.lower()
    words = re.sub(r"<[^>]+>", " ", text)  # the text itself, without the tags' ids and links
    assert not re.search(r"\d\.?\d*e[+-]\d", words), re.search(r".{80}\d\.?\d*e[+-]\d.{20}", words)  # no 1.869e+04
    errors = analysis.error_table(runner.load(workspace, digits_run), "qat").set_index("layer")
    conv3 = errors.loc["conv3.conv"]
    assert f"<td class=\"num\">{summary.size_text(conv3['size_bytes'])}</td>" in page  # "18.2 KB", not bytes
    assert f"<td class=\"num\">{plots.share_text(conv3['weight_share_clipped'])}</td>" in page  # a percentage
    # the per-layer table: the columns that fit a page, the rest in a detail block; no network row in it
    main_table = text.split("<h2>Per-layer error (after fine-tune)</h2>")[1].split("<details>")[0]
    heads = re.findall(r"<th>(.*?)</th>", main_table)
    assert heads == [report.ERROR_HEADERS[c] for c in report.REPORT_ERROR_COLUMNS[:-1]] + ["weights size"]
    assert "(network)" not in main_table
    assert "granularity" in text.split("<details>")[1] and "against the FP32 baseline" in main_table
    assert "@page{size:A4" in page and "@media print" in page and "thead{display:table-header-group}" in page
    assert page.count('<div class="wide"><table>') >= 3  # every table scrolls in its box instead of running off
    # the config: the file the link saves is the file the command names, and it trains the same run
    name = report.config_file_name(workspace.config(digits_run))
    link = re.search(r'<a download="([^"]+)" href="data:application/x-yaml;base64,([^"]+)">', page)
    assert link and link.group(1) == name and f"<code>qat-studio train {name}</code>" in page
    assert config.parse(base64.b64decode(link.group(2)).decode("utf-8"), name) == workspace.config(digits_run)
    assert "train config.yaml" not in page


@pytest.fixture(scope="module")
def measured_failed_run(workspace, digits_run) -> str:
    """A failed run (no models: its report is quick) with made-up benchmark and parity results."""
    run_id = workspace.create_run(workspace.config(digits_run))
    workspace.fail(run_id, "stopped <early>")
    workspace.write_result(run_id, "bench", {
        "rows": [{"backend": "ort_int8", "batch": 1, "threads": 1, "median_ms": 0.25, "p90_ms": 0.3, "p99_ms": 0.4,
                  "throughput": 4000.0},
                 {"backend": "ort_fp32", "batch": 1, "threads": 1, "median_ms": 0.5, "p90_ms": 0.6, "p99_ms": 0.7,
                  "throughput": 2000.0}],
        "comparisons": [{"batch": 1, "threads": 1, "speedup": 2.0, "overhead_bound": False}],
        "machine": {"cpu": "Test CPU", "cores": 2, "flags": {"avx2": True, "vnni": False}}})
    workspace.write_result(run_id, "parity", {"accuracy": 0.9, "sim_accuracy": 0.91, "agreement": 0.98,
                                              "max_logit_diff": 0.01, "integer_layers": ["conv1.conv"],
                                              "float_layers": {"gap": "no integer kernel"}})
    workspace.update_metrics(run_id, bench={"speedup": 2.0})
    return run_id


def test_report_adds_benchmark_and_parity_when_measured(workspace, measured_failed_run):
    run_id = measured_failed_run
    page = report.report_html(workspace, run_id).decode("utf-8")
    assert "stopped &lt;early&gt;" in page  # the error, escaped
    assert "Per-layer error" not in page and "plotly-graph-div" not in page  # unfinished: no models to measure
    assert "<b>2.00×</b>" in page and "Test CPU" in page and "avx2" in page
    assert "1/2 layers" in page and "gap: no integer kernel" in page
    # parity in percent, beside the accuracies (not 0.98 beside 90.00%)
    for label, value in (("ORT int8 accuracy", "90.00%"), ("evaluated accuracy", "91.00%"),
                         ("top-1 agreement", "98.00%")):
        assert f"<tr><th>{label}</th><td>{value}</td></tr>" in page
    assert "<td>4,000</td>" not in page and "<td class=\"num\">4,000</td>" in page  # throughput, no 4e+03
    frame = report.runs_frame(workspace, [workspace.get(run_id)])
    assert frame.loc[0, "int8 latency ms"] == 0.25 and frame.loc[0, "fp32 latency ms"] == 0.5
    assert math.isnan(frame.loc[0, "QAT acc %"]) and frame.loc[0, "error"] == "stopped <early>"


def test_runs_frame_and_pareto(workspace, digits_run, digits_run_w4a4):
    frame = report.runs_frame(workspace)
    assert {digits_run, digits_run_w4a4} <= set(frame["run"])
    row = frame.set_index("run").loc[digits_run_w4a4]
    assert row["plan"].startswith("W4A4") and row["status"] == "done" and row["QAT acc %"] > 50
    assert report.latency_ms(None) is None and report.float_reasons(["fc"]) == {"fc": "runs in float"}
    fig = plots.runs_pareto_figure(frame, "size KB", "Accuracy vs model size")
    assert fig.layout.title.text == "Accuracy vs model size"
    names = [t.name for t in fig.data]
    assert names[0].startswith("Pareto front") and any(re.match(r"\d+\. digits-cnn · W4A4", n) for n in names)


def test_cli_report_writes_the_file(workspace, digits_run, measured_failed_run, tmp_path, capsys):
    assert main(["--workspace", str(workspace.root), "report", digits_run]) == 0
    default = workspace.artifact(digits_run, report.REPORT_FILE)
    assert capsys.readouterr().out.strip() == str(default)
    assert digits_run in default.read_text(encoding="utf-8")
    out = tmp_path / "r.html"
    assert main(["--workspace", str(workspace.root), "report", measured_failed_run, "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert out.read_bytes().startswith(b"<!DOCTYPE html>") and measured_failed_run.encode() in out.read_bytes()
    assert not list(out.parent.glob(".*.tmp"))  # written atomically: no temporary left behind
    assert main(["--workspace", str(workspace.root), "report", "nope"]) == 2
    assert "no run 'nope'" in capsys.readouterr().err
    with pytest.raises(StoreError):
        report.report_html(workspace, "nope")


def test_the_deployed_accuracy_stands_beside_the_evaluated_one(workspace, digits_run):
    from qat_core.export import parity

    result = parity(workspace, digits_run)
    row = report.runs_frame(workspace, [workspace.get(digits_run)]).iloc[0]
    assert row["ORT int8 acc %"] == round(result["accuracy"] * 100, 2) == row["QAT acc %"]
    page = report.report_html(workspace, digits_run).decode("utf-8")
    assert "int8 in ONNX Runtime (deployed)" in page and "differs from the evaluation" not in page
    assert report.deployed({"qat": {"accuracy": 0.9}}) is None  # not measured yet
    differs = report.deployed({"parity": {"accuracy": 0.88, "sim_accuracy": 0.9, "agreement": 0.97,
                                          "explanation": "`conv2` differs"}})
    assert differs == {"accuracy": 0.88, "evaluated": 0.9, "same": False, "why": "`conv2` differs"}


@pytest.mark.parametrize("kind", ["device", "fifo", "directory", "missing folder"])
def test_cli_report_writes_only_a_regular_file_in_an_existing_folder(kind, workspace, digits_run, tmp_path, capsys):
    """As root, `report -o /dev/full` used to rename the HTML over the device node, and a mistyped folder
    was created."""
    out = tmp_path / "out"
    if kind == "device":
        if os.geteuid() != 0:
            pytest.skip("making a device node needs root")
        os.mknod(out, 0o666 | stat.S_IFCHR, os.makedev(1, 7))  # what /dev/full is
    elif kind == "fifo":
        os.mkfifo(out)
    elif kind == "directory":
        out.mkdir()
    else:
        out = tmp_path / "no" / "such" / "r.html"
    before = out.lstat().st_mode if out.exists() else None
    assert main(["--workspace", str(workspace.root), "report", digits_run, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    expected = {"device": "is not a regular file (a device, pipe or socket); give a file name for the report",
                "fifo": "is not a regular file (a device, pipe or socket); give a file name for the report",
                "directory": "is a directory; give a file name for the report",
                "missing folder": f"the folder {tmp_path / 'no' / 'such'} does not exist; create it first"}[kind]
    assert expected in err, err
    if before is None:
        assert not (tmp_path / "no").exists()  # no folder made
    else:
        assert out.lstat().st_mode == before  # the node is still what it was
    assert not list(tmp_path.rglob("*.tmp"))
