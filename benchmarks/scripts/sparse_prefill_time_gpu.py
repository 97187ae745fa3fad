"""Time the engine's prefill of a long prompt on the GPU: dense, and sparse (every prompt position thresholded,
`Engine.set_prefill_policy("sparse")`) with the masked dense fallback's two layouts for fused groups: the
stacked [S*T, K] product (forced with `ops.PER_SEGMENT_MIN_WORK` = inf) and one product per segment (the
default from rows x narrowest width >= 2^18). Random Llama-3-8B-shaped weights, bf16, thresholds at 50 % from
quantiles of a random prompt. The two sparse layouts are also compared with each other (logits).

    PYTHONPATH=. python3 benchmarks/scripts/sparse_prefill_time_gpu.py --json OUT.json
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from _gpu_run import run_info  # noqa: E402 (benchmarks/scripts is on sys.path when run as a script)

from teal.bench.results import write_json
from teal.engine.loading import engine_random
from teal.engine.reference import activation_threshold_levels
from teal.kernels import ops


def time_ms(fn, repeats: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", dest="json_path", required=True)
    parser.add_argument("--shape", default="llama-3-8b")
    parser.add_argument("--prompts", default="512,2048")
    args = parser.parse_args()
    device = torch.device("cuda")
    prompts = [int(p) for p in args.prompts.split(",")]
    data: dict[str, Any] = {**run_info(device), "shape": args.shape, "rows": []}
    engine = engine_random(args.shape, dtype=torch.bfloat16, device=device, max_seq_len=max(prompts) + 8)
    engine.to_layout(transposed=True)
    gen = torch.Generator(device=device).manual_seed(2)
    calib = torch.randint(0, engine.config.vocab_size, (512,), device=device, generator=gen)
    (th,) = activation_threshold_levels(engine, calib, [0.5])
    engine.set_thresholds(th, None)
    default_work = ops.PER_SEGMENT_MIN_WORK
    print(f"{'prompt':>6s} {'dense ms':>9s} {'sparse stacked':>15s} {'sparse per-seg':>15s}  rel diff", flush=True)
    for n in prompts:
        ids = torch.randint(0, engine.config.vocab_size, (n,), device=device, generator=gen)
        engine.set_prefill_policy("dense")
        t_dense = time_ms(lambda: engine.prefill(ids))
        engine.set_prefill_policy("sparse")
        stacked_times, seg_times = [], []
        for _ in range(3):  # alternate the two layouts, each timed after its own warm-up call
            ops.PER_SEGMENT_MIN_WORK = float("inf")
            stacked_times.append(time_ms(lambda: engine.prefill(ids)))
            ops.PER_SEGMENT_MIN_WORK = default_work
            seg_times.append(time_ms(lambda: engine.prefill(ids)))
        t_stacked, t_seg = sorted(stacked_times)[1], sorted(seg_times)[1]
        ops.PER_SEGMENT_MIN_WORK = float("inf")
        logits_stacked = engine.prefill(ids).float()
        ops.PER_SEGMENT_MIN_WORK = default_work
        logits_seg = engine.prefill(ids).float()
        diff = float((logits_seg - logits_stacked).norm() / logits_stacked.norm())
        row = dict(prompt=n, dense_ms=t_dense, sparse_stacked_ms=t_stacked, sparse_per_segment_ms=t_seg,
                   stacked_runs_ms=stacked_times, per_segment_runs_ms=seg_times, logits_rel_diff=diff)
        data["rows"].append(row)
        print(f"{n:6d} {t_dense:9.2f} {t_stacked:15.2f} {t_seg:15.2f}  {diff:.1e}", flush=True)
    engine.set_prefill_policy("dense")
    write_json(data, args.json_path)


if __name__ == "__main__":
    main()
