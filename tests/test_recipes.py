"""Training recipes: configs built from profiles, and padding-free batches that learn exactly what padded ones do."""

from __future__ import annotations

import pytest
import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from utils import data, recipes, report
from utils.profiles import PROFILES, get_profile


def test_sft_config_follows_the_profile(tmp_path):
    profile = get_profile("cpu")
    config = recipes.sft_config(profile, tmp_path)
    assert config.assistant_only_loss and config.padding_free
    assert config.max_length is None  # padding-free rows are not cut: the datasets drop long rows instead
    assert (config.max_steps, config.learning_rate, config.per_device_train_batch_size) == (
        profile.sft_steps, profile.sft_lr, profile.batch_size)
    assert config.lr_scheduler_type == "constant" and config.gradient_checkpointing == profile.gradient_checkpointing
    padded = recipes.sft_config(get_profile("cpu", padding_free=False, max_length=512), tmp_path)
    assert not padded.padding_free and padded.max_length == 512
    assert recipes.sft_config(profile, tmp_path, max_steps=3).max_steps == 3


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_profile_builds_its_real_configs(tmp_path, tokenizer, name):
    """The objects scripts and notebooks train with, rtx4090 included (no GPU needed to build them)."""
    profile = get_profile(name)
    sft, dpo = recipes.sft_recipe(profile, tokenizer, tmp_path), recipes.dpo_recipe(profile, tmp_path)
    quant = sft["quantization"]
    assert quant.load_in_4bit and quant.bnb_4bit_quant_type == "nf4" and quant.bnb_4bit_use_double_quant
    assert quant.bnb_4bit_compute_dtype == getattr(torch, profile.compute_dtype) == quant.bnb_4bit_quant_storage
    assert (sft["lora"].r, sft["lora"].lora_alpha, sft["lora"].target_modules) == (profile.lora_r, profile.lora_alpha,
                                                                                    "all-linear")
    assert sft["lora"].trainable_token_indices == {"embed_tokens": [105, 106]} and sft["lora"].ensure_weight_tying
    assert dpo["lora"].trainable_token_indices is None and dpo["lora"].r == profile.lora_r
    config = sft["sft"]
    assert (config.max_steps, config.learning_rate, config.gradient_accumulation_steps) == (
        profile.sft_steps, profile.sft_lr, profile.grad_accum)
    assert config.assistant_only_loss and config.lr_scheduler_type == "constant"
    assert config.padding_free == profile.padding_free and config.max_length == (
        None if profile.padding_free else profile.max_length)
    config = dpo["dpo"]
    assert (config.beta, config.learning_rate, config.max_length, config.max_steps) == (
        profile.dpo_beta, profile.dpo_lr, profile.max_length, profile.dpo_steps)
    assert config.learning_rate != 1e-6 and config.lr_scheduler_type == "constant"  # not TRL's short-run defaults


def test_differences_name_the_one_argument_that_differs(tmp_path, tokenizer):
    """The check behind tests/test_notebooks.py: a notebook's recorded configs against the scripts' recipe."""
    profile = get_profile("cpu")
    recorded = report.config_dicts(recipes.sft_recipe(profile, tokenizer, tmp_path / "notebook"))
    assert recipes.differences(recorded, recipes.sft_recipe(profile, tokenizer, tmp_path / "script")) == []
    for changed, where in ((get_profile("cpu", sft_lr=3e-4), "sft.learning_rate: 0.0002 != 0.0003"),
                           (get_profile("cpu", lora_alpha=8), "lora.lora_alpha: 32 != 8")):
        assert recipes.differences(recorded, recipes.sft_recipe(changed, tokenizer, tmp_path)) == [where]
    recorded["quantization"]["bnb_4bit_use_double_quant"] = False  # changed on the notebook's side only
    assert recipes.differences(recorded, recipes.sft_recipe(profile, tokenizer, tmp_path)) == [
        "quantization.bnb_4bit_use_double_quant: False != True"]
    del recorded["lora"]
    assert len(recipes.differences(recorded, recipes.sft_recipe(profile, tokenizer, tmp_path))) > 10


def test_changed_from_defaults_lists_the_course_choices(tmp_path):
    changed = recipes.changed_from_defaults(recipes.sft_config(get_profile("cpu"), tmp_path))
    assert changed["padding_free"] is True and changed["max_length"] is None
    assert changed["learning_rate"] == get_profile("cpu").sft_lr
    assert "output_dir" not in changed and "per_device_train_batch_size" not in changed  # 8 is TRL's default too


def test_dpo_config_adds_the_sft_term_only_when_weighted(tmp_path):
    plain = recipes.dpo_config(get_profile("cpu", dpo_sft_weight=0.0), tmp_path)
    assert plain.loss_type == ["sigmoid"] and plain.beta == 0.1 and plain.learning_rate == get_profile("cpu").dpo_lr
    rpo = recipes.dpo_config(get_profile("cpu"), tmp_path)  # the cpu profile's choice (make bench-frontier)
    assert rpo.loss_type == ["sigmoid", "sft"] and rpo.loss_weights == [1.0, 2.0]


def test_padding_free_datasets_drop_rows_that_do_not_fit(tokenizer):
    sft_data = data.load_sft_dataset(get_profile("cpu").sft_data, max_rows=40)
    lengths = data.length_report(tokenizer, sft_data["train_sft"], 10_000)["lengths"]["total"]
    limit = sorted(lengths)[len(lengths) // 2]
    train, evaluation = recipes.sft_datasets(get_profile("cpu", max_length=limit), tokenizer, sft_data)
    assert len(train) == sum(n <= limit for n in lengths) < len(lengths)
    assert train.column_names == ["messages"] and len(evaluation) <= get_profile("cpu").sft_eval_rows
    kept, _ = recipes.sft_datasets(get_profile("cpu", max_length=limit, padding_free=False), tokenizer, sft_data)
    assert len(kept) == len(lengths)  # padded batches truncate instead


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padding_free_batch_gives_the_padded_loss_and_gradients(tiny_model, attn):
    """One concatenated row with restarting position ids = the padded batch: attention stays inside each row."""
    tiny_model.config._attn_implementation = attn
    tiny_model.train()
    rows = [{"input_ids": list(range(10, 10 + n))} for n in (7, 19, 3, 12)]
    losses, grads = [], []
    for padding_free in (False, True):
        batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=padding_free)(rows)
        tiny_model.zero_grad()
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "labels", "attention_mask", "position_ids")}
        loss = tiny_model(**inputs, use_cache=False).loss  # as SFTTrainer calls it: a cache hides the row boundaries
        loss.backward()
        losses.append(loss.item())
        grads.append(tiny_model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_a_concatenated_row_attends_across_rows_without_boundaries(tiny_model):
    """The control: without restarting position ids, or with a KV cache on, rows see each other (wrong logits)."""
    rows = [{"input_ids": list(range(10, 10 + n))} for n in (7, 19, 3, 12)]
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(rows)
    free = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)
    with torch.no_grad():
        right = tiny_model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits[1, :19]
        packed = tiny_model(input_ids=free["input_ids"], position_ids=free["position_ids"], use_cache=False).logits
        no_positions = tiny_model(input_ids=free["input_ids"], use_cache=False).logits
        cached = tiny_model(input_ids=free["input_ids"], position_ids=free["position_ids"], use_cache=True).logits
    torch.testing.assert_close(packed[0, 7:26], right, rtol=1e-4, atol=1e-5)
    assert (no_positions[0, 7:26] - right).abs().max() > 0.01
    assert (cached[0, 7:26] - right).abs().max() > 0.01
