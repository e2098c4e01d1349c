"""OnlinePlackettLuceTrainer on tiny models: the ranking, the loss it optimises (K-way and K=2), what trains,
learning, checkpoints and resume, gradient checkpointing, bad rewards, metrics, and the recipe."""

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from safetensors.torch import load_file
from scripts import load_recipe

from rlhf_ext.models import SharedBase, SharedBaseArguments, save_adapter_with_head
from rlhf_ext.ops import dpo_plackett_luce_loss, plackett_luce_loss
from rlhf_ext.testing import StopAfter, fraction_of_a, randomize_lora, save_tiny_model, tiny_causal_lm
from rlhf_ext.trainers import SharedBaseReward
from rlhf_ext.trainers.kway.online import OnlinePlackettLuceConfig, OnlinePlackettLuceTrainer, rank_groups

ROOT = Path(__file__).resolve().parents[1]
LORA = dict(lora_r=4, lora_alpha=8, lora_dropout=0.0)
PROMPTS = ["abc", "hello", "xy", "qrs"]
GRADIENT_CHECKPOINTING = [True, False]  # True: TRL's default


@pytest.fixture(scope="module")
def reward_folder(tmp_path_factory):
    """An adapter + head folder with random weights, loadable as the reward role."""
    donor = SharedBase(tiny_causal_lm(seed=0), SharedBaseArguments(**LORA))
    randomize_lora(donor.peft_model, "value", seed=3)
    folder = tmp_path_factory.mktemp("reward") / "reward"
    return str(save_adapter_with_head(donor.peft_model, "value", donor.heads["value"], folder, "reward"))


def make_shared(reward_folder, policy_seed: int | None = 5) -> SharedBase:
    shared = SharedBase(tiny_causal_lm(seed=0), SharedBaseArguments(reward_adapter_path=reward_folder, **LORA))
    if policy_seed is not None:
        randomize_lora(shared.peft_model, "policy", seed=policy_seed, scale=0.1)  # policy != reference
    return shared


def config(tmp_path, **overrides) -> OnlinePlackettLuceConfig:
    kwargs = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=4, max_completion_length=6,
        max_steps=1, learning_rate=1e-2, dpo_beta=0.5, report_to=[], use_cpu=True, bf16=False,
        gradient_checkpointing=False, save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
    )  # fmt: skip
    kwargs.update(overrides)
    return OnlinePlackettLuceConfig(**kwargs)


def prompts(n: int = 8) -> Dataset:
    return Dataset.from_dict({"prompt": (PROMPTS * n)[:n]})


def rollout(trainer) -> dict:
    """One generation batch as `_prepare_inputs` gets it: groups of K completions [G, K, ...] in ranked order."""
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's training loop, which we bypass here
    inputs = [{"prompt": p} for p in PROMPTS[:2] for _ in range(trainer.num_generations)]
    return trainer._generate_and_score_completions(inputs)


