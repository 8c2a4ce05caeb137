"""Run bookkeeping: the newest complete checkpoint, resuming only the same unfinished plan, a real kill-and-resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from utils import resume

ROOT = Path(__file__).resolve().parent.parent

# The same resume wiring as notebooks 02 and 04: `with resume.resumable(...) as checkpoint: trainer.train(...)`.
SCRIPT = r'''
import sys, time, torch
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer
from datasets import Dataset
from utils.models import tiny_gemma_config
from transformers import AutoTokenizer, Gemma3ForCausalLM
from utils import chat, models, resume

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
with resume.resumable(config, {"rows": len(rows)}) as checkpoint:
    print(f"RESUME {checkpoint}", flush=True)
    trainer.train(resume_from_checkpoint=checkpoint)
print(f"DONE {trainer.state.global_step}", flush=True)
'''


def test_last_checkpoint_finds_the_newest(tmp_path):
    assert resume.last_checkpoint(tmp_path / "missing") is None
    for step in (5, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert resume.last_checkpoint(tmp_path).endswith("checkpoint-10")
    (tmp_path / "checkpoint-15").mkdir()  # killed while saving: no trainer_state.json yet
    assert resume.last_checkpoint(tmp_path).endswith("checkpoint-10")


def test_resume_point_or_clear_resumes_only_an_unfinished_run_of_the_same_plan(tmp_path, capsys):
    from trl import SFTConfig

    def config(**kw):
        return SFTConfig(output_dir=str(tmp_path / "run"), max_steps=20, use_cpu=True, **{"learning_rate": 1e-4, **kw})

    def checkpoint(step):
        (tmp_path / "run" / f"checkpoint-{step}").mkdir()
        (tmp_path / "run" / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")

    inputs = {"sft_model": "a"}
    assert resume.resume_point_or_clear(config(), inputs) is None  # a fresh run: plan written
    checkpoint(5)
    assert resume.resume_point_or_clear(config(), inputs).endswith("checkpoint-5")  # interrupted: resume
    assert resume.resume_point_or_clear(config(learning_rate=5e-5), inputs) is None  # other settings: start over
    assert not (tmp_path / "run" / "checkpoint-5").exists()
    checkpoint(5)
    assert resume.resume_point_or_clear(config(learning_rate=5e-5), {"sft_model": "b"}) is None  # other inputs
    checkpoint(5)
    resume.mark_finished(config(learning_rate=5e-5))
    finished_again = resume.resume_point_or_clear(config(learning_rate=5e-5), {"sft_model": "b"})
    assert finished_again is None  # finished: train afresh
    assert not (tmp_path / "run" / "checkpoint-5").exists()
    out = capsys.readouterr().out
    assert "Resuming from" in out and "other settings or inputs" in out and "a finished run" in out


def test_resumable_marks_the_run_finished_only_when_its_block_completes(tmp_path):
    from trl import SFTConfig

    config = SFTConfig(output_dir=str(tmp_path / "run"), max_steps=20, use_cpu=True)
    plan = tmp_path / "run" / resume.PLAN_FILE
    with pytest.raises(KeyboardInterrupt), resume.resumable(config, {"rows": 3}) as checkpoint:
        assert checkpoint is None
        raise KeyboardInterrupt  # interrupted training: the plan stays unfinished, so the next run resumes
    assert json.loads(plan.read_text())["finished"] is False
    with resume.resumable(config, {"rows": 3}):
        pass
    assert json.loads(plan.read_text())["finished"] is True


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
