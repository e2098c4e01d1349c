"""Learning curves of PPO: TRL 1.12's PPOTrainer versus rlhf_ext's, on the same models, prompts and settings.

    python -m benchmarks.ppo_learning                                  # 6 variants x 3 seeds: table, JSON, PNG
    python -m benchmarks.ppo_learning --seeds 0 --updates 4            # a quick look
    python -m benchmarks.ppo_learning --variants trl separate          # a subset

Every variant maximises the same fixed reward model from the same initial policy and prompts with the same PPO
hyperparameters, for three seeds (the seed drives sampling and prompt order):

    trl           (a) trl==1.12.0 `trl.experimental.ppo.PPOTrainer` in its own virtual environment (made by
                  benchmarks/harness.py's `trl_baseline_python`): policy, reference, value and reward as separate
                  full models, policy and value fully trained
    separate      (b) `rlhf_ext.PPOTrainer` with the same separate-models layout and full fine-tuning: the same
                  policy, the same value model (`value_model=`), the same reward model
    shared_lora   (c) `rlhf_ext.PPOTrainer` on a `SharedBase` of the same policy weights: policy and value LoRA
                  adapters (r=16), reference = adapters off, the same reward model
    shared_trunk  (d) as (c) with `SharedBaseArguments(value_layout="policy_trunk")`: the value head on the policy
                  adapter's last hidden state
    shared_lora_lr10  (c') as (c) with 10x the learning rate (LoRA usually wants a larger one than full fine-tuning)
    shared_lora_head  (c+) as (c) with `SharedBaseArguments(policy_lm_head="trainable")`: the policy also trains its
                  own copy of the LM head (the reference, value and reward roles keep the base's)
    separate_frozen_io  (b') as (b) with the embeddings and the LM head frozen, the parameters LoRA leaves alone
                  (a diagnostic for the gap of (c))
    shared_lora_vemb  (c-v) as (c) with `SharedBaseArguments(value_lora_embeddings=True)`: the value adapter's LoRA
                  also on the input embeddings (the policy, reference and reward roles keep the base's)
    shared_lora_vemb_vlr3  (c-v') as (c-v) with the critic's learning rate 3e-3 (`value_learning_rate`)
    shared_lora_head_vemb  (c+v) (c+) and (c-v') together: the policy's LM-head copy and the value's embedding LoRA

The task, built in a temp dir before the runs (1-4 minutes): a character-level tiny Llama (`rlhf_ext.testing`) trained
briefly on random letter strings that end with EOS (the initial policy); a tiny `LlamaForSequenceClassification`
trained to score the share of vowels in the text (the reward model, frozen); the value model is the policy's
backbone with a fresh one-label `score` head (TRL 1.12's convention). Both trainers score a completion with the
reward model on the same tokens: prompt + completion up to and including the first EOS, at the last token (TRL
1.12's `get_reward` on the EOS-truncated response; for rlhf_ext a reward function given the `completion_ids`).

Logged per update (one record per rollout on both sides): `objective/scores` (mean score, after the missing-EOS
penalty), `objective/kl` (summed over tokens, mean over completions) and the explained variance of the rollout's
returns by its values over the completion tokens (rlhf_ext's `val/explained_variance`; TRL 1.12 does not log it, so
its worker computes it from the rollout's values and GAE advantages, read where TRL computes them).

Knobs set on both sides: learning rate (constant schedule), kl_coef, k1 KL, cliprange, cliprange_value, vf_coef,
gamma, lam, epochs, minibatches, response length, temperature, whitening, missing-EOS penalty, AdamW settings, no
gradient clipping (TRL 1.12's PPOTrainer clips nothing; rlhf_ext is given max_grad_norm=0). What cannot match is
listed in docs/benchmarks.md (PPO learning curves).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.harness import (
    DEFAULT_TRL_VENV,
    REPO,
    RESULTS_DIR,
    ChildRun,
    Clock,
    add_result_file_argument,
    start_child,
    trl_baseline_python,
    write_json,
)

METRICS = ("reward", "kl", "ev")
METRIC_NAMES = {"reward": "objective/scores", "kl": "objective/kl", "ev": "val/explained_variance"}
LETTERS = "abcdefghijklmnopqrstuvwxyz "
VOWELS = "aeiou"


@dataclass(frozen=True)
class Variant:
    """One trainer setup. `shared` is None for separate models, else the SharedBaseArguments overrides."""

    label: str
    trainer: str  # "trl" or "rlhf_ext"
    shared: dict | None = None
    color: str = "black"
    lr_scale: float = 1.0  # learning rate = lr_scale * --learning_rate (1: the same hyperparameters as TRL)
    frozen: tuple = ()  # separate models: policy parameters (name prefixes) kept frozen, for diagnostics
    value_learning_rate: float | None = None  # the critic's own learning rate (PPOConfig); None: the policy's


VARIANTS = {
    "trl": Variant("(a) TRL 1.12, separate models", "trl", color="tab:blue"),
    "separate": Variant("(b) rlhf_ext, separate models", "rlhf_ext", color="tab:orange"),
    "shared_lora": Variant("(c) rlhf_ext, shared base + LoRA", "rlhf_ext", shared={}, color="tab:green"),
    "shared_trunk": Variant(
        "(d) rlhf_ext, shared base, value head on policy trunk", "rlhf_ext", shared={"value_layout": "policy_trunk"},
        color="tab:red",
    ),
    "separate_frozen_io": Variant("(b') as (b), embeddings and LM head frozen (as LoRA leaves them)", "rlhf_ext",
                                  color="tab:brown", frozen=("model.embed_tokens.", "lm_head.")),
    "shared_lora_lr10": Variant("(c') as (c), 10x learning rate", "rlhf_ext", shared={}, color="tab:purple",
                                lr_scale=10.0),
    "shared_lora_head": Variant("(c+) as (c), with a trainable LM-head copy in the policy role", "rlhf_ext",
                                shared={"policy_lm_head": "trainable"}, color="tab:olive"),
    "shared_lora_vemb": Variant("(c-v) as (c), with the value adapter's LoRA on the input embeddings", "rlhf_ext",
                                shared={"value_lora_embeddings": True}, color="tab:cyan"),
    "shared_lora_vemb_vlr3": Variant("(c-v') as (c-v), critic learning rate 3e-3", "rlhf_ext",
                                     shared={"value_lora_embeddings": True}, color="tab:pink",
                                     value_learning_rate=3e-3),
    "shared_lora_head_vemb": Variant("(c+v) (c+) with (c-v')'s critic: LM-head copy, value embedding LoRA, "
                                     "value lr 3e-3", "rlhf_ext", color="tab:gray", value_learning_rate=3e-3,
                                     shared={"policy_lm_head": "trainable", "value_lora_embeddings": True}),
}  # fmt: skip
DEFAULT_VARIANTS = ["trl", "separate", "shared_lora", "shared_trunk", "shared_lora_lr10", "separate_frozen_io"]


@dataclass
class Settings:
    """Everything a worker needs; the PPO hyperparameters are the same for every variant."""

    batch_size: int = 64  # prompts (= completions) per rollout
    updates: int = 20
    response_length: int = 16
    prompt_length: int = 8
    num_ppo_epochs: int = 4
    num_mini_batches: int = 1
    learning_rate: float = 1e-3
    kl_coef: float = 0.05
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    temperature: float = 1.0
    whiten_rewards: bool = False
    missing_eos_penalty: float = 1.0
    lora_r: int = 16
    lora_alpha: int = 32
    hidden_size: int = 64
    num_layers: int = 2
    extra: dict = field(default_factory=dict)

    @property
    def hyperparameters(self) -> dict:
        keys = ("learning_rate", "kl_coef", "cliprange", "cliprange_value", "vf_coef", "gamma", "lam",
                "whiten_rewards", "missing_eos_penalty", "num_ppo_epochs", "temperature")  # fmt: skip
        return {k: getattr(self, k) for k in keys}


# -- the shared setup: initial policy, value model, reward model, prompts --------------------------


def random_text(rng, length: int, vowel_share: float | None = None) -> str:
    """`length` characters of LETTERS (a `random.Random`); with `vowel_share`, each a vowel with that probability."""
    if vowel_share is None:
        return "".join(rng.choice(LETTERS) for _ in range(length))
    others = [c for c in LETTERS if c not in VOWELS]
    return "".join(rng.choice(VOWELS if rng.random() < vowel_share else others) for _ in range(length))


def vowel_share(text: str) -> float:
    return sum(c in VOWELS for c in text) / max(len(text), 1)


def _train(model, batches, lr: float, loss_fn) -> float:
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    loss = torch.tensor(0.0)
    for batch in batches:
        loss = loss_fn(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return loss.item()


def prepare(directory: Path, s: Settings, num_prompts: int) -> dict:
    """Save policy, value model, reward model, tokenizer and prompts under `directory`; returns a summary."""
    import torch
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    from rlhf_ext.testing import tiny_llama_config, tiny_tokenizer

    torch.manual_seed(0)
    rng = random.Random(0)
    tokenizer = tiny_tokenizer()
    eos = tokenizer.eos_token_id
    config = tiny_llama_config(hidden_size=s.hidden_size, num_layers=s.num_layers)
    summary = {}

    def encode(texts: list[str], add_eos: list[bool]) -> tuple:
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] * e for t, e in zip(texts, add_eos)]
        width = max(map(len, ids))
        input_ids = torch.full((len(ids), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return input_ids, mask

    # The initial policy: random letter strings, a fixed-length prompt then a response of 3 .. R-4 letters and EOS
    # (so most samples end within R tokens and the missing-EOS penalty is rare at first). Loss on every token.
    def sft_batch(n=64):
        texts = [random_text(rng, s.prompt_length + rng.randrange(3, s.response_length - 3)) for _ in range(n)]
        return encode(texts, [True] * n)

    def lm_loss(model, batch):
        input_ids, mask = batch
        labels = input_ids.masked_fill(mask == 0, -100)
        return model(input_ids=input_ids, attention_mask=mask, labels=labels).loss

    policy = LlamaForCausalLM(config)
    clock = Clock(cpu=False)
    summary["sft_final_loss"] = _train(policy, (sft_batch() for _ in range(s.extra.get("sft_steps", 300))), 3e-3,
                                       lm_loss)  # fmt: skip
    summary["sft_seconds"] = clock.lap().wall_s
    policy.save_pretrained(directory / "policy")
    tokenizer.save_pretrained(directory / "policy")
    tokenizer.save_pretrained(directory / "reward")
    # TRL 1.12's value model convention: the policy's backbone with a fresh one-label score head
    torch.manual_seed(1)
    value = LlamaForSequenceClassification.from_pretrained(directory / "policy", num_labels=1)
    value.save_pretrained(directory / "value")

    # The reward model: regress the vowel share of prompt + response text, scored at the last token, with and
    # without a final EOS (completions that run out of tokens have none), over strings of any vowel share.
    def rm_batch(n=64):
        texts, targets = [], []
        for _ in range(n):
            share = rng.random()
            text = random_text(rng, s.prompt_length) + random_text(rng, rng.randrange(1, s.response_length + 1), share)
            texts.append(text)
            targets.append(vowel_share(text))
        add_eos = [rng.random() < 0.8 for _ in range(n)]
        return (*encode(texts, add_eos), torch.tensor(targets))

    def rm_loss(model, batch):
        input_ids, mask, target = batch
        return torch.nn.functional.mse_loss(model(input_ids=input_ids, attention_mask=mask).logits[:, 0], target)

    torch.manual_seed(2)
    reward = LlamaForSequenceClassification(tiny_llama_config(hidden_size=64, num_layers=2, num_labels=1))
    clock = Clock(cpu=False)
    _train(reward, (rm_batch() for _ in range(s.extra.get("rm_steps", 150))), 3e-3, rm_loss)
    summary["rm_seconds"] = clock.lap().wall_s
    with torch.no_grad():
        input_ids, mask, target = rm_batch(512)
        pred = reward(input_ids=input_ids, attention_mask=mask).logits[:, 0]
        summary["rm_heldout_r2"] = 1 - ((pred - target) ** 2).mean().item() / target.var().item()
        summary["rm_heldout_rmse"] = ((pred - target) ** 2).mean().sqrt().item()
    reward.save_pretrained(directory / "reward")

    prompts = [random_text(rng, s.prompt_length) for _ in range(num_prompts)]
    (directory / "prompts.json").write_text(json.dumps(prompts))
    return summary


# -- scoring: the same tokens on both sides -------------------------------------------------------


def score_token_ids(reward_model, sequences: list[list[int]], pad_token_id: int):
    """Score of each token sequence at its last token, right-padded: what TRL 1.12's `get_reward` computes for
    the EOS-truncated prompt + response (positions 0.. on real tokens, pad masked out)."""
    import torch

    width = max(map(len, sequences))
    input_ids = torch.full((len(sequences), width), pad_token_id)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, row in enumerate(sequences):
        input_ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    backbone = getattr(reward_model, reward_model.base_model_prefix)
    with torch.no_grad():
        hidden = backbone(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
        logits = reward_model.score(hidden)[:, :, 0]
    return logits[torch.arange(len(sequences)), mask.sum(1) - 1]


class TokenReward:
    """The reward model as a TRL reward function scored on token ids: prompt ids + `completion_ids` (GRPO passes
    the completion up to and including its EOS), the tokens TRL 1.12 scores. (GRPO's own path for a model reward
    re-tokenizes the decoded text, which drops the EOS: different tokens from TRL 1.12's.)"""

    __name__ = "vowel_reward_model"

    def __init__(self, reward_model, tokenizer):
        self.model = reward_model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.special_tokens_before_eos = 0  # pad/bos sampled inside a completion: TRL would cut or mask there

    def __call__(self, prompts, completions, completion_ids, **kwargs) -> list[float]:
        prompt_ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        special = {self.tokenizer.pad_token_id, self.tokenizer.bos_token_id}
        self.special_tokens_before_eos += sum(t in special for ids in completion_ids for t in ids)
        sequences = [p + list(c) for p, c in zip(prompt_ids, completion_ids, strict=True)]
        return score_token_ids(self.model, sequences, self.tokenizer.pad_token_id).tolist()


# -- workers: one per process ----------------------------------------------------------------------


def _log_recorder(records: list):
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "objective/scores" in logs:
                records.append(dict(logs))

    return Recorder()


def _common_training_args(s: Settings, seed: int) -> dict:
    return dict(
        learning_rate=s.learning_rate, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, optim="adamw_torch", kl_coef=s.kl_coef,
        kl_estimator="k1", cliprange=s.cliprange, cliprange_value=s.cliprange_value, vf_coef=s.vf_coef, gamma=s.gamma,
        lam=s.lam, whiten_rewards=s.whiten_rewards, missing_eos_penalty=s.missing_eos_penalty,
        num_ppo_epochs=s.num_ppo_epochs, temperature=s.temperature, gradient_accumulation_steps=1, report_to=[],
        bf16=False, use_cpu=True, save_strategy="no", seed=seed, disable_tqdm=True,
    )  # fmt: skip


def run_trl(directory: Path, s: Settings, seed: int) -> dict:
    import torch
    import trl.experimental.ppo.ppo_trainer as trl_ppo
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(directory / "policy", padding_side="left")
    prompts = json.loads((directory / "prompts.json").read_text())
    dataset = Dataset.from_dict({"input_ids": [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]})
    config = PPOConfig(
        output_dir=str(directory / f"trl_out_{seed}"), per_device_train_batch_size=s.batch_size,
        num_mini_batches=s.num_mini_batches, total_episodes=s.batch_size * s.updates,
        response_length=s.response_length, stop_token="eos", local_rollout_forward_batch_size=s.batch_size,
        num_sample_generations=0, logging_steps=1, **_common_training_args(s, seed),
    )  # fmt: skip
    value_model = AutoModelForSequenceClassification.from_pretrained(directory / "value", num_labels=1)

    # TRL 1.12 logs no explained variance: record the rollout's values (its get_reward call on the value model) and
    # the raw GAE advantages (its masked_whiten call on them, mask = real response tokens), returns = A + V.
    captured, ev = {}, []
    special = [0]
    get_reward, masked_whiten = trl_ppo.get_reward, trl_ppo.masked_whiten

    def recording_get_reward(model, query_responses, pad_token_id, context_length):
        out = get_reward(model, query_responses, pad_token_id, context_length)
        if model is value_model:
            captured["values"] = out[0][:, context_length - 1 : -1].squeeze(-1)
            responses = query_responses[:, context_length:]
            before_eos = torch.cumsum(responses == tokenizer.eos_token_id, 1) == 0
            special[0] += int(((responses == tokenizer.bos_token_id) | (responses == tokenizer.pad_token_id))
                               [before_eos].sum())  # fmt: skip
        return out

    def recording_masked_whiten(advantages, mask, shift_mean=True):
        if shift_mean and "values" in captured:  # the advantages call (the rewards one has shift_mean=False)
            values = captured.pop("values")
            ev.append(explained_variance(advantages + values, values, mask))
        return masked_whiten(advantages, mask, shift_mean)

    trl_ppo.get_reward, trl_ppo.masked_whiten = recording_get_reward, recording_masked_whiten
    records: list[dict] = []
    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=AutoModelForCausalLM.from_pretrained(directory / "policy"),
        ref_model=AutoModelForCausalLM.from_pretrained(directory / "policy"),
        reward_model=AutoModelForSequenceClassification.from_pretrained(directory / "reward", num_labels=1),
        value_model=value_model,
        train_dataset=dataset,
        callbacks=[_log_recorder(records)],
    )
    trainer.train()
    if len(ev) != len(records):
        raise RuntimeError(f"captured {len(ev)} explained variances for {len(records)} updates")
    for record, value in zip(records, ev):
        record["val/explained_variance"] = value
    return {"records": records, "special_tokens_before_eos": special[0], "args": _effective_args(config)}


