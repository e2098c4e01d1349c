"""K-way (Plackett-Luce) reward-model training on TRL's RewardTrainer.

A reward model r scores each of the K completions of a list, ranked best first, and is trained on the
negative log Plackett-Luce likelihood of the ranking (seed section 5.2, "PT model"):

    loss = - sum_{k < m} [ r(x, y_k) - log sum_{j >= k} exp r(x, y_j) ]      (`rlhf_ext.plackett_luce_loss`)

At K=2 (TRL's pairwise data) this is -log sigmoid(r_chosen - r_rejected), TRL's RewardTrainer loss.
One forward pass scores the K_1 + ... + K_B sequences of a batch; where exact (`shared_prompt`), each list runs as
one row [prompt | y_1 | ... | y_K], computing its prompt once (docs/kway.md). What both K-way trainers share is in
`common.py`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from accelerate.utils import is_peft_model
from trl import RewardConfig, RewardTrainer

from ...data import split_into_lists
from ...distributed import whole_weights_on_main_process
from ...models.scoring import mark_last_real_token_scoring, sequence_classifier_scores
from ...models.shared_prompt import shared_sequence_scores
from ...ops import plackett_luce_loss
from ..config_checks import KWAY_PAD_TOKEN_INSTEAD, NON_NEGATIVE, check_fields, refuse_unused_options
from ..fault_tolerance import FaultTolerantMixin
from .common import (
    RankedDataArguments,
    SharedPromptSwitch,
    finish_ranked_trainer_setup,
    gather_lists,
    positions_of,
    prepare_ranked_for_trainer,
    ranked_trainer_setup,
    ranking_depth,
    ranking_stats,
    ratio,
    with_margin,
)


@dataclass
class PlackettLuceRewardConfig(RankedDataArguments, RewardConfig):
    """RewardConfig for K ranked completions per prompt (Plackett-Luce loss); all RewardConfig fields apply, plus
    `top_m`, `tie_policy` and the record mapping (`prompt_key`, `completion_text_key`, `completion_score_key`)
    of `RankedDataArguments`.

    `max_length` truncates (keep_start) instead of filtering as TRL's RewardTrainer does, so a long completion
    does not cost the whole list; the number of truncated completions is logged.
    """

    def __post_init__(self):
        super().__post_init__()
        check_fields(
            self, {"center_rewards_coefficient": NON_NEGATIVE.or_none()},
            {"center_rewards_coefficient": "It weights a penalty on the squared sum of each list's rewards; a negative "
             "weight would reward pushing the rewards away from 0. None turns it off."},
        )  # fmt: skip
        # the one RewardConfig option the K-way reward trainer never reads (tests/test_inherited_options.py)
        refuse_unused_options(self, {"pad_token": KWAY_PAD_TOKEN_INSTEAD}, "RewardConfig", "the K-way reward trainer")


class PlackettLuceRewardTrainer(FaultTolerantMixin, RewardTrainer):
    """TRL's RewardTrainer with the K-way Plackett-Luce loss on ranked lists (and TRL's pairwise data as K=2).

    Takes what RewardTrainer takes (`model` as a path or a sequence-classification model with num_labels=1,
    `peft_config` for LoRA). With a LoRA adapter, `save_model` writes the role folder of docs/architecture.md
    (adapter + head.safetensors + head_config.json) that `rlhf_ext.models.SharedBase` loads as its reward role.

    Example:
        >>> trainer = PlackettLuceRewardTrainer(model="path/to/model", args=PlackettLuceRewardConfig("out"),
        ...     train_dataset=Dataset.from_list([{"prompt": "Q", "completions": ["a", "b", "c"], "scores": [2, 0, 1]}]))
    """

    _tag_names = ["trl", "reward-trainer", "rlhf_ext", "plackett-luce"]
    _name = "Plackett-Luce Reward"

    def __init__(self, model, args: PlackettLuceRewardConfig | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, **kwargs):
        args, processing_class, data_collator = ranked_trainer_setup(
            model, args, PlackettLuceRewardConfig, "PL-Reward", processing_class, data_collator, train_dataset,
            eval_dataset,
        )
        self._max_positions = positions_of(model, args)  # the datasets are checked against it as they are prepared
        self._stream_counts = {}  # what preparing a streamed dataset dropped or cut, counted as it is read
        self._shared_prompt = SharedPromptSwitch(args.shared_prompt, scores=True)
        peft_config = kwargs.get("peft_config")
        if peft_config is not None and peft_config.task_type != "SEQ_CLS":
            # A reward model is a sequence classifier, and peft trains and saves the score head beside the adapter
            # only for the SEQ_CLS task type (TRL's ModelConfig defaults to CAUSAL_LM).
            kwargs["peft_config"] = dataclasses.replace(peft_config, task_type="SEQ_CLS")
        super().__init__(model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        finish_ranked_trainer_setup(self)

    # Replaces RewardTrainer._prepare_dataset: ranked records are validated, ordered best first and tokenized
    # into one prompt and K completions (pairwise records become K=2 lists, TRL's `margin` column is read).
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return prepare_ranked_for_trainer(dataset, processing_class, args, dataset_name, self._max_positions,
                                          margin=True, stream_counts=self._stream_counts)

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt_ids", "completion_ids", "num_ranked", "margin"]

    # Replaces RewardTrainer.compute_loss, which splits the batch into a chosen and a rejected half; a ranked
    # batch holds K_b completions per list.
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        # Read at the last real token (`rlhf_ext.models.scoring`), not by transformers' pad-based pooling: with pad =
        # EOS that pooling skips the EOS, and the PPO reward role, which reads by the attention mask, would score
        # another token than the one trained here.
        shared = self._shared_prompt.batch(inputs, self)  # None: the K rows of each list run as they are
        if shared is not None:
            scores = shared_sequence_scores(model, shared)
        else:
            scores = sequence_classifier_scores(model, inputs["input_ids"], inputs["attention_mask"])
        rewards, mask = split_into_lists(scores.squeeze(-1), inputs["num_completions"])
        depth = ranking_depth(inputs["num_ranked"], self.args.top_m)
        loss = plackett_luce_loss(with_margin(rewards, inputs.get("margin")), mask, top_m=depth).mean()
        if self.args.center_rewards_coefficient is not None:
            # TRL's centring term mean((r_c + r_r)^2), summed over the K items of each list
            loss = loss + self.args.center_rewards_coefficient * (rewards * mask).sum(dim=1).pow(2).mean()
        self._log_metrics(mode, rewards, mask, depth, inputs["attention_mask"])
        return (loss, {"logits": scores}) if return_outputs else loss

    def _log_metrics(self, mode: str, rewards, mask, depth, attention_mask) -> None:
        """TRL's reward metric names (accuracy, margin, min/mean/max_reward, num_tokens) plus top1_accuracy."""
        acc = self.accelerator
        if mode == "train":
            self._total_train_tokens += acc.gather_for_metrics(attention_mask.sum()).sum().item() // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        stats = ranking_stats(rewards, mask, depth)
        rewards = rewards.detach()
        lowest, highest, total, count, pairs_correct, pairs, top1_correct, has_top1, margin = gather_lists(
            acc, rewards.masked_fill(~mask, torch.inf).amin(dim=1), rewards.masked_fill(~mask, -torch.inf).amax(dim=1),
            (rewards * mask).sum(dim=1), mask.sum(dim=1), stats.pairs_correct, stats.pairs, stats.top1_correct,
            stats.has_top1, stats.chosen - stats.rejected,
        )
        metrics = self._metrics[mode]
        metrics["min_reward"].append(lowest.min().item())
        metrics["mean_reward"].append(ratio(total, count))
        metrics["max_reward"].append(highest.max().item())
        metrics["accuracy"].append(ratio(pairs_correct, pairs))
        metrics["top1_accuracy"].append(ratio(top1_correct, has_top1))
        metrics["margin"].append(margin.mean().item())

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Save as RewardTrainer does; a LoRA reward model's final save is the adapter + head role folder.

        Checkpoints (`_internal_call`) keep peft's layout so `resume_from_checkpoint` restores the score head.
        """
        unwrapped = self.accelerator.unwrap_model(self.model)
        if not is_peft_model(unwrapped):
            mark_last_real_token_scoring(unwrapped)  # so PPO reads a saved full reward model where it was trained
        if _internal_call or not is_peft_model(unwrapped):
            return super().save_model(output_dir, _internal_call)
        from ...models import (
            save_adapter_with_head,  # the models layer loads peft; only LoRA saves need it
        )

        output_dir = output_dir or self.args.output_dir
        # ZeRO-3 and FSDP: every process takes part in gathering the adapter and head it holds 1/N of
        with whole_weights_on_main_process(self.accelerator, self.model):
            if self.accelerator.is_main_process:
                score = unwrapped.get_base_model().score
                # peft trains the score head of a SEQ_CLS adapter as a copy in `modules_to_save`
                head = score.modules_to_save["default"] if hasattr(score, "modules_to_save") else score
                save_adapter_with_head(unwrapped, "default", head, output_dir, role="reward")
                self.processing_class.save_pretrained(output_dir)
        self.accelerator.wait_for_everyone()
