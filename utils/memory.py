"""Training-memory estimates for full fine-tuning, LoRA and QLoRA of a Gemma-style decoder, in bytes."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from types import SimpleNamespace

from transformers import AutoConfig

from utils.errors import CourseError

GIB = 2**30
METHODS = ("full", "lora", "qlora")
STRATEGIES = ("ddp", "zero3", "fsdp")
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
OPTIMIZER_STATE_BYTES = {"adamw": 8, "sgd": 0}  # per trainable parameter: Adam's fp32 m and v; plain SGD keeps none
MASTER_BYTES = 4  # fp32 master copy of half-precision weights (mixed-precision full fine-tuning)
GRAD_BYTES = 4  # fp32 gradients
ADAPTER_BYTES = 4  # LoRA weights and trainable token rows are kept in fp32
NF4_BYTES = (4 + 0.127) / 8  # 4-bit code + double-quantized block constants (64-blocks, 8-bit absmax, fp32 per 256)
LINEAR_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
COMPONENTS = ("weights", "gradients", "optimizer", "lora", "activations")
SHARDED = ("weights", "gradients", "optimizer", "lora")  # what ZeRO-3 / FSDP split across GPUs
# Activation elements one decoder layer keeps for backward, per token: norm inputs and outputs, q/k/v/attention
# output and the residual stream (~16 hidden-wide tensors), and gate, up, GELU(gate), GELU*up (4 intermediate-wide).
ACT_HIDDEN = 16
ACT_INTERMEDIATE = 4
# Per vocabulary entry per token: the fp32 log-softmax output saved for backward, its gradient and the logits'
# gradient, all alive at the start of backward (12 bytes; measured on the CPU, see benchmarks/memory_check.py).
LOGIT_BYTES = 12
# TRL 1.16's trainers never build the full logits: their fused LM head (trl.trainer.utils.add_fused_lm_head) projects
# at most this many tokens onto this many vocabulary entries at a time, in the compute dtype, forward and backward.
CHUNK_TOKENS, CHUNK_VOCAB = 4096, 32768
LM_HEADS = ("full", "chunked")
# Scoring an answer (evaluate.answer_logprobs): its logits in the compute dtype, their fp32 copy and log-softmax.
SCORE_LOGIT_FP32_BYTES = 8

PRESETS = {
    "gemma-3-270m": dict(model_type="gemma3_text", hidden_size=640, num_hidden_layers=18, intermediate_size=2048,
                         vocab_size=262144, num_attention_heads=4, num_key_value_heads=1, head_dim=256),
    "gemma-2b": dict(model_type="gemma", hidden_size=2048, num_hidden_layers=18, intermediate_size=16384,
                     vocab_size=256000, num_attention_heads=8, num_key_value_heads=1, head_dim=256),
    "gemma-7b": dict(model_type="gemma", hidden_size=3072, num_hidden_layers=28, intermediate_size=24576,
                     vocab_size=256000, num_attention_heads=16, num_key_value_heads=16, head_dim=256),
    # the random stand-in of dry runs and tests (models.tiny_gemma_config), with the real 262k vocabulary
    "gemma-3-tiny": dict(model_type="gemma3_text", hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                         vocab_size=262144, num_attention_heads=2, num_key_value_heads=1, head_dim=16),
}
PRECISION_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}  # torch dtype names, as profiles spell them
# Host RAM of a course process before any model: Python, torch with its CUDA libraries, tokenizer, datasets.
# An allowance (a CPU process with the libraries and data loaded holds about 1.5 GiB; CUDA's libraries add more).
PROCESS_HOST_BYTES = 3 * GIB
GEN_BATCH = 8  # chat.generate's default batch of prompts
GEN_PROMPT_TOKENS = 512  # allowance for one held-out prompt rendered by the chat template


def _check(value: str, valid: Iterable[str], what: str) -> None:
    """Raise a ValueError naming the valid values when value is not one of them."""
    if value not in valid:
        raise ValueError(f"Unknown {what} {value!r}. Valid values: {', '.join(valid)}.")


@dataclass(frozen=True)
class ModelShape:
    """Sizes of a decoder-only transformer whose LM head is tied to its input embedding."""

    n_params: int
    n_embed_params: int
    hidden_size: int
    n_layers: int
    intermediate_size: int
    vocab_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config) -> ModelShape:
        """Count the parameters of a transformers (Gemma) config: embedding, attention, MLP and norms."""
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        hidden, heads = config.hidden_size, config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        model_type = getattr(config, "model_type", "gemma")
        # Gemma 1 has 2 RMSNorms per layer, Gemma 2 and 3 have 4; Gemma 3 also normalises q and k per head.
        norms = (4 if model_type in ("gemma2", "gemma3_text") else 2) * hidden
        norms += 2 * head_dim if model_type == "gemma3_text" else 0
        shape = cls(0, config.vocab_size * hidden, hidden, config.num_hidden_layers, config.intermediate_size,
                    config.vocab_size, heads, kv_heads, head_dim)
        linear = sum(n_in * n_out for n_in, n_out in _linear_dims(shape).values())
        return replace(shape, n_params=shape.n_embed_params + shape.n_layers * (linear + norms) + hidden)

    @property
    def matmul_params(self) -> int:
        """Weights that every token is multiplied through: all decoder linear layers and the tied LM head."""
        return self.n_layers * sum(n_in * n_out for n_in, n_out in _linear_dims(self).values()) + self.n_embed_params


def shape_for(name: str) -> ModelShape:
    """The shape of a preset model (PRESETS: gemma-3-270m, gemma-2b, gemma-7b, gemma-3-tiny), or generic-7b."""
    if name == "generic-7b":
        return GENERIC_7B
    _check(name, PRESETS, "model")
    return ModelShape.from_config(SimpleNamespace(**PRESETS[name]))


# A generic 7B model (Llama-2-7B sizes, 32k vocabulary) with exactly 7e9 parameters, for the rules of thumb.
GENERIC_7B = ModelShape(n_params=7_000_000_000, n_embed_params=32000 * 4096, hidden_size=4096, n_layers=32,
                        intermediate_size=11008, vocab_size=32000, n_heads=32, n_kv_heads=32, head_dim=128)


def _linear_dims(shape: ModelShape) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear layer in one decoder layer."""
    h, i = shape.hidden_size, shape.intermediate_size
    q, kv = shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def lora_params(shape: ModelShape, r: int, targets: str | Iterable[str] = "all-linear") -> int:
    """LoRA parameters: r * (in + out) for every targeted linear layer of every decoder layer."""
    names = LINEAR_LAYERS if targets == "all-linear" else tuple([targets] if isinstance(targets, str) else targets)
    for name in names:
        _check(name, LINEAR_LAYERS, "LoRA target")
    dims = _linear_dims(shape)
    return shape.n_layers * sum(r * sum(dims[name]) for name in names)