def explained_variance(returns, values, mask) -> float:
    """1 - Var(R - V) / Var(R) over mask (population variances), as rlhf_ext's `val/explained_variance`."""
    m = mask.float()
    n = m.sum()
    r, e = returns * m, (returns - values) * m
    var_r = (r**2).sum() / n - (r.sum() / n) ** 2
    var_e = (e**2).sum() / n - (e.sum() / n) ** 2
    return float(1 - var_e / var_r.clamp(min=1e-8))


def run_rlhf_ext(directory: Path, s: Settings, seed: int, variant: Variant) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_ext.trainers.ppo.config import PPOConfig
    from rlhf_ext.trainers.ppo.trainer import PPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(directory / "policy", padding_side="left")
    prompts = json.loads((directory / "prompts.json").read_text())
    if s.batch_size % s.num_mini_batches:
        raise ValueError("batch_size must be a multiple of num_mini_batches")
    steps_per_update = s.num_ppo_epochs * s.num_mini_batches
    config = PPOConfig(
        output_dir=str(directory / f"rlhf_ext_out_{seed}"),
        per_device_train_batch_size=s.batch_size // s.num_mini_batches, steps_per_generation=s.num_mini_batches,
        max_steps=s.updates * steps_per_update,
        max_completion_length=s.response_length, whiten_advantages=True, max_grad_norm=0.0,
        gradient_checkpointing=False, logging_steps=steps_per_update, loss_aggregation="token", top_k=0, top_p=1.0,
        **_common_training_args(s, seed), **value_learning_rate_args(variant),
    )  # fmt: skip
    reward = TokenReward(AutoModelForSequenceClassification.from_pretrained(directory / "reward", num_labels=1),
                         tokenizer)  # fmt: skip
    model, value_model = build_models(directory, s, seed, variant)
    records: list[dict] = []
    trainer = PPOTrainer(
        model,
        reward_funcs=[reward],
        args=config,
        value_model=value_model,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tokenizer,
        callbacks=[_log_recorder(records)],
    )
    trainer.train()
    return {"records": records, "special_tokens_before_eos": reward.special_tokens_before_eos,
            "args": _effective_args(config)}  # fmt: skip


