"""Adaptive KL coefficient (Ziegler et al. 2019, section 2.2): steer the measured KL toward a target.

    e_t        = clip(KL_t / KL_target - 1, -0.2, 0.2)         proportional error, clipped
    beta_{t+1} = beta_t * (1 + e_t * n_t / horizon)            n_t: completions sampled since the last update

Too much KL raises beta (a stronger pull toward the reference), too little lowers it; `horizon` sets how many
completions it takes to move beta by about e_t. `adaptive_kl_coef` is the arithmetic; `AdaptiveKLCallback` applies
it to `PPOConfig.kl_coef` of a running `PPOTrainer`.
"""

from __future__ import annotations

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

KL_METRIC = "objective/kl"
MAX_PROPORTIONAL_ERROR = 0.2


def adaptive_kl_coef(kl_coef: float, current_kl: float, target: float, n_steps: float, horizon: float) -> float:
    """beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon)."""
    if target <= 0 or horizon <= 0:
        raise ValueError(f"target and horizon must be positive, got target={target}, horizon={horizon}.")
    error = min(max(current_kl / target - 1.0, -MAX_PROPORTIONAL_ERROR), MAX_PROPORTIONAL_ERROR)
    return kl_coef * (1.0 + error * n_steps / horizon)


class AdaptiveKLCallback(TrainerCallback, ExportableState):
    """Set `args.kl_coef` of a PPOTrainer from the logged KL, after every log.

    The measured KL is the logged `objective/kl`: the per-completion KL summed over tokens, averaged over the steps
    since the last log (TRL PPO's metric). The current beta (and the step of its last update) is saved with
    checkpoints and restored on resume, so k steps + resume + N - k steps give the run of N steps. The restore needs
    no flag: transformers restores callback states only with `restore_callback_states_from_checkpoint=True`
    (default False), so the callback reads its saved state from the resumed `TrainerState` itself.

    Args:
        target: target KL per completion, in nats (Ziegler et al. used 6).
        horizon: completions over which a full proportional error moves beta by that fraction (10000 in the paper).
        kl_coef: starting beta; default: `args.kl_coef` when training begins.
    """

    def __init__(self, target: float = 6.0, horizon: float = 10000, kl_coef: float | None = None):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be positive, got target={target}, horizon={horizon}.")
        self.target = target
        self.horizon = horizon
        self.kl_coef = kl_coef
        self.last_step = None  # optimizer step of the last update of beta; None until training begins

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step > 0:  # resuming: the loaded TrainerState holds this callback's state at the checkpoint
            self._restore(state)
        if self.kl_coef is None:
            self.kl_coef = args.kl_coef
        args.kl_coef = self.kl_coef
        if self.last_step is None:
            self.last_step = state.global_step

    def _restore(self, state) -> None:
        """Take beta and the step of its last update from the checkpointed state of this callback, if it has one."""
        saved = state.stateful_callbacks.get(type(self).__name__)
        candidates = saved if isinstance(saved, list) else [saved] if saved else []
        mine = [c for c in candidates if c.get("args") == self.state()["args"]]  # the controller with our target
        if mine:
            self.kl_coef = mine[0]["attributes"]["kl_coef"]
            self.last_step = mine[0]["attributes"].get("last_step", state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or KL_METRIC not in logs:
            return
        n_steps = (state.global_step - self.last_step) * completions_per_optimizer_step(args)
        self.last_step = state.global_step
        self.kl_coef = adaptive_kl_coef(self.kl_coef, logs[KL_METRIC], self.target, n_steps, self.horizon)
        args.kl_coef = self.kl_coef

    def state(self) -> dict:
        return {
            "args": {"target": self.target, "horizon": self.horizon},
            "attributes": {"kl_coef": self.kl_coef, "last_step": self.last_step},
        }


def completions_per_optimizer_step(args) -> float:
    """Completions sampled per optimizer step, over all processes.

    A generation batch of `generation_batch_size` completions feeds `steps_per_generation * num_iterations`
    micro-steps, and one optimizer step takes `gradient_accumulation_steps` micro-steps.
    """
    micro_steps_per_generation = args.steps_per_generation * args.num_iterations
    return args.generation_batch_size * args.gradient_accumulation_steps / micro_steps_per_generation
