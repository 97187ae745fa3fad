"""The quantized decode's correctness check alone, with every number it decides on.

    PYTHONPATH=. python3 benchmarks/scripts/quant_check_gpu.py --json benchmarks/results/DATE-h200-quant-check.json
    PYTHONPATH=. python3 benchmarks/scripts/quant_check_gpu.py --device cpu --shape tiny-llama \
        --json /tmp/quant_check.json             # smoke test of the script itself (no GPU: the reference products)

`teal bench decode --weights int4` runs `teal.bench.quant_decode.check_quantized` before timing and times
nothing when it fails; an H200 run failed it and lost the details (`2026-12-07-h200-quant-decode-llama-3-8b-
int4-check-failed.json`). This script builds the engine of `--shape` with random weights (bf16), quantizes it
(`--weights`, group 128) and runs the same check: every projection group of the first and last layer against float64 (batch 1, 4,
16; s = 0 and 0.5), and 48 teacher-forced steps of a 4-layer twin, dense and at 50 %, beside the same steps
with float32 torch products. Prints one line per part and writes the check's dicts as JSON (run info from
`_gpu_run.run_info`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpu_run import run_info  # noqa: E402

from teal.bench.quant_decode import check_quantized  # noqa: E402
from teal.bench.results import write_json  # noqa: E402
from teal.engine import engine_random  # noqa: E402


def summary(res: dict[str, Any]) -> list[str]:
    proj = res["projections"]
    lines = [f"projections passed={proj['passed']} max_rel_err={proj['max_rel_err']:.3g} worst={proj['worst']}"]
    for name in ("dense", "sparse"):
        r = res["decode"][name]
        floor = r["torch_float32_products"]
        lines.append(f"{name}: passed={r['passed']} top1={r['top1_agreement']:.4f} median={r['median_rel_err']:.4g} "
                     f"max={r['max_rel_err']:.4g} products_p90={r['products'].get('p90_rel_err')} "
                     f"float32 products: top1={floor['top1_agreement']:.4f} median={floor['median_rel_err']:.4g}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", dest="json_path", required=True)
    parser.add_argument("--shape", default="llama-3-8b")
    parser.add_argument("--weights", default="int4", choices=("int4", "int8"))
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    out: dict[str, Any] = {"benchmark": "quant_check", **run_info(device), "shape": args.shape,
                           "weights": args.weights, "checks": {}}
    t = time.perf_counter()
    engine = engine_random(args.shape, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                           device=device, max_seq_len=256)
    engine.quantize_weights(args.weights, 128)
    print(f"engine built and quantized in {time.perf_counter() - t:.1f} s", flush=True)
    t = time.perf_counter()
    res = check_quantized(engine, None)
    res["seconds"] = round(time.perf_counter() - t, 1)
    out["checks"][args.weights] = res
    print(f"{args.weights}: passed={res['passed']} ({res['seconds']} s)", flush=True)
    for line in summary(res):
        print("  " + line, flush=True)
    write_json(out, args.json_path)
    return 0 if all(r["passed"] for r in out["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
