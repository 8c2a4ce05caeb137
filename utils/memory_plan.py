"""The memory plan: what each step of notebooks 02 and 04 holds at once on the GPU and the host.

memory.py's estimates with the loading decisions of models.py, which imports memory: so the plan is a module of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from utils import models
from utils.memory import (
    GIB,
    PROCESS_HOST_BYTES,
    estimate_dpo_profile,
    estimate_eval,
    estimate_profile,
    model_bytes,
    shape_for_profile,
    to_markdown,
)
from utils.profiles import needs_gpu


@dataclass(frozen=True)
class PlanStep:
    """What one step of the course holds at once, in bytes of GPU memory and of host RAM."""

    where: str
    step: str
    gpu: int
    host: int

    def as_row(self) -> dict[str, str | float]:
        """The step with its GPU and host memory in GiB (1 decimal), for a table."""
        return {"where": self.where, "step": self.step, "gpu_gib": round(self.gpu / GIB, 1),
                "host_gib": round(self.host / GIB, 1)}


def plan(profile, cuda: bool | None = None) -> list[PlanStep]:
    """GPU and host memory of each step of notebooks 02 and 04 (the scripts run the same steps) for a profile.

    cuda: whether a CUDA GPU runs it; default: the profile needs one, or there is one (the trainers then use it).
    The loading decisions are the ones models.py makes: models.eval_load_kwargs, models.merge_dtype.
    """
    cuda = (needs_gpu(profile) or torch.cuda.is_available()) if cuda is None else cuda
    shape = shape_for_profile(profile)
    stream = shape.n_embed_params * 4  # the largest tensor, read or written at once while loading or saving (fp32)

    def held(where: str, step: str, device_bytes: int, on_gpu: bool) -> PlanStep:
        if on_gpu:
            return PlanStep(where, step, device_bytes, PROCESS_HOST_BYTES + stream)
        return PlanStep(where, step, 0, PROCESS_HOST_BYTES + device_bytes)

    merge_dtype = str(models.merge_dtype(profile)).removeprefix("torch.")
    merge = model_bytes(shape, merge_dtype) + stream
    eval_kwargs = models.eval_load_kwargs(profile, cuda)
    evaluation = estimate_eval(profile)
    return [
        held("02, scripts/sft.py", f"SFT: base in 4-bit with LoRA{' and turn-token rows' * profile.train_turn_tokens}"
             f", batch {profile.batch_size} x {profile.max_length} tokens; generation with it",
             estimate_profile(profile).total, cuda),
        held("04, scripts/dpo.py", f"merge the SFT adapter into the base in {merge_dtype}, on the CPU", merge, False),
        held("04, scripts/dpo.py", f"DPO: merged model in 4-bit with LoRA, {profile.dpo_batch_size} pair(s) x "
             f"{profile.max_length} tokens; the reference is the same weights with the adapter disabled",
             estimate_dpo_profile(profile).total, cuda),
        held("04, scripts/dpo.py", f"merge the DPO adapter in {merge_dtype}, on the CPU", merge, False),
        held("04", f"evaluation: base, SFT and DPO models one at a time (models.load_for_eval, "
             f"{profile.eval_precision}), each freed after use", evaluation, "device_map" in eval_kwargs),
    ]


def describe_plan(profile, cuda: bool | None = None) -> str:
    """The plan as a markdown table with its peaks."""
    steps = plan(profile, cuda)
    peaks = (f"peaks: GPU {max(s.gpu for s in steps) / GIB:.1f} GiB, host {max(s.host for s in steps) / GIB:.1f} GiB "
             f"(profile {profile.name})")
    return to_markdown([s.as_row() for s in steps]) + "\n" + peaks
