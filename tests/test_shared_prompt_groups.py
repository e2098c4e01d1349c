"""Each prompt computed once in online K-way (`shared_prompt`): a GRPO group's G completions run as one row, and the
per-token log-probs and entropies, the loss, every trainable parameter's gradient and the logged metrics are those of
the G unshared rows; the reference pass too. The auto switch turns it off, with one log line, where it cannot be
exact, and True refuses there.

The batches are GRPO's layout (left-padded prompts, right-padded completions) built to catch a wrong mask, position
or first-token read: completions of different lengths within a group (one token, and one filling the width), prompts of
different lengths across groups (so each group has its own left padding; a one-token prompt), a tool mask. The
positions are checked on a GPT-2 too: its learned absolute position embeddings see a position that is off by the left
padding, which a rotary model's relative attention hides. Policies: a `SharedBase` (adapter switching, the reference
its adapters off), a full fine-tune (the reference a frozen copy) and a peft LoRA (the reference its adapter off),
with TRL's activation checkpointing on (the default) and off. PPO (num_generations > 1) shares its rollout's
reference, theta_old and critic forwards, and its loss's: a shuffled micro-batch's rows of one prompt are gathered
into one shared row, for the policy and for each kind of critic.
"""

import logging

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import (
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    MistralConfig,
    MistralForCausalLM,
    TrainerCallback,
)

from rlhf_ext.models import SharedBase, SharedBaseArguments, save_adapter_with_head
from rlhf_ext.ops.shared_prompt import grouped_rows_problem, right_padded_rows, rows_by_prompt
from rlhf_ext.testing import randomize_lora, tiny_causal_lm, tiny_llama_config
from rlhf_ext.trainers.kway.online import OnlinePlackettLuceConfig, OnlinePlackettLuceTrainer, regroup
from rlhf_ext.trainers.ppo.config import PPOConfig
from rlhf_ext.trainers.ppo.trainer import PPOTrainer
from rlhf_ext.trainers.shared_prompt import SharedPromptSwitch

LORA = dict(lora_r=4, lora_alpha=8, lora_dropout=0.0)
K = 3  # num_generations
CHECKPOINTING = {"trl_default": {}, "off": {"gradient_checkpointing": False}}
POLICIES = ["shared_base", "full", "lora", "gpt2"]

# three groups of K = 3: prompts of 4, 1 and 6 tokens (left padded to 6: each group its own padding), completions of
# 1..7 tokens in width 7 (right padded), a group with a one-token completion and one with a completion filling it
PROMPTS = [[11, 12, 13, 14], [15], [16, 17, 18, 19, 20, 21]]
COMPLETIONS = [
    [[30, 31, 2], [32], [33, 34, 35, 36, 37, 38, 2]],
    [[40, 41, 42, 43, 2], [44, 45], [46, 47, 48]],
    [[50], [51, 52, 53, 54, 55, 56, 57], [58, 59, 2]],
]
# tool-output tokens (0) inside some completions: left out of the summed log-probs, not of the forward
TOOL_MASKS = {(0, 2): [1, 1, 0, 0, 1, 1, 1], (1, 0): [1, 0, 0, 1, 1, 1, 1], (2, 1): [1, 1, 1, 0, 1, 1, 1]}


@pytest.fixture(scope="module")
def reward_folder(tmp_path_factory):
    """An adapter + head folder with random weights, loadable as the reward role."""
    donor = SharedBase(tiny_causal_lm(seed=0), SharedBaseArguments(**LORA))
    randomize_lora(donor.peft_model, "value", seed=3)
    folder = tmp_path_factory.mktemp("reward") / "reward"
    return str(save_adapter_with_head(donor.peft_model, "value", donor.heads["value"], folder, "reward"))


def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=101, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, bos_token_id=1,
                                      eos_token_id=2))  # no dropout: both forwards drop nothing


