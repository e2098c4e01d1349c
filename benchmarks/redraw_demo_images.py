"""Redraw docs/images/demo_{ppo,comparison}.png with the current plotting code, from data the repository keeps.

- demo_ppo.png: the demo run's PPO curves, as `python -m benchmarks.ppo_critic_demo` saved them (setting "demo" of
  `benchmarks/results/ppo_critic_demo.json`: the `ppo/log_history.json` of the run in docs/demo-report.md).
- demo_comparison.png: the held-out table of docs/demo-report.md (three decimals), with that run's length cap.

demo_dpo.png is not redrawn: no file here keeps that run's DPO log history (rerun `make demo` for it).

    python -m benchmarks.redraw_demo_images
"""

from __future__ import annotations

import json
import re

from benchmarks.harness import REPO, RESULTS_DIR
from demo.labels import POLICY_LABELS
from demo.plots import plot_comparison, plot_ppo_curves

MAX_NEW_TOKENS = 32  # recipes/configs/demo.yaml's, the cap of that run's held-out samples
ROW = re.compile(r"^\| (?P<label>[^|]+) \| (?P<vader>[\d.]+) ± (?P<err>[\d.]+) \| (?P<win>[\d.]+) \| (?P<kl>[\d.]+) \| "
                 r"(?P<length>[\d.]+) \|$")  # fmt: skip


def log_history_from_curves(curves: dict[str, list[list[float]]]) -> list[dict]:
    """A trainer-like log history (one dict per logged step) from {key: [[step, value], ...]}."""
    by_step: dict[int, dict] = {}
    for key, points in curves.items():
        for step, value in points:
            by_step.setdefault(int(step), {"step": int(step)})[key] = value
    return [by_step[step] for step in sorted(by_step)]


def policies_from_report(text: str) -> dict[str, dict[str, float]]:
    """{policy name: metrics} from the held-out table of a demo report."""
    names = {label: name for name, label in POLICY_LABELS.items()}
    policies = {}
    for line in text.splitlines():
        if (m := ROW.match(line)) and m["label"] in names:
            keys = ("mean_vader", "vader_stderr", "win_rate_vs_base", "kl_to_base", "mean_length_tokens")
            values = (m["vader"], m["err"], m["win"], m["kl"], m["length"])
            policies[names[m["label"]]] = dict(zip(keys, map(float, values)))
    return policies


def main() -> None:
    images = REPO / "docs" / "images"
    results = json.loads((RESULTS_DIR / "ppo_critic_demo.json").read_text())
    print(plot_ppo_curves(log_history_from_curves(results["settings"]["demo"]["curves"]), images / "demo_ppo.png"))
    policies = policies_from_report((REPO / "docs" / "demo-report.md").read_text())
    assert list(policies) == ["base", "ppo", "dpo"], policies
    print(plot_comparison(policies, images / "demo_comparison.png", max_new_tokens=MAX_NEW_TOKENS))


if __name__ == "__main__":
    main()
