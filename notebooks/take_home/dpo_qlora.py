"""DPO of Gemma 7B with QLoRA on one 24 GB GPU, after sft_qlora.py: notebook 04's training as one standalone file.

    python dpo_qlora.py --sft_adapter outputs/sft_qlora     # google/gemma-7b + that adapter, ultrafeedback_binarized
    python dpo_qlora.py --sft_adapter outputs/sft_qlora --data data/ultrafeedback_mini --max_steps 10

The values are the course's rtx4090 profile, written out. The SFT adapter is merged into the base (in bf16, on the
CPU: 17 GiB of RAM for Gemma 7B) and saved in <output_dir>/sft_merged; DPO trains a new adapter on it in 4-bit (the
reference: the same weights with the adapter off) and saves it in --output_dir.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import bitsandbytes as bnb
import torch
from datasets import Dataset, load_dataset, load_from_disk
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from trl import DPOConfig, DPOTrainer

# Gemma's turn format, as in the official instruct template, plus {% generation %} markers around each
# reply and its <end_of_turn>, so apply_chat_template(return_assistant_tokens_mask=True) and TRL's
# assistant_only_loss know which tokens to train on. Gemma has no system role: it is folded into turn 1.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<start_of_turn>model\n' }}"
    "{%- generation -%}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>' }}"
    "{%- endgeneration -%}"
    "{{ '\n' }}"
    "{%- else -%}"
    "{{ '<start_of_turn>user\n' + (first_user_prefix if loop.first else '') + message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<start_of_turn>model\n' }}"
    "{%- endif -%}"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line: where to read and write, and a shorter run; the lesson values are in build_configs."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="google/gemma-7b", help="Hub id or local folder of the base model")
    parser.add_argument("--sft_adapter", help="folder of sft_qlora.py's adapter; without it DPO starts from --model")
    parser.add_argument("--data", default="HuggingFaceH4/ultrafeedback_binarized", help="Hub id or local folder")
    parser.add_argument("--max_steps", type=int, help="default 128")
    parser.add_argument("--max_length", type=int, help="default 1024 (smaller: a quick trial)")
    parser.add_argument("--output_dir", default="outputs/dpo_qlora")
    return parser.parse_args(argv)


def build_configs(args: argparse.Namespace) -> dict:
    """The 4-bit, LoRA and DPO settings of the course (its recipes.dpo_recipe for the rtx4090 profile)."""
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
    # a new adapter, without token rows: the SFT ones are merged into the weights already
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    dpo = DPOConfig(
        beta=0.1,  # small: the policy may drift far from the reference; large: it stays close
        loss_type=["sigmoid"],  # plain DPO; ["sigmoid", "sft"] with loss_weights adds an SFT term (RPO)
        learning_rate=5e-6,
        lr_scheduler_type="constant",
        max_length=args.max_length or 1024,  # prompt + answer; longer pairs are truncated
        max_steps=args.max_steps or 128,
        per_device_train_batch_size=1,  # pairs: each is two sequences plus the reference pass
        per_device_eval_batch_size=1,
        gradient_accumulation_steps=4,
        gradient_checkpointing=True,
        bf16=True,
        output_dir=args.output_dir, save_steps=25, save_total_limit=1, logging_steps=1, report_to="none",
        use_cpu=not torch.cuda.is_available(),  # bf16 on a CPU needs this said
    )
    return {"quantization": quantization, "lora": lora, "dpo": dpo}


def load_split(source: str, split: str, rows: int) -> Dataset:
    """The first rows of a split: from the Hub, a save_to_disk folder, or <split>.jsonl in a folder (data/*_mini)."""
    folder = Path(source)
    if (folder / "dataset_dict.json").exists():
        ds = load_from_disk(str(folder))[split]
    elif folder.is_dir():
        ds = Dataset.from_json(str(folder / f"{split}.jsonl"))
    else:
        ds = load_dataset(source, split=split)
    return ds.select(range(min(rows, len(ds))))


def guard_cpu_4bit(model: torch.nn.Module) -> None:
    """Keep bitsandbytes from repacking 4-bit layers for CPU inference, which later training steps would use wrongly."""
    for layer in model.modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            layer.support_avx512bf16_for_cpu = False


def explicit(row: dict) -> dict:
    """An UltraFeedback pair (two whole conversations) as prompt turns and the two final replies."""
    return {"prompt": row["chosen"][:-1], "chosen": row["chosen"][-1:], "rejected": row["rejected"][-1:]}


def merge_sft_adapter(model: str, adapter: str, out_dir: Path, dtype: torch.dtype) -> str:
    """Merge the SFT adapter (token rows included) into the unquantized base on the CPU and save it; returns out_dir."""
    base = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, use_safetensors=True)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True)
    return str(out_dir)


def main() -> None:
    """Merge the SFT adapter, load the result in 4-bit, train a DPO adapter, save it and the tokenizer."""
    args = parse_args()
    configs = build_configs(args)
    quantization, dpo = configs["quantization"], configs["dpo"]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.chat_template = GEMMA_TEMPLATE
    tokenizer.pad_token = "<pad>"  # not <eos>: a pad masked out of the loss would hide the end of text
    tokenizer.padding_side = "right"
    tokenizer.model_max_length = dpo.max_length
    rows = dpo.max_steps * dpo.per_device_train_batch_size * dpo.gradient_accumulation_steps  # 512 in 128 steps
    pairs = load_split(args.data, "train_prefs", rows)
    pairs = pairs.map(explicit, remove_columns=pairs.column_names)

    start = args.model
    if args.sft_adapter:
        start = merge_sft_adapter(args.model, args.sft_adapter, Path(args.output_dir) / "sft_merged",
                                  quantization.bnb_4bit_compute_dtype)
    model = AutoModelForCausalLM.from_pretrained(start, quantization_config=quantization, use_safetensors=True,
                                                 dtype=quantization.bnb_4bit_compute_dtype)
    # ref_model=None: the reference is the same 4-bit weights with the adapter switched off
    trainer = DPOTrainer(model=model, ref_model=None, args=dpo, train_dataset=pairs, processing_class=tokenizer,
                         peft_config=configs["lora"])
    if not torch.cuda.is_available():
        guard_cpu_4bit(trainer.model)
    trainer.model.print_trainable_parameters()
    trainer.train()
    trainer.save_model(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    print(f"adapter saved to {args.output_dir}")


if __name__ == "__main__":
    main()
