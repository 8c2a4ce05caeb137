"""Which precision to compute in: bf16 where the processor computes it natively, fp32 where bf16 is emulated."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

AUTO = "auto"
DTYPES = ("bfloat16", "float32")
# CPU flags (Linux /proc/cpuinfo) that tell whether bf16 matmuls run in hardware.
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "avx_vnni", "avx512f", "avx2")
# Environment that makes an AVX512/AMX x86 machine compute like an AVX2-only one (a laptop without AVX512):
# ATen's vector kernels, oneDNN (bf16 matmuls) and MKL (fp32 matmuls) all limited to AVX2.
AVX2_ONLY_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
# Environment that hides AMX from oneDNN on an Intel machine that has it, leaving AVX512-BF16: meant to reproduce the
# AMD EPYC kind without AMX (bf16 no faster than fp32). Not yet checked against such an EPYC from an AMX machine.
NO_AMX_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}


@dataclass(frozen=True)
class CpuFeatures:
    """What this process's PyTorch sees of the processor."""

    capability: str  # torch's vector ISA: "AVX512", "AVX2", "DEFAULT" (e.g. ARM)...
    onednn_bf16: bool  # oneDNN runs bf16 matmuls natively (AVX512-BF16 or AMX), not emulated
    flags: tuple[str, ...]  # the BF16_FLAGS the CPU reports
    limits: tuple[str, ...]  # AVX2_ONLY_ENV variables set in this process

    def describe(self) -> str:
        """E.g. "CPU flags avx512_bf16 amx_bf16; torch capability AVX512; oneDNN bf16 native"."""
        text = (f"CPU flags {' '.join(self.flags) or 'none of ' + '/'.join(BF16_FLAGS)}; torch capability "
                f"{self.capability}; oneDNN bf16 {'native' if self.onednn_bf16 else 'not native'}")
        return text + (f"; limited by {', '.join(self.limits)}" if self.limits else "")


def cpu_features() -> CpuFeatures:
    """Read the processor's bf16-relevant flags and what torch and oneDNN make of them in this process."""
    cpuinfo = Path("/proc/cpuinfo")
    words = set(cpuinfo.read_text().split()) if cpuinfo.exists() else set()
    return CpuFeatures(
        capability=torch.backends.cpu.get_cpu_capability(),
        onednn_bf16=bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        flags=tuple(flag for flag in BF16_FLAGS if flag in words),
        limits=tuple(f"{k}={os.environ[k]}" for k in AVX2_ONLY_ENV if k in os.environ),
    )


def choose_compute_dtype(requested: str, on_gpu: bool | None = None) -> tuple[str, str]:
    """(dtype name, why) for a profile's compute_dtype: "auto" picks bf16 only where it is computed natively."""
    if requested not in (AUTO, *DTYPES):
        raise ValueError(f"compute_dtype must be one of {AUTO}, {', '.join(DTYPES)}; got {requested!r}.")
    if requested != AUTO:
        return requested, f"{requested}, set explicitly"
    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    if on_gpu:
        if torch.cuda.is_bf16_supported():
            return "bfloat16", f"auto: {torch.cuda.get_device_name(0)} computes bf16 natively"
        return "float32", f"auto: {torch.cuda.get_device_name(0)} has no bf16 (pre-Ampere); fp16 overflows Gemma"
    features = cpu_features()
    if features.onednn_bf16:
        return "bfloat16", f"auto: this CPU computes bf16 natively ({features.describe()})"
    return "float32", (f"auto: no native bf16 on this CPU, where bf16 is emulated and several times slower "
                       f"({features.describe()}; {platform.machine()})")


def auto_choice_in(env: dict) -> dict:
    """What compute_dtype="auto" picks on the CPU in a fresh process with env set (e.g. AVX2_ONLY_ENV):
    {"dtype", "reason", "capability", "onednn_bf16"}."""
    code = ("import json; from utils import precision; f = precision.cpu_features(); "
            "d, why = precision.choose_compute_dtype('auto', on_gpu=False); "
            "print(json.dumps({'dtype': d, 'reason': why, 'capability': f.capability, 'onednn_bf16': f.onednn_bf16}))")
    run = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent,
                         env={**os.environ, **env}, capture_output=True, text=True, timeout=300, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    """`python -m utils.precision [--avx2-only | --no-amx] [-- COMMAND ...]`: print the choice, or run COMMAND under
    it."""
    parser = argparse.ArgumentParser(prog="python -m utils.precision", description=main.__doc__)
    parser.add_argument("--avx2-only", action="store_true",
                        help="reproduce an AVX2-only x86 processor (no AVX512, no native bf16) for COMMAND")
    parser.add_argument("--no-amx", action="store_true",
                        help="hide AMX from oneDNN, keeping AVX512-BF16 (an AMX Xeon computing like an AMD EPYC "
                             "without AMX; unverified) for COMMAND")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="e.g. make tutorial; without it, print the choice")
    args = parser.parse_args(argv)
    if args.avx2_only and args.no_amx:
        parser.error("pick one of --avx2-only and --no-amx")
    env = AVX2_ONLY_ENV if args.avx2_only else NO_AMX_ENV if args.no_amx else {}
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if command:
        return subprocess.call(command, env={**os.environ, **env})
    print(json.dumps(auto_choice_in(env), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
