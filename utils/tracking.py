"""A live training dashboard: trackio (Hugging Face's local tracker) writing under the run's output folder, offline."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from utils.errors import CourseError
from utils.profiles import Profile

PROJECT = "gemma-course"
CHOICES = ("none", "trackio")


def trainer_args(profile: Profile, stage: str) -> dict:
    """The TRL config's report_to, plus trackio's project and a run name such as "sft-rtx4090-20261129-101500"."""
    if profile.report_to not in CHOICES:
        raise CourseError(f"report_to={profile.report_to!r} is not one of {', '.join(CHOICES)}: the course logs to "
                          "nothing or to a local trackio dashboard, never to an online service.")
    if profile.report_to == "none":
        return {"report_to": "none"}
    run_name = f"{stage}-{profile.name}-{time.strftime('%Y%m%d-%H%M%S')}"  # a new dashboard line per run
    return {"report_to": "trackio", "project": PROJECT, "run_name": run_name,
            "trackio_static_space_id": False}  # False: no Hub Space is made when a model is pushed


def dashboard_dir(out_dir: str | Path) -> Path:
    """Where trackio keeps a run's metrics: <out_dir>/trackio (a SQLite file per project)."""
    return Path(out_dir).resolve() / "trackio"


def start(profile: Profile, out_dir: str | Path) -> Path | None:
    """With report_to="trackio": send the metrics to dashboard_dir(out_dir) and print how to open the dashboard."""
    if profile.report_to != "trackio":
        return None
    target = dashboard_dir(out_dir)
    os.environ["TRACKIO_DIR"] = str(target)  # trackio reads it once, when first imported (by the trainer)
    already = sys.modules.get("trackio.utils")
    if already is not None and Path(already.TRACKIO_DIR).resolve() != target:
        print(f"trackio was imported earlier in this process and keeps writing to {already.TRACKIO_DIR}; restart the "
              f"kernel (or the script) to write to {target}.")
        target = Path(already.TRACKIO_DIR).resolve()
    print(f"Live dashboard (trackio, local): TRACKIO_DIR={target} trackio show --project {PROJECT}")
    return target
