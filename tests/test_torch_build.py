"""Which PyTorch build make installs: the CPU index on Linux without an NVIDIA GPU, PyPI otherwise, overridable."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from utils import torch_build

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("system, nvidia, override, expected", [
    ("Linux", False, None, torch_build.CPU_INDEX),
    ("Linux", True, None, None),  # PyPI's CUDA build for the GPU learner
    ("Darwin", False, None, None),  # PyPI's macOS wheels are CPU builds already
    ("Windows", False, None, None),
    ("Linux", False, "pypi", None),
    ("Linux", True, "https://download.pytorch.org/whl/cu130", "https://download.pytorch.org/whl/cu130"),
])
def test_the_index_follows_the_machine_unless_overridden(system, nvidia, override, expected):
    assert torch_build.torch_index(system, nvidia, override) == expected


def _install_commands(*make_args: str) -> list[str]:
    dry = subprocess.run(["make", "-n", "-B", ".venv/.installed", *make_args], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    return [line for line in dry.stdout.splitlines() if "pip install" in line]


@pytest.mark.skipif(torch_build.has_nvidia_gpu(), reason="an NVIDIA GPU is present: make takes PyPI's CUDA build")
def test_without_an_nvidia_gpu_make_installs_the_cpu_build_of_the_pinned_torch():
    torch_line = next(line for line in _install_commands() if "--no-deps" in line)
    assert '"torch==2.13.0"' in torch_line and f"--index-url {torch_build.CPU_INDEX}" in torch_line


def test_torch_index_pypi_takes_pypis_wheel():
    torch_line = next(line for line in _install_commands("TORCH_INDEX=pypi") if "--no-deps" in line)
    assert '"torch==2.13.0"' in torch_line and "--index-url" not in torch_line
