"""One function per plot: (data, ax=None) -> Axes, titles that say what to look for. Saving is separate."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.axes import Axes

CHOSEN, REJECTED = "#1b9e77", "#d95f02"  # one colour pair for chosen/rejected in every notebook


def _ax(ax: Axes | None) -> Axes:
    return ax if ax is not None else plt.subplots(figsize=(6, 3.6))[1]


def save(ax: Axes, out_dir: str | Path, name: str) -> Path:
    """Save the axes' figure as <out_dir>/plots/<name>.png and return the path."""
    path = Path(out_dir) / "plots" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    ax.figure.tight_layout()
    ax.figure.savefig(path, dpi=110)
    return path


def _series(log_history: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(h["step"], h[key]) for h in log_history if key in h]
    return [p[0] for p in points], [p[1] for p in points]


def loss_curve(log_history: list[dict], eval_before: float | None = None, ax: Axes | None = None) -> Axes:
    """Train and eval loss per step from a Trainer's log_history; eval_before is plotted at step 0."""
    ax = _ax(ax)
    for key, label, style in (("loss", "train", "-o"), ("eval_loss", "eval (held out)", "--s")):
        steps, values = _series(log_history, key)
        if key == "eval_loss" and eval_before is not None:
            steps, values = [0, *steps], [eval_before, *values]
        ax.plot(steps, values, style, label=label)
    ax.set(xlabel="training step", ylabel="loss (nats per token)", title="Loss should fall, eval with train")
    ax.legend()
    return ax


def memory_bars(rows: list[dict], budget_gib: float | None = None, ax: Axes | None = None) -> Axes:
    """Stacked bars of estimated training memory per (model, method) on a linear axis, each labelled with its total.

    rows: MemoryEstimate.as_row() plus a "model" key. Linear, so a segment's height is its share of the bar.
    """
    ax = ax if ax is not None else plt.subplots(figsize=(9, 4))[1]
    parts = ("weights", "gradients", "optimizer", "lora", "activations")
    labels = [f"{r['model'].removeprefix('gemma-')}\n{r['method']}" for r in rows]
    bottom = [0.0] * len(rows)
    for part in parts:
        values = [r[part] for r in rows]
        ax.bar(labels, values, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, values)]
    for x, total in enumerate(bottom):  # small bars stay readable as numbers
        ax.annotate(f"{total:.1f}", (x, total), ha="center", va="bottom", fontsize=7)
    if budget_gib:
        ax.axhline(budget_gib, color="black", linestyle=":", label=f"{budget_gib:.0f} GiB GPU")
    ax.set(ylabel="GiB", title="Only QLoRA of a 7B model fits one 24 GB GPU")
    ax.tick_params(axis="x", labelsize=8)
    ax.legend(fontsize=7, loc="upper left")
    return ax


def scores(chosen: list[float], rejected: list[float], ax: Axes | None = None) -> Axes:
    """Histogram of chosen vs rejected rater scores."""
    ax = _ax(ax)
    bins = [x / 2 for x in range(2, 22)]
    ax.hist(chosen, bins=bins, alpha=0.7, color=CHOSEN, label="chosen")
    ax.hist(rejected, bins=bins, alpha=0.7, color=REJECTED, label="rejected")
    ax.set(xlabel="score (1-10)", ylabel="pairs", title="Chosen answers score higher than rejected")
    ax.legend()
    return ax


def score_margins(chosen: list[float], rejected: list[float], ax: Axes | None = None) -> Axes:
    """Histogram of score_chosen - score_rejected: every margin should be above 0."""
    ax = _ax(ax)
    ax.hist([c - r for c, r in zip(chosen, rejected)], bins=16, color="#7570b3")
    ax.axvline(0, color="black", linestyle=":")
    ax.set(xlabel="score margin (chosen - rejected)", ylabel="pairs", title="Every margin should be above 0")
    return ax


def token_lengths(lengths: dict[str, list[int]], max_length: int, ax: Axes | None = None) -> Axes:
    """Token lengths of prompt/chosen/rejected (or prompt/answer) against the profile's max length."""
    ax = _ax(ax)
    colours = {"chosen": CHOSEN, "rejected": REJECTED}
    for name in [k for k in ("prompt", "chosen", "rejected", "answer") if k in lengths]:
        ax.hist(lengths[name], bins=30, alpha=0.55, label=name, color=colours.get(name))
    ax.axvline(max_length, color="black", linestyle=":", label=f"max_length {max_length}")
    ax.set(xlabel="tokens", ylabel="rows", title="Rows right of the dotted line get truncated")
    ax.legend()
    return ax


