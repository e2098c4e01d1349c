"""Every option our configs inherit from TRL's GRPOConfig, DPOConfig or RewardConfig acts, or is refused when set
(issue 21 item 7): an option that is silently never read lets a run train without what it asked for.

The walk covers every field TRL's config declares beyond transformers' TrainingArguments (whose fields act through
Trainer's training loop, which none of our trainers replaces: the last test). A field passes when it is

- listed below as acting, with where: a method or function whose source reads it, on a code path our trainer keeps
  (our own code, or a TRL method our trainer does not replace, or replaces with an override that calls super()), or
- refused: set to a value other than its default, the config raises a ValueError naming it.
"""

import dataclasses
import inspect

import pytest
from transformers import Trainer, TrainingArguments
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, RewardConfig, RewardTrainer
from trl.trainer.callbacks import SyncRefModelCallback

from rlhf_ext.trainers import (
    PlackettLuceDPOConfig,
    PlackettLuceDPOTrainer,
    PlackettLuceRewardConfig,
    PlackettLuceRewardTrainer,
    grpo_base,
)
from rlhf_ext.trainers.kway import common as kway_common
from rlhf_ext.trainers.kway.online import OnlinePlackettLuceConfig, OnlinePlackettLuceTrainer
from rlhf_ext.trainers.ppo.config import PPOConfig
from rlhf_ext.trainers.ppo.trainer import PPOTrainer

# Where an acting field is read, as "Owner.method" (a trainer or config class) or "module.function".
OWNERS = {
    cls.__name__: cls
    for cls in (GRPOTrainer, GRPOConfig, DPOTrainer, RewardTrainer, SyncRefModelCallback, PPOTrainer,
                OnlinePlackettLuceTrainer, PlackettLuceDPOTrainer, PlackettLuceRewardTrainer)
}  # fmt: skip
OWNERS.update(grpo_base=grpo_base, kway_common=kway_common)

