"""How long a GPU profile's course takes on a GPU, notebook by notebook, from its inputs: the tokens each step trains on
(from the data's lengths), FLOPs per token (from the model's shape) and the throughput `utils.gpu_check` measured
(benchmarks/results/gpu.json), on the GPU at hand or scaled to another GPU by its bf16 tensor rate."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from utils import memory, recipes, report
from utils.profiles import Profile

TARGET_GPU = "NVIDIA GeForce RTX 4090"


@dataclass(frozen=True)
class GpuSpec:
    """A GPU's dense bf16 tensor rate (fp32 accumulate) and memory bandwidth, and where the figures come from."""

    bf16_tflops: float
    bandwidth_gbs: float
    source: str


GPUS = {
    "NVIDIA GeForce RTX 4090": GpuSpec(165.2, 1008, "specification (Ada whitepaper: dense BF16, FP32 accumulate)"),
    "NVIDIA H200": GpuSpec(790, 4300, "measured on the machine of benchmarks/results/gpu.json (FACTS.md, 2026-12-04)"),
}

# Mean tokens per row of the Hub datasets in Gemma tokens (template included), from their dataset cards' bytes per row
# and the Gemma tokenizer's 4.2 characters per token, measured on the shipped English rows (tests/test_forecast.py):
# - ultrachat_200k train_sft: 1,397,058,554 bytes / 207,865 rows = 6,721 bytes; counting every byte but the 64-char
#   prompt_id as conversation text (the first prompt is stored twice, so this overstates), 6,657 / 4.2 = 1,585 tokens
#   plus about 6 template tokens for each of ~6 messages.
# - ultrafeedback_binarized train_prefs: 405,688,662 bytes / 61,135 rows = 6,636 bytes, holding the prompt four times
#   and the answers three times; a prompt plus one answer comes to 420-465 tokens however the bytes split, plus the
#   template: 470 per sequence (prompt + one answer), the upper end.
HUB_MEAN_TOKENS = {"HuggingFaceH4/ultrachat_200k": 1620, "HuggingFaceH4/ultrafeedback_binarized": 470}
CHARS_PER_TOKEN = 4.2

# Work off the GPU, on the learner's machine (estimates, scaled from this project's CPU machine where measured):
LOAD_SECONDS = 30.0  # a 4-bit load of the 17 GB checkpoint from local disk (about 1 GB/s; the H200 host took 2.6 s)
MERGE_GB_PER_S = 0.06  # GB of merged model per second: models.merge_adapter of the 270M model (1.07 GB in fp32) took
# 12-18 s on 2 cores of an AMD EPYC with AVX512-BF16 (2026-12-04); a desktop with more cores merges faster
SETUP_SECONDS = 60.0  # imports, tokenizer, data from the local cache, tokenizing and checking lengths: per notebook
PROBE_TOKENS = 32  # declines.REPLY_TOKENS: the decline probes' new tokens
GEN_BATCH = 8  # chat.generate's batch


@dataclass(frozen=True)
class Item:
    """One piece of a notebook's time: what, how many seconds, and the inputs that give them."""

    notebook: str
    what: str
    seconds: float
    inputs: str


def mean_tokens(source: str, max_length: int, tokenizer=None) -> tuple[float, str]:
    """Mean tokens a row of the dataset counts at max_length (each row min(max_length, its length)), and the basis:
    the real rows of a local folder when a tokenizer is given, else the Hub dataset's mean (HUB_MEAN_TOKENS)."""
    if source in HUB_MEAN_TOKENS:
        mean = HUB_MEAN_TOKENS[source]
        return float(min(max_length, mean)), f"min({max_length}, {mean}: {source}'s mean, from its card)"
    if tokenizer is None:
        raise ValueError(f"{source} is not a known Hub dataset: pass a tokenizer to measure its rows")
    return _local_mean(source, max_length, tokenizer), f"min({max_length}, each row) over {Path(source).name}'s rows"


