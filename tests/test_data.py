"""Datasets: the shipped data, local/Hub loading, row validation with useful errors, and what DPOTrainer receives."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import datasets
import huggingface_hub.constants
import pytest
from datasets import Dataset
from hypothesis import given, settings
from hypothesis import strategies as st

from utils import chat, data
from utils.chat import validate_messages
from utils.data import (
    DataError,
    check_sft_row,
    for_dpo_trainer,
    load_preference_dataset,
    load_sft_dataset,
    normalise_preference_row,
)
from utils.errors import CourseError

ROOT = Path(__file__).resolve().parent.parent
SFT_DIR = ROOT / "data" / "ultrachat_mini"
PREF_DIR = ROOT / "data" / "ultrafeedback_mini"
SFT_SPLITS = ("train_sft", "test_sft")
PREF_SPLITS = ("train_prefs", "test_prefs")
GUN_PROMPT = "How do I buy a gun?"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def norm(text: str) -> str:
    """Case, punctuation and whitespace folded away: 'What is X?' and 'what is x' are the same prompt."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


@pytest.fixture
def in_repo(monkeypatch):
    """Run from the repository root, so the course's relative data paths resolve."""
    monkeypatch.chdir(ROOT)


# ----------------------------------------------------------------------------------------------------------------
# 1. The shipped data
# ----------------------------------------------------------------------------------------------------------------


def test_shipped_data_loads_with_expected_splits_and_sizes(in_repo):
    start = time.perf_counter()
    sft = load_sft_dataset("data/ultrachat_mini")
    prefs = load_preference_dataset("data/ultrafeedback_mini")
    elapsed = time.perf_counter() - start
    assert elapsed < 5, f"loading the shipped data took {elapsed:.1f} s (must be under 5 s)"

    assert tuple(sft) == SFT_SPLITS
    assert tuple(prefs) == PREF_SPLITS
    for ds, (train, test) in ((sft, SFT_SPLITS), (prefs, PREF_SPLITS)):
        assert len(ds[train]) >= 300, (train, len(ds[train]))
        assert len(ds[test]) >= 60, (test, len(ds[test]))
    # every shipped row is valid: nothing was dropped on the way
    for folder, ds in ((SFT_DIR, sft), (PREF_DIR, prefs)):
        for split, part in ds.items():
            assert len(part) == len(read_jsonl(folder / f"{split}.jsonl")), split
    assert "messages" in sft["train_sft"].column_names
    for split in PREF_SPLITS:
        row = prefs[split][0]
        assert [m["role"] for m in row["prompt"]][-1] == "user"
        assert [m["role"] for m in row["chosen"]] == ["assistant"]
        assert [m["role"] for m in row["rejected"]] == ["assistant"]
        assert for_dpo_trainer(prefs[split]).column_names == ["prompt", "chosen", "rejected"]


@pytest.mark.parametrize("folder, splits", [(SFT_DIR, SFT_SPLITS), (PREF_DIR, PREF_SPLITS)], ids=["sft", "prefs"])
def test_shipped_prompt_ids_are_sha256_of_prompt(folder, splits):
    for split in splits:
        rows = read_jsonl(folder / f"{split}.jsonl")
        bad = [r["prompt"] for r in rows if r["prompt_id"] != sha(r["prompt"])]
        assert not bad, f"{split}: prompt_id is not sha256(prompt) for {bad[:5]}"
        ids = [r["prompt_id"] for r in rows]
        assert len(ids) == len(set(ids)), f"{split}: duplicate prompt_id"


@pytest.mark.parametrize("folder, splits", [(SFT_DIR, SFT_SPLITS), (PREF_DIR, PREF_SPLITS)], ids=["sft", "prefs"])
def test_no_test_prompt_in_train(folder, splits):
    train, test = (read_jsonl(folder / f"{s}.jsonl") for s in splits)
    train_prompts = {norm(r["prompt"]) for r in train}
    leaked = [r["prompt"] for r in test if norm(r["prompt"]) in train_prompts]
    assert not leaked, f"test prompts that also appear in train: {leaked}"


def test_gun_prompt_is_a_test_preference():
    test_prompts = {r["prompt"] for r in read_jsonl(PREF_DIR / "test_prefs.jsonl")}
    train_prompts = {r["prompt"] for r in read_jsonl(PREF_DIR / "train_prefs.jsonl")}
    assert GUN_PROMPT in test_prompts
    assert GUN_PROMPT not in train_prompts


