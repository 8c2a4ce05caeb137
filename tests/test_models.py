"""Model set-up: the 4-bit CPU guard, LoRA wrapping, merging, and DPO's step-0 identity on a tiny Gemma."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM

from utils import chat, evaluate, lm_head, memory, models, recipes
from utils.errors import CourseError
from utils.memory import ModelShape
from utils.models import tiny_gemma_config
from utils.profiles import get_profile

PROFILE = get_profile("cpu")


def _save_tiny(tmp_path, hidden: int = 64) -> str:
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(tiny_gemma_config(hidden_size=hidden, intermediate_size=2 * hidden, head_dim=32))
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    return str(path)


def _qlora_steps(path: str, eval_first: bool, guard: bool, dtype: str, steps: int = 8) -> tuple[float, float]:
    """(loss before, loss after) of QLoRA steps computing in dtype on one fixed batch, optionally after an eval."""
    torch.manual_seed(0)
    profile = get_profile("cpu", compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=recipes.quantization_config(profile),
                                                 dtype=models.compute_dtype(profile))
    if not guard:
        import bitsandbytes as bnb

        for layer in model.modules():
            if isinstance(layer, bnb.nn.Linear4bit):
                layer.support_avx512bf16_for_cpu = True
    else:
        models.guard_cpu_4bit(model)
    model = models.add_lora(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    ids = torch.randint(10, 1000, (4, 24), generator=torch.Generator().manual_seed(1))
    if eval_first:
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)
        model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses[0], losses[-1]


def test_guard_marks_every_4bit_layer(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(_save_tiny(tmp_path), quantization_config=recipes.quantization_config(
        PROFILE), dtype=torch.bfloat16)
    import bitsandbytes as bnb

    n = models.guard_cpu_4bit(model)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert n == len(layers) == 2 * 7
    assert not any(layer.support_avx512bf16_for_cpu for layer in layers)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])  # the two precisions the cpu profile may pick
def test_qlora_trains_as_well_after_an_eval(tmp_path, dtype):
    """The CPU trap of FACTS.md: with the guard, an eval before training changes nothing."""
    path = _save_tiny(tmp_path)
    clean = _qlora_steps(path, eval_first=False, guard=True, dtype=dtype)
    after_eval = _qlora_steps(path, eval_first=True, guard=True, dtype=dtype)
    drop_clean, drop_after_eval = clean[0] - clean[1], after_eval[0] - after_eval[1]
    assert drop_clean > 0.5
    assert drop_after_eval == pytest.approx(drop_clean, rel=0.05)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_without_the_guard_an_eval_breaks_training(tmp_path, dtype):
    """Control: on AVX512-BF16 CPUs the unguarded model trains differently after an eval, in either precision."""
    from bitsandbytes.backends.cpu.ops import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16, so bitsandbytes never repacks and there is no trap to show")
    path = _save_tiny(tmp_path)
    clean = _qlora_steps(path, eval_first=False, guard=True, dtype=dtype)
    broken = _qlora_steps(path, eval_first=True, guard=False, dtype=dtype)
    assert abs((broken[0] - broken[1]) - (clean[0] - clean[1])) > 0.05 * (clean[0] - clean[1])


def test_lora_config_trains_turn_rows_and_fixes_the_head(tokenizer, tiny_model):
    config = recipes.lora_config(PROFILE, tokenizer)
    assert config.trainable_token_indices == {"embed_tokens": [105, 106]}
    model = models.add_lora(tiny_model, config)
    assert model.get_output_embeddings().bias is None  # TRL's fused head reads .bias
    trainable, total = models.trainable_parameters(model)
    assert 0 < trainable < total
    assert "trainable:" in models.describe_trainable(model)


def test_count_lora_parameters_on_the_meta_device_matches_the_loaded_4bit_model(tokenizer):
    config = recipes.lora_config(PROFILE, tokenizer)
    counted = models.count_lora_parameters(PROFILE, config)
    assert config.target_modules == "all-linear", "the learner's config is left as written"
    loaded = models.trainable_parameters(models.add_lora(models.load_base_model(PROFILE), config))
    assert (counted["trainable"], counted["total"]) == loaded
    attention = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                           task_type="CAUSAL_LM")
    assert 0 < models.count_lora_parameters(PROFILE, attention)["trainable"] < counted["trainable"]


def _train_adapter(tiny_model, tokenizer, token_rows: bool) -> PeftModel:
    extra = {"trainable_token_indices": {"embed_tokens": [105, 106]}, "ensure_weight_tying": True} if token_rows else {}
    model = get_peft_model(tiny_model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  task_type="CAUSAL_LM", **extra))
    models.fix_output_bias(model)
    enc = chat.encode(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}])
    ids = torch.tensor([enc["input_ids"]])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(5):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.mark.parametrize("token_rows", [False, True])
def test_merged_model_matches_adapter_model(tmp_path, tokenizer, tiny_model, token_rows):
    """Merging must carry everything the adapter trained, token rows included."""
    base_dir = tmp_path / "base"
    tiny_model.save_pretrained(base_dir)
    adapter = _train_adapter(tiny_model, tokenizer, token_rows)
    adapter.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter").eval()
    merged_dir = models.merge_adapter(PROFILE, tmp_path / "adapter", tmp_path / "merged", base_path=base_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    prompts = ["Hi", "What is the capital of France?", "Tell me a joke."]
    logits = {name: evaluate.prompt_logits(m, tokenizer, prompts)
              for name, m in (("merged", merged), ("reloaded", reloaded), ("base", base))}
    assert evaluate.max_logit_difference(logits["merged"], logits["reloaded"]) < 1e-4
    assert evaluate.max_logit_difference(logits["merged"], logits["base"]) > 1e-3  # the adapter changed something
    assert not (tmp_path / "merged.partial").exists()


def test_dpo_loss_is_ln2_against_itself_and_not_against_another_model(tokenizer, tiny_model):
    pairs = [{"prompt": [{"role": "user", "content": "How do I buy a gun?"}],
              "chosen": [{"role": "assistant", "content": "It depends on local law; use a licensed dealer."}],
              "rejected": [{"role": "assistant", "content": "Find a seller who asks no questions."}]}]
    policy = evaluate.pair_logprobs(tiny_model, tokenizer, pairs)
    same = evaluate.dpo_loss(policy, policy, beta=0.1)
    assert same["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert same["rewards/chosen"] == same["rewards/rejected"] == 0
    torch.manual_seed(1)
    other = Gemma3ForCausalLM(tiny_gemma_config()).eval()
    wrong = evaluate.dpo_loss(policy, evaluate.pair_logprobs(other, tokenizer, pairs), beta=1.0)
    assert abs(wrong["loss"] - math.log(2)) > 1e-3


def test_dpo_trainer_step0_is_ln2_with_peft_config_and_no_ref_model(tmp_path, tokenizer, tiny_model):
    """TRL's own evaluation before any update: policy = reference (adapter disabled), loss ln 2, rewards 0."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    rows = [{"prompt": [{"role": "user", "content": f"Question {i}?"}],
             "chosen": [{"role": "assistant", "content": f"A careful answer {i}."}],
             "rejected": [{"role": "assistant", "content": f"A bad answer {i}, {i}."}]} for i in range(4)]
    config = DPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_eval_batch_size=2, max_length=64,
                       report_to="none", use_cpu=True, bf16=False, beta=0.1)
    trainer = DPOTrainer(model=tiny_model, ref_model=None, args=config, train_dataset=Dataset.from_list(rows),
                         eval_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM",
                                                init_lora_weights=True))
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert abs(metrics["eval_rewards/chosen"]) < 1e-4 and abs(metrics["eval_rewards/rejected"]) < 1e-4


