"""Generation that prefills each distinct prompt once (`shared_prompt`, rlhf_ext/models/shared_generation.py).

The expectation is always plain `generate` on the same rows: greedy and seeded sampled tokens equal, per-step scores
and logits within 1e-5 (float32). The batch holds left-padded prompts of different lengths (each its own padding, a
one-token prompt), groups of 2, 3 and 4 rows, prompts that appear once, and a prompt whose rows are not consecutive.
Models: a Llama (rotary positions), a GPT-2 (learned absolute positions: a last column numbered off by one or by
the padding reads another embedding) and a peft LoRA on the Llama, each made to sample from peaked distributions
(`peaked`), so that a wrong cache or position changes the draws. The prefill is seen to run once per distinct
prompt: the embedding's inputs are recorded, [distinct prompts, P - 1] and then only [rows, 1]. What cannot be exact
(beam search, use_cache=False, a sliding window, ...) runs plain generate and says why.

Then the trainers: an online K-way step (a SharedBase policy, num_generations=2) samples the same completions and
logs the same loss with `shared_prompt` on and off, with TRL's activation checkpointing on (the default) and off; PPO
samples the same rollout. The switch reports what it cannot share as it does for the forwards.
"""

import logging

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PromptTuningConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM

from rlhf_ext.models import SharedBase, SharedBaseArguments, shared_generation
from rlhf_ext.models.shared_generation import (
    distinct_rows,
    generate_with_shared_prefill,
    shared_prefill_generation,
    shared_prefill_problem,
)
from rlhf_ext.testing import randomize_lora, tiny_causal_lm, tiny_tokenizer
from rlhf_ext.trainers.kway.online import OnlinePlackettLuceConfig, OnlinePlackettLuceTrainer
from rlhf_ext.trainers.ppo.config import PPOConfig
from rlhf_ext.trainers.ppo.trainer import PPOTrainer

PAD = 0
# prompts 0..3 as rows: 0 three times, 1 once, 2 four times, 0 again (not next to its group), 3 twice, 4 once
PROMPTS = [[11, 12, 13, 14], [15, 16, 17, 18, 19, 20, 21], [22], [23, 24, 25, 26, 27, 28], [29, 30]]
ROW_PROMPTS = [0, 0, 0, 1, 2, 2, 2, 2, 0, 3, 3, 4]
MODELS = ["llama", "gpt2", "lora"]
GREEDY = dict(max_new_tokens=6, do_sample=False, pad_token_id=PAD, eos_token_id=None)
SAMPLED = dict(max_new_tokens=6, do_sample=True, temperature=1.0, top_k=0, pad_token_id=PAD, eos_token_id=None)
CHECKPOINTING = {"trl_default": {}, "off": {"gradient_checkpointing": False}}
LORA = dict(lora_r=4, lora_alpha=8, lora_dropout=0.0)


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def peaked(model):
    """`model` made to sample from peaked distributions that the context decides. A random tiny model's logits are
    nearly flat (std ~0.1), where every draw is decided by the random numbers alone, and its attention is nearly
    uniform, where a token's position hardly matters (a rotary model's at least): the LM head scaled by 20 spreads the
    logits by ~2, the queries and keys scaled by 5 make the attention as peaked as a trained model's."""
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
        if isinstance(model, GPT2LMHeadModel):
            for block in model.transformer.h:  # c_attn's output columns: queries, keys, values
                width = block.attn.split_size
                block.attn.c_attn.weight[:, : 2 * width].mul_(5.0)
                block.attn.c_attn.bias[: 2 * width].mul_(5.0)
        else:
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(5.0)
                layer.self_attn.k_proj.weight.mul_(5.0)
    return model


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=101, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=PAD,
                                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False))


def tiny_model(kind: str):
    if kind == "gpt2":
        return peaked(tiny_gpt2()).eval()
    model = peaked(tiny_causal_lm(seed=0))
    if kind == "lora":
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
        randomize_lora(model, "default", seed=5, scale=0.1)  # lora_B starts at 0, where LoRA computes the base
    return model.eval()


class EmbeddingInputs:
    """The shapes of the token ids each forward of `model` embeds, in order."""

    def __init__(self, model):
        self.shapes = []
        self.handle = model.get_input_embeddings().register_forward_pre_hook(
            lambda module, args: self.shapes.append(tuple(args[0].shape)))

    def __enter__(self):
        return self.shapes

    def __exit__(self, *exc):
        self.handle.remove()


def generate_both(model, ids, mask, seed=0, **kwargs):
    """(plain, shared) generate outputs and the embedding's input shapes of each, from the same seed."""
    outputs, shapes = [], []
    for run in (lambda **kw: model.generate(**kw), lambda **kw: generate_with_shared_prefill(model, **kw)):
        torch.manual_seed(seed)
        with EmbeddingInputs(model) as seen:
            outputs.append(run(input_ids=ids, attention_mask=mask, **kwargs))
        shapes.append(seen)
    return outputs, shapes


