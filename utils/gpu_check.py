"""The rtx4090 profile on Gemma 7B's exact shape with random weights (no download): SFT and DPO steps at the profile's
batch and length, the 4-bit evaluation model, and throughput levers, each with its tokens/s and peak GPU memory
against the estimator and 24 GiB.

    python -m utils.gpu_check [--out outputs/gpu_check/gemma7b.json] [--levers all|none|a,b] [--budget_s 240]
    python -m utils.gpu_check --report gemma7b.json [--eval_path eval7b.json]   # -> benchmarks/results/gpu.{json,md}

Needs a CUDA GPU (`make gpu-check` runs it); `measure()` also runs on the CPU with a tiny configuration. It needs only
PyTorch and the pinned training packages: no network, no notebook tooling.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
from datasets import Dataset
from transformers.trainer_callback import PrinterCallback

from utils import chat, evaluate, memory, models, recipes, timing
from utils.profiles import Profile, get_profile

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
BUDGET_GIB = 24.0
GEN_BATCH, GEN_TOKENS = 8, 32  # the evaluation stage's batched greedy generation: prompts, new tokens


@dataclass(frozen=True)
class Lever:
    """One change to the profile's training set-up, measured against the stage's baseline in the same run."""

    stage: str  # "sft" or "dpo"
    what: str
    profile: dict = field(default_factory=dict)  # profile field overrides: values, or functions of the profile
    config: dict = field(default_factory=dict)  # extra SFTConfig / DPOConfig arguments


# In the order they run: the ones most likely to change the profile first, so a time budget cuts the least useful.
# Each is measured against its stage's baseline, the profile as shipped (rtx4090: SFT on 4 packed rows of 1024 tokens).
LEVERS = {
    "sft:one-row": Lever("sft", "1 row per micro-batch, unpacked, 4x the accumulation (the set-up before packing)",
                         {"batch_size": 1, "packing": False}),
    "sft:no-checkpointing": Lever("sft", "no gradient checkpointing (no recompute; all activations kept)",
                                  {"gradient_checkpointing": False}),
    "dpo:no-checkpointing": Lever("dpo", "no gradient checkpointing", {"gradient_checkpointing": False}),
    "sft:packed-x8": Lever("sft", "8 packed rows per micro-batch, half the accumulation", {"batch_size": 8}),
    "dpo:pairs-x2": Lever("dpo", "2 pairs per micro-batch, 1/2 the accumulation", {"dpo_batch_size": 2}),
    "dpo:precompute-ref": Lever("dpo", "reference log-probs computed once before training (precompute_ref_log_probs)",
                                config={"precompute_ref_log_probs": True}),
    "sft:no-token-rows": Lever("sft", "LoRA only: the turn-token rows not trained", {"train_turn_tokens": False}),
    "sft:no-lora-dropout": Lever("sft", "LoRA dropout 0 (PEFT skips the dropout copies)", {"lora_dropout": 0.0}),
    "sft:rows-x2-longer": Lever("sft", "rows twice as long",
                                {"max_length": lambda p: 2 * p.max_length}),
}


def sft_rows(n: int, seq_len: int, vocab_size: int, seed: int = 0) -> Dataset:
    """n pre-tokenized conversations of seq_len random ids, every position trained (the estimator's worst case)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (n, seq_len), generator=gen).tolist()
    return Dataset.from_dict({"input_ids": ids})


def _filler(tokenizer, word: str, n_tokens: int, vocab_size: int) -> str:
    """A text of about n_tokens tokens (one word repeated), every id below vocab_size."""
    text = word * n_tokens
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max(ids) >= vocab_size:
        raise ValueError(f"token id {max(ids)} is outside the model's {vocab_size}-entry vocabulary")
    return text


def dpo_pairs(n: int, seq_len: int, tokenizer, vocab_size: int) -> Dataset:
    """n preference pairs of plain text whose prompt + answer fill about seq_len tokens, all ids below vocab_size."""
    half = seq_len // 2
    prompt, chosen, rejected = (_filler(tokenizer, w, half, vocab_size) for w in (" hello", " yes", " no"))
    return Dataset.from_dict({"prompt": [prompt] * n, "chosen": [chosen] * n, "rejected": [rejected] * n})


def _peak_gib() -> float | None:
    """The peak GPU memory allocated since the last reset, in GiB (None without CUDA)."""
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def _gpu_gib(what: Callable[[], int]) -> float | None:
    return round(what() / 2**30, 2) if torch.cuda.is_available() else None


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _train(trainer, tokens_per_step: int) -> dict:
    """Train; the last step's seconds (the first warms up), tokens/s, losses, memory held before and at the peak."""
    timer = timing.StepTimer()
    trainer.add_callback(timer)
    trainer.remove_callback(PrinterCallback)
    _reset_peak()
    static = _gpu_gib(torch.cuda.memory_allocated)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    seconds = timer.seconds[-1]
    return {"step_seconds": round(seconds, 3), "tokens_per_step": tokens_per_step,
            "tokens_per_s": round(tokens_per_step / seconds, 1), "losses": losses, "static_gib": static,
            "peak_gib": _peak_gib(), "reserved_gib": _gpu_gib(torch.cuda.max_memory_reserved)}


def run_sft(profile: Profile, path: Path, tokenizer, steps: int, out: Path, **config) -> dict:
    """SFT steps with the profile's QLoRA (4-bit base, LoRA, turn-token rows) on random conversations of max_length."""
    from trl import SFTTrainer

    model = models.load_base_model(profile, path=path)
    model = models.add_lora(model, recipes.lora_config(profile, tokenizer), profile.gradient_checkpointing)
    rows_per_step = profile.batch_size * profile.grad_accum
    rows = sft_rows(steps * rows_per_step, profile.max_length, model.config.vocab_size)
    args = recipes.sft_config(profile, out, max_steps=steps, save_strategy="no", eval_strategy="no",
                              logging_steps=1, report_to="none", disable_tqdm=True,
                              assistant_only_loss=False, **config)  # token ids, not conversations: all positions train
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)
    result = _train(trainer, rows_per_step * profile.max_length)
    models.free(model)
    return result


