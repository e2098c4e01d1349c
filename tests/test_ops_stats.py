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


def _whiten_share(rank: int, world: int, init_file: str, x, mask, out_file: str) -> None:
    """One process of `test_whitening_over_processes_equals_one_process_on_the_whole_batch`: whiten its rows, with
    and without the mean shift."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    rows = slice(rank * len(x) // world, (rank + 1) * len(x) // world)

    def reduce(t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    whitened = [rx.masked_whiten(x[rows], mask[rows], shift_mean=shift, reduce=reduce) for shift in (True, False)]
    torch.save(whitened, f"{out_file}.{rank}")
    dist.destroy_process_group()


def test_whitening_over_processes_equals_one_process_on_the_whole_batch(tmp_path):
    generator = torch.Generator().manual_seed(0)
    x = 3.0 + 2.0 * torch.randn(6, 5, generator=generator)
    mask = torch.rand(6, 5, generator=generator) > 0.3
    mask[4:] = False  # rows without a real token (the second process's last two) count for nothing
    out = str(tmp_path / "share")
    torch.multiprocessing.spawn(_whiten_share, args=(2, str(tmp_path / "init"), x, mask, out), nprocs=2, join=True)
    shares = [torch.load(f"{out}.{rank}") for rank in range(2)]
    for i, shift_mean in enumerate((True, False)):
        expected = rx.masked_whiten(x, mask, shift_mean=shift_mean)
        torch.testing.assert_close(torch.cat([share[i] for share in shares]), expected, atol=1e-6, rtol=1e-5)
    local = torch.cat([rx.masked_whiten(x[:3], mask[:3]), rx.masked_whiten(x[3:], mask[3:])])
    # each process's own statistics differ: the check is not vacuous
    assert (local - rx.masked_whiten(x, mask)).abs().max() > 1e-2


def test_whitening_over_processes_without_a_spread_leaves_the_values():
    x, mask = torch.tensor([[2.0, 5.0]]), torch.tensor([[True, False]])
    got = rx.masked_whiten(x, mask, reduce=lambda t: t)  # one real value in all: nothing to divide by
    assert got.tolist() == [[2.0, 0.0]]
