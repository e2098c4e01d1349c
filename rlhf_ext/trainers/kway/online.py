r"""Online K-way (Plackett-Luce) DPO, as a thin subclass of TRL's GRPOTrainer (through `SharedBaseGRPOTrainer`).

The seed post ("Navigating the RLHF Landscape: From Policy Gradients to PPO, GAE, and DPO for LLM Alignment"),
section 5.2, derives DPO for K ranked completions from the Plackett-Luce model; here the K completions are sampled
from the policy being trained and ranked by a reward, instead of read from a dataset.

For every prompt x the policy samples K = `num_generations` completions; the reward function(s) score them
(weighted sum, `reward_weights`) and the scores rank the group best first, y_1 > y_2 > ... > y_K. With implicit
rewards

    s_k = dpo_beta * (log pi_theta(y_k | x) - log pi_ref(y_k | x))          (summed over completion tokens)

the loss is the negative log Plackett-Luce probability of that ranking (`rlhf_ext.dpo_plackett_luce_loss`):

    loss = - sum_{k < m} [ s_k - log sum_{j >= k} exp s_j ]

averaged over the groups of a micro-batch, with m = K - 1 for a full ranking, fewer for `top_m` or a tie. At K=2
it is the sigmoid DPO loss of (better, worse): -log sigmoid(s_1 - s_2), i.e. online DPO with the reward as judge.

TRL's GRPOTrainer already samples (transformers or vLLM), runs the reward functions, buffers a generation batch
over `steps_per_generation` micro-batches, logs and checkpoints. This subclass changes:

    _generate_and_score_completions   super() samples and scores; we add the reference log-probs, sort every group
                                      by its reward and regroup the batch as [groups, K, ...] in ranked order
    _compute_loss                     policy forward, then the Plackett-Luce DPO loss per group
    _save                             save only a shared base's policy adapter

What it shares with PPO (the shared base's roles, the reward functions and their checks, the reference, the raw
rewards, the prompt checks' tokenization) is `SharedBaseGRPOTrainer` (grpo_base.py), its base class. Its forwards of
the sampled tokens (the policy's in the loss, the reference's) compute each group's prompt once where exact
(`shared_prompt`: the base's `_get_per_token_logps_and_entropies`, docs/kway.md).

Regrouping matters: GRPO shuffles a generation batch along its first dimension and splits it into micro-batches;
with one group per row the shuffle permutes whole groups and each micro-batch holds whole groups, which a
ranking loss needs (it compares the K completions of a prompt in one forward). So every process must hold whole
groups: `per_device_train_batch_size` (and `per_device_eval_batch_size`) must be multiples of `num_generations`.

Ties ("truncate", as the offline trainer's tie_policy): the ranking is kept up to the first tie of equal rewards:
for rewards [5, 3, 3, 1] only "y_1 beats the other three" is modelled (m = 1), and a tie at the top leaves the
group out of the loss (m = 0); all scored completions still compete in each denominator. A completion whose
reward is NaN (or None) is left out of its group and counted in `objective/skipped_completions`; a group with
fewer than 2 scored completions contributes nothing.

On a `SharedBase`: the policy adapter trains, the frozen reward adapter + head is the default reward function
(`SharedBaseReward`), the reference is the base with adapters off, and the value adapter is unused and frozen (it
is removed from the shared base's trainable set, so it is neither in the optimizer nor given gradients).
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from torch import nn
from transformers import PreTrainedModel
from trl import GRPOConfig

from ...models import SharedBase
from ...ops import dpo_plackett_luce_loss
from ..checkpointing_name import ActivationCheckpointingByDefault
from ..config_checks import (
    CLOSED_OPEN_UNIT,
    COMMON_RULES,
    COUNT,
    DPO_BETA_WHY,
    OPEN_CLOSED_UNIT,
    POSITIVE,
    check_fields,
    check_finite_weights,
    refuse_unused_options,
    warn_if_warmup_outlasts_run,
)
from ..grpo_base import SharedBaseGRPOTrainer, check_enough_prompts, with_router_aux_loss
from ..hub_token import NoStoredHubToken
from ..position_limits import check_prompts_leave_room, max_positions
from .common import TOP_M_HELP, ranking_stats

# GRPO options the online K-way trainer never reads (its loss is the Plackett-Luce DPO loss of each group's reward
# ranking: no advantages, ratio, clipping or entropy term), and what to set instead; a value other than the default is
# refused (`refuse_unused_options`), `beta` by its own check. tests/test_inherited_options.py lists where every other
# GRPOConfig option acts.
_NO_POLICY_GRADIENT = "the loss is the Plackett-Luce DPO loss of each group's reward ranking, with no ratio or clipping"
_NO_ENTROPY = "the Plackett-Luce DPO loss has no entropy term"
_FIXED_REFERENCE = "the reference stays as it was at the start; its strength is dpo_beta"
_NO_VLLM_IS = "the DPO loss has no importance ratio, so GRPO's vLLM sampling correction is not applied"
GRPO_OPTIONS_ONLINE_IGNORES = {
    "epsilon": _NO_POLICY_GRADIENT,
    "epsilon_high": _NO_POLICY_GRADIENT,
    "delta": _NO_POLICY_GRADIENT,
    "importance_sampling_level": _NO_POLICY_GRADIENT,
    "off_policy_mask_threshold": _NO_POLICY_GRADIENT,
    "sapo_temperature_neg": _NO_POLICY_GRADIENT,
    "sapo_temperature_pos": _NO_POLICY_GRADIENT,
    "vespo_k_pos": _NO_POLICY_GRADIENT,
    "vespo_lambda_pos": _NO_POLICY_GRADIENT,
    "vespo_k_neg": _NO_POLICY_GRADIENT,
    "vespo_lambda_neg": _NO_POLICY_GRADIENT,
    "loss_type": "the loss is the Plackett-Luce DPO loss, averaged over groups; length_normalization=True divides "
    "each completion's log-probs by its length",
    "scale_rewards": "rewards only rank each group; they are never scaled",
    "multi_objective_aggregation": "the ranking is by the reward_weights-weighted sum of the reward functions",
    "use_bias_correction_kl": "the reference enters through the implicit reward: set dpo_beta",
    "mask_truncated_completions": "a truncated completion still has a reward and a place in its group's ranking; "
    "give truncation a low reward in a reward function instead",
    "sync_ref_model": _FIXED_REFERENCE,
    "ref_model_mixup_alpha": _FIXED_REFERENCE,
    "ref_model_sync_steps": _FIXED_REFERENCE,
    "top_entropy_quantile": _NO_ENTROPY,
    "entropy_coef": _NO_ENTROPY,
    "use_adaptive_entropy": _NO_ENTROPY,
    "entropy_coef_min": _NO_ENTROPY,
    "entropy_coef_max": _NO_ENTROPY,
    "entropy_coef_delta": _NO_ENTROPY,
    "entropy_target": _NO_ENTROPY,
    "vllm_importance_sampling_correction": _NO_VLLM_IS,
    "vllm_importance_sampling_mode": _NO_VLLM_IS,
    "vllm_importance_sampling_clip_max": _NO_VLLM_IS,
    "vllm_importance_sampling_clip_min": _NO_VLLM_IS,
    "vllm_importance_sampling_cap": _NO_VLLM_IS,
}
SHARED_PROMPT_GROUPS_HELP = (
    "Compute each prompt once: the num_generations completions of a group run as one row, [prompt | completion 1 | "
    "... | completion G], each completion attending to the prompt and to itself only, in the policy's forward of the "
    "loss and in the reference's (docs/kway.md, 'Each prompt computed once'); the log-probs, loss and gradients are "
    "those of the G separate rows. None: on wherever that is exact (a decoder with causal sdpa or eager attention; see "
    "the docs), else off with one log line saying why. True: on, and a ValueError where it cannot be exact. False: off."
)
# Fields of the regrouped batch that the loss reads and the regrouping builds; everything else GRPO returns
# per completion is regrouped alongside.
GROUP_FIELDS = ("ref_logps", "item_mask", "depth")
# The numeric fields the online trainer reads (`config_checks`).
ONLINE_RULES = {
    **COMMON_RULES,
    "dpo_beta": POSITIVE,
    "robust_rho": CLOSED_OPEN_UNIT,
    "top_m": COUNT.or_none(),
    "max_completion_length": COUNT.or_none(),
    "temperature": POSITIVE,
    "top_p": OPEN_CLOSED_UNIT,
}


@dataclass
class OnlinePlackettLuceConfig(NoStoredHubToken, ActivationCheckpointingByDefault, GRPOConfig):
    r"""GRPOConfig for online K-way DPO: K = `num_generations` completions per prompt, ranked by their reward.

    Adds `dpo_beta` (DPO's beta, the inverse temperature of the implicit reward), `top_m`, `length_normalization`
    and `shared_prompt` (as in `PlackettLuceDPOConfig`). GRPO's own `beta` (the coefficient of its in-loss KL term)
    must stay 0: the reference enters through the implicit reward instead. GRPO's advantage, clipping and
    entropy options (`scale_rewards`, `loss_type`, `epsilon`, ...: `GRPO_OPTIONS_ONLINE_IGNORES`) are not used and
    are refused when set; `num_iterations > 1` reuses each generation batch for more updates, with no importance
    weights (the DPO loss is off-policy by nature).
    """

    dpo_beta: float = field(
        default=0.1,
        metadata={"help": "DPO's beta: implicit reward s = dpo_beta * (log pi - log pi_ref), summed over tokens."},
    )
    robust_rho: float = field(
        default=0.0,
        metadata={
            "help": "Radius of the total-variation robust Plackett-Luce loss (Wu et al. 2026): (1 - rho) x the loss "
            "of the reward's ranking + rho x the loss of the worst ranking under the current implicit rewards "
            "(ascending order). It keeps the policy from fitting a noisy reward's ranking with ever-wider implicit "
            "reward gaps; 0 is the plain loss."
        },
    )
    top_m: int | None = field(default=None, metadata={"help": TOP_M_HELP})
    length_normalization: bool = field(
        default=False,
        metadata={
            "help": "Divide each completion's summed log-probs (policy and reference) by its number of tokens "
            "before the loss; at K=2 this is TRL's DPO loss_type='sigmoid_norm'."
        },
    )
    beta: float = field(
        default=0.0,
        metadata={
            "help": "GRPO's in-loss KL coefficient. Must be 0 here: the reference enters through the implicit reward "
            "(set `dpo_beta`)."
        },
    )
    vllm_importance_sampling_correction: bool = field(
        default=False,
        metadata={
            "help": "GRPO's correction for the vLLM / trainer sampling mismatch. Must stay False: the DPO loss has no "
            "importance ratio to correct."
        },
    )
    shared_prompt: bool | None = field(default=None, metadata={"help": SHARED_PROMPT_GROUPS_HELP})

    def __post_init__(self):
        refuse_unused_options(self, GRPO_OPTIONS_ONLINE_IGNORES, "GRPO", "online K-way DPO")  # before GRPO rewrites any
        super().__post_init__()
        if self.beta != 0.0:
            raise ValueError(
                f"OnlinePlackettLuceConfig.beta must be 0 (got {self.beta}): it is GRPO's KL coefficient; the "
                "implicit reward's beta is `dpo_beta`."
            )
        check_fields(self, ONLINE_RULES, {"dpo_beta": DPO_BETA_WHY})
        check_finite_weights(self)
        warn_if_warmup_outlasts_run(self)
        if self.shared_prompt not in (None, True, False):
            raise ValueError(f"shared_prompt must be None (where exact), True or False, got {self.shared_prompt!r}")
        check_whole_groups(self.per_device_train_batch_size, self.num_generations, "per_device_train_batch_size")
        if str(getattr(self.eval_strategy, "value", self.eval_strategy)) != "no":
            check_whole_groups(
                self.per_device_eval_batch_size, self.num_generations_eval or self.num_generations,
                "per_device_eval_batch_size",
            )  # fmt: skip


def check_whole_groups(batch_size: int, num_generations: int, name: str) -> None:
    """ValueError unless a micro-batch of `batch_size` completions holds whole groups of `num_generations`."""
    if batch_size % num_generations != 0:
        raise ValueError(
            f"{name}={batch_size} must be a multiple of num_generations={num_generations}: the ranking loss needs "
            "all completions of a prompt in one micro-batch on one process."
        )


# ---------------------------------------------------------------- the ranking and the loss (pure functions)


def rank_groups(
    scores: torch.Tensor, scored: torch.Tensor, top_m: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ranking the rewards give each group: (order [G, K] long, item_mask [G, K] bool, depth [G] long).

    order[g] lists the group's completions by descending score (stable: equal scores keep their sampling order),
    unscored ones (scored False) last; item_mask marks the scored ones in that order (a prefix). depth m_g is the
    number of places modelled: up to the first tie of equal scores (the offline tie_policy "truncate"), at most
    n_g - 1 for n_g scored completions, at most top_m, and 0 for a group with fewer than 2.
    """
    key = scores.masked_fill(~scored, float("-inf"))
    order = torch.argsort(key, dim=1, descending=True, stable=True)
    item_mask = scored.gather(1, order)
    sorted_scores = key.gather(1, order)
    count = item_mask.sum(dim=1)
    ties = (sorted_scores[:, :-1] == sorted_scores[:, 1:]) & item_mask[:, 1:]
    first_tie = torch.where(ties.any(dim=1), ties.float().argmax(dim=1), count - 1)
    depth = torch.minimum(first_tie, count - 1).clamp(min=0)
    if top_m is not None:
        depth = depth.clamp(max=top_m)
    return order, item_mask, depth


def group_dpo_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    item_mask: torch.Tensor,
    depth: torch.Tensor,
    beta: float,
    robust_rho: float = 0.0,
) -> torch.Tensor:
    """Plackett-Luce DPO loss of each ranked group [G] (0 for a group with fewer than 2 scored completions).

    policy_logps, ref_logps [G, K] in ranked order; item_mask, depth as `rank_groups` returns them; robust_rho > 0
    gives the robust loss (`rlhf_ext.ops.robust_plackett_luce_loss`). The zero of a
    skipped group keeps the graph (0 * log-probs), so every process backpropagates through its forward, as DDP needs.
    """
    losses = 0.0 * policy_logps.sum(dim=1)
    rankable = item_mask.sum(dim=1) >= 2
    if rankable.any():
        rows = rankable.nonzero().squeeze(1)
        ranked = dpo_plackett_luce_loss(
            policy_logps[rows], ref_logps[rows], beta=beta, mask=item_mask[rows], top_m=depth[rows],
            robust_rho=robust_rho,
        )
        losses = losses.index_put((rows,), ranked)
    return losses


