"""Every page, headless (streamlit.testing.v1.AppTest): widgets present, a plan edit validated on the server,
a digits fine-tune launched from the page that completes with curves and metrics, Cancel, error messages,
and the download payloads."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import yaml

from qat_core import export, planning
from qat_core.errors import ConfigError, QATError
from qat_core.store import RunStore
from tests.apptest import ROOT, AppTest, app, common, ok, wait_done


@pytest.fixture(autouse=True)
def _workspace(workspace, monkeypatch):
    """The pages use the tests' session workspace (shared with tests/conftest.py's runs)."""
    monkeypatch.setenv("QAT_STUDIO_HOME", str(workspace.root))


def plotly_specs(at: AppTest) -> list[dict]:
    return [json.loads(el.proto.spec) for el in at.get("plotly_chart")]


def draft_of(at: AppTest, workspace):
    return workspace.load_draft(at.query_params[common.DRAFT_PARAM])


# --- every page renders -------------------------------------------------------------------------
def test_home_tells_a_first_time_user_what_to_do():
    at = ok(app())
    assert at.title[0].value == "QAT Studio"
    assert at.button(key="quick_start").label.startswith("Quick start")


def test_model_page_shows_layers_and_params():
    at = ok(app("model"))
    assert at.selectbox(key="zoo_model").value == "digits-cnn"
    labels = {m.label for m in at.metric}
    assert {"Parameters", "Quantized layers"} <= labels and any(x.startswith("FP32 size (fp32.onnx") for x in labels)
    layers = at.dataframe[0].value
    assert "conv1.conv" in list(layers["name"])
    at.selectbox(key="zoo_model").select("digits-mlp").run()
    ok(at)
    assert "fc1.linear" in list(at.dataframe[0].value["name"])


def test_bad_plugin_path_is_a_message_not_a_traceback():
    at = ok(app("model"))
    at.radio(key="model_source").set_value("By name or path").run()
    assert any("Plugins allowed here: packages tests, tiny_plugin" in c.value for c in at.caption)
    at.text_input(key="plugin_path").input("tests.no_such_module:make").run()
    ok(at)
    assert any("cannot import plugin module 'tests.no_such_module'" in e.value for e in at.error)


def test_a_factory_the_user_did_not_allow_is_refused_on_every_page_it_arrives_by():
    """Typed on Model & data, in an imported config (Export) or a sweep spec (Sweep): the message at once."""
    at = ok(app("model"))
    at.radio(key="model_source").set_value("By name or path").run()
    at.text_input(key="plugin_path").input("os:abort").run()  # the app's process survives: nothing is called
    ok(at)
    assert any("'os:abort' is in Python's standard library" in e.value for e in at.error)
    at.text_input(key="plugin_path").input("strange.models:make").run()
    assert any("'strange.models:make' is not allowed" in e.value and "QAT_STUDIO_PLUGINS=strange" in e.value
               for e in at.error)
    config = b"model: strange.models:make\n"
    with pytest.raises(QATError, match="'strange.models:make' is not allowed"):
        common.parse_upload("c.yaml", config)
    with pytest.raises(QATError, match="'strange.models:make' is not allowed"):
        common.parse_spec_upload("s.yaml", b"name: s\nbase: {model: strange.models:make}\nvary: {seed: [0, 1]}\n")


def test_a_library_model_by_name_from_the_model_page(workspace):
    at = ok(app("model"))
    at.radio(key="model_source").set_value("By name or path").run()
    at.text_input(key="plugin_path").input("torchvision:mobilenet_v3_small").run()
    ok(at)
    config = draft_of(at, workspace)
    assert config.model == "torchvision:mobilenet_v3_small" and config.data.dataset == "generated-images"
    labels = {m.label for m in at.metric}
    assert {"Parameters", "Quantized layers", "Classes"} <= labels and "FP32 size (fp32.onnx, predicted)" in labels
    at.run()  # a rerun keeps the library model (it was reset to the zoo's first model)
    assert draft_of(at, workspace).model == "torchvision:mobilenet_v3_small"


def test_a_table_draft_works_on_plan_and_finetune(workspace, tmp_path):
    """A config for a table (made with `config init --data`, uploaded) is planned and fine-tuned in the app."""
    from qat_core import runner
    from tests.conftest import write_table

    csv = write_table(tmp_path / "t.csv")
    at = app("plan")
    config = runner.default_config("table-mlp", data={"path": str(csv), "label_column": "diagnosis"})
    common.save_draft(config, at.query_params[common.DRAFT_PARAM])
    for page in ("plan", "finetune", "model"):
        ok(at.switch_page(common.PAGES[page]).run())
        assert not at.error, [e.value for e in at.error]
    at.switch_page(common.PAGES["finetune"]).run()
    at.number_input(key="ft_batch").set_value(1000).run()  # the table's 427 training rows (43 held out to validate)
    assert any("1,000 is more than the 384 training samples (43 more are held out" in e.value for e in at.error), \
        [e.value for e in at.error]


def test_plan_edit_is_validated_on_the_server(workspace):
    at = ok(app("plan"))
    table = at.get("arrow_data_editor")[0] if at.get("arrow_data_editor") else None
    assert table is not None or at.session_state  # the editor renders (its proto type varies by version)
    size_before = next(m.value for m in at.metric if m.label.startswith("Size (int8.onnx"))
    assert not any("bit-packed" in c.value for c in at.caption)  # 8-bit weights: packing saves nothing
    rows = common.model_info("digits-cnn")["rows"]
    conv2 = [r["name"] for r in rows].index("conv2.conv")
    # an out-of-range width (the browser would block it; a seeded edit does not): rejected, not saved
    at.session_state[common.PLAN_EDITOR] = {"edited_rows": {conv2: {"weight_bits": 99}}, "added_rows": [],
                                            "deleted_rows": []}
    at.run()
    assert any("conv2.conv" in e.value and "99" in e.value for e in at.error), [e.value for e in at.error]
    assert "conv2.conv" not in draft_of(at, workspace).plan.overrides
    # weight bits on a layer without weights: rejected with the layer named
    at.session_state[common.PLAN_EDITOR] = {"edited_rows": {0: {"weight_bits": 4}}, "added_rows": [],
                                            "deleted_rows": []}
    at.run()
    assert any("input" in e.value and "no weights" in e.value for e in at.error)
    # a valid edit: saved to the draft, size updated
    at.session_state[common.PLAN_EDITOR] = {"edited_rows": {conv2: {"weight_bits": 4}}, "added_rows": [],
                                            "deleted_rows": []}
    at.run()
    ok(at)
    assert not at.error
    assert draft_of(at, workspace).plan.spec_for("conv2.conv").weight_bits == 4
    # int8.onnx stores a 4-bit weight in a byte: the file is no smaller, and the bit-packed size says what is
    assert next(m.value for m in at.metric if m.label.startswith("Size (int8.onnx")) == size_before
    assert any(c.value.endswith("KB bit-packed (not a file yet)") for c in at.caption)


def test_plan_grid_says_why_a_value_was_not_taken(workspace):
    """Issue 11: weight bits 1 and output-layer act bits 4 typed into the grid vanished without a word."""
    at = ok(app("plan"))
    rows = common.model_info("digits-cnn")["rows"]
    names = [r["name"] for r in rows]
    for edit, words in [({names.index("conv2.conv"): {"weight_bits": 1}}, "weight bits must be a whole number from 2"),
                        ({names.index("fc"): {"act_bits": 4}}, "fc is the model's output: its logits stay FP32")]:
        at.session_state[common.PLAN_EDITOR] = {"edited_rows": edit, "added_rows": [], "deleted_rows": []}
        at.run()
        assert any(words in e.value for e in at.error), [e.value for e in at.error]
    assert draft_of(at, workspace).plan == common.default_config("digits-cnn").plan  # nothing was saved


def test_a_preset_can_be_undone(workspace):
    at = ok(app("plan"))
    before = draft_of(at, workspace)
    at.button(key="preset_W4A4").click().run()
    assert draft_of(at, workspace).plan != before.plan
    at.button(key="undo_plan").click().run()
    ok(at)
    assert draft_of(at, workspace) == before and "undo_plan" not in [b.key for b in at.button]


@pytest.mark.parametrize(("key", "value", "message"), [
    ("ft_lr", "0", "must be greater than 0; got 0"),  # was launched with lr 0.001
    ("ft_lr", "fast", "must be a valid number"),
    ("ft_batch", 5000, "5,000 is more than the 1,212 training samples (135 more are held out to validate"),
    ("ft_epochs", -1.0, "must be greater than or equal to 0"),
])
def test_finetune_refuses_invalid_values_beside_the_control(workspace, key, value, message):
    at = ok(app("finetune"))
    widget = at.text_input(key=key) if key == "ft_lr" else at.number_input(key=key)
    widget.set_value(value).run()
    ok(at)
    assert any(message in e.value for e in at.error), [e.value for e in at.error]
    assert at.button(key="start").disabled
    assert draft_of(at, workspace).finetune == common.default_config("digits-cnn").finetune  # nothing saved


def test_a_w2a4_run_is_named_by_its_widths(workspace):
    config = common.default_config("digits-cnn")
    rows = common.model_info("digits-cnn")["rows"]
    w2a4 = planning.apply_preset(planning.apply_preset(config, rows, "W4A4"), rows, planning.FIRST_LAST_8)
    table = planning.plan_frame(rows, w2a4.plan)
    table.loc[table["layer"].isin(planning.weight_layers(rows)[1:-1]), "weight_bits"] = 2
    at = app("plan")
    common.save_draft(planning.plan_from_frame(w2a4, rows, table), at.query_params[common.DRAFT_PARAM])
    at.switch_page(common.PAGES["finetune"]).run()
    ok(at)
    assert at.expander[0].label.endswith("digits-cnn · W2A4, 2 layers W8A8"), at.expander[0].label


def test_plan_presets_change_the_draft(workspace):
    at = ok(app("plan"))
    at.button(key="preset_W4A4").click().run()
    ok(at)
    plan = draft_of(at, workspace).plan
    assert (plan.default.weight_bits, plan.default.act_bits) == (4, 4)
    at.button(key="preset_First/last at 8").click().run()
    plan = draft_of(at, workspace).plan
    assert plan.spec_for("conv1.conv").weight_bits == 8 and plan.spec_for("conv2.conv").weight_bits == 4


def test_finetune_launched_from_the_page_completes_with_curves_and_metrics(workspace, digits_run):
    at = ok(app("finetune"))
    at.number_input(key="ft_epochs").set_value(1.0)
    at.number_input(key="ft_base_epochs").set_value(20)  # the session's cached baseline (tests/conftest.py)
    at.text_input(key="ft_name").set_value("one epoch")
    at.button(key="start").click().run()
    ok(at)
    run_id = at.query_params[common.RUN_PARAM]
    assert workspace.get(run_id)["config"]["finetune"]["epochs"] == 1
    assert workspace.get(run_id)["config"]["name"] == "one epoch"
    if not workspace.events(run_id):  # still starting: stages, not "no step events" over empty axes
        assert any(p.proto.text.startswith("Stage 1 of 3") for p in at.get("progress")) and not plotly_specs(at)
    wait_done(workspace, run_id)  # the worker is a process: join it, then redraw (run_every never fires here)
    at.run()
    ok(at)
    labels = {m.label: m.value for m in at.metric}
    assert {"FP32 accuracy", "PTQ accuracy", "QAT accuracy", "Size (int8.onnx, predicted)",
            "Quantized layers"} <= set(labels)
    assert float(labels["QAT accuracy"].rstrip("%")) > 80
    spec = plotly_specs(at)[0]
    names = [t["name"] for t in spec["data"]]
    assert any("QAT" in n and "loss" in n for n in names) and any("test accuracy" in n for n in names), names
    assert any("int8 in ONNX Runtime: not measured yet" in md.value for md in at.markdown)  # the headline
    export.parity(workspace, run_id)  # what the Benchmark page runs: the deployed accuracy joins the headline
    at.run()
    assert any("in ONNX Runtime scores" in s.value and labels["QAT accuracy"] in s.value for s in at.success)


def test_cancel_reaches_the_user_as_a_message(workspace, digits_run):
    at = ok(app("finetune"))
    at.number_input(key="ft_epochs").set_value(200.0)
    at.number_input(key="ft_base_epochs").set_value(20)
    at.button(key="start").click().run()
    run_id = at.query_params[common.RUN_PARAM]
    t0 = time.monotonic()
    while not any(e.get("phase") == "qat" for e in workspace.events(run_id)):
        assert time.monotonic() - t0 < 60 and workspace.get(run_id)["status"] == "running"
        time.sleep(0.2)
    at.run()
    at.button(key="cancel").click().run()
    ok(at)
    assert wait_done(workspace, run_id, 60)["status"] == "cancelled"
    at.run()
    assert any("Cancelled at step" in w.value and "(fine-tune)" in w.value for w in at.warning)
    assert not at.exception


def test_inspect_shows_histograms_and_error_table(digits_run):
    at = ok(app("inspect"))
    at.selectbox(key="run_picker").set_value(digits_run).run()
    ok(at)
    titles = [s["layout"]["title"]["text"] for s in plotly_specs(at)]
    assert any("folded weights" in t for t in titles), titles
    assert any("SQNR" in t for t in titles), titles
    hist = next(s for s in plotly_specs(at) if "folded weights" in s["layout"]["title"]["text"])
    assert "weights (" in hist["layout"]["title"]["subtitle"]["text"]  # clipped: how many of how many, of what
    assert isinstance(hist["layout"]["yaxis"]["dtick"], int) and hist["layout"]["yaxis"]["dtick"] >= 1
    table = next(d.value for d in at.dataframe if "weights clipped" in d.value.columns)
    shares = [v for v in table["weights clipped"] if v != common.MISSING]
    assert shares and all(v.endswith("%") for v in shares), shares  # 9.03%, not 0.0903
    at.radio(key="hist_tensor").set_value("activation").run()
    ok(at)
    assert any("output activations" in s["layout"]["title"]["text"] for s in plotly_specs(at))


def test_inspect_sensitivity_of_150_layers_shows_the_top_30_then_all(workspace, digits_run, tmp_path, monkeypatch):
    import numpy as np

    root = tmp_path / "ws"  # its own copy: the shared workspace's run keeps no saved sensitivity
    shutil.copytree(workspace.root, root)
    rng = np.random.default_rng(0)
    rows = [{"layer": f"block{i}.conv", "bits": b, "loss_increase": float(rng.exponential(0.05)),
             "accuracy_drop": float(rng.exponential(0.01)), "rank": 0} for i in range(150) for b in (4, 2)]
    RunStore(root).write_result(digits_run, "sensitivity_page", rows)
    monkeypatch.setenv("QAT_STUDIO_HOME", str(root))
    at = ok(app("inspect"))
    at.selectbox(key="run_picker").set_value(digits_run).run()
    ok(at)

    def sensitivity() -> dict:
        return next(s for s in plotly_specs(at) if s["layout"]["title"]["text"].startswith("Sensitivity"))

    fig = sensitivity()
    assert len(fig["layout"]["yaxis"]["tickvals"]) == 30 and "30 most sensitive of 150" in \
        fig["layout"]["title"]["subtitle"]["text"]
    at.checkbox(key="sens_all").check().run()
    ok(at)
    fig = sensitivity()
    assert len(fig["layout"]["yaxis"]["tickvals"]) == 150 and fig["layout"]["height"] >= 150 * 18


def test_benchmark_exports_and_shows_parity_beside_latency(workspace, digits_run):
    at = ok(app("benchmark"))
    at.selectbox(key="run_picker").set_value(digits_run).run()
    at.button(key="bench_run").click().run()
    ok(at)
    labels = {m.label for m in at.metric}
    assert {"FP32 accuracy", "int8 accuracy (ORT)", "int8 speed-up", "Size (int8.onnx)", "File size cut",
            "Agreement", "Integer-kernel coverage"} <= labels, labels
    assert workspace.artifact(digits_run, "int8.onnx").exists()
    cpu_line = next(c.value for c in at.caption if "CPU:" in c.value)
    from qat_core import bench

    present = [f for f, on in bench.machine_info()["flags"].items() if on]
    absent = [f for f, on in bench.machine_info()["flags"].items() if not on]
    assert all(f in cpu_line for f in present) and not any(f"{f}," in cpu_line + "," for f in absent), cpu_line


def test_compare_lists_runs_and_draws_pareto(workspace, digits_run, digits_run_w4a4):
    at = ok(app("compare"))
    frame = at.dataframe[0].value
    assert {digits_run, digits_run_w4a4} <= set(frame["run"])
    at.multiselect(key="compare_runs").set_value([digits_run, digits_run_w4a4]).run()
    ok(at)
    titles = [s["layout"]["title"]["text"] for s in plotly_specs(at)]
    assert "Accuracy vs int8.onnx file size" in titles
    assert not any(c.get("plotly_chart") for c in at.columns)  # full width: no chart squeezed into a column
    size = next(s for s in plotly_specs(at) if s["layout"]["title"]["text"].startswith("Accuracy vs int8.onnx file size"))
    names = [t["name"] for t in size["data"] if t["mode"] == "markers"]
    assert len(names) == 2 and all(n[0] in "12" and "% · " in n and n.endswith(" KB") for n in names)
    fp32 = workspace.get(digits_run)["metrics"]["fp32"]["accuracy"] * 100
    assert [a["text"] for a in size["layout"]["annotations"] if a.get("xref") != "x"] == [f"FP32 {fp32:.2f}%"]


def test_compare_shows_a_named_run_its_settings_and_a_batch_64_benchmark(workspace, digits_run, tmp_path,
                                                                          monkeypatch):
    from qat_core import bench, runner
    from tests.conftest import quick_config

    root = tmp_path / "ws"  # its own workspace: other tests read the shared one's batch-1 benchmarks
    shutil.copytree(workspace.root / "baselines", root / "baselines")
    store = RunStore(root)
    named = runner.execute(quick_config(lr=5e-4, batch_size=32).model_copy(update={"name": "careful lr"}), store)
    bench.bench_run(store, named, batch_sizes=[64], threads=[1], warmup=1, iters=3)
    monkeypatch.setenv("QAT_STUDIO_HOME", str(root))
    at = ok(app("compare"))
    at.multiselect(key="compare_runs").set_value([named]).run()
    ok(at)
    column = next(d.value[named] for d in at.dataframe if named in d.value.columns)  # the side-by-side table
    assert column["name"] == "careful lr" and column["lr"] == "0.0005" and column["batch size"] == "32"
    assert column["epochs"] == "2" and column["at batch"] == "64"
    titles = [s["layout"]["title"]["text"] for s in plotly_specs(at)]
    assert "Accuracy vs int8 latency (ORT, batch 64)" in titles  # it said "No benchmarks yet"
    assert not any("No benchmarks yet" in i.value for i in at.info)


def test_export_page_offers_downloads(digits_run):
    at = ok(app("export"))
    labels = {b.label for b in at.get("download_button")}
    assert {"Download config (YAML)", "Download config (JSON)", "Download everything (.zip)"} <= labels
    at.button(key="build_report").click().run()
    ok(at)
    assert "Download HTML report" in {b.label for b in at.get("download_button")}


def test_an_onnx_file_that_is_not_a_file_is_a_message_not_a_blocked_page(workspace, digits_run, tmp_path, monkeypatch,
                                                                        fifo):
    root = tmp_path / "ws"
    shutil.copytree(workspace.run_dir(digits_run), root / "runs" / digits_run,
                    ignore=shutil.ignore_patterns("*.onnx", "analysis", "*.html"))
    fifo(root / "runs" / digits_run / "int8.onnx")  # the download read it to its end: it waited for a writer
    monkeypatch.setenv("QAT_STUDIO_HOME", str(root))
    at = ok(app("export", timeout=30))
    assert any("int8.onnx" in e.value and "is not a regular file" in e.value for e in at.error), at.error


# --- payload builders and upload parsing --------------------------------------------------------
def test_config_payloads_reproduce_the_run(workspace, digits_run):
    expected = workspace.config(digits_run).to_dict()
    assert yaml.safe_load(common.config_payload(digits_run, "yaml")) == expected
    assert json.loads(common.config_payload(digits_run, "json")) == expected
    assert common.parse_upload("x.yaml", common.config_payload(digits_run, "yaml")).to_dict() == expected


def test_report_download_is_the_engines_report(workspace, digits_run):
    """The Export page's HTML report is qat_core.report's (tested in tests/test_report.py), built on click."""
    run_id = workspace.create_run(workspace.config(digits_run))  # unfinished: a report without per-layer error
    workspace.fail(run_id, "stopped early")
    page = common.report_html(run_id).decode()
    assert page.startswith("<!DOCTYPE html>") and run_id in page and "stopped early" in page


@pytest.mark.parametrize(("name", "data", "message"), [
    ("model.pt", b"\x80\x04\x95 pickle bytes \xff", "not a text file"),
    ("c.yaml", b"finetune: {epochs: -1}", "finetune.epochs"),
    ("c.yaml", b"[1, 2]", "must be a mapping"),
    ("c.yaml", b"model: digits-cnn\nbogus: 1", "bogus: unknown key"),
    ("c.json", b"{not json", "not valid YAML/JSON"),
    ("big.yaml", b"\xff" * 1_500_000, r"big.yaml is 1.5 MB; a config file is at most 1 MB"),  # refused before decoding
])
def test_bad_uploads_are_clear_errors(name, data, message):
    with pytest.raises(ConfigError, match=message):
        common.parse_upload(name, data)
    assert issubclass(ConfigError, QATError)


def test_a_damaged_run_is_shown_as_damaged_and_hides_no_other(workspace, digits_run, tmp_path, monkeypatch):
    import shutil
    import sqlite3

    from qat_core.store import RunStore

    root = tmp_path / "ws"
    shutil.copytree(workspace.root, root, ignore=shutil.ignore_patterns("*.onnx", "analysis", "index.sqlite-*"))
    store = RunStore(root)
    victim = store.create_run(workspace.config(digits_run))
    store.fail(victim, "stopped")
    with sqlite3.connect(root / "index.sqlite") as db:
        db.execute("UPDATE runs SET metrics='{oops' WHERE id=?", (victim,))
    (root / "runs" / victim / "run.json").write_text("{oops")
    monkeypatch.setenv("QAT_STUDIO_HOME", str(root))

    home = ok(app())
    table = home.dataframe[0].value.set_index("run")
    assert table.loc[victim, "status"] == "damaged" and "index row is damaged" in table.loc[victim, "error"]
    assert len(table) == min(10, len(store.list())) and (table.drop(victim)["status"] != "damaged").all()
    assert home.dataframe[0].proto.placeholder == "—"  # missing numbers read "—", not Streamlit's "None"
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.switch_page(common.PAGES["finetune"])
    at.query_params[common.RUN_PARAM] = victim
    ok(at.run())
    assert any("Run damaged: its index row is damaged" in e.value for e in at.error)


def test_a_failed_export_reaches_the_user_as_a_message(workspace, digits_run, monkeypatch):
    from qat_core import export
    from qat_core.errors import ExportError

    def refuse(store, run_id):
        raise ExportError("layer conv2.conv: ONNX cannot express this op; keep it in float in the plan")

    monkeypatch.setattr(export, "export_run", refuse)
    at = ok(app("benchmark"))
    at.selectbox(key="run_picker").set_value(digits_run).run()
    at.button(key="bench_run").click().run()
    assert not at.exception
    assert any("ONNX cannot express this op" in e.value for e in at.error), [e.value for e in at.error]


def test_plan_offers_7bit_weights_on_a_cpu_without_vnni(workspace, monkeypatch):
    monkeypatch.setattr("qat_core.cpu.int8_weights_saturate", lambda: True)
    at = ok(app("plan"))
    at.button(key="preset_All 8-bit").click().run()
    assert any("no VNNI" in i.value for i in at.info)
    at.button(key="reduce_range").click().run()
    ok(at)
    assert draft_of(at, workspace).plan.default.weight_bits == 7
    assert not any("no VNNI" in i.value for i in at.info)
