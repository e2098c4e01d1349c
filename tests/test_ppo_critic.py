"""A critic that learns (issue 13): critic warm-up, the critic's own learning rate, the value head's first bias, and
several completions per prompt with the critic as the baseline.

Every trainer test runs with TRL's default gradient_checkpointing=True and with it off.
"""

import pytest
import torch
from datasets import Dataset
from test_ppo_trainer import assert_loss_and_gradients_are_ppo_loss, independent_policy_terms
from transformers import AutoModelForSequenceClassification, TrainerCallback

from rlhf_ext.models import SharedBase, SharedBaseArguments, save_adapter_with_head
from rlhf_ext.ops import gae, masked_whiten, token_rewards
from rlhf_ext.testing import StopAfter, randomize_lora, tiny_causal_lm, tiny_llama_config
from rlhf_ext.trainers.ppo.config import PPOConfig
from rlhf_ext.trainers.ppo.trainer import PPOTrainer

LORA = dict(lora_r=4, lora_alpha=8, lora_dropout=0.0)
PROMPTS = ["abc", "hello", "xy", "qrs"]
CHECKPOINTING = pytest.mark.parametrize("gradient_checkpointing", [True, False], ids=["trl_default_gc", "no_gc"])


def char_code_score(completions, **kwargs):
    """A reward that differs between most completions (unlike the share of 'a', often 0 on a random model)."""
    return [(sum(map(ord, c)) % 7) / 7 + 0.5 for c in completions]


@pytest.fixture
def reward_folder(tmp_path):
    donor = SharedBase(tiny_causal_lm(seed=0), SharedBaseArguments(**LORA))
    randomize_lora(donor.peft_model, "value", seed=3)
    return str(save_adapter_with_head(donor.peft_model, "value", donor.heads["value"], tmp_path / "reward", "reward"))


def make_shared(reward_folder) -> SharedBase:
    return SharedBase(tiny_causal_lm(seed=0), SharedBaseArguments(reward_adapter_path=reward_folder, **LORA))


def ppo_args(tmp_path, gradient_checkpointing: bool, **overrides) -> PPOConfig:
    kwargs = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_completion_length=6, max_steps=1,
        num_ppo_epochs=1, learning_rate=1e-2, kl_coef=0.1, report_to=[], use_cpu=True, bf16=False,
        save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0, gradient_checkpointing=gradient_checkpointing,
    )  # fmt: skip
    kwargs.update(overrides)
    return PPOConfig(**kwargs)


def prompts(n: int = 8) -> Dataset:
    return Dataset.from_dict({"prompt": (PROMPTS * n)[:n]})


def shared_trainer(
    tmp_path, reward_folder, left_tokenizer, gradient_checkpointing, callbacks=None, n_prompts=8, **overrides
):
    shared = make_shared(reward_folder)
    args = ppo_args(tmp_path, gradient_checkpointing, **overrides)
    trainer = PPOTrainer(
        shared, reward_funcs=char_code_score, args=args, train_dataset=prompts(n_prompts),
        processing_class=left_tokenizer, callbacks=callbacks,
    )  # fmt: skip
    return trainer, shared


def role_parameters(shared: SharedBase, role: str) -> dict[str, torch.Tensor]:
    """name -> tensor of `role`'s trainable parameters ("policy": its adapter; "value": adapter and head)."""
    params = {id(p) for p in shared.trainable_parameters(role)}
    named = list(shared.peft_model.named_parameters()) + [(f"heads.{n}", p) for n, p in shared.heads.named_parameters()]
    return {name: p for name, p in named if id(p) in params}


def snapshot(params: dict) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in params.items()}


def moved(before: dict, params: dict) -> set[str]:
    return {name for name, p in params.items() if not torch.equal(before[name], p)}


def rollout(trainer: PPOTrainer, prompt_list=PROMPTS) -> dict:
    """One generation batch, as `_prepare_inputs` would build it before the first update."""
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's training loop, which we bypass here
    return trainer._generate_and_score_completions([{"prompt": p} for p in prompt_list])


def completion_slice(x: torch.Tensor, completion_length: int) -> torch.Tensor:
    return x[:, -completion_length - 1 : -1]