def regroup(batch: dict, order: torch.Tensor) -> dict:
    """Every per-completion tensor of `batch` [B, ...] as [G, K, ...], each group in ranked `order` [G, K].

    Scalars (GRPO's `num_items_in_batch`) are kept; other fields are left as they are.
    """
    num_groups, k = order.shape
    flat = (order + k * torch.arange(num_groups, device=order.device)[:, None]).reshape(-1)
    out = {}
    for key, value in batch.items():
        if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == num_groups * k:
            value = value[flat.to(value.device)].view(num_groups, k, *value.shape[1:])
        out[key] = value
    return out


def freeze_value_role(shared: SharedBase) -> None:
    """Take the shared base's value adapter and head out of its trainable set: online DPO has no critic.

    The shared base restores requires_grad from its trainable set on every role switch, so setting it to False
    once would not last; `freeze_role` takes the role out of that set.
    """
    shared.freeze_role("value")


# ---------------------------------------------------------------- the trainer


class OnlinePlackettLuceTrainer(SharedBaseGRPOTrainer):
    r"""Online K-way DPO: sample K completions per prompt, rank them by reward, minimise the Plackett-Luce DPO loss.

    Args:
        model: a `SharedBase` (policy adapter trained; reward role as the default reward function; reference =
            adapters off; value adapter unused and frozen), or the policy as in `GRPOTrainer` (model id or path,
            `PreTrainedModel`, or `PeftModel`).
        reward_funcs: any TRL reward function or a list of them, weighted by `args.reward_weights`. Default with a
            `SharedBase`: its reward role.
        args: an [`OnlinePlackettLuceConfig`].
        ref_model: the reference policy. Default: the policy with its adapters disabled when it is a PeftModel (or
            `peft_config` is given), otherwise a frozen copy of the policy taken before training.
        tools, rollout_func, environment_factory: multi-turn rollouts, as in `GRPOTrainer`. Tool and environment
            output tokens (TRL's `tool_mask`, a rollout function's `env_mask`) are left out of each completion's
            summed log-probs, policy's and reference's, so they get no gradient (`completion_mask`).
        Other arguments are passed to `GRPOTrainer` unchanged.
    """

    _tag_names = ["trl", "online-dpo", "rlhf_ext", "plackett-luce"]
    _name = "Online Plackett-Luce DPO"
    _paper = {
        "title": "Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
        "id": "2305.18290",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @inproceedings{rafailov2023direct,
                title        = {{Direct Preference Optimization: Your Language Model is Secretly a Reward Model}},
                author       = {Rafael Rafailov and Archit Sharma and Eric Mitchell and Christopher D. Manning and Stefano Ermon and Chelsea Finn},
                year         = 2023,
                booktitle    = {Advances in Neural Information Processing Systems 36},
            }"""),  # noqa: E501 (the BibTeX author list is one line of data)
    }

    def __init__(
        self,
        model: str | PreTrainedModel | nn.Module,
        reward_funcs: Callable | nn.Module | str | list | None = None,
        args: OnlinePlackettLuceConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        ref_model: PreTrainedModel | None = None,
        reward_processing_classes=None,
        callbacks=None,
        optimizers=(None, None),
        peft_config=None,
        tools=None,
        rollout_func=None,
        environment_factory=None,
    ):
        if args is None:
            args = OnlinePlackettLuceConfig("online-kway-output")
        if not isinstance(args, OnlinePlackettLuceConfig):
            raise TypeError(f"OnlinePlackettLuceTrainer needs an OnlinePlackettLuceConfig, got {type(args).__name__}.")
        super().__init__(
            model, reward_funcs, args, ref_model=ref_model, processing_class=processing_class, peft_config=peft_config,
            train_dataset=train_dataset, eval_dataset=eval_dataset, reward_processing_classes=reward_processing_classes,
            callbacks=callbacks, optimizers=optimizers, tools=tools, rollout_func=rollout_func,
            environment_factory=environment_factory,
        )  # fmt: skip
        if self.shared_base is not None:
            freeze_value_role(self.shared_base)  # before `train()` builds the optimizer from requires_grad
        self._check_prompts_leave_room()
        check_enough_prompts(self.train_dataset, self.args)

    def _check_prompts_leave_room(self) -> None:
        """Refuse, before training, prompts that with max_completion_length tokens pass the model's positions
        (`rlhf_ext.trainers.position_limits`); datasets whose prompts are only known at rollout time are skipped."""
        evals = self.eval_dataset if isinstance(self.eval_dataset, dict) else {"eval": self.eval_dataset}
        limit = max_positions(self.accelerator.unwrap_model(self.model).config)
        for split, dataset in {"train": self.train_dataset, **evals}.items():
            known = isinstance(dataset, Dataset) and "prompt" in dataset.column_names
            if known and self._prompts_known_upfront(dataset):
                lengths = list(enumerate(self._prompt_lengths(dataset, split)))
                fix = "shorten or filter the prompts longer than {prompt_room} tokens."
                check_prompts_leave_room(lengths, self.max_completion_length, limit, split, fix)

    # ---------------------------------------------------------------- rollout: rewards, reference, ranking

    def _generate_and_score_completions(self, inputs):
        # Extends GRPOTrainer._generate_and_score_completions: super() samples and scores (and logs `reward`); we add
        # the reference's sequence log-probs and replace GRPO's advantages with the ranking of each group, regrouping
        # the batch as [G, K, ...] so that GRPO's shuffle and micro-batch split keep groups whole (module docstring).
        batch = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        k = self.num_generations if mode == "train" else self.num_generations_eval
        size = batch["completion_ids"].size(0)
        check_whole_groups(size, k, "the local batch")
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        with torch.no_grad():
            ref_tokens = self._reference_logprobs(input_ids, attention_mask, batch["completion_ids"].size(1))
        # TRL's layout: rewards are gathered in process order, num_generations consecutive ones per prompt, and
        # this process's completions are the slice `_local_scores` takes; whole groups, as checked above.
        scores, scored = self._local_scores(size, mode)
        order, item_mask, depth = rank_groups(scores.view(-1, k), scored.view(-1, k), self.args.top_m)
        batch.pop("advantages")  # GRPO's group-relative advantages: not used by a ranking loss
        batch["ref_logps"] = (ref_tokens * completion_mask(batch)).sum(dim=1)
        grouped = regroup(batch, order)
        grouped.update(item_mask=item_mask, depth=depth)
        return grouped

    # ---------------------------------------------------------------- update (seed 5.2)

    def _compute_loss(self, model, inputs):
        # Replaces GRPOTrainer._compute_loss (a clipped policy-gradient loss on advantages): the loss here is the
        # Plackett-Luce DPO loss of each group's ranking, so no part of GRPO's loss carries over.
        num_groups, k = inputs["item_mask"].shape
        flat = {
            key: value.flatten(0, 1)
            for key, value in inputs.items()
            if key not in GROUP_FIELDS and is_grouped(value, num_groups, k)
        }
        input_ids = torch.cat([flat["prompt_ids"], flat["completion_ids"]], dim=1)
        attention_mask = torch.cat([flat["prompt_mask"], flat["completion_mask"]], dim=1)
        token_logps, _, router_loss = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, flat["completion_ids"].size(1), compute_aux_loss=self.aux_loss_enabled
        )
        mask = completion_mask(flat)
        policy_logps = (token_logps * mask).sum(dim=1).view(num_groups, k)
        ref_logps = inputs["ref_logps"]
        kl = (policy_logps - ref_logps).detach()
        if self.args.length_normalization:
            lengths = mask.sum(dim=1).view(num_groups, k).clamp(min=1)  # an empty completion stays finite
            policy_logps, ref_logps = policy_logps / lengths, ref_logps / lengths
        item_mask, depth = inputs["item_mask"], inputs["depth"]
        loss = group_dpo_loss(
            policy_logps, ref_logps, item_mask, depth, self.args.dpo_beta, self.args.robust_rho
        ).mean()
        mode = "train" if self.model.training else "eval"
        self._log_update(mode, policy_logps.detach(), ref_logps, item_mask, depth, kl)
        # As GRPO: Trainer's gradient-accumulation scaling is off for this trainer, so the loss scales itself.
        loss = loss / self.current_gradient_accumulation_steps if mode == "train" else loss
        return with_router_aux_loss(self, loss, router_loss)

    # ---------------------------------------------------------------- logging, under the offline trainer's names

    def _log_update(self, mode: str, policy_logps, ref_logps, item_mask, depth, kl) -> None:
        """rewards/{chosen,rejected,margins,accuracies,top1_accuracy} of the implicit rewards against the reward
        ranking, as `PlackettLuceDPOTrainer` logs them (over groups with >= 2 scored completions), and objective/kl:
        the mean over scored completions of sum_t (log pi - log pi_ref), at the policy being updated."""
        stats = ranking_stats(self.args.dpo_beta * (policy_logps - ref_logps), item_mask, depth)
        rankable = item_mask.sum(dim=1) >= 2
        chosen, rejected = stats.chosen, stats.rejected  # NaN "rejected" for a group with one scored completion
        per_group = torch.stack([
            rankable.float(), stats.pairs_correct, stats.pairs, stats.top1_correct, stats.has_top1,
            chosen.nan_to_num(0.0) * rankable, rejected.nan_to_num(0.0) * rankable,
            (kl * item_mask).sum(dim=1), item_mask.sum(dim=1).float(),
        ], dim=1).float()  # fmt: skip
        totals = self.accelerator.gather(per_group).sum(dim=0).tolist()
        groups, pairs_correct, pairs, top1_correct, has_top1, chosen_sum, rejected_sum, kl_sum, items = totals
        metrics = self._metrics[mode]
        if groups > 0:
            metrics["rewards/chosen"].append(chosen_sum / groups)
            metrics["rewards/rejected"].append(rejected_sum / groups)
            metrics["rewards/margins"].append((chosen_sum - rejected_sum) / groups)
        metrics["rewards/accuracies"].append(pairs_correct / pairs if pairs > 0 else 0.0)
        metrics["rewards/top1_accuracy"].append(top1_correct / has_top1 if has_top1 > 0 else 0.0)
        if items > 0:
            metrics["objective/kl"].append(kl_sum / items)

    # ---------------------------------------------------------------- checkpoints

    def _save(self, output_dir: str | None = None, state_dict=None):
        # Extends Trainer._save: on a shared base only the policy adapter is written (peft would also write the frozen
        # reward adapter without its head, and the unused value adapter: `_saving_only_the_policy_adapter`).
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        with self._saving_only_the_policy_adapter(output_dir):
            super()._save(output_dir, state_dict=state_dict)


def is_grouped(value, num_groups: int, k: int) -> bool:
    """Whether `value` is a regrouped per-completion tensor [G, K, ...]."""
    return torch.is_tensor(value) and value.ndim >= 2 and value.shape[:2] == (num_groups, k)


def completion_mask(batch: dict) -> torch.Tensor:
    """The completion tokens that count [B, C]: the completion mask, without tool-output tokens when there are any."""
    mask = batch["completion_mask"]
    if "tool_mask" in batch:
        mask = mask * batch["tool_mask"]
    return mask
