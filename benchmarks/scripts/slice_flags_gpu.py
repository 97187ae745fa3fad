"""Per-slice flags between gate|up and down (teal/kernels/slice_flags.py) against today's two launches, in one
GPU run: issue 22's second candidate.

    TEAL_SOURCE_COMMIT=<commit> PYTHONPATH=. python3 benchmarks/scripts/slice_flags_gpu.py --json OUT.json
    PYTHONPATH=. python3 benchmarks/scripts/slice_flags_gpu.py --device cpu      # smoke: arguments, simulation

0. The protocol simulated on the CPU (correct schedules pass, each deliberate break is caught).
1. Correctness first: the flagged pair against today's launches with the same configurations (gate|up row and
   output bit for bit) and float64, bf16 / fp16, odd shapes and the Llama-3-8B MLP widths, s = 0, 0.5, 0.9,
   three calls back to back and a CUDA graph replayed with fresh inputs; no spin timeout. Nothing is timed
   unless every check passes.
2. Timing: the Llama-3-8B MLP (H 4096, I 14336, N 4096), bf16, batch 1, random masks, s = 0, 0.4, 0.5, 0.65,
   in CUDA graphs over two weight copies (more than L2): today's pair (both launches PDL 2, the engine's
   default), the control with gate|up letting down launch at its start (down still waits for the whole
   grid), and the flag pair with gate|up's trigger at its start (1) or after its weight loop (2). Each is
   timed ``--rounds`` times in rotating order; the table gives the median of the rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

from teal.kernels import cuda
from teal.kernels import slice_flags as S
from teal.kernels.configs import KernelConfig, get_config

ODD = (520, 1000, 776)  # H, I, N: widths multiples of 8 only
LLAMA = (4096, 14336, 4096)
ODD_CONFIGS = (KernelConfig(block_n=256, block_r=8, split_k=2, num_warps=8, cuda=True),
               KernelConfig(block_n=256, block_r=8, split_k=4, num_warps=8, cuda=True))
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
VARIANTS = ("today", "today, gate|up PDL 1", "flags, gate|up PDL 1", "flags, gate|up PDL 2")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", dest="json_path", help="where to write the results (required on CUDA)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: parse the arguments and run the protocol simulation only")
    parser.add_argument("--sparsities", default="0,0.4,0.5,0.65", help="comma-separated, each in [0, 1)")
    parser.add_argument("--rounds", type=int, default=3, help="timings per variant and sparsity (median kept)")
    parser.add_argument("--replays", type=int, default=20, help="graph replays per timing")
    args = parser.parse_args(argv)
    try:
        args.sparsity_list = [float(v) for v in args.sparsities.split(",") if v.strip()]
    except ValueError:
        parser.error(f"--sparsities must be comma-separated numbers, got {args.sparsities!r}")
    if not args.sparsity_list or any(not 0 <= s < 1 for s in args.sparsity_list):
        parser.error(f"--sparsities must be numbers in [0, 1), got {args.sparsities!r}")
    if args.rounds < 1 or args.replays < 1:
        parser.error("--rounds and --replays must be at least 1")
    if args.device == "cuda" and not args.json_path:
        parser.error("--json PATH is required on CUDA (the results file)")
    return args


def protocol_summary() -> dict[str, Any]:
    """The CPU simulation: correct schedules (waves of programs, both trigger points) and each fault."""
    out: dict[str, Any] = {}
    seeds = range(3)
    correct = [S.simulate(slots=slots, producer_trigger=trig, seed=seed)
               for slots in (3, 64) for trig in ("start", "end") for seed in seeds]
    out["correct_ok"] = all(r.ok for r in correct)
    wrap = S.MASK32 // S.arrivals_per_slice(2)
    out["wrap_ok"] = all(S.simulate(start_call=wrap, seed=seed).ok for seed in seeds)
    for fault in ("release_before_data", "epoch_not_advanced", "producer_skips_wait"):
        out[f"{fault}_caught"] = any(S.simulate(seed=seed, faults=[fault]).stale_reads for seed in seeds)
    out["naive_compare_caught"] = any(S.simulate(start_call=wrap, seed=seed, faults=["naive_compare"]).stale_reads
                                      for seed in seeds)
    missing = S.simulate(faults=["missing_release"])
    out["missing_release_reported"] = missing.error is not None and not missing.hang
    early = S.simulate(slots=4, placement="newest", faults=["launch_early"])
    out["launch_early_reported"] = early.error is not None and not early.hang
    out["all_ok"] = all(v for k, v in out.items() if k != "all_ok")
    return out


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def thresholds_at(h: torch.Tensor, w_gu: torch.Tensor, s: float) -> torch.Tensor:
    """Gate and up thresholds at the s-quantile of |h|, down's at the s-quantile of |silu(gate) * up|."""
    from teal.kernels.ops import sparse_linear_reference

    if s == 0:
        return torch.full((3,), float("-inf"), device=h.device)
    inter = w_gu.shape[1] // 2
    t = float(torch.quantile(h.abs().float().flatten(), s))
    gu = sparse_linear_reference(h, w_gu, torch.tensor([t, t], device=h.device), [inter, inter])
    mid = (F.silu(gu[:, :inter]) * gu[:, inter:]).float().flatten()
    return torch.tensor([t, t, float(torch.quantile(mid.abs(), s))], device=h.device)


