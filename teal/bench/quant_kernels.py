"""`teal bench kernels --weights int8,int4`: the fused threshold + dequantize + sparse GEMV
(`teal.kernels.quant_gemv`: the CUDA C++ kernel where the device runs it, and Triton, each a row) per (shape,
projection, batch, sparsity), against cuBLAS on the bf16 weight of the same shape and against the copy
bandwidth (bytes: kept code rows + every scale and zero).

Each row is first checked on a fresh input against the float64 dequantize-then-multiply reference (output
poisoned with NaN first): relative error <= 1e-2 and no NaN, the issue's bound; then timed in a CUDA graph
over rotated weight copies (`teal.kernels.tune.time_graph_us`, as the bf16 rows of `teal.bench.kernels`).

`--quant-configs sweep` times the CUDA kernel at every configuration of `configs.quant_cuda_candidates` that
fits the registers of the batch and the shared memory, beside the one the dispatch takes (row "cuda"; the others are named by their
configuration, e.g. "cuda bn512 w8 c4"), each checked as above, and prints `configs.TUNED_QUANT_CUDA` entries
where a configuration beats the dispatch's by more than `SWEEP_SLACK` over the sparsities timed
(`sweep_entries`).
"""

from __future__ import annotations

import functools
import math
import time
import traceback
from collections.abc import Sequence
from itertools import product
from typing import Any

import torch
import torch.nn.functional as F

from teal.bench.timing import quant_param_bytes
from teal.kernels.configs import KernelConfig, batch_bucket, quant_cuda_candidates, quant_cuda_config, table_to_json
from teal.kernels.quant_gemv import (quant_sparse_linear_cuda, quant_sparse_linear_reference,
                                     quant_sparse_linear_triton)
from teal.quant import quantize

REL_ERR_BOUND = 1e-2
ROTATION_BYTES = 192 * 2**20


def _thresholds(x: torch.Tensor, sparsity: float, segments: int) -> torch.Tensor:
    t = float("-inf") if sparsity == 0 else float(torch.quantile(x.abs().float().flatten()[:2**16], sparsity))
    return torch.full((segments,), t, device=x.device)


def check_row(qw: Any, splits: Sequence[int], batch: int, sparsity: float, dtype: torch.dtype,
              kernel: Any = quant_sparse_linear_triton) -> dict[str, Any]:
    """`kernel` on a fresh input against the float64 reference: {rel_err, finite, ok}."""
    k = qw.shape[0]
    x = torch.randn(batch, k, device=qw.device, dtype=dtype)
    t = _thresholds(x, sparsity, len(splits))
    y = kernel(x, qw, t, list(splits))
    ref = quant_sparse_linear_reference(x.double(), qw, t, list(splits), compute_dtype=torch.float64)
    finite = bool(torch.isfinite(y).all())
    err = float((y.double() - ref).norm() / ref.norm().clamp_min(1e-30)) if finite else float("inf")
    return {"rel_err": err, "finite": finite, "ok": finite and err <= REL_ERR_BOUND}


def kernels_for(cuda_ok: bool) -> list[tuple[str, Any]]:
    """(kernel name, callable) of every row of one format: the CUDA kernel where the device runs it, then Triton."""
    cuda_rows = [("cuda", quant_sparse_linear_cuda)] if cuda_ok else []
    return cuda_rows + [("triton", quant_sparse_linear_triton)]


#: The kernel names `--quant-kernels` takes.
KERNEL_NAMES = ("cuda", "triton")


def selected(kernels: list[tuple[str, Any]], names: Sequence[str] | None) -> list[tuple[str, Any]]:
    """The rows of ``kernels`` that ``names`` select (None: all)."""
    if names is None:
        return kernels
    return [(n, k) for n, k in kernels if n in names]


#: `--quant-configs`: "default" times the dispatch's configuration, "sweep" every candidate beside it.
QUANT_CONFIG_MODES = ("default", "sweep")
#: A swept configuration becomes a table entry only when its mean time is below the dispatch's / this.
SWEEP_SLACK = 1.03


def config_label(cfg: KernelConfig) -> str:
    """A swept CUDA row's kernel name: "cuda bn{block_n} w{num_warps} c{split_k}", and " ring{num_stages}" with the
    int4 cp.async ring."""
    ring = f" ring{cfg.num_stages}" if cfg.num_stages > 1 else ""
    return f"cuda bn{cfg.block_n} w{cfg.num_warps} c{cfg.split_k}{ring}"


