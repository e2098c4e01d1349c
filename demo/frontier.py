"""The demo's policies on the reward-KL frontier: where base, best of n, PPO, K-way DPO and online K-way sit.

    python -m demo.frontier --config recipes/configs/demo.yaml        # `make demo-frontier`; after `make demo` or not
    python -m demo.frontier --config recipes/configs/demo_tiny.yaml   # CI: tiny random model, minutes

Runs the demo's stages first (each reused when `make demo` already ran it with the same settings), then:

6. online_kway   recipes/online_kway.py on the shared base, judged by stage 2's reward role  -> online_kway/
7. frontier      rlhf_ext.frontier on the held-out prompts: M reference samples per prompt (best of n, the
                 KL-regularised optimum) and every checkpoint of PPO, K-way DPO and online K-way; gold = VADER,
                 proxy = the trained reward role                                               -> frontier/

and writes frontier.md (the table at matched KL) and plots/frontier.png. Separate from `make demo` to keep that
within its 25-minute budget: this adds about as much again (docs/demo.md, "The frontier").
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any

from demo.__main__ import (
    DemoConfig,
    StageResult,
    recipe_stage,
    run_cached,
    run_stages,
    sampling_trainer_paths,
    summarize_policy,
)
from demo.labels import policy_label
from demo.prompts import as_conversation
from demo.sentiment import completion_text, vader_compound
from rlhf_ext.frontier import BestOfNPoint, FrontierSettings, best_of_n_at, frontier_report, plot_frontier
from rlhf_ext.recipe_utils import recipe_parser

logger = logging.getLogger("demo.frontier")
USAGE = "python -m demo.frontier --config recipes/configs/demo.yaml [--FLAG VALUE ...]"
DESCRIPTION = """\
The demo's runs on the reward-KL frontier (`make demo-frontier`): runs the demo's stages (reused when `make demo`
ran them with the same settings), trains online K-way, then measures gold (VADER) and proxy (the reward role) against
KL to the base for best of n, the KL-regularised optimum and every checkpoint of PPO, K-way DPO and online K-way on
the held-out prompts. Writes <output_dir>/frontier.md, frontier/frontier.json and plots/frontier.png.

--config FILE.yaml          recipes/configs/demo.yaml (the real run) or recipes/configs/demo_tiny.yaml (CI, minutes)
--online_kway_args          the online K-way stage's settings (a YAML mapping: its recipe's flags)
--frontier_args             rlhf_ext.frontier.FrontierSettings (num_samples, best_of_n, betas, ...)
every other flag            as `python -m demo --help` lists them
"""
CHECKPOINT = re.compile(r"checkpoint-(\d+)$")
# The demo's trained policies, by stage folder; each checkpoint is a point of its run's curve.
TRAINED = ("ppo", "dpo", "online_kway")


def vader_gold(prompts: list, completions: list, **kwargs) -> list[float]:
    """The gold judge, as a TRL reward function: VADER's compound score of each completion's text."""
    return [vader_compound(completion_text(completion)) for completion in completions]


def checkpoints(stage_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint-N of a training stage, by step."""
    found = [(int(m.group(1)), p) for p in stage_dir.glob("checkpoint-*") if (m := CHECKPOINT.search(p.name))]
    return sorted(found)


def checkpoint_policies(out: Path) -> dict[str, str]:
    """"<label>@<step>" -> checkpoint folder for every trained stage (labels as the demo's report names them)."""
    policies = {}
    for stage in TRAINED:
        found = checkpoints(out / stage)
        if not found:
            raise FileNotFoundError(
                f"{out / stage} has no checkpoint-N folder: the frontier draws each run's checkpoints. Set "
                f"save_strategy: steps and save_steps in the YAML's {stage}_args (the shipped demo.yaml does)."
            )
        policies.update({f"{policy_label(stage)}@{step}": str(folder) for step, folder in found})
    return policies


def online_kway_stage(cfg: DemoConfig, out: Path, stages: dict[str, StageResult]) -> StageResult:
    """Stage 6: online K-way DPO on the shared base, on PPO's prompts, ranked by the reward role of stage 2."""
    upstream = [stages["sample"], stages["reward"]]
    return recipe_stage("online_kway", cfg, out, upstream, sampling_trainer_paths(out, stages), summarize_policy)


def frontier_settings(cfg: DemoConfig) -> FrontierSettings:
    """The demo's sampling (completion length, seed, samples per policy, sequences per generate call as in stage 1)
    unless `frontier_args` says else."""
    defaults = dict(
        max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, policy_samples=cfg.eval_samples,
        batch_size=cfg.sample_batch_size * cfg.k,
    )  # fmt: skip
    known = {f.name for f in dataclasses.fields(FrontierSettings)}
    unknown = sorted(set(cfg.frontier_args) - known)
    if unknown:
        raise ValueError(f"frontier_args: unknown setting(s) {unknown}; FrontierSettings has {sorted(known)}.")
    return FrontierSettings(**{**defaults, **cfg.frontier_args})


