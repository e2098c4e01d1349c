import json
import math

import pytest
import torch
from datasets import Dataset
from kway_records import LISTS as ALL_LISTS
from kway_records import PAIRS
from peft import LoraConfig
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification
from trl import RewardConfig, RewardTrainer

from rlhf_ext.models import SharedBase, SharedBaseArguments, load_head
from rlhf_ext.testing import tiny_tokenizer
from rlhf_ext.trainers import PlackettLuceRewardConfig, PlackettLuceRewardTrainer

LISTS = ALL_LISTS[:3]


def common_args(tmp_path, **overrides):
    args = dict(
        output_dir=str(tmp_path), per_device_eval_batch_size=2, per_device_train_batch_size=2, report_to="none",
        bf16=False, use_cpu=True, gradient_checkpointing=False, disable_tqdm=True, max_length=64, seed=0,
    )
    return {**args, **overrides}


def pl_trainer(model_path, tmp_path, records, **kwargs):
    args = PlackettLuceRewardConfig(**common_args(tmp_path, **kwargs.pop("args", {})))
    return PlackettLuceRewardTrainer(
        model=model_path, args=args, train_dataset=Dataset.from_list(records),
        eval_dataset=Dataset.from_list(records), processing_class=tiny_tokenizer(), **kwargs,
    )


