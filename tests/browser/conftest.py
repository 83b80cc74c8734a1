"""Real-browser test fixtures: a Streamlit server and a headless Debian Chromium.

Uses playwright.sync_api directly (no pytest-playwright). Chromium comes from
`apt-get install -y chromium chromium-driver fonts-noto-color-emoji`; never
`playwright install`. Without /usr/bin/chromium the tests are skipped, unless
the CI env var is set, in which case they fail.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
HEALTH_TIMEOUT_S = 60.0
VIEWPORT = {"width": 1400, "height": 900}


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "browser: end-to-end test driving the app in a real headless Chromium"
    )


def pytest_collection_modifyitems(config, items):
    # Everything collected under tests/browser/ is a browser test, marked or not.
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.browser)


def _require_chromium() -> None:
    if Path(CHROMIUM).exists():
        return
    msg = (
        f"{CHROMIUM} not found: install it with "
        "`apt-get install -y chromium chromium-driver fonts-noto-color-emoji` "
        "(never `playwright install`)"
    )
    if os.environ.get("CI"):
        pytest.fail(f"CI must install chromium: {msg}", pytrace=False)
    pytest.skip(msg)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200 and resp.read().strip() == b"ok"
    except (urllib.error.URLError, ConnectionError, OSError):
        return False


@contextlib.contextmanager
def running_server(home: Path, log_path: Path) -> Iterator[str]:
    """`streamlit run app.py` on a free loopback port with workspace ``home``; yields its base URL."""
    _require_chromium()  # no point starting a server nobody can open
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable, "-m", "streamlit", "run", "app.py",
        "--server.headless", "true",
        "--server.port", str(port),
        "--server.address", "127.0.0.1",
        "--browser.gatherUsageStats", "false",
        "--server.fileWatcherType", "none",
    ]
    env = {**os.environ, "QAT_STUDIO_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def _log_tail() -> str:
        log.flush()
        return log_path.read_text(errors="replace")[-4000:]

    t0 = time.monotonic()
    try:
        while not _healthy(f"{base_url}/_stcore/health"):
            if proc.poll() is not None:
                pytest.fail(
                    f"streamlit exited with code {proc.returncode} before becoming healthy:\n"
                    f"{_log_tail()}",
                    pytrace=False,
                )
            if time.monotonic() - t0 > HEALTH_TIMEOUT_S:
                pytest.fail(
                    f"streamlit not healthy after {HEALTH_TIMEOUT_S:.0f} s:\n{_log_tail()}",
                    pytrace=False,
                )
            time.sleep(0.2)
        print(f"\n[app_server] healthy at {base_url} after {time.monotonic() - t0:.1f} s "
              f"(QAT_STUDIO_HOME={home}, log {log_path})")
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="session")
def app_server(tmp_path_factory):
    """One server for the session; its base URL."""
    with running_server(tmp_path_factory.mktemp("qat_studio_home"),
                        tmp_path_factory.mktemp("streamlit_log") / "server.log") as url:
        yield url


@pytest.fixture
def fresh_server(tmp_path):
    """A server nobody has visited yet (as after a restart)."""
    with running_server(tmp_path / "home", tmp_path / "server.log") as url:
        yield url


@pytest.fixture(scope="session")
def browser():
    """One headless Debian Chromium for the whole session."""
    _require_chromium()
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    """A fresh context (own cookies/storage, so a new Streamlit session) per test."""
    context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
    pg = context.new_page()
    try:
        yield pg
    finally:
        context.close()
