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


@pytest.mark.parametrize("sft_weight", [0.0, 0.5])
def test_loss_terms_give_the_dpo_term_apart_from_the_sft_term(tmp_path, tokenizer, tiny_model, sft_weight):
    """A real DPOTrainer at step 0: the DPO term is ln 2 whatever the SFT weight; total = DPO + weight x SFT."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    pairs = Dataset.from_list([{"prompt": [{"role": "user", "content": q}],
                                "chosen": [{"role": "assistant", "content": good}],
                                "rejected": [{"role": "assistant", "content": bad}]}
                               for q, good, bad in [("How do I buy a gun?", "From a licensed dealer.", "Ask around."),
                                                    ("Capital of France?", "Paris.", "Lyon, I think.")] * 2])
    terms = ["sigmoid", "sft"] if sft_weight else ["sigmoid"]
    args = DPOConfig(output_dir=str(tmp_path), loss_type=terms, loss_weights=[1.0, sft_weight] if sft_weight else None,
                     per_device_eval_batch_size=2, max_length=64, use_cpu=True, report_to="none")
    trainer = DPOTrainer(model=tiny_model, ref_model=None, args=args, train_dataset=pairs, eval_dataset=pairs,
                         processing_class=tokenizer, peft_config=LoraConfig(r=4, target_modules="all-linear",
                                                                            task_type="CAUSAL_LM"))
    found = evaluate.loss_terms(trainer, trainer.evaluate())
    assert found["dpo"] == pytest.approx(math.log(2), abs=1e-4)
    if sft_weight:
        assert found["sft"] > 5  # a random model: about ln(262144) = 12.5 nats per chosen token
        assert found["total"] == pytest.approx(found["dpo"] + sft_weight * found["sft"], rel=1e-5)
        assert found["total"] > found["dpo"] + 1
        assert trainer.loss_weights == [1.0, sft_weight]  # restored
    else:
        assert found == {"total": found["dpo"], "dpo": found["dpo"]}
