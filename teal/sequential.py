"""Sequential-calibration tables: the threshold quantile each projection needs at each level.

Thresholds read from dense-activation histograms zero more (or fewer) entries than asked once the
model is sparsified, because every sparsified projection changes the activations downstream of it
(a sparse ``up`` shrinks ``down``'s input, a sparse layer changes the next one's). Sequential
calibration (``teal.calibrate.calibrate_sequential``) measures, for a grid of effective levels and
one allocation, the histogram each site has when every projection before it already runs at its
target, and takes the threshold there. The table keeps that threshold as its quantile ``q`` in the
site's *dense* histogram, so that the artifact still derives a threshold for any level from its
histograms: at level ``L`` a projection whose allocation asks for ``s`` gets the dense quantile
``s + d``, where the offset ``d = q - s`` is interpolated linearly between the grid levels (``d = 0``
at level 0; beyond the last grid level the last offset is kept).

A table, as stored in the artifact config under ``"sequential"`` (one per allocation method):
``{"levels": [L_1 < ... < L_n], "quantiles": {projection: [q at L_1, ..., q at L_n]}, ...}``
plus provenance (tokens, data, seconds, sparsity measured on the calibration text).
"""

from __future__ import annotations

import bisect
import math
from typing import Any

CALIBRATIONS = ("sequential", "dense")


def check_calibration(calibration: str | None) -> str | None:
    if calibration is not None and calibration not in CALIBRATIONS:
        raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {calibration!r}")
    return calibration


def check_table(table: Any, projections: list[str], where: str) -> None:
    """Raise ValueError naming ``where`` unless ``table`` is a well-formed sequential table."""
    if not isinstance(table, dict) or "levels" not in table or "quantiles" not in table:
        raise ValueError(f"{where}: a sequential table needs 'levels' and 'quantiles'")
    levels = table["levels"]
    if (not isinstance(levels, list) or not levels
            or not all(isinstance(v, (int, float)) and 0 < v < 1 for v in levels)
            or any(b <= a for a, b in zip(levels, levels[1:]))):
        raise ValueError(f"{where}: levels must be increasing numbers in (0, 1), got {levels!r}")
    quantiles = table["quantiles"]
    missing = set(projections) - set(quantiles) if isinstance(quantiles, dict) else set(projections)
    if missing:
        raise ValueError(f"{where}: no quantiles for {sorted(missing)[:3]}")
    for p in projections:
        row = quantiles[p]
        if (not isinstance(row, list) or len(row) != len(levels)
                or not all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in row)):
            raise ValueError(f"{where}: quantiles of {p!r} must be {len(levels)} numbers in [0, 1]")


def offset(table: dict[str, Any], proj: str, level: float, nominal_at: list[float]) -> float:
    """Quantile offset ``d`` of ``proj`` at effective ``level`` (see the module docstring).

    ``nominal_at[j]``: the sparsity the allocation gives ``proj`` at grid level ``j``.
    """
    levels = table["levels"]
    row = table["quantiles"][proj]
    d = [q - s for q, s in zip(row, nominal_at)]
    if level >= levels[-1]:
        return d[-1]
    j = bisect.bisect_right(levels, level)  # levels[j-1] <= level < levels[j]
    lo_level, lo_d = (0.0, 0.0) if j == 0 else (levels[j - 1], d[j - 1])
    w = (level - lo_level) / (levels[j] - lo_level)
    return (1 - w) * lo_d + w * d[j]


def corrected_quantile(s: float, d: float, cap: float) -> float:
    """The dense-histogram quantile for nominal ``s`` with offset ``d`` (0 stays 0: dense)."""
    if s <= 0.0 or math.isnan(s):
        return 0.0
    return min(max(s + d, 0.0), cap)
