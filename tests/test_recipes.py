"""Training recipes: configs built from profiles, and padding-free batches that learn exactly what padded ones do."""

from __future__ import annotations

import pytest
import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from utils import data, recipes
from utils.profiles import get_profile


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


def test_changed_from_defaults_lists_the_course_choices(tmp_path):
    changed = recipes.changed_from_defaults(recipes.sft_config(get_profile("cpu"), tmp_path))
    assert changed["padding_free"] is True and changed["max_length"] is None
    assert changed["learning_rate"] == get_profile("cpu").sft_lr
    assert "output_dir" not in changed and "per_device_train_batch_size" not in changed  # 8 is TRL's default too


def test_dpo_config_adds_the_sft_term_only_when_weighted(tmp_path):
    plain = recipes.dpo_config(get_profile("cpu"), tmp_path)
    assert plain.loss_type == ["sigmoid"] and plain.beta == 0.1 and plain.learning_rate == 1e-4
    rpo = recipes.dpo_config(get_profile("cpu", dpo_sft_weight=1.0), tmp_path)
    assert rpo.loss_type == ["sigmoid", "sft"] and rpo.loss_weights == [1.0, 1.0]


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
