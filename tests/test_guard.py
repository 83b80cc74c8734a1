"""A fine-tune that does no harm by default (issue 22, item 3): a validation split held out from the fine-tune's
training data, a guard that stops a diverging loss and rolls a harmful fine-tune back to its best point (weights
and quantizer parameters), and says so with advice wherever the run's remarks are shown."""

from __future__ import annotations

import pytest
import torch

from qat_core import data, report, summary, train
from qat_core import runner as runner_mod
from qat_core.cli import main
from qat_core.config import DataConfig, RunConfig
from tests.apptest import ROOT, AppTest, app, common, ok
from tests.conftest import small_base


@pytest.fixture(scope="module")
def too_high_lr(workspace) -> str:
    """digits-mlp (4 baseline epochs) fine-tuned at lr 0.03: before the guard, PTQ 93.78% → QAT 74.00%, "done"."""
    return runner_mod.execute(small_base(lr=0.03), workspace)


def _state(store, run_id: str, name: str) -> dict[str, torch.Tensor]:
    return store.load_state(run_id, name)


def test_a_too_high_learning_rate_is_rolled_back_to_the_ptq_start_with_advice(workspace, too_high_lr):
    record = workspace.get(too_high_lr)
    m = record["metrics"]
    assert record["status"] == "done"
    assert m["qat"]["accuracy"] >= m["ptq"]["accuracy"]  # it was 74.00% against 93.78%
    guard = m["guard"]
    assert guard["action"] in ("stopped", "rolled_back") and guard["kept_step"] == 0
    # rolled back whole: every weight, BatchNorm statistic and quantizer step is the PTQ model's
    ptq, qat = _state(workspace, too_high_lr, "ptq.pt"), _state(workspace, too_high_lr, "qat.pt")
    assert ptq.keys() == qat.keys() and all(torch.equal(ptq[k], qat[k]) for k in ptq)
    text = summary.guard_text(guard)
    assert "rolled back to the PTQ start (validation accuracy " in text
    assert "try a lower learning rate (0.003; it was 0.03)" in text
    # one message, wherever the run's remarks are read: the headline (Fine-tune, Benchmark, report, `show`)
    assert summary.Remark("warning", text) in report.run_headline(workspace, too_high_lr).remarks
    # and the events say so, with validation accuracy beside test accuracy at each evaluation
    events = workspace.events(too_high_lr)
    assert [e["guard"]["action"] for e in events if "guard" in e] == [guard["action"]]


def test_a_fine_tune_worse_on_the_validation_split_is_rolled_back_to_its_best_point(workspace, digits_run):
    """The guard's own bookkeeping, on a real calibrated model: a point no better than the start is not kept, and
    a model that ends worse on the validation split gets the start's weights and quantizer steps back."""
    loaded = runner_mod.load(workspace, digits_run)
    model, val = loaded.ptq, loaded.data.validation
    start = {k: v.clone() for k, v in model.state_dict().items()}
    guard = train.Guard(model, val, lr=0.01)
    assert guard.evaluated(5)["val_accuracy"] == guard.start["accuracy"]  # a tie: the start stays the best
    with torch.no_grad():
        for q in train.quantizers(model):
            if q.signed:
                q.scale.mul_(64)  # weights on a grid 64× too coarse: a fine-tune gone wrong
    assert guard.evaluated(10)["val_accuracy"] < guard.start["accuracy"] - summary.LOSS_TOLERANCE
    record = guard.finish(10)
    assert record["action"] == "rolled_back" and record["kept_step"] == 0
    assert all(torch.equal(start[k], v) for k, v in model.state_dict().items())
    text = summary.guard_text(record)
    assert text.startswith(f"The fine-tune made the held-out validation split worse (accuracy "
                           f"{summary.pct(record['start_val_accuracy'])} → {summary.pct(record['end_val_accuracy'])}")
    assert "rolled back to the PTQ start" in text and "(0.001; it was 0.01) or fewer epochs" in text


def test_show_and_the_fine_tune_page_say_what_the_guard_did(workspace, too_high_lr, monkeypatch, capsys):
    text = summary.guard_text(workspace.get(too_high_lr)["metrics"]["guard"])
    assert main(["--workspace", str(workspace.root), "show", too_high_lr]) == 0
    assert f"warning: {text}" in capsys.readouterr().out
    monkeypatch.setenv("QAT_STUDIO_HOME", str(workspace.root))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.switch_page(common.PAGES["finetune"])
    at.query_params[common.RUN_PARAM] = too_high_lr
    ok(at.run())
    assert any("rolled back to the PTQ start" in w.value for w in at.warning), [w.value for w in at.warning]


def test_an_exploding_loss_is_stopped_early_and_rolled_back(workspace):
    """lr 10 used to fail the run ("training diverged"): now it stops within a few steps at the PTQ start."""
    record = workspace.get(runner_mod.execute(small_base(lr=10.0), workspace))
    m = record["metrics"]
    assert record["status"] == "done" and m["qat"]["accuracy"] == m["ptq"]["accuracy"]
    guard = m["guard"]
    assert guard["action"] == "stopped" and guard["stopped_step"] <= train.LOSS_PATIENCE < guard["total"]
    assert guard["peak_loss"] is None or guard["peak_loss"] > train.loss_limit(guard["start_loss"], 10)
    text = summary.guard_text(guard)
    assert text.startswith("The fine-tune's loss ") and "so it was stopped at step" in text
    assert "rolled back to the PTQ start" in text and "try a lower learning rate (1; it was 10)" in text
    steps = [e for e in workspace.events(record["id"]) if e.get("phase") == "qat" and "step" in e]
    assert len(steps) == guard["stopped_step"]  # no step after the stop


