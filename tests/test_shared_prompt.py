"""Each prompt computed once (`shared_prompt`): the shared layout gives the unshared forward's loss, gradients and
metrics, for K-way DPO (policy and reference passes, precomputed reference) and the K-way reward model; the auto
switch turns it off, with one log line, where it cannot be exact, and True refuses there.

The batches are built to catch a wrong mask, position or first-token read: completions of different lengths,
K = 2..4 in one batch, one-token completions, a one-token prompt, prompts of different lengths, a chat record.
Every trainer test runs with TRL's defaults (activation checkpointing on) as well as with it off.
"""

import logging

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import (
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from rlhf_ext.data import DataCollatorForRankedPreference
from rlhf_ext.models.shared_prompt import SharedPromptBatch, shared_prompt_blocker
from rlhf_ext.ops.shared_prompt import (
    IGNORE_INDEX,
    attention_allowed,
    block_lengths,
    gather_shared,
    layout_problem,
    next_token_labels,
    rows_by_cost,
    shared_prompt_layout,
)
from rlhf_ext.testing import randomize_lora, tiny_causal_lm, tiny_llama_config, tiny_tokenizer
from rlhf_ext.trainers import (
    PlackettLuceDPOConfig,
    PlackettLuceDPOTrainer,
    PlackettLuceRewardConfig,
    PlackettLuceRewardTrainer,
)
from rlhf_ext.trainers.kway.common import SharedPromptSwitch

RUN = dict(report_to="none", bf16=False, use_cpu=True, disable_tqdm=True, max_length=64, seed=0, max_steps=1,
           learning_rate=0.0, save_strategy="no")
CHECKPOINTING = {"trl_default": {}, "off": {"gradient_checkpointing": False}}

# one batch each; prompts of 3, 7 and 1 tokens, K = 3, 2, 4, one-token completions, lengths 1..5
TOKENIZED = [
    {"prompt_ids": [5, 6, 7], "completion_ids": [[8], [9, 10, 11, 2], [12, 2]]},
    {"prompt_ids": [20, 21, 22, 23, 24, 25, 26], "completion_ids": [[30, 31, 32, 33, 2], [34]]},
    {"prompt_ids": [40], "completion_ids": [[41, 42, 2], [43], [44, 45], [46, 47, 48, 49, 2]]},
]
TEXT = [
    {"prompt": "count the a: ", "completions": ["aaa", "b", "a a", "bb"]},
    {"prompt": "hi ", "completions": ["hello there", "go"]},
    {"prompt": "x", "completions": ["yz", "zzzy", "q"]},
]
CHAT = [
    {"prompt": [{"role": "user", "content": "hi"}],
     "completions": [[{"role": "assistant", "content": "hello"}], [{"role": "assistant", "content": "y"}],
                     [{"role": "assistant", "content": "go away"}]]},
    {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}],
     "completions": [[{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "five"}]]},
]  # fmt: skip
RECORDS = {"tokenized": TOKENIZED, "text": TEXT, "chat": CHAT}
LORA_TARGETS = ["q_proj", "v_proj", "down_proj"]


# ----------------------------------------------------------------------------- the layout alone


def collated(records=TOKENIZED):
    collator = DataCollatorForRankedPreference(pad_token_id=0)
    return collator([{**r, "num_ranked": len(r["completion_ids"]) - 1} for r in records])


