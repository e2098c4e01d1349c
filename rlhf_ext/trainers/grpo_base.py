"""What PPO and online K-way share on TRL's GRPOTrainer: `SharedBaseGRPOTrainer`, their common base.

Both sample completions with GRPOTrainer and then replace its group-relative advantages: PPO with a critic and GAE,
online K-way with a Plackett-Luce ranking of each group. What they share is here, once:

    __init__                         a `SharedBase` as the model (its reward role as the default reward, its
                                     reference role), a policy path loaded with TRL's `create_model_from_path`, the
                                     reward functions checked (and a reward model the K-way trainer saved scored as
                                     it was trained), the tokenizer's EOS, the vLLM weight sync of a shared base
    _calculate_rewards               keeps the raw rewards of the generation batch (refusing inf or all-missing)
    _global_scores, _local_scores    the weighted reward sums, all processes' and this process's slice
    _reference_logprobs              the reference: a ref model, the shared base's reference role, or adapters off
    _get_per_token_logps_and_entropies  with `shared_prompt` on, each prompt computed once for the rows holding it
    _prompt_lengths                  prompts tokenized as generation tokenizes them, for the up-front checks
    _get_train_sampler               each epoch's shuffle seeded by the epoch (exact resume)
    _saving_only_the_policy_adapter  a shared base's checkpoint holds the policy adapter, not the frozen reward

The reward functions' and prompts' checks are module functions here, so their errors are the same in both trainers.
"""

from __future__ import annotations

import copy
import functools
import logging
import numbers
import os
from collections.abc import Callable, Mapping
from contextlib import contextmanager, nullcontext

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset
from torch import nn
from transformers import PreTrainedModel
from trl import GRPOTrainer
from trl.data_utils import apply_chat_template, is_conversational
from trl.trainer.utils import add_fused_lm_head, create_model_from_path, is_async_callable

from ..data.ranked import role_problem
from ..distributed import check_engine_supports
from ..models import SharedBase
from ..models.fingerprint import write_base_fingerprint
from ..models.role_checks import check_trainer_reward_models
from ..models.scoring import reads_last_real_token, right_padded, sequence_classifier_scores
from ..models.shared_prompt import (
    SharedPromptBatch,
    attention_span,
    grouped_inputs,
    prompt_prefix_rows,
    shared_completion_outputs,
    shared_prompt_blocker,
    shared_sequence_scores,
)
from .fault_tolerance import FaultTolerantMixin
from .position_limits import max_positions
from .sampling import epoch_seeded
from .shared_generation import SharedPrefillGenerationMixin
from .shared_prompt import SharedPromptSwitch
from .vllm_sync import SharedBaseVLLMGeneration

logger = logging.getLogger(__name__)

POLICY_ADAPTER = "policy"
# Prompts tokenized per call by the up-front length check: large enough to amortise the tokenizer call, small
# enough that a huge dataset never sits in memory as token ids.
PROMPT_CHECK_BATCH = 1024


