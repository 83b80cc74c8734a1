"""FP32 baseline time: the Model page's "Train FP32 baseline" button against the same baseline in Quick start.

Side by side in one run, each in its own empty workspace (QAT_STUDIO_HOME; the baseline is cached per
workspace), with the same config (``runner.default_config(model)``, checked), one after the other:

  (a) page: app.py driven headless by streamlit.testing.v1.AppTest, Model page, button ``train_baseline``,
      in a fresh Python process: "click" is from the click until the page shows the accuracy (data, training,
      evaluation, saving, rerun). The first click in a process pays one-time costs (Adam's constructor
      imports torch._dynamo: about 2 s here), so a second click, in another empty workspace, is timed too.
  (b) Quick start: ``runner.launch(config, store)``, the app's worker process (QAT_STUDIO_THREADS=1).
      "train": the fp32 phase from the run's events (the last fp32 step's ``elapsed``);
      "wall": launch → the fp32 "done" event (adds starting Python, importing torch, loading the data).
      The run is cancelled once its baseline is done: the QAT part is not measured.
  with --browser, the same two in the real thing: ``streamlit run app.py`` and headless Chromium
  (/usr/bin/chromium, Playwright), each with its own server and workspace:
  (c) page: click → "FP32 baseline ready" shown;
  (d) Home's Quick start button: the fp32 phase from the events, and click → the fp32 "done" event (the
      browser is then on the Fine-tune page, which polls the run and redraws its curves).
      AppTest sends nothing to a browser, so only these see what progress updates and rendering cost.

Prints each time, the thread counts used and the ratios. Target: page click (not the first in its process)
/ Quick start fp32 train ≤ 1.3: like for like, as neither counts starting a process or one-time imports.

    python benchmarks/bench_baseline_page.py [--model digits-cnn] [--repeat 1] [--browser]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # app_pages, as the app imports it

from qat_core import runner, train  # noqa: E402
from qat_core.config import RunConfig  # noqa: E402
from qat_core.store import RunStore  # noqa: E402

TARGET = 1.3
TIMEOUT_S = 300.0


def same_baseline(a: RunConfig, b: RunConfig) -> bool:
    """Whether two configs train the same FP32 baseline (what the baseline cache keys on)."""
    return (a.model, a.checkpoint, a.data, a.baseline, a.seed) == (b.model, b.checkpoint, b.data, b.baseline, b.seed)


def page_baseline(model: str, workspace: Path) -> dict:
    """(a) The Model page's button under AppTest; the threads torch trains with are recorded in train_fp32."""
    from streamlit.testing.v1 import AppTest  # noqa: TID251 (drives the app, as tests/ do)

    logging.getLogger("streamlit.runtime.scriptrunner_utils.script_run_context").setLevel(logging.ERROR)
    os.environ["QAT_STUDIO_HOME"] = str(workspace)
    seen: dict = {}
    original = train.train_fp32

    def timed(*args, **kwargs):
        seen["threads"] = torch.get_num_threads()
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seen["train"] = time.perf_counter() - t0

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT_S)
    at.switch_page("app_pages/model.py").run()  # imports, model info, the draft: not timed
    if model != at.selectbox(key="zoo_model").value:
        at.selectbox(key="zoo_model").select(model).run()
    assert not at.exception, [e.value for e in at.exception]
    config = RunStore(workspace).load_draft(at.query_params["draft"])
    before = torch.get_num_threads()
    train.train_fp32 = timed
    try:
        t0 = time.perf_counter()
        at.button(key="train_baseline").click().run()
        click = time.perf_counter() - t0
    finally:
        train.train_fp32 = original
    assert not at.exception, [e.value for e in at.exception]
    shown = [s.value for s in at.success if "FP32 baseline ready" in s.value]
    assert shown and "train" in seen, "the page did not train the baseline"
    return {"click": click, "train": seen["train"], "threads": seen["threads"], "server_threads": before,
            "restored": torch.get_num_threads() == before, "config": config.to_dict(), "shown": shown[0]}


