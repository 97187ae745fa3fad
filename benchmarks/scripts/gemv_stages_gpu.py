"""Where one call of the CUDA sparse GEMV spends its time: the per-stage timeline the kernel writes itself.

TEAL_SOURCE_COMMIT=<commit> PYTHONPATH=. python3 benchmarks/scripts/gemv_stages_gpu.py --json OUT.json

Llama-3-8B shapes (q|k|v 4096 -> 6144, o 4096 -> 4096, gate|up 4096 -> 2 x 14336, down 14336 -> 4096 with SiLU·up
inside), bf16, batch 1, random masks, s = 0 and 0.5 (``--sparsities``), each with the production launch
configuration (``configs.get_config``; the dense regime's table at s = 0, as ``teal.bench.kernels``; at s = 0 the
engine runs Llama-3-8B's gate|up and down on cuBLAS, so those two rows time the kernel, not the engine) and the
engine's PDL mode (``$TEAL_CUDA_PDL``, default 2; ``--pdl``). Per problem:
1. Checks: the ``STAMPS`` build's output equals the default build's bit for bit, both within the benchmark's
   bound of a float64 reference, and the stamps ascend in every program.
2. Times ``--calls`` back-to-back calls in one CUDA graph (``teal.kernels.tune.time_graph_us``, as
   ``teal.bench.kernels``): each call its own input and output, weights rotated over copies of >= 192 MiB so
   that they come from HBM, PDL between calls as in the engine. The default build, then the STAMPS build (each
   call writing its own stamps), then the default build again (drift).
3. From the last replay's stamps (``teal.bench.gemv_stages``): per stage the median / p90 over programs, the
   spread of program starts, the end tail (last end - median end), the span, and the period (last end - the
   previous call's last end, what a graph time per call measures), each the median over calls 1..; beside
   the kept-bytes / copy-bandwidth model of the call (weights only) and the default build's excess over it.
About 30 s on an H100 (12 NVRTC compiles on a fresh machine, 8 problems).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import platform
import statistics
import sys
import time
from typing import Any

import torch

PROJECTIONS = ("qkv", "o", "gate_up", "down")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", dest="json_path", required=True, help="where to write the results")
    parser.add_argument("--sparsities", default="0,0.5", help="comma-separated, each in [0, 1)")
    parser.add_argument("--projections", default=",".join(PROJECTIONS), help=f"subset of {','.join(PROJECTIONS)}")
    parser.add_argument("--pdl", type=int, choices=(0, 1, 2), default=None,
                        help="PDL mode of the calls (default: the engine's, $TEAL_CUDA_PDL or 2)")
    parser.add_argument("--calls", type=int, default=24, help="calls per graph (at least the weight copies)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        args.sparsities = [float(v) for v in args.sparsities.split(",")]
    except ValueError:
        parser.error(f"--sparsities must be comma-separated numbers, got {args.sparsities!r}")
    if not all(0 <= s < 1 for s in args.sparsities):
        parser.error(f"--sparsities must each be in [0, 1), got {args.sparsities}")
    args.projections = args.projections.split(",")
    unknown = [p for p in args.projections if p not in PROJECTIONS]
    if unknown:
        parser.error(f"unknown projection(s) {unknown}; choose from {','.join(PROJECTIONS)}")
    if args.calls < 2:
        parser.error("--calls must be at least 2 (call 0 has no predecessor to measure a period against)")
    return args


def measure(proj: str, k: int, splits: tuple[int, ...], s: float, ws: list[torch.Tensor], pdl: int, n_calls: int,
            gen: torch.Generator) -> dict[str, Any]:
    """Checks and timings of one problem (see the module docstring); ``ws`` the rotated weight copies [K, N]."""
    from teal.bench.gemv_stages import monotone, sequence_account
    from teal.bench.kernels import MAX_REL_ERR
    from teal.kernels import cuda
    from teal.kernels.configs import get_config
    from teal.kernels.ops import silu_mul, sm_count
    from teal.kernels.tune import quantile_threshold, time_graph_us

    dtype, device = torch.bfloat16, ws[0].device
    n, glu = sum(splits), proj == "down"
    regime = "dense" if s == 0 else "sparse"
    cfg = get_config(k, n, 1, dtype, sm_count(device), cuda_ok=True, regime=regime)
    xs = [torch.randn(1, 2 * k if glu else k, generator=gen, device=device).to(dtype) for _ in range(n_calls)]
    scored = [silu_mul(x) if glu else x for x in xs]  # what the threshold sees
    thrs = [torch.full((len(splits),), quantile_threshold(m, s), dtype=torch.float32, device=device) for m in scored]
    reason = cuda.unsupported_reason(scored[0], ws[0], list(splits), cfg)
    if reason is not None:
        raise SystemExit(f"the CUDA kernel cannot take {proj} with {cfg}: {reason}")
    shape = cuda.stamps_shape(k, splits, cfg, dtype)
    stamps = torch.zeros((n_calls, *shape), dtype=torch.int64, device=device)
    ys = [torch.full((1, n), float("nan"), dtype=dtype, device=device) for _ in range(n_calls)]

    def call(j: int, stamped: bool) -> None:
        cuda.launch(xs[j], ws[j % len(ws)], ys[j], thrs[j], None, splits, cfg, glu=glu, pdl=pdl,
                    stamps=stamps[j] if stamped else None)

    row: dict[str, Any] = dict(proj=proj, K=k, N=n, splits=list(splits), glu=glu, sparsity=s, regime=regime,
                               config=cfg.as_dict(), pdl=pdl, programs=shape[0], warps=shape[1] - 1, calls=n_calls)
    # 1. checks on call 0
    call(0, False)
    plain = ys[0].clone()
    ys[0].fill_(float("nan"))
    call(0, True)
    torch.cuda.synchronize()
    masked = torch.where(scored[0].abs().float() > thrs[0][0], scored[0].double(), 0.0)
    ref = masked @ ws[0].double()
    rel_err = float((plain.double() - ref).norm() / ref.norm().clamp_min(1e-30))
    row["checks"] = dict(stamps_equal_default=bool(torch.equal(plain, ys[0])), rel_err=rel_err,
                         rel_err_bound=MAX_REL_ERR[dtype], no_nan=not bool(plain.isnan().any()),
                         eager_stamps_monotone=bool(monotone(stamps[0].cpu()).all()))
    row["checks"]["ok"] = bool(row["checks"]["stamps_equal_default"] and row["checks"]["no_nan"]
                               and rel_err <= MAX_REL_ERR[dtype] and row["checks"]["eager_stamps_monotone"])
    del ref, masked
    row["measured_sparsity"] = statistics.mean(float((m.abs().float() <= t[0]).float().mean())
                                               for m, t in zip(scored, thrs)) if s > 0 else 0.0
    # 2. timings (the stamps left behind are the last replay's)
    row["default_us"] = time_graph_us([lambda j=j: call(j, False) for j in range(n_calls)])
    row["stamps_us"] = time_graph_us([lambda j=j: call(j, True) for j in range(n_calls)])
    row["default_again_us"] = time_graph_us([lambda j=j: call(j, False) for j in range(n_calls)])
    # 3. the timeline
    row["account"] = sequence_account(stamps.cpu())
    return row


def derive(row: dict[str, Any], copy_bw: float) -> None:
    """The kept-bytes model of ``row`` at ``copy_bw`` bytes/s and the excesses over it."""
    kept = (1.0 - row["measured_sparsity"]) * row["K"] * row["N"] * 2
    default = 0.5 * (row["default_us"] + row["default_again_us"])
    row.update(kept_weight_bytes=kept, model_us=kept / copy_bw * 1e6)
    row.update(excess_us=default - row["model_us"], stamps_overhead=row["stamps_us"] / default - 1.0,
               period_excess_us=row["account"]["median"]["period_us"] - row["model_us"])


def print_tables(rows: list[dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    summary = Table(title=title)
    for col in ("proj", "s", "meas s", "programs x warps", "default µs", "stamps µs (+%)", "model µs",
                "excess µs", "period µs", "span µs", "start spread", "end tail", "1st start - prev end",
                "checks"):
        summary.add_column(col, justify="right")
    stages = Table(title="stage durations per program, µs: median / p90 over programs (median over calls)")
    stage_names = list(rows[0]["account"]["median"]["stages"]) if rows else []
    for col in ("proj", "s", *stage_names, "program", "warp loop-end spread"):
        stages.add_column(col, justify="right")
    for r in rows:
        m = r["account"]["median"]
        default = 0.5 * (r["default_us"] + r["default_again_us"])
        summary.add_row(
            r["proj"], f"{r['sparsity']:g}", f"{r['measured_sparsity']:.3f}", f"{r['programs']} x {r['warps']}",
            f"{default:.1f}", f"{r['stamps_us']:.1f} ({100 * r['stamps_overhead']:+.1f})", f"{r['model_us']:.1f}",
            f"{r['excess_us']:.1f}", f"{m['period_us']:.1f}", f"{m['span_us']:.1f}", f"{m['start_spread_us']:.2f}",
            f"{m['end_tail_us']:.2f}", f"{m['first_start_after_previous_us']:.2f}",
            "ok" if r["checks"]["ok"] and r["account"]["all_monotone"] else "FAILED")
        stages.add_row(r["proj"], f"{r['sparsity']:g}",
                       *[f"{m['stages'][n]['median_us']:.2f} / {m['stages'][n]['p90_us']:.2f}" for n in stage_names],
                       f"{m['program_us']['median_us']:.2f} / {m['program_us']['p90_us']:.2f}",
                       f"{m['warp_loop_end_spread']['median_us']:.2f} / {m['warp_loop_end_spread']['p90_us']:.2f}")
    console.print(summary)
    console.print(stages)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("gemv_stages_gpu.py needs a CUDA GPU of compute capability 9.0+ (none is visible to torch)",
              file=sys.stderr)
        return 2
    import triton

    from teal.bench.kernels import ROTATION_BYTES, SHAPES
    from teal.bench.results import git_commit, write_json
    from teal.bench.timing import measure_copy_bandwidth
    from teal.kernels import cuda, ops

    device = torch.device("cuda")
    problem = cuda.device_problem(torch.cuda.current_device())
    if problem is not None:
        print(f"gemv_stages_gpu.py: the CUDA C++ kernel cannot run here: {problem}", file=sys.stderr)
        return 2
    pdl = ops.cuda_pdl_mode(device) if args.pdl is None else args.pdl
    t0 = time.perf_counter()
    copy_bw = measure_copy_bandwidth()
    props = torch.cuda.get_device_properties(device)
    data: dict[str, Any] = {
        "benchmark": "gemv-stages",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": props.name, "sm_count": props.multi_processor_count,
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "nvrtc": cuda.nvrtc_version(), "python": platform.python_version(), "git_commit": git_commit(),
        "command": "PYTHONPATH=. python3 " + " ".join(sys.argv),
        "shape": "llama-3-8b", "dtype": "bf16", "batch": 1, "masks": "random", "pdl": pdl,
        "copy_bandwidth_Bps": copy_bw,
        "timing": "median per call of CUDA-graph replays of back-to-back calls over rotated weight copies "
                  "(>= 192 MiB); stages from the STAMPS build's last replay, median over calls 1..",
        "model": "kept weight bytes (1 - measured sparsity) x K x N x 2 / copy bandwidth",
        "rows": [],
    }
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    for proj, k, splits in SHAPES["llama-3-8b"]:
        if proj not in args.projections:
            continue
        n = sum(splits)
        copies = max(2, math.ceil(ROTATION_BYTES / (k * n * 2)))
        ws = [(torch.randn(k, n, generator=gen, device=device) * k**-0.5).to(torch.bfloat16) for _ in range(copies)]
        for s in args.sparsities:
            row = measure(proj, k, splits, s, ws, pdl, max(args.calls, copies), gen)
            derive(row, copy_bw)
            data["rows"].append(row)
            print(f"{proj} s={s:g}: default {row['default_us']:.1f} us, stamps {row['stamps_us']:.1f} us, "
                  f"period {row['account']['median']['period_us']:.1f} us, checks "
                  f"{'ok' if row['checks']['ok'] else 'FAILED ' + str(row['checks'])}", flush=True)
            write_json(data, args.json_path)  # keep what is measured if the run is cut short
        del ws
        torch.cuda.empty_cache()
    data["copy_bandwidth_end_Bps"] = measure_copy_bandwidth()
    data["wall_s"] = time.perf_counter() - t0
    data["checks_passed"] = all(r["checks"]["ok"] and r["account"]["all_monotone"] for r in data["rows"])
    print_tables(data["rows"], f"CUDA sparse GEMV stages on {props.name}, bf16, batch 1, PDL {pdl}, copy "
                               f"{copy_bw / 1e12:.2f} TB/s")
    write_json(data, args.json_path)
    print(f"wrote {args.json_path} ({data['wall_s']:.0f} s); checks {'passed' if data['checks_passed'] else 'FAILED'}")
    return 0 if data["checks_passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