def sequence_logps(logits: torch.Tensor, completion_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_t log softmax(logits)[y_t] over the real completion tokens, from plain logits [N, P + C, V]."""
    length = completion_ids.size(1)
    log_probs = logits[:, -length - 1 : -1].float().log_softmax(-1)
    return (log_probs.gather(-1, completion_ids[..., None]).squeeze(-1) * mask).sum(dim=1)


def independent_terms(shared: SharedBase, tokenizer, batch: dict):
    """Rewards, policy and reference sequence log-probs [G, K], computed without the trainer."""
    groups, k = batch["completion_ids"].shape[:2]
    flat = {key: batch[key].flatten(0, 1) for key in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")}
    ids = torch.cat([flat["prompt_ids"], flat["completion_ids"]], dim=1)
    mask = torch.cat([flat["prompt_mask"], flat["completion_mask"]], dim=1)
    with torch.no_grad():
        policy = sequence_logps(shared.policy_logits(ids, mask), flat["completion_ids"], flat["completion_mask"])
        reference = sequence_logps(shared.reference_logits(ids, mask), flat["completion_ids"], flat["completion_mask"])
    texts = tokenizer.batch_decode(flat["prompt_ids"], skip_special_tokens=True)
    completions = tokenizer.batch_decode(flat["completion_ids"], skip_special_tokens=True)
    rewards = torch.tensor(SharedBaseReward(shared, tokenizer)(texts, completions))
    return rewards.view(groups, k), policy.view(groups, k), reference.view(groups, k)


def snapshot(named_params) -> dict:
    return {name: p.detach().clone() for name, p in named_params}


def changed(before: dict, named_params) -> set:
    return {name for name, p in named_params if name in before and not torch.equal(before[name], p)}


# ----------------------------------------------------------------------------- the ranking


def test_rank_groups_orders_by_reward_cuts_at_the_first_tie_and_drops_unscored():
    scores = torch.tensor([[1.0, 5.0, 3.0, 2.0], [5.0, 3.0, 3.0, 1.0], [2.0, 2.0, 1.0, 0.0], [0.0, 9.0, 1.0, 4.0]])
    scored = torch.tensor([[True] * 4, [True] * 4, [True] * 4, [True, False, False, False]])
    order, mask, depth = rank_groups(scores, scored)
    assert order[0].tolist() == [1, 2, 3, 0] and depth[0] == 3  # full ranking: K - 1 places
    assert order[1].tolist() == [0, 1, 2, 3] and depth[1] == 1  # [5, 3, 3, 1]: only "5 beats the rest"
    assert depth[2] == 0  # tie at the top: nothing known
    assert mask[3].tolist() == [True, False, False, False] and depth[3] == 0  # one scored completion
    assert order[3, 0] == 0  # unscored ones go last whatever their (NaN-replaced) score
    _, _, capped = rank_groups(scores, scored, top_m=2)
    assert capped.tolist() == [2, 1, 0, 0]


def test_partial_nan_group_ranks_the_scored_completions():
    scores = torch.tensor([[1.0, float("nan"), 3.0, 2.0]])
    order, mask, depth = rank_groups(scores, torch.isfinite(scores))
    assert order.tolist() == [[2, 3, 0, 1]] and mask.tolist() == [[True, True, True, False]] and depth.item() == 2


# ----------------------------------------------------------------------------- the loss optimised


@pytest.mark.parametrize("gradient_checkpointing", GRADIENT_CHECKPOINTING)
@pytest.mark.parametrize("length_normalization", [False, True])
def test_loss_optimised_equals_dpo_plackett_luce_loss_of_the_reward_ranking(
    tmp_path, reward_folder, left_tokenizer, gradient_checkpointing, length_normalization
):
    shared = make_shared(reward_folder)
    args = config(tmp_path, gradient_checkpointing=gradient_checkpointing, length_normalization=length_normalization)
    trainer = OnlinePlackettLuceTrainer(shared, args=args, train_dataset=prompts(), processing_class=left_tokenizer)
    batch = rollout(trainer)
    assert batch["completion_ids"].shape[:2] == (2, 4)
    rewards, policy, reference = independent_terms(shared, left_tokenizer, batch)
    # the trainer put each group in the order its rewards give, best first, with no ties (continuous scores)
    assert (rewards[:, :-1] > rewards[:, 1:]).all(), rewards
    assert batch["depth"].tolist() == [3, 3]
    if length_normalization:
        lengths = batch["completion_mask"].sum(dim=2).clamp(min=1)
        policy, reference = policy / lengths, reference / lengths
    expected = dpo_plackett_luce_loss(policy, reference, beta=args.dpo_beta).mean()
    loss = trainer._compute_loss(trainer.model, batch)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gradient_checkpointing", GRADIENT_CHECKPOINTING)
def test_robust_rho_optimises_the_mixture_with_the_worst_order_of_the_implicit_rewards(
    tmp_path, reward_folder, left_tokenizer, gradient_checkpointing
):
    shared = make_shared(reward_folder)
    args = config(tmp_path, gradient_checkpointing=gradient_checkpointing, robust_rho=0.3)
    trainer = OnlinePlackettLuceTrainer(shared, args=args, train_dataset=prompts(), processing_class=left_tokenizer)
    batch = rollout(trainer)
    _, policy, reference = independent_terms(shared, left_tokenizer, batch)
    implicit = args.dpo_beta * (policy - reference)
    worst = [
        max(plackett_luce_loss(row[list(order)][None]).item() for order in itertools.permutations(range(4)))
        for row in implicit
    ]
    expected = (0.7 * plackett_luce_loss(implicit) + 0.3 * torch.tensor(worst)).mean()
    loss = trainer._compute_loss(trainer.model, batch)
    torch.testing.assert_close(loss, expected.to(loss.dtype), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rho", [-0.1, 1.0])
def test_robust_rho_outside_zero_one_is_refused(tmp_path, rho):
    with pytest.raises(ValueError, match="robust_rho"):
        config(tmp_path, robust_rho=rho)


def test_at_k2_the_loss_is_the_sigmoid_dpo_loss_of_better_and_worse(tmp_path, reward_folder, left_tokenizer):
    shared = make_shared(reward_folder)
    args = config(tmp_path, num_generations=2, per_device_train_batch_size=4)
    trainer = OnlinePlackettLuceTrainer(shared, args=args, train_dataset=prompts(), processing_class=left_tokenizer)
    batch = rollout(trainer)
    rewards, policy, reference = independent_terms(shared, left_tokenizer, batch)
    better_first = rewards[:, 0] > rewards[:, 1]
    assert better_first.all()
    margin = (policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1])
    expected = -F.logsigmoid(args.dpo_beta * margin).mean()
    torch.testing.assert_close(trainer._compute_loss(trainer.model, batch), expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- what trains, and learning


@pytest.mark.parametrize("gradient_checkpointing", GRADIENT_CHECKPOINTING)
def test_one_step_trains_only_the_policy_adapter(tmp_path, reward_folder, left_tokenizer, gradient_checkpointing):
    shared = make_shared(reward_folder)
    named = lambda: list(shared.peft_model.named_parameters()) + [  # noqa: E731
        (f"heads.{n}", p) for n, p in shared.heads.named_parameters()
    ]
    before = snapshot(named())
    args = config(tmp_path, gradient_checkpointing=gradient_checkpointing)
    trainer = OnlinePlackettLuceTrainer(shared, args=args, train_dataset=prompts(), processing_class=left_tokenizer)
    trainer.train()
    moved = changed(before, named())
    assert moved and all(".policy." in n for n in moved), moved
    assert any(".lora_A.policy." in n for n in moved) and any(".lora_B.policy." in n for n in moved)
    # the unused value role: frozen and absent from the optimizer
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    value = [p for n, p in shared.peft_model.named_parameters() if ".value." in n]
    value += list(shared.heads["value"].parameters())
    assert value and not any(p.requires_grad or id(p) in optimized for p in value)


@pytest.mark.parametrize("gradient_checkpointing", GRADIENT_CHECKPOINTING)
def test_mean_reward_rises(tmp_path, left_tokenizer, gradient_checkpointing):
    # A full fine-tune (the reference is a frozen copy): LoRA on a 32-wide model moves the reward too slowly to test
    # in seconds (0.013 -> 0.024 in 60 steps at lr 2e-2); a full fine-tune goes from 0.02 to 0.9 in 24 steps.
    args = config(
        tmp_path, per_device_train_batch_size=32, num_generations=8, max_completion_length=8, max_steps=24,
        learning_rate=1e-2, lr_scheduler_type="constant", dpo_beta=0.1, logging_steps=4,
        gradient_checkpointing=gradient_checkpointing,
    )  # fmt: skip
    trainer = OnlinePlackettLuceTrainer(
        tiny_causal_lm(seed=0), reward_funcs=fraction_of_a, args=args, train_dataset=prompts(32 * 24),
        processing_class=left_tokenizer,
    )  # fmt: skip
    trainer.train()
    rewards = [log["reward"] for log in trainer.state.log_history if "reward" in log]
    assert rewards[-1] > rewards[0] + 0.1, rewards
    logs = [log for log in trainer.state.log_history if "objective/kl" in log]
    assert logs[-1]["objective/kl"] > 0.0  # the policy moved away from the reference
    # the implicit rewards come to order the groups as the reward does (until every completion is all 'a': a tie)
    assert max(log["rewards/accuracies"] for log in logs) > 0.8


def test_micro_batches_of_a_buffered_generation_batch_hold_whole_ranked_groups(tmp_path, left_tokenizer):
    # GRPO shuffles a generation batch along dim 0 and splits it into steps_per_generation micro-batches; with the
    # batch regrouped as [G, K, ...] both act on whole groups (TRL's shuffle_sequence_dict / split_tensor_dict).
    seen = []

    class Recording(OnlinePlackettLuceTrainer):
        def _compute_loss(self, model, inputs):
            seen.append({k: inputs[k] for k in ("prompt_ids", "completion_ids", "item_mask")})
            return super()._compute_loss(model, inputs)

    def character_sum(completions, **kwargs):  # few ties, unlike most programmatic rewards on random text
        return [sum(map(ord, c)) / 1000 for c in completions]

    args = config(tmp_path, per_device_train_batch_size=4, steps_per_generation=2, max_steps=2)
    trainer = Recording(
        tiny_causal_lm(seed=0), reward_funcs=character_sum, args=args, train_dataset=prompts(16),
        processing_class=left_tokenizer,
    )  # fmt: skip
    trainer.train()
    assert len(seen) == 2
    for batch in seen:
        assert batch["prompt_ids"].shape[:2] == (1, 4)
        assert (batch["prompt_ids"] == batch["prompt_ids"][:, :1]).all()  # one prompt per group
        texts = left_tokenizer.batch_decode(batch["completion_ids"][0], skip_special_tokens=True)
        rewards = character_sum(texts)
        assert rewards == sorted(rewards, reverse=True)  # still in ranked order
    assert not torch.equal(seen[0]["prompt_ids"][0, 0], seen[1]["prompt_ids"][0, 0])  # two different prompts


def test_full_fine_tune_uses_a_frozen_copy_as_reference(tmp_path, left_tokenizer):
    model = tiny_causal_lm(seed=0)
    trainer = OnlinePlackettLuceTrainer(
        model, reward_funcs=fraction_of_a, args=config(tmp_path), train_dataset=prompts(),
        processing_class=left_tokenizer,
    )  # fmt: skip
    reference = snapshot(trainer.ppo_ref_model.named_parameters())
    trainer.train()
    assert not changed(reference, trainer.ppo_ref_model.named_parameters())
    assert changed(reference, model.named_parameters())


# ----------------------------------------------------------------------------- checkpoints


def policy_weights(shared: SharedBase) -> dict:
    return {n: p.detach().clone() for n, p in shared.peft_model.named_parameters() if ".policy." in n}


@pytest.mark.parametrize("gradient_checkpointing", GRADIENT_CHECKPOINTING)
def test_resume_from_checkpoint_equals_straight_run(tmp_path, reward_folder, left_tokenizer, gradient_checkpointing):
    def run(output_dir, resume=None, stop_after=None):
        shared = make_shared(reward_folder)
        args = config(
            tmp_path, output_dir=str(output_dir), max_steps=4, learning_rate=3e-3, save_strategy="steps",
            save_steps=2, gradient_checkpointing=gradient_checkpointing,
        )  # fmt: skip
        callbacks = [StopAfter(stop_after)] if stop_after else None
        trainer = OnlinePlackettLuceTrainer(
            shared, args=args, train_dataset=prompts(16), processing_class=left_tokenizer, callbacks=callbacks
        )
        trainer.train(resume_from_checkpoint=resume)
        return shared

    straight = run(tmp_path / "straight")
    run(tmp_path / "split", stop_after=2)
    checkpoint = tmp_path / "split" / "checkpoint-2"
    assert not (checkpoint / "reward").exists() and not (checkpoint / "value").exists()  # the policy adapter only
    resumed = run(tmp_path / "split", resume=str(checkpoint))
    expected, got = policy_weights(straight), policy_weights(resumed)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)


def updates(shared: SharedBase, run) -> dict:
    before = policy_weights(shared)
    run()
    after = policy_weights(shared)
    return {name: after[name] - before[name] for name in before}


def test_gradient_checkpointing_makes_the_same_update(tmp_path, reward_folder, left_tokenizer):
    def update(checkpointing: dict) -> dict:
        shared = make_shared(reward_folder)
        args = config(tmp_path, **checkpointing)
        trainer = OnlinePlackettLuceTrainer(shared, args=args, train_dataset=prompts(), processing_class=left_tokenizer)
        return updates(shared, trainer.train)

    expected = update({"gradient_checkpointing": False})
    for checkpointing in ({"gradient_checkpointing": True}, {"gradient_checkpointing_kwargs": {"use_reentrant": True}}):
        got = update({"gradient_checkpointing": True, **checkpointing})
        assert any(u.abs().max() > 0 for u in expected.values()), "nothing moved: the comparison would be vacuous"
        for name in expected:
            error = ((got[name] - expected[name]).norm() / expected[name].norm().clamp(min=1e-30)).item()
            assert error < 1e-5, f"{name}: the update differs by {error:.3g} ({checkpointing})"


# ----------------------------------------------------------------------------- bad rewards, config, metrics


def test_a_batch_with_only_nan_rewards_fails_instead_of_training_nothing(tmp_path, reward_folder, left_tokenizer):
    shared = make_shared(reward_folder)
    before = snapshot(shared.peft_model.named_parameters())
    trainer = OnlinePlackettLuceTrainer(
        shared, reward_funcs=lambda completions, **kw: [math.nan] * len(completions), args=config(tmp_path),
        train_dataset=prompts(), processing_class=left_tokenizer,
    )  # fmt: skip
    with pytest.raises(ValueError, match="none of the 8 completions of this generation batch got a reward"):
        trainer.train()
    assert not changed(before, shared.peft_model.named_parameters())


def test_a_group_with_one_finite_reward_contributes_nothing(tmp_path, reward_folder, left_tokenizer):
    def one_per_group(completions, **kw):  # groups of 4: the first group keeps 1 finite reward, the second 4
        return [float(i) if i == 0 or i >= 4 else math.nan for i in range(len(completions))]

    shared = make_shared(reward_folder)
    trainer = OnlinePlackettLuceTrainer(
        shared, reward_funcs=one_per_group, args=config(tmp_path), train_dataset=prompts(),
        processing_class=left_tokenizer,
    )  # fmt: skip
    batch = rollout(trainer)
    assert batch["item_mask"].sum(dim=1).tolist() == [1, 4] and batch["depth"].tolist() == [0, 3]
    flat = {k: batch[k][1:] for k in batch if torch.is_tensor(batch[k]) and batch[k].ndim > 0}
    whole = trainer._compute_loss(trainer.model, batch)
    second_only = trainer._compute_loss(trainer.model, flat)
    torch.testing.assert_close(whole, second_only / 2)  # the mean over 2 groups, the first adding 0


def test_reward_function_with_wrong_count_is_rejected(tmp_path, reward_folder, left_tokenizer):
    trainer = OnlinePlackettLuceTrainer(
        make_shared(reward_folder), reward_funcs=lambda completions, **kw: [0.0], args=config(tmp_path),
        train_dataset=prompts(), processing_class=left_tokenizer,
    )  # fmt: skip
    with pytest.raises(ValueError, match="returned 1 rewards, but 8 were expected"):
        trainer.train()


def test_config_refuses_grpo_beta_and_split_groups(tmp_path):
    with pytest.raises(ValueError, match="dpo_beta"):
        config(tmp_path, beta=0.1)
    with pytest.raises(ValueError, match="multiple of num_generations"):
        config(tmp_path, per_device_train_batch_size=6, num_generations=4, generation_batch_size=24)


def test_trainer_logs_the_offline_metric_names_reward_and_kl(tmp_path, reward_folder, left_tokenizer):
    trainer = OnlinePlackettLuceTrainer(
        make_shared(reward_folder), args=config(tmp_path), train_dataset=prompts(), processing_class=left_tokenizer
    )
    trainer.train()
    log = trainer.state.log_history[0]
    names = ["rewards/accuracies", "rewards/top1_accuracy", "rewards/margins", "rewards/chosen", "rewards/rejected",
             "reward", "objective/kl", "objective/skipped_completions"]  # fmt: skip
    assert set(names) <= set(log), sorted(log)
    assert 0.0 <= log["rewards/accuracies"] <= 1.0
    assert log["rewards/margins"] == pytest.approx(log["rewards/chosen"] - log["rewards/rejected"])


# ----------------------------------------------------------------------------- the recipe


def recipe_argv(tmp_path: Path, reward_folder: str, output_dir: Path, *extra: str) -> list[str]:
    """Flags for a 2-step run of the recipe on a tiny model folder and a JSONL of prompts (written once)."""
    if not (tmp_path / "model").exists():
        save_tiny_model(tmp_path / "model", seed=0)
        (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS * 4))
    return [
        "--config", str(ROOT / "recipes" / "configs" / "online_kway.yaml"), "--model_name_or_path",
        str(tmp_path / "model"), "--reward_adapter_path", reward_folder, "--dataset_name",
        str(tmp_path / "prompts.jsonl"), "--output_dir", str(output_dir), "--lora_r", "4", "--lora_alpha", "8",
        "--per_device_train_batch_size", "4", "--num_generations", "4", "--steps_per_generation", "1",
        "--max_completion_length", "6", "--max_steps", "2", "--learning_rate", "1e-2", "--use_cpu", "true",
        "--save_strategy", "no", "--disable_tqdm", "true", "--logging_steps", "1", "--report_to", "none", *extra,
    ]  # fmt: skip


def run_recipe(argv: list[str]):
    recipe = load_recipe("online_kway")
    return recipe.main(*recipe.make_parser().parse_args_and_config(argv))


def test_recipe_trains_on_the_shared_base_and_writes_the_policy(tmp_path, reward_folder):
    trainer = run_recipe(recipe_argv(tmp_path, reward_folder, tmp_path / "out"))
    assert trainer.state.global_step == 2
    assert (tmp_path / "out" / "policy" / "adapter_model.safetensors").is_file()
    assert "rewards/accuracies" in trainer.state.log_history[0]


def test_recipe_runs_with_the_same_seed_are_identical(tmp_path, reward_folder):
    # the seed is set before the shared base draws its LoRA weights, so two runs agree from the first step
    for name in ("a", "b"):
        run_recipe(recipe_argv(tmp_path, reward_folder, tmp_path / name, "--seed", "7"))
    a, b = (load_file(tmp_path / name / "policy" / "adapter_model.safetensors") for name in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_recipe_help_starts_with_usage_naming_config(capsys):
    recipe = load_recipe("online_kway")
    with pytest.raises(SystemExit):
        recipe.make_parser().parse_args_and_config(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: online_kway.py --config"), out[:200]
    assert "--push_to_hub" in out and "--dpo_beta" in out


def test_evaluate_logs_the_ranking_metrics(tmp_path, reward_folder, left_tokenizer):
    trainer = OnlinePlackettLuceTrainer(
        make_shared(reward_folder), args=config(tmp_path, per_device_eval_batch_size=8), train_dataset=prompts(),
        eval_dataset=prompts(), processing_class=left_tokenizer,
    )  # fmt: skip
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"]) and "eval_rewards/accuracies" in metrics, sorted(metrics)


def test_eval_batch_of_split_groups_is_refused_when_evaluating(tmp_path):
    config(tmp_path, per_device_eval_batch_size=6)  # no evaluation: not checked
    # GRPO checks the global eval batch; the config, stricter, each process's (whole groups on every process)
    with pytest.raises(ValueError, match="divisible by the number of generations|multiple of num_generations"):
        config(tmp_path, per_device_eval_batch_size=6, eval_strategy="steps", eval_steps=1)


TWO_PROCESS_CHECK = """
import sys, torch
from datasets import Dataset
from safetensors.torch import load_file
from peft import LoraConfig
from rlhf_ext.testing import tiny_causal_lm, tiny_tokenizer
from rlhf_ext.trainers.kway.online import OnlinePlackettLuceConfig, OnlinePlackettLuceTrainer


def character_sum(completions, **kwargs):  # few ties, unlike most programmatic rewards on random text
    return [sum(map(ord, c)) / 1000 for c in completions]


class Checked(OnlinePlackettLuceTrainer):
    def _generate_and_score_completions(self, inputs):
        batch = super()._generate_and_score_completions(inputs)
        prompts = batch["prompt_ids"]
        assert (prompts == prompts[:, :1]).all(), "a group mixes prompts"
        texts = self.processing_class.batch_decode(batch["completion_ids"].flatten(0, 1), skip_special_tokens=True)
        rewards = torch.tensor(character_sum(texts)).view(batch["item_mask"].shape)
        assert (rewards[:, :-1] >= rewards[:, 1:]).all(), ("this process's groups are not ranked by their rewards",
                                                          rewards)
        return batch


tokenizer = tiny_tokenizer()
tokenizer.padding_side = "left"
args = OnlinePlackettLuceConfig(sys.argv[1], per_device_train_batch_size=4, num_generations=4, steps_per_generation=2,
                                max_completion_length=6, max_steps=4, learning_rate=1e-2, use_cpu=True, bf16=False,
                                report_to=[], save_strategy="no", disable_tqdm=True, seed=0)
trainer = Checked(tiny_causal_lm(seed=0), reward_funcs=character_sum, args=args, processing_class=tokenizer,
                  train_dataset=Dataset.from_dict({"prompt": ["abc", "hello", "xy", "qrs"] * 8}),
                  peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
trainer.train()
params = [p.detach().double().sum() for p in trainer.model.parameters() if p.requires_grad]
checksums = trainer.accelerator.gather(torch.stack(params)[None])
assert torch.equal(checksums[0], checksums[1]), checksums
if trainer.accelerator.is_main_process:
    print("GROUPS_RANKED_AND_WEIGHTS_IN_SYNC", trainer.accelerator.num_processes)
"""


@pytest.mark.slow
def test_two_cpu_processes_rank_their_own_groups_and_stay_in_sync(tmp_path):
    # torchrun, not `accelerate launch --cpu` (one process without MPI); see tests/test_ppo_learning.py
    script = tmp_path / "check.py"
    script.write_text(TWO_PROCESS_CHECK)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "GROUPS_RANKED_AND_WEIGHTS_IN_SYNC 2" in result.stdout
