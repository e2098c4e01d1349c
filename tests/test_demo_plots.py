"""The demo's plots say what a reader needs to judge them (issue 20 item 5): reference lines with labels, whole-step
ticks, per-rollout clip fractions, the report's policy names and the length cap. Asserts on figure artists."""

import math

import matplotlib.pyplot as plt
import pytest

from demo.plots import (
    comparison_figure,
    dpo_curves_figure,
    plot_dpo_curves,
    ppo_curves_figure,
    rollout_means,
)
from demo.report import comparison_table

KEYS = ("mean_vader", "vader_stderr", "win_rate_vs_base", "kl_to_base", "mean_length_tokens")
AT_CAP = {
    "base": dict(zip(KEYS, (0.35, 0.04, 0.5, 0.0, 31.8))),
    "ppo": dict(zip(KEYS, (0.69, 0.03, 0.8, 12.0, 32.0))),
    "dpo": dict(zip(KEYS, (0.63, 0.04, 0.83, 4.4, 31.9))),
}


def dpo_history(steps=(5, 10, 15, 20)) -> list[dict]:
    """K-way DPO-like logs every 5 steps, then the end-of-training summary that carries the last metrics."""
    history = [
        {"step": s, "loss": 3.1 - 0.01 * s, "rewards/accuracies": 0.5 + 0.01 * s, "rewards/top1_accuracy": 0.3}
        for s in steps
    ]
    history.append({"step": 24, "train_loss": 3.0, "train_runtime": 9.0, "rewards/accuracies": 0.6})
    return history


def ppo_history(rollouts: int = 3) -> list[dict]:
    """demo.yaml's layout: 4 optimizer steps a rollout, logged every 2; the rollout metrics come with the first log
    of each rollout; the clip fraction is 0 there (ratio 1) and high on the rollout's second log."""
    history = []
    for r in range(rollouts):
        first, second = 4 * r + 2, 4 * r + 4
        history.append({"step": first, "policy/clipfrac_avg": 0.0, "objective/scores": 0.1 * r, "objective/kl": r,
                        "val/explained_variance": 0.1 * r})  # fmt: skip
        history.append({"step": second, "policy/clipfrac_avg": 0.3 + 0.01 * r})
    return history


def legend_texts(ax) -> list[str]:
    legend = ax.get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend else []


def horizontal_lines(ax) -> list[float]:
    """y of every horizontal line (axhline) in `ax`."""
    return [line.get_ydata()[0] for line in ax.get_lines() if len(set(line.get_ydata())) == 1 and
            list(line.get_xdata()) == [0, 1]]  # fmt: skip


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.mark.parametrize("k", [2, 4])
def test_dpo_figure_draws_log_k_factorial_and_the_chance_levels(k):
    loss, pairwise, top1 = dpo_curves_figure(dpo_history(), k=k).axes
    assert horizontal_lines(loss) == pytest.approx([math.log(math.factorial(k))])
    assert any(f"log {k}!" in text for text in legend_texts(loss))
    assert horizontal_lines(pairwise) == pytest.approx([0.5])
    assert any("chance" in text for text in legend_texts(pairwise))
    assert horizontal_lines(top1) == pytest.approx([1 / k])
    assert any("chance" in text for text in legend_texts(top1))
    assert [ax.get_title() for ax in (loss, pairwise, top1)] == ["loss", "rewards/accuracies",
                                                                 "rewards/top1_accuracy"]  # fmt: skip
    assert list(pairwise.get_lines()[0].get_xdata()) == [5, 10, 15, 20, 24]


def test_dpo_figure_ticks_whole_steps_only(tmp_path):
    fig = dpo_curves_figure(dpo_history(), k=4)
    fig.canvas.draw()
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    assert plot_dpo_curves(dpo_history(), tmp_path / "dpo.png", k=4).read_bytes()[:4] == b"\x89PNG"


def test_rollout_means_group_the_steps_of_each_rollout():
    steps, values = [2, 4, 6, 8, 10], [0.0, 0.4, 0.0, 0.2, 0.1]
    assert rollout_means(steps, values, [2, 6, 10]) == ([3.0, 7.0, 10.0], pytest.approx([0.2, 0.1, 0.1]))
    assert rollout_means([1, 2, 3], [1.0, 2.0, 3.0], [2]) == ([2.0], [2.0])  # steps before the first rollout join it


def test_ppo_clip_fraction_panel_shows_rollout_means_and_explains_the_sawtooth():
    clip = ppo_curves_figure(ppo_history()).axes[3]
    per_step, per_rollout = clip.get_lines()[:2]
    assert list(per_step.get_ydata()) == pytest.approx([0.0, 0.3, 0.0, 0.31, 0.0, 0.32])
    assert list(per_rollout.get_xdata()) == [3.0, 7.0, 11.0]
    assert list(per_rollout.get_ydata()) == pytest.approx([0.15, 0.155, 0.16])
    assert legend_texts(clip) == ["per logged step", "rollout mean"]
    note = " ".join(t.get_text() for t in clip.texts)
    assert "ratio 1" in note and "first" in note


def test_comparison_names_policies_as_the_table_does():
    fig = comparison_figure(AT_CAP)
    table = comparison_table(AT_CAP)
    for ax in fig.axes:
        labels = [t.get_text() for t in ax.get_xticklabels()]
        assert labels == ["base", "PPO", "K-way DPO"]
        assert all(f"| {label} |" in table for label in labels)


def test_comparison_length_panel_draws_the_cap_and_says_every_reply_hits_it():
    length = comparison_figure(AT_CAP, max_new_tokens=32).axes[3]
    assert 32 in horizontal_lines(length)
    assert legend_texts(length) == ["cap: max_new_tokens = 32"]
    assert "at the cap" in " ".join(t.get_text() for t in length.texts)
    shorter = {n: {**m, "mean_length_tokens": 20.0} for n, m in AT_CAP.items()}
    quiet = comparison_figure(shorter, max_new_tokens=32).axes[3]
    assert 32 in horizontal_lines(quiet) and not quiet.texts  # the cap is drawn; no claim that it decided