# GRPOConfig fields that act in both PPOTrainer and OnlinePlackettLuceTrainer, with where.
GRPO_ACTS = {
    # loading and preparing the policy
    "model_init_kwargs": "grpo_base.load_policy",
    "trust_remote_code": "grpo_base.load_policy",
    "disable_dropout": "GRPOTrainer.__init__",
    "cast_lm_head_to_fp32": "GRPOTrainer.__init__",  # the fused LM head, policy and (ours) reference
    # the MoE router loss, added by our losses (issue 21 item 2)
    "router_aux_loss_coef": "grpo_base.with_router_aux_loss",
    # sampling: how many, how batched, how generated
    "num_generations": "GRPOTrainer._get_train_sampler",
    "num_generations_eval": "GRPOTrainer._get_eval_sampler",
    "shuffle_dataset": "GRPOTrainer._get_train_sampler",
    "generation_batch_size": "GRPOTrainer.get_train_dataloader",
    "steps_per_generation": "GRPOTrainer._prepare_inputs",
    "max_completion_length": "GRPOTrainer.__init__",
    "temperature": "GRPOTrainer.__init__",
    "top_p": "GRPOTrainer.__init__",
    "top_k": "GRPOTrainer.__init__",
    "min_p": "GRPOTrainer.__init__",
    "repetition_penalty": "GRPOTrainer.__init__",
    "cache_implementation": "GRPOTrainer.__init__",
    "generation_kwargs": "GRPOTrainer._generate_single_turn",
    "ds3_gather_for_generation": "GRPOTrainer._generate_single_turn",
    "use_transformers_continuous_batching": "GRPOTrainer._generate_single_turn",
    "transformers_continuous_batching_config": "GRPOTrainer.__init__",
    "use_transformers_paged": "GRPOConfig.__post_init__",  # deprecated alias of use_transformers_continuous_batching
    "pad_to_multiple_of": "GRPOTrainer._generate_and_score_completions",
    "chat_template_kwargs": "GRPOTrainer._tokenize_prompts",
    # vLLM generation (the importance-sampling correction is refused: our losses do not apply it)
    "use_vllm": "GRPOTrainer.__init__",
    "vllm_mode": "GRPOTrainer.__init__",
    "vllm_model_impl": "GRPOTrainer.__init__",
    "vllm_enable_sleep_mode": "GRPOTrainer.__init__",
    "vllm_structured_outputs_regex": "GRPOTrainer.__init__",
    "vllm_server_base_url": "GRPOTrainer.__init__",
    "vllm_server_host": "GRPOTrainer.__init__",
    "vllm_server_port": "GRPOTrainer.__init__",
    "vllm_server_timeout": "GRPOTrainer.__init__",
    "vllm_group_port": "GRPOTrainer.__init__",
    "vllm_gpu_memory_utilization": "GRPOTrainer.__init__",
    "vllm_max_model_length": "GRPOTrainer.__init__",
    "vllm_tensor_parallel_size": "GRPOTrainer.__init__",
    # multi-turn: both trainers take tools (issue 21 item 5)
    "max_tool_calling_iterations": "GRPOTrainer.__init__",
    # rewards: our score is the reward_weights-weighted sum
    "reward_weights": "PPOTrainer._global_scores",
    # logging
    "log_completions": "GRPOTrainer.log",
    "num_completions_to_print": "GRPOTrainer.log",
    "log_unique_prompts": "GRPOTrainer.log",
    "log_completions_hub_repo": "GRPOTrainer.__init__",
    "log_multimodal": "GRPOTrainer._generate_and_score_completions",
}
PPO_ACTS = {**GRPO_ACTS, "reward_weights": "PPOTrainer._global_scores"}
ONLINE_ACTS = {
    **GRPO_ACTS,
    "reward_weights": "OnlinePlackettLuceTrainer._global_scores",  # PPOTrainer's, borrowed
    "num_iterations": "GRPOTrainer._prepare_inputs",  # reuses each generation batch (no importance weights)
}
DPO_ACTS = {
    "model_init_kwargs": "DPOTrainer.__init__",
    "trust_remote_code": "DPOTrainer.__init__",
    "disable_dropout": "DPOTrainer.__init__",
    "activation_offloading": "DPOTrainer.__init__",  # its context wraps DPOTrainer.training_step, kept
    "router_aux_loss_coef": "DPOTrainer.__init__",  # the coefficient PlackettLuceDPOTrainer._compute_loss adds
    "beta": "PlackettLuceDPOTrainer._compute_loss",
    "max_length": "kway_common.prepare_ranked_for_trainer",
    "dataset_num_proc": "kway_common.prepare_ranked_for_trainer",
    "pad_to_multiple_of": "kway_common.ranked_trainer_setup",  # the K-way collator
    "precompute_ref_log_probs": "DPOTrainer.__init__",  # then our _precompute_ref_logps
    "precompute_ref_batch_size": "DPOTrainer.__init__",
    "sync_ref_model": "DPOTrainer.__init__",  # adds SyncRefModelCallback
    "ref_model_mixup_alpha": "SyncRefModelCallback.on_step_end",
    "ref_model_sync_steps": "SyncRefModelCallback.on_step_end",
}
REWARD_ACTS = {
    "model_init_kwargs": "RewardTrainer.__init__",
    "trust_remote_code": "RewardTrainer.__init__",
    "disable_dropout": "RewardTrainer.__init__",
    "activation_offloading": "RewardTrainer.__init__",  # its context wraps RewardTrainer.training_step, kept
    "chat_template_path": "RewardTrainer.__init__",  # before it prepares the datasets with our _prepare_dataset
    "eos_token": "RewardTrainer.__init__",  # idem: the EOS appended to plain-text completions
    "center_rewards_coefficient": "PlackettLuceRewardTrainer.compute_loss",
    "max_length": "kway_common.prepare_ranked_for_trainer",
    "dataset_num_proc": "kway_common.prepare_ranked_for_trainer",
    "pad_to_multiple_of": "kway_common.ranked_trainer_setup",
}
CASES = [
    # (our config, TRL's config, our trainer, TRL's trainer, the fields that act)
    (PPOConfig, GRPOConfig, PPOTrainer, GRPOTrainer, PPO_ACTS),
    (OnlinePlackettLuceConfig, GRPOConfig, OnlinePlackettLuceTrainer, GRPOTrainer, ONLINE_ACTS),
    (PlackettLuceDPOConfig, DPOConfig, PlackettLuceDPOTrainer, DPOTrainer, DPO_ACTS),
    (PlackettLuceRewardConfig, RewardConfig, PlackettLuceRewardTrainer, RewardTrainer, REWARD_ACTS),
]
IDS = [case[0].__name__ for case in CASES]
# Values the generic rule (`non_default`) cannot guess: another of the field's choices.
OTHER_VALUES = {
    "loss_type": "grpo",
    "importance_sampling_level": "sequence",
    "scale_rewards": "batch",
    "multi_objective_aggregation": "normalize_then_sum",
    "vllm_importance_sampling_mode": "token_truncate",
    "truncation_mode": "keep_end",
    "f_divergence_type": "js_divergence",
    "pad_token": "</s>",
    "loss_weights": [1.0],
}
RUN = dict(use_cpu=True, bf16=False, report_to=[])


