"""Supervised fine-tuning of Gemma 7B with QLoRA on one 24 GB GPU: notebook 02's training as one standalone file.

    python sft_qlora.py                                   # google/gemma-7b on HuggingFaceH4/ultrachat_200k
    python sft_qlora.py --data data/ultrachat_mini --max_steps 10 --output_dir outputs/sft_qlora

The values are the course's rtx4090 profile, written out; the adapter lands in --output_dir (dpo_qlora.py reads it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import bitsandbytes as bnb
import torch
from datasets import Dataset, load_dataset, load_from_disk
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from trl import SFTConfig, SFTTrainer

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
    parser.add_argument("--data", default="HuggingFaceH4/ultrachat_200k", help="Hub id or local folder (jsonl)")
    parser.add_argument("--max_steps", type=int, help="default 125")
    parser.add_argument("--max_length", type=int, help="default 1024 (smaller: a quick trial)")
    parser.add_argument("--batch_size", type=int, help="default 4 packed rows (smaller: a quick trial)")
    parser.add_argument("--output_dir", default="outputs/sft_qlora")
    return parser.parse_args(argv)


def build_configs(args: argparse.Namespace, tokenizer) -> dict:
    """The 4-bit, LoRA and SFT settings of the course (its recipes.sft_recipe for the rtx4090 profile)."""
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
    turn_tokens = tokenizer.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"])  # new to a base model
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM",
                      trainable_token_indices={"embed_tokens": turn_tokens}, ensure_weight_tying=True)
    batch_size = args.batch_size or 4
    sft = SFTConfig(
        assistant_only_loss=True,  # loss on the replies only (the template's {% generation %} marks)
        max_steps=args.max_steps or 125,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        gradient_accumulation_steps=4,  # 16 packed rows per optimizer step
        gradient_checkpointing=True,
        padding_free=False,  # packing concatenates the rows itself
        packing=True,  # fill rows of max_length with whole conversations
        max_length=args.max_length or 1024,
        bf16=True,
        output_dir=args.output_dir, save_steps=25, save_total_limit=1, logging_steps=10, report_to="none",
        use_cpu=not torch.cuda.is_available(),  # bf16 on a CPU needs this said
    )
    return {"quantization": quantization, "lora": lora, "sft": sft}


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


def main() -> None:
    """Load, wrap with LoRA, train, save the adapter and tokenizer."""
    args = parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.chat_template = GEMMA_TEMPLATE
    tokenizer.pad_token = "<pad>"  # not <eos>: a pad masked out of the loss would hide the end of text
    tokenizer.padding_side = "right"
    configs = build_configs(args, tokenizer)
    sft = configs["sft"]
    tokenizer.model_max_length = sft.max_length
    rows = sft.max_steps * sft.per_device_train_batch_size * sft.gradient_accumulation_steps  # 2,000 in 125 steps
    train_set = load_split(args.data, "train_sft", rows).select_columns(["messages"])

    quantization = configs["quantization"]
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=quantization, use_safetensors=True,
                                                 dtype=quantization.bnb_4bit_compute_dtype)
    if not torch.cuda.is_available():
        guard_cpu_4bit(model)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=sft.gradient_checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, configs["lora"])
    head = model.get_output_embeddings()
    if not hasattr(head, "bias"):  # TRL's fused LM head reads .bias; PEFT's token-row wrapper has none
        head.bias = None
    model.print_trainable_parameters()

    trainer = SFTTrainer(model=model, args=sft, train_dataset=train_set, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    print(f"adapter saved to {args.output_dir}")


if __name__ == "__main__":
    main()
