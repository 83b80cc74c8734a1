"""Runs in the app (issue 21 items 4, 5, 12): Start starts one run however often it is pressed, runs are
renamed and deleted on Compare, every label names the model, and Fine-tune says which model its results are."""

from __future__ import annotations

import pytest

from qat_core import planning, runner
from qat_core.store import RunStore
from tests.apptest import ROOT, AppTest, app, common, ok, wait_done
from tests.conftest import write_image_folder


@pytest.fixture(autouse=True)
def _workspace(workspace, monkeypatch):
    monkeypatch.setenv("QAT_STUDIO_HOME", str(workspace.root))


@pytest.fixture
def own_workspace(tmp_path, monkeypatch, workspace, digits_run):
    """An empty workspace for the pages, and ``fake(model, name)``: a finished run with a real config and the
    metrics of a real digits run (QAT 91.25%), made without training (labels and management need no weights)."""
    store = RunStore(tmp_path / "ws")
    monkeypatch.setenv("QAT_STUDIO_HOME", str(store.root))
    metrics = workspace.get(digits_run)["metrics"]

    def fake(model: str = "digits-cnn", name: str = "") -> str:
        run_id = store.create_run(runner.default_config(model).model_copy(update={"name": name}))
        store.update_metrics(run_id, **metrics | {"qat": metrics["qat"] | {"accuracy": 0.9125}})
        store.finish(run_id)
        return run_id

    return store, fake


def test_start_pressed_twice_starts_one_run(workspace, digits_run):
    """A second click that reaches the server before the page is redrawn (a busy server, a second tab on the
    same draft) finds the run the first started, and starts none."""
    at = ok(app("finetune"))
    at.number_input(key="ft_epochs").set_value(1.0)
    at.number_input(key="ft_base_epochs").set_value(20).run()  # the session's cached baseline (tests/conftest.py)
    stale = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)  # the page as the second click saw it
    stale.switch_page(common.PAGES["finetune"])
    stale.query_params[common.DRAFT_PARAM] = at.query_params[common.DRAFT_PARAM]
    ok(stale.run())
    assert not stale.button(key="start").disabled
    before = {r["id"] for r in workspace.list()}
    at.button(key="start").click().run()
    ok(at)
    first = at.query_params[common.RUN_PARAM]
    stale.button(key="start").click().run()
    ok(stale)
    new = {r["id"] for r in workspace.list()} - before
    assert new == {first}, new
    assert at.button(key="start").disabled  # this draft, as it is, started its run
    assert any(f"started run `{first}`" in c.value for c in at.caption)
    assert stale.button(key="start").disabled and any(f"started run `{first}`" in c.value for c in stale.caption)
    wait_done(workspace, first)
    at.text_input(key="ft_name").set_value("again").run()  # the draft changed: Start starts another
    assert not at.button(key="start").disabled


def test_pickers_name_the_model_and_show_accuracy_as_the_metrics_do(own_workspace):
    store, fake = own_workspace
    mobile, cnn = fake("torchvision:mobilenet_v3_small"), fake("digits-cnn", name="small one")
    at = ok(app("finetune"))
    options = at.selectbox(key=common.RUN_PICKER).options
    assert any(o.startswith("torchvision:mobilenet_v3_small · W8A8 · done · QAT 91.25%") and o.endswith(mobile)
               for o in options), options
    assert any(o.startswith("small one · digits-cnn · W8A8 · done · QAT 91.25%") and o.endswith(cnn) for o in options)
    compare = ok(app("compare"))
    summary = compare.dataframe[0].value.set_index("run")
    assert summary.loc[mobile, "model"] == "torchvision:mobilenet_v3_small" and summary.loc[cnn, "model"] == "digits-cnn"
    assert summary.loc[mobile, "name"] == "torchvision:mobilenet_v3_small · W8A8"
    assert summary.loc[cnn, "name"] == "small one"
    home = ok(app()).dataframe[0].value
    assert list(home.columns[:2]) == ["name", "model"]  # beside the name: read first, not cut off at 800 px
    assert set(home["model"]) == {"torchvision:mobilenet_v3_small", "digits-cnn"}


def test_finetune_says_when_its_results_are_another_model_than_its_draft(own_workspace):
    store, fake = own_workspace
    run_id = fake("digits-mlp")
    at = ok(app("finetune"))  # a new tab: its draft is digits-cnn, the run shown the newest (digits-mlp)
    assert at.expander[0].label == "New run from this tab's draft: digits-cnn · W8A8"
    assert any(c.value.startswith("Data: digits · all samples") for c in at.caption)  # before Start
    note = next(i.value for i in at.info if "not** this tab's draft" in i.value)
    assert f"run `{run_id}`" in note and "differ in model" in note and "digits-mlp · W8A8 · data: digits" in note

    # a draft that started the run shown: no warning, the run's settings stated
    store.save_draft(at.query_params[common.DRAFT_PARAM], store.config(run_id))
    at.run()
    ok(at)
    assert not any("not** this tab's draft" in i.value for i in at.info)
    assert any(c.value.startswith(f"Shown below: run `{run_id}`, with the settings of the draft above") for c in at.caption)