def run_dpo(profile: Profile, path: Path, tokenizer, steps: int, out: Path, **config) -> dict:
    """DPO steps with the profile's new LoRA on the 4-bit model (reference: adapter disabled) on pairs whose prompt +
    answer fill max_length; tokens count both answers' sequences (the policy's), setup_seconds any precomputing."""
    from trl import DPOTrainer

    model = models.load_base_model(profile, path=path)
    pairs_per_step = profile.dpo_batch_size * profile.grad_accum
    pairs = dpo_pairs(steps * pairs_per_step, profile.max_length, tokenizer, model.config.vocab_size)
    args = recipes.dpo_config(profile, out, max_steps=steps, save_strategy="no", report_to="none",
                              disable_tqdm=True, **config)
    start = time.perf_counter()
    trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=pairs, processing_class=tokenizer,
                         peft_config=recipes.dpo_lora_config(profile))
    setup = time.perf_counter() - start
    models.guard_cpu_4bit(trainer.model)
    result = {**_train(trainer, 2 * pairs_per_step * profile.max_length), "setup_seconds": round(setup, 1),
              "pairs_per_step": pairs_per_step}
    models.free(trainer.model)
    return result


def run_eval(profile: Profile, path: Path, tokenizer) -> dict:
    """The evaluation model (models.load_for_eval): score 2 pairs of max_length tokens each with the course's scorer,
    then answer GEN_BATCH prompts with GEN_TOKENS new tokens in one batch; seconds and peak memory of each."""
    _reset_peak()
    start = time.perf_counter()
    model = models.load_for_eval(profile, path)
    result = {"load_seconds": round(time.perf_counter() - start, 1),
              "weights_gib": _gpu_gib(torch.cuda.memory_allocated)}
    vocab, half = model.config.vocab_size, profile.max_length // 2
    turn = lambda role, word: [{"role": role, "content": _filler(tokenizer, word, half, vocab)}]  # noqa: E731
    pairs = [{"prompt": turn("user", " hello"), "chosen": turn("assistant", " yes"),
              "rejected": turn("assistant", " no")}] * 2
    _sync()
    start = time.perf_counter()
    scored = evaluate.pair_logprobs(model, tokenizer, pairs)
    _sync()
    result["score_pair_seconds"] = round((time.perf_counter() - start) / len(pairs), 3)
    result["pair_tokens"] = sum(len(chat.encode(tokenizer, pairs[0]["prompt"] + pairs[0][side])["input_ids"])
                                for side in ("chosen", "rejected"))
    result["scored_answer_tokens"] = scored[0]["chosen_n"] + scored[0]["rejected_n"]
    result["score_peak_gib"] = _peak_gib()
    prompts = [f"Question {i}: tell me about the history of Rome and its people." for i in range(GEN_BATCH)]
    _sync()
    start = time.perf_counter()
    chat.generate(model, tokenizer, prompts, max_new_tokens=GEN_TOKENS, batch_size=GEN_BATCH)
    _sync()
    seconds = time.perf_counter() - start
    result.update(generate_batch=GEN_BATCH, generate_new_tokens=GEN_TOKENS,
                  generate_step_seconds=round(seconds / GEN_TOKENS, 4), peak_gib=_peak_gib())
    models.free(model)
    return result


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _apply(lever: Lever, profile: Profile) -> tuple[Profile, dict]:
    """The profile with the lever's overrides (batch levers keep the rows per step), and its trainer arguments."""
    changes = {k: v(profile) if callable(v) else v for k, v in lever.profile.items()}
    for batch in ("batch_size", "dpo_batch_size"):
        if batch in changes:
            rows = getattr(profile, batch) * profile.grad_accum
            changes["grad_accum"] = max(1, rows // changes[batch])
    return get_profile(profile.name, **{**_profile_overrides(profile), **changes}), dict(lever.config)


def _profile_overrides(profile: Profile) -> dict:
    """Every field of a measured profile as overrides (so a lever changes only what it names)."""
    return {k: v for k, v in asdict(profile).items() if k not in ("name", "compute_dtype_reason")}


def _estimate_gib(profile: Profile, stage: str) -> float:
    """The estimator's figure for a stage of the profile, in GiB."""
    return round(memory.estimate_stage(profile, stage) / 2**30, 2)


def _stage(run: Callable[[], dict], profile: Profile, stage: str) -> dict:
    """Run one measurement; attach the profile fields, the estimator's figure and the fit; record an error instead of
    raising (a failing lever must not cost the others)."""
    start = time.perf_counter()
    try:
        result = run()
    except Exception as err:  # noqa: BLE001 - reported in the results, the next measurement goes on
        result = {"error": f"{type(err).__name__}: {err}"[:300]}
        gc.collect()  # the failed run's model (out of memory, say) must not crowd the next one
        _reset_peak()
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    result["estimate_gib"] = _estimate_gib(profile, stage)
    peak = result.get("peak_gib")
    result["fits_budget"] = None if peak is None else peak <= BUDGET_GIB
    result["settings"] = _settings(profile, stage)
    return result


def _settings(profile: Profile, stage: str) -> dict:
    """The profile fields that decide a stage's memory and speed (what the estimator and the forecast read)."""
    keys = ["max_length", "gradient_checkpointing", "grad_accum", "lora_r", "lora_dropout", "compute_dtype",
            "load_in_4bit", "eval_precision", "max_new_tokens"]
    keys += {"sft": ["batch_size", "padding_free", "packing", "train_turn_tokens"], "dpo": ["dpo_batch_size"],
             "eval": []}[stage]
    return {k: getattr(profile, k) for k in keys}


def measure(config, profile_name: str = "rtx4090", work_dir: str | Path | None = None, steps: int = 2,
            levers: tuple[str, ...] = (), budget_s: float | None = None,
            on_result: Callable[[dict], None] | None = None, **overrides) -> dict:
    """Build a random model of `config` (on the GPU when there is one), then measure the profile's (plus overrides)
    SFT and DPO steps, its evaluation model and each named lever; each against the estimator and 24 GiB.

    budget_s: skip the levers left once this many seconds have passed. on_result: called with the partial result
    after every measurement (to save it as it grows)."""
    unknown = set(levers) - set(LEVERS)
    if unknown:
        raise ValueError(f"Unknown lever(s) {sorted(unknown)}. Known: {', '.join(LEVERS)}.")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    began = time.perf_counter()
    result = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "versions": versions(),
              "profile": profile_name, "steps": steps,
              "config": {k: getattr(config, k) for k in memory.PRESETS["gemma-7b"] if k != "model_type"}}
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        path = models.save_random_model(config, Path(tmp) / "model", device=device)
        result["build_seconds"] = round(time.perf_counter() - began, 1)
        profile = get_profile(profile_name, model_id=str(path), **overrides)
        result["batch"] = f"{profile.batch_size} x {profile.max_length} tokens, {profile.grad_accum} accumulated"
        tokenizer = chat.setup_tokenizer(models.load_tokenizer(get_profile("cpu")), profile.max_length)
        runs = {"sft": run_sft, "dpo": run_dpo}
        for stage in ("sft", "dpo"):
            result[stage] = _stage(partial(runs[stage], profile, path, tokenizer, steps, Path(tmp) / stage), profile,
                                   stage)
            _report(result, on_result)
        result["eval"] = _stage(partial(run_eval, profile, path, tokenizer), profile, "eval")
        _report(result, on_result)
        result["levers"] = {}
        for name in levers:
            lever = LEVERS[name]
            if budget_s is not None and time.perf_counter() - began > budget_s:
                result["levers"][name] = {"what": lever.what, "skipped": f"time budget of {budget_s:.0f} s spent"}
                continue
            changed, extra = _apply(lever, profile)
            run = partial(runs[lever.stage], changed, path, tokenizer, steps, Path(tmp) / name, **extra)
            measured = _stage(run, changed, lever.stage)
            result["levers"][name] = {"what": lever.what, "config": extra, **measured}
            _report(result, on_result)
    result["seconds"] = round(time.perf_counter() - began, 1)
    return result


