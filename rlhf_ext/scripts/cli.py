"""`rlhf-ext`: one command for the recipes, as `trl dpo ...` is for TRL's scripts.

    rlhf-ext ppo --config recipes/configs/ppo.yaml --reward_adapter_path out/reward
    rlhf-ext dpo --help
    rlhf-ext frontier --reference BASE --policies ppo=out/ppo --prompts heldout.jsonl --proxy out/reward --gold m:f

It runs the recipe in this process (one GPU or the CPU). On several GPUs launch the module with accelerate instead:
`accelerate launch --config_file recipes/accelerate_configs/ddp.yaml -m rlhf_ext.scripts.ppo --config ...`.
"""

from __future__ import annotations

import sys
from importlib import import_module

COMMANDS = {
    "ppo": "PPO with a critic on one shared base (policy, value, reward, reference)",
    "online_kway": "online K-way DPO: K sampled completions ranked by a reward",
    "dpo": "K-way (Plackett-Luce) DPO on ranked completions",
    "reward": "K-way (Plackett-Luce) reward model on ranked completions",
    "frontier": "gold and proxy reward against KL to the reference, for a run's policies (no training)",
}


def usage() -> str:
    """The top-level help: the commands and where each one's own --help is."""
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()]
    return (
        "usage: rlhf-ext {" + ",".join(COMMANDS) + "} [--config FILE.yaml] [--FLAG VALUE ...]\n\n"
        "commands:\n" + "\n".join(lines) + "\n\n`rlhf-ext <command> --help` lists a command's flags.\n"
    )


def run(command: str, argv: list[str] | None = None):
    """Parse `argv` (default: the command line) with the recipe's parser and run it; returns its trainer (the
    report, for frontier)."""
    recipe = import_module(f"rlhf_ext.scripts.{command}")
    return recipe.main(*recipe.make_parser().parse_args_and_config(argv))


def main(argv: list[str] | None = None) -> int:
    """Run the recipe `argv[0]` with the flags `argv[1:]`; exit status 2 for an unknown command."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"rlhf-ext: unknown command {command!r}; the commands are {', '.join(COMMANDS)}.\n", file=sys.stderr)
        print(usage(), file=sys.stderr)
        return 2
    run(command, rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