@pytest.mark.parametrize("rows", [None, [[0, 1, 2]], [[0, 2], [1]]], ids=["row_per_list", "one_row", "two_rows"])
def test_each_shared_token_sees_exactly_its_unshared_context_at_the_same_positions(rows):
    """For every token of the shared rows, read from (n, t): the (position, id) pairs of the keys it may attend to are
    exactly those of row n's tokens 0..t unshared. This pins the mask and the positions together."""
    batch = collated()
    layout = shared_prompt_layout(batch["attention_mask"], batch["completion_mask"], batch["num_completions"],
                                  rows=rows)
    blocks = block_lengths(batch["attention_mask"], batch["completion_mask"], batch["num_completions"])
    assert blocks == [int((layout.block == b).sum()) for b in range(len(TOKENIZED))]
    ids = gather_shared(batch["input_ids"], layout, fill=-1)
    allowed = attention_allowed(layout)[:, 0]
    checked = 0
    for r in range(ids.shape[0]):
        for q in range(ids.shape[1]):
            n, t = int(layout.source_sequence[r, q]), int(layout.source_position[r, q])
            keys = allowed[r, q].nonzero().flatten().tolist()
            if n < 0:
                assert keys == [q]  # padding attends to itself only
                continue
            seen = sorted((int(layout.source_position[r, j]), int(ids[r, j])) for j in keys)
            assert seen == [(s, int(batch["input_ids"][n, s])) for s in range(t + 1)], (r, q)
            checked += 1
    assert checked == layout.num_tokens  # (a real token attending to padding would have shown as (0, -1))


def test_every_completion_token_is_predicted_once_from_the_token_before_it():
    """The shared rows' labels are the unshared next-token labels, each (sequence, position) exactly once; a
    completion's first token is predicted at the position of the prompt's last token (P - 1)."""
    batch = collated()
    layout = shared_prompt_layout(batch["attention_mask"], batch["completion_mask"], batch["num_completions"])
    unshared = next_token_labels(batch["input_ids"], batch["completion_mask"])
    labels = gather_shared(unshared, layout, fill=IGNORE_INDEX)
    labelled = labels != IGNORE_INDEX
    pairs = sorted(zip(layout.source_sequence[labelled].tolist(), layout.source_position[labelled].tolist()))
    expected = sorted(map(tuple, (unshared != IGNORE_INDEX).nonzero().tolist()))
    assert pairs == expected
    first_reads = {(n, t) for n, t in pairs if batch["completion_mask"][n, t] == 0}
    prompt_lengths = (batch["attention_mask"].sum(1) - batch["completion_mask"].sum(1)).tolist()
    assert first_reads == {(n, p - 1) for n, p in enumerate(prompt_lengths)}
    # tokens: each prompt once (+ its last token once more per extra completion), each completion once
    sizes = [len(r["completion_ids"]) for r in TOKENIZED]
    expected_tokens = sum(len(r["prompt_ids"]) + k - 1 + sum(map(len, r["completion_ids"]))
                          for r, k in zip(TOKENIZED, sizes))
    assert layout.num_tokens == expected_tokens < int(batch["attention_mask"].sum())


def test_a_batch_whose_lists_do_not_share_their_prompt_is_found():
    batch = collated()
    assert layout_problem(batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                          batch["num_completions"]) is None
    changed = batch["input_ids"].clone()
    changed[4, 2] += 1  # list 1's second sequence: another prompt token
    problem = layout_problem(changed, batch["attention_mask"], batch["completion_mask"], batch["num_completions"])
    assert "list 1" in problem and "identical prompt" in problem
    left = {k: v.flip(1) if k in ("attention_mask", "completion_mask") else v for k, v in batch.items()}
    assert "right-padded" in layout_problem(left["input_ids"], left["attention_mask"], left["completion_mask"],
                                            left["num_completions"])


# ----------------------------------------------------------------------------- exactness in the trainers


def dpo_trainer(tmp_path, records, model=None, ref_model=None, lora=False, **overrides):
    peft = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, task_type="CAUSAL_LM") if lora else None
    trainer = PlackettLuceDPOTrainer(
        model=model if model is not None else tiny_causal_lm(seed=0),
        ref_model=None if lora else (ref_model if ref_model is not None else tiny_causal_lm(seed=1)),
        args=PlackettLuceDPOConfig(str(tmp_path), beta=0.5, per_device_train_batch_size=len(records),
                                   **{**RUN, **overrides}),
        train_dataset=Dataset.from_list(records), processing_class=tiny_tokenizer(), peft_config=peft,
    )
    if lora:
        randomize_lora(trainer.model, "default", seed=3)  # policy != reference (the base)
    return trainer


