"""The course runner: exit codes, the failure paragraph, summary.md and HTML copies, --check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from utils import run

ROOT = Path(__file__).resolve().parent.parent


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "utils.run", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_unknown_profile_exits_2_and_names_the_valid_ones():
    result = _cli("--profile", "nosuch")
    assert result.returncode == 2
    assert all(name in result.stderr for name in ("cpu", "rtx4090", "auto"))


@pytest.mark.parametrize("spelling", ["--output_dir", "--output-dir"])  # the scripts' spelling, and an alias
def test_output_dir_is_spelled_as_in_the_scripts(spelling, tmp_path):
    result = _cli("--profile", "cpu", "--only", "07", spelling, str(tmp_path))
    assert result.returncode == 2 and "07" in result.stderr  # parsed; the bad notebook number is the error


def test_unknown_notebook_number_exits_2():
    result = _cli("--profile", "cpu", "--only", "07")
    assert result.returncode == 2 and "07" in result.stderr


@pytest.mark.slow
@pytest.mark.processor
def test_check_reports_machine_precision_and_a_timed_forecast():
    result = subprocess.run([sys.executable, "-m", "utils.run", "--check", "--profile", "cpu"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["auto_profile"] in ("cpu", "rtx4090") and info["profile"] == "cpu"
    assert info["ram_gib"] > 0 and info["estimated_training_gib"] > 0
    assert info["compute_dtype"] in ("bfloat16", "float32") and info["compute_dtype_reason"].startswith("auto:")
    assert info["sft_step_seconds"] > 0 and info["predicted_course_minutes"] > info["sft_step_seconds"] / 60


def test_check_prints_the_rtx4090_memory_plan_and_a_forecast_within_its_budget():
    result = _cli("--check", "--profile", "rtx4090")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["forecast"]["gpu"] == "NVIDIA GeForce RTX 4090" and info["forecast"]["fits_budget"] is True
    assert 0 < info["predicted_course_minutes"] <= 120 == info["forecast"]["budget_minutes"]
    assert "| 02 | SFT training, 125 steps |" in result.stderr and "within the profile's budget of 2 h" in result.stderr
    plan = info["memory_plan"]
    assert [row["where"] for row in plan] == ["02, scripts/sft.py", *["04, scripts/dpo.py"] * 3, "04"]
    assert all(row["gpu_gib"] <= 24 and row["host_gib"] <= 32 for row in plan), plan
    assert "4bit" in plan[-1]["step"] and plan[-1]["gpu_gib"] > 0


def _notebook(path: Path, code: str) -> None:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('PROFILE = "auto"\nOUTPUT_DIR = None')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(code)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.fixture
def fake_course(tmp_path, monkeypatch):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    _notebook(folder / "01_ok.ipynb", "from utils import report\nreport.record(OUTPUT_DIR, 'ok/value', 42)")
    _notebook(folder / "02_broken.ipynb", "raise ValueError('deliberate failure')")
    _notebook(folder / "03_never.ipynb", "print('not reached')")
    monkeypatch.setattr(run, "NOTEBOOK_DIR", folder)
    return tmp_path


def test_run_stops_at_first_failure_with_one_paragraph(fake_course, capsys):
    out = fake_course / "out"
    assert run.run_course("cpu", out) == 1
    err = capsys.readouterr().err
    assert "02_broken.ipynb" in err and "ValueError" in err and "deliberate failure" in err and str(out) in err
    summary = (out / "summary.md").read_text()
    assert "01_ok.ipynb | ok" in summary and "ok/value = 42" in summary and "02_broken.ipynb | failed" in summary
    assert "03_never" not in summary
    assert (out / "01_ok.html").exists() and (out / run.INCOMPLETE).exists()


def test_successful_run_writes_html_and_clears_the_incomplete_marker(fake_course):
    out = fake_course / "out"
    assert run.run_course("cpu", out, only=["01"]) == 0
    assert (out / "01_ok.ipynb").exists() and (out / "01_ok.html").exists()
    assert not (out / run.INCOMPLETE).exists()
    assert run.run_course("cpu", out, only=["01"]) == 0  # again: the same value is still what 01 recorded
    assert "ok/value = 42" in (out / "summary.md").read_text()
