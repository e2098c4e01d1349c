import pytest

from demo.evaluation import PolicySamples
from demo.plots import (
    metric_series,
    plot_comparison,
    plot_dpo_curves,
    plot_ppo_curves,
    ppo_curves_figure,
)
from demo.report import comparison_table, render_report

PNG_MAGIC = b"\x89PNG"
KEYS = ("mean_vader", "vader_stderr", "win_rate_vs_base", "kl_to_base", "mean_length_tokens")
POLICIES = {"base": dict(zip(KEYS, (0.3, 0.05, 0.5, 0.0, 30.0))), "ppo": dict(zip(KEYS, (0.6, 0.04, 0.8, 4.2, 28.5)))}


def test_metric_series_takes_the_first_logged_key_and_skips_entries_without_it():
    history = [{"step": 1, "reward": 0.1}, {"step": 2, "reward": 0.3}, {"step": 2, "train_runtime": 9.0}]
    assert metric_series(history, ("objective/scores", "reward")) == ("reward", [1, 2], [0.1, 0.3])
    with pytest.raises(KeyError, match="objective/kl"):
        metric_series(history, ("objective/kl",))


def ppo_log_history(steps: int = 8, rollout_every: int = 4) -> list[dict]:
    """A PPOTrainer-like log history: update metrics every step, rollout metrics on each rollout's first step."""
    history = []
    for step in range(1, steps + 1):
        entry = {"step": step, "loss": 0.1, "policy/clipfrac_avg": 0.01 * step}
        if step % rollout_every == 1:
            entry.update(
                {"objective/scores": 0.1 * step, "objective/kl": 0.5 * step, "val/explained_variance": 0.05 * step}
            )
        history.append(entry)
    history.append({"step": steps, "train_runtime": 9.0})
    return history


PPO_PANEL_KEYS = ["objective/scores", "objective/kl", "val/explained_variance", "policy/clipfrac_avg"]


def test_ppo_figure_plots_score_kl_explained_variance_and_clipfrac_per_step():
    history = ppo_log_history()
    fig = ppo_curves_figure(history)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == PPO_PANEL_KEYS
    for ax, key in zip(panels, PPO_PANEL_KEYS):
        line = ax.get_lines()[0]  # the curve; a reference line (explained variance 0) comes after it
        assert list(line.get_xdata()) == [e["step"] for e in history if key in e]
        assert list(line.get_ydata()) == pytest.approx([e[key] for e in history if key in e])
    assert [ax.get_xlabel() for ax in panels] == ["optimizer step"] * 4


@pytest.mark.parametrize("missing", PPO_PANEL_KEYS)
def test_ppo_figure_names_a_missing_panel_instead_of_dropping_it(missing, tmp_path):
    history = [{k: v for k, v in entry.items() if k != missing} for entry in ppo_log_history()]
    with pytest.raises(KeyError, match=missing):
        plot_ppo_curves(history, tmp_path / "ppo.png")
    assert not (tmp_path / "ppo.png").exists()


def test_plots_are_written_as_png(tmp_path):
    ppo_log = ppo_log_history()
    dpo_log = [{"step": s, "loss": 1.0 / s, "rewards/accuracies": 0.5 + 0.1 * s, "rewards/top1_accuracy": 0.3}
               for s in range(1, 4)]  # fmt: skip
    for path in (
        plot_ppo_curves(ppo_log, tmp_path / "ppo.png"),
        plot_dpo_curves(dpo_log, tmp_path / "dpo.png", k=4),
        plot_comparison(POLICIES, tmp_path / "plots" / "comparison.png", max_new_tokens=32),
    ):
        assert path.read_bytes()[:4] == PNG_MAGIC


def test_comparison_table_has_one_row_per_policy():
    table = comparison_table(POLICIES).splitlines()
    assert len(table) == 2 + len(POLICIES)
    assert table[3] == "| PPO | 0.600 ± 0.040 | 0.80 | 4.20 | 28.5 |"


def test_report_shows_results_samples_plots_and_the_lexicon_caveat():
    samples = {
        name: PolicySamples(name, [[f"{name} says | hi\nthere"]], [[0.25]], [[0.0]], [[3]]) for name in POLICIES
    }
    metrics = {
        "base_model": "tiny", "n_train_prompts": 8, "n_heldout_prompts": 1,
        "config": {"k": 4, "temperature": 1.0, "max_new_tokens": 32},
        "ranked_data": {"train": {"n_written": 7, "n_empty_completions": 1, "n_lists_dropped": 1, "mean_score": 0.3}},
        "reward": {"heldout_top1_accuracy": 0.5, "heldout_pairwise_accuracy": None},
        "policies": POLICIES, "timings_s": {"sample": 60.0, "eval": 30.0},
    }  # fmt: skip
    report = render_report(metrics, samples, ["How was your day?"], {"comparison": "plots/comparison.png"}, n_show=1)
    assert "| PPO | 0.600 ± 0.040 |" in report
    assert "![comparison](plots/comparison.png)" in report
    assert "| PPO | ppo says \\| hi there | +0.25 |" in report  # pipe escaped, newline flattened
    assert "not from people" in report
    assert "not evaluated on held-out lists" in report
    assert "total 1.5 min" in report
