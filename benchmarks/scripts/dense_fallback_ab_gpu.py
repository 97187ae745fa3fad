"""The masked dense fallback of `sparse_linear` (2-8 rows, and larger batches such as a sparse prefill's prompt
rows with `--batches`): the stacked product against one product per segment, and cuBLAS's unmasked product,
timed in CUDA graphs (weights rotated past L2).

    PYTHONPATH=. python3 benchmarks/scripts/dense_fallback_ab_gpu.py --json OUT.json

- stacked (`ops.dense_masked_linear`): one masking launch writes [S*B, K], one [S*B, K] @ [K, N] product,
  then the S diagonal blocks are gathered (one cat);
- per segment: the same masking launch, then segment j's rows times w_t's columns of segment j (S products
  on column views, no copy of the weights), then one cat;
- cublas: x @ w_t unmasked (what "dense" costs without thresholds).
Both masked variants are checked against the float64 reference first. Prints a table, writes JSON. Timing:
`teal.kernels.tune.time_graph_us` (the committed JSON came from an equivalent loop in this script: 24 calls
per graph over the rotated copies, median of 20 replays).
"""

from __future__ import annotations


import torch
from _gpu_run import rotated_weights, start_rows_run  # noqa: E402 (benchmarks/scripts is on sys.path when run as a script)

from teal.bench.decode import write_json
from teal.kernels.tune import time_graph_us
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
            for fn in (ops.dense_masked_linear, per_segment):
                args_ = (x, weights[0], thr, splits) + ((None,) if fn is ops.dense_masked_linear else ())
                y = fn(*args_).double()
                errs.append(float((y - ref).norm() / ref.norm()))
            t_cublas = time_graph_us([lambda w=w: x @ w for w in weights], replays=20)
            t_stacked = time_graph_us([lambda w=w: ops.dense_masked_linear(x, w, thr, splits, None) for w in weights],
                                      replays=20)
            t_seg = time_graph_us([lambda w=w: per_segment(x, w, thr, splits) for w in weights], replays=20)
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
