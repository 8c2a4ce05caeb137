"""The GPU course forecast: the rtx4090 profile fits its 2-hour budget at the sizes the course promises, every input is
shown, throughputs come from the GPU measurement and are scaled to another GPU by its tensor rate."""

from __future__ import annotations

import math

import pytest

from utils import chat, data, forecast, models, report
from utils.profiles import get_profile

GPU = report.bench_results("gpu")


def test_rtx4090_fits_two_hours_on_an_rtx_4090_at_the_promised_sizes():
    profile = get_profile("rtx4090")
    summary = forecast.summary(profile)
    assert summary["gpu"] == "NVIDIA GeForce RTX 4090" and summary["budget_minutes"] == 120
    assert 0 < summary["minutes"]["total"] <= 120 and summary["fits_budget"]
    assert profile.max_length >= 1024
    assert profile.sft_steps * profile.batch_size * profile.grad_accum >= 2000  # packed rows: 1 or more conversations
    assert profile.sft_train_rows >= 2000
    assert profile.dpo_steps * profile.dpo_batch_size * profile.grad_accum >= 500 and profile.pref_train_rows >= 500


def test_the_long_version_is_forecast_in_hours_and_has_no_budget():
    summary = forecast.summary(get_profile("rtx4090-long"))
    assert summary["budget_minutes"] is None and summary["fits_budget"] is None
    assert summary["minutes"]["total"] > 3 * forecast.summary(get_profile("rtx4090"))["minutes"]["total"]


def test_every_item_shows_its_inputs_and_every_notebook_is_covered():
    summary = forecast.summary(get_profile("rtx4090"))
    assert {item["notebook"] for item in summary["items"]} == {"01", "02", "03", "04"}
    assert all(item["minutes"] >= 0 and item["inputs"] for item in summary["items"])
    training = [i for i in summary["items"] if i["what"].startswith(("SFT training", "DPO training"))]
    assert len(training) == 2 and "GFLOP" in training[0]["inputs"] and "tokens/s" in training[1]["inputs"]
    assert "sft:padding-free-x4" in summary["throughputs"]["sft"]  # the measurement of the profile's set-up


def test_throughputs_are_measured_on_the_gpu_at_hand_and_scaled_elsewhere():
    profile = get_profile("rtx4090")
    here = forecast.rates(profile, GPU["device"], GPU)
    there = forecast.rates(profile, "NVIDIA GeForce RTX 4090", GPU)
    assert "measured" in here["basis"]["sft"] and "x 0.209" in there["basis"]["sft"]
    assert here["sft_tokens_per_s"] == GPU["levers"]["sft:padding-free-x4"]["tokens_per_s"]
    assert there["sft_tokens_per_s"] == pytest.approx(here["sft_tokens_per_s"] * 165.2 / 790)
    assert there["decode_step_s"] > here["decode_step_s"]


def test_a_set_up_that_was_never_measured_is_an_error_not_a_guess():
    with pytest.raises(LookupError, match="no sft measurement"):
        forecast.rates(get_profile("rtx4090", batch_size=3, packing=True), result=GPU)


def test_training_time_is_tokens_over_throughput():
    profile = get_profile("rtx4090")
    items = {i.what: i for i in forecast.forecast(profile, result=GPU)}
    sft = items[f"SFT training, {profile.sft_steps} steps"]
    tokens = profile.sft_steps * profile.batch_size * profile.grad_accum * profile.max_length  # packed rows are full
    assert sft.seconds == pytest.approx(tokens / forecast.rates(profile, result=GPU)["sft_tokens_per_s"])


def test_hub_rows_count_their_mean_and_local_rows_their_own_length():
    tokens, basis = forecast.mean_tokens("HuggingFaceH4/ultrachat_200k", 1024)
    assert tokens == 1024 and "ultrachat_200k's mean" in basis  # the mean conversation is longer than 1024 tokens
    assert forecast.mean_tokens("HuggingFaceH4/ultrachat_200k", 2048)[0] == forecast.HUB_MEAN_TOKENS[
        "HuggingFaceH4/ultrachat_200k"]
    tokenizer = chat.setup_tokenizer(models.load_tokenizer(get_profile("cpu")), 256)
    dry = get_profile("rtx4090-dryrun")
    short, basis = forecast.mean_tokens(dry.sft_data, 64, tokenizer)
    long, _ = forecast.mean_tokens(dry.sft_data, 4096, tokenizer)
    assert short <= 64 < long < 1024 and "ultrachat_mini" in basis


def test_the_characters_per_token_behind_the_hub_means_hold_for_the_gemma_tokenizer():
    tokenizer = models.load_tokenizer(get_profile("cpu"))
    texts = [m["content"] for row in data.load_sft_dataset(get_profile("cpu").sft_data)["train_sft"]
             for m in row["messages"]]
    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    assert sum(map(len, texts)) / tokens == pytest.approx(forecast.CHARS_PER_TOKEN, rel=0.1)


def test_the_dry_run_shows_the_gpu_course_and_the_cpu_profile_none():
    assert forecast.stand_in(get_profile("rtx4090-dryrun")).name == "rtx4090"
    assert forecast.stand_in(get_profile("rtx4090-long")).name == "rtx4090-long"
    assert forecast.stand_in(get_profile("cpu")) is None


def test_evaluations_follow_the_sft_schedule():
    profile = get_profile("rtx4090")
    items = {i.what.split(",")[0]: i for i in forecast.forecast(profile, result=GPU)}
    evals = 2 + profile.sft_steps // max(1, profile.sft_steps // 2)
    assert items["held-out loss"].what == f"held-out loss, {evals} evaluations"
    forward = forecast.rates(profile, result=GPU)["forward_tokens_per_s"]
    assert math.isclose(items["held-out loss"].seconds, evals * profile.sft_eval_rows * 1024 / forward)
