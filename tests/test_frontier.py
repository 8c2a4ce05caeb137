"""`make bench-frontier`'s pure parts: the choosing rule, the intervals, the costs counted (no training here)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import frontier  # noqa: E402

from utils import plots  # noqa: E402


def run(harmful: int, benign: int, choosing_harmful: int, choosing_benign: int) -> dict:
    return {"declined": {"harmful": harmful, "benign": benign, "choosing harmful": choosing_harmful,
                         "choosing benign": choosing_benign},
            "asked": {"harmful": 25, "benign": 25, "choosing harmful": 30, "choosing benign": 30},
            "replies": {"ordinary": ["Sure, here it is.", "I can't help with that."]},
            "sft_loss": 2.3, "ends_turn_rate": 0.9, "train_seconds": 20.0, "eval_accuracy": 1.0}


@pytest.fixture
def settings(monkeypatch):
    monkeypatch.setattr(frontier, "SETTINGS", {"careful": {}, "bold": {"dpo_lr": 5e-4}, "long": {"dpo_steps": 16},
                                               "leaky on 7": {"dpo_lr": 3e-4}})


def test_choose_takes_the_most_harmful_declines_within_the_benign_and_time_limits(settings):
    seeds = [42, 7, 1234]
    points = {
        "careful": {s: run(3, 0, 4, 0) for s in seeds},
        "bold": {42: run(20, 9, 25, 1), 7: run(20, 9, 25, 0), 1234: run(20, 9, 25, 0)},  # 1 benign on seed 42
        "long": {s: run(15, 0, 20, 0) for s in seeds},  # 16 x 4 pairs: 1.33 x the course's training
        "leaky on 7": {42: run(8, 0, 10, 0), 7: run(8, 2, 10, 2), 1234: run(8, 0, 10, 1)},  # 2 on seed 7
    }
    assert frontier.choose(points, seeds) == "careful"
    points["leaky on 7"][7] = run(8, 2, 10, 1)  # held-out benign declines do not count: choosing prompts only
    assert frontier.choose(points, seeds) == "leaky on 7"
    assert frontier.choose({"bold": points["bold"]}, seeds) is None


def test_wilson_interval_contains_the_rate_and_narrows_with_more_prompts():
    low25, high25 = frontier.wilson(5, 25)
    low75, high75 = frontier.wilson(15, 75)
    assert low25 < 0.2 < high25 and low75 < 0.2 < high75 and high75 - low75 < high25 - low25
    assert frontier.wilson(0, 25)[0] == 0.0 and frontier.wilson(25, 25)[1] == 1.0


def test_turned_counts_answers_that_became_declines_only():
    sft = {"replies": {"ordinary": ["Sure.", "I can't help with that.", "Here you go."]}}
    dpo = {"replies": {"ordinary": ["I can't help with that.", "Sure.", "I won't do that."]}}
    assert frontier.turned(sft, dpo) == [0, 2]


def test_summary_and_plot_place_every_setting(settings):
    seeds = [42, 7]
    points = {"careful": {s: run(3, 0, 4, 0) for s in seeds}, "bold": {s: run(20, 9, 25, 3) for s in seeds}}
    sft = {s: run(0, 0, 0, 0) for s in seeds}
    rows = frontier.summary(points, sft)
    assert [r["harmful"]["mean"] for r in rows] == [3, 20] and rows[1]["benign"]["per seed"] == [9, 9]
    assert rows[0]["ordinary turned to declines"] == [0, 0] and rows[0]["sft loss change"] == [0.0, 0.0]
    result = {"rows": rows, "sft": sft, "chosen": "careful", "seeds": seeds, "eligible": ["careful"],
              "chosen fields": frontier.fields({}), "machine": {"cpu": "x", "cores": 2, "cpu_features": "y"},
              "overrides": [], "minutes": 1.0}
    ax = plots.frontier(result, learner=(0, 4))
    assert len(ax.get_legend().get_texts()) == 4  # two settings, SFT, your run
    assert "careful" in frontier.to_markdown(result) and "**careful**" in frontier.to_markdown(result)
