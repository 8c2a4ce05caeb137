"""The GPU tier (`make gpu-check`, pytest -m gpu): the course and Gemma 7B's shape on a CUDA GPU; skipped without one.
Its measuring code also runs here on the CPU, on a tiny configuration."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from utils import gpu_check, models, report, run

ROOT = Path(__file__).resolve().parent.parent
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: PyTorch sees none here")


def _check_measured(result: dict, steps: int) -> None:
    for stage in ("sft", "dpo"):
        losses = result[stage]["losses"]
        assert len(losses) == steps and all(math.isfinite(x) for x in losses), (stage, losses)
        assert result[stage]["step_seconds"] > 0 and result[stage]["tokens_per_s"] > 0
        assert result[stage]["estimate_gib"] > 0 and result[stage]["settings"]["max_length"] > 0
    assert result["eval"]["score_pair_seconds"] > 0 and result["eval"]["generate_step_seconds"] > 0


def test_the_gemma_7b_check_runs_on_a_tiny_configuration_on_the_cpu(tmp_path):
    """The same code as the GPU tier's 7B run: random checkpoint, 4-bit load, LoRA with token rows, SFT and DPO,
    the evaluation model, and levers measured against their baselines."""
    config = models.gemma_7b_config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    num_key_value_heads=2, head_dim=16)
    levers = ("sft:one-row", "dpo:pairs-x2", "sft:rows-x2-longer")
    result = gpu_check.measure(config, "rtx4090-dryrun", tmp_path, steps=1, levers=levers, max_length=64,
                               grad_accum=2)
    _check_measured(result, steps=1)
    assert result["config"]["vocab_size"] == 256000 and result["batch"] == "4 x 64 tokens, 2 accumulated"
    assert list(result["levers"]) == list(levers) and all("error" not in r for r in result["levers"].values())
    assert result["levers"]["sft:one-row"]["settings"]["batch_size"] == 1
    assert result["levers"]["sft:one-row"]["settings"]["grad_accum"] == 8  # the same rows per step
    assert result["levers"]["sft:rows-x2-longer"]["settings"]["max_length"] == 128
    assert set(gpu_check.speedups(result)) == set(levers)
    table = gpu_check.to_markdown(result)
    assert "| sft:one-row |" in table and "Evaluation model" in table
    if not torch.cuda.is_available():
        assert result["sft"]["peak_gib"] is None and result["sft"]["fits_budget"] is None


def test_a_failing_lever_is_recorded_and_the_next_one_still_runs(tmp_path, monkeypatch):
    config = models.gemma_7b_config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    num_key_value_heads=2, head_dim=16)
    monkeypatch.setitem(gpu_check.LEVERS, "sft:broken", gpu_check.Lever("sft", "a lever that fails", {"lora_r": 0}))
    result = gpu_check.measure(config, "rtx4090-dryrun", tmp_path, steps=1, levers=("sft:broken", "sft:one-row"),
                               max_length=32, grad_accum=1)
    assert "error" in result["levers"]["sft:broken"] and "tokens_per_s" not in result["levers"]["sft:broken"]
    assert result["levers"]["sft:one-row"]["tokens_per_s"] > 0
    with pytest.raises(ValueError, match="Unknown lever"):
        gpu_check.measure(config, "rtx4090-dryrun", tmp_path, levers=("sft:nosuch",))


@pytest.mark.gpu
@needs_cuda
def test_the_course_runs_on_the_gpu_with_the_embedded_model(tmp_path):
    """Notebooks 01-04, cpu profile (embedded 270M), on the GPU: bitsandbytes' CUDA 4-bit and bf16 compute."""
    assert run.run_course("cpu", tmp_path) == 0, f"a notebook failed; see {tmp_path}/summary.md"
    manifest = report.read_manifest(tmp_path, "sft", made_by="notebook 02")
    assert manifest["profile"]["compute_dtype"] == "bfloat16" and "natively" in manifest["profile"][
        "compute_dtype_reason"]
    assert manifest["configs"]["sft"]["use_cpu"] is False and manifest["configs"]["sft"]["bf16"] is True
    metrics = report.load_metrics(tmp_path)
    assert metrics["sft/eval_loss_after"] < metrics["sft/eval_loss_before"]
    assert metrics["dpo/loss_step0"] == pytest.approx(math.log(2), abs=1e-3)


@pytest.mark.gpu
@needs_cuda
def test_gemma_7b_shape_trains_within_24_gib(tmp_path):
    """Gemma 7B's exact shape, random weights, the rtx4090 profile (4-bit, LoRA, turn-token rows, 4 packed rows of 1024
    tokens) and its levers: the baselines fit 24 GiB; results in outputs/gpu_check/gemma7b.json."""
    out = ROOT / "outputs" / "gpu_check" / "gemma7b.json"
    assert gpu_check.main(["--out", str(out)]) == 0
    result = json.loads(out.read_text())
    _check_measured(result, steps=2)
    for stage in ("sft", "dpo", "eval"):
        assert result[stage]["fits_budget"], f"{stage} peaked at {result[stage]['peak_gib']:.1f} GiB"
