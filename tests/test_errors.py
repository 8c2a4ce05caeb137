"""Every learner mistake gets one paragraph naming the cause and the fix; a killed conversion never sticks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from utils import data, memory, models
from utils.errors import CourseError
from utils.profiles import get_profile

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_profile_without_cuda_says_to_use_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(CourseError, match=r"needs a CUDA GPU.*PROFILE='cpu'"):
        models.check_device(get_profile("rtx4090"))


def test_too_little_gpu_memory_names_estimate_and_fix():
    with pytest.raises(CourseError, match=r"needs about \d+\.\d GiB .* only 8\.0 GiB is free.*lower batch_size"):
        memory.check_fits(get_profile("rtx4090"), free_gib=8.0)
    memory.check_fits(get_profile("rtx4090"), free_gib=23.0)  # the profile is sized to fit a 24 GB card


def test_max_length_shorter_than_prompts_says_what_share_is_cut(tokenizer):
    train = data.load_sft_dataset("data/ultrachat_mini", max_rows=40)["train_sft"]
    with pytest.raises(data.DataError, match=r"max_length=16 is too short.*100% of training conversations would be "
                                              r"dropped or truncated"):
        data.check_max_length(tokenizer, train, 16)
    counts = data.check_max_length(tokenizer, train, 256)
    assert (counts["rows"], counts["dropped"], counts["cut"]) == (40, 0, 0)


@pytest.mark.slow
def test_conversion_killed_midway_converts_cleanly_next_time(tmp_path):
    """Kill the first-use conversion part way, then start again: it must convert and load."""
    env = {**os.environ, "COURSE_CACHE": str(tmp_path)}
    code = "from utils.models import ensure_embedded_model; print(ensure_embedded_model())"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, start_new_session=True)
    time.sleep(12)  # into the GGUF de-quantization, well before the checkpoint is renamed into place
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    target = tmp_path / models.EMBEDDED_DIR_NAME
    assert not (target / "model.safetensors").exists(), "killed too late: pick an earlier moment"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert models._is_complete(target) and not list(tmp_path.glob(".converting-*"))
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(target).num_parameters() > 200e6


def test_corrupt_cache_is_converted_again_with_a_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))
    target = tmp_path / models.EMBEDDED_DIR_NAME
    target.mkdir()
    (target / "config.json").write_text("{}")  # a half-written cache: no weights, no tokenizer
    converted = []

    def fake_convert(path):  # the real conversion is covered by the slow test above
        converted.append(path)
        path.mkdir(exist_ok=True)
        for name in models.REQUIRED_FILES:
            (path / name).write_text("x")

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    assert models.ensure_embedded_model() == target and converted == [target]
    assert "incomplete or corrupt; converting it again" in capsys.readouterr().out
