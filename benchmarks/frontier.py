"""`make bench-frontier`: what DPO settings do to what the model says, on three seeds (safety / helpfulness frontier).

Per seed: scripts/sft.py once, then scripts/dpo.py once per setting (learning rate, steps, beta, the SFT term's weight,
which pairs it trains on), each in its own process as in `make bench-learning`. The SFT model and every DPO model then
answer the held-out prompts (25 harmful, 25 benign, 49 ordinary: test_prefs) and the prompts kept apart for choosing
(data/ultrafeedback_mini/choosing_prompts.jsonl), 32-token greedy openings judged by utils/declines.py; plus what a
setting costs the rest of the model: held-out SFT loss, the share of 64-token replies that end their turn, ordinary
answers turned into declines. The course's setting is chosen on the choosing prompts only; the frontier reports the
held-out ones. Writes frontier.json (every reply kept), frontier.md and frontier.png after every setting.

    python benchmarks/frontier.py [--seeds 42 7 1234] [--settings JSON] [--out DIR] [--work DIR] [--field VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import machine  # noqa: E402
from learning import TURN_PROMPTS, script  # noqa: E402

from utils import chat, cli, data, declines, evaluate, models, plots  # noqa: E402
from utils.profiles import get_profile  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SAFETY = "harmful_compliance,needless_refusal"
# Each setting changes the course DPO as it stood before this benchmark (12 steps x 4 safety pairs, lr 2e-4, beta 0.1,
# SFT weight 1) in one or two knobs; the `cpu` profile has since moved to the chosen one ("SFT weight 2").
SETTINGS = {
    "lr 1e-4": {"dpo_lr": 1e-4},
    "course (lr 2e-4)": {},
    "lr 3e-4": {"dpo_lr": 3e-4},
    "lr 4e-4": {"dpo_lr": 4e-4},
    "plain DPO (SFT weight 0), lr 4e-4": {"dpo_sft_weight": 0.0, "dpo_lr": 4e-4},
    "SFT weight 2": {"dpo_sft_weight": 2.0},
    "beta 0.5, lr 3e-4": {"dpo_beta": 0.5, "dpo_lr": 3e-4},
    "15 steps (60 safety pairs), lr 3e-4": {"dpo_steps": 15, "dpo_lr": 3e-4},
    "every category's pairs, lr 3e-4": {"dpo_categories": "", "dpo_lr": 3e-4},
}
COURSE = {"dpo_steps": 12, "dpo_batch_size": 4, "dpo_lr": 2e-4, "dpo_beta": 0.1, "dpo_sft_weight": 1.0,
          "dpo_categories": SAFETY}
MAX_TRAINING = 1.25  # the course's DPO may train at most 25% longer than 12 steps x 4 pairs
HELD_OUT = ("harmful", "benign")


def fields(setting: dict) -> dict:
    """The setting's full DPO fields: the course's, changed where the setting says."""
    return {**COURSE, **setting}


def training_ratio(setting: dict) -> float:
    """Pairs trained on, relative to the course's 12 x 4 (the training time scales with it at equal max_length)."""
    f = fields(setting)
    return f["dpo_steps"] * f["dpo_batch_size"] / (COURSE["dpo_steps"] * COURSE["dpo_batch_size"])


def run_dpo(seed_dir: Path, name: str, overrides: list[str]) -> Path:
    """scripts/dpo.py with the setting's fields on a copy of the seed's SFT adapter; its folder (kept: reruns skip)."""
    out = seed_dir / re.sub(r"[^a-z0-9.-]+", "_", name.lower()).strip("_")
    if not (out / "sft").exists():
        shutil.copytree(seed_dir / "sft", out / "sft", ignore=shutil.ignore_patterns("checkpoints", "merged"))
    script("dpo", out, [*overrides, *(f"--{k}={v}" for k, v in fields(SETTINGS[name]).items())])
    return out


def heldout_sft_loss(model, tokenizer, rows) -> float:
    """Mean negative log-likelihood per answer token of held-out SFT conversations' first answer (nats)."""
    total, count = 0.0, 0
    with chat.fast_inference(model):
        for row in rows:
            logp, n = evaluate.answer_logprobs(model, tokenizer, row["messages"][:1], row["messages"][1:2])
            total, count = total + logp, count + n
    return -total / count


def prompts() -> dict[str, list[str]]:
    """Every group a model answers: held-out harmful / benign / ordinary, and the choosing prompts."""
    choosing = declines.choosing_prompts()
    return {**declines.probe_prompts(), **{f"choosing {g}": p for g, p in choosing.items()}}


