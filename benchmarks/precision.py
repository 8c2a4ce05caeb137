"""SFT in bf16 and in fp32 on this machine, natively and under the AVX2-only reproduction, with each step's achieved
FLOP/s against a matmul micro-benchmark of the same precision in the same process.

    python benchmarks/precision.py [--steps 3] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import training_speed  # noqa: E402

from utils.precision import AVX2_ONLY_ENV, auto_choice_in  # noqa: E402

# The reproduction limits x86 instruction sets: on other processors only the native setting is measured.
SETTINGS = {"native": {}, **({"AVX2-only (reproduced)": AVX2_ONLY_ENV} if platform.machine() == "x86_64" else {})}
OTHER = {"bfloat16": "float32", "float32": "bfloat16"}
# An emulated-bf16 step takes minutes (several times a native one): one step shows it.
SLOW_ARM_STEPS = 1


def measure(steps: int, tiny_dir: str | None = None, settings: dict | None = None) -> dict:
    """Per setting: the automatic choice, and SFT figures for it and for the other precision forced."""
    results = {}
    for name, env in (settings or SETTINGS).items():
        auto = auto_choice_in(env)
        arms = {}
        for dtype in (auto["dtype"], OTHER[auto["dtype"]]):
            n = SLOW_ARM_STEPS if dtype == "bfloat16" and auto["dtype"] == "float32" else steps
            print(f"  {name}, {dtype}{' (auto)' if dtype == auto['dtype'] else ' (forced)'}: {n} SFT steps...",
                  flush=True)
            arms[dtype] = training_speed.run_isolated("sft:course", n, tiny_dir, dtype, env)
            arm = arms[dtype]
            print(f"    {arm['step_seconds']:.1f} s/step, {arm['real_tokens_per_s']:.1f} real tokens/s, "
                  f"{arm['share_of_matmul']:.1%} of the matmul micro-benchmark", flush=True)
        results[name] = {"env": env, "auto": auto, "arms": arms,
                         "auto_speedup_over_other": arms[auto["dtype"]]["real_tokens_per_s"]
                         / arms[OTHER[auto["dtype"]]]["real_tokens_per_s"]}
    return results


def rows(results: dict) -> list[dict]:
    """One table row per (setting, precision)."""
    return [{"processor": name, "compute dtype": dtype, "chosen by auto": dtype == r["auto"]["dtype"],
             "steps": a["steps"], "s/step": round(a["step_seconds"], 1),
             "real tokens/s": round(a["real_tokens_per_s"], 1),
             "achieved GFLOP/s": round(a["achieved_gflops"], 1), "matmul GFLOP/s": round(a["matmul_gflops"], 1),
             "share of matmul": f"{a['share_of_matmul']:.1%}", "eval loss": round(a["eval_loss"], 4)}
            for name, r in results.items() for dtype, a in r["arms"].items()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="a tiny random Gemma: checks the code, not the speed")
    args = parser.parse_args()
    with training_speed.tiny_model_dir(args.tiny) as tiny_dir:
        print(json.dumps(rows(measure(args.steps, tiny_dir)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
