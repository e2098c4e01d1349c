"""Range checks for the numeric fields of the trainers' configs, run in their `__post_init__`.

A setting with the wrong sign rarely fails loudly: `beta < 0` in DPO trains the reverse ranking while the
accuracy metric (which uses the same sign) climbs, `vf_coef < 0` makes the critic maximise its error. So every
numeric field whose meaning the trainers rely on is checked when the config is built, and the error names the
config, the field, the value, what is allowed and, where it is not obvious, why. NaN fails every rule (it
compares false with everything) and a float field must also be finite.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rule:
    """What a numeric field may hold: `allowed` in words (for the error), `holds(value)`, and whether None or only
    integers are accepted."""

    allowed: str
    holds: Callable[[float], bool]
    optional: bool = False
    integer: bool = False

    def or_none(self) -> Rule:
        """The same rule, with None also accepted (None switches the feature off)."""
        return Rule(self.allowed, self.holds, optional=True, integer=self.integer)

    def accepts(self, value) -> bool:
        if value is None:
            return self.optional
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return False
        if self.integer and not isinstance(value, numbers.Integral):
            return False
        return math.isfinite(value) and self.holds(value)

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        return f"{self.allowed}{' or None' if self.optional else ''} ({kind})"


POSITIVE = Rule("> 0", lambda v: v > 0)
NON_NEGATIVE = Rule(">= 0", lambda v: v >= 0)
UNIT_INTERVAL = Rule("in [0, 1]", lambda v: 0 <= v <= 1)
OPEN_CLOSED_UNIT = Rule("in (0, 1]", lambda v: 0 < v <= 1)
CLOSED_OPEN_UNIT = Rule("in [0, 1)", lambda v: 0 <= v < 1)
COUNT = Rule(">= 1", lambda v: v >= 1, integer=True)
NON_NEGATIVE_COUNT = Rule(">= 0", lambda v: v >= 0, integer=True)
ZERO = Rule("0", lambda v: v == 0)

DPO_BETA_WHY = (
    "The implicit reward is beta * (log pi - log pi_ref): a negative beta trains the reverse ranking while "
    "rewards/accuracies (computed with the same sign) still climbs, and beta = 0 makes every implicit reward 0, so "
    "nothing trains. Typical values: 0.01 to 0.5."
)

# The fields of TrainingArguments and TRL's configs that every trainer here relies on.
COMMON_RULES = {"learning_rate": NON_NEGATIVE}


def check_fields(config, rules: dict[str, Rule], why: dict[str, str] | None = None) -> None:
    """ValueError naming the first field of `rules` whose value `config` holds outside its rule.

    `why` adds, per field, what a value outside the range would do to the run.
    """
    why = why or {}
    for name, rule in rules.items():
        value = getattr(config, name)
        if not rule.accepts(value):
            reason = f" {why[name]}" if name in why else ""
            raise ValueError(f"{type(config).__name__}.{name} must be {rule.describe()}, got {value!r}.{reason}")


def check_finite_weights(config, name: str = "reward_weights") -> None:
    """ValueError unless every weight in `config.<name>` (a list, or None) is a finite number.

    A NaN weight makes every weighted score NaN, so every completion would be skipped; a negative weight is allowed
    (it turns a reward into a penalty).
    """
    weights = getattr(config, name)
    for i, weight in enumerate(weights or []):
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
            raise ValueError(
                f"{type(config).__name__}.{name}[{i}] must be a finite number, got {weight!r} (a NaN or infinite "
                "weight makes every weighted score NaN or infinite)."
            )


def warn_if_warmup_outlasts_run(config) -> None:
    """Warn (not refuse) when the LR warm-up is at least as long as the run: the learning rate then rises for the
    whole run and never reaches `learning_rate` (the last step uses (max_steps - 1) / warmup_steps of it).

    Not an error: a short smoke run with a production warm-up is a deliberate choice, and the run still trains.
    Only checked when both are step counts (warmup_steps >= 1, max_steps > 0); a warmup ratio cannot outlast the run.
    """
    warmup, max_steps = config.warmup_steps, config.max_steps
    if max_steps > 0 and warmup >= 1 and int(warmup) >= max_steps:
        logger.warning(
            "%s: warmup_steps=%s is not shorter than max_steps=%s, so the learning rate never reaches "
            "learning_rate=%s (it ends at %.0f%% of it). Shorten warmup_steps if that is not intended.",
            type(config).__name__, warmup, max_steps, config.learning_rate, 100 * (max_steps - 1) / int(warmup),
        )  # fmt: skip


def refuse_unused_options(config, options: dict[str, str], parent: str, trainer: str) -> None:
    """ValueError naming the first of `options` (inherited field -> what to set instead) that `config` holds at
    another value than its default: `trainer` never reads it, so a run that sets it would silently train without it.

    The default is the config class's own (a field our config redeclares keeps its new default); `parent` names the
    TRL config the option comes from, for the message.
    """
    for name, instead in options.items():
        field = type(config).__dataclass_fields__[name]
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        value = getattr(config, name)
        if value != default:
            raise ValueError(
                f"{type(config).__name__}.{name}={value!r} is a {parent} option that {trainer} does not use "
                f"({instead}); leave it at {default!r}."
            )


# What the K-way configs say instead of DPOConfig's / RewardConfig's `pad_token`, which only TRL's own collator reads.
KWAY_PAD_TOKEN_INSTEAD = (
    "the K-way collator pads with the tokenizer's pad_token, or EOS when it has none, and padding never enters the "
    "loss: set processing_class.pad_token"
)
