"""Where a 50 % decode step's time goes against a bytes / copy-bandwidth model, from committed measurements (CPU;
reads result JSONs, measures nothing itself).

    python3 benchmarks/scripts/persistent_account.py [--kernels K.json] [--ablation A.json]

Inputs (defaults: the H200 runs of 2026-11-29, same code generation): the kernel bench's batch-1 Llama-3-8B
rows (µs per call in a CUDA graph, copy bandwidth of that run) and the decode-step ablation (step time, and
the step with every GEMV replaced by zeros). Per projection: model µs = kept bytes / copy bandwidth; excess =
measured - model. Per step: 32 layers of the four calls against the ablation's GEMV share.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", default=str(RESULTS / "2026-11-29-h200-kernels-cuda-batched.json"))
    parser.add_argument("--ablation", default=str(RESULTS / "2026-11-29-h200-decode-ablation.json"))
    parser.add_argument("--sparsity", type=float, default=0.5)
    args = parser.parse_args()
    kern = json.loads(Path(args.kernels).read_text())
    abl = json.loads(Path(args.ablation).read_text())
    bw = kern["copy_bandwidth_Bps"]
    print(f"kernel bench: {kern['device']}, copy {bw / 1e12:.2f} TB/s, {Path(args.kernels).name}")
    per_layer = {"us": 0.0, "model": 0.0}
    print(f"{'projection':10s} {'s':>5s} {'kept':>6s} {'µs':>7s} {'bytes/bw µs':>12s} {'of model':>9s} {'excess µs':>10s}")
    for s in (0.0, args.sparsity):
        total_us = total_model = 0.0
        for r in kern["results"]:
            if r["model"] != "llama-3-8b" or r["batch"] != 1 or abs(r["sparsity"] - s) > 1e-9:
                continue
            kept = 1.0 - r["measured_sparsity"]
            model = kept * r["weight_bytes"] / bw * 1e6
            total_us += r["us"]
            total_model += model
            print(f"{r['proj']:10s} {s:5.2f} {kept:6.3f} {r['us']:7.1f} {model:12.1f} {model / r['us']:9.0%} "
                  f"{r['us'] - model:10.1f}")
        print(f"{'per layer':10s} {s:5.2f} {'':6s} {total_us:7.1f} {total_model:12.1f} {total_model / total_us:9.0%} "
              f"{total_us - total_model:10.1f}   x32: {32 * total_us:.0f} µs measured, {32 * total_model:.0f} µs model")
        if s == args.sparsity:
            per_layer = {"us": total_us, "model": total_model}
    key = f"s{args.sparsity:g}"
    if key in abl:
        rows = {r["without"]: r for r in abl[key]["rows"]}
        step = rows["none"]["us_per_step"]
        gemv = rows["gemv"]["saved_us_per_step"] if "gemv" in rows else float("nan")
        rest = rows["gemv"]["us_per_step"] if "gemv" in rows else float("nan")
        print(f"decode step ({abl[key]['device']}, {Path(args.ablation).name}): {step:.0f} µs; GEMVs in the graph "
              f"{gemv:.0f} µs (32 x isolated calls: {32 * per_layer['us']:.0f}; bytes/bw: {32 * per_layer['model']:.0f});"
              f" everything else {rest:.0f} µs")
        print(f"  GEMV excess over bytes/bw: {gemv - 32 * per_layer['model']:.0f} µs per step = "
              f"{(gemv - 32 * per_layer['model']) / 128:.1f} µs per call over 128 calls")
        dense = {r["without"]: r for r in abl.get("s0", {}).get("rows", [])}.get("none")
        if dense is not None:
            print(f"  1.8x the s=0 step of the same ablation ({dense['us_per_step']:.0f} µs) needs a "
                  f"{dense['us_per_step'] / 1.8:.0f} µs step: {step - dense['us_per_step'] / 1.8:.0f} µs less than now")


if __name__ == "__main__":
    main()
