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
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import numbers
import os
import textwrap
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext

import torch
from accelerate.utils import gather, gather_object, is_peft_model
from datasets import Dataset
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils.integrations import dequantize_module_weight
from torch import nn
from transformers import PreTrainedModel
from trl import GRPOTrainer
from trl.data_utils import apply_chat_template, is_conversational
from trl.generation.vllm_generation import VLLMGeneration
from trl.trainer.utils import add_fused_lm_head, create_model_from_path, disable_dropout_in_model, is_async_callable

from ..data.ranked import role_problem
from ..distributed import (
    check_engine_supports,
    fill_full_parameter,
    full_parameters,
    full_tensor,
    parameters_from_state_dict,
)
from ..models import SharedBase
from ..models.policy_head import adapter_view_of, has_own_head, is_modules_to_save_parameter, ties_output_embeddings
from ..models.role_checks import check_trainer_reward_models
from ..models.scoring import reads_last_real_token, right_padded, sequence_classifier_scores
from ..ops import (
    gae,
    masked_mean,
    masked_whiten,
    ppo_loss,
    rewards_to_go,
    token_rewards,
)
from .fault_tolerance import FaultTolerantMixin
from .policy_tokens import compact, expand, policy_token_order
from .position_limits import check_prompts_leave_room, max_positions
from .ppo_config import PPOConfig
from .sampling import epoch_seeded

logger = logging.getLogger(__name__)

VALUE_DIR = "value"
VALUE_WEIGHTS = "model.safetensors"  # a critic's weights in VALUE_DIR, unless it saves itself (`save`)
POLICY_ADAPTER = "policy"
# Prompts tokenized per call by the up-front length check: large enough to amortise the tokenizer call, small
# enough that a huge dataset never sits in memory as token ids.
PROMPT_CHECK_BATCH = 1024
# What else to change when the longest prompt + max_completion_length passes the model's positions.
PROMPT_ROOM_FIX = "set max_prompt_length to {prompt_room} or less, with long_prompts='drop' to skip longer prompts."


