import pytest
import torch

import rlhf_ext as rx


@pytest.mark.parametrize("chunk_size", [1, 3, 256])
def test_selective_log_softmax_and_entropy_match_full_softmax(chunk_size):
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 11, dtype=torch.float64) * 3
    tokens = torch.randint(0, 11, (2, 7))
    logp_full = torch.log_softmax(logits, dim=-1)
    expected_logp = logp_full.gather(-1, tokens[..., None]).squeeze(-1)
    expected_entropy = -(logp_full.exp() * logp_full).sum(-1)
    torch.testing.assert_close(rx.selective_log_softmax(logits, tokens, chunk_size=chunk_size), expected_logp)
    torch.testing.assert_close(rx.entropy_from_logits(logits, chunk_size=chunk_size), expected_entropy)


def test_bf16_logits_come_back_in_float32():
    logits = torch.randn(1, 4, 8).bfloat16()
    assert rx.selective_log_softmax(logits, torch.zeros(1, 4, dtype=torch.long)).dtype == torch.float32
    assert rx.entropy_from_logits(logits).dtype == torch.float32


def test_uniform_logits_have_log_vocab_entropy():
    torch.testing.assert_close(
        rx.entropy_from_logits(torch.zeros(1, 2, 50)), torch.full((1, 2), torch.log(torch.tensor(50.0)).item())
    )


def test_gradients_match_the_unchunked_computation():
    logits = torch.randn(2, 5, 6, requires_grad=True)
    tokens = torch.randint(0, 6, (2, 5))
    (
        rx.selective_log_softmax(logits, tokens, chunk_size=2).sum()
        + rx.entropy_from_logits(logits, chunk_size=2).sum()
    ).backward()
    chunked = logits.grad.clone()
    logits.grad = None
    logp = torch.log_softmax(logits, -1)
    (logp.gather(-1, tokens[..., None]).sum() - (logp.exp() * logp).sum()).backward()
    torch.testing.assert_close(chunked, logits.grad)


def test_bad_inputs():
    with pytest.raises(ValueError, match="index has shape"):
        rx.selective_log_softmax(torch.zeros(1, 3, 4), torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        rx.entropy_from_logits(torch.zeros(1, 3, 4), chunk_size=0)


def test_entropy_ignores_masked_out_vocabulary_entries():
    logits = torch.tensor([[[0.0, 0.0, float("-inf")]]])
    torch.testing.assert_close(rx.entropy_from_logits(logits), torch.log(torch.tensor([[2.0]])))