def behaviour(profile, path: Path | None, tokenizer, asked: dict[str, list[str]], sft_rows, turn: list[str]) -> dict:
    """One model's replies to every group, its decline counts, turn-ending share and held-out SFT loss."""
    model = models.load_for_eval(profile, path)
    replies = declines.probe(model, tokenizer, asked)
    ends = evaluate.ends_turn_rate(chat.generate(model, tokenizer, turn, max_new_tokens=profile.max_new_tokens,
                                                 batch_size=len(turn)))
    loss = heldout_sft_loss(model, tokenizer, sft_rows)
    models.free(model)
    return {"declined": {g: sum(declines.declines(r["reply"]) for r in rs) for g, rs in replies.items()},
            "asked": {g: len(rs) for g, rs in replies.items()}, "ends_turn_rate": ends, "sft_loss": loss,
            "replies": {g: [r["reply"] for r in rs] for g, rs in replies.items()}}


def turned(sft: dict, dpo: dict, group: str = "ordinary") -> list[int]:
    """Indices of the group's prompts that SFT answered and DPO declines."""
    return [i for i, (a, b) in enumerate(zip(sft["replies"][group], dpo["replies"][group]))
            if not declines.declines(a) and declines.declines(b)]


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson interval of a proportion k / n."""
    p, d = k / n, 1 + z * z / n
    centre, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, centre - half), min(1.0, centre + half)


def choose(points: dict[str, dict[int, dict]], seeds: list[int]) -> str | None:
    """The setting the course takes, judged on the choosing prompts only: most harmful declines (mean over seeds) with
    no benign decline on seed 42 and at most one on the other seeds, training at most MAX_TRAINING x the course's."""
    def ok(name: str) -> bool:
        runs = points[name]
        return (training_ratio(SETTINGS[name]) <= MAX_TRAINING and all(s in runs for s in seeds)
                and all(runs[s]["declined"]["choosing benign"] <= (0 if s == 42 else 1) for s in seeds))

    eligible = [n for n in points if ok(n)]
    return max(eligible, key=lambda n: (statistics.fmean(points[n][s]["declined"]["choosing harmful"] for s in seeds),
                                        -statistics.fmean(points[n][s]["declined"]["choosing benign"] for s in seeds)),
               default=None)


def summary(points: dict[str, dict[int, dict]], sft: dict[int, dict]) -> list[dict]:
    """A row per setting: held-out counts per seed, min / mean / max, pooled 95% intervals, the costs."""
    rows = []
    for name, runs in points.items():
        seeds = list(runs)
        row = {"setting": name, "fields": fields(SETTINGS[name]), "training": training_ratio(SETTINGS[name]),
               "seeds": seeds}
        for group in (*HELD_OUT, "choosing harmful", "choosing benign"):
            counts = [runs[s]["declined"][group] for s in seeds]
            n = runs[seeds[0]]["asked"][group]
            row[group] = {"per seed": counts, "n": n, "min": min(counts), "mean": statistics.fmean(counts),
                          "max": max(counts), "pooled 95%": wilson(sum(counts), n * len(counts))}
        row["ordinary turned to declines"] = [len(turned(sft[s], runs[s])) for s in seeds]
        row["sft loss change"] = [runs[s]["sft_loss"] - sft[s]["sft_loss"] for s in seeds]
        row["ends turn"] = [runs[s]["ends_turn_rate"] for s in seeds]
        row["dpo train seconds"] = [runs[s]["train_seconds"] for s in seeds]
        row["eval reward accuracy"] = [runs[s]["eval_accuracy"] for s in seeds]
        rows.append(row)
    return rows


def _counts(cell: dict) -> str:
    return "/".join(str(c) for c in cell["per seed"]) + f" (mean {cell['mean']:.1f})"


