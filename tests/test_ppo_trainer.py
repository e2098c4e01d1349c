"""PPOTrainer on tiny models: what one step trains, the loss it optimises, padding, checkpoints, bad input."""

import math

import numpy as np
import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification

from rlhf_ext.models import SharedBase, SharedBaseArguments, save_adapter_with_head
from rlhf_ext.ops import gae, masked_whiten, ppo_loss, token_rewards
from rlhf_ext.testing import StopAfter, fraction_of_a, randomize_lora, tiny_causal_lm, tiny_llama_config
from rlhf_ext.trainers import SharedBaseReward
from rlhf_ext.trainers.ppo.config import PPOConfig
from rlhf_ext.trainers.ppo.trainer import PPOTrainer

LORA = dict(lora_r=4, lora_alpha=8, lora_dropout=0.0)
PROMPTS = ["abc", "hello", "xy", "qrs"]


@pytest.fixture
def reward_folder(tmp_path):
    """An adapter + head folder with random weights, loadable as the reward role."""
    donor = SharedBase(tiny_causal_lm(seed=0), SharedBaseArguments(**LORA))
    randomize_lora(donor.peft_model, "value", seed=3)
    return str(save_adapter_with_head(donor.peft_model, "value", donor.heads["value"], tmp_path / "reward", "reward"))


def make_shared(reward_folder, **overrides) -> SharedBase:
    return SharedBase(
        tiny_causal_lm(seed=0), SharedBaseArguments(reward_adapter_path=reward_folder, **LORA, **overrides)
    )


def ppo_args(tmp_path, **overrides) -> PPOConfig:
    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_completion_length=6,
        max_steps=1,
        num_ppo_epochs=1,
        learning_rate=1e-2,
        kl_coef=0.1,
        report_to=[],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    kwargs.update(overrides)
    return PPOConfig(**kwargs)


def prompts(n: int = 8) -> Dataset:
    return Dataset.from_dict({"prompt": (PROMPTS * n)[:n]})


def rollout(trainer: PPOTrainer) -> dict:
    """One generation batch, as `_prepare_inputs` would build it before the first update."""
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's training loop, which we bypass here
    return trainer._generate_and_score_completions([{"prompt": p} for p in PROMPTS])


def completion_slice(x: torch.Tensor, completion_length: int) -> torch.Tensor:
    """Positions whose outputs predict (or value the state before) each completion token."""
    return x[:, -completion_length - 1 : -1]


def independent_policy_terms(shared: SharedBase, batch: dict):
    """log pi(a_t|s_t), entropy and V(s_t) [B, C] straight from the SharedBase, without TRL's fused LM head."""
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    length = batch["completion_ids"].size(1)
    logits = completion_slice(shared.policy_logits(input_ids, attention_mask), length).float()
    log_probs = logits.log_softmax(-1)
    logprobs = log_probs.gather(-1, batch["completion_ids"][..., None]).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    values = completion_slice(shared.values(input_ids, attention_mask), length)
    return logprobs, entropy, values


def snapshot(named_params) -> dict:
    return {name: p.detach().clone() for name, p in named_params}


def changed(before: dict, named_params) -> set:
    return {name for name, p in named_params if name in before and not torch.equal(before[name], p)}


# ----------------------------------------------------------------------------- what one step trains


def test_one_step_trains_policy_and_value_and_leaves_reward_and_base(tmp_path, reward_folder, left_tokenizer):
    shared = make_shared(reward_folder)
    named = lambda: list(shared.peft_model.named_parameters()) + [  # noqa: E731
        (f"heads.{n}", p) for n, p in shared.heads.named_parameters()
    ]
    before = snapshot(named())
    trainer = PPOTrainer(shared, args=ppo_args(tmp_path), train_dataset=prompts(), processing_class=left_tokenizer)
    trainer.train()

    moved = changed(before, named())
    assert any(".lora_B.policy." in n for n in moved), "policy adapter did not move"
    assert any(".lora_A.value." in n or ".lora_B.value." in n for n in moved), "value adapter did not move"
    assert {"heads.value.linear.weight", "heads.value.linear.bias"} <= moved
    frozen = [n for n in before if ".reward." in n or n.startswith("heads.reward") or ".lora_" not in n]
    frozen = [n for n in frozen if not n.startswith("heads.value")]
    assert frozen and not moved & set(frozen), f"frozen weights moved: {sorted(moved & set(frozen))[:5]}"


