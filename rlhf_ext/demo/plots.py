"""PNG plots for the demo report: the final comparison, PPO curves and DPO curves.

The training curves read a TRL trainer's `state.log_history` (the list of dicts it logs, also saved
as `log_history` in `<output_dir>/trainer_state.json`). Metric names differ between trainers, so each
curve takes a list of candidate keys and plots the first one present.

The PPO figure has four panels, per optimizer step: the reward-model score and the KL to the reference
(`objective/scores`, `objective/kl`, logged once per rollout), the critic's explained variance
(`val/explained_variance`, once per rollout: 1 - Var(R - V) / Var(R) of the rollout's values, before the critic
trains on it) and the fraction of policy-ratio terms the PPO clip cut (`policy/clipfrac_avg`, every logged step).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: the demo runs on machines without a display
import matplotlib.pyplot as plt  # noqa: E402

# Candidate log keys, in order of preference: rlhf_ext's metric names first, then TRL's GRPO / DPO names.
PPO_REWARD_KEYS = ("objective/scores", "reward")
PPO_KL_KEYS = ("objective/kl", "kl")
PPO_EXPLAINED_VARIANCE_KEYS = ("val/explained_variance",)
PPO_CLIPFRAC_KEYS = ("policy/clipfrac_avg", "clip_ratio/region_mean")
DPO_LOSS_KEYS = ("loss",)
DPO_ACCURACY_KEYS = ("rewards/accuracies", "rewards/accuracy", "accuracy")

COMPARISON_PANELS = (
    ("mean_vader", "mean VADER compound (higher = warmer)"),
    ("win_rate_vs_base", "win rate against the base"),
    ("kl_to_base", "KL to the base (nats per completion)"),
    ("mean_length_tokens", "mean length (tokens)"),
)


def metric_series(log_history: list[dict], keys: tuple[str, ...]) -> tuple[str, list[float], list[float]]:
    """(key, steps, values) for the first of `keys` logged in `log_history`; training logs only."""
    for key in keys:
        points = [(entry.get("step", i), entry[key]) for i, entry in enumerate(log_history) if key in entry]
        if points:
            steps, values = zip(*points)
            return key, list(steps), list(values)
    seen = sorted({k for entry in log_history for k in entry})
    raise KeyError(f"none of {list(keys)} is in the log history (keys seen: {seen})")


# (candidate keys, y label, a reference line or None); 2 panels a row.
PPO_PANELS = (
    (PPO_REWARD_KEYS, "reward-model score", None),
    (PPO_KL_KEYS, "KL to reference (nats per completion)", None),
    (PPO_EXPLAINED_VARIANCE_KEYS, "critic's explained variance", 0.0),
    (PPO_CLIPFRAC_KEYS, "policy clip fraction", None),
)
DPO_PANELS = ((DPO_LOSS_KEYS, "loss", None), (DPO_ACCURACY_KEYS, "ranking accuracy", None))


def curves_figure(log_history: list[dict], panels, title: str, per_row: int = 2):
    """A matplotlib figure with one panel per (keys, label, reference line) in `panels`, `per_row` to a row; a
    KeyError names the panel whose keys the log history lacks (no panel is silently left out)."""
    rows = -(-len(panels) // per_row)
    cols = min(per_row, len(panels))
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.2 * rows + 0.4), squeeze=False)
    for ax, (keys, label, reference) in zip(axes.flat, panels):
        try:
            key, steps, values = metric_series(log_history, keys)
        except KeyError:
            plt.close(fig)
            raise
        ax.plot(steps, values, marker="o", markersize=3)
        if reference is not None:
            ax.axhline(reference, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.set_title(key)
        ax.grid(alpha=0.3)
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


def plot_dpo_curves(log_history: list[dict], path: str | Path) -> Path:
    """K-way DPO loss and ranking accuracy over training steps."""
    return _save(curves_figure(log_history, DPO_PANELS, "K-way DPO"), Path(path))


def plot_comparison(metrics: dict[str, dict[str, float]], path: str | Path) -> Path:
    """Bar chart of every policy's held-out metrics, one panel per metric."""
    names = list(metrics)
    fig, axes = plt.subplots(1, len(COMPARISON_PANELS), figsize=(4 * len(COMPARISON_PANELS), 3.5))
    for ax, (key, label) in zip(axes, COMPARISON_PANELS):
        values = [metrics[n][key] for n in names]
        errors = [metrics[n]["vader_stderr"] for n in names] if key == "mean_vader" else None
        ax.bar(names, values, yerr=errors, capsize=4, color=[f"C{i}" for i in range(len(names))])
        if key == "win_rate_vs_base":
            ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)  # the base against itself
        ax.set_title(label, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Held-out prompts")
    fig.tight_layout()
    return _save(fig, Path(path))
