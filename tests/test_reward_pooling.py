"""One scoring rule everywhere: the token at which the K-way reward trainer trains its head is the token the PPO /
online K-way reward role reads, for every pad setup (no pad token, pad = EOS, a distinct pad) and record kind.

The independent expectation is worked by hand: each sequence alone (no padding at all), through the trained model's
decoder body, its last hidden state at the final position, times the trained head.
"""

import contextlib
import math

import pytest
import torch
from datasets import Dataset
from grpo_family import tiny_run
from peft import LoraConfig

from rlhf_ext.data.prepare import tokenize_ranked
from rlhf_ext.models import SharedBase, SharedBaseArguments
from rlhf_ext.models.scoring import LAST_REAL_TOKEN, SCORE_TOKEN_FIELD, sequence_classifier_scores
from rlhf_ext.testing import tiny_tokenizer
from rlhf_ext.trainers import PlackettLuceRewardConfig, PlackettLuceRewardTrainer, SharedBaseReward, grpo_base
from rlhf_ext.trainers.shared_prompt import SharedPromptSwitch

PLAIN = [
    {"prompt": "q1 ", "completions": ["aa", "b", "ccc"]},
    {"prompt": "q2 ", "completions": ["dd", "e", "ffff"]},
]
CHAT = [
    {
        "prompt": [{"role": "user", "content": r["prompt"]}],
        "completions": [[{"role": "assistant", "content": c}] for c in r["completions"]],
    }
    for r in PLAIN
]
PAD_SETUPS = ("distinct", "eos", "none", "eos_bos")


def tokenizer_with(pad: str):
    """The tiny tokenizer with a distinct pad token, pad = EOS, no pad token (as GPT-2 and Llama 3 ship), or pad = EOS
    and a BOS added to every tokenized text (as Llama and Mistral tokenizers do)."""
    tok = tiny_tokenizer()
    if pad in ("eos", "eos_bos"):
        tok.pad_token = tok.eos_token
    elif pad == "none":
        tok.pad_token = None
    tok.add_bos_token = pad == "eos_bos"
    return tok


def train_reward(model_path, tmp_path, records, pad: str, peft: bool, checkpointing: bool = True):
    """Three steps of the K-way reward trainer; activation checkpointing on by default, as TRL's configs have it."""
    args = PlackettLuceRewardConfig(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, report_to="none", bf16=False, use_cpu=True,
        activation_checkpointing=checkpointing, disable_tqdm=True, max_steps=3, learning_rate=3e-2, seed=0,
    )
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
    trainer = PlackettLuceRewardTrainer(
        model=model_path, args=args, train_dataset=Dataset.from_list(records), processing_class=tokenizer_with(pad),
        peft_config=peft_config if peft else None,
    )
    trainer.train()
    return trainer


def hand_scores(trainer, records, pad: str = "distinct") -> list[float]:
    """Each prompt + completion tokenized as the trainer tokenizes it, run alone, head at its final token."""
    model = trainer.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.score
    scores = []
    with torch.no_grad():
        for record in records:
            tokens = tokenize_ranked(record, tokenizer_with(pad))
            for completion_ids in tokens["completion_ids"]:
                ids = torch.tensor([tokens["prompt_ids"] + completion_ids])
                hidden = base.model(input_ids=ids).last_hidden_state
                scores.append(head(hidden[:, -1]).item())
    return scores


def on_switch() -> SharedPromptSwitch:
    """A trainer's `shared_prompt` switch, decided on."""
    switch = SharedPromptSwitch(True, scores=False)
    switch.active = True
    return switch


@contextlib.contextmanager
def counting_calls(owner, name: str):
    """Count the calls of `owner.name` in the block (one entry per call)."""
    calls, original = [], getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    setattr(owner, name, counted)
    try:
        yield calls
    finally:
        setattr(owner, name, original)


def kway_loss_by_hand(scores: list[float], records) -> float:
    """Mean over lists of -log P(order) for completions listed best first (sequential choice)."""
    losses, start = [], 0
    for record in records:
        s = scores[start:start + len(record["completions"])]
        start += len(s)
        losses.append(-sum(math.log(math.exp(s[k]) / sum(math.exp(v) for v in s[k:])) for k in range(len(s) - 1)))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("checkpointing", [True, False], ids=["trl_default_checkpointing", "no_checkpointing"])