def online_trainer(tmp_path, policy, reward_folder, left_tokenizer, **overrides):
    args = OnlinePlackettLuceConfig(**{
        **dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=3 * K, num_generations=K,
               max_completion_length=7, max_steps=1, learning_rate=1e-2, dpo_beta=0.5, temperature=0.7,
               report_to=[], use_cpu=True, bf16=False, save_strategy="no", disable_tqdm=True, seed=0),
        **overrides,
    })  # fmt: skip
    dataset = Dataset.from_dict({"prompt": ["abc", "hello", "xy", "qrs"]})
    if policy == "shared_base":
        shared = SharedBase(tiny_causal_lm(seed=0), SharedBaseArguments(reward_adapter_path=reward_folder, **LORA))
        randomize_lora(shared.peft_model, "policy", seed=5, scale=0.1)  # policy != reference
        return OnlinePlackettLuceTrainer(shared, args=args, train_dataset=dataset, processing_class=left_tokenizer)
    model = tiny_gpt2() if policy == "gpt2" else tiny_causal_lm(seed=0)
    peft = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]) if policy == "lora" else None
    trainer = OnlinePlackettLuceTrainer(model, reward_funcs=length_reward, args=args, train_dataset=dataset,
                                        processing_class=left_tokenizer, peft_config=peft)
    if policy == "lora":
        randomize_lora(trainer.model, "default", seed=5, scale=0.1)
    else:  # the reference is a copy of the policy taken before training: move the policy away from it
        torch.manual_seed(6)
        with torch.no_grad():
            for parameter in trainer.model.parameters():
                parameter.add_(0.02 * torch.randn_like(parameter))
    return trainer


def grpo_rows(tool_mask: bool = False) -> dict:
    """The three groups as GRPOTrainer lays out a batch: [N, ...], a group's K rows consecutive."""
    prompt_width, completion_width = max(map(len, PROMPTS)), 7
    rows = {"prompt_ids": [], "prompt_mask": [], "completion_ids": [], "completion_mask": [], "tool_mask": []}
    for g, (prompt, completions) in enumerate(zip(PROMPTS, COMPLETIONS)):
        for k, completion in enumerate(completions):
            left, right = prompt_width - len(prompt), completion_width - len(completion)
            rows["prompt_ids"].append([0] * left + prompt)
            rows["prompt_mask"].append([0] * left + [1] * len(prompt))
            rows["completion_ids"].append(completion + [0] * right)
            rows["completion_mask"].append([1] * len(completion) + [0] * right)
            rows["tool_mask"].append(TOOL_MASKS.get((g, k), [1] * completion_width))
    batch = {key: torch.tensor(value) for key, value in rows.items()}
    if not tool_mask:
        del batch["tool_mask"]
    return batch


