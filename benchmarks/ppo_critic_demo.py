"""The critic on the demo's parts: GAE lambda 0.95 against 1.0, with and without the critic options (issue 13).

Uses what `make demo` (`python -m demo`) left in `--demo_dir`: SmolLM2-135M-Instruct converted to safetensors (the
demo's model cache), the reward role folder (`reward/`, the K-way reward adapter + head, frozen as the judge) and the
training prompts (`prompts/train.jsonl`). Trains the demo's PPO stage (`recipes/ppo.py` with the demo YAML's
`ppo_args`, run in this process as the demo runs it) once per setting, each setting a few overrides of those
arguments, with the same budget: the demo's 32 optimizer steps, 8 rollouts of 16 prompts, 128 sampled completions
(a critic warm-up spends the first of those steps on the critic alone: it adds no rollout). Then evaluates base and
every policy on the 60 held-out prompts with the demo's own code (`demo.evaluation`: same seed, samples per
prompt and generation batch; the base is sampled once), so the numbers are comparable to the demo's table.

    python -m benchmarks.ppo_critic_demo --demo_dir outputs/demo                     # after `make demo`
    python -m benchmarks.ppo_critic_demo --demo_dir outputs/demo --settings demo lam0.95+critic
    python -m benchmarks.ppo_critic_demo --list                                      # the settings

Besides the trainer's `val/explained_variance` (1 - Var(R - V) / Var(R) over the rollout's tokens, R the GAE
returns: with lambda < 1 they contain the critic's own values), the trainer logs `val/explained_variance_mc`,
the same against the Monte-Carlo returns (the KL-penalised reward-to-go), which measures how well the critic
predicts the outcome whatever lambda is (equal to the first at lambda 1).

Writes `<output_dir>/<setting>/` (policy adapter, `log_history.json`, `metrics.json`), `<output_dir>/results.json`
(every setting: overrides, per-rollout and per-step curves, held-out metrics, seconds) and
`<output_dir>/explained_variance.png`; prints the table. A setting whose metrics.json exists is reused (delete the
folder to rerun it).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import math
from pathlib import Path

import yaml

from benchmarks.harness import REPO, Clock, write_json
from benchmarks.online_kway_demo import load_demo_module
from demo.evaluation import BASE, PolicySamples, policy_metrics, sample_policy
from demo.generation import load_model_and_tokenizer
from demo.prompts import as_conversation, demo_split
from demo.smollm2 import smollm2_path

logger = logging.getLogger("ppo_critic_demo")

# The critic options: the value head starts at the first rollout's mean score, the critic learns at 2.5x the
# policy's learning rate, and the first rollout's 4 optimizer steps (2 PPO epochs x 2 minibatches) train only the
# critic, so the policy's first update sees a critic that has fitted one rollout.
CRITIC = {"value_head_init": "first_rollout_mean", "value_learning_rate": 5.0e-3, "value_warmup_steps": 4}
NO_VALUE_CLIP = {"cliprange_value": None}
# The shared-base critic's fix of benchmarks/ppo_learning.py (docs/shared-base.md): a LoRA on the input embeddings
# in the value adapter only, so the critic can move what the frozen embeddings hold fixed.
VALUE_EMBEDDINGS = {"value_lora_embeddings": True}

SETTINGS: dict[str, dict] = {
    "demo": {"lam": 1.0},  # the shipped demo PPO, as `make demo` trained it in --demo_dir/ppo: reused, not retrained
    "lam1.0": {"lam": 1.0},  # the same, retrained here
    "lam0.95": {"lam": 0.95},
    "lam0.95+critic": {"lam": 0.95, **CRITIC},
    "lam1.0+critic": {"lam": 1.0, **CRITIC},
    "lam0.95+critic+noclip": {"lam": 0.95, **CRITIC, **NO_VALUE_CLIP},
    "lam1.0+critic+noclip": {"lam": 1.0, **CRITIC, **NO_VALUE_CLIP},
    "lam1.0+vemb": {"lam": 1.0, **VALUE_EMBEDDINGS},
    "lam0.95+vemb": {"lam": 0.95, **VALUE_EMBEDDINGS},
}

ROLLOUT_KEYS = ("val/explained_variance", "val/explained_variance_mc", "objective/scores", "objective/kl")
STEP_KEYS = ("policy/clipfrac_avg", "val/clipfrac_avg", "loss/value_avg")


def series(log_history: list[dict], key: str) -> list[tuple[int, float]]:
    return [(entry["step"], entry[key]) for entry in log_history if key in entry and "train_runtime" not in entry]


def train_setting(demo, cfg, demo_dir: Path, out: Path, overrides: dict, max_steps: int | None) -> dict:
    """Train the demo's PPO stage with `overrides`; return its adapter folder, curves and seconds."""
    args = {"seed": cfg.seed, "report_to": "none", **cfg.ppo_args, **overrides}
    args.update(
        model_name_or_path=smollm2_path(cfg.model_cache_dir),
        dataset_name=str(demo_dir / "prompts" / "train.jsonl"),
        reward_adapter_path=str(demo_dir / "reward"),
        output_dir=str(out),
        logging_steps=1,  # every step's update metrics; the rollout metrics come once per rollout whatever this is
    )
    if max_steps is not None:
        args["max_steps"] = max_steps
    out.mkdir(parents=True, exist_ok=True)
    clock = Clock(cpu=False)
    log_history = demo.run_recipe("ppo", args, out)
    seconds = clock.lap().wall_s
    curves = {key: series(log_history, key) for key in ROLLOUT_KEYS + STEP_KEYS}
    return {
        "adapter_dir": demo.summarize_policy(out, log_history)["adapter_dir"],
        "curves": curves,
        "train_seconds": seconds,
        "args": {k: v for k, v in args.items() if k != "lora_target_modules"},
    }


