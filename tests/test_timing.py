"""The speed probes behind `make check` and `make bench`: matmul throughput, a timed SFT step, the forecast."""

from __future__ import annotations

import math

import pytest
import torch

from utils import models, timing
from utils.profiles import get_profile


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_gflops_is_a_positive_rate(dtype):
    assert 0 < timing.matmul_gflops(dtype, m=64, k=64, n=64, seconds=0.01) < 1e6


def test_one_sft_step_of_the_course_set_up_is_timed(tmp_path):
    tiny = models.save_tiny_gemma(tmp_path / "tiny")
    profile = get_profile("cpu", model_id=str(tiny), load_in_4bit=False, max_length=128, batch_size=2)
    seconds = timing.time_sft_step(profile)
    assert math.isfinite(seconds) and seconds > 0


def test_the_forecast_grows_with_the_step_time_and_exists_for_the_cpu_profile_only():
    cpu = get_profile("cpu")
    assert 0 < timing.predict_course_minutes(cpu, 5.0) < timing.predict_course_minutes(cpu, 20.0)
    assert timing.predict_course_minutes(get_profile("rtx4090"), 5.0) is None
