"""Measurements the benchmarks share: the device's copy bandwidth (the roofline's denominator), the bytes
one decode step reads (its numerator), and the median decode rate of a generator."""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from typing import Any

import torch

from teal.engine.generator import Generator
from teal.engine.model import PROJECTIONS, Engine


def measure_copy_bandwidth(nbytes: int = 2 * 2**30, warmup_s: float = 0.3) -> float:
    """Device-to-device copy bandwidth in bytes/s on the current CUDA device, counting bytes read plus
    bytes written. Copies for ``warmup_s`` first so that the clocks have left their idle state."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    deadline = time.perf_counter() + warmup_s
    while time.perf_counter() < deadline:
        dst.copy_(src)
        torch.cuda.synchronize()
    # Timed outside CUDA graphs: a captured copy becomes a memcpy node (copy engine), not a kernel.
    times = []
    for _ in range(15):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    us = statistics.median(times)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / (us * 1e-6)


def copy_bandwidth(device: torch.device) -> float:
    """Copy bandwidth of `device` in bytes/s (read + written): `measure_copy_bandwidth` on CUDA, a host
    memcpy elsewhere (CPU smoke runs)."""
    if device.type == "cuda":
        return measure_copy_bandwidth()
    src = torch.empty(2**27, dtype=torch.uint8).random_(0, 255)
    dst = torch.empty_like(src)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return 2 * src.numel() / statistics.median(times)


def bytes_per_token(engine: Engine, sparsity_per_proj: Mapping[str, float] | None, context: float) -> float:
    """Bytes one decode step of `engine` must read: its projection weights x (1 - sparsity), its lm_head
    rows, norms, the embedding row, and K and V of `context` positions in every layer. On a tensor-parallel
    shard (`teal.engine.tp`) the engine's config and lm_head are the rank's own, so this is per rank.
    With int8 / int4 weights (`Engine.quantize_weights`) a projection reads its surviving rows of codes and
    all its scales (and int4 zeros, `quant_param_bytes`): at the sparsities timed, nearly every group of
    128 rows keeps a survivor."""
    cfg = engine.config
    item = engine.embed.element_size()
    shapes = cfg.projection_shapes()
    fmt = getattr(engine, "weight_format", "bf16")
    row_bytes = {"bf16": item, "int8": 1, "int4": 0.5}[fmt]
    total = 0.0
    for i in range(cfg.n_layers):
        for p in PROJECTIONS:
            k, n = shapes[p]
            s = 0.0 if sparsity_per_proj is None else float(sparsity_per_proj.get(f"layers.{i}.{p}", 0.0))
            total += k * n * row_bytes * (1.0 - s)
            if fmt != "bf16":
                total += quant_param_bytes(fmt, k, n, engine.group_size, item)
        total += 2 * cfg.hidden * item
    total += engine.lm_head.numel() * item + 2 * cfg.hidden * item  # lm_head (rows), embedding row, final norm
    total += 2 * cfg.n_layers * cfg.kv_size * item * context
    return total


def quant_param_bytes(fmt: str, k: int, n: int, group_size: int, item: int) -> int:
    """Bytes of the scales (int8: one per output channel) or scales and zeros (int4: one pair per group of
    `group_size` inputs and output channel) of a [K, N] projection, each `item` bytes (`teal.quant`)."""
    if fmt == "int8":
        return n * item
    return 2 * (-(-k // group_size)) * n * item


def time_engine(gen: Generator, ids: torch.Tensor, new_tokens: int, repeats: int,
                keep_tokens: bool = False) -> dict[str, Any]:
    """Median decode tokens/s of greedy generation (graphs captured first, one warm-up run); `keep_tokens`:
    also every token of the last timed run (`tokens`)."""
    capture = gen.warmup(greedy=True)
    gen.generate(ids, max_new_tokens=new_tokens, stop=[])
    runs = [gen.generate(ids, max_new_tokens=new_tokens, stop=[]) for _ in range(repeats)]
    return {"tokens_per_s": statistics.median(r.tokens_per_s for r in runs),
            "tokens_per_s_runs": [round(r.tokens_per_s, 2) for r in runs],
            "ttft_s": statistics.median(r.prefill_s for r in runs), "capture_s": capture, "mode": gen.mode,
            "compile_error": gen.compile_error, "first_tokens": [int(t) for t in runs[-1].tokens[:16]],
            **({"tokens": [int(t) for t in runs[-1].tokens]} if keep_tokens else {})}
