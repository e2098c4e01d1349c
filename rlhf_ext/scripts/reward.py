"""K-way (Plackett-Luce) reward model: train a scalar reward on prompts with K ranked completions.

    accelerate launch recipes/reward.py --config recipes/configs/reward.yaml \
        --model_name_or_path <model or path> --dataset_name <hub name | file.jsonl | file.parquet> \
        [--lora_r 16] [--top_m 2] [--push_to_hub --hub_model_id <id>]

Datasets: the ranked format of docs/kway.md (`prompt` + `completions` best first, or with `ranking` / `scores`)
or TRL's pairwise `prompt`/`chosen`/`rejected`. `--help` lists every option (TRL's RewardConfig and ModelConfig
plus `top_m`, `tie_policy`). LoRA is on by default, and the saved folder is then the adapter + head reward role
that `rlhf_ext.models.SharedBase` (and `recipes/ppo.py --reward_adapter_path`) loads; `--use_peft false` trains
and saves a full model. A 4-bit or 8-bit base (`--load_in_4bit`, `--load_in_8bit`) trains with the default
float32 `--dtype` too. In-process: `main(script_args, training_args, model_args)`.
"""

from trl import ScriptArguments

from rlhf_ext.recipe_utils import (
    LoraModelConfig,
    recipe_parser,
    run_kway_recipe,
)
from rlhf_ext.trainers import PlackettLuceRewardConfig, PlackettLuceRewardTrainer

USAGE = "reward.py --config recipes/configs/reward.yaml [--FLAG VALUE ...]"
DESCRIPTION = """\
K-way (Plackett-Luce) reward model: a LoRA adapter + score head trained on prompts with K ranked completions;
the output folder is the reward role that recipes/ppo.py loads (its reward_adapter_path).

--config FILE.yaml            every key is a flag below; flags given on the command line override it
--model_name_or_path PATH     base model: Hub id or local folder
--dataset_name NAME           Hub dataset, or a local .json / .jsonl / .parquet file (one "train" split)
--output_dir DIR              where the reward role folder (adapter + head + tokenizer) is written
--top_m M                     model only the first M places of each ranking (default: the full ranking)
--tie_policy truncate         tied scores end the known part of a ranking ("error": refuse them)
--max_length 512              truncate prompt + completion to this many tokens
--use_peft / --lora_r 16      LoRA (on by default) and its rank; --use_peft false trains and saves a full model
--load_in_4bit, --load_in_8bit  quantized base (QLoRA); works with the default --dtype float32
--learning_rate, --max_steps, --per_device_train_batch_size, --seed
--eval_strategy steps         evaluate on --dataset_test_split (default "test") every --eval_steps
--resume_from_checkpoint DIR|latest (docs/faults.md), --push_to_hub --hub_model_id ID

All TRL RewardConfig / ModelConfig and transformers TrainingArguments flags follow.
"""


def main(script_args: ScriptArguments, training_args: PlackettLuceRewardConfig, model_args: LoraModelConfig):
    """Train, save to `training_args.output_dir`, push if asked; returns the trainer."""
    return run_kway_recipe(PlackettLuceRewardTrainer, "reward", script_args, training_args, model_args)


def make_parser():
    return recipe_parser((ScriptArguments, PlackettLuceRewardConfig, LoraModelConfig), USAGE, DESCRIPTION)


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