def test_one_step_with_separate_policy_value_and_reward_function(tmp_path, left_tokenizer):
    policy = tiny_causal_lm(seed=0)
    torch.manual_seed(1)
    critic = AutoModelForSequenceClassification.from_config(tiny_llama_config(num_labels=1))
    policy_before, critic_before = snapshot(policy.named_parameters()), snapshot(critic.named_parameters())
    trainer = PPOTrainer(
        policy,
        reward_funcs=[fraction_of_a, lambda completions, **kw: [float(len(c)) for c in completions]],
        args=ppo_args(tmp_path, reward_weights=[1.0, 0.01]),
        train_dataset=prompts(),
        processing_class=left_tokenizer,
        value_model=critic,
    )
    reference_before = snapshot(trainer.ppo_ref_model.named_parameters())
    trainer.train()
    assert changed(policy_before, policy.named_parameters())
    assert changed(critic_before, critic.named_parameters())
    assert not changed(reference_before, trainer.ppo_ref_model.named_parameters())
    assert trainer.ppo_ref_model is not policy


# ----------------------------------------------------------------------------- rollout and loss match the ops


@pytest.fixture
def trainer_and_batch(tmp_path, reward_folder, left_tokenizer):
    shared = make_shared(reward_folder)
    randomize_lora(shared.peft_model, "policy", seed=5, scale=0.1)  # so the KL to the reference is not 0
    args = ppo_args(tmp_path, cliprange_value=0.05, ent_coef=0.01)
    trainer = PPOTrainer(
        shared, reward_funcs=fraction_of_a, args=args, train_dataset=prompts(), processing_class=left_tokenizer
    )
    return trainer, shared, rollout(trainer)


def test_rollout_advantages_are_gae_of_kl_penalised_rewards(trainer_and_batch):
    trainer, shared, batch = trainer_and_batch
    args = trainer.args
    mask = batch["completion_mask"].bool()
    with torch.no_grad():
        logprobs, _, values = independent_policy_terms(shared, batch)
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        ref_logits = completion_slice(shared.reference_logits(input_ids, attention_mask), mask.size(1))
        ref_logprobs = ref_logits.log_softmax(-1).gather(-1, batch["completion_ids"][..., None]).squeeze(-1)
    completions = left_tokenizer_decode(trainer, batch)
    scores = torch.tensor(fraction_of_a(completions))
    eos = trainer.processing_class.eos_token_id
    has_eos = torch.tensor([eos in row[m].tolist() for row, m in zip(batch["completion_ids"], mask)])
    rewards = token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=args.kl_coef, has_eos=has_eos)
    advantages, returns = gae(rewards.rewards, values, mask, gamma=args.gamma, lam=args.lam)

    assert (ref_logprobs - logprobs)[mask].abs().max() > 1e-3, "policy == reference: the KL check is vacuous"
    torch.testing.assert_close(batch["old_per_token_logps"] * mask, logprobs * mask, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch["old_values"] * mask, values * mask, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch["returns"], returns, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(batch["advantages"], masked_whiten(advantages, mask) * mask, atol=1e-4, rtol=1e-4)


def left_tokenizer_decode(trainer, batch) -> list[str]:
    return trainer.processing_class.batch_decode(batch["completion_ids"], skip_special_tokens=True)


def assert_loss_and_gradients_are_ppo_loss(trainer: PPOTrainer, shared: SharedBase, batch: dict) -> dict:
    """Assert that the loss `trainer._compute_loss` optimises, and every gradient it gives, equal `ppo_loss` on policy
    and value terms computed straight from the SharedBase (`independent_policy_terms`); returns those gradients."""
    args = trainer.args
    loss = trainer._compute_loss(trainer.model, batch)
    trainer.model.zero_grad()
    loss.backward()
    params = dict(shared.named_parameters())
    got = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}

    shared.zero_grad()
    logprobs, entropy, values = independent_policy_terms(shared, batch)
    expected = ppo_loss(
        logprobs, batch["old_per_token_logps"], batch["advantages"], batch["completion_mask"].bool(),
        values=values, old_values=batch["old_values"], returns=batch["returns"], entropy=entropy,
        clip_range=args.cliprange, clip_range_value=args.cliprange_value, vf_coef=args.vf_coef,
        ent_coef=args.ent_coef,
    )  # fmt: skip
    expected.loss.backward()
    torch.testing.assert_close(loss, expected.loss, atol=1e-6, rtol=1e-5)
    assert got and any(".lora_B.policy." in n for n in got), "the policy adapter got no gradient"
    for name, grad in got.items():
        torch.testing.assert_close(grad, params[name].grad, atol=1e-6, rtol=1e-4, msg=name)
    return got


