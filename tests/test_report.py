"""Recorded metrics and the manifest hand-over between notebooks."""

from __future__ import annotations

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


def test_manifest_round_trip(tmp_path):
    report.write_manifest(tmp_path, "sft", {"adapter_dir": "x"})
    assert report.read_manifest(tmp_path, "sft", made_by="notebook 02") == {"adapter_dir": "x"}


def test_missing_manifest_says_which_notebook_to_run(tmp_path):
    with pytest.raises(CourseError, match="Run notebook 02 first.*make tutorial"):
        report.read_manifest(tmp_path, "sft", made_by="notebook 02")


def test_output_dir_default_and_override(tmp_path):
    assert report.output_dir("cpu", tmp_path / "o") == (tmp_path / "o").resolve()
    assert report.output_dir("cpu").parts[-2:] == ("outputs", "cpu")