def reward_trainer(tmp_path, records, lora=False, **overrides):
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(tiny_llama_config(num_labels=1))
    peft = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, task_type="SEQ_CLS") if lora else None
    trainer = PlackettLuceRewardTrainer(
        model=model, args=PlackettLuceRewardConfig(str(tmp_path), per_device_train_batch_size=len(records),
                                                   **{**RUN, **overrides}),
        train_dataset=Dataset.from_list(records), processing_class=tiny_tokenizer(), peft_config=peft,
    )
    if lora:
        randomize_lora(trainer.model, "default", seed=3)
    return trainer


def trained_one_step(trainer):
    """The trainer after `train()` (one step, learning rate 0): the model as the training loop sets it up (Trainer
    turns activation checkpointing on in `train`), and the step itself ran through the shared layout."""
    trainer.train()
    return trainer


def first_batch(trainer):
    dataset = trainer.train_dataset
    return trainer.data_collator([dataset[i] for i in range(len(dataset))])


def loss_grads_metrics(trainer, batch, setting: bool, pack: bool | str = "auto"):
    """Loss, every trainable parameter's gradient and the logged metrics of one training forward + backward."""
    trainer._shared_prompt = SharedPromptSwitch(setting, scores=isinstance(trainer, PlackettLuceRewardTrainer),
                                                pack=pack)
    assert (trainer._shared_prompt.batch(batch, trainer) is not None) == setting  # the layout really runs (or not)
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    trainer._total_train_tokens = 0
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    return loss.detach(), grads, metrics


def assert_same_training_step(trainer, batch, packs=(False, "auto")):
    """The shared step (each list its own row; the lists grouped into rows as in training) equals the unshared one."""
    loss, grads, metrics = loss_grads_metrics(trainer, batch, False)
    assert loss != 0 and torch.isfinite(loss)
    for pack in packs:
        shared_loss, shared_grads, shared_metrics = loss_grads_metrics(trainer, batch, True, pack)
        torch.testing.assert_close(shared_loss, loss, rtol=1e-5, atol=0)
        assert grads.keys() == shared_grads.keys() and grads
        for name, grad in grads.items():
            difference = (shared_grads[name] - grad).norm()
            assert difference <= 1e-5 * grad.norm() + 1e-12, f"pack={pack}, {name}: differs by {difference:.3g}"
        assert shared_metrics.keys() == metrics.keys()
        for name, value in metrics.items():
            assert shared_metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-6), (pack, name)


@pytest.mark.parametrize("checkpointing", CHECKPOINTING, ids=list(CHECKPOINTING))
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("records", RECORDS, ids=list(RECORDS))
def test_dpo_loss_gradients_and_metrics_equal_the_unshared_forward(tmp_path, records, lora, checkpointing):
    trainer = trained_one_step(dpo_trainer(tmp_path, RECORDS[records], lora=lora, **CHECKPOINTING[checkpointing]))
    assert trainer.model.is_gradient_checkpointing == (checkpointing == "trl_default")
    assert trainer._shared_prompt.active  # the auto switch is on for a Llama with sdpa attention
    assert_same_training_step(trainer, first_batch(trainer))


@pytest.mark.parametrize("checkpointing", CHECKPOINTING, ids=list(CHECKPOINTING))
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("records", RECORDS, ids=list(RECORDS))
def test_reward_loss_gradients_and_metrics_equal_the_unshared_forward(tmp_path, records, lora, checkpointing):
    trainer = trained_one_step(reward_trainer(tmp_path, RECORDS[records], lora=lora,
                                              **CHECKPOINTING[checkpointing]))
    assert trainer.model.is_gradient_checkpointing == (checkpointing == "trl_default")
    assert trainer._shared_prompt.active
    assert_same_training_step(trainer, first_batch(trainer))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_rows_and_eager_attention_are_exact_too(tmp_path, attention):
    dpo = dpo_trainer(tmp_path, TOKENIZED, model=tiny_causal_lm(seed=0, attn_implementation=attention),
                      ref_model=tiny_causal_lm(seed=1, attn_implementation=attention))
    reward = reward_trainer(tmp_path, TOKENIZED)
    reward.model.config._attn_implementation = attention
    for trainer in (dpo, reward):
        assert_same_training_step(trainer, first_batch(trainer), packs=(False, True, "auto"))


