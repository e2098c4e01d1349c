"""What the two K-way trainers (Plackett-Luce DPO and reward) share: the options their configs add to TRL's,
the setup before their TRL parent's `__init__`, dataset preparation, the per-list ranking depth m_b and the
ranking metrics."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import is_peft_model
from datasets import IterableDataset
from transformers import AutoTokenizer, TrainerCallback
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import get_config_model_id, global_then_local_main_first, use_adapter

from ...data import TIE_POLICIES, DataCollatorForRankedPreference, StreamCounts, prepare_ranked_dataset
from ...data.prepare import check_not_empty
from ...data.ranked import check_field_mapping
from ...distributed import check_engine_supports
from ...models.quantization import match_trainable_dtype
from ..checkpointing_name import ActivationCheckpointingByDefault
from ..config_checks import COMMON_RULES, COUNT, check_fields, warn_if_warmup_outlasts_run
from ..hub_token import NoStoredHubToken
from ..position_limits import model_max_positions
from ..shared_prompt import SharedPromptSwitch  # noqa: F401 (re-exported: the K-way trainers import it here)

logger = logging.getLogger(__name__)

TIE_POLICY_HELP = (
    "How tied 'scores' are handled. 'truncate': keep the ranking only up to the first tie (the loss is the exact "
    "log-likelihood of the order the scores determine; all items still compete in each denominator). 'error': "
    "raise a ValueError naming the record."
)
SHARED_PROMPT_HELP = (
    "Compute each prompt once: one row per list, [prompt | completion 1 | ... | completion K], each completion "
    "attending to the prompt and to itself only (docs/kway.md, 'Each prompt computed once'); the loss, gradients and "
    "metrics are those of the K separate rows. None: on wherever that is exact (a decoder with causal sdpa or eager "
    "attention; see the docs), else off with one log line saying why. True: on, and a ValueError where it cannot be "
    "exact. False: off."
)
TOP_M_HELP = (
    "Model only the first top_m places of each ranking (a partial ranking: the order among the rest is unknown). "
    "None models the full ranking."
)


@dataclass
class RankedDataArguments(NoStoredHubToken, ActivationCheckpointingByDefault):
    """The fields both K-way configs add to TRL's: how much of each ranking is modelled, how records are read, and
    whether each prompt is computed once (`shared_prompt`).

    A mixin: list it before the TRL config (`class C(RankedDataArguments, DPOConfig)`), so TRL's fields keep their
    positions (`C("out")` is still `output_dir="out"`) and `__post_init__` runs TRL's checks first.
    """

    top_m: int | None = field(default=None, metadata={"help": TOP_M_HELP})
    tie_policy: str = field(default="truncate", metadata={"help": TIE_POLICY_HELP, "choices": list(TIE_POLICIES)})
    prompt_key: str = field(
        default="prompt",
        metadata={"help": "Field holding the prompt of a ranked record (UltraFeedback: 'instruction')."},
    )
    completion_text_key: str | None = field(
        default=None,
        metadata={
            "help": "For records whose completions are dicts: the key of each dict that holds the completion's "
            "text (UltraFeedback: 'response'). None: completions are strings or lists of messages."
        },
    )
    completion_score_key: str | None = field(
        default=None,
        metadata={
            "help": "For dict completions: the key of each dict that holds its score, higher = better "
            "(UltraFeedback: 'overall_score'); the completions are ordered by it. Needs completion_text_key."
        },
    )

    shared_prompt: bool | None = field(default=None, metadata={"help": SHARED_PROMPT_HELP})

    def __post_init__(self):
        super().__post_init__()
        check_fields(self, {**COMMON_RULES, "top_m": COUNT.or_none(), "max_length": COUNT.or_none()})
        warn_if_warmup_outlasts_run(self)
        if self.tie_policy not in TIE_POLICIES:
            raise ValueError(f"tie_policy must be one of {TIE_POLICIES}, got {self.tie_policy!r}")
        check_field_mapping(self.prompt_key, self.completion_text_key, self.completion_score_key)
        if self.shared_prompt not in (None, True, False):
            raise ValueError(f"shared_prompt must be None (where exact), True or False, got {self.shared_prompt!r}")


def check_datasets_not_empty(train_dataset, eval_dataset) -> None:
    """Refuse empty datasets before the TRL parent loads the model (DPOTrainer would raise a bare StopIteration)."""
    if train_dataset is not None:
        check_not_empty(train_dataset, "train")
    if isinstance(eval_dataset, dict):
        for name, dataset in eval_dataset.items():
            check_not_empty(dataset, name)
    elif eval_dataset is not None:
        check_not_empty(eval_dataset, "eval")


def refuse_streams_with_precomputed_reference(args, datasets: dict) -> None:
    """ValueError for a streamed dataset when `args.precompute_ref_log_probs` is set (DPO): the precompute is a
    pass over the whole dataset that stores K log-probs in a new column of each record, which a stream, read once
    and never held, has no place for (TRL's DPOTrainer refuses it too)."""
    if not getattr(args, "precompute_ref_log_probs", False):
        return
    for name, dataset in datasets.items():
        if isinstance(dataset, IterableDataset):
            raise ValueError(
                f"{name} dataset is a stream (datasets.IterableDataset), and precompute_ref_log_probs=True needs a "
                "map-style datasets.Dataset: it stores each record's reference log-probs beside the record before "
                "training. Set precompute_ref_log_probs=False (the reference model then runs beside the policy at "
                "each step), or load the data as a map-style Dataset (streaming=False). (As in TRL: "
                "precompute_ref_log_probs=True is not supported with IterableDataset.)"
            )


def batches_read_by_each_process(args) -> None:
    """Set accelerate's `dispatch_batches=False`: each process reads its own share of a stream.

    With dispatching (accelerate's default for a `datasets.IterableDataset`), the main process reads a batch and
    slices every tensor along its first dimension by the length of the first one it finds; a K-way batch holds B
    lists (`num_completions`, first) but K_1 + ... + K_B sequences, so the sequences were cut to B (and evaluation
    failed in `split_with_sizes`). Map-style datasets are not dispatched either way. An explicit True is refused.
    """
    if args.accelerator_config.dispatch_batches:
        raise ValueError(
            "accelerator_config.dispatch_batches=True cannot split a K-way batch across processes (it holds B lists "
            "but K_1 + ... + K_B sequences, and accelerate slices every tensor to the first one's length); leave it "
            "unset or set it to False, so each process reads its own share of a streamed dataset."
        )
    args.accelerator_config.dispatch_batches = False


def ranked_collator(tokenizer, pad_to_multiple_of: int | None) -> DataCollatorForRankedPreference:
    """The K-way collator, padding with the tokenizer's pad token, else EOS (as TRL does), else 0.

    Any id can pad: the attention and completion masks leave padding out of every score and log-prob (and rewards
    are read by the mask, `rlhf_ext.models.scoring`). The collator is built before TRL's trainer sets a pad token
    (from `args.eos_token`), so a tokenizer with neither token would otherwise pad with None at the first step.
    """
    pad_token_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    return DataCollatorForRankedPreference(pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of)


def tokenizer_for(model, processing_class, trust_remote_code: bool = False):
    """`processing_class`, or the tokenizer saved with `model` (a path, or a model with a name_or_path)."""
    if processing_class is not None:
        return processing_class
    name = model if isinstance(model, str) else get_config_model_id(model.config)
    return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)


