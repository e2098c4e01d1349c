"""Rewards that would silently stop learning (issue 18 item 5), in PPO and online K-way DPO: a generation batch with
no reward at all and infinite rewards are refused, partly missing rewards are warned about with their count, and a
PPO loss or gradient norm that overflows stops the run naming the step and the size of the rewards."""

import math

import pytest
import torch
from test_ppo_trainer import make_shared, ppo_args, prompts, reward_folder  # noqa: F401 (reward_folder: a fixture)

from rlhf_ext.trainers.grpo_base import check_reward_batch
from rlhf_ext.trainers.kway.online import OnlinePlackettLuceConfig, OnlinePlackettLuceTrainer
from rlhf_ext.trainers.ppo.trainer import PPOTrainer


def ppo_trainer(tmp_path, reward_folder, tokenizer, reward_funcs, **overrides):  # noqa: F811
    return PPOTrainer(
        make_shared(reward_folder), reward_funcs=reward_funcs, args=ppo_args(tmp_path, **overrides),
        train_dataset=prompts(), processing_class=tokenizer,
    )  # fmt: skip


def online_trainer(tmp_path, reward_folder, tokenizer, reward_funcs):  # noqa: F811
    args = OnlinePlackettLuceConfig(
        output_dir=str(tmp_path / "online"), per_device_train_batch_size=8, num_generations=4, max_completion_length=6,
        max_steps=1, learning_rate=1e-2, dpo_beta=0.5, report_to=[], use_cpu=True, bf16=False,
        gradient_checkpointing=False, save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
    )  # fmt: skip
    return OnlinePlackettLuceTrainer(
        make_shared(reward_folder), reward_funcs=reward_funcs, args=args, train_dataset=prompts(),
        processing_class=tokenizer,
    )  # fmt: skip


def constant(value):
    def reward(completions, **kwargs):
        return [value] * len(completions)

    return reward


def judge_down(completions, **kwargs):
    return [None] * len(completions)


def forbidden_third(completions, **kwargs):
    return [-math.inf if i == 2 else 1.0 for i in range(len(completions))]


def judge_down_too(completions, **kwargs):
    return [None] * len(completions)


def even_only(completions, **kwargs):
    return [2.0 if i % 2 == 0 else None for i in range(len(completions))]


def odd_only(completions, **kwargs):
    return [3.0 if i % 2 else None for i in range(len(completions))]


def half_missing(completions, **kwargs):
    return [math.nan if i % 2 else 1.0 for i in range(len(completions))]


# ----------------------------------------------------------------------------- the check itself, on known numbers


def test_check_reward_batch_counts_the_completions_no_function_scored(caplog):
    nan = math.nan
    rewards = torch.tensor([[1.0, nan], [2.0, 0.5], [nan, nan], [0.0, 1.0]])
    with caplog.at_level("WARNING"):
        check_reward_batch(rewards, ["length", "judge"], torch.tensor([1.0, 1.0]))
    assert "1 of 4 completions got no reward from any function" in caplog.text
    assert "'length': 1 of 4, 'judge': 2 of 4" in caplog.text
    assert "scored none" not in caplog.text  # each function scored some completion


def test_check_reward_batch_refuses_a_batch_without_any_reward():
    rewards = torch.tensor([[math.nan, math.nan], [math.nan, math.nan]])
    with pytest.raises(ValueError, match=r"none of the 2 completions .* got a reward.*'judge': 2 of 2"):
        check_reward_batch(rewards, ["length", "judge"], torch.tensor([1.0, 1.0]))


def test_check_reward_batch_names_a_function_that_scored_nothing(caplog):
    rewards = torch.tensor([[1.0, math.nan], [2.0, math.nan]])
    with caplog.at_level("WARNING"):
        check_reward_batch(rewards, ["length", "judge"], torch.tensor([1.0, 1.0]))
    assert "reward function(s) 'judge' scored none of the 2 completions" in caplog.text
    assert "got no reward from any function" not in caplog.text


@pytest.mark.parametrize("value", [math.inf, -math.inf])
def test_check_reward_batch_refuses_infinite_rewards_naming_function_and_completion(value):
    rewards = torch.tensor([[1.0, 0.0], [2.0, value]])
    with pytest.raises(ValueError, match=rf"Reward function 'judge' returned {value} for completion 1 .*large finite"):
        check_reward_batch(rewards, ["length", "judge"], torch.tensor([1.0, 1.0]))


