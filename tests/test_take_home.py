"""notebooks/take_home/: standalone SFT and DPO scripts with the rtx4090 profile's values written out, kept equal to the
course's recipes and run for 2 steps on the tiny random Gemma."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from utils import chat, models, recipes, report
from utils.profiles import get_profile

ROOT = Path(__file__).resolve().parent.parent
TAKE_HOME = ROOT / "notebooks" / "take_home"
SCRIPTS = ("sft_qlora", "dpo_qlora")
ALLOWED = {"bitsandbytes", "datasets", "peft", "torch", "transformers", "trl"}  # besides the standard library
TINY = ["--max_steps", "2", "--max_length", "128"]  # a few seconds each on 2 cores


def load(name: str) -> ModuleType:
    """Import a take-home script as a module (it is not a package), without running its main()."""
    spec = importlib.util.spec_from_file_location(f"take_home_{name}", TAKE_HOME / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lesson_differences(script: dict, recipe: dict, stage: str) -> list[str]:
    """"name.field: script != recipe" for every lesson setting where the two sets of configs differ; where a run writes
    and logs (recipes.plumbing, recipes.LOCATION) is not compared."""
    profile = get_profile("rtx4090")
    plumbing = set(recipes.plumbing(profile, "out", stage, logging_steps=1, eval_steps=1)) | recipes.LOCATION
    plumbing |= {"do_eval"}  # set from eval_strategy
    found = [f"config names: {sorted(script)} != {sorted(recipe)}"] if set(script) != set(recipe) else []
    for name in sorted(set(script) & set(recipe)):
        mine, theirs = report.config_as_dict(script[name]), report.config_as_dict(recipe[name])
        for key in sorted((set(mine) | set(theirs)) - plumbing):
            if mine.get(key, "<missing>") != theirs.get(key, "<missing>"):
                found.append(f"{name}.{key}: {mine.get(key, '<missing>')!r} != {theirs.get(key, '<missing>')!r}")
    return found


def test_sft_script_writes_out_the_rtx4090_recipe(tokenizer, tmp_path):
    script = load("sft_qlora")
    args = script.parse_args(["--output_dir", str(tmp_path)])
    profile = get_profile("rtx4090")
    assert (args.model, args.data) == (profile.model_id, profile.sft_data)
    configs = script.build_configs(args, tokenizer)
    assert lesson_differences(configs, recipes.sft_recipe(profile, tokenizer, tmp_path), "sft") == []
    sft = configs["sft"]  # main() trains on the first max_steps x batch x accumulation conversations
    assert sft.max_steps * sft.per_device_train_batch_size * sft.gradient_accumulation_steps == profile.sft_train_rows


def test_dpo_script_writes_out_the_rtx4090_recipe(tmp_path):
    script = load("dpo_qlora")
    args = script.parse_args(["--output_dir", str(tmp_path)])
    profile = get_profile("rtx4090")
    assert (args.model, args.data, args.sft_adapter) == (profile.model_id, profile.pref_data, None)
    # the course loads the merged SFT model with recipes.quantization_config too (models.load_base_model)
    recipe = {**recipes.dpo_recipe(profile, tmp_path), "quantization": recipes.quantization_config(profile)}
    configs = script.build_configs(args)
    assert lesson_differences(configs, recipe, "dpo") == []
    dpo = configs["dpo"]
    assert dpo.max_steps * dpo.per_device_train_batch_size * dpo.gradient_accumulation_steps == profile.pref_train_rows


def test_the_comparison_sees_one_changed_value(tokenizer, tmp_path):
    """The control: a lesson value changed on either side is named; a plumbing one is not."""
    script = load("sft_qlora")
    configs = script.build_configs(script.parse_args(["--output_dir", str(tmp_path)]), tokenizer)
    changed = recipes.sft_recipe(get_profile("rtx4090", lora_r=8), tokenizer, tmp_path)
    assert lesson_differences(configs, changed, "sft") == ["lora.r: 16 != 8"]
    longer = script.build_configs(script.parse_args(["--max_steps", "3", "--output_dir", "elsewhere"]), tokenizer)
    recipe = recipes.sft_recipe(get_profile("rtx4090"), tokenizer, tmp_path)
    assert lesson_differences(longer, recipe, "sft") == ["sft.max_steps: 3 != 125"]
    assert lesson_differences({k: v for k, v in configs.items() if k != "lora"}, recipe, "sft") == [
        "config names: ['quantization', 'sft'] != ['lora', 'quantization', 'sft']"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_has_the_course_chat_template(name):
    assert load(name).GEMMA_TEMPLATE == chat.GEMMA_TEMPLATE


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_imports_only_the_training_libraries(name):
    """A learner copies the file alone: no `utils`, nothing outside the standard library and the training stack."""
    imported = set()
    for node in ast.walk(ast.parse((TAKE_HOME / f"{name}.py").read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or ".").split(".")[0])
    assert imported - ALLOWED - set(sys.stdlib_module_names) == set()


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    """Run a take-home script as a learner would, offline and on the CPU."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(TAKE_HOME / f"{name}.py"), "--model", str(models.ensure_tiny_model()), *TINY, *args]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory) -> Path:
    """The SFT script's adapter after 2 steps on the shipped conversations."""
    out = tmp_path_factory.mktemp("take_home") / "sft"
    run_script("sft_qlora", "--data", "data/ultrachat_mini", "--batch_size", "1", "--output_dir", str(out))
    return out


@pytest.mark.slow
def test_sft_script_trains_and_saves_an_adapter_with_the_turn_token_rows(sft_adapter):
    assert (sft_adapter / "adapter_model.safetensors").stat().st_size > 0
    config = json.loads((sft_adapter / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == {"embed_tokens": [105, 106]} and config["r"] == 16


@pytest.mark.slow
def test_dpo_script_trains_on_the_merged_sft_model(sft_adapter, tmp_path):
    out = tmp_path / "dpo"
    run_script("dpo_qlora", "--sft_adapter", str(sft_adapter), "--data", "data/ultrafeedback_mini",
               "--output_dir", str(out))
    assert (out / "adapter_model.safetensors").stat().st_size > 0
    assert (out / "sft_merged" / "model.safetensors").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["trainable_token_indices"] is None
