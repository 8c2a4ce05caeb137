"""Recorded metrics and the manifest hand-over between notebooks."""

from __future__ import annotations

import dataclasses
import json

import pytest

from utils import report
from utils.errors import CourseError


def test_record_merges_metrics(tmp_path):
    report.record(tmp_path, "a/x", 1)
    report.record(tmp_path, "b/y", 2.5)
    report.record(tmp_path, "a/x", 3)
    assert report.load_metrics(tmp_path) == {"a/x": 3.0, "b/y": 2.5}
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"a/x": 3.0, "b/y": 2.5}


def test_record_metrics_records_a_section_at_once(tmp_path):
    report.record(tmp_path, "a/x", 1)
    assert report.record_metrics(tmp_path, {"a/x": 2, "b/y": True}) == {"a/x": 2.0, "b/y": 1.0}
    assert report.load_metrics(tmp_path) == {"a/x": 2.0, "b/y": 1.0}
    assert report.recorded_since_cleared(tmp_path) == {"a/x": 2.0, "b/y": 1.0}


def test_recorded_since_cleared_counts_a_value_recorded_again_unchanged(tmp_path):
    report.record(tmp_path, "a/x", 1)
    report.clear_recorded(tmp_path)
    assert report.recorded_since_cleared(tmp_path) == {}
    report.record(tmp_path, "a/x", 1)  # a rerun measuring the same: still this notebook's metric
    report.record(tmp_path, "b/y", 2)
    assert report.recorded_since_cleared(tmp_path) == {"a/x": 1.0, "b/y": 2.0}


def test_manifest_carries_the_whole_profile_and_the_configs(tmp_path):
    from peft import LoraConfig

    from utils.profiles import get_profile

    profile = get_profile("cpu", sft_lr=3e-4)
    configs = report.config_dicts({"lora": LoraConfig(r=4, target_modules=["q_proj", "v_proj"])})
    report.write_manifest(tmp_path, "sft", profile, configs, adapter_dir="x")
    manifest = report.read_manifest(tmp_path, "sft", made_by="notebook 02")
    assert manifest["profile"] == dataclasses.asdict(profile) and manifest["profile"]["sft_lr"] == 3e-4
    lora = manifest["configs"]["lora"]
    assert lora["r"] == 4 and lora["target_modules"] == ["q_proj", "v_proj"]  # a set, stored sorted
    assert manifest["adapter_dir"] == "x"


def test_missing_manifest_says_which_notebook_to_run(tmp_path):
    with pytest.raises(CourseError, match="Run notebook 02 first.*make tutorial"):
        report.read_manifest(tmp_path, "sft", made_by="notebook 02")


def test_output_dir_default_and_override(tmp_path):
    assert report.output_dir("cpu", tmp_path / "o") == (tmp_path / "o").resolve()
    assert report.output_dir("cpu").parts[-2:] == ("outputs", "cpu")