def value_learning_rate_args(variant: Variant) -> dict:
    """PPOConfig's `value_learning_rate` when the variant gives the critic its own, else nothing (the policy's lr)."""
    return {} if variant.value_learning_rate is None else {"value_learning_rate": variant.value_learning_rate}


def build_models(directory: Path, s: Settings, seed: int, variant: Variant) -> tuple:
    """(policy, value model) of an rlhf_ext variant: separate full models, or a `SharedBase` and None.

    Seeded first: the shared base draws its LoRA A matrices and value head when it is built, before the Trainer
    seeds, so without it two runs with the same seed would start from different adapters.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, set_seed

    set_seed(seed)
    if variant.shared is not None:
        from rlhf_ext.models import SharedBase, SharedBaseArguments

        shared_args = SharedBaseArguments(lora_r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=0.0, **variant.shared)
        return SharedBase.from_pretrained(str(directory / "policy"), shared_args), None
    model = AutoModelForCausalLM.from_pretrained(directory / "policy")
    for name, param in model.named_parameters():
        if name.startswith(variant.frozen):
            param.requires_grad_(False)
    return model, AutoModelForSequenceClassification.from_pretrained(directory / "value", num_labels=1)


def _effective_args(config) -> dict:
    """The settings each trainer ran with, as it read them (to check that both sides match)."""
    names = ("learning_rate", "lr_scheduler_type", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "optim",
             "max_grad_norm", "kl_coef", "kl_estimator", "cliprange", "cliprange_value", "vf_coef", "gamma", "lam",
             "whiten_rewards", "missing_eos_penalty", "num_ppo_epochs", "temperature", "seed")  # fmt: skip
    return {n: str(getattr(config, n, None)) for n in names}


def worker(variant_name: str, directory: Path, seed: int) -> dict:
    """Train one variant with one seed on what `prepare` saved in `directory`; its curves and logs."""
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    s = Settings(**json.loads((directory / "settings.json").read_text()))
    variant = VARIANTS[variant_name]
    s.learning_rate *= variant.lr_scale
    clock = Clock(cpu=False)
    if variant.trainer == "trl":
        out = run_trl(directory, s, seed)
    else:
        out = run_rlhf_ext(directory, s, seed, variant)
    curves = {m: [r.get(METRIC_NAMES[m], float("nan")) for r in out["records"]] for m in METRICS}
    return {"variant": variant_name, "seed": seed, "seconds": clock.lap().wall_s, **curves,
            "special_tokens_before_eos": out["special_tokens_before_eos"], "args": out["args"],
            "logs": out["records"]}  # fmt: skip


# -- the driver ------------------------------------------------------------------------------------


def spread(values: list[float]) -> tuple[float, float, float]:
    """(mean, min, max) of the finite values (NaN if none)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return (math.nan, math.nan, math.nan)
    return (statistics.fmean(finite), min(finite), max(finite))


