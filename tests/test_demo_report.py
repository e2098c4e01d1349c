import pytest

from rlhf_ext.demo.evaluation import PolicySamples
from rlhf_ext.demo.plots import (
    metric_series,
    plot_comparison,
    plot_dpo_curves,
    plot_ppo_curves,
)
from rlhf_ext.demo.report import comparison_table, render_report

PNG_MAGIC = b"\x89PNG"
KEYS = ("mean_vader", "vader_stderr", "win_rate_vs_base", "kl_to_base", "mean_length_tokens")
POLICIES = {"base": dict(zip(KEYS, (0.3, 0.05, 0.5, 0.0, 30.0))), "ppo": dict(zip(KEYS, (0.6, 0.04, 0.8, 4.2, 28.5)))}


def test_metric_series_takes_the_first_logged_key_and_skips_entries_without_it():
    history = [{"step": 1, "reward": 0.1}, {"step": 2, "reward": 0.3}, {"step": 2, "train_runtime": 9.0}]
    assert metric_series(history, ("objective/scores", "reward")) == ("reward", [1, 2], [0.1, 0.3])
    with pytest.raises(KeyError, match="objective/kl"):
        metric_series(history, ("objective/kl",))


def test_plots_are_written_as_png(tmp_path):
    ppo_log = [{"step": s, "objective/scores": 0.1 * s, "objective/kl": 0.5 * s} for s in range(1, 4)]
    dpo_log = [{"step": s, "loss": 1.0 / s, "rewards/accuracies": 0.5 + 0.1 * s} for s in range(1, 4)]
    for path in (
        plot_ppo_curves(ppo_log, tmp_path / "ppo.png"),
        plot_dpo_curves(dpo_log, tmp_path / "dpo.png"),
        plot_comparison(POLICIES, tmp_path / "plots" / "comparison.png"),
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