def sequence_reward(model, prompt: str, completion: str) -> float:
    """The reward model's score of one unpadded sequence prompt + completion + EOS."""
    tok = tiny_tokenizer()
    ids = torch.tensor([tok(prompt + completion + tok.eos_token)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits[0, 0].item()


def plackett_luce_nll(scores: list[float], top_m: int | None = None) -> float:
    """-log P(order) by the sequential-choice definition: pick the k-th best among the remaining items."""
    m = len(scores) - 1 if top_m is None else min(top_m, len(scores) - 1)
    return -sum(math.log(math.exp(scores[k]) / sum(math.exp(s) for s in scores[k:])) for k in range(m))


def test_k2_pairwise_data_matches_trl_reward_trainer(model_path, tmp_path):
    trl_trainer = RewardTrainer(
        model=model_path, args=RewardConfig(**common_args(tmp_path)), train_dataset=Dataset.from_list(PAIRS),
        eval_dataset=Dataset.from_list(PAIRS), processing_class=tiny_tokenizer(),
    )
    expected = trl_trainer.evaluate()
    ours = pl_trainer(model_path, tmp_path, PAIRS)
    got = ours.evaluate()
    assert got["eval_loss"] == pytest.approx(expected["eval_loss"], abs=1e-5)
    assert expected["eval_loss"] != pytest.approx(math.log(2), abs=1e-3)  # rewards differ: a real check
    for name in ("accuracy", "margin", "min_reward", "mean_reward", "max_reward"):
        assert got[f"eval_{name}"] == pytest.approx(expected[f"eval_{name}"], abs=1e-5), name

    ranked = [{"prompt": r["prompt"], "completions": [r["rejected"], r["chosen"]], "ranking": [1, 0]} for r in PAIRS]
    loss = ours.evaluate(eval_dataset=Dataset.from_list(ranked))["eval_loss"]
    assert loss == pytest.approx(expected["eval_loss"], abs=1e-5)


def test_k3_k4_loss_is_the_plackett_luce_probability_of_the_rewards(model_path, tmp_path):
    trainer = pl_trainer(model_path, tmp_path, LISTS, args={"per_device_eval_batch_size": 3})
    model = trainer.model
    expected = [plackett_luce_nll([sequence_reward(model, r["prompt"], y) for y in r["completions"]]) for r in LISTS]
    assert trainer.evaluate()["eval_loss"] == pytest.approx(sum(expected) / len(expected), abs=1e-5)

    trainer.args.per_device_eval_batch_size = 1  # the lists one by one
    assert trainer.evaluate()["eval_loss"] == pytest.approx(sum(expected) / len(expected), abs=1e-5)


def test_training_raises_ranking_accuracy_on_a_learnable_ranking(model_path, tmp_path):
    # completions ranked by their number of "b" (the untrained model happens to prefer "a")
    lists = [{"prompt": f"{i} ", "completions": ["b" * (3 - k) + "a" * k for k in range(4)]} for i in range(8)]
    trainer = pl_trainer(model_path, tmp_path, lists, args={"learning_rate": 3e-3, "num_train_epochs": 8,
                                                            "logging_steps": 4, "per_device_train_batch_size": 4})
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_loss"] < before["eval_loss"] - 0.5
    assert before["eval_accuracy"] < 0.5
    assert after["eval_accuracy"] == 1.0 and after["eval_top1_accuracy"] == 1.0


def test_lora_reward_model_is_saved_as_the_shared_base_reward_role(model_path, tmp_path):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
    trainer = pl_trainer(model_path, tmp_path, LISTS, peft_config=lora, args={"max_steps": 2, "learning_rate": 1e-2})
    trainer.train()
    out = tmp_path / "reward"
    trainer.save_model(str(out))

    head_config = json.loads((out / "head_config.json").read_text())
    assert head_config["role"] == "reward" and head_config["hidden_size"] == 32
    score = trainer.model.get_base_model().score.modules_to_save["default"]
    head = load_head(out, expected_hidden_size=32)
    torch.testing.assert_close(head.linear.weight, score.weight.float())
    assert head.linear.bias.item() == 0.0  # Llama's score layer has no bias
    adapter = load_file(out / "adapter_model.safetensors")
    assert any("lora_A" in key for key in adapter)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == model_path

    # the shared base loads the folder as its reward role and scores as the trained reward model does
    shared = SharedBase.from_pretrained(model_path, SharedBaseArguments(reward_adapter_path=str(out)))
    tok = tiny_tokenizer()
    batch = tok(["q1 aa</s>", "q2 ff</s>"], return_tensors="pt")
    with torch.no_grad():
        expected = trainer.model(**batch).logits.squeeze(-1)
    torch.testing.assert_close(shared.reward_scores(batch["input_ids"], batch["attention_mask"]), expected)


def test_full_model_is_saved_as_a_sequence_classifier(model_path, tmp_path):
    trainer = pl_trainer(model_path, tmp_path, LISTS, args={"max_steps": 1})
    trainer.train()
    trainer.save_model(str(tmp_path / "rm"))
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    record = LISTS[0]
    assert sequence_reward(reloaded, record["prompt"], "aa") == pytest.approx(
        sequence_reward(trainer.model, record["prompt"], "aa"), abs=1e-5
    )


MARGINS = [0.5, -1.0, 2.0, 0.0, 3.0]


def test_k2_margins_match_trl_reward_trainer(model_path, tmp_path):
    """TRL's loss -log sigmoid(r_chosen - r_rejected - margin), for pairs and for 2-completion lists."""
    pairs = [{**record, "margin": margin} for record, margin in zip(PAIRS, MARGINS)]
    trl_trainer = RewardTrainer(
        model=model_path, args=RewardConfig(**common_args(tmp_path)), train_dataset=Dataset.from_list(pairs),
        eval_dataset=Dataset.from_list(pairs), processing_class=tiny_tokenizer(),
    )
    expected = trl_trainer.evaluate()
    ours = pl_trainer(model_path, tmp_path, pairs)
    got = ours.evaluate()
    assert got["eval_loss"] == pytest.approx(expected["eval_loss"], abs=1e-5)
    without = ours.evaluate(eval_dataset=Dataset.from_list(PAIRS))["eval_loss"]
    assert got["eval_loss"] != pytest.approx(without, abs=1e-3)  # the margins change the loss: a real check
    assert got["eval_margin"] == pytest.approx(expected["eval_margin"], abs=1e-5)  # r_c - r_r, as TRL logs it

    lists = [{"prompt": r["prompt"], "completions": [r["rejected"], r["chosen"]], "scores": [0.0, 1.0],
              "margin": r["margin"]} for r in pairs]
    assert ours.evaluate(eval_dataset=Dataset.from_list(lists))["eval_loss"] == pytest.approx(
        expected["eval_loss"], abs=1e-5)
    trained = pl_trainer(model_path, tmp_path, pairs, args={"max_steps": 1})
    trained.train()  # the margin column reaches the training batches too


@pytest.mark.parametrize("record, message", [
    ({**LISTS[0], "margin": 1.0}, r"record 0, field 'margin': a margin applies to one pair.*3 completions"),
    ({**PAIRS[0], "margin": "big"}, r"record 0, field 'margin': .*'big' is not a finite number"),
])
def test_a_margin_is_refused_on_lists_of_more_than_two_and_when_not_a_number(model_path, tmp_path, record, message):
    with pytest.raises(ValueError, match=message):
        pl_trainer(model_path, tmp_path, [record])


# --- pre-tokenized records ---------------------------------------------------------------------------------------


def full_ids(prompt: str, completion: str) -> list[int]:
    """prompt + completion + EOS as token ids, as TRL's RewardTrainer tokenizes a plain-text pair."""
    tok = tiny_tokenizer()
    return tok(prompt + completion + tok.eos_token)["input_ids"]


def test_pre_tokenized_pairs_and_lists_give_the_loss_of_their_text(model_path, tmp_path):
    trainer = pl_trainer(model_path, tmp_path, PAIRS)
    expected = trainer.evaluate()["eval_loss"]
    pairs = [{"chosen_ids": full_ids(r["prompt"], r["chosen"]), "rejected_ids": full_ids(r["prompt"], r["rejected"])}
             for r in PAIRS]
    legacy = [{"chosen_input_ids": r["chosen_ids"], "rejected_input_ids": r["rejected_ids"]} for r in pairs]
    assert trainer.evaluate(eval_dataset=Dataset.from_list(pairs))["eval_loss"] == pytest.approx(expected, abs=1e-6)
    with pytest.warns(FutureWarning, match="'chosen_input_ids'/'rejected_input_ids' are deprecated in TRL"):
        legacy_loss = trainer.evaluate(eval_dataset=Dataset.from_list(legacy))["eval_loss"]
    assert legacy_loss == pytest.approx(expected, abs=1e-6)

    # K-way: prompt_ids + completion_ids, best first or ordered by scores, and with TRL's margin at K=2
    text_loss = trainer.evaluate(eval_dataset=Dataset.from_list(LISTS))["eval_loss"]
    tokenized = trainer._prepare_dataset(Dataset.from_list(LISTS), trainer.processing_class, trainer.args, "x")
    best_first = [{"prompt_ids": r["prompt_ids"], "completion_ids": r["completion_ids"]} for r in tokenized]
    by_scores = [{"prompt_ids": r["prompt_ids"], "completion_ids": r["completion_ids"][::-1],
                  "scores": list(range(len(r["completion_ids"])))} for r in tokenized]
    for records in (best_first, by_scores):
        assert trainer.evaluate(eval_dataset=Dataset.from_list(records))["eval_loss"] == pytest.approx(
            text_loss, abs=1e-6)
    with_margin = [{**r, "margin": m} for r, m in zip(pairs, MARGINS)]
    text_margin = [{**r, "margin": m} for r, m in zip(PAIRS, MARGINS)]
    assert trainer.evaluate(eval_dataset=Dataset.from_list(with_margin))["eval_loss"] == pytest.approx(
        trainer.evaluate(eval_dataset=Dataset.from_list(text_margin))["eval_loss"], abs=1e-6)


def test_pre_tokenized_pairs_with_ids_outside_the_vocabulary_name_record_and_field(model_path, tmp_path):
    pairs = [{"chosen_ids": [1, 5, 6], "rejected_ids": [1, 5, 7]}, {"chosen_ids": [1, 5], "rejected_ids": [1, 900]}]
    with pytest.raises(ValueError, match=r"record 1, field 'rejected_ids': token id 900 is outside"):
        pl_trainer(model_path, tmp_path, pairs)


# --- record layouts and empty datasets -----------------------------------------------------------------------------


def chat(role: str, content: str) -> list[dict]:
    return [{"role": role, "content": content}]


def test_k2_chat_lists_match_trl_reward_trainer_on_conversational_pairs(model_path, tmp_path):
    chat_pairs = [{"prompt": chat("user", r["prompt"]), "chosen": chat("assistant", r["chosen"]),
                   "rejected": chat("assistant", r["rejected"])} for r in PAIRS]
    trl_trainer = RewardTrainer(
        model=model_path, args=RewardConfig(**common_args(tmp_path)), train_dataset=Dataset.from_list(chat_pairs),
        eval_dataset=Dataset.from_list(chat_pairs), processing_class=tiny_tokenizer(),
    )
    expected = trl_trainer.evaluate()["eval_loss"]
    chat_lists = [{"prompt": r["prompt"], "completions": [r["chosen"], r["rejected"]]} for r in chat_pairs]
    ours = pl_trainer(model_path, tmp_path, chat_lists)
    assert ours.evaluate()["eval_loss"] == pytest.approx(expected, abs=1e-5)
    assert ours.evaluate(eval_dataset=Dataset.from_list(PAIRS))["eval_loss"] != pytest.approx(expected, abs=1e-4)


def test_ultrafeedback_records_train_through_the_config_mapping(model_path, tmp_path):
    records = [
        {"source": "test", "instruction": r["prompt"],
         "completions": [{"annotations": {"honesty": {"Rating": "5", "Rationale": "ok"}}, "critique": "fine",
                          "fine-grained_score": float(k), "model": f"m{k}", "overall_score": float(k),
                          "response": text} for k, text in enumerate(reversed(r["completions"]))]}
        for r in LISTS
    ]
    keys = {"prompt_key": "instruction", "completion_text_key": "response", "completion_score_key": "overall_score"}
    trainer = pl_trainer(model_path, tmp_path, records, args=keys)
    got = trainer.evaluate()["eval_loss"]
    for name in keys:  # back to the plain layout, for the same lists best first
        setattr(trainer.args, name, "prompt" if name == "prompt_key" else None)
    assert got == pytest.approx(trainer.evaluate(eval_dataset=Dataset.from_list(LISTS))["eval_loss"], abs=1e-6)


@pytest.mark.parametrize(
    "train, evaluation, message",
    [
        ([], None, r"train dataset is empty"),
        (PAIRS, [], r"eval dataset is empty"),
        ([{"prompt": "x" * 70, "completions": ["a", "b"]}] * 8, None,
         r"train dataset: every one of the 8 lists has a prompt that alone fills max_length=64"),
    ],
)
def test_empty_or_fully_dropped_datasets_fail_before_training(model_path, tmp_path, train, evaluation, message):
    with pytest.raises(ValueError, match=message):
        PlackettLuceRewardTrainer(
            model=model_path, args=PlackettLuceRewardConfig(**common_args(tmp_path)),
            train_dataset=Dataset.from_list(train),
            eval_dataset=None if evaluation is None else Dataset.from_list(evaluation),
            processing_class=tiny_tokenizer(),
        )


def test_bad_records_fail_before_training_naming_record_and_field(model_path, tmp_path):
    records = [*LISTS, {"prompt": "q ", "completions": ["good answer", " "]}]
    with pytest.raises(ValueError, match=r"record 3, field 'completions'\[1\]: empty completion"):
        pl_trainer(model_path, tmp_path, records)


@pytest.mark.parametrize("bits", [4, 8])
def test_trainer_on_a_quantized_base_trains_with_the_default_float32_compute(tmp_path, bits):
    """TRL casts the score head of a quantized base to bfloat16; the trainer puts it back in the compute dtype."""
    from transformers import BitsAndBytesConfig

    from rlhf_ext.testing import save_tiny_model

    path = save_tiny_model(tmp_path / "base", seed=0, hidden_size=64)  # 64: a multiple of the 4-bit block size
    quantization = BitsAndBytesConfig(load_in_4bit=bits == 4, load_in_8bit=bits == 8)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, quantization_config=quantization,
                                                               dtype=torch.float32, device_map={"": "cpu"})
    trainer = PlackettLuceRewardTrainer(
        model=model, args=PlackettLuceRewardConfig(**common_args(tmp_path / "out", max_steps=1)),
        train_dataset=Dataset.from_list(LISTS), processing_class=tiny_tokenizer(),
        peft_config=LoraConfig(r=4, lora_alpha=8, task_type="SEQ_CLS"),
    )
    assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {torch.float32}
    trainer.train()
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])


