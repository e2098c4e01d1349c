"""K-way (Plackett-Luce) DPO on TRL's DPOTrainer: learn from K ranked completions per prompt in one pass.

For a prompt x and completions y_1 > ... > y_K (best first), with implicit rewards

    s_k = beta * (log pi_theta(y_k | x) - log pi_ref(y_k | x))          (summed over completion tokens)

the loss is the seed's section 5.2 "PT model" objective, the negative log Plackett-Luce probability of the
ranking (`rlhf_ext.dpo_plackett_luce_loss`):

    loss = - sum_{k < m} log softmax_{j >= k}(s_j)[k] = - sum_{k < m} [ s_k - log sum_{j >= k} exp s_j ]

with m = K - 1 for a full ranking (the last term is 0), fewer for a partial ranking (`top_m`) or tied scores
(`tie_policy`). At K=2 it is TRL's sigmoid DPO loss -log sigmoid(s_1 - s_2), and with
`length_normalization=True` (log-probs divided by the completion length) TRL's "sigmoid_norm".

A batch of B lists is one padded batch of K_1 + ... + K_B sequences, so an epoch costs K forward passes
per list where TRL on all pairs costs K(K-1) (two per pair). Where exact (`shared_prompt`), the forward runs each
list as one row [prompt | y_1 | ... | y_K] instead, computing the prompt once (docs/kway.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from accelerate.utils import tqdm
from torch.utils.data import DataLoader
from trl import DPOConfig, DPOTrainer

from ...data import split_into_lists
from ...models.shared_prompt import shared_token_outputs
from ...ops import dpo_plackett_luce_loss
from ..config_checks import (
    COUNT,
    DPO_BETA_WHY,
    KWAY_PAD_TOKEN_INSTEAD,
    POSITIVE,
    UNIT_INTERVAL,
    check_fields,
    refuse_unused_options,
)
from ..fault_tolerance import FaultTolerantMixin
from .common import (
    RankedDataArguments,
    SharedPromptSwitch,
    best_and_rest_mean,
    finish_ranked_trainer_setup,
    gather_lists,
    positions_of,
    prepare_ranked_for_trainer,
    ranked_trainer_setup,
    ranking_depth,
    ranking_stats,
    ratio,
    reference_forward,
    refuse_streams_with_precomputed_reference,
)

_MODEL_KEYS = ("input_ids", "attention_mask")

# DPOConfig's numeric fields the K-way trainer reads (`config_checks`), and why a value outside the range is wrong.
DPO_RULES = {
    "beta": POSITIVE,
    "ref_model_mixup_alpha": UNIT_INTERVAL,
    "ref_model_sync_steps": COUNT,
    "precompute_ref_batch_size": COUNT.or_none(),
}
DPO_RULES_WHY = {"beta": DPO_BETA_WHY}
# DPOConfig options the Plackett-Luce DPO trainer never reads (they select TRL's other losses, or its own collator), and
# what to set instead; a value other than the default is refused (`refuse_unused_options`). tests/test_inherited_options
# .py lists where every other DPOConfig option acts.
_ONE_LOSS = "the loss is the Plackett-Luce DPO loss, at K=2 TRL's 'sigmoid'"
DPO_OPTIONS_PL_IGNORES = {
    "loss_type": _ONE_LOSS + "; length_normalization=True gives 'sigmoid_norm'",
    "loss_weights": _ONE_LOSS + ", with no other loss to weigh it against",
    "label_smoothing": _ONE_LOSS + ", without robust DPO's label noise; use top_m or tie_policy for uncertain rankings",
    "ld_alpha": "log-probs are summed over all completion tokens; length_normalization=True divides them by the length",
    "use_weighting": "every list weighs the same (WPO's weights are not built)",
    "f_divergence_type": _ONE_LOSS + ", whose implicit reward is the reverse-KL log-ratio",
    "f_alpha_divergence_coef": _ONE_LOSS + ", whose implicit reward is the reverse-KL log-ratio",
    "discopop_tau": _ONE_LOSS,
    "truncation_mode": "a list longer than max_length loses the end of its completions (keep_start); raise max_length",
    "padding_free": "the K-way collator pads every list (TRL 1.16 falls back to padding too)",
    "pad_token": KWAY_PAD_TOKEN_INSTEAD,
}


@dataclass
class PlackettLuceDPOConfig(RankedDataArguments, DPOConfig):
    """DPOConfig for K ranked completions per prompt; `beta`, `max_length`, `precompute_ref_log_probs` and the
    rest of DPOConfig apply, plus `top_m`, `tie_policy` and the record mapping (`prompt_key`,
    `completion_text_key`, `completion_score_key`) of `RankedDataArguments`. The loss is fixed (Plackett-Luce),
    so DPOConfig's loss variants are rejected."""

    length_normalization: bool = field(
        default=False,
        metadata={
            "help": "Divide each completion's summed log-probs (policy and reference) by its number of tokens "
            "before the loss; at K=2 this is TRL's loss_type='sigmoid_norm'."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        check_fields(self, DPO_RULES, DPO_RULES_WHY)
        refuse_unused_options(self, DPO_OPTIONS_PL_IGNORES, "DPO", "Plackett-Luce DPO")


class PlackettLuceDPOTrainer(FaultTolerantMixin, DPOTrainer):
    """TRL's DPOTrainer with the K-way Plackett-Luce loss on ranked lists (TRL's pairwise data is K=2).

    Reference log-probs come, as in DPOTrainer, from `ref_model`, or from the base with the LoRA adapter
    disabled when `model` is a peft model (or `peft_config` is given), or from a pass over the dataset before
    training when `args.precompute_ref_log_probs=True` (stored per record as a K-long `ref_logps` column).

    Overrides only what depends on the number of completions: dataset preparation, the collator, the
    reference precompute, and `_compute_loss` (loss and metrics).
    """

    _tag_names = ["trl", "dpo", "rlhf_ext", "plackett-luce"]
    _name = "Plackett-Luce DPO"

    def __init__(self, model, ref_model=None, args: PlackettLuceDPOConfig | None = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None, **kwargs):
        args, processing_class, data_collator = ranked_trainer_setup(
            model, args, PlackettLuceDPOConfig, "PL-DPO", processing_class, data_collator, train_dataset, eval_dataset
        )
        self._max_positions = positions_of(model, args)  # the datasets are checked against it as they are prepared
        self._stream_counts = {}  # what preparing a streamed dataset dropped or cut, counted as it is read
        # set before TRL's __init__, whose reference precompute already runs the forward
        self._shared_prompt = SharedPromptSwitch(args.shared_prompt, scores=False)
        super().__init__(model, ref_model=ref_model, args=args, data_collator=data_collator,
                         train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processing_class,
                         **kwargs)
        finish_ranked_trainer_setup(self)

    # Replaces DPOTrainer._prepare_dataset: ranked records are validated, ordered best first and tokenized into
    # one prompt and K completions, with TRL's tokenization; truncation to max_length happens (and is counted) here.
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return prepare_ranked_for_trainer(dataset, processing_class, args, dataset_name, self._max_positions,
                                          stream_counts=self._stream_counts)

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt_ids", "completion_ids", "num_ranked", "ref_logps"]

    def _reference_logps(self, inputs: dict[str, torch.Tensor], shared=None) -> torch.Tensor:
        """Summed reference log-probs per sequence [N], through DPOTrainer.compute_ref_log_probs (ref model, or
        the base with adapters off), which returns the batch as two halves; they are joined back in order. With
        `shared` rows (`SharedPromptBatch`), one forward on them in compute_ref_log_probs' context."""
        reference = self.ref_model if self.ref_model is not None else self.model
        if shared is not None:
            with reference_forward(self):
                return shared_token_outputs(reference, shared).log_probs.sum(dim=1)
        ref_inputs = {k: inputs[k] for k in (*_MODEL_KEYS, "completion_mask")}
        return torch.cat(self.compute_ref_log_probs(reference, ref_inputs))

    # Replaces DPOTrainer._precompute_ref_logps, which stores one chosen and one rejected value per record; a
    # ranked record needs K. No on-disk cache: the pass is one reference forward over the dataset.
    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        refuse_streams_with_precomputed_reference(self.args, {name: dataset})
        sizes = [len(ids) for ids in dataset["completion_ids"]]
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False)
        tables = []
        for batch in tqdm(self.accelerator.prepare(loader), desc=f"Computing reference log probs for {name}"):
            ref_logps = self._reference_logps(batch, self._shared_prompt.batch(batch, self))
            table, _ = split_into_lists(ref_logps, batch["num_completions"])
            table = F.pad(table, (0, max(sizes) - table.shape[1]))  # equal widths so processes can gather
            tables.append(self.accelerator.gather_for_metrics(table).cpu())
        table = torch.cat(tables)
        return dataset.add_column("ref_logps", [row[:k].tolist() for row, k in zip(table, sizes)])

    def _sequence_logps(self, model, inputs, shared=None) -> tuple[torch.Tensor, object]:
        """Summed policy log-probs of each sequence's completion tokens [N], and the model outputs (per-token fields
        [N, T - 1], from the `shared` rows when given)."""
        if shared is not None:  # no MoE router loss here: `shared_prompt_blocker` turns the layout off for it
            outputs = shared_token_outputs(model, shared)
            return outputs.log_probs.sum(dim=1), outputs
        model_kwargs = {k: inputs[k] for k in _MODEL_KEYS}
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        outputs = model(**model_kwargs, labels=labels, use_cache=False, fused_lm_head=True)
        # the fused head gives 0 where the label is -100, and prompt-tuning adapters prepend virtual positions
        per_token = outputs.log_probs[:, -(inputs["input_ids"].shape[1] - 1):]
        return per_token.sum(dim=1), outputs

    # Replaces DPOTrainer._compute_loss, which splits the batch into a chosen and a rejected half; a ranked batch
    # holds K_b completions per list, regrouped into [B, K_max] tables before the Plackett-Luce loss.
    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        num_completions = inputs["num_completions"]
        shared = self._shared_prompt.batch(inputs, self)  # None: the K rows of each list run as they are
        seq_logps, outputs = self._sequence_logps(model, inputs, shared)
        policy_logps, mask = split_into_lists(seq_logps, num_completions)
        if self.precompute_ref_logps:
            ref_logps = inputs["ref_logps"]
        else:
            ref_logps, _ = split_into_lists(self._reference_logps(inputs, shared), num_completions)
        if self.args.length_normalization:
            lengths, _ = split_into_lists(inputs["completion_mask"].sum(dim=1), num_completions)
            lengths = lengths.clamp(min=1)  # padding has length 0: keep its (masked-out) entries finite
            policy_logps, ref_logps = policy_logps / lengths, ref_logps / lengths
        depth = ranking_depth(inputs["num_ranked"], self.args.top_m)
        loss = dpo_plackett_luce_loss(policy_logps, ref_logps, beta=self.beta, mask=mask, top_m=depth).mean()
        if self.aux_loss_enabled:  # added and logged as DPOTrainer._compute_loss does (TRL 1.16)
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())
        self._log_metrics(mode, policy_logps, ref_logps, mask, depth, inputs["attention_mask"])
        self._log_token_metrics(mode, outputs, inputs)
        if return_outputs:
            # as DPOTrainer: the fused head builds no logits, so `compute_metrics` gets them from a second forward
            with torch.no_grad():
                outputs = model(**{k: inputs[k] for k in _MODEL_KEYS})
            return loss, outputs
        return loss

    def _log_token_metrics(self, mode: str, outputs, inputs) -> None:
        """TRL's DPO token metrics from the fused head's outputs, as DPOTrainer._compute_loss (TRL 1.16) computes them
        for (chosen, rejected): `entropy` over every completion token; `logits/chosen` and `mean_token_accuracy` over
        the best completion's tokens; `logits/rejected` over the tokens of all the others. Each is a token-weighted
        mean over the batch (all processes), so at K=2 they are TRL's numbers."""
        seq_len = inputs["input_ids"].shape[1] - 1
        mask = inputs["completion_mask"][:, 1:].float()
        per_sequence = torch.stack([
            (outputs.entropy[:, -seq_len:].detach() * mask).sum(dim=1),
            (outputs.mean_logits[:, -seq_len:].detach() * mask).sum(dim=1),
            (outputs.is_top1[:, -seq_len:].float() * mask).sum(dim=1),
            mask.sum(dim=1),
        ], dim=1)  # fmt: skip
        table, list_mask = split_into_lists(per_sequence, inputs["num_completions"])  # [B, K_max, 4]
        others = (table * (list_mask & (torch.arange(list_mask.shape[1], device=table.device) > 0))[..., None]).sum(1)
        per_list = torch.cat([table.sum(dim=1)[:, [0, 3]], table[:, 0], others[:, [1, 3]]], dim=1)  # [B, 8]
        totals = self.accelerator.gather_for_metrics(per_list).sum(dim=0).tolist()
        entropy, tokens, _, best_logits, best_top1, best_tokens, rest_logits, rest_tokens = totals
        metrics = self._metrics[mode]
        metrics["entropy"].append(entropy / tokens if tokens > 0 else 0.0)
        metrics["logits/chosen"].append(best_logits / best_tokens if best_tokens > 0 else 0.0)
        metrics["logits/rejected"].append(rest_logits / rest_tokens if rest_tokens > 0 else 0.0)
        metrics["mean_token_accuracy"].append(best_top1 / best_tokens if best_tokens > 0 else 0.0)

    def _log_metrics(self, mode: str, policy_logps, ref_logps, mask, depth, attention_mask) -> None:
        """TRL's DPO names: rewards/{chosen,rejected,accuracies,margins}, logps/{chosen,rejected}, num_tokens;
        plus rewards/top1_accuracy. "chosen" is the best completion, "rejected" the mean of the others, and
        accuracies is pairwise ranking accuracy of the implicit rewards (the same numbers as TRL's at K=2)."""
        acc = self.accelerator
        if mode == "train":
            self._total_train_tokens += acc.gather_for_metrics(attention_mask.sum()).sum().item() // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        rewards = ranking_stats(self.beta * (policy_logps - ref_logps), mask, depth)
        logps_chosen, logps_rejected = best_and_rest_mean(policy_logps.detach(), mask)
        chosen, rejected, pairs_correct, pairs, top1_correct, has_top1, logps_chosen, logps_rejected = gather_lists(
            acc, rewards.chosen, rewards.rejected, rewards.pairs_correct, rewards.pairs, rewards.top1_correct,
            rewards.has_top1, logps_chosen, logps_rejected,
        )
        metrics = self._metrics[mode]
        metrics["rewards/chosen"].append(chosen.mean().item())
        metrics["rewards/rejected"].append(rejected.mean().item())
        metrics["rewards/accuracies"].append(ratio(pairs_correct, pairs))
        metrics["rewards/top1_accuracy"].append(ratio(top1_correct, has_top1))
        metrics["rewards/margins"].append((chosen - rejected).mean().item())
        metrics["logps/chosen"].append(logps_chosen.mean().item())
        metrics["logps/rejected"].append(logps_rejected.mean().item())
