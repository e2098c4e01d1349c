"""PPO with a critic, as a thin subclass of TRL's GRPOTrainer (seed sections 2.9, 2.10 and 4).

TRL's GRPOTrainer already does the parts PPO shares with GRPO: sampling completions with the policy
(transformers or vLLM), calling reward functions, buffering one generation batch across
`steps_per_generation` minibatches and `num_iterations` passes (PPO's epochs), accelerate, logging and
checkpointing. This subclass changes two methods and adds the critic:

    _generate_and_score_completions   super() samples and scores; we add theta_old log-probs, reference
                                      log-probs, values, per-token rewards and GAE advantages [B, T]
    _compute_loss                     policy + value forward, then `rlhf_ext.ppo_loss`

and extends `create_optimizer` (the critic's own learning rate) and `training_step` (the critic warm-up).

The trainer's `model` is the policy (a causal LM or a PeftModel). The critic's trainable module is attached
to it as the submodule `value_model`, so TRL's optimizer, DDP and device placement see every trainable
parameter; `_save` / `_load_from_checkpoint` write and read the critic beside the policy.

With a `SharedBase` and `use_vllm=True`, the vLLM backend GRPOTrainer builds becomes a `SharedBaseVLLMGeneration`,
whose weight sync sends vLLM the policy merged into the base and nothing else (docs/ppo.md).

With `num_generations > 1` and `shared_prompt`, every forward of the sampled tokens computes each prompt once for the
rows holding it: the rollout's theta_old, reference and critic forwards (whole groups), and the loss's policy and
critic forwards (the rows of one prompt a shuffled micro-batch holds); `_policy_forward` and `_critic_values`.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import textwrap
from collections.abc import Callable, Mapping

import torch
from accelerate.utils import gather, gather_object
from datasets import Dataset
from torch import nn
from transformers import PreTrainedModel
from trl.trainer.utils import disable_dropout_in_model

from ...callbacks import AdaptiveKLCallback
from ...distributed import (
    fill_full_parameter,
    full_parameters,
    full_tensor,
    parameters_from_state_dict,
)
from ...models import SharedBase
from ...models.shared_prompt import completion_token_values, model_attention_mask, shared_prompt_blocker
from ...ops import (
    gae,
    masked_mean,
    masked_whiten,
    ppo_loss,
    rewards_to_go,
    token_rewards,
)
from ..grpo_base import SharedBaseGRPOTrainer, check_enough_prompts, with_router_aux_loss
from ..policy_tokens import compact, expand, policy_token_order
from ..position_limits import check_prompts_leave_room
from .config import PPOConfig

logger = logging.getLogger(__name__)

VALUE_DIR = "value"
VALUE_WEIGHTS = "model.safetensors"  # a critic's weights in VALUE_DIR, unless it saves itself (`save`)
# What else to change when the longest prompt + max_completion_length passes the model's positions.
PROMPT_ROOM_FIX = "set max_prompt_length to {prompt_room} or less, with long_prompts='drop' to skip longer prompts."


def token_values(value_model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """V(s) after every prefix of the sequence: [B, L] float32.

    A module with a `values(input_ids, attention_mask)` method (the shared base's value role) is asked
    directly. Otherwise `value_model` is a transformers model with a one-label `score` head (an
    `AutoModelForSequenceClassification` or `...TokenClassification` with `num_labels=1`, the value model
    format of TRL's PPO): its backbone runs once and the head is applied at every position. `position_ids` (and a
    4-D `attention_mask`) for shared-prompt rows (rlhf_ext/models/shared_prompt.py).
    """
    if hasattr(value_model, "values"):
        extra = {} if position_ids is None else {"position_ids": position_ids}
        return value_model.values(input_ids, attention_mask, **extra).float()
    if not hasattr(value_model, "score"):
        raise TypeError(
            f"value_model {type(value_model).__name__} has neither a `values(input_ids, attention_mask)` method nor a "
            "`score` head; pass e.g. AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)."
        )
    backbone = getattr(value_model, value_model.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=False).last_hidden_state
    return value_model.score(hidden).squeeze(-1).float()


def completion_values(
    value_model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_length: int
) -> torch.Tensor:
    """V(s_t) for each completion token a_t: [B, C], where s_t is the prompt plus the completion before a_t.

    The state before completion token t ends at position P + t - 1 of the prompt+completion sequence, so the
    values come from positions P - 1 ... P + C - 2, the same shift as next-token log-probs.
    """
    values = token_values(value_model, input_ids, attention_mask)
    return values[:, -completion_length - 1 : -1]


class SharedBaseCritic(nn.Module):
    """The value role of a `SharedBase`, as the critic module the trainer attaches to its policy.

    It registers the shared base's `heads` (so the optimizer and checkpoints see the value head) but not the
    base itself, which already belongs to the trainer's model; the value adapter lives in that base.
    """

    def __init__(self, shared: SharedBase):
        super().__init__()
        self.heads = shared.heads  # the same ModuleDict, so a head replaced by `load_role` is seen here too
        object.__setattr__(self, "shared", shared)  # a plain attribute: registering it would nest the base twice

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               position_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.shared.values(input_ids, attention_mask, position_ids=position_ids)

    def save(self, path: str) -> None:
        self.shared.save_role("value", path)

    def load(self, path: str) -> None:
        self.shared.load_role("value", path)


def with_adaptive_kl_controller(callbacks: list | None, args: PPOConfig) -> list | None:
    """`callbacks` plus the adaptive KL controller when `args.kl_target` is set; a second controller is refused, as
    two would each move kl_coef."""
    if args.kl_target is None:
        return callbacks
    if any(isinstance(callback, AdaptiveKLCallback) for callback in callbacks or []):
        raise ValueError(
            "PPOConfig.kl_target is set and an AdaptiveKLCallback is passed in `callbacks`: two controllers would "
            "each move kl_coef. Keep one: set kl_target/kl_horizon, or pass the callback and leave kl_target None."
        )
    return [*(callbacks or []), AdaptiveKLCallback(target=args.kl_target, horizon=args.kl_horizon)]


class PPOTrainer(SharedBaseGRPOTrainer):
    r"""PPO with a value function, GAE and a KL-penalised per-token reward, on top of TRL's GRPOTrainer.

    Args:
        model: a `SharedBase` (policy, value, reward and reference roles on one base), or the policy alone as in
            `GRPOTrainer` (model id or path, `PreTrainedModel`, or `PeftModel`).
        reward_funcs: any TRL reward function (a callable, a sequence-classification model or its path) or a
            list of them, weighted by `args.reward_weights`. Default with a `SharedBase`: its reward role.
        args: a [`PPOConfig`].
        value_model: the critic. Default with a `SharedBase`: its value role. Otherwise required: a module with
            `values(input_ids, attention_mask) -> [B, L]`, or a transformers model with a one-label `score` head
            (TRL PPO's value model format).
        ref_model: the reference policy for the KL penalty. Default: the policy with its adapters disabled
            when the policy is a PeftModel (or `peft_config` is given), otherwise a frozen copy of the policy.
        tools, rollout_func, environment_factory: multi-turn rollouts, as in `GRPOTrainer`. Tool and environment
            output tokens (TRL's `tool_mask`) get no reward, KL term or policy gradient, and GAE runs over the
            policy's tokens only (`rlhf_ext.trainers.policy_tokens`).
        Other arguments are passed to `GRPOTrainer` unchanged.
    """

    _tag_names = ["trl", "ppo", "rlhf_ext"]
    _name = "PPO"
    _paper = {
        "title": "Fine-Tuning Language Models from Human Preferences",
        "id": "1909.08593",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{ziegler2019fine,
                title        = {{Fine-Tuning Language Models from Human Preferences}},
                author       = {Daniel M. Ziegler and Nisan Stiennon and Jeffrey Wu and Tom B. Brown and Alec Radford and Dario Amodei and Paul Christiano and Geoffrey Irving},
                year         = 2019,
                eprint       = {arXiv:1909.08593}
            }"""),  # noqa: E501 (the BibTeX author list is one line of data)
    }

    _critic_blocker: str | None = None  # `_critic_can_share`: "" when the critic can share, else why not

    def __init__(
        self,
        model: str | PreTrainedModel | nn.Module,
        reward_funcs: Callable | nn.Module | str | list | None = None,
        args: PPOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        value_model: nn.Module | None = None,
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
            args = PPOConfig("ppo-output")
        if not isinstance(args, PPOConfig):
            raise TypeError(f"PPOTrainer needs a PPOConfig, got {type(args).__name__}.")
        _check_train_dataset(train_dataset, environment_factory)
        if isinstance(model, SharedBase):
            value_model = value_model or SharedBaseCritic(model)
        if value_model is None:
            raise ValueError("PPOTrainer needs a critic: pass `value_model`, or a SharedBase as `model`.")
        callbacks = with_adaptive_kl_controller(callbacks, args)
        super().__init__(
            model, reward_funcs, args, ref_model=ref_model, processing_class=processing_class, peft_config=peft_config,
            train_dataset=train_dataset, eval_dataset=eval_dataset, reward_processing_classes=reward_processing_classes,
            callbacks=callbacks, optimizers=optimizers, tools=tools, rollout_func=rollout_func,
            environment_factory=environment_factory,
        )  # fmt: skip
        # Attached after super().__init__ so that a `peft_config` never injects LoRA into the critic.
        self.model.add_module("value_model", value_model.to(self.args.device))
        if self.args.disable_dropout:
            disable_dropout_in_model(value_model)
        self.last_rollout: list[dict] = []
        self._value_head_pending = self.args.value_head_init == "first_rollout_mean"
        if self._value_head_pending and value_head_bias(value_model) is None:
            raise ValueError(
                f"value_head_init='first_rollout_mean' needs a value head with a bias; {type(value_model).__name__} "
                "has none (a transformers `score` head is built with bias=False). Use the shared base's value role "
                "or a critic whose `score` is an nn.Linear with a bias."
            )
        self.train_dataset = self._checked_prompts(self.train_dataset, "train")
        if isinstance(self.eval_dataset, Mapping):
            self.eval_dataset = {key: self._checked_prompts(d, f"eval {key}") for key, d in self.eval_dataset.items()}
        else:
            self.eval_dataset = self._checked_prompts(self.eval_dataset, "eval")
        check_enough_prompts(self.train_dataset, self.args)

    # ---------------------------------------------------------------- setup


    @property
    def value_model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model).value_model

    def critic_parameters(self) -> list[nn.Parameter]:
        """The critic's trainable parameters: the shared base's value adapter and head, or the attached value model's.

        On a shared base the value adapter lives in the base (the policy's module), not in `value_model`, so the
        shared base's own split (`trainable_parameters("value")`) is the one to ask.
        """
        if self.shared_base is not None:
            return self.shared_base.trainable_parameters("value")
        return [p for p in self.value_model.parameters() if p.requires_grad]

    def policy_parameters(self) -> list[nn.Parameter]:
        """Every trainable parameter of the trainer's model that is not the critic's."""
        critic = {id(p) for p in self.critic_parameters()}
        return [p for p in self.model.parameters() if p.requires_grad and id(p) not in critic]

    # ---------------------------------------------------------------- optimizer: the critic's own learning rate

    def create_optimizer(self, model=None):
        # Extends Trainer.create_optimizer. super() builds the optimizer TrainingArguments asks for (optim,
        # weight-decay groups from `get_decay_parameter_names`, betas, eps); with `value_learning_rate` set, each of
        # its param groups is then split in two, the critic's parameters moving to a copy of the group with the
        # critic's lr. Done before the first step (the optimizer has no state yet) and before `create_scheduler`,
        # whose LambdaLR records each group's initial lr and scales every group by the same factor. An optimizer
        # passed in through `optimizers=` is the caller's, and is left as it is.
        built_here = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if built_here and self.args.value_learning_rate is not None:
            split_param_groups(optimizer, self.critic_parameters(), lr=self.args.value_learning_rate)
        return optimizer


    # ---------------------------------------------------------------- critic warm-up (VAPO, VC-PPO)

    def in_value_warmup(self) -> bool:
        """Whether this training step is one of the first `value_warmup_steps` optimizer steps (critic only)."""
        return self.model.training and self.state.global_step < self.args.value_warmup_steps

    def training_step(self, model, inputs, num_items_in_batch):
        # Extends GRPOTrainer.training_step. During warm-up `_compute_loss` gives the policy term a gradient of
        # exactly 0 (it stays in the graph, since DDP without find_unused_parameters expects a gradient for every
        # parameter); dropping that zero gradient after the backward makes the optimizer skip the policy
        # parameters altogether, so weight decay leaves them as they are and Adam's moments and step count start
        # when the warm-up ends, as for a fresh policy.
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.in_value_warmup():
            for param in self.policy_parameters():
                param.grad = None
        return loss

    # ---------------------------------------------------------------- rollout (seed 4, steps 1-5)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        # Extends SharedBaseGRPOTrainer._calculate_rewards (which keeps the raw rewards): remember the largest |score|.
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        scores, scored = self._global_scores()
        self._reward_magnitude = scores[scored].abs().max().item()  # named if the loss overflows (`_check_finite`)
        return rewards_per_func

    def _tokenize_prompts(self, prompts: list):
        # Extends GRPOTrainer._tokenize_prompts with a length check: a prompt that leaves no room for the completion
        # would otherwise fail deep inside generation, or silently attend past the position limit.
        prompt_ids, *rest = super()._tokenize_prompts(prompts)
        limit = self._max_prompt_length()
        for i, ids in enumerate(prompt_ids):
            if len(ids) > limit:
                raise ValueError(
                    f"Prompt {i} of this batch has {len(ids)} tokens, more than the limit of {limit} "
                    f"(max_prompt_length, or max_position_embeddings - max_completion_length). Shorten or filter it: "
                    f"{str(prompts[i])[:200]!r}"
                )
        return (prompt_ids, *rest)


    def _max_prompt_length(self) -> int:
        if self.args.max_prompt_length is not None:
            return self.args.max_prompt_length
        config = self.accelerator.unwrap_model(self.model).config.get_text_config()
        return getattr(config, "max_position_embeddings", float("inf")) - self.max_completion_length

    def _checked_prompts(self, dataset, split: str):
        """`dataset` with every prompt checked before training: a clear error naming the record for a malformed or
        (with long_prompts="error") too long prompt, or, with long_prompts="drop", the dataset without the long ones.

        Prompts are tokenized exactly as generation will tokenize them (`GRPOTrainer._tokenize_prompts`: chat
        template, tools, chat_template_kwargs). Datasets whose prompts are only known at rollout time (iterable
        datasets, environments, a custom rollout_func, images) are left to the per-batch check of `_tokenize_prompts`.
        """
        if (
            not isinstance(dataset, Dataset)
            or "prompt" not in dataset.column_names
            or not self._prompts_known_upfront(dataset)
        ):
            return dataset
        limit = self._max_prompt_length()
        lengths = self._prompt_lengths(dataset, split)
        kept = [(i, n) for i, n in enumerate(lengths) if n <= limit]  # longer ones are refused or dropped below
        check_prompts_leave_room(kept, self.max_completion_length, self._position_limit(), split, PROMPT_ROOM_FIX)
        too_long = [i for i, n in enumerate(lengths) if n > limit]
        if not too_long:
            return dataset
        if self.args.long_prompts == "error":
            raise long_prompt_error(dataset, split, lengths, too_long, limit)
        if len(too_long) == len(lengths):
            raise ValueError(
                f"{split} dataset: all {len(lengths)} prompts are longer than {limit} tokens (max_prompt_length, or "
                "max_position_embeddings - max_completion_length); nothing is left to train on."
            )
        logger.warning(
            "%s dataset: dropped %d of %d prompts longer than %d tokens (long_prompts='drop')",
            split, len(too_long), len(lengths), limit,
        )  # fmt: skip
        dropped = set(too_long)
        return dataset.select([i for i in range(len(lengths)) if i not in dropped])


    def _generate_and_score_completions(self, inputs):
        # super() samples with theta_old, runs the reward functions and builds GRPO's outputs; we replace its
        # group-relative advantages with per-token GAE advantages from the critic and the KL-penalised reward.
        batch = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        prompt_completion_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        completion_length = batch["completion_ids"].size(1)
        mask = batch["completion_mask"].bool()
        if "tool_mask" in batch:
            mask = mask & batch["tool_mask"].bool()

        scores, scored = self._local_scores(len(mask), mode)
        with torch.no_grad():
            logprobs, values = batch.get("old_per_token_logps"), None
            if logprobs is None:
                logprobs, _, values, _ = self._policy_forward(
                    self.model, prompt_completion_ids, attention_mask, completion_length,
                    batch_size=self.args.per_device_train_batch_size,
                )  # fmt: skip
            ref_logprobs = self._reference_logprobs(prompt_completion_ids, attention_mask, completion_length)
            if values is None:
                values = self._critic_values(prompt_completion_ids, attention_mask, completion_length)
        if self._value_head_pending and mode == "train":
            values = self._initialise_value_head_bias(values, mask & scored[:, None])

        # The per-token ops run over the policy's tokens side by side: with tool output inside a completion, GAE then
        # bootstraps V across it (`policy_tokens`); without, the order is the identity.
        order, policy_mask = policy_token_order(mask)
        logprobs_p, ref_logprobs_p, values_p, ids_p = (
            compact(x, order) for x in (logprobs, ref_logprobs, values, batch["completion_ids"])
        )
        rollout = self._advantages(scores, scored, logprobs_p, ref_logprobs_p, values_p, policy_mask, ids_p)
        loss_mask = mask & scored[:, None]
        batch.update(
            old_per_token_logps=logprobs,
            advantages=expand(rollout["advantages"], order, policy_mask),
            returns=expand(rollout["returns"], order, policy_mask),
            old_values=values,
            ppo_mask=loss_mask,
            num_items_in_batch=self.accelerator.gather(loss_mask.sum()).sum(),
            num_sequences_in_batch=self.accelerator.gather(scored.sum()).sum(),
        )
        self._log_rollout(rollout, scored, logprobs_p, values_p, policy_mask, mode)
        self.last_rollout = self._rollout_records(batch, rollout["token_rewards"], scored)
        return batch

    @property
    def values_on_policy_trunk(self) -> bool:
        """Whether the value head reads the policy adapter's hidden state (`value_layout="policy_trunk"`)."""
        return self.shared_base is not None and self.shared_base.value_layout == "policy_trunk"

    def _policy_forward(
        self, model, input_ids, attention_mask, completion_length, batch_size=None, entropy=False, aux_loss=False
    ):
        """log pi(a_t | s_t) [B, C], the entropies [B, C] (or None), in the policy_trunk layout V(s_t) [B, C] from
        the same forward (else None: the critic needs its own), and with `aux_loss` a MoE policy's router
        load-balancing loss (a scalar; else None).

        The values read the last hidden state the policy's forward leaves on its way to the LM head, through the
        same graph, so one backward carries both the policy and the value loss into the policy adapter. With
        `shared_prompt` on and rows of one prompt in the batch (num_generations > 1: the rollout's groups, or the
        rows of one group a shuffled micro-batch holds), the forward runs on shared rows
        (`SharedBaseGRPOTrainer._get_per_token_logps_and_entropies`) and the value head reads their hidden states at
        the positions the log-probs are read from.
        """
        forward = functools.partial(
            self._get_per_token_logps_and_entropies, model, input_ids, attention_mask, completion_length,
            batch_size=batch_size, compute_entropy=entropy, compute_aux_loss=aux_loss,
        )  # fmt: skip
        if not self.values_on_policy_trunk:
            logprobs, entropies, router_loss = forward()
            return logprobs, entropies, None, router_loss
        with self.shared_base.capture_last_hidden_state() as hidden, self._recording_shared_forwards() as shared:
            logprobs, entropies, router_loss = forward()
        head = self.value_model.heads["value"]
        if not shared:  # TRL's forward: chunks of `batch_size` rows, in order
            return logprobs, entropies, head(torch.cat(hidden))[:, -completion_length - 1 : -1], router_loss
        *chunks, grouped = shared
        values = [completion_token_values(head(states), batch, chunk, completion_length)
                  for states, (batch, chunk) in zip(hidden, chunks, strict=True)]
        return logprobs, entropies, grouped.ungroup(torch.cat(values)), router_loss

    def _critic_values(self, input_ids, attention_mask, completion_length) -> torch.Tensor:
        """`completion_values` [B, C] of the critic (the value role, or a separate value model), on shared rows where
        the policy's forwards share theirs and the critic can (`shared_prompt`): the same values, each prompt
        computed once for the rows holding it."""
        grouped = None
        if self._critic_can_share():
            grouped = self._shared_prompt_groups(input_ids, attention_mask, completion_length, False, {})
        if grouped is None:
            return completion_values(self.value_model, input_ids, attention_mask, completion_length)
        batch = self._shared_prompt.build(grouped.inputs, self)
        reads_mask = self.value_model.shared.peft_model if isinstance(self.value_model, SharedBaseCritic) else (
            self.value_model)
        per_token = token_values(self.value_model, batch.input_ids, model_attention_mask(batch.allowed, reads_mask),
                                 position_ids=batch.position_ids)
        return grouped.ungroup(completion_token_values(per_token, batch, grouped.inputs, completion_length))

    def _critic_can_share(self) -> bool:
        """Whether the critic's forward can run on shared rows: the shared base's value role (the policy's base, which
        the switch checked), or a separate value model that `shared_prompt_blocker` clears (checked once; else its
        forward stays unshared while the policy's share, with one log line)."""
        if self._critic_blocker is None and not isinstance(self.value_model, SharedBaseCritic):
            reason = shared_prompt_blocker(self.value_model, max_length=None)
            self._critic_blocker = reason or ""
            if reason and self._shared_prompt.active:
                logger.warning("shared_prompt: the value model's forward runs unshared: %s", reason)
        return not self._critic_blocker

    def _initialise_value_head_bias(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """value_head_init="first_rollout_mean": shift the value head's bias so that the first training rollout's
        values average to its mean score, and return those values [B, C] as the shifted head gives them.

        The head computes V = w.h + b, and a fresh head's random w already gives mean(w.h) != 0, so setting b to the
        mean score alone would start the values off by that offset. Instead

            b_new = b_old + mean_score - mean(V)        (means over the real tokens of the scored completions)

        which makes mean(V_new) = mean_score exactly (V_new = V + b_new - b_old), the weight unchanged. Without it the
        first advantages are mostly that offset, the same sign for every token. Both means are over all processes
        (the score is the weighted reward-function sum, before missing_eos_penalty and the KL penalty), so every
        process sets the same bias. Not done on resume (global_step > 0: the checkpoint's head is kept), nor on a
        rollout without a scored token (the next rollout tries again).
        """
        if self.state.global_step > 0:
            self._value_head_pending = False
            return values
        scores, scored = self._global_scores()
        m = mask.float()
        value_sum, token_count = self.accelerator.reduce(torch.stack([(values * m).sum(), m.sum()]), "sum").tolist()
        if not scored.any() or token_count == 0:
            return values
        shift = scores[scored].mean().item() - value_sum / token_count
        bias = value_head_bias(self.value_model)
        with full_parameters([bias]):
            old_bias = full_tensor(bias).float().mean().item()
        # under DeepSpeed the optimizer's master copy is written too, else its next step would restore the old bias
        fill_full_parameter(bias, old_bias + shift)
        self._value_head_pending = False
        return values + shift

    def _has_eos(self, completion_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        last = completion_ids.gather(1, (mask.sum(dim=1, keepdim=True) - 1).clamp(min=0)).squeeze(1)
        return torch.isin(last, torch.tensor(self.eos_token_ids, device=last.device))

    def _advantages(self, scores, scored, logprobs, ref_logprobs, values, mask, completion_ids) -> dict:
        """Per-token rewards (score at the last token minus kl_coef * KL) and their advantages and returns."""
        args = self.args
        rewards = token_rewards(
            scores,
            logprobs,
            ref_logprobs,
            mask,
            kl_coef=args.kl_coef,
            kl_estimator=args.kl_estimator,
            missing_eos_penalty=args.missing_eos_penalty,
            has_eos=self._has_eos(completion_ids, mask),
        )
        learn_mask = mask & scored[:, None]
        across_processes = args.whiten_across_processes and self.accelerator.num_processes > 1
        reduce = self._sum_over_processes if across_processes else None
        if args.whiten_rewards or args.whiten_advantages:
            self._log_whitening_skipped(learn_mask, reduce)
        per_token = rewards.rewards
        if args.whiten_rewards:
            # No mean shift: it would move reward from the last token onto every token (TRL's PPO did the same).
            per_token = masked_whiten(per_token, learn_mask, shift_mean=False, reduce=reduce) * learn_mask
        _, monte_carlo_returns = rewards_to_go(per_token, mask, gamma=args.gamma)
        if args.advantage_estimator == "gae":
            advantages, returns = gae(per_token, values, mask, gamma=args.gamma, lam=args.lam)
        else:
            advantages, returns = rewards_to_go(per_token, mask, gamma=args.gamma, baseline=values * mask)
        # Over processes every process joins the collective (it may hold no real token); locally there must be one.
        if args.whiten_advantages and (reduce is not None or learn_mask.any()):
            advantages = masked_whiten(advantages, learn_mask, reduce=reduce) * learn_mask
        return {
            "advantages": advantages,
            "returns": returns,
            "monte_carlo_returns": monte_carlo_returns,
            "token_rewards": rewards,
        }

    def _log_whitening_skipped(self, learn_mask: torch.Tensor, reduce) -> None:
        """Warn and log `objective/whitening_skipped` = 1 when the batch has fewer than 2 real tokens to whiten over
        (`masked_whiten` then leaves the values as they are), else 0; `reduce` counts over processes."""
        count = learn_mask.sum() if reduce is None else reduce(learn_mask.sum())
        skipped = int(count) < 2
        if skipped:
            logger.warning(
                "PPO rollout with %d real completion token(s): whitening needs 2 or more, so rewards/advantages are "
                "not whitened for this batch (objective/whitening_skipped)", int(count),
            )  # fmt: skip
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["objective/whitening_skipped"].append(float(skipped))

    def _sum_over_processes(self, x: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(x, reduction="sum")

    # ---------------------------------------------------------------- update (seed 2.10 and 4, step 6)

    def _compute_loss(self, model, inputs):
        # Replaces GRPOTrainer._compute_loss: PPO adds the critic's value loss to the clipped policy loss, in one
        # backward, and needs its own aggregation (`ppo_loss`), so there is no GRPO loss to reuse.
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        completion_length = inputs["completion_ids"].size(1)
        logprobs, entropy, values, router_loss = self._policy_forward(
            model, input_ids, attention_mask, completion_length, entropy=True, aux_loss=self.aux_loss_enabled
        )
        if values is None:
            values = self._critic_values(input_ids, attention_mask, completion_length)
        normalizer = self._loss_normalizer(inputs)
        warmup = self.in_value_warmup()
        # Critic warm-up: zero advantages and no entropy bonus make the policy term 0 with a gradient of exactly 0
        # (see `training_step` for why the policy stays in the graph), leaving vf_coef * value_loss.
        advantages = torch.zeros_like(inputs["advantages"]) if warmup else inputs["advantages"]
        # `ppo_loss` takes right-padded rows: the policy's tokens side by side, tool output left out (`policy_tokens`)
        order, mask = policy_token_order(inputs["ppo_mask"])
        out = ppo_loss(
            compact(logprobs, order),
            compact(inputs["old_per_token_logps"], order),
            compact(advantages, order),
            mask,
            values=compact(values, order),
            old_values=compact(inputs["old_values"], order),
            returns=compact(inputs["returns"], order),
            entropy=compact(entropy, order),
            clip_range=self.args.cliprange,
            clip_range_value=self.args.cliprange_value,
            vf_coef=self.args.vf_coef,
            ent_coef=0.0 if warmup else self.args.ent_coef,
            aggregation=self.args.loss_aggregation,
            normalizer=normalizer,
        )
        self._log_update(out, entropy, logprobs, inputs, normalizer)
        losses = torch.stack([out.loss, out.policy_loss, out.value_loss]).detach()
        self._check_finite("the PPO loss", "loss, policy loss, value loss", losses)
        return with_router_aux_loss(self, out.loss, router_loss)

    def _check_finite(self, what: str, labels: str, values: torch.Tensor) -> None:
        """FloatingPointError, on every process alike, if `values` (gathered) hold an inf or NaN: naming the step and
        the largest |score| of the generation batch, the usual cause.

        Why stop: Trainer logs a non-finite loss as the mean of the earlier ones (0 at the first step) and clipping
        an inf gradient norm zeroes the update, so the run would go on "succeeding" without learning. The value loss
        squares returns - values, so scores above ~1e19 overflow float32 and bfloat16 even when each is finite;
        refusing a fixed |score| threshold instead would also refuse large rewards that train fine.
        """
        values = self.accelerator.gather(values.float().reshape(-1))
        if torch.isfinite(values).all():
            return
        raise FloatingPointError(
            f"step {self.state.global_step + 1}: {what} is not finite ({labels}: {values.tolist()}); the rewards of "
            f"this generation batch have |score| up to {getattr(self, '_reward_magnitude', float('nan')):.3g}. If that "
            "is large, scale the reward to order 1 (divide by its typical size, or clip it); otherwise lower the "
            "learning rate."
        )

    def _get_grad_norm(self, model, grad_norm=None):
        # Extends Trainer._get_grad_norm: an inf or NaN gradient norm stops the run (`_check_finite`), unless fp16's
        # loss scaler is on, which expects overflows and skips those steps itself.
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if grad_norm is not None and not self.args.fp16 and not math.isfinite(float(grad_norm)):
            self._check_finite("the gradient norm", "norm", torch.tensor([float(grad_norm)]))
        return grad_norm

    def _loss_normalizer(self, inputs) -> torch.Tensor:
        """Tokens (or sequences) one process stands for in one optimizer step, across all processes.

        A generation batch holds `num_items_in_batch` real tokens over all processes and feeds
        `steps_per_generation` micro-batches per process; an optimizer step sums the gradients of
        `gradient_accumulation_steps` micro-batches and DDP averages over processes. Dividing each micro-batch's
        summed loss by  N * grad_accum / (steps_per_generation * num_processes)  makes the step's gradient the
        gradient of the mean over the step's tokens, whatever the split.
        """
        key = "num_items_in_batch" if self.args.loss_aggregation == "token" else "num_sequences_in_batch"
        total = inputs[key].float() / self.accelerator.num_processes
        if self.model.training:
            total = total * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        # 0 only when every completion was skipped (NaN rewards): the masked loss is then 0 whatever we divide by.
        return total.clamp(min=1.0)

    # ---------------------------------------------------------------- logging, under TRL PPO's metric names

    def _gathered_mean(self, x: torch.Tensor) -> float:
        return self.accelerator.gather(x.detach().float().reshape(-1)).mean().item()

    def _log_rollout(self, rollout, scored, logprobs, values, mask, mode):
        # Every process gathers full-size tensors and only then drops skipped completions: all-gather needs equal
        # shapes on every process, and every process must join every collective.
        rewards = rollout["token_rewards"]
        scored_all = gather(scored)
        per_completion = {
            "objective/kl": rewards.kl.sum(dim=1),
            "objective/entropy": (-logprobs * mask).sum(dim=1),
            "objective/non_score_reward": rewards.non_score_reward,
            "objective/scores": rewards.scores,
            "objective/rlhf_reward": rewards.scores + rewards.non_score_reward,
        }
        metrics = self._metrics[mode]
        metrics["objective/kl_coef"].append(self.args.kl_coef)
        for name, values_per_completion in per_completion.items():
            kept = gather(values_per_completion.float())[scored_all]
            if len(kept):
                metrics[name].append(kept.mean().item())
        learn_mask = mask & scored[:, None]
        metrics["val/explained_variance"].append(self._explained_variance(rollout["returns"], values, learn_mask))
        # With lam < 1 the GAE returns are partly the critic's own values, which flatters it; the Monte-Carlo
        # returns (discounted reward-to-go) are what the values should predict.
        metrics["val/explained_variance_mc"].append(
            self._explained_variance(rollout["monte_carlo_returns"], values, learn_mask)
        )

    def _explained_variance(self, returns, values, mask) -> float:
        """1 - Var(R - V) / Var(R) over the real tokens of all processes (NaN if there are none)."""
        m = mask.float()
        residual = (returns - values) * m
        local = torch.stack([m.sum(), (returns * m).sum(), (returns**2 * m).sum(), residual.sum(), (residual**2).sum()])
        n, r, r2, e, e2 = self.accelerator.reduce(local, reduction="sum").tolist()
        if n == 0:
            return float("nan")
        returns_var, residual_var = r2 / n - (r / n) ** 2, e2 / n - (e / n) ** 2
        return 1.0 - residual_var / max(returns_var, 1e-8)

    def _rollout_records(self, batch, rewards, scored) -> list[dict]:
        """One dict per completion of the generation batch (all processes), for tables such as
        `rlhf_ext.callbacks.CompletionsTableCallback`."""
        decode = self.processing_class.batch_decode
        columns = {
            "prompt": decode(batch["prompt_ids"], skip_special_tokens=True),
            "completion": decode(batch["completion_ids"], skip_special_tokens=True),
            "score": rewards.scores.tolist(),
            "kl": rewards.kl.sum(dim=1).tolist(),
            "rlhf_reward": (rewards.scores + rewards.non_score_reward).tolist(),
            "skipped": (~scored).tolist(),
        }
        columns = {name: gather_object(values) for name, values in columns.items()}
        return [dict(zip(columns, row)) for row in zip(*columns.values())]

    def _log_update(self, out, entropy, logprobs, inputs, normalizer):
        mode = "train" if self.model.training else "eval"
        mask = inputs["ppo_mask"]
        # The losses are this micro-batch's share of the step's mean; rescale them to this micro-batch's own mean.
        count = mask.sum() if self.args.loss_aggregation == "token" else mask.any(dim=1).sum()
        share = normalizer / count.clamp(min=1)
        ratio = torch.exp(logprobs.detach() - inputs["old_per_token_logps"])
        metrics = self._metrics[mode]
        metrics["policy/approxkl_avg"].append(self._gathered_mean(out.approx_kl))
        metrics["policy/clipfrac_avg"].append(self._gathered_mean(out.clip_fraction))
        metrics["policy/entropy_avg"].append(self._gathered_mean(masked_mean(entropy.detach(), mask)))
        metrics["loss/policy_avg"].append(self._gathered_mean(out.policy_loss * share))
        metrics["loss/value_avg"].append(self._gathered_mean(out.value_loss * share))
        metrics["val/clipfrac_avg"].append(self._gathered_mean(out.value_clip_fraction))
        metrics["val/ratio"].append(self._gathered_mean(masked_mean(ratio, mask)))

    # ---------------------------------------------------------------- checkpoints: the critic beside the policy

    def _save(self, output_dir: str | None = None, state_dict=None):
        # Extends Trainer._save: the policy is saved without the attached critic's weights (so it loads as a plain
        # causal LM or adapter), and the critic is saved on its own in `<output_dir>/value`.
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if state_dict is None:
            state_dict = self.accelerator.unwrap_model(self.model).state_dict()
        policy_state = {k: v for k, v in state_dict.items() if not k.startswith("value_model.")}
        with self._saving_only_the_policy_adapter(output_dir):
            super()._save(output_dir, state_dict=policy_state)
        if self.args.should_save:
            # ZeRO-3: the live critic holds 1/N of each weight; save the whole values the Trainer gathered instead
            with parameters_from_state_dict(self.accelerator.unwrap_model(self.model), state_dict):
                save_value_model(self.value_model, os.path.join(output_dir, VALUE_DIR))


    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # Extends Trainer._load_from_checkpoint, which restores only the policy, with the critic saved by `_save`.
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_value_model(self.value_model, os.path.join(resume_from_checkpoint, VALUE_DIR))


def value_head_bias(value_model: nn.Module) -> nn.Parameter | None:
    """The bias of the critic's value head: the shared base's value head, or a transformers critic's `score` head
    (None when that head has no bias, as transformers builds it)."""
    if isinstance(value_model, SharedBaseCritic):
        return value_model.heads["value"].linear.bias
    return getattr(getattr(value_model, "score", None), "bias", None)


def split_param_groups(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], lr: float) -> None:
    """Move `params` out of every param group of `optimizer` into copies of their groups with learning rate `lr`.

    Only for an optimizer that has not stepped (its state, keyed by parameter, is empty): each copy keeps its
    group's other options (weight decay, betas, ...), so only the learning rate differs.
    """
    if optimizer.state:
        raise RuntimeError("split_param_groups needs an optimizer that has not stepped yet.")
    moving = {id(p) for p in params}
    moved_any = False
    for group in list(optimizer.param_groups):
        moved = [p for p in group["params"] if id(p) in moving]
        if moved:
            group["params"] = [p for p in group["params"] if id(p) not in moving]
            optimizer.add_param_group({**group, "params": moved, "lr": lr})
            moved_any = True
    if moving and not moved_any:
        # e.g. FSDP, whose flattened parameters are not the module's: a silent no-op would train at the wrong lr
        raise ValueError("value_learning_rate: none of the critic's parameters is in the optimizer's param groups.")


def save_value_model(value_model: nn.Module, path: str) -> None:
    """Save the critic: its own `save` (the shared base's value role), `save_pretrained` (a transformers model), or,
    for any other module (e.g. one with only a `values()` method), its state_dict as `model.safetensors`."""
    if hasattr(value_model, "save"):
        value_model.save(path)
    elif hasattr(value_model, "save_pretrained"):
        value_model.save_pretrained(path)
    else:
        from safetensors.torch import save_model

        os.makedirs(path, exist_ok=True)
        save_model(value_model, os.path.join(path, VALUE_WEIGHTS))  # save_model: tied weights stored once


def load_value_model(value_model: nn.Module, path: str) -> None:
    """Load critic weights saved by `save_value_model` into `value_model`, in place."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"No critic checkpoint at {path}; was this checkpoint written by PPOTrainer?")
    if hasattr(value_model, "load"):
        value_model.load(path)
        return
    from safetensors.torch import load_model

    load_model(value_model, os.path.join(path, VALUE_WEIGHTS))  # strict: every weight, under its saved name


def _check_train_dataset(train_dataset, environment_factory=None) -> None:
    """ValueError for an empty train set, or one without a 'prompt' column (unless an `environment_factory` makes
    the prompts, as TRL allows: a dataset may then only route each record to its environment)."""
    if train_dataset is not None and hasattr(train_dataset, "__len__") and len(train_dataset) == 0:
        raise ValueError("train_dataset is empty: PPO needs at least one prompt.")
    has_prompts = train_dataset is None or "prompt" in (train_dataset.column_names or [])
    if not has_prompts and environment_factory is None:
        raise ValueError(f"train_dataset needs a 'prompt' column, got columns {train_dataset.column_names}.")


def long_prompt_error(dataset, split: str, lengths: list[int], too_long: list[int], limit: int) -> ValueError:
    """The error for prompts over the limit: the first one's record, length and text, and how many there are."""
    first = too_long[0]
    listed = f"records {too_long[:10]}{' ...' if len(too_long) > 10 else ''}"
    return ValueError(
        f"{split} dataset, record {first} (0-based): field 'prompt' has {lengths[first]} tokens, more than the limit "
        f"of {limit} (max_prompt_length, or max_position_embeddings - max_completion_length); {len(too_long)} of "
        f"{len(lengths)} prompts are that long ({listed}). Shorten or filter them, or set long_prompts='drop' to "
        f"train without them: {str(dataset[first]['prompt'])[:200]!r}"
    )