def forward_rows(batch: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(input_ids, attention_mask, logits_to_keep) of GRPOTrainer's forward over `batch`."""
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    return input_ids, attention_mask, batch["completion_ids"].size(1)


def loss_batch(trainer, tool_mask: bool) -> dict:
    """The batch `_compute_loss` gets: groups [G, K, ...] in a ranked order, with the reference's log-probs."""
    batch = grpo_rows(tool_mask)
    with torch.no_grad():
        ref_tokens = trainer._reference_logprobs(*forward_rows(batch))
    mask = batch["completion_mask"] * batch.get("tool_mask", 1)
    batch["ref_logps"] = (ref_tokens * mask).sum(dim=1)
    order = torch.tensor([[2, 0, 1], [0, 1, 2], [1, 2, 0]])
    grouped = regroup(batch, order)
    grouped.update(item_mask=torch.ones(3, K, dtype=torch.bool), depth=torch.full((3,), K - 1))
    return grouped


def switched(trainer, setting: bool | None, pack="auto") -> list:
    """Set the trainer's switch; returns the list of shared-row builds, so a test can see the layout ran."""
    trainer._shared_prompt = SharedPromptSwitch(setting, scores=False, pack=pack)
    builds, build = [], trainer._shared_prompt.build
    trainer._shared_prompt.build = lambda inputs, t: builds.append(build(inputs, t)) or builds[-1]
    return builds


def loss_grads_metrics(trainer, batch, setting: bool, pack="auto"):
    """Loss, every trainable parameter's gradient and the logged metrics of one training forward + backward."""
    builds = switched(trainer, setting, pack)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, bypassed here
    trainer.model.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    loss = trainer._compute_loss(trainer.model, batch)
    loss.backward()
    assert bool(builds) == setting  # the layout really ran (or not)
    grads = {name: p.grad.detach().clone() for name, p in trainer.model.named_parameters()
             if p.requires_grad and p.grad is not None}
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    return loss.detach(), grads, metrics


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    difference = (actual - expected).norm()
    assert difference <= 1e-5 * expected.norm() + 1e-12, f"{what}: differs by {difference:.3g} of {expected.norm():.3g}"


# ----------------------------------------------------------------------------- the conversion alone


def test_grpo_rows_become_right_padded_rows_that_keep_their_positions():
    batch = grpo_rows()
    input_ids, attention_mask, width = forward_rows(batch)
    assert grouped_rows_problem(batch["prompt_mask"], batch["completion_mask"]) is None
    rows = right_padded_rows(input_ids, batch["prompt_mask"], batch["completion_mask"])
    for n in range(input_ids.shape[0]):
        real = attention_mask[n].bool()
        length = int(real.sum())
        assert rows["input_ids"][n, :length].tolist() == input_ids[n, real].tolist()
        assert rows["attention_mask"][n].tolist() == [1] * length + [0] * (input_ids.shape[1] - length)
        assert rows["position_ids"][n, :length].tolist() == real.nonzero().flatten().tolist()  # their columns
        completion = int(batch["completion_mask"][n].sum())
        assert rows["completion_mask"][n, length - completion : length].all()
        assert rows["completion_mask"][n].sum() == completion


def test_rows_that_are_not_left_padded_prompts_then_completions_are_found():
    batch = grpo_rows()
    prompt_mask, completion_mask = batch["prompt_mask"], batch["completion_mask"]
    assert "prompt mask" in grouped_rows_problem(prompt_mask.flip(1), completion_mask)  # a right-padded prompt
    holed = completion_mask.clone()
    holed[0, 1] = 0
    assert "completion mask" in grouped_rows_problem(prompt_mask, holed)
    assert "empty prompt" in grouped_rows_problem(torch.zeros_like(prompt_mask), completion_mask)


# ----------------------------------------------------------------------------- exactness in the trainer


@pytest.mark.parametrize("checkpointing", CHECKPOINTING, ids=list(CHECKPOINTING))
@pytest.mark.parametrize("policy", POLICIES)
def test_loss_gradients_and_metrics_equal_the_unshared_forward(tmp_path, reward_folder, left_tokenizer, policy,
                                                               checkpointing):
    trainer = online_trainer(tmp_path, policy, reward_folder, left_tokenizer, **CHECKPOINTING[checkpointing])
    assert trainer._shared_prompt.active  # the auto switch is on for these models
    trainer.train()  # one step: the model as the training loop sets it up (Trainer turns checkpointing on in `train`)
    assert trainer.model.is_activation_checkpointing == (checkpointing == "trl_default")
    for tool_mask in (False, True):
        batch = loss_batch(trainer, tool_mask)
        loss, grads, metrics = loss_grads_metrics(trainer, batch, False)
        assert loss != 0 and torch.isfinite(loss) and grads
        for pack in (False, True, "auto"):
            shared_loss, shared_grads, shared_metrics = loss_grads_metrics(trainer, batch, True, pack)
            torch.testing.assert_close(shared_loss, loss, rtol=1e-5, atol=0)
            assert shared_grads.keys() == grads.keys()
            for name, grad in grads.items():
                assert_close_relative(shared_grads[name], grad, f"pack={pack}, tool_mask={tool_mask}, {name}")
            assert shared_metrics.keys() == metrics.keys()
            for name, value in metrics.items():
                assert shared_metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-6), (pack, name)


