"""Run the whole course on the cpu profile with the real runner, then assert on what each notebook measured; run the
rtx4090 path on the CPU (the rtx4090-dryrun profile) and assert that it took the GPU profile's branches."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from dry_run import PROFILE as DRY_RUN
from dry_run import check_trained_like_rtx4090, stored_dtypes

from utils import models, recipes, report, run
from utils.precision import choose_compute_dtype
from utils.profiles import Profile

pytestmark = pytest.mark.notebook


@pytest.fixture(scope="session")
def course(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("course")
    assert run.run_course("cpu", out) == 0, f"a notebook failed; see {out}/summary.md"
    return out


@pytest.fixture(scope="session")
def metrics(course) -> dict[str, float]:
    return report.load_metrics(course)


def test_runner_wrote_every_executed_notebook_html_and_summary(course):
    for nb in run.notebooks():
        assert (course / nb.name).exists() and (course / nb.name).with_suffix(".html").exists()
    summary = (course / "summary.md").read_text()
    assert summary.count("| ok |") == 4 and not (course / run.INCOMPLETE).exists()


def test_01_template_and_untrained_base(metrics):
    assert metrics["tokenizer/vocab_size"] == 262144
    assert metrics["template/bos_count"] == 1
    assert 0 < metrics["template/trained_tokens"] < metrics["template/total_tokens"]
    assert metrics["base/ends_turn_rate_01"] <= 1 / 3


def test_02_memory_headlines(metrics):
    assert metrics["memory/7b_full_gb"] == pytest.approx(126, rel=0.01)
    assert 5 < metrics["memory/7b_qlora_gb"] < 9


def test_02_sft_lowers_eval_loss_by_a_fifth(metrics):
    assert metrics["sft/eval_loss_after"] < metrics["sft/eval_loss_before"]
    assert metrics["sft/eval_loss_drop"] >= 0.20


def test_02_sft_learns_to_end_its_turn(metrics):
    assert metrics["base/ends_turn_rate"] <= 0.10
    assert metrics["sft/ends_turn_rate"] >= 0.80
    assert metrics["sft/p_end_of_turn"] > 10 * metrics["base/p_end_of_turn"]


def test_02_saved_adapter_and_manifest(course):
    manifest = report.read_manifest(course, "sft", made_by="notebook 02")
    assert (Path(manifest["adapter_dir"]) / "adapter_model.safetensors").exists()
    assert (course / "plots" / "sft_loss.png").exists() and (course / "plots" / "memory_by_method.png").exists()


def test_02_computes_in_the_precision_auto_picks_on_this_processor(course):
    """bf16 where the processor has it natively, else fp32: in the profile, the SFT config and the 4-bit layers."""
    manifest = report.read_manifest(course, "sft", made_by="notebook 02")
    dtype = choose_compute_dtype("auto")[0]
    assert manifest["profile"]["compute_dtype"] == dtype
    assert manifest["configs"]["quantization"]["bnb_4bit_compute_dtype"] == dtype
    assert manifest["configs"]["sft"]["bf16"] is (dtype == "bfloat16")


def test_03_preference_data_and_plots(metrics, course):
    assert metrics["prefs/train_prefs_rows"] >= 300 and metrics["prefs/test_prefs_rows"] >= 60
    assert metrics["prefs/truncated_share"] <= 0.05
    for name in ("pref_scores", "pref_margins", "pref_lengths"):
        assert (course / "plots" / f"{name}.png").exists()


def test_04_step0_is_ln2_with_zero_rewards(metrics):
    assert metrics["dpo/loss_step0"] == pytest.approx(math.log(2), abs=1e-3)
    assert metrics["dpo/rewards_abs_step0"] < 1e-3
    assert abs(metrics["dpo/wrong_reference_loss"] - math.log(2)) > 1e-3


def test_04_merge_is_exact(metrics):
    assert metrics["dpo/merge_max_logit_diff"] < 1e-3


def test_04_dpo_learns_the_preferences(metrics):
    assert metrics["dpo/eval_accuracy"] >= 0.75
    assert metrics["dpo/eval_margin"] > 0
    assert metrics["dpo/pref_acc_per_token"] > metrics["sft/pref_acc_per_token"]


def test_04_dpo_declines_more_harmful_prompts_and_no_more_benign(metrics, course):
    """The seed's promise on 25 held-out harmful and 25 benign prompts, judged by a rule measured to be accurate."""
    assert metrics["declines/rule_accuracy"] >= 0.9
    assert metrics["dpo/declines_harmful"] > metrics["sft/declines_harmful"]
    assert metrics["dpo/declines_benign"] <= metrics["sft/declines_benign"]
    assert (course / "plots" / "decline_rates.png").exists()
    assert (course / "plots" / "frontier.png").exists()  # make bench-frontier's settings, this run placed among them