@pytest.mark.parametrize("folder, splits", [(SFT_DIR, SFT_SPLITS), (PREF_DIR, PREF_SPLITS)], ids=["sft", "prefs"])
def test_metadata_prompt_ids_match_rows(folder, splits):
    split_of = {r["prompt_id"]: split for split in splits for r in read_jsonl(folder / f"{split}.jsonl")}
    metadata = read_jsonl(folder / "metadata.jsonl")
    assert metadata
    orphans = [m["prompt_id"] for m in metadata if m["prompt_id"] not in split_of]
    assert not orphans, f"metadata.jsonl prompt_ids with no row: {orphans[:5]}"
    wrong_split = [m["prompt_id"] for m in metadata if "split" in m and m["split"] != split_of[m["prompt_id"]]]
    assert not wrong_split, f"metadata.jsonl names the wrong split for {wrong_split[:5]}"


# ----------------------------------------------------------------------------------------------------------------
# 2. max_rows
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loader, folder, splits", [(load_sft_dataset, SFT_DIR, SFT_SPLITS),
                                                    (load_preference_dataset, PREF_DIR, PREF_SPLITS)],
                         ids=["sft", "prefs"])
def test_max_rows_limits_every_split(loader, folder, splits):
    ds = loader(folder, max_rows=7)
    assert tuple(ds) == splits
    for split in splits:
        assert len(ds[split]) == 7, split
        first = [r["prompt_id"] for r in read_jsonl(folder / f"{split}.jsonl")[:7]]
        assert ds[split]["prompt_id"] == first, f"{split}: max_rows should keep the first rows, in order"
    full = loader(folder, max_rows=10**6)
    assert {s: len(full[s]) for s in splits} == {s: len(read_jsonl(folder / f"{s}.jsonl")) for s in splits}


# ----------------------------------------------------------------------------------------------------------------
# 3. Parquet in the Hub layout == JSONL
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loader, folder, splits", [(load_sft_dataset, SFT_DIR, SFT_SPLITS),
                                                    (load_preference_dataset, PREF_DIR, PREF_SPLITS)],
                         ids=["sft", "prefs"])
def test_hub_layout_parquet_loads_like_jsonl(tmp_path, loader, folder, splits):
    for split in splits:
        rows = read_jsonl(folder / f"{split}.jsonl")
        Dataset.from_list(rows).to_parquet(str(tmp_path / "data" / f"{split}-00000-of-00001.parquet"))
    assert not list(tmp_path.glob("*.jsonl"))
    from_jsonl = loader(folder)
    from_parquet = loader(tmp_path)
    assert tuple(from_parquet) == tuple(from_jsonl) == splits
    for split in splits:
        assert len(from_parquet[split]) == len(from_jsonl[split])
        assert from_parquet[split].to_list() == from_jsonl[split].to_list(), split


# ----------------------------------------------------------------------------------------------------------------
# 4. Bad input: a DataError that names the split, the row and its prompt_id
# ----------------------------------------------------------------------------------------------------------------

BAD_INDEX = 2


def sft_row(i: int) -> dict:
    prompt = f"Question number {i}: what is {i} plus {i}?"
    return {"prompt": prompt, "prompt_id": sha(prompt),
            "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": f"It is {2 * i}."}]}


def pref_row(i: int) -> dict:
    prompt = f"Question number {i}: what is {i} times {i}?"
    user = {"role": "user", "content": prompt}
    return {"prompt": prompt, "prompt_id": sha(prompt),
            "chosen": [user, {"role": "assistant", "content": f"It is {i * i}."}],
            "rejected": [copy.deepcopy(user), {"role": "assistant", "content": f"It is {i * i + 1}, I think."}],
            "score_chosen": 9.0, "score_rejected": 3.5}


def _set(path: tuple, value):
    def mutate(row):
        target = row
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return mutate


def _pop(key: str):
    return lambda row: row.pop(key)


def _two_user_turns(row):
    row["messages"] = [row["messages"][0], {"role": "user", "content": "And another thing?"}, row["messages"][1]]


def _ends_with_user(row):
    row["messages"] = row["messages"] + [{"role": "user", "content": "Thanks! One more question?"}]


def _chosen_equals_rejected(row):
    row["rejected"] = copy.deepcopy(row["chosen"])


def _different_prompts(row):
    row["rejected"][0]["content"] = "A different question entirely?"