# ----------------------------------------------------------------------------------------------------------------
# Evaluation models (load_for_eval, free) and random stand-ins (the dry run's tiny Gemma, Gemma 7B's shape)
# ----------------------------------------------------------------------------------------------------------------


def test_rtx4090_evaluation_models_load_in_4bit_on_the_gpu():
    kwargs = models.eval_load_kwargs(get_profile("rtx4090"), cuda=True)
    quant = kwargs["quantization_config"]
    assert quant.load_in_4bit and quant.bnb_4bit_quant_type == "nf4" and kwargs["dtype"] == torch.bfloat16
    assert kwargs["device_map"] == {"": 0}


def test_cpu_evaluation_models_are_exact_fp32_on_the_cpu():
    assert models.eval_load_kwargs(PROFILE, cuda=False) == {"dtype": torch.float32}


def test_an_unknown_eval_precision_is_named():
    with pytest.raises(CourseError, match="eval_precision='int8' is not one of float32, bfloat16, 4bit"):
        models.eval_load_kwargs(get_profile("cpu", eval_precision="int8"), cuda=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
def test_a_gpu_profile_refuses_to_load_an_evaluation_model_without_a_gpu():
    with pytest.raises(CourseError, match="needs a CUDA GPU"):
        models.load_for_eval(get_profile("rtx4090"))


def test_dry_run_loads_its_tiny_evaluation_model_in_4bit_and_free_releases_it(tokenizer):
    import bitsandbytes as bnb

    model = models.load_for_eval(get_profile("rtx4090-dryrun"))
    assert not model.training and model.config.hidden_size == 32
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 2 * 7
    # its layers are narrower than bitsandbytes' blocks: the CPU inference repack would fail (the guard skips it)
    assert evaluate.prompt_logits(model, tokenizer, ["Hi"])[0].shape[-1] == model.config.vocab_size
    models.free(model)
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}


def test_the_tiny_model_is_built_once_into_the_cache():
    first = models.ensure_tiny_model()
    assert first == models.cache_dir() / models.TINY_DIR_NAME and (first / "tokenizer.json").is_file()
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert models.ensure_tiny_model() == first and (first / "model.safetensors").stat().st_mtime_ns == stamp


