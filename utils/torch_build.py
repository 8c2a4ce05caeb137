"""Which PyTorch build `make` installs: the CPU build from PyTorch's own wheel index on a Linux machine without an
NVIDIA GPU (PyPI's Linux wheel is the CUDA build: several GB of NVIDIA libraries), PyPI's wheel everywhere else.

    python utils/torch_build.py      # prints the pip arguments for torch, e.g. "--index-url https://.../whl/cpu"

Runs with the system Python before the course's venv exists: standard library only. `make TORCH_INDEX=URL` picks an
index by hand; `make TORCH_INDEX=pypi` takes PyPI's wheel.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys

CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def has_nvidia_gpu() -> bool:
    """Whether an NVIDIA driver answers here: `nvidia-smi -L` lists a GPU, or the kernel module is loaded."""
    if os.path.exists("/proc/driver/nvidia/version"):
        return True
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return listed.returncode == 0 and "GPU" in listed.stdout


def torch_index(system: str, nvidia: bool, override: str | None = None) -> str | None:
    """The index to take torch from: override if given ("pypi": PyPI), else PyTorch's CPU index on Linux without an
    NVIDIA GPU, else None (PyPI: CUDA on Linux with a GPU; CPU-only wheels on macOS and Windows anyway)."""
    if override:
        return None if override == "pypi" else override
    return CPU_INDEX if system == "Linux" and not nvidia else None


def pip_args(index: str | None) -> str:
    """pip arguments for installing torch from index (nothing for PyPI)."""
    return f"--index-url {index}" if index else ""


def main() -> int:
    index = torch_index(platform.system(), has_nvidia_gpu(), os.environ.get("TORCH_INDEX") or None)
    print(pip_args(index))
    print(f"torch from {index or 'PyPI'} ({'NVIDIA GPU found' if has_nvidia_gpu() else 'no NVIDIA GPU'}, "
          f"{platform.system()})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
