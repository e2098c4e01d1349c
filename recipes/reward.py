"""K-way (Plackett-Luce) reward model: train a scalar reward on prompts with K ranked completions.

    accelerate launch recipes/reward.py --config recipes/configs/reward.yaml \
        --model_name_or_path <model or path> --dataset_name <hub name | file.jsonl | file.parquet> \
        [--use_peft --lora_r 16] [--top_m 2] [--push_to_hub --hub_model_id <id>]

Datasets: the ranked format of docs/kway.md (`prompt` + `completions` best first, or with `ranking` / `scores`)
or TRL's pairwise `prompt`/`chosen`/`rejected`. `--help` lists every option (TRL's RewardConfig and ModelConfig
plus `top_m`, `tie_policy`). With `--use_peft` the saved folder is the adapter + head
reward role that `rlhf_ext.models.SharedBase` loads. In-process: `main(script_args, training_args, model_args)`.
"""

from trl import (
    ModelConfig,
    ScriptArguments,
    TrlParser,
    get_peft_config,
    get_quantization_config,
)

from rlhf_ext.data import load_dataset_or_file
from rlhf_ext.recipe_utils import model_init_kwargs, train_save_push
from rlhf_ext.trainers import PlackettLuceRewardConfig, PlackettLuceRewardTrainer


def main(script_args: ScriptArguments, training_args: PlackettLuceRewardConfig, model_args: ModelConfig):
    """Train, save to `training_args.output_dir`, push if asked; returns the trainer."""
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)
    dataset = load_dataset_or_file(script_args.dataset_name, script_args.dataset_config)
    evaluate = training_args.eval_strategy != "no"
    trainer = PlackettLuceRewardTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if evaluate else None,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    return train_save_push(trainer, training_args, script_args.dataset_name)


def make_parser() -> TrlParser:
    return TrlParser((ScriptArguments, PlackettLuceRewardConfig, ModelConfig))


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
