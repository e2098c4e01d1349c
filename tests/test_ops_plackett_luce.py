import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import rlhf_ext as rx


def brute_force_pl_nll(scores, top_m=None):
    """-log of the Plackett-Luce product prod_k exp(s_k) / sum_{j>=k} exp(s_j), term by term."""
    n = len(scores)
    m = n if top_m is None else min(top_m, n)
    prob = 1.0
    for k in range(m):
        prob *= math.exp(scores[k]) / sum(math.exp(s) for s in scores[k:])
    return -math.log(prob)


@pytest.mark.parametrize("K", [2, 3, 4, 5])
def test_matches_brute_force_product(K):
    torch.manual_seed(K)
    scores = torch.randn(6, K, dtype=torch.float64) * 2
    loss = rx.plackett_luce_loss(scores)
    expected = torch.tensor([brute_force_pl_nll(row.tolist()) for row in scores], dtype=torch.float64)
    torch.testing.assert_close(loss, expected)


def test_probabilities_of_all_orders_sum_to_one():
    scores = torch.tensor([0.3, -1.2, 2.0, 0.7], dtype=torch.float64)
    orders = list(itertools.permutations(range(4)))
    nll = rx.plackett_luce_loss(torch.stack([scores[list(p)] for p in orders]))
    assert math.isclose(torch.exp(-nll).sum().item(), 1.0, rel_tol=1e-12)


def test_variable_lengths_equal_lists_one_by_one_and_ignore_padding_values():
    torch.manual_seed(0)
    scores = torch.randn(3, 4, dtype=torch.float64)
    lengths = [4, 2, 3]
    mask = torch.arange(4)[None] < torch.tensor(lengths)[:, None]
    padded = scores.masked_fill(~mask, float("nan"))  # padding content must not matter, even NaN
    loss = rx.plackett_luce_loss(padded, mask)
    one_by_one = torch.cat([rx.plackett_luce_loss(scores[i : i + 1, :n]) for i, n in enumerate(lengths)])
    torch.testing.assert_close(loss, one_by_one)


def test_top_m_partial_ranking():
    scores = torch.tensor([[1.0, 0.2, -0.5, 0.9]], dtype=torch.float64)
    for m in (1, 2, 3, 4, 10):
        expected = brute_force_pl_nll(scores[0].tolist(), top_m=m)
        assert math.isclose(rx.plackett_luce_loss(scores, top_m=m).item(), expected, rel_tol=1e-12)
    # top-1 is the softmax cross-entropy of the best item
    torch.testing.assert_close(
        rx.plackett_luce_loss(scores, top_m=1), F.cross_entropy(scores, torch.tensor([0])).reshape(1)
    )


def test_per_list_depth_equals_lists_one_by_one():
    torch.manual_seed(4)
    scores = torch.randn(3, 4, dtype=torch.float64)
    depth = torch.tensor([0, 1, 3])
    expected = torch.tensor(
        [0.0] + [brute_force_pl_nll(scores[i].tolist(), top_m=int(depth[i])) for i in (1, 2)], dtype=torch.float64
    )
    torch.testing.assert_close(rx.plackett_luce_loss(scores, top_m=depth), expected)


def test_shift_invariant():
    scores = torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(rx.plackett_luce_loss(scores), rx.plackett_luce_loss(scores + 123.4))


def test_finite_for_large_scores():
    scores = torch.tensor([[1e4, 0.0, -1e4], [-1e4, 1e4, 5e3]], requires_grad=True)
    loss = rx.plackett_luce_loss(scores)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(scores.grad).all()
    # row 0 is ranked right with huge margins (loss ~ 0); row 1 puts the worst first:
    # lse(-1e4, 1e4, 5e3) + 1e4 = 2e4, then lse(1e4, 5e3) - 1e4 ~ 0
    assert loss[0].item() < 1e-3
    torch.testing.assert_close(loss[1], torch.tensor(2e4), rtol=1e-6, atol=0)


def test_float64_gradient_and_zero_gradient_on_padding():
    scores = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda s: rx.plackett_luce_loss(s, mask), (scores,))
    rx.plackett_luce_loss(scores, mask).sum().backward()
    assert (scores.grad[~mask] == 0).all()


def test_dpo_pl_equals_sigmoid_dpo_at_k2():
    torch.manual_seed(0)
    policy, ref = torch.randn(8, 2, dtype=torch.float64) * 5, torch.randn(8, 2, dtype=torch.float64) * 5
    beta = 0.3
    # TRL's sigmoid loss: -logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))
    logits = (policy[:, 0] - ref[:, 0]) - (policy[:, 1] - ref[:, 1])
    torch.testing.assert_close(rx.dpo_plackett_luce_loss(policy, ref, beta=beta), -F.logsigmoid(beta * logits))


