"""GRPOTrainer's multi-turn arguments (issue 21 item 5): `tools`, `environment_factory`, `rollout_func`.

Both trainers pass them to GRPOTrainer. Tool / environment output tokens (TRL's `tool_mask`, or a rollout function's
`env_mask`) get no policy gradient: online K-way's loss sums the log-probs of the policy's own tokens; PPO runs its
per-token rewards, GAE and loss over the policy's tokens only, bootstrapping the value across each tool output.
"""

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification

from rlhf_ext.ops import gae
from rlhf_ext.testing import tiny_causal_lm, tiny_llama_config, tiny_tokenizer
from rlhf_ext.trainers.kway.online import OnlinePlackettLuceConfig, OnlinePlackettLuceTrainer
from rlhf_ext.trainers.ppo.config import PPOConfig
from rlhf_ext.trainers.ppo.trainer import PPOTrainer

PROMPTS = ["abc", "hello"]
K = 4
RUN = dict(
    max_completion_length=8, max_steps=1, learning_rate=1e-2, report_to=[], use_cpu=True, bf16=False,
    gradient_checkpointing=False, save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
)  # fmt: skip
# A completion: the policy's "a" * i, then a tool's output "[t]", then the policy's "ok" and EOS.
TOOL_OUTPUT = "[t]"


def left_tokenizer():
    tok = tiny_tokenizer()
    tok.padding_side = "left"
    return tok


def fewer_a_is_better(completions, **kwargs):
    return [-float(c.count("a")) for c in completions]


def tool_rollout(prompts, trainer):
    """A rollout function as TRL calls it: policy tokens around a tool's output, marked 0 in `env_mask`."""
    tok = trainer.processing_class
    prompt_ids, completion_ids, env_mask = [], [], []
    for i, prompt in enumerate(prompts):
        before, tool, after = (tok(text, add_special_tokens=False)["input_ids"] for text in ("a" * (1 + i % K),
                                                                                            TOOL_OUTPUT, "ok"))
        prompt_ids.append(tok(prompt, add_special_tokens=False)["input_ids"])
        completion_ids.append(before + tool + after + [tok.eos_token_id])
        env_mask.append([1] * len(before) + [0] * len(tool) + [1] * (len(after) + 1))
    logprobs = [[0.0] * len(ids) for ids in completion_ids]
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": logprobs, "env_mask": env_mask}


def online_trainer(tmp_path, gradient_checkpointing: bool = False, **multi_turn):
    args = OnlinePlackettLuceConfig(
        output_dir=str(tmp_path / "online"), per_device_train_batch_size=2 * K, num_generations=K, dpo_beta=0.5,
        **{**RUN, "gradient_checkpointing": gradient_checkpointing},
    )  # fmt: skip
    return OnlinePlackettLuceTrainer(
        tiny_causal_lm(seed=0), reward_funcs=fewer_a_is_better, args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4}), processing_class=left_tokenizer(), **multi_turn,
    )  # fmt: skip


def policy_token_gradients(trainer, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """d loss / d log pi(token) for every completion token of the loss's forward [N, C], and the flat tool mask."""
    captured = {}
    forward = trainer._get_per_token_logps_and_entropies

    def keep_logps(*args, **kwargs):
        logps, entropies, aux = forward(*args, **kwargs)
        if torch.is_grad_enabled():
            logps.retain_grad()
            captured["logps"] = logps
        return logps, entropies, aux

    trainer._get_per_token_logps_and_entropies = keep_logps
    trainer._compute_loss(trainer.model, batch).backward()
    grouped = batch["tool_mask"]
    return captured["logps"].grad, grouped.reshape(-1, grouped.shape[-1])


@pytest.mark.parametrize("gradient_checkpointing", [True, False])  # True: TRL's default
def test_online_kway_rollout_func_trains_only_on_the_policys_tokens(tmp_path, gradient_checkpointing):
    trainer = online_trainer(tmp_path, gradient_checkpointing, rollout_func=tool_rollout)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    batch = trainer._generate_and_score_completions([{"prompt": p} for p in PROMPTS for _ in range(K)])
    assert "tool_mask" in batch and (batch["tool_mask"] == 0).any()
    grads, tool_mask = policy_token_gradients(trainer, batch)
    completion = batch["completion_mask"].reshape(tool_mask.shape).bool()
    assert grads[completion & (tool_mask == 0)].abs().max() == 0  # the tool's output: no policy gradient
    assert grads[completion & (tool_mask == 1)].abs().sum() > 0  # the policy's own tokens: trained
    trainer.train()  # and a whole step runs


def ppo_trainer(tmp_path, **overrides_and_multi_turn):
    multi_turn = {k: overrides_and_multi_turn.pop(k) for k in MULTI_TURN if k in overrides_and_multi_turn}
    args = PPOConfig(
        output_dir=str(tmp_path / "ppo"), per_device_train_batch_size=2 * K, num_ppo_epochs=1,
        **{**RUN, **overrides_and_multi_turn},
    )  # fmt: skip
    torch.manual_seed(1)
    critic = AutoModelForSequenceClassification.from_config(tiny_llama_config(num_labels=1))
    return PPOTrainer(
        tiny_causal_lm(seed=0), reward_funcs=fewer_a_is_better, args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4}), processing_class=left_tokenizer(),
        value_model=critic, **multi_turn,
    )  # fmt: skip


