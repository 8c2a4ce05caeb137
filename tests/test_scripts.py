"""scripts/sft.py and scripts/dpo.py really distributed: `accelerate launch --num_processes 2` on the CPU (gloo)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from dry_run import PROFILE as DRY_RUN
from dry_run import check_trained_like_rtx4090, stored_dtypes

from utils import models, report

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "accelerate" / "multi_gpu.yaml"  # the shipped DDP file; without a GPU it runs on gloo
TRAINED = re.compile(r"^\[rank (\d)/(\d)\] trained (\d+) steps, losses \[(.*)\], "
                     r"eval loss ([^\s,]+) -> ([^\s,]+)", re.M)
WROTE = re.compile(r"^\[rank (\d)/(\d)\] wrote adapter", re.M)
# max_length 96 keeps 22 of the first 32 shipped conversations; at 64 the scripts' length check refuses (22 dropped)
TINY = ["--max_length", "96", "--batch_size", "2", "--sft_train_rows", "32", "--sft_eval_rows", "4",
        "--sft_steps", "4", "--sft_lr", "1e-2", "--dpo_steps", "4", "--dpo_batch_size", "2", "--pref_train_rows", "4",
        "--pref_eval_rows", "2", "--dpo_lr", "1e-2", "--save_steps", "100",
        "--dpo_sft_weight", "0", "--dpo_categories="]  # plain DPO on the first pairs: step 0 at ln 2, then below


def launch(script: str, model_dir: Path, out_dir: Path) -> str:
    """Run a script under `accelerate launch` with 2 CPU processes on the tiny model; returns stdout."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG), "--num_processes", "2",
           "--main_process_port", "0", f"scripts/{script}", "--profile", "cpu", "--model_id", str(model_dir),
           "--output_dir", str(out_dir), *TINY]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the CPU path (gloo) even on a machine with GPUs
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return run.stdout


def check_both_ranks_trained(stdout: str, steps: int, held_out_falls: bool = True) -> list[float]:
    """Each of the 2 ranks trained `steps` steps in step with the other (same gathered losses); returns the losses.

    held_out_falls: the held-out loss must fall (SFT at lr 1e-2 learns the tokens' frequencies: a large, sure drop).
    """
    runs = {int(m[0]): m for m in TRAINED.findall(stdout)}
    assert sorted(runs) == [0, 1] and all(m[1] == "2" for m in runs.values()), f"not 2 ranks of 2:\n{stdout}"
    assert {int(m[2]) for m in runs.values()} == {steps}, f"ranks trained different step counts:\n{stdout}"
    assert runs[0][3] == runs[1][3], "the ranks logged different losses: they did not train together"
    losses = [float(x) for x in runs[0][3].split(",")]
    before, after = float(runs[0][4]), float(runs[0][5])
    assert all(math.isfinite(x) for x in [*losses, before, after])
    if held_out_falls:
        assert after < before, f"held-out loss did not fall: {before} -> {after}"
    assert WROTE.findall(stdout) == [("0", "2")], "exactly one process, rank 0, must write the outputs"
    return losses


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """(tiny model folder, output folder, stdout) of one 2-process SFT run."""
    tmp = tmp_path_factory.mktemp("scripts")
    model_dir = models.save_tiny_gemma(tmp / "tiny")
    out_dir = tmp / "out"
    return model_dir, out_dir, launch("sft.py", model_dir, out_dir)


@pytest.mark.slow
def test_sft_trains_on_both_ranks_and_saves_one_adapter(sft_run):
    _, out_dir, stdout = sft_run
    check_both_ranks_trained(stdout, steps=4)
    saved = out_dir.rglob("adapter_model.safetensors")
    adapters = [p.relative_to(out_dir) for p in saved if "checkpoints" not in p.parts]
    assert adapters == [Path("sft/adapter/adapter_model.safetensors")]
    assert [p.relative_to(out_dir) for p in out_dir.rglob("manifest.json")] == [Path("sft/manifest.json")]


@pytest.mark.slow
def test_dpo_reads_the_sft_manifest_and_trains_on_both_ranks(sft_run):
    model_dir, out_dir, _ = sft_run
    stdout = launch("dpo.py", model_dir, out_dir)
    # 4 pairs, 2 per rank: every step trains on the same 4 pairs, so their loss must fall from ln 2 (policy = reference
    # before the first update). Two held-out pairs after a few steps of a random model can go either way: not asserted.
    losses = check_both_ranks_trained(stdout, steps=4, held_out_falls=False)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-3)
    assert losses[-1] < losses[0] - 0.05, f"DPO did not learn the pairs it trained on: {losses}"
    assert (out_dir / "dpo" / "adapter" / "adapter_model.safetensors").is_file()
    assert (out_dir / "dpo" / "merged" / "model.safetensors").is_file()
    assert (out_dir / "dpo" / "manifest.json").is_file()