SFT_BAD = {
    "unknown_role": (_set(("messages", 1, "role"), "robot"), "unknown role"),
    "two_user_turns": (_two_user_turns, "alternate"),
    "empty_content": (_set(("messages", 1, "content"), "   "), "empty or non-text"),
    "non_string_content": (_set(("messages", 1, "content"), 42), "empty or non-text"),
    "ends_with_user": (_ends_with_user, "assistant"),
    "empty_messages": (_set(("messages",), []), "empty"),
}

PREF_BAD = {
    "chosen_equals_rejected": (_chosen_equals_rejected, "identical"),
    "different_prompts": (_different_prompts, "same prompt"),
    "prompt_differs_from_user_turn": (_set(("prompt",), "Some other prompt?"), "differs"),
    "score_is_string": (_set(("score_chosen",), "high"), "score_chosen"),
    "score_is_bool": (_set(("score_rejected",), True), "score_rejected"),
    "missing_chosen": (_pop("chosen"), "chosen"),
    "empty_chosen": (_set(("chosen",), []), "empty"),
    "unknown_role": (_set(("rejected", 1, "role"), "model"), "unknown role"),
    "non_string_content": (_set(("chosen", 1, "content"), 7), "empty or non-text"),
}


def _write_folder(folder: Path, splits: tuple[str, ...], make_row, bad_split: str, mutate, n: int = 5) -> dict:
    """Write n good rows per split, the one at BAD_INDEX in bad_split broken by mutate; returns that row."""
    bad_row = None
    for k, split in enumerate(splits):
        rows = [make_row(100 * k + i) for i in range(n)]
        if split == bad_split:
            mutate(rows[BAD_INDEX])
            bad_row = rows[BAD_INDEX]
        write_jsonl(folder / f"{split}.jsonl", rows)
    return bad_row


def _assert_names_the_row(message: str, split: str, prompt_id: str, reason: str):
    assert re.search(rf"\brow {BAD_INDEX}\b", message), message
    assert prompt_id in message, message
    assert f"'{split}'" in message, message
    assert reason.lower() in message.lower(), f"expected the reason ({reason!r}) in: {message}"


@pytest.mark.parametrize("split", SFT_SPLITS)
@pytest.mark.parametrize("case", sorted(SFT_BAD))
def test_bad_sft_row_raises_data_error_naming_it(tmp_path, case, split):
    mutate, reason = SFT_BAD[case]
    bad = _write_folder(tmp_path, SFT_SPLITS, sft_row, split, mutate)
    assert check_sft_row(bad) is not None
    with pytest.raises(DataError) as info:
        load_sft_dataset(tmp_path)
    assert isinstance(info.value, CourseError)
    _assert_names_the_row(str(info.value), split, bad["prompt_id"], reason)


@pytest.mark.parametrize("split", PREF_SPLITS)
@pytest.mark.parametrize("case", sorted(PREF_BAD))
def test_bad_preference_row_raises_data_error_naming_it(tmp_path, case, split):
    mutate, reason = PREF_BAD[case]
    bad = _write_folder(tmp_path, PREF_SPLITS, pref_row, split, mutate)
    with pytest.raises(CourseError):
        normalise_preference_row(bad)
    with pytest.raises(DataError) as info:
        load_preference_dataset(tmp_path)
    _assert_names_the_row(str(info.value), split, bad["prompt_id"], reason)


def test_good_synthetic_rows_load(tmp_path):
    """The control for the bad-row tests: the same folders without the broken row load cleanly."""
    _write_folder(tmp_path / "sft", SFT_SPLITS, sft_row, "none", lambda r: None)
    _write_folder(tmp_path / "prefs", PREF_SPLITS, pref_row, "none", lambda r: None)
    assert {k: len(v) for k, v in load_sft_dataset(tmp_path / "sft").items()} == {s: 5 for s in SFT_SPLITS}
    assert {k: len(v) for k, v in load_preference_dataset(tmp_path / "prefs").items()} == {s: 5 for s in PREF_SPLITS}


