"""Model cards for what the recipes train: the method, the base model, the data, the reward, the key hyperparameters
and the final metrics, as Hub metadata (tags, base_model, datasets, model-index) and as text.

They replace PEFT's empty template (written by every adapter save) and TRL's card, which for a local base reads "a
fine-tuned version of [None]". A local path never appears in a card: a base model or dataset that is not a Hub id is
named by its folder or file name only, and left out of the metadata (the Hub links `base_model` and `datasets`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.compute as pc
from datasets import Dataset
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .names import hub_id, public_name

LIBRARY_TAGS = ["rlhf_ext", "trl"]
# Logged values that describe the run, not the model: left out of the metrics table.
BOOKKEEPING = {"epoch", "step", "total_flos", "train_samples_per_second", "train_steps_per_second", "step_time",
               "eval_samples_per_second", "eval_steps_per_second", "learning_rate", "grad_norm", "num_tokens"}


@dataclass
class CardInfo:
    """Everything a card says; `base_model`, `dataset` and `reward` as given (a Hub id or a local path)."""

    title: str
    summary: str
    method: str
    base_model: str | None = None
    dataset: str | None = None
    reward: str | None = None
    hyperparameters: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    headline_metrics: tuple = ()  # which `metrics` go into the model-index
    tags: list = field(default_factory=list)
    task: str = "text-generation"
    library_name: str = "peft"
    usage: str = ""
    layout: str = ""


def final_metrics(log_history: list[dict]) -> dict[str, float]:
    """The last logged value of every finite numeric metric (training summary and evaluation included)."""
    metrics: dict[str, float] = {}
    for entry in log_history:
        for key, value in entry.items():
            is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if key not in BOOKKEEPING and is_number and math.isfinite(value):
                metrics[key] = float(value)
    return metrics


def pick(args, names) -> dict:
    """The fields `names` of `args` that it has, as a dict (in that order)."""
    return {name: getattr(args, name) for name in names if hasattr(args, name)}


def list_sizes(dataset, column: str = "completion_ids") -> str | None:
    """"K = 4" or "K = 2 to 4" from the lists of a prepared map-style ranked dataset (list lengths read in Arrow,
    without loading the token ids); None for a stream (read once, by training) or a dataset without the column."""
    if not isinstance(dataset, Dataset) or column not in dataset.column_names or len(dataset) == 0:
        return None
    sizes = pc.list_value_length(dataset.with_format("arrow")[column])
    low, high = pc.min(sizes).as_py(), pc.max(sizes).as_py()
    return f"K = {low}" if low == high else f"K = {low} to {high}"


def _model_index(info: CardInfo, name: str) -> list[EvalResult] | None:
    """EvalResults for the headline metrics present (evaluation metrics on the test split, the rest on train)."""
    dataset = public_name(info.dataset) or "unknown"
    results = [
        EvalResult(task_type=info.task, dataset_type=hub_id(info.dataset) or dataset, dataset_name=dataset,
                   dataset_split="test" if key.startswith("eval_") else "train", metric_type=key,
                   metric_name=key, metric_value=round(info.metrics[key], 6))
        for key in info.headline_metrics if key in info.metrics
    ]  # fmt: skip
    return results or None


def _table(rows: dict, header: tuple[str, str]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| `{key}` | {_format(value)} |" for key, value in rows.items()]
    return "\n".join(lines)


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(getattr(value, "value", value))  # enums (lr_scheduler_type ...) by their value


def render_card(info: CardInfo) -> str:
    """README.md text: Hub metadata (YAML) + what was trained, on what, how, and how to load it."""
    name = info.title
    data = ModelCardData(
        base_model=hub_id(info.base_model), datasets=[hub_id(info.dataset)] if hub_id(info.dataset) else None,
        library_name=info.library_name, pipeline_tag=info.task, tags=list(dict.fromkeys([*LIBRARY_TAGS, *info.tags])),
        model_name=name, eval_results=_model_index(info, name),
    )  # fmt: skip
    base = public_name(info.base_model) or "unknown"
    base_note = "" if hub_id(info.base_model) else " (a local folder: its path is not recorded)"
    lines = [f"# {info.title}", "", info.summary, "",
             f"- **Method:** {info.method}",
             f"- **Base model:** {base}{base_note}",
             f"- **Data:** {public_name(info.dataset) or 'not recorded'}"]  # fmt: skip
    if info.reward:
        lines.append(f"- **Reward:** {info.reward}")
    if info.layout:
        lines += ["", "## Files", "", info.layout]
    if info.usage:
        lines += ["", "## Load it", "", "```python", info.usage, "```"]
    if info.hyperparameters:
        lines += ["", "## Hyperparameters", "", _table(info.hyperparameters, ("name", "value"))]
    if info.metrics:
        lines += ["", "## Final metrics", "", "The last logged value of each metric.", "",
                  _table(info.metrics, ("metric", "value"))]  # fmt: skip
    lines += ["", "Trained with rlhf_ext, an extension of [TRL](https://github.com/huggingface/trl)."]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n").content


def write_card(folder: str | os.PathLike, info: CardInfo) -> Path:
    """Write `render_card(info)` to `folder`/README.md (replacing PEFT's template); returns its path."""
    path = Path(folder) / "README.md"
    path.write_text(render_card(info), encoding="utf-8")
    return path


# -- what each recipe trained ----------------------------------------------------------------------------------------

RUN_FIELDS = ["learning_rate", "lr_scheduler_type", "max_steps", "num_train_epochs", "per_device_train_batch_size",
              "gradient_accumulation_steps", "seed"]
SAMPLING_FIELDS = ["steps_per_generation", "num_generations", "max_completion_length", "temperature"]
PPO_FIELDS = ["num_ppo_epochs", "kl_coef", "kl_estimator", "cliprange", "cliprange_value", "vf_coef", "ent_coef",
              "gamma", "lam", "advantage_estimator", "whiten_advantages"]
MODEL_FIELDS = ["lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "load_in_4bit", "load_in_8bit",
                "value_layout"]
PEFT_USAGE = """from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer

model = AutoPeftModelForCausalLM.from_pretrained("{repo}")  # downloads the base the adapter names
tokenizer = AutoTokenizer.from_pretrained("{repo}")"""
FULL_USAGE = """from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo}")
tokenizer = AutoTokenizer.from_pretrained("{repo}")"""
ROLE_USAGE = """{download}from rlhf_ext.models import SharedBase, SharedBaseArguments

# the {role} role of a shared base: a LoRA adapter + scalar head on the base model
folder = {folder}
shared = SharedBase.from_pretrained("{base}", SharedBaseArguments({flag}=folder{sub}))"""
PPO_LAYOUT = """The repository root is the policy: a peft adapter folder and its tokenizer, loadable on its own.
`value/` is the critic (LoRA adapter + value head, `SharedBase.load_role("value", folder)`), `training/` the
hyperparameters and the log history. Locally the recipe writes the same policy to `<output_dir>/policy` and the
critic to `<output_dir>/value`; checkpoints and `training_args.bin` (local paths) are not uploaded."""
POLICY_LAYOUT = """The repository root is the policy: a peft adapter folder and its tokenizer, loadable on its own;
`training/` holds the hyperparameters and the log history. Locally the recipe writes the policy to
`<output_dir>/policy`; checkpoints and `training_args.bin` (local paths) are not uploaded."""


def _ppo(args, run: dict) -> dict:
    estimator = "GAE" if args.advantage_estimator == "gae" else args.advantage_estimator
    return dict(
        title="PPO policy (LoRA adapter)", tags=["ppo", "gae" if estimator == "GAE" else estimator, "rlhf", "lora"],
        summary=f"A LoRA adapter of {run['base']}, the policy of PPO with a critic on one shared base: policy and "
        "value are LoRA adapters of the same frozen base, which is also the KL reference.",
        method=f"PPO with {estimator} (gamma {args.gamma}, lambda {args.lam}): clipped policy and value losses, "
        f"KL penalty {args.kl_coef} x KL({args.kl_estimator}) to the base in the per-token reward",
        fields=RUN_FIELDS + SAMPLING_FIELDS + PPO_FIELDS, layout=PPO_LAYOUT, usage=PEFT_USAGE,
        headline=("reward", "objective/kl", "objective/rlhf_reward", "eval_reward"),
    )


def _value(args, run: dict) -> dict:
    return dict(
        title="PPO value model (critic): LoRA adapter + value head", tags=["ppo", "value", "critic", "lora"],
        summary=f"The critic of a PPO run on {run['base']}: a LoRA adapter and a scalar head on the last hidden "
        "state, predicting the return of each token. The policy it trained is at the root of this repository.",
        method=f"PPO value loss (clipped at {args.cliprange_value}, weight vf_coef {args.vf_coef}), GAE targets",
        fields=RUN_FIELDS + PPO_FIELDS, task=None, metric_filter=("val/", "loss/value"),
        usage=ROLE_USAGE.format(role="value", base="{base}", flag="value_adapter_path", download="{download}",
                                folder="{folder}", sub="{sub}"),
    )


def _online_kway(args, run: dict) -> dict:
    return dict(
        title="Online K-way DPO policy (LoRA adapter)", tags=["online-dpo", "plackett-luce", "kway", "rlhf", "lora"],
        summary=f"A LoRA adapter of {run['base']} trained with online K-way DPO on one shared base: the policy "
        "samples K completions per prompt, the reward ranks them, and the adapter learns the ranking; the base "
        "itself is the reference.",
        method=f"Online K-way Plackett-Luce DPO, K = {args.num_generations} completions per prompt ranked by the "
        f"reward (beta {args.dpo_beta}, top_m {args.top_m}"
        + (f", robust with rho {args.robust_rho}" if args.robust_rho else "") + ")",
        fields=RUN_FIELDS + SAMPLING_FIELDS + ["dpo_beta", "robust_rho", "top_m", "length_normalization"],
        layout=POLICY_LAYOUT,
        usage=PEFT_USAGE, headline=("loss", "rewards/accuracies", "reward", "objective/kl", "eval_loss"),
    )


def _dpo(args, run: dict) -> dict:
    return dict(
        title="K-way DPO policy" + (" (LoRA adapter)" if run["peft"] else ""),
        tags=["dpo", "plackett-luce", "kway", "rlhf", *(["lora"] if run["peft"] else [])],
        summary=f"{run['base']} fine-tuned with K-way Plackett-Luce DPO on prompts with K ranked completions; the "
        "reference is the base (the adapter disabled).",
        method=f"K-way Plackett-Luce DPO ({run['k'] or 'K from the data'}; beta {args.beta}, top_m {args.top_m}, "
        f"length_normalization {args.length_normalization})",
        fields=RUN_FIELDS + ["beta", "top_m", "length_normalization", "tie_policy", "max_length"],
        usage=PEFT_USAGE if run["peft"] else FULL_USAGE,
        headline=("loss", "rewards/accuracies", "rewards/top1_accuracy", "eval_loss", "eval_rewards/accuracies"),
        reward="the rankings in the data (implicit reward beta x log pi/pi_ref)",
    )


def _reward(args, run: dict) -> dict:
    return dict(
        title="K-way reward model" + (" (LoRA adapter + score head)" if run["peft"] else ""),
        tags=["reward-model", "reward", "plackett-luce", "kway", *(["lora"] if run["peft"] else [])],
        summary=f"A reward model on {run['base']}: a scalar score of prompt + completion, read at the last real "
        "token, trained on prompts with K ranked completions. "
        + ("This folder is the reward role of rlhf_ext's shared base (adapter + head.safetensors + "
           "head_config.json): give it to recipes/ppo.py as --reward_adapter_path." if run["peft"] else ""),
        method=f"K-way Plackett-Luce reward model ({run['k'] or 'K from the data'}; top_m {args.top_m})",
        fields=RUN_FIELDS + ["top_m", "tie_policy", "max_length", "center_rewards_coefficient"],
        task="text-classification",
        usage=ROLE_USAGE.format(role="reward", base="{base}", flag="reward_adapter_path", download="{download}",
                                folder="{folder}", sub=""),
        headline=("accuracy", "top1_accuracy", "eval_accuracy", "eval_top1_accuracy", "loss", "eval_loss"),
    )


def reward_text(reward: str | None) -> str | None:
    """How a card names the reward a run optimised: a Hub reward model by its id, a local folder by its name."""
    if not reward:
        return None
    if hub_id(reward):
        return f"{reward} (a sequence-classification reward model)"
    return f"`{public_name(reward)}`, a local reward folder (from rlhf_ext's K-way reward recipe: adapter + score head)"


KINDS = {"ppo": _ppo, "value": _value, "online_kway": _online_kway, "dpo": _dpo, "reward": _reward}


def trained_card(kind: str, args, model_args=None, *, base_model: str | None, dataset: str | None,
                 reward: str | None = None, log_history=(), k: str | None = None, repo_id: str | None = None,
                 peft: bool = True) -> CardInfo:
    """The card of a recipe's output: `kind` is "ppo", "value", "online_kway", "dpo" or "reward"; `args` the training
    config, `model_args` the LoRA / model arguments, `k` the list sizes of offline data ("K = 4")."""
    base = f"`{public_name(base_model)}`" if base_model else "an unrecorded base"
    spec = KINDS[kind](args, {"base": base, "k": k, "peft": peft})
    metrics = final_metrics(log_history)
    if "metric_filter" in spec:
        metrics = {key: value for key, value in metrics.items() if key.startswith(spec["metric_filter"])}
    fields = [f for f in spec["fields"] if not (f == "num_train_epochs" and getattr(args, "max_steps", -1) > 0)]
    hyperparameters = {**pick(args, fields), **(pick(model_args, MODEL_FIELDS) if peft and model_args else {})}
    repo = repo_id or "path/to/this/folder"
    # a pushed role is fetched with snapshot_download; a local one is read where it lies
    download = "from huggingface_hub import snapshot_download\n" if repo_id else ""
    folder = f'snapshot_download("{repo_id}")' if repo_id else '"path/to/this/folder"'
    return CardInfo(
        title=spec["title"], summary=spec["summary"], method=spec["method"], base_model=base_model, dataset=dataset,
        reward=spec.get("reward", reward_text(reward)), hyperparameters=hyperparameters, metrics=metrics,
        headline_metrics=spec.get("headline", ()), tags=spec["tags"], task=spec.get("task", "text-generation"),
        library_name="peft" if peft else "transformers", layout=spec.get("layout", ""),
        usage=spec["usage"].format(repo=repo, base=hub_id(base_model) or public_name(base_model) or "<base model>",
                                   download=download, folder=folder,
                                   sub=' + "/value"' if repo_id and kind == "value" else ""),  # value/ of the repo
    )  # fmt: skip
