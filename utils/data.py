"""Instruction and preference datasets: load from the Hub or a local folder, validate every row, normalise."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict, load_dataset

from utils.chat import encode, render, validate_messages
from utils.errors import CourseError

SFT_SPLITS = ("train_sft", "test_sft")
PREF_SPLITS = ("train_prefs", "test_prefs")
DPO_COLUMNS = ("prompt", "chosen", "rejected")


class DataError(CourseError):
    """A dataset row, split or column the course cannot use; the message names where and why."""


def _local_split_files(folder: Path, split: str) -> tuple[str, list[str]] | None:
    """(format, files) for a split stored as <split>.jsonl, <split>.parquet or Hub-style data/<split>-*.parquet."""
    for fmt, pattern in (("json", f"{split}.jsonl"), ("parquet", f"{split}.parquet"),
                         ("parquet", f"data/{split}-*.parquet"), ("json", f"data/{split}-*.jsonl")):
        files = sorted(str(p) for p in folder.glob(pattern))
        if files:
            return fmt, files
    return None


def _local_splits(folder: Path) -> list[str]:
    names = {p.name.split(".")[0] for p in [*folder.glob("*.jsonl"), *folder.glob("*.parquet")]}
    names |= {p.name.split("-")[0] for p in folder.glob("data/*")}
    return sorted(names - {"metadata", "choosing_prompts"})


def _hub_error(source: str, err: Exception) -> DataError:
    return DataError(
        f"Could not load {source!r} from the Hugging Face Hub ({type(err).__name__}: {str(err)[:200]}). "
        "The machine may be offline or the Hub unreachable (or, if you meant a local folder, it does not exist). "
        "Use the shipped local data instead: the `cpu` profile reads data/ultrachat_mini and "
        "data/ultrafeedback_mini, or pass a local folder of <split>.jsonl / <split>.parquet files as the source."
    )


def _check_jsonl(path: Path) -> None:
    """Raise DataError naming the file and line of the first line that is not one JSON object (blank lines pass)."""
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                problem = f"{err.msg} at column {err.colno}"
            else:
                if isinstance(row, dict):
                    continue
                problem = f"a JSON {type(row).__name__}, not an object"
            raise DataError(f"{path}, line {number}: {problem}. Each line of a .jsonl file must be one JSON object "
                            f'({{"prompt": ..., "chosen": ..., ...}}); fix or remove that line.')


def _load_local(folder: Path, split: str) -> Dataset:
    found = _local_split_files(folder, split)
    if found is None:
        raise DataError(
            f"Split {split!r} is missing in {folder}. Splits found there: {_local_splits(folder) or 'none'}. "
            f"Expected a file named {split}.jsonl or {split}.parquet."
        )
    fmt, files = found
    if fmt == "json":
        for file in files:
            _check_jsonl(Path(file))
    try:  # from_json/from_parquet: no network call, unlike load_dataset("json", ...)
        return Dataset.from_json(files) if fmt == "json" else Dataset.from_parquet(files)
    except Exception as err:
        raise DataError(
            f"Could not read split {split!r} from {files}: {type(err).__name__}: {err}. "
            "Check that every line is one JSON object (JSONL) or that the Parquet file is complete."
        ) from err


def _load_hub(source: str, split: str) -> Dataset:
    try:
        return load_dataset(source, split=split)
    except ValueError as err:
        if "split" in str(err).lower():
            raise DataError(f"Split {split!r} is missing in {source!r}: {err}") from err
        raise
    except (ConnectionError, OSError, TimeoutError) as err:
        raise _hub_error(source, err) from err
    except Exception as err:
        if type(err).__module__.split(".")[0] in {"huggingface_hub", "requests", "httpx", "urllib3", "datasets"}:
            raise _hub_error(source, err) from err
        raise


def load_raw(source: str | Path, splits: tuple[str, ...], max_rows: int | None = None) -> DatasetDict:
    """Load the named splits, unvalidated, from a local folder or a Hub dataset id."""
    folder = Path(source)
    looks_local = folder.is_absolute() or str(source).startswith(".") or len(folder.parts) != 2 \
        or Path(folder.parts[0]).is_dir()
    if looks_local and not folder.is_dir():
        raise DataError(f"No folder {source}: check the path (the shipped data is in data/ultrachat_mini and "
                        "data/ultrafeedback_mini), or pass a Hub dataset id such as HuggingFaceH4/ultrachat_200k.")
    parts = {s: _load_local(folder, s) if folder.is_dir() else _load_hub(str(source), s) for s in splits}
    if max_rows is not None:
        parts = {k: v.select(range(min(max_rows, len(v)))) for k, v in parts.items()}
    return DatasetDict(parts)


def _where(split: str, index: int, row: dict) -> str:
    return f"Split {split!r}, row {index} (prompt_id {row.get('prompt_id', 'n/a')})"


def check_sft_row(row: dict) -> str | None:
    """None if the row is a usable conversation, else what is wrong with it."""
    if "messages" not in row:
        return "has no 'messages' column"
    try:
        validate_messages(row["messages"])
    except CourseError as err:
        return str(err)
    if row["messages"][-1]["role"] != "assistant":
        return "does not end with an assistant turn, so there is nothing to train on"
    return None


def _as_conversation(value, name: str) -> list[dict]:
    if not isinstance(value, list):
        raise CourseError(f"'{name}' must be a list of messages, or a string with a string 'prompt' (TRL's standard "
                          f"form), got {type(value).__name__}")
    validate_messages(value)
    if value[-1]["role"] != "assistant":
        raise CourseError(f"'{name}' must end with an assistant turn")
    return value


def normalise_preference_row(row: dict) -> dict:
    """Any accepted preference form -> explicit prompt messages plus one-message chosen/rejected lists.

    Accepted: UltraFeedback binarized (string prompt, full chosen/rejected conversations), TRL explicit
    (prompt messages, assistant-only chosen/rejected), TRL implicit (no prompt, full conversations) and TRL standard
    (prompt, chosen and rejected as plain strings: one user turn and its two candidate replies).
    """
    for name in ("chosen", "rejected"):
        if name not in row:
            raise CourseError(f"has no '{name}' column")
    prompt = row.get("prompt")
    chosen, rejected = row["chosen"], row["rejected"]
    if isinstance(prompt, list):  # TRL explicit form
        validate_messages(prompt)
        if prompt[-1]["role"] != "user":
            raise CourseError("the prompt must end with a user turn")
        chosen = _as_conversation(prompt + list(chosen or []), "chosen")
        rejected = _as_conversation(prompt + list(rejected or []), "rejected")
    elif isinstance(prompt, str) and isinstance(chosen, str) and isinstance(rejected, str):  # TRL standard form
        user = [{"role": "user", "content": prompt}]
        chosen = _as_conversation(user + [{"role": "assistant", "content": chosen}], "chosen")
        rejected = _as_conversation(user + [{"role": "assistant", "content": rejected}], "rejected")
    else:
        chosen = _as_conversation(chosen, "chosen")
        rejected = _as_conversation(rejected, "rejected")
    if chosen[:-1] != rejected[:-1]:
        raise CourseError("chosen and rejected do not share the same prompt turns")
    if isinstance(prompt, str):
        first_user = next(m["content"] for m in chosen if m["role"] == "user")
        if prompt.strip() != first_user.strip():
            raise CourseError("the 'prompt' string differs from the first user turn of chosen/rejected")
    if chosen[-1]["content"].strip() == rejected[-1]["content"].strip():
        raise CourseError("chosen and rejected answers are identical, so there is no preference to learn")
    for name in ("score_chosen", "score_rejected"):
        value = row.get(name)
        if name in row and (isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value)):
            raise CourseError(f"'{name}' must be a number, got {value!r}")
    return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}


def check_preference_rows(rows: list[dict]) -> list[dict]:
    """Validate each row with normalise_preference_row without raising: one row of {"prompt", "chosen", "rejected",
    "valid", "problem"} each, the texts as DPO will see them (the prompt's last turn), problem empty when valid."""
    table = []
    for row in rows:
        try:
            pair = normalise_preference_row(row)
        except CourseError as err:
            table.append({"prompt": str(row.get("prompt", "")), "chosen": "", "rejected": "", "valid": False,
                          "problem": str(err)})
            continue
        table.append({"prompt": pair["prompt"][-1]["content"], "chosen": pair["chosen"][0]["content"],
                      "rejected": pair["rejected"][0]["content"], "valid": True, "problem": ""})
    return table


def _validate(ds: DatasetDict, check, where_source: str, skip_invalid: bool) -> DatasetDict:
    out = {}
    for split, part in ds.items():
        bad = []
        for index, row in enumerate(part):
            problem = check(row)
            if problem is not None:
                if not skip_invalid:
                    raise DataError(
                        f"{_where(split, index, row)} of {where_source} is invalid: {problem}. "
                        "Fix the row, or pass skip_invalid=True to drop invalid rows (their count is reported)."
                    )
                bad.append(index)
        if len(bad) == len(part):
            raise DataError(f"Split {split!r} of {where_source} has no usable rows ({len(part)} rows, all invalid "
                            "or none at all); check the source and max_rows.")
        if bad:
            print(f"Skipped {len(bad)} invalid row(s) of {len(part)} in split {split!r} (skip_invalid=True).")
            part = part.select(sorted(set(range(len(part))) - set(bad)))
        out[split] = part
    return DatasetDict(out)


def load_sft_dataset(source: str | Path, max_rows: int | None = None, splits: tuple[str, ...] = SFT_SPLITS,
                     skip_invalid: bool = False) -> DatasetDict:
    """Instruction conversations (ultrachat_200k schema) as a validated DatasetDict keyed by split."""
    return _validate(load_raw(source, splits, max_rows), check_sft_row, str(source), skip_invalid)


def _check_pref(row: dict) -> str | None:
    try:
        normalise_preference_row(row)
    except CourseError as err:
        return str(err)
    return None


def load_preference_dataset(source: str | Path, max_rows: int | None = None, splits: tuple[str, ...] = PREF_SPLITS,
                            skip_invalid: bool = False) -> DatasetDict:
    """Preference pairs, validated and normalised to explicit prompt/chosen/rejected messages.

    Other columns (prompt_id, scores) are kept; `messages` and the Hub's string prompt are replaced.
    """
    raw = _validate(load_raw(source, splits, max_rows), _check_pref, str(source), skip_invalid)
    out = {}
    for split, part in raw.items():
        keep = [c for c in part.column_names if c not in (*DPO_COLUMNS, "messages")]
        rows = [{**normalise_preference_row(r), **{c: r[c] for c in keep}} for r in part]
        out[split] = Dataset.from_list(rows)
    return DatasetDict(out)


def for_sft_trainer(ds: Dataset) -> Dataset:
    """Only the `messages` column: SFTTrainer treats a `prompt` column as prompt-completion data."""
    return ds.select_columns(["messages"])


def for_dpo_trainer(ds: Dataset) -> Dataset:
    """Only prompt/chosen/rejected, in the explicit form DPOTrainer handles under every hash seed."""
    return ds.select_columns(list(DPO_COLUMNS))


def load_categories(folder: str | Path) -> dict[str, str]:
    """prompt_id -> rejection category, from a shipped folder's metadata.jsonl (empty if absent)."""
    path = Path(folder) / "metadata.jsonl"
    if not path.exists():
        return {}
    return {r["prompt_id"]: r["category"] for r in map(json.loads, path.read_text().splitlines()) if r}


def select_categories(ds: Dataset, categories: dict[str, str], wanted: list[str], source: str | Path) -> Dataset:
    """The rows whose rejection category is one of wanted; DataError when the data has none of them."""
    known = sorted(set(categories.values()))
    if unknown := [w for w in wanted if w not in known]:
        raise DataError(f"{source} has no rejection categor{'y' if len(unknown) == 1 else 'ies'} {unknown}"
                        f"{f'; it has {known}' if known else ' (no metadata.jsonl)'}. Set dpo_categories to '' to "
                        "train on every pair, or to some of those categories, comma-separated.")
    return ds.filter(lambda row: categories.get(row["prompt_id"]) in wanted)


def _token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _percentiles(values: list[int]) -> dict[str, float]:
    arr = np.asarray(values)
    return {"p50": float(np.percentile(arr, 50)), "p90": float(np.percentile(arr, 90)),
            "p99": float(np.percentile(arr, 99)), "max": float(arr.max())}


def length_report(tokenizer, ds: Dataset, max_length: int) -> dict:
    """Token-length percentiles (prompt, answer(s), total) and the share of rows max_length would cut."""
    if "messages" in ds.column_names:
        prompts = [render(tokenizer, r["messages"][:1], add_generation_prompt=True) for r in ds]
        totals = [render(tokenizer, r["messages"]) for r in ds]
        lengths = {"prompt": [_token_count(tokenizer, t) for t in prompts],
                   "total": [_token_count(tokenizer, t) for t in totals]}
        lengths["answer"] = [t - p for t, p in zip(lengths["total"], lengths["prompt"])]
    else:
        lengths = {"prompt": [], "chosen": [], "rejected": []}
        for r in ds:
            p = _token_count(tokenizer, render(tokenizer, r["prompt"], add_generation_prompt=True))
            lengths["prompt"].append(p)
            for name in ("chosen", "rejected"):
                lengths[name].append(_token_count(tokenizer, render(tokenizer, r["prompt"] + r[name])) - p)
        lengths["total"] = [p + max(c, j) for p, c, j in zip(lengths["prompt"], lengths["chosen"], lengths["rejected"])]
    report = {name: _percentiles(vals) for name, vals in lengths.items()}
    report["truncated_share"] = float(np.mean(np.asarray(lengths["total"]) > max_length))
    report["max_length"] = max_length
    report["lengths"] = lengths
    return report


def drop_longer_than(tokenizer, ds: Dataset, max_length: int) -> Dataset:
    """The rows of ds whose whole conversation fits in max_length tokens (for padding-free batches, which don't cut)."""
    keep = [i for i, r in enumerate(ds) if len(encode(tokenizer, r["messages"])["input_ids"]) <= max_length]
    if len(keep) < len(ds):
        print(f"Dropped {len(ds) - len(keep)} of {len(ds)} rows longer than max_length={max_length}.")
    return ds.select(keep)


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _pair_fate(tokenizer, row: dict, max_length: int) -> tuple[str | None, int]:
    """(fate, tokens) of a pair in DPOTrainer 1.16 (keep_start): "dropped" if the prompt alone fills max_length,
    "cut" if prompt + the longer answer exceeds it, else None; tokens = that longest sequence."""
    prompt = encode(tokenizer, row["prompt"], add_generation_prompt=True)["input_ids"]
    sequences = [encode(tokenizer, row["prompt"] + row[name])["input_ids"] for name in ("chosen", "rejected")]
    tokens = max(map(len, sequences))
    if min(_common_prefix(prompt, ids) for ids in sequences) >= max_length:
        return "dropped", tokens
    return ("cut" if tokens > max_length else None), tokens


def _conversation_fate(tokenizer, messages: list[dict], max_length: int, padding_free: bool) -> tuple[str | None, int]:
    """(fate, tokens) of a conversation in SFTTrainer 1.16 with assistant_only_loss (keep_start): padding-free rows
    longer than max_length are dropped by `recipes.sft_datasets`; padded ones are cut, or dropped by TRL when no reply
    token is left within max_length."""
    encoded = encode(tokenizer, messages)
    tokens = len(encoded["input_ids"])
    if tokens <= max_length:
        return None, tokens
    return ("dropped" if padding_free or 1 not in encoded["assistant_masks"][:max_length] else "cut"), tokens


_WHY = {  # what happens to the rows counted as (dropped, cut), per kind of data
    "pairs": ("DPOTrainer drops them: the prompt alone fills max_length",
              "DPOTrainer keeps their first max_length tokens: the end of an answer is not scored"),
    "conversations": ("SFTTrainer drops them: no reply token is left within max_length",
                      "SFTTrainer keeps their first max_length tokens: the end of a reply is not trained on"),
    "padding-free conversations": ("recipes.sft_datasets drops them: padding-free batches cannot cut a row", ""),
}


def check_max_length(tokenizer, ds: Dataset, max_length: int, padding_free: bool = False, split: str = "training",
                     max_lost_share: float = 0.5) -> dict[str, int]:
    """Count and print the rows TRL 1.16 will drop or cut at max_length: {"rows", "dropped", "cut", "longest"}.

    Pairs (prompt/chosen/rejected) as DPOTrainer sees them, conversations (messages) as SFTTrainer or, with
    padding_free, `recipes.sft_datasets` does. Raises DataError when more than max_lost_share of the rows are affected.
    """
    kind = "conversations" if "messages" in ds.column_names else "pairs"
    fates = [_conversation_fate(tokenizer, r["messages"], max_length, padding_free) if kind == "conversations"
             else _pair_fate(tokenizer, r, max_length) for r in ds]
    counts = {"rows": len(fates), "dropped": sum(f == "dropped" for f, _ in fates),
              "cut": sum(f == "cut" for f, _ in fates), "longest": max((n for _, n in fates), default=0)}
    lost = counts["dropped"] + counts["cut"]
    if counts["rows"] and lost / counts["rows"] > max_lost_share:
        raise DataError(
            f"max_length={max_length} is too short for this data: {lost / counts['rows']:.0%} of {split} {kind} would "
            f"be dropped or truncated ({counts['dropped']} dropped, {counts['cut']} cut; the longest has "
            f"{counts['longest']} tokens). Raise max_length (get_profile(PROFILE, max_length=...)) or filter out long "
            "rows."
        )
    dropped_why, cut_why = _WHY["padding-free conversations" if padding_free and kind == "conversations" else kind]
    cut = f", {counts['cut']} cut ({cut_why})" if cut_why else ""
    print(f"max_length={max_length}, {counts['rows']} {split} {kind}: {counts['dropped']} dropped ({dropped_why})"
          f"{cut}; the longest has {counts['longest']} tokens.")
    return counts