def test_loss_optimised_equals_ppo_loss_on_the_same_tensors(trainer_and_batch):
    trainer, shared, batch = trainer_and_batch
    grads = assert_loss_and_gradients_are_ppo_loss(trainer, shared, batch)
    assert any(".lora_B.value." in n for n in grads), "the value adapter got no gradient"


def test_padding_contributes_nothing(trainer_and_batch):
    trainer, shared, batch = trainer_and_batch
    loss = trainer._compute_loss(trainer.model, batch)
    extra = 3
    padded = dict(batch)
    pad = trainer.processing_class.pad_token_id
    rows = batch["completion_ids"].size(0)
    padded["completion_ids"] = torch.cat([batch["completion_ids"], torch.full((rows, extra), pad)], dim=1)
    padded["completion_mask"] = torch.cat([batch["completion_mask"], torch.zeros(rows, extra, dtype=torch.long)], 1)
    padded["ppo_mask"] = torch.cat([batch["ppo_mask"], torch.zeros(rows, extra, dtype=torch.bool)], dim=1)
    for key in ("old_per_token_logps", "advantages", "returns", "old_values"):
        junk = 1e3 * torch.randn(rows, extra)  # anything at all may sit under the padding
        padded[key] = torch.cat([batch[key], junk], dim=1)
    padded_loss = trainer._compute_loss(trainer.model, padded)
    torch.testing.assert_close(padded_loss, loss, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- checkpoints


def final_weights(shared: SharedBase) -> dict:
    trainable = {id(p) for p in shared.trainable_parameters()}
    weights = {n: p.detach().clone() for n, p in shared.peft_model.named_parameters() if id(p) in trainable}
    weights.update({f"head.{n}": p.detach().clone() for n, p in shared.heads["value"].named_parameters()})
    return weights


def straight_and_resumed(tmp_path, build, stop_after: int, **overrides) -> tuple[SharedBase, SharedBase]:
    """The shared bases after an uninterrupted run and after one stopped at step `stop_after` and resumed from its
    checkpoint in a fresh trainer on fresh weights (as a new process would); `build(args, callbacks)` makes a
    (shared, trainer) pair."""

    def run(output_dir, resume=None, stop=None):
        args = ppo_args(tmp_path, output_dir=str(output_dir), save_strategy="steps", save_steps=2, **overrides)
        shared, trainer = build(args, [StopAfter(stop)] if stop else None)
        trainer.train(resume_from_checkpoint=resume)
        return shared

    straight = run(tmp_path / "straight")
    run(tmp_path / "split", stop=stop_after)
    return straight, run(tmp_path / "split", resume=str(tmp_path / "split" / f"checkpoint-{stop_after}"))


def assert_same_trained_weights(expected: SharedBase, got: SharedBase) -> None:
    expected, got = final_weights(expected), final_weights(got)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("value_layout", ["own_adapter", "policy_trunk"])
@pytest.mark.parametrize("gradient_checkpointing", [True, False])  # True: TRL's default
def test_resume_from_checkpoint_equals_straight_run(
    tmp_path, reward_folder, left_tokenizer, gradient_checkpointing, value_layout
):
    def build(args, callbacks):
        shared = make_shared(reward_folder, value_layout=value_layout)
        trainer = PPOTrainer(
            shared, args=args, train_dataset=prompts(16), processing_class=left_tokenizer, callbacks=callbacks
        )
        return shared, trainer

    # resuming must restore adapters, heads, optimizer and scheduler
    straight, resumed = straight_and_resumed(
        tmp_path, build, stop_after=2, max_steps=4, num_ppo_epochs=2, learning_rate=3e-3,
        gradient_checkpointing=gradient_checkpointing,
    )  # fmt: skip
    assert_same_trained_weights(straight, resumed)
    assert {p.requires_grad for p in resumed.trainable_parameters()} == {True}
    value_files = {p.name for p in (tmp_path / "split" / "checkpoint-2" / "value").iterdir()}
    assert ("adapter_model.safetensors" in value_files) == (value_layout == "own_adapter")


@pytest.mark.parametrize(
    ("stop_after", "gradient_checkpointing"), [(4, False), (6, True)],  # True: TRL's default
    ids=["at_the_epoch_end", "inside_the_second_epoch_trl_default_gc"],
)  # fmt: skip
def test_resume_after_the_first_epoch_equals_straight_run(
    tmp_path, reward_folder, left_tokenizer, stop_after, gradient_checkpointing
):
    # 8 prompts, 4 per rollout, 2 PPO epochs: one pass over the prompts every 4 steps, so 8 steps are 2 epochs and a
    # resumed run must draw the second epoch's order, not replay the first's.
    trainers = []

    def build(args, callbacks):
        shared = make_shared(reward_folder)
        trainers.append(PPOTrainer(
            shared, reward_funcs=fraction_of_a, args=args, train_dataset=prompts(8), processing_class=left_tokenizer,
            callbacks=callbacks,
        ))  # fmt: skip
        return shared, trainers[-1]

    straight, resumed = straight_and_resumed(
        tmp_path, build, stop_after=stop_after, max_steps=8, num_ppo_epochs=2, learning_rate=3e-3,
        gradient_checkpointing=gradient_checkpointing,
    )  # fmt: skip
    assert trainers[0].state.epoch == 2.0
    assert_same_trained_weights(straight, resumed)


def test_each_epoch_shuffle_is_a_function_of_seed_and_epoch(tmp_path, reward_folder, left_tokenizer):
    trainer = PPOTrainer(
        make_shared(reward_folder), reward_funcs=fraction_of_a, args=ppo_args(tmp_path), train_dataset=prompts(16),
        processing_class=left_tokenizer,
    )  # fmt: skip

    def order(sampler, epoch):
        sampler.set_epoch(epoch)
        return list(sampler)

    running = trainer._get_train_sampler()
    epochs = [order(running, e) for e in range(3)]
    assert len({tuple(o) for o in epochs}) == 3  # a new order every epoch
    fresh = trainer._get_train_sampler()  # a resumed run's sampler, built anew
    assert order(fresh, 2) == epochs[2] and order(fresh, 1) == epochs[1]
    assert sorted(epochs[0]) == sorted(range(16))


def test_saved_checkpoint_holds_policy_adapter_and_value_role(tmp_path, reward_folder, left_tokenizer):
    shared = make_shared(reward_folder)
    trainer = PPOTrainer(shared, args=ppo_args(tmp_path), train_dataset=prompts(), processing_class=left_tokenizer)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    value_dir = tmp_path / "saved" / "value"
    assert {"adapter_model.safetensors", "head.safetensors", "head_config.json"} <= {
        p.name for p in value_dir.iterdir()
    }
    assert (tmp_path / "saved" / "policy" / "adapter_model.safetensors").is_file()
    # the frozen reward adapter, which peft saved without its head, looking like a (broken) reward role folder
    assert not (tmp_path / "saved" / "reward").exists()
    assert "save_pretrained" not in vars(shared.peft_model)  # peft's own method is back after the save
    reloaded = make_shared(reward_folder)
    reloaded.load_role("value", value_dir)
    torch.testing.assert_close(reloaded.heads["value"].linear.weight, shared.heads["value"].linear.weight)


# ----------------------------------------------------------------------------- bad input


def test_an_adapter_on_the_lm_head_is_refused(tmp_path, reward_folder, left_tokenizer):
    # TRL refuses it before training (its fused LM head reads lm_head.weight, skipping a LoRA there)
    shared = make_shared(reward_folder, lora_target_modules=["q_proj", "lm_head"])
    with pytest.raises(ValueError, match="PEFT adapter to `lm_head` is not supported"):
        PPOTrainer(shared, args=ppo_args(tmp_path), train_dataset=prompts(), processing_class=left_tokenizer)
    policy = get_peft_model(tiny_causal_lm(seed=0), LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="PEFT adapter to `lm_head` is not supported"):
        PPOTrainer(
            policy, reward_funcs=fraction_of_a, args=ppo_args(tmp_path), train_dataset=prompts(),
            processing_class=left_tokenizer,
            value_model=AutoModelForSequenceClassification.from_config(tiny_llama_config(num_labels=1)),
        )  # fmt: skip


def test_empty_dataset_is_rejected(tmp_path, reward_folder, left_tokenizer):
    empty = Dataset.from_dict({"prompt": []})
    with pytest.raises(ValueError, match="empty"):
        PPOTrainer(
            make_shared(reward_folder), args=ppo_args(tmp_path), train_dataset=empty, processing_class=left_tokenizer
        )


def test_long_prompt_is_found_before_training_and_named_by_its_record(tmp_path, reward_folder, left_tokenizer):
    # one long prompt at record 13 of 16, in the 4th batch of 4: the per-batch check only met it at step 4
    dataset = Dataset.from_dict({"prompt": [p if i != 13 else "x" * 40 for i, p in enumerate(PROMPTS * 4)]})
    args = ppo_args(tmp_path, max_prompt_length=16, max_steps=4)
    with pytest.raises(ValueError, match=r"train dataset, record 13 \(0-based\): field 'prompt' has 40 tokens, more "
                       r"than the limit of 16.*long_prompts='drop'"):  # fmt: skip
        PPOTrainer(make_shared(reward_folder), args=args, train_dataset=dataset, processing_class=left_tokenizer)


def chat(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def test_prompt_length_is_counted_after_the_chat_template(tmp_path, reward_folder, left_tokenizer):
    tokenized = left_tokenizer.apply_chat_template(chat("abcd"), add_generation_prompt=True, tokenize=True)
    templated = len(tokenized["input_ids"])
    assert templated > len("abcd") + 4  # the template adds role names and turn markers
    dataset = Dataset.from_dict({"prompt": [chat("ab"), chat("abcd"), chat("a")]})
    args = ppo_args(tmp_path, max_prompt_length=templated - 1)
    with pytest.raises(ValueError, match=rf"record 1 \(0-based\): field 'prompt' has {templated} tokens"):
        PPOTrainer(make_shared(reward_folder), args=args, train_dataset=dataset, processing_class=left_tokenizer)


def test_long_prompts_drop_removes_them_logs_the_count_and_trains(tmp_path, reward_folder, left_tokenizer, caplog):
    dataset = Dataset.from_dict({"prompt": ["x" * 40, *PROMPTS, "y" * 30, *PROMPTS]})
    args = ppo_args(tmp_path, max_prompt_length=16, long_prompts="drop")
    trainer = PPOTrainer(make_shared(reward_folder), args=args, train_dataset=dataset, processing_class=left_tokenizer)
    assert "train dataset: dropped 2 of 10 prompts longer than 16 tokens" in caplog.text
    assert trainer.train_dataset["prompt"] == PROMPTS * 2
    trainer.train()
    assert trainer.state.global_step == 1


def test_every_prompt_too_long_is_a_clear_error(tmp_path, reward_folder, left_tokenizer):
    dataset = Dataset.from_dict({"prompt": ["x" * 40, "y" * 30]})
    args = ppo_args(tmp_path, max_prompt_length=16, long_prompts="drop")
    with pytest.raises(ValueError, match="all 2 prompts are longer than 16 tokens"):
        PPOTrainer(make_shared(reward_folder), args=args, train_dataset=dataset, processing_class=left_tokenizer)


@pytest.mark.parametrize(
    ("bad_prompt", "message"),
    [
        (None, r"record 2 \(0-based\): field 'prompt' must be text or a non-empty list of chat messages"),
        ("", r"record 2 \(0-based\): field 'prompt' has no tokens"),
    ],
)
def test_malformed_prompt_is_named_by_its_record(tmp_path, reward_folder, left_tokenizer, bad_prompt, message):
    dataset = Dataset.from_dict({"prompt": ["abc", "hello", bad_prompt, "qrs"]})
    with pytest.raises(ValueError, match=message):
        PPOTrainer(
            make_shared(reward_folder), args=ppo_args(tmp_path), train_dataset=dataset, processing_class=left_tokenizer
        )


def test_chat_message_without_content_is_named(tmp_path, reward_folder, left_tokenizer):
    dataset = Dataset.from_list([{"prompt": chat("hi")}, {"prompt": [{"role": "user", "content": None}]}])
    with pytest.raises(ValueError, match=r"record 1 \(0-based\): field 'prompt', message 0: a chat message needs"):
        PPOTrainer(
            make_shared(reward_folder), args=ppo_args(tmp_path), train_dataset=dataset, processing_class=left_tokenizer
        )


def says_good(completions, **kwargs):
    return ["good" for _ in completions]


def nested_rewards(completions, **kwargs):
    return [[0.5] for _ in completions]


def two_columns(completions, **kwargs):
    return torch.ones(len(completions), 2)


async def says_good_async(completions, **kwargs):
    return ["good" for _ in completions]


@pytest.mark.parametrize(
    ("reward_func", "message"),
    [
        (says_good, r"Reward function 'says_good' returned str 'good' for completion 0"),
        (nested_rewards, r"Reward function 'nested_rewards' returned list \[0.5\] for completion 0"),
        (two_columns, r"Reward function 'two_columns' returned Tensor tensor\(\[1., 1.\]\) for completion 0"),
        (says_good_async, r"Reward function 'says_good_async' returned str 'good' for completion 0"),
    ],
)
def test_reward_function_returning_non_numbers_is_named(tmp_path, reward_folder, left_tokenizer, reward_func, message):
    trainer = PPOTrainer(
        make_shared(reward_folder),
        reward_funcs=reward_func,
        args=ppo_args(tmp_path),
        train_dataset=prompts(),
        processing_class=left_tokenizer,
    )
    with pytest.raises(TypeError, match=message):
        trainer.train()


def test_reward_functions_returning_numbers_of_any_kind_train(tmp_path, reward_folder, left_tokenizer):
    def mixed(completions, **kwargs):
        kinds = [1, 0.5, torch.tensor(0.25), None]  # int, float, 0-d tensor, None (this function does not apply)
        return [kinds[i % 4] for i in range(len(completions))]

    def column(completions, **kwargs):
        return torch.zeros(len(completions), 1)  # TRL reads each one-element row as a number

    trainer = PPOTrainer(
        make_shared(reward_folder), reward_funcs=[mixed, column, lambda completions, **kw: np.zeros(len(completions))],
        args=ppo_args(tmp_path), train_dataset=prompts(), processing_class=left_tokenizer,
    )  # fmt: skip
    trainer.train()
    # as in TRL, the completion `mixed` did not score keeps the other two functions' rewards: none is skipped
    assert trainer.state.log_history[0]["objective/skipped_completions"] == 0


def test_reward_function_with_wrong_count_is_rejected(tmp_path, reward_folder, left_tokenizer):
    trainer = PPOTrainer(
        make_shared(reward_folder),
        reward_funcs=lambda completions, **kw: [0.0],
        args=ppo_args(tmp_path),
        train_dataset=prompts(),
        processing_class=left_tokenizer,
    )
    with pytest.raises(ValueError, match="returned 1 rewards, but 4 were expected"):
        trainer.train()


def test_a_batch_with_only_nan_rewards_fails_instead_of_training_nothing(tmp_path, reward_folder, left_tokenizer):
    # issue 18 item 5: every step of such a run would be a no-op, so it must not "succeed"
    shared = make_shared(reward_folder)
    before = snapshot(shared.peft_model.named_parameters())
    trainer = PPOTrainer(
        shared,
        reward_funcs=lambda completions, **kw: [math.nan] * len(completions),
        args=ppo_args(tmp_path),
        train_dataset=prompts(),
        processing_class=left_tokenizer,
    )
    with pytest.raises(ValueError, match="none of the 4 completions of this generation batch got a reward"):
        trainer.train()
    assert not changed(before, shared.peft_model.named_parameters())


def test_partly_nan_rewards_train_on_the_rest(tmp_path, reward_folder, left_tokenizer):
    def half_nan(completions, **kw):
        return [math.nan if i % 2 else 1.0 for i in range(len(completions))]

    shared = make_shared(reward_folder)
    before = snapshot(shared.peft_model.named_parameters())
    trainer = PPOTrainer(
        shared, reward_funcs=half_nan, args=ppo_args(tmp_path), train_dataset=prompts(), processing_class=left_tokenizer
    )
    trainer.train()
    log = trainer.state.log_history[0]
    assert log["objective/skipped_completions"] == 2 and log["objective/scores"] == 1.0
    assert changed(before, shared.peft_model.named_parameters())


def test_trainer_logs_trl_ppo_metric_names(tmp_path, reward_folder, left_tokenizer):
    trainer = PPOTrainer(
        make_shared(reward_folder), args=ppo_args(tmp_path), train_dataset=prompts(), processing_class=left_tokenizer
    )
    trainer.train()
    names = {
        "objective/kl", "objective/entropy", "objective/scores", "objective/rlhf_reward",
        "objective/non_score_reward", "policy/approxkl_avg", "policy/clipfrac_avg", "policy/entropy_avg",
        "loss/policy_avg", "loss/value_avg", "val/clipfrac_avg", "val/ratio", "val/explained_variance",
        "val/explained_variance_mc",
    }  # fmt: skip
    assert names <= set(trainer.state.log_history[0])


def test_monte_carlo_explained_variance_is_the_lambda_one_explained_variance(tmp_path, reward_folder, left_tokenizer):
    # The first rollout does not depend on lam (same seed, no update yet), and with lam = 1 GAE's returns are the
    # Monte-Carlo returns: so val/explained_variance_mc at lam 0.5 must equal val/explained_variance at lam 1.
    def first_rollout_metrics(lam):
        shared = make_shared(reward_folder)
        randomize_lora(shared.peft_model, "value", seed=7)  # a critic whose values are not ~0, so both EVs differ
        trainer = PPOTrainer(
            shared, reward_funcs=fraction_of_a, args=ppo_args(tmp_path, lam=lam, kl_coef=0.1), train_dataset=prompts(),
            processing_class=left_tokenizer,
        )  # fmt: skip
        rollout(trainer)
        return {name: values[-1] for name, values in trainer._metrics["train"].items()}

    half, one = first_rollout_metrics(0.5), first_rollout_metrics(1.0)
    assert half["objective/scores"] == one["objective/scores"]  # the same rollout
    assert half["val/explained_variance_mc"] == pytest.approx(one["val/explained_variance"], rel=1e-5, abs=1e-6)
    assert one["val/explained_variance_mc"] == pytest.approx(one["val/explained_variance"], rel=1e-5, abs=1e-6)
    assert abs(half["val/explained_variance"] - half["val/explained_variance_mc"]) > 1e-3


def test_reward_role_scores_prompt_completion_and_eos(reward_folder, left_tokenizer):
    shared = make_shared(reward_folder)
    reward = SharedBaseReward(shared, left_tokenizer)
    prompts, completions = ["abc", "hello"], ["xyz", "w"]
    got = reward(prompts=prompts, completions=completions)
    for prompt, completion, score in zip(prompts, completions, got):
        ids = left_tokenizer(prompt + completion + "</s>", add_special_tokens=False, return_tensors="pt")["input_ids"]
        assert ids[0, -1] == left_tokenizer.eos_token_id
        expected = shared.reward_scores(ids, torch.ones_like(ids)).item()  # one unpadded sequence
        assert score == pytest.approx(expected, abs=1e-5)
