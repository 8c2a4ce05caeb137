"""Run profiles: each one a complete, named set of choices (model, data, sizes) for the whole course."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from utils.errors import CourseError
from utils.precision import choose_compute_dtype

EMBEDDED_MODEL_ID = "embedded:google/gemma-3-270m"
TINY_MODEL_ID = "tiny:random-gemma-3"  # a 2-layer random Gemma 3, built once into the model cache (models.py)
DATA_DIR = Path(__file__).resolve().parent.parent / "data"
MIN_GPU_GIB_FOR_RTX4090 = 20.0


@dataclass(frozen=True)
class Profile:
    """Every knob of one course run; notebooks read these, never literals of their own."""

    name: str
    model_id: str
    model_shape: str | None  # a memory.PRESETS name for the estimator; None: read the model's config
    merge_dtype: str  # the dtype adapters are merged in on the CPU: float32 (exact) or bfloat16 (half the RAM)
    eval_precision: str  # evaluation models (models.load_for_eval): float32, bfloat16, or 4bit (NF4)
    load_in_4bit: bool
    compute_dtype: str
    max_length: int
    sft_data: str
    pref_data: str
    sft_train_rows: int | None
    sft_eval_rows: int | None
    pref_train_rows: int | None
    pref_eval_rows: int | None
    pref_acc_rows: int | None
    batch_size: int
    grad_accum: int
    gradient_checkpointing: bool
    padding_free: bool
    packing: bool  # pack conversations into rows of max_length (TRL's "bfd": each cut to max_length, none split)
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    train_turn_tokens: bool
    sft_steps: int
    sft_lr: float
    dpo_steps: int
    dpo_lr: float
    dpo_beta: float
    dpo_batch_size: int
    dpo_sft_weight: float
    dpo_categories: str  # "": every training pair; else comma-separated rejection categories DPO trains on
    max_new_tokens: int
    n_gen_prompts: int
    save_steps: int
    report_to: str
    seed: int
    budget_hours: float | None = None  # the whole course must fit this on one RTX 4090 (utils/forecast.py)
    compute_dtype_reason: str = ""  # filled by get_profile: how compute_dtype was chosen


PROFILES: dict[str, Profile] = {
    "cpu": Profile(
        name="cpu",
        model_id=EMBEDDED_MODEL_ID,
        model_shape="gemma-3-270m",
        merge_dtype="float32",  # a small model: merge exactly
        eval_precision="float32",  # a small model: compare base, SFT and DPO exactly
        load_in_4bit=True,
        compute_dtype="auto",  # bf16 where the CPU computes it natively (AVX512-BF16, AMX), else fp32
        max_length=256,
        sft_data=str(DATA_DIR / "ultrachat_mini"),
        pref_data=str(DATA_DIR / "ultrafeedback_mini"),
        sft_train_rows=None,
        sft_eval_rows=24,
        pref_train_rows=None,
        pref_eval_rows=12,  # DPO's held-out loss and rewards: each evaluation runs policy and reference on both answers
        pref_acc_rows=40,
        batch_size=8,
        grad_accum=1,
        gradient_checkpointing=False,  # short rows of a 270M model: activations fit; recomputing them cost 9% of an SFT
                                       # step and 17% of a DPO step (make bench, step profile)
        padding_free=True,
        packing=False,  # rows of ~100 tokens: padding-free batches of 8 are enough
        lora_r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        train_turn_tokens=True,
        sft_steps=20,
        sft_lr=2e-4,
        dpo_steps=12,  # 48 of the 124 pairs that draw the line
        dpo_lr=2e-4,  # chosen on the choosing prompts among 9 settings x 3 seeds (benchmarks/results/frontier.md):
        dpo_beta=0.1,  # 3e-4 and up, beta 0.5 or 15 steps declined more harmful prompts but benign ones too
        dpo_batch_size=4,
        dpo_sft_weight=2.0,  # plain DPO changed no greedy reply; weight 2 declined 3-4 of 25 held-out harmful, 0 benign
        dpo_categories="harmful_compliance,needless_refusal",  # when to decline and when not to: both sides of the line
        max_new_tokens=64,
        n_gen_prompts=20,
        save_steps=5,
        report_to="none",  # minutes-long runs, and CI: the printed logs are enough
        seed=42,
    ),
    "rtx4090": Profile(
        name="rtx4090",
        model_id="google/gemma-7b",
        model_shape="gemma-7b",
        merge_dtype="bfloat16",  # 17 GiB of RAM for the merge instead of 34
        eval_precision="4bit",  # on the GPU, one at a time: 5.2 GiB of weights each (bf16: 15.9), see memory_plan.plan
        load_in_4bit=True,
        compute_dtype="bfloat16",
        max_length=1024,  # TRL's default and the alignment handbook's DPO recipes; longer conversations are cut
        sft_data="HuggingFaceH4/ultrachat_200k",
        pref_data="HuggingFaceH4/ultrafeedback_binarized",
        sft_train_rows=2_000,  # 125 steps x 16 packed rows: at least 2,000 conversations, each seen once
        sft_eval_rows=100,
        pref_train_rows=512,  # 128 steps x 4 pairs
        pref_eval_rows=100,
        pref_acc_rows=100,
        batch_size=4,  # packed rows per micro-batch: 2.05x the tokens/s of 1 row on Gemma 7B (gpu.md)
        grad_accum=4,  # 16 packed rows of up to 1024 tokens per optimizer step
        gradient_checkpointing=True,  # without it 26 GiB at 1 x 1024 tokens: more than a 24 GB card (gpu.md)
        padding_free=False,  # packing concatenates the rows itself (TRL turns padding-free on for "bfd")
        packing=True,
        lora_r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        train_turn_tokens=True,
        sft_steps=125,
        sft_lr=1e-4,
        dpo_steps=128,  # 1 pair per micro-batch x grad_accum 4: 2 pairs per micro-batch ran 1.5x faster on equal-length
        # pairs (gpu.md) but real pairs differ in length and a batch pads to its longest
        dpo_lr=5e-6,
        dpo_beta=0.1,
        dpo_batch_size=1,
        dpo_sft_weight=0.0,
        dpo_categories="",  # the Hub data has no rejection categories
        max_new_tokens=256,
        n_gen_prompts=8,  # one batch of greedy replies per model
        save_steps=25,
        report_to="trackio",  # an hour-long run: a live local dashboard (utils/tracking.py)
        seed=42,
        budget_hours=2.0,  # one evening: make check PROFILE=rtx4090 prints the forecast
    ),
}

# The long version of the GPU course: conversations up to 2048 tokens, 9,600 of them and 4,800 pairs, larger
# evaluations. Hours longer than rtx4090 on one RTX 4090 (make check PROFILE=rtx4090-long forecasts it).
PROFILES["rtx4090-long"] = replace(
    PROFILES["rtx4090"],
    name="rtx4090-long",
    max_length=2048,
    batch_size=1,  # 1 x 2048 tokens, unpacked: the set-up measured at this length (gpu.md)
    grad_accum=16,
    packing=False,
    sft_train_rows=20_000,
    sft_eval_rows=500,
    pref_train_rows=10_000,
    pref_eval_rows=500,
    pref_acc_rows=500,
    sft_steps=600,
    dpo_steps=300,  # 16 pairs a step
    n_gen_prompts=20,
    save_steps=100,
    budget_hours=None,  # the long version: make check PROFILE=rtx4090-long says how many hours
)


# The rtx4090 path that CI can execute: its settings (batch 1 x 16 accumulation, no padding-free batches, max_length
# 1024, bf16 compute and merge, 4-bit evaluation, dropout, trackio, a checkpoint and an evaluation mid-run) on a tiny
# random Gemma and a few shipped rows, with step counts that run each notebook in about a minute on 2 CPU cores.
PROFILES["rtx4090-dryrun"] = replace(
    PROFILES["rtx4090"],
    name="rtx4090-dryrun",
    model_id=TINY_MODEL_ID,
    model_shape="gemma-3-tiny",
    sft_data=str(DATA_DIR / "ultrachat_mini"),
    pref_data=str(DATA_DIR / "ultrafeedback_mini"),
    sft_train_rows=32,  # 2 steps x 16 conversations
    sft_eval_rows=4,
    pref_train_rows=16,  # 1 step x 16 pairs
    pref_eval_rows=4,
    pref_acc_rows=4,
    sft_steps=2,  # each step is 16 forward and backward passes: about 20 s here on 2 cores
    dpo_steps=1,
    save_steps=1,  # SFT saves a checkpoint and evaluates mid-run, as rtx4090 does every 25 steps
    max_new_tokens=16,
    n_gen_prompts=4,
    compute_dtype="auto",  # bf16 as on the GPU where this CPU computes it natively; fp32 on AVX2 (9x faster there)
    budget_hours=None,
)


def gpu_memory_gib() -> float | None:
    """Total memory of the first CUDA GPU in GiB, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / 2**30


