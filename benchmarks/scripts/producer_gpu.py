"""Producer ops on the GPU: correctness, then old path vs producer path timings and a gather-config sweep.

Run once on the H200 (well under 8 minutes, compile time included):

    PYTHONPATH=. python3 benchmarks/scripts/producer_gpu.py --json OUT.json

(a) Correctness on fresh random inputs, outputs poisoned first (Llama-3-8B widths, bf16; s = 0, 0.5,
    0.9; with and without column scale; once more inside a CUDA graph): ``add_rmsnorm_compact`` and
    ``silu_mul_compact`` against PyTorch (x_new exact; h / mid: mismatching elements counted, since
    reduction order and exp differ from PyTorch's CUDA kernels; lists (global layout: segment j's
    survivors at ``j*K + rank``, counts [S]) exact against the reference lists of the kernel's own
    activation and against phase A's (``compact_input``) lists of it), ``gather_linear`` against float64.
(b) Timing (median per call of CUDA-graph replays, weights rotated over copies larger than L2, as
    ``teal.bench.kernels``): old path = add + RMSNorm (torch.compile, as the engine's inductor kernel) +
    ``sparse_linear`` with its TUNED config (down: SiLU * up compiled + ``sparse_linear``); new path =
    producer op + ``gather_linear``, for every gather config of a small grid at s = 0.5, then for the
    fastest few at s = 0 and 0.65. At s = 0.5 the producers alone are also timed against the plain
    torch.compile activation, ``add_rmsnorm_compact`` at several chunk sizes (entries per program; the
    producer-vs-activation table). The engine uses the producers for q|k|v and gate|up only; down keeps
    ``sparse_linear`` (faster on the H200), but ``silu_mul_compact`` is still checked and timed.
Prints tables and writes everything to ``--json`` (``--table-out``: the fastest gather configs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from itertools import product
from typing import Any, Callable

import torch
import torch.nn.functional as F

from teal.bench.kernels import ROTATION_BYTES
from teal.bench.timing import measure_copy_bandwidth
from teal.kernels.configs import TUNED_GATHER, KernelConfig, get_config, get_gather_config
from teal.kernels.ops import compact_input, sparse_linear_triton
from teal.kernels.producer import (
    NORM_CHUNK,
    SILU_CHUNK,
    SurvivorLists,
    add_rmsnorm_compact_triton,
    empty_lists,
    gather_linear_triton,
    rms_norm_reference,
    silu_mul_compact_triton,
    survivor_lists_reference,
)
from teal.kernels.tune import quantile_threshold, time_graph_us

EPS = 1e-5
DTYPE = torch.bfloat16
# name -> (producer, K, segment widths); "norm": add + RMSNorm feeds it, "silu": SiLU * up feeds it.
SHAPES: dict[str, tuple[str, int, tuple[int, ...]]] = {
    "qkv": ("norm", 4096, (4096, 1024, 1024)),
    "gate_up": ("norm", 4096, (14336, 14336)),
    "down": ("silu", 14336, (4096,)),
}
CHECK_SPARSITIES = (0.0, 0.5, 0.9)
TIME_SPARSITIES = (0.0, 0.5, 0.65)
SWEEP_SPARSITY = 0.5  # the full grid is timed here; elsewhere only the TOP_CONFIGS fastest of it
TOP_CONFIGS = 4
GRID = dict(block_n=(64, 128, 256), block_r=(16, 32), split_k=(1, 2, 4, 8), num_stages=(1, 3))
NORM_CHUNKS = (256, 512, 1024, 2048)  # entries per program add_rmsnorm_compact is timed at (s = 0.5)


def grid_configs() -> list[KernelConfig]:
    """The swept gather configurations (4 warps, dense_above 0.9)."""
    return [KernelConfig(block_n=bn, block_r=br, split_k=sk, num_stages=st, gather=True)
            for bn, br, sk, st in product(*GRID.values())]


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    if bool(torch.isnan(y).any()):
        return float("nan")
    return float((y.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def _poisoned(k: int, segments: int, width: int) -> tuple[torch.Tensor, ...]:
    """A NaN output row [1, width] and poisoned lists (global layout, counts [S])."""
    lists = empty_lists(torch.device("cuda"), k, segments)
    lists.idx.fill_(-7)
    lists.val.fill_(float("nan"))
    lists.xm.fill_(float("nan"))
    lists.counts.fill_(-1)
    return (torch.full((1, width), float("nan"), dtype=DTYPE, device="cuda"), *lists)


class Inputs:
    """Random activations, weights and thresholds of one shape at one sparsity, plus the op calls."""

    def __init__(self, name: str, sparsity: float, scaled: bool, gen: torch.Generator, n_weights: int = 1) -> None:
        self.kind, self.k, splits = SHAPES[name]
        self.splits = list(splits)
        self.n = sum(splits)
        dev = "cuda"
        k, segs = self.k, len(splits)
        if self.kind == "norm":
            self.x = torch.randn(1, k, device=dev, generator=gen).to(DTYPE)
            self.delta = torch.randn(1, k, device=dev, generator=gen).to(DTYPE)
            self.norm_w = (1.0 + 0.2 * torch.randn(k, device=dev, generator=gen)).to(DTYPE)
            act = rms_norm_reference(self.x + self.delta, self.norm_w, EPS)
        else:
            self.gate_up = (2 * torch.randn(1, 2 * k, device=dev, generator=gen)).to(DTYPE)
            gate, up = self.gate_up.split([k, k], dim=-1)
            act = F.silu(gate) * up
        self.scale = (torch.rand(segs, k, device=dev, generator=gen) + 0.5) if scaled else None
        score = act.abs().float() * (self.scale[0] if scaled else 1.0)
        base = quantile_threshold(score, sparsity)
        self.thr = torch.tensor([base * (1.0 + 0.05 * j) if math.isfinite(base) else base for j in range(segs)],
                                dtype=torch.float32, device=dev)
        self.weights = [torch.randn(k, self.n, device=dev, generator=gen).to(DTYPE) for _ in range(n_weights)]
        self.chunk = NORM_CHUNK if self.kind == "norm" else SILU_CHUNK  # the ops' entries per program

    def produce(self, out: tuple | None = None, chunk: int | None = None) -> tuple[torch.Tensor, SurvivorLists]:
        """Runs the producer op (``chunk`` entries per program, default the op's); returns (activation, lists)."""
        chunk = chunk or self.chunk
        if self.kind == "norm":
            x_new, h, lists = add_rmsnorm_compact_triton(
                self.x, self.delta, self.norm_w, EPS, self.thr, self.scale, len(self.splits), chunk=chunk,
                out=None if out is None else (out[0], out[1], out[2]))
            return h, lists
        return silu_mul_compact_triton(self.gate_up, self.thr, self.scale, chunk=chunk,
                                       out=None if out is None else (out[1], out[2]))

    def torch_activation(self) -> torch.Tensor:
        if self.kind == "norm":
            return rms_norm_reference(self.x + self.delta, self.norm_w, EPS)
        gate, up = self.gate_up.split([self.k, self.k], dim=-1)
        return F.silu(gate) * up


# ------------------------------------------------------------------ (a) correctness
def _lists_equal(got: SurvivorLists, ref: SurvivorLists, k: int) -> bool:
    """Counts, the masked input (all S*K entries) and every listed survivor equal (entries past a segment's
    count are unspecified)."""
    if not (torch.equal(got.counts, ref.counts) and torch.equal(got.xm, ref.xm)):
        return False
    return all(torch.equal(idx, ref_idx) and torch.equal(val, ref_val)
               for (idx, val), (ref_idx, ref_val) in zip(got.survivors(k), ref.survivors(k)))


def check_case(name: str, sparsity: float, scaled: bool, gen: torch.Generator, graph: bool = False) -> dict[str, Any]:
    inp = Inputs(name, sparsity, scaled, gen)
    k, segs = inp.k, len(inp.splits)
    x_new = torch.full((1, k), float("nan"), dtype=DTYPE, device="cuda")
    act_out = torch.full((1, k), float("nan"), dtype=DTYPE, device="cuda")
    y_out, *lists_out = _poisoned(k, segs, inp.n)
    out = (x_new, act_out, SurvivorLists(*lists_out))
    w_t = inp.weights[0]

    def call() -> None:
        _, lists = inp.produce(out)
        gather_linear_triton(*lists, w_t, inp.splits, out=y_out)

    if graph:  # warm up and capture on other inputs, re-poison the outputs, then replay on the real ones
        inputs = (inp.x, inp.delta) if inp.kind == "norm" else (inp.gate_up,)
        real = [t.clone() for t in inputs]
        for t in inputs:
            t.copy_(torch.randn_like(t.float()).to(DTYPE))
        call()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            call()
        for t in (x_new, act_out, y_out, lists_out[1], lists_out[2]):
            t.fill_(float("nan"))
        lists_out[0].fill_(-7)
        lists_out[3].fill_(-1)
        for t, r in zip(inputs, real):
            t.copy_(r)
        g.replay()
    else:
        call()
    torch.cuda.synchronize()
    act_torch = inp.torch_activation()
    mismatch = int((act_out != act_torch).sum())
    ref_lists = survivor_lists_reference(act_out, inp.thr, inp.scale, segs)
    got = SurvivorLists(*lists_out)
    lists_ok = _lists_equal(got, ref_lists, k)
    # phase A (sparse_linear's gather path) on the producer's own activation: the same lists
    phase_a = SurvivorLists(*(t.clone() for t in compact_input(act_out, inp.thr, inp.scale, segs)))
    phase_a = SurvivorLists(phase_a.idx[: segs * k], phase_a.val[: segs * k], phase_a.xm[: segs * k],
                            phase_a.counts[:segs])
    lists_match_phase_a = _lists_equal(got, phase_a, k)
    outs, start = [], 0
    for j, width in enumerate(inp.splits):
        outs.append(ref_lists.xm[j * k : (j + 1) * k].double() @ w_t[:, start : start + width].double())
        start += width
    y_err = _rel_err(y_out, torch.cat(outs)[None])
    x_ok = True if inp.kind != "norm" else torch.equal(x_new, inp.x + inp.delta)
    ok = bool(lists_ok and lists_match_phase_a and x_ok and y_err <= 1e-2 and mismatch <= max(4, k // 1000))
    return dict(check=f"{name} s={sparsity} scale={scaled} graph={graph}", ok=ok, x_new_exact=x_ok,
                act_mismatch_vs_torch=mismatch, lists_exact=bool(lists_ok),
                lists_match_phase_a=bool(lists_match_phase_a), y_rel_err=y_err, survivors=ref_lists.counts.tolist())


def run_checks(gen: torch.Generator) -> list[dict[str, Any]]:
    rows = []
    cases = [(n, s, sc, False) for n in SHAPES for s in CHECK_SPARSITIES for sc in (False, True)]
    cases += [(n, 0.5, True, True) for n in SHAPES]
    for name, sparsity, scaled, graph in cases:
        case = (name, sparsity, scaled, graph)
        try:
            rows.append(check_case(name, sparsity, scaled, gen=gen, graph=graph))
        except Exception:  # noqa: BLE001 - reported, not fatal
            rows.append(dict(check=str(case), ok=False, error=traceback.format_exc()[-1500:]))
        print(f"  check {rows[-1]['check']}: {'ok' if rows[-1]['ok'] else 'FAILED'} "
              f"{ {k: v for k, v in rows[-1].items() if k not in ('check', 'ok')} }", flush=True)
    return rows


# ------------------------------------------------------------------ (b) timing
def _compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` compiled by torch.compile (the engine's inductor kernel), or ``fn`` itself if compiling fails."""
    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    chosen: list[Callable[..., Any]] = []

    def call(*args: Any) -> Any:
        if not chosen:
            try:
                compiled(*args)
                chosen.append(compiled)
            except Exception as exc:  # noqa: BLE001 - time eager torch instead, and say so
                print(f"torch.compile of {fn.__name__} failed ({type(exc).__name__}: {exc}); timing eager torch")
                chosen.append(fn)
        return chosen[0](*args)

    return call


def _add_norm(x: torch.Tensor, delta: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x + delta
    return x, rms_norm_reference(x, w, EPS)


def _silu_mul(gu: torch.Tensor) -> torch.Tensor:
    gate, up = gu.chunk(2, dim=-1)
    return F.silu(gate) * up


ADD_NORM = _compiled(_add_norm)
SILU_MUL = _compiled(_silu_mul)


def time_shape(name: str, sparsity: float, gen: torch.Generator, configs: list[KernelConfig],
               deadline: float) -> list[dict[str, Any]]:
    kind, k, splits = SHAPES[name]
    bytes_one = k * sum(splits) * 2
    copies = max(2, -(-ROTATION_BYTES // bytes_one))
    inp = Inputs(name, sparsity, False, gen, n_weights=copies)
    y = torch.empty(1, inp.n, dtype=DTYPE, device="cuda")
    old_cfg = get_config(k, inp.n, 1, DTYPE)

    def old(w_t: torch.Tensor) -> Callable[[], None]:
        if kind == "norm":
            return lambda: sparse_linear_triton(ADD_NORM(inp.x, inp.delta, inp.norm_w)[1], w_t, inp.thr, inp.splits,
                                                config=old_cfg, out=y)
        return lambda: sparse_linear_triton(SILU_MUL(inp.gate_up), w_t, inp.thr, inp.splits, config=old_cfg, out=y)

    act, lists = inp.produce()
    rows = []
    base = dict(shape=name, K=k, N=inp.n, sparsity=sparsity)
    producer_name = "add_rmsnorm_compact" if kind == "norm" else "silu_mul_compact"
    activation = (lambda: ADD_NORM(inp.x, inp.delta, inp.norm_w)) if kind == "norm" else (lambda: SILU_MUL(inp.gate_up))
    rows.append(dict(base, path="old", what=f"torch.compile activation + sparse_linear {old_cfg}",
                     us=time_graph_us([old(w) for w in inp.weights])))
    rows.append(dict(base, path="activation only", what="torch.compile activation", us=time_graph_us([activation])))
    rows.append(dict(base, path="producer only", what=producer_name, chunk=inp.chunk,
                     us=time_graph_us([lambda: inp.produce()])))
    if sparsity == SWEEP_SPARSITY and kind == "norm":  # the norm producer at other chunk sizes
        for chunk in NORM_CHUNKS:
            if chunk != inp.chunk:
                rows.append(dict(base, path="producer chunk", what=producer_name, chunk=chunk,
                                 us=time_graph_us([lambda c=chunk: inp.produce(chunk=c)])))
    tuned = get_gather_config(k, inp.n, DTYPE)
    seen = set()
    for cfg in [tuned] + configs:
        if cfg in seen:
            continue
        seen.add(cfg)
        if time.time() > deadline:
            rows.append(dict(base, path="skipped", what="time budget reached", us=float("nan")))
            break
        try:
            gather_us = time_graph_us([lambda w=w: gather_linear_triton(*lists, w, inp.splits, config=cfg, out=y)
                                       for w in inp.weights])
            new_us = time_graph_us([lambda w=w: gather_linear_triton(*inp.produce()[1], w, inp.splits, config=cfg,
                                                                     out=y) for w in inp.weights])
            rows.append(dict(base, path="new", config=cfg.as_dict(), table_entry=cfg == tuned, us=new_us,
                             gather_only_us=gather_us))
        except Exception:  # noqa: BLE001
            rows.append(dict(base, path="new", config=cfg.as_dict(), us=float("nan"), error=traceback.format_exc()[-800:]))
    return rows


def summarize(rows: list[dict[str, Any]], bandwidth: float) -> list[dict[str, Any]]:
    """Per (shape, sparsity): old, table-entry new, best new (and its config), effective bandwidths."""
    out = []
    keys = sorted({(r["shape"], r["sparsity"]) for r in rows}, key=lambda t: (list(SHAPES).index(t[0]), t[1]))
    for shape, s in keys:
        group = [r for r in rows if r["shape"] == shape and r["sparsity"] == s]
        pick = {r["path"]: r for r in group if r["path"] != "new"}
        new = [r for r in group if r["path"] == "new" and math.isfinite(r["us"])]
        if not new or "old" not in pick:
            continue
        best = min(new, key=lambda r: r["us"])
        entry = next((r for r in new if r.get("table_entry")), None)
        kept = (1 - s) * group[0]["K"] * group[0]["N"] * 2
        out.append(dict(shape=shape, sparsity=s, old_us=pick["old"]["us"], activation_us=pick["activation only"]["us"],
                        producer_us=pick["producer only"]["us"], table_new_us=entry["us"] if entry else None,
                        best_new_us=best["us"], best_gather_only_us=best["gather_only_us"], best_config=best["config"],
                        speedup_best_vs_old=pick["old"]["us"] / best["us"],
                        best_frac_copy_bw=kept / (best["us"] * 1e-6) / bandwidth))
    return out


def producer_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per shape at SWEEP_SPARSITY: the plain activation's time and the producer's per chunk size (entries per
    program; only the default one for ``silu_mul_compact``)."""
    out = []
    for shape in SHAPES:
        group = [r for r in rows if r.get("shape") == shape and r.get("sparsity") == SWEEP_SPARSITY]
        act = next((r["us"] for r in group if r["path"] == "activation only"), None)
        prod = {r["chunk"]: r["us"] for r in group if r["path"] in ("producer only", "producer chunk")}
        if act is None or not prod:
            continue
        out.append(dict(shape=shape, activation_us=act, producer_us=prod,
                        best_ratio=min(prod.values()) / act if act else float("nan")))
    return out


def write_best_table(summary: list[dict[str, Any]], path: str) -> dict[str, Any]:
    """The fastest config per shape at SWEEP_SPARSITY as a gather override table (``$TEAL_GATHER_CONFIGS``)."""
    from teal.kernels.configs import table_to_json

    table = {}
    for r in summary:
        if r["sparsity"] == SWEEP_SPARSITY:
            _, k, splits = SHAPES[r["shape"]]
            table[(k, sum(splits), 1, "bf16")] = KernelConfig(**r["best_config"])
    data = table_to_json(table)
    with open(path, "w") as fh:
        json.dump(data, fh, indent=1)
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", dest="json_path", required=True)
    parser.add_argument("--budget", type=float, default=420.0, help="seconds before the sweep stops (default 420)")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--table-out", default=None,
                        help="write the fastest config per shape at s=0.5 as a $TEAL_GATHER_CONFIGS table")
    args = parser.parse_args(argv)
    t0 = time.time()
    deadline = t0 + args.budget
    torch.backends.cuda.matmul.allow_tf32 = False
    data: dict[str, Any] = dict(script="benchmarks/scripts/producer_gpu.py", argv=sys.argv[1:],
                                device=torch.cuda.get_device_name(), torch=torch.__version__,
                                gather_table={f"{k}x{n}": c.as_dict() for (k, n, _), c in TUNED_GATHER.items()},
                                grid=GRID, checks=[], timings=[], summary=[])

    def save() -> None:
        os.makedirs(os.path.dirname(os.path.abspath(args.json_path)), exist_ok=True)
        with open(args.json_path, "w") as fh:
            json.dump(data, fh, indent=1, default=str)

    gen = torch.Generator(device="cuda").manual_seed(0)
    data["copy_bandwidth_Bps"] = bw = measure_copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    print("(a) correctness", flush=True)
    data["checks"] = run_checks(gen)
    data["checks_passed"] = all(r["ok"] for r in data["checks"])
    save()
    print(f"checks: {'all passed' if data['checks_passed'] else 'FAILURES'} ({time.time() - t0:.0f}s)", flush=True)
    print("(b) timing", flush=True)
    configs = grid_configs()
    for name in [s for s in args.shapes.split(",") if s]:
        # the whole grid at s = 0.5, then only its fastest few configs at the other sparsities
        shape_configs = configs
        for s in sorted(TIME_SPARSITIES, key=lambda v: v != SWEEP_SPARSITY):
            try:
                rows = time_shape(name, s, gen, shape_configs, deadline)
                data["timings"].extend(rows)
                if s == SWEEP_SPARSITY:
                    ranked = sorted((r for r in rows if r["path"] == "new" and math.isfinite(r["us"])),
                                    key=lambda r: r["us"])
                    shape_configs = [KernelConfig(**r["config"]) for r in ranked[:TOP_CONFIGS]]
            except Exception:  # noqa: BLE001
                data["timings"].append(dict(shape=name, sparsity=s, path="error", us=float("nan"),
                                            error=traceback.format_exc()[-1500:]))
            data["summary"] = summarize(data["timings"], bw)
            save()
            print(f"  {name} s={s} done ({time.time() - t0:.0f}s)", flush=True)
    data["total_s"] = time.time() - t0
    if args.table_out:
        data["table_out"] = write_best_table(data["summary"], args.table_out)
    save()
    print(f"\n{'shape':8} {'s':>5} {'old':>7} {'act':>6} {'prod':>6} {'table':>7} {'best':>7} {'gather':>7} "
          f"{'x old':>6} {'%bw':>5}  best config")
    for r in data["summary"]:
        cfg = r["best_config"]
        table = f"{r['table_new_us']:7.1f}" if r["table_new_us"] else "      -"
        print(f"{r['shape']:8} {r['sparsity']:5.2f} {r['old_us']:7.1f} {r['activation_us']:6.1f} {r['producer_us']:6.1f} "
              f"{table} {r['best_new_us']:7.1f} {r['best_gather_only_us']:7.1f} {r['speedup_best_vs_old']:6.2f} "
              f"{r['best_frac_copy_bw']:5.0%}  bn={cfg['block_n']} br={cfg['block_r']} sk={cfg['split_k']} "
              f"st={cfg['num_stages']}")
    data["producer_vs_activation"] = producer_table(data["timings"])
    save()
    print(f"\nproducers vs the plain torch.compile activation at s={SWEEP_SPARSITY} (us; chunk = entries per program)")
    for r in data["producer_vs_activation"]:
        chunks = "  ".join(f"chunk {c}: {us:5.1f}" for c, us in sorted(r["producer_us"].items()))
        print(f"{r['shape']:8} activation {r['activation_us']:5.1f}  {chunks}  best/activation "
              f"{r['best_ratio']:.2f}")
    for r in data["timings"]:
        if r.get("error"):
            print(f"error {r['shape']} s={r['sparsity']} {r.get('config')}: {r['error'][-300:]}")
    print(f"total {data['total_s']:.0f}s; JSON: {args.json_path}")
    return 0 if data["checks_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
