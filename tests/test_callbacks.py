"""Callbacks: the adaptive KL controller (arithmetic, in a run, across a resume) and the completions table."""

import json

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification

from rlhf_ext.callbacks import (
    AdaptiveKLCallback,
    CompletionsTableCallback,
    adaptive_kl_coef,
)
from rlhf_ext.testing import StopAfter, fraction_of_a, tiny_causal_lm, tiny_llama_config, tiny_tokenizer
from rlhf_ext.trainers.ppo.config import PPOConfig
from rlhf_ext.trainers.ppo.trainer import PPOTrainer


def tiny_trainer(tmp_path, callbacks_for=lambda trainer: [], **overrides) -> PPOTrainer:
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "left"
    torch.manual_seed(1)
    critic = AutoModelForSequenceClassification.from_config(tiny_llama_config(num_labels=1))
    kwargs = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_completion_length=6, max_steps=3,
        num_ppo_epochs=1, learning_rate=1e-2, report_to=[], use_cpu=True, bf16=False, gradient_checkpointing=False,
        save_strategy="no", logging_steps=1, disable_tqdm=True,
    )  # fmt: skip
    kwargs.update(overrides)
    trainer = PPOTrainer(
        tiny_causal_lm(seed=0),
        reward_funcs=fraction_of_a,
        args=PPOConfig(**kwargs),
        train_dataset=Dataset.from_dict({"prompt": ["abc", "hello", "xy", "qrs"] * 4}),
        processing_class=tokenizer,
        value_model=critic,
    )
    for callback in callbacks_for(trainer):
        trainer.add_callback(callback)
    return trainer


@pytest.mark.parametrize(
    ("kl", "expected"),
    [
        (12.0, 0.1 * (1 + 0.2 * 100 / 1000)),  # far above target: error clipped at +0.2
        (0.0, 0.1 * (1 - 0.2 * 100 / 1000)),  # far below: clipped at -0.2
        (6.6, 0.1 * (1 + 0.1 * 100 / 1000)),  # within the clip: proportional
        (6.0, 0.1),  # on target: unchanged
    ],
)
def test_adaptive_kl_coef_follows_ziegler(kl, expected):
    assert adaptive_kl_coef(0.1, kl, target=6.0, n_steps=100, horizon=1000) == pytest.approx(expected)


def test_adaptive_kl_rejects_nonpositive_target():
    with pytest.raises(ValueError, match="target and horizon must be positive"):
        AdaptiveKLCallback(target=0.0)


def test_adaptive_kl_callback_steers_kl_coef_in_a_run(tmp_path):
    callback = AdaptiveKLCallback(target=1e-6, horizon=10)  # a short horizon, so beta visibly moves each step
    trainer = tiny_trainer(tmp_path, callbacks_for=lambda t: [callback], kl_coef=0.05)
    trainer.train()
    logged = [log for log in trainer.state.log_history if "objective/kl" in log]
    expected = 0.05
    for log in logged:
        assert log["objective/kl_coef"] == pytest.approx(expected)  # the rollout used the current beta
        expected = adaptive_kl_coef(expected, log["objective/kl"], 1e-6, n_steps=4, horizon=10)
    assert len(logged) == 3 and trainer.args.kl_coef == pytest.approx(expected) != pytest.approx(0.05)


def test_ppo_config_kl_target_runs_the_same_controller_as_the_callback(tmp_path):
    """PPOConfig(kl_target, kl_horizon) is where a library user turns the controller on: same kl_coef path and
    weights as passing AdaptiveKLCallback by hand (the recipe's --kl_target is this field)."""
    by_hand = tiny_trainer(
        tmp_path / "hand", callbacks_for=lambda t: [AdaptiveKLCallback(target=1e-6, horizon=10)], kl_coef=0.05, seed=0
    )
    by_hand.train()  # built and trained before the next is built: building a trainer seeds the global RNG
    by_config = tiny_trainer(tmp_path / "config", kl_coef=0.05, kl_target=1e-6, kl_horizon=10, seed=0)
    by_config.train()
    assert by_config.args.kl_coef == pytest.approx(by_hand.args.kl_coef, rel=1e-6)
    assert by_config.args.kl_coef != pytest.approx(0.05)
    assert sum(isinstance(c, AdaptiveKLCallback) for c in by_config.callback_handler.callbacks) == 1