def assert_steps_close(shared, plain, field):
    assert len(getattr(shared, field)) == len(getattr(plain, field))
    for step, (got, expected) in enumerate(zip(getattr(shared, field), getattr(plain, field))):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=f"{field}, step {step}")


# ----------------------------------------------------------------------------- the function


def test_distinct_rows_are_numbered_in_batch_order_and_need_ids_and_mask_equal():
    ids, mask = left_padded([PROMPTS[p] for p in ROW_PROMPTS])
    first, of_row = distinct_rows(ids, mask)
    assert first.tolist() == [0, 3, 4, 9, 11]  # the first row of prompts 0, 1, 2, 3, 4
    assert of_row.tolist() == ROW_PROMPTS
    assert distinct_rows(ids[:2], torch.tensor([[1] * ids.size(1), [0] + [1] * (ids.size(1) - 1)])) is None
    assert distinct_rows(*left_padded(PROMPTS)) is None  # every prompt once: nothing to share


@pytest.mark.parametrize("kind", MODELS)
def test_greedy_tokens_scores_and_logits_equal_plain_generate_with_one_prefill_per_prompt(kind):
    model = tiny_model(kind)
    ids, mask = left_padded([PROMPTS[p] for p in ROW_PROMPTS])
    (plain, shared), (plain_shapes, shared_shapes) = generate_both(
        model, ids, mask, output_scores=True, output_logits=True, return_dict_in_generate=True, **GREEDY)
    assert torch.equal(shared.sequences, plain.sequences)
    assert len({tuple(row) for row in plain.sequences[:, ids.size(1):].tolist()}) > 3  # prompts lead apart
    assert_steps_close(shared, plain, "scores")
    assert_steps_close(shared, plain, "logits")
    rows, width = ids.shape
    assert plain_shapes == [(rows, width)] + [(rows, 1)] * 5
    assert shared_shapes == [(len(PROMPTS), width - 1)] + [(rows, 1)] * 6  # each prompt once, then the last column


@pytest.mark.parametrize("kind", MODELS)
def test_sampled_tokens_equal_plain_generate_from_the_same_seed(kind):
    model = tiny_model(kind)
    ids, mask = left_padded([PROMPTS[p] for p in ROW_PROMPTS])
    for seed in (0, 1):
        (plain, shared), _ = generate_both(model, ids, mask, seed=seed, **SAMPLED)
        assert torch.equal(shared, plain), seed
    group = plain[:3, ids.size(1):].tolist()
    assert group[0] != group[1] or group[1] != group[2]  # a group's rows sample apart


@pytest.mark.parametrize("group", [2, 3, 4])
def test_groups_of_g_consecutive_rows_as_grpo_lays_them_out(group):
    model = tiny_model("gpt2")
    ids, mask = left_padded([prompt for prompt in PROMPTS[:3] for _ in range(group)])
    (plain, shared), (_, shared_shapes) = generate_both(model, ids, mask, output_scores=True,
                                                        return_dict_in_generate=True, **GREEDY)
    assert torch.equal(shared.sequences, plain.sequences)
    assert_steps_close(shared, plain, "scores")
    assert shared_shapes[0] == (3, ids.size(1) - 1)


def test_rows_that_all_differ_or_a_one_column_prompt_run_plain_generate_without_a_word():
    model = tiny_model("llama")
    reasons = []
    for prompts in (PROMPTS, [[11], [11], [12]]):
        ids, mask = left_padded(prompts)
        with EmbeddingInputs(model) as seen:
            out = generate_with_shared_prefill(model, ids, mask, on_unshared=reasons.append, **GREEDY)
        assert torch.equal(out, model.generate(input_ids=ids, attention_mask=mask, **GREEDY))
        assert seen[0] == tuple(ids.shape)
    assert reasons == []


def sliding_window_mistral():
    torch.manual_seed(0)
    return MistralForCausalLM(MistralConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, sliding_window=16,
                                            pad_token_id=PAD)).eval()


