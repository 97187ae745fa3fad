"""What the weight-aware rule (score |x_i| * ||W[:, i]||) costs the sparse GEMV against TEAL's |x_i|, at the
same sparsity, batch 1, bf16, timed in CUDA graphs with weights rotated past L2.

    PYTHONPATH=. python3 benchmarks/scripts/weight_aware_cost_gpu.py --json OUT.json

Each call is first checked against the float64 reference. Prints a table and writes JSON. Timing:
`teal.kernels.tune.time_graph_us` (the committed JSON came from an equivalent loop in this script: 24 calls
per graph over the rotated copies, median of 20 replays).
"""

from __future__ import annotations


import torch
from _gpu_run import rotated_weights, start_rows_run  # noqa: E402 (benchmarks/scripts is on sys.path when run as a script)

from teal.bench.results import write_json
from teal.kernels.tune import time_graph_us
from teal.kernels import sparse_linear, sparse_linear_reference

SHAPES = {"q|k|v": (4096, [4096, 1024, 1024]), "o": (4096, [4096]), "gate|up": (4096, [14336, 14336]),
          "down": (14336, [4096])}


def main() -> None:
    args, device, data = start_rows_run(__doc__)
    print(f"{'Llama-3-8B':10s} {'s':>4s} {'|x| us':>8s} {'|x|c us':>8s} {'ratio':>6s}  rel err", flush=True)
    for name, (k, splits) in SHAPES.items():
        n = sum(splits)
        weights = rotated_weights(k, n, device)
        norms = torch.stack([weights[0][:, a:b].float().norm(dim=1) for a, b in
                             zip([0] + list(torch.tensor(splits).cumsum(0)[:-1].tolist()),
                                 torch.tensor(splits).cumsum(0).tolist())])  # [S, K]
        x = torch.randn(1, k, device=device).to(torch.bfloat16)
        for s in (0.5, 0.65):
            thr_mag = torch.full((len(splits),), float(torch.quantile(x.abs().float().flatten(), s)), device=device)
            thr_wa = torch.stack([torch.quantile((x.abs().float()[0] * norms[j]), s) for j in range(len(splits))])
            errs = []
            for thr, cs in ((thr_mag, None), (thr_wa, norms)):
                y = sparse_linear(x, weights[0], thr, splits, cs).double().cpu()
                ref = sparse_linear_reference(x.cpu(), weights[0].cpu(), thr.cpu(), splits,
                                              None if cs is None else cs.cpu(), compute_dtype=torch.float64,
                                              out_dtype=torch.float64)
                errs.append(float((y - ref).norm() / ref.norm()))
            t_mag = time_graph_us([lambda w=w: sparse_linear(x, w, thr_mag, splits) for w in weights], replays=20)
            t_wa = time_graph_us([lambda w=w: sparse_linear(x, w, thr_wa, splits, norms) for w in weights], replays=20)
            row = {"proj": name, "K": k, "splits": splits, "sparsity": s, "magnitude_us": t_mag,
                   "weight_aware_us": t_wa, "ratio": t_wa / t_mag, "rel_err": errs}
            data["rows"].append(row)
            print(f"{name:10s} {s:4.2f} {t_mag:8.1f} {t_wa:8.1f} {t_wa / t_mag:6.3f}  {errs[0]:.1e} / {errs[1]:.1e}",
                  flush=True)
        del weights
        torch.cuda.empty_cache()
    write_json(data, args.json_path)


if __name__ == "__main__":
    main()
