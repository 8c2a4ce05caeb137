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
    """A dry run's manifest (stage "sft" or "dpo") trained with rtx4090's settings: SFT on 4 packed rows x 4
    accumulation, DPO on 1 pair x 4, max_length 1024, bf16 where the CPU has it natively (the GPU's precision; fp32
    on AVX2-only processors, where bf16 is 9x slower), checkpointing, LoRA dropout, trackio; the dry run's profile."""
    gpu = get_profile("rtx4090")
    assert manifest["profile"]["name"] == PROFILE and manifest["profile"]["eval_precision"] == gpu.eval_precision
    config, lora = manifest["configs"][stage], manifest["configs"]["lora"]
    batch = (config["per_device_train_batch_size"], config["gradient_accumulation_steps"])
    assert batch == ((4, 4) if stage == "sft" else (1, 4))
    assert batch == ((gpu.batch_size, gpu.grad_accum) if stage == "sft" else (gpu.dpo_batch_size, gpu.grad_accum))
    assert config["max_length"] == gpu.max_length == 1024
    native_bf16 = choose_compute_dtype("auto")[0] == "bfloat16"
    assert manifest["profile"]["compute_dtype"] == ("bfloat16" if native_bf16 else "float32")
    assert config["bf16"] is native_bf16 and config["gradient_checkpointing"] is True
    assert config["report_to"] == ["trackio"] and config["project"] == "gemma-course"
    assert lora["lora_dropout"] == gpu.lora_dropout == 0.05
    profile = get_profile(PROFILE)
    assert manifest["steps"] == (profile.sft_steps if stage == "sft" else profile.dpo_steps)
    if stage == "sft":
        assert config["packing"] is True and config["packing_strategy"] == "bfd" and config["padding_free"] is False
        assert lora["trainable_token_indices"] == {"embed_tokens": [105, 106]}
        assert manifest["configs"]["quantization"]["bnb_4bit_compute_dtype"] == manifest["profile"]["compute_dtype"]
        assert config["save_steps"] == config["eval_steps"] == 1  # a checkpoint and an evaluation mid-run
