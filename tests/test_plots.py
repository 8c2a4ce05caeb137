"""Each plot function draws labelled axes with a title, and save() writes a PNG under plots/."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

from utils import plots  # noqa: E402

LOG = [{"loss": 3.0, "step": 1}, {"loss": 2.5, "step": 2}, {"eval_loss": 2.6, "step": 2},
       {"rewards/chosen": 0.1, "rewards/rejected": -0.2, "rewards/margins": 0.3, "rewards/accuracies": 0.75,
        "logps/chosen": -40.0, "logps/rejected": -50.0, "step": 1},
       {"eval_rewards/chosen": 0.2, "eval_rewards/rejected": -0.4, "eval_loss": 0.5, "step": 2}]


def test_loss_curve_has_train_and_eval_with_step0(tmp_path):
    ax = plots.loss_curve(LOG[:3], eval_before=3.4)
    lines = {line.get_label(): list(line.get_xdata()) for line in ax.get_lines()}
    assert lines["train"] == [1, 2] and lines["eval (held out)"] == [0, 2]
    assert ax.get_xlabel() == "training step" and ax.get_title()
    path = plots.save(ax, tmp_path, "loss")
    assert path == tmp_path / "plots" / "loss.png" and path.stat().st_size > 1000


def test_preference_plots_use_the_chosen_rejected_colours():
    ax = plots.scores([8.0, 9.0], [3.0, 2.0])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["chosen", "rejected"]
    assert matplotlib.colors.to_hex(ax.containers[0].patches[0].get_facecolor()) == plots.CHOSEN
    assert plots.score_margins([8.0], [3.0]).get_xlabel().startswith("score margin")
    ax = plots.token_lengths({"prompt": [10, 20], "chosen": [30], "rejected": [40]}, 256)
    assert "max_length 256" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_memory_bars_stack_components():
    rows = [{"model": "gemma-7b", "method": m, "weights": w, "gradients": 0, "optimizer": 0, "lora": 0.1,
             "activations": 1.0} for m, w in (("full", 16.0), ("qlora", 5.0))]
    ax = plots.memory_bars(rows, budget_gib=24)
    assert ax.get_yscale() == "linear", "on a log axis a segment's height no longer shows its share"
    assert len(ax.patches) == 2 * 5
    tops = [bar.get_y() + bar.get_height() for bar in ax.patches[-2:]]  # the last part sits on top of the stack
    assert tops == [17.1, 6.1] and [t.get_text() for t in ax.texts] == ["17.1", "6.1"]


def test_dpo_dashboard_has_four_panels_with_train_and_eval():
    fig = plots.dpo_dashboard(LOG)
    assert len(fig.axes) == 4
    labels = [line.get_label() for line in fig.axes[1].get_lines()]
    assert "train rewards/chosen" in labels and "eval rewards/rejected" in labels
    assert "eval DPO term alone" not in [line.get_label() for line in fig.axes[0].get_lines()]


def test_dpo_dashboard_draws_the_dpo_term_beside_the_total_loss():
    fig = plots.dpo_dashboard(LOG, dpo_term={0: 0.693, 2: 0.41})
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert list(lines["eval DPO term alone"].get_ydata()) == [0.693, 0.41]
    assert "train loss" in lines and "ln 2" in [t.get_text() for t in fig.axes[0].texts]