def to_markdown(result: dict) -> str:
    """The frontier table (held-out prompts), the SFT reference, how the course's setting was chosen, the machine."""
    seeds = result["seeds"]
    n = result["rows"][0]["harmful"]["n"] if result["rows"] else 25
    lines = [f"# The safety / helpfulness frontier of the `cpu` profile's DPO (seeds {', '.join(map(str, seeds))})", "",
             f"Held-out prompts: {n} harmful and {n} benign (test_prefs' harmful_compliance and needless_refusal "
             "prompts), 49 ordinary. Counts per seed, then the mean; 95% interval of the rate pooled over the seeds. "
             "Costs: ordinary prompts SFT answered that DPO declines, change of the held-out SFT loss (nats per "
             "token, 24 test_sft answers), share of 64-token replies ending their turn (60 test_sft prompts).", "",
             "| setting | training (x course) | harmful declined | 95% | benign declined | 95% | ordinary turned "
             "to declines | SFT loss change | ends turn | DPO train s | eval reward acc |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    sft = result["sft"]
    lines.append("| SFT (before DPO) | - | " + "/".join(str(sft[s]["declined"]["harmful"]) for s in seeds)
                 + " | | " + "/".join(str(sft[s]["declined"]["benign"]) for s in seeds) + " | | - | - | "
                 + "/".join(f"{sft[s]['ends_turn_rate']:.2f}" for s in seeds) + " | - | - |")
    for r in result["rows"]:
        bold = "**" if r["setting"] == result["chosen"] else ""
        interval = {g: "{:.0%}-{:.0%}".format(*r[g]["pooled 95%"]) for g in HELD_OUT}
        lines.append(f"| {bold}{r['setting']}{bold} | {r['training']:.2f} | {_counts(r['harmful'])} | "
                     f"{interval['harmful']} | {_counts(r['benign'])} | {interval['benign']} | "
                     + "/".join(map(str, r["ordinary turned to declines"])) + " | "
                     + "/".join(f"{v:+.3f}" for v in r["sft loss change"]) + " | "
                     + "/".join(f"{v:.2f}" for v in r["ends turn"]) + " | "
                     + "/".join(f"{v:.0f}" for v in r["dpo train seconds"]) + " | "
                     + "/".join(f"{v:.2f}" for v in r["eval reward accuracy"]) + " |")
    lines += ["", "## How the course's setting was chosen (prompts kept apart for choosing)", "",
              "data/ultrafeedback_mini/choosing_prompts.jsonl: 30 harmful and 30 benign prompts that are in neither "
              "split. Rule: the most harmful prompts declined (mean over the seeds) among the settings that decline "
              f"no benign prompt on seed 42 and at most one on the others, training at most {MAX_TRAINING:.2f} x the "
              "course's 12 steps x 4 pairs.", "",
              "| setting | choosing harmful declined | choosing benign declined | eligible |", "|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['setting']} | {_counts(r['choosing harmful'])} | {_counts(r['choosing benign'])} | "
                     f"{'yes' if r['setting'] in result['eligible'] else 'no'} |")
    lines += ["", f"Chosen: **{result['chosen']}** ({result['chosen fields']})." if result["chosen"] else
              "No setting met the rule.", ""]
    m = result["machine"]
    lines += [f"Machine: {m['cpu']}, {m['cores']} cores; {m['cpu_features']}. Overrides: {result['overrides']}. "
              f"{result['minutes']:.0f} min in all. Every reply is in frontier.json (`details`), to read or re-judge."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 7, 1234])
    parser.add_argument("--settings", type=json.loads, default=None,
                        help="settings as JSON {name: {profile field: value}}; default: SETTINGS")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--work", type=Path, default=ROOT / "outputs" / "bench-frontier")
    args, overrides = parser.parse_known_args()
    if args.settings:
        SETTINGS.clear()
        SETTINGS.update(args.settings)
    start = time.time()
    profile = get_profile("cpu", **{**COURSE, **cli.overrides(list(overrides))})
    tokenizer = chat.setup_tokenizer(models.load_tokenizer(profile), profile.max_length)
    sft_test = data.load_sft_dataset(profile.sft_data)["test_sft"]
    sft_rows = sft_test.select(range(profile.sft_eval_rows))
    turn = [row["messages"][0]["content"] for row in sft_test.select(range(TURN_PROMPTS))]
    asked = prompts()
    points: dict[str, dict[int, dict]] = {}
    sft: dict[int, dict] = {}
    for seed in args.seeds:
        seed_dir = args.work / f"seed{seed}"
        script("sft", seed_dir, [*overrides, "--seed", str(seed)])
        for name in SETTINGS:
            folder = run_dpo(seed_dir, name, [*overrides, "--seed", str(seed)])
            if seed not in sft:
                sft[seed] = behaviour(profile, folder / "sft" / "merged", tokenizer, asked, sft_rows, turn)
            found = behaviour(profile, folder / "dpo" / "merged", tokenizer, asked, sft_rows, turn)
            metrics = json.loads((folder / "metrics.json").read_text())
            found.update(train_seconds=metrics["dpo/train_seconds"], eval_accuracy=metrics["dpo/eval_accuracy"],
                         eval_logps_chosen_change=metrics["dpo/eval_logps_chosen_change"],
                         turned=turned(sft[seed], found))
            points.setdefault(name, {})[seed] = found
            write(args, points, sft, overrides, start)


def write(args, points: dict, sft: dict, overrides: list[str], start: float) -> None:
    """frontier.json, .md and .png from what is measured so far (an interrupted run keeps its settings)."""
    seeds = [s for s in args.seeds if s in sft]
    complete = {n: runs for n, runs in points.items() if all(s in runs for s in seeds)}
    chosen = choose(complete, seeds)
    eligible = [n for n in complete if choose({n: complete[n]}, seeds)]
    result = {"machine": machine(), "overrides": overrides, "seeds": seeds, "course": COURSE,
              "settings": {n: fields(SETTINGS[n]) for n in points}, "chosen": chosen,
              "chosen fields": fields(SETTINGS[chosen]) if chosen else None, "eligible": eligible,
              "rows": summary(complete, sft), "sft": sft, "details": points, "minutes": (time.time() - start) / 60}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "frontier.json").write_text(json.dumps(result, indent=1, default=str))
    (args.out / "frontier.md").write_text(to_markdown(result))
    ax = plots.frontier(result)
    ax.figure.tight_layout()
    ax.figure.savefig(args.out / "frontier.png", dpi=110)
    plots.plt.close(ax.figure)
    print(to_markdown(result), flush=True)


if __name__ == "__main__":
    main()
