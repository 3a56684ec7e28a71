"""Smoke test in a real headless browser: Debian's chromium driven by Playwright.

The app is served by ``annotator serve`` on a free port of 127.0.0.1, exactly as a user
starts it. Screenshots go to ``test-artifacts/`` at the repository root.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from annotator.services.batches import next_batch, submit_batch
from annotator.services.oracle import oracle_labels
from annotator.services.project import Project

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
REQUIRE_BROWSER_VARIABLE = "ANNOTATOR_REQUIRE_BROWSER"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
# Flags for a sandboxed root user on a machine without a network beyond 127.0.0.1.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.browser


def _require_chromium() -> None:
    if Path(CHROMIUM).is_file():
        return
    message = "Debian's chromium is not installed (apt-get install chromium)"
    if os.environ.get(REQUIRE_BROWSER_VARIABLE) == "1":
        pytest.fail(f"{message}; {REQUIRE_BROWSER_VARIABLE}=1 requires the browser test")
    pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_healthy(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"annotator serve exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.read().decode().strip() == "ok":
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} was not healthy within {timeout} s")


@pytest.fixture
def served(app_project: Project, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Two labelled rounds on the project, served by ``annotator serve`` on a free port."""
    _require_chromium()
    for annotator in ("alice", "bob"):
        batch = next_batch(app_project, annotator)
        labels = oracle_labels(app_project, [task.image_id for task in batch.tasks])
        submit_batch(app_project, batch.batch_id, labels)

    port = _free_port()
    command = [
        sys.executable, "-m", "annotator.cli.main", "serve", str(app_project.directory),
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    # Output goes to a file: the test never reads a pipe, and a full pipe would block the server.
    log = (tmp_path_factory.mktemp("serve") / "serve.log").open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, process)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def test_progress_and_label_pages(served: str) -> None:
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 2200})

            page.goto(f"{served}/progress", wait_until="networkidle")
            page.get_by_text("Zero-shot accuracy").wait_for(timeout=60_000)
            page.locator("canvas, svg.marks").first.wait_for(timeout=60_000)
            page.wait_for_timeout(1500)
            page.screenshot(path=str(ARTIFACTS / "progress.png"), full_page=True)
            assert page.get_by_text("Zero-shot accuracy").count() >= 1
            assert page.locator("text=Traceback").count() == 0

            page.goto(served, wait_until="networkidle")
            page.get_by_role("textbox", name="Your name").fill("dana")
            page.get_by_role("textbox", name="Your name").press("Enter")
            page.get_by_text("Submit batch").wait_for(timeout=60_000)
            page.locator("img").first.wait_for(timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "label.png"), full_page=True)
            assert page.get_by_text("Class of image #1", exact=True).count() == 1
        finally:
            browser.close()

    assert (ARTIFACTS / "progress.png").stat().st_size > 10_000