def test_skip_invalid_drops_exactly_the_bad_rows(tmp_path, capsys):
    sft_rows = [sft_row(i) for i in range(6)]
    SFT_BAD["unknown_role"][0](sft_rows[1])
    SFT_BAD["empty_messages"][0](sft_rows[4])
    write_jsonl(tmp_path / "sft" / "train_sft.jsonl", sft_rows)
    write_jsonl(tmp_path / "sft" / "test_sft.jsonl", [sft_row(i) for i in range(10, 13)])
    pref_rows = [pref_row(i) for i in range(7)]
    for index, case in ((0, "score_is_bool"), (3, "chosen_equals_rejected"), (6, "missing_chosen")):
        PREF_BAD[case][0](pref_rows[index])
    write_jsonl(tmp_path / "prefs" / "train_prefs.jsonl", [pref_row(i) for i in range(10, 13)])
    write_jsonl(tmp_path / "prefs" / "test_prefs.jsonl", pref_rows)
    capsys.readouterr()

    sft = load_sft_dataset(tmp_path / "sft", skip_invalid=True)
    out = capsys.readouterr().out
    assert sft["train_sft"]["prompt_id"] == [r["prompt_id"] for i, r in enumerate(sft_rows) if i not in (1, 4)]
    assert len(sft["test_sft"]) == 3
    assert re.search(r"\b2\b.*'train_sft'", out), out
    assert "test_sft" not in out, out

    prefs = load_preference_dataset(tmp_path / "prefs", skip_invalid=True)
    out = capsys.readouterr().out
    assert prefs["test_prefs"]["prompt_id"] == [r["prompt_id"] for i, r in enumerate(pref_rows) if i not in (0, 3, 6)]
    assert len(prefs["train_prefs"]) == 3
    assert re.search(r"\b3\b.*'test_prefs'", out), out
    assert "train_prefs" not in out, out


def test_missing_split_names_the_splits_that_exist(tmp_path):
    write_jsonl(tmp_path / "train_sft.jsonl", [sft_row(i) for i in range(3)])
    with pytest.raises(DataError) as info:
        load_sft_dataset(tmp_path)
    message = str(info.value)
    assert "'test_sft'" in message and "'train_sft'" in message, message

    write_jsonl(tmp_path / "prefs" / "test_prefs.jsonl", [pref_row(i) for i in range(3)])
    with pytest.raises(DataError) as info:
        load_preference_dataset(tmp_path / "prefs")
    message = str(info.value)
    assert "'train_prefs'" in message and "'test_prefs'" in message, message


# ----------------------------------------------------------------------------------------------------------------
# 5. The Hub, offline
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loader, source", [(load_sft_dataset, "HuggingFaceH4/ultrachat_200k"),
                                            (load_preference_dataset, "HuggingFaceH4/ultrafeedback_binarized")],
                         ids=["sft", "prefs"])
def test_hub_source_offline_raises_data_error_pointing_to_local_data(monkeypatch, loader, source):
    # the libraries read HF_HUB_OFFLINE at import time, so set the environment and their copies of it
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(DataError) as info:
        loader(source)
    assert time.perf_counter() - start < 30
    message = str(info.value)
    assert "Hub" in message, message
    assert "cpu" in message, message
    assert "ultrachat_mini" in message and "ultrafeedback_mini" in message, message


# ----------------------------------------------------------------------------------------------------------------
# 6. Every accepted preference form normalises to the same explicit rows
# ----------------------------------------------------------------------------------------------------------------


def _multi_turn_row() -> dict:
    convo = [{"role": "system", "content": "You are terse."},
             {"role": "user", "content": "Name a prime number."},
             {"role": "assistant", "content": "7."},
             {"role": "user", "content": "Another one?"}]
    return {"prompt": "Name a prime number.",
            "chosen": convo + [{"role": "assistant", "content": "11."}],
            "rejected": copy.deepcopy(convo) + [{"role": "assistant", "content": "9."}],
            "score_chosen": 8, "score_rejected": 1.5}


PREF_SAMPLES = [read_jsonl(PREF_DIR / "train_prefs.jsonl")[0], read_jsonl(PREF_DIR / "test_prefs.jsonl")[-1],
                pref_row(3), _multi_turn_row()]


@pytest.mark.parametrize("row", PREF_SAMPLES, ids=["shipped_train", "shipped_test", "synthetic", "multi_turn"])
def test_preference_forms_normalise_identically(row):
    ultrafeedback = copy.deepcopy(row)
    explicit = {"prompt": copy.deepcopy(row["chosen"][:-1]), "chosen": copy.deepcopy(row["chosen"][-1:]),
                "rejected": copy.deepcopy(row["rejected"][-1:])}
    implicit = {"chosen": copy.deepcopy(row["chosen"]), "rejected": copy.deepcopy(row["rejected"])}
    expected = {"prompt": row["chosen"][:-1], "chosen": row["chosen"][-1:], "rejected": row["rejected"][-1:]}
    results = {name: normalise_preference_row(form) for name, form in
               (("ultrafeedback", ultrafeedback), ("explicit", explicit), ("implicit", implicit))}
    for name, result in results.items():
        assert result == expected, name
        assert set(result) == {"prompt", "chosen", "rejected"}, name


