"""Several processes under `accelerate launch`: which one this is, rank-prefixed logs, how the model is split."""

from __future__ import annotations

import os

import torch
from accelerate import PartialState


def state() -> PartialState:
    """This process's place in the run (a single process without a launcher); CPU runs talk over gloo."""
    return PartialState(cpu=not torch.cuda.is_available())


def log(message: str) -> None:
    """Print with the rank in front, e.g. "[rank 1/2] trained 4 steps", from every process."""
    current = state()
    print(f"[rank {current.process_index}/{current.num_processes}] {message}", flush=True)


def strategy() -> str:
    """How the launcher splits the model: "fsdp", "zero3" (DeepSpeed ZeRO-3), else "ddp" (a full copy per GPU)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" \
            and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
        return "zero3"
    return "ddp"


def world_size() -> int:
    """Number of processes in the run (WORLD_SIZE, set by the launcher), 1 without one."""
    return int(os.environ.get("WORLD_SIZE", 1))


def device_map() -> dict | None:
    """from_pretrained's device_map: this process's GPU; None on the CPU or when FSDP/ZeRO-3 place the shards."""
    if not torch.cuda.is_available() or strategy() != "ddp":
        return None
    return {"": int(os.environ.get("LOCAL_RANK", 0))}


def save_model(trainer, path) -> None:
    """Save the trained adapter to path; every process takes part, only the main one writes.

    Under FSDP the shards are gathered first, so that the file is a normal adapter from_pretrained can read.
    """
    if trainer.is_fsdp_enabled:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(path))