MULTI_TURN = ("tools", "environment_factory", "rollout_func")


def test_ppo_gae_runs_over_the_policys_tokens_bootstrapping_across_the_tool_output(tmp_path):
    trainer = ppo_trainer(tmp_path, rollout_func=tool_rollout, kl_coef=0.0, whiten_advantages=False, lam=0.9)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    batch = trainer._generate_and_score_completions([{"prompt": p} for p in PROMPTS for _ in range(K)])
    policy = (batch["completion_mask"] * batch["tool_mask"]).bool()
    assert (~policy & batch["completion_mask"].bool()).any()  # tool output inside the completions
    assert (batch["advantages"][~policy] == 0).all() and (batch["returns"][~policy] == 0).all()
    # By hand: each row's policy tokens side by side, the score at the last of them, GAE over them alone (so
    # V after the tool output is the next state's value of the token before it)
    scores = trainer._last_rewards_per_func.sum(dim=1)
    for row in range(len(policy)):
        values = batch["old_values"][row][policy[row]][None]
        rewards = torch.zeros_like(values)
        rewards[0, -1] = scores[row]
        expected, returns = gae(rewards, values, torch.ones_like(values, dtype=torch.bool), gamma=1.0, lam=0.9)
        assert torch.allclose(batch["advantages"][row][policy[row]], expected[0], atol=1e-6)
        assert torch.allclose(batch["returns"][row][policy[row]], returns[0], atol=1e-6)


@pytest.mark.parametrize("gradient_checkpointing", [True, False])  # True: TRL's default
def test_ppo_rollout_func_trains_only_on_the_policys_tokens(tmp_path, gradient_checkpointing):
    trainer = ppo_trainer(tmp_path, rollout_func=tool_rollout, gradient_checkpointing=gradient_checkpointing)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    batch = trainer._generate_and_score_completions([{"prompt": p} for p in PROMPTS for _ in range(K)])
    grads, tool_mask = policy_token_gradients(trainer, batch)
    completion = batch["completion_mask"].bool()
    assert grads[completion & (tool_mask == 0)].abs().max() == 0
    assert grads[completion & (tool_mask == 1)].abs().sum() > 0
    trainer.train()


@pytest.mark.parametrize("build", [online_trainer, ppo_trainer], ids=["online_kway", "ppo"])
def test_tools_and_environments_reach_grpo(tmp_path, build):
    def search(query: str) -> str:
        """Search.

        Args:
            query: what to look for.
        """
        return query

    class Env:
        def reset(self, **kwargs):
            return None

        def search(self, query: str) -> str:
            """Search.

            Args:
                query: what to look for.
            """
            return query

    # GRPOTrainer's own check ran (the tiny chat template renders no tool calls), so the argument reached it
    for multi_turn in ({"tools": [search]}, {"environment_factory": Env}):
        with pytest.raises(ValueError, match="does not support tool calling"):
            build(tmp_path, **multi_turn)


def test_ppo_takes_a_dataset_that_only_routes_records_to_environments(tmp_path):
    class Env:
        def reset(self, **kwargs):
            return "a prompt from the environment"

    # TRL's own check on the tiny chat template runs, so PPO's data check let the dataset through
    with pytest.raises(ValueError, match="does not support tool calling"):
        PPOTrainer(
            tiny_causal_lm(seed=0), reward_funcs=fewer_a_is_better, args=PPOConfig(output_dir=str(tmp_path), **RUN),
            train_dataset=Dataset.from_dict({"environment": ["a", "b"]}), processing_class=left_tokenizer(),
            value_model=AutoModelForSequenceClassification.from_config(tiny_llama_config(num_labels=1)),
            environment_factory=Env,
        )  # fmt: skip
