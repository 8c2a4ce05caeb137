"""Training throughput of the course's set-up against TRL's defaults (SFT), and DPO with/without precomputed reference.

Every arm trains in a fresh subprocess on the same model, data, LoRA config, seed and step count; only the trainer
config differs. Real tokens are the non-padding tokens of the training batches; peak memory is the resident set
size sampled during training. Prints the course-vs-baseline ratios; bench.py saves the full results.

    python benchmarks/training_speed.py [--sft-steps 10] [--dpo-steps 8] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARMS = ("sft:trl-defaults", "sft:course", "dpo:course", "dpo:precomputed-ref")


class TokenCounter:
    """Wraps a data collator and counts the real (non-padding) and total token slots of every batch."""

    def __init__(self, collate):
        self.collate, self.real, self.total = collate, 0, 0

    def __call__(self, features):
        batch = self.collate(features)
        masks = [v for k, v in batch.items() if k.endswith("attention_mask")]
        if masks:  # padded batches: the masks say which slots are real
            self.real += sum(int(m.sum()) for m in masks)
            self.total += sum(m.numel() for m in masks)
        else:  # padding-free: one concatenated row, every slot real
            n = sum(v.numel() for k, v in batch.items() if k.endswith("input_ids"))
            self.real, self.total = self.real + n, self.total + n
        return batch


class PeakRSS:
    """Samples this process's resident set size in a thread; `peak` is the largest seen (bytes)."""

    def __init__(self, every_s: float = 0.05):
        import psutil

        self._proc, self._every, self.peak, self._stop = psutil.Process(), every_s, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self._every)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _profile(tiny_dir: str | None, **overrides):
    from utils.profiles import get_profile

    if tiny_dir:  # a 2-layer random Gemma: checks the code runs, measures nothing meaningful
        overrides = {"model_id": tiny_dir, "load_in_4bit": False, "sft_train_rows": 32, "sft_eval_rows": 8,
                     "pref_eval_rows": 4, "max_length": 128, **overrides}
    return get_profile("cpu", **{"dpo_categories": "", "dpo_sft_weight": 0.0, **overrides})  # speed: plain DPO


def _trl_default_sft_config(profile, out: str, **quiet):
    """SFTConfig as a user writes it from TRL's docs: the learning settings, everything else TRL's default."""
    from trl import SFTConfig

    return SFTConfig(output_dir=out, max_length=profile.max_length, assistant_only_loss=True,
                     per_device_train_batch_size=profile.batch_size, per_device_eval_batch_size=profile.batch_size,
                     max_steps=profile.sft_steps, learning_rate=profile.sft_lr, lr_scheduler_type="constant",
                     seed=profile.seed, use_cpu=True, report_to="none", **quiet)


def run_sft(arm: str, steps: int, tiny_dir: str | None, out: str, compute_dtype: str = "auto") -> dict:
    """Train one SFT arm; the model, data and LoRA set-up are the course's in both arms."""
    import torch
    from trl import SFTTrainer

    from utils import chat, data, models, recipes, timing
    from utils.memory import ModelShape

    profile = _profile(tiny_dir, sft_steps=steps, compute_dtype=compute_dtype)
    torch.manual_seed(profile.seed)
    tokenizer = chat.setup_tokenizer(models.load_tokenizer(profile), profile.max_length)
    train, evaluation = recipes.sft_datasets(profile, tokenizer, data.load_sft_dataset(profile.sft_data,
                                                                                       max_rows=profile.sft_train_rows))
    model = models.add_lora(models.load_base_model(profile), recipes.lora_config(profile, tokenizer),
                            gradient_checkpointing=profile.gradient_checkpointing)
    quiet = {"save_strategy": "no", "eval_strategy": "no", "logging_steps": 1, "disable_tqdm": True}
    make_config = recipes.sft_config if arm == "sft:course" else _trl_default_sft_config
    config = make_config(profile, out, **quiet)
    trainer = SFTTrainer(model=model, args=config, train_dataset=train, eval_dataset=evaluation,
                         processing_class=tokenizer)
    result = _train_and_measure(trainer, config, profile.compute_dtype)
    # how close a step comes to this machine's matmul speed in the same precision (measured in this process)
    flops = timing.training_flops_per_token(ModelShape.from_config(model.config), profile.gradient_checkpointing)
    matmul = timing.matmul_gflops(getattr(torch, profile.compute_dtype))
    achieved = result["real_tokens_per_s"] * flops / 1e9
    return {**result, "flops_per_token": flops, "achieved_gflops": achieved, "matmul_gflops": matmul,
            "share_of_matmul": achieved / matmul, "step_seconds": result["seconds"] / result["steps"]}