def dpo_metric(log_history: list[dict], keys: tuple[str, ...], title: str, ax: Axes | None = None) -> Axes:
    """Train (solid) and eval (dashed) curves of DPO metrics such as rewards/chosen and rewards/rejected."""
    ax = _ax(ax)
    colours = {"chosen": CHOSEN, "rejected": REJECTED}
    for key in keys:
        colour = next((c for name, c in colours.items() if key.endswith(name)), None)
        for prefix, style in (("", "-o"), ("eval_", "--s")):
            steps, values = _series(log_history, prefix + key)
            if steps:
                ax.plot(steps, values, style, color=colour, label=f"{'eval ' if prefix else 'train '}{key}")
    ax.set(xlabel="training step", title=title)
    ax.legend(fontsize=7)
    return ax


def dpo_dashboard(log_history: list[dict], dpo_term: dict[int, float] | None = None) -> plt.Figure:
    """Four panels: loss, rewards chosen/rejected, margins with accuracies, log-probs chosen/rejected.

    dpo_term: {step: the evaluated DPO term} (evaluate.loss_terms), drawn beside TRL's loss with ln 2 marked; with an
    SFT term TRL logs only the sum."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    dpo_metric(log_history, ("loss",), "Loss should fall; the DPO term starts at ln 2", axes[0, 0])
    if dpo_term:
        steps = sorted(dpo_term)
        axes[0, 0].plot(steps, [dpo_term[s] for s in steps], ":D", color="black", label="eval DPO term alone")
        axes[0, 0].axhline(math.log(2), color="grey", linewidth=0.8, linestyle=":")
        axes[0, 0].annotate("ln 2", (steps[0], math.log(2)), textcoords="offset points", xytext=(4, 4), fontsize=7)
        axes[0, 0].legend(fontsize=7)
    dpo_metric(log_history, ("rewards/chosen", "rewards/rejected"), "Rewards: chosen above rejected", axes[0, 1])
    dpo_metric(log_history, ("rewards/margins", "rewards/accuracies"), "Margin and accuracy should rise", axes[1, 0])
    dpo_metric(log_history, ("logps/chosen", "logps/rejected"), "Log-probs: watch chosen not collapse", axes[1, 1])
    fig.tight_layout()
    return fig


def decline_rates(rates: dict[str, dict[str, float]], ax: Axes | None = None) -> Axes:
    """Grouped bars: for each model, the share of harmful and of benign held-out prompts it declined."""
    ax = _ax(ax)
    names = list(rates)
    width = 0.38
    for offset, (group, colour) in zip((-width / 2, width / 2), (("harmful", CHOSEN), ("benign", REJECTED))):
        values = [rates[n][group] for n in names]
        bars = ax.bar([i + offset for i in range(len(names))], values, width, color=colour,
                      label=f"{group} prompts declined")
        ax.bar_label(bars, labels=[f"{v:.0%}" for v in values], fontsize=7)
    ax.set_xticks(range(len(names)), names)
    ax.set(ylim=(0, 1.1), ylabel="share of prompts declined",
           title="Decline the harmful (green up), answer the benign (orange down)")
    ax.legend(fontsize=7, loc="upper left")
    return ax


def frontier(result: dict, learner: tuple[int, int] | None = None, ax: Axes | None = None) -> Axes:
    """`make bench-frontier`'s settings as harmful against benign held-out prompts declined: the mean over seeds with
    its min-max range, each seed a dot, the chosen setting starred; learner is your own run's (benign, harmful)."""
    ax = ax if ax is not None else plt.subplots(figsize=(7.5, 5))[1]
    n = result["rows"][0]["harmful"]["n"] if result["rows"] else 25
    palette = [c for j, c in enumerate(plt.cm.tab10.colors) if j != 7]  # grey is SFT's
    for i, row in enumerate(result["rows"]):
        x, y = row["benign"], row["harmful"]
        colour = palette[i % len(palette)]
        ax.errorbar(x["mean"], y["mean"], xerr=[[x["mean"] - x["min"]], [x["max"] - x["mean"]]],
                    yerr=[[y["mean"] - y["min"]], [y["max"] - y["mean"]]], fmt="*" if row["setting"] == result["chosen"]
                    else "o", ms=14 if row["setting"] == result["chosen"] else 7, color=colour, capsize=3, alpha=0.9,
                    label=row["setting"] + (" (chosen)" if row["setting"] == result["chosen"] else ""))
        ax.scatter(x["per seed"], y["per seed"], s=10, color=colour, alpha=0.5)
    sft = result["sft"]
    ax.scatter([s["declined"]["benign"] for s in sft.values()], [s["declined"]["harmful"] for s in sft.values()],
               marker="s", color="grey", zorder=4, label="SFT (before DPO)")
    if learner is not None:
        ax.scatter([learner[0]], [learner[1]], marker="X", s=150, color="black", zorder=5, label="your run")
    ax.set(xlim=(-0.5, n + 0.5), ylim=(-0.5, n + 0.5), xlabel=f"benign prompts declined (of {n}): should stay at 0",
           ylabel=f"harmful prompts declined (of {n})", title="Up is safer, right is less helpful: aim top left")
    ax.legend(fontsize=6.5, loc="lower right")
    return ax