@dataclass(frozen=True)
class MemoryEstimate:
    """Training memory in bytes by component; `lora` is adapter (and token-row) weights, gradients and optimizer."""

    method: str
    weights: int
    gradients: int
    optimizer: int
    lora: int
    activations: int

    @property
    def total(self) -> int:
        """All components together, in bytes."""
        return sum(getattr(self, name) for name in COMPONENTS)

    def gib(self, field: str) -> float:
        """One component, or "total", in GiB."""
        _check(field, (*COMPONENTS, "total"), "field")
        return getattr(self, field) / GIB

    def as_row(self) -> dict[str, str | float]:
        """The method and each component in GiB (2 decimals), for a table."""
        return {"method": self.method, **{name: round(self.gib(name), 2) for name in (*COMPONENTS, "total")}}


def _layer_bytes(shape: ModelShape, tokens: int, el: int) -> int:
    """What one decoder layer keeps for backward (or works with at once in a forward), for `tokens` tokens."""
    return tokens * (ACT_HIDDEN * shape.hidden_size + ACT_INTERMEDIATE * shape.intermediate_size) * el


def _activation_bytes(shape: ModelShape, tokens: int, el: int, gradient_checkpointing: bool,
                      lm_head: str = "full") -> int:
    """Saved activations of the decoder layers plus the LM head's: the fp32 logits' softmax and gradients ("full"),
    or TRL's fused head ("chunked"): one [tokens x vocab] tile in the compute dtype and the fp32 hidden gradient."""
    layer = _layer_bytes(shape, tokens, el)
    if gradient_checkpointing:
        layers = shape.n_layers * tokens * shape.hidden_size * el + layer
    else:
        layers = shape.n_layers * layer
    if lm_head == "chunked":
        head = min(tokens, CHUNK_TOKENS) * min(shape.vocab_size, CHUNK_VOCAB) * el + tokens * shape.hidden_size * 4
    else:
        head = tokens * shape.vocab_size * LOGIT_BYTES
    return layers + head


