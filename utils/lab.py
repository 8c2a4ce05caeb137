"""`make lab`: Jupyter Lab on the course's notebooks with the course's kernel, as root or not, its address printed.

    python -m utils.lab [--port 8888] [any other jupyter lab option, e.g. --ip 0.0.0.0]
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import webbrowser
from pathlib import Path

KERNEL_NAME = "gemma-course"
KERNEL_DISPLAY_NAME = "Gemma course (.venv)"
NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
START_TIMEOUT_S = 120


def register_kernel() -> None:
    """Install this interpreter (the course's venv) as the user's Jupyter kernel "gemma-course"."""
    from ipykernel.kernelspec import install

    install(user=True, kernel_name=KERNEL_NAME, display_name=KERNEL_DISPLAY_NAME)


def can_open_browser() -> bool:
    """False on Linux without a display (a container, a server over ssh) or where Python finds no browser."""
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return False
    try:
        webbrowser.get()
    except webbrowser.Error:
        return False
    return True


def pick_port(preferred: int) -> int:
    """preferred if nothing listens on it, else a free port the system picks."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", preferred))
        except OSError:
            probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def lab_command(port: int, as_root: bool, open_browser: bool, extra: list[str]) -> list[str]:
    """jupyter lab with --allow-root only for root (Jupyter refuses root without it), --no-browser without a browser."""
    command = [sys.executable, "-m", "jupyterlab", str(NOTEBOOK_DIR), f"--ServerApp.port={port}",
               "--ServerApp.port_retries=0"]  # the port printed below is the port it serves on
    if as_root:
        command.append("--allow-root")
    if not open_browser:
        command.append("--no-browser")
    return command + extra


def wait_until_serving(proc: subprocess.Popen, port: int, token: str) -> bool:
    """Poll the server's REST API until it answers (True) or the process ends or START_TIMEOUT_S passes (False)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/status", headers={"Authorization": f"token {token}"})
    deadline = time.monotonic() + START_TIMEOUT_S
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(request, timeout=2):
                return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    return False


def _stop(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the server the way Ctrl-C does


def main(argv: list[str] | None = None) -> int:
    """Register the kernel, start Jupyter Lab, print its address with the token, and stop it cleanly on Ctrl-C."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8888, help="default 8888, or a free port if it is taken")
    args, extra = parser.parse_known_args(argv)
    register_kernel()
    port, token = pick_port(args.port), os.environ.get("JUPYTER_TOKEN") or secrets.token_hex(24)
    browser = can_open_browser()
    command = lab_command(port, os.geteuid() == 0, browser, extra)
    # the token travels in the environment, not on the command line where `ps` shows it to other users;
    # a session of its own, so that Ctrl-C reaches this launcher only and it shuts the server down without a prompt
    proc = subprocess.Popen(command, env={**os.environ, "JUPYTER_TOKEN": token}, start_new_session=True)
    # Ctrl-C and SIGTERM stop the server, also where SIGINT came in ignored (a job started with & by a script, CI)
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        if not wait_until_serving(proc, port, token):
            proc.terminate()
            print(f"Jupyter Lab did not start (exit code {proc.wait()}); its messages are above.", flush=True)
            return 1
        where = "A browser tab should open; if not, open" if browser else "No browser can open here: open"
        print(f"\nJupyter Lab serves {NOTEBOOK_DIR} with the kernel {KERNEL_DISPLAY_NAME!r}. {where}\n\n"
              f"    http://127.0.0.1:{port}/lab?token={token}\n\n"
              f"From another computer: ssh -L {port}:127.0.0.1:{port} <this machine>, then open the same address. "
              "Stop with Ctrl-C.\n", flush=True)
        return proc.wait()  # the server was shut down from its own menu
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(timeout=60)
        return 0


if __name__ == "__main__":
    sys.exit(main())