def test_04_saved_models(course):
    manifest = report.read_manifest(course, "dpo", made_by="notebook 04")
    assert (Path(manifest["merged_dir"]) / "model.safetensors").exists()
    assert (course / "plots" / "dpo_metrics.png").exists()


EXERCISE_FILES = ["01_chat_template/chat_template.jinja", "02_lora_attention_only/trainable.json",
                  "03_my_pairs/train_prefs.jsonl", "04_my_dpo_config/dpo_config.json"]


def test_every_exercise_stub_ran_and_wrote_to_a_folder_of_its_own(course):
    """Issue 24: the stubs run under papermill without training, each into <out>/exercises/<its name>/."""
    assert [f for f in EXERCISE_FILES if not (course / "exercises" / f).is_file()] == []
    counts = json.loads((course / "exercises" / EXERCISE_FILES[1]).read_text())
    assert 0 < counts["yours"]["trainable"] <= counts["course"]["trainable"]
    assert not list((course / "exercises").rglob("checkpoint-*")), "a stub trained without EXERCISE_TRAIN"


def recipe_differences(out_dir: Path, stage: str) -> list[str]:
    """Where the configs notebook 02 or 04 wrote by hand (its manifest) differ from the recipes for its profile."""
    manifest = report.read_manifest(out_dir, stage, made_by=f"notebook {'02' if stage == 'sft' else '04'}")
    profile = Profile(**manifest["profile"])
    out = out_dir / stage / "checkpoints"
    recipe = (recipes.sft_recipe(profile, models.load_tokenizer(profile), out) if stage == "sft"
              else recipes.dpo_recipe(profile, out))
    return recipes.differences(manifest["configs"], recipe)


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_notebooks_train_with_the_scripts_recipe(course, stage):
    """02 and 04 write their configs by hand; scripts/ build them with utils/recipes.py: they must agree."""
    assert recipe_differences(course, stage) == []


# ----------------------------------------------------------------------------------------------------------------
# The rtx4090 path on the CPU: rtx4090's settings on a tiny random Gemma and a few shipped rows (about a minute each)
# ----------------------------------------------------------------------------------------------------------------

DRY_RUN_NOTEBOOKS = ["01", "02", "03", "04"]


@pytest.fixture(scope="session")
def dry_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dry_run")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_HUB_OFFLINE", "1")  # the profile's trackio dashboard stays local
        code = run.run_course(DRY_RUN, out, only=DRY_RUN_NOTEBOOKS)
    assert code == 0, f"a notebook failed; see {out}/summary.md"
    return out


def test_dry_run_executed_its_notebooks(dry_run):
    assert (dry_run / "summary.md").read_text().count("| ok |") == len(DRY_RUN_NOTEBOOKS)
    assert list((dry_run / "trackio").glob("*.db")), "rtx4090's live dashboard (trackio) was not written"


def test_dry_run_02_trained_with_the_gpu_profiles_settings(dry_run):
    manifest = report.read_manifest(dry_run, "sft", made_by="notebook 02")
    check_trained_like_rtx4090(manifest, "sft")
    assert (Path(manifest["adapter_dir"]) / "adapter_model.safetensors").exists()
    assert list((dry_run / "sft" / "checkpoints").glob("checkpoint-*"))


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_dry_run_notebooks_train_with_the_scripts_recipe(dry_run, stage):
    assert recipe_differences(dry_run, stage) == []


def test_dry_run_04_trained_and_merged_with_the_gpu_profiles_settings(dry_run):
    """Notebook 04 in the dry run: DPO at batch 1 x 16, bf16 merges of both adapters."""
    manifest = report.read_manifest(dry_run, "dpo", made_by="notebook 04")
    check_trained_like_rtx4090(manifest, "dpo")
    assert stored_dtypes(dry_run / "sft" / "merged") == stored_dtypes(Path(manifest["merged_dir"])) == {"BF16"}
