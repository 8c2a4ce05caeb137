"""`make bench` runs end to end on a tiny random Gemma (its figures are meaningless there; no timing is asserted)."""

from __future__ import annotations

import json
import math
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[dict, Path]:
    """(bench.json, output folder) of one `bench.py --tiny` run."""
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "benchmarks/bench.py", "--tiny", "--sft-steps", "2", "--dpo-steps", "2",
                           "--precision-steps", "2", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "bench.json").read_text()), out


@pytest.mark.slow
def test_bench_runs_on_a_tiny_model_and_writes_its_results(bench):
    result, out = bench
    arms = result["training"]["arms"]
    assert set(arms) == {"sft:trl-defaults", "sft:course", "dpo:course", "dpo:precomputed-ref"}
    assert all(a["steps"] == 2 and a["real_tokens"] > 0 and math.isfinite(a["eval_loss"]) for a in arms.values())
    assert arms["sft:course"]["padding_share"] == 0 < arms["sft:trl-defaults"]["padding_share"]
    # the same rows in the same order: the padding-free batches carry exactly the baseline's real tokens
    assert arms["sft:course"]["real_tokens"] == arms["sft:trl-defaults"]["real_tokens"]
    assert "## SFT" in (out / "bench.md").read_text() and (out / "bench.png").stat().st_size > 10_000


@pytest.mark.slow
def test_bench_measures_both_precisions_and_the_avx2_reproduction_picks_fp32(bench):
    result, out = bench
    for setting in result["precision"].values():
        assert set(setting["arms"]) == {"bfloat16", "float32"}
        for dtype, arm in setting["arms"].items():
            assert arm["compute_dtype"] == dtype and arm["steps"] >= 1 and arm["real_tokens_per_s"] > 0
            assert arm["achieved_gflops"] > 0 and arm["matmul_gflops"] > 0
    if platform.machine() == "x86_64":
        avx2 = result["precision"]["AVX2-only (reproduced)"]
        assert avx2["auto"]["dtype"] == "float32" and "oneDNN bf16 not native" in avx2["auto"]["reason"]
    assert "## Precision" in (out / "bench.md").read_text()
