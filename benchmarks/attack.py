"""Hostile inputs against the command line: what a config, a folder, a workspace or the environment can do.

Each case runs ``qat-studio`` in its own process, as a user would, under a wall-clock limit and a memory
limit, and is classed by what happened:

- ``refused``: exit 2 with an ``error:`` line and no traceback, and the case's own check holds;
- ``ok``: exit 0 where the input is legitimate, and the check holds;
- ``exit70``: "internal error" for something that is the user's fault;
- ``traceback``: a Python traceback on the terminal;
- ``hang``: still running at the limit (killed);
- ``wrong``: a status or an outcome that lies (exit 0 for a failed sweep, a device replaced, a folder made);
- ``security``: code ran that the user never chose to run (a marker file written, the process aborted).

    python benchmarks/attack.py            # every case, a table, totals
    python benchmarks/attack.py -k plugin  # the cases whose name holds "plugin"

Exit status: 1 if any case is security, hang, traceback, exit70 or wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

LIMIT_S = 60.0
MEMORY_BYTES = 6 << 30  # a read of /dev/zero must stop long before this
BAD = ("security", "hang", "traceback", "exit70", "wrong")


@dataclass
class Outcome:
    rc: int | None
    out: str
    err: str
    seconds: float


@dataclass
class Case:
    name: str
    # (tmp folder, workspace) -> argv after "qat-studio", and extra environment
    setup: Callable[[Path, Path], tuple[list[str], dict[str, str]]]
    expect: str = "refused"  # or "ok", or "shown" (exit 0 showing the damage, or a refusal)
    check: Callable[[Path, Outcome], str | None] = lambda tmp, o: None  # a problem, or None
    stdin: bytes | None = None  # None: a pipe that stays open and silent
    limit: float = LIMIT_S
    needs_run: bool = False
    tags: list[str] = field(default_factory=list)


def _limit_memory() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))
    os.setsid()


def run_cli(argv: list[str], env: dict[str, str], stdin: bytes | None, limit: float, cwd: Path) -> Outcome:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env}
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out_f, tempfile.TemporaryFile() as err_f:
        proc = subprocess.Popen([sys.executable, "-m", "qat_core.cli", *argv], stdin=subprocess.PIPE,
                                stdout=out_f, stderr=err_f, env=full_env, cwd=cwd, preexec_fn=_limit_memory)
        if stdin is not None:
            proc.stdin.write(stdin)
            proc.stdin.flush()
        try:  # stdin stays open and silent, as a terminal no one types in: a prompt waits until the limit
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
        proc.stdin.close()
        out_f.seek(0)
        err_f.seek(0)
        out, err = out_f.read(), err_f.read()
    return Outcome(rc, out.decode(errors="replace"), err.decode(errors="replace"), time.perf_counter() - start)


def classify(case: Case, tmp: Path, o: Outcome) -> tuple[str, str]:
    if (tmp / "PWNED").exists():
        return "security", (tmp / "PWNED").read_text()[:80]
    if o.rc is None:
        return "hang", f"killed after {case.limit:.0f} s"
    if o.rc < 0 and o.rc == -signal.SIGABRT:
        return "security", "the process was aborted by a name in a config"
    if "Traceback (most recent call last)" in o.err + o.out:
        return "traceback", o.err.strip().splitlines()[-1][:120]
    if o.rc == 70:
        return "exit70", o.err.strip()[:120]
    problem = case.check(tmp, o)
    if case.expect == "refused" and o.rc != 2:
        return "wrong", f"exit {o.rc}, expected a refusal (2): {o.err.strip()[-120:]}"
    if case.expect == "shown" and o.rc not in (0, 2):
        return "wrong", f"exit {o.rc}: {o.err.strip()[-120:]}"
    if case.expect == "ok" and o.rc != 0:
        return "wrong", f"exit {o.rc}: {o.err.strip()[-120:]}"
    if problem:
        return "wrong", problem
    last = (o.err.strip().splitlines() or [""])[-1]
    return ("ok" if o.rc == 0 else "refused") if case.expect == "shown" else case.expect, last[:120]


# --- building blocks --------------------------------------------------------------------------------


def base_config(model: str = "digits-mlp", **changes) -> dict:
    proc = subprocess.run([sys.executable, "-m", "qat_core.cli", "config", "init", "--model", "digits-mlp"],
                          capture_output=True, text=True, check=True)
    data = yaml.safe_load(proc.stdout)
    data["model"] = model
    data["baseline"] |= {"epochs": 2}
    data["finetune"] |= {"epochs": 1, "calibration_batches": 1}
    for key, value in changes.items():
        data[key] = value if not isinstance(value, dict) else data.get(key, {}) | value
    return data


_BASE: dict | None = None


def config_file(tmp: Path, model: str = "digits-mlp", **changes) -> str:
    global _BASE
    if _BASE is None:
        _BASE = base_config()
    data = json.loads(json.dumps(_BASE)) | {"model": model}
    for key, value in changes.items():
        data[key] = value if not isinstance(value, dict) else data[key] | value
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def plugin(tmp: Path, body: str, name: str = "userplug") -> str:
    """A module ``name`` in tmp (on PYTHONPATH via the case's env) whose ``make`` is ``body``."""
    header = textwrap.dedent(f"""\
        import os, sys, threading, time
        from pathlib import Path
        import torch
        from torch import nn
        MARK = Path({str(tmp / 'PWNED')!r})
        def data():
            x = torch.rand(64, 8); y = torch.randint(0, 2, (64,))
            return [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
        """)
    (tmp / f"{name}.py").write_text(header + textwrap.dedent(body))
    return f"{name}:make"


def on_path(tmp: Path, **extra: str) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([str(tmp), os.environ.get("PYTHONPATH", "")]), **extra}


