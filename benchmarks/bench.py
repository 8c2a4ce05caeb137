"""`make bench`: where a course training step spends its time, training throughput (the course vs TRL's defaults, DPO
with a precomputed reference), each precision's share of the matmul rate (against the committed figures of the same
processor kind) and the memory estimator against measured peaks, on this machine. Writes bench.json, bench.md and
bench.png to benchmarks/results/.

    python benchmarks/bench.py [--sft-steps 10] [--dpo-steps 8] [--out DIR] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memory_check  # noqa: E402
import precision  # noqa: E402
import step_profile  # noqa: E402
import training_speed  # noqa: E402

from utils.memory import to_markdown  # noqa: E402
from utils.precision import cpu_features  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TARGETS = {"sft_speedup": 1.3, "sft_memory_ratio": 1.0, "sft_eval_loss_diff": 0.02, "sft_course_padding_share": 0.05,
           "auto_precision_speedup_avx2": 4.0}


def machine() -> dict:
    """What the figures were measured on."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "cpu_features": cpu_features().describe(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d")}


def checks(summary: dict, precision_results: dict) -> dict[str, bool]:
    """The acceptance targets, each met or not."""
    avx2 = precision_results.get("AVX2-only (reproduced)")
    return {
        **({f"AVX2-only (reproduced): the automatic precision trains >= {TARGETS['auto_precision_speedup_avx2']}x "
            "faster than forced bf16": avx2["auto"]["dtype"] == "float32"
            and avx2["auto_speedup_over_other"] >= TARGETS["auto_precision_speedup_avx2"]} if avx2 else {}),
        f"course SFT >= {TARGETS['sft_speedup']}x the real tokens/s of TRL defaults":
            summary["sft_speedup"] >= TARGETS["sft_speedup"],
        "course SFT peak memory no higher": summary["sft_memory_ratio"] <= TARGETS["sft_memory_ratio"],
        "course SFT eval loss within 2%": abs(summary["sft_eval_loss_diff"]) <= TARGETS["sft_eval_loss_diff"],
        "course SFT padding share <= 5%": summary["sft_course_padding_share"] <= TARGETS["sft_course_padding_share"],
    }


def processor_kind(cpu_features: str) -> str:
    """AMX, AVX512-BF16 (no AMX) or AVX2: the three kinds of machine the course's time depends on."""
    if "amx_bf16" in cpu_features:
        return "AMX"
    return "AVX512-BF16" if "avx512_bf16" in cpu_features else "AVX2"


def matmul_shares(result: dict, before: dict | None) -> list[dict]:
    """Each precision's step as a share of the matmul rate now, beside the committed bench.json's when that was
    measured on the same processor kind."""
    kind = processor_kind(result["machine"]["cpu_features"])
    same = before is not None and processor_kind(before["machine"]["cpu_features"]) == kind
    old = {(r["processor"], r["compute dtype"]): r["share of matmul"] for r in precision.rows(before["precision"])} \
        if same else {}
    return [{"processor kind": kind, "setting": r["processor"], "compute dtype": r["compute dtype"],
             "share of matmul now": r["share of matmul"],
             "before": old.get((r["processor"], r["compute dtype"]), "not measured on this kind")}
            for r in precision.rows(result["precision"])]


def _arm_rows(arms: dict, prefix: str) -> list[dict]:
    return [{"set-up": name.split(":", 1)[1], "steps": a["steps"], "padding-free": a["padding_free"],
             "grad. checkpointing": a["gradient_checkpointing"], "bf16": a["bf16"], "seconds": round(a["seconds"], 1),
             "real tokens": a["real_tokens"], "real tokens/s": round(a["real_tokens_per_s"], 1),
             "padding share": f"{a['padding_share']:.1%}", "peak RSS GiB": round(a["peak_rss_gib"], 2),
             "eval loss": round(a["eval_loss"], 4)} for name, a in arms.items() if name.startswith(prefix)]


