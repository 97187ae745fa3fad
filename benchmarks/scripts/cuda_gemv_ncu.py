"""Launch the CUDA sparse GEMV once per case for Nsight Compute (each launch profiled on its own).

ncu --clock-control none -k regex:teal_sparse_gemv --section SpeedOfLight --section MemoryWorkloadAnalysis \
    --section WarpStateStats --section Occupancy python3 benchmarks/scripts/cuda_gemv_ncu.py
Cases, in launch order (Llama-3-8B shapes, bf16, batch 1, configs.TUNED_CUDA): o at s = 0, 0.5, 0.9;
q|k|v, gate|up and down (SiLU-gated input from the gate|up row) at s = 0.5.
"""

from __future__ import annotations

import torch

from teal.kernels import ops
from teal.kernels.configs import get_config
from teal.kernels.tune import quantile_threshold


def main() -> None:
    torch.manual_seed(0)
    cases = [("o", 4096, [4096], s) for s in (0.0, 0.5, 0.9)]
    cases += [("qkv", 4096, [4096, 1024, 1024], 0.5), ("gate_up", 4096, [14336, 14336], 0.5),
              ("down", 14336, [4096], 0.5)]
    for name, k, splits, s in cases:
        n = sum(splits)
        w_t = (torch.randn(k, n, device="cuda") * k**-0.5).to(torch.bfloat16)
        cfg = get_config(k, n, 1, torch.bfloat16, cuda_ok=True)
        if name == "down":
            gate_up = torch.randn(1, 2 * k, device="cuda", dtype=torch.bfloat16)
            thr = torch.full((1,), quantile_threshold(ops.silu_mul(gate_up), s), device="cuda")
            ops.sparse_linear_glu_triton(gate_up, w_t, thr, config=cfg)
        else:
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            thr = torch.full((len(splits),), quantile_threshold(x, s), device="cuda")
            ops.sparse_linear_triton(x, w_t, thr, splits, config=cfg)
        torch.cuda.synchronize()
        print(f"{name} s={s} config={cfg}", flush=True)


if __name__ == "__main__":
    main()
