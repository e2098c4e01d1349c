"""Stage 5: compare policies (base, PPO, DPO) on the held-out prompts.

For each policy we sample `n_samples` completions per held-out prompt, from the policy's own
distribution (temperature 1, no top-k / top-p truncation), with the same seed for every policy, and
measure:

- mean VADER compound score (and its standard error over completions);
- win rate against the base: per prompt, the policy's mean score against the base's mean score,
  1 for a win, 0.5 for a tie, 0 for a loss, averaged over prompts;
- KL to the base: for each sampled completion y, sum_t [log pi(y_t | x, y_<t) - log base(y_t | x, y_<t)],
  averaged over completions. Because y ~ pi, this is a Monte Carlo estimate of KL(pi || base) per
  sequence (the quantity the PPO penalty and the DPO objective keep small);
- mean completion length in tokens (the EOS token included when the model stopped on its own).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from tqdm.auto import tqdm
from transformers import set_seed

from .generation import (
    SamplingConfig,
    completion_logprobs,
    load_model_and_tokenizer,
    sample_batch,
)
from .sentiment import vader_compound

BASE = "base"


@dataclass(frozen=True)
class PolicySpec:
    """Where a policy lives: a model folder, optionally with a peft adapter folder on top."""

    name: str
    model_path: str
    adapter_path: str | None = None


@dataclass
class PolicySamples:
    """A policy's completions on the held-out prompts; lists are [n_prompts][n_samples]."""

    name: str
    texts: list[list[str]]
    scores: list[list[float]]
    kl: list[list[float]]  # per-completion log-ratio sums; 0.0 for the base itself
    lengths: list[list[int]]  # completion tokens


@dataclass(frozen=True)
class PolicyMetrics:
    """The numbers the report's comparison table shows for one policy."""

    mean_vader: float
    vader_stderr: float
    win_rate_vs_base: float
    kl_to_base: float
    mean_length_tokens: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _flat(rows: list[list[float]]) -> list[float]:
    return [x for row in rows for x in row]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _stderr(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))


def win_rate(policy_scores: list[list[float]], base_scores: list[list[float]]) -> float:
    """Fraction of prompts where the policy's mean score beats the base's; a tie counts 0.5."""
    if len(policy_scores) != len(base_scores):
        raise ValueError(f"policy has {len(policy_scores)} prompts, base has {len(base_scores)}")
    outcomes = []
    for mine, theirs in zip(policy_scores, base_scores):
        difference = _mean(mine) - _mean(theirs)
        outcomes.append(1.0 if difference > 0 else 0.0 if difference < 0 else 0.5)
    return _mean(outcomes)


def policy_metrics(samples: PolicySamples, base: PolicySamples) -> PolicyMetrics:
    """Summary metrics of `samples`, with win rate measured against `base`."""
    scores = _flat(samples.scores)
    return PolicyMetrics(
        mean_vader=_mean(scores),
        vader_stderr=_stderr(scores),
        win_rate_vs_base=win_rate(samples.scores, base.scores),
        kl_to_base=_mean(_flat(samples.kl)),
        mean_length_tokens=_mean(_flat(samples.lengths)),
    )


def _per_prompt(values: list, n_samples: int) -> list[list]:
    return [values[i : i + n_samples] for i in range(0, len(values), n_samples)]


def sample_policy(
    name: str,
    policy,
    base_model,
    tokenizer,
    conversations: list[list[dict]],
    *,
    n_samples: int,
    sampling: SamplingConfig,
    batch_size: int,
    seed: int,
) -> PolicySamples:
    """Sample `policy` on `conversations`, score with VADER, and estimate its KL to `base_model`.

    Pass the base model itself as `policy` to get the base's samples (its KL is exactly 0, so the
    second forward pass is skipped).
    """
    set_seed(seed)  # the same seed for every policy: differences come from the policies, not the dice
    texts, kl, lengths = [], [], []
    for start in tqdm(range(0, len(conversations), batch_size), desc=f"evaluating {name}", unit="batch"):
        chunk = conversations[start : start + batch_size]
        batch = sample_batch(policy, tokenizer, chunk, n_samples, sampling, with_logprobs=policy is not base_model)
        texts += batch.texts
        lengths += batch.completion_mask.sum(-1).tolist()
        if policy is base_model:
            kl += [0.0] * len(batch.texts)
        else:
            log_ratio = batch.logprobs - completion_logprobs(base_model, batch)
            kl += log_ratio.sum(-1).tolist()
    scores = [vader_compound(t) for t in texts]
    return PolicySamples(
        name=name,
        texts=_per_prompt(texts, n_samples),
        scores=_per_prompt(scores, n_samples),
        kl=_per_prompt(kl, n_samples),
        lengths=_per_prompt(lengths, n_samples),
    )


def evaluate_policies(
    policies: list[PolicySpec],
    conversations: list[list[dict]],
    *,
    n_samples: int,
    sampling: SamplingConfig,
    batch_size: int,
    seed: int,
) -> tuple[dict[str, PolicyMetrics], dict[str, PolicySamples]]:
    """Metrics and samples for every policy; `policies[0]` must be the base (adapter-free) model."""
    base_spec = policies[0]
    if base_spec.adapter_path is not None:
        raise ValueError(f"the first policy must be the base model without an adapter, got {base_spec}")
    base_model, tokenizer = load_model_and_tokenizer(base_spec.model_path)
    kwargs = dict(n_samples=n_samples, sampling=sampling, batch_size=batch_size, seed=seed)
    base = sample_policy(base_spec.name, base_model, base_model, tokenizer, conversations, **kwargs)
    samples = {base_spec.name: base}
    for spec in policies[1:]:
        policy, _ = load_model_and_tokenizer(spec.model_path, spec.adapter_path)
        samples[spec.name] = sample_policy(spec.name, policy, base_model, tokenizer, conversations, **kwargs)
        del policy  # one policy in memory at a time, next to the base
    return {name: policy_metrics(s, base) for name, s in samples.items()}, samples
