"""`make lab`: the launcher's flags, and a real Jupyter Lab started the way `make lab` starts it, then stopped.

The server tests take about 3 s each, so they are not marked slow.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from utils import lab

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(p.name for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
URL = re.compile(r"^\s+(http://127\.0\.0\.1:(\d+)/lab\?token=(\w+))$", re.M)


@pytest.mark.parametrize("as_root", [True, False])
@pytest.mark.parametrize("open_browser", [True, False])
def test_allow_root_only_as_root_and_no_browser_only_without_one(as_root, open_browser):
    command = lab.lab_command(8888, as_root=as_root, open_browser=open_browser, extra=["--ip", "0.0.0.0"])
    assert ("--allow-root" in command) == as_root
    assert ("--no-browser" in command) == (not open_browser)
    assert command[-2:] == ["--ip", "0.0.0.0"] and "--ServerApp.port=8888" in command


def test_linux_without_a_display_opens_no_browser(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert lab.can_open_browser() is False


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get(url: str, token: str):
    request = urllib.request.Request(url, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(request, timeout=60) as response:  # a busy 2-core machine renders slowly
        return response.status, response.read()


def _lines(stream, into: queue.Queue) -> None:
    for line in stream:
        into.put(line)


@pytest.fixture
def jupyter_env(tmp_path) -> dict:
    """No display, and Jupyter's data, config and runtime folders in tmp_path: the user's own are left alone."""
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "JUPYTER_TOKEN")}
    env.update({f"JUPYTER_{name}_DIR": str(tmp_path / name.lower()) for name in ("DATA", "CONFIG", "RUNTIME")})
    return {**env, "PYTHONPATH": str(ROOT)}


def _ignoring_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a job started with & by a script (CI) inherits it


def test_make_lab_serves_the_notebooks_and_kernel_then_stops_cleanly(jupyter_env):
    port = _free_port()
    launcher = subprocess.Popen([sys.executable, "-m", "utils.lab", "--port", str(port)], cwd=ROOT, env=jupyter_env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                preexec_fn=_ignoring_sigint)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(launcher.stdout, lines), daemon=True).start()
    output, server = "", []
    try:
        deadline = time.monotonic() + 120
        while not URL.search(output) and launcher.poll() is None and time.monotonic() < deadline:
            try:
                output += lines.get(timeout=1)
            except queue.Empty:
                pass
        found = URL.search(output)
        assert found, f"no address printed:\n{output[-3000:]}"
        url, printed_port, token = found.groups()
        assert int(printed_port) == port and "No browser can open here" in output
        server = psutil.Process(launcher.pid).children(recursive=True)

        assert _get(url, token)[0] == 200  # the printed address opens Jupyter Lab
        specs = json.loads(_get(f"http://127.0.0.1:{port}/api/kernelspecs", token)[1])["kernelspecs"]
        assert specs[lab.KERNEL_NAME]["spec"]["display_name"] == lab.KERNEL_DISPLAY_NAME
        assert specs[lab.KERNEL_NAME]["spec"]["argv"][0] == sys.executable  # the course's venv, not another Python
        contents = json.loads(_get(f"http://127.0.0.1:{port}/api/contents/", token)[1])["content"]
        assert sorted(item["name"] for item in contents if item["name"].endswith(".ipynb")) == NOTEBOOKS

        launcher.send_signal(signal.SIGINT)  # Ctrl-C
        assert launcher.wait(timeout=120) == 0
        assert not [p for p in server if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], "server left running"
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0, "the port still answers"
    finally:  # never leave a server behind, whatever failed
        for process in server:
            if process.is_running():
                process.kill()
        if launcher.poll() is None:
            launcher.kill()


@pytest.mark.skipif(os.geteuid() != 0, reason="the control only means something as root")
def test_jupyter_lab_without_allow_root_refuses_root(jupyter_env):
    """The control: what `make lab` did before, as root (the state of cloud GPU containers and workshop images)."""
    run = subprocess.run([sys.executable, "-m", "jupyterlab", "--no-browser", f"--ServerApp.port={_free_port()}"],
                         cwd=ROOT, env=jupyter_env, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "Running as root is not recommended. Use --allow-root to bypass." in run.stdout + run.stderr