def test_a_tokenizer_with_neither_pad_nor_eos_trains_with_the_eos_given_in_the_config(model_path, tmp_path):
    # TRL sets the pad token from args.eos_token inside its __init__, after the K-way collator was built: the
    # collator used to pad with None and fail at the first step
    tok = tiny_tokenizer()
    eos = tok.eos_token
    tok.pad_token, tok.eos_token = None, None
    args = PlackettLuceRewardConfig(**common_args(tmp_path, max_steps=1, per_device_train_batch_size=2), eos_token=eos)
    trainer = PlackettLuceRewardTrainer(model=model_path, args=args, train_dataset=Dataset.from_list(LISTS),
                                        processing_class=tok)
    trainer.train()
    assert trainer.state.global_step == 1 and math.isfinite(trainer.state.log_history[-1]["train_loss"])


@pytest.mark.parametrize("setting, value", [("tie_policy", "errror"), ("max_length", "64"), ("max_length", 0)])
def test_prepare_ranked_dataset_refuses_bad_settings_naming_them(setting, value):
    from rlhf_ext.data import prepare_ranked_dataset

    with pytest.raises(ValueError, match=rf"^{setting} must be"):
        prepare_ranked_dataset(Dataset.from_list(LISTS), tiny_tokenizer(), **{"max_length": 64, setting: value})