def trl_fields(trl_config) -> list[dataclasses.Field]:
    """The fields TRL's config declares beyond TrainingArguments."""
    own = {f.name for f in dataclasses.fields(TrainingArguments)}
    return [f for f in dataclasses.fields(trl_config) if f.name not in own]


def default_of(config, name: str):
    field = config.__dataclass_fields__[name]
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


def non_default(config, field: dataclasses.Field):
    """A value of the field's type other than our config's default."""
    default = default_of(config, field.name)
    if field.name in OTHER_VALUES:
        value = OTHER_VALUES[field.name]
        return [value] if isinstance(default, list) and not isinstance(value, list) else value
    kind = str(field.type)
    if isinstance(default, bool) or kind.startswith("bool"):
        return not default
    if "int" in kind and "float" not in kind:
        return (default or 1) + 1
    if "float" in kind:
        return 0.5 if default in (None, 0.0) else default * 0.5
    raise AssertionError(f"no non-default value for {field.name} ({kind}); add one to OTHER_VALUES")


def resolve(where: str):
    owner, _, name = where.partition(".")
    return OWNERS[owner], getattr(OWNERS[owner], name)


@pytest.mark.parametrize("ours, trl_config, trainer, trl_trainer, acts", CASES, ids=IDS)
def test_every_inherited_option_acts_or_is_refused(tmp_path, ours, trl_config, trainer, trl_trainer, acts):
    silent = []
    for field in trl_fields(trl_config):
        if field.name in acts:
            continue
        value = non_default(ours, field)
        try:
            ours(output_dir=str(tmp_path), **RUN, **{field.name: value})
        except ValueError as error:
            if field.name in str(error):
                continue
            silent.append(f"{field.name}={value!r}: refused, but the message does not name it ({error})")
        else:
            silent.append(f"{field.name}={value!r}")
    assert not silent, f"{ours.__name__} accepts, and never reads, these {trl_config.__name__} options: {silent}"


@pytest.mark.parametrize("ours, trl_config, trainer, trl_trainer, acts", CASES, ids=IDS)
def test_each_acting_option_is_read_where_the_list_says_on_a_path_we_keep(ours, trl_config, trainer, trl_trainer,
                                                                          acts):
    names = {f.name for f in trl_fields(trl_config)}
    assert set(acts) <= names, f"not {trl_config.__name__} fields: {set(acts) - names}"
    for name, where in acts.items():
        owner, function = resolve(where)
        assert name in inspect.getsource(function), f"{where} does not read {name}"
        method = where.partition(".")[2]
        if owner in (trl_trainer, trl_config):  # TRL's code: our class must keep it, or extend it through super()
            mine = getattr(trainer if owner is trl_trainer else ours, method)
            kept = mine is function or "super()." in inspect.getsource(mine)
            assert kept, f"{trainer.__name__} replaces {where}, which is where {name} acts"


@pytest.mark.parametrize("ours, trl_config, trainer, trl_trainer, acts", CASES, ids=IDS)
def test_refused_options_left_at_their_defaults_build(tmp_path, ours, trl_config, trainer, trl_trainer, acts):
    ours(output_dir=str(tmp_path), **RUN)


@pytest.mark.parametrize("trainer", [case[2] for case in CASES], ids=[case[2].__name__ for case in CASES])
def test_trainingarguments_act_through_trainers_own_loop(trainer):
    """TrainingArguments' fields (optimizer, schedule, batch sizes, saving, logging...) are read by Trainer's loop."""
    assert trainer._inner_training_loop is Trainer._inner_training_loop
    assert "super().train(" in inspect.getsource(trainer.train) or trainer.train is Trainer.train
