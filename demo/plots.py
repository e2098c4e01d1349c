"""PNG plots for the demo report: the final comparison, PPO curves and DPO curves.

The training curves read a TRL trainer's `state.log_history` (the list of dicts it logs, also saved
as `log_history` in `<output_dir>/trainer_state.json`). Metric names differ between trainers, so each
curve takes a list of candidate keys and plots the first one present.

The PPO figure has four panels, per optimizer step: the reward-model score and the KL to the reference
(`objective/scores`, `objective/kl`, logged once per rollout), the critic's explained variance
(`val/explained_variance`, once per rollout: 1 - Var(R - V) / Var(R) of the rollout's values, before the critic
trains on it) and the fraction of policy-ratio terms the PPO clip cut (`policy/clipfrac_avg`, every logged step,
with its mean per rollout: a rollout's first steps have ratio 1, so the per-step curve is a sawtooth).

Every panel draws the line a reader needs to judge its curve: explained variance 0 (a critic no better than the
mean); for K-way DPO the loss of a list whose scores are all equal (log K!, where training starts) and the chance
levels of the ranking accuracies (pairwise 1/2, top-1 1/K).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: the demo runs on machines without a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .labels import policy_label  # noqa: E402

# Candidate log keys, in order of preference: rlhf_ext's metric names first, then TRL's GRPO / DPO names.
PPO_REWARD_KEYS = ("objective/scores", "reward")
PPO_KL_KEYS = ("objective/kl", "kl")
PPO_EXPLAINED_VARIANCE_KEYS = ("val/explained_variance",)
PPO_CLIPFRAC_KEYS = ("policy/clipfrac_avg", "clip_ratio/region_mean")
DPO_LOSS_KEYS = ("loss",)
DPO_ACCURACY_KEYS = ("rewards/accuracies", "rewards/accuracy", "accuracy")
DPO_TOP1_KEYS = ("rewards/top1_accuracy", "top1_accuracy")

COMPARISON_PANELS = (
    ("mean_vader", "mean VADER compound (higher = warmer)"),
    ("win_rate_vs_base", "win rate against the base"),
    ("kl_to_base", "KL to the base (nats per completion)"),
    ("mean_length_tokens", "mean length (tokens)"),
)
AT_CAP = 0.95  # every policy's mean length at least this share of the cap: the panel says the cap decided it

CLIPFRAC_NOTE = "dips: a rollout's first steps, where the policy\nstill is the one that sampled (ratio 1, no clip)"


@dataclass(frozen=True)
class Reference:
    """A horizontal line a reader compares a curve with; `label` goes into the panel's legend."""

    y: float
    label: str


@dataclass(frozen=True)
class Panel:
    """One training-curve panel: the candidate log keys, the y label, the reference lines, a note drawn in the
    panel, and for a per-step metric of a trainer that logs rollouts (PPO), the keys that mark a rollout."""

    keys: tuple[str, ...]
    ylabel: str
    references: tuple[Reference, ...] = ()
    rollouts_from: tuple[str, ...] | None = None  # keys logged once per rollout: draw the mean per rollout too
    note: str | None = None


def metric_series(log_history: list[dict], keys: tuple[str, ...]) -> tuple[str, list[float], list[float]]:
    """(key, steps, values) for the first of `keys` logged in `log_history`; training logs only."""
    for key in keys:
        points = [(entry.get("step", i), entry[key]) for i, entry in enumerate(log_history) if key in entry]
        if points:
            steps, values = zip(*points)
            return key, list(steps), list(values)
    seen = sorted({k for entry in log_history for k in entry})
    raise KeyError(f"none of {list(keys)} is in the log history (keys seen: {seen})")


def rollout_means(steps: list[float], values: list[float], rollout_steps: list[float]):
    """(steps, means): `values` averaged per rollout, a rollout running from one of `rollout_steps` (the steps
    that logged a rollout's metrics) to the next; each mean sits at the middle of its rollout's logged steps.
    Steps before the first rollout step count towards the first rollout."""
    groups: dict[int, list[tuple[float, float]]] = {}
    for step, value in zip(steps, values):
        index = max(sum(1 for start in rollout_steps if start <= step) - 1, 0)
        groups.setdefault(index, []).append((step, value))
    points = [group for _, group in sorted(groups.items())]
    mid = [sum(s for s, _ in g) / len(g) for g in points]
    means = [sum(v for _, v in g) / len(g) for g in points]
    return mid, means


# 2 panels a row.
PPO_PANELS = (
    Panel(PPO_REWARD_KEYS, "reward-model score"),
    Panel(PPO_KL_KEYS, "KL to reference (nats per completion)"),
    Panel(PPO_EXPLAINED_VARIANCE_KEYS, "critic's explained variance", (Reference(0.0, "0: no better than the mean"),)),
    Panel(PPO_CLIPFRAC_KEYS, "policy clip fraction", rollouts_from=PPO_REWARD_KEYS, note=CLIPFRAC_NOTE),
)


def dpo_panels(k: int) -> tuple[Panel, ...]:
    """The K-way DPO panels for lists of `k` completions: the loss against its start log K! (all implicit rewards
    equal: the policy is still the reference), and the pairwise and top-1 accuracies against chance."""
    start = math.lgamma(k + 1)
    return (
        Panel(
            DPO_LOSS_KEYS, "Plackett-Luce DPO loss", (Reference(start, f"log {k}! = {start:.2f}: policy = reference"),)
        ),
        Panel(DPO_ACCURACY_KEYS, "pairwise ranking accuracy", (Reference(0.5, "chance 0.5"),)),
        Panel(DPO_TOP1_KEYS, "top-1 accuracy", (Reference(1 / k, f"chance 1/{k} = {1 / k:.2f}"),)),
    )


