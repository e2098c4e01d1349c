"""SharedBase: the four roles on one tiny base, gradients across role switches, saving and loading roles."""

import copy
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaForSequenceClassification

from rlhf_ext.models import SharedBase, SharedBaseArguments, save_adapter_with_head
from rlhf_ext.models.heads import ScalarHead
from rlhf_ext.models.shared_base import is_adapter_parameter
from rlhf_ext.ops import last_token_index
from rlhf_ext.testing import save_tiny_model, tiny_causal_lm, tiny_llama_config

ARGS = SharedBaseArguments(lora_r=4, lora_alpha=8, lora_dropout=0.0)


def randomize_adapters(shared: SharedBase, seed: int = 1) -> None:
    """Give every LoRA weight a random value: peft starts lora_B at 0, which would hide the adapters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in shared.peft_model.named_parameters():
            if ".lora_" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))


def batch(seed: int = 0, batch_size: int = 3, length: int = 9):
    """input_ids [B, T] of real tokens and a right-padded attention_mask [B, T]."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 101, (batch_size, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -3:] = 0
    input_ids[0, -3:] = 0
    return input_ids, attention_mask


def save_value_as_reward(shared: SharedBase, directory) -> None:
    """The value adapter and head saved as a reward role folder (a value folder is refused as the reward role)."""
    save_adapter_with_head(shared.peft_model, "value", shared.heads["value"], directory, "reward")


def grads_of(params) -> list[torch.Tensor | None]:
    """A copy of each parameter's .grad (None where backward did not reach it)."""
    return [p.grad.clone() if p.grad is not None else None for p in params]


@pytest.fixture
def base():
    return tiny_causal_lm(seed=0)


@pytest.fixture
def shared(base):
    shared = SharedBase(copy.deepcopy(base), ARGS)
    randomize_adapters(shared)
    return shared


def test_reference_logits_equal_the_plain_base_exactly(base, shared):
    input_ids, attention_mask = batch()
    expected = base(input_ids=input_ids, attention_mask=attention_mask).logits
    shared.policy_logits(input_ids, attention_mask)  # an adapter forward before must not leak in
    assert torch.equal(shared.reference_logits(input_ids, attention_mask), expected)
    # and the randomized policy really differs from the base, so the check above is not vacuous
    assert not torch.allclose(shared.policy_logits(input_ids, attention_mask), expected)


def test_policy_forward_value_forward_one_backward_keeps_every_gradient(shared):
    input_ids, attention_mask = batch()
    policy_params = shared.trainable_parameters("policy")
    value_params = shared.trainable_parameters("value")

    shared.policy_logits(input_ids, attention_mask).square().mean().backward()
    expected_policy = grads_of(policy_params)
    shared.zero_grad()
    shared.values(input_ids, attention_mask).square().mean().backward()
    expected_value = grads_of(value_params)
    shared.zero_grad()

    # PPO order: policy forward, then a value forward (which switches adapters), a reference
    # forward in between (which disables them), and one backward of the summed loss.
    policy_loss = shared.policy_logits(input_ids, attention_mask).square().mean()
    shared.reference_logits(input_ids, attention_mask)
    value_loss = shared.values(input_ids, attention_mask).square().mean()
    (policy_loss + value_loss).backward()

    for got, want in zip(grads_of(policy_params), expected_policy):
        assert got is not None and torch.allclose(got, want, atol=1e-6)
    for got, want in zip(grads_of(value_params), expected_value):
        assert got is not None and torch.allclose(got, want, atol=1e-6)


def test_no_role_switch_changes_which_parameters_train(shared, tmp_path):
    save_value_as_reward(shared, tmp_path / "reward")
    shared.load_role("reward", tmp_path / "reward")
    trainable = {id(p) for p in shared.trainable_parameters()}
    input_ids, attention_mask = batch()

    def requires_grad_ids():
        return {id(p) for p in shared.parameters() if p.requires_grad}

    assert requires_grad_ids() == trainable
    for forward in (shared.policy_logits, shared.values, shared.reward_scores, shared.reference_logits):
        forward(input_ids, attention_mask)
        assert requires_grad_ids() == trainable, forward.__name__
    with shared.role("reward"):
        assert requires_grad_ids() == trainable
    assert shared.peft_model.active_adapter == "policy"
    # policy: 2 layers x 7 modules x (A, B); value: the same plus the head's weight and bias
    assert len(shared.trainable_parameters("policy")) == 28
    assert len(shared.trainable_parameters("value")) == 30


