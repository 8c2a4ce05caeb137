"""Run bookkeeping: which plan a checkpoint folder belongs to, whether it finished, and where to resume."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path

PLAN_FILE = "run_plan.json"
NOT_PLAN = {"output_dir", "logging_dir", "disable_tqdm", "report_to", "logging_steps", "save_total_limit", "local_rank",
            "hub_token", "project", "run_name", "trackio_static_space_id"}


def _plan(config, inputs: dict) -> dict:
    """What makes two runs the same run: the trainer settings that shape training, and its inputs."""
    settings = {k: v for k, v in config.to_dict().items() if k not in NOT_PLAN}
    as_json = json.dumps({"settings": settings, "inputs": inputs}, sort_keys=True,
                         default=lambda o: asdict(o) if is_dataclass(o) else str(o))
    return json.loads(as_json)


def resume_point_or_clear(config, inputs: dict) -> str | None:
    """The checkpoint to resume an unfinished run of exactly this plan (config and inputs) from; else clear the folder.

    Clearing removes config.output_dir when it holds a finished run or one of another plan (other settings or inputs,
    another SFT model, beta...): resuming those would mix two runs. Returns None when training starts afresh.
    """
    out = Path(config.output_dir)
    plan, saved = _plan(config, inputs), out / PLAN_FILE
    previous = json.loads(saved.read_text()) if saved.is_file() else None
    if previous == {"plan": plan, "finished": False}:
        found = last_checkpoint(out)
        if found:
            print(f"Resuming from {found}: the steps already done are not repeated.")
        return found
    if last_checkpoint(out):
        why = "a finished run" if previous and previous["plan"] == plan else "a run with other settings or inputs"
        print(f"Checkpoints in {out} belong to {why}: starting over.")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    saved.write_text(json.dumps({"plan": plan, "finished": False}, indent=1))
    return None


def mark_finished(config) -> None:
    """Record that the run in config.output_dir completed, so that running it again trains afresh."""
    saved = Path(config.output_dir) / PLAN_FILE
    saved.write_text(json.dumps({**json.loads(saved.read_text()), "finished": True}, indent=1))


@contextmanager
def resumable(config, inputs: dict) -> Iterator[str | None]:
    """Around `trainer.train`: yields the checkpoint an interrupted run of this plan resumes from (None: afresh), and
    marks the run finished when the block completes, so that the next run trains afresh (resume_point_or_clear)."""
    yield resume_point_or_clear(config, inputs)
    mark_finished(config)


def last_checkpoint(output_dir: str | Path) -> str | None:
    """The newest complete checkpoint-N folder under output_dir, to resume from (None if there is none).

    A run killed while saving leaves a checkpoint without trainer_state.json (the Trainer writes it last): skipped.
    """
    folders = [p for p in Path(output_dir).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    complete = [p for p in folders if (p / "trainer_state.json").is_file()]
    return str(max(complete, key=lambda p: int(p.name.split("-")[-1]))) if complete else None