@pytest.mark.parametrize("name", ["single_gpu", "multi_gpu", "fsdp_qlora", "deepspeed_zero3"])
def test_accelerate_configs_load_and_say_when_to_pick_them(name):
    from accelerate.commands.config.config_args import load_config_from_file

    path = ROOT / "configs" / "accelerate" / f"{name}.yaml"
    assert path.read_text().startswith("# ") and f"--config_file configs/accelerate/{name}.yaml" in path.read_text()
    config = load_config_from_file(str(path))
    assert config.mixed_precision == "no", "precision comes from the profile (the TRL config's bf16)"
    if name == "fsdp_qlora":  # the PEFT guide's settings for QLoRA under FSDP
        fsdp = config.fsdp_config
        assert fsdp["fsdp_use_orig_params"] is False and fsdp["fsdp_cpu_ram_efficient_loading"] is True
        assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"


def test_4bit_weights_are_stored_in_the_compute_dtype_so_fsdp_can_shard_them():
    from utils import recipes
    from utils.profiles import get_profile

    quant = recipes.quantization_config(get_profile("rtx4090"))
    assert quant.bnb_4bit_quant_storage == quant.bnb_4bit_compute_dtype


# ----------------------------------------------------------------------------------------------------------------
# One process, trackio on, data with over-long rows: the length check's counts and the dashboard's metrics
# ----------------------------------------------------------------------------------------------------------------

