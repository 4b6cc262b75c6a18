"""Fixtures of the browser test: Debian's Chromium through Playwright, and one JupyterLab server.

Playwright never downloads a browser here: it drives the system Chromium (``/usr/bin/chromium``, or
``$DETLAB_CHROMIUM``). When Chromium or Playwright is missing the browser tests skip with the command
that installs it, except under CI (``CI=true``), where a missing piece is a failure: CI must prove
that the labs render.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .lab_server import LabServer, running_lab

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path(os.environ.get("DETLAB_CHROMIUM", "/usr/bin/chromium"))
# Flags for a sandboxed, offline, throwaway Chromium: no background traffic (the network is closed),
# no sandbox (CI runs as root), no GPU. Playwright adds --headless and a fresh --user-data-dir.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]
VIEWPORT = {"width": 1280, "height": 900}


def _missing(what: str, how: str) -> None:
    """Fails under CI, skips elsewhere, saying how to install what is missing."""
    message = f"{what}; install it with: {how}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"browser test cannot run in CI: {message}", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """A headless Chromium, shared by the session's pages."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("Playwright for Python is not installed",
                 "PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 .venv/bin/pip install -r requirements-dev.txt")
    if not os.access(CHROMIUM, os.X_OK):
        _missing(f"Chromium not found at {CHROMIUM}", "apt-get install -y chromium (or set DETLAB_CHROMIUM)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="session")
def lab_server() -> Iterator[LabServer]:
    """One JupyterLab server for the session, serving a scratch copy of the course folder layout."""
    base = Path(tempfile.mkdtemp(prefix="detlab-browser-"))
    root = base / "course"
    (root / "solutions").mkdir(parents=True)
    if (REPO / "data").is_dir():
        (root / "data").symlink_to(REPO / "data")  # notebooks may read ../data
    try:
        with running_lab(base / "jupyter", root) as server:
            yield server
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def page(browser: Any, lab_server: LabServer) -> Iterator[Any]:
    """A fresh browser context and page; the kernels it started are shut down afterwards."""
    context = browser.new_context(viewport=VIEWPORT)
    try:
        yield context.new_page()
    finally:
        context.close()
        lab_server.shutdown_kernels()
