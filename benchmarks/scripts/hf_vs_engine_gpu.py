"""Decode tok/s a user gets from `teal.sparsify_` + HF `generate` (static cache) vs teal's engine, same weights.

    PYTHONPATH=. python3 benchmarks/scripts/hf_vs_engine_gpu.py --json benchmarks/results/DATE-h100-hf-vs-engine.json
    PYTHONPATH=. python3 benchmarks/scripts/hf_vs_engine_gpu.py --device cpu --shape tiny-llama --new-tokens 8 \
        --repeats 1 --json /tmp/hf_vs_engine.json          # smoke test of the script itself (no GPU)

One set of random weights (default: the Llama-3-8B shape, bf16, batch 1) in teal's engine and in an HF
`LlamaForCausalLM` twin; thresholds calibrated on the twin from random token windows (uniform allocation). Rows,
at sparsity 0 and 0.5 (`--sparsity`):

* HF `generate`, `cache_implementation="static"` (transformers compiles the decode step itself): the plain
  model at 0, the model after `teal.sparsify_(..., prefill="dense")` above 0 (TealLinear on the sparse GEMV
  kernel for single-token steps);
* teal's engine (`Generator`, its default mode: compiled CUDA graph): dense default at 0, the same thresholds
  above 0.

Decode tok/s is measured between the first and the last new token (median of the repeats, after a warm-up
run that compiles); prompt 128 tokens, 128 new tokens, greedy, no stop token. Measured sparsity: the
TealLinear counters over a timed HF run; for the engine, 4 eager greedy steps observed after a 64-token
prefill (`teal.engine.reference.decode_sparsity`). Correctness first: the dense engine's prompt logits against
the HF twin's (relative error), and how many leading greedy tokens HF and the engine share at each level.
Prints a table and writes JSON (run info from `_gpu_run.run_info`).
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

import teal  # noqa: E402
from teal.bench.decode import _rel, build_hf_twin, hf_decode_rate, write_json  # noqa: E402
from teal.engine import Generator, engine_random  # noqa: E402
from teal.engine.generator import resolve_thresholds  # noqa: E402
from teal.engine.reference import decode_sparsity  # noqa: E402
from teal.sparsify import measured_sparsity, reset_counters  # noqa: E402


def log(msg: str, t0: float = time.perf_counter()) -> None:
    print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", flush=True)


def engine_rate(gen: Generator, ids: torch.Tensor, new_tokens: int, repeats: int) -> dict[str, Any]:
    gen.warmup(greedy=True)
    gen.generate(ids, max_new_tokens=new_tokens, stop=[])
    runs = [gen.generate(ids, max_new_tokens=new_tokens, stop=[]) for _ in range(repeats)]
    rates = sorted(r.tokens_per_s for r in runs)
    return {"tokens_per_s": rates[len(rates) // 2], "tokens_per_s_runs": [round(r, 2) for r in rates],
            "mode": gen.mode, "compile_error": gen.compile_error, "tokens": runs[-1].tokens[:16]}


def hf_tokens(model: torch.nn.Module, ids: torch.Tensor, n: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(ids[None], attention_mask=torch.ones_like(ids[None]), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, eos_token_id=None, pad_token_id=0, cache_implementation="static")
    return out[0, ids.numel():].tolist()


def shared_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--sparsity", default="0,0.5")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calib-windows", type=int, default=8, help="random windows of 256 tokens to calibrate on")
    parser.add_argument("--json", dest="json_path", required=True)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    levels = [float(s) for s in args.sparsity.split(",")]

    log(f"building {args.shape} (random weights, {args.dtype}) on {device}")
    engine = engine_random(args.shape, dtype=dtype, device=device, transposed=True,
                           max_seq_len=args.prompt_len + args.new_tokens + 16)
    hf = build_hf_twin(engine)
    vocab = engine.config.vocab_size
    gen_rng = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, vocab, (args.prompt_len,), device=device, generator=gen_rng)
    calib = torch.randint(0, vocab, (args.calib_windows, 256), device=device, generator=gen_rng)
    log("calibrating thresholds on the HF twin")
    th = teal.calibrate(hf, None, windows=calib, progress=False)

    data: dict[str, Any] = {**run_info(device), "shape": args.shape, "dtype": args.dtype,
                            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
                            "weights": "random (normal, std 0.02)", "calibration": "random token windows, uniform",
                            "rows": []}
    engine.set_thresholds(None)
    with torch.inference_mode():
        hf_logits = hf(ids[None]).logits[0, -1].float()
        engine_logits = engine.prefill(ids).float().reshape(-1)
    data["check_dense_prompt_logits_rel_err"] = _rel(engine_logits, hf_logits)
    log(f"dense prompt logits, engine vs HF: rel err {data['check_dense_prompt_logits_rel_err']:.2e}")

    for s in levels:
        # ---- HF generate, static cache
        if s > 0:
            teal.sparsify_(hf, th, s, prefill="dense")
        else:
            teal.densify_(hf)
        log(f"s={s}: HF generate (static cache)")
        hf_row = hf_decode_rate(hf, ids, args.new_tokens, args.repeats, "static")
        reset_counters(hf)
        toks_hf = hf_tokens(hf, ids, 16)
        hf_measured = float(measured_sparsity(hf)) if s > 0 else 0.0
        # ---- teal engine
        log(f"s={s}: teal engine")
        if s > 0:
            gen = Generator(engine, thresholds=th, sparsity=s)
            values, scales = resolve_thresholds(th, s, engine)
            eng_measured, _ = decode_sparsity(engine, ids[:64], 4, values, scales)
        else:
            engine.set_thresholds(None)
            gen = Generator(engine)
            eng_measured = 0.0
        eng_row = engine_rate(gen, ids, args.new_tokens, args.repeats)
        agree = shared_prefix(toks_hf, eng_row.pop("tokens"))
        for name, row, measured in (("HF generate, static cache" + (" + sparsify_" if s > 0 else ""), hf_row,
                                     hf_measured), ("teal engine", eng_row, eng_measured)):
            data["rows"].append({"setting": name, "sparsity": s, "measured_sparsity": round(measured, 4),
                                 "greedy_tokens_shared_with_other_path": agree, **row})
        log(f"s={s}: HF {hf_row['tokens_per_s']:.1f} tok/s (measured {hf_measured:.3f}), engine "
            f"{eng_row['tokens_per_s']:.1f} tok/s (measured {eng_measured:.3f}); {agree}/16 greedy tokens shared")
        del gen
        write_json(data, args.json_path)  # each level as it ends: a run stopped by its time limit keeps them
    teal.densify_(hf)

    hf_dense = next((r["tokens_per_s"] for r in data["rows"] if r["sparsity"] == 0 and r["setting"].startswith("HF")),
                    None)
    print(f"\n{'setting':42s} {'sparsity':>8} {'measured':>8} {'tok/s':>8} {'x HF dense':>10}")
    for r in data["rows"]:
        r["x_hf_static_dense"] = r["tokens_per_s"] / hf_dense if hf_dense else None
        ratio = f"{r['x_hf_static_dense']:.2f}" if hf_dense else "-"
        print(f"{r['setting']:42s} {r['sparsity']:8.2f} {r['measured_sparsity']:8.3f} {r['tokens_per_s']:8.1f} "
              f"{ratio:>10}")
    write_json(data, args.json_path)
    log(f"wrote {args.json_path}")


if __name__ == "__main__":
    main()
