"""Reward against KL to the reference: where a run's policies sit on the frontier (Gao et al. 2022).

RLHF methods are compared by the reward a gold judge gives them at a given KL from the reference policy ("Scaling
Laws for Reward Model Overoptimization", Gao, Schulman and Hilton, 2022). A policy trained on a proxy reward climbs
the proxy while the gold reward first rises and then falls: over-optimisation. The report puts on one plot, each with
its gold and its proxy reward:

    best of n         n completions from the reference, the proxy's favourite kept (no training at all):
                          KL = log n - (n - 1) / n,    reward = E[gold of the proxy-best of n]
    KL-regularised    the optimum of E_pi[r_proxy] - beta KL(pi || pi_ref), pi*(y|x) ∝ pi_ref(y|x) exp(r_proxy / beta),
    optimum           estimated for each beta by importance weights on the reference's own samples
    each policy       its own samples: gold and proxy means, and
                          KL = E_{y ~ pi}[ sum_t log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t) ]

Usage (`rlhf-ext frontier` runs the same from the command line):

    from rlhf_ext.frontier import FrontierSettings, frontier_report, plot_frontier

    report = frontier_report("base-model", {"ppo": "out/ppo", "dpo": "out/dpo"}, ["Write a haiku.", ...],
                             gold=my_gold_reward, proxy="out/reward", settings=FrontierSettings(num_samples=32))
    report.save_json("frontier.json")
    plot_frontier(report, "frontier.png")

Sections: the estimators on the reference's samples (plain tensors), sampling and scoring, the report and its plot,
and loading policies, the proxy and the gold function from paths. docs/frontier.md explains the estimators' limits.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GenerationConfig,
    set_seed,
)
from trl.data_utils import is_conversational
from trl.trainer.utils import create_model_from_path

from .models import SharedBase, SharedBaseArguments, check_adapter_fits
from .models.policy_head import copying_a_tied_head
from .models.role_checks import check_folder_base, check_folder_role, check_reward_models
from .models.role_folder import ADAPTER_CONFIG, HEAD_CONFIG
from .models.scoring import LAST_REAL_TOKEN, SCORE_TOKEN_FIELD
from .names import looks_like_local_path
from .ops import selective_log_softmax

# A KL-regularised point whose weights rest on fewer reference samples per prompt than this (M exp(-KL), see
# `kl_regularised_optimum`) is flagged unreliable: its KL is within log 8 ≈ 2.1 nats of the cap log M.
MIN_EFFECTIVE_SAMPLES = 8
DEFAULT_BETAS = (3.0, 1.0, 0.3, 0.1, 0.03)
DTYPES = ("float32", "bfloat16", "float16")
MODEL_CONFIG = "config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"


@dataclass
class FrontierSettings:
    """How many samples, which betas, how long the completions, which seed: everything that fixes the report."""

    num_samples: int = field(
        default=32,
        metadata={
            "help": "M: completions sampled from the reference per prompt, for best-of-n and the KL-regularised "
            "optimum (at least --best_of_n; the optimum's KL estimates stop at log M)."
        },
    )
    best_of_n: int = field(default=16, metadata={"help": "Largest n of best-of-n: n = 1, 2, 4, ... up to it."})
    betas: list[float] = field(
        default_factory=lambda: list(DEFAULT_BETAS),
        metadata={"help": "KL coefficients beta of the KL-regularised optimum, on the scale of the proxy reward."},
    )
    policy_samples: int = field(default=4, metadata={"help": "Completions sampled from each policy per prompt."})
    max_new_tokens: int = field(default=64, metadata={"help": "Longest completion, in tokens."})
    batch_size: int = field(
        default=64,
        metadata={
            "help": "Sequences per generate call: batch_size // samples-per-prompt prompts (at least one), so the "
            "reference's M samples and a policy's few fill calls alike."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of every sampling run: the same seed gives the same report."})
    dtype: str = field(default="float32", metadata={"help": "dtype the models are loaded in.", "choices": DTYPES})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run the model repositories' own code (never on by default)."}
    )

    def __post_init__(self):
        check_settings(self)


def check_settings(settings: FrontierSettings) -> None:
    """ValueError naming the setting when the report could not be computed from it."""
    for name in ("num_samples", "best_of_n", "policy_samples", "max_new_tokens", "batch_size"):
        if getattr(settings, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(settings, name)}.")
    if settings.num_samples < settings.best_of_n:
        raise ValueError(
            f"--num_samples {settings.num_samples} is smaller than --best_of_n {settings.best_of_n}: the best of n "
            f"is estimated from M >= n reference samples per prompt. Raise --num_samples to at least "
            f"{settings.best_of_n}, or lower --best_of_n."
        )
    if not settings.betas or any(not beta > 0 for beta in settings.betas):
        raise ValueError(f"--betas must be positive numbers, got {settings.betas}.")
    if settings.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {DTYPES}, got {settings.dtype!r}.")


# -- estimators on the reference's samples ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BestOfNPoint:
    """Best of n completions from the reference, ranked by the proxy: its KL and expected gold and proxy rewards."""

    n: int
    kl: float
    gold: float
    proxy: float


@dataclass(frozen=True)
class OptimumPoint:
    """The KL-regularised optimum at one beta; `reliable` is False when its KL is near the cap log M."""

    beta: float
    kl: float
    gold: float
    proxy: float
    effective_samples: float
    reliable: bool


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || pi_ref) = log n - (n - 1) / n, in nats.

    Over a continuum of equally likely outcomes the proxy-best of n sits at quantile u with density n u^(n-1), whose
    KL to the uniform density is log n + (n - 1) E[log u] = log n - (n - 1) / n. Exact when the reference's
    completions are distinct with distinct proxy scores; an upper bound otherwise (Beirami et al. 2024,
    "Theoretical guarantees on the best-of-n alignment policy").
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}.")
    return math.log(n) - (n - 1) / n


def best_of_n_sizes(largest: int) -> list[int]:
    """n = 1, 2, 4, ... up to `largest`, and `largest` itself when it is not a power of two."""
    sizes = [2**k for k in range(largest.bit_length()) if 2**k <= largest]
    return sizes if sizes[-1] == largest else [*sizes, largest]


def best_of_n_weights(num_samples: int, n: int) -> torch.Tensor:
    """w_i = C(i-1, n-1) / C(M, n) for i = 1..M: the chance that the i-th lowest of M samples is the highest of n of
    them drawn without replacement. [M] float64; the weights sum to 1 (the hockey-stick identity)."""
    if not 1 <= n <= num_samples:
        raise ValueError(f"best of n needs 1 <= n <= M, got n={n}, M={num_samples}.")
    total = math.comb(num_samples, n)  # exact integers: no overflow in C(i-1, n-1) / C(M, n)
    return torch.tensor([math.comb(i - 1, n - 1) / total for i in range(1, num_samples + 1)], dtype=torch.float64)


def per_prompt(values: torch.Tensor | Sequence) -> torch.Tensor:
    """`values` as float64 [P, M] (one prompt's samples per row); a flat [M] is one prompt."""
    values = torch.as_tensor(values, dtype=torch.float64)
    return values.unsqueeze(0) if values.dim() == 1 else values


def best_of_n_expectation(proxy: torch.Tensor | Sequence, scores: torch.Tensor | Sequence, n: int) -> float:
    """E[score of the proxy-best of n reference completions], unbiased, from M >= n samples per prompt:

        E_n = 1/P sum_prompts sum_{i=1}^{M} s_(i) C(i-1, n-1) / C(M, n)

    where s_(i) is the score (gold, or the proxy itself) of the sample whose proxy ranks i-th lowest. Each of the
    C(M, n) subsets of n samples is an equally likely draw of n without replacement, and sample (i) is the proxy-best
    of C(i-1, n-1) of them: this is the average over every subset (a U-statistic), so it is unbiased and varies less
    than one drawn subset. Ties in the proxy are broken by sample order, a uniformly random tie-break for i.i.d.
    samples. `proxy`, `scores`: [P, M], or [M] for one prompt.
    """
    proxy, scores = per_prompt(proxy), per_prompt(scores)
    if proxy.shape != scores.shape:
        raise ValueError(f"proxy {tuple(proxy.shape)} and scores {tuple(scores.shape)} must have one shape.")
    order = torch.sort(proxy, dim=-1, stable=True).indices
    ranked = scores.gather(-1, order)  # ascending in the proxy
    return float((ranked @ best_of_n_weights(proxy.shape[-1], n)).mean())


def best_of_n_point(proxy: torch.Tensor | Sequence, gold: torch.Tensor | Sequence, n: int) -> BestOfNPoint:
    """Best of n from the reference's samples ([P, M] proxy and gold scores): analytic KL, expected gold and proxy."""
    return BestOfNPoint(
        n=n,
        kl=best_of_n_kl(n),
        gold=best_of_n_expectation(proxy, gold, n),
        proxy=best_of_n_expectation(proxy, proxy, n),
    )


def kl_regularised_optimum(proxy: torch.Tensor | Sequence, gold: torch.Tensor | Sequence, beta: float) -> OptimumPoint:
    """The optimum of  max_pi E_pi[r] - beta KL(pi || pi_ref),  pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x),
    estimated from M samples y_1..y_M ~ pi_ref(.|x) per prompt by self-normalised importance weights:

        w_j = exp(r_j / beta) / sum_k exp(r_k / beta)
        gold = sum_j w_j g_j,    proxy = sum_j w_j r_j,    KL = sum_j w_j log(M w_j)

    each averaged over prompts (`proxy`, `gold`: [P, M], or [M] for one prompt; r is the proxy).

    The KL is the plug-in estimate, the KL of the weighted samples to the unweighted ones: a lower-variance estimate
    (it reuses the same weighted samples, nothing is drawn from pi*), but biased low and capped at log M (all the
    weight on one sample). M exp(-KL) is the number of samples the weights effectively rest on (exp of their
    entropy, a geometric mean over prompts); below `MIN_EFFECTIVE_SAMPLES` the point is flagged unreliable: its KL is
    near log M and its rewards rest on the few best samples. More samples (a larger M) move the cap out.
    """
    proxy, gold = per_prompt(proxy), per_prompt(gold)
    if proxy.shape != gold.shape:
        raise ValueError(f"proxy {tuple(proxy.shape)} and gold {tuple(gold.shape)} must have one shape.")
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}.")
    num_samples = proxy.shape[-1]
    weights = torch.softmax(proxy / beta, dim=-1)
    # xlogy: a weight that underflows to 0 adds 0 (0 log 0), not NaN
    kl = (torch.special.xlogy(weights, weights).sum(-1) + math.log(num_samples)).mean()
    effective_samples = num_samples * math.exp(-float(kl))
    return OptimumPoint(
        beta=beta,
        kl=float(kl),
        gold=float((weights * gold).sum(-1).mean()),
        proxy=float((weights * proxy).sum(-1).mean()),
        effective_samples=effective_samples,
        reliable=effective_samples >= MIN_EFFECTIVE_SAMPLES,
    )