def test_lists_share_a_row_only_where_the_cost_model_says_it_saves():
    span = 4608.0  # hidden 768, intermediate 2048
    assert rows_by_cost([1000, 1000, 1000, 1000], span) == [[0], [1], [2], [3]]  # nothing to save, attention grows
    assert rows_by_cost([1963, 762], span) == [[0, 1]]  # long-tailed: the padding costs more than the attention
    assert rows_by_cost([3000, 2900, 200, 150], span) == [[0, 3], [1, 2]]  # the short ones fill the long rows
    for lengths in ([5, 300, 40, 41, 900, 2], [64] * 8, [4000, 10]):
        rows = rows_by_cost(lengths, span)
        width = max(sum(lengths[b] for b in row) for row in rows)
        assert len(rows) * width * (1 + width / span) <= len(lengths) * max(lengths) * (1 + max(lengths) / span)
        assert sorted(b for row in rows for b in row) == list(range(len(lengths)))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_precomputed_reference_logps_equal_the_unshared_ones(tmp_path, lora):
    records = TOKENIZED + [{"prompt_ids": [7, 8], "completion_ids": [[9, 2], [10, 11, 12, 2], [13]]}]
    columns = {}
    for setting in (False, True):
        trainer = dpo_trainer(tmp_path, records, lora=lora, precompute_ref_log_probs=True,
                              precompute_ref_batch_size=3, shared_prompt=setting)
        assert trainer._shared_prompt.active == setting
        columns[setting] = trainer.train_dataset["ref_logps"]
    assert [len(v) for v in columns[True]] == [3, 2, 4, 3]
    for unshared, shared in zip(columns[False], columns[True]):
        assert shared == pytest.approx(unshared, rel=1e-5)


def test_a_sliding_window_longer_than_max_length_is_exact(tmp_path):
    """Local attention never bites when every sequence fits in the window (max_length <= sliding_window)."""
    config = MistralConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=64, pad_token_id=0)
    torch.manual_seed(0)
    trainer = dpo_trainer(tmp_path, TOKENIZED, model=MistralForCausalLM(config),
                          ref_model=MistralForCausalLM(config), max_length=64)
    assert trainer._shared_prompt.active
    assert_same_training_step(trainer, first_batch(trainer))


# ----------------------------------------------------------------------------- the switch


def sliding_window_models():
    common = dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, pad_token_id=0, sliding_window=8)
    return {
        "mistral": lambda: MistralForCausalLM(MistralConfig(**common)),
        "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=True, max_window_layers=1)),
    }


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_auto_turns_off_with_one_log_line_where_a_sliding_window_is_used_and_true_refuses(tmp_path, caplog, family):
    build = sliding_window_models()[family]
    with caplog.at_level(logging.WARNING, logger="rlhf_ext"):
        trainer = dpo_trainer(tmp_path, TOKENIZED, model=build(), ref_model=build())
    lines = [r.getMessage() for r in caplog.records if "shared_prompt" in r.getMessage()]
    assert len(lines) == 1 and "off" in lines[0] and "sliding window" in lines[0] and "max_length=64" in lines[0]
    assert trainer._shared_prompt.active is False
    loss, _, _ = loss_grads_metrics(trainer, first_batch(trainer), False)  # and it trains, unshared
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match=r"shared_prompt=True.*sliding window \(sliding_window=8\)"):
        dpo_trainer(tmp_path, TOKENIZED, model=build(), ref_model=build(), shared_prompt=True)