@pytest.mark.parametrize("records", [PLAIN, CHAT], ids=["plain", "chat"])
@pytest.mark.parametrize("pad", PAD_SETUPS)
def test_reward_role_scores_what_the_reward_trainer_trained(model_path, tmp_path, records, pad, checkpointing):
    trainer = train_reward(model_path, tmp_path, records, pad, peft=True, checkpointing=checkpointing)
    expected = hand_scores(trainer, records, pad)

    # the trainer's loss is the K-way loss of exactly these scores: the head was trained at that token
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(records))])
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch).item()
    assert loss == pytest.approx(kway_loss_by_hand(expected, records), abs=1e-5)

    trainer.save_model(str(tmp_path / "reward"))
    shared = SharedBase.from_pretrained(model_path, SharedBaseArguments(reward_adapter_path=str(tmp_path / "reward")))
    reward = SharedBaseReward(shared, tokenizer_with(pad))
    prompts = [r["prompt"] for r in records for _ in r["completions"]]
    completions = [c for r in records for c in r["completions"]]
    assert reward(prompts, completions) == pytest.approx(expected, abs=1e-5)

    # with the trainer's shared_prompt on, the completions of one prompt run in one shared row, in any order
    reward.prompt_switch = on_switch()
    shuffled = [4, 0, 3, 5, 1, 2]
    with counting_calls(shared, "shared_reward_scores") as calls:
        got = reward([prompts[i] for i in shuffled], [completions[i] for i in shuffled])
    assert calls == [1] and got == pytest.approx([expected[i] for i in shuffled], abs=1e-5)


@pytest.mark.parametrize("pad", ["eos", "none"])
def test_full_reward_model_is_marked_and_scored_at_its_last_real_token(model_path, tmp_path, pad):
    trainer = train_reward(model_path, tmp_path, PLAIN, pad, peft=False)
    trainer.save_model(str(tmp_path / "rm"))
    from transformers import AutoModelForSequenceClassification

    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    assert getattr(reloaded.config, SCORE_TOKEN_FIELD) == LAST_REAL_TOKEN
    expected = hand_scores(trainer, PLAIN)
    tok = tokenizer_with("distinct")
    rows = [tokenize_ranked(r, tok) for r in PLAIN]
    sequences = [row["prompt_ids"] + ids for row in rows for ids in row["completion_ids"]]
    width = max(map(len, sequences))
    ids = torch.tensor([s + [tok.eos_token_id] * (width - len(s)) for s in sequences])  # padded with the EOS id
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    with torch.no_grad():
        got = sequence_classifier_scores(reloaded, ids, mask)[:, 0].tolist()
    assert got == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("trainer_name", ["ppo", "online"])
def test_ppo_scores_a_saved_full_reward_model_as_it_was_trained(model_path, tmp_path, trainer_name):
    rm_trainer = train_reward(model_path, tmp_path, PLAIN, "eos", peft=False)
    rm_trainer.save_model(str(tmp_path / "rm"))
    expected = hand_scores(rm_trainer, PLAIN)
    shared = SharedBase.from_pretrained(model_path, SharedBaseArguments(lora_r=4, lora_alpha=8))
    trainer_class, args = tiny_run(trainer_name, tmp_path / "ppo")
    tok = tokenizer_with("none")
    tok.padding_side = "left"
    trainer = trainer_class(
        shared, reward_funcs=str(tmp_path / "rm"), args=args, processing_class=tok,
        train_dataset=Dataset.from_list([{"prompt": r["prompt"]} for r in PLAIN]),
    )
    prompts = [r["prompt"] for r in PLAIN for _ in r["completions"]]
    completions = [c for r in PLAIN for c in r["completions"]]
    assert trainer.reward_funcs[0](prompts=prompts, completions=completions) == pytest.approx(expected, abs=1e-5)
    # with the trainer's shared_prompt on, each prompt's completions are scored in one shared row
    trainer._shared_prompt.active = True
    with counting_calls(grpo_base, "shared_sequence_scores") as calls:
        got = trainer.reward_funcs[0](prompts=prompts, completions=completions)
    assert calls == [1] and got == pytest.approx(expected, abs=1e-5)


def test_an_encoder_reward_model_keeps_its_own_first_token_pooling(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    encoder = BertForSequenceClassification(BertConfig(
        vocab_size=101, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=1,
    ))
    args = PlackettLuceRewardConfig(output_dir=str(tmp_path), report_to="none", bf16=False, use_cpu=True,
                                    gradient_checkpointing=False)
    trainer = PlackettLuceRewardTrainer(encoder, args=args, train_dataset=Dataset.from_list(PLAIN),
                                        processing_class=tiny_tokenizer())
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PLAIN))])
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch).item()
        alone = [encoder(input_ids=torch.tensor([row["prompt_ids"] + ids])).logits[0, 0].item()
                 for row in (trainer.train_dataset[i] for i in range(len(PLAIN))) for ids in row["completion_ids"]]
    assert loss == pytest.approx(kway_loss_by_hand(alone, PLAIN), abs=1e-5)