def test_a_fine_tune_that_helps_is_kept(workspace, digits_run_w4a4):
    m = workspace.get(digits_run_w4a4)["metrics"]
    assert m["guard"]["action"] == "kept" and m["qat"]["accuracy"] > m["ptq"]["accuracy"]
    assert m["guard"]["end_val_accuracy"] >= m["guard"]["start_val_accuracy"]
    assert summary.guard_text(m["guard"]) is None


def test_without_the_guard_a_diverging_fine_tune_still_fails_the_run(workspace):
    from qat_core.errors import TrainingError

    with pytest.raises(TrainingError, match="training diverged"):
        runner_mod.execute(small_base(lr=10.0, guard=False), workspace)


def test_the_validation_split_is_held_out_from_all_training_stratified_and_fixed_by_the_seed():
    digits = data.digits(DataConfig())
    rest = data.hold_out(digits, 0.1, seed=0)
    val = rest.validation
    n = len(digits.train_y)
    assert abs(len(val.y) - data.validation_size(n, 0.1)) <= 5  # each of the 10 classes rounds its own share
    assert data.validation_size(n, 0.1) == round(0.1 * n) and len(rest.train_y) == n - len(val.y)
    # disjoint from what the fine-tune trains on and from the test split (digits has no duplicate images)
    train_rows = {tuple(r.tolist()) for r in rest.train_x.flatten(1)}
    val_rows = {tuple(r.tolist()) for r in val.x.flatten(1)}
    test_rows = {tuple(r.tolist()) for r in digits.test_x.flatten(1)}
    assert not val_rows & train_rows and not val_rows & test_rows
    assert torch.bincount(val.y, minlength=10).min() >= 10  # every class, about a tenth of it
    again = data.hold_out(digits, 0.1, seed=0)
    assert torch.equal(val.x, again.validation.x) and torch.equal(rest.train_x, again.train_x)
    assert not torch.equal(val.x, data.hold_out(digits, 0.1, seed=1).validation.x)
    assert torch.equal(rest.test_x, digits.test_x)  # the test split is untouched
    assert data.hold_out(digits, 0.0, seed=0) is digits  # 0: no split
    assert data.validation_size(10**6, 0.1) == data.MAX_VALIDATION_SAMPLES
    # a run's FP32 baseline trains without it too (its cached baseline is another), unless the guard is off
    config = runner_mod.default_config("digits-mlp")
    unguarded = config.model_copy(update={"finetune": config.finetune.model_copy(update={"guard": False})})
    assert runner_mod.baseline_key(config) != runner_mod.baseline_key(unguarded)
    assert torch.equal(runner_mod._build_fp32(config)[1].train_x, rest.train_x)
    assert runner_mod._build_fp32(unguarded)[1].validation is None


def test_configs_saved_before_the_guard_load_with_its_defaults():
    old = RunConfig().to_dict()
    for key in ("validation_fraction", "guard", "distill"):
        del old["finetune"][key]
    ft = RunConfig.model_validate(old).finetune
    assert (ft.validation_fraction, ft.guard, ft.distill) == (0.1, True, False)
    from qat_core.config import from_dict
    from qat_core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"finetune.validation_fraction: must be less than 1"):
        from_dict(old | {"finetune": old["finetune"] | {"validation_fraction": 1.0}})


def test_distillation_from_the_fp32_model_trains_a_w4a4_model(workspace, digits_run_w4a4):
    """The loss is the labels' cross-entropy and the KL from the FP32 model's softened outputs, half each."""
    config = workspace.config(digits_run_w4a4)
    config = config.model_copy(update={"finetune": config.finetune.model_copy(update={"distill": True})})
    run_id = runner_mod.execute(config, workspace)
    m = workspace.get(run_id)["metrics"]
    assert m["qat"]["accuracy"] >= m["ptq"]["accuracy"] and m["guard"]["action"] == "kept"
    plain, distilled = _state(workspace, digits_run_w4a4, "qat.pt"), _state(workspace, run_id, "qat.pt")
    assert any(not torch.equal(plain[k], distilled[k]) for k in plain)  # the same run but for the teacher
    logits, labels = torch.randn(8, 10), torch.arange(8)
    same = train.distill_loss(torch.nn.Identity())(logits, logits, labels)  # a teacher that agrees: the KL term is 0
    assert torch.allclose(same, 0.5 * torch.nn.functional.cross_entropy(logits, labels))


def test_the_fine_tune_form_sets_the_guard_and_distillation(workspace, monkeypatch):
    monkeypatch.setenv("QAT_STUDIO_HOME", str(workspace.root))
    at = ok(app("finetune"))
    assert at.checkbox(key="ft_guard").value and not at.checkbox(key="ft_distill").value  # the defaults
    at.checkbox(key="ft_distill").check().run()
    at.checkbox(key="ft_guard").uncheck().run()
    ft = workspace.load_draft(ok(at).query_params[common.DRAFT_PARAM]).finetune
    assert ft.distill and not ft.guard
