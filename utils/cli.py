"""The scripts' command line: --profile NAME, --output_dir DIR and any profile field as --<field> VALUE."""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path

import torch
from accelerate import PartialState

from utils import distributed, report, tracking
from utils.errors import CourseError
from utils.profiles import PROFILES, Profile, get_profile

FIELD_TYPES = typing.get_type_hints(Profile)


def parse_value(name: str, text: str):
    """Convert a command-line value to the type of profile field `name`; bools are true/false."""
    kind = FIELD_TYPES.get(name, str)  # an unknown field keeps its text: get_profile rejects it by name
    if isinstance(kind, types.UnionType):  # int | None: a number (None, the profile's default, is not typed)
        kind = next(t for t in typing.get_args(kind) if t is not type(None))
    if kind is bool:
        if text.lower() not in ("true", "false"):
            raise CourseError(f"--{name} takes true or false, got {text!r}.")
        return text.lower() == "true"
    try:
        return kind(text)
    except ValueError as err:
        raise CourseError(f"--{name} must be of type {kind.__name__}, got {text!r}.") from err


def overrides(tokens: list[str]) -> dict:
    """{field: value} from tokens like ["--max_length", "1024", "--load_in_4bit=false"]."""
    found = {}
    rest = list(tokens)
    while rest:
        token = rest.pop(0)
        if not token.startswith("--") or len(token) == 2:
            raise CourseError(f"Expected --<profile field> VALUE, got {token!r}.")
        name, has_value, text = token[2:].partition("=")
        name = name.replace("-", "_")
        if not has_value:
            if not rest or rest[0].startswith("--"):
                raise CourseError(f"--{name} needs a value, e.g. --{name} VALUE.")
            text = rest.pop(0)
        found[name] = parse_value(name, text)
    return found


def parse(argv: list[str] | None = None, description: str | None = None) -> tuple[Profile, str | None]:
    """(profile with the command line's overrides, --output_dir or None); a mistake exits with the usage."""
    parser = argparse.ArgumentParser(
        description=description, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any profile field can be overridden, e.g. --max_length 1024 --load_in_4bit false "
               "(fields: utils/profiles.py).")
    parser.add_argument("--profile", default="auto", help=f"{', '.join(PROFILES)} or auto (default)")
    parser.add_argument("--output_dir", default=None, help="default: outputs/<profile>/scripts")
    args, rest = parser.parse_known_args(argv)
    try:
        return get_profile(args.profile, **overrides(rest)), args.output_dir
    except CourseError as err:
        parser.error(str(err))


def output_dir(profile: Profile, override: str | None) -> Path:
    """--output_dir if given, else outputs/<profile>/scripts, apart from the notebooks' outputs/<profile>."""
    return report.output_dir(profile.name, override or report.output_dir(profile.name) / "scripts")


def start(description: str) -> tuple[Profile, PartialState, Path]:
    """A script's opening: (profile from the command line, this process's state, output folder), seeded and logged.

    With --report_to trackio the metrics go to <output folder>/trackio (`tracking.start`).
    """
    profile, override = parse(description=description)
    state = distributed.state()
    out_dir = output_dir(profile, override)
    torch.manual_seed(profile.seed)
    distributed.log(f"profile {profile.name}, model {profile.model_id}, writing to {out_dir}")
    distributed.log(f"computing in {profile.compute_dtype} ({profile.compute_dtype_reason})")
    tracking.start(profile, out_dir)
    return profile, state, out_dir