# -- sampling and scoring ---------------------------------------------------------------------------------------------


@dataclass
class SampledBatch:
    """Completions sampled for a batch of prompts; row i * S + j is sample j of prompt i (S samples per prompt)."""

    sequences: torch.Tensor  # [N, P + T] the prompt (left-padded) then the completion
    attention_mask: torch.Tensor  # [N, P + T] 1 on real prompt tokens and completion tokens through the first EOS
    prompt_length: int  # P: completions start at this column
    completion_mask: torch.Tensor  # [N, T] True through each completion's first EOS (all of it without one)


@dataclass
class PolicySamples:
    """Every completion a policy was sampled, with its scores; entry k is a completion of prompt `prompt_index[k]`."""

    prompt_index: list[int]
    completions: list  # text, or [{"role": "assistant", "content": text}] for chat prompts (as TRL passes them)
    completion_ids: list[list[int]]  # through the first EOS
    log_ratios: list[float]  # sum_t log pi - log pi_ref over the completion's tokens; 0.0 for the reference itself
    gold: list[float]
    proxy: list[float]


@dataclass
class PolicyPoint:
    """A policy's place on the plot: means over its completions, standard errors over prompts."""

    label: str
    kl: float
    kl_stderr: float
    gold: float
    gold_stderr: float
    proxy: float
    proxy_stderr: float
    num_completions: int
    source: str | None = None
    samples: PolicySamples | None = field(default=None, repr=False, compare=False)  # in memory only, not in the JSON


