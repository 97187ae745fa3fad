"""How many thread-block clusters of each tensor-core (``use_dot``) CUDA configuration the GPU holds at once
(``cuOccupancyMaxActiveClusters``) against the clusters one launch needs, beside the FMA configuration of the
same shape: a launch needing more clusters than fit runs in two waves.

Run on the GPU: ``python benchmarks/scripts/mma_occupancy_gpu.py [--json PATH]``.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import sys

import torch
import triton

from teal.bench.kernels import SHAPES
from teal.kernels import cuda
from teal.kernels.configs import TUNED_CUDA
from teal.kernels.tune import cuda_candidates


def max_active_clusters(cfg, k: int, splits: list[int], batch: int) -> dict:
    geo = cuda.geometry(k, splits, cfg, torch.bfloat16, batch)
    variant = cuda.variant_for(cfg, torch.bfloat16, has_scale=False, glu=False, pdl=2,
                               rows_per_warp=geo.rows_per_warp, batch=batch)
    kern = cuda.kernel(variant, torch.cuda.current_device())
    kern.ensure_shared(geo.shared_bytes)
    lib = cuda._library()
    conf = cuda._LaunchConfig(geo.grid[0], geo.grid[1], geo.grid[2], geo.threads, 1, 1, geo.shared_bytes,
                              ctypes.c_void_p(torch.cuda.current_stream().cuda_stream), None, 0)
    n = ctypes.c_int()
    lib.check_cuda(lib.cuda.cuOccupancyMaxActiveClusters(ctypes.byref(n), kern.func, ctypes.byref(conf)),
                   "cuOccupancyMaxActiveClusters")
    return dict(config=cfg.as_dict(), grid=list(geo.grid), clusters_needed=geo.grid[0],
                clusters_resident=n.value, registers=kern.attributes()["registers"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for shape in ("llama-3-8b", "llama-2-7b"):
        for name, k, splits in SHAPES[shape]:
            n = sum(splits)
            for batch in (2, 8):
                cands = [c for c in cuda_candidates(k, n, 132, batch) if c.use_dot]
                fma = TUNED_CUDA.get((k, n, 1, "bf16"))
                for cfg in ([fma] if fma else []) + cands:
                    if cuda.register_problem(cfg, torch.bfloat16, batch):
                        continue
                    row = dict(shape=shape, proj=name, K=k, N=n, batch=batch, **max_active_clusters(cfg, k, list(splits), batch))
                    rows.append(row)
                    c = row["config"]
                    print(f"{shape:11s} {name:8s} B={batch} {'mma' if c['use_dot'] else 'fma'} bn={c['block_n']} "
                          f"split={c['split_k']} warps={c['num_warps']} regs={row['registers']} clusters needed "
                          f"{row['clusters_needed']} resident {row['clusters_resident']}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                           device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                           cuda=torch.version.cuda, command=" ".join(["python", *sys.argv]), rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
