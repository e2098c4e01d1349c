"""Online K-way DPO on the demo's parts, with PPO's sampling budget, evaluated like the demo's policies.

Uses what `make demo` (`python -m demo`) left in `--demo_dir`: SmolLM2-135M-Instruct converted to safetensors
(the demo's model cache), the reward role folder (`reward/`, the K-way reward adapter + head, frozen here as the
judge) and the training prompts (`prompts/train.jsonl`). Trains `recipes/online_kway.py` on one shared base with
the demo's PPO settings where they carry over (learning rate and schedule, LoRA shape, 32 new tokens, temperature
1, micro-batch of 8 sequences, 2 micro-batches per generation batch, 2 passes over each, 32 optimizer steps), so
that it generates exactly as many completions as the demo's PPO stage (asserted below). Then evaluates base and the
online policy on the 60 held-out prompts with the demo's own code (`demo.evaluation`, same seed, samples
per prompt and generation batch), so the base row is the demo's base row.

    python -m benchmarks.online_kway_demo --demo_dir outputs/demo          # after `make demo`
    python -m benchmarks.online_kway_demo --demo_dir outputs/demo --learning_rate 1e-3

Writes `<output_dir>/policy` (adapter), `log_history.json`, `samples.json` and `metrics.json`; prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
from pathlib import Path

import yaml

from benchmarks.harness import REPO, Clock, write_json
from demo.evaluation import BASE, PolicySpec, evaluate_policies
from demo.prompts import as_conversation, demo_split
from demo.smollm2 import smollm2_path


def load_demo_module():
    """The demo's driver (demo/__main__.py) as a module: its DemoConfig, run_recipe, summarize_policy."""
    return importlib.import_module("demo.__main__")


def completions_generated(max_steps: int, batch: int, steps_per_generation: int, iterations: int) -> int:
    """Completions a GRPO-style trainer samples in `max_steps` steps: one generation batch of batch x
    steps_per_generation completions every steps_per_generation x iterations optimizer steps."""
    per_generation = batch * steps_per_generation
    steps_per_rollout = steps_per_generation * iterations
    if max_steps % steps_per_rollout:
        raise ValueError(f"max_steps {max_steps} is not a whole number of rollouts of {steps_per_rollout} steps")
    return max_steps // steps_per_rollout * per_generation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo_dir", default="outputs/demo", help="output_dir of a finished `make demo`")
    parser.add_argument("--config", default=str(REPO / "recipes" / "configs" / "demo.yaml"), help="the demo's YAML")
    parser.add_argument("--output_dir", default="outputs/online_kway_demo")
    parser.add_argument("--k", type=int, default=4, help="num_generations: completions ranked per prompt")
    parser.add_argument("--dpo_beta", type=float, default=0.1)
    parser.add_argument("--learning_rate", type=float, default=None, help="default: the demo's PPO learning rate")
    parser.add_argument("--robust_rho", type=float, default=0.0, help="robust Plackett-Luce radius (0: plain loss)")
    parser.add_argument("--num_iterations", type=int, default=None,
                        help="passes over each rollout (default: PPO's num_ppo_epochs); max_steps scales with it, so "
                        "the sampling budget stays PPO's")
    args = parser.parse_args()

    demo = load_demo_module()
    config = yaml.safe_load(Path(args.config).read_text())
    cfg = demo.DemoConfig(
        **{k: v for k, v in config.items() if k in {f.name for f in dataclasses.fields(demo.DemoConfig)}}
    )
    ppo = cfg.ppo_args
    demo_dir, out = Path(args.demo_dir), Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    base_path = smollm2_path(cfg.model_cache_dir)

    # PPO's settings that carry over; K completions per prompt instead of 1, same completions per micro-batch.
    carried = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "learning_rate", "lr_scheduler_type",
               "per_device_train_batch_size", "steps_per_generation", "max_completion_length", "temperature",
               "max_steps", "bf16", "activation_checkpointing")  # fmt: skip
    online_args = {key: ppo[key] for key in carried}
    iterations = args.num_iterations or ppo["num_ppo_epochs"]
    online_args.update(
        num_iterations=iterations, max_steps=ppo["max_steps"] * iterations // ppo["num_ppo_epochs"],
        num_generations=args.k, dpo_beta=args.dpo_beta, robust_rho=args.robust_rho,
        model_name_or_path=base_path, dataset_name=str(demo_dir / "prompts" / "train.jsonl"),
        reward_adapter_path=str(demo_dir / "reward"), output_dir=str(out), seed=cfg.seed, report_to="none",
        save_strategy="no", logging_steps=2,
    )  # fmt: skip
    if args.learning_rate is not None:
        online_args["learning_rate"] = args.learning_rate

    # per_device_train_batch_size counts completions in both trainers (PPO: num_generations 1, one per prompt)
    ppo_budget = completions_generated(
        ppo["max_steps"], ppo["per_device_train_batch_size"], ppo["steps_per_generation"], ppo["num_ppo_epochs"]
    )
    online_budget = completions_generated(
        online_args["max_steps"],
        online_args["per_device_train_batch_size"],
        online_args["steps_per_generation"],
        online_args["num_iterations"],
    )
    assert ppo_budget == online_budget, (ppo_budget, online_budget)
    logging.info(
        "budget: PPO %d completions (1 per prompt), online K-way %d (%d prompts x K=%d)",
        ppo_budget,
        online_budget,
        online_budget // args.k,
        args.k,
    )

    clock = Clock(cpu=False)
    log_history = demo.run_recipe("online_kway", online_args, out)
    train_seconds = clock.lap().wall_s
    adapter_dir = demo.summarize_policy(out, log_history)["adapter_dir"]

    split = demo_split(cfg.n_train_prompts, cfg.n_heldout_prompts)
    conversations = [as_conversation(p, cfg.system_prompt) for p in split.heldout]
    clock = Clock(cpu=False)
    metrics, samples = evaluate_policies(
        [PolicySpec(BASE, base_path), PolicySpec("online_kway", base_path, adapter_dir)], conversations,
        n_samples=cfg.eval_samples, sampling=cfg.sampling(), batch_size=cfg.sample_batch_size, seed=cfg.seed,
    )  # fmt: skip
    eval_seconds = clock.lap().wall_s
    (out / "samples.json").write_text(
        json.dumps({n: dataclasses.asdict(s) for n, s in samples.items()}, ensure_ascii=False)
    )
    result = {
        "online_args": {k: v for k, v in online_args.items() if k != "lora_target_modules"},
        "completions_generated": {"ppo": ppo_budget, "online_kway": online_budget},
        "policies": {n: m.as_dict() for n, m in metrics.items()},
        "seconds": {"train": train_seconds, "eval": eval_seconds},
    }
    write_json(out / "metrics.json", result)
    print(f"\n{'policy':<12} {'mean VADER':>16} {'win vs base':>12} {'KL (nats)':>10} {'length':>7}")
    for name, m in metrics.items():
        print(
            f"{name:<12} {m.mean_vader:>9.3f} ± {m.vader_stderr:.3f} {m.win_rate_vs_base:>12.2f} "
            f"{m.kl_to_base:>10.2f} {m.mean_length_tokens:>7.1f}"
        )
    print(f"train {train_seconds / 60:.1f} min, eval {eval_seconds / 60:.1f} min; budget {online_budget} completions")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    main()
