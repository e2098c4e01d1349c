"""What every preference recipe does around its trainer: model-loading kwargs, and train / save / push."""

from __future__ import annotations

import transformers
from packaging.version import Version


def model_init_kwargs(model_args, training_args) -> dict:
    """kwargs for `from_pretrained` of the trained model from TRL's ModelConfig; the config's own
    `model_init_kwargs` take precedence."""
    return {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }


def train_save_push(trainer, training_args, dataset_name: str | None):
    """Train (resuming if asked), save to output_dir, push to the Hub if asked; returns the trainer."""
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=dataset_name)
        trainer.accelerator.print(f"Model pushed to https://huggingface.co/{trainer.hub_model_id}")
    if Version(transformers.__version__) >= Version("5.18.0"):
        trainer.end()  # finish the trackers and the process group
    return trainer
