"""Configuration for `PPOTrainer`: TRL's `GRPOConfig` plus the PPO-with-critic knobs of TRL's last PPOConfig.

Every field has a help string, so `TrlParser` gives `--help`, YAML configs and CLI overrides for free.
The GRPO fields that PPO reinterprets:

- `num_ppo_epochs` sets GRPO's `num_iterations` (passes over each generation batch, seed section 4 step 6);
- `steps_per_generation` is the number of minibatches each generation batch is split into;
- `cliprange` sets GRPO's `epsilon`;
- `beta` must stay 0: PPO puts the KL penalty into the per-token reward (seed section 4), not into the loss;
- `num_generations` may be 1, because the baseline is the critic, not the mean of a group of completions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from trl import GRPOConfig

from ...ops.ppo_loss import AGGREGATIONS as LOSS_AGGREGATIONS
from ...ops.rewards import KL_ESTIMATORS
from ..checkpointing_name import ActivationCheckpointingByDefault
from ..config_checks import (
    COMMON_RULES,
    COUNT,
    NON_NEGATIVE,
    NON_NEGATIVE_COUNT,
    OPEN_CLOSED_UNIT,
    POSITIVE,
    UNIT_INTERVAL,
    check_fields,
    check_finite_weights,
    refuse_unused_options,
    warn_if_warmup_outlasts_run,
)
from ..hub_token import NoStoredHubToken

ADVANTAGE_ESTIMATORS = ("gae", "reinforce")
LONG_PROMPT_POLICIES = ("error", "drop")
VALUE_HEAD_INITS = ("zero", "first_rollout_mean")
logger = logging.getLogger(__name__)

# The numeric fields PPO reads, and what each may hold (`config_checks`).
PPO_RULES = {
    **COMMON_RULES,
    "kl_coef": NON_NEGATIVE,
    "kl_target": POSITIVE.or_none(),
    "kl_horizon": POSITIVE,
    "cliprange": POSITIVE,
    "cliprange_value": POSITIVE.or_none(),
    "vf_coef": NON_NEGATIVE,
    "ent_coef": NON_NEGATIVE,
    "gamma": UNIT_INTERVAL,
    "lam": UNIT_INTERVAL,
    "missing_eos_penalty": NON_NEGATIVE.or_none(),
    "num_ppo_epochs": COUNT,
    "value_warmup_steps": NON_NEGATIVE_COUNT,
    "value_learning_rate": NON_NEGATIVE.or_none(),
    "max_prompt_length": COUNT.or_none(),
    "max_completion_length": COUNT.or_none(),
    "temperature": POSITIVE,
    "top_p": OPEN_CLOSED_UNIT,
}
PPO_RULES_WHY = {
    "kl_coef": "A negative coefficient rewards moving away from the reference policy; 0 turns the penalty off.",
    "kl_target": "The controller moves kl_coef towards this KL per completion; 0 or less has no meaning. None keeps "
    "kl_coef fixed.",
    "cliprange": "The policy ratio is clipped to [1 - cliprange, 1 + cliprange]; 0 or less would stop every update.",
    "cliprange_value": "V is kept within old V +- cliprange_value; 0 or less would freeze the critic. None turns "
    "value clipping off.",
    "vf_coef": "A negative weight makes the critic maximise its error; 0 leaves the critic untrained.",
    "ent_coef": "The entropy bonus is subtracted from the loss; a negative value would reward collapsing onto single "
    "tokens. 0 turns it off.",
    "gamma": "A discount factor outside [0, 1] makes returns grow or flip sign with the completion length.",
    "lam": "GAE's lambda interpolates between TD (0) and Monte-Carlo (1) advantages; outside [0, 1] it has no meaning.",
    "missing_eos_penalty": "It is subtracted from the score of truncated completions; a negative value would reward "
    "truncation. None turns it off.",
    "temperature": "Log-probs are computed from logits / temperature.",
}
# GRPO options that PPO never reads, and what to set instead: a run that sets one would silently train without it, so
# a value other than the default is refused (`refuse_unused_options`). `beta`, `epsilon`, `num_iterations` and
# `mask_truncated_completions` are refused by their own checks below; tests/test_inherited_options.py lists where
# every other GRPOConfig option acts.
_PPO_CLIP = "PPO's loss is the clipped surrogate: set cliprange"
_PPO_ENTROPY = "PPO's entropy bonus is ent_coef, fixed"
_PPO_REFERENCE = "PPO's reference stays as it was at the start; the KL penalty is kl_coef"
_PPO_VLLM_IS = (
    "PPO's ratio is pi / pi_old with pi_old recomputed by the trainer, and the vLLM sampling correction is not applied"
)
GRPO_OPTIONS_PPO_IGNORES = {
    "entropy_coef": "set ent_coef (PPO's entropy bonus)",
    "use_adaptive_entropy": _PPO_ENTROPY,
    "entropy_coef_min": _PPO_ENTROPY,
    "entropy_coef_max": _PPO_ENTROPY,
    "entropy_coef_delta": _PPO_ENTROPY,
    "entropy_target": _PPO_ENTROPY,
    "top_entropy_quantile": "PPO's loss uses every completion token",
    "epsilon_high": "PPO clips symmetrically with cliprange",
    "delta": "PPO clips with cliprange only",
    "loss_type": "set loss_aggregation: 'token' or 'sequence'",
    "importance_sampling_level": "PPO's ratio is per token; " + _PPO_CLIP,
    "off_policy_mask_threshold": _PPO_CLIP,
    "sapo_temperature_neg": _PPO_CLIP,
    "sapo_temperature_pos": _PPO_CLIP,
    "vespo_k_pos": _PPO_CLIP,
    "vespo_lambda_pos": _PPO_CLIP,
    "vespo_k_neg": _PPO_CLIP,
    "vespo_lambda_neg": _PPO_CLIP,
    "scale_rewards": "PPO's advantages are GAE's: set whiten_advantages / whiten_rewards",
    "multi_objective_aggregation": "PPO's score is the reward_weights-weighted sum of the reward functions",
    "use_bias_correction_kl": "PPO's KL penalty is in the per-token reward: set kl_coef and kl_estimator",
    "sync_ref_model": _PPO_REFERENCE,
    "ref_model_mixup_alpha": _PPO_REFERENCE,
    "ref_model_sync_steps": _PPO_REFERENCE,
    "vllm_importance_sampling_correction": _PPO_VLLM_IS,
    "vllm_importance_sampling_mode": _PPO_VLLM_IS,
    "vllm_importance_sampling_clip_max": _PPO_VLLM_IS,
    "vllm_importance_sampling_clip_min": _PPO_VLLM_IS,
    "vllm_importance_sampling_cap": _PPO_VLLM_IS,
}


class _OneCompletionPerPrompt(int):
    """The integer 1 that passes `GRPOConfig`'s `num_generations >= 2` check.

    GRPO needs two or more completions per prompt because its baseline is the group mean; PPO's baseline is the
    value function, so one completion per prompt is sound. Every other use of the value (divisibility checks,
    arithmetic) sees a plain 1.
    """

    def __lt__(self, other):
        return False


@dataclass
class PPOConfig(NoStoredHubToken, ActivationCheckpointingByDefault, GRPOConfig):
    r"""Configuration for [`PPOTrainer`]: PPO with a learned critic, GAE and a per-token KL-penalised reward.

    Defaults follow TRL's last PPOConfig (trl 1.12): `learning_rate=3e-6`, `kl_coef=0.05`, `gamma=1`, `lam=0.95`,
    `cliprange=0.2`, `cliprange_value=0.2`, `vf_coef=0.1`, `num_ppo_epochs=4`.
    """

    _VALID_DICT_FIELDS = GRPOConfig._VALID_DICT_FIELDS

    learning_rate: float = field(
        default=3e-6,
        metadata={"help": "Initial AdamW learning rate for the policy and value parameters (TRL PPO default 3e-6)."},
    )
    num_generations: int | None = field(
        default=1,
        metadata={
            "help": "Completions sampled per prompt. PPO's baseline is the critic, so 1 is allowed (GRPO needs >= 2)."
        },
    )
    beta: float = field(
        default=0.0,
        metadata={
            "help": "GRPO's in-loss KL coefficient. Must be 0 for PPO: the KL penalty enters the per-token reward "
            "through `kl_coef` instead."
        },
    )
    disable_dropout: bool = field(
        default=True,
        metadata={
            "help": "Turn off dropout in the policy, reference and critic, so that log-probs and values at rollout "
            "time match those of the first update (TRL's PPO did the same)."
        },
    )
    vllm_importance_sampling_correction: bool = field(
        default=False,
        metadata={
            "help": "GRPO's correction for the vLLM / trainer sampling mismatch. Must stay False: PPO's ratio uses "
            "pi_old recomputed by the trainer, and its loss does not apply GRPO's correction."
        },
    )
    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata={
            "help": "DDP's search for parameters unused by the forward. Off for PPO: the critic runs outside the "
            "policy's DDP forward, so the search would mark its parameters unused and then see their gradients."
        },
    )
    num_ppo_epochs: int = field(
        default=4,
        metadata={"help": "Optimisation passes over each generation batch (theta_old stays fixed across them)."},
    )
    kl_coef: float = field(
        default=0.05,
        metadata={"help": "Coefficient of the per-token KL penalty against the reference in the reward."},
    )
    kl_target: float | None = field(
        default=None,
        metadata={
            "help": "Turn on the adaptive KL controller (Ziegler et al. 2019; `AdaptiveKLCallback`) with this target "
            "KL per completion, in nats: kl_coef then starts at `kl_coef` and follows the measured KL. None: a fixed "
            "kl_coef."
        },
    )
    kl_horizon: float = field(
        default=10000,
        metadata={"help": "Horizon of the adaptive KL controller, in completions (10000 in Ziegler et al.)."},
    )
    kl_estimator: str = field(
        default="k1",
        metadata={
            "help": "Per-token KL estimator for the reward penalty: 'k1' (log-ratio, unbiased), 'k2' (half squared "
            "log-ratio) or 'k3' (exp(-x)-1+x, unbiased and non-negative).",
            "choices": list(KL_ESTIMATORS),
        },
    )
    cliprange: float = field(
        default=0.2,
        metadata={"help": "Policy ratio clip epsilon: the ratio is clipped to [1 - cliprange, 1 + cliprange]."},
    )
    cliprange_value: float | None = field(
        default=0.2,
        metadata={"help": "Value clip: V is kept within old V +- cliprange_value in the value loss. None disables it."},
    )
    vf_coef: float = field(
        default=0.1,
        metadata={"help": "Weight of the value loss in the total loss (c1 in seed section 2.10)."},
    )
    ent_coef: float = field(
        default=0.0,
        metadata={"help": "Weight of the entropy bonus (c2 in seed section 2.10); a positive value raises entropy."},
    )
    gamma: float = field(
        default=1.0,
        metadata={"help": "Discount factor gamma of the per-token rewards."},
    )
    lam: float = field(
        default=0.95,
        metadata={"help": "GAE lambda: 0 gives one-step TD advantages, 1 gives Monte-Carlo returns minus V."},
    )
    advantage_estimator: str = field(
        default="gae",
        metadata={
            "help": "'gae' (critic + Generalized Advantage Estimation) or 'reinforce' (discounted reward-to-go with "
            "the critic's values as baseline).",
            "choices": list(ADVANTAGE_ESTIMATORS),
        },
    )
    whiten_rewards: bool = field(
        default=False,
        metadata={"help": "Whiten the per-token rewards (over the real tokens of the batch) before GAE."},
    )
    whiten_advantages: bool = field(
        default=True,
        metadata={"help": "Whiten the advantages (over the real tokens of the batch) after GAE, as TRL's PPO did."},
    )
    whiten_across_processes: bool = field(
        default=True,
        metadata={
            "help": "With several processes, whiten rewards and advantages with the statistics of the whole "
            "generation batch (all processes), so N processes compute what one would on the same batch. False: each "
            "process's own share, as TRL's PPO did."
        },
    )
    missing_eos_penalty: float | None = field(
        default=None,
        metadata={
            "help": "Subtracted from the score of completions that end without an EOS token (truncated). None: no "
            "penalty."
        },
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata={
            "help": "Longest prompt, in tokens, that the trainer accepts (see long_prompts for what happens to longer "
            "ones). None: the model's max_position_embeddings minus max_completion_length."
        },
    )
    long_prompts: str = field(
        default="error",
        metadata={
            "help": "What to do with prompts longer than max_prompt_length, found when the trainer is built (every "
            "prompt is tokenized as generation will tokenize it, chat template included): 'error' raises a "
            "ValueError naming the first such record; 'drop' removes them and logs how many.",
            "choices": list(LONG_PROMPT_POLICIES),
        },
    )
    loss_aggregation: str = field(
        default="token",
        metadata={
            "help": "'token': mean over every real token of the global batch (normalised by the global token count, so "
            "gradient accumulation and the number of processes leave the weighting unchanged); 'sequence': mean "
            "over each completion's tokens, then over completions.",
            "choices": list(LOSS_AGGREGATIONS),
        },
    )

    value_warmup_steps: int = field(
        default=0,
        metadata={
            "help": "Critic warm-up (VAPO's value pretraining, VC-PPO's value warm-up): during the first N optimizer "
            "steps only the critic learns; the policy loss and entropy bonus are dropped and the policy parameters "
            "get no update. 0: no warm-up."
        },
    )
    value_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the critic's parameters (the shared base's value adapter and head, or the "
            "separate value_model), in its own optimizer param groups that the LR scheduler scales like the "
            "policy's. None: learning_rate."
        },
    )
    value_head_init: str = field(
        default="zero",
        metadata={
            "help": "'zero': the value head's bias starts where it was built (0 for a fresh shared-base head). "
            "'first_rollout_mean': before the first update, set the bias to the mean score (raw, not whitened) of "
            "the first rollout, so the first advantages are not dominated by that offset.",
            "choices": list(VALUE_HEAD_INITS),
        },
    )
    shared_prompt: bool | None = field(
        default=None,
        metadata={
            "help": "With num_generations > 1, compute each group's prompt once in the rollout's forwards of the "
            "policy (theta_old log-probs; not with value_layout='policy_trunk') and of the reference: the group's "
            "completions run as one row [prompt | completion 1 | ... | completion G], each attending to the prompt "
            "and to itself only (docs/ppo.md, 'Each prompt computed once'); the log-probs are those of the separate "
            "rows. The loss's forwards and the critic run unshared. None: on wherever that is exact, else off with "
            "one log line saying why. True: on, and a ValueError where it cannot be exact. False: off."
        },
    )

    def __post_init__(self):
        self._check_ppo_fields()
        self.epsilon = self.cliprange
        self.num_iterations = self.num_ppo_epochs
        completions_per_prompt = self.num_generations
        if completions_per_prompt == 1:
            self.num_generations = _OneCompletionPerPrompt(1)
        super().__post_init__()
        if completions_per_prompt == 1:
            self.num_generations = 1

    def _check_ppo_fields(self):
        """ValueError naming the field for a setting PPO cannot train with (ranges: `PPO_RULES`), before GRPO's
        own checks; a warning for a warm-up that outlasts the run."""
        if self.beta != 0.0:
            raise ValueError(
                f"PPOConfig.beta must be 0 (got {self.beta}): PPO penalises KL in the per-token reward. Set `kl_coef`."
            )
        check_fields(self, PPO_RULES, PPO_RULES_WHY)
        check_finite_weights(self)
        if self.num_iterations not in (1, self.num_ppo_epochs):
            raise ValueError(
                f"Set num_ppo_epochs ({self.num_ppo_epochs}), not GRPO's num_iterations ({self.num_iterations}): "
                "PPOConfig derives num_iterations from num_ppo_epochs."
            )
        if self.epsilon not in (0.2, self.cliprange):  # 0.2: GRPO's default
            raise ValueError(
                f"Set cliprange ({self.cliprange}), not GRPO's epsilon ({self.epsilon}): PPOConfig derives epsilon "
                "from cliprange."
            )
        refuse_unused_options(self, GRPO_OPTIONS_PPO_IGNORES, "GRPO", "PPO")
        choices = {
            "kl_estimator": KL_ESTIMATORS,
            "advantage_estimator": ADVANTAGE_ESTIMATORS,
            "loss_aggregation": LOSS_AGGREGATIONS,
            "long_prompts": LONG_PROMPT_POLICIES,
            "value_head_init": VALUE_HEAD_INITS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}.")
        if self.shared_prompt not in (None, True, False):
            raise ValueError(f"shared_prompt must be None (where exact), True or False, got {self.shared_prompt!r}")
        if self.mask_truncated_completions:
            raise ValueError(
                "mask_truncated_completions is not supported by PPO: it leaves completions without a token to carry "
                "their score. Use missing_eos_penalty to penalise completions that end without EOS."
            )
        self._warn_about_short_runs()

    def _warn_about_short_runs(self):
        """Warnings (not errors: the run still trains) for a warm-up, LR or critic, as long as the run itself."""
        warn_if_warmup_outlasts_run(self)
        if 0 < self.max_steps <= self.value_warmup_steps:
            logger.warning(
                "PPOConfig: value_warmup_steps=%d is not shorter than max_steps=%d, so only the critic trains and the "
                "policy never gets an update.", self.value_warmup_steps, self.max_steps,
            )  # fmt: skip
