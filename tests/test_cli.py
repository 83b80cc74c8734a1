"""The command-line contract users script against."""

import json
import subprocess
import sys

import pytest
import yaml

from qat_core.cli import main


def cli(*args, workspace=None):
    cmd = [sys.executable, "-m", "qat_core.cli"] + (["--workspace", str(workspace)] if workspace else []) + list(args)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_models_lists_the_zoo(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for model_id in ("digits-cnn", "digits-mlp", "resnet18", "mobilenetv2", "transformer"):
        assert model_id in out


def test_config_init_then_train_then_show(tmp_path, capsys):
    assert main(["config", "init", "--model", "digits-cnn", "--weight-bits", "4", "--act-bits", "8"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["plan"]["default"]["weight_bits"] == 4
    config["baseline"]["epochs"] = 6
    config["finetune"]["epochs"] = 1
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))

    trained = cli("train", str(path), workspace=tmp_path / "ws")
    assert trained.returncode == 0, trained.stderr
    run_id = trained.stdout.strip().splitlines()[-1]
    assert "qat [" in trained.stderr  # the progress bar lives on stderr

    # the rest in this process (a new one costs seconds of imports): the same parser and handlers
    assert main(["--workspace", str(tmp_path / "ws"), "show", run_id, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["id"] == run_id and record["status"] == "done" and record["error"] is None
    assert record["path"].endswith(run_id)
    for phase in ("fp32", "ptq", "qat"):
        assert 0.5 < record["metrics"][phase]["accuracy"] <= 1.0
    assert record["config"]["plan"]["default"]["weight_bits"] == 4

    assert main(["--workspace", str(tmp_path / "ws"), "runs", "--json"]) == 0
    assert [r["id"] for r in json.loads(capsys.readouterr().out)] == [run_id]


def test_errors_are_one_line_on_stderr_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("plan: {default: {weight_bits: 9}}\n")
    result = cli("train", str(bad), workspace=tmp_path)
    assert result.returncode == 2
    assert "weight_bits: must be from 2 to 8 bits" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""

    missing = cli("show", "no-such-run", workspace=tmp_path / "ws")
    assert missing.returncode == 2 and "no run 'no-such-run'" in missing.stderr

    bits = cli("config", "init", "--model", "digits-cnn", "--weight-bits", "1")
    assert bits.returncode == 2 and "bits must be 2..8 or off" in bits.stderr


def test_workspace_from_the_environment(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QAT_STUDIO_HOME", str(tmp_path / "envws"))
    assert main(["runs"]) == 0
    assert (tmp_path / "envws" / "index.sqlite").exists()


def test_a_closed_pipe_is_not_a_traceback(tmp_path):
    """`qat-studio runs | head -0`: the reader is gone before anything is written."""
    proc = subprocess.Popen([sys.executable, "-m", "qat_core.cli", "--workspace", str(tmp_path / "ws"), "models"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and stderr == ""


def test_run_id_only_starts_a_run_nothing_has_trained(workspace, digits_run, tmp_path, capsys):
    before = workspace.get(digits_run)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(workspace.config(digits_run).to_dict()))
    code = main(["--workspace", str(workspace.root), "train", str(config), "--run-id", digits_run])
    err = capsys.readouterr().err
    assert code == 2 and f"run {digits_run} is done and already has results; --run-id only starts" in err
    assert workspace.get(digits_run) == before


def test_plugins_cannot_end_the_process_or_recurse(tmp_path, capsys, monkeypatch):
    (tmp_path / "quitter.py").write_text("import sys\n\ndef make():\n    sys.exit()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for plugin, message in [("quitter:make", "tried to end the process (SystemExit: None)"),
                            ("qat_core.cli:main", "is part of QAT Studio itself")]:
        config = tmp_path / "plugin.yaml"
        config.write_text(f"model: '{plugin}'\n")
        code = main(["--workspace", str(tmp_path / "ws"), "--allow-plugin", "quitter", "train", str(config), "--quiet"])
        assert code == 2 and message in capsys.readouterr().err
    from qat_core.store import RunStore

    runs = RunStore(tmp_path / "ws").list()
    assert [r["status"] for r in runs] == ["failed"]  # the allowed one failed; QAT Studio itself: refused, no run


def test_bad_checkpoints_and_mismatched_data_name_the_fix(tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    for body, message in [("model: digits-cnn\ncheckpoint: " + str(tmp_path / "ckpt"), "is a folder; give the file"),
                          ("model: resnet18\ndata: {dataset: digits}", "set data.dataset: generated-images")]:
        config = tmp_path / "c.yaml"
        config.write_text(body + "\n")
        assert main(["--workspace", str(tmp_path / "ws"), "train", str(config), "--quiet"]) == 2
        assert message in capsys.readouterr().err


def test_a_bug_is_one_line_with_the_way_to_its_traceback(monkeypatch, capsys):
    import qat_core.zoo

    monkeypatch.setattr(qat_core.zoo, "MODELS", None)  # `models` now fails inside QAT Studio
    assert main(["models"]) == 70
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("internal error: AttributeError") and "QAT_STUDIO_DEBUG=1" in err
    monkeypatch.setenv("QAT_STUDIO_DEBUG", "1")
    with pytest.raises(AttributeError):
        main(["models"])


def test_workspace_is_taken_after_the_subcommand_too(tmp_path, capsys):
    from qat_core.config import RunConfig
    from qat_core.store import RunStore

    here, there = RunStore(tmp_path / "here"), RunStore(tmp_path / "there")
    run_id = here.create_run(RunConfig(model="digits-cnn"))
    assert main(["runs", "--workspace", str(here.root), "--json"]) == 0  # before: "unrecognized arguments" (exit 2)
    assert [r["id"] for r in json.loads(capsys.readouterr().out)] == [run_id]
    assert main(["show", run_id, "--workspace", str(here.root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == run_id
    # both: the one after the subcommand wins, as a later option does
    assert main(["--workspace", str(there.root), "runs", "--workspace", str(here.root), "--json"]) == 0
    assert [r["id"] for r in json.loads(capsys.readouterr().out)] == [run_id]
