"""The compute precision: bf16 only where the processor computes it natively, and the AVX2-only reproduction."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from utils import precision
from utils.errors import CourseError
from utils.profiles import get_profile

ROOT = Path(__file__).resolve().parent.parent


def _features(native: bool) -> precision.CpuFeatures:
    return precision.CpuFeatures(capability="AVX512" if native else "AVX2", onednn_bf16=native,
                                 flags=("avx512_bf16", "avx2") if native else ("avx2",), limits=())


@pytest.mark.parametrize("native, expected", [(True, "bfloat16"), (False, "float32")])
def test_auto_follows_native_bf16(monkeypatch, native, expected):
    monkeypatch.setattr(precision, "cpu_features", lambda: _features(native))
    dtype, reason = precision.choose_compute_dtype("auto", on_gpu=False)
    assert dtype == expected
    assert reason.startswith("auto:") and ("avx512_bf16" in reason) == native  # the reason names the flags found


def test_a_forced_value_wins_over_the_hardware(monkeypatch):
    monkeypatch.setattr(precision, "cpu_features", lambda: _features(False))
    assert precision.choose_compute_dtype("bfloat16", on_gpu=False) == ("bfloat16", "bfloat16, set explicitly")
    profile = get_profile("cpu", compute_dtype="bfloat16")
    assert profile.compute_dtype == "bfloat16" and "explicitly" in profile.compute_dtype_reason


def test_the_cpu_profile_resolves_auto_and_says_why(monkeypatch):
    for native, expected in [(True, "bfloat16"), (False, "float32")]:
        monkeypatch.setattr(precision, "cpu_features", lambda native=native: _features(native))
        profile = get_profile("cpu")
        assert profile.compute_dtype == expected and profile.compute_dtype_reason.startswith("auto:")


def test_an_unknown_dtype_is_refused():
    with pytest.raises(CourseError, match="compute_dtype must be one of auto, bfloat16, float32"):
        get_profile("cpu", compute_dtype="fp16")


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the AVX2 reproduction is for x86 processors")
def test_the_avx2_reproduction_turns_native_bf16_off():
    """Under AVX2_ONLY_ENV torch sees an AVX2 processor without native bf16, whatever this one has."""
    found = precision.auto_choice_in(precision.AVX2_ONLY_ENV)
    assert (found["capability"], found["onednn_bf16"], found["dtype"]) == ("AVX2", False, "float32")
    assert "limited by ATEN_CPU_CAPABILITY=avx2" in found["reason"]


def _sft_steps(tmp_path: Path, env: dict) -> str:
    """Two real SFT steps of the embedded Gemma (cpu profile, few rows) by scripts/sft.py; returns its log."""
    cmd = [sys.executable, "scripts/sft.py", "--profile", "cpu", "--output_dir", str(tmp_path), "--sft_steps", "2",
           "--batch_size", "2", "--sft_train_rows", "8", "--sft_eval_rows", "2", "--save_steps", "100"]
    run = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "trained 2 steps" in run.stdout, run.stdout
    return run.stdout


@pytest.mark.slow
@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the AVX2 reproduction is for x86 processors")
def test_real_sft_steps_compute_in_fp32_on_an_avx2_only_processor(tmp_path):
    assert "computing in float32 (auto: no native bf16" in _sft_steps(tmp_path, precision.AVX2_ONLY_ENV)


@pytest.mark.skipif("avx512_bf16" not in precision.cpu_features().flags, reason="needs a processor with AVX512-BF16")
def test_hiding_amx_keeps_native_bf16_on_an_avx512_bf16_processor():
    """The no-AMX reproduction leaves AVX512-BF16 to oneDNN: bf16 stays native, as on an AMD EPYC without AMX."""
    found = precision.auto_choice_in(precision.NO_AMX_ENV)
    assert (found["onednn_bf16"], found["dtype"]) == (True, "bfloat16")
    assert "limited by ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16" in found["reason"]