def prompt_token_ids(tokenizer, prompt) -> list[int]:
    """A prompt's token ids as TRL's GRPOTrainer tokenizes it for generation: chat messages through the chat template
    with the assistant turn opened, text with the tokenizer's special tokens."""
    if is_conversational({"prompt": prompt}):
        encoded = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
        return list(encoded["input_ids"])
    return tokenizer(text=prompt)["input_ids"]


def left_padded(sequences: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [B, L] long, each sequence left-padded to the longest: generation appends at the
    right, so every completion starts at the same column."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.tensor([[pad_token_id] * (width - len(ids)) + ids for ids in sequences], dtype=torch.long)
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in sequences], dtype=torch.long)
    return input_ids, attention_mask


def own_distribution(tokenizer, num_samples: int, max_new_tokens: int) -> GenerationConfig:
    """Sampling from the model's own distribution (temperature 1, no top-k / top-p / min-p cut, no repetition
    penalty), as the KL estimate needs: every value is set, so a model's generation_config cannot fill one in."""
    return GenerationConfig(
        do_sample=True, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, repetition_penalty=1.0,
        no_repeat_ngram_size=0, max_new_tokens=max_new_tokens, num_return_sequences=num_samples,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip


def through_first_eos(completion_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """[N, T] bool: True up to and including each row's first EOS (the whole row when it has none)."""
    is_eos = (completion_ids == eos_token_id).long()
    return (torch.cumsum(is_eos, dim=-1) - is_eos) == 0


@torch.no_grad()
def sample_batch(model, tokenizer, prompts: list, num_samples: int, max_new_tokens: int) -> SampledBatch:
    """`num_samples` completions of each prompt sampled from `model`'s own distribution (`own_distribution`)."""
    input_ids, attention_mask = left_padded([prompt_token_ids(tokenizer, p) for p in prompts], tokenizer.pad_token_id)
    device = next(model.parameters()).device
    sequences = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        generation_config=own_distribution(tokenizer, num_samples, max_new_tokens),
    )
    prompt_length = input_ids.shape[1]
    completion_mask = through_first_eos(sequences[:, prompt_length:], tokenizer.eos_token_id)
    prompt_mask = attention_mask.to(device).repeat_interleave(num_samples, dim=0)
    return SampledBatch(
        sequences=sequences,
        attention_mask=torch.cat([prompt_mask, completion_mask.long()], dim=1),
        prompt_length=prompt_length,
        completion_mask=completion_mask,
    )


@torch.no_grad()
def completion_logprobs(model, batch: SampledBatch) -> torch.Tensor:
    """[N, T] log pi(y_t | x, y_<t) of each completion token under `model`, in float32 (0 off the completion mask).

    One forward over prompt + completion, with positions counted over real tokens only as generate() counts them,
    so left padding shifts nothing; the logit at column c predicts the token at column c + 1.
    """
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=batch.sequences, attention_mask=batch.attention_mask, position_ids=position_ids).logits
    completion_logits = logits[:, batch.prompt_length - 1 : -1]
    logprobs = selective_log_softmax(completion_logits, batch.sequences[:, batch.prompt_length :])
    return logprobs.float() * batch.completion_mask