def resolve_name(name: str) -> str:
    """Map "auto" to the best profile this machine supports; check that a named one exists."""
    if name == "auto":
        gib = gpu_memory_gib()
        return "rtx4090" if gib is not None and gib >= MIN_GPU_GIB_FOR_RTX4090 else "cpu"
    if name not in PROFILES:
        raise CourseError(
            f"Unknown profile {name!r}. Valid profiles: {', '.join([*PROFILES, 'auto'])}. "
            "Pass one of these as PROFILE (papermill: -p PROFILE cpu) or --profile."
        )
    return name


def get_profile(name: str = "auto", **overrides) -> Profile:
    """Return the named profile (auto resolved) with the non-None overrides applied and compute_dtype resolved.

    Another model_id without a model_shape clears the profile's shape: the estimator then reads that model's config.
    """
    known = {f.name for f in fields(Profile)} - {"name", "compute_dtype_reason"}
    if bad := set(overrides) - known:
        raise CourseError(
            f"Unknown profile field(s) {sorted(bad)}. Known fields: {', '.join(sorted(known))}. "
            "Check the spelling of the parameter you passed."
        )
    given = {k: v for k, v in overrides.items() if v is not None}
    if "model_id" in given and "model_shape" not in given:
        given["model_shape"] = None
    profile = replace(PROFILES[resolve_name(name)], **given)
    try:
        dtype, reason = choose_compute_dtype(profile.compute_dtype)
    except ValueError as err:
        raise CourseError(str(err)) from err
    return replace(profile, compute_dtype=dtype, compute_dtype_reason=reason)


