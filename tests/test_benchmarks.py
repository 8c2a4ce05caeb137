"""`make bench` runs end to end on a tiny random Gemma (its figures are meaningless there; no timing is asserted)."""

from __future__ import annotations

import json
import math
import platform
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench as bench_module  # noqa: E402
import step_profile  # noqa: E402


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[dict, Path]:
    """(bench.json, output folder) of one `bench.py --tiny` run."""
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "benchmarks/bench.py", "--tiny", "--sft-steps", "1", "--dpo-steps", "1",
                           "--precision-steps", "1", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "bench.json").read_text()), out


@pytest.mark.slow
def test_bench_runs_on_a_tiny_model_and_writes_its_results(bench):
    result, out = bench
    arms = result["training"]["arms"]
    assert set(arms) == {"sft:trl-defaults", "sft:course", "dpo:course", "dpo:precomputed-ref"}
    assert all(a["steps"] == 1 and a["real_tokens"] > 0 and math.isfinite(a["eval_loss"]) for a in arms.values())
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


@pytest.mark.slow
def test_bench_profiles_where_a_training_step_goes(bench):
    result, out = bench
    for stage in ("sft", "dpo"):
        profile = result["step_profile"][stage]
        head = "LM head (fused: utils.lm_head on the CPU, 262k vocabulary)"
        assert profile["step_seconds"] > 0 and profile["seconds"][head] > 0
        assert sum(profile["seconds"].values()) == pytest.approx(profile["step_seconds"], rel=0.05)
    assert "## Where a training step goes" in (out / "bench.md").read_text()
    assert {row["setting"] for row in result["matmul_shares"]} == set(result["precision"])


def test_notebook_times_split_training_cells_from_the_rest(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("trainer.train()"), nbformat.v4.new_code_cell("evaluate()"),
                nbformat.v4.new_markdown_cell("text")]
    for cell, seconds in zip(nb.cells[:2], (30.0, 12.5)):
        cell.metadata["papermill"] = {"duration": seconds}
    nbformat.write(nb, tmp_path / "02_sft.ipynb")
    (row,) = step_profile.notebook_times(tmp_path)
    assert row["notebook"] == "02" and row["seconds"] == 42.5 and row["training cells"] == 30.0
    assert row["other cells"] == 12.5 and row["slowest other cells"] == "code cell 1: 12 s"


@pytest.mark.parametrize("flags, kind", [("avx512_bf16 amx_bf16 avx2", "AMX"), ("avx512_bf16 avx2", "AVX512-BF16"),
                                         ("avx2", "AVX2")])
def test_processor_kinds(flags, kind):
    assert bench_module.processor_kind(f"CPU flags {flags}") == kind
