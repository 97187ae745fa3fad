"""Split-KV decode attention on the GPU: correctness, then the engine's old attention vs the new op.

Run once on the H200 (about 2 minutes, compile time included):

    PYTHONPATH=. python3 benchmarks/scripts/attention_gpu.py --json OUT.json

(a) Correctness, bf16, fresh random inputs, outputs poisoned (NaN) first: ``teal::decode_attention``
    (``decode_attention_triton``, default launch config) against a float64 reference for Llama-3-8B
    (Hq 32, Hkv 8, D 128) and Llama-2 (Hq 32, Hkv 32, D 128) heads, at L = 384 and 4096, n_valid = 1,
    200, L, with the causal mask and a sliding window of 128 positions; the engine's old attention
    (``teal.engine.model.decode_attention`` over the whole cache) is measured against the same reference
    for comparison. Each case is run again with NaN written into the cache past n_valid (the output must
    not change: those positions are never read), and once inside a CUDA graph captured at one n_valid
    and replayed at another (n_valid and the mask updated in place).
(b) Timing: median per call of CUDA-graph replays (``teal.kernels.tune.time_graph_us``), caches rotated
    over copies that together exceed the L2 (as the 32 layers of a decode step do): old path =
    ``torch.compile`` of the engine's ``decode_attention`` over the whole cache (what the compiled decode
    layer runs); new = the op at its default config and at a few other launch configs, at L = 384, 1024,
    4096 and n_valid = L / 2 and L.
Prints a table and writes everything to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from typing import Any, Callable

import torch

from teal.engine.model import decode_attention as engine_decode_attention
from teal.kernels.attention import (
    DEFAULT_CONFIG,
    AttentionConfig,
    attention_splits,
    decode_attention_reference,
    decode_attention_triton,
)
from teal.kernels.ops import sm_count
from teal.kernels.tune import time_graph_us

DTYPE = torch.bfloat16
# name -> (Hq, Hkv, D)
HEADS: dict[str, tuple[int, int, int]] = {"llama-3-8b": (32, 8, 128), "llama-2-7b": (32, 32, 128)}
CHECK_LENGTHS = (384, 4096)
CHECK_VALID = (1, 200, None)  # None: L
WINDOW = 128
MAX_REL_ERR = 1e-2  # bf16 (the kernel's own error is ~2e-3; see tests/test_kernels_attention.py)
TIME_LENGTHS = (384, 1024, 4096)
ROTATION_BYTES = 192 * 2**20  # cache copies per timed case together at least this (the H200's L2: 60 MB)
MAX_COPIES = 64
# launch configs timed besides the default
SWEEP = (AttentionConfig(block_l=64), AttentionConfig(waves=4), AttentionConfig(block_l=64, waves=4),
         AttentionConfig(block_l=16, waves=4))


def causal_mask(pos: int, length: int, window: int | None = None) -> torch.Tensor:
    """The engine's additive fp32 mask for a query at ``pos`` (``Engine.decode_masks``)."""
    p = torch.arange(length, device="cuda")
    visible = p <= pos
    if window is not None:
        visible &= p > pos - window
    return torch.where(visible, 0.0, -math.inf)


