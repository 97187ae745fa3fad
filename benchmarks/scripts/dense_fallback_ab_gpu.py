"""The masked dense fallback of `sparse_linear` at 2-8 rows: today's stacked product against one product per
segment, and cuBLAS's unmasked product, timed in CUDA graphs (weights rotated past L2).

    PYTHONPATH=. python3 benchmarks/scripts/dense_fallback_ab_gpu.py --json OUT.json

- stacked (`ops.dense_masked_linear`): one masking launch writes [S*B, K], one [S*B, K] @ [K, N] product,
  then the S diagonal blocks are gathered (one cat);
- per segment: the same masking launch, then segment j's rows times w_t's columns of segment j (S products
  on column views, no copy of the weights), then one cat;
- cublas: x @ w_t unmasked (what "dense" costs without thresholds).
Both masked variants are checked against the float64 reference first. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any, Callable

import torch
from _gpu_run import run_info  # noqa: E402 (benchmarks/scripts is on sys.path when run as a script)

from teal.bench.decode import write_json
from teal.kernels import ops, sparse_linear_reference

SHAPES = {
    "llama-3-8b qkv": (4096, [4096, 1024, 1024]),
    "llama-3-8b gate_up": (4096, [14336, 14336]),
    "llama-2-7b qkv": (4096, [4096, 4096, 4096]),
    "llama-3-8b o": (4096, [4096]),
}


def masked(x: torch.Tensor, thr: torch.Tensor, splits: list[int]) -> torch.Tensor:
    batch, k = x.shape
    xm = torch.empty((len(splits) * batch, k), dtype=x.dtype, device=x.device)
    ops._triton_kernels().mask_input_kernel[(len(splits) * batch, -(-k // 1024))](
        x, xm, thr, thr, batch, k, HAS_SCALE=False, BLOCK_K=1024, num_warps=4)
    return xm


def per_segment(x: torch.Tensor, w_t: torch.Tensor, thr: torch.Tensor, splits: list[int]) -> torch.Tensor:
    batch = x.shape[0]
    xm = masked(x, thr, splits)
    if len(splits) == 1:
        return xm @ w_t
    parts, start = [], 0
    for j, width in enumerate(splits):
        parts.append(xm[j * batch : (j + 1) * batch] @ w_t[:, start : start + width])
        start += width
    return torch.cat(parts, dim=1)


def graph_time(fn: Callable[[torch.Tensor], torch.Tensor], weights: list[torch.Tensor], calls: int = 24,
               replays: int = 20) -> float:
    for w in weights[:2]:
        fn(w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(weights[i % len(weights)])
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", dest="json_path", required=True)
    parser.add_argument("--batches", default="2,4,8")
    args = parser.parse_args()
    device = torch.device("cuda")
    data: dict[str, Any] = {**run_info(device), "rows": []}
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    print(f"{'shape':20s} {'B':>2s} {'cuBLAS':>8s} {'stacked':>8s} {'per-seg':>8s}  err stacked / per-seg", flush=True)
    for name, (k, splits) in SHAPES.items():
        n = sum(splits)
        copies = max(2, -(-4 * l2 // (k * n * 2)))
        weights = [(torch.randn(k, n, device=device) * k**-0.5).to(torch.bfloat16) for _ in range(copies)]
        for batch in (int(b) for b in args.batches.split(",")):
            x = torch.randn(batch, k, device=device).to(torch.bfloat16)
            thr = torch.full((len(splits),), float(torch.quantile(x.abs().float().flatten(), 0.5)), device=device)
            ref = sparse_linear_reference(x.cpu(), weights[0].cpu(), thr.cpu(), splits, None,
                                          compute_dtype=torch.float64, out_dtype=torch.float64)
            errs = []
            for fn in (ops.dense_masked_linear, per_segment):
                args_ = (x, weights[0], thr, splits) + ((None,) if fn is ops.dense_masked_linear else ())
                y = fn(*args_).double().cpu()
                errs.append(float((y - ref).norm() / ref.norm()))
            t_cublas = graph_time(lambda w: x @ w, weights)
            t_stacked = graph_time(lambda w: ops.dense_masked_linear(x, w, thr, splits, None), weights)
            t_seg = graph_time(lambda w: per_segment(x, w, thr, splits), weights)
            row = {"shape": name, "K": k, "splits": splits, "batch": batch, "cublas_us": t_cublas,
                   "stacked_us": t_stacked, "per_segment_us": t_seg, "rel_err_stacked": errs[0],
                   "rel_err_per_segment": errs[1]}
            data["rows"].append(row)
            print(f"{name:20s} {batch:2d} {t_cublas:8.1f} {t_stacked:8.1f} {t_seg:8.1f}  {errs[0]:.1e} / {errs[1]:.1e}",
                  flush=True)
        del weights
        torch.cuda.empty_cache()
    write_json(data, args.json_path)


if __name__ == "__main__":
    main()
