"""Role folders given to the wrong flag, role or base, and reward models with more than one label, are refused
before training, with the flag to use named (issue 18, items 2 and 4)."""

import json
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from scripts import load_recipe
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaForSequenceClassification

from rlhf_ext.models import SharedBase, SharedBaseArguments, save_adapter_with_head
from rlhf_ext.testing import randomize_lora, save_tiny_model, tiny_causal_lm, tiny_llama_config, tiny_tokenizer
from rlhf_ext.trainers.kway.online import OnlinePlackettLuceConfig, OnlinePlackettLuceTrainer
from rlhf_ext.trainers.ppo.config import PPOConfig
from rlhf_ext.trainers.ppo.trainer import PPOTrainer

LORA = dict(lora_r=4, lora_alpha=8, lora_dropout=0.0)
PROMPTS = Dataset.from_list([{"prompt": p} for p in ["abc", "hello", "xy", "qrs"] * 2])


def kway_reward_folder(base_path: str, directory: Path) -> str:
    """What PlackettLuceRewardTrainer.save_model writes for a LoRA reward model: a SEQ_CLS adapter + its score."""
    classifier = LlamaForSequenceClassification.from_pretrained(base_path, num_labels=1)
    model = get_peft_model(classifier, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS"))
    score = model.base_model.model.score
    return str(save_adapter_with_head(model, "default", score.modules_to_save["default"], directory, role="reward"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The three role folders of one tiny base (seed 0, saved to disk as a user's base is, so each folder records
    the base's path): a K-way reward folder, a policy and a value (critic)."""
    root = tmp_path_factory.mktemp("roles")
    base_path = save_tiny_model(root / "base", seed=0)
    shared = SharedBase(AutoModelForCausalLM.from_pretrained(base_path), SharedBaseArguments(**LORA))
    randomize_lora(shared.peft_model, "policy", seed=1)
    randomize_lora(shared.peft_model, "value", seed=2)
    return {
        "reward": kway_reward_folder(base_path, root / "reward"),
        "policy": str(shared.save_role("policy", root / "policy")),
        "value": str(shared.save_role("value", root / "value")),
    }


def ppo_config(tmp_path) -> PPOConfig:
    return PPOConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_completion_length=4, max_steps=1,
        report_to=[], use_cpu=True, bf16=False, save_strategy="no", disable_tqdm=True,
    )  # fmt: skip


def online_config(tmp_path) -> OnlinePlackettLuceConfig:
    return OnlinePlackettLuceConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4, max_completion_length=4,
        max_steps=1, report_to=[], use_cpu=True, bf16=False, save_strategy="no", disable_tqdm=True,
    )  # fmt: skip


def build_trainer(kind: str, tmp_path, reward_funcs):
    """A PPO or online K-way trainer on a shared base without a reward role, with `reward_funcs` as the reward."""
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "left"
    shared = SharedBase(tiny_causal_lm(seed=0), SharedBaseArguments(**LORA))
    # a reward model built from a config has no name to load its tokenizer by
    common = dict(reward_funcs=reward_funcs, train_dataset=PROMPTS, processing_class=tokenizer,
                  reward_processing_classes=tiny_tokenizer())  # fmt: skip
    if kind == "ppo":
        return PPOTrainer(shared, args=ppo_config(tmp_path), **common)
    return OnlinePlackettLuceTrainer(shared, args=online_config(tmp_path), **common)


# ----------------------------------------------------------------------------- item 2: a role folder as a model path


@pytest.mark.parametrize("kind", ["ppo", "online"])
def test_reward_role_folder_as_a_reward_model_path_is_refused_naming_reward_adapter_path(kind, folders, tmp_path):
    with pytest.raises(ValueError, match=r"reward role folder.*--reward_adapter_path.*reward_adapter_path\)"):
        build_trainer(kind, tmp_path, folders["reward"])


@pytest.mark.parametrize("role, flag", [("policy", "--policy_adapter_path"), ("value", "--value_adapter_path")])
def test_other_role_folders_as_a_reward_model_path_are_refused_naming_their_flag(role, flag, folders, tmp_path):
    with pytest.raises(ValueError, match=rf"{role} role folder.*{flag}"):
        build_trainer("ppo", tmp_path, folders[role])


@pytest.mark.parametrize("recipe_name", ["ppo", "online_kway"])
def test_recipe_refuses_a_reward_role_folder_given_as_reward_model_name_or_path(recipe_name, folders, tmp_path):
    recipe = load_recipe(recipe_name)
    model = save_tiny_model(tmp_path / "model", seed=0)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "abc"}\n')
    argv = [
        "--model_name_or_path", model, "--reward_model_name_or_path", folders["reward"], "--dataset_name",
        str(prompts), "--output_dir", str(tmp_path / "out"), "--use_cpu", "true", "--report_to", "none",
    ]  # fmt: skip
    with pytest.raises(ValueError, match=r"--reward_model_name_or_path.*reward role folder.*--reward_adapter_path"):
        recipe.main(*recipe.make_parser().parse_args_and_config(argv))


def test_a_causal_lm_path_as_the_reward_model_is_refused(folders, tmp_path):
    """Loaded as a sequence classifier, a causal LM gets a freshly initialised score head: a random reward."""
    base = str(Path(folders["policy"]).parent / "base")
    with pytest.raises(ValueError, match=r"LlamaForCausalLM, not a sequence-classification reward model"):
        build_trainer("ppo", tmp_path, base)


# ----------------------------------------------------------------------------- item 2: a folder loaded as another role


@pytest.mark.parametrize(
    "given, as_role, flag",
    [
        ("value", "reward", "--value_adapter_path"),  # a PPO critic loaded as the reward role
        ("policy", "reward", "--policy_adapter_path"),
        ("reward", "policy", "--reward_adapter_path"),  # a SEQ_CLS reward adapter loaded as the policy
        ("value", "policy", "--value_adapter_path"),
        ("reward", "value", "--reward_adapter_path"),
        ("policy", "value", "--policy_adapter_path"),
    ],
)
def test_a_role_folder_given_for_another_role_is_refused_naming_its_flag(given, as_role, flag, folders):
    with pytest.raises(ValueError, match=rf"{given} role folder.*{flag}"):
        SharedBase(tiny_causal_lm(seed=0), SharedBaseArguments(**{f"{as_role}_adapter_path": folders[given]}, **LORA))
    shared = SharedBase(tiny_causal_lm(seed=0), SharedBaseArguments(**LORA))
    with pytest.raises(ValueError, match=rf"{given} role folder.*{flag}"):
        shared.load_role(as_role, folders[given])


def test_a_sequence_classification_adapter_without_a_head_is_refused_as_the_policy(tmp_path):
    """A plain peft SEQ_CLS adapter folder (e.g. TRL's RewardTrainer output) has no head_config.json: its task type
    alone tells that it is no policy."""
    classifier = LlamaForSequenceClassification(tiny_llama_config(num_labels=1))
    model = get_peft_model(classifier, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS"))
    model.save_pretrained(tmp_path / "rm")
    with pytest.raises(ValueError, match=r"SEQ_CLS.*policy"):
        SharedBase(tiny_causal_lm(seed=0), SharedBaseArguments(policy_adapter_path=str(tmp_path / "rm"), **LORA))


def test_a_sequence_classification_adapter_without_a_head_is_refused_as_the_reward_role(tmp_path):
    """As the reward role it would fail on a missing head_config.json; as a reward model path it loads whole."""
    classifier = LlamaForSequenceClassification(tiny_llama_config(num_labels=1))
    model = get_peft_model(classifier, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS"))
    model.save_pretrained(tmp_path / "rm")
    with pytest.raises(ValueError, match=r"SEQ_CLS adapter without head_config.json.*--reward_model_name_or_path"):
        SharedBase(tiny_causal_lm(seed=0), SharedBaseArguments(reward_adapter_path=str(tmp_path / "rm"), **LORA))


def test_each_role_folder_loads_as_its_own_role(folders):
    args = SharedBaseArguments(
        policy_adapter_path=folders["policy"], value_adapter_path=folders["value"],
        reward_adapter_path=folders["reward"], **LORA,
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shared = SharedBase(tiny_causal_lm(seed=0), args)
        for role in ("policy", "value", "reward"):
            shared.load_role(role, folders[role])
    unchecked = [str(w.message) for w in caught if "cannot check that it belongs to this base" in str(w.message)]
    assert not unchecked  # folders of today record their base


# ----------------------------------------------------------------------------- item 2: a folder saved on another base


@pytest.mark.parametrize("role", ["policy", "value", "reward"])
def test_a_role_saved_on_another_base_of_the_same_shape_is_refused(role, folders):
    other_base = tiny_causal_lm(seed=1)  # same config, other weights
    with pytest.raises(ValueError, match=rf"{role} role folder .* another base"):
        SharedBase(other_base, SharedBaseArguments(**{f"{role}_adapter_path": folders[role]}, **LORA))


def test_the_base_check_accepts_the_same_base_in_another_dtype(folders):
    base = tiny_causal_lm(seed=0).to(torch.bfloat16)
    SharedBase(base, SharedBaseArguments(reward_adapter_path=folders["reward"], dtype="bfloat16", **LORA))


@pytest.mark.parametrize("bits", [4, 8])
def test_the_base_check_reads_a_quantized_base_and_tells_bases_apart_on_it(bits, folders, tmp_path):
    """On a k-bit base the quantized weights (integers) are left out; embeddings and norms still identify it."""
    base_path = str(Path(folders["policy"]).parent / "base")
    args = SharedBaseArguments(load_in_4bit=bits == 4, load_in_8bit=bits == 8, **LORA)
    quantized = SharedBase.from_pretrained(base_path, replace(args, reward_adapter_path=folders["reward"]))
    quantized.save_role("value", tmp_path / "value")
    SharedBase(AutoModelForCausalLM.from_pretrained(base_path), SharedBaseArguments(
        value_adapter_path=str(tmp_path / "value"), **LORA))  # fmt: skip
    other = save_tiny_model(tmp_path / "other", seed=1)
    with pytest.raises(ValueError, match="another base"):
        SharedBase.from_pretrained(other, replace(args, reward_adapter_path=folders["reward"]))


def test_a_folder_saved_before_the_base_was_recorded_warns_and_loads(folders, tmp_path):
    old = tmp_path / "old_reward"
    old.mkdir()
    for file in Path(folders["reward"]).iterdir():
        if file.name != "base_fingerprint.json":
            (old / file.name).write_bytes(file.read_bytes())
    with pytest.warns(UserWarning, match=r"does not record .*base.*re-save"):
        SharedBase(tiny_causal_lm(seed=1), SharedBaseArguments(reward_adapter_path=str(old), **LORA))


def test_a_folder_whose_record_shares_no_weight_with_the_base_warns(folders, tmp_path):
    # e.g. written from a ZeRO-3 or FSDP2 shard: nothing can be compared, which must not read as "same base"
    empty = tmp_path / "empty_record"
    empty.mkdir()
    for file in Path(folders["reward"]).iterdir():
        (empty / file.name).write_bytes(file.read_bytes())
    (empty / "base_fingerprint.json").write_text(json.dumps({"tensors": {}}))
    with pytest.warns(UserWarning, match=r"records no weight this base has .*re-save"):
        SharedBase(tiny_causal_lm(seed=1), SharedBaseArguments(reward_adapter_path=str(empty), **LORA))


def test_the_reward_trainer_and_the_shared_base_record_the_same_base(folders):
    """The K-way reward folder's fingerprint comes from a sequence classifier's body, the policy's from a causal LM:
    on one base they are equal."""
    reward = json.loads((Path(folders["reward"]) / "base_fingerprint.json").read_text())
    policy = json.loads((Path(folders["policy"]) / "base_fingerprint.json").read_text())
    assert reward == policy and reward["tensors"]


# ----------------------------------------------------------------------------- item 4: reward models with 2 labels


@pytest.mark.parametrize("kind", ["ppo", "online"])
def test_a_two_label_reward_model_is_refused_with_how_to_pick_a_label(kind, tmp_path):
    classifier = AutoModelForSequenceClassification.from_config(tiny_llama_config(num_labels=2))
    with pytest.raises(ValueError, match=r"(?s)num_labels=2.*one label.*def reward"):
        build_trainer(kind, tmp_path, classifier)


@pytest.mark.parametrize("kind", ["ppo", "online"])
def test_a_two_label_reward_model_path_is_refused_before_loading(kind, tmp_path):
    classifier = AutoModelForSequenceClassification.from_config(tiny_llama_config(num_labels=2))
    classifier.save_pretrained(tmp_path / "sentiment")
    with pytest.raises(ValueError, match=r"(?s)sentiment.*num_labels=2.*def reward"):
        build_trainer(kind, tmp_path, [str(tmp_path / "sentiment")])


def test_recipe_refuses_a_two_label_reward_model(tmp_path):
    recipe = load_recipe("ppo")
    classifier = AutoModelForSequenceClassification.from_config(tiny_llama_config(num_labels=2))
    classifier.save_pretrained(tmp_path / "sentiment")
    model = save_tiny_model(tmp_path / "model", seed=0)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "abc"}\n')
    argv = [
        "--model_name_or_path", model, "--reward_model_name_or_path", str(tmp_path / "sentiment"), "--dataset_name",
        str(prompts), "--output_dir", str(tmp_path / "out"), "--use_cpu", "true", "--report_to", "none",
    ]  # fmt: skip
    with pytest.raises(ValueError, match=r"--reward_model_name_or_path.*num_labels=2"):
        recipe.main(*recipe.make_parser().parse_args_and_config(argv))


def test_a_one_label_reward_model_is_accepted(tmp_path):
    classifier = AutoModelForSequenceClassification.from_config(tiny_llama_config(num_labels=1))
    trainer = build_trainer("ppo", tmp_path, classifier)
    assert trainer.reward_funcs[0] is classifier
