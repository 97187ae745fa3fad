"""Where one call of the CUDA sparse GEMV spends its time, from the timeline the kernel writes itself.

The ``STAMPS`` build of ``sparse_gemv.cu`` (``teal.kernels.cuda.launch(..., stamps=buf)``) stores %globaltimer
at each stage boundary: per program one row per warp (start, waited, listed, first, streamed) and one for the
program (SM id, met, summed, clustered, end); ``teal.kernels.cuda.STAMP_FIELDS`` names them. Here those rows
become a program's stage boundaries (a warp stage ends when the program's last warp ends it, since the
program moves on at its barrier only then) and durations, summarised across the programs of a call and across
the calls of a timed sequence. Pure tensor arithmetic: runs on the CPU on stamps copied off the GPU.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import Any

import torch

from teal.kernels.cuda import STAMP_FIELDS

WARP_FIELDS = STAMP_FIELDS["warp"]
PROGRAM_FIELDS = STAMP_FIELDS["program"]

#: (stage, from boundary, to boundary), in the order the kernel runs them; the durations add up to a
#: program's end - start.
STAGES: tuple[tuple[str, str, str], ...] = (
    ("wait", "start", "waited"),          # griddepcontrol.wait: the previous kernel's end (PDL)
    ("list", "waited", "listed"),         # input read, threshold (SiLU·up for down), survivor lists
    ("first load", "listed", "first"),    # the first weight step's loads issued and the first one back
    ("stream", "first", "streamed"),      # the rest of the weight loop
    ("warps meet", "streamed", "met"),    # barrier after the loop (the last warp is already in `streamed`)
    ("warp sums", "met", "summed"),       # the warps' sums added in shared memory
    ("cluster wait", "summed", "clustered"),  # the cluster's other programs' partial sums ready
    ("split-K + store", "clustered", "end"),  # the partial sums added over DSMEM, stored, last barrier
)


def program_boundaries(stamps: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per program, int64 ns: ``start`` (its first warp's start), each warp stage's end as the latest warp's
    (``waited``, ``listed``, ``first``, ``streamed``), the program's own ``met``, ``summed``, ``clustered``,
    ``end``, and ``sm``. ``stamps``: [programs, warps + 1, 5] of one call."""
    stamps = stamps.to(torch.int64)
    warps, program = stamps[:, :-1, :], stamps[:, -1, :]
    out = {"start": warps[:, :, WARP_FIELDS.index("start")].min(dim=1).values}
    for name in WARP_FIELDS[1:]:
        out[name] = warps[:, :, WARP_FIELDS.index(name)].max(dim=1).values
    for name in PROGRAM_FIELDS:
        out[name] = program[:, PROGRAM_FIELDS.index(name)]
    return out


def monotone(stamps: torch.Tensor) -> torch.Tensor:
    """Per program: whether every warp's stamps ascend (start <= waited <= listed <= first <= streamed), none is
    zero (the first-load stamp is 0 when its read could not wait on the load), warp 0's ``streamed`` is at
    most the program's ``met`` (both read by thread 0), and met <= summed <= clustered <= end.

    Only reads of one thread are compared: across warps of one program the timer is not consistent to a
    microsecond. On an H100 the program's ``met`` (thread 0, after the barrier that every warp's ``streamed``
    precedes in the SASS) was a median 1.18 µs *before* the latest warp's ``streamed`` (down, s = 0.5,
    `benchmarks/results/2026-12-07-h100-gemv-stages-llama-3-8b-cross-warp-check-failed.json`), so stage
    boundaries taken as the latest warp's are uncertain by about that much."""
    stamps = stamps.to(torch.int64)
    warps, program = stamps[:, :-1, :], stamps[:, -1, 1:]
    ok = (warps > 0).all(dim=(1, 2)) & (program > 0).all(dim=1)
    ok &= (warps.diff(dim=2) >= 0).all(dim=(1, 2))
    ok &= warps[:, 0, -1] <= program[:, 0]
    ok &= (program.diff(dim=1) >= 0).all(dim=1)
    return ok


