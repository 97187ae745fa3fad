"""Offline tuning of the sparse GEMV launch configurations (GPU only).

``tune_shape`` times candidate configurations on rotated weight copies (so weights come from device
memory, not L2) inside CUDA graphs, at a few sparsities, and returns the best; the benchmark
(``python -m teal.bench.kernels --tune``) prints the winners as entries for ``configs.TUNED``.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from teal.kernels.configs import KernelConfig, batch_bucket, heuristic_config
from teal.kernels.ops import sparse_linear_reference, sparse_linear_triton


def time_graph_us(calls: Sequence[Callable[[], object]], *, min_calls: int = 24, replays: int = 25) -> float:
    """Median device time of one call, in microseconds.

    The calls (typically the same operation on rotated buffers) are repeated to at least
    ``min_calls`` launches, captured into one CUDA graph and replayed ``replays`` times.
    """
    if not calls:
        raise ValueError("time_graph_us needs at least one call")
    sequence = list(calls) * max(1, -(-min_calls // len(calls)))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in sequence:
            call()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(sequence))
    del graph
    return statistics.median(times)


def quantile_threshold(x: torch.Tensor, sparsity: float) -> float:
    """Threshold that zeroes the fraction ``sparsity`` of ``|x|`` (-inf for 0: keep everything)."""
    if sparsity <= 0:
        return float("-inf")
    values = x.detach().abs().float().flatten()
    return float(torch.quantile(values[: 1 << 24], sparsity))


def _pow2_round(value: float) -> int:
    value = max(1.0, value)
    low = 1 << (int(value).bit_length() - 1)
    return low * 2 if value / low > 1.5 else low


def candidate_configs(k: int, n: int, batch: int, sm_count: int) -> list[KernelConfig]:
    """Configurations worth timing for one shape and batch bucket (the heuristic's and dense among them)."""
    bucket = batch_bucket(batch)
    if bucket == 1:  # (block_n, block_r, warps, use_dot, compact, waves of programs per SM)
        tiles = [(128, 64, 4, False, False, w) for w in (2, 4)]
        tiles += [(128, 32, 4, False, False, 4), (64, 64, 2, False, False, 4)]
        tiles += [(128, 32, 4, False, True, w) for w in (2, 4)]
        tiles += [(256, 32, 4, False, True, 4), (128, 64, 4, False, True, 4), (64, 32, 2, False, True, 4)]
    else:
        tiles = [(128, 32, 4, True, False, w) for w in (2, 4)] + [(256, 32, 4, True, False, 4)]
        tiles += [(128, max(2, 16 // bucket), 4, False, False, 4)]
    out = [heuristic_config(k, n, batch, torch.bfloat16, sm_count), KernelConfig(dense=True)]
    for block_n, block_r, warps, use_dot, compact, waves in tiles:
        n_blocks = -(-n // block_n)
        split = _pow2_round(waves * sm_count / n_blocks)
        split = max(1, min(split, 64, max(1, k // (2 * block_r))))
        out.append(KernelConfig(block_n=block_n, block_r=block_r, split_k=split, num_warps=warps, use_dot=use_dot,
                                compact=compact))
    unique: list[KernelConfig] = []
    for cfg in out:
        if cfg not in unique:
            unique.append(cfg)
    return unique


@dataclass
class TuneResult:
    k: int
    n: int
    bucket: int
    dtype: str
    best: KernelConfig
    times_us: dict[str, list[float]]  # repr(config) -> time per sparsity
    sparsities: tuple[float, ...]


def tune_shape(
    w_ts: Sequence[torch.Tensor],
    splits: Sequence[int],
    batch: int,
    *,
    sparsities: Sequence[float] = (0.0, 0.5),
    candidates: Sequence[KernelConfig] | None = None,
    sm_count: int = 132,
) -> TuneResult:
    """Pick the candidate with the lowest mean time relative to the best at each sparsity.

    ``w_ts`` are copies of one transposed weight [K, N] (rotated so weights are not L2-resident).
    Candidates that fail the float64 check (rel err > 1e-2) are dropped.
    """
    k, n = w_ts[0].shape
    device, dtype = w_ts[0].device, w_ts[0].dtype
    cands = list(candidates or candidate_configs(k, n, batch, sm_count))
    xs = [torch.randn(batch, k, device=device, dtype=dtype) for _ in w_ts]
    thr_sets = {
        s: [torch.full((len(splits),), quantile_threshold(x, s), device=device) for x in xs] for s in sparsities
    }
    torch.cuda.synchronize()
    ok: list[KernelConfig] = []
    for cfg in cands:
        thr = thr_sets[sparsities[-1]][0]
        y = sparse_linear_triton(xs[0], w_ts[0], thr, list(splits), config=cfg)
        ref = sparse_linear_reference(xs[0], w_ts[0], thr, list(splits), compute_dtype=torch.float64,
                                      out_dtype=torch.float64)
        err = float((y.double() - ref).norm() / ref.norm().clamp_min(1e-30))
        if err <= 1e-2 and not bool(y.isnan().any()):
            ok.append(cfg)
    if not ok:
        raise RuntimeError(f"no candidate configuration passed the correctness check for K={k}, N={n}, B={batch}")
    times: dict[str, list[float]] = {}
    for cfg in ok:
        row = []
        for s in sparsities:
            calls = [
                (lambda x=x, w=w, t=t, c=cfg: sparse_linear_triton(x, w, t, list(splits), config=c))
                for x, w, t in zip(xs, w_ts, thr_sets[s])
            ]
            row.append(time_graph_us(calls))
        times[repr(cfg)] = row
    best_per_s = [min(times[repr(c)][i] for c in ok) for i in range(len(sparsities))]
    score = {repr(c): sum(t / b for t, b in zip(times[repr(c)], best_per_s)) for c in ok}
    best = min(ok, key=lambda c: score[repr(c)])
    return TuneResult(k, n, batch_bucket(batch), "bf16" if dtype == torch.bfloat16 else str(dtype),
                      best, times, tuple(sparsities))


def table_entry(result: TuneResult) -> str:
    """One line of Python for ``configs.TUNED``."""
    c = result.best
    return (
        f"    ({result.k}, {result.n}, {result.bucket}, {result.dtype!r}): KernelConfig("
        f"block_n={c.block_n}, block_r={c.block_r}, split_k={c.split_k}, num_warps={c.num_warps}, "
        f"num_stages={c.num_stages}, use_dot={c.use_dot}, dense={c.dense}, compact={c.compact}),"
    )