class SharedBaseGRPOTrainer(FaultTolerantMixin, SharedPrefillGenerationMixin, GRPOTrainer):
    """The base of `PPOTrainer` and `OnlinePlackettLuceTrainer` (see the module docstring); not used on its own.

    `model` is a `SharedBase`, or the policy as GRPOTrainer takes it (id or path, `PreTrainedModel`, `PeftModel`);
    without adapters, the reference is a frozen copy of the policy taken before training.
    """

    _shared_forwards: list | None = None  # set by `_recording_shared_forwards`

    def __init__(
        self,
        model: str | PreTrainedModel | nn.Module,
        reward_funcs: Callable | nn.Module | str | list | None,
        args,
        *,
        ref_model: PreTrainedModel | None = None,
        processing_class=None,
        peft_config=None,
        **grpo_kwargs,
    ):
        check_trainer_reward_models(reward_funcs, args)  # before TRL loads a path as a sequence classifier
        self.shared_base = model if isinstance(model, SharedBase) else None
        if self.shared_base is not None:
            if reward_funcs is None and "reward" in self.shared_base.heads:
                reward_funcs = SharedBaseReward(self.shared_base, processing_class, args.chat_template_kwargs)
            model = self.shared_base.peft_model
        if reward_funcs is None:
            raise ValueError(f"{type(self).__name__} needs `reward_funcs`, or a SharedBase with a reward role.")
        if isinstance(model, str):
            model = load_policy(model, args)
        if ref_model is None and not (is_peft_model(model) or peft_config is not None):
            # A full fine-tune moves every weight, so the reference must be a copy taken before training.
            ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        # each group's prompt computed once (`_get_per_token_logps_and_entropies`); off without a word where every
        # prompt has one completion (PPO's default num_generations=1): nothing to share
        one_each = args.num_generations == 1 and (args.num_generations_eval or args.num_generations) == 1
        self._shared_prompt = SharedPromptSwitch(False if one_each else args.shared_prompt, scores=False)
        super().__init__(
            model=model, reward_funcs=reward_funcs, args=args, processing_class=processing_class,
            peft_config=peft_config, **grpo_kwargs,
        )  # fmt: skip
        if self.shared_base is not None:
            # GRPOTrainer casts the trainable adapters of any quantized base to bfloat16; the shared base keeps them
            # in its compute dtype (float32 when asked for).
            self.shared_base.match_adapter_dtype()
            if self.use_vllm:
                # GRPOTrainer.__init__ built a plain VLLMGeneration; only its weight sync must change (see the class,
                # which adds no state, so re-classing the instance keeps everything TRL set up).
                self.vllm_generation.__class__ = SharedBaseVLLMGeneration
        self.ppo_ref_model = self._prepare_reference(ref_model)
        # Bad input found now, before the first step, rather than steps into the run with nothing saved.
        check_engine_supports(model, self.accelerator, type(self).__name__, shared_base=self.shared_base is not None)
        self._last_rewards_per_func = None
        self.reward_funcs = [
            checked_reward_function(scored_as_trained(func, tokenizer, self.chat_template_kwargs, self._shared_prompt),
                                    name)
            for func, tokenizer, name in zip(
                self.reward_funcs, self.reward_processing_classes, self.reward_func_names, strict=True
            )
        ]
        check_eos_token(self.processing_class)
        self._shared_prompt.decide(self)  # on or off for the policy and the reference, with its one log line

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        # Extends GRPOTrainer._calculate_rewards: keep the gathered [N_global, n_funcs] rewards, which super() turns
        # into group-relative advantages and then drops; PPO's GAE and online K-way's ranking need the raw weighted
        # reward of every completion.
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        check_reward_batch(rewards_per_func, self.reward_func_names, self.reward_weights)  # no inf, not all missing
        self._last_rewards_per_func = rewards_per_func
        return rewards_per_func

    def _prepare_reference(self, ref_model):
        if ref_model is None:
            return None
        add_fused_lm_head(ref_model, temperature=self.temperature, cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32)
        return self.accelerator.prepare_model(ref_model, evaluation_mode=True)

    def _get_train_sampler(self, dataset=None):
        # Extends GRPOTrainer._get_train_sampler: the same RepeatSampler, with each epoch's shuffle seeded by the
        # epoch, so a run resumed after its first epoch sees the prompts an uninterrupted run sees.
        return epoch_seeded(super()._get_train_sampler(dataset))

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

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        # Extends GRPOTrainer._get_per_token_logps_and_entropies, through which every forward of the sampled tokens
        # goes (the loss's, the reference's in `_reference_logprobs`, GRPO's old log-probs): with `shared_prompt` on,
        # the rows that hold one prompt (a GRPO group of num_generations, or those a shuffled PPO micro-batch holds)
        # run as one row [prompt | completion 1 | ... | completion G] (rlhf_ext/models/shared_prompt.py), computing
        # the prompt once; the log-probs and entropies [N, logits_to_keep] are what TRL's forward gives. A call it
        # cannot take (images, the router loss, rows that are not left-padded prompts then completions), a call with
        # no two rows of one prompt, and every call with `shared_prompt` off are TRL's own.
        grouped = self._shared_prompt_groups(input_ids, attention_mask, logits_to_keep, compute_aux_loss, multimodal)
        if grouped is None:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **multimodal,
            )  # fmt: skip
        logps, entropies = [], []
        for chunk in grouped.chunks(batch_size):  # TRL's chunks of batch_size rows, in whole lists
            batch = self._shared_prompt.build(chunk, self)
            with self.accelerator.autocast():  # as TRL's forward
                outputs = shared_completion_outputs(model, batch, chunk, logits_to_keep)
            if self._shared_forwards is not None:
                self._shared_forwards.append((batch, chunk))
            logps.append(outputs.log_probs)
            if compute_entropy:
                entropies.append(outputs.entropy)
        if self._shared_forwards is not None:
            self._shared_forwards.append(grouped)
        entropy = grouped.ungroup(torch.cat(entropies)) if compute_entropy else None
        return grouped.ungroup(torch.cat(logps)), entropy, None

    @contextmanager
    def _recording_shared_forwards(self):
        """Within the block, each shared forward of `_get_per_token_logps_and_entropies` appends (SharedPromptBatch,
        chunk) per chunk and then its GroupedRows to the yielded list (empty when the forward ran unshared): PPO's
        policy_trunk values read the hidden states of those rows."""
        self._shared_forwards = []
        try:
            yield self._shared_forwards
        finally:
            self._shared_forwards = None

    def _shared_prompt_groups(self, input_ids, attention_mask, logits_to_keep, compute_aux_loss, multimodal):
        """The rows of a `_get_per_token_logps_and_entropies` call as GroupedRows when they run shared, else None (the
        switch off; no two rows of one prompt; or rows it cannot take: one log line, or a ValueError for True)."""
        if not self._shared_prompt.decide(self) or compute_aux_loss:  # (the router loss turns the switch off)
            return None
        carried = [name for name, value in multimodal.items() if value is not None]
        if carried:
            grouped, problem = None, f"its sequences carry {', '.join(carried)}, which the shared rows do not lay out"
        else:
            grouped, problem = grouped_inputs(input_ids, attention_mask, logits_to_keep)
            if grouped is None and problem is None:  # every prompt once (PPO's default of one completion each)
                return None
        return grouped if self._shared_prompt.check(grouped and grouped.inputs, self, problem) else None

    def _global_scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[N_global] weighted reward sums of the generation batch (all processes), and whether any function scored
        each completion: TRL's sum over the functions that scored it (None / NaN terms left out, `nansum`)."""
        rewards_per_func = self._last_rewards_per_func
        weights = self.reward_weights.to(rewards_per_func.device)
        scored = ~torch.isnan(rewards_per_func).all(dim=1)
        return (rewards_per_func * weights).nansum(dim=1), scored

    def _local_scores(self, batch_size: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's [B] weighted reward sums and a [B] bool marking the completions with a finite score.

        A completion no reward function scored (all NaN or None) is skipped (its tokens leave the loss) and counted
        in `objective/skipped_completions`; one that some functions scored gets their weighted sum, as in TRL.
        """
        scores_global, scored_global = self._global_scores()
        self._metrics[mode]["objective/skipped_completions"].append((~scored_global).sum().item())
        start = self.accelerator.process_index * batch_size
        local = slice(start, start + batch_size)
        return scores_global[local].nan_to_num(0.0), scored_global[local]

    @contextmanager
    def _saving_only_the_policy_adapter(self, output_dir: str):
        """While active, the shared base's peft model saves only the policy adapter (in `<output_dir>/policy`);
        then the base's fingerprint is written beside it, so a checkpoint's policy loads with the base check that a
        role folder gets (`rlhf_ext.models.fingerprint`).

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
        if self.args.should_save:
            policy_folder = os.path.join(output_dir, POLICY_ADAPTER)
            write_base_fingerprint(peft_model, policy_folder, self.shared_base.base_model_name_or_path)

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

    def _position_limit(self) -> int | None:
        """The policy's max_position_embeddings (None if its config sets none)."""
        return max_positions(self.accelerator.unwrap_model(self.model).config)


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


def tokenized_for_scoring(
    texts: list[str], tokenizer, device, conversational: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of `texts`, tokenized as the K-way reward trainer tokenized its sequences (TRL's
    `_tokenize`): plain text with the tokenizer's special tokens (the BOS of Llama or Mistral), chat-template text
    without (the template already wrote them). Right-padded by hand: a tokenizer without a pad token (GPT-2,
    Llama 3) cannot pad, and the padding id does not matter since scores are read by the mask."""
    sequences = tokenizer(text=texts, add_special_tokens=not conversational)["input_ids"]
    input_ids, attention_mask = right_padded(sequences, tokenizer.pad_token_id)
    return input_ids.to(device), attention_mask.to(device)


class SharedBaseReward:
    """The reward role of a `SharedBase` as a TRL reward function: the score of prompt + completion text [N].

    Like TRL's reward-model path, the text is re-tokenized (with the chat template for conversations); it is scored
    at its last real token (`rlhf_ext.models.scoring`), the token the K-way reward trainer trains at. A plain-text
    completion gets the EOS token appended, as the reward trainer's tokenization appended it. With the trainer's
    `shared_prompt` switch on (`prompt_switch`), the completions of one prompt are scored in one shared row
    (`scores_with_shared_prompts`).
    """

    __name__ = "reward_role"

    def __init__(self, shared: SharedBase, tokenizer, chat_template_kwargs: dict | None = None):
        self.shared = shared
        self.tokenizer = tokenizer
        self.chat_template_kwargs = chat_template_kwargs or {}
        self.prompt_switch: SharedPromptSwitch | None = None  # the trainer's, set by `scored_as_trained`

    def __call__(self, prompts: list, completions: list, **kwargs) -> list[float]:
        texts = reward_texts(prompts, completions, self.tokenizer, self.chat_template_kwargs)
        conversational = is_conversational({"prompt": prompts[0]})
        input_ids, attention_mask = tokenized_for_scoring(texts, self.tokenizer, self.shared.device, conversational)
        shared = scores_with_shared_prompts(self.prompt_switch, self.shared.peft_model, input_ids, attention_mask,
                                            prompts, self.shared.shared_reward_scores)
        return (shared if shared is not None else self.shared.reward_scores(input_ids, attention_mask)).tolist()


class TrainedRewardModel:
    """A full sequence-classification reward model saved by the K-way reward trainer, as a TRL reward function.

    TRL would score it by transformers' pad-based pooling on prompt + completion without the EOS; this scores it as
    it was trained: the text of `reward_texts`, read at its last real token; with the trainer's `shared_prompt` on,
    the completions of one prompt in one shared row where the model can (`scores_with_shared_prompts`).
    """

    def __init__(self, model: nn.Module, tokenizer, chat_template_kwargs: dict | None = None,
                 prompt_switch: SharedPromptSwitch | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.chat_template_kwargs = chat_template_kwargs or {}
        self.__name__ = getattr(getattr(model, "config", None), "_name_or_path", "") or "reward_model"
        # this model is not the policy the switch checked: its own check, once (None when it can share)
        self.prompt_switch = prompt_switch
        self._blocker = None if prompt_switch is None else shared_prompt_blocker(model, max_length=None, scores=True)

    @torch.inference_mode()
    def __call__(self, prompts: list, completions: list, **kwargs) -> list[float]:
        texts = reward_texts(prompts, completions, self.tokenizer, self.chat_template_kwargs)
        device = next(self.model.parameters()).device
        conversational = is_conversational({"prompt": prompts[0]})
        input_ids, attention_mask = tokenized_for_scoring(texts, self.tokenizer, device, conversational)
        switch = self.prompt_switch if self._blocker is None else None
        shared = scores_with_shared_prompts(switch, self.model, input_ids, attention_mask, prompts,
                                            lambda batch: shared_sequence_scores(self.model, batch)[:, 0])
        if shared is None:
            shared = sequence_classifier_scores(self.model, input_ids, attention_mask)[:, 0]
        return shared.float().tolist()


def scores_with_shared_prompts(switch: SharedPromptSwitch | None, model: nn.Module, input_ids: torch.Tensor,
                               attention_mask: torch.Tensor, prompts: list, score) -> torch.Tensor | None:
    """Reward scores [N] of right-padded prompt + completion sequences, the rows of one prompt run as one shared row
    (`rlhf_ext.models.shared_prompt.prompt_prefix_rows`) and scored by `score(SharedPromptBatch)`; None when the
    switch is absent or off, or no prompt has two completions (the caller scores the rows as they are)."""
    if switch is None or not switch.active:
        return None
    grouped = prompt_prefix_rows(input_ids, attention_mask, prompts)
    if grouped is None:
        return None
    span = attention_span(model)
    batch = SharedPromptBatch.from_inputs(grouped.inputs, pack=span if span is not None else False)
    return grouped.ungroup(score(batch))


def scored_as_trained(func, tokenizer, chat_template_kwargs: dict | None,
                      prompt_switch: SharedPromptSwitch | None = None):
    """`func`, or a `TrainedRewardModel` around it when it is a reward model the K-way reward trainer saved; a
    shared base's reward role and such a model get the trainer's `shared_prompt` switch.

    A reward model from elsewhere is left to TRL, which scores it as TRL's GRPOTrainer does.
    """
    if isinstance(func, SharedBaseReward):
        func.prompt_switch = prompt_switch
    if isinstance(func, nn.Module) and reads_last_real_token(func):
        return TrainedRewardModel(func, tokenizer, chat_template_kwargs, prompt_switch)
    return func


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


def check_enough_prompts(dataset, args) -> None:
    """ValueError when the train set holds fewer prompts than one generation batch needs.

    GRPOTrainer's RepeatSampler yields only whole batches of generation_batch_size / num_generations prompts, so a
    smaller set gives no batch at all: training ran 0 steps, and a recipe saved the untrained policy as if trained.
    A streamed set (no length) is not checked. Called by the subclasses after their prompt checks, which name a bad
    record and may drop over-long prompts.
    """
    if dataset is None or not hasattr(dataset, "__len__"):
        return
    needed = args.generation_batch_size // args.num_generations
    if len(dataset) < needed:
        raise ValueError(
            f"The train dataset has {len(dataset)} prompt(s), fewer than one generation batch needs ({needed} = "
            f"generation_batch_size {args.generation_batch_size} / num_generations {args.num_generations}), so "
            "training would run 0 steps. Add prompts, or lower per_device_train_batch_size or steps_per_generation."
        )


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
    """Refuse rewards that would make training silently stop learning; warn when completions or functions go unscored.

    `rewards_per_func` [N, F] is the generation batch of all processes (TRL turns None into NaN), so every process
    raises alike. A completion's score is TRL's: the weighted sum over the functions that scored it, sum_f w_f r_f
    with None / NaN terms left out (a function returns None where it does not apply, e.g. a math checker on a code
    prompt). A completion no function scored is skipped (its tokens leave the loss). But
    - +-inf is refused: skipped like NaN it would never push the policy away from a "forbidden" completion, and kept
      it would make the returns, advantages and value loss inf or NaN; a large finite penalty does what was meant;
    - a batch where no completion has a reward is refused: every step would be a no-op and the run would "succeed";
    - a weighted sum that overflows to +-inf is refused for the same reason as an inf reward;
    - a function that scored none of the batch's completions is named in a warning: the others' rewards are then
      used alone, which is TRL's rule for a function that does not apply, and a judge or API that fails looks alike.
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
    unscored, total = missing.all(dim=1), len(rewards_per_func)
    counts = ", ".join(f"{name!r}: {n} of {total}" for name, n in zip(names, missing.sum(dim=0).tolist(), strict=True))
    if unscored.all():
        raise ValueError(
            f"none of the {total} completions of this generation batch got a reward (NaN or None from every reward "
            f"function; completions without a reward, per function: {counts}). Every step would be a no-op. Check "
            "the reward functions (an API that fails, a parser that never matches)."
        )
    if unscored.any():
        logger.warning(
            "%d of %d completions got no reward from any function (NaN or None) and are skipped; without a reward, "
            "per function: %s", int(unscored.sum()), total, counts,
        )  # fmt: skip
    silent = [name for name, none in zip(names, missing.all(dim=0).tolist(), strict=True) if none]
    if silent:
        logger.warning(
            "reward function(s) %s scored none of the %d completions of this generation batch (all None or NaN): "
            "the other functions' rewards are used alone. Expected if they do not apply to these prompts; if they "
            "should always score (a judge, an API), they are failing.", ", ".join(map(repr, silent)), total,
        )  # fmt: skip
    scores = (rewards_per_func * weights.to(rewards_per_func.device)).nansum(dim=1)
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