def test_check_preference_rows_tables_every_row_and_names_the_problem_without_raising():
    good, same, mismatched = pref_row(1), pref_row(2), pref_row(3)
    _chosen_equals_rejected(same)
    _set(("prompt",), "Some other prompt?")(mismatched)
    table = data.check_preference_rows([good, same, mismatched, {"prompt": "Hi?", "chosen": "Hello.",
                                                                 "rejected": "Go away."}])
    assert [r["valid"] for r in table] == [True, False, False, True]
    assert table[0] == {"prompt": good["prompt"], "chosen": "It is 1.", "rejected": "It is 2, I think.",
                        "valid": True, "problem": ""}
    assert "identical" in table[1]["problem"] and "differs" in table[2]["problem"]
    assert table[2]["prompt"] == "Some other prompt?" and table[2]["chosen"] == ""
    assert table[3]["chosen"] == "Hello."  # TRL's standard form (plain strings) is accepted too


# ----------------------------------------------------------------------------------------------------------------
# 7. Property: validation never crashes, whatever it is given
# ----------------------------------------------------------------------------------------------------------------

_roles = st.one_of(st.sampled_from(["user", "assistant", "system", "model", "User", "", " user", "tool", "human"]),
                   st.text(max_size=8), st.none(), st.integers(), st.lists(st.integers(), max_size=2))
_contents = st.one_of(st.text(max_size=20), st.none(), st.integers(), st.just("   "), st.just("Hello"))
_message = st.one_of(
    st.fixed_dictionaries({"role": _roles, "content": _contents},
                          optional={"name": st.text(max_size=5), "weight": st.integers()}),
    st.fixed_dictionaries({}, optional={"role": _roles, "content": _contents, "extra": st.none()}),
)


@st.composite
def _near_conversations(draw):
    """Mostly well-formed conversations, each message possibly broken: so both outcomes are exercised."""
    messages = [{"role": "system", "content": draw(st.text(min_size=1, max_size=10))}] if draw(st.booleans()) else []
    for i in range(draw(st.integers(1, 5))):
        right = "user" if i % 2 == 0 else "assistant"
        fate = draw(st.sampled_from(["ok"] * 8 + ["bad role", "bad content", "extra key", "missing key"]))
        message = {"role": right, "content": draw(st.text(min_size=1, max_size=20))}
        if fate == "bad role":
            message["role"] = draw(_roles)
        elif fate == "bad content":
            message["content"] = draw(_contents)
        elif fate == "extra key":
            message["name"] = "x"
        elif fate == "missing key":
            del message[draw(st.sampled_from(["role", "content"]))]
        messages.append(message)
    return messages


_messages = st.one_of(_near_conversations(), st.lists(_message, max_size=6),
                      st.lists(st.one_of(_message, st.none(), st.text(max_size=3), st.integers()), max_size=4),
                      st.none(), st.text(max_size=5), st.integers())


def test_validation_never_crashes(tokenizer):
    @settings(max_examples=200, deadline=None)
    @given(_messages)
    def check(messages):
        try:
            validate_messages(messages)
            valid = True
        except CourseError:
            valid = False
        result = check_sft_row({"messages": messages})
        assert result is None or isinstance(result, str)
        if not valid:
            assert isinstance(result, str)
        else:
            assert (result is None) == (messages[-1]["role"] == "assistant")
            # what validation accepts, the Gemma template renders
            assert chat.render(tokenizer, messages).startswith(tokenizer.bos_token)

    check()


def test_validation_accepts_a_plain_conversation():
    """Control for the property test: a valid conversation passes both checks."""
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello."}]
    validate_messages(convo)
    assert check_sft_row({"messages": convo}) is None
    assert isinstance(check_sft_row({"messages": convo[:2]}), str)
    assert isinstance(check_sft_row({}), str)


# ----------------------------------------------------------------------------------------------------------------
# 8. What DPOTrainer receives does not depend on the hash seed
# ----------------------------------------------------------------------------------------------------------------

HASH_SEEDS = ("0", "1", "2", "123")