def summarize(runs: list[dict], variants: list[str]) -> dict:
    """{variant: {metric: [(mean, min, max) per update]}} over the seeds of each variant."""
    out = {}
    for v in variants:
        per_seed = [r for r in runs if r["variant"] == v]
        out[v] = {}
        for m in METRICS:
            length = max((len(r[m]) for r in per_seed), default=0)
            out[v][m] = [spread([r[m][u] for r in per_seed if u < len(r[m])]) for u in range(length)]
    return out


def within(summary: dict, variant: str, reference: str, metric: str = "reward", slack: float = 0.0) -> list[bool]:
    """Per update: whether `variant`'s seed mean lies inside `reference`'s min-max band (widened by `slack`)."""
    flags = []
    for (mean, _, _), (_, lo, hi) in zip(summary[variant][metric], summary[reference][metric]):
        flags.append(lo - slack <= mean <= hi + slack)
    return flags


def overlaps(summary: dict, variant: str, reference: str, metric: str = "reward") -> list[bool]:
    """Per update: whether the two variants' min-max bands over seeds overlap."""
    pairs = zip(summary[variant][metric], summary[reference][metric])
    return [lo_v <= hi_r and lo_r <= hi_v for (_, lo_v, hi_v), (_, lo_r, hi_r) in pairs]