def test_false_turns_it_off_without_a_word(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="rlhf_ext"):
        trainer = dpo_trainer(tmp_path, TOKENIZED, shared_prompt=False)
    assert trainer._shared_prompt.active is False and "shared_prompt" not in caplog.text


def test_a_batch_without_one_prompt_per_list_runs_unshared_or_is_refused(tmp_path, caplog):
    trainer = dpo_trainer(tmp_path, TOKENIZED)
    batch = first_batch(trainer)
    batch["input_ids"][4, 1] += 1  # list 1's second sequence has another prompt (a user's collator could do this)
    trainer._shared_prompt = SharedPromptSwitch(None, scores=False)
    with caplog.at_level(logging.WARNING, logger="rlhf_ext"):
        for _ in range(2):
            assert trainer._shared_prompt.batch(batch, trainer) is None
    assert caplog.text.count("shared_prompt: a batch runs unshared") == 1 and "identical prompt" in caplog.text
    trainer._shared_prompt = SharedPromptSwitch(True, scores=False)
    with pytest.raises(ValueError, match=r"shared_prompt=True, but this batch cannot share its prompts: list 1"):
        trainer.compute_loss(trainer.model, batch)


def test_models_that_cannot_be_exact_are_named_with_the_reason():
    llama = tiny_causal_lm(seed=0)
    assert shared_prompt_blocker(llama, max_length=None) is None

    class OwnHead(LlamaForCausalLM):  # a user's subclass keeps transformers' decoder: still exact
        pass

    assert shared_prompt_blocker(OwnHead(tiny_llama_config()), max_length=None) is None
    llama.config._attn_implementation = "flash_attention_2"
    assert "attn_implementation='flash_attention_2'" in shared_prompt_blocker(llama, max_length=None)
    assert "soft-capped" in shared_prompt_blocker(tiny_causal_lm(seed=0, attn_logit_softcapping=50.0),
                                                  max_length=None)
    assert "router" in shared_prompt_blocker(tiny_causal_lm(seed=0, output_router_logits=True), max_length=None)
    from transformers import BertConfig, BertForSequenceClassification
    bert = BertForSequenceClassification(BertConfig(vocab_size=101, hidden_size=32, num_hidden_layers=1,
                                                    num_attention_heads=4, intermediate_size=64, num_labels=1))
    assert "an encoder classifier" in shared_prompt_blocker(bert, max_length=None, scores=True)
    from peft import PromptTuningConfig, get_peft_model
    prompt_tuned = get_peft_model(tiny_causal_lm(seed=0), PromptTuningConfig(task_type="CAUSAL_LM",
                                                                            num_virtual_tokens=2))
    assert "prompt-learning" in shared_prompt_blocker(prompt_tuned, max_length=None)


def test_shared_prompt_config_field_takes_only_none_true_false(tmp_path):
    for config in (PlackettLuceDPOConfig, PlackettLuceRewardConfig):
        assert config(str(tmp_path), **RUN).shared_prompt is None
        with pytest.raises(ValueError, match="shared_prompt must be None"):
            config(str(tmp_path), **RUN, shared_prompt="auto")


def test_shared_prompt_batch_is_built_from_the_collators_keys():
    batch = collated()
    shared = SharedPromptBatch.from_inputs(batch)
    assert shared.input_ids.shape[0] == len(TOKENIZED)  # one row per list
    assert shared.allowed.shape == (len(TOKENIZED), 1, shared.input_ids.shape[1], shared.input_ids.shape[1])
    assert SharedPromptBatch.from_inputs(batch, pack=True).input_ids.shape[0] == 1
    assert SharedPromptBatch.from_inputs(batch, pack=1e9).input_ids.shape[0] == 1  # attention free: all in one row
    assert SharedPromptBatch.from_inputs(batch, pack=1e-9).input_ids.shape[0] == 3  # attention dear: row per list
    padded = SharedPromptBatch.from_inputs(batch, pad_to_multiple_of=8)
    assert padded.input_ids.shape[1] % 8 == 0 and padded.layout.num_tokens == shared.layout.num_tokens