def test_dpo_pl_k3_matches_brute_force():
    policy, ref = (
        torch.tensor([[-3.0, -5.0, -4.0]], dtype=torch.float64),
        torch.tensor([[-4.0, -4.0, -4.0]], dtype=torch.float64),
    )
    s = (0.5 * (policy - ref))[0].tolist()
    assert math.isclose(rx.dpo_plackett_luce_loss(policy, ref, beta=0.5).item(), brute_force_pl_nll(s), rel_tol=1e-12)


def test_bad_inputs():
    with pytest.raises(ValueError, match="list 1 has 1 real item"):
        rx.plackett_luce_loss(torch.zeros(2, 3), torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool))
    with pytest.raises(ValueError, match="not a prefix"):
        rx.plackett_luce_loss(torch.zeros(1, 3), torch.tensor([[1, 0, 1]], dtype=torch.bool))
    with pytest.raises(ValueError, match=r"non-finite value nan at index \(0, 1\)"):
        rx.plackett_luce_loss(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="ref_logps has shape"):
        rx.dpo_plackett_luce_loss(torch.zeros(2, 3), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="top_m must be >= 1"):
        rx.plackett_luce_loss(torch.zeros(1, 3), top_m=0)
    with pytest.raises(ValueError, match="list 1 has -1"):
        rx.plackett_luce_loss(torch.zeros(2, 3), top_m=torch.tensor([1, -1]))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        rx.plackett_luce_loss(torch.zeros(2, 3), top_m=torch.tensor([1]))


def float64_reference(scores32, mask=None):
    """Loss and gradient in float64 of the same float32 numbers, shifted by the row max exactly in float64."""
    s = scores32.detach().double().requires_grad_(True)
    m = torch.ones_like(s, dtype=torch.bool) if mask is None else mask
    x = (s - s.detach().masked_fill(~m, -math.inf).amax(dim=1, keepdim=True)).masked_fill(~m, -math.inf)
    tails = torch.logcumsumexp(x.flip(-1), dim=-1).flip(-1)
    loss = torch.where(m, tails - x, torch.zeros_like(x)).sum(dim=1)
    loss.sum().backward()
    return loss.detach(), s.grad


@pytest.mark.parametrize("offset", [0.0, 1e4, 1e8])
def test_float32_exact_under_a_large_common_offset(offset):
    # logsumexp of raw scores ~1e4 rounds at float32's spacing there (~1e-3): gradient error 3e-3
    # before the shift by the row max, against ~5e-7 for allRank's listMLE
    g = torch.Generator().manual_seed(1)
    scores = (torch.randn(64, 8, generator=g, dtype=torch.float64) + offset).float().requires_grad_(True)
    loss = rx.plackett_luce_loss(scores)
    loss.sum().backward()
    ref_loss, ref_grad = float64_reference(scores)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(scores.grad.double(), ref_grad, rtol=0, atol=2e-6)