def uses_embedded_model(profile: Profile) -> bool:
    """Whether the profile trains the Gemma 3 270M base shipped through PyPI (converted locally, no Hub)."""
    return profile.model_id == EMBEDDED_MODEL_ID


def uses_tiny_model(profile: Profile) -> bool:
    """Whether the profile trains the tiny random Gemma stand-in (the dry run of a GPU profile)."""
    return profile.model_id == TINY_MODEL_ID


def needs_gpu(profile: Profile) -> bool:
    """Whether the profile's model needs a CUDA GPU: a Hub model; the built-in ones and local folders run on a CPU."""
    return not (uses_embedded_model(profile) or uses_tiny_model(profile) or Path(profile.model_id).is_dir())


def check_parameters(namespace: dict, known: list[str]) -> None:
    """Raise CourseError for an UPPERCASE notebook parameter that the notebook does not define (a papermill typo)."""
    unknown = sorted(name for name in namespace if name.isupper() and name not in known)
    if unknown:
        raise CourseError(
            f"Unknown notebook parameter(s) {unknown}: this notebook's parameters are {', '.join(known)}. "
            "papermill injects any -p NAME VALUE it is given, so check the spelling."
        )


def describe(profile: Profile) -> str:
    """A two-column text table of the profile, for the top of each notebook."""
    rows = asdict(profile)
    width = max(map(len, rows))
    return "\n".join(f"{key:<{width}}  {value}" for key, value in rows.items())
