"""The two trainers on TRL's GRPOTrainer (PPO and online K-way), built alike by the tests that cover both."""

from rlhf_ext.trainers import OnlinePlackettLuceConfig, OnlinePlackettLuceTrainer, PPOConfig, PPOTrainer

TRAINERS = {"ppo": (PPOConfig, PPOTrainer), "online": (OnlinePlackettLuceConfig, OnlinePlackettLuceTrainer)}


def tiny_run(name: str, output_dir, **overrides):
    """(trainer class, config) for `name` ("ppo" or "online"): 4 completions of 4 tokens per step, on the CPU."""
    config_class, trainer_class = TRAINERS[name]
    settings = dict(output_dir=str(output_dir), per_device_train_batch_size=4, num_generations=2,
                    max_completion_length=4, report_to=[], use_cpu=True, bf16=False, gradient_checkpointing=False,
                    disable_tqdm=True)
    return trainer_class, config_class(**{**settings, **overrides})