def test_two_tied_items_at_1e8_give_log_2():
    loss = rx.plackett_luce_loss(torch.tensor([[1e8, 1e8], [-1e8, -1e8]]))
    torch.testing.assert_close(loss, torch.full((2,), math.log(2.0)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_wide_score_gaps_stay_exact(dtype):
    # items hundreds or thousands below the row max: exp() underflows, so the cumulative sum of
    # exponentials would reach log(0); the loss takes the exact log-cumsum-exp path there
    scores = torch.tensor([[0.0, -120.0, -300.0, 5.0], [3.0, 1.0, -2000.0, -1990.0]], dtype=dtype, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    loss = rx.plackett_luce_loss(scores.masked_fill(~mask, float("nan")), mask)
    loss.sum().backward()
    ref_loss, ref_grad = float64_reference(scores, mask)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(scores.grad.double(), ref_grad.masked_fill(~mask, 0.0), rtol=0, atol=1e-6)
    assert (scores.grad[~mask] == 0).all()


def test_typical_scores_do_not_use_logcumsumexp(monkeypatch):
    # the speed: torch.logcumsumexp's backward dominated the loss; one cumsum of exp() replaces it
    # whenever every real item is within ~79 (float32) of its row max
    def refuse(*args, **kwargs):
        raise AssertionError("torch.logcumsumexp called")

    monkeypatch.setattr(torch, "logcumsumexp", refuse)
    scores = (torch.randn(16, 6) * 5 + 1e4).requires_grad_(True)
    mask = torch.arange(6)[None] < torch.randint(2, 7, (16,))[:, None]
    rx.plackett_luce_loss(scores, mask, top_m=3).sum().backward()
    rx.plackett_luce_loss(scores).sum().backward()
    assert torch.isfinite(scores.grad).all()


@pytest.mark.parametrize("junk", [float("nan"), float("inf"), float("-inf"), 1e30, -1e30], ids=str)
def test_junk_on_padding_gets_no_mass_and_no_gradient(junk):
    torch.manual_seed(2)
    scores = torch.randn(3, 5)
    lengths = [5, 2, 3]
    mask = torch.arange(5)[None] < torch.tensor(lengths)[:, None]
    padded = scores.masked_fill(~mask, junk).requires_grad_(True)
    loss = rx.plackett_luce_loss(padded, mask, top_m=torch.tensor([4, 2, 1]))
    loss.sum().backward()
    one_by_one = torch.cat([rx.plackett_luce_loss(scores[i : i + 1, :n], top_m=m) for i, (n, m)
                            in enumerate(zip(lengths, (4, 2, 1)))])
    torch.testing.assert_close(loss, one_by_one)
    assert torch.isfinite(padded.grad).all() and (padded.grad[~mask] == 0).all()


def test_half_precision_scores_are_summed_in_float32():
    # exp(-12) is below float16's smallest normal; the loss is computed in float32 and returned as float16
    scores = torch.tensor([[0.0, -12.0, 3.0]], dtype=torch.float16)
    loss = rx.plackett_luce_loss(scores)
    assert loss.dtype == torch.float16
    expected = brute_force_pl_nll(scores[0].double().tolist())
    assert math.isclose(loss.item(), expected, rel_tol=1e-3)


def test_non_finite_real_scores_are_errors_anywhere():
    for bad in (float("-inf"), float("inf")):
        with pytest.raises(ValueError, match=r"non-finite value .*inf at index \(0, 1\)"):
            rx.plackett_luce_loss(torch.tensor([[0.0, bad, 1.0]]))
        with pytest.raises(ValueError, match=r"non-finite value .*inf at index \(1, 2\)"):
            rx.plackett_luce_loss(torch.tensor([[0.0, 1.0, 2.0], [0.0, 1.0, bad]]), torch.ones(2, 3, dtype=torch.bool))


# ----------------------------------------------------------------------------- robust Plackett-Luce (arXiv 2607.01715)


def worst_permutation_loss(scores, length, top_m=None):
    """max over every order of the first `length` items of their PL loss, by enumeration (K! orders)."""
    return max(brute_force_pl_nll([scores[i] for i in order], top_m) for order in itertools.permutations(range(length)))


@pytest.mark.parametrize("top_m", [None, 2])
def test_worst_ranking_is_the_order_with_the_largest_loss_among_all_orders(top_m):
    torch.manual_seed(3)
    scores = torch.randn(5, 4, dtype=torch.float64) * 2
    lengths = [4, 3, 4, 2, 4]
    mask = torch.arange(4)[None, :] < torch.tensor(lengths)[:, None]
    order = rx.worst_ranking(scores, mask)
    worst = rx.plackett_luce_loss(scores.gather(1, order), mask=mask, top_m=top_m)
    expected = [worst_permutation_loss(row.tolist(), n, top_m) for row, n in zip(scores, lengths)]
    torch.testing.assert_close(worst, torch.tensor(expected, dtype=torch.float64))
    assert (order[~mask] >= torch.tensor(lengths)[:, None].expand(-1, 4)[~mask]).all()  # padding stays last


@pytest.mark.parametrize("rho", [0.0, 0.25, 0.9])
def test_robust_loss_and_gradient_are_the_mixture_with_the_enumerated_worst_order(rho):
    torch.manual_seed(4)
    scores = (torch.randn(6, 4, dtype=torch.float64) * 2).requires_grad_()
    loss = rx.robust_plackett_luce_loss(scores, rho)
    nominal = [brute_force_pl_nll(row.tolist()) for row in scores]
    worst = [worst_permutation_loss(row.tolist(), 4) for row in scores]
    expected = [(1 - rho) * n + rho * w for n, w in zip(nominal, worst)]
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64))
    # Danskin: the gradient of max over orders is the gradient at the maximising order (found here by enumeration)
    (grad,) = torch.autograd.grad(loss.sum(), scores)
    expected_grad = torch.zeros_like(scores)
    for b, row in enumerate(scores.detach()):
        best = max(itertools.permutations(range(4)), key=lambda o: brute_force_pl_nll([row[i].item() for i in o]))
        leaf = row.clone().requires_grad_()
        mixed = (1 - rho) * rx.plackett_luce_loss(leaf[None]) + rho * rx.plackett_luce_loss(leaf[list(best)][None])
        (expected_grad[b],) = torch.autograd.grad(mixed.sum(), leaf)
    torch.testing.assert_close(grad, expected_grad)


def test_robust_dpo_loss_at_rho_zero_is_the_plain_loss_and_rho_is_range_checked():
    torch.manual_seed(5)
    policy, ref = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(
        rx.dpo_plackett_luce_loss(policy, ref, beta=0.5, robust_rho=0.0), rx.dpo_plackett_luce_loss(policy, ref, 0.5)
    )
    robust = rx.dpo_plackett_luce_loss(policy, ref, 0.5, robust_rho=0.5)
    assert not torch.allclose(robust, rx.dpo_plackett_luce_loss(policy, ref, 0.5))
    for rho in (-0.1, 1.0):
        with pytest.raises(ValueError, match=r"rho must be in \[0, 1\)"):
            rx.robust_plackett_luce_loss(policy, rho)