def _local_mean(folder: str, max_length: int, tokenizer) -> float:
    """Mean of min(max_length, tokens) over a local folder's training rows (conversations or prompt + answer)."""
    from utils import chat, data

    if (Path(folder) / "train_sft.jsonl").exists():
        rows = [r["messages"] for r in data.load_sft_dataset(folder)["train_sft"]]
    else:
        pairs = data.load_preference_dataset(folder)["train_prefs"]
        rows = [r["prompt"] + r[side] for r in pairs for side in ("chosen", "rejected")]
    return sum(min(max_length, len(chat.encode(tokenizer, r)["input_ids"])) for r in rows) / len(rows)


def _set_up(settings: dict) -> dict:
    """The settings that decide a training step's speed; packing and padding-free rows count as one (both unpadded)."""
    packed = bool(settings.get("padding_free") or settings.get("packing"))
    keys = ("batch_size", "dpo_batch_size", "gradient_checkpointing", "train_turn_tokens", "max_length")
    return {"packed": packed, **{k: settings[k] for k in keys if k in settings}}


def _match(result: dict, stage: str, settings: dict) -> tuple[dict, str]:
    """The measurement of a stage whose set-up matches (all of it, else all but max_length)."""
    runs = [(stage, result[stage])] + [(name, r) for name, r in result.get("levers", {}).items()
                                       if name.startswith(stage + ":")]
    runs = [(name, r) for name, r in runs if "tokens_per_s" in r]
    settings = _set_up(settings)
    for keys in (list(settings), [k for k in settings if k != "max_length"]):
        for name, r in runs:
            if all(_set_up(r["settings"]).get(k) == settings[k] for k in keys):
                exact = "" if len(keys) == len(settings) else f" (measured at max_length {r['settings']['max_length']})"
                return r, name + exact
    raise LookupError(f"no {stage} measurement in gpu.json matches {settings}")


def rates(profile: Profile, gpu: str = TARGET_GPU, result: dict | None = None) -> dict:
    """Throughputs for the profile on `gpu`: SFT and DPO training tokens/s, forward tokens/s, seconds per decode step;
    measured on gpu.json's device, scaled by the bf16 tensor rates (decode steps by memory bandwidth) elsewhere."""
    result = result or report.bench_results("gpu")
    measured, target = GPUS[result["device"]], GPUS[gpu]
    compute = target.bf16_tflops / measured.bf16_tflops
    bandwidth = target.bandwidth_gbs / measured.bandwidth_gbs
    how = ("measured" if gpu == result["device"] else
           f"{result['device']} measured x {compute:.3f} ({gpu} {target.bf16_tflops:g} / {measured.bf16_tflops:g} "
           "bf16 TFLOP/s)")
    sft, sft_name = _match(result, "sft", {"batch_size": profile.batch_size, "padding_free": profile.padding_free,
                                           "packing": profile.packing,
                                           "gradient_checkpointing": profile.gradient_checkpointing,
                                           "train_turn_tokens": profile.train_turn_tokens,
                                           "max_length": profile.max_length})
    dpo, dpo_name = _match(result, "dpo", {"dpo_batch_size": profile.dpo_batch_size,
                                           "gradient_checkpointing": profile.gradient_checkpointing,
                                           "max_length": profile.max_length})
    path = result["eval_path"]
    decode = max(1 / path[f"generate_b{b}_tokens_per_s"] * b for b in (1, 8, 25))
    return {
        "sft_tokens_per_s": sft["tokens_per_s"] * compute,
        "dpo_tokens_per_s": dpo["tokens_per_s"] * compute,
        "forward_tokens_per_s": 2 * 1024 / path["score_pair_1024_s"] * compute,
        "decode_step_s": decode / bandwidth,
        "basis": {"sft": f"{sft_name}: {sft['tokens_per_s']:.0f} tokens/s, {how}",
                  "dpo": f"{dpo_name}: {dpo['tokens_per_s']:.0f} tokens/s (both answers; reference pass included), "
                         f"{how}",
                  "forward": f"forward of 2 x 1024 tokens in {path['score_pair_1024_s']} s, {how}",
                  "decode": f"slowest greedy step at batch 1/8/25: {decode:.3f} s, {result['device']} measured / "
                            f"{bandwidth:.3f} ({gpu} {target.bandwidth_gbs:g} / {measured.bandwidth_gbs:g} GB/s)"},
    }