class Case:
    """Random q and caches of one head shape and cache length, and the scale."""

    def __init__(self, heads: str, length: int, gen: torch.Generator, copies: int = 1) -> None:
        self.n_heads, self.n_kv, self.head_dim = HEADS[heads]
        self.length = length
        self.scale = 1.0 / math.sqrt(self.head_dim)
        shape = (self.n_kv, length, self.head_dim)
        self.q = torch.randn(1, self.n_heads, self.head_dim, device="cuda", generator=gen).to(DTYPE)
        self.k = [torch.randn(shape, device="cuda", generator=gen).to(DTYPE) for _ in range(copies)]
        self.v = [torch.randn(shape, device="cuda", generator=gen).to(DTYPE) for _ in range(copies)]

    def poisoned_out(self) -> torch.Tensor:
        return torch.full((1, self.n_heads * self.head_dim), float("nan"), dtype=DTYPE, device="cuda")

    def new(self, i: int, mask: torch.Tensor, n_valid: torch.Tensor, out: torch.Tensor | None = None,
            config: AttentionConfig = DEFAULT_CONFIG) -> torch.Tensor:
        return decode_attention_triton(self.q, self.k[i], self.v[i], mask, n_valid, self.scale, out=out, config=config)

    def exact(self, mask: torch.Tensor, n_valid: torch.Tensor) -> torch.Tensor:
        return decode_attention_reference(self.q, self.k[0], self.v[0], mask, n_valid, self.scale,
                                          compute_dtype=torch.float64)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    if bool(torch.isnan(y).any()):
        return float("nan")
    return float((y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


# ------------------------------------------------------------------ (a) correctness
def check_case(heads: str, length: int, n_valid: int, window: int | None, gen: torch.Generator) -> dict[str, Any]:
    """Op vs float64 (poisoned output), the old path's error, and the op with NaN in the cache past n_valid."""
    case = Case(heads, length, gen)
    mask = causal_mask(n_valid - 1, length, window)
    nv = torch.tensor([n_valid], device="cuda")
    exact = case.exact(mask, nv)
    y = case.new(0, mask, nv, out=case.poisoned_out())
    err = rel_err(y, exact)
    old_err = rel_err(engine_decode_attention(case.q, case.k[0], case.v[0], mask, case.scale), exact)
    case.k[0][:, n_valid:] = float("nan")
    case.v[0][:, n_valid:] = float("nan")
    tail_ok = bool(torch.equal(case.new(0, mask, nv, out=case.poisoned_out()), y))
    ok = math.isfinite(err) and err <= MAX_REL_ERR and tail_ok
    return dict(check="op", heads=heads, L=length, n_valid=n_valid, window=window, rel_err=err, old_rel_err=old_err,
                tail_never_read=tail_ok, splits=attention_splits(case.n_kv, length, sm_count(y.device)), ok=ok)


def check_graph(heads: str, length: int, captured: int, replayed: int, gen: torch.Generator) -> dict[str, Any]:
    """The op captured in a CUDA graph at n_valid = ``captured``, replayed at ``replayed``."""
    case = Case(heads, length, gen)
    nv = torch.tensor([captured], device="cuda")
    mask = causal_mask(captured - 1, length)
    case.new(0, mask, nv)  # workspace and compile before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = case.new(0, mask, nv)
    y.fill_(float("nan"))
    nv.fill_(replayed)
    mask.copy_(causal_mask(replayed - 1, length))
    graph.replay()
    torch.cuda.synchronize()
    err = rel_err(y, case.exact(mask, nv))
    return dict(check="graph", heads=heads, L=length, n_valid=replayed, captured_n_valid=captured, rel_err=err,
                ok=math.isfinite(err) and err <= MAX_REL_ERR)


def run_checks(gen: torch.Generator) -> list[dict[str, Any]]:
    rows = []
    for heads in HEADS:
        for length in CHECK_LENGTHS:
            cases = [(n or length, None) for n in CHECK_VALID] + [(200, WINDOW), (length, WINDOW)]
            for n_valid, window in cases:
                rows.append(check_case(heads, length, n_valid, window, gen))
        rows.append(check_graph(heads, 4096, 4096, 200, gen))
        rows.append(check_graph(heads, 4096, 1, 3000, gen))
    for r in rows:
        print(f"  {r['check']:5} {r['heads']:10} L={r['L']:5} n={r['n_valid']:5} w={str(r.get('window')):4} "
              f"err {r['rel_err']:.2e} (old {r.get('old_rel_err', float('nan')):.2e}) {'ok' if r['ok'] else 'FAIL'}",
              flush=True)
    return rows


# ------------------------------------------------------------------ (b) timing
def time_case(heads: str, length: int, n_valid: int, gen: torch.Generator, old_fn: Callable[..., Any],
              configs: list[AttentionConfig], deadline: float) -> list[dict[str, Any]]:
    """Old path and the new op (each config) at one shape, cache length and n_valid."""
    n_heads, n_kv, head_dim = HEADS[heads]
    cache_bytes = 2 * n_kv * length * head_dim * DTYPE.itemsize  # K and V of one layer
    copies = max(2, min(MAX_COPIES, -(-ROTATION_BYTES // cache_bytes)))
    case = Case(heads, length, gen, copies)
    mask = causal_mask(n_valid - 1, length)
    nv = torch.tensor([n_valid], device="cuda")
    base = dict(heads=heads, L=length, n_valid=n_valid, copies=copies,
                read_bytes_old=cache_bytes, read_bytes_new=cache_bytes * n_valid // length)
    old_fn(case.q, case.k[0], case.v[0], mask, case.scale)  # compile outside the timed graph
    rows = [dict(base, path="old", us=time_graph_us(
        [lambda i=i: old_fn(case.q, case.k[i], case.v[i], mask, case.scale) for i in range(copies)]))]
    for config in configs:
        if time.time() > deadline and config != DEFAULT_CONFIG:
            continue
        us = time_graph_us([lambda i=i, c=config: case.new(i, mask, nv, config=c) for i in range(copies)])
        rows.append(dict(base, path="new", config=config._asdict(),
                         splits=attention_splits(n_kv, length, sm_count(nv.device), config), us=us))
    return rows


def summarize(rows: list[dict[str, Any]], bandwidth: float | None) -> list[dict[str, Any]]:
    """Per (heads, L, n_valid): old time, new at the default config, the best config, speed-ups."""
    out = []
    keys = sorted({(r["heads"], r["L"], r["n_valid"]) for r in rows if "us" in r})
    for key in keys:
        group = [r for r in rows if (r["heads"], r["L"], r["n_valid"]) == key and math.isfinite(r.get("us", math.nan))]
        old = [r["us"] for r in group if r["path"] == "old"]
        new = [r for r in group if r["path"] == "new"]
        if not old or not new:
            continue
        default = next((r for r in new if r["config"] == DEFAULT_CONFIG._asdict()), new[0])
        best = min(new, key=lambda r: r["us"])
        gbps = default["read_bytes_new"] / (default["us"] * 1e-6) / 1e9
        out.append(dict(heads=key[0], L=key[1], n_valid=key[2], old_us=old[0], new_us=default["us"],
                        best_us=best["us"], best_config=best["config"], speedup=old[0] / default["us"],
                        new_GBps=gbps, new_frac_copy_bw=gbps * 1e9 / bandwidth if bandwidth else None))
    return out


def _compiled_old() -> Callable[..., Any]:
    """The engine's attention compiled as the decode layer's inductor code (one compile per shape)."""
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(engine_decode_attention, fullgraph=True, dynamic=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", dest="json_path", required=True)
    parser.add_argument("--budget", type=float, default=150.0,
                        help="seconds after which only the default config is timed (default 150)")
    parser.add_argument("--no-sweep", action="store_true", help="time the default launch config only")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("attention_gpu.py needs a CUDA device", file=sys.stderr)
        return 2
    t0 = time.time()
    torch.backends.cuda.matmul.allow_tf32 = False
    data: dict[str, Any] = dict(script="benchmarks/scripts/attention_gpu.py", argv=sys.argv[1:],
                                device=torch.cuda.get_device_name(), torch=torch.__version__,
                                default_config=DEFAULT_CONFIG._asdict(), checks=[], timings=[], summary=[])

    def save() -> None:
        os.makedirs(os.path.dirname(os.path.abspath(args.json_path)), exist_ok=True)
        with open(args.json_path, "w") as fh:
            json.dump(data, fh, indent=1, default=str)

    try:
        from teal.bench.kernels import measure_copy_bandwidth

        data["copy_bandwidth_Bps"] = bw = measure_copy_bandwidth(nbytes=2**30)
        print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    except Exception:  # noqa: BLE001 - the table then has no bandwidth fraction
        bw = None
    gen = torch.Generator(device="cuda").manual_seed(0)
    print("(a) correctness", flush=True)
    try:
        data["checks"] = run_checks(gen)
    except Exception:  # noqa: BLE001
        data["checks_error"] = traceback.format_exc()[-3000:]
        print(data["checks_error"], flush=True)
    data["checks_passed"] = bool(data["checks"]) and all(r["ok"] for r in data["checks"])
    save()
    print(f"checks: {'all passed' if data['checks_passed'] else 'FAILURES'} ({time.time() - t0:.0f}s)", flush=True)
    print("(b) timing", flush=True)
    old_fn = _compiled_old()
    configs = [DEFAULT_CONFIG] + ([] if args.no_sweep else list(SWEEP))
    for heads in HEADS:
        for length in TIME_LENGTHS:
            for n_valid in (length // 2, length):
                try:
                    data["timings"].extend(time_case(heads, length, n_valid, gen, old_fn, configs, t0 + args.budget))
                except Exception:  # noqa: BLE001
                    data["timings"].append(dict(heads=heads, L=length, n_valid=n_valid, path="error",
                                                error=traceback.format_exc()[-1500:]))
                    print(data["timings"][-1]["error"], flush=True)
                data["summary"] = summarize(data["timings"], bw)
                save()
        print(f"  {heads} timed ({time.time() - t0:.0f}s)", flush=True)
    data["total_s"] = time.time() - t0
    save()
    print(f"\n{'heads':10} {'L':>5} {'n_valid':>7} {'old us':>7} {'new us':>7} {'x old':>6} {'GB/s':>6} {'best us':>7}"
          "  best config (block_l, waves)")
    for r in data["summary"]:
        cfg = r["best_config"]
        print(f"{r['heads']:10} {r['L']:5} {r['n_valid']:7} {r['old_us']:7.2f} {r['new_us']:7.2f} {r['speedup']:6.2f} "
              f"{r['new_GBps']:6.0f} {r['best_us']:7.2f}  ({cfg['block_l']}, {cfg['waves']})")
    if data["summary"]:
        per_layer = statistics.median(r["new_us"] for r in data["summary"] if r["heads"] == "llama-3-8b")
        print(f"llama-3-8b median new op per layer: {per_layer:.2f} us")
    print(f"total {data['total_s']:.0f}s; wrote {args.json_path}")
    return 0 if data["checks_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
