"""Tests of the training-memory estimator: headline figures, monotonicity, sharding and parameter counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from utils import memory, memory_plan
from utils.memory import ModelShape, estimate, per_gpu, shape_for
from utils.profiles import get_profile

SEVEN_B = shape_for("generic-7b")
SHAPES = [shape_for("gemma-3-270m"), shape_for("gemma-7b"), SEVEN_B]


def static(est: memory.MemoryEstimate) -> int:
    """Everything but activations, in bytes."""
    return est.weights + est.gradients + est.optimizer + est.lora


def test_full_fine_tuning_7b_mixed_precision_adam_is_18_bytes_per_param():
    assert static(estimate(SEVEN_B, "full")) == pytest.approx(126e9, rel=0.01)
    assert static(estimate(SEVEN_B, "full", weight_dtype="fp32")) == pytest.approx(16 * 7e9, rel=0.01)
    assert static(estimate(SEVEN_B, "full", optimizer="sgd")) < static(estimate(SEVEN_B, "full"))


def test_qlora_7b_needs_about_7_gb():
    total = estimate(SEVEN_B, "qlora", batch_size=1, seq_len=512, lora_r=16).total
    assert 5e9 <= total <= 9e9


@pytest.mark.parametrize("batch_size", [1, get_profile("rtx4090").batch_size])
def test_rtx4090_profile_fits_24_gib(batch_size):
    profile = get_profile("rtx4090")
    assert profile.model_id == "google/gemma-7b" and profile.load_in_4bit
    est = estimate(shape_for("gemma-7b"), "qlora", batch_size=batch_size, seq_len=profile.max_length,
                   lora_r=profile.lora_r, gradient_checkpointing=profile.gradient_checkpointing,
                   trainable_token_rows=2)
    assert memory.fits(est, 24)


@pytest.mark.parametrize("method", memory.METHODS)
@pytest.mark.parametrize("shape", SHAPES, ids=["270m", "gemma-7b", "7b"])
def test_more_rank_batch_or_sequence_never_lowers_the_estimate(method, shape):
    for knob, values in [("lora_r", [1, 8, 16, 64, 256]), ("batch_size", [1, 2, 4, 16]),
                         ("seq_len", [1, 128, 512, 2048, 8192])]:
        for checkpointing in (False, True):
            totals = [estimate(shape, method, gradient_checkpointing=checkpointing, **{knob: v}).total
                      for v in values]
            assert totals == sorted(totals), (knob, checkpointing)


@pytest.mark.parametrize("shape", SHAPES, ids=["270m", "gemma-7b", "7b"])
@pytest.mark.parametrize("settings", [{}, {"batch_size": 4, "seq_len": 2048, "gradient_checkpointing": True},
                                      {"weight_dtype": "fp32", "optimizer": "sgd", "trainable_token_rows": 2}])
def test_full_needs_more_than_lora_more_than_qlora(shape, settings):
    full, lora, qlora = (estimate(shape, method, **settings).total for method in memory.METHODS)
    assert full > lora > qlora


@pytest.mark.parametrize("method, kwargs", [("prefix", {}), ("lora", {"optimizer": "adafactor"}),
                                            ("lora", {"weight_dtype": "int8"}), ("lora", {"lora_targets": ["qkv"]})])
def test_bad_choices_raise_with_the_valid_values(method, kwargs):
    with pytest.raises(ValueError, match="Valid values"):
        estimate(SEVEN_B, method, **kwargs)


def test_sharding_divides_everything_but_activations():
    est = estimate(SEVEN_B, "full", batch_size=2, seq_len=1024)
    sharded = per_gpu(est, 4, "zero3")
    assert sharded.weights == pytest.approx(est.weights / 4)
    assert sharded.optimizer == pytest.approx(est.optimizer / 4)
    assert sharded.activations == est.activations
    assert per_gpu(est, 4, "fsdp") == sharded
    assert per_gpu(est, 4, "ddp") == est
    with pytest.raises(ValueError, match="Valid values"):
        per_gpu(est, 4, "tensor-parallel")


def test_table_and_markdown():
    rows = memory.table([estimate(SEVEN_B, method) for method in memory.METHODS])
    assert [row["method"] for row in rows] == list(memory.METHODS)
    assert rows[0]["total"] == round(estimate(SEVEN_B, "full").total / 2**30, 2)
    lines = memory.to_markdown(rows).splitlines()
    assert lines[0].startswith("| method | weights |") and len(lines) == 2 + len(rows)


def test_shape_from_gemma3_config_counts_270m_params():
    config = Gemma3TextConfig(hidden_size=640, num_hidden_layers=18, intermediate_size=2048, vocab_size=262144,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=256)
    shape = ModelShape.from_config(config)
    assert shape.n_params == pytest.approx(268e6, rel=0.02)
    assert shape == shape_for("gemma-3-270m")
    assert shape_for("gemma-2b").n_params == pytest.approx(2.51e9, rel=0.01)
    assert shape_for("gemma-7b").n_params == pytest.approx(8.54e9, rel=0.01)


def test_counts_match_a_real_tiny_gemma():
    config = Gemma3TextConfig(hidden_size=32, num_hidden_layers=2, intermediate_size=64, vocab_size=1000,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config)
    shape = ModelShape.from_config(config)
    assert shape.n_params == sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert memory.lora_params(shape, 4) == trainable


def test_a_profile_takes_its_shape_from_its_preset_or_its_model_config(tmp_path):
    assert memory.shape_for_profile(get_profile("cpu")) == shape_for("gemma-3-270m")
    assert memory.shape_for_profile(get_profile("rtx4090")) == shape_for("gemma-7b")
    two_b = get_profile("rtx4090", model_id="google/gemma-2b", model_shape="gemma-2b")
    assert memory.estimate_profile(two_b).total < memory.estimate_profile(get_profile("rtx4090")).total
    config = Gemma3TextConfig(hidden_size=32, num_hidden_layers=2, intermediate_size=64, vocab_size=1000,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    config.save_pretrained(tmp_path)
    other = get_profile("rtx4090", model_id=str(tmp_path))  # another model: its own config, not Gemma 7B's preset
    assert other.model_shape is None
    assert memory.shape_for_profile(other) == ModelShape.from_config(config)


# ----------------------------------------------------------------------------------------------------------------
# The plan: what each step of notebooks 02 and 04 holds at once, GPU and host
# ----------------------------------------------------------------------------------------------------------------


def test_rtx4090_plan_fits_one_24_gib_gpu_and_a_32_gib_host_at_every_step():
    steps = memory_plan.plan(get_profile("rtx4090"))
    assert len(steps) == 5
    for step in steps:
        assert step.gpu <= 24 * memory.GIB and step.host <= 32 * memory.GIB, step.as_row()
    training = [s for s in steps if s.step.startswith(("SFT", "DPO"))]
    weights = memory.model_bytes(shape_for("gemma-7b"), "4bit")
    assert all(s.gpu > weights for s in training), "the 7B trainings run on the GPU"


def test_rtx4090_evaluates_7b_models_in_4bit_on_the_gpu_not_unquantized_on_the_host():
    (evaluation,) = [s for s in memory_plan.plan(get_profile("rtx4090")) if s.step.startswith("evaluation")]
    shape = shape_for("gemma-7b")
    assert memory.model_bytes(shape, "4bit") < evaluation.gpu < 24 * memory.GIB
    assert evaluation.host < memory.model_bytes(shape, "bfloat16"), "no unquantized 7B model on the host"
    # in bf16 the weights and the scoring and generation activations would not fit 24 GiB: hence 4-bit
    bf16 = memory.model_bytes(shape, "bfloat16") + memory.inference_bytes(shape, 2048, 256, el=2)
    assert bf16 > 20 * memory.GIB


def test_merging_7b_in_bf16_stays_on_the_host_within_32_gib():
    merges = [s for s in memory_plan.plan(get_profile("rtx4090")) if s.step.startswith("merge")]
    assert len(merges) == 2
    for step in merges:
        assert step.gpu == 0 and memory.model_bytes(shape_for("gemma-7b"), "bfloat16") < step.host < 32 * memory.GIB


def test_cpu_plan_holds_nothing_on_a_gpu_and_evaluates_in_fp32():
    steps = memory_plan.plan(get_profile("cpu"), cuda=False)
    assert all(s.gpu == 0 and s.host > memory.PROCESS_HOST_BYTES for s in steps)
    assert "float32" in steps[-1].step
    assert "| where | step | gpu_gib | host_gib |" in memory_plan.describe_plan(get_profile("cpu"), cuda=False)


def test_the_tiny_preset_is_the_tiny_gemma_that_dry_runs_train():
    from utils.models import tiny_gemma_config

    model = Gemma3ForCausalLM(tiny_gemma_config())
    assert sum(p.numel() for p in model.parameters()) == shape_for("gemma-3-tiny").n_params


# ----------------------------------------------------------------------------------------------------------------
# The estimator against the GPU peaks recorded by utils.gpu_check on Gemma 7B's shape (benchmarks/results/gpu.json)
# ----------------------------------------------------------------------------------------------------------------

GPU = json.loads((Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "gpu.json").read_text())
RECORDED = {name: run for name, run in [("sft", GPU["sft"]), ("dpo", GPU["dpo"]), ("eval", GPU["eval"]),
                                        *GPU["levers"].items()] if run.get("peak_gib")}
TOLERANCE = 0.30


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_the_estimator_is_within_30_percent_of_each_recorded_gemma_7b_peak(name):
    """SFT (TRL's chunked LM head, fp32 embedding, trained token rows), DPO and the 4-bit evaluation model."""
    run = RECORDED[name]
    stage = name.split(":")[0]
    profile = get_profile("rtx4090", **{k: v for k, v in run["settings"].items() if k != "compute_dtype"})
    estimate_gib = memory.estimate_stage(profile, stage) / memory.GIB
    assert estimate_gib == pytest.approx(run["peak_gib"], rel=TOLERANCE), (name, run["settings"])


def test_the_estimator_covers_the_raw_scoring_of_the_7b_evaluation_path():
    """.gpu-bundle/run.sh phase E scores a batch of 2 x 2048 tokens with full fp32 logits and their log-softmax."""
    shape = shape_for("gemma-7b")
    estimate_gib = (memory.model_bytes(shape, "4bit") + memory.scoring_bytes(shape, 2 * 2048, el=2)) / memory.GIB
    assert estimate_gib == pytest.approx(GPU["eval_path"]["eval_peak_gib"], rel=TOLERANCE)


def test_the_chunked_head_is_a_mode_the_plain_loop_keeps_full_logits():
    """benchmarks/memory_check.py's plain PyTorch loop keeps the full fp32 logits: its estimate is unchanged."""
    shape = shape_for("gemma-7b")
    full = estimate(shape, "qlora", seq_len=2048, gradient_checkpointing=True)
    chunked = estimate(shape, "qlora", seq_len=2048, gradient_checkpointing=True, lm_head="chunked")
    assert full.activations - chunked.activations > 2048 * shape.vocab_size * 10
    assert (full.weights, full.lora) == (chunked.weights, chunked.lora)