@pytest.mark.parametrize("case, expected", [
    ("use_cache", "use_cache=False"),
    ("beams", "beam_search"),
    ("return_sequences", "num_return_sequences=2"),
    ("static", "cache_implementation='static'"),
    ("attentions", "attentions or hidden states"),
    ("token_type_ids", "token_type_ids (multimodal"),
    ("sliding_window", "DynamicSlidingWindowLayer"),
])
def test_what_cannot_share_exactly_runs_plain_generate_and_says_why(case, expected):
    model = sliding_window_mistral() if case == "sliding_window" else tiny_model("llama")
    ids, mask = left_padded([PROMPTS[p] for p in ROW_PROMPTS])
    kwargs = {**GREEDY, **{
        "use_cache": {"use_cache": False}, "beams": {"num_beams": 2},
        "return_sequences": {"num_return_sequences": 2, "do_sample": True},
        "static": {"cache_implementation": "static"},
        "attentions": {"output_attentions": True, "return_dict_in_generate": True},
        "token_type_ids": {"token_type_ids": torch.zeros_like(ids)}, "sliding_window": {},
    }[case]}
    assert expected in shared_prefill_problem(model, **kwargs)
    if case in ("static", "token_type_ids"):  # (generate itself takes neither on this model: the check is enough)
        return
    reasons = []
    (plain, shared), (plain_shapes, shared_shapes) = generate_both(model, ids, mask, **kwargs)
    shared = shared.sequences if case == "attentions" else shared
    plain = plain.sequences if case == "attentions" else plain
    assert torch.equal(shared, plain) and shared_shapes == plain_shapes
    generate_with_shared_prefill(model, ids, mask, on_unshared=reasons.append, **kwargs)
    assert len(reasons) == 1 and expected in reasons[0]


def test_models_it_cannot_prefill_are_named():
    assert shared_prefill_problem(tiny_model("llama")) is None
    assert shared_prefill_problem(tiny_model("gpt2")) is None
    assert shared_prefill_problem(tiny_model("lora")) is None
    prompt_tuned = get_peft_model(tiny_causal_lm(seed=0), PromptTuningConfig(task_type="CAUSAL_LM",
                                                                             num_virtual_tokens=2))
    assert "prompt-learning" in shared_prefill_problem(prompt_tuned)


def test_the_context_manager_routes_generate_through_the_prefill_and_restores_it():
    model = tiny_model("lora")
    ids, mask = left_padded([PROMPTS[p] for p in ROW_PROMPTS])
    expected = model.generate(input_ids=ids, attention_mask=mask, **GREEDY)
    with shared_prefill_generation(model):
        with shared_prefill_generation(model):  # nested: wrapped once
            with EmbeddingInputs(model) as seen, torch.no_grad():
                assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **GREEDY), expected)
        assert seen[0] == (len(PROMPTS), ids.size(1) - 1)
        assert "generate" in vars(model)
    assert "generate" not in vars(model)  # the class's method again
    with pytest.raises(RuntimeError), shared_prefill_generation(model):
        raise RuntimeError
    assert "generate" not in vars(model)


# ----------------------------------------------------------------------------- the trainers


def recording_reward(log):
    def reward(completions, **kwargs):
        log.append(list(completions))
        return [float(sum(map(ord, c)) % 97) for c in completions]  # ties (a loss of 0) unlikely
    return reward


def shared_base(seed: int = 5) -> SharedBase:
    shared = SharedBase(peaked(tiny_causal_lm(seed=0)), SharedBaseArguments(**LORA))
    randomize_lora(shared.peft_model, "policy", seed=seed, scale=0.1)  # sample from a policy that is not the base
    return shared


PROMPT_TEXTS = ["abc", "hello there", "x", "qrs tuv"]


def online_trainer(tmp_path, completions_log, **overrides):
    args = OnlinePlackettLuceConfig(**{
        **dict(output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=2, max_completion_length=6,
               max_steps=1, learning_rate=1e-2, temperature=1.0, report_to=[], use_cpu=True, bf16=False,
               save_strategy="no", disable_tqdm=True, seed=0, logging_steps=1),
        **overrides,
    })  # fmt: skip
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "left"
    return OnlinePlackettLuceTrainer(shared_base(), reward_funcs=recording_reward(completions_log),
                                     args=args, train_dataset=Dataset.from_dict({"prompt": PROMPT_TEXTS}),
                                     processing_class=tokenizer)


def recorded_prefills(monkeypatch) -> list:
    """The [distinct prompts, P - 1] token ids of each shared prefill."""
    prefills, prefill = [], shared_generation.prefilled_cache
    monkeypatch.setattr(shared_generation, "prefilled_cache",
                        lambda model, ids, mask: prefills.append(tuple(ids.shape)) or prefill(model, ids, mask))
    return prefills


