import math

import pytest
import torch

from teal import stats


def test_quantile_reproduces_fraction_on_heavy_tailed_data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200_000, generator=g) * torch.exp(torch.randn(200_000, generator=g))
    h = stats.histogram(x.abs())
    assert int(h.sum()) == x.numel()
    for q in (0.0, 0.01, 0.25, 0.5, 0.65, 0.9, 0.95, 0.99):
        t = stats.quantile(h, q)
        got = float((x.abs() <= t).float().mean())
        assert abs(got - q) < 0.002, (q, got)
        assert abs(stats.fraction_at_or_below(h, t) - q) < 1e-6 or q == 0.0


def test_histograms_merge_by_addition():
    a, b = torch.rand(1000), torch.rand(3000) * 5
    assert torch.equal(stats.histogram(a) + stats.histogram(b), stats.histogram(torch.cat([a, b])))


def test_zeros_and_extremes_are_counted():
    x = torch.tensor([0.0, 0.0, 1e-30, 1e30, float("inf"), 1.0])
    h = stats.histogram(x)
    assert int(h.sum()) == 6
    assert int(h[0]) == 3  # zeros and underflow
    assert int(h[-1]) == 2  # overflow and inf


def test_quantile_errors():
    with pytest.raises(ValueError, match="quantile must be in"):
        stats.quantile(stats.histogram(torch.rand(10)), 1.5)
    with pytest.raises(ValueError, match="empty histogram"):
        stats.quantile(torch.zeros(stats.NUM_BINS, dtype=torch.long), 0.5)


def test_bin_edges_are_geometric():
    e = stats.bin_edges()
    assert e.shape == (stats.NUM_BINS,)
    ratio = e[2:] / e[1:-1]
    assert torch.allclose(ratio, torch.full_like(ratio, 2 ** (1 / stats.BINS_PER_OCTAVE)))
    assert math.isclose(float(e[1]), 2**stats.LOG2_MIN)
