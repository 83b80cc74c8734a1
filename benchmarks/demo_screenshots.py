"""The demo pages at 1400 and 800 px, from a workspace a new user makes with the CLI, into docs/screenshots/demo/.

Three runs (digits-cnn W8A8, digits-cnn W4A8, torchvision mobilenet_v3_small on generated images), each
trained, exported, evaluated in ONNX Runtime and benchmarked through ``qat-studio``; then a Streamlit server
and Debian's chromium screenshot every page with a run picked by URL (``?run=``), quantized to 128 colours.
Needs /usr/bin/chromium. About 10 minutes on 2 cores, mostly the runs.

    python benchmarks/demo_screenshots.py [--keep-workspace DIR] [PAGE ...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "screenshots" / "demo"
CLI = [sys.executable, "-m", "qat_core.cli"]
RUNS = {"w8": ["--model", "digits-cnn"], "w4": ["--model", "digits-cnn", "--weight-bits", "4"],
        "mb": ["--model", "torchvision:mobilenet_v3_small"]}
PAGES = [("home", "", None), ("model", "model", None), ("plan", "plan", None), ("finetune", "finetune", "w8"),
         ("inspect", "inspect_run", "mb"), ("benchmark", "benchmark", "w8"),
         ("benchmark-mobilenet", "benchmark", "mb"), ("compare", "compare", None),
         ("export", "export", "w8"), ("sweep", "sweep", None)]
WIDTHS, HEIGHT = (1400, 800), 1600
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def cli(home: Path, *args: str) -> str:
    done = subprocess.run([*CLI, "--workspace", str(home), *args], capture_output=True, text=True, check=True,
                          cwd=ROOT, stdin=subprocess.DEVNULL)
    return done.stdout


def make_workspace(home: Path) -> dict[str, str]:
    """The three runs, as a user makes them: config init → train → export → eval → bench."""
    ids = {}
    for key, model in RUNS.items():
        config = home / f"{key}.yaml"
        config.write_text(cli(home, "config", "init", *model))
        ids[key] = cli(home, "train", "--quiet", str(config)).split()[-1]
        for step in ("export", "eval", "bench"):
            cli(home, step, ids[key])
        print(f"{key}: {ids[key]}", flush=True)
    return ids


def serve(home: Path, port: int) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
                               "--server.port", str(port), "--server.address", "127.0.0.1",
                               "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
                              cwd=ROOT, env=os.environ | {"QAT_STUDIO_HOME": str(home)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(240):
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).read().strip() == b"ok":
                return server
        except OSError:
            time.sleep(0.5)
    server.terminate()
    raise SystemExit("the Streamlit server did not start")


def screenshots(url: str, ids: dict[str, str], only: list[str]) -> None:
    from PIL import Image
    from playwright.sync_api import sync_playwright

    OUT.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=LAUNCH_ARGS)
        for width in WIDTHS:
            page = browser.new_page(viewport={"width": width, "height": HEIGHT})
            for name, path, run in PAGES:
                if only and name not in only:
                    continue
                page.goto(f"{url}/{path}" + (f"?run={ids[run]}" if run else ""), wait_until="domcontentloaded")
                page.wait_for_selector('[data-testid="stMain"]', timeout=60_000)
                time.sleep(3)  # the script starts; then wait until it has stopped and every fragment has drawn
                for _ in range(240):
                    if not page.locator('[data-testid="stStatusWidget"], [data-testid="stSkeleton"]').count():
                        break
                    time.sleep(0.5)
                time.sleep(1.5)  # charts finish their transitions
                target = OUT / f"{name}-{width}.png"
                page.screenshot(path=str(target))
                Image.open(target).convert("RGB").quantize(colors=128).save(target, optimize=True)
                print(target.relative_to(ROOT), flush=True)
            page.close()
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep-workspace", type=Path, help="make (or reuse) the workspace here and keep it")
    parser.add_argument("pages", nargs="*", help=f"only these pages ({', '.join(p[0] for p in PAGES)})")
    args = parser.parse_args()
    home = args.keep_workspace or Path(tempfile.mkdtemp(prefix="qat-demo-"))
    ids_file = home / "demo-runs.txt"
    try:
        if ids_file.is_file():
            ids = dict(line.split() for line in ids_file.read_text().splitlines())
        else:
            home.mkdir(parents=True, exist_ok=True)
            ids = make_workspace(home)
            ids_file.write_text("".join(f"{k} {v}\n" for k, v in ids.items()))
        port = 8700 + os.getpid() % 200
        server = serve(home, port)
        try:
            screenshots(f"http://127.0.0.1:{port}", ids, args.pages)
        finally:
            server.terminate()
    finally:
        if args.keep_workspace is None:
            shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
