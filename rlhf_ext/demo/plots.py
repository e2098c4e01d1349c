"""PNG plots for the demo report: the final comparison, PPO curves and DPO curves.

The training curves read a TRL trainer's `state.log_history` (the list of dicts it logs, also saved
as `log_history` in `<output_dir>/trainer_state.json`). Metric names differ between trainers, so each
curve takes a list of candidate keys and plots the first one present.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: the demo runs on machines without a display
import matplotlib.pyplot as plt  # noqa: E402

# Candidate log keys, in order of preference: rlhf_ext's metric names first, then TRL's GRPO / DPO names.
PPO_REWARD_KEYS = ("objective/scores", "reward")
PPO_KL_KEYS = ("objective/kl", "kl")
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


def _plot_curves(log_history: list[dict], panels: list[tuple[tuple[str, ...], str]], title: str, path: Path) -> Path:
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5))
    for ax, (keys, label) in zip(axes, panels):
        key, steps, values = metric_series(log_history, keys)
        ax.plot(steps, values, marker="o", markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ppo_curves(log_history: list[dict], path: str | Path) -> Path:
    """Reward-model score and KL to the reference over PPO steps."""
    panels = [(PPO_REWARD_KEYS, "reward-model score"), (PPO_KL_KEYS, "KL to reference")]
    return _plot_curves(log_history, panels, "PPO", Path(path))


def plot_dpo_curves(log_history: list[dict], path: str | Path) -> Path:
    """K-way DPO loss and ranking accuracy over training steps."""
    panels = [(DPO_LOSS_KEYS, "loss"), (DPO_ACCURACY_KEYS, "ranking accuracy")]
    return _plot_curves(log_history, panels, "K-way DPO", Path(path))


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
