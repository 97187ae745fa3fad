"""Split-KV decode attention on the GPU: correctness and timing of every kernel variant against the engine's
old attention (``torch.compile`` of bmm + softmax + bmm over the whole cache).

Run once on the H200 (under 3 minutes, compile time included):

    PYTHONPATH=. python3 benchmarks/scripts/attention_gpu.py --json OUT.json --table-out TABLE.json

(0) The Triton kernels of every variant and shape are compiled first by ``--jobs`` worker processes
    (into Triton's on-disk cache), so that compiling does not serialise the run.
(a) Correctness, bf16, fresh random inputs, outputs poisoned (NaN) first, every variant of ``VARIANTS``
    (``decode_attention_triton`` with that config): against a float64 reference for Llama-3-8B (Hq 32,
    Hkv 8, D 128) and Llama-2 (Hq 32, Hkv 32, D 128) heads, at L = 384 and 4096, n_valid = 1, 200, L,
    with the causal mask and a sliding window of 128 positions; the engine's old attention is measured
    against the same reference for comparison. Each case is run again with NaN written into the cache
    past n_valid (the output must not change: those positions are never read), and every variant once
    inside a CUDA graph captured at one n_valid and replayed at another (n_valid and the mask updated in
    place).
(b) Timing: median per call of CUDA-graph replays (``teal.kernels.tune.time_graph_us``), caches rotated
    over copies that together exceed the L2 (as the 32 layers of a decode step do): old path vs every
    variant at L = 384, 1024, 4096 and n_valid = L / 2 and L. Llama-3-8B heads first; past ``--budget``
    seconds only the default config and the best variant so far of each (heads, L) are timed.
Prints a table and writes everything to ``--json``; the winner per (heads, L) (least time summed over the
two n_valid) to ``--table-out``, with ``config_table``: the Llama-3-8B winners as rows of
``teal.kernels.attention.CONFIG_TABLE``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
import traceback
from typing import Any, Callable

import torch

from teal.engine.model import decode_attention as engine_decode_attention
from teal.kernels.attention import (
    AttentionConfig,
    attention_splits,
    decode_attention_reference,
    decode_attention_triton,
    default_config,
)
from teal.kernels.ops import sm_count
from teal.kernels.tune import time_graph_us

DTYPE = torch.bfloat16
# name -> (Hq, Hkv, D)
HEADS: dict[str, tuple[int, int, int]] = {"llama-3-8b": (32, 8, 128), "llama-2-7b": (32, 32, 128)}
TABLE_HEADS = "llama-3-8b"  # whose winners become CONFIG_TABLE rows
CHECK_LENGTHS = (384, 4096)
CHECK_VALID = (1, 200, None)  # None: L
WINDOW = 128
MAX_REL_ERR = 1e-2  # bf16 (the kernel's own error is ~2e-3; see tests/test_kernels_attention.py)
TIME_LENGTHS = (384, 1024, 4096)
ROTATION_BYTES = 192 * 2**20  # cache copies per timed case together at least this (the H200's L2: 60 MB)
MAX_COPIES = 64
DEFAULT = "default"
# Launch configs checked and timed: name -> config (block length, w: waves, nw: warps). The sweep that chose
# the table (2026-11-29-h200-attention-variants.json) also had a one-launch "ticket" merge, fp32
# multiply-and-sum products and K/V prefetch; they lost and are deleted (benchmarks/notes/paths.md).
VARIANTS: dict[str, AttentionConfig] = {
    "16-nw1": AttentionConfig(block_l=16, num_warps=1),
    "16-nw2": AttentionConfig(block_l=16, num_warps=2),
    "32": AttentionConfig(),
    "64": AttentionConfig(block_l=64),
    "64-w1": AttentionConfig(block_l=64, waves=1),
    "128-nw8": AttentionConfig(block_l=128, num_warps=8),
}


def causal_mask(pos: int, length: int, window: int | None = None) -> torch.Tensor:
    """The engine's additive fp32 mask for a query at ``pos`` (``Engine.decode_masks``)."""
    p = torch.arange(length, device="cuda")
    visible = p <= pos
    if window is not None:
        visible &= p > pos - window
    return torch.where(visible, 0.0, -math.inf)