@pytest.mark.parametrize("policy", POLICIES)
def test_token_logps_entropies_and_reference_equal_the_unshared_forward(tmp_path, reward_folder, left_tokenizer,
                                                                        policy):
    """TRL's forward at the sampling temperature: per-token log-probs and entropies (GRPO logs the entropy), in TRL's
    chunks of batch_size rows or whole groups, and the reference's log-probs (its own model, or adapters off)."""
    trainer = online_trainer(tmp_path, policy, reward_folder, left_tokenizer)
    input_ids, attention_mask, completion_length = forward_rows(grpo_rows())
    real = attention_mask[:, -completion_length:].bool()
    trainer.model.eval()
    with torch.no_grad():
        switched(trainer, False)
        logps, entropies, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, input_ids, attention_mask, completion_length, compute_entropy=True)
        reference = trainer._reference_logprobs(input_ids, attention_mask, completion_length)
        assert (logps[~real] == 0).all() and (logps[real] < 0).all() and (entropies[real] > 0).all()
        assert not torch.allclose(logps, reference)  # policy != reference
        for batch_size, chunks in {None: 1, 2: 3, 3: 3, 4: 3, 6: 2, 9: 1}.items():  # rounded to whole groups
            builds = switched(trainer, True)
            shared_logps, shared_entropies, _ = trainer._get_per_token_logps_and_entropies(
                trainer.model, input_ids, attention_mask, completion_length, batch_size=batch_size,
                compute_entropy=True)
            torch.testing.assert_close(shared_logps, logps, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(shared_entropies, entropies, rtol=1e-5, atol=1e-6)
            assert len(builds) == chunks, batch_size
        for pack in (False, True):
            builds = switched(trainer, True, pack)
            torch.testing.assert_close(trainer._reference_logprobs(input_ids, attention_mask, completion_length),
                                       reference, rtol=1e-5, atol=1e-6)
            assert builds


@pytest.mark.parametrize("checkpointing", CHECKPOINTING, ids=list(CHECKPOINTING))
def test_a_training_step_makes_the_same_update_shared_and_unshared(tmp_path, reward_folder, left_tokenizer,
                                                                    checkpointing):
    """End to end: rollout (with its reference pass), loss and backward; the gradients the optimizer steps with
    are equal, and the shared layout ran in both passes."""
    stepped = {}
    for setting in (False, True):
        trainer = online_trainer(tmp_path / str(setting), "shared_base", reward_folder, left_tokenizer,
                                 shared_prompt=setting, **CHECKPOINTING[checkpointing])
        builds = switched(trainer, setting)
        grads = GradientsAtStep()
        trainer.add_callback(grads)
        trainer.train()
        assert len(builds) == (2 if setting else 0)  # the reference pass and the loss's forward
        stepped[setting] = grads.grads
    assert stepped[False] and stepped[False].keys() == stepped[True].keys()
    for name, grad in stepped[False].items():
        assert_close_relative(stepped[True][name], grad, name)


class GradientsAtStep(TrainerCallback):
    """The policy adapter's gradients as the optimizer is about to step."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()
                      if ".policy." in name and p.grad is not None}


# ----------------------------------------------------------------------------- the switch


def test_auto_turns_off_with_one_log_line_for_a_sliding_window_and_true_refuses(tmp_path, reward_folder,
                                                                                  left_tokenizer, caplog):
    """GRPO's config bounds no sequence length (no max_length), so any sliding window could bite."""
    def mistral():
        torch.manual_seed(0)
        return MistralForCausalLM(MistralConfig(vocab_size=101, hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                sliding_window=4096, pad_token_id=0, eos_token_id=2))

    args = dict(output_dir=str(tmp_path), per_device_train_batch_size=2 * K, num_generations=K,
                max_completion_length=7, report_to=[], use_cpu=True, bf16=False)
    dataset = Dataset.from_dict({"prompt": ["abc", "hello"]})
    with caplog.at_level(logging.WARNING, logger="rlhf_ext"):
        trainer = OnlinePlackettLuceTrainer(mistral(), reward_funcs=length_reward, train_dataset=dataset,
                                            args=OnlinePlackettLuceConfig(**args), processing_class=left_tokenizer)
    lines = [r.getMessage() for r in caplog.records if "shared_prompt" in r.getMessage()]
    assert len(lines) == 1 and "off" in lines[0] and "sliding window" in lines[0] and "max_length=None" in lines[0]
    assert trainer._shared_prompt.active is False
    with pytest.raises(ValueError, match=r"shared_prompt=True.*sliding window \(sliding_window=4096\)"):
        OnlinePlackettLuceTrainer(mistral(), reward_funcs=length_reward, train_dataset=dataset,
                                  args=OnlinePlackettLuceConfig(**args, shared_prompt=True),
                                  processing_class=left_tokenizer)


def test_false_turns_it_off_without_a_word(tmp_path, reward_folder, left_tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="rlhf_ext"):
        trainer = online_trainer(tmp_path, "full", reward_folder, left_tokenizer, shared_prompt=False)
    assert trainer._shared_prompt.active is False and "shared_prompt" not in caplog.text


def test_rows_that_are_not_left_padded_prompts_then_completions_run_unshared_or_are_refused(
        tmp_path, reward_folder, left_tokenizer, caplog):
    trainer = online_trainer(tmp_path, "full", reward_folder, left_tokenizer)
    trainer.model.eval()
    input_ids, attention_mask, completion_length = forward_rows(grpo_rows())
    cases = {"its prompt mask is not left padding": torch.cat([attention_mask[:, :6].flip(1), attention_mask[:, 6:]],
                                                              dim=1),
             "its completion mask is not the completion then right padding": torch.cat(
                 [attention_mask[:, :6], attention_mask[:, 6:].flip(1)], dim=1)}
    for why, mask in cases.items():
        caplog.clear()
        with torch.no_grad():
            switched(trainer, False)
            expected, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, mask,
                                                                        completion_length)
            builds = switched(trainer, None)
            with caplog.at_level(logging.WARNING, logger="rlhf_ext"):
                for _ in range(2):
                    logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, mask,
                                                                             completion_length)
                    assert torch.equal(logps, expected)  # TRL's own forward
        assert not builds and caplog.text.count("shared_prompt: a batch runs unshared") == 1, why
        assert why in caplog.text
        switched(trainer, True)
        with pytest.raises(ValueError, match=rf"shared_prompt=True, but this batch cannot share its prompts: .*{why}"):
            trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, mask, completion_length)


