"""The scripts' command line (typed profile overrides) and the process helpers they use under accelerate launch."""

from __future__ import annotations

import pytest

from utils import cli, distributed
from utils.errors import CourseError


def test_overrides_are_typed_from_the_profile_fields():
    profile, out = cli.parse(["--profile", "cpu", "--max_length", "1024", "--sft_lr=3e-4", "--load_in_4bit", "false",
                              "--train-turn-tokens", "TRUE", "--sft_train_rows", "50", "--output_dir", "/x"])
    assert (profile.max_length, profile.sft_lr, profile.load_in_4bit) == (1024, 3e-4, False)
    assert profile.train_turn_tokens is True and profile.sft_train_rows == 50 and out == "/x"
    assert profile.batch_size == 8, "fields not given keep the profile's value"


def test_no_overrides_is_the_profile_itself():
    from utils.profiles import get_profile

    assert cli.parse(["--profile", "cpu"]) == (get_profile("cpu"), None)


@pytest.mark.parametrize("argv, message", [
    (["--max_lenght", "1024"], "Known fields: "),
    (["--max_length", "long"], "--max_length must be of type int, got 'long'"),
    (["--load_in_4bit", "yes"], "--load_in_4bit takes true or false"),
    (["--max_length"], "--max_length needs a value"),
    (["1024"], "Expected --<profile field> VALUE"),
])
def test_mistakes_exit_with_the_reason(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse(["--profile", "cpu", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    if "Known" in message:
        assert "max_length" in err and "sft_steps" in err, "the error lists the known fields"


def test_parse_value_rejects_bad_booleans():
    with pytest.raises(CourseError, match="true or false"):
        cli.parse_value("padding_free", "1")


@pytest.mark.parametrize("env, expected", [
    ({}, "ddp"),
    ({"ACCELERATE_USE_FSDP": "true"}, "fsdp"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "zero3"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, "ddp"),
])
def test_strategy_follows_the_launcher(env, expected, monkeypatch):
    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert distributed.strategy() == expected


def test_device_map_is_the_local_gpu_and_none_when_sharded(monkeypatch):
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert distributed.device_map() == {"": 3}
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert distributed.device_map() is None


def test_log_prefixes_the_rank(capsys):
    distributed.log("hello")
    assert capsys.readouterr().out == "[rank 0/1] hello\n"