def test_values_are_one_per_token_and_reward_is_read_at_the_last_real_token(shared, tmp_path):
    save_value_as_reward(shared, tmp_path / "reward")
    shared.load_role("reward", tmp_path / "reward")
    input_ids, attention_mask = batch()
    values = shared.values(input_ids, attention_mask)
    assert values.shape == input_ids.shape and values.dtype == torch.float32

    # The same sequence alone, unpadded: its reward must equal its padded-batch reward, and (since
    # the reward folder holds the value adapter + head) the value at its last token.
    real = attention_mask[0].bool()
    alone_ids = input_ids[0, real][None]
    alone_score = shared.reward_scores(alone_ids, torch.ones_like(alone_ids))
    scores = shared.reward_scores(input_ids, attention_mask)
    assert scores.shape == (3,)
    assert torch.allclose(scores[0], alone_score[0], atol=1e-5)
    assert torch.allclose(alone_score[0], shared.values(alone_ids)[0, -1], atol=1e-5)


def test_last_token_index_handles_left_and_right_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 4]


def test_adapter_parameters_are_told_apart_from_base_modules_named_like_a_role():
    name = "model.layers.0.attention.value.lora_A.policy.weight"  # a base module called "value"
    assert is_adapter_parameter(name, "policy")
    assert not is_adapter_parameter(name, "value")
    assert is_adapter_parameter("model.embed_tokens.lora_embedding_B.value", "value")


def test_missing_reward_role_is_a_clear_error(shared):
    input_ids, attention_mask = batch()
    with pytest.raises(ValueError, match="reward_adapter_path"):
        shared.reward_scores(input_ids, attention_mask)
    with pytest.raises(ValueError, match="Unknown role"):
        with shared.role("critic"):
            pass


def test_each_role_saved_alone_reloads_onto_a_fresh_base_with_identical_outputs(base, shared, tmp_path):
    input_ids, attention_mask = batch()
    for role in ("policy", "value"):
        shared.save_role(role, tmp_path / role)
    save_value_as_reward(shared, tmp_path / "reward_src")
    fresh_args = SharedBaseArguments(
        lora_r=4,
        policy_adapter_path=str(tmp_path / "policy"),
        value_adapter_path=str(tmp_path / "value"),
        reward_adapter_path=str(tmp_path / "reward_src"),
    )
    reloaded = SharedBase(copy.deepcopy(base), fresh_args)
    shared.load_role("reward", tmp_path / "reward_src")

    assert sorted(p.name for p in (tmp_path / "value").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "base_fingerprint.json", "head.safetensors",
        "head_config.json",
    ]
    policy_files = sorted(p.name for p in (tmp_path / "policy").iterdir())
    assert policy_files == ["adapter_config.json", "adapter_model.safetensors", "base_fingerprint.json"]
    for forward in ("policy_logits", "values", "reward_scores"):
        got = getattr(reloaded, forward)(input_ids, attention_mask)
        assert torch.equal(got, getattr(shared, forward)(input_ids, attention_mask)), forward
    # the reloaded policy and value train, the reloaded reward does not
    assert {id(p) for p in reloaded.trainable_parameters()} == {id(p) for p in reloaded.parameters() if p.requires_grad}
    assert len(reloaded.trainable_parameters()) == 58


def test_reward_folder_written_by_a_plain_peft_model_loads_as_the_reward_role(base, tmp_path):
    """What the K-way reward trainer does: its own peft model and a score Linear [1, H] without bias."""
    trainer_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    score = torch.nn.Linear(32, 1, bias=False)
    save_adapter_with_head(trainer_model, "default", score, tmp_path / "rm", role="reward")
    head_config = json.loads((tmp_path / "rm" / "head_config.json").read_text())
    assert head_config == {"hidden_size": 32, "base_model_name_or_path": None, "role": "reward"}

    shared = SharedBase(copy.deepcopy(base), SharedBaseArguments(lora_r=4, reward_adapter_path=str(tmp_path / "rm")))
    input_ids, attention_mask = batch()
    hidden = base.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    last = attention_mask.sum(-1) - 1
    expected = score(hidden[torch.arange(3), last]).squeeze(-1)  # lora_B = 0: the reward adapter is the identity
    assert torch.allclose(shared.reward_scores(input_ids, attention_mask), expected, atol=1e-5)


