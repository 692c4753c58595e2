"""Notebook 01's noise-level slider, moved by a person's keys in JupyterLab in a real browser.

The other widget test sets the slider's value in Python; this one proves the whole round trip a
learner makes: JupyterLab renders the ipywidgets, a key press moves the slider in the page, the
kernel's observer redraws the figure, and the new picture reaches the page.

It starts JupyterLab on a free localhost port with a throwaway token (QUICK settings, the normal
inline matplotlib backend), drives Debian's Chromium (/usr/bin/chromium) with Playwright for Python
(never a browser Playwright downloads), runs every cell, presses ArrowRight on the slider's handle
and waits for the widget's image to hold different PNG bytes. Screenshots and the two PNGs go to
test-artifacts/browser/. It skips where Chromium or Playwright is not installed.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import nbformat
import pytest
from chromium import chromium_context

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "01_forward_process.ipynb"
ARTIFACTS = ROOT / "test-artifacts" / "browser"

SLIDER_HANDLE = ".widget-slider .noUi-handle"
SLIDER_READOUT = ".widget-slider .widget-readout"
WIDGET_IMAGE = "img.widget-image"

# Lab settings for a quiet, deterministic page: no news toast, every cell attached to the page.
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}

# In the page: the notebook's panel, found by its path (window.jupyterapp: --expose-app-in-browser).
FIND_PANEL = """(path) => {
    const app = window.jupyterapp;
    if (!app || !app.shell) return null;
    for (const widget of app.shell.widgets('main')) {
        if (widget.context && widget.context.path === path) return widget;
    }
    return null;
}"""

WAIT_FOR_KERNEL = f"""async (path) => {{
    const panel = ({FIND_PANEL})(path);
    await panel.context.ready;
    await panel.sessionContext.ready;
    const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
    return kernel ? kernel.name : null;
}}"""

# Runs every cell through JupyterLab's own command, then reports the error outputs.
RUN_ALL = f"""async (path) => {{
    const app = window.jupyterapp;
    const panel = ({FIND_PANEL})(path);
    app.shell.activateById(panel.id);
    const succeeded = await app.commands.execute('notebook:run-all-cells');
    const errors = [];
    for (const cell of panel.content.model.cells) {{
        if (cell.type !== 'code') continue;
        for (const output of cell.outputs.toJSON()) {{
            if (output.output_type === 'error') errors.push(output.ename + ': ' + output.evalue);
        }}
    }}
    return {{ succeeded, errors }};
}}"""

# The bytes the <img> shows (ipywidgets serves them as a blob: URL), base64-encoded.
IMAGE_BYTES = """async (img) => {
    const response = await fetch(img.src);
    const bytes = new Uint8Array(await response.arrayBuffer());
    let text = '';
    for (let i = 0; i < bytes.length; i += 0x8000) {
        text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
    }
    return btoa(text);
}"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _child_pids(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (Linux /proc; empty elsewhere)."""
    children = []
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(entry.parent.name))
    return children


