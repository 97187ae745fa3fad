"""The masked dense fallback of `sparse_linear` (2-8 rows, and larger batches such as a sparse prefill's prompt
rows with `--batches`): the stacked product against one product per segment, and cuBLAS's unmasked product,
timed in CUDA graphs (weights rotated past L2).

    PYTHONPATH=. python3 benchmarks/scripts/dense_fallback_ab_gpu.py --json OUT.json

- stacked (`ops.dense_masked_linear` with `PER_SEGMENT_MIN_WORK` = inf): one masking launch writes [S*B, K],
  one [S*B, K] @ [K, N] product, then the S diagonal blocks are gathered (one cat);
- per segment (the same with `PER_SEGMENT_MIN_WORK` = 0): the same masking launch, then segment j's rows
  times w_t's columns of segment j (S products on column views, no copy of the weights), then one cat;
- cublas: x @ w_t unmasked (what "dense" costs without thresholds).
Both masked variants are checked against the float64 reference first. Prints a table, writes JSON. Timing:
`teal.kernels.tune.time_graph_us` (the committed JSON came from an equivalent loop in this script: 24 calls
per graph over the rotated copies, median of 20 replays).
"""

from __future__ import annotations

import torch
from _gpu_run import rotated_weights, start_rows_run  # noqa: E402 (benchmarks/scripts is on sys.path when run as a script)

from teal.bench.results import write_json
from teal.kernels.tune import time_graph_us
from teal.kernels import ops, sparse_linear_reference

SHAPES = {
    "llama-3-8b qkv": (4096, [4096, 1024, 1024]),
    "llama-3-8b gate_up": (4096, [14336, 14336]),
    "llama-2-7b qkv": (4096, [4096, 4096, 4096]),
    "llama-3-8b o": (4096, [4096]),
}


def fallback(layout: str):
    """``ops.dense_masked_linear`` with its fused-group layout forced: "stacked" (one [S*B, K] product) or
    "per_segment" (each segment's rows times its own columns), whatever ``ops.PER_SEGMENT_MIN_WORK`` would
    pick for the batch."""
    work = float("inf") if layout == "stacked" else 0

    def call(x: torch.Tensor, w_t: torch.Tensor, thr: torch.Tensor, splits: list[int]) -> torch.Tensor:
        default, ops.PER_SEGMENT_MIN_WORK = ops.PER_SEGMENT_MIN_WORK, work
        try:
            return ops.dense_masked_linear(x, w_t, thr, splits, None)
        finally:
            ops.PER_SEGMENT_MIN_WORK = default

    return call


STACKED, PER_SEGMENT = fallback("stacked"), fallback("per_segment")


def main() -> None:
    args, device, data = start_rows_run(__doc__, batches="2,4,8")
    print(f"{'shape':20s} {'B':>5s} {'cuBLAS':>8s} {'stacked':>8s} {'per-seg':>8s}  err stacked / per-seg", flush=True)
    for name, (k, splits) in SHAPES.items():
        n = sum(splits)
        weights = rotated_weights(k, n, device)
        for batch in (int(b) for b in args.batches.split(",")):
            x = torch.randn(batch, k, device=device).to(torch.bfloat16)
            thr = torch.full((len(splits),), float(torch.quantile(x.abs().float().flatten(), 0.5)), device=device)
            ref = sparse_linear_reference(x, weights[0], thr, splits, None, compute_dtype=torch.float64,
                                          out_dtype=torch.float64)
            errs = []
            for fn in (STACKED, PER_SEGMENT):
                y = fn(x, weights[0], thr, splits).double()
                errs.append(float((y - ref).norm() / ref.norm()))
            t_cublas = time_graph_us([lambda w=w: x @ w for w in weights], replays=20)
            t_stacked = time_graph_us([lambda w=w: STACKED(x, w, thr, splits) for w in weights], replays=20)
            t_seg = time_graph_us([lambda w=w: PER_SEGMENT(x, w, thr, splits) for w in weights], replays=20)
            row = {"shape": name, "K": k, "splits": splits, "batch": batch, "cublas_us": t_cublas,
                   "stacked_us": t_stacked, "per_segment_us": t_seg, "rel_err_stacked": errs[0],
                   "rel_err_per_segment": errs[1]}
            data["rows"].append(row)
            print(f"{name:20s} {batch:5d} {t_cublas:8.1f} {t_stacked:8.1f} {t_seg:8.1f}  {errs[0]:.1e} / {errs[1]:.1e}",
                  flush=True)
        del weights
        torch.cuda.empty_cache()
    write_json(data, args.json_path)


if __name__ == "__main__":
    main()
