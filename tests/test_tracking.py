"""The live dashboard: report_to from the profile, trackio pointed at the run's folder, and resuming unaffected."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from utils import recipes, resume, tracking
from utils.errors import CourseError
from utils.profiles import get_profile

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("make, stage", [(recipes.sft_config, "sft"), (recipes.dpo_config, "dpo")])
def test_report_to_comes_from_the_profile(tmp_path, make, stage):
    assert make(get_profile("cpu"), tmp_path).report_to == []  # "none": CI and minutes-long runs
    config = make(get_profile("rtx4090"), tmp_path)
    assert config.report_to == ["trackio"] and config.project == tracking.PROJECT
    assert config.run_name.startswith(f"{stage}-rtx4090-") and config.trackio_static_space_id is False
    assert make(get_profile("rtx4090", report_to="none"), tmp_path).report_to == []


def test_an_online_tracker_is_refused_by_name(tmp_path):
    with pytest.raises(CourseError, match=r"report_to='wandb' is not one of none, trackio"):
        recipes.sft_config(get_profile("cpu", report_to="wandb"), tmp_path)


def test_the_run_name_does_not_stop_an_interrupted_run_from_resuming(tmp_path):
    """Each run gets a new dashboard line (a timestamped name), yet resuming still recognises the same plan."""
    profile = get_profile("cpu", report_to="trackio")
    first = recipes.sft_config(profile, tmp_path, run_name="sft-cpu-first")
    assert resume.resume_point_or_clear(first, {"profile": profile}) is None
    checkpoint = tmp_path / "checkpoint-5"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text("{}")
    again = recipes.sft_config(profile, tmp_path, run_name="sft-cpu-second")
    assert resume.resume_point_or_clear(again, {"profile": profile}) == str(checkpoint)
    other = recipes.sft_config(profile, tmp_path, run_name="sft-cpu-third", learning_rate=1e-3)
    assert resume.resume_point_or_clear(other, {"profile": profile}) is None, "the control: another plan starts over"


def _start_then_import_trackio(out_dir: Path, import_first: str | None = None) -> dict:
    """In a fresh process: tracking.start(out_dir), trackio optionally imported first; then where trackio writes."""
    code = (
        "import json, os\n"
        + ("import trackio\n" if import_first else "")
        + "from utils import tracking\nfrom utils.profiles import get_profile\n"
        f"returned = tracking.start(get_profile('cpu', report_to='trackio'), {str(out_dir)!r})\n"
        "import trackio.utils\n"
        "print('RESULT ' + json.dumps({'returned': str(returned), 'writes_to': str(trackio.utils.TRACKIO_DIR)}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    env.pop("TRACKIO_DIR", None)
    if import_first:
        env["TRACKIO_DIR"] = import_first
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.split("RESULT ")[-1])
    return {**result, "stdout": run.stdout}


def test_start_sends_trackio_to_the_run_folder_and_says_how_to_open_it(tmp_path):
    result = _start_then_import_trackio(tmp_path)
    assert result["returned"] == result["writes_to"] == str(tmp_path.resolve() / "trackio")
    assert f"TRACKIO_DIR={tmp_path.resolve() / 'trackio'} trackio show --project gemma-course" in result["stdout"]


def test_start_after_trackio_was_imported_says_where_metrics_really_go(tmp_path):
    earlier = str(tmp_path / "earlier")
    result = _start_then_import_trackio(tmp_path / "run", import_first=earlier)
    assert result["returned"] == result["writes_to"] == earlier
    assert "restart the kernel" in result["stdout"]


def test_start_does_nothing_without_trackio(tmp_path, monkeypatch):
    monkeypatch.delenv("TRACKIO_DIR", raising=False)
    assert tracking.start(get_profile("cpu"), tmp_path) is None
    assert "TRACKIO_DIR" not in os.environ
