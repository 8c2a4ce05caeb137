"""Recording what a notebook measured (metrics.json) and what it produced (manifest.json)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from utils.errors import CourseError


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)  # atomic: a killed run never leaves half a file


def record(out_dir: str | Path, name: str, value: float) -> float:
    """Merge one metric into <out_dir>/metrics.json; returns the value."""
    path = Path(out_dir) / "metrics.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[name] = float(value)
    _write_json(path, data)
    return float(value)


def load_metrics(out_dir: str | Path) -> dict[str, float]:
    """All metrics recorded so far under out_dir."""
    path = Path(out_dir) / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else {}


def write_manifest(out_dir: str | Path, name: str, data: dict) -> Path:
    """Save <out_dir>/<name>/manifest.json, the hand-over from one notebook to the next."""
    path = Path(out_dir) / name / "manifest.json"
    _write_json(path, data)
    return path


def read_manifest(out_dir: str | Path, name: str, made_by: str) -> dict:
    """Read a manifest written by an earlier notebook, or explain which notebook to run first."""
    path = Path(out_dir) / name / "manifest.json"
    if not path.exists():
        raise CourseError(
            f"{path} does not exist: this notebook needs what {made_by} saves. Run {made_by} first "
            f"with the same OUTPUT_DIR ({out_dir}), or run the whole course with `make tutorial`."
        )
    return json.loads(path.read_text())


def output_dir(profile_name: str, override: str | Path | None = None) -> Path:
    """Where a run writes: the override if given, else outputs/<profile> at the repository root."""
    root = Path(__file__).resolve().parent.parent
    path = Path(override) if override else root / "outputs" / profile_name
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()