def launch_today(h, w_gu, w_d, thr, gu, y, producer, consumer, producer_pdl: int = 2) -> None:
    inter = w_gu.shape[1] // 2
    cuda.launch(h, w_gu, gu, thr[0:2], None, [inter, inter], producer, pdl=producer_pdl)
    cuda.launch(gu, w_d, y, thr[2:3], None, [w_d.shape[1]], consumer, glu=True, pdl=2)


def check_case(shape, dtype, configs, s, producer_pdl, gen, device) -> dict[str, Any]:
    """Three flagged calls back to back (fresh inputs) and two graph replays, each against today's launches
    and float64."""
    from teal.kernels.ops import sparse_linear_reference

    h_dim, inter, n = shape
    producer, consumer = configs
    w_gu = (torch.randn(h_dim, 2 * inter, generator=gen, device=device) * h_dim**-0.5).to(dtype)
    w_d = (torch.randn(inter, n, generator=gen, device=device) * inter**-0.5).to(dtype)
    h = torch.randn(1, h_dim, generator=gen, device=device).to(dtype)
    thr = thresholds_at(h, w_gu, s)
    flags = S.SliceFlags(inter, producer, dtype, device, spin_limit=1 << 22)
    problem = S.pair_problem(h, w_gu, w_d, producer, consumer, flags)
    row: dict[str, Any] = {"shape": shape, "dtype": str(dtype), "s": s, "producer_pdl": producer_pdl,
                           "producer": producer.as_dict(), "consumer": consumer.as_dict(), "problem": problem}
    if problem is not None:
        row["ok"] = False
        return row
    gu = torch.empty(1, 2 * inter, dtype=dtype, device=device)
    y = torch.empty(1, n, dtype=dtype, device=device)
    gu_t, y_t = torch.empty_like(gu), torch.empty_like(y)

    def compare(tag: str) -> dict[str, Any]:
        torch.cuda.synchronize()
        launch_today(h, w_gu, w_d, thr, gu_t, y_t, producer, consumer)
        torch.cuda.synchronize()
        gu64 = sparse_linear_reference(h, w_gu, thr[0:2], [inter, inter], compute_dtype=torch.float64,
                                       out_dtype=torch.float64)
        mid = F.silu(gu[:, :inter]) * gu[:, inter:]
        y64 = sparse_linear_reference(mid, w_d, thr[2:3], None, compute_dtype=torch.float64, out_dtype=torch.float64)
        c = {"call": tag, "gate_up_equal": bool(torch.equal(gu, gu_t)), "y_equal": bool(torch.equal(y, y_t)),
             "nan": bool(torch.isnan(gu).any() or torch.isnan(y).any()), "gate_up_rel_err": rel_err(gu, gu64),
             "y_rel_err": rel_err(y, y64), "spin_report": flags.error()}
        c["ok"] = (c["gate_up_equal"] and c["y_equal"] and not c["nan"] and c["spin_report"] is None
                   and c["gate_up_rel_err"] <= TOL[dtype] and c["y_rel_err"] <= TOL[dtype])
        return c

    calls = []
    for i in range(3):
        h.copy_(torch.randn(1, h_dim, generator=gen, device=device).to(dtype))
        gu.fill_(float("nan"))
        y.fill_(float("nan"))
        S.launch_pair(h, w_gu, w_d, thr, gu, y, producer, consumer, flags, producer_pdl=producer_pdl)
        calls.append(compare(f"eager {i}"))
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        S.launch_pair(h, w_gu, w_d, thr, gu, y, producer, consumer, flags, producer_pdl=producer_pdl)
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        S.launch_pair(h, w_gu, w_d, thr, gu, y, producer, consumer, flags, producer_pdl=producer_pdl)
    for i in range(2):
        h.copy_(torch.randn(1, h_dim, generator=gen, device=device).to(dtype))
        gu.fill_(float("nan"))
        y.fill_(float("nan"))
        graph.replay()
        calls.append(compare(f"graph replay {i}"))
    row["calls"] = calls
    row["ok"] = all(c["ok"] for c in calls)
    return row


