"""`make bench` runs end to end on a tiny random Gemma (its figures are meaningless there; no timing is asserted)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_runs_on_a_tiny_model_and_writes_its_results(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/bench.py", "--tiny", "--sft-steps", "2", "--dpo-steps", "2",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    arms = result["training"]["arms"]
    assert set(arms) == {"sft:trl-defaults", "sft:course", "dpo:course", "dpo:precomputed-ref"}
    assert all(a["steps"] == 2 and a["real_tokens"] > 0 and math.isfinite(a["eval_loss"]) for a in arms.values())
    assert arms["sft:course"]["padding_share"] == 0 < arms["sft:trl-defaults"]["padding_share"]
    # the same rows in the same order: the padding-free batches carry exactly the baseline's real tokens
    assert arms["sft:course"]["real_tokens"] == arms["sft:trl-defaults"]["real_tokens"]
    assert "## SFT" in (tmp_path / "bench.md").read_text() and (tmp_path / "bench.png").stat().st_size > 10_000