def hf_folder(tmp: Path, config: object | None, name: str = "hfmodel", raw: str | None = None) -> str:
    folder = tmp / name
    folder.mkdir()
    if raw is not None:
        (folder / "config.json").write_text(raw)
    elif config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return f"hf:{folder}"


def image_folder(tmp: Path, bomb: bool = False) -> str:
    from PIL import Image

    root = tmp / "photos"
    for k in range(2):
        (root / f"c{k}").mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (16, 16), (k * 200, i * 40, 0)).save(root / f"c{k}" / f"{i}.png")
    if bomb:  # a small file that declares 12000 × 12000 pixels
        Image.new("L", (12000, 12000)).save(root / "c0" / "bomb.png", optimize=True)
    return str(root)


def evil_hf_remote_code(tmp: Path) -> str:
    model = hf_folder(tmp, {"model_type": "evilnet", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}},
                      name="evil")
    (tmp / "evil" / "configuration_evil.py").write_text(
        f"from pathlib import Path\nPath({str(tmp / 'PWNED')!r}).write_text('remote code ran')\n"
        "from transformers import PretrainedConfig\nclass EvilConfig(PretrainedConfig):\n    model_type = 'evilnet'\n")
    return model


def damaged_index(ws: Path) -> None:
    (ws / "index.sqlite").write_bytes(b"this is not a database" * 100)
    for extra in ("index.sqlite-wal", "index.sqlite-shm"):
        (ws / extra).unlink(missing_ok=True)


def the_run(ws: Path) -> Path:
    return next(p for p in (ws / "runs").iterdir() if p.is_dir())


def replace_record(ws: Path, make: Callable[[Path], None]) -> None:
    damaged_index(ws)
    record = the_run(ws) / "run.json"
    record.unlink()
    make(record)


def sweep_spec(tmp: Path, ray: str | None = None, threads: int | None = None, lr: float | None = None,
               model: str = "digits-mlp", suggested: bool = False) -> str:
    base = yaml.safe_load(Path(config_file(tmp, model)).read_text())
    if lr is not None:
        base["finetune"]["lr"] = lr
        base["finetune"]["optimizer"] = "sgd"
        base["finetune"]["guard"] = False  # a diverged fine-tune fails its run (the guard would roll it back)
    vary = {"weight_bits": [8, 4]} | ({"suggested": {"average_bits": [6.0]}} if suggested else {})
    spec = {"version": 1, "name": "attack", "base": base, "vary": vary,
            "executor": {"workers": 1, "threads": threads, "ray": ray}, "latency": False}
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def no_marker(tmp: Path, o: Outcome) -> str | None:
    return "the plugin ran" if (tmp / "RAN").exists() else None


def fast(seconds: float) -> Callable[[Path, Outcome], str | None]:
    return lambda tmp, o: None if o.seconds <= seconds else f"took {o.seconds:.0f} s (bar {seconds:.0f} s)"


def says(*words: str) -> Callable[[Path, Outcome], str | None]:
    return lambda tmp, o: None if all(w.lower() in o.err.lower() for w in words) else f"message lacks {words}: {o.err.strip()[-160:]}"


def not_says(*words: str) -> Callable[[Path, Outcome], str | None]:
    return lambda tmp, o: next((f"message says {w!r}" for w in words if w.lower() in o.err.lower()), None)


