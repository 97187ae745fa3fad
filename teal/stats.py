"""Streaming histograms of activation scores on log-spaced bins.

One histogram per site (or per projection for weight-aware scores) holds counts of ``log2(score)``
on a fixed global grid, so histograms from different runs merge by addition and any quantile can
be read back without storing activations. Bin 0 collects exact zeros and underflow.
"""

from __future__ import annotations

import math

import torch

LOG2_MIN = -32.0  # 2.3e-10: smaller scores (and zeros) land in bin 0
LOG2_MAX = 24.0  # 1.7e7: larger scores land in the last bin
BINS_PER_OCTAVE = 160  # adjacent edges differ by 0.43 %
NUM_BINS = int((LOG2_MAX - LOG2_MIN) * BINS_PER_OCTAVE) + 2


def bin_edges() -> torch.Tensor:
    """Lower edge of every bin (bin 0's is 0), float64 [NUM_BINS]."""
    k = torch.arange(NUM_BINS - 1, dtype=torch.float64)
    edges = torch.exp2(LOG2_MIN + k / BINS_PER_OCTAVE)
    return torch.cat([torch.zeros(1, dtype=torch.float64), edges])


def histogram(scores: torch.Tensor) -> torch.Tensor:
    """Counts (int64, on ``scores``' device) of non-negative ``scores`` on the global grid."""
    s = scores.detach().reshape(-1).float()
    idx = (torch.log2(s) - LOG2_MIN) * BINS_PER_OCTAVE  # -inf for zeros
    idx = torch.nan_to_num(idx, nan=0.0, neginf=-1.0, posinf=NUM_BINS)
    idx = (idx.floor() + 1).clamp_(0, NUM_BINS - 1).long()
    return torch.bincount(idx, minlength=NUM_BINS)


def counts_problem(counts: torch.Tensor) -> str | None:
    """What makes ``counts`` unusable as a histogram of this grid (None if nothing): the wrong shape or bin
    count, NaN/inf, negative or fractional counts, or no counts at all."""
    if counts.dim() != 1 or counts.numel() != NUM_BINS:
        return f"has shape {tuple(counts.shape)}, not ({NUM_BINS},) bins of this teal's grid"
    c = counts.detach()
    if c.is_floating_point():
        if not bool(torch.isfinite(c).all()):
            return "has NaN or infinite counts"
        if not bool((c == c.round()).all()):
            return "has fractional counts"
    elif c.dtype == torch.bool or c.is_complex():
        return f"has dtype {c.dtype}, not integer counts"
    if bool((c < 0).any()):
        return "has negative counts"
    if not bool((c > 0).any()):
        return "is empty (no counts)"
    return None


def quantile(counts: torch.Tensor, q: float, name: str | None = None) -> float:
    """The score ``t`` with a fraction ``q`` of the counted mass at or below it.

    Inside a bin the mass is taken as spread log-uniformly, so ``t`` is interpolated
    geometrically between the bin's edges. ``name`` (the site) is named in errors.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    c = counts.detach().to("cpu", torch.float64)
    total = float(c.sum())
    if not total > 0:
        site = f" of {name!r}" if name else ""
        raise ValueError(f"empty histogram{site}: calibration saw no activations there; recalibrate with more "
                         "tokens (teal calibrate MODEL -o DIR --tokens N)")
    cum = torch.cumsum(c, 0)
    target = q * total
    b = int(torch.searchsorted(cum, torch.tensor([target], dtype=torch.float64)).item())
    b = min(b, NUM_BINS - 1)
    below = float(cum[b - 1]) if b > 0 else 0.0
    frac = 0.0 if c[b] == 0 else (target - below) / float(c[b])
    frac = min(max(frac, 0.0), 1.0)
    if b == 0:
        return frac * 2.0**LOG2_MIN
    lo = LOG2_MIN + (b - 1) / BINS_PER_OCTAVE
    return 2.0 ** (lo + frac / BINS_PER_OCTAVE)


def fraction_at_or_below(counts: torch.Tensor, t: float) -> float:
    """Fraction of the counted mass with score ``<= t`` (inverse of :func:`quantile`)."""
    c = counts.detach().to("cpu", torch.float64)
    total = float(c.sum())
    if t <= 0:
        return 0.0
    pos = (math.log2(t) - LOG2_MIN) * BINS_PER_OCTAVE + 1
    b = int(min(max(math.floor(pos), 0), NUM_BINS - 1))
    frac = min(max(pos - math.floor(pos), 0.0), 1.0)
    return (float(c[:b].sum()) + frac * float(c[b])) / total