def seed_average_gap(runs: list[dict], variant: str, reference: str, metric: str = "reward") -> dict:
    """The gap in each seed's average over updates (the seeds are the independent units): difference of the
    means of `variant` and `reference`, its standard error (Welch) and their ratio."""

    def averages(name):
        return [statistics.fmean(r[metric]) for r in runs if r["variant"] == name]

    a, b = averages(reference), averages(variant)
    diff = statistics.fmean(b) - statistics.fmean(a)
    se = math.sqrt((statistics.variance(a) / len(a) if len(a) > 1 else 0.0)
                   + (statistics.variance(b) / len(b) if len(b) > 1 else 0.0))  # fmt: skip
    return {"reference": a, "variant": b, "difference": diff, "standard_error": se, "t": diff / se if se else math.nan}


FRONTIER_KLS = (0.2, 0.5, 1.0)


def score_at_kl(rewards: list[float], kls: list[float], target: float) -> float:
    """A run's score when its KL first reaches `target`, linearly interpolated in KL between that update and the one
    before (Gao et al. 2022 compare methods at matched KL, not at matched steps); NaN if it never does."""
    for u, kl in enumerate(kls):
        if kl >= target:
            if u == 0 or kls[u - 1] >= kl:
                return rewards[u]
            w = (target - kls[u - 1]) / (kl - kls[u - 1])
            return rewards[u - 1] + w * (rewards[u] - rewards[u - 1])
    return math.nan