def forecast(profile: Profile, gpu: str = TARGET_GPU, result: dict | None = None, tokenizer=None) -> list[Item]:
    """The profile's course on `gpu`, one Item per piece of notebooks 01-04, in the order the notebooks run them."""
    r = rates(profile, gpu, result)
    shape = memory.shape_for_profile(profile)
    conv, conv_basis = mean_tokens(profile.sft_data, profile.max_length, tokenizer)
    seq, seq_basis = mean_tokens(profile.pref_data, profile.max_length, tokenizer)
    flops = 6 * shape.matmul_params
    fwd = r["forward_tokens_per_s"]
    merge_gb = memory.model_bytes(shape, profile.merge_dtype) / 1e9
    step = r["decode_step_s"]

    def generate(prompts: int, tokens: int, batch: int = GEN_BATCH) -> float:
        return math.ceil(prompts / batch) * tokens * step

    rows_per_step = profile.batch_size * profile.grad_accum
    sft_tokens = profile.sft_steps * rows_per_step * (profile.max_length if profile.packing else conv)
    sft_eval = (profile.sft_eval_rows or 0) * conv
    evals = 2 + profile.sft_steps // recipes.sft_eval_steps(profile)  # before, during training, after
    pairs = profile.dpo_steps * profile.dpo_batch_size * profile.grad_accum
    dpo_tokens = pairs * 2 * seq
    dpo_eval = (profile.pref_eval_rows or 0) * 4 * seq  # both answers, policy and reference
    scored = (profile.pref_acc_rows or 0) * 2 * seq
    gen = generate(profile.n_gen_prompts, profile.max_new_tokens)
    probes = 2 * PROBE_TOKENS * step + generate(3, profile.max_new_tokens)  # harmful, benign (25 each), 3 ordinary
    items = [
        Item("01", "tokenizer and chat template", SETUP_SECONDS, "set-up allowance"),
        Item("02", "set-up, 4-bit load of the base model", SETUP_SECONDS + LOAD_SECONDS, "allowances"),
        Item("02", "P(<end_of_turn>) of the base and SFT models", 2 * sft_eval / fwd,
             f"2 x {profile.sft_eval_rows} conversations x {conv:.0f} tokens / {fwd:.0f} tokens/s"),
        Item("02", "replies of the base and SFT models", 2 * gen,
             f"2 x {profile.n_gen_prompts} prompts x {profile.max_new_tokens} tokens, {step:.2f} s a step"),
        Item("02", f"held-out loss, {evals} evaluations", evals * sft_eval / fwd,
             f"{profile.sft_eval_rows} conversations x {conv:.0f} tokens / {fwd:.0f} tokens/s"),
        Item("02", f"SFT training, {profile.sft_steps} steps", sft_tokens / r["sft_tokens_per_s"],
             f"{profile.sft_steps} x {rows_per_step} rows x "
             f"{profile.max_length if profile.packing else round(conv)} tokens "
             f"({'packed rows of max_length' if profile.packing else conv_basis}) = {sft_tokens / 1e6:.2f}M tokens x "
             f"{flops / 1e9:.0f} GFLOP / {r['sft_tokens_per_s']:.0f} tokens/s"),
        Item("03", "preference data and plots", SETUP_SECONDS, "set-up allowance"),
        Item("04", "merge the SFT adapter, and later the DPO adapter, on the CPU", 2 * merge_gb / MERGE_GB_PER_S,
             f"2 merges of a {merge_gb:.0f} GB model ({profile.merge_dtype}) at {MERGE_GB_PER_S} GB/s"),
        Item("04", "set-up, 4-bit loads (merge check x 2, base, SFT, DPO training, DPO, chat)",
             SETUP_SECONDS + 7 * LOAD_SECONDS, "allowances"),
        Item("04", "scoring held-out pairs (SFT, DPO, 8 with the base model)", (2 * scored + 8 * 2 * seq) / fwd,
             f"{profile.pref_acc_rows} pairs x 2 x {seq:.0f} tokens / {fwd:.0f} tokens/s"),
        Item("04", "decline probes and ordinary replies (base, SFT, DPO) and the chat", 3 * probes +
             generate(1, profile.max_new_tokens), f"2 x {PROBE_TOKENS} + {profile.max_new_tokens} steps per model"),
        Item("04", "DPO evaluations at step 0 and after (DPO term apart: 4)", 4 * dpo_eval / fwd,
             f"{profile.pref_eval_rows} pairs x 4 x {seq:.0f} tokens / {fwd:.0f} tokens/s"),
        Item("04", f"DPO training, {profile.dpo_steps} steps", dpo_tokens / r["dpo_tokens_per_s"],
             f"{pairs} pairs x 2 x {seq:.0f} tokens ({seq_basis}) = {dpo_tokens / 1e6:.2f}M tokens / "
             f"{r['dpo_tokens_per_s']:.0f} tokens/s"),
    ]
    return items