def frontier_stage(cfg: DemoConfig, out: Path, stages: dict[str, StageResult], heldout: list[str]) -> StageResult:
    """Stage 7: the frontier report on the held-out prompts, saved as frontier/frontier.json."""
    policies = checkpoint_policies(out)
    settings = frontier_settings(cfg)
    config = {
        "upstream": [stages[name].config for name in ("base", "reward", *TRAINED)], "policies": policies,
        "heldout": heldout, "system_prompt": cfg.system_prompt, "settings": vars(settings),
    }  # fmt: skip
    report_path = out / "frontier" / "frontier.json"

    def run() -> dict[str, Any]:
        report = frontier_report(
            stages["base"].summary["path"], policies, [as_conversation(p, cfg.system_prompt) for p in heldout],
            gold=vader_gold, proxy=stages["reward"].summary["role_dir"], settings=settings,
        )  # fmt: skip
        report.save_json(report_path)
        plot_frontier(report, out / "plots" / "frontier.png")
        return {"report": str(report_path)}

    return run_cached("frontier", out, config, run)


def matched_kl_rows(report: dict) -> list[dict[str, Any]]:
    """One row per policy: its KL, gold and proxy, and best of n's gold at the same KL (None beyond the largest n)."""
    best = [BestOfNPoint(**p) for p in report["best_of_n"]]
    rows = []
    for point in [report["reference"], *report["policies"]]:
        at_kl = best_of_n_at(best, point["kl"])
        rows.append({
            "policy": point["label"], "kl": point["kl"], "kl_stderr": point["kl_stderr"], "gold": point["gold"],
            "gold_stderr": point["gold_stderr"], "proxy": point["proxy"], "best_of_n_gold": at_kl,
            "versus_best_of_n": None if at_kl is None else point["gold"] - at_kl,
        })  # fmt: skip
    return rows


def frontier_markdown(report: dict, rows: list[dict[str, Any]], plot: str) -> str:
    """frontier.md: the plot, best of n and the optimum as measured, and each policy against best of n at its KL."""
    settings = report["settings"]
    lines = [
        "# The demo on the reward-KL frontier",
        "",
        f"![gold and proxy reward against KL]({plot})",
        "",
        f"{report['num_prompts']} held-out prompts; M = {settings['num_samples']} reference samples per prompt for "
        f"best of n and the KL-regularised optimum, {settings['policy_samples']} samples per prompt for each "
        f"policy; gold = VADER compound, proxy = the trained reward role. KL in nats per completion "
        f"(sequence-level, up to {settings['max_new_tokens']} tokens). The optimum's KL estimate cannot exceed "
        f"log M = {report['kl_cap']:.2f}.",
        "",
        "| best of n | KL | gold | proxy |",
        "|---|---|---|---|",
        *[f"| n = {p['n']} | {p['kl']:.2f} | {p['gold']:.3f} | {p['proxy']:.3f} |" for p in report["best_of_n"]],
        "",
        "| KL-regularised optimum | KL | gold | proxy | reliable |",
        "|---|---|---|---|---|",
        *[
            f"| beta = {p['beta']:g} | {p['kl']:.2f} | {p['gold']:.3f} | {p['proxy']:.3f} | {p['reliable']} |"
            for p in report["kl_regularised_optimum"]
        ],
        "",
        "| policy | KL | gold | proxy | best of n's gold at this KL | policy - best of n |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        versus = "beyond n_max" if row["versus_best_of_n"] is None else f"{row['versus_best_of_n']:+.3f}"
        best = "beyond n_max" if row["best_of_n_gold"] is None else f"{row['best_of_n_gold']:.3f}"
        lines.append(
            f"| {row['policy']} | {row['kl']:.2f} ± {row['kl_stderr']:.2f} | {row['gold']:.3f} ± "
            f"{row['gold_stderr']:.3f} | {row['proxy']:.3f} | {best} | {versus} |"
        )
    return "\n".join(lines) + "\n"


def write_frontier_report(out: Path) -> Path:
    """frontier.md from frontier/frontier.json (the plot, plots/frontier.png, is drawn with it)."""
    report = json.loads((out / "frontier" / "frontier.json").read_text())
    path = out / "frontier.md"
    path.write_text(frontier_markdown(report, matched_kl_rows(report), "plots/frontier.png"))
    return path


def make_parser():
    """--help starts with this command's usage block, before every DemoConfig flag."""
    return recipe_parser((DemoConfig,), USAGE, DESCRIPTION)


def main(cfg: DemoConfig) -> dict[str, Any]:
    """The demo's stages (cached), then online K-way and the frontier; returns the frontier's rows."""
    frontier_settings(cfg)  # a bad frontier_args key or value fails now, not after the training stages
    out, split, stages, _ = run_stages(cfg)
    stages["online_kway"] = online_kway_stage(cfg, out, stages)
    frontier_stage(cfg, out, stages, split.heldout)
    path = write_frontier_report(out)
    logger.info("frontier report written to %s", path)
    return {"rows": matched_kl_rows(json.loads((out / "frontier" / "frontier.json").read_text()))}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    (demo_config,) = make_parser().parse_args_and_config()
    main(demo_config)