def to_text(result: dict) -> str:
    """The markdown report: machine, the three tables, the targets."""
    s, m = result["training"]["summary"], result["machine"]
    lines = [
        "# Benchmarks (`make bench`)", "",
        f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores, {m['ram_gib']} GiB RAM, GPU: {m['gpu'] or 'none'}), "
        f"torch {m['torch']}, {m['torch_threads']} threads. Model: {result['settings']['model']}. "
        "Each arm runs in its own process on the same model, data, LoRA set-up, seed and steps.", "",
        f"Processor: {m['cpu_features']}.", "",
        "## Where a training step goes", "",
        "One step of the `cpu` profile's SFT and DPO set-ups under `torch.profiler` (`benchmarks/step_profile.py`), "
        "after a warm-up step. The LM head is TRL's fused head, which projects every trained position onto the "
        "262k-entry vocabulary; recomputation is the forward work gradient checkpointing redoes in the backward pass; "
        "other is LoRA, norms, element-wise work and Python.", "",
        to_markdown(step_profile.rows(result["step_profile"])), "",
        *(["Time per notebook of the last course run (`outputs/cpu`, papermill's cell durations): training cells "
           "against the rest (evaluation, generation, probes, plots).", "",
           to_markdown(result["notebooks"]), ""] if result["notebooks"] else []),
        "## Precision: bf16 and fp32 SFT steps on this processor", "",
        "The course's SFT step (`utils.recipes.sft_config`) computing in each precision, natively and under the "
        "AVX2-only reproduction (`utils.precision.AVX2_ONLY_ENV`: ATen, oneDNN and MKL limited to AVX2, as on a "
        "laptop without AVX512). Achieved GFLOP/s = real tokens/s x 6 x the model's matmul weights; matmul GFLOP/s = a "
        "512x640 @ 640x2048 matmul in the same precision and process. Emulated bf16 runs "
        f"{precision.SLOW_ARM_STEPS} step; under the reproduction a bare bf16 matmul goes to oneDNN's reference kernel "
        "while the step's autocast layers take faster paths, so that row's share exceeds 100%: compare whole steps "
        "there.", "",
        to_markdown(precision.rows(result["precision"])), "",
        *[f"- {name}: auto picks **{r['auto']['dtype']}** ({r['auto']['reason']}); it trains "
          f"**{r['auto_speedup_over_other']:.2f}x** the real tokens/s of {precision.OTHER[r['auto']['dtype']]}."
          for name, r in result["precision"].items()], "",
        "The step's share of the matmul rate, now and in the committed results of the same processor kind:", "",
        to_markdown(result["matmul_shares"]), "",
        "## SFT: the course's set-up against TRL's defaults", "",
        "TRL defaults = `SFTConfig` with only the learning settings given (learning rate, constant schedule, steps, "
        "batch, max_length, `assistant_only_loss`); course = `utils.recipes.sft_config` (padding-free batches; "
        "gradient checkpointing and bf16 autocast as in TRL's defaults).", "",
        to_markdown(_arm_rows(result["training"]["arms"], "sft:")), "",
        f"Course / TRL defaults: **{s['sft_speedup']:.2f}x** real tokens per second, peak memory "
        f"{s['sft_memory_ratio']:.2f}x, eval loss {s['sft_eval_loss_diff']:+.2%}.", "",
        "## DPO: reference log-probs recomputed every step vs precomputed once", "",
        "Seconds include trainer set-up, where `precompute_ref_log_probs=True` runs the reference over the "
        "training and evaluation pairs once.", "",
        to_markdown(_arm_rows(result["training"]["arms"], "dpo:")), "",
        f"Precomputed / recomputed: {s['dpo_precompute_speedup']:.2f}x real tokens per second over the whole run.", "",
    ]
    if result["memory"]:
        lines += ["## The memory estimator against measured peaks (Gemma 3 270M, batch 4 x 128, AdamW)", "",
                  to_markdown(result["memory"]), ""]
    lines += ["## Targets", ""] + [f"- [{'x' if ok else ' '}] {name}" for name, ok in result["checks"].items()]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Bars: real tokens/s and peak memory per arm, estimated vs measured memory, seconds per step per precision."""
    arms = result["training"]["arms"]
    panels = 5 if result["memory"] else 4
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    names = list(arms)
    colors = ["tab:gray", "tab:blue", "tab:gray", "tab:blue"]
    axes[0].bar(names, [arms[n]["real_tokens_per_s"] for n in names], color=colors)
    axes[0].set_title("real (non-padding) tokens per second")
    axes[1].bar(names, [arms[n]["peak_rss_gib"] for n in names], color=colors)
    axes[1].set_title("peak memory while training (GiB)")
    for ax in axes[:2]:
        ax.tick_params(axis="x", rotation=30)
    if result["memory"]:
        rows, x = result["memory"], range(len(result["memory"]))
        axes[2].bar([i - 0.2 for i in x], [r["estimated GiB"] for r in rows], width=0.4, label="estimated")
        axes[2].bar([i + 0.2 for i in x], [r["measured GiB"] for r in rows], width=0.4, label="measured")
        axes[2].set_xticks(list(x), [r["method"] for r in rows])
        axes[2].set_title("training memory: estimator vs measured (GiB)")
        axes[2].legend()
    table = precision.rows(result["precision"])
    labels = [f"{r['processor'].split(' ')[0]}\n{r['compute dtype']}{' (auto)' if r['chosen by auto'] else ''}"
              for r in table]
    axes[-1].bar(labels, [r["s/step"] for r in table],
                 color=["tab:blue" if r["chosen by auto"] else "tab:gray" for r in table])
    axes[-1].set_yscale("log")  # emulated bf16 is one to two orders of magnitude slower
    axes[-1].set_title("seconds per SFT step (log scale; blue = auto)")
    step_panel = axes[-2]
    stages, bottom = list(result["step_profile"]), [0.0] * len(result["step_profile"])
    for category in [c for c, _ in step_profile.CATEGORIES] + [step_profile.RECOMPUTE, "other"]:
        heights = [result["step_profile"][st]["seconds"].get(category, 0.0) for st in stages]
        step_panel.bar(stages, heights, bottom=bottom, label=category.split(" (")[0])
        bottom = [b + h for b, h in zip(bottom, heights)]
    step_panel.set_ylabel("seconds")
    step_panel.set_title("where one training step goes")
    step_panel.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft-steps", type=int, default=10)
    parser.add_argument("--dpo-steps", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--precision-steps", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="a tiny random Gemma, no memory check: tests the code")
    parser.add_argument("--course", type=Path, default=ROOT / "outputs" / "cpu",
                        help="the course run whose per-cell times to report (make tutorial writes outputs/cpu)")
    args = parser.parse_args()
    before = json.loads((RESULTS / "bench.json").read_text()) if (RESULTS / "bench.json").exists() else None
    with training_speed.tiny_model_dir(args.tiny) as tiny_dir:
        print("Where a training step goes (each stage in its own process):", flush=True)
        profiles = step_profile.measure(tiny_dir)
        print("Training throughput (each arm in its own process):", flush=True)
        training = training_speed.compare(args.sft_steps, args.dpo_steps, tiny_dir)
        print("Precision (each arm in its own process):", flush=True)
        precision_results = precision.measure(args.precision_steps, tiny_dir)
    memory = [] if args.tiny else memory_check.measure_all()
    result = {"machine": machine(), "settings": {"model": "tiny random Gemma" if args.tiny else "Gemma 3 270M base, "
                                                 "4-bit NF4 (the cpu profile)", "sft_steps": args.sft_steps,
                                                 "dpo_steps": args.dpo_steps, "precision_steps": args.precision_steps},
              "step_profile": profiles, "training": training, "precision": precision_results, "memory": memory,
              "notebooks": [] if args.tiny or not args.course.exists() else step_profile.notebook_times(args.course),
              "checks": checks(training["summary"], precision_results)}
    result["matmul_shares"] = matmul_shares(result, before)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    (args.out / "bench.md").write_text(to_text(result))
    plot(result, args.out / "bench.png")
    print(to_text(result))
    print(f"Written: {args.out / 'bench.md'}, bench.json, bench.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
