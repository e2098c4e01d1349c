import pytest
import torch

import rlhf_ext as rx


def test_masked_mean_var_match_the_real_values():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, -50.0, -50.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    real = torch.tensor([1.0, 2.0, 3.0])
    assert rx.masked_mean(x, mask).item() == pytest.approx(real.mean().item())
    assert rx.masked_var(x, mask).item() == pytest.approx(real.var(unbiased=True).item())
    assert rx.masked_var(x, mask, unbiased=False).item() == pytest.approx(real.var(unbiased=False).item())
    torch.testing.assert_close(rx.masked_mean(x, mask, dim=1), torch.tensor([1.5, 3.0]))


def test_masked_whiten():
    x = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    w = rx.masked_whiten(x, mask)
    real = torch.tensor([1.0, 2.0, 3.0])
    expected = (real - real.mean()) / real.std()
    torch.testing.assert_close(w[mask], expected, rtol=1e-5, atol=1e-5)
    assert (w[~mask] == 0).all()
    kept = rx.masked_whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(kept[mask], expected + 2.0, rtol=1e-5, atol=1e-5)


def test_unbiased_variance_of_one_value_is_an_error():
    with pytest.raises(ValueError, match="at least 2 real values"):
        rx.masked_var(torch.ones(1, 2), torch.tensor([[True, False]]))
