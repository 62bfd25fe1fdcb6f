"""Helpers of the demo tests (serve.py, the exported app, the browser test): free ports, a Python without
PyTorch, waiting for a server's URL, headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

# Importing any of these fails in a Python started with `no_torch_env`.
BLOCKED = ("torch", "torchvision", "foodvision", "lightning", "timm")
BLOCKER = f'''"""Test helper: make {", ".join(BLOCKED)} impossible to import."""
import sys


class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
        return None


sys.meta_path.insert(0, _Blocked())
'''


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def no_torch_env(folder: Path) -> dict[str, str]:
    """Environment for a subprocess in which `import torch` (and foodvision) raise ModuleNotFoundError: a
    sitecustomize.py on PYTHONPATH puts an import blocker first on sys.meta_path."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(BLOCKER)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "COVERAGE_PROCESS_START")}
    env["PYTHONPATH"] = str(folder)
    env["GRADIO_ANALYTICS_ENABLED"] = "False"
    return env


def wait_for_url(process: subprocess.Popen, timeout: float = 120) -> tuple[str, list[str]]:
    """Read the process's output (a thread keeps reading it) until it prints 'running on http://...';
    returns the URL and the list the output lines keep being appended to."""
    lines: list[str] = []
    assert process.stdout is not None

    def read() -> None:
        for line in process.stdout:
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(lines):
            match = re.search(r"running on (http://\S+)", line)
            if match:
                return match.group(1), lines
        if process.poll() is not None:
            time.sleep(0.5)
            break
        time.sleep(0.2)
    process.kill()
    output = "".join(lines)[-3000:]
    raise AssertionError(f"no URL printed within {timeout} s (exit code {process.poll()}):\n{output}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def chromium_path() -> str | None:
    """Debian's chromium (or another Chromium/Chrome on PATH)."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def require_browser() -> str:
    """The Chromium binary for Playwright, or a skip saying what is missing."""
    pytest.importorskip(
        "playwright.sync_api", reason="the browser test needs playwright (pip install -e '.[demo]')"
    )
    path = chromium_path()
    if path is None:
        pytest.skip("no Chromium binary: apt-get install -y chromium (.ci/run does where apt is available)")
    return path


def python() -> str:
    return sys.executable


def app_predictions(app_dir: Path, photos: list[str], blocker: Path) -> list[dict]:
    """``python app.py --predict PHOTOS`` in an exported app folder, with torch and foodvision unimportable:
    its JSON lines."""
    import json

    done = subprocess.run(
        [python(), "app.py", "--predict", *photos],
        cwd=app_dir,
        env=no_torch_env(blocker),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]
