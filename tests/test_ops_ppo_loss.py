import math

import pytest
import torch

import rlhf_ext as rx


def test_hand_worked_single_batch():
    # two tokens of one sequence: ratio 1.5 with A = +1 (clipped at 1.2), ratio 0.5 with A = -2 (clipped at 0.8)
    logprobs = torch.log(torch.tensor([[1.5, 0.5]]))
    old = torch.zeros(1, 2)
    adv = torch.tensor([[1.0, -2.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    values, old_values, returns = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.0]]), torch.tensor([[0.0, 1.0]])
    entropy = torch.tensor([[2.0, 4.0]])
    out = rx.ppo_loss(logprobs, old, adv, mask, values=values, old_values=old_values, returns=returns, entropy=entropy,
                      clip_range=0.2, clip_range_value=0.2, vf_coef=0.1, ent_coef=0.01)
    # token 1: max(-1*1.5, -1*1.2) = -1.2 (clipped wins); token 2: max(2*0.5, 2*0.8) = 1.6 (clipped wins)
    assert math.isclose(out.policy_loss.item(), (-1.2 + 1.6) / 2, rel_tol=1e-6)
    assert out.clip_fraction.item() == 1.0
    # value token 1: V=1, clipped to 0.7, R=0: max(1, 0.49) = 1; token 2: V=0, R=1: 1 either way
    assert math.isclose(out.value_loss.item(), 0.5 * (1.0 + 1.0) / 2, rel_tol=1e-6)
    assert out.value_clip_fraction.item() == 0.0
    assert math.isclose(out.entropy.item(), 3.0)
    assert math.isclose(out.loss.item(), 0.2 + 0.1 * 0.5 - 0.01 * 3.0, rel_tol=1e-6)
    expected_kl = 0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 2
    assert math.isclose(out.approx_kl.item(), expected_kl, rel_tol=1e-6)


def cleanrl_style_loss(logprobs, old, adv, mask, values, old_values, returns, eps, eps_v, vf_coef):
    """CleanRL's ppo.py loss lines, on the real tokens only (flattened)."""
    m = mask.bool()
    ratio = (logprobs - old)[m].exp()
    a = adv[m]
    pg_loss = torch.max(-a * ratio, -a * torch.clamp(ratio, 1 - eps, 1 + eps)).mean()
    v_loss_unclipped = (values[m] - returns[m]) ** 2
    v_clipped = old_values[m] + torch.clamp(values[m] - old_values[m], -eps_v, eps_v)
    v_loss = 0.5 * torch.max(v_loss_unclipped, (v_clipped - returns[m]) ** 2).mean()
    return pg_loss + vf_coef * v_loss


def random_batch(B=4, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]
    r = lambda: torch.randn(B, T, generator=g, dtype=torch.float64)  # noqa: E731
    return dict(logprobs=r() * 0.3, old=r() * 0.3, adv=r(), mask=mask, values=r(), old_values=r(), returns=r())


def test_token_aggregation_matches_cleanrl_on_real_tokens():
    b = random_batch()
    out = rx.ppo_loss(b["logprobs"], b["old"], b["adv"], b["mask"], values=b["values"], old_values=b["old_values"],
                      returns=b["returns"], clip_range=0.2, clip_range_value=0.3, vf_coef=0.25)
    expected = cleanrl_style_loss(b["logprobs"], b["old"], b["adv"], b["mask"], b["values"], b["old_values"],
                                  b["returns"], 0.2, 0.3, 0.25)
    torch.testing.assert_close(out.loss, expected)


def test_sequence_aggregation_is_mean_of_per_sequence_means():
    b = random_batch(seed=3)
    out = rx.ppo_loss(b["logprobs"], b["old"], b["adv"], b["mask"], aggregation="sequence")
    per_seq = [
        rx.ppo_loss(b["logprobs"][i : i + 1], b["old"][i : i + 1], b["adv"][i : i + 1], b["mask"][i : i + 1]).loss
        for i in range(4)
    ]
    torch.testing.assert_close(out.loss, torch.stack(per_seq).mean())