def token_values(value_model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """V(s) after every prefix of the sequence: [B, L] float32.

    A module with a `values(input_ids, attention_mask)` method (the shared base's value role) is asked
    directly. Otherwise `value_model` is a transformers model with a one-label `score` head (an
    `AutoModelForSequenceClassification` or `...TokenClassification` with `num_labels=1`, the value model
    format of TRL's PPO): its backbone runs once and the head is applied at every position.
    """
    if hasattr(value_model, "values"):
        return value_model.values(input_ids, attention_mask).float()
    if not hasattr(value_model, "score"):
        raise TypeError(
            f"value_model {type(value_model).__name__} has neither a `values(input_ids, attention_mask)` method nor a "
            "`score` head; pass e.g. AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)."
        )
    backbone = getattr(value_model, value_model.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
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

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.shared.values(input_ids, attention_mask)

    def save(self, path: str) -> None:
        self.shared.save_role("value", path)

    def load(self, path: str) -> None:
        self.shared.load_role("value", path)


def load_policy(model_id: str, args) -> PreTrainedModel:
    """The policy from a path or Hub id, loaded as GRPOTrainer.__init__ loads one: TRL's `create_model_from_path` with
    `args.model_init_kwargs`, `args.trust_remote_code` and no device_map under DDP or DeepSpeed.

    Loaded here rather than by GRPOTrainer because a full fine-tune's reference copy is taken before `super().__init__`.
    """
    kwargs = dict(args.model_init_kwargs or {})
    if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
        kwargs["device_map"] = None  # as TRL: "auto" fails under distributed training
    kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    return create_model_from_path(model_id, **kwargs)


def with_router_aux_loss(trainer: GRPOTrainer, loss: torch.Tensor, aux_loss: torch.Tensor | None) -> torch.Tensor:
    """`loss` plus a MoE policy's router load-balancing loss, added and logged (`aux_loss`) as GRPOTrainer._compute_loss
    (TRL 1.16) does: router_aux_loss_coef * aux_loss, divided in training by the gradient-accumulation steps, because
    `loss` already is (Trainer's own scaling is off for GRPO trainers). `loss` as it is when the policy has no router
    or the coefficient is 0 (`aux_loss_enabled`, set by GRPOTrainer.__init__).

    A function, not TRL's code: PPO and online K-way replace `_compute_loss` whole, so TRL's addition never runs.
    """
    if not trainer.aux_loss_enabled:
        return loss
    mode = "train" if trainer.model.training else "eval"
    accumulation = trainer.current_gradient_accumulation_steps if mode == "train" else 1.0
    trainer._metrics[mode]["aux_loss"].append(trainer.accelerator.gather_for_metrics(aux_loss.detach()).mean().item())
    return loss + trainer.router_aux_loss_coef * aux_loss / accumulation


def reward_texts(prompts: list, completions: list, tokenizer, chat_template_kwargs: dict) -> list[str]:
    """The text a reward model scores: the chat template over prompt + completion messages, or prompt + completion +
    EOS for plain text, as the K-way reward trainer's tokenization (`rlhf_ext.data.prepare`, like TRL's) built the
    sequences it trained on."""
    if is_conversational({"prompt": prompts[0]}):
        return [
            apply_chat_template({"messages": p + c}, tokenizer, **chat_template_kwargs)["text"]
            for p, c in zip(prompts, completions, strict=True)
        ]
    return [p + c + tokenizer.eos_token for p, c in zip(prompts, completions, strict=True)]


def tokenized_for_scoring(texts: list[str], tokenizer, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of `texts`, right-padded by hand: a tokenizer without a pad token (GPT-2, Llama 3)
    cannot pad, and the padding id does not matter since scores are read by the mask."""
    sequences = tokenizer(text=texts, add_special_tokens=False)["input_ids"]
    input_ids, attention_mask = right_padded(sequences, tokenizer.pad_token_id)
    return input_ids.to(device), attention_mask.to(device)


class SharedBaseReward:
    """The reward role of a `SharedBase` as a TRL reward function: the score of prompt + completion text [N].

    Like TRL's reward-model path, the text is re-tokenized (with the chat template for conversations); it is scored
    at its last real token (`rlhf_ext.models.scoring`), the token the K-way reward trainer trains at. A plain-text
    completion gets the EOS token appended, as the reward trainer's tokenization appended it.
    """

    __name__ = "reward_role"

    def __init__(self, shared: SharedBase, tokenizer, chat_template_kwargs: dict | None = None):
        self.shared = shared
        self.tokenizer = tokenizer
        self.chat_template_kwargs = chat_template_kwargs or {}

    def __call__(self, prompts: list, completions: list, **kwargs) -> list[float]:
        texts = reward_texts(prompts, completions, self.tokenizer, self.chat_template_kwargs)
        input_ids, attention_mask = tokenized_for_scoring(texts, self.tokenizer, self.shared.device)
        return self.shared.reward_scores(input_ids, attention_mask).tolist()


class TrainedRewardModel:
    """A full sequence-classification reward model saved by the K-way reward trainer, as a TRL reward function.

    TRL would score it by transformers' pad-based pooling on prompt + completion without the EOS; this scores it as
    it was trained: the text of `reward_texts`, read at its last real token.
    """

    def __init__(self, model: nn.Module, tokenizer, chat_template_kwargs: dict | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.chat_template_kwargs = chat_template_kwargs or {}
        self.__name__ = getattr(getattr(model, "config", None), "_name_or_path", "") or "reward_model"

    @torch.inference_mode()
    def __call__(self, prompts: list, completions: list, **kwargs) -> list[float]:
        texts = reward_texts(prompts, completions, self.tokenizer, self.chat_template_kwargs)
        device = next(self.model.parameters()).device
        input_ids, attention_mask = tokenized_for_scoring(texts, self.tokenizer, device)
        return sequence_classifier_scores(self.model, input_ids, attention_mask)[:, 0].float().tolist()


def scored_as_trained(func, tokenizer, chat_template_kwargs: dict | None):
    """`func`, or a `TrainedRewardModel` around it when it is a reward model the K-way reward trainer saved.

    A reward model from elsewhere is left to TRL, which scores it as TRL's GRPOTrainer does.
    """
    if isinstance(func, nn.Module) and reads_last_real_token(func):
        return TrainedRewardModel(func, tokenizer, chat_template_kwargs)
    return func


def merged_adapter_weights(peft_model: PeftModel, adapter: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every parameter of the base with `adapter` merged in, under transformers' names.

    The merge is computed on the side, W + delta_W(adapter) summed in float32 on the base weight (dequantized on a
    4-bit or 8-bit base) and cast to that weight's dtype, so the live model is only read: its other adapters, its
    active adapter and its base stay exactly as they were. The parameters are the base model's in `named_parameters`
    order, each once (tied weights once, as vLLM expects), without peft's `lora_*` weights and with `.base_layer`
    dropped from the names; nothing attached outside the base (such as the trainer's critic) is included. A module
    `adapter` trains a copy of (`modules_to_save`: the policy's own LM head) is sent as that copy, under its name.
    """
    base = peft_model.get_base_model()
    for name, param in base.named_parameters():
        if ".lora_" in name:  # adapter weights: vLLM has no such parameters; `adapter`'s are merged below
            continue
        if is_modules_to_save_parameter(name):
            view = adapter_view_of(base, name, param.detach(), adapter)  # None: not what `adapter` runs
            if view is not None:
                yield view
            continue
        module_name, _, param_name = name.rpartition(".")
        if param_name != "weight":
            yield name.replace(".base_layer", ""), param.detach()
            continue
        weight = dequantize_module_weight(base.get_submodule(module_name)).detach()
        tuner = _lora_layer_wrapping(base, module_name)
        if tuner is not None and (adapter in tuner.lora_A or adapter in tuner.lora_embedding_A):
            _check_plain_lora(tuner, adapter, module_name)
            weight = (weight.float() + tuner.get_delta_weight(adapter).float()).to(weight.dtype)
        yield name.replace(".base_layer", ""), weight


def _lora_layer_wrapping(base: nn.Module, module_name: str) -> LoraLayer | None:
    """The LoRA layer whose `base_layer` is the module `module_name`, or None for a module peft did not wrap."""
    if not module_name.endswith(".base_layer"):
        return None
    layer = base.get_submodule(module_name.removesuffix(".base_layer"))
    return layer if isinstance(layer, LoraLayer) else None


def _check_plain_lora(tuner: LoraLayer, adapter: str, module_name: str) -> None:
    """Refuse what `W + get_delta_weight` does not merge exactly: LoRA variants (DoRA), LoRA biases, merged layers."""
    if adapter in tuner.lora_variant or tuner.lora_bias.get(adapter, False):
        raise NotImplementedError(
            f"Adapter {adapter!r} of {module_name} is not plain LoRA (DoRA or lora_bias); the shared base's vLLM "
            "weight sync merges plain LoRA only."
        )
    if tuner.merged_adapters:
        raise RuntimeError(f"{module_name} has adapters merged in place ({tuner.merged_adapters}); unmerge them first.")


class SharedBaseVLLMGeneration(VLLMGeneration):
    """TRL's vLLM backend for a `SharedBase`: a weight sync sends the policy merged into the base, nothing else.

    PPOTrainer turns the backend GRPOTrainer builds into this class; only the weight iteration differs, so TRL's
    `sync_weights` (server and colocate modes) and its generation are unchanged. The vLLM path itself is unverified
    until a GPU run (docs/ppo.md); tests/test_ppo_vllm_sync.py checks what is sent, on CPU, with vLLM stood in for.
    """

    def _iter_named_params(self):
        # Replaces VLLMGeneration._iter_named_params (TRL 1.16). For a peft model it merges the *active* adapter into
        # the live base in place, sends every parameter of the trainer's model and unmerges. On a shared base that sends
        # the critic attached as `value_model` (its value and reward heads), sends the value adapter merged if that is
        # the active one, and round-trips the base through merge and unmerge: a bfloat16 base moves by a rounding step
        # per sync and a 4-bit base is requantized (and sent packed), though the base is also the reference and the
        # body of the value and reward roles. Here the policy is merged on the side, by name.
        if self._dist.is_fsdp:
            raise NotImplementedError("The shared base's vLLM weight sync does not support FSDP; use DDP or ZeRO.")
        if has_own_head(self.model, "policy") and ties_output_embeddings(self.model.get_base_model()):
            # vLLM builds a tied model from the base's config and skips a sent `lm_head.weight`: it would sample with
            # the reference's head while the trainer scores with the policy's.
            raise NotImplementedError(
                "policy_lm_head='trainable' on a base with tie_word_embeddings=True cannot be synced to vLLM, which "
                "ties lm_head to embed_tokens and ignores a sent lm_head.weight; generate without vLLM, or serve an "
                "untied copy of the base (export_merged_policy writes one)."
            )
        with self._dist.gather_params(list(self.model.parameters())):  # ZeRO-3: the whole model, as TRL gathers it
            for name, tensor in merged_adapter_weights(self.model, "policy"):
                yield self._fix_param_name_to_vllm(name), tensor


class PPOTrainer(FaultTolerantMixin, GRPOTrainer):
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
        _check_train_dataset(train_dataset)
        check_trainer_reward_models(reward_funcs, args)  # before TRL loads a path as a sequence classifier
        self.shared_base = model if isinstance(model, SharedBase) else None
        if self.shared_base is not None:
            value_model = value_model or SharedBaseCritic(self.shared_base)
            if reward_funcs is None and "reward" in self.shared_base.heads:
                reward_funcs = SharedBaseReward(self.shared_base, processing_class, args.chat_template_kwargs)
            model = self.shared_base.peft_model
        if value_model is None:
            raise ValueError("PPOTrainer needs a critic: pass `value_model`, or a SharedBase as `model`.")
        if isinstance(model, str):
            model = load_policy(model, args)
        uses_adapters = is_peft_model(model) or peft_config is not None
        if ref_model is None and not uses_adapters:
            # A full fine-tune moves every weight, so the reference must be a copy taken before training.
            ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        super().__init__(
            model=model,
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            reward_processing_classes=reward_processing_classes,
            callbacks=callbacks,
            optimizers=optimizers,
            peft_config=peft_config,
            tools=tools,
            rollout_func=rollout_func,
            environment_factory=environment_factory,
        )
        if self.shared_base is not None:
            # GRPOTrainer casts the trainable adapters of any quantized base to bfloat16; the shared base keeps them
            # in its compute dtype (float32 when asked for).
            self.shared_base.match_adapter_dtype()
            if self.use_vllm:
                # GRPOTrainer.__init__ built a plain VLLMGeneration; only its weight sync must change (see the class,
                # which adds no state, so re-classing the instance keeps everything TRL set up).
                self.vllm_generation.__class__ = SharedBaseVLLMGeneration
        self.ppo_ref_model = self._prepare_reference(ref_model)
        # Attached after super().__init__ so that a `peft_config` never injects LoRA into the critic.
        self.model.add_module("value_model", value_model.to(self.args.device))
        if self.args.disable_dropout:
            disable_dropout_in_model(value_model)
        self._last_rewards_per_func = None
        self.last_rollout: list[dict] = []
        self._value_head_pending = self.args.value_head_init == "first_rollout_mean"
        if self._value_head_pending and value_head_bias(value_model) is None:
            raise ValueError(
                f"value_head_init='first_rollout_mean' needs a value head with a bias; {type(value_model).__name__} "
                "has none (a transformers `score` head is built with bias=False). Use the shared base's value role "
                "or a critic whose `score` is an nn.Linear with a bias."
            )
        # Bad input found now, before the first step, rather than steps into the run with nothing saved.
        check_engine_supports(model, self.accelerator, type(self).__name__, shared_base=self.shared_base is not None)
        self.reward_funcs = [
            checked_reward_function(scored_as_trained(func, tokenizer, self.chat_template_kwargs), name)
            for func, tokenizer, name in zip(
                self.reward_funcs, self.reward_processing_classes, self.reward_func_names, strict=True
            )
        ]
        check_eos_token(self.processing_class)
        self.train_dataset = self._checked_prompts(self.train_dataset, "train")
        if isinstance(self.eval_dataset, Mapping):
            self.eval_dataset = {key: self._checked_prompts(d, f"eval {key}") for key, d in self.eval_dataset.items()}
        else:
            self.eval_dataset = self._checked_prompts(self.eval_dataset, "eval")

    # ---------------------------------------------------------------- setup

    def _prepare_reference(self, ref_model):
        if ref_model is None:
            return None
        add_fused_lm_head(ref_model, temperature=self.temperature, cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32)
        return self.accelerator.prepare_model(ref_model, evaluation_mode=True)

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

    def _get_train_sampler(self, dataset=None):
        # Extends GRPOTrainer._get_train_sampler: the same RepeatSampler, with each epoch's shuffle seeded by the
        # epoch, so a run resumed after its first epoch sees the prompts an uninterrupted run sees.
        return epoch_seeded(super()._get_train_sampler(dataset))

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
        # Extends GRPOTrainer._calculate_rewards: keep the gathered [N_global, n_funcs] rewards, which super() turns
        # into group-relative advantages and then drops; PPO needs the raw weighted score of every completion.
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        check_reward_batch(rewards_per_func, self.reward_func_names, self.reward_weights)
        self._last_rewards_per_func = rewards_per_func
        finite = rewards_per_func.isfinite().all(dim=1)
        scores = (rewards_per_func[finite] * self.reward_weights.to(rewards_per_func.device)).sum(dim=1)
        self._reward_magnitude = scores.abs().max().item()  # named if the loss overflows (`_check_finite`)
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

    def _position_limit(self) -> int | None:
        """The policy's max_position_embeddings (None if its config sets none)."""
        return max_positions(self.accelerator.unwrap_model(self.model).config)

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

    def _prompts_known_upfront(self, dataset: Dataset) -> bool:
        """Whether the dataset's prompts are exactly what generation tokenizes (no environment, rollout function or
        images changing them at rollout time)."""
        changed_at_rollout = self.environment_factories is not None or self.rollout_func is not None
        return not changed_at_rollout and not {"image", "images"} & set(dataset.column_names)

    def _prompt_lengths(self, dataset: Dataset, split: str) -> list[int]:
        """Token count of every prompt of `dataset`, tokenized by GRPOTrainer (not this class's per-batch check);
        ValueError naming the record for a prompt that is not text or chat messages, or that has no tokens."""
        lengths = []
        for batch in dataset.select_columns("prompt").iter(batch_size=PROMPT_CHECK_BATCH):
            prompts = batch["prompt"]
            for i, prompt in enumerate(prompts, start=len(lengths)):
                check_prompt(prompt, split, i)
            prompt_ids = GRPOTrainer._tokenize_prompts(self, prompts)[0]
            for i, ids in enumerate(prompt_ids, start=len(lengths)):
                if len(ids) == 0:
                    raise ValueError(f"{split} dataset, record {i} (0-based): field 'prompt' has no tokens.")
            lengths.extend(len(ids) for ids in prompt_ids)
        return lengths

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
                values = completion_values(self.value_model, prompt_completion_ids, attention_mask, completion_length)
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
        same graph, so one backward carries both the policy and the value loss into the policy adapter.
        """
        forward = functools.partial(
            self._get_per_token_logps_and_entropies, model, input_ids, attention_mask, completion_length,
            batch_size=batch_size, compute_entropy=entropy, compute_aux_loss=aux_loss,
        )  # fmt: skip
        if not self.values_on_policy_trunk:
            logprobs, entropies, router_loss = forward()
            return logprobs, entropies, None, router_loss
        with self.shared_base.capture_last_hidden_state() as hidden:
            logprobs, entropies, router_loss = forward()
        values = self.value_model.heads["value"](torch.cat(hidden))  # chunks of `batch_size` rows, in order
        return logprobs, entropies, values[:, -completion_length - 1 : -1], router_loss

    def _reference_logprobs(self, input_ids, attention_mask, completion_length):
        """log pi_ref of the sampled tokens [B, C]: the reference model, or the policy with its adapters off."""
        if self.ppo_ref_model is not None:
            model, context = self.ppo_ref_model, nullcontext()
        elif self.shared_base is not None:
            # The shared base's own switch: peft's disable_adapter alone would freeze the value adapter on exit.
            model, context = self.model, self.shared_base.role("reference")
        else:
            model, context = self.model, self.accelerator.unwrap_model(self.model).disable_adapter()
        with context:
            logps, _, _ = self._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, completion_length, batch_size=self.args.per_device_train_batch_size
            )
        return logps

    def _global_scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[N_global] weighted reward sums of the generation batch (all processes) and where they are finite."""
        rewards_per_func = self._last_rewards_per_func
        weights = self.reward_weights.to(rewards_per_func.device)
        scores_global = (rewards_per_func * weights).sum(dim=1)
        return scores_global, torch.isfinite(scores_global)

    def _local_scores(self, batch_size: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's [B] weighted reward sums and a [B] bool marking the completions with a finite score.

        A completion whose reward is NaN or None under any reward function is skipped (its tokens leave the loss)
        and counted in `objective/skipped_completions`, rather than being scored with a partial sum.
        """
        scores_global, scored_global = self._global_scores()
        self._metrics[mode]["objective/skipped_completions"].append((~scored_global).sum().item())
        start = self.accelerator.process_index * batch_size
        local = slice(start, start + batch_size)
        return scores_global[local].nan_to_num(0.0), scored_global[local]

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
            values = completion_values(self.value_model, input_ids, attention_mask, completion_length)
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
        with self._saving_only_the_policy_adapter():
            super()._save(output_dir, state_dict=policy_state)
        if self.args.should_save:
            # ZeRO-3: the live critic holds 1/N of each weight; save the whole values the Trainer gathered instead
            with parameters_from_state_dict(self.accelerator.unwrap_model(self.model), state_dict):
                save_value_model(self.value_model, os.path.join(output_dir, VALUE_DIR))

    @contextmanager
    def _saving_only_the_policy_adapter(self):
        """While active, the shared base's peft model saves only the policy adapter (in `<output_dir>/policy`).

        Trainer._save calls peft's `save_pretrained`, which writes every adapter, each but "default" in a subfolder
        named after it: the frozen reward adapter landed in `<output_dir>/reward` without its head, looking like a
        reward role folder but not loadable as one, and the value adapter is written with its head by `_save` anyway.
        The reward role is read from `reward_adapter_path` again on resume, so a checkpoint needs neither.
        """
        if self.shared_base is None:
            yield
            return
        peft_model = self.shared_base.peft_model
        peft_model.save_pretrained = functools.partial(
            type(peft_model).save_pretrained, peft_model, selected_adapters=[POLICY_ADAPTER]
        )
        try:
            yield
        finally:
            del peft_model.save_pretrained  # back to the class's method

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


def _check_train_dataset(train_dataset) -> None:
    if train_dataset is not None and hasattr(train_dataset, "__len__") and len(train_dataset) == 0:
        raise ValueError("train_dataset is empty: PPO needs at least one prompt.")
    if train_dataset is not None and "prompt" not in (train_dataset.column_names or []):
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


def check_prompt(prompt, split: str, index: int) -> None:
    """ValueError naming the record unless `prompt` is text or a list of chat messages ({"role", "content"})."""
    where = f"{split} dataset, record {index} (0-based): field 'prompt'"
    if isinstance(prompt, str):
        return
    if not isinstance(prompt, list) or not prompt:
        raise ValueError(f"{where} must be text or a non-empty list of chat messages, got {prompt!r:.100}.")
    for turn, message in enumerate(prompt):
        is_message = isinstance(message, Mapping) and isinstance(message.get("role"), str)
        if not is_message or message.get("content") is None:
            raise ValueError(
                f"{where}, message {turn}: a chat message needs a 'role' (text) and a 'content', got {message!r:.100}."
            )
        if role_problem(message["role"]):  # the chat template would render it as a literal turn, or fail
            raise ValueError(f"{where}, message {turn}: {role_problem(message['role'])}.")


def check_eos_token(processing_class) -> None:
    """ValueError unless the tokenizer has an EOS token: sampling stops at it (transformers' generation fails on
    None at the first step) and a plain-text completion's reward text ends with it."""
    tokenizer = getattr(processing_class, "tokenizer", processing_class)  # a processor holds its tokenizer
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is None:
        raise ValueError(
            "The tokenizer (processing_class) has no eos_token: sampling stops at the EOS token and the reward reads "
            "plain-text completions ending with it, so generation would fail at the first step. Set "
            "tokenizer.eos_token to the token that ends your model's answers."
        )


def checked_reward_function(func, name: str):
    """`func` with what it returns checked by `check_rewards` (async stays async); a module is returned unchanged,
    since TRL reads a reward model's logits itself."""
    if isinstance(func, nn.Module):
        return func
    if is_async_callable(func):

        async def checked(*args, **kwargs):
            return check_rewards(await func(*args, **kwargs), name)
    else:

        def checked(*args, **kwargs):
            return check_rewards(func(*args, **kwargs), name)

    checked.__name__ = checked.__qualname__ = name
    checked.__wrapped__ = func
    return checked


def check_rewards(rewards, name: str):
    """`rewards` unchanged if it holds one number (or None, to skip) per completion; a TypeError naming the reward
    function and the first bad value otherwise, instead of torch's "too many dimensions 'str'" from inside TRL.

    Accepted is what TRL's conversion reads correctly: a list, tuple, array or tensor whose items are None, Python or
    numpy numbers, or one-element torch tensors (so a [N] or [N, 1] tensor). The count is left to TRL, whose error
    already names the function.
    """
    advice = "a reward function must return one number (or None to skip the completion) per completion"
    is_sequence = hasattr(rewards, "__len__") and getattr(rewards, "ndim", 1) > 0  # a 0-d array has __len__ too
    if isinstance(rewards, (str, bytes, Mapping)) or not is_sequence:
        raise TypeError(f"Reward function {name!r} returned {type(rewards).__name__} {rewards!r:.100}; {advice}.")
    for i, reward in enumerate(rewards):
        if not _is_scalar_reward(reward):
            raise TypeError(
                f"Reward function {name!r} returned {type(reward).__name__} {reward!r:.100} for completion {i}; "
                f"{advice}."
            )
    return rewards


def check_reward_batch(rewards_per_func: torch.Tensor, names: list[str], weights: torch.Tensor) -> None:
    """Refuse rewards that would make training silently stop learning; warn when some completions go unscored.

    `rewards_per_func` [N, F] is the generation batch of all processes (TRL turns None into NaN), so every process
    raises alike. NaN / None means "no reward for this completion": it is skipped (its tokens leave the loss). But
    - +-inf is refused: skipped like NaN it would never push the policy away from a "forbidden" completion, and kept
      it would make the returns, advantages and value loss inf or NaN; a large finite penalty does what was meant;
    - a batch where no completion has a reward is refused: every step would be a no-op and the run would "succeed";
    - a weighted sum sum_f w_f r_f that overflows to +-inf is refused for the same reason as an inf reward.
    A completion is skipped when any function gives it no reward (a partial sum would be a different reward).
    """
    infinite = torch.isinf(rewards_per_func)
    if infinite.any():
        row, col = infinite.nonzero()[0].tolist()
        raise ValueError(
            f"Reward function {names[col]!r} returned {rewards_per_func[row, col].item()} for completion {row} of the "
            "generation batch (0-based, all processes in order). Infinite rewards are not allowed: skipped, the policy "
            "would never be pushed away from such a completion, and kept, they make the returns and losses inf or "
            "NaN. Return a large finite penalty instead (e.g. -10 times your usual reward scale), or None to skip it."
        )
    missing = torch.isnan(rewards_per_func)
    skipped, total = missing.any(dim=1), len(rewards_per_func)
    counts = missing.sum(dim=0).tolist()
    if skipped.all():
        per_func = ", ".join(f"{name!r}: {n} of {total}" for name, n in zip(names, counts, strict=True))
        raise ValueError(
            f"none of the {total} completions of this generation batch got a reward (NaN or None from a reward "
            f"function; completions without a reward, per function: {per_func}). Every step would be a no-op. Check "
            "the reward functions (an API that fails, a parser that never matches)."
        )
    if skipped.any():
        logger.warning(
            "%d of %d completions got no reward (NaN or None) and are skipped; per reward function: %s",
            int(skipped.sum()), total, ", ".join(f"{name!r}: {n}" for name, n in zip(names, counts, strict=True)),
        )  # fmt: skip
    scores = (rewards_per_func * weights.to(rewards_per_func.device)).sum(dim=1)
    overflow = torch.isinf(scores)
    if overflow.any():
        row = overflow.nonzero()[0].item()
        raise ValueError(
            f"The weighted sum of the rewards of completion {row} overflows to {scores[row].item()} "
            f"(rewards {rewards_per_func[row].tolist()}, weights {weights.tolist()}); scale the rewards to order 1."
        )


def _is_scalar_reward(reward) -> bool:
    """None, a real number (Python or numpy), a 0-d numpy array or a one-element torch tensor."""
    if reward is None or isinstance(reward, numbers.Real):
        return True
    if torch.is_tensor(reward):
        return reward.numel() == 1 and not reward.is_complex()
    numpy_kind = getattr(getattr(reward, "dtype", None), "kind", None)  # bool, signed, unsigned, float
    return getattr(reward, "ndim", None) == 0 and numpy_kind in ("b", "i", "u", "f")
