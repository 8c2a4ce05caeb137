"""Run profiles: lookup, overrides, auto, and the model fields (tests/test_recipes.py builds their configs)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from utils import profiles
from utils.errors import CourseError


def test_named_profiles_are_complete_and_distinct():
    cpu, gpu = profiles.get_profile("cpu"), profiles.get_profile("rtx4090")
    assert cpu.model_id == profiles.EMBEDDED_MODEL_ID and gpu.model_id == "google/gemma-7b"
    assert gpu.max_length == 1024 and gpu.load_in_4bit and gpu.compute_dtype == "bfloat16" and gpu.budget_hours == 2
    long = profiles.get_profile("rtx4090-long")
    assert long.max_length == 2048 and long.sft_steps > gpu.sft_steps and long.budget_hours is None
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
    with pytest.raises(CourseError, match="cpu, rtx4090, rtx4090-long, rtx4090-dryrun, auto"):
        profiles.get_profile("nosuch")


def test_unknown_field_lists_known_fields():
    with pytest.raises(CourseError, match="sft_stepz.*Known fields: .*sft_steps"):
        profiles.get_profile("cpu", sft_stepz=3)


def test_none_overrides_keep_the_profile_value():
    assert profiles.get_profile("cpu", sft_steps=None).sft_steps == profiles.PROFILES["cpu"].sft_steps
    assert profiles.get_profile("cpu", sft_steps=3).sft_steps == 3


def test_only_the_profile_module_knows_the_embedded_model_id():
    assert profiles.uses_embedded_model(profiles.get_profile("cpu"))
    assert not profiles.uses_embedded_model(profiles.get_profile("rtx4090"))
    root = Path(__file__).resolve().parent.parent
    for path in [*root.glob("utils/*.py"), *root.glob("scripts/*.py"), *root.glob("benchmarks/*.py")]:
        if path.name != "profiles.py":
            assert "EMBEDDED_MODEL_ID" not in path.read_text(), path


def test_describe_lists_every_field():
    text = profiles.describe(profiles.get_profile("cpu"))
    assert all(f.name in text for f in dataclasses.fields(profiles.Profile))


def test_unknown_notebook_parameter_is_named():
    with pytest.raises(CourseError, match=r"\['SFT_STEP'\].*PROFILE, OUTPUT_DIR, SFT_STEPS"):
        profiles.check_parameters({"PROFILE": "cpu", "SFT_STEP": 3, "pd": None}, ["PROFILE", "OUTPUT_DIR", "SFT_STEPS"])
    profiles.check_parameters({"PROFILE": "cpu", "In": [], "_": None}, ["PROFILE", "OUTPUT_DIR"])
