"""K-way (Plackett-Luce) reward-model training on TRL's RewardTrainer.

A reward model r scores each of the K completions of a list, ranked best first, and is trained on the
negative log Plackett-Luce likelihood of the ranking (seed section 5.2, "PT model"):

    loss = - sum_{k < m} [ r(x, y_k) - log sum_{j >= k} exp r(x, y_j) ]      (`rlhf_ext.plackett_luce_loss`)

At K=2 (TRL's pairwise data) this is -log sigmoid(r_chosen - r_rejected), TRL's RewardTrainer loss.
One forward pass scores the K_1 + ... + K_B sequences of a batch.

This module also holds the helpers both K-way trainers share: the loss with a per-list ranking depth m_b
and the ranking metrics.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import is_peft_model
from transformers import AutoTokenizer
from trl import RewardConfig, RewardTrainer
from trl.trainer.utils import get_config_model_id, global_then_local_main_first

from ..data import (
    TIE_POLICIES,
    DataCollatorForRankedPreference,
    prepare_ranked_dataset,
    split_into_lists,
)
from ..ops import plackett_luce_loss

TIE_POLICY_HELP = (
    "How tied 'scores' are handled. 'truncate': keep the ranking only up to the first tie (the loss is the exact "
    "log-likelihood of the order the scores determine; all items still compete in each denominator). 'error': "
    "raise a ValueError naming the record."
)
TOP_M_HELP = (
    "Model only the first top_m places of each ranking (a partial ranking: the order among the rest is unknown). "
    "None models the full ranking."
)


def ranking_depth(num_ranked: torch.Tensor, top_m: int | None) -> torch.Tensor:
    """m_b = min(num_ranked_b, top_m): how many Plackett-Luce terms list b contributes. long [B] -> long [B]."""
    return num_ranked if top_m is None else num_ranked.clamp(max=top_m)


@dataclass
class RankingStats:
    """Per-list ranking statistics of scores [B, K] (best first), each [B]; summed over a batch, then divided."""

    top1_correct: torch.Tensor  # 1 if the best item strictly outscores every other item (lists with depth >= 1)
    has_top1: torch.Tensor  # 1 for lists with depth >= 1
    pairs_correct: torch.Tensor  # pairs (i, j), i < depth, i < j < K_b, with s_i > s_j
    pairs: torch.Tensor  # number of such pairs
    chosen: torch.Tensor  # s_1, the best item's score
    rejected: torch.Tensor  # mean score of the other items


def best_and_rest_mean(scores: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(s_1, mean of s_2..s_K) per list: TRL's "chosen" and, averaged over the others, "rejected". [B, K] -> 2 x [B]."""
    others = mask.clone()
    others[:, 0] = False
    return scores[:, 0], (scores * others).sum(dim=1) / others.sum(dim=1)


def ranking_stats(scores: torch.Tensor, mask: torch.Tensor, depth: torch.Tensor) -> RankingStats:
    """Top-1 and pairwise ranking accuracy of `scores` against the known order (the first `depth` places).

    scores [B, K] ordered by the true ranking, mask [B, K] real items, depth [B]. At K=2 `pairs_correct / pairs`
    is TRL's `rewards/accuracies` (DPO) and `accuracy` (reward) and `chosen - rejected` its margin.
    """
    scores = scores.detach().float()
    k_max = scores.shape[1]
    positions = torch.arange(k_max, device=scores.device)
    # pair (i, j) counts when i is a ranked position, j is below i, and both are real items
    counted = (positions[:, None] < positions[None, :]) & (positions[None, :, None] < depth[:, None, None])
    counted = counted & mask[:, None, :] & mask[:, :, None]
    beats = scores[:, :, None] > scores[:, None, :]
    below_best = mask & (positions > 0)
    best_wins = (beats[:, 0] | ~below_best).all(dim=1)
    has_top1 = (depth >= 1).float()
    chosen, rejected = best_and_rest_mean(scores, mask)
    return RankingStats(
        top1_correct=best_wins.float() * has_top1,
        has_top1=has_top1,
        pairs_correct=(beats & counted).sum(dim=(1, 2)).float(),
        pairs=counted.sum(dim=(1, 2)).float(),
        chosen=chosen,
        rejected=rejected,
    )


def gather_lists(accelerator, *columns: torch.Tensor) -> list[torch.Tensor]:
    """Per-list values [B] from every process, each [B_total]. gather_for_metrics drops the lists that
    even batches repeat, so only per-list (never per-sequence) values go through here."""
    gathered = accelerator.gather_for_metrics(torch.stack([c.float() for c in columns], dim=1))
    return list(gathered.unbind(dim=1))


def ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> float:
    """sum(numerator) / sum(denominator), 0 when nothing was counted."""
    den = denominator.sum().item()
    return numerator.sum().item() / den if den > 0 else 0.0