ROW_SETS = {
    # a shuffled micro-batch (PPO's loss): a prompt's rows wherever the shuffle put them
    "shuffled": (torch.tensor([4, 0, 8, 2, 5, 7, 1, 3, 6]), [3, 3, 3]),
    # part of a group, and a prompt held by one row only (it still runs, as a list of one)
    "partial groups": (torch.tensor([0, 6, 1, 4, 7]), [2, 2, 1]),
}


@pytest.mark.parametrize("rows", list(ROW_SETS))
@pytest.mark.parametrize("policy", ["shared_base", "gpt2"])
def test_rows_of_one_prompt_anywhere_in_the_batch_share_it_and_equal_the_unshared_forward(
        tmp_path, reward_folder, left_tokenizer, policy, rows):
    """Rows are gathered by prompt wherever they sit, each prompt computed once, and the per-token log-probs and
    entropies come back in the batch's own row order, equal to TRL's unshared forward."""
    picked, sizes = ROW_SETS[rows]
    trainer = online_trainer(tmp_path, policy, reward_folder, left_tokenizer)
    trainer.model.eval()
    input_ids, attention_mask, completion_length = forward_rows(grpo_rows())
    input_ids, attention_mask = input_ids[picked], attention_mask[picked]
    with torch.no_grad():
        switched(trainer, False)
        expected = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention_mask,
                                                              completion_length, compute_entropy=True)
        builds = switched(trainer, True, pack=False)
        actual = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention_mask,
                                                            completion_length, compute_entropy=True)
    assert len(builds) == 1 and builds[0].input_ids.shape[0] == len(sizes)  # one row per prompt
    assert sorted(builds[0].layout.block.max(dim=1).values.tolist()) == list(range(len(sizes)))
    real = attention_mask[:, -completion_length:].bool()
    for name, a, e in (("log-probs", actual[0], expected[0]), ("entropies", actual[1], expected[1])):
        assert_close_relative(a * real, e * real, name)


def test_rows_by_prompt_gathers_each_prompt_in_order_of_its_first_row():
    prompt_ids = torch.tensor([[0, 5, 6], [7, 8, 9], [0, 5, 6], [9, 5, 6], [7, 8, 9]])
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 1, 1], [0, 1, 1], [1, 1, 1]])
    # row 3 has the same ids as rows 0 and 2 where their masks are 1, but one more prompt token: another prompt
    prompt_mask[3, 0] = 1
    order, sizes = rows_by_prompt(prompt_ids, prompt_mask)
    assert order.tolist() == [0, 2, 1, 4, 3] and sizes.tolist() == [2, 2, 1]
    # the padding's ids do not matter
    padded = prompt_ids.clone()
    padded[2, 0] = 42
    assert rows_by_prompt(padded, prompt_mask)[0].tolist() == [0, 2, 1, 4, 3]


