"""The course's training recipes: a profile turned into the bitsandbytes, PEFT and TRL configs that train it.

Shared by scripts and benchmarks; notebooks 02 and 04 write the same configs out by hand, and a test checks they agree.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import torch
from datasets import Dataset, DatasetDict
from peft import LoraConfig
from transformers import BitsAndBytesConfig
from trl import DPOConfig, SFTConfig

from utils import chat, data, report, tracking
from utils.profiles import Profile

LOCATION = {"output_dir", "logging_dir", "run_name"}  # where a run writes or is shown, not how it trains: not compared


def use_bf16_autocast(profile: Profile) -> bool:
    """Whether the trainer should compute in bf16 autocast (bf16 profiles on Ampere+ GPUs or CPUs)."""
    if profile.compute_dtype != "bfloat16":
        return False
    return torch.cuda.is_bf16_supported() if torch.cuda.is_available() else True


def quantization_config(profile: Profile) -> BitsAndBytesConfig:
    """QLoRA's 4-bit storage: NF4 with double quantization, computing (and packed) in the profile's dtype."""
    dtype = getattr(torch, profile.compute_dtype)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)


def lora_config(profile: Profile, tokenizer) -> LoraConfig:
    """SFT's LoRA on every linear layer; with train_turn_tokens also the turn-token embedding rows."""
    extra = {}
    if profile.train_turn_tokens:
        extra = {"trainable_token_indices": {"embed_tokens": chat.turn_token_ids(tokenizer)},
                 "ensure_weight_tying": True}
    return LoraConfig(r=profile.lora_r, lora_alpha=profile.lora_alpha, lora_dropout=profile.lora_dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM", **extra)


def plumbing(profile: Profile, output_dir: str | Path, stage: str, logging_steps: int, eval_steps: int | None) -> dict:
    """Trainer arguments that are not the lesson: output folder, checkpoints, logging (and dashboard), evaluation, seed,
    device; stage ("sft" or "dpo") names the dashboard's run."""
    return {
        **tracking.trainer_args(profile, stage),
        "output_dir": str(output_dir),
        "save_steps": profile.save_steps,
        "save_total_limit": 1,
        "logging_steps": logging_steps,
        "eval_strategy": "steps" if eval_steps else "no",
        "eval_steps": eval_steps,
        "use_cpu": not torch.cuda.is_available(),
        "seed": profile.seed,
    }


def sft_config(profile: Profile, output_dir: str | Path, **overrides) -> SFTConfig:
    """SFTConfig for the profile: loss on the replies only, padding-free batches or packed rows where it says so.

    Padding-free batches concatenate the rows (position ids mark where each starts), so TRL does not truncate:
    drop rows longer than max_length first (`data.drop_longer_than`). Packing ("bfd") cuts each conversation to
    max_length and fills rows of max_length with whole conversations, concatenated the same padding-free way.
    """
    args = {
        "assistant_only_loss": True,
        "max_steps": profile.sft_steps,
        "learning_rate": profile.sft_lr,
        "lr_scheduler_type": "constant",
        "per_device_train_batch_size": profile.batch_size,
        "per_device_eval_batch_size": profile.batch_size,
        "gradient_accumulation_steps": profile.grad_accum,
        "gradient_checkpointing": profile.gradient_checkpointing,
        "padding_free": profile.padding_free,
        "packing": profile.packing,
        "max_length": None if profile.padding_free else profile.max_length,
        "bf16": use_bf16_autocast(profile),
        **plumbing(profile, output_dir, "sft", logging_steps=max(1, profile.sft_steps // 10),
                   eval_steps=sft_eval_steps(profile)),
    }
    return SFTConfig(**{**args, **overrides})


def sft_eval_steps(profile: Profile) -> int:
    """SFT evaluates the held-out set every this many steps: at the middle of the run (and its end)."""
    return max(1, profile.sft_steps // 2)


def _first(ds: Dataset, n: int | None) -> Dataset:
    return ds.select(range(min(n or len(ds), len(ds))))


def sft_datasets(profile: Profile, tokenizer, sft_data: DatasetDict) -> tuple[Dataset, Dataset]:
    """(train, eval) sets for SFTTrainer; padding-free runs drop rows longer than max_length (they are not cut)."""
    train, test = sft_data["train_sft"], sft_data["test_sft"]
    if profile.padding_free:
        train = data.drop_longer_than(tokenizer, train, profile.max_length)
        test = data.drop_longer_than(tokenizer, test, profile.max_length)
    return data.for_sft_trainer(train), data.for_sft_trainer(_first(test, profile.sft_eval_rows))


def dpo_datasets(profile: Profile, prefs: DatasetDict) -> tuple[Dataset, Dataset]:
    """(train, eval) pairs for DPOTrainer, in the explicit prompt/chosen/rejected form; training pairs limited to the
    profile's dpo_categories when it names some."""
    train = prefs["train_prefs"]
    if profile.dpo_categories:
        train = data.select_categories(train, data.load_categories(profile.pref_data),
                                       profile.dpo_categories.split(","), source=profile.pref_data)
    return data.for_dpo_trainer(train), data.for_dpo_trainer(_first(prefs["test_prefs"], profile.pref_eval_rows))


def dpo_lora_config(profile: Profile) -> LoraConfig:
    """The new LoRA adapter that DPO trains on top of the merged SFT model."""
    return LoraConfig(r=profile.lora_r, lora_alpha=profile.lora_alpha, lora_dropout=profile.lora_dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM")


def dpo_config(profile: Profile, output_dir: str | Path, **overrides) -> DPOConfig:
    """DPOConfig for the profile: beta, optional SFT term (RPO), constant learning rate, explicit evaluations."""
    loss_type = ["sigmoid", "sft"] if profile.dpo_sft_weight > 0 else ["sigmoid"]
    args = {
        "beta": profile.dpo_beta,
        "loss_type": loss_type,
        "loss_weights": [1.0, profile.dpo_sft_weight] if len(loss_type) == 2 else None,
        "learning_rate": profile.dpo_lr,
        "lr_scheduler_type": "constant",
        "max_length": profile.max_length,
        "max_steps": profile.dpo_steps,
        "per_device_train_batch_size": profile.dpo_batch_size,
        "per_device_eval_batch_size": profile.dpo_batch_size,
        "gradient_accumulation_steps": profile.grad_accum,
        "gradient_checkpointing": profile.gradient_checkpointing,
        "bf16": use_bf16_autocast(profile),
        **plumbing(profile, output_dir, "dpo", logging_steps=1, eval_steps=None),  # the notebook evaluates explicitly
    }
    return DPOConfig(**{**args, **overrides})


def changed_from_defaults(config: SFTConfig | DPOConfig) -> dict:
    """The fields of a TRL config that differ from TRL's own defaults (what the course chose)."""
    default = type(config)(output_dir=config.output_dir, use_cpu=config.use_cpu)
    skip = {"output_dir", "logging_dir", "use_cpu", "run_name"}
    return {f.name: getattr(config, f.name) for f in fields(config)
            if f.name not in skip and getattr(config, f.name) != getattr(default, f.name)}


def sft_recipe(profile: Profile, tokenizer, output_dir: str | Path) -> dict:
    """Everything SFT is configured with: {"quantization": BitsAndBytesConfig, "lora": LoraConfig, "sft": SFTConfig}."""
    return {"quantization": quantization_config(profile), "lora": lora_config(profile, tokenizer),
            "sft": sft_config(profile, output_dir)}


def dpo_recipe(profile: Profile, output_dir: str | Path) -> dict:
    """Everything DPO is configured with: {"quantization": BitsAndBytesConfig, "lora": LoraConfig, "dpo": DPOConfig}."""
    return {"quantization": quantization_config(profile), "lora": dpo_lora_config(profile),
            "dpo": dpo_config(profile, output_dir)}


def differences(recorded: dict[str, dict], recipe: dict) -> list[str]:
    """"name.field: recorded != recipe" for every argument where recorded configs (a manifest's) and a recipe differ."""
    expected = {name: report.config_as_dict(config) for name, config in recipe.items()}
    found = []
    for name in sorted(set(recorded) | set(expected)):
        mine, theirs = recorded.get(name, {}), expected.get(name, {})
        for key in sorted((set(mine) | set(theirs)) - LOCATION):
            if mine.get(key) != theirs.get(key):
                found.append(f"{name}.{key}: {mine.get(key)!r} != {theirs.get(key)!r}")
    return found