def sequence_log_ratios(policy, reference, batch: SampledBatch) -> torch.Tensor:
    """[N] sum_t log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t) over each sampled completion's tokens.

    For y ~ pi its mean is a Monte-Carlo estimate of the sequence-level KL(pi || pi_ref). Both models run the same
    forward on the same batch, so a policy with the reference's weights gives exactly 0.
    """
    return (completion_logprobs(policy, batch) - completion_logprobs(reference, batch)).sum(-1)


def completions_of(tokenizer, batch: SampledBatch, prompts: list) -> tuple[list, list[list[int]]]:
    """(completions, completion_ids) of a batch as TRL hands them to reward functions: the decoded text without
    special tokens (an assistant message for chat prompts), and the ids through the first EOS."""
    completion_ids = [
        ids[mask].tolist() for ids, mask in zip(batch.sequences[:, batch.prompt_length :], batch.completion_mask)
    ]
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    if is_conversational({"prompt": prompts[0]}):
        return [[{"role": "assistant", "content": text}] for text in texts], completion_ids
    return texts, completion_ids


def checked_scores(values, expected: int, name: str) -> list[float]:
    """`values` as floats; ValueError naming the function when it returned another count or a non-finite score."""
    values = list(values)
    if len(values) != expected:
        raise ValueError(f"The {name} reward returned {len(values)} scores for {expected} completions.")
    scores = [float(v) if v is not None else math.nan for v in values]
    bad = next((i for i, s in enumerate(scores) if not math.isfinite(s)), None)
    if bad is not None:
        raise ValueError(
            f"The {name} reward returned {values[bad]!r} for completion {bad} of a batch: the frontier needs a finite "
            "score for every completion."
        )
    return scores