def time_variants(args, device, bw: float) -> list[dict[str, Any]]:
    from teal.kernels.tune import time_graph_us

    h_dim, inter, n = LLAMA
    dtype = torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(7)
    weights = [((torch.randn(h_dim, 2 * inter, generator=gen, device=device) * h_dim**-0.5).to(dtype),
                (torch.randn(inter, n, generator=gen, device=device) * inter**-0.5).to(dtype)) for _ in range(2)]
    h = torch.randn(1, h_dim, generator=gen, device=device).to(dtype)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    rows = []
    for s in args.sparsity_list:
        regime = "dense" if s == 0 else "sparse"
        producer = get_config(h_dim, 2 * inter, 1, dtype, sms, cuda_ok=True, regime=regime)
        consumer = get_config(inter, n, 1, dtype, sms, cuda_ok=True, regime=regime)
        thr = thresholds_at(h, weights[0][0], s)
        flags = S.SliceFlags(inter, producer, dtype, device)
        outs = [(torch.empty(1, 2 * inter, dtype=dtype, device=device), torch.empty(1, n, dtype=dtype, device=device))
                for _ in weights]
        calls: dict[str, list[Callable[[], None]]] = {
            "today": [lambda w=w, o=o: launch_today(h, *w, thr, *o, producer, consumer) for w, o in zip(weights, outs)],
            "today, gate|up PDL 1": [lambda w=w, o=o: launch_today(h, *w, thr, *o, producer, consumer, producer_pdl=1)
                                     for w, o in zip(weights, outs)],
            "flags, gate|up PDL 1": [lambda w=w, o=o: S.launch_pair(h, *w, thr, *o, producer, consumer, flags,
                                                                    producer_pdl=1) for w, o in zip(weights, outs)],
            "flags, gate|up PDL 2": [lambda w=w, o=o: S.launch_pair(h, *w, thr, *o, producer, consumer, flags,
                                                                    producer_pdl=2) for w, o in zip(weights, outs)],
        }
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for r in range(args.rounds):
            order = VARIANTS[r % len(VARIANTS):] + VARIANTS[: r % len(VARIANTS)]
            for v in order:
                times[v].append(time_graph_us(calls[v], replays=args.replays))
        torch.cuda.synchronize()
        report = flags.error()
        launch_today(h, *weights[0], thr, *outs[0], producer, consumer)
        gu = outs[0][0]
        kept_in = float((h.abs().float() > thr[0]).float().mean())
        mid = (F.silu(gu[:, :inter]) * gu[:, inter:]).float()
        kept_mid = float((mid.abs() > thr[2]).float().mean())
        model_us = (kept_in * h_dim * 2 * inter + kept_mid * inter * n) * 2 / bw * 1e6
        med = {v: statistics.median(t) for v, t in times.items()}
        row = {"s": s, "kept_gate_up": kept_in, "kept_down": kept_mid, "model_us": model_us,
               "producer": producer.as_dict(), "consumer": consumer.as_dict(), "us_rounds": times, "us": med,
               "spin_report": report, "valid": report is None,
               "flags_best": min(("flags, gate|up PDL 1", "flags, gate|up PDL 2"), key=med.get)}
        row["saved_us"] = med["today"] - med[row["flags_best"]]
        row["x_today"] = med["today"] / med[row["flags_best"]]
        rows.append(row)
        print(f"s={s:.2f} kept {kept_in:.3f}/{kept_mid:.3f} model {model_us:6.1f} µs | "
              + " | ".join(f"{v} {med[v]:6.1f}" for v in VARIANTS)
              + f" | best flags saves {row['saved_us']:+.1f} µs (x{row['x_today']:.3f}) spin report {report}",
              flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summary = protocol_summary()
    print("protocol simulation: " + ", ".join(f"{k} {v}" for k, v in summary.items()), flush=True)
    if args.device == "cpu":
        return 0 if summary["all_ok"] else 1
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from _gpu_run import run_info

    from teal.bench.results import write_json
    from teal.bench.timing import measure_copy_bandwidth

    device = torch.device("cuda")
    data: dict[str, Any] = {**run_info(device), "protocol_simulation": summary}
    bw = measure_copy_bandwidth()
    data["copy_bandwidth_Bps"] = bw
    data["sm_count"] = torch.cuda.get_device_properties(device).multi_processor_count
    print(f"{data['device']}: copy bandwidth {bw / 1e12:.3f} TB/s, {data['sm_count']} SMs", flush=True)

    checks = []
    gen = torch.Generator(device=device).manual_seed(1)
    sms = data["sm_count"]
    for shape, dtypes, pdls in ((ODD, (torch.bfloat16, torch.float16), (1,)), (LLAMA, (torch.bfloat16,), (1, 2))):
        for dtype in dtypes:
            for s in (0.0, 0.5, 0.9):
                if shape == ODD:
                    configs = ODD_CONFIGS
                else:
                    regime = "dense" if s == 0 else "sparse"
                    configs = (get_config(shape[0], 2 * shape[1], 1, dtype, sms, cuda_ok=True, regime=regime),
                               get_config(shape[1], shape[2], 1, dtype, sms, cuda_ok=True, regime=regime))
                for pdl in pdls:
                    row = check_case(shape, dtype, configs, s, pdl, gen, device)
                    checks.append(row)
                    worst = max((c["y_rel_err"] for c in row.get("calls", [])), default=float("nan"))
                    print(f"check {str(dtype):15s} {str(shape):20s} s={s:.1f} gate|up PDL {pdl}: "
                          f"{'ok' if row['ok'] else 'FAIL'} (worst y rel err {worst:.2e}"
                          f"{'; ' + row['problem'] if row.get('problem') else ''})", flush=True)
    data["checks"] = checks
    data["checks_passed"] = all(c["ok"] for c in checks) and summary["all_ok"]
    write_json(data, args.json_path)
    if not data["checks_passed"]:
        print("correctness checks failed: no timing", flush=True)
        return 1
    data["rows"] = time_variants(args, device, bw)
    write_json(data, args.json_path)
    print("| s | kept in / mid | bytes model µs | " + " | ".join(VARIANTS) + " | best flags − today µs | × today |")
    print("|---|---|---|" + "---|" * len(VARIANTS) + "---|---|")
    for r in data["rows"]:
        print(f"| {r['s']} | {r['kept_gate_up']:.3f} / {r['kept_down']:.3f} | {r['model_us']:.1f} | "
              + " | ".join(f"{r['us'][v]:.1f}" for v in VARIANTS)
              + f" | {-r['saved_us']:+.1f} | {r['x_today']:.3f} |")
    return 0


if __name__ == "__main__":
    t0 = time.time()
    code = main()
    print(f"done in {time.time() - t0:.0f} s", flush=True)
    sys.exit(code)
