"""The rtx4090 profile on Gemma 7B's exact shape with random weights (no download): a few SFT and DPO steps at
batch 1 x max_length tokens, peak GPU memory against the estimator and 24 GiB, and the time of a step.

    python -m utils.gpu_check [--out outputs/gpu_check/gemma7b.json]    # needs a CUDA GPU; make gpu-check runs it
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers.trainer_callback import PrinterCallback

from utils import chat, memory, models, recipes, timing
from utils.profiles import Profile, get_profile

ROOT = Path(__file__).resolve().parent.parent
BUDGET_GIB = 24.0


def sft_rows(n: int, seq_len: int, vocab_size: int, seed: int = 0) -> Dataset:
    """n pre-tokenized conversations of seq_len random ids, every position trained (the estimator's worst case)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (n, seq_len), generator=gen).tolist()
    return Dataset.from_dict({"input_ids": ids})


def dpo_pairs(n: int, seq_len: int, tokenizer, vocab_size: int) -> Dataset:
    """n preference pairs of plain text whose prompt + answer fill about seq_len tokens, all ids below vocab_size."""
    half = seq_len // 2
    prompt, chosen, rejected = " hello" * half, " yes" * half, " no" * half
    ids = tokenizer(prompt + chosen + rejected, add_special_tokens=False)["input_ids"]
    if max(ids) >= vocab_size:
        raise ValueError(f"token id {max(ids)} is outside the model's {vocab_size}-entry vocabulary")
    return Dataset.from_dict({"prompt": [prompt] * n, "chosen": [chosen] * n, "rejected": [rejected] * n})


def _peak_gib() -> float | None:
    """The peak GPU memory allocated since the last reset, in GiB (None without CUDA)."""
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _train(trainer) -> dict:
    """Train; return the last step's seconds (the first warms up), the losses and the peak GPU memory."""
    timer = timing.StepTimer()
    trainer.add_callback(timer)
    trainer.remove_callback(PrinterCallback)
    _reset_peak()
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"step_seconds": timer.seconds[-1], "losses": losses, "peak_gib": _peak_gib()}


def run_sft(profile: Profile, path: Path, tokenizer, seq_len: int, steps: int, out: Path) -> dict:
    """SFT steps with the profile's QLoRA (4-bit base, LoRA, turn-token rows) on random conversations."""
    from trl import SFTTrainer

    model = models.load_base_model(profile, path=path)
    model = models.add_lora(model, recipes.lora_config(profile, tokenizer), profile.gradient_checkpointing)
    rows = sft_rows(steps * profile.batch_size * profile.grad_accum, seq_len, model.config.vocab_size)
    config = recipes.sft_config(profile, out, max_steps=steps, save_strategy="no", eval_strategy="no",
                                logging_steps=1, report_to="none", disable_tqdm=True,
                                assistant_only_loss=False)  # token ids, not conversations: every position trains
    trainer = SFTTrainer(model=model, args=config, train_dataset=rows, processing_class=tokenizer)
    result = _train(trainer)
    models.free(model)
    return result


def run_dpo(profile: Profile, path: Path, tokenizer, seq_len: int, steps: int, out: Path) -> dict:
    """DPO steps with the profile's new LoRA on the 4-bit model (reference: adapter disabled) on random-text pairs."""
    from trl import DPOTrainer

    model = models.load_base_model(profile, path=path)
    pairs = dpo_pairs(steps * profile.dpo_batch_size * profile.grad_accum, seq_len, tokenizer,
                      model.config.vocab_size)
    config = recipes.dpo_config(profile, out, max_steps=steps, save_strategy="no", report_to="none",
                                disable_tqdm=True)
    trainer = DPOTrainer(model=model, ref_model=None, args=config, train_dataset=pairs, processing_class=tokenizer,
                         peft_config=recipes.dpo_lora_config(profile))
    models.guard_cpu_4bit(trainer.model)
    result = _train(trainer)
    models.free(trainer.model)
    return result


def measure(config, profile_name: str = "rtx4090", work_dir: str | Path | None = None, steps: int = 2,
            **overrides) -> dict:
    """Build a random model of `config` (on the GPU when there is one), train `steps` SFT and DPO steps with the
    profile (plus overrides), and compare each peak with the estimator's figure and 24 GiB; forecast the hours."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        start = time.perf_counter()
        path = models.save_random_model(config, Path(tmp) / "model", device=device)
        build_seconds = time.perf_counter() - start
        profile = get_profile(profile_name, model_id=str(path), **overrides)
        tokenizer = chat.setup_tokenizer(models.load_tokenizer(get_profile("cpu")), profile.max_length)
        sft = run_sft(profile, path, tokenizer, profile.max_length, steps, Path(tmp) / "sft")
        dpo = run_dpo(profile, path, tokenizer, profile.max_length, steps, Path(tmp) / "dpo")
        estimates = {"sft": memory.estimate_profile(profile), "dpo": memory.estimate_dpo_profile(profile)}
    for stage, result in (("sft", sft), ("dpo", dpo)):
        result["estimate_gib"] = round(estimates[stage].gib("total"), 2)
        result["fits_budget"] = None if result["peak_gib"] is None else result["peak_gib"] <= BUDGET_GIB
    full = get_profile(profile_name)
    hours = (full.sft_steps * sft["step_seconds"] + full.dpo_steps * dpo["step_seconds"]) / 3600
    return {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "profile": profile.name,
            "config": {k: getattr(config, k) for k in memory.PRESETS["gemma-7b"] if k != "model_type"},
            "batch": f"{profile.batch_size} x {profile.max_length} tokens, {profile.grad_accum} accumulated",
            "build_seconds": round(build_seconds, 1), "budget_gib": BUDGET_GIB, "sft": sft, "dpo": dpo,
            "training_hours_forecast": hours}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "gpu_check" / "gemma7b.json")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("No CUDA GPU: the Gemma 7B check needs one (measure() runs on the CPU only with a tiny config).")
        return 2
    result = measure(models.gemma_7b_config(), steps=args.steps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
