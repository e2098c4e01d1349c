"""The `shared_prompt` switch of the trainers that compute each prompt once (rlhf_ext/models/shared_prompt.py): the
K-way trainers (a list's K completions) and online K-way (a GRPO group's G = num_generations completions).

Here, not in `kway/common.py`, because the GRPO base (`grpo_base.py`) reads it and `kway` imports that base.
"""

from __future__ import annotations

import logging

from ..models.shared_prompt import SharedPromptBatch, attention_span, shared_prompt_blocker

logger = logging.getLogger(__name__)

# the trainers' attributes that may hold a separate reference model: DPOTrainer's, and the GRPO base's own (GRPO's
# `ref_model` is None there: its KL term is off)
REFERENCE_ATTRIBUTES = ("ref_model", "ppo_ref_model")


class SharedPromptSwitch:
    """Whether a trainer computes each prompt once (`shared_prompt`, rlhf_ext/models/shared_prompt.py).

    The model check runs at the first batch or at `decide` (the trainer calls it at the end of `__init__`; DPO's
    reference precompute, inside TRL's `__init__`, may come first): None turns the layout off with one log line where
    a model cannot run it exactly, True raises a ValueError there. Each batch is checked too (`layout_problem`: right
    padded rows, one prompt per list; a caller may add its own problem, as the GRPO base does for its left-padded
    rows); a batch that fails runs unshared (None, one log line for the run) or raises (True). `pack`: "auto" groups a
    batch's lists into rows by the cost model of `rlhf_ext.ops.shared_prompt.rows_by_cost` (one row per list among the
    candidates), False gives each list its own row, True puts all in one.
    """

    def __init__(self, setting: bool | None, *, scores: bool, pack: bool | str = "auto"):
        self.setting, self.scores, self.pack = setting, scores, pack
        self.active: bool | None = None if setting is not False else False
        self._logged_batch = False
        self._span: float | None = None

    def decide(self, trainer) -> bool:
        """On or off for this trainer's models (policy, and a separate reference model), once.

        The longest sequence is the config's `max_length` (the K-way configs); a config without one (GRPO's) leaves it
        unbounded, so a model with local attention is turned off."""
        if self.active is None:
            references = [getattr(trainer, name, None) for name in REFERENCE_ATTRIBUTES]
            models = [trainer.model] + [m for m in references if m is not None]
            max_length = getattr(trainer.args, "max_length", None)
            reason = next((r for m in models
                           if (r := shared_prompt_blocker(m, max_length=max_length, scores=self.scores))), None)
            if reason is None and getattr(trainer, "aux_loss_enabled", False):
                # TRL turns the router loss on from the config's field and router_aux_loss_coef, whatever the field's
                # value (`shared_prompt_blocker` sees only a model that already returns router logits)
                reason = (f"the MoE router load-balancing loss is on (router_aux_loss_coef="
                          f"{trainer.router_aux_loss_coef}); it averages over the tokens, and counts each prompt "
                          "token K times unshared")
            if reason is not None and self.setting:
                raise ValueError(f"shared_prompt=True, but computing each prompt once cannot be exact here: {reason}. "
                                 "Set shared_prompt=None (on where exact) or False.")
            if reason is not None:
                logger.warning("shared_prompt: off (each prompt is computed once per completion): %s", reason)
            self.active = reason is None
            self._span = attention_span(trainer.model)
        return self.active

    def check(self, inputs: dict | None, trainer, problem: str | None = None) -> bool:
        """Whether this batch runs shared: the switch is on, and neither `problem` (the caller's own finding; then
        `inputs` may be None) nor `SharedPromptBatch.problem(inputs)` says it cannot be."""
        if not self.decide(trainer):
            return False
        if problem is None:
            problem = SharedPromptBatch.problem(inputs)
        if problem is not None:
            if self.setting:
                raise ValueError(f"shared_prompt=True, but this batch cannot share its prompts: {problem}. Set "
                                 "shared_prompt=None to run such batches unshared, or False.")
            if not self._logged_batch:
                logger.warning("shared_prompt: a batch runs unshared, and so will any other like it: %s", problem)
                self._logged_batch = True
            return False
        return True

    def build(self, inputs: dict, trainer) -> SharedPromptBatch:
        """The shared rows of a batch `check` accepted, its lists grouped into rows as `pack` says."""
        pack = self.pack if self.pack != "auto" else (self._span if self._span is not None else False)
        return SharedPromptBatch.from_inputs(inputs, pack=pack, pad_to_multiple_of=trainer.args.pad_to_multiple_of)

    def batch(self, inputs: dict, trainer) -> SharedPromptBatch | None:
        """The batch as shared rows, or None to run it unshared."""
        return self.build(inputs, trainer) if self.check(inputs, trainer) else None
