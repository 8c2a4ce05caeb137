"""Measuring models: eval loss, turn-ending share, and preference accuracy from log-probabilities."""

from __future__ import annotations

import torch

from utils.chat import encode, fast_inference


def ends_turn_rate(replies: list[dict]) -> float:
    """Share of replies that are non-empty and end with <end_of_turn> before the token limit."""
    return sum(r["ends_turn"] for r in replies) / len(replies)


def compare_replies(prompts: list[str], **replies: list[dict]) -> list[dict]:
    """Rows of prompt plus each model's reply (marked when it never ended its turn), for a side-by-side table."""
    rows = []
    for i, prompt in enumerate(prompts):
        row = {"prompt": prompt}
        for name, answers in replies.items():
            r = answers[i]
            row[name] = r["reply"] + ("" if r["ends_turn"] else f"  [no end of turn: {r['stop']}]")
        rows.append(row)
    return rows


@torch.no_grad()
def answer_logprobs(model, tokenizer, prompt: list[dict], answer: list[dict]) -> tuple[float, int]:
    """(summed log-prob, token count) of the answer's trained tokens (reply and <end_of_turn>) given the prompt."""
    enc = encode(tokenizer, prompt + answer)
    start = len(encode(tokenizer, prompt, add_generation_prompt=True)["input_ids"])
    ids = torch.tensor([enc["input_ids"]], device=model.device)
    # only the answer's positions need the 262k-wide output layer
    logits = model(input_ids=ids, logits_to_keep=ids.shape[1] - start + 1).logits[0, :-1].float()
    logps = torch.log_softmax(logits, dim=-1).gather(1, ids[0, start:, None])[:, 0]
    mask = torch.tensor(enc["assistant_masks"][start:], device=model.device, dtype=torch.bool)
    return float(logps[mask].sum()), int(mask.sum())


def pair_logprobs(model, tokenizer, pairs) -> list[dict]:
    """Summed log-prob and token count of each pair's chosen and rejected answer under the model."""
    was_training = model.training
    model.eval()
    scored = []
    with fast_inference(model):
        for row in pairs:
            c_sum, c_n = answer_logprobs(model, tokenizer, row["prompt"], row["chosen"])
            r_sum, r_n = answer_logprobs(model, tokenizer, row["prompt"], row["rejected"])
            scored.append({"prompt_id": row.get("prompt_id"), "chosen": c_sum, "chosen_n": c_n,
                           "rejected": r_sum, "rejected_n": r_n})
    model.train(was_training)
    return scored


def preference_accuracy(scored: list[dict], categories: dict[str, str] | None = None) -> dict:
    """Share of pairs whose chosen answer out-scores the rejected one, summed and per token, overall and by category."""
    def shares(rows: list[dict]) -> dict:
        n = len(rows)
        return {"n": n, "summed": sum(r["chosen"] > r["rejected"] for r in rows) / n,
                "per_token": sum(r["chosen"] / r["chosen_n"] > r["rejected"] / r["rejected_n"] for r in rows) / n}

    result = shares(scored)
    result["chosen_logp"] = sum(r["chosen"] for r in scored) / len(scored)
    groups: dict[str, list[dict]] = {}
    for r in scored:
        groups.setdefault((categories or {}).get(r["prompt_id"], "all"), []).append(r)
    result["by_category"] = {name: shares(rows) for name, rows in sorted(groups.items())}
    return result


def dpo_loss(policy: list[dict], reference: list[dict], beta: float) -> dict:
    """Mean DPO loss and implicit rewards of a policy against a reference, from pair_logprobs of each."""
    losses, chosen, rejected = [], [], []
    for p, r in zip(policy, reference):
        reward_c = beta * (p["chosen"] - r["chosen"])
        reward_r = beta * (p["rejected"] - r["rejected"])
        losses.append(float(-torch.nn.functional.logsigmoid(torch.tensor(reward_c - reward_r))))
        chosen.append(reward_c)
        rejected.append(reward_r)
    n = len(losses)
    return {"loss": sum(losses) / n, "rewards/chosen": sum(chosen) / n, "rewards/rejected": sum(rejected) / n}


@torch.no_grad()
def prompt_logits(model, tokenizer, prompts: list[str]) -> list[torch.Tensor]:
    """The model's logits (float32, on the CPU) over each rendered prompt: compared after the model is freed."""
    found = []
    with fast_inference(model):
        for prompt in prompts:
            ids = torch.tensor([encode(tokenizer, [{"role": "user", "content": prompt}], True)["input_ids"]])
            found.append(model(input_ids=ids.to(model.device)).logits.float().cpu())
    return found


def max_logit_difference(logits_a: list[torch.Tensor], logits_b: list[torch.Tensor]) -> float:
    """Largest absolute difference between two models' prompt_logits over the same prompts."""
    return max(float((a - b).abs().max()) for a, b in zip(logits_a, logits_b, strict=True))


def loss_terms(trainer, evaluated: dict[str, float], prefix: str = "eval") -> dict[str, float]:
    """The DPO (sigmoid) term and the SFT term of a DPOTrainer's evaluated loss, apart.

    With an SFT term, one more evaluation with the SFT weight set to 0 gives the DPO term; the loss is linear in the
    weights, so the SFT term is the rest divided by its weight.
    """
    total = evaluated[f"{prefix}_loss"]
    if list(trainer.loss_types) == ["sigmoid"]:
        return {"total": total, "dpo": total}
    weights = list(trainer.loss_weights)
    trainer.loss_weights = [1.0 if kind == "sigmoid" else 0.0 for kind in trainer.loss_types]
    try:
        dpo = trainer.evaluate(metric_key_prefix=f"{prefix}_dpo_term")[f"{prefix}_dpo_term_loss"]
    finally:
        trainer.loss_weights = weights
    sft_weight = weights[list(trainer.loss_types).index("sft")]
    return {"total": total, "dpo": dpo, "sft": (total - dpo) / sft_weight}


@torch.no_grad()
def end_of_turn_probability(model, tokenizer, conversations: list[list[dict]]) -> float:
    """Mean probability the model gives <end_of_turn> right where an assistant reply ends."""
    end_id = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    was_training = model.training
    model.eval()
    probs = []
    with fast_inference(model):
        for messages in conversations:
            enc = encode(tokenizer, messages)
            ids = torch.tensor([enc["input_ids"]], device=model.device)
            logits = model(input_ids=ids).logits[0].float()
            for pos in range(1, ids.shape[1]):
                if enc["assistant_masks"][pos] and enc["input_ids"][pos] == end_id:
                    probs.append(torch.softmax(logits[pos - 1], dim=-1)[end_id].item())
    model.train(was_training)
    return sum(probs) / len(probs)


@torch.no_grad()
def nearest_tokens(model, tokenizer, token: str, k: int = 8) -> tuple[list[tuple[str, float]], int]:
    """The k tokens whose input embeddings are closest (cosine) to token's, and how many exceed 0.99."""
    weight = model.get_input_embeddings().weight.float()
    row = weight[tokenizer.convert_tokens_to_ids(token)]
    cosine = torch.nn.functional.cosine_similarity(weight, row[None], dim=-1)
    top = cosine.topk(k + 1)
    pairs = [(tokenizer.convert_ids_to_tokens(int(i)), float(c)) for c, i in zip(top.values, top.indices)]
    return pairs[1:], int((cosine > 0.99).sum()) - 1
