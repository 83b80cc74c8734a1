"""Code runs only by the user's choice: a config naming a model factory runs it only when the user allowed
it (--allow-plugin, QAT_STUDIO_PLUGINS, an entry point in group qat_studio.models); the standard library
and QAT Studio are never factories; a factory cannot hang, read stdin or end the process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from qat_core import config as cfg
from qat_core import plugins, runner, zoo
from qat_core.cli import main
from qat_core.config import DataConfig
from qat_core.errors import PluginError
from qat_core.store import RunStore

ROOT = Path(__file__).resolve().parents[1]
FACTORY = """
import torch
from torch import nn


def make():
    x, y = torch.randn(64, 4), torch.arange(64) % 2
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), [(x[:32], y[:32]), (x[32:], y[32:])], [(x, y)]
"""


def write_package(root: Path, name: str, body: str = "") -> Path:
    """A package ``name`` under ``root`` whose ``models`` module has ``make`` (a working factory) and ``body``."""
    package = root / name
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "models.py").write_text(FACTORY + textwrap.dedent(body))
    return root


@pytest.fixture
def packages(tmp_path, monkeypatch):
    """tmp_path on sys.path and PYTHONPATH (for the CLI's subprocesses); only the suite's own plugins allowed."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), str(ROOT)]))
    monkeypatch.setenv(plugins.ALLOW_ENV, "tests,tiny_plugin")
    return tmp_path


def cli(*args: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qat_core.cli", *args], capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def test_a_factory_the_user_did_not_allow_is_refused_before_it_is_imported(packages, tmp_path, capsys):
    write_package(packages, "strange", 'import pathlib\npathlib.Path(__file__).with_name("RAN").write_text("x")\n')
    config = tmp_path / "c.yaml"
    config.write_text("model: strange.models:make\n")
    assert cfg.load(config).model == "strange.models:make"  # a config is data: it still loads
    code = main(["--workspace", str(tmp_path / "ws"), "train", str(config), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "plugin 'strange.models:make' is not allowed" in err
    assert "--allow-plugin strange" in err and "QAT_STUDIO_PLUGINS=strange" in err and "qat_studio.models" in err
    assert not (packages / "strange" / "RAN").exists() and "strange.models" not in sys.modules
    assert RunStore(tmp_path / "ws").list() == []  # refused before a run is recorded
    with pytest.raises(PluginError, match="is not allowed"):
        runner.launch(cfg.load(config), RunStore(tmp_path / "ws"))  # the app's way: refused before the worker
    assert RunStore(tmp_path / "ws").list() == []


@pytest.mark.parametrize("factory", ["os:abort", "builtins:input", "code:interact", "json:loads",
                                     "qat_core.cli:main"])
def test_the_standard_library_and_qat_studio_are_never_factories(factory, packages, monkeypatch):
    monkeypatch.setenv(plugins.ALLOW_ENV, "os,builtins,code,json,qat_core")  # even allowed
    with pytest.raises(PluginError, match="standard library|part of QAT Studio itself"):
        zoo.build(factory, DataConfig())


def test_allowed_by_option_before_or_after_the_command_or_by_the_environment(packages, monkeypatch):
    write_package(packages, "mine")
    init = ["config", "init", "--model", "mine.models:make"]
    refused = cli(*init)
    assert refused.returncode == 2 and "--allow-plugin mine" in refused.stderr
    for args in (["--allow-plugin", "mine", *init], [*init, "--allow-plugin", "other", "--allow-plugin", "mine"]):
        done = cli(*args)
        assert done.returncode == 0, done.stderr
        assert cfg.parse(done.stdout).model == "mine.models:make"
    monkeypatch.setenv(plugins.ALLOW_ENV, "other, mine")
    assert cli(*init).returncode == 0


def test_an_installed_entry_point_allows_its_factory(packages):
    write_package(packages, "shipped")
    dist = packages / "shipped_models-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: shipped-models\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[qat_studio.models]\ntiny = shipped.models:make\n")
    assert plugins.entry_points() == {"shipped.models:make": "tiny (shipped-models)"}
    model, data = zoo.build("shipped.models:make", DataConfig())
    assert data.num_classes == 2
    assert "entry points shipped.models:make" in plugins.describe()
    with pytest.raises(PluginError, match="not allowed"):  # only the declared factory, not its neighbours
        zoo.build("shipped.other:make", DataConfig())


def test_a_factory_that_does_not_return_is_stopped_at_its_time_limit(packages, monkeypatch):
    write_package(packages, "slow", "def hang():\n    import time\n    time.sleep(60)\n")
    monkeypatch.setenv(plugins.ALLOW_ENV, "slow")
    monkeypatch.setenv(plugins.TIMEOUT_ENV, "1")
    started = time.monotonic()
    with pytest.raises(PluginError, match=r"slow.models:hang did not return within 1 s; .*QAT_STUDIO_PLUGIN_TIMEOUT"):
        zoo.build("slow.models:hang", DataConfig())
    assert time.monotonic() - started < 30


@pytest.mark.parametrize(("body", "message"), [
    ("def bad():\n    raise GeneratorExit('stop')\n", r"faulty\w*.models:bad raised GeneratorExit: stop"),
    ("def bad():\n    raise SystemExit(3)\n", r"tried to end the process \(SystemExit: 3\)"),
    ("def bad():\n    m, tr, te = make()\n    return m, iter(tr), te\n", r"train_loader has no length \(TypeError"),
    ("class Bad(nn.Module):\n    def forward(self, x):\n        raise ValueError('wrong shape')\n\n"
     "def bad():\n    m, tr, te = make()\n    return Bad(), tr, te\n",
     r"its model's forward fails on a batch of its own train_loader \(ValueError: wrong shape\)"),
])
def test_a_plugins_faults_are_plugin_errors(body, message, packages, monkeypatch):
    name = "faulty_" + re.sub(r"\W", "_", packages.name)  # one module per case: imports are cached
    write_package(packages, name, body)
    monkeypatch.setenv(plugins.ALLOW_ENV, name)
    with pytest.raises(PluginError, match=message):
        zoo.build(f"{name}.models:bad", DataConfig())


def test_a_bad_time_limit_is_named(packages, monkeypatch):
    monkeypatch.setenv(plugins.TIMEOUT_ENV, "soon")
    with pytest.raises(Exception, match="QAT_STUDIO_PLUGIN_TIMEOUT must be a number of seconds above 0, got 'soon'"):
        zoo.build("tiny_plugin:make", DataConfig())


@pytest.mark.parametrize(("body", "expected"), [
    # os._exit(0) in a factory: no silent exit 0 without a run id
    ("def go():\n    import os\n    os._exit(0)\n", r"tried to end the process \(os._exit\(0\)\)"),
    ("def go():\n    import os\n    try:\n        os._exit(0)\n    except BaseException:\n        return make()\n",
     r"tried to end the process \(os._exit\(0\)\)"),
    # a prompt in a factory: stdin is /dev/null, so it reads end-of-file at once (stdin is a pipe never closed)
    ("def go():\n    input('continue? ')\n    return make()\n", r"raised EOFError"),
])
def test_a_factory_cannot_end_the_process_or_wait_for_stdin(body, expected, packages):
    write_package(packages, "rude", body)
    with subprocess.Popen([sys.executable, "-m", "qat_core.cli", "--allow-plugin", "rude", "config", "init",
                           "--model", "rude.models:go"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        try:
            proc.wait(timeout=120)  # its stdin stays open, never written
        finally:
            proc.kill()
        err = proc.stderr.read()
    assert proc.returncode == 2 and re.search(expected, err), err


def test_a_plugins_non_daemon_thread_does_not_keep_a_finished_command_alive(packages):
    write_package(packages, "lingering", "def go():\n    import threading, time\n"
                                         "    threading.Thread(target=time.sleep, args=(3600,)).start()\n"
                                         "    return make()\n")
    done = cli("--allow-plugin", "lingering", "config", "init", "--model", "lingering.models:go", timeout=120)
    assert done.returncode == 0 and cfg.parse(done.stdout).model == "lingering.models:go"


def test_a_plugins_model_that_fails_while_training_is_a_plugin_error(packages, tmp_path, monkeypatch, capsys):
    write_package(packages, "flaky", """
        class Flaky(nn.Module):
            def __init__(self):
                super().__init__()
                self.body, self.calls = nn.Linear(4, 2), 0

            def forward(self, x):
                self.calls += 1
                if self.calls > 1:  # the first call (QAT Studio's check when loading it) passes
                    raise RuntimeError("sensor offline")
                return self.body(x)

        def go():
            m, tr, te = make()
            return Flaky(), tr, te
        """)
    config = tmp_path / "c.yaml"
    config.write_text("model: flaky.models:go\nbaseline: {epochs: 1}\nfinetune: {epochs: 1}\n")
    code = main(["--workspace", str(tmp_path / "ws"), "--allow-plugin", "flaky", "train", str(config), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "plugin flaky.models:go: its code raised RuntimeError: sensor offline (at " in err
    assert "flaky/models.py" in err and "bug in QAT Studio" not in err
    [run] = RunStore(tmp_path / "ws").list()
    assert run["status"] == "failed" and "sensor offline" in run["error"] and "internal error" not in run["error"]