def _draw_panel(ax, panel: Panel, log_history: list[dict]) -> None:
    """One panel: the logged curve, its rollout means if asked, the reference lines, labels and legend."""
    key, steps, values = metric_series(log_history, panel.keys)
    if panel.rollouts_from:
        ax.plot(steps, values, marker="o", markersize=3, alpha=0.35, label="per logged step")
        _, rollout_steps, _ = metric_series(log_history, panel.rollouts_from)
        ax.plot(*rollout_means(steps, values, rollout_steps), marker="s", linewidth=2, color="C0", label="rollout mean")
    else:
        ax.plot(steps, values, marker="o", markersize=3)
    for ref in panel.references:
        ax.axhline(ref.y, color="grey", linestyle="--", linewidth=1, label=ref.label)
    if panel.note:  # headroom above the curve for the note (upper left) and the legend (upper right)
        low, high = ax.get_ylim()
        ax.set_ylim(low, high + 0.45 * (high - low))
        ax.text(0.02, 0.97, panel.note, transform=ax.transAxes, fontsize=7, va="top", color="dimgrey")
    if panel.references or panel.rollouts_from:
        ax.legend(fontsize=7, loc="upper right" if panel.note else "best")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers: no 7.5 ticks
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(panel.ylabel)
    ax.set_title(key)
    ax.grid(alpha=0.3)


def curves_figure(log_history: list[dict], panels: tuple[Panel, ...], title: str, per_row: int = 2):
    """A matplotlib figure with one panel per `Panel`, `per_row` to a row; a KeyError names the panel whose keys
    the log history lacks (no panel is silently left out)."""
    rows = -(-len(panels) // per_row)
    cols = min(per_row, len(panels))
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.2 * rows + 0.4), squeeze=False)
    try:
        for ax, panel in zip(axes.flat, panels):
            _draw_panel(ax, panel, log_history)
    except KeyError:
        plt.close(fig)
        raise
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def ppo_curves_figure(log_history: list[dict]):
    """The PPO figure: score, KL, the critic's explained variance and the policy clip fraction, per step."""
    return curves_figure(log_history, PPO_PANELS, "PPO: reward, KL, critic and clipping")


def plot_ppo_curves(log_history: list[dict], path: str | Path) -> Path:
    """Reward-model score, KL to the reference, the critic's explained variance and the policy clip fraction over
    PPO steps, as a PNG at `path`."""
    return _save(ppo_curves_figure(log_history), Path(path))


def dpo_curves_figure(log_history: list[dict], k: int):
    """The K-way DPO figure for lists of `k` completions: loss, pairwise and top-1 accuracy, each against its
    reference line."""
    return curves_figure(log_history, dpo_panels(k), f"K-way DPO (K = {k}): loss and ranking accuracy", per_row=3)


def plot_dpo_curves(log_history: list[dict], path: str | Path, k: int) -> Path:
    """K-way DPO loss and ranking accuracies over training steps, lists of `k` completions, as a PNG at `path`."""
    return _save(dpo_curves_figure(log_history, k), Path(path))


def _mark_length_cap(ax, lengths: list[float], max_new_tokens: int) -> None:
    """The cap every reply's length is cut at, and, when every policy sits at it, a note that the panel
    cannot tell the policies apart."""
    ax.axhline(
        max_new_tokens, color="black", linestyle=":", linewidth=1.2, label=f"cap: max_new_tokens = {max_new_tokens}"
    )
    if min(lengths) >= AT_CAP * max_new_tokens:
        box = {"facecolor": "white", "alpha": 0.85, "edgecolor": "grey"}
        note = "every policy at the cap:\nreplies are cut, not shorter"
        ax.text(0.5, 0.5, note, transform=ax.transAxes, ha="center", va="center", fontsize=9, bbox=box)
    ax.set_ylim(0, max_new_tokens * 1.3)  # room above the cap for its legend
    ax.legend(fontsize=7, loc="upper center")


def comparison_figure(metrics: dict[str, dict[str, float]], max_new_tokens: int | None = None):
    """Bar chart of every policy's held-out metrics, one panel per metric, each policy named as in the report's
    table; with `max_new_tokens`, the length panel draws that cap."""
    names = list(metrics)
    labels = [policy_label(n) for n in names]
    fig, axes = plt.subplots(1, len(COMPARISON_PANELS), figsize=(4 * len(COMPARISON_PANELS), 3.5))
    for ax, (key, title) in zip(axes, COMPARISON_PANELS):
        values = [metrics[n][key] for n in names]
        errors = [metrics[n]["vader_stderr"] for n in names] if key == "mean_vader" else None
        ax.bar(labels, values, yerr=errors, capsize=4, color=[f"C{i}" for i in range(len(names))])
        if key == "win_rate_vs_base":
            ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)  # the base against itself
        if key == "mean_length_tokens" and max_new_tokens is not None:
            _mark_length_cap(ax, values, max_new_tokens)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Held-out prompts")
    fig.tight_layout()
    return fig


def plot_comparison(metrics: dict[str, dict[str, float]], path: str | Path, max_new_tokens: int | None = None) -> Path:
    """`comparison_figure` as a PNG at `path`."""
    return _save(comparison_figure(metrics, max_new_tokens), Path(path))