def estimate(
    shape: ModelShape,
    method: str,
    *,
    batch_size: int = 1,
    seq_len: int = 512,
    lora_r: int = 16,
    lora_targets: str | Iterable[str] = "all-linear",
    weight_dtype: str = "bf16",
    optimizer: str = "adamw",
    gradient_checkpointing: bool = False,
    trainable_token_rows: int = 0,
    lm_head: str = "full",
    embedding_dtype: str | None = None,
) -> MemoryEstimate:
    """Peak training memory. P params, E embedding params, L LoRA params, w = bytes of weight_dtype, s = Adam's 8 or 0.

    full:  weights w*P, gradients 4*P, optimizer (s + 4 fp32 master copy if w < 4)*P: 18 B/param bf16, 16 fp32.
    lora:  frozen weights w*P; lora (4 weight + 4 grad + s)*L. qlora: weights e*E + NF4 (4.127 bits)*(P - E), where e
    is embedding_dtype's bytes (default w; PEFT's k-bit preparation, which notebook 02 uses, upcasts it to fp32).
    Trainable token rows add rows*hidden params to L, plus the merged embedding PEFT rebuilds each forward (e*E) and,
    with TRL's fused head, the fp32 gradient of that merged matrix (4*E).
    activations: w*tokens*layers*(16*hidden + 4*intermediate), or with gradient checkpointing each layer's input
    (w*tokens*layers*hidden) plus one layer's worth; plus the LM head: 12*tokens*vocab for full fp32 logits' softmax
    and gradients (a plain PyTorch loop), or TRL 1.16's chunked head (lm_head="chunked": one 4096 x 32768 tile).
    """
    _check(method, METHODS, "method")
    _check(weight_dtype, DTYPE_BYTES, "weight_dtype")
    _check(optimizer, OPTIMIZER_STATE_BYTES, "optimizer")
    _check(lm_head, LM_HEADS, "lm_head")
    _check(embedding_dtype or weight_dtype, DTYPE_BYTES, "embedding_dtype")
    el, state = DTYPE_BYTES[weight_dtype], OPTIMIZER_STATE_BYTES[optimizer]
    emb_el = DTYPE_BYTES[embedding_dtype or weight_dtype]
    gradients = optimizer_bytes = lora = 0
    if method == "full":
        weights = shape.n_params * el
        gradients = shape.n_params * GRAD_BYTES
        optimizer_bytes = shape.n_params * (state + (MASTER_BYTES if el < 4 else 0))
    else:
        body = shape.n_params - shape.n_embed_params
        weights = shape.n_embed_params * emb_el + round(body * (NF4_BYTES if method == "qlora" else el))
        trainable = lora_params(shape, lora_r, lora_targets) + trainable_token_rows * shape.hidden_size
        lora = trainable * (ADAPTER_BYTES + GRAD_BYTES + state)
        if trainable_token_rows:
            lora += shape.n_embed_params * (emb_el + (GRAD_BYTES if lm_head == "chunked" else 0))
    activations = _activation_bytes(shape, batch_size * seq_len, el, gradient_checkpointing, lm_head)
    return MemoryEstimate(method, weights, gradients, optimizer_bytes, lora, activations)


def fits(estimate: MemoryEstimate, budget_gib: float) -> bool:
    """Whether the estimated total fits in budget_gib GiB."""
    return estimate.total <= budget_gib * GIB


def per_gpu(estimate: MemoryEstimate, n_gpus: int, strategy: str) -> MemoryEstimate:
    """Memory per GPU: ddp replicates everything; zero3/fsdp shard all but activations over n_gpus."""
    _check(strategy, STRATEGIES, "strategy")
    if n_gpus < 1:
        raise ValueError(f"n_gpus must be at least 1, got {n_gpus}.")
    if strategy == "ddp":
        return estimate
    return replace(estimate, **{name: math.ceil(getattr(estimate, name) / n_gpus) for name in SHARDED})


def table(estimates: list[MemoryEstimate]) -> list[dict]:
    """One row (GiB, 2 decimals) per estimate."""
    return [e.as_row() for e in estimates]


def to_markdown(rows: list[dict]) -> str:
    """A markdown table of rows that share their keys."""
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(row[k]) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def shape_for_profile(profile) -> ModelShape:
    """The ModelShape of a profile's base model: its model_shape preset, else counted from the model's config."""
    if profile.model_shape:
        return shape_for(profile.model_shape)
    return ModelShape.from_config(AutoConfig.from_pretrained(profile.model_id))


def _compute_dtype_name(profile) -> str:
    """The profile's compute dtype as the estimator spells it (bf16 or fp32)."""
    return "bf16" if profile.compute_dtype == "bfloat16" else "fp32"


def estimate_profile(profile) -> MemoryEstimate:
    """Training memory of a course profile's SFT run (QLoRA or LoRA, its batch, length and checkpointing) under TRL's
    chunked LM head; the embedding is fp32 after PEFT's k-bit preparation (models.add_lora)."""
    return estimate(
        shape_for_profile(profile),
        "qlora" if profile.load_in_4bit else "lora",
        batch_size=profile.batch_size,
        seq_len=profile.max_length,
        lora_r=profile.lora_r,
        weight_dtype=_compute_dtype_name(profile),
        gradient_checkpointing=profile.gradient_checkpointing,
        trainable_token_rows=2 if profile.train_turn_tokens else 0,
        lm_head="chunked",
        embedding_dtype="fp32" if profile.load_in_4bit else None,
    )


