"""``teal bench kernels``: the sparse GEMV kernel against cuBLAS and a naive TEAL-style kernel (GPU).

Per configuration (model shape, projection, batch, sparsity): a float64 correctness check on fresh
inputs, then the median time of the kernel, of dense ``torch.nn.functional.linear`` (cuBLAS) and of the
naive split-K kernel, each captured in a CUDA graph over weight copies rotated so that weights are
read from device memory (together well over the L2 size). Survivor masks (``masks``, one row per source)
are uniformly random, or drawn from a real model's keep profile stretched to the projection's width
(`teal.bench.masks`), over ``mask_inputs`` distinct inputs per timed graph (real masks: one profile layer
after another), with their imbalance over static channel splits. Effective bandwidth is the kept weight bytes,
``(1 - s) * K * N * elem``, over the time, as a fraction of the device-to-device copy bandwidth measured
in the same run. Run with ``python -m teal.bench.kernels --json PATH``.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import tempfile
import time
import traceback
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from teal.bench.masks import GROUP_SITE, MaskSource, imbalance, inputs_for_masks, sample_masks, token_rates
from teal.bench.results import git_commit, teal_environment, write_json
from teal.bench.timing import measure_copy_bandwidth
from teal.kernels import ops
from teal.kernels import configs as kernel_configs
from teal.kernels.configs import KernelConfig, batch_bucket, get_config
from teal.bench.naive import naive_sparse_linear
from teal.kernels.ops import pdl_mode
from teal.kernels.ops import (
    compact_input,
    dense_masked_linear,
    last_gather_branches,
    path_counts,
    sm_count,
    sparse_linear_triton,
)
from teal.kernels.tune import quantile_threshold, table_entry, time_graph_us, tune_shape

# name -> (projection, K, segment widths); the segments of one row share one launch.
SHAPES: dict[str, tuple[tuple[str, int, tuple[int, ...]], ...]] = {
    "llama-3-8b": (
        ("qkv", 4096, (4096, 1024, 1024)),
        ("o", 4096, (4096,)),
        ("gate_up", 4096, (14336, 14336)),
        ("down", 14336, (4096,)),
    ),
    "llama-2-7b": (
        ("qkv", 4096, (4096, 4096, 4096)),
        ("o", 4096, (4096,)),
        ("gate_up", 4096, (11008, 11008)),
        ("down", 11008, (4096,)),
    ),
    # one rank's shard of Llama-2-70B over two GPUs (teal.engine.tp): q|k|v and gate|up split by output
    # channels (32 of 64 query heads, 4 of 8 kv heads; 14336 of 28672), o and down by input channels
    "llama-2-70b-tp2": (
        ("qkv", 8192, (4096, 512, 512)),
        ("o", 4096, (8192,)),
        ("gate_up", 8192, (14336, 14336)),
        ("down", 14336, (8192,)),
    ),
    # Gemma 3 12B's text decoder (16 query heads, 8 kv heads of 256; hidden 3840; MLP 15360)
    "gemma-3-12b": (
        ("qkv", 3840, (4096, 2048, 2048)),
        ("o", 4096, (3840,)),
        ("gate_up", 3840, (15360, 15360)),
        ("down", 15360, (3840,)),
    ),
}
DEFAULT_SPARSITIES = (0.0, 0.25, 0.4, 0.5, 0.65, 0.8, 0.9)
DEFAULT_BATCHES = (1, 2, 4, 8)
ROTATION_BYTES = 192 * 2**20  # weight copies per shape total at least this (the H200's L2 is 60 MB)
MAX_REL_ERR = {torch.bfloat16: 1e-2, torch.float16: 5e-3, torch.float32: 1e-4}
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE = "cuda"
MASK_INPUTS = 32  # distinct masked inputs per timed graph (cycled over the rotated weight copies)
HEAD_DIM = {"llama-3-8b": 128, "llama-2-7b": 128, "llama-2-70b-tp2": 128, "gemma-3-12b": 256}  # o's input blocks


def masked_inputs(
    source: MaskSource, proj: str, k: int, batch: int, sparsity: float, n_inputs: int, dtype: torch.dtype,
    segments: int, device: torch.device | str, seed: int = 0, head_dim: int | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """``n_inputs`` inputs [batch, k] whose survivors under threshold 1.0 (one per segment) follow ``source``
    at ``sparsity``: input j draws its rows' masks from the profile's layer j (cycling), for the site that
    feeds ``proj`` (o's input stretched head by head with ``head_dim``). Returns (inputs, thresholds, all masks
    [n_inputs * batch, k])."""
    site = GROUP_SITE[proj]
    gen = torch.Generator().manual_seed(seed)
    layers = 1 if source.is_random else source.profile.n_layers
    masks = torch.empty(n_inputs, batch, k, dtype=torch.bool)
    used = range(min(layers, n_inputs))
    rows = [list(range(layer, n_inputs, layers)) for layer in used]
    quantiles = [source.rate_quantiles(site, layer, sparsity) for layer in used]
    rates = (token_rates(quantiles, [len(r) * batch for r in rows], 1.0 - sparsity, gen)
             if all(q is not None for q in quantiles) else [None] * len(rows))
    for layer, layer_rows, layer_rates in zip(used, rows, rates):
        p = source.probabilities(site, layer, k, sparsity, seed, head_dim)
        drawn = sample_masks(p, len(layer_rows) * batch, rates=layer_rates, generator=gen)
        masks[layer_rows] = drawn.view(len(layer_rows), batch, k)
    xs = [inputs_for_masks(m, dtype, gen).to(device) for m in masks]
    thr = [torch.ones(segments, dtype=torch.float32, device=device) for _ in xs]
    return xs, thr, masks.view(-1, k)


def _thresholds(x: torch.Tensor, sparsity: float, segments: int) -> torch.Tensor:
    return torch.full((segments,), quantile_threshold(x, sparsity), dtype=torch.float32, device=x.device)


def _reference64(x: torch.Tensor, w64: torch.Tensor, thr: torch.Tensor, splits: Sequence[int]) -> torch.Tensor:
    score = x.abs().float()
    outs, start = [], 0
    for j, width in enumerate(splits):
        xm = torch.where(score > thr[j], x.double(), 0.0)
        outs.append(xm @ w64[:, start : start + width])
        start += width
    return torch.cat(outs, dim=1)


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    if bool(torch.isnan(y).any()):
        return float("nan")
    return float((y.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def _sparsity_stats(xs: Sequence[torch.Tensor], thr: Sequence[torch.Tensor]) -> tuple[float, float]:
    """(fraction of entries zeroed, fraction of input rows some batch row keeps), over the copies."""
    zeroed, union = [], []
    for x, t in zip(xs, thr):
        keep = x.abs().float() > t[0]
        zeroed.append(1.0 - float(keep.float().mean()))
        union.append(float(keep.any(dim=0).float().mean()))
    return sum(zeroed) / len(zeroed), sum(union) / len(union)


def self_check(dtype: torch.dtype = torch.bfloat16) -> list[dict[str, Any]]:
    """Correctness of odd shapes, fp16, column scales and graph capture on the GPU (no timing)."""
    rows: list[dict[str, Any]] = []
    gen = torch.Generator(device="cuda").manual_seed(1)
    # (dtype, K, splits, batches, column scale, config): few compilations, every code path.
    compact = KernelConfig(block_n=128, block_r=32, split_k=4, compact=True)
    dot = KernelConfig(block_n=128, block_r=32, split_k=4, use_dot=True)
    fma = KernelConfig(block_n=64, block_r=8, split_k=2)
    gather = KernelConfig(block_n=256, block_r=32, split_k=4, num_stages=3, gather=True)
    gather_hand = KernelConfig(block_n=128, block_r=16, split_k=8, num_stages=1, gather=True)
    gather_always = KernelConfig(block_n=128, block_r=32, split_k=1, num_stages=4, gather=True, dense_above=1.0)
    cases = [
        (dtype, 1000, (1000, 1001, 1000), (1,), False, None),
        (dtype, 1000, (1000, 1001, 1000), (1,), True, compact),
        (dtype, 1000, (1000, 1001, 1000), (1, 3, 8), True, dot),
        (dtype, 1000, (1000, 1001, 1000), (3, 8), False, None),
        (torch.float16, 200, (301,), (1, 3), True, fma),
        (torch.float32, 200, (120, 181), (1, 3), False, dot),
        (torch.float32, 200, (120, 181), (1,), False, compact),
        (dtype, 1000, (1000, 1001, 1000), (1,), True, gather),
        (torch.float16, 1000, (1000, 1001, 1000), (1,), False, gather_hand),
        (torch.float16, 200, (301,), (1,), True, gather_always),
        (torch.float32, 200, (120, 181), (1,), False, gather),
        (dtype, 4096, (4096, 1024, 1024), (1,), False, gather),
        (dtype, 4096, (14336, 14336), (1,), True, gather_hand),
        (torch.float16, 14336, (4096,), (1,), False, gather_always),
    ]
    # The CUDA C++ kernel (batch 1, segment widths multiples of the 16-byte vector).
    cuda_small = KernelConfig(block_n=256, block_r=8, split_k=4, num_warps=8, cuda=True)
    cuda_wide = KernelConfig(block_n=512, block_r=4, split_k=2, num_warps=4, cuda=True)
    cuda_one = KernelConfig(block_n=256, block_r=16, split_k=1, num_warps=16, cuda=True)
    cuda_llama = KernelConfig(block_n=256, block_r=8, split_k=8, num_warps=16, cuda=True)
    cases += [
        (dtype, 1000, (1000, 1008, 1000), (1, 3, 8), False, cuda_small),
        (dtype, 1000, (1000, 1008, 1000), (1, 2), True, cuda_wide),
        (torch.float16, 200, (304,), (1, 5), True, cuda_small),
        (torch.float32, 200, (120, 184), (1, 4), False, cuda_one),
        (torch.float32, 200, (120, 184), (1,), True, cuda_wide),
        (dtype, 4096, (4096, 1024, 1024), (1, 8), True, cuda_llama),
        (dtype, 14336, (4096,), (1,), False, cuda_llama),
        (torch.float16, 4096, (14336, 14336), (1,), False, cuda_one),
    ]
    # ... and its tensor-core inner product (bf16 / fp16; steps of 16 listed rows, partial last steps).
    cuda_mma = KernelConfig(block_n=256, block_r=16, split_k=4, num_warps=8, cuda=True, use_dot=True)
    cuda_mma_small = KernelConfig(block_n=256, block_r=16, split_k=2, num_warps=4, cuda=True, use_dot=True)
    cases += [
        (dtype, 1000, (1000, 1008, 1000), (1, 2, 3, 8), True, cuda_mma),
        (torch.float16, 200, (304,), (2, 5), False, cuda_mma_small),
        (torch.float16, 1000, (1000, 1008), (4, 7), True, cuda_mma),
        (dtype, 4096, (4096, 1024, 1024), (4, 8), False, cuda_mma),
        (dtype, 14336, (4096,), (8,), True, cuda_mma),
    ]
    for case in cases:
        try:
            rows.extend(_self_check_case(gen, *case))
        except Exception:  # noqa: BLE001 - reported in the results, not fatal
            rows.append(dict(check=f"case {case[1:5]}", ok=False, error=traceback.format_exc()[-1500:]))
    try:
        rows.extend(_self_check_graph_compile(dtype))
    except Exception:  # noqa: BLE001
        rows.append(dict(check="graph/compile", ok=False, error=traceback.format_exc()[-1500:]))
    for check in (_self_check_cuda_glu, _self_check_cuda_graph):
        try:
            rows.extend(check(dtype))
        except Exception:  # noqa: BLE001
            rows.append(dict(check=check.__name__, ok=False, error=traceback.format_exc()[-1500:]))
    return rows


def _self_check_cuda_glu(dtype: torch.dtype) -> list[dict[str, Any]]:
    """The CUDA kernel's SiLU-gated input (down's product from the gate|up row) against float64 and against
    the Triton kernel's fused launch (same roundings of the gated input)."""
    from teal.kernels.ops import sparse_linear_glu_triton, silu_mul

    rows: list[dict[str, Any]] = []
    k, n = 3072, 1024
    w_t = (torch.randn(k, n, device="cuda") * k**-0.5).to(dtype)
    cfg = KernelConfig(block_n=256, block_r=8, split_k=8, num_warps=8, cuda=True)
    for s in (0.0, 0.5, 0.9):
        gate_up = torch.randn(1, 2 * k, device="cuda", dtype=dtype) * 2
        mid = silu_mul(gate_up)
        thr = _thresholds(mid, s, 1)
        before = ops.path_counts["cuda"]
        out = sparse_linear_glu_triton(gate_up, w_t, thr, config=cfg)
        took_cuda = ops.path_counts["cuda"] == before + 1
        triton = sparse_linear_glu_triton(gate_up, w_t, thr,
                                          config=KernelConfig(block_n=128, block_r=32, split_k=8))
        err = _rel_err(out, _reference64(mid, w_t.double(), thr, [n]))
        rows.append(dict(check="cuda_glu", sparsity=s, rel_err=err, took_cuda=took_cuda,
                         max_diff_vs_triton=float((out.float() - triton.float()).abs().max()),
                         ok=bool(took_cuda and err <= MAX_REL_ERR[dtype])))
    return rows


