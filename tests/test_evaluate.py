"""Evaluation helpers: turn-ending share, preference accuracy (summed vs per token), DPO loss, log-probs."""

from __future__ import annotations

import math

import pytest

from utils import evaluate


def test_ends_turn_rate_and_comparison_table():
    replies = [{"reply": "Paris.", "stop": "<end_of_turn>", "ends_turn": True},
               {"reply": "Rome is", "stop": "(token limit)", "ends_turn": False}]
    assert evaluate.ends_turn_rate(replies) == 0.5
    rows = evaluate.compare_replies(["a", "b"], sft=replies)
    assert rows[0]["sft"] == "Paris." and "[no end of turn: (token limit)]" in rows[1]["sft"]


def test_summed_and_per_token_accuracy_differ_on_length():
    # chosen is longer: lower summed log-prob, higher per-token log-prob
    scored = [{"prompt_id": "p1", "chosen": -30.0, "chosen_n": 30, "rejected": -20.0, "rejected_n": 10},
              {"prompt_id": "p2", "chosen": -5.0, "chosen_n": 5, "rejected": -50.0, "rejected_n": 10}]
    acc = evaluate.preference_accuracy(scored, {"p1": "rambling", "p2": "wrong"})
    assert acc["summed"] == 0.5 and acc["per_token"] == 1.0
    assert acc["by_category"]["rambling"] == {"n": 1, "summed": 0.0, "per_token": 1.0}


def test_dpo_loss_from_log_probs():
    policy = [{"chosen": -10.0, "rejected": -20.0}]
    reference = [{"chosen": -12.0, "rejected": -15.0}]
    result = evaluate.dpo_loss(policy, reference, beta=0.1)
    assert result["rewards/chosen"] == pytest.approx(0.2) and result["rewards/rejected"] == pytest.approx(-0.5)
    assert result["loss"] == pytest.approx(-math.log(1 / (1 + math.exp(-0.7))))


def test_answer_logprobs_count_only_the_answer(tokenizer, tiny_model):
    prompt = [{"role": "user", "content": "Hi"}]
    total, n = evaluate.answer_logprobs(tiny_model, tokenizer, prompt, [{"role": "assistant", "content": "Hello!"}])
    assert n == len(tokenizer("Hello!", add_special_tokens=False)["input_ids"]) + 1  # + <end_of_turn>
    assert total < 0