def ranked_trainer_setup(model, args, config_class, run_suffix: str, processing_class, data_collator,
                         train_dataset=None, eval_dataset=None):
    """What both K-way trainers do before calling their TRL parent: a default config named after the model,
    a type check, a check that no dataset is empty, the tokenizer, and the K-way collator unless one is given."""
    if args is None:
        args = config_class(f"{Path(str(getattr(model, 'name_or_path', model))).name}-{run_suffix}")
    if not isinstance(args, config_class):
        raise TypeError(f"args must be a {config_class.__name__}, got {type(args).__name__}")
    check_datasets_not_empty(train_dataset, eval_dataset)
    batches_read_by_each_process(args)
    eval_sets = eval_dataset if isinstance(eval_dataset, dict) else {"eval": eval_dataset}
    refuse_streams_with_precomputed_reference(args, {"train": train_dataset, **eval_sets})
    processing_class = tokenizer_for(model, processing_class, args.trust_remote_code)
    if data_collator is None:
        data_collator = ranked_collator(processing_class, args.pad_to_multiple_of)
    return args, processing_class, data_collator


def positions_of(model, args) -> int | None:
    """The model's position limit (max_position_embeddings), read before the TRL parent loads the model and
    prepares the datasets: a path's config only, or a loaded model's config."""
    return model_max_positions(model, args.trust_remote_code, (args.model_init_kwargs or {}).get("revision"))