def run_dpo(arm: str, steps: int, tiny_dir: str | None, out: str, compute_dtype: str = "auto") -> dict:
    """Train one DPO arm from the base model (speed, not quality): the reference recomputed or precomputed."""
    import torch
    from trl import DPOTrainer

    from utils import chat, data, models, recipes

    batch = _profile(tiny_dir).dpo_batch_size
    profile = _profile(tiny_dir, dpo_steps=steps, pref_train_rows=steps * batch,  # one pass over the pairs
                       compute_dtype=compute_dtype)
    torch.manual_seed(profile.seed)
    tokenizer = chat.setup_tokenizer(models.load_tokenizer(profile), profile.max_length)
    train, evaluation = recipes.dpo_datasets(profile, data.load_preference_dataset(
        profile.pref_data, max_rows=profile.pref_train_rows))
    config = recipes.dpo_config(profile, out, save_strategy="no", disable_tqdm=True,
                                precompute_ref_log_probs=arm == "dpo:precomputed-ref")
    start = time.perf_counter()
    trainer = DPOTrainer(model=models.load_base_model(profile), ref_model=None, args=config, train_dataset=train,
                         eval_dataset=evaluation, processing_class=tokenizer,
                         peft_config=recipes.dpo_lora_config(profile))
    models.guard_cpu_4bit(trainer.model)
    return _train_and_measure(trainer, config, profile.compute_dtype, setup_started=start)


def _train_and_measure(trainer, config, compute_dtype: str, setup_started: float | None = None) -> dict:
    """Run trainer.train() with counted tokens and sampled memory, then one evaluation."""
    counter = TokenCounter(trainer.data_collator)
    trainer.data_collator = counter
    start = setup_started or time.perf_counter()
    with PeakRSS() as rss:
        trainer.train()
    seconds = time.perf_counter() - start
    real, total = counter.real, counter.total
    loss = trainer.evaluate()["eval_loss"]
    return {"steps": trainer.state.global_step, "seconds": seconds, "real_tokens": real, "token_slots": total,
            "real_tokens_per_s": real / seconds, "padding_share": 1 - real / total, "peak_rss_gib": rss.peak / 2**30,
            "eval_loss": loss, "gradient_checkpointing": config.gradient_checkpointing, "bf16": config.bf16,
            "compute_dtype": compute_dtype,
            "padding_free": getattr(config, "padding_free", False)}


@contextmanager
def tiny_model_dir(tiny: bool) -> Iterator[str | None]:
    """The folder of a tiny random Gemma for the duration of the block when tiny (code checks), else None."""
    if not tiny:
        yield None
        return
    from utils.models import save_tiny_gemma

    with tempfile.TemporaryDirectory() as tmp:
        yield str(save_tiny_gemma(Path(tmp) / "tiny"))


def run_isolated(arm: str, steps: int, tiny_dir: str | None, compute_dtype: str = "auto",
                 extra_env: dict | None = None) -> dict:
    """Run one arm in a fresh Python process (so peaks don't mix), with extra_env set there; returns its figures."""
    cmd = [sys.executable, __file__, "--worker", arm, "--steps", str(steps), "--compute-dtype", compute_dtype]
    cmd += ["--tiny-dir", tiny_dir] if tiny_dir else []
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1",
           **(extra_env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"Benchmark arm {arm} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(sft_steps: int, dpo_steps: int, tiny_dir: str | None = None) -> dict:
    """Run every arm and return their figures with the course-vs-baseline ratios."""
    results = {}
    for arm in ARMS:
        steps = sft_steps if arm.startswith("sft") else dpo_steps
        print(f"  {arm}: {steps} steps...", flush=True)
        results[arm] = run_isolated(arm, steps, tiny_dir)
        print(f"    {results[arm]['real_tokens_per_s']:.0f} real tokens/s, padding "
              f"{results[arm]['padding_share']:.1%}, peak {results[arm]['peak_rss_gib']:.2f} GiB, "
              f"eval loss {results[arm]['eval_loss']:.4f}", flush=True)
    base, course = results["sft:trl-defaults"], results["sft:course"]
    dpo, pre = results["dpo:course"], results["dpo:precomputed-ref"]
    summary = {
        "sft_speedup": course["real_tokens_per_s"] / base["real_tokens_per_s"],
        "sft_memory_ratio": course["peak_rss_gib"] / base["peak_rss_gib"],
        "sft_eval_loss_diff": (course["eval_loss"] - base["eval_loss"]) / base["eval_loss"],
        "sft_course_padding_share": course["padding_share"],
        "dpo_precompute_speedup": pre["real_tokens_per_s"] / dpo["real_tokens_per_s"],
    }
    assert all(math.isfinite(v) for v in summary.values()), summary
    return {"arms": results, "summary": summary}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft-steps", type=int, default=10)
    parser.add_argument("--dpo-steps", type=int, default=8)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--tiny-dir", help=argparse.SUPPRESS)
    parser.add_argument("--compute-dtype", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true", help="a tiny random Gemma: checks the code, not the speed")
    args = parser.parse_args()
    if args.worker:
        with tempfile.TemporaryDirectory() as out:
            run = run_sft if args.worker.startswith("sft") else run_dpo
            print(json.dumps(run(args.worker, args.steps, args.tiny_dir, out, args.compute_dtype)))
        return 0
    with tiny_model_dir(args.tiny) as tiny_dir:
        print(json.dumps(compare(args.sft_steps, args.dpo_steps, tiny_dir)["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