def variant_config(name: str, length: int) -> AttentionConfig:
    """The config of variant ``name``; ``DEFAULT``: the op's own (``default_config``)."""
    return default_config(length) if name == DEFAULT else VARIANTS[name]


class Case:
    """Random q and caches of one head shape and cache length, and the scale."""

    def __init__(self, heads: str, length: int, gen: torch.Generator | None, copies: int = 1) -> None:
        self.n_heads, self.n_kv, self.head_dim = HEADS[heads]
        self.length = length
        self.scale = 1.0 / math.sqrt(self.head_dim)
        shape = (self.n_kv, length, self.head_dim)
        self.q = torch.randn(1, self.n_heads, self.head_dim, device="cuda", generator=gen).to(DTYPE)
        self.k = [torch.randn(shape, device="cuda", generator=gen).to(DTYPE) for _ in range(copies)]
        self.v = [torch.randn(shape, device="cuda", generator=gen).to(DTYPE) for _ in range(copies)]

    def poisoned_out(self) -> torch.Tensor:
        return torch.full((1, self.n_heads * self.head_dim), float("nan"), dtype=DTYPE, device="cuda")

    def new(self, i: int, mask: torch.Tensor, n_valid: torch.Tensor, variant: str,
            out: torch.Tensor | None = None) -> torch.Tensor:
        return decode_attention_triton(self.q, self.k[i], self.v[i], mask, n_valid, self.scale, out=out,
                                       config=variant_config(variant, self.length))

    def exact(self, mask: torch.Tensor, n_valid: torch.Tensor) -> torch.Tensor:
        return decode_attention_reference(self.q, self.k[0], self.v[0], mask, n_valid, self.scale,
                                          compute_dtype=torch.float64)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    if bool(torch.isnan(y).any()):
        return float("nan")
    return float((y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


# ------------------------------------------------------------------ (0) compiling in worker processes
def _compile_worker(jobs: list[tuple[str, int, str]]) -> int:
    """Runs each (heads, L, variant) once on zeros: Triton compiles it into its on-disk cache."""
    for heads, length, variant in jobs:
        case = Case(heads, length, None)
        decode_attention_triton(case.q, case.k[0], case.v[0], torch.zeros(length, device="cuda"),
                                torch.tensor([length], device="cuda"), case.scale,
                                config=variant_config(variant, length))
    torch.cuda.synchronize()
    return len(jobs)


def precompile(variants: list[str], workers: int, timeout: float) -> float:
    """Compiles every variant at every (heads, L) in ``workers`` spawned processes (giving up after ``timeout``
    seconds); returns the seconds taken."""
    t0 = time.time()
    jobs = [(heads, length, v) for v in variants for heads in HEADS for length in TIME_LENGTHS]
    chunks = [jobs[i::workers] for i in range(workers)]
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        done = sum(pool.map(_compile_worker, [c for c in chunks if c], timeout=timeout))
    finally:  # on a timeout or error, go on without waiting (what did not compile compiles when first run)
        pool.shutdown(wait=False, cancel_futures=True)
    print(f"(0) compiled {done} kernel shapes in {workers} processes ({time.time() - t0:.0f}s)", flush=True)
    return time.time() - t0


# ------------------------------------------------------------------ (a) correctness
def check_case(heads: str, length: int, n_valid: int, window: int | None, variants: list[str],
               gen: torch.Generator) -> list[dict[str, Any]]:
    """Each variant vs float64 (poisoned output), the old path's error, and each variant again with NaN in the
    cache past n_valid."""
    case = Case(heads, length, gen)
    mask = causal_mask(n_valid - 1, length, window)
    nv = torch.tensor([n_valid], device="cuda")
    exact = case.exact(mask, nv)
    old_err = rel_err(engine_decode_attention(case.q, case.k[0], case.v[0], mask, case.scale), exact)
    clean = {v: case.new(0, mask, nv, v, out=case.poisoned_out()) for v in variants}
    case.k[0][:, n_valid:] = float("nan")
    case.v[0][:, n_valid:] = float("nan")
    rows = []
    for v, y in clean.items():
        err = rel_err(y, exact)
        tail_ok = bool(torch.equal(case.new(0, mask, nv, v, out=case.poisoned_out()), y))
        rows.append(dict(check="op", variant=v, heads=heads, L=length, n_valid=n_valid, window=window, rel_err=err,
                         old_rel_err=old_err, tail_never_read=tail_ok,
                         splits=attention_splits(case.n_kv, length, sm_count(y.device), variant_config(v, length)),
                         ok=math.isfinite(err) and err <= MAX_REL_ERR and tail_ok))
    return rows


def check_graph(heads: str, length: int, captured: int, replayed: int, variant: str,
                gen: torch.Generator) -> dict[str, Any]:
    """A variant captured in a CUDA graph at n_valid = ``captured``, replayed at ``replayed``."""
    case = Case(heads, length, gen)
    nv = torch.tensor([captured], device="cuda")
    mask = causal_mask(captured - 1, length)
    case.new(0, mask, nv, variant)  # workspace and compile before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = case.new(0, mask, nv, variant)
    y.fill_(float("nan"))
    nv.fill_(replayed)
    mask.copy_(causal_mask(replayed - 1, length))
    graph.replay()
    torch.cuda.synchronize()
    err = rel_err(y, case.exact(mask, nv))
    return dict(check="graph", variant=variant, heads=heads, L=length, n_valid=replayed, captured_n_valid=captured,
                rel_err=err, ok=math.isfinite(err) and err <= MAX_REL_ERR)


def run_checks(variants: list[str], gen: torch.Generator) -> list[dict[str, Any]]:
    rows = []
    for heads in HEADS:
        for length in CHECK_LENGTHS:
            cases = [(n or length, None) for n in CHECK_VALID] + [(200, WINDOW), (length, WINDOW)]
            for n_valid, window in cases:
                rows.extend(check_case(heads, length, n_valid, window, variants, gen))
        for variant in variants:
            rows.append(check_graph(heads, 4096, 4096, 200, variant, gen))
            rows.append(check_graph(heads, 384, 1, 300, variant, gen))
    for r in rows:
        if not r["ok"] or r["variant"] == DEFAULT:
            print(f"  {r['check']:5} {r['variant']:18} {r['heads']:10} L={r['L']:5} n={r['n_valid']:5} "
                  f"w={str(r.get('window')):4} err {r['rel_err']:.2e} (old {r.get('old_rel_err', math.nan):.2e}) "
                  f"{'ok' if r['ok'] else 'FAIL'}", flush=True)
    print(f"  {sum(r['ok'] for r in rows)} / {len(rows)} checks passed (only the default's and failures printed)")
    return rows


# ------------------------------------------------------------------ (b) timing
def time_case(heads: str, length: int, n_valid: int, gen: torch.Generator, old_fn: Callable[..., Any],
              variants: list[str]) -> list[dict[str, Any]]:
    """Old path and each variant at one shape, cache length and n_valid."""
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
    for v in variants:
        config = variant_config(v, length)
        us = time_graph_us([lambda i=i, v=v: case.new(i, mask, nv, v) for i in range(copies)])
        rows.append(dict(base, path="new", variant=v, config=config._asdict(),
                         splits=attention_splits(n_kv, length, sm_count(nv.device), config), us=us))
    return rows


def winners(rows: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    """Per (heads, L): the variant with the least time summed over the n_valid timed (only variants timed at
    every n_valid of that (heads, L) compete)."""
    best: dict[tuple[str, int], dict[str, Any]] = {}
    for key in sorted({(r["heads"], r["L"]) for r in rows if r.get("path") == "new"}):
        new = [r for r in rows if r.get("path") == "new" and (r["heads"], r["L"]) == key and math.isfinite(r["us"])]
        n_valids = {r["n_valid"] for r in new}
        totals: dict[str, float] = {}
        for v in {r["variant"] for r in new}:
            times = [r["us"] for r in new if r["variant"] == v]
            if len(times) == len(n_valids):
                totals[v] = sum(times)
        if totals:
            name = min(totals, key=totals.__getitem__)
            config = next(r["config"] for r in new if r["variant"] == name)
            best[key] = dict(heads=key[0], L=key[1], variant=name, config=config,
                             mean_us=totals[name] / len(n_valids))
    return best


def summarize(rows: list[dict[str, Any]], bandwidth: float | None) -> list[dict[str, Any]]:
    """Per (heads, L, n_valid): old time, the default variant, the best variant, speed-ups."""
    out = []
    keys = sorted({(r["heads"], r["L"], r["n_valid"]) for r in rows if "us" in r})
    for key in keys:
        group = [r for r in rows if (r["heads"], r["L"], r["n_valid"]) == key and math.isfinite(r.get("us", math.nan))]
        old = [r["us"] for r in group if r["path"] == "old"]
        new = [r for r in group if r["path"] == "new"]
        if not old or not new:
            continue
        default = next((r for r in new if r["variant"] == DEFAULT), new[0])
        best = min(new, key=lambda r: r["us"])
        gbps = best["read_bytes_new"] / (best["us"] * 1e-6) / 1e9
        out.append(dict(heads=key[0], L=key[1], n_valid=key[2], old_us=old[0], default_us=default["us"],
                        best_us=best["us"], best_variant=best["variant"], best_speedup=old[0] / best["us"],
                        best_GBps=gbps, best_frac_copy_bw=gbps * 1e9 / bandwidth if bandwidth else None))
    return out


def _compiled_old() -> Callable[..., Any]:
    """The engine's attention compiled as the decode layer's inductor code (one compile per shape)."""
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(engine_decode_attention, fullgraph=True, dynamic=False)


def config_table(best: dict[tuple[str, int], dict[str, Any]]) -> str:
    """``CONFIG_TABLE`` rows (Python) of the ``TABLE_HEADS`` winners; the longest L's row covers longer caches."""
    rows = sorted((L, w["config"]) for (heads, L), w in best.items() if heads == TABLE_HEADS)
    lines = [f"    ({'1 << 62' if i == len(rows) - 1 else L}, AttentionConfig("
             + ", ".join(f"{k}={v!r}" for k, v in cfg.items()) + ")),  # measured up to L = " + str(L)
             for i, (L, cfg) in enumerate(rows)]
    return "CONFIG_TABLE: tuple[tuple[int, AttentionConfig], ...] = (\n" + "\n".join(lines) + "\n)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", dest="json_path", required=True)
    parser.add_argument("--table-out", help="JSON file for the winners per (heads, L) and the CONFIG_TABLE rows")
    parser.add_argument("--budget", type=float, default=120.0,
                        help="seconds after which only the default and the best variant so far are timed (120)")
    parser.add_argument("--jobs", type=int, default=8, help="processes compiling the kernels first (0: none)")
    parser.add_argument("--variants", nargs="*", help=f"a subset of {list(VARIANTS)} (default: all)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("attention_gpu.py needs a CUDA device", file=sys.stderr)
        return 2
    t0 = time.time()
    deadline = t0 + args.budget
    unknown = set(args.variants or ()) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}")
    variants = [DEFAULT] + list(args.variants if args.variants is not None else VARIANTS)
    torch.backends.cuda.matmul.allow_tf32 = False
    data: dict[str, Any] = dict(script="benchmarks/scripts/attention_gpu.py", argv=sys.argv[1:],
                                device=torch.cuda.get_device_name(), torch=torch.__version__,
                                variants={v: VARIANTS[v]._asdict() for v in variants if v != DEFAULT},
                                default_configs={L: default_config(L)._asdict() for L in TIME_LENGTHS},
                                checks=[], timings=[], summary=[], winners=[])

    def save() -> None:
        os.makedirs(os.path.dirname(os.path.abspath(args.json_path)), exist_ok=True)
        with open(args.json_path, "w") as fh:
            json.dump(data, fh, indent=1, default=str)

    if args.jobs > 0:
        try:
            data["precompile_s"] = precompile(variants, args.jobs, timeout=args.budget / 2)
        except Exception:  # noqa: BLE001 - the kernels then compile when first run
            data["precompile_error"] = traceback.format_exc()[-3000:]
            print(data["precompile_error"], flush=True)
    try:
        from teal.bench.timing import measure_copy_bandwidth

        data["copy_bandwidth_Bps"] = bw = measure_copy_bandwidth(nbytes=2**30)
        print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    except Exception:  # noqa: BLE001 - the table then has no bandwidth fraction
        bw = None
    gen = torch.Generator(device="cuda").manual_seed(0)
    print("(a) correctness", flush=True)
    try:
        data["checks"] = run_checks(variants, gen)
    except Exception:  # noqa: BLE001
        data["checks_error"] = traceback.format_exc()[-3000:]
        print(data["checks_error"], flush=True)
    data["checks_passed"] = bool(data["checks"]) and all(r["ok"] for r in data["checks"])
    failed = sorted({r["variant"] for r in data["checks"] if not r["ok"]})
    data["failed_variants"] = failed
    save()
    print(f"checks: {'all passed' if data['checks_passed'] else 'FAILURES ' + str(failed)} ({time.time() - t0:.0f}s)",
          flush=True)
    print("(b) timing", flush=True)
    old_fn = _compiled_old()
    timed = [v for v in variants if v not in failed]
    for heads in sorted(HEADS, key=lambda h: h != TABLE_HEADS):
        for length in TIME_LENGTHS:
            for n_valid in (length // 2, length):
                best = winners(data["timings"]).get((heads, length))
                todo = timed if time.time() < deadline else sorted({DEFAULT} | ({best["variant"]} if best else set()))
                try:
                    data["timings"].extend(time_case(heads, length, n_valid, gen, old_fn, todo))
                except Exception:  # noqa: BLE001
                    data["timings"].append(dict(heads=heads, L=length, n_valid=n_valid, path="error",
                                                error=traceback.format_exc()[-1500:]))
                    print(data["timings"][-1]["error"], flush=True)
                data["summary"] = summarize(data["timings"], bw)
                save()
        print(f"  {heads} timed ({time.time() - t0:.0f}s)", flush=True)
    best = winners(data["timings"])
    data["winners"] = list(best.values())
    data["config_table"] = config_table(best)
    data["total_s"] = time.time() - t0
    save()
    print(f"\n{'heads':10} {'L':>5} {'n_valid':>7} {'old us':>7} {'dflt us':>7} {'best us':>7} {'x old':>6} {'GB/s':>6}"
          "  best variant")
    for r in data["summary"]:
        print(f"{r['heads']:10} {r['L']:5} {r['n_valid']:7} {r['old_us']:7.2f} {r['default_us']:7.2f} "
              f"{r['best_us']:7.2f} {r['best_speedup']:6.2f} {r['best_GBps']:6.0f}  {r['best_variant']}")
    print("\nvariant us per (heads, L, n_valid):")
    keys = sorted({(r["heads"], r["L"], r["n_valid"]) for r in data["timings"] if r.get("path") == "new"})
    print(f"{'variant':18} " + " ".join(f"{h[:7]}/{L}/{n}".rjust(18) for h, L, n in keys))
    for v in variants:
        us = {(r["heads"], r["L"], r["n_valid"]): r["us"] for r in data["timings"] if r.get("variant") == v}
        print(f"{v:18} " + " ".join(f"{us[k]:18.2f}" if k in us else " " * 18 for k in keys))
    print("\nwinners (mean us over n_valid = L/2, L):")
    for w in data["winners"]:
        print(f"  {w['heads']:10} L={w['L']:5} {w['variant']:18} {w['mean_us']:7.2f} us")
    print(data["config_table"])
    if args.table_out:
        os.makedirs(os.path.dirname(os.path.abspath(args.table_out)), exist_ok=True)
        with open(args.table_out, "w") as fh:
            json.dump(dict(winners=data["winners"], config_table=data["config_table"],
                           checks_passed=data["checks_passed"]), fh, indent=1)
    if data["summary"]:
        per_layer = statistics.median(r["best_us"] for r in data["summary"] if r["heads"] == TABLE_HEADS)
        print(f"{TABLE_HEADS} median best per layer: {per_layer:.2f} us")
    print(f"total {data['total_s']:.0f}s; wrote {args.json_path}")
    return 0 if data["checks_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
