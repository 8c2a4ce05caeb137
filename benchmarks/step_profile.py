"""Where the CPU time of one course training step goes (torch.profiler), and how much of each notebook is not training
(papermill's per-cell durations of the last course run, not a new run).

    python benchmarks/step_profile.py [--tiny] [--course outputs/cpu]

Each step runs in its own process, after one warm-up step. A profiled operation counts for the first category that
names it on its way down the call tree; forward operations met inside the backward pass are the recomputation of
gradient checkpointing; what no category names is "other" (LoRA, norms, element-wise work, Python).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
BACKWARD = "autograd::engine::evaluate_function"
# (category, name prefixes) in the order they are tried; a node's whole subtree counts for its category
CATEGORIES = [
    ("optimizer", ("Optimizer.step",)),
    ("data collation", ("enumerate(DataLoader)",)),
    ("LM head (fused: utils.lm_head on the CPU, 262k vocabulary)",
     ("ChunkedLogProbFunction", f"{BACKWARD}: ChunkedLogProbFunction", "CpuLogProbFunction",
      f"{BACKWARD}: CpuLogProbFunction")),
    ("turn-token rows (merged embedding rebuilt)", ("aten::index_copy", f"{BACKWARD}: IndexCopyBackward",
                                                    f"{BACKWARD}: EmbeddingBackward")),
    ("4-bit layers (de-quantize + matmul)", ("MatMul4Bit", f"{BACKWARD}: MatMul4BitBackward", "bitsandbytes::")),
    ("attention", ("aten::scaled_dot_product_attention", f"{BACKWARD}: ScaledDotProduct")),
]
FORWARD_OPS = ("MatMul4Bit", "aten::scaled_dot_product_attention", "aten::linear", "aten::gelu", "aten::mul")
RECOMPUTE = "recomputation (gradient checkpointing)"


def _category(name: str, in_backward: bool) -> str | None:
    if in_backward and name.startswith(FORWARD_OPS):
        return RECOMPUTE
    for category, prefixes in CATEGORIES:
        if name.startswith(prefixes):
            return category
    return None


def categorize(events) -> dict[str, float]:
    """Seconds per category from profiler events (each counted once, at its highest categorized ancestor)."""
    seconds: dict[str, float] = {}

    def walk(event, in_backward: bool) -> None:
        category = _category(event.name, in_backward)
        if category is not None:
            seconds[category] = seconds.get(category, 0.0) + event.cpu_time_total / 1e6
            return
        for child in event.cpu_children:
            walk(child, in_backward or event.name.startswith(BACKWARD))

    for event in events:
        if event.cpu_parent is None:
            walk(event, False)
    return seconds


def profile_step(stage: str, tiny_dir: str | None) -> dict:
    """Profile the second training step of the cpu profile's SFT or DPO set-up; seconds per category and in all."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback
    from trl import DPOTrainer, SFTTrainer

    from utils import chat, data, models, recipes
    from utils.profiles import get_profile

    p = get_profile("cpu", **({"model_id": tiny_dir} if tiny_dir else {}))
    tok = chat.setup_tokenizer(models.load_tokenizer(p), p.max_length)

    class Profiled(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                self.prof = profile(activities=[ProfilerActivity.CPU])
                self.prof.__enter__()
                self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                self.seconds = time.perf_counter() - self.start
                self.prof.__exit__(None, None, None)

    timer = Profiled()
    with tempfile.TemporaryDirectory() as out:
        if stage == "sft":
            train, _ = recipes.sft_datasets(p, tok, data.load_sft_dataset(p.sft_data, max_rows=3 * p.batch_size))
            model = models.add_lora(models.load_base_model(p), recipes.lora_config(p, tok), p.gradient_checkpointing)
            config = recipes.sft_config(p, out, max_steps=2, save_strategy="no", eval_strategy="no", disable_tqdm=True)
            trainer = SFTTrainer(model=model, args=config, train_dataset=train, processing_class=tok, callbacks=[timer])
        else:
            train, _ = recipes.dpo_datasets(p, data.load_preference_dataset(p.pref_data))
            config = recipes.dpo_config(p, out, max_steps=2, save_strategy="no", disable_tqdm=True)
            trainer = DPOTrainer(model=models.load_base_model(p), ref_model=None, args=config, train_dataset=train,
                                 processing_class=tok, peft_config=recipes.dpo_lora_config(p), callbacks=[timer])
            models.guard_cpu_4bit(trainer.model)
        trainer.train()
    seconds = categorize(timer.prof.events())
    seconds["other"] = max(0.0, timer.seconds - sum(seconds.values()))
    return {"stage": stage, "step_seconds": timer.seconds, "threads": torch.get_num_threads(),
            "compute_dtype": p.compute_dtype, "seconds": seconds}


def measure(tiny_dir: str | None = None) -> dict[str, dict]:
    """Profile an SFT and a DPO step, each in its own process."""
    results = {}
    for stage in ("sft", "dpo"):
        cmd = [sys.executable, __file__, "--stage", stage, *(["--model_dir", tiny_dir] if tiny_dir else [])]
        run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
        if run.returncode != 0:
            raise RuntimeError(f"profiling the {stage} step failed:\n{run.stderr[-3000:]}")
        results[stage] = json.loads(run.stdout.splitlines()[-1])
    return results


def notebook_times(course_dir: Path) -> list[dict]:
    """Per executed notebook of a course run: seconds in all, in cells that train (`.train(`), and in the rest."""
    rows = []
    for path in sorted(course_dir.glob("[0-9][0-9]_*.ipynb")):
        cells = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
        times = [(c.metadata.get("papermill", {}).get("duration") or 0.0, ".train(" in c.source) for c in cells]
        total = sum(t for t, _ in times)
        training = sum(t for t, trains in times if trains)
        slowest = sorted(((t, i) for i, (t, trains) in enumerate(times) if not trains), reverse=True)[:3]
        rows.append({"notebook": path.name[:2], "seconds": round(total, 1), "training cells": round(training, 1),
                     "other cells": round(total - training, 1),
                     "slowest other cells": ", ".join(f"code cell {i}: {t:.0f} s" for t, i in slowest)})
    return rows


def rows(profiles: dict[str, dict]) -> list[dict]:
    """One table row per category: seconds and share of each stage's step."""
    categories = [c for c, _ in CATEGORIES] + [RECOMPUTE, "other"]
    table = []
    for category in categories:
        row = {"where the step goes": category}
        for stage, p in profiles.items():
            s = p["seconds"].get(category, 0.0)
            row[f"{stage} s"] = round(s, 2)
            row[f"{stage} share"] = f"{s / p['step_seconds']:.0%}"
        table.append(row)
    table.append({"where the step goes": "the whole step",
                  **{k: v for stage, p in profiles.items()
                     for k, v in ((f"{stage} s", round(p["step_seconds"], 2)), (f"{stage} share", "100%"))}})
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("sft", "dpo"), help="profile one step in this process; print JSON")
    parser.add_argument("--model_dir", help="a model folder instead of the embedded Gemma (tests: the tiny one)")
    parser.add_argument("--course", type=Path, default=ROOT / "outputs" / "cpu")
    args = parser.parse_args()
    if args.stage:
        print(json.dumps(profile_step(args.stage, args.model_dir)))
        return 0
    from utils.memory import to_markdown

    print(to_markdown(rows(measure(args.model_dir))))
    if args.course.exists():
        print(to_markdown(notebook_times(args.course)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