def sequences(batch: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    return input_ids, attention_mask, batch["completion_ids"].size(1)


class AfterStep(TrainerCallback):
    """Call `record(step)` at the end of every optimizer step (after the optimizer and scheduler stepped)."""

    def __init__(self, record):
        self.record = record

    def on_step_end(self, args, state, control, **kwargs):
        self.record(state.global_step)


# ----------------------------------------------------------------------------- value_warmup_steps


@CHECKPOINTING
def test_value_warmup_trains_only_the_critic_then_both(tmp_path, reward_folder, left_tokenizer, gradient_checkpointing):
    after = {}
    trainer, shared = shared_trainer(
        tmp_path, reward_folder, left_tokenizer, gradient_checkpointing, max_steps=2, value_warmup_steps=1,
        callbacks=[AfterStep(lambda step: after.__setitem__(step, record_step(trainer, shared)))],
    )  # fmt: skip
    policy, value = role_parameters(shared, "policy"), role_parameters(shared, "value")
    start = {"policy": snapshot(policy), "value": snapshot(value)}
    trainer.train()

    warmup, second = after[1], after[2]
    assert not moved(start["policy"], warmup["policy"]), "the policy moved during the critic warm-up"
    assert not warmup["policy_in_optimizer_state"], "Adam state was started for the policy during warm-up"
    assert any(".lora_B.value." in n for n in moved(start["value"], warmup["value"])), "value adapter did not move"
    assert {"heads.value.linear.weight", "heads.value.linear.bias"} <= moved(start["value"], warmup["value"])
    assert any(".lora_B.policy." in n for n in moved(warmup["policy"], second["policy"])), "policy frozen after warm-up"
    assert moved(warmup["value"], second["value"]), "the critic stopped after warm-up"


def record_step(trainer: PPOTrainer, shared: SharedBase) -> dict:
    """The roles' parameters after an optimizer step, and whether the optimizer holds state for a policy tensor."""
    state = trainer.optimizer.state
    return {
        "policy": snapshot(role_parameters(shared, "policy")),
        "value": snapshot(role_parameters(shared, "value")),
        "policy_in_optimizer_state": any(p in state for p in shared.trainable_parameters("policy")),
    }


@CHECKPOINTING
def test_warmup_step_moves_the_critic_as_a_normal_step_does_and_not_the_policy(
    tmp_path, reward_folder, left_tokenizer, gradient_checkpointing
):
    # The policy loss does not reach the critic's parameters, so dropping it must leave the critic's step unchanged.
    # Gradient clipping is off: with it on, the policy's gradient would share the clipped norm.
    def updates(output_dir, warmup_steps):
        trainer, shared = shared_trainer(
            output_dir, reward_folder, left_tokenizer, gradient_checkpointing, max_grad_norm=0.0,
            value_warmup_steps=warmup_steps,
        )  # fmt: skip
        params = {**role_parameters(shared, "policy"), **role_parameters(shared, "value")}
        before = snapshot(params)
        trainer.train()
        return {n: p.detach() - before[n] for n, p in params.items()}, set(role_parameters(shared, "policy"))

    expected, policy = updates(tmp_path / "plain", 0)
    got, _ = updates(tmp_path / "warmup", 1)
    assert expected.keys() == got.keys()
    assert any(expected[n].abs().max() > 0 for n in policy), "a normal step leaves the policy: the check is vacuous"
    assert all(got[n].abs().max() == 0 for n in policy), "the policy moved during the critic warm-up"
    critic = [n for n in expected if n not in policy]
    assert any(expected[n].abs().max() > 0 for n in critic)
    for name in critic:
        torch.testing.assert_close(got[name], expected[name], atol=1e-7, rtol=1e-5, msg=name)


# ----------------------------------------------------------------------------- value_learning_rate


def group_lr_of(optimizer) -> dict[int, float]:
    """id(parameter) -> learning rate of the param group that holds it."""
    return {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}


@CHECKPOINTING
def test_critic_param_groups_have_their_own_lr_and_the_scheduler_scales_both(
    tmp_path, reward_folder, left_tokenizer, gradient_checkpointing
):
    trainer, shared = shared_trainer(
        tmp_path, reward_folder, left_tokenizer, gradient_checkpointing, learning_rate=1e-2, value_learning_rate=1e-3,
        weight_decay=0.1, lr_scheduler_type="linear",
    )  # fmt: skip
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    policy, value = shared.trainable_parameters("policy"), shared.trainable_parameters("value")
    lr = group_lr_of(trainer.optimizer)
    assert len(lr) == len(shared.trainable_parameters())  # every trainable tensor, each in one group
    assert {lr[id(p)] for p in shared.trainable_parameters("policy")} == {1e-2}
    assert {lr[id(p)] for p in shared.trainable_parameters("value")} == {1e-3}
    decay = {id(p): g["weight_decay"] for g in trainer.optimizer.param_groups for p in g["params"]}
    head = shared.heads["value"].linear
    assert (decay[id(head.weight)], decay[id(head.bias)]) == (0.1, 0.0)  # Trainer's weight-decay split is kept

    trainer.optimizer.step()  # no gradients: nothing moves; the scheduler may then step without a warning
    for _ in range(3):
        trainer.lr_scheduler.step()
    lr = group_lr_of(trainer.optimizer)
    assert [lr[id(p)] for p in shared.trainable_parameters("policy")] == pytest.approx([1e-2 * 7 / 10] * len(policy))
    assert [lr[id(p)] for p in shared.trainable_parameters("value")] == pytest.approx([1e-3 * 7 / 10] * len(value))


def separate_critic_trainer(tmp_path, left_tokenizer, gradient_checkpointing, **overrides):
    torch.manual_seed(1)
    critic = AutoModelForSequenceClassification.from_config(tiny_llama_config(num_labels=1))
    trainer = PPOTrainer(
        tiny_causal_lm(seed=0), reward_funcs=char_code_score, value_model=critic, train_dataset=prompts(),
        args=ppo_args(tmp_path, gradient_checkpointing, **overrides), processing_class=left_tokenizer,
    )  # fmt: skip
    policy = {n: p for n, p in trainer.model.named_parameters() if not n.startswith("value_model.")}
    return trainer, policy, dict(critic.named_parameters())


@CHECKPOINTING
@pytest.mark.parametrize("critic", ["shared_base", "separate_value_model"])
def test_critic_lr_zero_freezes_the_critic_while_the_policy_trains(
    tmp_path, reward_folder, left_tokenizer, gradient_checkpointing, critic
):
    if critic == "shared_base":
        trainer, shared = shared_trainer(
            tmp_path, reward_folder, left_tokenizer, gradient_checkpointing, value_learning_rate=0.0
        )
        policy, value = role_parameters(shared, "policy"), role_parameters(shared, "value")
    else:
        trainer, policy, value = separate_critic_trainer(
            tmp_path, left_tokenizer, gradient_checkpointing, value_learning_rate=0.0
        )
    policy_before, value_before = snapshot(policy), snapshot(value)
    trainer.train()
    assert moved(policy_before, policy), "the policy did not train"
    assert not moved(value_before, value), "the critic moved with value_learning_rate=0"
    critic_ids = {id(p) for p in value.values()}
    assert any(g["lr"] == 0.0 and {id(p) for p in g["params"]} <= critic_ids for g in trainer.optimizer.param_groups)


# ----------------------------------------------------------------------------- value_head_init


@CHECKPOINTING
def test_first_rollout_mean_starts_the_values_at_the_mean_score(
    tmp_path, reward_folder, left_tokenizer, gradient_checkpointing
):
    # V = w.h + b: the bias must absorb the random weight's own offset mean(w.h), not only the mean score
    # (issue 18), so b = mean_score - mean(w.h) over the real completion tokens and the first values average to
    # the mean score.
    trainer, shared = shared_trainer(
        tmp_path, reward_folder, left_tokenizer, gradient_checkpointing, value_head_init="first_rollout_mean"
    )
    head = shared.heads["value"].linear
    weight_before, bias_before = head.weight.detach().clone(), head.bias.item()
    batch = rollout(trainer)

    completions = trainer.processing_class.batch_decode(batch["completion_ids"], skip_special_tokens=True)
    mean_score = sum(char_code_score(completions)) / len(completions)
    mask = batch["completion_mask"].bool()
    bias_after = head.bias.item()
    with torch.no_grad():
        head.bias.fill_(bias_before)
        _, _, old_head_values = independent_policy_terms(shared, batch)  # w.h + 0, from the base itself
        head.bias.fill_(bias_after)
    offset = old_head_values[mask].mean().item()
    assert bias_before == 0.0 and mean_score > 0.5 and abs(offset) > 1e-3  # the weight's offset is not negligible
    assert bias_after == pytest.approx(mean_score - offset, abs=1e-5)
    assert batch["old_values"][mask].mean().item() == pytest.approx(mean_score, abs=1e-5)
    torch.testing.assert_close(head.weight, weight_before, atol=0, rtol=0)
    # the rollout's values come from the initialised head: the old head's values plus the new bias
    torch.testing.assert_close(batch["old_values"] * mask, (old_head_values + bias_after) * mask, atol=1e-5, rtol=1e-5)

    rollout(trainer)  # only the first rollout sets it
    assert head.bias.item() == pytest.approx(bias_after, abs=1e-6)


def test_zero_value_head_init_leaves_the_bias_alone(tmp_path, reward_folder, left_tokenizer):
    trainer, shared = shared_trainer(tmp_path, reward_folder, left_tokenizer, gradient_checkpointing=True)
    rollout(trainer)
    assert shared.heads["value"].linear.bias.item() == 0.0


def test_first_rollout_mean_needs_a_value_head_with_a_bias(tmp_path, left_tokenizer):
    with pytest.raises(ValueError, match="needs a value head with a bias"):
        separate_critic_trainer(tmp_path, left_tokenizer, True, value_head_init="first_rollout_mean")


# ----------------------------------------------------------------------------- all three options across a resume


@CHECKPOINTING
def test_resume_with_the_critic_options_equals_straight_run(
    tmp_path, reward_folder, left_tokenizer, gradient_checkpointing
):
    # Warm-up for 3 steps spans the checkpoint at step 2, so it must count optimizer steps restored from the
    # checkpoint; the optimizer's split param groups must load the saved state; the head bias is set only on the
    # first rollout of the run, not again after resuming.
    def run(output_dir, resume=None, stop_after=None):
        policy_after = {}

        def record(step):
            policy_after[step] = snapshot(role_parameters(shared, "policy"))

        callbacks = [AfterStep(record)]
        trainer, shared = shared_trainer(
            tmp_path, reward_folder, left_tokenizer, gradient_checkpointing, output_dir=str(output_dir), max_steps=4,
            learning_rate=3e-3, value_learning_rate=1e-3, value_warmup_steps=3, value_head_init="first_rollout_mean",
            n_prompts=16,  # one epoch: across an epoch boundary resuming differs even without these options
            save_strategy="steps", save_steps=2, callbacks=callbacks + ([StopAfter(stop_after)] if stop_after else []),
        )  # fmt: skip
        policy_after[0] = snapshot(role_parameters(shared, "policy"))
        trainer.train(resume_from_checkpoint=resume)
        return shared, policy_after

    straight, policy_after = run(tmp_path / "straight")
    assert not moved(policy_after[0], policy_after[3]), "the policy moved during the 3 warm-up steps"
    assert moved(policy_after[3], policy_after[4]), "the policy did not train after the warm-up"
    run(tmp_path / "split", stop_after=2)
    resumed, _ = run(tmp_path / "split", resume=str(tmp_path / "split" / "checkpoint-2"))
    expected = {**role_parameters(straight, "policy"), **role_parameters(straight, "value")}
    got = {**role_parameters(resumed, "policy"), **role_parameters(resumed, "value")}
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)