def _self_check_cuda_graph(dtype: torch.dtype) -> list[dict[str, Any]]:
    """The CUDA kernel captured once in a CUDA graph (fused q|k|v widths), replayed with new inputs and
    thresholds at s = 0, 0.5 and 0.9: each replay equals an eager call bit for bit (deterministic sums)."""
    rows: list[dict[str, Any]] = []
    splits = [4096, 1024, 1024]
    k, n = 4096, sum(splits)
    cfg = KernelConfig(block_n=256, block_r=8, split_k=8, num_warps=16, cuda=True)
    w_t = (torch.randn(k, n, device="cuda") * k**-0.5).to(dtype)
    static_x = torch.randn(1, k, device="cuda", dtype=dtype)
    static_thr = torch.full((3,), float("-inf"), device="cuda")
    sparse_linear_triton(static_x, w_t, static_thr, splits, config=cfg)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = sparse_linear_triton(static_x, w_t, static_thr, splits, config=cfg)
    for s in (0.0, 0.5, 0.9):
        x = torch.randn(1, k, device="cuda", dtype=dtype)
        thr = _thresholds(x, s, 3) * torch.linspace(1.0, 1.2, 3, device="cuda")
        static_x.copy_(x)
        static_thr.copy_(thr)
        graph.replay()
        torch.cuda.synchronize()
        replayed = static_y.clone()
        eager = sparse_linear_triton(x, w_t, thr, splits, config=cfg)
        err = _rel_err(replayed, _reference64(x, w_t.double(), thr, splits))
        rows.append(dict(check="cuda_graph", sparsity=s, rel_err=err,
                         ok=bool(torch.equal(replayed, eager) and err <= MAX_REL_ERR[dtype])))
    return rows


