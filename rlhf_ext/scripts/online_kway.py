"""Online K-way (Plackett-Luce) DPO on one shared base: a trainable policy adapter, a frozen reward adapter + head as
the judge, and the base itself as the reference (docs/kway.md, "Online K-way DPO").

    accelerate launch recipes/online_kway.py --config recipes/configs/online_kway.yaml --reward_adapter_path out/reward
    python recipes/online_kway.py --help

Every field of `OnlineKWayScriptArguments`, `OnlinePlackettLuceConfig` and `SharedBaseArguments` is a CLI flag and a
YAML key; flags override the YAML. The reward is the reward role (`--reward_adapter_path`, the folder the K-way reward
recipe writes) or a sequence-classification model (`--reward_model_name_or_path`), never both. The shared base's value
adapter is built but unused and frozen. Writes `<output_dir>/policy` (peft adapter folder + tokenizer + card);
`--push_to_hub` uploads it once, at the end, as the repository root, with `training/` (see `rlhf_ext.publish`).
"""  # noqa: E501 (a shell command in the docstring; wrapping it would break copy-paste)

from __future__ import annotations

from dataclasses import dataclass

from rlhf_ext.models import SharedBaseArguments
from rlhf_ext.recipe_utils import recipe_parser
from rlhf_ext.scripts import ppo as ppo_recipe  # the prompt loading, argument checks and tokenizer it shares
from rlhf_ext.trainers.kway.online import OnlinePlackettLuceConfig, OnlinePlackettLuceTrainer

USAGE = "online_kway.py --config recipes/configs/online_kway.yaml --reward_adapter_path DIR [--FLAG VALUE ...]"
DESCRIPTION = """\
Online K-way DPO on one shared base: K = num_generations completions per prompt are sampled, ranked by the frozen
reward adapter + head, and the policy adapter minimises the Plackett-Luce DPO loss of that ranking; the base itself is
the reference. Writes <output_dir>/policy (adapter + tokenizer).

--config FILE.yaml            every key is a flag below; flags given on the command line override it
--model_name_or_path PATH     base model: Hub id or local folder
--reward_adapter_path DIR     reward role folder (the K-way reward recipe's --output_dir), or instead:
--reward_model_name_or_path   a sequence-classification reward model (num_labels=1); not both
--dataset_name NAME           Hub dataset, or a local .json / .jsonl / .parquet file with a "prompt" column
--output_dir DIR              where policy/ and checkpoints are written
--num_generations 4           K, completions ranked per prompt (per_device_train_batch_size: a multiple of it)
--dpo_beta 0.1, --top_m       implicit reward scale; model only the first top_m places of each ranking
--length_normalization        divide log-probs by completion length (K=2: TRL's sigmoid_norm)
--max_completion_length N, --learning_rate, --max_steps, --seed
--lora_r 16, --load_in_4bit   LoRA rank of the policy; quantized base (--use_peft: always on here)
--resume_from_checkpoint DIR|latest (docs/faults.md), --push_to_hub --hub_model_id ID

All OnlinePlackettLuceConfig (TRL GRPOConfig) and transformers TrainingArguments flags follow.
"""


@dataclass
class OnlineKWayScriptArguments(ppo_recipe.PromptRecipeArguments):
    """Data and reward of the online K-way recipe: the PPO recipe's, without its KL controller (here the KL to the
    reference is set by --dpo_beta) and completions table."""


def main(script_args: OnlineKWayScriptArguments, training_args: OnlinePlackettLuceConfig,
         model_args: SharedBaseArguments) -> OnlinePlackettLuceTrainer:
    """Train, save the policy role under `training_args.output_dir`, and push if asked."""
    trainer, shared, tokenizer, push = ppo_recipe.trainer_on_shared_base(
        OnlinePlackettLuceTrainer, script_args, training_args, model_args
    )
    return ppo_recipe.train_save_policy_push(
        trainer, shared, tokenizer, training_args, script_args, model_args, push, kind="online_kway"
    )


def make_parser():
    dataclass_types = (OnlineKWayScriptArguments, OnlinePlackettLuceConfig, SharedBaseArguments)
    return recipe_parser(dataclass_types, USAGE, DESCRIPTION)


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
