"""`teal bench kernels --weights int8,int4`: the fused threshold + dequantize + sparse GEMV
(`teal.kernels.quant_gemv`: the CUDA C++ kernel where the device runs it, and Triton, each a row) per (shape,
projection, batch, sparsity), against cuBLAS on the bf16 weight of the same shape and against the copy
bandwidth (bytes: kept code rows + every scale and zero).

Each row is first checked on a fresh input against the float64 dequantize-then-multiply reference (output
poisoned with NaN first): relative error <= 1e-2 and no NaN, the issue's bound; then timed in a CUDA graph
over rotated weight copies (`teal.kernels.tune.time_graph_us`, as the bf16 rows of `teal.bench.kernels`).
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Sequence
from itertools import product
from typing import Any

import torch
import torch.nn.functional as F

from teal.bench.timing import quant_param_bytes
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


def run_quant(shapes: dict[str, Any], models: Sequence[str], formats: Sequence[str], sparsities: Sequence[float],
              batches: Sequence[int], group_size: int, copy_bw: float, dtype: torch.dtype, console: Any,
              deadline: float | None = None, quant_method: str = "rtn",
              kernel_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Rows of every (format, shape, projection, batch, sparsity, kernel); see the module docstring. int4 is
    quantized by ``quant_method`` (rtn, or hqq: float zero points; the bytes read are the same);
    ``kernel_names`` (``KERNEL_NAMES``) limits the kernels timed (None: all)."""
    from teal.kernels.tune import time_graph_us

    from teal.kernels.ops import cuda_kernel_available

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
                    for s, (name, kern) in product(sparsities, kernels):
                        row: dict[str, Any] = {"weights": fmt, "kernel": name,
                                               "group_size": group_size if fmt == "int4" else None,
                                               "quant_method": method,
                                               "model": model, "proj": proj, "K": k, "N": n, "splits": list(splits),
                                               "batch": batch, "sparsity": s, "code_bytes": code_bytes,
                                               "param_bytes": param_bytes, "bf16_weight_bytes": k * n * elem,
                                               "cublas_bf16_us": cublas_us}
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
