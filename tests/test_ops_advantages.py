import pytest
import torch

import rlhf_ext as rx


def gae_recursion(rewards, values, mask, gamma, lam):
    """The per-token recursion as seed section 2.9 writes it, one row and one token at a time."""
    advantages = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        n = int(mask[b].sum())
        running = 0.0
        for t in reversed(range(n)):
            next_value = values[b, t + 1] if t + 1 < n else 0.0
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            running = delta + gamma * lam * running
            advantages[b, t] = running
    return advantages


def right_padded_mask(lengths, T):
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]


def test_gae_matches_recursion_on_rows_of_different_lengths():
    torch.manual_seed(1)
    mask = right_padded_mask([12, 5, 1, 9], 12)
    rewards, values = torch.randn(4, 12, dtype=torch.float64), torch.randn(4, 12, dtype=torch.float64)
    adv, ret = rx.gae(rewards, values, mask, gamma=0.99, lam=0.9)
    expected = gae_recursion(rewards, values, mask, 0.99, 0.9)
    torch.testing.assert_close(adv, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret, (expected + values) * mask, rtol=1e-12, atol=1e-12)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


@pytest.mark.parametrize("T", [1, 2, 3, 63, 64, 65, 1000, 8192])
def test_gae_float32_within_1e_5_relative_of_float64_recursion(T):
    torch.manual_seed(T)
    B = 2
    mask = right_padded_mask([T, max(1, T // 3)], T)
    rewards, values = torch.randn(B, T), torch.randn(B, T)
    adv, _ = rx.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # the float64 reference is vectorised over the batch only, so T=8192 stays fast
    expected = torch.zeros(B, T, dtype=torch.float64)
    r64, v64, m64 = rewards.double() * mask, values.double() * mask, mask.double()
    running = torch.zeros(B, dtype=torch.float64)
    for t in reversed(range(T)):
        next_value = v64[:, t + 1] * m64[:, t + 1] if t + 1 < T else 0.0
        delta = (r64[:, t] + next_value - v64[:, t]) * m64[:, t]
        running = delta + 0.95 * running
        expected[:, t] = running * m64[:, t]
    rel = (adv.double() - expected).abs().max() / expected.abs().max()
    assert rel < 1e-5


def test_lambda_zero_gives_td_residual():
    mask = right_padded_mask([4, 2], 4)
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 0.0, 0.0]])
    values = torch.tensor([[0.1, 0.2, 0.3, 0.4], [1.0, 2.0, 9.0, 9.0]])
    adv, _ = rx.gae(rewards, values, mask, gamma=0.5, lam=0.0)
    # delta_t = r_t + 0.5 * V_{t+1} - V_t, worked by hand, V after the last real token = 0
    expected = torch.tensor(
        [[1.0 + 0.1 - 0.1, 2.0 + 0.15 - 0.2, 3.0 + 0.2 - 0.3, 4.0 - 0.4], [0.5 + 1.0 - 1.0, -1.0 - 2.0, 0, 0]]
    )
    torch.testing.assert_close(adv, expected)


def test_lambda_one_gamma_one_gives_reward_to_go_minus_value():
    torch.manual_seed(2)
    mask = right_padded_mask([6, 3], 6)
    rewards, values = torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    adv, ret = rx.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    masked_rewards = rewards * mask
    reward_to_go = masked_rewards.flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(adv, (reward_to_go - values) * mask)
    torch.testing.assert_close(ret, reward_to_go * mask)


def test_rewards_to_go_with_and_without_baseline():
    mask = right_padded_mask([3, 2], 3)
    rewards = torch.tensor([[1.0, 0.0, 2.0], [3.0, 1.0, 7.0]], dtype=torch.float64)
    adv, ret = rx.rewards_to_go(rewards, mask, gamma=0.5)
    # G_t = r_t + 0.5 G_{t+1}: row 0: [1 + 0.5*(0 + 0.5*2), 0 + 0.5*2, 2]; row 1: [3 + 0.5, 1, pad]
    expected = torch.tensor([[1.5, 1.0, 2.0], [3.5, 1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(ret, expected)
    torch.testing.assert_close(adv, expected)
    adv_b, _ = rx.rewards_to_go(rewards, mask, gamma=0.5, baseline=torch.tensor([1.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(adv_b, torch.tensor([[0.5, 0.0, 1.0], [1.5, -1.0, 0.0]], dtype=torch.float64))


def test_gae_gradient_flows_to_values_only_on_real_tokens():
    mask = right_padded_mask([3, 1], 4)
    rewards = torch.randn(2, 4, dtype=torch.float64)
    values = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: rx.gae(rewards, v, mask, 0.9, 0.8)[0], (values,))
    adv, _ = rx.gae(rewards, values, mask, 0.9, 0.8)
    adv.sum().backward()
    assert (values.grad[~mask] == 0).all()


def test_discounted_reverse_cumsum_with_zero_and_one_discount():
    x = torch.arange(1.0, 11.0)[None]
    torch.testing.assert_close(rx.discounted_reverse_cumsum(x, 0.0), x)
    torch.testing.assert_close(rx.discounted_reverse_cumsum(x, 1.0), x.flip(1).cumsum(1).flip(1))


def test_bad_inputs_raise_clear_errors():
    r = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="values has shape"):
        rx.gae(r, torch.zeros(2, 4), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="row 1 is not a prefix"):
        rx.gae(r, r, torch.tensor([[1, 1, 0], [0, 1, 1]], dtype=torch.bool))
    with pytest.raises(ValueError, match="must have 2 dimensions"):
        rx.gae(torch.zeros(3), torch.zeros(3), torch.ones(3, dtype=torch.bool))


def test_non_finite_padding_does_not_leak_into_real_tokens():
    mask = right_padded_mask([3, 2], 4)
    rewards, values = torch.randn(2, 4), torch.randn(2, 4)
    clean_adv, clean_ret = rx.gae(rewards, values, mask)
    dirty_r = rewards.masked_fill(~mask, float("nan"))
    dirty_v = values.masked_fill(~mask, float("inf"))
    adv, ret = rx.gae(dirty_r, dirty_v, mask)
    torch.testing.assert_close(adv, clean_adv)
    torch.testing.assert_close(ret, clean_ret)
    torch.testing.assert_close(rx.rewards_to_go(dirty_r, mask)[0], rx.rewards_to_go(rewards, mask)[0])
