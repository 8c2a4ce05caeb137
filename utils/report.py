"""Recording what a notebook measured (metrics.json) and what it produced (manifest.json)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from utils.errors import CourseError


def write_json(path: str | Path, data: dict) -> Path:
    """Write data as indented JSON at path (its folders made), atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)  # atomic: a killed run never leaves half a file
    return path


RECORD_LOG = "recorded.log"  # the names recorded since the course runner last cleared it: what one notebook measured


def record(out_dir: str | Path, name: str, value: float) -> float:
    """Merge one metric into <out_dir>/metrics.json (and its name into recorded.log); returns the value."""
    path = Path(out_dir) / "metrics.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[name] = float(value)
    write_json(path, data)
    with open(Path(out_dir) / RECORD_LOG, "a") as log:
        log.write(name + "\n")
    return float(value)


def record_metrics(out_dir: str | Path, metrics: dict[str, float]) -> dict[str, float]:
    """Record a section's metrics at once (each as `record` does); returns them as floats."""
    return {name: record(out_dir, name, value) for name, value in metrics.items()}


def recorded_since_cleared(out_dir: str | Path) -> dict[str, float]:
    """The metrics recorded (even with an unchanged value) since clear_recorded, with their values."""
    log = Path(out_dir) / RECORD_LOG
    names = set(log.read_text().split()) if log.exists() else set()
    return {k: v for k, v in load_metrics(out_dir).items() if k in names}


def clear_recorded(out_dir: str | Path) -> None:
    """Start a new recorded.log (the course runner does before each notebook)."""
    (Path(out_dir) / RECORD_LOG).unlink(missing_ok=True)


def load_metrics(out_dir: str | Path) -> dict[str, float]:
    """All metrics recorded so far under out_dir."""
    path = Path(out_dir) / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _plain(value):
    """A JSON-ready form of what configs hold: sets sorted, dtypes and enums as text."""
    return sorted(value, key=str) if isinstance(value, set | frozenset) else str(value)


def config_as_dict(config) -> dict:
    """A BitsAndBytesConfig, LoraConfig, SFTConfig or DPOConfig as a JSON-ready dict of its arguments."""
    return json.loads(json.dumps(config.to_dict(), sort_keys=True, default=_plain))


def config_dicts(configs: dict) -> dict[str, dict]:
    """{name: config_as_dict(config)}: take it before training, since PEFT rewrites a LoraConfig it is given."""
    return {name: config_as_dict(config) for name, config in configs.items()}


def write_manifest(out_dir: str | Path, name: str, profile, configs: dict[str, dict], **data) -> Path:
    """Save <out_dir>/<name>/manifest.json, the hand-over to the next stage: the whole profile, the configs, data.

    Notebooks and scripts both write it with this function; `configs` are config_as_dict records.
    """
    path = Path(out_dir) / name / "manifest.json"
    write_json(path, {"profile": asdict(profile), "configs": configs, **data})
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


def bench_results(name: str = "bench") -> dict:
    """Committed benchmark results, benchmarks/results/<name>.json: `make bench` ("bench"), `make bench-learning`
    ("learning"), `make bench-frontier` ("frontier")."""
    return json.loads((Path(__file__).resolve().parent.parent / "benchmarks" / "results" / f"{name}.json").read_text())


def output_dir(profile_name: str, override: str | Path | None = None) -> Path:
    """Where a run writes: the override if given, else outputs/<profile> at the repository root."""
    root = Path(__file__).resolve().parent.parent
    path = Path(override) if override else root / "outputs" / profile_name
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()