def reuse_demo_run(demo, cfg, demo_dir: Path) -> dict:
    """The PPO stage `make demo` trained (`<demo_dir>/ppo`), as a setting: its adapter, curves and seconds. At
    lambda 1 the GAE returns are the Monte-Carlo returns, so its explained variance is also the Monte-Carlo one."""
    stage_dir = demo_dir / "ppo"
    log_history = json.loads((stage_dir / "log_history.json").read_text())
    stage = json.loads((demo_dir / ".stages" / "ppo.json").read_text())
    args = stage["config"]["args"]
    different = {k: (args.get(k), v) for k, v in cfg.ppo_args.items() if args.get(k) != v}
    if different:
        logger.warning("the demo's PPO stage ran with other arguments than %s: %s", "ppo_args", different)
    curves = {key: series(log_history, key) for key in ROLLOUT_KEYS + STEP_KEYS}
    if args["lam"] == 1.0 and args.get("gamma", 1.0) == 1.0 and not curves["val/explained_variance_mc"]:
        curves["val/explained_variance_mc"] = curves["val/explained_variance"]
    return {
        "adapter_dir": demo.summarize_policy(stage_dir, log_history)["adapter_dir"],
        "curves": curves,
        "train_seconds": stage["summary"]["seconds"],
        "args": {k: v for k, v in args.items() if k != "lora_target_modules"},
    }


