"""The command-line contract users script against."""

import json
import subprocess
import sys

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


def test_config_init_then_train_then_show(tmp_path):
    init = cli("config", "init", "--model", "digits-cnn", "--weight-bits", "4", "--act-bits", "8")
    assert init.returncode == 0, init.stderr
    config = yaml.safe_load(init.stdout)
    assert config["plan"]["default"]["weight_bits"] == 4
    config["baseline"]["epochs"] = 6
    config["finetune"]["epochs"] = 1
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))

    trained = cli("train", str(path), workspace=tmp_path / "ws")
    assert trained.returncode == 0, trained.stderr
    run_id = trained.stdout.strip().splitlines()[-1]
    assert "qat [" in trained.stderr  # the progress bar lives on stderr

    show = cli("show", run_id, "--json", workspace=tmp_path / "ws")
    record = json.loads(show.stdout)
    assert record["id"] == run_id and record["status"] == "done" and record["error"] is None
    assert record["path"].endswith(run_id)
    for phase in ("fp32", "ptq", "qat"):
        assert 0.5 < record["metrics"][phase]["accuracy"] <= 1.0
    assert record["config"]["plan"]["default"]["weight_bits"] == 4

    runs = json.loads(cli("runs", "--json", workspace=tmp_path / "ws").stdout)
    assert [r["id"] for r in runs] == [run_id]


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
