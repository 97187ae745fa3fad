"""First GPU look at the CUDA C++ sparse GEMV: compile each dtype, check against float64, time a few configs.

PYTHONPATH=. python3 benchmarks/scripts/cuda_gemv_smoke.py  (exit status 1 when a check fails)
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from teal.kernels import cuda, ops
from teal.kernels.configs import KernelConfig, get_config
from teal.kernels.tune import quantile_threshold, time_graph_us


def main() -> int:
    ok = True
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        k, splits = 4096, [4096, 1024, 1024]
        n = sum(splits)
        w_t = (torch.randn(k, n, device="cuda") * k**-0.5).to(dtype)
        x = torch.randn(1, k, device="cuda", dtype=dtype)
        for s in (0.0, 0.5, 0.9):
            thr = torch.full((3,), quantile_threshold(x, s), device="cuda")
            cfg = KernelConfig(block_n=256, block_r=8, split_k=8, num_warps=16, cuda=True)
            t0 = time.time()
            y = ops.sparse_linear_triton(x, w_t, thr, splits, config=cfg)
            torch.cuda.synchronize()
            ref = ops.sparse_linear_reference(x, w_t, thr, splits, compute_dtype=torch.float64, out_dtype=torch.float64)
            err = float((y.double() - ref).norm() / ref.norm())
            good = err < 1e-2 and not bool(y.isnan().any())
            ok &= good
            print(f"{dtype} s={s}: rel err {err:.2e} {'ok' if good else 'FAIL'} ({time.time() - t0:.2f} s incl. compile)")
    variant = cuda.Variant(0, 16, 8, 1, 8, False, False, 2)
    print("attributes", cuda.kernel(variant, 0).attributes(), "path counts", dict(ops.path_counts))
    shapes = {"qkv": (4096, [4096, 1024, 1024]), "o": (4096, [4096]), "gate_up": (4096, [14336, 14336]),
              "down": (14336, [4096])}
    cfgs = [KernelConfig(block_n=256, block_r=8, split_k=8, num_warps=16, cuda=True),
            KernelConfig(block_n=256, block_r=16, split_k=8, num_warps=8, cuda=True),
            KernelConfig(block_n=256, block_r=8, split_k=2, num_warps=16, cuda=True)]
    print(f"{'shape':8} {'s':>4} {'cuBLAS':>7} {'triton':>7} " + " ".join(f"cuda{i}" for i in range(len(cfgs))))
    for name, (k, splits) in shapes.items():
        n = sum(splits)
        copies = max(2, (192 << 20) // (k * n * 2) + 1)
        ws = [torch.randn(k, n, device="cuda", dtype=torch.bfloat16) * k**-0.5 for _ in range(copies)]
        wn = [w.t().contiguous() for w in ws]
        xs = [torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for _ in ws]
        for s in (0.0, 0.5, 0.9):
            thrs = [torch.full((len(splits),), quantile_threshold(x, s), device="cuda") for x in xs]
            row = [time_graph_us([lambda x=x, w=w: F.linear(x, w) for x, w in zip(xs, wn)])]
            tuned = get_config(k, n, 1, torch.bfloat16)
            for cfg in [tuned] + cfgs:
                if cfg.cuda and cuda.unsupported_reason(xs[0], ws[0], splits, cfg):
                    row.append(float("nan"))
                    continue
                row.append(time_graph_us([lambda x=x, w=w, t=t, c=cfg: ops.sparse_linear_triton(x, w, t, splits, config=c)
                                          for x, w, t in zip(xs, ws, thrs)]))
            print(f"{name:8} {s:4.1f} " + " ".join(f"{v:7.1f}" for v in row), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