def test_shared_prompt_config_field_takes_only_none_true_false(tmp_path):
    args = dict(output_dir=str(tmp_path), per_device_train_batch_size=K, num_generations=K, report_to=[],
                use_cpu=True, bf16=False)
    assert OnlinePlackettLuceConfig(**args).shared_prompt is None
    with pytest.raises(ValueError, match="shared_prompt must be None"):
        OnlinePlackettLuceConfig(**args, shared_prompt="auto")


# ----------------------------------------------------------------------------- PPO: the rollout's forwards


def ppo_trainer(tmp_path, reward_folder, left_tokenizer, value_layout="own_adapter", **overrides):
    shared = SharedBase(tiny_causal_lm(seed=0), SharedBaseArguments(reward_adapter_path=reward_folder,
                                                                    value_layout=value_layout, **LORA))
    randomize_lora(shared.peft_model, "policy", seed=5, scale=0.1)  # policy != reference
    args = PPOConfig(**{
        **dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2 * K, num_generations=K,
               max_completion_length=7, max_steps=1, num_ppo_epochs=1, learning_rate=1e-2, kl_coef=0.1,
               temperature=0.7, report_to=[], use_cpu=True, bf16=False, save_strategy="no", disable_tqdm=True,
               seed=0),
        **overrides,
    })  # fmt: skip
    dataset = Dataset.from_dict({"prompt": ["abc", "hello", "xy", "qrs"]})
    return PPOTrainer(shared, args=args, train_dataset=dataset, processing_class=left_tokenizer)


def ppo_rollout(trainer, setting) -> tuple[dict, list]:
    """One generation batch, sampled from the same seed whatever the setting (the layout draws no random number)."""
    builds = switched(trainer, setting)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, bypassed here
    torch.manual_seed(0)
    return trainer._generate_and_score_completions([{"prompt": p} for p in ("abc", "hello") for _ in range(K)]), builds


CRITICS = ["own_adapter", "policy_trunk", "separate_value_model"]


def ppo_trainer_with(critic: str, tmp_path, reward_folder, left_tokenizer, **overrides) -> PPOTrainer:
    """PPO with the shared base's value role (its own adapter, or the policy's trunk) or a separate value model."""
    if critic != "separate_value_model":
        return ppo_trainer(tmp_path, reward_folder, left_tokenizer, critic, **overrides)
    torch.manual_seed(1)
    value_model = AutoModelForSequenceClassification.from_config(tiny_llama_config(num_labels=1))
    args = PPOConfig(**{
        **dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2 * K, num_generations=K,
               max_completion_length=7, max_steps=1, num_ppo_epochs=1, learning_rate=1e-2, kl_coef=0.1,
               temperature=0.7, report_to=[], use_cpu=True, bf16=False, save_strategy="no", disable_tqdm=True,
               seed=0),
        **overrides,
    })  # fmt: skip
    trainer = PPOTrainer(tiny_causal_lm(seed=0), reward_funcs=length_reward, value_model=value_model, args=args,
                         train_dataset=Dataset.from_dict({"prompt": ["abc", "hello", "xy", "qrs"]}),
                         processing_class=left_tokenizer)
    torch.manual_seed(6)  # the reference is a copy of the policy taken before training: move the policy away from it
    with torch.no_grad():
        for name, parameter in trainer.model.named_parameters():
            if not name.startswith("value_model."):
                parameter.add_(0.02 * torch.randn_like(parameter))
    return trainer


def micro_batch(batch: dict, rows: torch.Tensor) -> dict:
    """The rows `rows` of a generation batch, as GRPO's shuffle and split hand them to `_compute_loss`."""
    size = len(batch["completion_ids"])
    return {key: value[rows] if torch.is_tensor(value) and value.dim() > 0 and len(value) == size else value
            for key, value in batch.items()}