class Lab:
    """A JupyterLab server this test started: its address, token, process and log."""

    def __init__(self, root: Path, config: Path, log_path: Path):
        self.root = root
        self.port = _free_port()
        self.token = secrets.token_hex(16)
        env = dict(os.environ)
        env.pop("MPLBACKEND", None)  # the kernel gets the usual inline backend, as a learner's does
        env["COURSEKIT_QUICK"] = "1"
        env["JUPYTER_CONFIG_DIR"] = str(config)  # no personal config or settings leak in
        env["JUPYTER_RUNTIME_DIR"] = str(config / "runtime")
        env["JUPYTER_DATA_DIR"] = str(config / "data")  # kernels and extensions still come from the venv
        command = [
            sys.executable,
            "-m",
            "jupyter",
            "lab",
            "--no-browser",
            "--expose-app-in-browser",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={root}",
            f"--LabApp.user_settings_dir={config / 'lab' / 'user-settings'}",
            f"--LabApp.workspaces_dir={config / 'lab' / 'workspaces'}",
            "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            command.append("--allow-root")
        self.log_path = log_path
        self._log = open(log_path, "wb")  # closed in stop()
        self.process = subprocess.Popen(
            command, cwd=root, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}?token={self.token}"

    def api(self, method: str, path: str, timeout: float = 5):
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/{path}",
            method=method,
            headers={"Authorization": f"token {self.token}"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
        return json.loads(body) if body else None

    def log_tail(self, characters: int = 3000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-characters:]

    def wait_until_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                self.api("GET", "api/status", timeout=2)
                return
            except (OSError, urllib.error.URLError):
                time.sleep(0.25)
        raise TimeoutError(f"JupyterLab did not answer within {timeout} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Shut every kernel down, then the server; kill whatever is left, by process id."""
        if self.process.poll() is None:
            kernel_pids = _child_pids(self.process.pid)  # kernels run in sessions of their own
            try:
                for kernel in self.api("GET", "api/kernels"):
                    self.api("DELETE", f"api/kernels/{kernel['id']}", timeout=15)
                self.api("POST", "api/shutdown")
            except (OSError, urllib.error.URLError, ValueError):
                pass
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
            for pid in kernel_pids:
                try:
                    os.kill(pid, signal.SIGKILL)  # gone already after a clean shutdown
                except ProcessLookupError:
                    pass
        self._log.close()


@pytest.fixture
def lab(tmp_path):
    """JupyterLab serving a copy of notebook 01, its outputs cleared, so only a fresh run shows a widget."""
    root = tmp_path / "notebooks"
    root.mkdir()
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    notebook.metadata.pop("widgets", None)
    nbformat.write(notebook, root / NOTEBOOK.name)
    config = tmp_path / "jupyter-config"
    for name, values in LAB_SETTINGS.items():
        settings = config / "lab" / "user-settings" / name
        settings.parent.mkdir(parents=True, exist_ok=True)
        settings.write_text(json.dumps(values))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    server = Lab(root, config, ARTIFACTS / "jupyterlab.log")
    try:
        server.wait_until_ready()
        server.start_seconds = time.monotonic() - started
        yield server
    finally:
        server.stop()


@pytest.fixture
def page(tmp_path):
    """A page in headless Debian Chromium with an empty profile, closed afterwards."""
    with chromium_context(tmp_path / "chromium-profile") as context:
        page = context.pages[0] if context.pages else context.new_page()
        page.set_default_timeout(60_000)
        yield page


def _image_png(page) -> bytes:
    return base64.b64decode(page.locator(WIDGET_IMAGE).evaluate(IMAGE_BYTES))


@pytest.mark.timeout(300)
def test_noise_slider_redraws_the_figure_in_jupyterlab(page, lab, capsys):
    # The browser fixture comes first so that an absent browser skips before a server starts.
    path = NOTEBOOK.name
    timings = {"server start": lab.start_seconds}

    # 1. Open the notebook and wait for its kernel.
    started = time.monotonic()
    page.goto(lab.url(f"lab/tree/{path}"))
    page.wait_for_function(f"(path) => ({FIND_PANEL})(path) !== null", arg=path)
    assert page.evaluate(WAIT_FOR_KERNEL, path) == "python3"
    timings["page and kernel"] = time.monotonic() - started

    # 2. Run every cell; the last one shows the slider over the noise level.
    started = time.monotonic()
    result = page.evaluate(RUN_ALL, path)
    assert result["errors"] == [], f"cells failed in the browser: {result['errors']}"
    page.wait_for_selector(SLIDER_HANDLE, state="visible", timeout=120_000)
    page.wait_for_selector(WIDGET_IMAGE, state="visible")
    timings["run all cells"] = time.monotonic() - started
    assert result["succeeded"] is not False

    widget = page.locator(".jp-OutputArea-output").filter(has=page.locator(WIDGET_IMAGE))
    widget.scroll_into_view_if_needed()
    readout_before = page.locator(SLIDER_READOUT).inner_text()
    src_before = page.locator(WIDGET_IMAGE).get_attribute("src")
    png_before = _image_png(page)
    assert png_before.startswith(b"\x89PNG"), "the widget's image is not a PNG"
    (ARTIFACTS / "figure-before.png").write_bytes(png_before)
    page.screenshot(path=str(ARTIFACTS / "before.png"))

    # 3. Move the slider one step with the keyboard, as a learner would; wait for the redrawn figure.
    started = time.monotonic()
    handle = page.locator(SLIDER_HANDLE)
    handle.focus()
    handle.press("ArrowRight")
    page.wait_for_function(
        "([selector, before]) => { const img = document.querySelector(selector); return img && img.src !== before; }",
        arg=[WIDGET_IMAGE, src_before],
        timeout=30_000,
    )
    png_after = _image_png(page)
    timings["slider response"] = time.monotonic() - started
    readout_after = page.locator(SLIDER_READOUT).inner_text()
    (ARTIFACTS / "figure-after.png").write_bytes(png_after)
    page.screenshot(path=str(ARTIFACTS / "after.png"))

    assert int(readout_after) > int(readout_before), f"ArrowRight left t at {readout_after} (was {readout_before})"
    assert png_after.startswith(b"\x89PNG") and png_after != png_before, "the figure did not change"

    (ARTIFACTS / "timings.json").write_text(json.dumps(timings, indent=2))
    with capsys.disabled():  # shown in CI's log even when pytest captures output
        print("\nbrowser widget test: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timings.items()))
