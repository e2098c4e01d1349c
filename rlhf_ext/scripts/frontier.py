"""`rlhf-ext frontier`: gold and proxy reward against KL to the reference, for a run's policies (`rlhf_ext.frontier`).

    rlhf-ext frontier --reference HuggingFaceTB/SmolLM2-135M-Instruct --policies ppo=out/ppo dpo=out/dpo \
        --prompts heldout.jsonl --proxy out/reward --gold my_rewards:gold_reward --output_dir out/frontier

Writes <output_dir>/frontier.json (every point, the settings and the sources) and <output_dir>/frontier.png (gold
and proxy panels). Every input is checked before a model is loaded. In-process: `main(args, settings)`, which
returns the `FrontierReport`. docs/frontier.md explains the plot and the estimators.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from rlhf_ext.data import load_dataset_or_file
from rlhf_ext.frontier import (
    FrontierReport,
    FrontierSettings,
    frontier_report,
    plot_frontier,
    reward_function_from_spec,
)
from rlhf_ext.recipe_utils import recipe_parser, train_split

USAGE = (
    "frontier.py --reference MODEL --policies LABEL=DIR [LABEL=DIR ...] --prompts FILE --proxy DIR "
    "--gold MODULE:FUNCTION [--FLAG VALUE ...]"
)
DESCRIPTION = """\
Reward against KL to the reference (Gao et al. 2022) for a run's policies, with best-of-n and the KL-regularised
optimum estimated from the reference's samples; gold and proxy reward side by side, so over-optimisation shows.
Writes <output_dir>/frontier.json and <output_dir>/frontier.png.

--reference MODEL             the reference policy (the base the run started from): Hub id or local folder
--policies LABEL=DIR ...      causal LM folders, peft adapter folders, or PPO output / checkpoint folders (policy/)
--prompts FILE                held-out prompts: a .jsonl / .json / .csv / .parquet file or a dataset folder
--prompt_column prompt        the prompts' column; the other columns reach the reward functions as keyword lists
--proxy DIR                   the proxy reward: a reward role folder, a reward model rlhf_ext saved, or module:function
--gold MODULE:FUNCTION        the gold reward f(prompts, completions, **kwargs) -> list[float], e.g. my_rewards:gold
--num_samples 32              M reference samples per prompt (at least --best_of_n); the optimum's KL stops at log M
--best_of_n 16, --betas ...   best of n = 1, 2, 4, ... up to it; KL coefficients of the optimum
--policy_samples 4            completions per prompt from each policy
--max_new_tokens 64, --seed 0, --output_dir frontier
"""


@dataclass
class FrontierArguments:
    """What to compare (paths and specs) and where to write the report; the sampling settings are FrontierSettings."""

    reference: str | None = field(
        default=None, metadata={"help": "The reference policy the KL is measured to: Hub id or local folder."}
    )
    policies: list[str] = field(
        default_factory=list,
        metadata={
            "help": "LABEL=DIR for each policy: a causal LM folder, a peft adapter folder (loaded onto the reference), "
            "or a PPO output or checkpoint folder holding policy/. A bare DIR is labelled by its folder name."
        },
    )
    prompts: str | None = field(
        default=None, metadata={"help": "Held-out prompts: a .jsonl / .json / .csv / .parquet file or a dataset."}
    )
    prompt_column: str = field(default="prompt", metadata={"help": "The column holding the prompts."})
    split: str = field(default="train", metadata={"help": "Split of --prompts to read (a local file has 'train')."})
    max_prompts: int | None = field(default=None, metadata={"help": "Use the first this many prompts (None: all)."})
    proxy: str | None = field(
        default=None,
        metadata={
            "help": "The proxy reward: a reward role folder (adapter + head, loaded onto --proxy_base), a reward model "
            "the K-way reward trainer saved, or a reward function as module:function."
        },
    )
    proxy_base: str | None = field(
        default=None, metadata={"help": "The base a reward role folder loads onto (default: --reference)."}
    )
    gold: str | None = field(
        default=None,
        metadata={"help": "The gold reward as module:function, called f(prompts, completions, **kwargs)."},
    )
    output_dir: str = field(default="frontier", metadata={"help": "Where frontier.json and frontier.png go."})


def check_arguments(args: FrontierArguments) -> None:
    """Refuse a missing flag, and a missing matplotlib (the plot is written last, after all the sampling)."""
    missing = [f"--{name}" for name in ("reference", "prompts", "proxy", "gold") if not getattr(args, name)]
    if missing:
        raise ValueError(f"Set {', '.join(missing)} (rlhf-ext frontier --help).")
    if importlib.util.find_spec("matplotlib") is None:
        raise ImportError("frontier.png needs matplotlib: pip install matplotlib (or rlhf-ext[demo]).")


def labelled_policies(specs: list[str]) -> dict[str, str]:
    """{label: path} from LABEL=DIR (or a bare DIR, labelled by its folder name); ValueError for a repeated label."""
    policies: dict[str, str] = {}
    for spec in specs:
        label, equals, path = spec.partition("=")
        if not equals:
            label, path = Path(spec.rstrip("/")).name, spec
        if not label or not path:
            raise ValueError(f"--policies {spec!r}: expected LABEL=DIR, e.g. ppo=out/ppo.")
        if label in policies:
            raise ValueError(f"--policies: label {label!r} is given twice ({policies[label]} and {path}).")
        policies[label] = path
    return policies


def load_prompts(args: FrontierArguments):
    """The prompt records (`--prompt_column` renamed "prompt", other columns kept for the reward functions);
    a clear error when the file is missing, lacks the column, or holds no prompts."""
    dataset = train_split(load_dataset_or_file(args.prompts), args.split, args.prompts)
    if args.prompt_column not in dataset.column_names:
        raise ValueError(f"{args.prompts} has no column {args.prompt_column!r}; its columns: {dataset.column_names}.")
    if args.prompt_column != "prompt":
        if "prompt" in dataset.column_names:  # the column chosen replaces it
            dataset = dataset.remove_columns("prompt")
        dataset = dataset.rename_column(args.prompt_column, "prompt")
    if args.max_prompts is not None:
        dataset = dataset.select(range(min(args.max_prompts, len(dataset))))
    if len(dataset) == 0:
        raise ValueError(f"{args.prompts}: --max_prompts {args.max_prompts} leaves no prompts.")
    return list(dataset)


def main(args: FrontierArguments, settings: FrontierSettings) -> FrontierReport:
    """Check the inputs, sample and score, write frontier.json and frontier.png under --output_dir; returns the
    report."""
    check_arguments(args)
    gold = reward_function_from_spec(args.gold, "--gold")
    is_function = ":" in args.proxy and not Path(args.proxy).expanduser().exists()
    proxy = reward_function_from_spec(args.proxy, "--proxy") if is_function else args.proxy
    policies = labelled_policies(args.policies)
    report = frontier_report(
        args.reference, policies, load_prompts(args), gold=gold, proxy=proxy, settings=settings,
        proxy_base=args.proxy_base,
    )  # fmt: skip
    out = Path(args.output_dir)
    report.save_json(out / "frontier.json")
    plot_frontier(report, out / "frontier.png")
    print(f"Frontier of {len(policies)} policies on {report.num_prompts} prompts written to {out}/frontier.json, .png")
    return report


def make_parser():
    return recipe_parser((FrontierArguments, FrontierSettings), USAGE, DESCRIPTION)


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