def both(*checks: Callable[[Path, Outcome], str | None]) -> Callable[[Path, Outcome], str | None]:
    return lambda tmp, o: next((p for c in checks if (p := c(tmp, o))), None)


def device_kept(tmp: Path, o: Outcome) -> str | None:
    return None if stat.S_ISCHR((tmp / "fakenull").stat().st_mode) else "the device node was replaced by a file"


# --- the cases --------------------------------------------------------------------------------------

CASES: list[Case] = []


def case(name: str, **kw):
    def register(setup):
        CASES.append(Case(name, setup, **kw))
        return setup
    return register


# code that no one chose to run
@case("hf-auto_map-answered-y", check=fast(30), stdin=b"y\n")
def _(tmp, ws):
    return ["config", "init", "--model", evil_hf_remote_code(tmp), "--data", image_folder(tmp)], {}


@case("hf-auto_map-silent-stdin", check=fast(30))
def _(tmp, ws):
    return ["config", "init", "--model", evil_hf_remote_code(tmp), "--data", image_folder(tmp)], {}


for _name in ("os:abort", "builtins:input", "code:interact", "os:getcwd", "qat_core.cli:main", "subprocess:getoutput"):
    @case(f"stdlib-factory-{_name}", check=fast(30))
    def _(tmp, ws, _name=_name):
        return ["--workspace", str(ws), "train", config_file(tmp, _name)], {}


@case("plugin-not-allowed", check=no_marker)
def _(tmp, ws):
    return ["--workspace", str(ws), "train", config_file(tmp, plugin(tmp, """
        def make():
            Path(str(MARK).replace('PWNED', 'RAN')).write_text('x')
            return nn.Linear(8, 2), data(), data()
        """))], on_path(tmp)


@case("plugin-allowed-by-env", expect="ok")
def _(tmp, ws):
    return ["--workspace", str(ws), "train", config_file(tmp, plugin(tmp, """
        def make():
            return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)), data(), data()
        """))], on_path(tmp, QAT_STUDIO_PLUGINS="userplug")


@case("sweep-spec-names-os-abort", check=fast(30))
def _(tmp, ws):
    return ["--workspace", str(ws), "sweep", sweep_spec(tmp, model="os:abort")], {}


# plugin faults (the user allowed the plugin: its faults are PluginErrors, and it cannot hang the run)
def _allowed(tmp: Path, body: str, **env: str) -> tuple[list[str], dict[str, str]]:
    return config_file(tmp, plugin(tmp, body)), on_path(tmp, QAT_STUDIO_PLUGINS="userplug", **env)


@case("plugin-factory-sleeps", check=fast(40))
def _(tmp, ws):
    path, env = _allowed(tmp, "def make():\n    time.sleep(3600)\n", QAT_STUDIO_PLUGIN_TIMEOUT="5")
    return ["--workspace", str(ws), "train", path], env


@case("plugin-non-daemon-thread", expect="ok", check=fast(50))
def _(tmp, ws):
    path, env = _allowed(tmp, """
        def make():
            threading.Thread(target=time.sleep, args=(3600,), daemon=False).start()
            return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)), data(), data()
        """)
    return ["--workspace", str(ws), "train", path], env


@case("plugin-os-_exit-0")
def _(tmp, ws):
    path, env = _allowed(tmp, "def make():\n    os._exit(0)\n")
    return ["--workspace", str(ws), "train", path], env


@case("plugin-GeneratorExit")
def _(tmp, ws):
    path, env = _allowed(tmp, "def make():\n    raise GeneratorExit('bye')\n")
    return ["--workspace", str(ws), "train", path], env


@case("plugin-forward-raises")
def _(tmp, ws):
    path, env = _allowed(tmp, """
        class Bad(nn.Module):
            def __init__(self):
                super().__init__(); self.fc = nn.Linear(8, 2)
            def forward(self, x):
                raise ValueError('my forward is broken')
        def make():
            return Bad(), data(), data()
        """)
    return ["--workspace", str(ws), "train", path], env


@case("plugin-loader-without-len")
def _(tmp, ws):
    path, env = _allowed(tmp, """
        class Loader:
            def __init__(self, batches): self.batches = batches
            def __iter__(self): return iter(self.batches)
        def make():
            return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)), Loader(data()), Loader(data())
        """)
    return ["--workspace", str(ws), "train", path], env


