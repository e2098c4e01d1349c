"""report.md for a demo run: what ran, the held-out comparison, training curves, sample
completions side by side, and what the numbers do and do not show.

`render_report` takes the same dict the demo writes to metrics.json, so a report can be re-rendered
from a finished run without touching a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .evaluation import PolicySamples
from .labels import POLICY_LABELS, policy_label  # noqa: F401 (POLICY_LABELS: importable from here as before)

CAVEATS = """\
## Read this before trusting the numbers

- **The preferences come from a lexicon, not from people.** Every ranking, the reward model's
  training signal and the evaluation score all come from VADER, a sentiment lexicon whose word
  valences were rated by people, applied by rules. No person judged any of these replies.
- VADER measures warm *words*, not helpful, true or coherent replies. A policy can raise its score by
  sprinkling "great", "love" and "happy" into text that answers nothing; read the samples above, and
  watch the length and KL columns, before calling a higher score a better model.
- The evaluation scores with the same lexicon the training optimised, on prompts held out from
  training. That measures whether the policies learned the lexicon's preference and generalise it
  to new prompts; it is not an independent judge.
- Scores are means over sampled completions (temperature 1); the ± is one standard error over
  completions. Win rate compares per-prompt means against the base, ties counting one half.
- KL to the base is a Monte Carlo estimate of KL(policy || base) per completion, in nats: the summed
  log-ratio of each sampled completion under the policy and the base.
"""


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell: pipes escaped, newlines shown as spaces."""
    return " ".join(text.replace("|", "\\|").split())


def comparison_table(policies: dict[str, dict[str, float]]) -> str:
    """The headline table: one row per policy."""
    rows = [
        "| policy | mean VADER | win rate vs base | KL to base (nats) | mean length (tokens) |",
        "|---|---|---|---|---|",
    ]
    for name, m in policies.items():
        rows.append(
            f"| {policy_label(name)} | {m['mean_vader']:.3f} ± {m['vader_stderr']:.3f} | {m['win_rate_vs_base']:.2f} "
            f"| {m['kl_to_base']:.2f} | {m['mean_length_tokens']:.1f} |"
        )
    return "\n".join(rows)


def _reward_line(reward: dict[str, Any], k: int) -> str:
    top1, pairwise = reward["heldout_top1_accuracy"], reward["heldout_pairwise_accuracy"]
    if top1 is None or pairwise is None:
        return "- Reward adapter + head: not evaluated on held-out lists (set `eval_strategy` in `reward_args`)."
    return (
        f"- Reward adapter + head, on held-out ranked lists: top-1 accuracy {top1:.2f}, pairwise accuracy "
        f"{pairwise:.2f} (chance: {1 / k:.2f} and 0.50)."
    )


def _setup_section(metrics: dict[str, Any]) -> str:
    config, data = metrics["config"], metrics["ranked_data"]
    train = data["train"]
    lines = [
        "## What ran",
        "",
        f"- Base model: {metrics['base_model']}.",
        f"- Prompts: {metrics['n_train_prompts']} training and {metrics['n_heldout_prompts']} held-out prompts "
        "written for this project (`demo/prompts.txt`).",
        f"- Stage 1 sampled K={config['k']} completions per training prompt (temperature "
        f"{config['temperature']}, up to {config['max_new_tokens']} new tokens) and ranked them by VADER "
        f"compound score: {train['n_written']} ranked lists kept; {train['n_empty_completions']} empty completions "
        f"and {train['n_lists_dropped']} lists that stated no preference (all scores tied, or fewer than two "
        f"completions left) were dropped. Mean score of the base's samples: {train['mean_score']:.3f}.",
    ]
    lines.append(_reward_line(metrics["reward"], config["k"]))
    timings = metrics.get("timings_s", {})
    if timings:
        spent = ", ".join(f"{stage} {seconds / 60:.1f} min" for stage, seconds in timings.items())
        lines.append(f"- Wall-clock time: {spent} (total {sum(timings.values()) / 60:.1f} min).")
    return "\n".join(lines)


def samples_section(samples: dict[str, PolicySamples], prompts: list[str], n_show: int) -> str:
    """The first sampled completion of every policy for the first `n_show` held-out prompts."""
    lines = ["## Sample completions on held-out prompts", "", "First sample of each policy, with its VADER score.", ""]
    for i, prompt in enumerate(prompts[:n_show]):
        lines += [f"**{_cell(prompt)}**", "", "| policy | completion | VADER |", "|---|---|---|"]
        for name, s in samples.items():
            lines.append(f"| {policy_label(name)} | {_cell(s.texts[i][0])} | {s.scores[i][0]:+.2f} |")
        lines.append("")
    return "\n".join(lines)


def render_report(
    metrics: dict[str, Any], samples: dict[str, PolicySamples], prompts: list[str], plots: dict[str, str], n_show: int
) -> str:
    """report.md text. `plots` maps a plot's title to its file name relative to the report."""
    parts = [
        "# rlhf_ext demo: aligning a small chat model toward warm replies",
        "",
        "The whole RLHF pipeline on a CPU with no Hugging Face Hub access: sample and rank completions, "
        "train a K-way reward model, run PPO on one shared base, run K-way DPO, and compare the policies "
        "on prompts none of them trained on.",
        "",
        _setup_section(metrics),
        "",
        f"## Results on {metrics['n_heldout_prompts']} held-out prompts",
        "",
        comparison_table(metrics["policies"]),
        "",
    ]
    for title, file_name in plots.items():
        parts += [f"![{title}]({file_name})", ""]
    parts += [samples_section(samples, prompts, n_show), CAVEATS]
    return "\n".join(parts)


def write_report(out_dir: str | Path, text: str) -> Path:
    """Write report.md into `out_dir` and return its path."""
    path = Path(out_dir) / "report.md"
    path.write_text(text, encoding="utf-8")
    return path