def test_check_reward_batch_refuses_a_weighted_sum_that_overflows():
    rewards = torch.tensor([[3e38, 3e38]])
    with pytest.raises(ValueError, match="weighted sum of the rewards of completion 0 overflows"):
        check_reward_batch(rewards, ["a", "b"], torch.tensor([1.0, 1.0]))


# ----------------------------------------------------------------------------- PPO


def test_ppo_run_where_every_reward_is_missing_fails_naming_the_function(tmp_path, reward_folder, left_tokenizer):  # noqa: F811
    trainer = ppo_trainer(tmp_path, reward_folder, left_tokenizer, [judge_down, judge_down_too])
    with pytest.raises(ValueError, match=r"none of the 4 completions .* got a reward.*'judge_down': 4 of 4"):
        trainer.train()


def test_ppo_scores_a_completion_with_the_functions_that_apply_as_trl_does(tmp_path, reward_folder, left_tokenizer):  # noqa: F811
    # TRL's multi-task pattern: each function scores only its own completions (None elsewhere); none is skipped
    trainer = ppo_trainer(tmp_path, reward_folder, left_tokenizer, [even_only, odd_only])
    trainer.train()
    assert trainer.state.log_history[0]["objective/skipped_completions"] == 0
    scores, scored = trainer._global_scores()
    assert scored.all() and scores.tolist() == [2.0, 3.0, 2.0, 3.0]  # even ones from even_only, odd from odd_only


def test_ppo_partly_missing_rewards_warn_with_the_count(tmp_path, reward_folder, left_tokenizer, caplog):  # noqa: F811
    trainer = ppo_trainer(tmp_path, reward_folder, left_tokenizer, half_missing)
    with caplog.at_level("WARNING"):
        trainer.train()
    assert "2 of 4 completions got no reward" in caplog.text and "'half_missing': 2" in caplog.text
    assert trainer.state.log_history[0]["objective/skipped_completions"] == 2


def test_ppo_minus_infinity_is_refused_not_skipped(tmp_path, reward_folder, left_tokenizer):  # noqa: F811
    trainer = ppo_trainer(tmp_path, reward_folder, left_tokenizer, forbidden_third)
    with pytest.raises(ValueError, match=r"'forbidden_third' returned -inf for completion 2 .*large finite penalty"):
        trainer.train()


def test_ppo_huge_rewards_stop_the_run_naming_the_step_and_their_size(tmp_path, reward_folder, left_tokenizer):  # noqa: F811
    # 1e30: the returns are finite in float32, their squared error in the value loss (1e60) is not
    trainer = ppo_trainer(tmp_path, reward_folder, left_tokenizer, constant(1e30))
    with pytest.raises(FloatingPointError, match=r"step 1: the PPO loss is not finite .*\|score\| up to 1e\+30"):
        trainer.train()


def test_ppo_non_finite_gradient_norm_stops_the_run(tmp_path, reward_folder, left_tokenizer):  # noqa: F811
    trainer = ppo_trainer(tmp_path, reward_folder, left_tokenizer, constant(1.0))
    trainer._reward_magnitude = 2.5e18
    message = r"step 1: the gradient norm is not finite \(norm: \[inf\]\).*\|score\| up to 2.5e\+18"
    with pytest.raises(FloatingPointError, match=message):
        trainer._get_grad_norm(trainer.model, grad_norm=torch.tensor(math.inf))
    assert trainer._get_grad_norm(trainer.model, grad_norm=torch.tensor(3.0)) == 3.0


# ----------------------------------------------------------------------------- online K-way DPO


def test_online_run_where_every_reward_is_missing_fails(tmp_path, reward_folder, left_tokenizer):  # noqa: F811
    trainer = online_trainer(tmp_path, reward_folder, left_tokenizer, judge_down)
    with pytest.raises(ValueError, match=r"none of the 8 completions .* got a reward.*'judge_down': 8 of 8"):
        trainer.train()


def test_online_infinite_reward_is_refused(tmp_path, reward_folder, left_tokenizer):  # noqa: F811
    trainer = online_trainer(tmp_path, reward_folder, left_tokenizer, forbidden_third)
    with pytest.raises(ValueError, match=r"'forbidden_third' returned -inf for completion 2"):
        trainer.train()


def test_online_partly_missing_rewards_warn_with_the_count(tmp_path, reward_folder, left_tokenizer, caplog):  # noqa: F811
    trainer = online_trainer(tmp_path, reward_folder, left_tokenizer, half_missing)
    with caplog.at_level("WARNING"):
        trainer.train()
    assert "4 of 8 completions got no reward" in caplog.text