# Hugging Face folders that are damaged
for _label, _cfg, _raw in [("not-json", None, "{not json"), ("a-list", None, "[]"), ("no-model_type", {"x": 1}, None),
                           ("unknown-model_type", {"model_type": "nosuchnet"}, None), ("empty", None, ""),
                           ("deep", None, "[" * 200000 + "]" * 200000)]:
    @case(f"hf-config-{_label}", check=fast(30))
    def _(tmp, ws, _cfg=_cfg, _raw=_raw):
        return ["config", "init", "--model", hf_folder(tmp, _cfg, raw=_raw), "--data", image_folder(tmp)], {}


@case("hf-config-is-a-fifo", check=fast(30))
def _(tmp, ws):
    model = hf_folder(tmp, None)
    os.mkfifo(tmp / "hfmodel" / "config.json")
    return ["config", "init", "--model", model, "--data", image_folder(tmp)], {}


@case("hf-weights-damaged", check=fast(40))
def _(tmp, ws):
    model = hf_folder(tmp, {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                            "intermediate_size": 64, "image_size": 32, "patch_size": 8})
    (tmp / "hfmodel" / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    return ["config", "init", "--model", model, "--data", image_folder(tmp)], {}


# a damaged workspace: every command finishes, says what is damaged, and the other runs stay usable
for _label, _make in [
    ("fifo", lambda p: os.mkfifo(p)),
    ("link-to-dev-zero", lambda p: p.symlink_to("/dev/zero")),
    ("a-list", lambda p: p.write_text("[]")),
    ("deep-brackets", lambda p: p.write_text("[" * 200000 + "]" * 200000)),
    ("a-directory", lambda p: p.mkdir()),
    ("huge", lambda p: p.write_bytes(b" " * (64 << 20) + b"{}")),
]:
    for _cmd in (["runs"], ["show", "{run}"]):
        @case(f"run.json-{_label}-{_cmd[0]}", expect="ok" if _cmd == ["runs"] else "shown", needs_run=True,
              check=fast(20))
        def _(tmp, ws, _make=_make, _cmd=_cmd):
            replace_record(ws, _make)
            run = the_run(ws).name
            return ["--workspace", str(ws), *[a.replace("{run}", run) for a in _cmd]], {}


@case("sweep-suggested.json-damaged", needs_run=True, check=fast(40))
def _(tmp, ws):
    folder = ws / "sweeps" / "attack"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "suggested.json").write_text("[1, 2")
    return ["--workspace", str(ws), "sweep", sweep_spec(tmp, suggested=True)], {}


# nothing waits forever
@case("sweep-ray-unreachable-flag", check=fast(45))
def _(tmp, ws):
    return ["--workspace", str(ws), "sweep", sweep_spec(tmp), "--ray", "127.0.0.1:1"], {}


@case("sweep-ray-unreachable-spec", check=fast(45))
def _(tmp, ws):
    return ["--workspace", str(ws), "sweep", sweep_spec(tmp, ray="127.0.0.1:1")], {}


@case("sweep-ray-unplaceable-threads", check=fast(60), limit=90)
def _(tmp, ws):
    return ["--workspace", str(ws), "sweep", sweep_spec(tmp), "--ray", "local", "--threads", "64"], {}


@case("table-path-is-a-fifo", check=fast(20))
def _(tmp, ws):
    os.mkfifo(tmp / "table.csv")
    return ["config", "init", "--model", "table-mlp", "--data", str(tmp / "table.csv")], {}


@case("table-path-link-to-dev-zero", check=fast(20))
def _(tmp, ws):
    (tmp / "table.csv").symlink_to("/dev/zero")
    return ["config", "init", "--model", "table-mlp", "--data", str(tmp / "table.csv")], {}


# statuses that tell the truth
@case("sweep-every-run-diverges", check=both(says("again"), fast(120)), limit=180)
def _(tmp, ws):
    return ["--workspace", str(ws), "sweep", sweep_spec(tmp, lr=10.0)], {}