@pytest.mark.parametrize("checkpointing", CHECKPOINTING, ids=list(CHECKPOINTING))
def test_an_online_kway_step_samples_the_same_completions_and_loss_shared_and_unshared(tmp_path, monkeypatch,
                                                                                       checkpointing):
    prefills = recorded_prefills(monkeypatch)
    runs = {}
    for setting in (False, None):
        completions = []
        trainer = online_trainer(tmp_path / str(setting), completions, shared_prompt=setting,
                                 **CHECKPOINTING[checkpointing])
        policy = trainer.accelerator.unwrap_model(trainer.model_wrapped)
        with EmbeddingInputs(policy) as seen:
            trainer.train()
        assert trainer.model.is_activation_checkpointing == (checkpointing == "trl_default")
        assert "generate" not in vars(policy)
        runs[setting] = completions, trainer.state.log_history[0]["loss"], seen
    (plain, plain_loss, plain_seen), (shared, shared_loss, shared_seen) = runs[False], runs[None]
    assert plain and shared == plain
    assert len(set(plain[0])) > 4  # the completions differ: sampled, not a constant
    assert shared_loss == pytest.approx(plain_loss, rel=1e-5) and plain_loss != 0
    # 8 rows: the 4 prompts twice each; one prefill of the 4 distinct prompts, and no forward over the 8 whole prompts
    assert len(prefills) == 1 and prefills[0][0] == 4
    width = prefills[0][1] + 1
    assert (8, width) in plain_seen and (8, width) not in shared_seen and (4, width - 1) in shared_seen


def test_a_ppo_rollout_samples_the_same_completions_shared_and_unshared(tmp_path, monkeypatch):
    prefills = recorded_prefills(monkeypatch)
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "left"
    rollouts = {}
    for setting in (False, True):
        args = PPOConfig(output_dir=str(tmp_path / str(setting)), per_device_train_batch_size=4, num_generations=2,
                         max_completion_length=6, max_steps=1, num_ppo_epochs=1, temperature=1.0, report_to=[],
                         use_cpu=True, bf16=False, save_strategy="no", disable_tqdm=True, seed=0,
                         shared_prompt=setting)
        trainer = PPOTrainer(shared_base(), reward_funcs=recording_reward([]), args=args,
                             train_dataset=Dataset.from_dict({"prompt": PROMPT_TEXTS}), processing_class=tokenizer)
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, bypassed here
        torch.manual_seed(0)
        rollouts[setting] = trainer._generate_and_score_completions(
            [{"prompt": p} for p in PROMPT_TEXTS[:2] for _ in range(2)])
    assert torch.equal(rollouts[True]["completion_ids"], rollouts[False]["completion_ids"])
    assert len(prefills) == 1 and prefills[0][0] == 2


def test_what_generation_cannot_share_is_logged_once_or_refused_as_the_switch_does(tmp_path, caplog):
    no_cache = dict(generation_kwargs={"use_cache": False})
    with caplog.at_level(logging.WARNING, logger="rlhf_ext"):
        trainer = online_trainer(tmp_path / "auto", [], **no_cache)
        assert trainer._shared_prompt.active  # the forwards still share: only generation cannot
        trainer.train()
        trainer._generate_single_turn([[5, 6], [5, 6]], None, {}, 2)  # a second call: no second line
    lines = [r.getMessage() for r in caplog.records if "generation prefills" in r.getMessage()]
    assert len(lines) == 1 and "use_cache=False" in lines[0]
    trainer = online_trainer(tmp_path / "true", [], shared_prompt=True, **no_cache)
    with pytest.raises(ValueError, match="shared_prompt=True, but generation cannot prefill.*use_cache=False"):
        trainer.train()
    assert trainer.model.is_activation_checkpointing  # refused before TRL's generation turned it off


def test_a_forward_that_leaves_the_cache_unfilled_runs_plain_generate_and_says_why():
    """A forward that does not fill the cache it is given (here: one that drops it, as remote code taking the cache
    under another name would) cannot be continued from."""
    model = tiny_model("llama")
    forward = model.forward
    model.forward = lambda *args, **kwargs: forward(*args, **{k: v for k, v in kwargs.items() if k != "cache"})
    ids, mask = left_padded([PROMPTS[p] for p in ROW_PROMPTS])
    reasons = []
    got = generate_with_shared_prefill(model, ids, mask, on_unshared=reasons.append, **GREEDY)
    assert torch.equal(got, model.generate(input_ids=ids, attention_mask=mask, **GREEDY))  # plain, forward as it is
    assert len(reasons) == 1 and "left the cache it was given unfilled" in reasons[0]


def test_dropout_active_while_sampling_rules_the_shared_prefill_out():
    """One prefill would draw one dropout mask for a prompt's G samples: not what plain generate samples. TRL samples
    in training mode, so a LoRA dropout counts there; in eval mode (or with disable_dropout) it is exact again."""
    model = get_peft_model(tiny_causal_lm(seed=0), LoraConfig(r=2, lora_alpha=4, lora_dropout=0.1,
                                                              target_modules=["q_proj", "v_proj"]))
    model.train()
    assert "dropout is active while sampling" in shared_prefill_problem(model)
    model.eval()
    assert shared_prefill_problem(model) is None