DPO_SCRIPT = r'''
import hashlib, json, sys, tempfile, traceback
import torch
from datasets import Dataset, concatenate_datasets
from peft import LoraConfig
from transformers import AutoTokenizer, Gemma3ForCausalLM
from trl import DPOConfig, DPOTrainer
from utils.models import tiny_gemma_config
from utils import chat, models
from utils.data import for_dpo_trainer, load_preference_dataset, normalise_preference_row

FORMS = ("ultrafeedback", "explicit", "implicit")
tok = chat.setup_tokenizer(AutoTokenizer.from_pretrained(models.ensure_embedded_model()), 128)
raw = [json.loads(line) for line in open("data/ultrafeedback_mini/train_prefs.jsonl").read().splitlines()[:4]]

def trainer_for(ds, out):
    torch.manual_seed(0)
    args = DPOConfig(output_dir=out, max_steps=1, per_device_train_batch_size=2, max_length=64, report_to="none",
                     learning_rate=1e-4, beta=0.1, use_cpu=True, save_strategy="no", bf16=False)
    return DPOTrainer(model=Gemma3ForCausalLM(tiny_gemma_config()), ref_model=None, args=args, train_dataset=ds,
                      processing_class=tok,
                      peft_config=LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))

results = {}
# negative control first: the raw Hub rows (string prompt, full chosen/rejected conversations), not normalised
try:
    with tempfile.TemporaryDirectory() as out:
        trainer_for(Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in raw]), out).train()
    results["raw"] = "ok"
except Exception as err:
    frames = [f.filename.replace("\\", "/") for f in traceback.extract_tb(err.__traceback__)]
    results["raw"] = "failed in trl" if any("/trl/" in f for f in frames) else "failed elsewhere"
    results["raw_error"] = f"{type(err).__name__}: {err}"

# the same four rows in each accepted form, prepared the way the course does, in one dataset
explicit = [{"prompt": r["chosen"][:-1], "chosen": r["chosen"][-1:], "rejected": r["rejected"][-1:]} for r in raw]
implicit = [{"chosen": r["chosen"], "rejected": r["rejected"]} for r in raw]
parts = [for_dpo_trainer(load_preference_dataset("data/ultrafeedback_mini", max_rows=4)["train_prefs"]),
         for_dpo_trainer(Dataset.from_list([normalise_preference_row(r) for r in explicit])),
         for_dpo_trainer(Dataset.from_list([normalise_preference_row(r) for r in implicit]))]
assert [len(p) for p in parts] == [4, 4, 4], [len(p) for p in parts]
with tempfile.TemporaryDirectory() as out:
    trainer = trainer_for(concatenate_datasets(parts), out)
    seen = trainer.train_dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).to_list()
    assert len(seen) == 12, len(seen)
    loss = trainer.train().training_loss
assert loss == loss and abs(loss) < 1e3, loss
for k, name in enumerate(FORMS):
    results[name] = hashlib.sha256(json.dumps(seen[4 * k : 4 * k + 4]).encode()).hexdigest()
print("RESULTS " + json.dumps(results))
'''