def _us(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.float64) / 1e3


def _spread(values_us: torch.Tensor) -> dict[str, float]:
    q = torch.quantile(values_us, torch.tensor([0.5, 0.9], dtype=torch.float64))
    return {"median_us": float(q[0]), "p90_us": float(q[1]), "max_us": float(values_us.max())}


def call_account(stamps: torch.Tensor, previous_end_ns: int | None = None) -> dict[str, Any]:
    """One call's timeline (``stamps`` [programs, warps + 1, 5]): per stage the median / p90 / max over programs
    (µs); the spread of program starts (last start - first start) and the end tail (last end - median end); a
    program's own duration; the spread of its warps' loop ends (last - first warp, the imbalance the
    ``warps meet`` barrier absorbs); the call's span (last end - first start); and with ``previous_end_ns``
    (the previous call's last end) its ``period_us`` (last end - that: the call's share of a back-to-back
    sequence, what a CUDA-graph time per call measures) and ``first_start_after_previous_us`` (negative: its
    first programs launched before the previous call ended, PDL)."""
    b = program_boundaries(stamps)
    stages = {name: _spread(_us(b[hi] - b[lo])) for name, lo, hi in STAGES}
    warp_ends = stamps[:, :-1, WARP_FIELDS.index("streamed")].to(torch.int64)
    base = int(b["start"].min())  # times from the call's first start: ns since the epoch lose ns in float64
    end, start = b["end"] - base, b["start"] - base
    out: dict[str, Any] = {
        "programs": int(stamps.shape[0]),
        "sms": int(b["sm"].unique().numel()),
        "stages": stages,
        "program_us": _spread(_us(end - start)),
        "warp_loop_end_spread": _spread(_us(warp_ends.max(dim=1).values - warp_ends.min(dim=1).values)),
        "start_spread_us": float(_us(start.max() - start.min())),
        "end_tail_us": float(_us(end.max()) - torch.quantile(_us(end), 0.5)),
        "span_us": float(_us(end.max() - start.min())),
        "monotone_programs": int(monotone(stamps).sum()),
    }
    if previous_end_ns is not None:
        out["period_us"] = float(_us(end.max() + base - previous_end_ns))
        out["first_start_after_previous_us"] = (base - previous_end_ns) / 1e3
    return out


def _median_of(accounts: list[Mapping[str, Any]]) -> dict[str, Any]:
    """The median of every number over ``accounts`` (same nesting)."""
    out: dict[str, Any] = {}
    for key, value in accounts[0].items():
        if isinstance(value, Mapping):
            out[key] = _median_of([a[key] for a in accounts])
        else:
            out[key] = statistics.median(a[key] for a in accounts)
    return out


def sequence_account(stamps: torch.Tensor) -> dict[str, Any]:
    """Calls 1.. of a back-to-back sequence (``stamps`` [calls, programs, warps + 1, 5], in launch order): each
    call's ``call_account`` against the call before it, and the median of every number over them (call 0 has
    no predecessor in the sequence and is left out). ``timer_step_ns``: the smallest step between distinct
    stamp values, the timer's resolution at most (32 ns on the H100 in earlier runs)."""
    if stamps.dim() != 4 or stamps.shape[0] < 2:
        raise ValueError(f"sequence_account needs stamps [calls >= 2, programs, warps + 1, 5], got {tuple(stamps.shape)}")
    ends = [int(program_boundaries(s)["end"].max()) for s in stamps]
    calls = [call_account(stamps[c], ends[c - 1]) for c in range(1, stamps.shape[0])]
    times = torch.cat([stamps[:, :, :-1, :].reshape(-1), stamps[:, :, -1, 1:].reshape(-1)]).unique()
    steps = times.diff()
    steps = steps[steps > 0]
    return {"calls": len(calls), "median": _median_of(calls),
            "timer_step_ns": int(steps.min()) if steps.numel() else None,
            "all_monotone": all(c["monotone_programs"] == c["programs"] for c in calls)}
