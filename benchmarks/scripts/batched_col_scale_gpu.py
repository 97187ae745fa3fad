"""sparse_linear with a weight-aware column scale at 1..8 rows on the GPU against the float64 reference,
per path (diagnostic for the engine's sparse prefill of short prompts).

    PYTHONPATH=. python3 benchmarks/scripts/batched_col_scale_gpu.py
"""

from __future__ import annotations

import torch

from teal.kernels import ops, sparse_linear, sparse_linear_reference
from teal.kernels.configs import get_config

SHAPES = {"qkv": (256, [256, 128, 128]), "o": (256, [256]), "gate_up": (256, [512, 512]), "down": (512, [256])}


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    bad = 0
    for dtype in (torch.float32, torch.bfloat16):
        for name, (k, splits) in SHAPES.items():
            n = sum(splits)
            w_t = torch.randn(k, n, generator=gen).to(dtype).cuda()
            scale = (torch.rand(len(splits), k, generator=gen) + 0.5).cuda()
            for batch in range(1, 9):
                x = torch.randn(batch, k, generator=gen).to(dtype).cuda()
                score = (x.abs().float()[:, None, :] * scale[None]).reshape(-1)
                thr = torch.full((len(splits),), float(torch.quantile(score.cpu(), 0.5))).cuda()
                before = dict(ops.path_counts)
                y = sparse_linear(x, w_t, thr, splits, scale)
                torch.cuda.synchronize()
                path = [p for p in ops.path_counts if ops.path_counts[p] != before.get(p, 0)]
                ref = sparse_linear_reference(x.cpu(), w_t.cpu(), thr.cpu(), splits, scale.cpu(),
                                              compute_dtype=torch.float64, out_dtype=torch.float64)
                err = float((y.cpu().double() - ref).norm() / ref.norm())
                plain = sparse_linear_reference(x.cpu(), w_t.cpu(), thr.cpu(), splits, None,
                                                compute_dtype=torch.float64, out_dtype=torch.float64)
                err_plain = float((y.cpu().double() - plain).norm() / plain.norm())
                tol = 1e-5 if dtype == torch.float32 else 1e-2
                cfg = get_config(k, n, batch, dtype, ops.sm_count(x.device), cuda_ok=ops.cuda_kernel_available(x.device))
                flag = "" if err <= tol else "  <-- WRONG"
                bad += err > tol
                print(f"{str(dtype):15s} {name:8s} B={batch} path={path} err={err:.2e} (vs unscaled rule {err_plain:.2e}) "
                      f"cfg=(bn={cfg.block_n}, br={cfg.block_r}, sk={cfg.split_k}, w={cfg.num_warps}, cuda={cfg.cuda}, "
                      f"dense={cfg.dense}, compact={cfg.compact}){flag}", flush=True)
    print("wrong:", bad)


if __name__ == "__main__":
    main()