def test_kl_target_and_a_hand_added_controller_are_refused(tmp_path):
    with pytest.raises(ValueError, match="two controllers would each move kl_coef"):
        PPOTrainer(
            tiny_causal_lm(seed=0), reward_funcs=fraction_of_a, value_model=torch.nn.Linear(1, 1),
            args=PPOConfig(str(tmp_path), kl_target=6.0, use_cpu=True, bf16=False, report_to=[]),
            callbacks=[AdaptiveKLCallback(target=6.0)], train_dataset=Dataset.from_dict({"prompt": ["abc"]}),
        )  # fmt: skip


@pytest.mark.parametrize(("field", "value"), [("kl_target", 0.0), ("kl_target", -1.0), ("kl_horizon", 0.0)])
def test_kl_controller_settings_are_range_checked(field, value):
    with pytest.raises(ValueError, match=f"PPOConfig.{field} must be > 0"):
        PPOConfig("out", bf16=False, **{field: value})


def test_adaptive_kl_callback_state_round_trips():
    callback = AdaptiveKLCallback(target=3.0, horizon=500, kl_coef=0.2)
    callback.last_step = 6
    saved = callback.state()
    restored = AdaptiveKLCallback(**saved["args"])
    for name, value in saved["attributes"].items():  # as Trainer._load_callback_state does
        setattr(restored, name, value)
    assert (restored.target, restored.horizon, restored.kl_coef, restored.last_step) == (3.0, 500, 0.2, 6)


@pytest.mark.parametrize("restore_flag", [False, True])  # False: transformers' default
def test_adaptive_kl_resume_equals_straight_run(tmp_path, restore_flag):
    def run(output_dir, resume=None, stop_after=None):
        def callbacks(trainer):
            controller = AdaptiveKLCallback(target=1e-6, horizon=10)  # beta moves visibly at every step
            return [controller, *([StopAfter(stop_after)] if stop_after else [])]

        trainer = tiny_trainer(
            output_dir, callbacks_for=callbacks, kl_coef=0.05, max_steps=4, save_strategy="steps", save_steps=2,
            logging_steps=1, seed=0, restore_callback_states_from_checkpoint=restore_flag,
        )  # fmt: skip
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    straight = run(tmp_path / "straight")
    run(tmp_path / "split", stop_after=2)
    # a fresh process: a new controller at kl_coef=0.05 must pick up beta from the checkpoint
    resumed = run(tmp_path / "split", resume=str(tmp_path / "split" / "checkpoint-2"))

    def kl_coefs(trainer):
        return [(log["step"], log["objective/kl_coef"]) for log in trainer.state.log_history if "objective/kl" in log]

    expected, got = kl_coefs(straight), kl_coefs(resumed)
    assert [step for step, _ in got] == [1, 2, 3, 4] and expected[2][1] != pytest.approx(0.05)
    assert [coef for _, coef in got] == pytest.approx([coef for _, coef in expected], rel=1e-6)
    assert resumed.args.kl_coef == pytest.approx(straight.args.kl_coef, rel=1e-6)
    for (name, p_resumed), (_, p_straight) in zip(
        resumed.model.named_parameters(), straight.model.named_parameters(), strict=True
    ):
        torch.testing.assert_close(p_resumed, p_straight, atol=1e-6, rtol=1e-5, msg=name)


def test_completions_table_every_n_steps(tmp_path):
    trainer = tiny_trainer(tmp_path, callbacks_for=lambda t: [CompletionsTableCallback(t, every_n_steps=2)])
    trainer.train()
    tables = sorted((tmp_path / "completions").glob("ppo_step_*.jsonl"))
    assert [p.name for p in tables] == ["ppo_step_000002.jsonl"]
    rows = [json.loads(line) for line in tables[0].read_text().splitlines()]
    assert len(rows) == 4
    assert {"prompt", "completion", "score", "kl", "rlhf_reward", "skipped"} <= set(rows[0])
    assert [r["score"] for r in rows] == pytest.approx(fraction_of_a([r["completion"] for r in rows]))
    assert {r["prompt"] for r in rows} <= {"abc", "hello", "xy", "qrs"}