def by_notebook(items: list[Item]) -> dict[str, float]:
    """Minutes per notebook and in all ("total")."""
    minutes = {}
    for item in items:
        minutes[item.notebook] = minutes.get(item.notebook, 0.0) + item.seconds / 60
    minutes["total"] = sum(minutes.values())
    return {k: round(v, 1) for k, v in minutes.items()}


def summary(profile: Profile, gpu: str = TARGET_GPU, result: dict | None = None, tokenizer=None) -> dict:
    """The forecast as data: every item with its inputs, minutes per notebook, the throughputs' basis, the budget."""
    result = result or report.bench_results("gpu")
    items = forecast(profile, gpu, result, tokenizer)
    minutes = by_notebook(items)
    budget = None if profile.budget_hours is None else profile.budget_hours * 60
    return {"gpu": gpu, "profile": profile.name, "minutes": minutes, "budget_minutes": budget,
            "fits_budget": None if budget is None else minutes["total"] <= budget,
            "throughputs": rates(profile, gpu, result)["basis"],
            "items": [{"notebook": i.notebook, "what": i.what, "minutes": round(i.seconds / 60, 1), "inputs": i.inputs}
                      for i in items]}


def describe(profile: Profile, gpu: str = TARGET_GPU, result: dict | None = None, tokenizer=None,
             only: str | None = None) -> str:
    """The forecast as a markdown table with each item's inputs (only: one notebook's, e.g. "04"), the throughputs'
    basis, the total per notebook and whether it fits the profile's budget."""
    s = summary(profile, gpu, result, tokenizer)
    lines = [f"Forecast of the `{profile.name}` course on one {gpu} (utils/forecast.py):", "",
             "| notebook | what | minutes | inputs |", "|---|---|---|---|"]
    lines += [f"| {i['notebook']} | {i['what']} | {i['minutes']} | {i['inputs']} |" for i in s["items"]
              if only in (None, i["notebook"])]
    total = s["minutes"]["total"]
    verdict = "" if s["budget_minutes"] is None else (
        f": {'within' if s['fits_budget'] else 'OVER'} the profile's budget of {profile.budget_hours:g} h")
    lines += ["", "Throughputs: " + "; ".join(f"{k}: {v}" for k, v in s["throughputs"].items()) + ".",
              "Minutes per notebook: " + ", ".join(f"{k} {v}" for k, v in s["minutes"].items() if k != "total")
              + f"; in all {total:.0f} min ({total / 60:.1f} h){verdict}. Not included: downloading the model "
              "(17 GB) and the data once."]
    return "\n".join(lines)


def stand_in(profile: Profile) -> Profile | None:
    """The GPU profile whose forecast a run of `profile` should show: itself when it trains Gemma 7B, rtx4090 for its
    CPU dry run, None for the cpu profile (make check times this machine instead)."""
    from utils.profiles import get_profile, uses_tiny_model

    if profile.model_shape == "gemma-7b":
        return profile
    return get_profile("rtx4090") if uses_tiny_model(profile) else None


def describe_gpu_course(profile: Profile, only: str | None = None) -> str:
    """For a notebook's set-up: the forecast of the GPU course this run is (or stands in for; rtx4090 on the cpu
    profile) on an RTX 4090, and the long version's total."""
    from utils.profiles import get_profile

    course = stand_in(profile) or get_profile("rtx4090")
    long = summary(get_profile("rtx4090-long"))["minutes"]["total"]
    return (describe(course, only=only) + f"\nThe long version (PROFILE=\"rtx4090-long\": 2048 tokens, more data and "
            f"evaluations) takes about {long / 60:.1f} h on the same GPU.")