def prepare_ranked_for_trainer(dataset, processing_class, args, dataset_name: str, max_positions: int | None = None,
                               *, margin: bool = False, stream_counts: dict[str, StreamCounts] | None = None):
    """`prepare_ranked_dataset` with a K-way config's settings; the main process runs it first and the others
    read its cache, as TRL's trainers prepare their datasets. With the model's `max_positions`, a list longer than
    the positions after truncation is refused (see `rlhf_ext.trainers.position_limits`). `margin`: read TRL's
    reward margin column. A stream's counts go to `stream_counts[dataset_name]` (logged by `StreamCountsCallback`)."""
    counts = None
    if isinstance(dataset, IterableDataset) and stream_counts is not None:
        counts = stream_counts[dataset_name] = StreamCounts(dataset_name)
        if args.dataloader_num_workers > 0:
            logger.warning(
                "%s dataset is a stream read by %d DataLoader workers: its records are validated in the workers, so "
                "the counts of dropped and truncated lists are not logged (they stay in the workers), and a bad "
                "record's index counts within its worker's share of the stream", dataset_name,
                args.dataloader_num_workers,
            )
    with global_then_local_main_first():
        return prepare_ranked_dataset(
            dataset, processing_class, max_length=args.max_length, tie_policy=args.tie_policy,
            num_proc=args.dataset_num_proc, name=dataset_name, prompt_key=args.prompt_key,
            completion_text_key=args.completion_text_key, completion_score_key=args.completion_score_key,
            max_positions=max_positions, margin=margin, stream_counts=counts,
        )


class StreamCountsCallback(TrainerCallback):
    """Logs what preparing a streamed dataset dropped, truncated, de-duplicated or found tied: a stream is counted
    as it is read, so the train stream's counts are logged when training ends and an eval stream's after each
    evaluation (then reset, so each evaluation reports its own pass)."""

    def __init__(self, stream_counts: dict[str, StreamCounts]):
        self.stream_counts = stream_counts

    def on_train_end(self, args, state, control, **kwargs):
        if "train" in self.stream_counts and state.is_world_process_zero:
            self.stream_counts["train"].log()

    def on_evaluate(self, args, state, control, **kwargs):
        for name, counts in self.stream_counts.items():
            if name != "train":
                if state.is_world_process_zero:
                    counts.log()
                counts.reset()  # in place: the stream's map functions are bound to this object


def finish_ranked_trainer_setup(trainer) -> None:
    """What both K-way trainers do once TRL's `__init__` has built them: count streamed records, keep the trainable
    weights in the model's compute dtype (TRL casts those of a quantized base, a score head's copy included, to
    bfloat16 whatever the compute dtype, and a float32 base then fails at step 1), refuse an engine the trainer
    cannot run on, and decide whether each prompt is computed once."""
    trainer.add_callback(StreamCountsCallback(trainer._stream_counts))
    match_trainable_dtype(trainer.model)
    check_engine_supports(trainer.model, trainer.accelerator, type(trainer).__name__)
    trainer._shared_prompt.decide(trainer)


def ranking_depth(num_ranked: torch.Tensor, top_m: int | None) -> torch.Tensor:
    """m_b = min(num_ranked_b, top_m): how many Plackett-Luce terms list b contributes. long [B] -> long [B]."""
    return num_ranked if top_m is None else num_ranked.clamp(max=top_m)


def with_margin(rewards: torch.Tensor, margin: torch.Tensor | None) -> torch.Tensor:
    """Rewards [B, K] with the best item's lowered by the list's margin [B] (TRL's reward `margin` column).

    At K=2 the loss is then -log sigmoid(r_1 - margin - r_2), TRL's RewardTrainer loss with a margin; the data
    layer refuses a margin on longer lists (`rlhf_ext.data.ranked.check_margin`), where it is 0.
    """
    if margin is None:
        return rewards
    shift = torch.zeros_like(rewards)
    shift[:, 0] = margin.to(rewards.dtype)
    return rewards - shift


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


@contextlib.contextmanager
def reference_forward(trainer):
    """The context of DPOTrainer.compute_ref_log_probs (TRL 1.16) for a reference pass it cannot make itself (it sums
    each row, and a shared row holds K completions): no gradient, the policy's checkpointing off, the peft adapter
    off (or the "ref" adapter) when the reference is the policy's base, and accelerate's autocast."""
    adapter = contextlib.nullcontext()
    if trainer.ref_model is None and is_peft_model(trainer.model):
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        adapter = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
    with (
        torch.no_grad(),
        disable_gradient_checkpointing(trainer.model, trainer.args.gradient_checkpointing_kwargs),
        adapter,
        trainer.accelerator.autocast(),
    ):
        yield
