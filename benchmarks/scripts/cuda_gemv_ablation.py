"""Where the CUDA sparse GEMV's fixed time per call goes: the kernel with one stage left out, timed in CUDA graphs.

PYTHONPATH=. python3 benchmarks/scripts/cuda_gemv_ablation.py [--json OUT.json]

Variants (source patches applied to teal/kernels/sparse_gemv.cu for this measurement only; outputs of
all but "full" are wrong by construction):
  full        the kernel as shipped;
  no_reduce   programs store their own partial sums: no cluster barrier, no distributed shared memory;
  no_weights  the weight loop runs zero steps: input, lists, reduction and store only;
  empty       returns right after waiting for the previous kernel: launch and scheduling only.
Llama-3-8B shapes with their configs.TUNED_CUDA entries, bf16, batch 1, s = 0.5 and 0.9; the same timing
as the kernel benchmark (teal.kernels.tune.time_graph_us, weights rotated past L2).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch

from teal.kernels import cuda, ops
from teal.kernels.configs import get_config
from teal.kernels.tune import quantile_threshold, time_graph_us

PATCHES = {
    "full": [],
    "no_reduce": [("    cluster_sync();\n#if SPLIT > 1", "#if 0")],
    "no_weights": [("for (int i = 0; i < count; i += UNROLL) {", "for (int i = 0; i < 0 * count; i += UNROLL) {")],
    "empty": [("    const float thr = thresholds[seg];", "    if (K > 0) return;\n    const float thr = thresholds[seg];")],
}
SHAPES = {"qkv": (4096, [4096, 1024, 1024]), "o": (4096, [4096]), "gate_up": (4096, [14336, 14336]),
          "down": (14336, [4096])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args()
    os.environ["TEAL_CACHE"] = tempfile.mkdtemp()  # patched sources must not meet the real cache
    original = cuda.source()
    for variant, patches in PATCHES.items():
        for old, _ in patches:
            if old not in original:
                raise SystemExit(f"patch for {variant} no longer applies: {old!r} not in the source")
    rows = []
    for name, (k, splits) in SHAPES.items():
        n = sum(splits)
        copies = max(2, (192 << 20) // (k * n * 2) + 1)
        ws = [(torch.randn(k, n, device="cuda") * k**-0.5).to(torch.bfloat16) for _ in range(copies)]
        xs = [torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for _ in ws]
        cfg = get_config(k, n, 1, torch.bfloat16, cuda_ok=True)
        for s in (0.5, 0.9):
            thrs = [torch.full((len(splits),), quantile_threshold(x, s), device="cuda") for x in xs]
            row = {"shape": name, "K": k, "N": n, "sparsity": s, "config": cfg.as_dict()}
            for variant, patches in PATCHES.items():
                text = original
                for old, new in patches:
                    text = text.replace(old, new)
                cuda.source = lambda text=text: text  # the launch compiles (and caches) the patched source
                cuda._kernels.clear()
                row[variant] = time_graph_us([lambda x=x, w=w, t=t: ops.sparse_linear_triton(x, w, t, splits, config=cfg)
                                              for x, w, t in zip(xs, ws, thrs)])
            rows.append(row)
            print(f"{name:8s} s={s:.1f}  " + "  ".join(f"{v} {row[v]:5.1f}" for v in PATCHES), flush=True)
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as fh:
            json.dump({"benchmark": "cuda-gemv-ablation", "device": torch.cuda.get_device_name(),
                       "torch": torch.__version__, "command": "PYTHONPATH=. python3 benchmarks/scripts/cuda_gemv_ablation.py",
                       "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