def test_adapter_for_another_base_names_the_folder(shared, tmp_path):
    other = SharedBase(tiny_causal_lm(hidden_size=48), ARGS)
    other.save_role("value", tmp_path / "wide")
    with pytest.raises(ValueError, match=r"wide.*another base"):
        shared.load_role("value", tmp_path / "wide")
    with pytest.raises(ValueError, match="wide"):
        SharedBase(tiny_causal_lm(), SharedBaseArguments(lora_r=4, policy_adapter_path=str(tmp_path / "wide")))


def test_head_of_the_wrong_size_names_the_file(shared, tmp_path):
    shared.save_role("value", tmp_path / "value")
    save_file({"weight": torch.zeros(1, 16), "bias": torch.zeros(1)}, tmp_path / "value" / "head.safetensors")
    with pytest.raises(ValueError, match=r"head\.safetensors.*hidden_size=32"):
        shared.load_role("value", tmp_path / "value")
    config = tmp_path / "value" / "head_config.json"
    config.write_text(json.dumps({"hidden_size": 16, "role": "value"}))
    with pytest.raises(ValueError, match=r"hidden_size=16.*another base"):
        shared.load_role("value", tmp_path / "value")


def test_missing_folder_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        SharedBase(tiny_causal_lm(), SharedBaseArguments(lora_r=4, reward_adapter_path=str(tmp_path / "nowhere")))


def test_merged_policy_export_matches_the_policy_and_leaves_the_reference_alone(tmp_path, tokenizer):
    path = save_tiny_model(tmp_path / "base", seed=3)
    shared = SharedBase.from_pretrained(path, ARGS)
    randomize_adapters(shared)
    input_ids, attention_mask = batch()
    reference_before = shared.reference_logits(input_ids, attention_mask)

    shared.export_merged_policy(tmp_path / "merged", tokenizer=tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")

    assert torch.allclose(
        merged(input_ids=input_ids, attention_mask=attention_mask).logits,
        shared.policy_logits(input_ids, attention_mask),
        atol=1e-5,
    )
    assert torch.equal(shared.reference_logits(input_ids, attention_mask), reference_before)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_merged_export_of_an_in_memory_base_asks_for_the_base(shared, tmp_path):
    with pytest.raises(ValueError, match="base="):
        shared.export_merged_policy(tmp_path / "merged")
    with pytest.raises(ValueError, match="fresh copy"):
        shared.export_merged_policy(tmp_path / "merged", base=shared.peft_model.get_base_model())


def test_head_keeps_float32_on_a_bfloat16_base():
    head = ScalarHead(8)
    assert head(torch.randn(2, 5, 8, dtype=torch.bfloat16)).dtype == torch.float32


def test_reward_folder_of_a_sequence_classification_peft_model_scores_like_that_model(base, tmp_path):
    """The K-way reward trainer may train LlamaForSequenceClassification + LoRA (task SEQ_CLS), whose
    `score` is a peft ModulesToSaveWrapper: the folder must carry the trained copy of the score."""
    classifier = LlamaForSequenceClassification(tiny_llama_config(num_labels=1))
    classifier.model.load_state_dict(base.model.state_dict())
    lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
    trainer_model = get_peft_model(classifier, lora)
    with torch.no_grad():
        for name, param in trainer_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:  # as if trained: adapter and score copy moved
                param.normal_()
    score = trainer_model.base_model.model.score
    save_adapter_with_head(trainer_model, "default", score, tmp_path / "rm", role="reward")

    shared = SharedBase(copy.deepcopy(base), SharedBaseArguments(lora_r=4, reward_adapter_path=str(tmp_path / "rm")))
    input_ids, attention_mask = batch()
    expected = trainer_model.eval()(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1)
    assert torch.allclose(shared.reward_scores(input_ids, attention_mask), expected, atol=1e-5)


def test_a_frozen_role_stays_frozen_across_role_switches():
    shared = SharedBase(tiny_causal_lm(seed=0), SharedBaseArguments(lora_r=4))
    value_ids = {id(p) for p in shared.trainable_parameters("value")}
    shared.freeze_role("value")
    with shared.role("value"):
        pass
    with shared.role("reference"):
        pass
    value_params = [p for n, p in shared.peft_model.named_parameters() if ".lora_" in n and ".value." in n]
    assert value_params and not any(p.requires_grad for p in value_params)
    assert not any(p.requires_grad for p in shared.heads["value"].parameters())
    assert shared.trainable_parameters("value") == [] and not value_ids & {id(p) for p in shared.trainable_parameters()}
    assert shared.trainable_parameters("policy") and all(p.requires_grad for p in shared.trainable_parameters("policy"))
    with pytest.raises(ValueError, match="can be frozen"):
        shared.freeze_role("reward")
