import math

import pytest
import torch

import rlhf_ext as rx


def test_token_rewards_hand_worked():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -1.0], [-0.5, -3.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    out = rx.token_rewards(torch.tensor([2.0, -1.0]), logprobs, ref, mask, kl_coef=0.1)
    # k1 = logp - ref: row 0 [0.5, 0, 0.5]; row 1 [-0.5, 2, (pad)]
    expected = torch.tensor([[-0.05, 0.0, -0.05 + 2.0], [0.05, -0.2 - 1.0, 0.0]])
    torch.testing.assert_close(out.rewards, expected)
    torch.testing.assert_close(out.non_score_reward, torch.tensor([-0.1, -0.15]))
    torch.testing.assert_close(out.kl, torch.tensor([[0.5, 0.0, 0.5], [-0.5, 2.0, 0.0]]))


def test_missing_eos_penalty_lowers_only_unfinished_responses():
    zeros = torch.zeros(2, 2)
    mask = torch.ones(2, 2, dtype=torch.bool)
    out = rx.token_rewards(torch.tensor([1.0, 1.0]), zeros, zeros, mask, kl_coef=0.0, missing_eos_penalty=0.5,
                           has_eos=torch.tensor([True, False]))
    torch.testing.assert_close(out.scores, torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(out.rewards[:, -1], torch.tensor([1.0, 0.5]))


def test_kl_estimators_against_their_formulas_and_expectation():
    logp, ref = torch.tensor([-0.2]), torch.tensor([-0.9])
    log_r = 0.7
    assert math.isclose(rx.kl_penalty(logp, ref, "k1").item(), log_r, rel_tol=1e-6)
    assert math.isclose(rx.kl_penalty(logp, ref, "k2").item(), 0.5 * log_r**2, rel_tol=1e-6)
    assert math.isclose(rx.kl_penalty(logp, ref, "k3").item(), math.exp(-log_r) - 1 + log_r, rel_tol=1e-6)
    # Monte Carlo: k1 and k3 are unbiased for KL(p || q) between two categoricals
    p = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    q = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    exact = (p * (p / q).log()).sum()
    samples = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    for kind in ("k1", "k3"):
        estimate = rx.kl_penalty(p.log()[samples], q.log()[samples], kind).mean()
        assert abs(estimate - exact) < 0.01, kind


def test_bad_inputs():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="row 1 has no real token"):
        rx.token_rewards(torch.zeros(2), z, z, torch.tensor([[1, 0, 0], [0, 0, 0]], dtype=torch.bool), kl_coef=0.1)
    with pytest.raises(ValueError, match="scores has 3 entries"):
        rx.token_rewards(torch.zeros(3), z, z, torch.ones(2, 3, dtype=torch.bool), kl_coef=0.1)
    with pytest.raises(ValueError, match="non-finite"):
        rx.token_rewards(torch.tensor([0.0, float("nan")]), z, z, torch.ones(2, 3, dtype=torch.bool), kl_coef=0.1)
    with pytest.raises(ValueError, match="kl estimator must be one of"):
        rx.kl_penalty(z, z, "k4")
    with pytest.raises(ValueError, match="needs has_eos"):
        rx.token_rewards(torch.zeros(2), z, z, torch.ones(2, 3, dtype=torch.bool), kl_coef=0.1, missing_eos_penalty=1.0)


def test_minus_infinity_log_probs_on_padding_give_finite_rewards():
    logprobs = torch.tensor([[-1.0, float("-inf")]])
    ref = torch.tensor([[-2.0, float("-inf")]])
    out = rx.token_rewards(
        torch.tensor([1.0]), logprobs, ref, torch.tensor([[True, False]]), kl_coef=0.5, kl_estimator="k3"
    )
    k3 = torch.expm1(torch.tensor(-1.0)) + 1.0
    torch.testing.assert_close(out.rewards, torch.tensor([[1.0 - 0.5 * k3, 0.0]]))
    assert torch.isfinite(out.non_score_reward).all()
