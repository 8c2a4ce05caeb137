"""DPO on the merged SFT model with a new QLoRA adapter: notebook 04's training, as a script for one process or several.

    python scripts/dpo.py --profile cpu          # after scripts/sft.py with the same --output_dir
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml scripts/dpo.py --profile rtx4090

Reads <output_dir>/sft/manifest.json; writes sft/merged, dpo/adapter, dpo/merged, dpo/manifest.json and metrics.json.
"""

from utils import logs

logs.quiet()  # hide library warnings and loading bars

from trl import DPOTrainer  # noqa: E402

from utils import chat, cli, data, distributed, evaluate, models, recipes, report, resume  # noqa: E402


def main() -> None:
    profile, state, out_dir = cli.start(__doc__)

    sft = report.read_manifest(out_dir, "sft", made_by="scripts/sft.py (or notebook 02)")
    merged_dir = out_dir / "sft" / "merged"
    if state.is_main_process:
        models.merge_adapter(profile, sft["adapter_dir"], merged_dir)
    state.wait_for_everyone()
    tokenizer = chat.setup_tokenizer(models.load_tokenizer(profile), profile.max_length)
    prefs = data.load_preference_dataset(profile.pref_data, max_rows=profile.pref_train_rows)
    train_pairs, eval_pairs = recipes.dpo_datasets(profile, prefs)
    for split, pairs in (("training", train_pairs), ("evaluation", eval_pairs)):  # notebook 04's check
        data.check_max_length(tokenizer, pairs, profile.max_length, split=split)

    model = models.load_base_model(profile, path=merged_dir)
    recipe = recipes.dpo_recipe(profile, out_dir / "dpo" / "checkpoints")
    configs = report.config_dicts(recipe)  # before PEFT rewrites the LoraConfig it is given
    config = recipe["dpo"]
    trainer = DPOTrainer(model=model, ref_model=None, args=config, train_dataset=train_pairs, eval_dataset=eval_pairs,
                         processing_class=tokenizer, peft_config=recipe["lora"])
    models.guard_cpu_4bit(trainer.model)
    distributed.log(models.describe_trainable(trainer.model))

    step0 = trainer.evaluate()
    terms0 = evaluate.loss_terms(trainer, step0)  # the DPO term apart from an SFT term: ln 2 at step 0
    with state.main_process_first():  # the main process removes checkpoints of another plan before the others look
        checkpoint = resume.resume_point_or_clear(config, {"profile": profile, "sft": sft})
    trained = trainer.train(resume_from_checkpoint=checkpoint)
    if state.is_main_process:
        resume.mark_finished(config)
    final = trainer.evaluate()
    terms = evaluate.loss_terms(trainer, final)
    losses = [round(entry["loss"], 4) for entry in trainer.state.log_history if "loss" in entry]
    distributed.log(f"trained {trainer.state.global_step} steps, losses {losses}, eval loss {terms0['dpo']:.4f} -> "
                    f"{terms['dpo']:.4f} (its DPO term), reward accuracy {final['eval_rewards/accuracies']:.2f}")

    adapter_dir = out_dir / "dpo" / "adapter"
    distributed.save_model(trainer, adapter_dir)
    if state.is_main_process:
        tokenizer.save_pretrained(str(adapter_dir))
        dpo_merged_dir = models.merge_adapter(profile, adapter_dir, out_dir / "dpo" / "merged", base_path=merged_dir)
        report.record(out_dir, "dpo/loss_step0", terms0["dpo"])
        report.record(out_dir, "dpo/rewards_abs_step0",
                      max(abs(step0["eval_rewards/chosen"]), abs(step0["eval_rewards/rejected"])))
        report.record(out_dir, "dpo/eval_accuracy", final["eval_rewards/accuracies"])
        report.record(out_dir, "dpo/train_seconds", trained.metrics["train_runtime"])  # this process's part
        report.record(out_dir, "dpo/eval_margin", final["eval_rewards/margins"])
        report.record(out_dir, "dpo/eval_logps_chosen_change", final["eval_logps/chosen"] - step0["eval_logps/chosen"])
        report.write_manifest(out_dir, "dpo", profile, configs, sft_manifest=str(out_dir / "sft" / "manifest.json"),
                              adapter_dir=str(adapter_dir), merged_dir=str(dpo_merged_dir),
                              steps=trainer.state.global_step)
        distributed.log(f"wrote adapter {adapter_dir}, {dpo_merged_dir} and {out_dir / 'dpo' / 'manifest.json'}")
    state.wait_for_everyone()


if __name__ == "__main__":
    main()