SHORT = 48  # max_length of these runs
LONG = " ".join(f"word{i}" for i in range(80))  # about 160 tokens


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _conversation(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def write_over_long_data(folder: Path) -> tuple[Path, Path]:
    """SFT rows (1 question and 1 reply longer than SHORT among 8) and TRL standard-format pairs (1 prompt longer
    than SHORT, 2 answers running past it, among 6); returns (sft folder, preference folder)."""
    sft = [_conversation(f"What is {i} plus {i}?", f"It is {2 * i}.") for i in range(8)]
    sft[0] = _conversation(f"Summarise this: {LONG}", "No.")
    sft[5] = _conversation("Say something long.", f"Here it is: {LONG}")
    _write(folder / "sft" / "train_sft.jsonl", sft)
    _write(folder / "sft" / "test_sft.jsonl", [_conversation(f"What is {i} plus 1?", f"It is {i + 1}.")
                                               for i in range(3)])
    pairs = [{"prompt": f"What is {i} times {i}?", "chosen": f"It is {i * i}.", "rejected": f"It is {i * i + 1}."}
             for i in range(8)]
    pairs[1]["prompt"] = f"Summarise this: {LONG}"
    pairs[2]["chosen"] = f"Here is a long answer: {LONG}"
    pairs[4]["rejected"] = f"Here is a long wrong answer: {LONG}"
    _write(folder / "prefs" / "train_prefs.jsonl", pairs[:6])
    _write(folder / "prefs" / "test_prefs.jsonl", pairs[6:])
    return folder / "sft", folder / "prefs"


def run_script(script: str, args: list[str]) -> str:
    """`python scripts/<script> ...` in one process, offline; returns stdout."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, f"scripts/{script}", *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return run.stdout


READ_BACK = """
import json, sys
import trackio
from trackio.sqlite_storage import SQLiteStorage

project = sys.argv[1]
print(json.dumps({run.name: SQLiteStorage.get_logs(project, run.name) for run in trackio.Api().runs(project)},
                 default=str))
"""


def read_dashboard(trackio_dir: Path) -> dict[str, list[dict]]:
    """Every run's logged rows, read back in a fresh process through trackio's own API (Api().runs, get_logs)."""
    env = {**os.environ, "TRACKIO_DIR": str(trackio_dir), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", READ_BACK, "gemma-course"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def tracked_runs(tmp_path_factory):
    """(stdout of sft.py, stdout of dpo.py, output folder) of one-process runs with --report_to trackio."""
    tmp = tmp_path_factory.mktemp("tracked")
    model_dir = models.save_tiny_gemma(tmp / "tiny")
    sft_dir, pref_dir = write_over_long_data(tmp / "data")
    out_dir = tmp / "out"
    args = ["--profile", "cpu", "--model_id", str(model_dir), "--output_dir", str(out_dir), "--report_to", "trackio",
            "--sft_data", str(sft_dir), "--pref_data", str(pref_dir), "--max_length", str(SHORT), "--batch_size", "2",
            "--sft_eval_rows", "2", "--sft_steps", "3", "--sft_lr", "1e-2", "--dpo_steps", "2", "--dpo_batch_size",
            "2", "--pref_eval_rows", "2", "--dpo_lr", "1e-2", "--save_steps", "100", "--dpo_categories=",
            "--dpo_sft_weight", "0"]  # plain DPO: the logged loss is the printed DPO term
    return run_script("sft.py", args), run_script("dpo.py", args), out_dir


def _losses(stdout: str) -> tuple[list[float], float, float]:
    (run,) = TRAINED.findall(stdout)
    return [float(x) for x in run[3].split(",")], float(run[4]), float(run[5])


@pytest.mark.slow
def test_scripts_print_what_max_length_drops_and_cuts(tracked_runs):
    sft_out, dpo_out, _ = tracked_runs
    assert f"max_length={SHORT}, 8 train_sft conversations: 2 dropped (recipes.sft_datasets drops them" in sft_out
    assert f"max_length={SHORT}, 6 training pairs: 1 dropped (DPOTrainer drops them: the prompt alone fills " \
           f"max_length), 2 cut (DPOTrainer keeps their first max_length tokens" in dpo_out, dpo_out
    assert f"max_length={SHORT}, 2 evaluation pairs: 0 dropped" in dpo_out


@pytest.mark.slow
def test_trackio_dashboard_holds_the_logged_metrics_offline(tracked_runs):
    sft_out, dpo_out, out_dir = tracked_runs
    assert f"TRACKIO_DIR={out_dir.resolve() / 'trackio'} trackio show --project gemma-course" in sft_out
    runs = read_dashboard(out_dir / "trackio")
    assert sorted(name.split("-")[0] for name in runs) == ["dpo", "sft"], list(runs)
    for stage, stdout in (("sft", sft_out), ("dpo", dpo_out)):
        rows = next(rows for name, rows in runs.items() if name.startswith(f"{stage}-cpu-"))
        losses, eval_before, eval_after = _losses(stdout)
        assert [round(r["train/loss"], 4) for r in rows if "train/loss" in r] == losses, stage
        evals = [round(r["eval/loss"], 4) for r in rows if "eval/loss" in r]  # sft.py also evaluates while training
        assert (evals[0], evals[-1]) == (eval_before, eval_after), stage
    dpo_rows = next(rows for name, rows in runs.items() if name.startswith("dpo-"))
    for metric in ("train/rewards/margins", "train/rewards/chosen", "train/logps/chosen", "eval/rewards/accuracies"):
        assert sum(metric in r for r in dpo_rows) == 2, metric  # 2 steps; 2 evaluations (before and after)


# ----------------------------------------------------------------------------------------------------------------
# The rtx4090 path on the CPU: both scripts under the rtx4090-dryrun profile (tiny random Gemma, shipped rows)
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dry_run_scripts(tmp_path_factory) -> tuple[str, str, Path]:
    """(stdout of sft.py, stdout of dpo.py, output folder) of one-process runs under the dry-run profile."""
    out_dir = tmp_path_factory.mktemp("dry_run") / "out"
    args = ["--profile", DRY_RUN, "--output_dir", str(out_dir)]
    return run_script("sft.py", args), run_script("dpo.py", args), out_dir


@pytest.mark.slow
@pytest.mark.processor
def test_sft_script_takes_the_gpu_profiles_branches(dry_run_scripts):
    sft_out, _, out_dir = dry_run_scripts
    check_trained_like_rtx4090(report.read_manifest(out_dir, "sft", made_by="scripts/sft.py"), "sft")
    assert "effective batch 4 x 4 x 1 processes = 16 packed rows of up to 1024 tokens per step" in sft_out
    assert "max_length=1024, 32 train_sft conversations: 0 dropped" in sft_out, sft_out


@pytest.mark.slow
@pytest.mark.processor
def test_dpo_script_takes_the_gpu_profiles_branches_and_merges_in_bf16(dry_run_scripts):
    _, dpo_out, out_dir = dry_run_scripts
    manifest = report.read_manifest(out_dir, "dpo", made_by="scripts/dpo.py")
    check_trained_like_rtx4090(manifest, "dpo")
    assert "Merging on the CPU in torch.bfloat16" in dpo_out
    assert stored_dtypes(out_dir / "sft" / "merged") == stored_dtypes(Path(manifest["merged_dir"])) == {"BF16"}
