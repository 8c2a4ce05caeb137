"""How fast this machine runs the course: a matmul micro-benchmark, one timed SFT step, a course-time forecast."""

from __future__ import annotations

import tempfile
import time

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

from utils import chat, data, models, recipes
from utils.memory import ModelShape
from utils.profiles import Profile

# The whole cpu course (`make tutorial`) costs about this many of the probe's SFT steps: the mean of the two ratios
# measured on 2 cores of an AMD EPYC (AVX512-BF16, no AMX), 2026-12-05, after issue 26's cuts: natively in bf16
# 527 s / 7.8 s = 68, under the AVX2-only reproduction in fp32 832 s / 15.7 s = 53 (README, "Which processor").
COURSE_STEP_EQUIVALENTS = {"cpu": 60.0}


def matmul_gflops(dtype: torch.dtype, m: int = 512, k: int = 640, n: int = 2048, seconds: float = 0.3) -> float:
    """GFLOP/s of an (m x k) @ (k x n) matmul in dtype on this CPU (the Gemma 3 270M MLP's shape by default)."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    a @ b  # warm-up: kernel selection, caches
    runs, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or runs < 2:
        a @ b
        runs += 1
    return 2 * m * k * n * runs / elapsed / 1e9


def training_flops_per_token(shape: ModelShape, recompute: bool = True) -> float:
    """FLOPs of one LoRA training step per token: 2 x the matmul weights forward, 2 x backward (frozen weights need no
    gradients), 2 x forward again where gradient checkpointing recomputes; attention over ~100-token rows adds ~1%."""
    return (6.0 if recompute else 4.0) * shape.matmul_params


class StepTimer(TrainerCallback):
    """Wall seconds of every optimizer step."""

    def __init__(self):
        self.seconds: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)


def time_sft_step(profile: Profile, steps: int = 2) -> float:
    """Seconds of one SFT step of the course's set-up on this machine: the last of `steps` (the first warms up)."""
    from trl import SFTTrainer

    tokenizer = chat.setup_tokenizer(models.load_tokenizer(profile), profile.max_length)
    train, _ = recipes.sft_datasets(profile, tokenizer, data.load_sft_dataset(
        profile.sft_data, max_rows=steps * profile.batch_size * profile.grad_accum))
    model = models.add_lora(models.load_base_model(profile), recipes.lora_config(profile, tokenizer),
                            gradient_checkpointing=profile.gradient_checkpointing)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        config = recipes.sft_config(profile, out, max_steps=steps, save_strategy="no", eval_strategy="no",
                                    disable_tqdm=True)
        trainer = SFTTrainer(model=model, args=config, train_dataset=train, processing_class=tokenizer,
                             callbacks=[timer])
        trainer.remove_callback(PrinterCallback)  # keep stdout for the caller's report
        trainer.train()
    return timer.seconds[-1]


def predict_course_minutes(profile: Profile, step_seconds: float) -> float | None:
    """The whole course's wall minutes on this machine from one SFT step's seconds (None: no fit for this profile)."""
    if profile.name not in COURSE_STEP_EQUIVALENTS:
        return None
    return COURSE_STEP_EQUIVALENTS[profile.name] * step_seconds / 60
