"""Check utils.memory's estimates against the measured peak CPU memory of training the embedded Gemma 3 270M.

Each method trains for a few steps (random token ids, plain PyTorch loop, AdamW) in a fresh subprocess, so peaks
don't mix. Measured = peak RSS (ru_maxrss) minus the RSS after importing the libraries and loading the tokenizer.
Prints a table and exits 1 when an estimate is off by more than the tolerance; `make bench` (bench.py) saves it.

    python benchmarks/memory_check.py [--batch 4] [--seq 128] [--steps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from utils import memory
from utils.profiles import get_profile

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 0.30
# name -> (estimate method, trainable token rows); the last run is the cpu profile's own QLoRA with turn tokens
RUNS = {"full": ("full", 0), "lora": ("lora", 0), "qlora": ("qlora", 0), "qlora+tokens": ("qlora", 2)}


def _rss() -> int:
    """Current resident set size in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak() -> int:
    """Peak resident set size of this process so far, in bytes (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(name: str, batch: int, seq: int, steps: int) -> dict:
    """Train one method in this process; return its memory figures in bytes."""
    import torch
    import transformers  # noqa: F401  (part of the baseline)

    from utils import models, recipes

    method, token_rows = RUNS[name]
    profile = get_profile("cpu", train_turn_tokens=token_rows > 0)
    tokenizer = models.load_tokenizer(profile)
    baseline = _rss()
    model = models.load_base_model(profile, quantize=method == "qlora")
    if method != "full":
        model = models.add_lora(model, recipes.lora_config(profile, tokenizer))
    after_load, load_peak = _rss(), _peak()
    torch.manual_seed(0)
    ids = torch.randint(0, len(tokenizer), (batch, seq))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return {"baseline": baseline, "after_load": after_load, "load_peak": load_peak, "peak": _peak()}


def run_isolated(name: str, batch: int, seq: int, steps: int) -> dict:
    """Run measure() for one method in a fresh Python process."""
    cmd = [sys.executable, __file__, "--worker", name, "--batch", str(batch), "--seq", str(seq), "--steps", str(steps)]
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"Measuring {name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_all(batch: int = 4, seq: int = 128, steps: int = 2) -> list[dict]:
    """Estimate and measure every method; one row per method (GiB and the ratio)."""
    shape, lora_r = memory.shape_for("gemma-3-270m"), get_profile("cpu").lora_r
    rows = []
    for name, (method, token_rows) in RUNS.items():
        print(f"  memory {name} (batch {batch}, seq {seq}, {steps} steps)...", flush=True)
        # fp32 throughout on the CPU: full/LoRA load in fp32, and PEFT upcasts QLoRA's embedding and norms to fp32
        est = memory.estimate(shape, method, batch_size=batch, seq_len=seq, lora_r=lora_r,
                              weight_dtype="fp32", trainable_token_rows=token_rows)
        got = run_isolated(name, batch, seq, steps)
        measured = got["peak"] - got["baseline"]
        ratio = est.total / measured
        rows.append({"method": name, "estimated GiB": round(est.gib("total"), 2),
                     "measured GiB": round(measured / memory.GIB, 2), "est/measured": round(ratio, 2),
                     "peak RSS GiB": round(got["peak"] / memory.GIB, 2),
                     "within ±30%": "yes" if abs(ratio - 1) <= TOLERANCE else "NO"})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--worker", choices=RUNS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker, args.batch, args.seq, args.steps)))
        return 0
    rows = measure_all(args.batch, args.seq, args.steps)
    print(memory.to_markdown(rows))
    return 0 if all(row["within ±30%"] == "yes" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