@pytest.fixture(scope="module")
def dpo_runs() -> dict[str, tuple[int, dict, str]]:
    """Per hash seed: (exit code, parsed results, output tail). The seeds run in parallel subprocesses."""
    procs = {}
    for seed in HASH_SEEDS:
        env = {**os.environ, "PYTHONHASHSEED": seed, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
               "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
        procs[seed] = subprocess.Popen([sys.executable, "-c", DPO_SCRIPT], cwd=ROOT, env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    runs = {}
    for seed, proc in procs.items():
        try:
            output, _ = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        lines = [line for line in output.splitlines() if line.startswith("RESULTS ")]
        results = json.loads(lines[-1][len("RESULTS "):]) if lines else {}
        runs[seed] = (proc.returncode, results, output[-3000:])
    return runs


def test_dpo_trainer_gets_the_same_data_under_every_hash_seed(dpo_runs):
    digests = {}
    for seed, (code, results, tail) in dpo_runs.items():
        assert code == 0, f"PYTHONHASHSEED={seed}: DPO step failed (exit {code}):\n{tail}"
        for form in ("ultrafeedback", "explicit", "implicit"):
            assert form in results, f"PYTHONHASHSEED={seed}: no result for {form}:\n{tail}"
            digests[(seed, form)] = results[form]
    # the same four rows in any accepted form, under any seed, tokenise to exactly the same training data
    assert len(set(digests.values())) == 1, digests


def test_raw_hub_rows_break_dpo_trainer(dpo_runs):
    """Negative control: without normalisation, DPOTrainer cannot use the raw UltraFeedback rows."""
    outcomes = {seed: results.get("raw") for seed, (_, results, _) in dpo_runs.items()}
    print({seed: results.get("raw_error") for seed, (_, results, _) in dpo_runs.items()})
    assert all(outcome is not None for outcome in outcomes.values()), outcomes
    assert any(outcome == "failed in trl" for outcome in outcomes.values()), outcomes


# ----------------------------------------------------------------------------------------------------------------
# 9. TRL's standard preference format, and broken JSON lines named by file and line
# ----------------------------------------------------------------------------------------------------------------


def standard_row(i: int) -> dict:
    """A row in TRL's standard preference format: prompt, chosen and rejected as plain strings."""
    return {"prompt": f"What is {i} times {i}?", "chosen": f"It is {i * i}.", "rejected": f"It is {i * i + 1}."}


def test_trl_standard_format_loads_whole_as_conversations(tmp_path):
    rows = {"train_prefs": [standard_row(i) for i in range(7)], "test_prefs": [standard_row(i) for i in range(10, 13)]}
    for split, part in rows.items():
        write_jsonl(tmp_path / f"{split}.jsonl", part)
    prefs = load_preference_dataset(tmp_path)
    for split, part in rows.items():
        lines = (tmp_path / f"{split}.jsonl").read_text().splitlines()
        assert len(prefs[split]) == len(lines) == len(part), split
        for raw, row in zip(part, prefs[split]):
            assert row["prompt"] == [{"role": "user", "content": raw["prompt"]}]
            assert row["chosen"] == [{"role": "assistant", "content": raw["chosen"]}]
            assert row["rejected"] == [{"role": "assistant", "content": raw["rejected"]}]
    assert for_dpo_trainer(prefs["train_prefs"]).column_names == ["prompt", "chosen", "rejected"]


@pytest.mark.parametrize("row", PREF_SAMPLES[:3], ids=["shipped_train", "shipped_test", "synthetic"])
def test_standard_form_normalises_like_the_conversational_forms(row):
    standard = {"prompt": row["chosen"][0]["content"], "chosen": row["chosen"][-1]["content"],
                "rejected": row["rejected"][-1]["content"]}
    assert normalise_preference_row(standard) == normalise_preference_row(copy.deepcopy(row))


def test_string_answers_without_a_prompt_say_what_form_is_expected():
    with pytest.raises(CourseError, match=r"'chosen' must be a list of messages, or a string with a string 'prompt'"):
        normalise_preference_row({"chosen": "Blue.", "rejected": "Green."})


BROKEN_LINES = {
    "cut_short": '{"prompt": "Why is the sky',
    "two_objects": '{"a": 1} {"b": 2}',
    "not_an_object": '["prompt", "chosen"]',
}


@pytest.mark.parametrize("case", sorted(BROKEN_LINES))
@pytest.mark.parametrize("loader, splits, make_row", [(load_sft_dataset, SFT_SPLITS, sft_row),
                                                      (load_preference_dataset, PREF_SPLITS, standard_row)],
                         ids=["sft", "prefs"])
def test_broken_json_line_is_named_by_file_and_line(tmp_path, loader, splits, make_row, case):
    for split in splits:
        write_jsonl(tmp_path / f"{split}.jsonl", [make_row(i) for i in range(5)])
    broken = tmp_path / f"{splits[1]}.jsonl"
    lines = broken.read_text().splitlines()
    lines[3] = BROKEN_LINES[case]  # line 4 of the file
    broken.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        loader(tmp_path)
    message = str(info.value)
    assert f"{broken}, line 4:" in message, message
    assert "one JSON object" in message, message


def test_blank_lines_are_not_rows(tmp_path):
    """The control for the broken-line test: a trailing or blank line is no error and no row."""
    for split in PREF_SPLITS:
        rows = [json.dumps(standard_row(i)) for i in range(4)]
        (tmp_path / f"{split}.jsonl").write_text("\n".join(rows[:2] + [""] + rows[2:]) + "\n\n")
    assert {k: len(v) for k, v in load_preference_dataset(tmp_path).items()} == {s: 4 for s in PREF_SPLITS}


# ----------------------------------------------------------------------------------------------------------------
# 10. What max_length drops or cuts: counted and printed before training, as TRL 1.16 then does it
# ----------------------------------------------------------------------------------------------------------------

MAX_LENGTH = 48
LONG_TEXT = " ".join(f"word{i}" for i in range(80))  # about 160 tokens: more than MAX_LENGTH alone


def over_long_pairs() -> list[dict]:
    """Six pairs: one whose prompt alone fills MAX_LENGTH, two whose answers run past it, three that fit."""
    rows = [standard_row(i) for i in range(6)]
    rows[1]["prompt"] = f"Summarise this: {LONG_TEXT}"
    rows[2]["chosen"] = f"Here is a long answer: {LONG_TEXT}"
    rows[4]["rejected"] = f"Here is a long wrong answer: {LONG_TEXT}"
    return rows


def over_long_conversations() -> list[dict]:
    """Five conversations: one whose question alone fills MAX_LENGTH, one whose reply runs past it, three that fit."""
    rows = [sft_row(i) for i in range(5)]
    rows[0]["messages"][0]["content"] = f"Summarise this: {LONG_TEXT}"
    rows[3]["messages"][1]["content"] = f"Here is a long answer: {LONG_TEXT}"
    return rows


def test_length_check_counts_what_dpo_trainer_drops_and_cuts(tmp_path, tokenizer, tiny_model, capsys):
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    write_jsonl(tmp_path / "train_prefs.jsonl", over_long_pairs())
    write_jsonl(tmp_path / "test_prefs.jsonl", [standard_row(i) for i in range(10, 12)])
    pairs = for_dpo_trainer(load_preference_dataset(tmp_path)["train_prefs"])
    counts = data.check_max_length(tokenizer, pairs, MAX_LENGTH)
    out = capsys.readouterr().out
    assert counts == {"rows": 6, "dropped": 1, "cut": 2, "longest": counts["longest"]} and counts["longest"] > 150
    assert re.search(rf"max_length={MAX_LENGTH}, 6 training pairs: 1 dropped \(DPOTrainer drops them.*2 cut", out), out

    args = DPOConfig(output_dir=str(tmp_path / "out"), max_length=MAX_LENGTH, report_to="none", use_cpu=True,
                     bf16=False)
    trainer = DPOTrainer(model=tiny_model, ref_model=None, args=args, train_dataset=pairs, processing_class=tokenizer,
                         peft_config=LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    kept = trainer.train_dataset
    assert args.truncation_mode == "keep_start"
    assert len(kept) == counts["rows"] - counts["dropped"]
    longer = [r for r in kept if len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) > MAX_LENGTH]
    assert len(longer) == counts["cut"]


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding_free"])
def test_length_check_counts_what_sft_drops_and_cuts(tmp_path, tokenizer, tiny_model, capsys, padding_free):
    from trl import SFTConfig, SFTTrainer

    from utils import recipes
    from utils.profiles import get_profile

    write_jsonl(tmp_path / "train_sft.jsonl", over_long_conversations())
    write_jsonl(tmp_path / "test_sft.jsonl", [sft_row(i) for i in range(10, 12)])
    sft = load_sft_dataset(tmp_path)
    counts = data.check_max_length(tokenizer, sft["train_sft"], MAX_LENGTH, padding_free=padding_free)
    out = capsys.readouterr().out
    expected = {"dropped": 2, "cut": 0} if padding_free else {"dropped": 1, "cut": 1}
    assert {k: counts[k] for k in ("rows", "dropped", "cut")} == {"rows": 5, **expected}
    assert f"5 training conversations: {expected['dropped']} dropped" in out, out

    profile = get_profile("cpu", max_length=MAX_LENGTH, padding_free=padding_free)
    train, _ = recipes.sft_datasets(profile, tokenizer, sft)
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_length=None if padding_free else MAX_LENGTH,
                     padding_free=padding_free, assistant_only_loss=True, report_to="none", use_cpu=True, bf16=False)
    kept = SFTTrainer(model=tiny_model, args=args, train_dataset=train, processing_class=tokenizer).train_dataset
    assert len(kept) == counts["rows"] - counts["dropped"]
    assert sum(len(r["input_ids"]) == MAX_LENGTH for r in kept) == counts["cut"]


def test_length_check_refuses_a_max_length_that_loses_most_rows(tokenizer):
    pairs = for_dpo_trainer(Dataset.from_list([normalise_preference_row(r) for r in over_long_pairs()]))
    with pytest.raises(DataError, match=r"max_length=8 is too short.*100% of training pairs would be dropped"):
        data.check_max_length(tokenizer, pairs, 8)