# ----------------------------------------------------------------------------- several completions per prompt


@pytest.fixture(params=[True, False], ids=["trl_default_gc", "no_gc"])
def two_per_prompt(request, tmp_path, reward_folder, left_tokenizer):
    """A trainer with num_generations=2 and the first rollout: 2 prompts, 2 completions each, grouped as GRPO's
    sampler repeats them."""
    shared = make_shared(reward_folder)
    randomize_lora(shared.peft_model, "policy", seed=5, scale=0.1)  # so the KL to the reference is not 0
    args = ppo_args(tmp_path, request.param, num_generations=2, cliprange_value=0.05, ent_coef=0.01)
    trainer = PPOTrainer(
        shared, reward_funcs=char_code_score, args=args, train_dataset=prompts(), processing_class=left_tokenizer
    )
    return trainer, shared, rollout(trainer, ["abc", "abc", "hello", "hello"])


def test_two_completions_per_prompt_get_per_token_gae_not_group_advantages(two_per_prompt):
    trainer, shared, batch = two_per_prompt
    args = trainer.args
    assert args.num_generations == 2 and torch.equal(batch["prompt_ids"][0], batch["prompt_ids"][1])
    mask = batch["completion_mask"].bool()
    input_ids, attention_mask, length = sequences(batch)
    with torch.no_grad():
        logprobs, _, values = independent_policy_terms(shared, batch)
        ref_logits = completion_slice(shared.reference_logits(input_ids, attention_mask), length)
        ref_logprobs = ref_logits.log_softmax(-1).gather(-1, batch["completion_ids"][..., None]).squeeze(-1)
    completions = trainer.processing_class.batch_decode(batch["completion_ids"], skip_special_tokens=True)
    scores = torch.tensor(char_code_score(completions))
    eos = trainer.processing_class.eos_token_id
    has_eos = torch.tensor([eos in row[m].tolist() for row, m in zip(batch["completion_ids"], mask)])
    rewards = token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=args.kl_coef, has_eos=has_eos)
    advantages, returns = gae(rewards.rewards, values, mask, gamma=args.gamma, lam=args.lam)

    torch.testing.assert_close(batch["old_values"] * mask, values * mask, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch["returns"], returns, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(batch["advantages"], masked_whiten(advantages, mask) * mask, atol=1e-4, rtol=1e-4)
    # GRPO's advantage is one number per completion, (score - group mean) / group std, the same on every token
    groups = scores.view(-1, 2)
    assert (groups[:, 0] != groups[:, 1]).any(), "equal scores in every group: GRPO's advantage would be 0"
    spreads = [row[m].std().item() for row, m in zip(batch["advantages"], mask) if m.sum() > 1]
    assert spreads and min(spreads) > 1e-3, "an advantage constant over a completion's tokens, as GRPO's is"


def test_two_completions_per_prompt_loss_equals_ppo_loss_on_the_same_tensors(two_per_prompt):
    trainer, shared, batch = two_per_prompt
    grads = assert_loss_and_gradients_are_ppo_loss(trainer, shared, batch)
    assert any(".lora_B.value." in n for n in grads), "the value adapter got no gradient"


# ----------------------------------------------------------------------------- a critic with only `values()`


class ValuesOnlyCritic(torch.nn.Module):
    """A critic in the form PPOTrainer's docstring allows: a module with `values(input_ids, attention_mask) -> [B, L]`
    and neither `save`/`load` nor `save_pretrained`."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(101, 8)  # the tiny tokenizer's vocabulary
        self.head = torch.nn.Linear(8, 1)

    def values(self, input_ids, attention_mask):
        return self.head(self.embed(input_ids)).squeeze(-1)


def test_a_critic_with_only_values_is_checkpointed_and_resumed(tmp_path, left_tokenizer):
    # issue 18: such a critic crashed at the first checkpoint (no `save`); its state_dict is saved instead
    def build(critic, **overrides):
        return PPOTrainer(
            tiny_causal_lm(seed=0), reward_funcs=char_code_score, value_model=critic, train_dataset=prompts(),
            args=ppo_args(tmp_path, False, save_strategy="steps", save_steps=1, **overrides),
            processing_class=left_tokenizer,
        )  # fmt: skip

    trained = ValuesOnlyCritic(seed=2)
    before = {n: p.detach().clone() for n, p in trained.named_parameters()}
    build(trained).train()
    assert moved(before, dict(trained.named_parameters())) == {"embed.weight", "head.weight", "head.bias"}
    checkpoint = tmp_path / "out" / "checkpoint-1"
    assert (checkpoint / "value" / "model.safetensors").is_file()

    fresh = ValuesOnlyCritic(seed=3)
    build(fresh).train(resume_from_checkpoint=str(checkpoint))  # max_steps=1 reached: loads, trains nothing
    for name, param in trained.named_parameters():
        torch.testing.assert_close(dict(fresh.named_parameters())[name], param, atol=0, rtol=0, msg=name)