def finite(values: list[float]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def summary_row(name: str, result: dict) -> dict:
    ev = [v for _, v in result["curves"]["val/explained_variance"]]
    ev_mc = [v for _, v in result["curves"]["val/explained_variance_mc"]]
    held_out = result["heldout"]
    return {
        "setting": name,
        "ev_last": ev[-1] if ev else float("nan"),
        "ev_max": max(finite(ev), default=float("nan")),
        "ev_mc_last": ev_mc[-1] if ev_mc else float("nan"),
        "ev_mc_max": max(finite(ev_mc), default=float("nan")),
        **held_out,
        "train_min": result["train_seconds"] / 60,
    }


def write_results(path: Path, base: dict, n_heldout_prompts: int, results: dict[str, dict]) -> list[dict]:
    """Write the base's metrics and every setting so far, with the table's rows, to `path`; the rows."""
    import torch

    rows = [summary_row(n, r) for n, r in results.items()]
    write_json(path, {"base": base, "n_heldout_prompts": n_heldout_prompts, "torch_threads": torch.get_num_threads(),
                      "table": rows, "settings": results}, indent=1)  # fmt: skip
    return rows


def print_table(base: dict, rows: list[dict]) -> None:
    print(
        f"\n{'setting':<24} {'EV last':>8} {'EV max':>7} {'EVmc last':>9} {'EVmc max':>8} "
        f"{'VADER':>15} {'win':>5} {'KL':>6} {'train min':>9}"
    )
    print(f"{'base':<24} {'':>8} {'':>7} {'':>9} {'':>8} {base['mean_vader']:>7.3f} ± {base['vader_stderr']:.3f}")
    for r in rows:
        print(
            f"{r['setting']:<24} {r['ev_last']:>8.2f} {r['ev_max']:>7.2f} {r['ev_mc_last']:>9.2f} "
            f"{r['ev_mc_max']:>8.2f} {r['mean_vader']:>7.3f} ± {r['vader_stderr']:.3f} "
            f"{r['win_rate_vs_base']:>5.2f} {r['kl_to_base']:>6.2f} {r['train_min']:>9.1f}"
        )


FLOOR = -0.8  # the plot's lowest explained variance: one far lower value would flatten every other curve


def plot_explained_variance(results: dict[str, dict], path: Path) -> Path:
    """Explained variance per rollout, one line per setting: the trainer's (GAE returns) and the Monte-Carlo one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = (("val/explained_variance", "against the GAE returns (val/explained_variance)"),
            ("val/explained_variance_mc", "against the Monte-Carlo returns"))  # fmt: skip
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, (key, title) in zip(axes, keys):
        for i, (name, result) in enumerate(results.items()):
            points = result["curves"][key]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o", markersize=3, label=name, color=f"C{i}")
                for step, value in points:  # below the axis: marked at its foot, with its value
                    if value < FLOOR:
                        ax.annotate(f"{value:.2f}", (step, FLOOR), xytext=(4, 4), textcoords="offset points",
                                    color=f"C{i}", fontsize=8)  # fmt: skip
        ax.set_ylim(FLOOR, 0.8)
        ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("optimizer step (one rollout every 4)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("explained variance of the critic's old values")
    axes[1].legend(fontsize=8)
    fig.suptitle("Demo PPO: does the critic learn? (SmolLM2-135M, VADER reward adapter, 8 rollouts of 16 prompts)\n"
                 "explained variance of each rollout's values, before the critic trains on that rollout")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo_dir", default="outputs/demo", help="output_dir of a finished `make demo`")
    parser.add_argument("--config", default=str(REPO / "recipes" / "configs" / "demo.yaml"), help="the demo's YAML")
    parser.add_argument("--output_dir", default="outputs/ppo_critic_demo")
    default = [name for name in SETTINGS if name != "lam1.0"]
    parser.add_argument("--settings", nargs="+", default=default, choices=list(SETTINGS), metavar="NAME",
                        help=f"settings to run, in order (default: {' '.join(default)}; see --list)")  # fmt: skip
    parser.add_argument("--list", action="store_true", help="print the settings and their overrides, and exit")
    parser.add_argument("--max_steps", type=int, default=None, help="override the demo's 32 steps (smoke tests)")
    parser.add_argument("--eval_prompts", type=int, default=None, help="evaluate on the first N held-out prompts only")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--sample_base", action="store_true",
                        help="sample the base here even if <demo_dir>/eval/samples.json holds the demo's base samples "
                        "(same code, seed and prompts: the same samples, at a cost of ~1 min)")  # fmt: skip
    args = parser.parse_args()
    if args.list:
        for name, overrides in SETTINGS.items():
            print(f"{name:<24} {overrides}")
        return

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    demo = load_demo_module()
    config = yaml.safe_load(Path(args.config).read_text())
    cfg = demo.DemoConfig(
        **{k: v for k, v in config.items() if k in {f.name for f in dataclasses.fields(demo.DemoConfig)}}
    )
    demo_dir, out = Path(args.demo_dir), Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    base_path = smollm2_path(cfg.model_cache_dir)

    split = demo_split(cfg.n_train_prompts, cfg.n_heldout_prompts)
    conversations = [as_conversation(p, cfg.system_prompt) for p in split.heldout][: args.eval_prompts]
    eval_kwargs = dict(n_samples=cfg.eval_samples, sampling=cfg.sampling(), batch_size=cfg.sample_batch_size,
                       seed=cfg.seed)  # fmt: skip
    clock = Clock(cpu=False)
    base_model, tokenizer = load_model_and_tokenizer(base_path)
    demo_samples = demo_dir / "eval" / "samples.json"
    if demo_samples.is_file() and not args.sample_base and args.eval_prompts is None:
        # The demo's stage 5 sampled the base with this code, seed, prompts and batch size (checked: identical).
        base_samples = PolicySamples(**json.loads(demo_samples.read_text())[BASE])
        assert len(base_samples.scores) == len(conversations), (len(base_samples.scores), len(conversations))
        logger.info("base samples: the demo's, from %s", demo_samples)
    else:
        base_samples = sample_policy(BASE, base_model, base_model, tokenizer, conversations, **eval_kwargs)
    base = policy_metrics(base_samples, base_samples).as_dict()
    logger.info("base: %s (%.1f min)", base, clock.lap().wall_s / 60)

    results: dict[str, dict] = {}
    for name in args.settings:
        setting_dir = out / name
        metrics_path = setting_dir / "metrics.json"
        if metrics_path.is_file():
            logger.info("setting %s: reusing %s", name, metrics_path)
            results[name] = json.loads(metrics_path.read_text())
            continue
        logger.info("setting %s: %s", name, SETTINGS[name])
        setting_dir.mkdir(parents=True, exist_ok=True)
        result = {"overrides": SETTINGS[name]}
        if name == "demo":
            result.update(reuse_demo_run(demo, cfg, demo_dir))
        else:
            result.update(train_setting(demo, cfg, demo_dir, setting_dir, SETTINGS[name], args.max_steps))
        gc.collect()
        demo_metrics = demo_dir / "metrics.json"
        if name == "demo" and demo_metrics.is_file() and not args.sample_base and args.eval_prompts is None:
            # The demo's stage 5 evaluated this very adapter against these base samples.
            result["heldout"] = json.loads(demo_metrics.read_text())["policies"]["ppo"]
            result["eval_seconds"] = 0.0
            write_json(metrics_path, result, indent=1)
            results[name] = result
            continue
        clock = Clock(cpu=False)
        policy, _ = load_model_and_tokenizer(base_path, result["adapter_dir"])
        samples = sample_policy(name, policy, base_model, tokenizer, conversations, **eval_kwargs)
        del policy
        result["heldout"] = policy_metrics(samples, base_samples).as_dict()
        result["eval_seconds"] = clock.lap().wall_s
        (setting_dir / "samples.json").write_text(json.dumps(dataclasses.asdict(samples), ensure_ascii=False))
        write_json(metrics_path, result, indent=1)
        results[name] = result
        print_table(base, write_results(out / "results.json", base, len(conversations), results))
    rows = write_results(out / "results.json", base, len(conversations), results)
    plot_explained_variance(results, out / "explained_variance.png")
    print_table(base, rows)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    main()