def page_baselines(model: str, cold: Path, warm: Path) -> dict[str, dict]:
    """(a) in a fresh process, as the worker of (b) is: the first click pays one-time costs there (Adam's
    constructor imports torch._dynamo, about 2 s here); a second click, in another empty workspace, does not."""
    done = subprocess.run([sys.executable, __file__, "--model", model, "--page-once", str(cold), str(warm)],
                          capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the page measurement failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for r in result.values():
        r["config"] = RunConfig.model_validate(r["config"])
    return result


def _fp32_done(store: RunStore, run_id: str, t0: float) -> dict:
    """Wait for a run's fp32 "done" event, then cancel the run (its QAT part is not measured)."""
    while True:
        events = store.events(run_id)
        if any(e.get("phase") == "fp32" and e.get("done") for e in events):
            wall = time.perf_counter() - t0
            break
        if store.get(run_id)["status"] != "running":
            raise RuntimeError(f"the Quick start run ended before its baseline: {store.get(run_id).get('error')}")
        if time.perf_counter() - t0 > TIMEOUT_S:
            raise TimeoutError(f"no fp32 'done' event after {TIMEOUT_S:.0f} s")
        time.sleep(0.05)
    steps = [e for e in events if e.get("phase") == "fp32" and "step" in e]
    store.request_cancel(run_id)
    while store.get(run_id)["status"] == "running" and time.perf_counter() - t0 < TIMEOUT_S:
        time.sleep(0.1)
    return {"train": steps[-1]["elapsed"], "wall": wall, "steps": steps[-1]["total"]}


def quick_start_baseline(config: RunConfig, workspace: Path) -> dict:
    """(b) The baseline inside Quick start's worker process, timed from its events."""
    store = RunStore(workspace)
    t0 = time.perf_counter()
    return _fp32_done(store, runner.launch(config, store), t0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def has_browser() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return Path("/usr/bin/chromium").exists()


@contextlib.contextmanager
def served(workspace: Path, path: str):
    """A browser tab (headless Chromium) on ``streamlit run app.py`` over ``workspace``, opened at ``path``."""
    from playwright.sync_api import sync_playwright

    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
        cwd=ROOT, env=os.environ | {"QAT_STUDIO_HOME": str(workspace)}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        for _ in range(240):
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=1).read() == b"ok":
                    break
            time.sleep(0.25)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/{path}", timeout=TIMEOUT_S * 1000)
            yield page
            browser.close()
    finally:
        server.terminate()
        server.wait(10)


def _click_when_ready(page, name: str) -> float:
    button = page.get_by_role("button", name=name)
    button.wait_for(timeout=TIMEOUT_S * 1000)
    time.sleep(1.0)  # let the first render settle
    t0 = time.perf_counter()
    button.click()
    return t0


def browser_page_baseline(workspace: Path) -> float:
    """(c) The Model page in a real server and browser: click → "FP32 baseline ready"."""
    with served(workspace, "model") as page:
        t0 = _click_when_ready(page, "Train FP32 baseline")
        page.get_by_text("FP32 baseline ready").wait_for(timeout=TIMEOUT_S * 1000)
        return time.perf_counter() - t0


def browser_quick_start(workspace: Path) -> dict:
    """(d) Home's Quick start in a real server and browser (it opens the Fine-tune page, which polls the run)."""
    store = RunStore(workspace)
    with served(workspace, "") as page:
        t0 = _click_when_ready(page, "Quick start: fine-tune digits-cnn at 8 bits")
        while not store.list() and time.perf_counter() - t0 < TIMEOUT_S:
            time.sleep(0.05)
        return _fp32_done(store, store.list()[0]["id"], t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="digits-cnn")
    parser.add_argument("--repeat", type=int, default=1, help="measure each this many times (alternating)")
    parser.add_argument("--browser", action="store_true", help="also time the page in a real server + Chromium")
    parser.add_argument("--page-once", nargs=2, metavar="WORKSPACE", help=argparse.SUPPRESS)  # (a) in this process
    args = parser.parse_args()
    if args.page_once:
        cold = page_baseline(args.model, Path(args.page_once[0]))
        print(json.dumps({"cold": cold, "warm": page_baseline(args.model, Path(args.page_once[1]))}))
        return
    config = runner.default_config(args.model)
    print(f"{args.model}: {config.baseline.epochs} epochs, batch {config.baseline.batch_size}, seed {config.seed}; "
          f"{os.cpu_count()} CPUs; torch {torch.__version__}", flush=True)
    pages, quicks, browsers, browser_qs = [], [], [], []
    if args.browser and not has_browser():
        raise SystemExit("--browser needs playwright and /usr/bin/chromium")
    if args.browser and args.model != "digits-cnn":
        raise SystemExit("--browser measures digits-cnn (what the Model page and Quick start start with)")
    for i in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="bench-page-") as a, tempfile.TemporaryDirectory(prefix="bench-qs-") as b:
            page = page_baselines(args.model, Path(a) / "cold", Path(a) / "warm")
            assert all(same_baseline(p["config"], config) for p in page.values()), \
                "the page's draft trains another baseline than Quick start"
            quick = quick_start_baseline(config, Path(b))
        pages.append(page)
        quicks.append(quick)
        cold, warm = page["cold"], page["warm"]
        print(f"[{i + 1}] page: click {cold['click']:.2f} s first in its process (train_fp32 {cold['train']:.2f} s), "
              f"{warm['click']:.2f} s next (train_fp32 {warm['train']:.2f} s); torch threads while training "
              f"{warm['threads']}, the server's {warm['server_threads']} restored after: {warm['restored']}", flush=True)
        print(f"    Quick start (worker threads 1, QAT_STUDIO_THREADS=1): fp32 train {quick['train']:.2f} s over "
              f"{quick['steps']} steps, launch → fp32 done {quick['wall']:.2f} s", flush=True)
        if args.browser:
            with tempfile.TemporaryDirectory(prefix="bench-browser-") as c, \
                    tempfile.TemporaryDirectory(prefix="bench-browser-qs-") as d:
                took, qs = browser_page_baseline(Path(c)), browser_quick_start(Path(d))
            browsers.append(took)
            browser_qs.append(qs)
            print(f"    in a browser (streamlit run + Chromium): page click → accuracy shown {took:.2f} s | "
                  f"Quick start fp32 train {qs['train']:.2f} s, click → fp32 done {qs['wall']:.2f} s", flush=True)

    def med(rows: list[dict], key: str, which: str | None = None) -> float:
        return statistics.median((r[which] if which else r)[key] for r in rows)

    cold, warm = med(pages, "click", "cold"), med(pages, "click", "warm")
    qs_train, qs_wall = med(quicks, "train"), med(quicks, "wall")
    print(f"\nmedians over {args.repeat}: page click {warm:.2f} s ({cold:.2f} s first in a process) | "
          f"Quick start fp32 train {qs_train:.2f} s, launch → fp32 done {qs_wall:.2f} s")
    print(f"page click / Quick start fp32 train: {warm / qs_train:.2f} (target ≤ {TARGET}: "
          f"{'OK' if warm / qs_train <= TARGET else 'OVER'}; neither counts starting a process or one-time imports)")
    print(f"page click, first in a process / Quick start launch → fp32 done: {cold / qs_wall:.2f} (both count them)")
    print(f"page click, first in a process / Quick start fp32 train: {cold / qs_train:.2f}")
    if browsers:
        b_click, b_train, b_wall = statistics.median(browsers), med(browser_qs, "train"), med(browser_qs, "wall")
        print(f"in a browser (first click in a fresh server): page {b_click:.2f} s / Quick start fp32 train "
              f"{b_train:.2f} s = {b_click / b_train:.2f}; / Quick start click → fp32 done {b_wall:.2f} s = "
              f"{b_click / b_wall:.2f}")

if __name__ == "__main__":
    main()