def frontier(runs: list[dict], variant: str, kls=FRONTIER_KLS) -> dict:
    """Per KL target, then "final" (score, KL at the last update): the seeds' values (run order), their median and
    how many seeds reached the target."""
    per_seed = [r for r in runs if r["variant"] == variant]
    rows = {f"kl {t:g}": [score_at_kl(r["reward"], r["kl"], t) for r in per_seed] for t in kls}
    rows["final"] = [r["reward"][-1] for r in per_seed]
    rows["final kl"] = [r["kl"][-1] for r in per_seed]
    out = {}
    for name, values in rows.items():
        finite = [v for v in values if math.isfinite(v)]
        out[name] = {"seeds": values, "reached": len(finite),
                     "median": statistics.median(finite) if finite else math.nan}  # fmt: skip
    return out


def format_frontier(runs: list[dict], variants: list[str]) -> str:
    """Score at KL 0.2 / 0.5 / 1.0 and the final score and KL per variant: median [min, max] over the seeds that
    reached it (n/N when not all did)."""
    lines = [f"{'variant':<18}" + "".join(f"{'score at KL ' + format(t, 'g'):>26}" for t in FRONTIER_KLS)
             + f"{'final score':>26}{'final KL':>26}"]  # fmt: skip
    for v in variants:
        cells = []
        for entry in frontier(runs, v).values():
            finite = [x for x in entry["seeds"] if math.isfinite(x)]
            n = f" {entry['reached']}/{len(entry['seeds'])}" if entry["reached"] < len(entry["seeds"]) else ""
            cells.append(f"{entry['median']:.3f} [{min(finite):.3f},{max(finite):.3f}]{n}" if finite else "not reached")
        lines.append(f"{v:<18}" + "".join(f"{c:>26}" for c in cells))
    return "\n".join(lines)


