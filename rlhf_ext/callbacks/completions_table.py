"""A table of sampled completions, their scores and KL, written every N optimizer steps."""

from __future__ import annotations

import json
import os

from transformers import TrainerCallback

TABLE_DIR = "completions"


class CompletionsTableCallback(TrainerCallback):
    """Every `every_n_steps` optimizer steps, write the latest rollout of a PPOTrainer as a table.

    One JSON line per completion, in `<output_dir>/completions/ppo_step_<step>.jsonl`, with the fields of
    `PPOTrainer.last_rollout`: prompt, completion, score (after the missing-EOS penalty), kl (summed over tokens),
    rlhf_reward (score - kl_coef * kl) and skipped (the reward was NaN). With wandb reporting, the table is also
    logged as `completions`.

    Args:
        trainer: the PPOTrainer whose rollouts to record (callbacks are not handed the trainer otherwise).
        every_n_steps: write a table every this many optimizer steps.
        max_rows: keep at most this many completions per table (None: all of the generation batch).
    """

    def __init__(self, trainer, every_n_steps: int = 10, max_rows: int | None = None):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}.")
        self.trainer = trainer
        self.every_n_steps = every_n_steps
        self.max_rows = max_rows

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every_n_steps or not state.is_world_process_zero:
            return
        rows = self.trainer.last_rollout[: self.max_rows]
        path = os.path.join(args.output_dir, TABLE_DIR, f"ppo_step_{state.global_step:06d}.jsonl")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        _log_to_wandb(args, rows, state.global_step)


def _log_to_wandb(args, rows: list[dict], step: int) -> None:
    if not args.report_to or "wandb" not in args.report_to or not rows:
        return
    import wandb

    if wandb.run is not None:
        columns = list(rows[0])
        wandb.log(
            {"completions": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])}, step=step
        )