@pytest.mark.parametrize("critic", CRITICS)
def test_ppo_rollout_equals_the_unshared_one(tmp_path, reward_folder, left_tokenizer, critic):
    """The rollout's theta_old log-probs, reference log-probs and values, and so the advantages and returns, equal
    the unshared rollout's; each of those forwards ran shared."""
    trainer = ppo_trainer_with(critic, tmp_path, reward_folder, left_tokenizer)
    assert trainer._shared_prompt.active
    unshared, _ = ppo_rollout(trainer, False)
    shared, builds = ppo_rollout(trainer, True)
    # theta_old (with the values, for policy_trunk), reference, and a critic of its own
    assert len(builds) == (2 if critic == "policy_trunk" else 3)
    assert torch.equal(shared["completion_ids"], unshared["completion_ids"])
    real = unshared["completion_mask"].bool()  # (prompts of 3 and 5 tokens: two left paddings)
    for name in ("old_per_token_logps", "old_values", "advantages", "returns"):
        torch.testing.assert_close(shared[name] * real, unshared[name] * real, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(shared["ppo_mask"], unshared["ppo_mask"])


@pytest.mark.parametrize("checkpointing", CHECKPOINTING, ids=list(CHECKPOINTING))
@pytest.mark.parametrize("critic", CRITICS)
def test_ppo_loss_on_a_shuffled_micro_batch_equals_the_unshared_one(tmp_path, reward_folder, left_tokenizer, critic,
                                                                   checkpointing):
    """The loss's micro-batch holds shuffled completions (GRPO's shuffle and split): the rows of each prompt in it
    run as one shared row, for the policy and the values, and the loss, every trainable gradient (policy and critic)
    and the logged metrics equal the unshared forward's."""
    trainer = ppo_trainer_with(critic, tmp_path, reward_folder, left_tokenizer, **CHECKPOINTING[checkpointing])
    trainer.train()  # one step: the model as the training loop sets it up (Trainer turns checkpointing on in `train`)
    assert trainer.model.is_activation_checkpointing == (checkpointing == "trl_default")
    rollout, _ = ppo_rollout(trainer, False)
    batch = micro_batch(rollout, torch.tensor([4, 0, 5, 1]))  # two rows of each prompt, interleaved
    expected = loss_grads_metrics(trainer, batch, False)
    actual = loss_grads_metrics(trainer, batch, True)
    assert_close_relative(actual[0], expected[0], "loss")
    assert actual[1].keys() == expected[1].keys() and any(name.startswith("value") or ".value" in name
                                                          for name in expected[1])
    for name in expected[1]:
        assert_close_relative(actual[1][name], expected[1][name], name)
    assert actual[2].keys() == expected[2].keys()
    for name in expected[2]:
        assert actual[2][name] == pytest.approx(expected[2][name], rel=1e-5, abs=1e-6), name


@pytest.mark.parametrize("checkpointing", CHECKPOINTING, ids=list(CHECKPOINTING))
def test_a_ppo_training_step_makes_the_same_update_shared_and_unshared(tmp_path, reward_folder, left_tokenizer,
                                                                       checkpointing):
    """End to end through Trainer.train: rollout (generation, reward role, theta_old, reference, critic), then the
    loss's forward and backward on a shuffled micro-batch; the policy's and the critic's gradients the optimizer steps
    with are equal shared and unshared, and the shared layout ran in the rollout and in the loss."""
    stepped = {}
    for setting in (False, True):
        trainer = ppo_trainer(tmp_path / str(setting), reward_folder, left_tokenizer, shared_prompt=setting,
                              **CHECKPOINTING[checkpointing])
        builds = switched(trainer, setting)
        grads = AllGradientsAtStep()
        trainer.add_callback(grads)
        trainer.train()
        assert len(builds) == (5 if setting else 0)  # rollout: theta_old, reference, critic; loss: policy, critic
        stepped[setting] = grads.grads
    assert any(".policy." in name for name in stepped[False]) and any(".value." in name for name in stepped[False])
    assert stepped[False].keys() == stepped[True].keys()
    for name, grad in stepped[False].items():
        assert_close_relative(stepped[True][name], grad, name)


class AllGradientsAtStep(TrainerCallback):
    """Every trainable parameter's gradient as the optimizer is about to step."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def test_ppo_with_one_completion_per_prompt_has_nothing_to_share(tmp_path, reward_folder, left_tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="rlhf_ext"):
        trainer = ppo_trainer(tmp_path, reward_folder, left_tokenizer, num_generations=1, per_device_train_batch_size=2,
                              shared_prompt=True)
    assert trainer._shared_prompt.active is False and "shared_prompt" not in caplog.text
    with pytest.raises(ValueError, match="shared_prompt must be None"):
        PPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, shared_prompt="auto")