def sweep_kernels(k: int, n: int, batch: int, fmt: str, dtype: torch.dtype,
                  sm_count: int) -> list[tuple[str, Any, KernelConfig]]:
    """The CUDA rows of a sweep at (K, N, batch): the dispatch's configuration as "cuda", then every
    `quant_cuda_candidates` entry that differs from it, fits the registers (`cuda.register_problem`) and sm_90's
    shared memory (`cuda.SM90_SHARED_LIMIT`), each (name, kernel, config)."""
    from teal.kernels import cuda

    default = quant_cuda_config(k, n, batch, sm_count, fmt)
    out = [("cuda", functools.partial(quant_sparse_linear_cuda, config=default), default)]
    for cfg in quant_cuda_candidates(k, n, sm_count, batch):
        if (cfg != default and cuda.register_problem(cfg, dtype, batch, fmt) is None
                and cuda.geometry(k, [n], cfg, dtype, batch, fmt).shared_bytes <= cuda.SM90_SHARED_LIMIT):
            out.append((config_label(cfg), functools.partial(quant_sparse_linear_cuda, config=cfg), cfg))
    return out


def sweep_entries(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (format, K, N, batch bucket) of a sweep: the swept configuration of the lowest mean time over the
    sparsities that every configuration timed without error, and the dispatch's ("cuda") mean beside it; an
    entry (`entry`: the `TUNED_QUANT_CUDA` line) where it is below the dispatch's / `SWEEP_SLACK`."""
    groups: dict[tuple[str, int, int, int], dict[str, dict[float, float]]] = {}
    configs: dict[str, dict[str, Any]] = {}
    for r in rows:
        if "config" not in r:
            continue
        key = (r["weights"], r["K"], r["N"], batch_bucket(r["batch"]))
        times = groups.setdefault(key, {}).setdefault(r["kernel"], {})
        times[r["sparsity"]] = r.get("us", float("nan"))
        configs[r["kernel"]] = r["config"]
    out = []
    for (fmt, k, n, bucket), by_kernel in sorted(groups.items()):
        if "cuda" not in by_kernel:
            continue
        levels = set(by_kernel["cuda"])
        means = {name: sum(t[s] for s in levels) / len(levels) for name, t in by_kernel.items()
                 if set(t) == levels and all(t[s] == t[s] for s in levels)}  # NaN: an error row
        if "cuda" not in means:
            continue
        best = min(means, key=means.get)
        row = {"weights": fmt, "K": k, "N": n, "bucket": bucket, "default_us": means["cuda"], "best": best,
               "best_us": means[best]}
        if best != "cuda" and means[best] < means["cuda"] / SWEEP_SLACK:
            c = configs[best]
            row["config"] = dict(c)
            stages = f', num_stages={c["num_stages"]}' if c.get("num_stages", 1) > 1 else ""
            row["entry"] = (f'({k}, {n}, {bucket}, "{fmt}"): KernelConfig(block_n={c["block_n"]}, '
                            f'block_r={c["block_r"]}, split_k={c["split_k"]}, num_warps={c["num_warps"]}{stages}, '
                            f"cuda=True),  # {means[best]:.1f} against {means['cuda']:.1f} us")
        out.append(row)
    return out


def run_quant(shapes: dict[str, Any], models: Sequence[str], formats: Sequence[str], sparsities: Sequence[float],
              batches: Sequence[int], group_size: int, copy_bw: float, dtype: torch.dtype, console: Any,
              deadline: float | None = None, quant_method: str = "rtn",
              kernel_names: Sequence[str] | None = None, configs: str = "default") -> list[dict[str, Any]]:
    """Rows of every (format, shape, projection, batch, sparsity, kernel); see the module docstring. int4 is
    quantized by ``quant_method`` (rtn, or hqq: float zero points; the bytes read are the same);
    ``kernel_names`` (``KERNEL_NAMES``) limits the kernels timed (None: all); ``configs`` "sweep" times the
    CUDA kernel at every candidate configuration (`sweep_kernels`; rows carry `config`)."""
    from teal.kernels.tune import time_graph_us

    from teal.kernels.ops import cuda_kernel_available, sm_count

    device = torch.device("cuda")
    rows: list[dict[str, Any]] = []
    cuda_ok = cuda_kernel_available(device)
    elem = torch.finfo(dtype).bits // 8
    for fmt in formats:
        kernels = selected(kernels_for(cuda_ok), kernel_names)
        method = quant_method if fmt == "int4" else "rtn"
        for model in models:
            for proj, k, splits in shapes[model]:
                if deadline is not None and time.perf_counter() > deadline:
                    rows.append({"weights": fmt, "model": model, "proj": proj, "skipped": "time budget"})
                    continue
                n = sum(splits)
                w = (torch.randn(n, k, device=device) * k**-0.5).to(dtype)
                qw = quantize(w.t().contiguous(), fmt, group_size, method)
                code_bytes = qw.codes.numel() * qw.codes.element_size()
                param_bytes = quant_param_bytes(fmt, k, n, group_size, elem)
                copies = max(2, math.ceil(ROTATION_BYTES / (code_bytes + param_bytes)))
                qws = [qw] + [quantize((torch.randn(n, k, device=device) * k**-0.5).to(dtype).t().contiguous(), fmt,
                                       group_size, method) for _ in range(copies - 1)]
                ws = [w] + [torch.empty_like(w).normal_(0, k**-0.5)
                            for _ in range(max(2, math.ceil(ROTATION_BYTES / (k * n * elem))) - 1)]
                for batch in batches:
                    xs = [torch.randn(batch, k, device=device, dtype=dtype) for _ in range(copies)]
                    xw = [torch.randn(batch, k, device=device, dtype=dtype) for _ in ws]
                    cublas_us = time_graph_us([lambda x=x, w=w: F.linear(x, w) for x, w in zip(xw, ws)])
                    timed: list[tuple[str, Any, KernelConfig | None]] = [(name, kern, None) for name, kern in kernels]
                    if configs == "sweep" and any(name == "cuda" for name, _ in kernels):
                        timed = [t for t in timed if t[0] != "cuda"]
                        timed[:0] = sweep_kernels(k, n, batch, fmt, dtype, sm_count(device))
                    for s, (name, kern, cfg) in product(sparsities, timed):
                        row: dict[str, Any] = {"weights": fmt, "kernel": name,
                                               "group_size": group_size if fmt == "int4" else None,
                                               "quant_method": method,
                                               "model": model, "proj": proj, "K": k, "N": n, "splits": list(splits),
                                               "batch": batch, "sparsity": s, "code_bytes": code_bytes,
                                               "param_bytes": param_bytes, "bf16_weight_bytes": k * n * elem,
                                               "cublas_bf16_us": cublas_us}
                        if cfg is not None:
                            row["config"] = cfg.as_dict()
                        try:
                            row.update(check_row(qw, splits, batch, s, dtype, kern))
                            if not row["ok"]:
                                raise RuntimeError(f"{name} {fmt}: relative error {row['rel_err']:.2e} against float64 "
                                                   f"(bound {REL_ERR_BOUND}); not timed")
                            thr = [_thresholds(x, s, len(splits)) for x in xs]
                            kept = [float((x.abs().float() > t[0]).any(dim=0).float().mean()) for x, t in zip(xs, thr)]
                            row["union_density"] = sum(kept) / len(kept)
                            row["measured_sparsity"] = sum(float((x.abs().float() <= t[0]).float().mean())
                                                           for x, t in zip(xs, thr)) / len(xs)
                            row["us"] = time_graph_us([lambda x=x, q=q, t=t, kern=kern: kern(x, q, t, splits)
                                                       for x, q, t in zip(xs, qws, thr)])
                            read = row["union_density"] * code_bytes + param_bytes
                            row.update(bytes_read=read, ideal_us=read / copy_bw * 1e6,
                                       eff_bw_frac=read / (row["us"] * 1e-6) / copy_bw,
                                       speedup_vs_cublas_bf16=cublas_us / row["us"])
                        except Exception:  # noqa: BLE001 - one broken row must not lose the run
                            row["error"] = traceback.format_exc()[-2000:]
                            console.print(f"[red]error[/] {name} {fmt} {model} {proj} B={batch} s={s}\n"
                                          f"{row['error']}")
                        rows.append(row)
                    del xs, xw
                del qws, ws, w
                torch.cuda.empty_cache()
                console.print(f"{fmt} {model} {proj} done")
    return rows


def print_quant(rows: Sequence[dict[str, Any]], console: Any) -> None:
    from rich.table import Table

    table = Table(title="fused quantized sparse GEMV (CUDA C++ / Triton) vs cuBLAS on bf16 weights")
    cols = ["weights", "kernel", "model", "proj", "B", "s", "us", "cuBLAS bf16", "x cuBLAS", "eff bw",
            "rel err"]
    for col in cols:
        table.add_column(col, justify="right")
    for r in rows:
        if "us" not in r:
            table.add_row(r["weights"], r.get("kernel", ""), r["model"], r["proj"],
                          str(r.get("batch", "")),
                          str(r.get("sparsity", "")), "skipped" if "skipped" in r else "error", *[""] * 4)
            continue
        table.add_row(r["weights"], r["kernel"], r["model"], r["proj"], str(r["batch"]),
                      f"{r['sparsity']:.2f}",
                      f"{r['us']:.1f}",
                      f"{r['cublas_bf16_us']:.1f}", f"{r['speedup_vs_cublas_bf16']:.2f}", f"{r['eff_bw_frac']:.0%}",
                      f"{r['rel_err']:.1e}")
    console.print(table)


def quant_targets(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every checked row within `REL_ERR_BOUND` of float64 and finite (the issue's kernel bound)."""
    return [dict(check="rel_err_and_finite",
                 case=f"{r['kernel']} {r['weights']} {r['model']}/{r['proj']} B={r['batch']} s={r['sparsity']}",
                 value=r["rel_err"], goal=REL_ERR_BOUND, ok=bool(r["ok"])) for r in rows if "ok" in r]


def sweep_table(entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The winning entries of `sweep_entries` as a configuration table (`configs.table_to_json`; an entry's dtype is
    its weight format), for ``$TEAL_QUANT_CONFIGS`` and, once a decode run agrees, `configs.TUNED_QUANT_CUDA`."""
    return table_to_json({(e["K"], e["N"], e["bucket"], e["weights"]): KernelConfig(**e["config"])
                          for e in entries if "config" in e})
