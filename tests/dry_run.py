"""Checks shared by the notebook and script tests of the rtx4090-dryrun profile: the GPU profile's branches taken."""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

from utils.precision import choose_compute_dtype
from utils.profiles import get_profile

PROFILE = "rtx4090-dryrun"


def stored_dtypes(checkpoint: Path) -> set[str]:
    """The dtypes of the tensors in a checkpoint folder's safetensors files, e.g. {"BF16"}."""
    dtypes = set()
    for path in checkpoint.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            dtypes |= {f.get_slice(name).get_dtype() for name in f.keys()}
    return dtypes


def check_trained_like_rtx4090(manifest: dict, stage: str) -> None:
    """A dry run's manifest (stage "sft" or "dpo") trained with rtx4090's settings: batch 1 x 16 accumulation, no
    padding-free batches, max_length 2048, bf16 where the CPU has it natively (the GPU's precision; fp32 on AVX2-only
    processors, where bf16 is 9x slower), checkpointing, LoRA dropout, trackio; its profile is the dry run's."""
    gpu = get_profile("rtx4090")
    assert manifest["profile"]["name"] == PROFILE and manifest["profile"]["eval_precision"] == gpu.eval_precision
    config, lora = manifest["configs"][stage], manifest["configs"]["lora"]
    batch = "per_device_train_batch_size"
    assert (config[batch], config["gradient_accumulation_steps"]) == (1, 16) == (gpu.batch_size, gpu.grad_accum)
    assert config["max_length"] == gpu.max_length == 2048
    native_bf16 = choose_compute_dtype("auto")[0] == "bfloat16"
    assert manifest["profile"]["compute_dtype"] == ("bfloat16" if native_bf16 else "float32")
    assert config["bf16"] is native_bf16 and config["gradient_checkpointing"] is True
    assert config["report_to"] == ["trackio"] and config["project"] == "gemma-course"
    assert lora["lora_dropout"] == gpu.lora_dropout == 0.05
    profile = get_profile(PROFILE)
    assert manifest["steps"] == (profile.sft_steps if stage == "sft" else profile.dpo_steps)
    if stage == "sft":
        assert config["padding_free"] is False and lora["trainable_token_indices"] == {"embed_tokens": [105, 106]}
        assert manifest["configs"]["quantization"]["bnb_4bit_compute_dtype"] == manifest["profile"]["compute_dtype"]
        assert config["save_steps"] == config["eval_steps"] == 1  # a checkpoint and an evaluation mid-run