@case("report-to-a-device", needs_run=True, check=device_kept)
def _(tmp, ws):
    os.mknod(tmp / "fakenull", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    return ["--workspace", str(ws), "report", the_run(ws).name, "-o", str(tmp / "fakenull")], {}


@case("report-to-a-fifo", needs_run=True, check=fast(20))
def _(tmp, ws):
    os.mkfifo(tmp / "out.html")
    return ["--workspace", str(ws), "report", the_run(ws).name, "-o", str(tmp / "out.html")], {}


@case("report-into-missing-folders", needs_run=True,
      check=lambda tmp, o: "folders were created" if (tmp / "no").exists() else None)
def _(tmp, ws):
    return ["--workspace", str(ws), "report", the_run(ws).name, "-o", str(tmp / "no/such/dir/x.html")], {}


# our bugs are ours, the user's faults are theirs
@case("threads-env-not-a-number")
def _(tmp, ws):
    return ["--workspace", str(ws), "train", config_file(tmp)], {"QAT_STUDIO_THREADS": "abc"}


@case("threads-5000", check=both(says("threads"), fast(30)))
def _(tmp, ws):
    return ["--workspace", str(ws), "train", config_file(tmp), "--threads", "5000"], {}


for _kb in (400, 700, 1000):
    @case(f"disk-full-{_kb}k-workspace", expect="shown", limit=120,  # a run that fits is fine
          check=lambda tmp, o: None if o.rc == 0 else says("disk full")(tmp, o))
    def _(tmp, ws, _kb=_kb):
        small = tmp / "small"
        small.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={_kb}k", "tmpfs", str(small)],
                          capture_output=True).returncode:
            raise unittest_skip("cannot mount a tmpfs here")
        return ["--workspace", str(small / "ws"), "train", config_file(tmp)], {}


@case("image-decompression-bomb", check=fast(20))
def _(tmp, ws):
    return ["--workspace", str(ws), "train", config_file(
        tmp, "torchvision:resnet18", data={"dataset": "image-folder", "path": image_folder(tmp, bomb=True),
                                          "image_size": 16, "resize_size": 16},
        baseline={"batch_size": 2}, finetune={"batch_size": 2})], {}


@case("table-with-inf", check=both(not_says("learning rate"), says("inf")))
def _(tmp, ws):
    import numpy as np
    import pandas as pd

    frame = pd.DataFrame({"a": np.arange(40.0), "b": np.ones(40), "label": [0, 1] * 20})
    frame.loc[5, "a"] = np.inf
    frame.to_csv(tmp / "t.csv", index=False)
    return ["--workspace", str(ws), "train", config_file(
        tmp, "table-mlp", data={"dataset": "table", "path": str(tmp / "t.csv")},
        baseline={"batch_size": 8}, finetune={"batch_size": 8})], {}


class unittest_skip(Exception):  # noqa: N801 - reads as a statement at the raise
    pass


# --- driver -----------------------------------------------------------------------------------------


def trained_workspace(root: Path) -> Path:
    """A workspace with one finished digits-mlp run, made once and copied for each case that damages it."""
    ws = root / "trained"
    if not ws.exists():
        cfg = root / "trained.yaml"
        cfg.write_text(yaml.safe_dump(base_config()))
        o = run_cli(["--workspace", str(ws), "train", str(cfg), "--quiet"], {}, b"", 300, root)
        if o.rc != 0:
            sys.exit(f"could not train the workspace's run: {o.err[-400:]}")
    return ws


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", default="", help="only the cases whose name holds this")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="qat-attack-"))
    rows = []
    try:
        for c in [c for c in CASES if args.k in c.name]:
            tmp = root / c.name
            tmp.mkdir()
            ws = tmp / "ws"
            if c.needs_run:
                shutil.copytree(trained_workspace(root), ws, symlinks=True)
            try:
                argv, env = c.setup(tmp, ws)
            except unittest_skip as why:
                rows.append((c.name, "skipped", 0.0, str(why)))
                continue
            o = run_cli(argv, env, c.stdin, c.limit, tmp)
            verdict, detail = classify(c, tmp, o)
            rows.append((c.name, verdict, o.seconds, detail))
            print(f"{verdict:9} {o.seconds:6.1f}s  {c.name:38} {detail}", flush=True)
            subprocess.run(["umount", str(tmp / "small")], capture_output=True)
    finally:
        subprocess.run(["bash", "-c", f"umount {root}/*/small 2>/dev/null"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
    totals = Counter(v for _, v, _, _ in rows)
    print("\n| cases | refused | ok | exit 70 | tracebacks | hangs | wrong/silent | security | skipped |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {len(rows)} | {totals['refused']} | {totals['ok']} | {totals['exit70']} | {totals['traceback']} | "
          f"{totals['hang']} | {totals['wrong']} | {totals['security']} | {totals['skipped']} |")
    if args.json:
        args.json.write_text(json.dumps([dict(zip(("case", "verdict", "seconds", "detail"), r)) for r in rows],
                                        indent=1))
    return 1 if any(totals[b] for b in BAD) else 0


if __name__ == "__main__":
    sys.exit(main())