def _self_check_case(
    gen: torch.Generator,
    dt: torch.dtype,
    k: int,
    splits: tuple[int, ...],
    batches: tuple[int, ...],
    scaled: bool,
    config: KernelConfig | None,
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    n = sum(splits)
    device = gen.device
    w_t = torch.randn(k, n, device=device, generator=gen).to(dt)
    w64 = w_t.double()
    for batch in batches:
        for s in (0.0, 0.5, 0.99):
            x = torch.randn(batch, k, device=device, generator=gen).to(dt)
            scale = (torch.rand(len(splits), k, device=device, generator=gen) + 0.5) if scaled else None
            thr = _thresholds(x, s, len(splits)) * torch.linspace(1.0, 1.2, len(splits), device=device)
            out = torch.full((batch, n), float("nan"), dtype=dt, device=device)
            before = ops.path_counts["cuda"]
            sparse_linear_triton(x, w_t, thr, list(splits), scale, out=out, config=config)
            took_cuda = ops.path_counts["cuda"] == before + 1
            score = x.abs().float()
            outs, start = [], 0
            for j, width in enumerate(splits):
                sc = score if scale is None else score * scale[j]
                outs.append(torch.where(sc > thr[j], x.double(), 0.0) @ w64[:, start : start + width])
                start += width
            ref = torch.cat(outs, dim=1)
            err = _rel_err(out, ref)
            rows.append(dict(dtype=str(dt).replace("torch.", ""), K=k, splits=list(splits), batch=batch,
                             sparsity=s, col_scale=scaled, config=None if config is None else config.as_dict(),
                             rel_err=err, ok=bool(err <= MAX_REL_ERR[dt] and (took_cuda or not (config and config.cuda)))))
    return rows


def _self_check_graph_compile(dtype: torch.dtype) -> list[dict[str, Any]]:
    """The op inside a CUDA graph and under torch.compile(fullgraph=True)."""
    rows: list[dict[str, Any]] = []
    k, n = 512, 768
    w_t = torch.randn(k, n, device="cuda", dtype=dtype)
    x = torch.randn(2, k, device="cuda", dtype=dtype)
    thr = _thresholds(x, 0.5, 1)
    expect = torch.ops.teal.sparse_linear(x, w_t, thr, None, None)
    graph = torch.cuda.CUDAGraph()
    static_x = x.clone()
    with torch.cuda.graph(graph):
        static_y = torch.ops.teal.sparse_linear(static_x, w_t, thr, None, None)
    x2 = torch.randn_like(x)
    static_x.copy_(x2)
    graph.replay()
    torch.cuda.synchronize()
    ref2 = torch.ops.teal.sparse_linear(x2, w_t, thr, None, None)
    rows.append(dict(check="cuda_graph_replay", ok=bool(torch.equal(static_y, ref2))))
    try:
        from teal.kernels import sparse_linear

        compiled = torch.compile(lambda a: sparse_linear(a, w_t, thr), fullgraph=True, backend="aot_eager")
        rows.append(dict(check="torch_compile_fullgraph", ok=bool(torch.equal(compiled(x), expect))))
    except Exception as exc:  # noqa: BLE001 - reported, not fatal
        rows.append(dict(check="torch_compile_fullgraph", ok=False, error=repr(exc)[:300]))
    rows.extend(_self_check_gather_graph(dtype))
    return rows


def _self_check_gather_graph(
    dtype: torch.dtype, device: str = "cuda", splits: Sequence[int] = (4096, 1024, 1024)
) -> list[dict[str, Any]]:
    """The gather path (batch 1, fused q|k|v widths) captured once, replayed at s = 0, 0.5 and 0.9.

    Thresholds and input change in place between replays, so one graph crosses the on-device
    dense/gather switch; each replay must equal an eager call bit for bit and the float64 result to 1e-2.
    (Off CUDA, for a dry run under the Triton interpreter, "replay" is a plain call.)
    """
    rows: list[dict[str, Any]] = []
    splits = list(splits)
    k, n = splits[0], sum(splits)
    config = KernelConfig(block_n=256, block_r=32, split_k=4, num_stages=3, gather=True)
    w_t = (torch.randn(k, n, device=device) * k**-0.5).to(dtype)
    static_x = torch.randn(1, k, device=device, dtype=dtype)
    static_thr = torch.full((len(splits),), float("-inf"), device=device)
    static_y = sparse_linear_triton(static_x, w_t, static_thr, splits, config=config)  # workspace before capture
    graph = None
    if device == "cuda":
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = sparse_linear_triton(static_x, w_t, static_thr, splits, config=config)
    for s in (0.0, 0.5, 0.9, 0.0):
        x = torch.randn(1, k, device=device, dtype=dtype)
        thr = _thresholds(x, s, len(splits)) * torch.linspace(1.0, 1.2, len(splits), device=device)
        static_x.copy_(x)
        static_thr.copy_(thr)
        if graph is not None:
            graph.replay()
            torch.cuda.synchronize()
        else:
            static_y = sparse_linear_triton(static_x, w_t, static_thr, splits, config=config)
        replayed = static_y.clone()
        dense_flags = last_gather_branches(x.device).float().mean().item()
        eager = sparse_linear_triton(x, w_t, thr, splits, config=config)
        err = _rel_err(replayed, _reference64(x, w_t.double(), thr, splits))
        rows.append(dict(check="gather_cuda_graph", sparsity=s, rel_err=err, dense_branch_fraction=dense_flags,
                         ok=bool(torch.equal(replayed, eager) and err <= MAX_REL_ERR[dtype])))
    return rows


def run(
    shapes: Sequence[str] = ("llama-3-8b", "llama-2-7b"),
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    batches: Sequence[int] = DEFAULT_BATCHES,
    json_path: str | os.PathLike[str] | None = None,
    *,
    dtype: str = "bf16",
    tune: bool = False,
    tune_batches: Sequence[int] = (1,),
    tune_sparsities: Sequence[float] = (0.0, 0.5),
    tune_families: str = "all",
    table_out: str | os.PathLike[str] | None = None,
    time_budget_s: float | None = None,
    check: bool = True,
    seed: int = 0,
    command: str | None = None,
    console: Any = None,
    masks: Sequence[MaskSource] = (MaskSource("random"),),
    mask_inputs: int = MASK_INPUTS,
    weights: Sequence[str] = ("bf16",),
    group_size: int = 128,
    quant_method: str = "rtn",
    quant_kernels: Sequence[str] | None = None,
    quant_configs: str = "default",
) -> dict[str, Any]:
    """Benchmark every (shape, projection, batch, sparsity); returns (and optionally writes) the results.

    ``tune``: time candidate configurations per shape and batch bucket of ``tune_batches`` first (at
    ``tune_sparsities``; ``tune_families`` as in ``teal.kernels.tune.candidate_configs``) and use the winners; ``table_out`` receives them as
    a table for ``$TEAL_KERNEL_CONFIGS``. ``time_budget_s``: projections not
    started by then are skipped (listed under ``skipped``). ``masks``: survivor-mask sources, each timed at
    every sparsity > 0 (one row each, field ``masks``; at s = 0 nothing is masked: one row, labelled random).
    started by then are skipped (listed under ``skipped``). ``weights``: the formats to time; "bf16" is the
    sparse kernel above, "int8" / "int4" the fused quantized kernel (`teal.bench.quant_kernels`, int4 in groups
    of ``group_size``), whose rows go to ``quant_results`` (each with its ``weights``; int4 quantized by
    ``quant_method``, rtn or hqq, field ``quant_method``); ``quant_kernels`` limits which quantized kernels are
    timed (`quant_kernels.KERNEL_NAMES`; None: all); ``quant_configs`` "sweep" times the CUDA quantized kernel at
    every candidate configuration and prints `configs.TUNED_QUANT_CUDA` entries (`quant_kernels.sweep_entries`).
    """
    if not torch.cuda.is_available():
        raise RuntimeError("teal bench kernels needs a CUDA GPU; none is visible to torch")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise ValueError(f"unknown shape(s) {unknown}; known: {sorted(SHAPES)}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    masks = list(masks)
    for source in masks:
        source.check_levels(list(sparsities))
    torch_dtype = _DTYPES[dtype]
    from rich.console import Console

    console = console or Console(width=160)
    torch.manual_seed(seed)
    device = torch.device(DEVICE)
    sms = sm_count(device)
    props = torch.cuda.get_device_properties(device)
    t_start = time.perf_counter()
    copy_bw = measure_copy_bandwidth()
    console.print(f"[bold]{props.name}[/]: {sms} SMs, copy bandwidth {copy_bw / 1e12:.3f} TB/s")

    import triton

    data: dict[str, Any] = {
        "benchmark": "kernels",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": props.name,
        "sm_count": sms,
        "l2_bytes": getattr(props, "L2_cache_size", None),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "environment": teal_environment(),
        "command": command or "teal.bench.kernels.run()",
        "dtype": dtype,
        "copy_bandwidth_start_Bps": copy_bw,
        "copy_bandwidth_Bps": copy_bw,
        "timing": "median per call of CUDA-graph replays over rotated weight copies (>= 192 MiB per shape)",
        "programmatic_dependent_launch": pdl_mode(device),
        "masks": [m.spec for m in masks],
        "mask_inputs": mask_inputs,
        "mask_profiles": {m.spec: m.profile.info for m in masks if m.profile is not None},
        "tuning": [],
        "results": [],
    }
    if check:
        data["self_check"] = self_check(torch_dtype)
        bad = [r for r in data["self_check"] if not r["ok"]]
        console.print(f"self-check: {len(data['self_check']) - len(bad)}/{len(data['self_check'])} ok")
        for r in bad[:10]:
            console.print(f"  [red]FAILED[/] {r}")

    tuned_keys: set[tuple[int, int, int, str]] = set()
    data["skipped"] = []
    data["weights"] = list(weights)
    for model in (shapes if "bf16" in weights else ()):
        for proj, k, splits in SHAPES[model]:
            if time_budget_s is not None and time.perf_counter() - t_start > time_budget_s:
                data["skipped"].append(f"{model}/{proj}")
                console.print(f"[yellow]time budget reached[/]: skipped {model} {proj}")
                continue
            n = sum(splits)
            elem = torch.finfo(torch_dtype).bits // 8
            weight_bytes = k * n * elem
            copies = max(2, math.ceil(ROTATION_BYTES / weight_bytes))
            ws = [(torch.randn(n, k, device=device) * k**-0.5).to(torch_dtype) for _ in range(copies)]
            w_ts = [w.t().contiguous() for w in ws]
            w64 = w_ts[0].double()
            for batch in batches:
                key = (k, n, batch_bucket(batch), "bf16")
                tune_this = batch_bucket(batch) in {batch_bucket(b) for b in tune_batches}
                if tune and key not in tuned_keys and tune_this:
                    try:
                        res = tune_shape(w_ts, splits, batch, sm_count=sms, sparsities=tuple(tune_sparsities),
                                         families=tune_families)
                        # the winner goes where get_config looks first for its kind
                        if res.best.cuda:
                            kernel_configs.TUNED_CUDA[key] = res.best
                        else:
                            kernel_configs.TUNED[key] = res.best
                            kernel_configs.TUNED_CUDA.pop(key, None)
                        kernel_configs.TUNED_CUDA_DENSE.pop(key, None)
                        if res.best_dense is not None:
                            kernel_configs.TUNED_CUDA_DENSE[key] = res.best_dense
                        tuned_keys.add(key)
                        data["tuning"].append(dict(
                            K=k, N=n, bucket=key[2], best=res.best.as_dict(), entry=table_entry(res),
                            best_dense=None if res.best_dense is None else res.best_dense.as_dict(),
                            dense_entry=table_entry(res, "dense"), times_us=res.times_us,
                            sparsities=list(res.sparsities)))
                        console.print(f"tuned K={k} N={n} B<={key[2]}: {res.best}")
                    except Exception:  # noqa: BLE001 - keep benchmarking with the table/heuristic
                        console.print(f"[red]tuning failed[/] K={k} N={n} B={batch}\n{traceback.format_exc()}")
                xs = [torch.randn(batch, k, device=device, dtype=torch_dtype) for _ in range(copies)]
                cublas_us = time_graph_us([lambda x=x, w=w: F.linear(x, w) for x, w in zip(xs, ws)])
                half = [_thresholds(x, 0.5, len(splits)) for x in xs]
                fallback_us = time_graph_us([
                    lambda x=x, w=w, t=t: dense_masked_linear(x, w, t, list(splits), None)
                    for x, w, t in zip(xs, w_ts, half)
                ])
                for s, source in [(s, m) for s in sparsities for m in (masks if s > 0 else [MaskSource("random")])]:
                    # s = 0 at batch 1: the kernel as a dense product, the engine's dense groups (their regime)
                    regime = "dense" if s == 0 and batch_bucket(batch) == 1 else "sparse"
                    config = get_config(k, n, batch, torch_dtype, sms, cuda_ok=ops.cuda_kernel_available(device),
                                        regime=regime)
                    row: dict[str, Any] = dict(weights="bf16", model=model, proj=proj, K=k, N=n, splits=list(splits), batch=batch,
                                               sparsity=s, masks=source.spec, weight_bytes=weight_bytes,
                                               config=config.as_dict(), regime=regime, cublas_us=cublas_us,
                                               dense_fallback_us=fallback_us)
                    try:
                        # Correctness on a fresh input, output poisoned first.
                        xc = torch.randn(batch, k, device=device, dtype=torch_dtype)
                        tc = _thresholds(xc, s, len(splits))
                        out = torch.full((batch, n), float("nan"), dtype=torch_dtype, device=device)
                        before = dict(path_counts)
                        sparse_linear_triton(xc, w_ts[0], tc, list(splits), out=out, regime=regime)
                        row["path"] = next((p for p in path_counts if path_counts[p] != before.get(p, 0)), "?")
                        if config.gather and batch == 1:
                            row["path"] = "gather"
                            row["dense_branch_fraction"] = float(last_gather_branches(device).float().mean())
                        ref = _reference64(xc, w64, tc, splits)
                        row["rel_err"] = _rel_err(out, ref)
                        row["naive_rel_err"] = _rel_err(naive_sparse_linear(xc, w_ts[0], tc, splits), ref)
                        if s > 0:  # inputs whose survivors follow the mask source
                            txs, thr, drawn = masked_inputs(source, proj, k, batch, s, max(copies, mask_inputs),
                                                            torch_dtype, len(splits), device, seed,
                                                            HEAD_DIM.get(model))
                            row["mask_imbalance"] = imbalance(drawn)
                        else:
                            txs, thr = xs, [_thresholds(x, s, len(splits)) for x in xs]
                        w_inputs = [w_ts[j % copies] for j in range(len(txs))]
                        row["timed_inputs"] = len(txs)
                        row["measured_sparsity"], row["union_density"] = _sparsity_stats(txs, thr)
                        us = time_graph_us([
                            lambda x=x, w=w, t=t: torch.ops.teal.sparse_linear(x, w, t, list(splits), None, regime)
                            for x, w, t in zip(txs, w_inputs, thr)
                        ])
                        naive_us = time_graph_us([
                            lambda x=x, w=w, t=t: naive_sparse_linear(x, w, t, splits) for x, w, t in zip(txs, w_inputs, thr)
                        ], min_calls=8, replays=10)
                        row.update(us=us, naive_us=naive_us)
                        if config.gather and batch == 1:  # phase A alone
                            row["compact_us"] = time_graph_us([
                                lambda x=x, t=t: compact_input(x, t, None, len(splits)) for x, t in zip(txs, thr)
                            ])
                    except Exception:  # noqa: BLE001 - one broken row must not lose the run
                        row["error"] = traceback.format_exc()[-2000:]
                        console.print(f"[red]error[/] {model} {proj} B={batch} s={s} {source.spec}\n{row['error']}")
                    data["results"].append(row)
                del xs
            del ws, w_ts, w64
            torch.cuda.empty_cache()
            console.print(f"{model} {proj} done at {time.perf_counter() - t_start:.0f} s")
            if json_path is not None:  # keep what is measured so far if the run is cut short
                for row in data["results"]:
                    _derive(row, copy_bw)
                write_json(data, json_path)
    if table_out is not None and tuned_keys:
        write_json(kernel_configs.table_to_json(
            {key: kernel_configs.TUNED_CUDA.get(key) or kernel_configs.TUNED[key] for key in sorted(tuned_keys)},
            {key: kernel_configs.TUNED_CUDA_DENSE[key] for key in sorted(tuned_keys)
             if key in kernel_configs.TUNED_CUDA_DENSE}),
            table_out)
    quant_formats = [w for w in weights if w != "bf16"]
    if quant_formats:
        from teal.bench import quant_kernels as quant_bench

        deadline = None if time_budget_s is None else t_start + time_budget_s
        data["quant_results"] = quant_bench.run_quant(SHAPES, shapes, quant_formats, sparsities, batches, group_size,
                                                      copy_bw, torch_dtype, console, deadline,
                                                      quant_method=quant_method, kernel_names=quant_kernels,
                                                      configs=quant_configs)
        data["quant_targets"] = quant_bench.quant_targets(data["quant_results"])
        quant_bench.print_quant(data["quant_results"], console)
        if quant_configs == "sweep":
            data["quant_sweep"] = quant_bench.sweep_entries(data["quant_results"])
            for e in data["quant_sweep"]:
                console.print(f"sweep {e['weights']} K={e['K']} N={e['N']} B<={e['bucket']}: best {e['best']} "
                              f"{e['best_us']:.1f} us, dispatch {e['default_us']:.1f} us"
                              + (f"\n    {e['entry']}" if "entry" in e else " (no entry)"))
            if table_out is not None:
                write_json(quant_bench.sweep_table(data["quant_sweep"]), table_out)
                console.print(f"sweep winners written to {table_out}: use them with "
                              f"{kernel_configs.QUANT_CONFIGS_ENV}={table_out}")
        bad = [t for t in data["quant_targets"] if not t["ok"]]
        console.print(f"quantized kernel within {quant_bench.REL_ERR_BOUND:g} of float64: "
                      f"{len(data['quant_targets']) - len(bad)}/{len(data['quant_targets'])}")
    # Copy bandwidth again at the end; ratios use the higher of the two readings.
    copy_end = measure_copy_bandwidth()
    data["copy_bandwidth_end_Bps"] = copy_end
    data["copy_bandwidth_Bps"] = copy_bw = max(copy_bw, copy_end)
    for row in data.get("quant_results", []):
        if "us" in row:
            row.update(ideal_us=row["bytes_read"] / copy_bw * 1e6,
                       eff_bw_frac=row["bytes_read"] / (row["us"] * 1e-6) / copy_bw)
    for row in data["results"]:
        _derive(row, copy_bw)
    data["targets"] = check_targets(data["results"])
    data["mask_comparison"] = mask_comparison(data["results"])
    _print_results(data, console)
    if json_path is not None:
        write_json(data, json_path)
    return data


def _derive(row: dict[str, Any], copy_bw: float) -> None:
    """Bandwidth fractions and speedups of one timed row, against ``copy_bw`` bytes/s."""
    if "us" not in row:
        return
    weight_bytes, us = row["weight_bytes"], row["us"]
    kept_bytes = (1.0 - row["measured_sparsity"]) * weight_bytes
    row.update(
        ideal_us=kept_bytes / copy_bw * 1e6,
        eff_bw_frac=kept_bytes / (us * 1e-6) / copy_bw,
        union_bw_frac=row["union_density"] * weight_bytes / (us * 1e-6) / copy_bw,
        speedup_vs_cublas=row["cublas_us"] / us,
        speedup_vs_naive=row["naive_us"] / us,
        cublas_bw_frac=weight_bytes / (row["cublas_us"] * 1e-6) / copy_bw,
    )
    for key in [key for key in row if key.endswith("_us") and key not in ("us", "naive_us", "cublas_us", "ideal_us",
                                                                           "dense_fallback_us", "compact_us")]:
        row[f"speedup_vs_{key[:-3]}"] = row[key] / us


def check_targets(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The H200 batch-1 targets: bandwidth at s <= 0.65, parity at s = 0, 1.9x at s = 0.5, accuracy."""
    out = []
    for r in rows:
        if r.get("batch") != 1 or "us" not in r:
            continue
        name = f"{r['model']}/{r['proj']} s={r['sparsity']}" + _masks_label(r)
        square = r["K"] == 4096 and r["N"] == 4096
        if r["sparsity"] <= 0.65:
            goal = 0.65 if square else 0.80
            out.append(dict(check="eff_bw_frac", case=name, value=r["eff_bw_frac"], goal=goal,
                            ok=r["eff_bw_frac"] >= goal))
        if r["sparsity"] == 0:
            out.append(dict(check="not_slower_than_cublas", case=name, value=r["speedup_vs_cublas"], goal=1.0,
                            ok=r["speedup_vs_cublas"] >= 1.0))
        if r["sparsity"] == 0.5:
            out.append(dict(check="speedup_vs_cublas_at_0.5", case=name, value=r["speedup_vs_cublas"], goal=1.9,
                            ok=r["speedup_vs_cublas"] >= 1.9))
    for r in rows:
        if "rel_err" in r:
            ok = r["rel_err"] <= 1e-2
            if not ok:
                out.append(dict(check="rel_err", case=f"{r['model']}/{r['proj']} B={r['batch']} s={r['sparsity']}"
                                                      + _masks_label(r),
                                value=r["rel_err"], goal=1e-2, ok=False))
    return out


def _masks_label(row: dict[str, Any]) -> str:
    masks = row.get("masks", "random")
    return "" if masks == "random" else f" masks={masks}"


def mask_comparison(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, projection, batch, sparsity > 0): each non-random mask source's time against the random
    masks' of the same run (``us_ratio`` > 1: slower on the real pattern), with both measured sparsities and
    the survivor imbalance over 132 static slices."""
    timed = {(r["model"], r["proj"], r["batch"], r["sparsity"], r.get("masks", "random")): r
             for r in rows if "us" in r and r["sparsity"] > 0}
    out = []
    for (model, proj, batch, s, masks), r in timed.items():
        base = timed.get((model, proj, batch, s, "random"))
        if masks == "random" or base is None:
            continue
        out.append(dict(model=model, proj=proj, batch=batch, sparsity=s, masks=masks, us=r["us"], random_us=base["us"],
                        us_ratio=r["us"] / base["us"], measured_sparsity=r["measured_sparsity"],
                        random_measured_sparsity=base["measured_sparsity"],
                        imbalance_132=r["mask_imbalance"].get("132", {}).get("max_over_mean"),
                        random_imbalance_132=base["mask_imbalance"].get("132", {}).get("max_over_mean")))
    return out


def _print_results(data: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    copy_tbps = data["copy_bandwidth_Bps"] / 1e12
    table = Table(title=f"sparse GEMV on {data['device']} ({data['dtype']}), copy {copy_tbps:.2f} TB/s")
    cols = ["model", "proj", "B", "s", "masks", "us", "cuBLAS", "naive", "phase A", "eff bw",
            "x cuBLAS", "x naive", "rel err", "path"]
    for col in cols:
        table.add_column(col, justify="right")
    for r in data["results"]:
        if "us" not in r:
            table.add_row(r["model"], r["proj"], str(r["batch"]), f"{r['sparsity']:.2f}", r.get("masks", "random"),
                          "error", *[""] * (len(cols) - 6))
            continue
        table.add_row(
            r["model"], r["proj"], str(r["batch"]), f"{r['sparsity']:.2f}", r.get("masks", "random"), f"{r['us']:.1f}",
            f"{r['cublas_us']:.1f}",
            f"{r['naive_us']:.1f}", f"{r['compact_us']:.1f}" if "compact_us" in r else "",
            f"{r['eff_bw_frac']:.0%}", f"{r['speedup_vs_cublas']:.2f}", f"{r['speedup_vs_naive']:.2f}",
            f"{r['rel_err']:.1e}", r.get("path", "?"),
        )
    console.print(table)
    for line in compact_summary(data):
        print(line, flush=True)
    for c in data.get("mask_comparison", []):
        print(f"masks {c['masks']} vs random: {c['model']} {c['proj']} B={c['batch']} s={c['sparsity']:g}: "
              f"{c['us']:.1f} vs {c['random_us']:.1f} us (x{c['us_ratio']:.3f}), measured sparsity "
              f"{c['measured_sparsity']:.4f} vs {c['random_measured_sparsity']:.4f}, busiest of 132 slices "
              f"{c['imbalance_132']:.2f} vs {c['random_imbalance_132']:.2f} x mean", flush=True)
    if data["tuning"]:
        console.print("tuned table entries (teal/kernels/configs.py TUNED, or TUNED_CUDA for cuda=True):")
        for t in data["tuning"]:
            print(t["entry"], flush=True)
        dense_entries = [t["dense_entry"] for t in data["tuning"] if t.get("dense_entry")]
        if dense_entries:
            console.print("dense regime (TUNED_CUDA_DENSE: the kernel as a dense product, every threshold -inf):")
            for entry in dense_entries:
                print(entry, flush=True)
    failed = [t for t in data["targets"] if not t["ok"]]
    console.print(f"targets: {len(data['targets']) - len(failed)}/{len(data['targets'])} met")
    for t in failed:
        console.print(f"  missed {t['check']} {t['case']}: {t['value']:.3g} (goal {t['goal']})")


def compact_summary(data: dict[str, Any]) -> list[str]:
    """One line per (model, projection, batch, mask source): times in us per sparsity (and the gather path's
    phase A)."""
    groups: dict[tuple[str, str, int, str], list[dict[str, Any]]] = {}
    for r in data.get("results", []):
        groups.setdefault((r["model"], r["proj"], r["batch"], _masks_label(r)), []).append(r)
    lines = []
    for (model, proj, batch, label), rows in groups.items():
        rows = sorted(rows, key=lambda r: r["sparsity"])
        timed = [r for r in rows if "us" in r]
        if not timed:
            lines.append(f"{model} {proj} B={batch}{label}: no timed rows")
            continue
        head = f"{model} {proj} {rows[0]['K']}x{rows[0]['N']} B={batch}{label} cuBLAS {timed[0]['cublas_us']:.1f}"
        cells = [f"s={r['sparsity']:g}: {r['us']:.1f}" + (f"/A {r['compact_us']:.1f}" if "compact_us" in r else "")
                 for r in timed]
        lines.append(head + " | " + " | ".join(cells))
    return lines


def plot(data: dict[str, Any], out_png: str | os.PathLike[str]) -> None:
    """Time vs sparsity per projection at the smallest batch: kernel, naive, cuBLAS, ideal (1 - s) line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data.get("results", []) if "us" in r]
    first = data.get("masks", ["random"])[0]
    rows = [r for r in rows if r["sparsity"] == 0 or r.get("masks", "random") == first]  # the first source's
    if not rows:
        raise ValueError("plot: the data holds no timed results")
    batch = min(r["batch"] for r in rows)
    panels: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        if r["batch"] == batch:
            panels.setdefault((r["model"], r["proj"]), []).append(r)
    cols = min(4, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    copy_bw = data["copy_bandwidth_Bps"]
    for ax, ((model, proj), pts) in zip(axes.flat, sorted(panels.items())):
        pts = sorted(pts, key=lambda r: r["sparsity"])
        s = [r["sparsity"] for r in pts]
        wb = pts[0]["weight_bytes"]
        ax.plot(s, [r["us"] for r in pts], "o-", label="teal kernel")
        ax.plot(s, [r["naive_us"] for r in pts], "s--", label="naive split-K")
        ax.axhline(pts[0]["cublas_us"], color="gray", ls=":", label="cuBLAS dense")
        ax.plot(s, [(1 - v) * wb / copy_bw * 1e6 for v in s], "k-", lw=0.8, label="ideal (1-s) at copy bw")
        ax.set_title(f"{model} {proj} {pts[0]['K']}x{pts[0]['N']}", fontsize=9)
        ax.set_xlabel("sparsity")
        ax.set_ylabel("time (us)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"sparse GEMV, batch {batch}, {data.get('device', '')} ({data.get('dtype', '')})", fontsize=10)
    fig.tight_layout()
    out_png = os.fspath(out_png)
    folder = os.path.dirname(os.path.abspath(out_png))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=folder)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, out_png)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


__all__ = ["SHAPES", "check_targets", "compact_summary", "plot", "run", "self_check"]
