"""The Triton entries as their callers call them (the tuned-table configuration, both regimes, the GLU entry,
the dense fallback), run by Triton's CPU interpreter and compared exactly with the reference.

On the CPU the ``teal::sparse_linear`` op always runs ``sparse_linear_reference``, so a test through the op
compares the reference with itself; these call ``sparse_linear_triton`` / ``sparse_linear_glu_triton`` /
``dense_masked_linear`` directly. The inputs are exactly representable (levels of 0.5, small integer
weights, fp16 sums below 2^11 halves), so every kernel result must equal the reference bit for bit: a launch
that returns zeros, drops a segment, or applies another segment's or a shifted threshold fails.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported (teal.kernels imports it lazily)

import pytest
import torch

from teal.kernels import dense_masked_linear, path_counts, silu_mul, sparse_linear_reference, sparse_linear_triton
from teal.kernels.configs import REGIMES
from teal.kernels.ops import sparse_linear_glu_reference, sparse_linear_glu_triton

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 set before Triton is imported"
)

K = 72
SPLITS = [24, 16, 8, 40, 16]  # five segments: two launches (at most 4 segments each)
THRESHOLDS = [1.0, 1.5, 0.5, 2.0, 1.0]  # each a level of the data: ties must be dropped


def _exact_inputs(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x entries in ±{0.5, 1, 1.5, 2, 2.5}, w_t entries in {-2..2}: every sum is exact in fp16."""
    gen = torch.Generator().manual_seed(seed)
    levels = torch.tensor([0.5, 1.0, 1.5, 2.0, 2.5])
    signs = torch.where(torch.rand(batch, K, generator=gen) < 0.5, -1.0, 1.0)
    x = (levels[torch.randint(0, 5, (batch, K), generator=gen)] * signs).to(torch.float16)
    w_t = torch.randint(-2, 3, (K, sum(SPLITS)), generator=gen).to(torch.float16)
    return x, w_t


def _expected(x, w_t, thr, splits=SPLITS):
    ref = sparse_linear_reference(x, w_t, thr, splits, compute_dtype=torch.float64)
    # the thresholds matter: each segment's output differs from the unthresholded product
    dense = sparse_linear_reference(x, w_t, torch.full_like(thr, float("-inf")), splits, compute_dtype=torch.float64)
    start = 0
    for j, width in enumerate(splits):
        assert not torch.equal(ref[:, start : start + width], dense[:, start : start + width]), j
        start += width
    return ref


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("batch", [1, 3, 8, 9])  # 9: over MAX_KERNEL_BATCH, the dense fallback
def test_sparse_linear_triton_with_table_config_is_exact(regime, batch):
    x, w_t = _exact_inputs(batch, seed=batch)
    thr = torch.tensor(THRESHOLDS)
    expected = _expected(x, w_t, thr)
    before = sum(path_counts.values())
    out = torch.full((batch, sum(SPLITS)), float("nan"), dtype=torch.float16)
    got = sparse_linear_triton(x, w_t, thr, SPLITS, regime=regime, out=out)
    assert sum(path_counts.values()) == before + 1  # one call of the Triton entry, whichever path
    assert got is out
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # and with a fresh output, as the op allocates it
    torch.testing.assert_close(sparse_linear_triton(x, w_t, thr, SPLITS, regime=regime), expected, rtol=0, atol=0)


@pytest.mark.parametrize("batch", [1, 5])
def test_dense_masked_linear_is_exact(batch):
    x, w_t = _exact_inputs(batch, seed=20 + batch)
    thr = torch.tensor(THRESHOLDS)
    torch.testing.assert_close(dense_masked_linear(x, w_t, thr, SPLITS, None), _expected(x, w_t, thr), rtol=0, atol=0)


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("batch", [1, 3])  # 1: SiLU inside the kernel; 3: SiLU first, then the kernel
def test_sparse_linear_glu_triton_with_table_config(regime, batch):
    gen = torch.Generator().manual_seed(30 + batch)
    gate_up = (2 * torch.randn(batch, 2 * K, generator=gen)).to(torch.float16)
    w_t = torch.randn(K, 56, generator=gen).to(torch.float16)
    mid = silu_mul(gate_up)
    thr = torch.tensor([float(torch.quantile(mid.abs().float().flatten(), 0.5))])
    ref = sparse_linear_glu_reference(gate_up, w_t, thr, compute_dtype=torch.float64, out_dtype=torch.float64)
    got = sparse_linear_glu_triton(gate_up, w_t, thr, regime=regime)
    err = float((got.double() - ref).norm() / ref.norm())
    assert err <= 2e-3, err
    # a threshold 10 % off zeroes other entries: far outside that tolerance
    shifted = sparse_linear_glu_reference(gate_up, w_t, thr * 1.1, compute_dtype=torch.float64, out_dtype=torch.float64)
    assert float((shifted - ref).norm() / ref.norm()) > 10 * 2e-3
