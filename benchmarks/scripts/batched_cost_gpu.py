"""Where the batched CUDA GEMV spends the time a batch-1 call does not: the same shapes at 1, 2 and 8 input
rows with every threshold at -inf (every row kept, so every call reads every weight row), through the FMA
loop (the shape's batch-1 table entry) and the tensor-core loop (use_dot configurations), against cuBLAS's
unmasked product. If the tensor-core loop at 1 row is as slow as at 8, its product loop is the cost; if it
is fast at 1 row and slow at 8, the batch's inputs, lists and reduction are.

    TEAL_SOURCE_COMMIT=<commit> PYTHONPATH=. python3 benchmarks/scripts/batched_cost_gpu.py --json OUT.json
"""

from __future__ import annotations

from typing import Any

import torch
from _gpu_run import rotated_weights, start_rows_run  # noqa: E402 (benchmarks/scripts is on sys.path when run as a script)

from teal.bench.results import write_json
from teal.kernels import ops, sparse_linear_reference
from teal.kernels.configs import TUNED_CUDA, KernelConfig
from teal.kernels.tune import time_graph_us

SHAPES = {
    "llama-3-8b qkv": (4096, [4096, 1024, 1024]),
    "llama-3-8b o": (4096, [4096]),
    "llama-3-8b down": (14336, [4096]),
}
MMA = {
    "mma 256/split4/8w": KernelConfig(block_n=256, block_r=16, split_k=4, num_warps=8, cuda=True, use_dot=True),
    "mma 128/split8/4w": KernelConfig(block_n=128, block_r=16, split_k=8, num_warps=4, cuda=True, use_dot=True),
    "mma 128/split4/8w": KernelConfig(block_n=128, block_r=16, split_k=4, num_warps=8, cuda=True, use_dot=True),
}


def main() -> None:
    args, device, data = start_rows_run(__doc__)
    for name, (k, splits) in SHAPES.items():
        n = sum(splits)
        weights = rotated_weights(k, n, device)
        configs = {"fma (batch-1 entry)": TUNED_CUDA[(k, n, 1, "bf16")], **MMA}
        thr = torch.full((len(splits),), float("-inf"), device=device)
        line = [f"{name:16s}"]
        for batch in (1, 2, 8):
            x = torch.randn(batch, k, device=device).to(torch.bfloat16)
            ref = sparse_linear_reference(x, weights[0], thr, splits, compute_dtype=torch.float64,
                                          out_dtype=torch.float64)
            row: dict[str, Any] = {"shape": name, "K": k, "splits": splits, "batch": batch,
                                   "cublas_us": time_graph_us([lambda w=w: x @ w for w in weights], replays=20)}
            for label, cfg in configs.items():
                before = ops.path_counts["cuda"]
                y = ops.sparse_linear_triton(x, weights[0], thr, splits, config=cfg).double()
                took = ops.path_counts["cuda"] == before + 1
                err = float((y - ref).norm() / ref.norm())
                us = time_graph_us([lambda w=w: ops.sparse_linear_triton(x, w, thr, splits, config=cfg) for w in weights],
                                   replays=20)
                row[label] = {"us": us, "rel_err": err, "took_cuda": took}
                line.append(f"B{batch} {label}: {us:.1f}{'' if took and err < 1e-2 else ' (!)'}")
            line.append(f"B{batch} cuBLAS {row['cublas_us']:.1f}")
            data["rows"].append(row)
        print(" | ".join(line), flush=True)
        del weights
        torch.cuda.empty_cache()
    write_json(data, args.json_path)


if __name__ == "__main__":
    main()
