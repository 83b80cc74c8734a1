"""Workspace damage, generated (hypothesis): files and folders of a real workspace (a finished run, its
results and weights, the index, a cached baseline, a sweep's files) replaced by FIFOs, links (to /dev/zero,
to a folder, dangling), folders, bytes, and JSON of any shape, depth and size. Every read-only command then
ends within seconds with exit 0 or 2 (a named damage): never 70, a traceback, a hang or an unbounded read."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qat_core import cli, sweep
from qat_core.errors import QATError
from qat_core.store import RunStore
from tests.conftest import small_base
from tests.test_workspace_reads import KINDS, memory_cap, replace, within

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")]

QUICK = 10.0  # seconds for a listing or a record (the bound); a report evaluates the model: more under load
REPORT = 60.0
SWEEP = "s"


@pytest.fixture(scope="module")
def pristine(workspace, digits_run, tmp_path_factory) -> tuple[Path, str, list[str]]:
    """A workspace of the session's finished digits run (its results and weights), its cached baseline,
    and a sweep's files as a driver leaves them; and the paths in it that the damage may hit."""
    root = tmp_path_factory.mktemp("damage") / "ws"
    shutil.copytree(workspace.run_dir(digits_run), root / "runs" / digits_run,
                    ignore=shutil.ignore_patterns("*.onnx", "analysis", "*.html"))
    shutil.copytree(workspace.root / "baselines", root / "baselines")
    store = RunStore(root)  # its index, rebuilt from the run's folder
    spec = sweep.from_dict({"name": SWEEP, "base": small_base().to_dict(), "vary": {"weight_bits": [8, 4]}})
    folder = store.sweep_dir(SWEEP)
    folder.mkdir(parents=True)
    (folder / sweep.SPEC_FILE).write_text(spec.to_yaml())
    (folder / sweep.STATE_FILE).write_text(json.dumps({"state": "done", "pid": 1, "total": 1, "message": "done"}))
    (folder / sweep.PLAN_FILE).write_text(json.dumps([{"run": digits_run, "label": "8-bit weights"}]))
    (folder / sweep.SUGGESTED_FILE).write_text(json.dumps({"key": "k", "plans": {}}))
    (folder / "driver.log").write_text("starting\n")
    assert store.get(digits_run)["status"] == "done"
    targets = sorted(str(p.relative_to(root)) for p in root.rglob("*")
                     if not p.name.startswith(".") and not p.name.startswith("index.sqlite-"))
    return root, digits_run, targets


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12)


@st.composite
def mutated(draw, original: object) -> str:
    """The file's own JSON with one value replaced: damage that passes a first look."""
    if isinstance(original, dict) and original:
        key = draw(st.sampled_from(sorted(original)))
        return json.dumps(original | {key: draw(json_values)})
    if isinstance(original, list) and original:
        return json.dumps([draw(json_values)] + original[1:])
    return json.dumps(draw(json_values))


def texts(original: object) -> st.SearchStrategy[str | bytes]:
    depth = st.integers(1, 200_000)
    return st.one_of(
        json_values.map(json.dumps), mutated(original),
        depth.map(lambda d: "[" * d + "]" * d), depth.map(lambda d: '{"a": ' * d + "1" + "}" * d),
        st.integers(0, 20 << 20).map(lambda n: " " * n + "{}"),  # past the 16 MB a record may have
        st.binary(max_size=64), st.just(""))


def original_json(root: Path, target: str) -> object:
    try:
        return json.loads((root / target).read_text()) if target.endswith(".json") else None
    except (OSError, ValueError):
        return None


@st.composite
def damaged_workspaces(draw, pristine) -> list[tuple[str, str | bytes]]:
    """Up to 3 paths of the workspace, each with its damage (a kind of ``KINDS``, or what is written there)."""
    root, _, targets = pristine
    hits = draw(st.lists(st.sampled_from(targets), min_size=1, max_size=3, unique=True))
    hits = [t for t in hits if not any(t.startswith(f"{other}/") for other in hits)]  # one inside a hit folder: gone
    return [(t, draw(st.one_of(st.sampled_from(KINDS), texts(original_json(root, t))))) for t in hits]


def commands(run_id: str) -> st.SearchStrategy[list[list[str]]]:
    listing = [["runs"], ["runs", "--json"], ["show", run_id], ["show", run_id, "--json"], ["sweep-state"],
               ["sweep-frame"], ["sweep-spec"]]
    return st.lists(st.sampled_from(listing + [["report", run_id]]), min_size=1, max_size=3, unique_by=tuple)


def run(root: Path, argv: list[str], out: Path) -> tuple[int, str]:
    """A CLI command in this process (or a Sweep page's read, as the page makes it): its exit code and stderr."""
    if argv[0].startswith("sweep-"):  # no CLI command reads a sweep without running it: the page's calls
        read = {"sweep-state": sweep.state, "sweep-frame": sweep.sweep_frame, "sweep-spec": sweep.saved_spec}
        try:
            read[argv[0]](RunStore(root), SWEEP)
        except QATError as err:
            return cli.EXIT_USER_ERROR, str(err)
        return 0, ""
    return cli.main(["--workspace", str(root), *argv, *(["-o", str(out)] if argv[0] == "report" else [])]), ""


def test_every_read_only_command_survives_any_workspace_damage(pristine, capsys):
    root, run_id, _ = pristine
    slowest: dict[str, float] = {}
    outcomes: dict[int, int] = {}
    examples = []

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(damaged_workspaces(pristine), commands(run_id))
    def check(damages, argvs) -> None:
        with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
            copy = Path(tmp) / "ws"
            shutil.copytree(root, copy, symlinks=True)
            for target, damage in damages:
                replace(copy / target, damage)
            for argv in argvs:
                start = time.monotonic()
                with memory_cap():
                    code, message = within(run, copy, argv, Path(tmp) / "r.html",
                                           seconds=REPORT if argv[0] == "report" else QUICK)
                slowest[argv[0]] = max(slowest.get(argv[0], 0.0), time.monotonic() - start)
                outcomes[code] = outcomes.get(code, 0) + 1
                err = message or capsys.readouterr().err
                summary = [(t, d[:80]) for t, d in damages]
                assert code in (0, cli.EXIT_USER_ERROR), (argv, summary, code, err[-600:])
                assert "Traceback" not in err and len(err) < cli.MAX_MESSAGE + 100, (argv, summary, err[:600])
        examples.append(damages)

    check()
    print(f"\n[workspace damage] {len(examples)} damaged workspaces, {sum(outcomes.values())} commands: "
          f"{outcomes.get(0, 0)} exit 0, {outcomes.get(cli.EXIT_USER_ERROR, 0)} exit 2; slowest: "
          + ", ".join(f"{k} {v:.1f} s" for k, v in sorted(slowest.items())))
    assert len(examples) >= 150
