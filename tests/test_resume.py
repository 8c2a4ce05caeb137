"""A training run killed part way resumes from its last checkpoint and finishes the same number of steps."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The same resume wiring as notebooks 02 and 04: trainer.train(resume_from_checkpoint=models.resume_point(...)).
SCRIPT = r'''
import sys, time, torch
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer
from datasets import Dataset
from utils.models import tiny_gemma_config
from transformers import AutoTokenizer, Gemma3ForCausalLM
from utils import chat, models

out = sys.argv[1]
tokenizer = chat.setup_tokenizer(AutoTokenizer.from_pretrained(models.ensure_embedded_model()), 64)
torch.manual_seed(0)
model = Gemma3ForCausalLM(tiny_gemma_config())
rows = [{"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]}
        for i in range(32)]

class Slow(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        print(f"STEP {state.global_step}", flush=True)
        time.sleep(1.0)  # leave the test time to kill the run between checkpoints

config = SFTConfig(output_dir=out, max_steps=8, save_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
                   assistant_only_loss=True, max_length=64, report_to="none", use_cpu=True, bf16=False,
                   logging_steps=1, disable_tqdm=True, save_only_model=False)
trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                     callbacks=[Slow()])
resume = models.resume_point(config, {"rows": len(rows)})
print(f"RESUME {resume}", flush=True)
trainer.train(resume_from_checkpoint=resume)
models.mark_finished(config)
print(f"DONE {trainer.state.global_step}", flush=True)
'''


@pytest.mark.slow
def test_killed_training_resumes_from_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-c", SCRIPT, str(out)]
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 240
    while not (out / "checkpoint-4").exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    complete = [p for p in out.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    killed_at = sorted(int(p.name.split("-")[1]) for p in complete)
    assert killed_at and killed_at[-1] < 8, f"the first run was not killed part way: {killed_at}"

    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    lines = second.stdout.splitlines()
    assert f"RESUME {out / f'checkpoint-{killed_at[-1]}'}" in lines
    steps = [int(line.split()[1]) for line in lines if line.startswith("STEP")]
    assert steps[0] == killed_at[-1] + 1, f"did not resume: second run started at step {steps[0]}"
    assert "DONE 8" in lines and (out / "checkpoint-8").exists()