@dataclass
class PlackettLuceRewardConfig(RewardConfig):
    """RewardConfig for K ranked completions per prompt (Plackett-Luce loss); all RewardConfig fields apply.

    `max_length` truncates (keep_start) instead of filtering as TRL's RewardTrainer does, so a long completion
    does not cost the whole list; the number of truncated completions is logged.
    """

    top_m: int | None = field(default=None, metadata={"help": TOP_M_HELP})
    tie_policy: str = field(default="truncate", metadata={"help": TIE_POLICY_HELP, "choices": list(TIE_POLICIES)})

    def __post_init__(self):
        super().__post_init__()
        if self.top_m is not None and self.top_m < 1:
            raise ValueError(f"top_m must be >= 1 or None, got {self.top_m}")
        if self.tie_policy not in TIE_POLICIES:
            raise ValueError(f"tie_policy must be one of {TIE_POLICIES}, got {self.tie_policy!r}")


def ranked_collator(tokenizer, pad_to_multiple_of: int | None) -> DataCollatorForRankedPreference:
    """The K-way collator, padding with the tokenizer's pad token (EOS when it has none, as TRL does)."""
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return DataCollatorForRankedPreference(pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of)


def ranked_trainer_setup(model, args, config_class, run_suffix: str, processing_class, data_collator):
    """What both K-way trainers do before calling their TRL parent: a default config named after the model,
    a type check, the tokenizer, and the K-way collator unless one is given."""
    if args is None:
        args = config_class(f"{Path(str(getattr(model, 'name_or_path', model))).name}-{run_suffix}")
    if not isinstance(args, config_class):
        raise TypeError(f"args must be a {config_class.__name__}, got {type(args).__name__}")
    processing_class = tokenizer_for(model, processing_class, args.trust_remote_code)
    if data_collator is None:
        data_collator = ranked_collator(processing_class, args.pad_to_multiple_of)
    return args, processing_class, data_collator


def prepare_ranked_for_trainer(dataset, processing_class, args, dataset_name: str):
    """`prepare_ranked_dataset` with a K-way config's settings; the main process runs it first and the others
    read its cache, as TRL's trainers prepare their datasets."""
    with global_then_local_main_first():
        return prepare_ranked_dataset(dataset, processing_class, max_length=args.max_length,
                                      tie_policy=args.tie_policy, num_proc=args.dataset_num_proc, name=dataset_name)


def tokenizer_for(model, processing_class, trust_remote_code: bool = False):
    """`processing_class`, or the tokenizer saved with `model` (a path, or a model with a name_or_path)."""
    if processing_class is not None:
        return processing_class
    name = model if isinstance(model, str) else get_config_model_id(model.config)
    return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)


class PlackettLuceRewardTrainer(RewardTrainer):
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
            model, args, PlackettLuceRewardConfig, "PL-Reward", processing_class, data_collator
        )
        peft_config = kwargs.get("peft_config")
        if peft_config is not None and peft_config.task_type != "SEQ_CLS":
            # A reward model is a sequence classifier, and peft trains and saves the score head beside the adapter
            # only for the SEQ_CLS task type (TRL's ModelConfig defaults to CAUSAL_LM).
            kwargs["peft_config"] = dataclasses.replace(peft_config, task_type="SEQ_CLS")
        super().__init__(model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)

    # Replaces RewardTrainer._prepare_dataset: ranked records are validated, ordered best first and tokenized
    # into one prompt and K completions (pairwise records become K=2 lists).
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if "margin" in getattr(dataset, "column_names", []):
            raise ValueError(f"{dataset_name} dataset: the 'margin' column of TRL's pairwise format is not supported "
                             "by the K-way loss; remove it")
        return prepare_ranked_for_trainer(dataset, processing_class, args, dataset_name)

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt_ids", "completion_ids", "num_ranked"]

    # Replaces RewardTrainer.compute_loss, which splits the batch into a chosen and a rejected half; a ranked
    # batch holds K_b completions per list.
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        rewards, mask = split_into_lists(outputs.logits.squeeze(-1), inputs["num_completions"])
        depth = ranking_depth(inputs["num_ranked"], self.args.top_m)
        loss = plackett_luce_loss(rewards, mask, top_m=depth).mean()
        if self.args.center_rewards_coefficient is not None:
            # TRL's centring term mean((r_c + r_r)^2), summed over the K items of each list
            loss = loss + self.args.center_rewards_coefficient * (rewards * mask).sum(dim=1).pow(2).mean()
        self._log_metrics(mode, rewards, mask, depth, inputs["attention_mask"])
        return (loss, outputs) if return_outputs else loss

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
        if _internal_call or not is_peft_model(unwrapped):
            return super().save_model(output_dir, _internal_call)
        from ..models import (
            save_adapter_with_head,  # the models layer loads peft; only LoRA saves need it
        )

        output_dir = output_dir or self.args.output_dir
        if self.accelerator.is_main_process:
            score = unwrapped.get_base_model().score
            # peft trains the score head of a SEQ_CLS adapter as a copy in `modules_to_save`
            head = score.modules_to_save["default"] if hasattr(score, "modules_to_save") else score
            save_adapter_with_head(unwrapped, "default", head, output_dir, role="reward")
            self.processing_class.save_pretrained(output_dir)
        self.accelerator.wait_for_everyone()
