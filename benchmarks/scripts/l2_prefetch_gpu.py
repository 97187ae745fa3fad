"""Does fetching the next projection's weights into L2 speed up decoding? (`Engine.l2_prefetch`)

    PYTHONPATH=. python3 benchmarks/scripts/l2_prefetch_gpu.py --shape llama-3-8b --json OUT.json

Each group's CUDA GEMV can fetch the first bytes of the next projection's weights into L2 after its own
weight stream (`cp.async.bulk.prefetch.L2`), so that they arrive while the DRAM would otherwise idle: in the
kernel's tail, the attention kernel, the norms and the next kernel's own start. This script times the
engine's compiled CUDA-graph decode (random weights of ``--shape``, thresholds from quantiles of a random
prompt as ``teal bench decode``) for each prefetch plan at each setting, the plans interleaved round by
round (so drift hits all alike), and checks that every plan gives the same greedy tokens and logits as no
prefetch (it is a hint: the results must be bit-identical). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch
from _gpu_run import run_info  # noqa: E402 (benchmarks/scripts is on sys.path when run as a script)

from teal.bench.decode import activation_threshold_levels, write_json
from teal.engine import Generator, engine_random
from teal.engine.model import parse_l2_prefetch

DEFAULT_PLANS = "off;o=32;o=32,gate_up=8;o=32,gate_up=8,down=4,qkv=8;o=32,gate_up=16,down=8,qkv=16"


def step_logits(gen: Generator, ids: torch.Tensor) -> torch.Tensor:
    engine = gen.engine
    with torch.inference_mode():
        engine.prefill(ids[:-1])
        return engine.decode(ids[-1:], torch.tensor([len(ids) - 1], device=ids.device)).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3-8b")
    parser.add_argument("--settings", default="0,0-kernel,0.5",
                        help="comma list: a sparsity, or 0-kernel (dense with every group on the kernel)")
    parser.add_argument("--plans", default=DEFAULT_PLANS, help="';'-separated prefetch plans (MiB per target)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", dest="json_path", required=True)
    args = parser.parse_args()
    device = torch.device("cuda")
    engine = engine_random(args.shape, max_seq_len=args.prompt_len + args.new_tokens + 16, dtype=torch.bfloat16,
                           device=device, transposed=True)
    ids = torch.randint(0, engine.config.vocab_size, (args.prompt_len,), device=device,
                        generator=torch.Generator(device=device).manual_seed(0))
    plans = [(text, parse_l2_prefetch(text)) for text in args.plans.split(";")]
    data: dict[str, Any] = {**run_info(device), "shape": args.shape, "prompt_len": args.prompt_len,
                            "new_tokens": args.new_tokens, "rounds": args.rounds, "rows": []}
    print(f"{'setting':10s} {'plan':40s} {'tok/s':>7s} {'x off':>6s}  runs", flush=True)
    for setting in args.settings.split(","):
        if setting == "0-kernel":
            engine.kernel_at_zero = True
            engine.set_thresholds(None)
        else:
            engine.kernel_at_zero = None
            s = float(setting)
            engine.set_thresholds(activation_threshold_levels(engine, ids, [s])[0] if s > 0 else None)
        gen = Generator(engine, mode="compiled-graph")
        ref_logits, ref_tokens = None, None
        runs: dict[str, list[float]] = {text: [] for text, _ in plans}
        checks: dict[str, dict[str, Any]] = {}
        for text, plan in plans:  # capture every plan's graph, check it against no prefetch
            engine.l2_prefetch = plan
            logits = step_logits(gen, ids)
            tokens = gen.generate(ids, 32, stop=[]).tokens
            if ref_logits is None:
                ref_logits, ref_tokens = logits, tokens
            checks[text] = {"logits_equal": bool(torch.equal(logits, ref_logits)), "tokens_equal": tokens == ref_tokens,
                            "bytes_layer0": list(engine.prefetch_bytes(0))}
        for _ in range(args.rounds):
            for text, plan in plans:
                engine.l2_prefetch = plan
                runs[text].append(gen.generate(ids, args.new_tokens, stop=[]).tokens_per_s)
        # the first plan again in a fresh generator (new capture): do its tokens repeat themselves?
        engine.l2_prefetch = plans[0][1]
        fresh = Generator(engine, mode="compiled-graph")
        repeat_equal = fresh.generate(ids, 32, stop=[]).tokens == ref_tokens
        del fresh
        print(f"{setting}: first plan's tokens in a fresh generator equal: {repeat_equal}", flush=True)
        data.setdefault("fresh_capture_tokens_equal", {})[setting] = repeat_equal
        base = statistics.median(runs[plans[0][0]])
        for text, _ in plans:
            rate = statistics.median(runs[text])
            row = {"setting": setting, "plan": text, "tokens_per_s": rate, "vs_first_plan": rate / base,
                   "runs": [round(r, 2) for r in runs[text]], "mode": gen.mode, **checks[text]}
            data["rows"].append(row)
            ok = "" if row["logits_equal"] and row["tokens_equal"] else "  MISMATCH"
            print(f"{setting:10s} {text:40s} {rate:7.1f} {rate / base:6.3f}  {row['runs']} "
                  f"bytes {row['bytes_layer0']}{ok}", flush=True)
        del gen
        torch.cuda.empty_cache()
    write_json(data, args.json_path)


if __name__ == "__main__":
    main()
