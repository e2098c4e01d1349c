"""benchmarks/ppo_learning.py's pure helpers: seed spreads, the band checks, the table, explained variance, and the
scoring of token ids that both trainers share (no training here)."""

import math

import pytest
import torch
from transformers import LlamaForSequenceClassification

from benchmarks import ppo_learning as m
from rlhf_ext.testing import tiny_llama_config


def run(variant, seed, reward, kl=None, ev=None):
    n = len(reward)
    return {"variant": variant, "seed": seed, "reward": reward, "kl": kl or [0.0] * n, "ev": ev or [0.0] * n}


def test_spread_is_mean_min_max_of_the_finite_values():
    assert m.spread([1.0, 2.0, 6.0]) == (3.0, 1.0, 6.0)
    assert m.spread([1.0, math.nan, 3.0]) == (2.0, 1.0, 3.0)
    assert all(math.isnan(x) for x in m.spread([math.nan]))


def test_summary_within_and_overlap_per_update():
    runs = [run("trl", 0, [0.1, 0.2]), run("trl", 1, [0.2, 0.4]), run("trl", 2, [0.3, 0.3]),
            run("separate", 0, [0.15, 0.5]), run("separate", 1, [0.25, 0.7])]  # fmt: skip
    summary = m.summarize(runs, ["trl", "separate"])
    assert summary["trl"]["reward"][1] == (0.3, 0.2, 0.4)
    assert summary["separate"]["reward"][0] == (0.2, 0.15, 0.25)
    assert m.within(summary, "separate", "trl") == [True, False]  # mean 0.6 is above TRL's band [0.2, 0.4]
    assert m.overlaps(summary, "separate", "trl") == [True, False]  # [0.5, 0.7] vs [0.2, 0.4]
    table = m.format_table(summary, ["trl", "separate"])
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["upd", "trl:reward"] and len(lines) == 3
    assert "0.300 [0.200,0.400]" in lines[2] and "0.600 [0.500,0.700]" in lines[2]


def test_explained_variance_over_the_mask():
    returns = torch.tensor([[1.0, 2.0, 9.0], [3.0, 4.0, -9.0]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    assert m.explained_variance(returns, returns.clone(), mask) == 1.0
    assert abs(m.explained_variance(returns, torch.zeros_like(returns) + 2.5, mask)) < 1e-6  # a constant explains 0
    values = torch.tensor([[1.0, 2.0, 0.0], [3.0, 3.0, 0.0]])  # residual 0, 0, 0, 1: var 3/16 of var(R) 5/4
    assert abs(m.explained_variance(returns, values, mask) - (1 - (3 / 16) / (5 / 4))) < 1e-6


def test_score_token_ids_is_the_classifier_score_at_the_last_token():
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(tiny_llama_config(num_labels=1)).eval()
    sequences = [[5, 6, 7, 2], [8, 9], [10, 11, 12]]
    scores = m.score_token_ids(model, sequences, pad_token_id=0)
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([s])).logits[0, 0].item() for s in sequences]
    assert torch.allclose(scores, torch.tensor(alone), atol=1e-5)


def test_token_reward_scores_prompt_plus_completion_ids():
    from rlhf_ext.testing import tiny_tokenizer

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(tiny_llama_config(num_labels=1)).eval()
    tokenizer = tiny_tokenizer()
    reward = m.TokenReward(model, tokenizer)
    completion_ids = [tokenizer("ab", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id], [0, 5]]
    got = reward(prompts=["xy", "z"], completions=["ab", ""], completion_ids=completion_ids)
    want = m.score_token_ids(model, [tokenizer("xyab")["input_ids"] + [2], tokenizer("z")["input_ids"] + [0, 5]], 0)
    assert torch.allclose(torch.tensor(got), want)
    assert reward.special_tokens_before_eos == 1  # the pad inside the second completion


def test_every_variant_has_a_trainer_and_the_default_set_starts_with_trl():
    assert m.DEFAULT_VARIANTS[0] == "trl"
    assert all(m.VARIANTS[v].trainer in ("trl", "rlhf_ext") for v in m.VARIANTS)


def test_value_embedding_variants_build_the_option_and_set_the_value_learning_rate():
    for name in ("shared_lora_vemb", "shared_lora_vemb_vlr3", "shared_lora_head_vemb"):
        assert m.VARIANTS[name].shared["value_lora_embeddings"] is True
    assert m.VARIANTS["shared_lora_vemb"].value_learning_rate is None
    assert m.VARIANTS["shared_lora_vemb_vlr3"].value_learning_rate == 3e-3
    assert m.VARIANTS["shared_lora_head_vemb"].shared["policy_lm_head"] == "trainable"
    assert m.value_learning_rate_args(m.VARIANTS["shared_lora_vemb_vlr3"]) == {"value_learning_rate": 3e-3}
    assert m.value_learning_rate_args(m.VARIANTS["shared_lora"]) == {}


def test_seed_average_gap_compares_per_seed_averages():
    runs = [run("trl", 0, [0.0, 0.2]), run("trl", 1, [0.2, 0.4]), run("separate", 0, [0.2, 0.4]),
            run("separate", 1, [0.4, 0.6])]  # fmt: skip
    gap = m.seed_average_gap(runs, "separate", "trl")
    assert gap["reference"] == pytest.approx([0.1, 0.3]) and gap["variant"] == pytest.approx([0.3, 0.5])
    assert abs(gap["difference"] - 0.2) < 1e-9 and abs(gap["standard_error"] - math.sqrt(0.02)) < 1e-9


@pytest.mark.parametrize("variant", ["shared_lora", "shared_lora_head", "shared_lora_vemb"])
def test_models_are_built_after_seeding_so_runs_reproduce(tmp_path, variant):
    # The shared base draws its LoRA A matrices and value head when it is built, before the Trainer seeds: without a
    # seed first, two runs with the same seed start from different adapters (issue 22 item 5).
    from rlhf_ext.testing import save_tiny_model

    save_tiny_model(tmp_path / "policy", seed=0, hidden_size=64)
    settings = m.Settings()

    def adapter_weights() -> dict:
        model, _ = m.build_models(tmp_path, settings, seed=1, variant=m.VARIANTS[variant])
        named = [*model.peft_model.named_parameters(), *model.heads.named_parameters()]
        return {n: p.detach().clone() for n, p in named if p.requires_grad}

    first = adapter_weights()
    torch.randn(100)  # whatever ran before in the process moves the global RNG
    second = adapter_weights()
    assert first.keys() == second.keys() and any(".lora_A." in n for n in first)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_score_at_kl_interpolates_at_the_first_crossing():
    assert m.score_at_kl([0.1, 0.2, 0.4], [0.0, 0.1, 0.3], 0.2) == pytest.approx(0.3)  # halfway from 0.1 to 0.3
    assert m.score_at_kl([0.1, 0.2, 0.4], [0.0, 0.6, 0.1], 0.5) == pytest.approx(0.1 + 0.1 * 5 / 6)
    assert math.isnan(m.score_at_kl([0.1, 0.2], [0.0, 0.1], 0.5))
    runs = [run("c", 0, [0.1, 0.3], kl=[0.0, 0.4]), run("c", 1, [0.1, 0.2], kl=[0.0, 0.1])]
    f = m.frontier(runs, "c")
    assert f["kl 0.2"]["reached"] == 1 and f["kl 0.2"]["median"] == pytest.approx(0.2)
    assert f["final"]["median"] == pytest.approx(0.25) and "not reached" in m.format_frontier(runs, ["c"])