def test_global_normalizer_makes_micro_batches_add_up_to_the_full_batch():
    b = random_batch(B=6, seed=5)
    n_tokens = b["mask"].sum()
    full = rx.ppo_loss(b["logprobs"], b["old"], b["adv"], b["mask"]).loss
    parts = sum(
        rx.ppo_loss(b["logprobs"][s], b["old"][s], b["adv"][s], b["mask"][s], normalizer=n_tokens).loss
        for s in (slice(0, 2), slice(2, 3), slice(3, 6))
    )
    torch.testing.assert_close(parts, full)


def test_padding_gets_no_gradient_and_does_not_change_the_loss():
    b = random_batch(seed=7)
    logprobs = b["logprobs"].clone().requires_grad_(True)
    values = b["values"].clone().requires_grad_(True)
    out = rx.ppo_loss(logprobs, b["old"], b["adv"], b["mask"], values=values, old_values=b["old_values"],
                      returns=b["returns"], clip_range_value=0.2)
    out.loss.backward()
    assert (logprobs.grad[~b["mask"]] == 0).all() and (values.grad[~b["mask"]] == 0).all()
    garbage = lambda x: torch.where(b["mask"], x, torch.full_like(x, 1e6))  # noqa: E731
    out2 = rx.ppo_loss(garbage(b["logprobs"]), garbage(b["old"]), garbage(b["adv"]), b["mask"],
                       values=garbage(b["values"]), old_values=garbage(b["old_values"]), returns=garbage(b["returns"]),
                       clip_range_value=0.2)
    torch.testing.assert_close(out2.loss, out.loss.detach())


def test_gradcheck_float64():
    b = random_batch(B=2, T=3, seed=11)

    def f(lp, v, ent):
        return rx.ppo_loss(lp, b["old"], b["adv"], b["mask"], values=v, old_values=b["old_values"],
                           returns=b["returns"], entropy=ent, clip_range_value=0.5, ent_coef=0.1).loss

    inputs = (
        b["logprobs"].clone().requires_grad_(),
        b["values"].clone().requires_grad_(),
        torch.rand(2, 3, dtype=torch.float64, requires_grad=True),
    )
    assert torch.autograd.gradcheck(f, inputs)


def test_positive_entropy_coefficient_raises_entropy():
    logits = torch.randn(1, 3, 5, requires_grad=True)
    mask = torch.ones(1, 3, dtype=torch.bool)
    tokens = torch.zeros(1, 3, dtype=torch.long)
    logp = rx.selective_log_softmax(logits, tokens)
    entropy = rx.entropy_from_logits(logits)
    out = rx.ppo_loss(logp, logp.detach(), torch.zeros(1, 3), mask, entropy=entropy, ent_coef=1.0)
    out.loss.backward()
    with torch.no_grad():
        stepped = logits - 0.1 * logits.grad
    assert rx.entropy_from_logits(stepped).mean() > entropy.mean()


def test_bad_inputs():
    b = random_batch()
    with pytest.raises(ValueError, match="returns"):
        rx.ppo_loss(b["logprobs"], b["old"], b["adv"], b["mask"], values=b["values"])
    with pytest.raises(ValueError, match="needs old_values"):
        rx.ppo_loss(
            b["logprobs"], b["old"], b["adv"], b["mask"], values=b["values"], returns=b["returns"], clip_range_value=0.2
        )
    with pytest.raises(ValueError, match="aggregation must be one of"):
        rx.ppo_loss(b["logprobs"], b["old"], b["adv"], b["mask"], aggregation="batch")
    with pytest.raises(ValueError, match="advantages has shape"):
        rx.ppo_loss(b["logprobs"], b["old"], b["adv"][:, :3], b["mask"])
    with pytest.raises(ValueError, match="clip ranges must be positive"):
        rx.ppo_loss(b["logprobs"], b["old"], b["adv"], b["mask"], clip_range=0.0)