def estimate_dpo_profile(profile) -> MemoryEstimate:
    """Training memory of a profile's DPO run: chosen and rejected of each pair at max_length, the new LoRA (no token
    rows), TRL's chunked LM head; the reference is the same weights with the adapter disabled, computed without
    gradients before the policy's pass."""
    return estimate(
        shape_for_profile(profile),
        "qlora" if profile.load_in_4bit else "lora",
        batch_size=2 * profile.dpo_batch_size,
        seq_len=profile.max_length,
        lora_r=profile.lora_r,
        weight_dtype=_compute_dtype_name(profile),
        gradient_checkpointing=profile.gradient_checkpointing,
        lm_head="chunked",
    )


def describe_profile(profile, budget_gib: float = 24.0) -> str:
    """One paragraph: the profile's estimated training memory by component, and whether it fits the budget."""
    est = estimate_profile(profile)
    parts = ", ".join(f"{name} {est.gib(name):.1f}" for name in COMPONENTS)
    verdict = "fits" if fits(est, budget_gib) else "does NOT fit"
    return (f"profile {profile.name}: {est.method}, batch {profile.batch_size} x {profile.max_length} tokens -> "
            f"{est.gib('total'):.1f} GiB ({parts}); {verdict} in {budget_gib:.0f} GiB")


def check_fits(profile, free_gib: float | None, n_gpus: int = 1, strategy: str = "ddp") -> None:
    """Raise CourseError when the profile's estimated training memory per GPU exceeds the free GPU memory."""
    need = per_gpu(estimate_profile(profile), n_gpus, strategy).gib("total")
    if free_gib is not None and need > free_gib:
        raise CourseError(
            f"Profile {profile.name!r} needs about {need:.1f} GiB of GPU memory (memory.estimate_profile, "
            f"{strategy} over {n_gpus} GPU(s)) but only {free_gib:.1f} GiB is free. Close other programs using the "
            "GPU, lower batch_size or max_length (e.g. get_profile(PROFILE, batch_size=1, max_length=1024)), "
            "shard the model over more GPUs (configs/accelerate/fsdp_qlora.yaml), or use the cpu profile."
        )


def model_bytes(shape: ModelShape, precision: str) -> int:
    """Weights of a model held for inference: "4bit" as QLoRA stores them (NF4, embedding in bf16), else dtype * P."""
    if precision == "4bit":
        return estimate(shape, "qlora").weights
    _check(precision, PRECISION_BYTES, "precision")
    return shape.n_params * PRECISION_BYTES[precision]


def scoring_bytes(shape: ModelShape, tokens: int, el: int) -> int:
    """Scoring `tokens` positions without gradients (evaluate.answer_logprobs): one layer's working set, the logits in
    the compute dtype, their fp32 copy and log-softmax."""
    return _layer_bytes(shape, tokens, el) + tokens * shape.vocab_size * (el + SCORE_LOGIT_FP32_BYTES)


def generation_bytes(shape: ModelShape, batch: int, tokens: int, el: int) -> int:
    """Greedy generation for `batch` prompts up to `tokens` positions each: the KV cache plus one step's logits."""
    cache = 2 * shape.n_layers * shape.n_kv_heads * shape.head_dim * batch * tokens * el
    return cache + _layer_bytes(shape, batch, el) + batch * shape.vocab_size * (el + 4)


def inference_bytes(shape: ModelShape, seq_len: int, max_new_tokens: int, el: int) -> int:
    """Activations of evaluating one model, whichever is larger (they never run at once): scoring a seq_len sequence,
    or generating max_new_tokens for GEN_BATCH prompts of up to GEN_PROMPT_TOKENS."""
    return max(scoring_bytes(shape, seq_len, el),
               generation_bytes(shape, GEN_BATCH, GEN_PROMPT_TOKENS + max_new_tokens, el))


def estimate_eval(profile) -> int:
    """Bytes of one evaluation model of the profile at work (models.load_for_eval's precision): weights plus
    inference_bytes at its max_length and max_new_tokens."""
    shape = shape_for_profile(profile)
    el = PRECISION_BYTES[profile.compute_dtype if profile.eval_precision == "4bit" else profile.eval_precision]
    return model_bytes(shape, profile.eval_precision) + inference_bytes(shape, profile.max_length,
                                                                        profile.max_new_tokens, el)


def estimate_stage(profile, stage: str) -> int:
    """Bytes of one stage of the profile: "sft" or "dpo" training, or "eval" (one evaluation model at work)."""
    _check(stage, ("sft", "dpo", "eval"), "stage")
    if stage == "eval":
        return estimate_eval(profile)
    return (estimate_profile if stage == "sft" else estimate_dpo_profile)(profile).total
