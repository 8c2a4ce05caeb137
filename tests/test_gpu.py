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
        assert result[stage]["step_seconds"] > 0 and result[stage]["estimate_gib"] > 0
    assert result["training_hours_forecast"] > 0


def test_the_gemma_7b_check_runs_on_a_tiny_configuration_on_the_cpu(tmp_path):
    """The same code as the GPU tier's 7B run: random checkpoint, 4-bit load, LoRA with token rows, SFT and DPO."""
    config = models.gemma_7b_config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    num_key_value_heads=2, head_dim=16)
    result = gpu_check.measure(config, "rtx4090-dryrun", tmp_path, steps=1, max_length=64, grad_accum=2)
    _check_measured(result, steps=1)
    assert result["config"]["vocab_size"] == 256000 and result["batch"] == "1 x 64 tokens, 2 accumulated"
    if not torch.cuda.is_available():
        assert result["sft"]["peak_gib"] is None and result["sft"]["fits_budget"] is None


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
    """Gemma 7B's exact shape, random weights, NF4 + LoRA + turn-token rows, batch 1 x 2048: SFT and DPO peaks."""
    result = gpu_check.measure(models.gemma_7b_config(), "rtx4090", tmp_path, steps=2)
    out = ROOT / "outputs" / "gpu_check" / "gemma7b.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    _check_measured(result, steps=2)
    for stage in ("sft", "dpo"):
        assert result[stage]["fits_budget"], f"{stage} peaked at {result[stage]['peak_gib']:.1f} GiB"