def _report(result: dict, on_result: Callable[[dict], None] | None) -> None:
    if on_result is not None:
        on_result(result)


def versions() -> dict:
    """Versions of the packages a measurement depends on."""
    import bitsandbytes
    import peft
    import transformers
    import trl

    return {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "trl": trl.__version__, "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__}


def tokens_per_s(result: dict, baseline: dict, steps: int) -> float:
    """A measurement's training tokens/s; with precomputed reference log-probs, the set-up time beyond the baseline's
    is spread over the steps, since that pass replaces part of every step."""
    extra = 0.0
    if result.get("config", {}).get("precompute_ref_log_probs"):
        extra = max(0.0, result["setup_seconds"] - baseline["setup_seconds"])
    return result["tokens_per_step"] / (result["step_seconds"] + extra / steps)


def speedups(result: dict) -> dict[str, float]:
    """Each measured lever's tokens/s (set-up included) over its stage's baseline (sft or dpo) in the same run."""
    ratios = {}
    for name, lever in result.get("levers", {}).items():
        baseline = result[name.split(":")[0]]
        if "tokens_per_s" in lever and "tokens_per_s" in baseline:
            ratios[name] = round(tokens_per_s(lever, baseline, result["steps"]) / baseline["tokens_per_s"], 3)
    return ratios


def to_markdown(result: dict) -> str:
    """gpu.md: the device and versions, then one row per measurement (baselines, evaluation, levers)."""
    v = result["versions"]
    lines = [f"# Gemma 7B's shape on {result['device']} (`python -m utils.gpu_check`)", "",
             f"Random weights of google/gemma-7b's configuration, profile `{result['profile']}` ({result['batch']}), "
             f"{result['steps']} steps per measurement, the last one timed. torch {v['torch']} (CUDA {v['cuda']}), "
             f"transformers {v['transformers']}, trl {v['trl']}, peft {v['peft']}, bitsandbytes "
             f"{v['bitsandbytes']}. Whole check {result.get('seconds', '?')} s.", "",
             "| measurement | what | tokens/s | vs baseline (set-up included) | peak allocated GiB | estimator GiB "
             "| reserved GiB |",
             "|---|---|---|---|---|---|---|"]
    ratios = speedups(result)
    rows = [("sft", "SFT baseline", result["sft"]), ("dpo", "DPO baseline", result["dpo"])]
    rows += [(name, lever["what"], lever) for name, lever in result.get("levers", {}).items()]
    for name, what, r in rows:
        speed = r.get("tokens_per_s", r.get("error") or r.get("skipped", "-"))
        ratio = f"{ratios[name]:.2f}x" if name in ratios else "-"
        lines.append(f"| {name} | {what} | {speed} | {ratio} | {r.get('peak_gib', '-')} | {r.get('estimate_gib')} | "
                     f"{r.get('reserved_gib', '-')} |")
    e = result["eval"]
    lines += ["", "Evaluation model (`models.load_for_eval`, 4-bit): "
              f"load {e.get('load_seconds')} s, scoring a pair of 2 x {e['settings']['max_length']} tokens with "
              f"`evaluate.pair_logprobs` {e.get('score_pair_seconds')} s (the first pair warms up), greedy generation "
              f"{e.get('generate_step_seconds')} s per new token at batch {e.get('generate_batch')}; peak "
              f"{e.get('peak_gib')} GiB (estimator {e['estimate_gib']})."]
    if path := result.get("eval_path"):
        lines += ["", "The 7B evaluation path of `.gpu-bundle/run.sh` (phase E, a raw forward and `generate`): "
                  + ", ".join(f"{k} {v}" for k, v in path.items() if k != "device") + "."]
    return "\n".join(lines) + "\n"


def write_results(result: dict, out_dir: Path = RESULTS_DIR) -> tuple[Path, Path]:
    """Save a measurement as gpu.json and gpu.md in out_dir (benchmarks/results)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "gpu.json", out_dir / "gpu.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(to_markdown(result))
    return json_path, md_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "gpu_check" / "gemma7b.json")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--grad_accum", type=int, default=4,
                        help="micro-batches per step (the profile's 16 measure the same tokens/s, 4x slower)")
    parser.add_argument("--levers", default="all", help=f"all, none, or comma-separated: {', '.join(LEVERS)}")
    parser.add_argument("--budget_s", type=float, default=240.0, help="skip the levers left after this many seconds")
    parser.add_argument("--report", type=Path, help="turn a saved measurement into benchmarks/results/gpu.{json,md}")
    parser.add_argument("--eval_path", type=Path, help="with --report: the 7B evaluation path's figures "
                        "(.gpu-bundle/run.sh phase E, eval7b.json)")
    args = parser.parse_args(argv)
    if args.report:
        result = json.loads(args.report.read_text())
        if args.eval_path:
            result["eval_path"] = json.loads(args.eval_path.read_text())
        for path in write_results(result):
            print(f"wrote {path}")
        return 0
    if not torch.cuda.is_available():
        print("No CUDA GPU: the Gemma 7B check needs one (measure() runs on the CPU only with a tiny config).")
        return 2
    levers = {"all": tuple(LEVERS), "none": ()}.get(args.levers) or tuple(args.levers.split(","))
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save(partial: dict) -> None:
        args.out.write_text(json.dumps(partial, indent=2))

    result = measure(models.gemma_7b_config(), steps=args.steps, levers=levers, budget_s=args.budget_s,
                     on_result=save, grad_accum=args.grad_accum)
    save(result)
    print(json.dumps(result, indent=2))
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