def test_runs_are_renamed_and_deleted_on_compare_and_pages_survive_it(own_workspace):
    store, fake = own_workspace
    keep, victim = fake(), fake("digits-mlp")
    fine = ok(app("finetune"))  # another page shows the run about to be deleted
    fine.selectbox(key=common.RUN_PICKER).set_value(victim).run()
    assert fine.query_params[common.RUN_PARAM] == victim

    at = ok(app("compare"))
    at.multiselect(key="compare_runs").set_value([keep, victim]).run()
    at.selectbox(key=common.MANAGE_PICKER).set_value(victim).run()
    at.text_input(key=f"rename_{victim}").set_value("to be deleted").run()
    at.button(key="rename_run").click().run()
    ok(at)
    assert store.get(victim)["name"] == "to be deleted" and store.config(victim).name == "to be deleted"
    assert any("is now named “to be deleted”" in s.value for s in at.success)
    assert at.dataframe[0].value.set_index("run").loc[victim, "name"] == "to be deleted"

    assert at.button(key="delete_run").disabled  # until the confirmation is ticked
    at.checkbox(key=f"confirm_delete_{victim}").check().run()
    at.button(key="delete_run").click().run()
    ok(at)
    assert [r["id"] for r in store.list()] == [keep] and not store.run_dir(victim).exists()
    assert any(f"Deleted run {victim}" in s.value for s in at.success)
    assert victim not in set(at.dataframe[0].value["run"])
    assert at.multiselect(key="compare_runs").value == [keep]

    ok(fine.run())  # the page that showed it shows another run, no exception
    assert fine.selectbox(key=common.RUN_PICKER).value == keep


def test_a_running_run_cannot_be_renamed_or_deleted_in_the_app(own_workspace):
    store, _ = own_workspace
    run_id = store.create_run(runner.default_config("digits-cnn"))  # this process's pid: running
    at = ok(app("compare"))
    assert at.button(key="rename_run").disabled and at.button(key="delete_run").disabled
    assert any("This run is running" in i.value for i in at.info)
    store.fail(run_id, "stopped")


def test_an_image_size_typed_while_the_default_plan_builds_is_the_one_trained(tmp_path, monkeypatch):
    """Issue 21 item 12: a size typed on Model & data was lost when the page was left while "Building the
    default plan…" ran (here: the build stopped, as Streamlit stops a script when its user moves on)."""
    from streamlit.runtime.scriptrunner_utils.exceptions import StopException

    folder = write_image_folder(tmp_path / "digits", classes=3, per_class=8, size=64)
    at = ok(app("model"))
    at.selectbox(key="zoo_model").set_value("resnet18").run()
    at.radio(key="data_source").set_value("image-folder").run()
    at.text_input(key="data_path").set_value(str(folder)).run()
    ok(at)
    did = at.query_params[common.DRAFT_PARAM]
    assert common.store().load_draft(did).data.image_size == 64  # the folder's own size

    def left_the_page(*args, **kwargs):
        raise StopException()

    monkeypatch.setattr(runner, "default_config", left_the_page)
    at.number_input(key="image_size").set_value(48).run()
    data = common.store().load_draft(did).data
    assert (data.image_size, str(data.path)) == (48, str(folder)) and data.resize_size >= 48


def test_sweep_plans_are_named_by_their_widths():
    """Issue 21 item 5: a uniform 8-bit plan read "W8A8, 4 layers differ", a uniform 2-bit one "W8A8, 4 layers W2A8"."""
    from qat_core import sweep
    from qat_core.prepare import layer_table
    from qat_core.zoo import build

    base = runner.default_config("digits-cnn")
    model, data = build("digits-cnn", base.data)
    rows = layer_table(model, data.example())
    spec = sweep.from_dict({"name": "widths", "base": base.to_dict(), "vary": {"weight_bits": [8, 4, 2]}})
    items = sweep.expand(spec, sweep.plan_variations(spec, rows, {}))
    assert [planning.plan_summary(i.config) for i in items] == ["W8A8", "W4A8", "W2A8"]
    assert [planning.default_name(i.config) for i in items][2] == "digits-cnn · W2A8"