def format_table(summary: dict, variants: list[str], every: int = 1) -> str:
    """Update, then per variant mean [min, max] of reward, KL and explained variance."""

    def cell(t, digits):
        mean, lo, hi = t
        return f"{mean:.{digits}f} [{lo:.{digits}f},{hi:.{digits}f}]" if math.isfinite(mean) else "-"

    header = ["upd"] + [f"{v}:{m}" for v in variants for m in METRICS]
    widths = {"reward": 19, "kl": 19, "ev": 20}
    lines = ["  ".join([f"{header[0]:>3}"] + [f"{h:>{widths[h.split(':')[1]]}}" for h in header[1:]])]
    updates = max(len(summary[v]["reward"]) for v in variants)
    for u in range(updates):
        if u % every and u != updates - 1:
            continue
        row = [f"{u + 1:>3}"]
        for v in variants:
            for m, digits in (("reward", 3), ("kl", 2), ("ev", 2)):
                values = summary[v][m]
                row.append(f"{cell(values[u], digits) if u < len(values) else '-':>{widths[m]}}")
        lines.append("  ".join(row))
    return "\n".join(lines)


def plot(summary: dict, variants: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    labels = {"reward": "mean score (objective/scores)", "kl": "KL to reference (objective/kl)",
              "ev": "explained variance"}  # fmt: skip
    for ax, m in zip(axes, METRICS):
        for v in variants:
            rows = summary[v][m]
            x = list(range(1, len(rows) + 1))
            ax.plot(x, [r[0] for r in rows], color=VARIANTS[v].color, label=VARIANTS[v].label)
            ax.fill_between(x, [r[1] for r in rows], [r[2] for r in rows], color=VARIANTS[v].color, alpha=0.2)
        ax.set_xlabel("PPO update")
        ax.set_title(labels[m])
        ax.grid(alpha=0.3)
        if m == "ev":
            ax.set_ylim(bottom=max(-1.5, ax.get_ylim()[0]))
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def start_worker(python: Path, variant: str, directory: Path, seed: int, threads: int) -> ChildRun:
    """Start one run (variant, seed) in its own process; its result and log go to `directory`."""
    args = ["--worker", variant, "--directory", str(directory), "--seed", str(seed)]
    env = {"OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    return start_child("benchmarks.ppo_learning", args, directory / f"{variant}-{seed}.json", python=python, env=env)


def main() -> None:
    defaults = Settings()
    paragraphs = __doc__.split("\n\n")
    parser = argparse.ArgumentParser(usage="%(prog)s [--variants V ...] [--seeds S ...] [--updates N] [options]",
                                     description="\n\n".join(paragraphs[:2]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS),
                        help=f"default {' '.join(DEFAULT_VARIANTS)}; 'trl' is the reference of the comparison")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    for name in ("batch_size", "updates", "response_length", "prompt_length", "num_ppo_epochs", "num_mini_batches",
                 "hidden_size", "num_layers", "lora_r", "lora_alpha"):
        parser.add_argument(f"--{name}", type=int, default=getattr(defaults, name))
    for name in ("learning_rate", "kl_coef", "cliprange", "cliprange_value", "vf_coef", "gamma", "lam", "temperature",
                 "missing_eos_penalty"):
        parser.add_argument(f"--{name}", type=float, default=getattr(defaults, name))
    parser.add_argument("--whiten_rewards", action="store_true")
    parser.add_argument("--parallel", type=int, default=2, help="workers at a time (each with --threads threads)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each worker")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "ppo_learning.json")
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "images" / "ppo_learning.png")
    parser.add_argument("--venv", type=Path, default=DEFAULT_TRL_VENV)
    parser.add_argument("--keep", type=Path, help="prepare into this folder and keep it (logs, models)")
    parser.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--directory", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    add_result_file_argument(parser)
    args = parser.parse_args()
    if args.worker:
        write_json(args.result_file, worker(args.worker, args.directory, args.seed))
        return

    settings = Settings(**{k: getattr(args, k) for k in Settings.__dataclass_fields__ if k != "extra"})
    clock = Clock(cpu=False)
    pythons = {"rlhf_ext": Path(sys.executable)}
    if any(VARIANTS[v].trainer == "trl" for v in args.variants):
        pythons["trl"] = trl_baseline_python(args.venv)
    tmp = None if args.keep else tempfile.TemporaryDirectory()
    directory = args.keep or Path(tmp.name)
    directory.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    num_prompts = settings.batch_size * settings.updates
    key = {k: getattr(settings, k) for k in ("prompt_length", "response_length", "hidden_size", "num_layers")}
    done = directory / "prepared.json"
    earlier = json.loads(done.read_text()) if args.keep and done.exists() else None
    if earlier and earlier["key"] == key and earlier["num_prompts"] >= num_prompts:
        preparation = earlier["summary"]  # --keep: reuse what an earlier run prepared in that folder
    else:
        preparation = prepare(directory, settings, num_prompts)
        done.write_text(json.dumps({"key": key, "num_prompts": num_prompts, "summary": preparation}))
    (directory / "settings.json").write_text(json.dumps(settings.__dict__))
    prepare_s = clock.lap().wall_s
    print(f"prepared in {prepare_s:.0f}s: {preparation}", file=sys.stderr, flush=True)

    jobs = [(v, seed) for seed in args.seeds for v in args.variants]
    runs, running = [], []
    while jobs or running:
        while jobs and len(running) < args.parallel:
            v, seed = jobs.pop(0)
            running.append((v, seed, start_worker(pythons[VARIANTS[v].trainer], v, directory, seed, args.threads)))
        v, seed, child = running.pop(0)
        runs.append(child.wait())
        print(f"{v} seed {seed}: {runs[-1]['seconds']:.0f}s, final reward {runs[-1]['reward'][-1]:.3f}",
              file=sys.stderr, flush=True)  # fmt: skip
    wall = prepare_s + clock.lap().wall_s
    if tmp is not None:
        tmp.cleanup()

    variants = args.variants
    summary = summarize(runs, variants)
    title = (f"PPO, {len(args.seeds)} seeds (mean, min-max band): batch {settings.batch_size}, "
             f"{settings.response_length}-token responses, {settings.num_ppo_epochs} epochs x "
             f"{settings.num_mini_batches} minibatch(es), lr {settings.learning_rate:g}, "
             f"kl_coef {settings.kl_coef:g}")  # fmt: skip
    print(f"\n{title}; wall {wall / 60:.1f} min\n")
    for v in variants:
        print(f"  {v:<13} {VARIANTS[v].label}")
    print()
    print(format_table(summary, variants))
    print("\nScore against KL to the reference, median [min, max] over seeds:\n")
    print(format_frontier(runs, variants))
    checks = {}
    if "trl" in variants:
        for v in variants:
            if v == "trl":
                continue
            inside = within(summary, v, "trl")
            overlap = overlaps(summary, v, "trl")
            final_ok = summary[v]["reward"][-1][0] >= summary["trl"]["reward"][-1][1]
            gap = seed_average_gap(runs, v, "trl")
            checks[v] = {"mean_inside_trl_band": inside, "bands_overlap": overlap,
                         "final_mean_reward_reaches_trl_min": final_ok, "seed_average_gap": gap}  # fmt: skip
            outside = [i + 1 for i, ok in enumerate(inside) if not ok]
            print(f"\n{v}: mean reward inside TRL's seed band at {sum(inside)}/{len(inside)} updates"
                  f"{' (outside at ' + str(outside) + ')' if outside else ''}; bands overlap at "
                  f"{sum(overlap)}/{len(overlap)}; final mean {summary[v]['reward'][-1][0]:.3f} vs TRL "
                  f"{summary['trl']['reward'][-1][0]:.3f} [{summary['trl']['reward'][-1][1]:.3f},"
                  f"{summary['trl']['reward'][-1][2]:.3f}]; reward averaged over updates, per seed: "
                  f"{gap['difference']:+.3f} +- {gap['standard_error']:.3f} vs TRL (t = {gap['t']:.1f})")  # fmt: skip
    command = "python -m benchmarks.ppo_learning " + " ".join(sys.argv[1:])
    git = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True)
    write_json(args.output, {
        "command": command.strip(), "git": git.stdout.strip(), "wall_seconds": wall, "settings": settings.__dict__,
        "preparation": preparation,
        "variants": {v: VARIANTS[v].label for v in variants}, "summary": summary, "checks": checks,
        "frontier": {v: frontier(runs, v) for v in variants}, "runs": runs,
    }, indent=1)  # fmt: skip
    plot(summary, variants, args.plot, title)
    print(f"\nwrote {args.output} and {args.plot}")


if __name__ == "__main__":
    main()
