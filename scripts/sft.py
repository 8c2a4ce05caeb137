"""Supervised fine-tuning with QLoRA: notebook 02's training, as a script for one process or several.

    python scripts/sft.py --profile cpu
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml scripts/sft.py --profile rtx4090

Writes <output_dir>/sft/adapter, sft/manifest.json and metrics.json (default output_dir: outputs/<profile>/scripts).
"""

from utils import logs

logs.quiet()  # hide library warnings and loading bars

from trl import SFTTrainer  # noqa: E402

from utils import chat, cli, data, distributed, models, recipes, report, resume  # noqa: E402


def main() -> None:
    profile, state, out_dir = cli.start(__doc__)

    sft_data = data.load_sft_dataset(profile.sft_data, max_rows=profile.sft_train_rows)
    tokenizer = chat.setup_tokenizer(models.load_tokenizer(profile), profile.max_length)
    for split in sft_data:  # notebook 02's check: rows that max_length drops or cuts, counted before training
        data.check_max_length(tokenizer, sft_data[split], profile.max_length, padding_free=profile.padding_free,
                              split=split)
    train_set, eval_set = recipes.sft_datasets(profile, tokenizer, sft_data)
    recipe = recipes.sft_recipe(profile, tokenizer, out_dir / "sft" / "checkpoints")
    configs = report.config_dicts(recipe)  # before PEFT rewrites the LoraConfig it is given
    model = models.load_base_model(profile, quantization_config=recipe["quantization"])
    model = models.add_lora(model, recipe["lora"], gradient_checkpointing=profile.gradient_checkpointing)
    config = recipe["sft"]
    trainer = SFTTrainer(model=model, args=config, train_dataset=train_set, eval_dataset=eval_set,
                         processing_class=tokenizer)
    effective = profile.batch_size * profile.grad_accum * state.num_processes
    rows = f"packed rows of up to {profile.max_length} tokens" if profile.packing else "conversations"
    distributed.log(f"{models.describe_trainable(model)}; effective batch {profile.batch_size} x {profile.grad_accum} "
                    f"x {state.num_processes} processes = {effective} {rows} per step")

    loss_before = trainer.evaluate()["eval_loss"]
    with state.main_process_first():  # the main process removes checkpoints of another plan before the others look
        checkpoint = resume.resume_point_or_clear(config, {"profile": profile})
    trainer.train(resume_from_checkpoint=checkpoint)
    if state.is_main_process:
        resume.mark_finished(config)
    loss_after = trainer.evaluate()["eval_loss"]
    losses = [round(entry["loss"], 4) for entry in trainer.state.log_history if "loss" in entry]
    distributed.log(f"trained {trainer.state.global_step} steps, losses {losses}, "
                    f"eval loss {loss_before:.4f} -> {loss_after:.4f}")

    adapter_dir = out_dir / "sft" / "adapter"
    distributed.save_model(trainer, adapter_dir)
    if state.is_main_process:
        tokenizer.save_pretrained(str(adapter_dir))
        report.record(out_dir, "sft/eval_loss_before", loss_before)
        report.record(out_dir, "sft/eval_loss_after", loss_after)
        report.record(out_dir, "sft/eval_loss_drop", (loss_before - loss_after) / loss_before)
        report.write_manifest(
            out_dir, "sft", profile, configs, adapter_dir=str(adapter_dir), steps=trainer.state.global_step,
            metrics={k: v for k, v in report.load_metrics(out_dir).items() if k.startswith(("sft/", "base/"))})
        distributed.log(f"wrote adapter {adapter_dir} and {out_dir / 'sft' / 'manifest.json'}")
    state.wait_for_everyone()


if __name__ == "__main__":
    main()