def sample_and_score(
    model, tokenizer, records: list[dict], num_samples: int, *, gold: Callable, proxy: Callable,
    settings: FrontierSettings, reference=None, desc: str = "sampling",
) -> PolicySamples:  # fmt: skip
    """Sample `num_samples` completions per prompt from `model` and score them with `gold` and `proxy` (called as TRL
    calls reward functions: prompts, completions, completion_ids and the records' other fields as keyword lists);
    with `reference`, each completion's log-ratio to it (`sequence_log_ratios`), else 0.0 (the reference itself).

    Seeded with `settings.seed` first: every policy draws with the same seed, so differences come from the policies.
    """
    set_seed(settings.seed)
    samples = PolicySamples([], [], [], [], [], [])
    prompts_per_call = max(1, settings.batch_size // num_samples)
    for start in tqdm(range(0, len(records), prompts_per_call), desc=desc, unit="batch"):
        chunk = records[start : start + prompts_per_call]
        batch = sample_batch(model, tokenizer, [r["prompt"] for r in chunk], num_samples, settings.max_new_tokens)
        repeated = [record for record in chunk for _ in range(num_samples)]  # row i * S + j: sample j of prompt i
        prompts = [record["prompt"] for record in repeated]
        completions, completion_ids = completions_of(tokenizer, batch, prompts)
        extras = {key: [record[key] for record in repeated] for key in chunk[0] if key != "prompt"}
        kwargs = dict(prompts=prompts, completions=completions, completion_ids=completion_ids, **extras)
        samples.prompt_index += [start + i // num_samples for i in range(len(repeated))]
        samples.completions += completions
        samples.completion_ids += completion_ids
        samples.gold += checked_scores(gold(**kwargs), len(prompts), "gold")
        samples.proxy += checked_scores(proxy(**kwargs), len(prompts), "proxy")
        if reference is None:
            samples.log_ratios += [0.0] * len(prompts)
        else:
            samples.log_ratios += sequence_log_ratios(model, reference, batch).tolist()
    return samples


def mean_and_stderr(values: list[float], prompt_index: list[int]) -> tuple[float, float]:
    """(mean over all values, standard error of the mean over prompts): completions of one prompt are correlated,
    so the prompts' means are the independent draws (0.0 with one prompt)."""
    rows: dict[int, list[float]] = {}
    for index, value in zip(prompt_index, values):
        rows.setdefault(index, []).append(value)
    means = torch.tensor([sum(row) / len(row) for row in rows.values()], dtype=torch.float64)
    stderr = float(means.std() / math.sqrt(len(means))) if len(means) > 1 else 0.0
    return sum(values) / len(values), stderr


def point_of(label: str, samples: PolicySamples, source: str | None = None) -> PolicyPoint:
    """The plotted point of a policy's scored samples."""
    kl, kl_stderr = mean_and_stderr(samples.log_ratios, samples.prompt_index)
    gold, gold_stderr = mean_and_stderr(samples.gold, samples.prompt_index)
    proxy, proxy_stderr = mean_and_stderr(samples.proxy, samples.prompt_index)
    return PolicyPoint(
        label=label, kl=kl, kl_stderr=kl_stderr, gold=gold, gold_stderr=gold_stderr, proxy=proxy,
        proxy_stderr=proxy_stderr, num_completions=len(samples.gold), source=source, samples=samples,
    )  # fmt: skip


def prompt_records(prompts) -> list[dict]:
    """Prompts as records {"prompt": ..., other fields}: a list of prompts (text or chat messages), a list of dicts
    with a "prompt" key, or a `datasets.Dataset` with a "prompt" column. ValueError when there are none."""
    records = [dict(p) if isinstance(p, Mapping) else {"prompt": p} for p in prompts]
    if not records:
        raise ValueError("No prompts: the frontier is measured on held-out prompts; give at least one.")
    missing = next((i for i, record in enumerate(records) if "prompt" not in record), None)
    if missing is not None:
        raise ValueError(f"Prompt record {missing} (0-based) has no 'prompt' field: {records[missing]!r:.100}")
    return records


def policy_point(
    policy, reference, tokenizer, prompts, *, gold: Callable, proxy: Callable,
    settings: FrontierSettings | None = None, label: str = "policy",
) -> PolicyPoint:  # fmt: skip
    """A policy's point: `settings.policy_samples` completions per prompt sampled from `policy`, their mean gold and
    proxy rewards, and the sequence-level KL estimate

        KL(pi || pi_ref) ≈ 1/N sum_k sum_t [log pi(y_kt | x_k, y_k<t) - log pi_ref(y_kt | x_k, y_k<t)],   y_k ~ pi

    (`sequence_log_ratios`). `policy` and `reference` are causal LMs (a peft model too) sharing `tokenizer`; a policy
    equal to the reference gives exactly 0. The completions and per-completion values are in `.samples`.
    """
    settings = settings or FrontierSettings()
    samples = sample_and_score(
        policy, tokenizer, prompt_records(prompts), settings.policy_samples, gold=gold, proxy=proxy,
        settings=settings, reference=reference, desc=f"sampling {label}",
    )  # fmt: skip
    return point_of(label, samples)


def best_of_n_at(best_of_n: list[BestOfNPoint], kl: float, reward: str = "gold") -> float | None:
    """Best of n's `reward` at `kl`, linear between the measured n (in KL), None beyond its largest n: the curve a
    trained policy at that KL should reach, since best of n needs no training at all. A KL below n = 1's (0: a
    policy's Monte-Carlo estimate can fall just below) reads n = 1's value."""
    points = sorted(best_of_n, key=lambda p: p.kl)
    if not points or kl > points[-1].kl:
        return None
    if kl <= points[0].kl:
        return getattr(points[0], reward)
    for low, high in zip(points, points[1:]):
        if kl <= high.kl:
            share = (kl - low.kl) / (high.kl - low.kl)
            return getattr(low, reward) + share * (getattr(high, reward) - getattr(low, reward))
    return getattr(points[-1], reward)


# -- the report -------------------------------------------------------------------------------------------------------


@dataclass
class FrontierReport:
    """Everything on the plot, with what produced it; `save_json` writes it (without the per-completion samples)."""

    sources: dict[str, str]  # reference, proxy, gold
    settings: dict
    num_prompts: int
    kl_cap: float  # log M: no KL-regularised estimate can exceed it
    reference: PolicyPoint
    best_of_n: list[BestOfNPoint]
    kl_regularised_optimum: list[OptimumPoint]
    policies: list[PolicyPoint]

    def to_dict(self) -> dict:
        data = asdict(self)
        for point in [data["reference"], *data["policies"]]:
            point.pop("samples")
        return data

    def save_json(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load_json(cls, path: str | os.PathLike) -> FrontierReport:
        """The report `save_json` wrote (the per-completion samples are not in it): to redraw or compare a plot
        without sampling again."""
        try:
            data = json.loads(Path(path).read_text())
            return cls(
                sources=data["sources"], settings=data["settings"], num_prompts=data["num_prompts"],
                kl_cap=data["kl_cap"], reference=PolicyPoint(**data["reference"]),
                best_of_n=[BestOfNPoint(**point) for point in data["best_of_n"]],
                kl_regularised_optimum=[OptimumPoint(**point) for point in data["kl_regularised_optimum"]],
                policies=[PolicyPoint(**point) for point in data["policies"]],
            )  # fmt: skip
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(
                f"{path} is not a frontier report as FrontierReport.save_json writes it ({type(error).__name__}: "
                f"{error}); `rlhf-ext frontier` writes one as <output_dir>/frontier.json."
            ) from error


def reference_estimates(samples: PolicySamples, num_prompts: int, settings: FrontierSettings):
    """(best-of-n points, KL-regularised optimum points) from the reference's scored samples, M per prompt."""
    proxy = torch.tensor(samples.proxy, dtype=torch.float64).view(num_prompts, settings.num_samples)
    gold = torch.tensor(samples.gold, dtype=torch.float64).view(num_prompts, settings.num_samples)
    best_of_n = [best_of_n_point(proxy, gold, n) for n in best_of_n_sizes(settings.best_of_n)]
    optimum = [kl_regularised_optimum(proxy, gold, beta) for beta in sorted(settings.betas, reverse=True)]
    return best_of_n, optimum


def frontier_report(
    reference: str, policies: Mapping[str, str], prompts, *, gold: Callable, proxy: str | Callable,
    settings: FrontierSettings | None = None, proxy_base: str | None = None,
) -> FrontierReport:  # fmt: skip
    """Gold and proxy reward against KL to `reference` for every policy, best of n and the KL-regularised optimum.

    `reference`: a causal LM (path or Hub id); `policies`: label -> a causal LM folder, a peft adapter folder (loaded
    onto the reference), or a PPO output / checkpoint folder holding `policy/`; `prompts`: see `prompt_records`;
    `gold`: a TRL-style reward function f(prompts, completions, **kw) -> list[float]; `proxy`: a reward role folder
    (loaded onto `proxy_base`, default the reference), a reward model the K-way reward trainer saved, or a reward
    function. Every input is checked (paths, roles, tokenizer vocabularies) before a model is loaded. The reference
    is sampled M times per prompt (best of n, the optimum, and its own point at KL 0), then each policy in turn,
    one in memory at a time beside the reference.
    """
    settings = settings or FrontierSettings()
    records = prompt_records(prompts)
    tokenizer = load_tokenizer(reference, settings.trust_remote_code, "--reference")
    folders = checked_policy_folders(policies, tokenizer, settings)
    if not callable(proxy):
        check_proxy(proxy, proxy_base, settings.trust_remote_code)
    sources = {
        "reference": str(reference),
        "proxy": function_name(proxy) if callable(proxy) else str(proxy),
        "gold": function_name(gold),
    }

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reference_model = load_causal_lm(reference, settings, device)
    if not callable(proxy):
        proxy = load_proxy(proxy, proxy_base or reference, settings, device)
    scoring = dict(gold=gold, proxy=proxy, settings=settings)
    samples = sample_and_score(reference_model, tokenizer, records, settings.num_samples, desc="sampling reference",
                               **scoring)  # fmt: skip
    best_of_n, optimum = reference_estimates(samples, len(records), settings)
    points = []
    for label, folder in folders.items():
        policy = load_policy_model(folder, reference, settings, device)
        point = policy_point(policy, reference_model, tokenizer, records, label=label, **scoring)
        points.append(replace(point, source=str(policies[label])))
        del policy  # one policy in memory at a time, beside the reference
    return FrontierReport(
        sources=sources,
        settings=asdict(settings),
        num_prompts=len(records),
        kl_cap=math.log(settings.num_samples),
        reference=point_of("reference", samples, str(reference)),
        best_of_n=best_of_n,
        kl_regularised_optimum=optimum,
        policies=points,
    )


# -- the plot ---------------------------------------------------------------------------------------------------------


PANELS = (("gold", "gold reward (the judge)"), ("proxy", "proxy reward (what was optimised)"))


def draw_reference_curves(ax, report: FrontierReport, reward: str) -> None:
    """Best of n (circles, n written beside) and the KL-regularised optimum (squares, beta beside; hollow where
    unreliable, near the cap log M, which is drawn)."""
    best = report.best_of_n
    ax.plot([p.kl for p in best], [getattr(p, reward) for p in best], "o-", color="C0",
            label="best of n (reference, ranked by the proxy)")  # fmt: skip
    for p in best:
        ax.annotate(f"n={p.n}", (p.kl, getattr(p, reward)), textcoords="offset points", xytext=(3, 4), fontsize=7)
    optimum = report.kl_regularised_optimum
    ax.plot([p.kl for p in optimum], [getattr(p, reward) for p in optimum], "--", color="C1", linewidth=1)
    for p in optimum:
        face = "C1" if p.reliable else "none"
        ax.scatter(p.kl, getattr(p, reward), marker="s", facecolors=face, edgecolors="C1", zorder=3)
        ax.annotate(f"β={p.beta:g}", (p.kl, getattr(p, reward)), textcoords="offset points", xytext=(3, -10),
                    fontsize=7, color="C1")  # fmt: skip
    ax.scatter([], [], marker="s", color="C1", label="KL-regularised optimum (hollow: near the cap, unreliable)")
    ax.axvline(
        report.kl_cap,
        color="grey",
        linestyle=":",
        linewidth=1,
        label=f"cap of its KL estimate: log M = {report.kl_cap:.2f}",
    )


def policy_series(policies: list[PolicyPoint]) -> dict[str, list[PolicyPoint]]:
    """Policies grouped by the part of their label before "@": "PPO@8", "PPO@16" are checkpoints of one run, drawn
    as one curve in label order; a label without "@" is a series of its own."""
    series: dict[str, list[PolicyPoint]] = {}
    for point in policies:
        series.setdefault(point.label.split("@")[0], []).append(point)
    return series


def draw_policies(ax, report: FrontierReport, reward: str) -> None:
    """The reference (a star at KL 0) and each policy (a diamond with standard-error bars), checkpoints of one run
    joined by a line (`policy_series`) with their step written beside."""
    ax.plot(0.0, getattr(report.reference, reward), "*", color="black", markersize=11, label="reference")
    for i, (name, points) in enumerate(policy_series(report.policies).items()):
        kls, values = [p.kl for p in points], [getattr(p, reward) for p in points]
        ax.errorbar(kls, values, xerr=[p.kl_stderr for p in points],
                    yerr=[getattr(p, f"{reward}_stderr") for p in points], fmt="D-", color=f"C{i + 2}", capsize=3,
                    linewidth=1, label=name)  # fmt: skip
        for point in points:
            if "@" in point.label:
                ax.annotate(point.label.split("@", 1)[1], (point.kl, getattr(point, reward)),
                            textcoords="offset points", xytext=(3, 4), fontsize=7, color=f"C{i + 2}")  # fmt: skip


def frontier_figure(report: FrontierReport):
    """Two panels side by side, gold and proxy reward against KL: where the proxy climbs and the gold does not, the
    policy (or the best of n) over-optimises the proxy."""
    from matplotlib.figure import Figure  # optional dependency, only for the plot; no pyplot, no global backend

    fig = Figure(figsize=(12, 4.6))
    axes = fig.subplots(1, 2, sharex=True)
    for ax, (reward, title) in zip(axes, PANELS):
        draw_reference_curves(ax, report, reward)
        draw_policies(ax, report, reward)
        ax.set_xlabel("KL to the reference (nats per completion)")
        ax.set_ylabel(f"{reward} reward")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(
        f"Reward against KL: {report.num_prompts} held-out prompts, M = {report.settings['num_samples']} reference "
        f"samples each, {report.settings['policy_samples']} per policy"
    )
    fig.tight_layout()
    return fig


def plot_frontier(report: FrontierReport, path: str | os.PathLike) -> Path:
    """`frontier_figure` as a PNG at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frontier_figure(report).savefig(path, dpi=110)
    return path


# -- loading from paths -----------------------------------------------------------------------------------------------


def reward_function_from_spec(spec: str, flag: str = "--gold") -> Callable:
    """The callable `function` of module `module` named by "module:function"; ValueError saying what is wrong.

    The current folder is searched first, as TRL's GRPO script searches it for its reward functions.
    """
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"{flag} {spec!r}: expected module:function, e.g. my_rewards:gold_reward.")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(
            f"{flag} {spec}: cannot import module {module_name!r} ({err}). It must be importable from the current "
            "folder or the Python path (PYTHONPATH)."
        ) from err
    if not hasattr(module, attribute):
        raise ValueError(f"{flag} {spec}: module {module_name!r} ({module.__file__}) has no attribute {attribute!r}.")
    function = getattr(module, attribute)
    if not callable(function):
        raise ValueError(
            f"{flag} {spec}: {attribute!r} is a {type(function).__name__}, not a function; give a reward function "
            "f(prompts, completions, **kwargs) -> list[float]."
        )
    return function


def function_name(function: Callable) -> str:
    """The "module:function" name of a reward function (as --gold gives it); a callable object's own name otherwise."""
    name = getattr(function, "__qualname__", None) or getattr(function, "__name__", type(function).__name__)
    return f"{getattr(function, '__module__', None) or '?'}:{name}"


def is_adapter_folder(folder: Path) -> bool:
    return (folder / ADAPTER_CONFIG).is_file()


def policy_folder(path: str | os.PathLike, label: str) -> Path:
    """The folder that holds the policy of `path`: `path` itself when it holds a causal LM (config.json) or a peft
    adapter (adapter_config.json), or its `policy/` adapter (a PPO run's output folder or one of its checkpoints).
    FileNotFoundError for a missing folder, ValueError for a folder that holds neither, or another role."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"--policies {label}={path}: no such folder.")
    if is_adapter_folder(folder) or is_adapter_folder(folder / "policy"):
        folder = folder if is_adapter_folder(folder) else folder / "policy"
        check_folder_role(folder, "policy")  # a value or reward role folder given as a policy
        return folder
    if (folder / MODEL_CONFIG).is_file():
        return folder
    raise ValueError(
        f"--policies {label}={path} holds no policy: no {MODEL_CONFIG} (a causal LM), no {ADAPTER_CONFIG} (a peft "
        "adapter) and no policy/ adapter (a PPO output or checkpoint folder)."
    )


def checked_policy_folders(policies: Mapping[str, str], tokenizer, settings: FrontierSettings) -> dict[str, Path]:
    """{label: the folder holding the policy} (`policy_folder`), each policy's saved tokenizer checked against the
    reference's `tokenizer` (`check_same_vocabulary`)."""
    folders = {label: policy_folder(path, label) for label, path in policies.items()}
    for label, folder in folders.items():
        check_same_vocabulary(tokenizer, policy_tokenizer(folder, policies[label], settings), label)
    return folders


def load_tokenizer(name_or_path: str | os.PathLike, trust_remote_code: bool, flag: str):
    """The tokenizer of `name_or_path` (given as `flag`), with the EOS as pad token when it has none, as TRL sets it."""
    if looks_like_local_path(str(name_or_path)) and not Path(name_or_path).expanduser().is_dir():
        raise FileNotFoundError(f"{flag} {name_or_path}: no such folder.")
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def policy_tokenizer(folder: Path, given: str | os.PathLike, settings: FrontierSettings):
    """The tokenizer saved with a policy (in its folder, or in the folder given, e.g. a PPO checkpoint), or None."""
    for candidate in (folder, Path(given).expanduser()):
        if (candidate / TOKENIZER_CONFIG).is_file():
            return load_tokenizer(candidate, settings.trust_remote_code, "--policies")
    return None


def check_same_vocabulary(reference_tokenizer, tokenizer, label: str) -> None:
    """ValueError when a policy's tokenizer maps tokens to ids differently from the reference's: the KL compares the
    two models' log-probabilities of the same token ids. (No tokenizer saved with the policy: nothing to compare.)"""
    if tokenizer is None:
        return
    ours, theirs = reference_tokenizer.get_vocab(), tokenizer.get_vocab()
    if ours == theirs:
        return
    differing = sorted(set(ours.items()) ^ set(theirs.items()), key=lambda item: item[1])[0][0]
    raise ValueError(
        f"--policies {label}: its tokenizer's vocabulary differs from the reference's ({len(theirs)} tokens against "
        f"{len(ours)}; token {differing!r} is {theirs.get(differing)} there and {ours.get(differing)} in the "
        "reference). The KL to the reference compares log-probabilities of the same token ids: give the reference "
        "the policy was trained from."
    )


def load_causal_lm(name_or_path: str | os.PathLike, settings: FrontierSettings, device: torch.device):
    """A causal LM in eval mode on `device`, loaded as the PPO trainers load a policy path (TRL's
    `create_model_from_path`: the architecture from its config)."""
    model = create_model_from_path(
        str(name_or_path), dtype=settings.dtype, device_map=None, trust_remote_code=settings.trust_remote_code
    )
    return model.to(device).eval()


def load_policy_model(folder: Path, reference: str, settings: FrontierSettings, device: torch.device):
    """The policy in `folder` (see `policy_folder`): a causal LM as it is, or a peft adapter on a fresh copy of the
    reference, refused when its recorded base is another model (`check_folder_base`)."""
    if not is_adapter_folder(folder):
        return load_causal_lm(folder, settings, device)
    from peft import PeftModel

    base = load_causal_lm(reference, settings, device)
    check_folder_base(folder, "policy", base, reference)
    check_adapter_fits(base, folder)
    with copying_a_tied_head():  # a policy saved with its own copy of a tied LM head (policy_lm_head="trainable")
        return PeftModel.from_pretrained(base, str(folder)).eval()


def is_reward_role_folder(proxy: str) -> bool:
    """Whether `proxy` is a reward role folder (adapter + head), which loads onto a base as the reward role."""
    return (Path(proxy).expanduser() / HEAD_CONFIG).is_file()


def check_proxy(proxy: str, proxy_base: str | None = None, trust_remote_code: bool = False) -> None:
    """Refuse, before anything loads, a proxy (or the base of a reward role folder) that is missing, a role folder of
    another role, a model the PPO trainers would misread (`check_reward_models`: a causal LM, num_labels != 1), or a
    sequence classifier that rlhf_ext's reward trainer did not save: TRL scores such a model by its own pad-based
    pooling, which this report does not redo, so it must come as a reward function."""
    for flag, path in (("--proxy", proxy), ("--proxy_base", proxy_base)):
        if path and looks_like_local_path(path) and not Path(path).expanduser().is_dir():
            raise FileNotFoundError(f"{flag} {path}: no such folder.")
    if is_reward_role_folder(proxy):
        check_folder_role(Path(proxy).expanduser(), "reward")
        return
    check_reward_models(proxy, "--proxy")
    config = AutoConfig.from_pretrained(proxy, trust_remote_code=trust_remote_code)
    if getattr(config, SCORE_TOKEN_FIELD, None) != LAST_REAL_TOKEN:
        raise ValueError(
            f"--proxy {proxy} is a sequence classifier that rlhf_ext's reward trainer did not save; TRL scores such a "
            "model by its own pad-based pooling, which this report does not reproduce. Wrap it in a reward function "
            "f(prompts, completions, **kwargs) -> list[float] and pass --proxy module:function."
        )


def load_proxy(proxy: str, base: str, settings: FrontierSettings, device: torch.device) -> Callable:
    """The proxy reward (checked by `check_proxy`) scored as the PPO trainers score it: a reward role folder on `base`
    through `SharedBaseReward`, a reward model the K-way reward trainer saved through `scored_as_trained`; both read
    the sequence at its last real token (`rlhf_ext.models.scoring`)."""
    from .trainers import SharedBaseReward, scored_as_trained

    if is_reward_role_folder(proxy):
        args = SharedBaseArguments(reward_adapter_path=str(proxy), dtype=settings.dtype)
        shared = SharedBase.from_pretrained(base, args, trust_remote_code=settings.trust_remote_code)
        return SharedBaseReward(
            shared.to(device).eval(), load_tokenizer(base, settings.trust_remote_code, "--proxy_base")
        )
    model = AutoModelForSequenceClassification.from_pretrained(
        proxy, dtype=getattr(torch, settings.dtype), trust_remote_code=settings.trust_remote_code
    )
    return scored_as_trained(
        model.to(device).eval(), load_tokenizer(proxy, settings.trust_remote_code, "--proxy"), None
    )
