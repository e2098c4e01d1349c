"""K-way (Plackett-Luce) DPO: fine-tune a causal LM on prompts with K ranked completions.

    accelerate launch recipes/dpo.py --config recipes/configs/dpo.yaml \
        --model_name_or_path <model or path> --dataset_name <hub name | file.jsonl | file.parquet> \
        [--lora_r 16] [--top_m 2] [--length_normalization] [--push_to_hub --hub_model_id <id>]

Datasets: the ranked format of docs/kway.md (`prompt` + `completions` best first, or with `ranking` / `scores`)
or TRL's pairwise `prompt`/`chosen`/`rejected`. `--help` lists every option (TRL's DPOConfig and ModelConfig
plus `top_m`, `length_normalization`, `tie_policy`). LoRA is on by default (`--use_peft false` trains every
weight). In-process: `main(script_args, training_args, model_args)`.
"""

from trl import ScriptArguments

from rlhf_ext.recipe_utils import (
    LoraModelConfig,
    recipe_parser,
    run_kway_recipe,
)
from rlhf_ext.trainers import PlackettLuceDPOConfig, PlackettLuceDPOTrainer

USAGE = "dpo.py --config recipes/configs/dpo.yaml [--FLAG VALUE ...]"
DESCRIPTION = """\
K-way (Plackett-Luce) DPO: fine-tune a causal LM (a LoRA adapter by default) on prompts with K ranked completions.

--config FILE.yaml            every key is a flag below; flags given on the command line override it
--model_name_or_path PATH     base model: Hub id or local folder
--dataset_name NAME           Hub dataset, or a local .json / .jsonl / .parquet file (one "train" split)
--output_dir DIR              where the adapter (or model) and tokenizer are written
--beta 0.1                    strength of the pull toward the reference (the base with the adapter off)
--top_m M                     model only the first M places of each ranking (default: the full ranking)
--length_normalization        divide log-probs by completion length (TRL's sigmoid_norm at K=2)
--max_length 512              truncate prompt + completion to this many tokens
--use_peft / --lora_r 16      LoRA (on by default) and its rank; --use_peft false trains every weight
--learning_rate, --max_steps, --per_device_train_batch_size, --seed
--eval_strategy steps         evaluate on --dataset_test_split (default "test") every --eval_steps
--resume_from_checkpoint DIR|latest (docs/faults.md), --push_to_hub --hub_model_id ID

All TRL DPOConfig / ModelConfig and transformers TrainingArguments flags follow.
"""


def main(script_args: ScriptArguments, training_args: PlackettLuceDPOConfig, model_args: LoraModelConfig):
    """Train, save to `training_args.output_dir`, push if asked; returns the trainer."""
    return run_kway_recipe(PlackettLuceDPOTrainer, "dpo", script_args, training_args, model_args)


def make_parser():
    return recipe_parser((ScriptArguments, PlackettLuceDPOConfig, LoraModelConfig), USAGE, DESCRIPTION)


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