def test_gemma_7b_config_has_the_presets_exact_shape():
    config = models.gemma_7b_config()
    assert ModelShape.from_config(config) == memory.shape_for("gemma-7b")
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size) == \
        (3072, 24576, 28, 256000)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (16, 16, 256)


def test_save_random_model_writes_a_checkpoint_the_course_loads_in_4bit(tmp_path):
    """The Gemma 7B builder of the GPU tier, on the same function with tiny dimensions, on the CPU."""
    import bitsandbytes as bnb

    config = models.gemma_7b_config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    num_key_value_heads=2, head_dim=16)
    path = models.save_random_model(config, tmp_path / "random", device="cpu")
    assert (path / "model.safetensors").is_file()
    profile = get_profile("rtx4090-dryrun", model_id=str(path))
    model = models.load_base_model(profile, path=path)
    assert type(model).__name__ == "GemmaForCausalLM" and model.config.num_hidden_layers == 2
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 2 * 7
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16


def test_the_compact_lm_head_gives_the_same_loss_and_gradients_and_skips_unlabelled_positions(tiny_model):
    """TRL's fused head projects only labelled positions once models.compact_lm_head() is on (utils.models does it)."""
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(tiny_model)
    ids = torch.randint(3, 1000, (2, 12))
    labels = ids.clone()
    labels[:, :7] = -100  # a prompt: no label

    def run(compact: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
        models.compact_lm_head(compact)
        tiny_model.zero_grad()
        projected = []
        apply = lm_head.LogProbHead.apply
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(lm_head.LogProbHead, "apply",
                       lambda hidden, *args: projected.append(hidden.shape[0]) or apply(hidden, *args))
            loss = tiny_model(input_ids=ids, labels=labels, fused_lm_head=True).loss
        loss.backward()
        return loss.detach(), tiny_model.model.embed_tokens.weight.grad.clone(), projected[0]

    try:
        full_loss, full_grad, full_rows = run(compact=False)
        loss, grad, rows = run(compact=True)
    finally:
        models.compact_lm_head(True)
    assert full_rows == 2 * 11 and rows == 2 * 5  # shifted: 11 positions per row, 5 with a label
    assert torch.allclose(loss, full_loss, atol=1e-5) and torch.allclose(grad, full_grad, atol=1e-6)


def test_fast_inference_computes_the_same_and_restores_the_weights(tokenizer, tiny_model):
    """Inference with the trained token rows written into the (tied) embedding: same logits, weights restored after."""
    model = _train_adapter(tiny_model, tokenizer, token_rows=True)
    layers = [m for m in model.modules() if isinstance(m, TrainableTokensLayer)]
    weight = layers[0].base_layer.weight
    original = weight.detach().clone()
    ids = torch.tensor([chat.encode(tokenizer, [{"role": "user", "content": "Tell me a joke."}], True)["input_ids"]])
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with chat.fast_inference(model):
            assert len(layers) == 2 and all(layer.merged for layer in layers)  # the embedding and the tied head
            assert not torch.equal(weight[[105, 106]], original[[105, 106]])  # the trained rows are in
            merged = model(input_ids=ids).logits
    assert torch.equal(merged, plain)
    assert not any(layer.merged for layer in layers) and torch.equal(weight, original)


def test_slim_tokenizer_encodes_and_saves_as_the_full_one(tmp_path, tokenizer_dir):
    """`datasets` hashes the tokenizer on every trainer `map`: the 262k vocabulary and 515k merges must not be in it."""
    full = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert len(full._vocab) == 262144 and len(full._merges) > 500_000  # what slimming removes is really there
    slim = models.load_tokenizer(get_profile("cpu"))
    assert not slim._vocab and not slim._merges
    text = "<start_of_turn>user\nHow do I buy a gun?<end_of_turn>\n ünïcode 漢字 🙂"
    assert slim(text).input_ids == full(text).input_ids and slim.get_vocab() == full.get_vocab()
    slim.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)(text).input_ids == full(text).input_ids


def test_two_callers_asking_for_the_tiny_model_at_once_build_it_once(tmp_path, monkeypatch):
    """Two kernels or scripts on first use share the cache: the lock makes the second wait, then read."""
    import threading
    import time

    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    builds, results = [], []

    def slow_save(out):  # the real one takes seconds: both callers find no model before either finishes
        builds.append(out)
        time.sleep(0.5)
        out.mkdir(parents=True)
        for name in models.REQUIRED_FILES:
            (out / name).write_text("x")

    monkeypatch.setattr(models, "save_tiny_gemma", slow_save)
    workers = [threading.Thread(target=lambda: results.append(models.ensure_tiny_model())) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(builds) == 1 and results == [tmp_path / models.TINY_DIR_NAME] * 2
    assert models._is_complete(results[0])