def test_non_positive_normalizer_is_an_error():
    b = random_batch()
    with pytest.raises(ValueError, match="normalizer must be positive"):
        rx.ppo_loss(b["logprobs"], b["old"], b["adv"], b["mask"], normalizer=0)


JUNK = [float("nan"), float("inf"), float("-inf"), -1e6, 1e6]
INPUTS = ("logprobs", "old", "adv", "values", "old_values", "returns", "entropy")


def batch_with_junk_columns(junk, junk_in, seed=13, B=4, T=5, extra=3):
    """A B x T batch with clean (0) padding, and the same batch with `extra` more columns, all padding,
    where every padding entry (the original padding included) of the inputs `junk_in` holds `junk`."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([T, 2, 4, 1])[:B]
    mask = torch.arange(T)[None] < lengths[:, None]
    r = lambda scale=1.0: torch.randn(B, T, generator=g) * scale  # noqa: E731
    clean = dict(logprobs=r(0.3) - 1, old=r(0.3) - 1, adv=r(), values=r(), old_values=r(), returns=r(),
                 entropy=r().abs())
    clean = {k: v.masked_fill(~mask, 0.0) for k, v in clean.items()}
    wide_mask = torch.cat([mask, torch.zeros(B, extra, dtype=torch.bool)], dim=1)
    wide = {k: torch.cat([v, torch.zeros(B, extra)], dim=1) for k, v in clean.items()}
    wide = {k: v.masked_fill(~wide_mask, junk) if k in junk_in else v for k, v in wide.items()}
    return (clean, mask), (wide, wide_mask)


def loss_and_grads(b, mask, aggregation):
    leaves = {k: b[k].clone().requires_grad_(True) for k in ("logprobs", "values", "entropy")}
    out = rx.ppo_loss(leaves["logprobs"], b["old"], b["adv"], mask, values=leaves["values"],
                      old_values=b["old_values"], returns=b["returns"], entropy=leaves["entropy"],
                      clip_range_value=0.2, ent_coef=0.01, aggregation=aggregation)
    out.loss.backward()
    return out, {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("junk_in", [*INPUTS, "all"])
@pytest.mark.parametrize("junk", JUNK, ids=str)
def test_junk_on_padding_changes_neither_loss_nor_gradients(junk, junk_in):
    # e.g. old_logprobs of -1e6 on padding: exp(0 + 1e6) = inf, and 0 * inf = NaN in the backward pass
    (clean, mask), (wide, wide_mask) = batch_with_junk_columns(junk, INPUTS if junk_in == "all" else (junk_in,))
    T = mask.shape[1]
    for aggregation in ("token", "sequence"):
        out, grads = loss_and_grads(clean, mask, aggregation)
        wide_out, wide_grads = loss_and_grads(wide, wide_mask, aggregation)
        for field in ("loss", "policy_loss", "value_loss", "entropy", "clip_fraction", "value_clip_fraction",
                      "approx_kl"):
            torch.testing.assert_close(getattr(wide_out, field), getattr(out, field), rtol=0, atol=0, msg=field)
        for name, grad in wide_grads.items():
            assert torch.isfinite(grad).all(), name
            torch.testing.assert_close(grad[:, :T], grads[name], rtol=0, atol=0, msg=name)
            assert (grad[~wide_mask] == 0).all(), name


def test_minus_inf_old_logprob_on_padding_gives_a_finite_gradient():
    # the repro: NaN in the last entry of the gradient before the fix
    logprobs = torch.tensor([[-1.0, -2.0, 0.0]], requires_grad=True)
    out = rx.ppo_loss(logprobs, torch.tensor([[-1.1, -1.9, float("-inf")]]), torch.tensor([[1.0, -1.0, 0.0]]),
                      torch.tensor([[True, True, False]]))
    out.loss.backward()
    assert logprobs.grad[0, 2] == 0 and torch.isfinite(logprobs.grad).all()


@pytest.mark.parametrize("advantage", [1.0, -1.0])
@pytest.mark.parametrize("log_ratio", [100.0, -100.0, 30.0])
def test_huge_log_ratio_gives_a_finite_loss_and_gradient(log_ratio, advantage):
    # float32 exp overflows past a log ratio of ~88.7; the ratio is clamped at e^20 like verl's
    logprobs = torch.tensor([[log_ratio - 5.0, -1.0]], requires_grad=True)
    old = torch.tensor([[-5.0, -1.2]])
    adv = torch.tensor([[advantage, 1.0]])
    out = rx.ppo_loss(logprobs, old, adv, torch.ones(1, 2, dtype=torch.bool), clip_range=0.2)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(logprobs.grad).all()
    # the clamped token gets gradient 0; its loss term is the clipped one or |A| e^(+-20)
    assert logprobs.grad[0, 0] == 0
    ratio = math.exp(max(-20.0, min(20.0, log_ratio)))
    token = max(-advantage * ratio, -advantage * min(max(ratio, 0.8), 1.2))
    second = -1.0 * min(math.exp(0.2), 1.2)
    assert math.isclose(out.loss.item(), (token + second) / 2, rel_tol=1e-6)
    # the other token is untouched: d/dlogprob of -A * 1.2 (clipped: ratio e^0.2 > 1.2) is 0
    assert logprobs.grad[0, 1] == 0


def test_log_ratio_within_20_is_not_clamped():
    logprobs = torch.tensor([[19.5, -19.5]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([[-1.0, 1.0]], dtype=torch.float64)  # the unclipped term is the larger for both
    out = rx.ppo_loss(logprobs, torch.zeros(1, 2, dtype=torch.float64), adv, torch.ones(1, 2, dtype=torch.bool))
    out.loss.backward()
    expected_grad = torch.tensor([[math.exp(19.5), -math.exp(-19.5)]], dtype=torch.float64) / 2
    torch.testing.assert_close(logprobs.grad, expected_grad)


def test_value_clip_fraction_is_not_fooled_by_float32_rounding():
    # |V - V_old| < 0.19 < eps_v: nothing is clipped, yet V_old + (V - V_old) is often an ulp off V in
    # float32, and its squared error to R then came out larger: 5.8% of these tokens counted as clipped
    g = torch.Generator().manual_seed(0)
    n = 4096
    values = torch.rand(1, n, generator=g) * 0.02 - 0.01
    old_values = values + (torch.rand(1, n, generator=g) * 0.38 - 0.19)
    returns = torch.rand(1, n, generator=g) * 2 - 1
    zeros, mask = torch.zeros(1, n), torch.ones(1, n, dtype=torch.bool)
    out = rx.ppo_loss(zeros, zeros, zeros, mask, values=values, old_values=old_values, returns=returns,
                      clip_range_value=0.2)
    assert out.value_clip_fraction.item() == 0.0
    torch.testing.assert_close(out.value_loss, 0.5 * ((values - returns) ** 2).mean())
    # one such token by hand
    one = lambda x: torch.tensor([[x]])  # noqa: E731
    out = rx.ppo_loss(one(0.0), one(0.0), one(0.0), torch.ones(1, 1, dtype=torch.bool),
                      values=one(0.005364435724914074), old_values=one(0.1280031055212021),
                      returns=one(0.03574550151824951), clip_range_value=0.2)
    assert out.value_clip_fraction.item() == 0.0


def test_value_clip_fraction_counts_tokens_whose_clipped_term_wins():
    # V = 1 moved 0.5 from V_old = 0.5, clipped to 0.7: against R = 2 the clipped error 1.3^2 > 1^2 wins,
    # against R = 0 the unclipped 1^2 > 0.7^2 does
    values, old_values = torch.tensor([[1.0, 1.0]]), torch.tensor([[0.5, 0.5]])
    zeros, mask = torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool)
    out = rx.ppo_loss(zeros, zeros, zeros, mask, values=values, old_values=old_values,
                      returns=torch.tensor([[2.0, 0.0]]), clip_range_value=0.2)
    assert out.value_clip_fraction.item() == 0.5
    assert math.isclose(out.value_loss.item(), 0.5 * (1.3**2 + 1.0) / 2, rel_tol=1e-6)
