"""Run profiles: lookup, overrides, auto, and that every profile builds the TRL configs the notebooks use."""

from __future__ import annotations

import dataclasses

import pytest
from trl import DPOConfig, SFTConfig

from utils import profiles
from utils.errors import CourseError


def test_named_profiles_are_complete_and_distinct():
    cpu, gpu = profiles.get_profile("cpu"), profiles.get_profile("rtx4090")
    assert cpu.model_id == profiles.EMBEDDED_MODEL_ID and gpu.model_id == "google/gemma-7b"
    assert gpu.max_length == 2048 and gpu.load_in_4bit and gpu.compute_dtype == "bfloat16"
    assert gpu.sft_data == "HuggingFaceH4/ultrachat_200k" and gpu.pref_data == "HuggingFaceH4/ultrafeedback_binarized"
    assert cpu.load_in_4bit and "ultrachat_mini" in cpu.sft_data


def test_auto_picks_cpu_without_a_gpu(monkeypatch):
    monkeypatch.setattr(profiles, "gpu_memory_gib", lambda: None)
    assert profiles.get_profile("auto").name == "cpu"
    monkeypatch.setattr(profiles, "gpu_memory_gib", lambda: 24.0)
    assert profiles.get_profile("auto").name == "rtx4090"
    monkeypatch.setattr(profiles, "gpu_memory_gib", lambda: 12.0)
    assert profiles.get_profile("auto").name == "cpu"


def test_unknown_profile_names_the_valid_ones():
    with pytest.raises(CourseError, match="cpu, rtx4090, auto"):
        profiles.get_profile("nosuch")


def test_unknown_field_lists_known_fields():
    with pytest.raises(CourseError, match="sft_stepz.*Known fields: .*sft_steps"):
        profiles.get_profile("cpu", sft_stepz=3)


def test_none_overrides_keep_the_profile_value():
    assert profiles.get_profile("cpu", sft_steps=None).sft_steps == profiles.PROFILES["cpu"].sft_steps
    assert profiles.get_profile("cpu", sft_steps=3).sft_steps == 3


def test_describe_lists_every_field():
    text = profiles.describe(profiles.get_profile("cpu"))
    assert all(f.name in text for f in dataclasses.fields(profiles.Profile))


@pytest.mark.parametrize("name", sorted(profiles.PROFILES))
def test_every_profile_builds_trl_configs(tmp_path, name):
    """A renamed TRL argument fails here in seconds, not after twenty minutes of notebook."""
    p = profiles.get_profile(name)
    sft = SFTConfig(output_dir=str(tmp_path), max_length=p.max_length, assistant_only_loss=True,
                    per_device_train_batch_size=p.batch_size, gradient_accumulation_steps=p.grad_accum,
                    gradient_checkpointing=p.gradient_checkpointing, max_steps=p.sft_steps, learning_rate=p.sft_lr,
                    lr_scheduler_type="constant", train_sampling_strategy="group_by_length", save_steps=p.save_steps,
                    use_cpu=True, bf16=False, report_to="none", seed=p.seed)
    dpo = DPOConfig(output_dir=str(tmp_path), beta=p.dpo_beta, loss_type=["sigmoid", "sft"],
                    loss_weights=[1.0, 1.0], learning_rate=p.dpo_lr, max_length=p.max_length,
                    per_device_train_batch_size=p.dpo_batch_size, max_steps=p.dpo_steps, lr_scheduler_type="constant",
                    use_cpu=True, bf16=False, report_to="none")
    assert sft.max_length == p.max_length and sft.learning_rate == p.sft_lr
    assert dpo.beta == p.dpo_beta and dpo.learning_rate == p.dpo_lr != 1e-6


def test_unknown_notebook_parameter_is_named():
    with pytest.raises(CourseError, match=r"\['SFT_STEP'\].*PROFILE, OUTPUT_DIR, SFT_STEPS"):
        profiles.check_parameters({"PROFILE": "cpu", "SFT_STEP": 3, "pd": None}, ["PROFILE", "OUTPUT_DIR", "SFT_STEPS"])
    profiles.check_parameters({"PROFILE": "cpu", "In": [], "_": None}, ["PROFILE", "OUTPUT_DIR"])
