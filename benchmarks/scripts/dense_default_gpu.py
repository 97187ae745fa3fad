"""What ``Generator.from_pretrained(MODEL)`` gives a user who asks for no sparsity, on this GPU.

    PYTHONPATH=. python3 benchmarks/scripts/dense_default_gpu.py --shape llama-3-8b --json OUT.json

Builds the generator the way ``teal generate --engine`` does (no thresholds), reports the weight layout and
which groups take the sparse kernel with every threshold -inf (``Engine.default_kernel_at_zero``), then
greedy-decodes 256 tokens after a 128-token prompt (median of the repeats, after a warm-up) with that
default and with cuBLAS for every group (``kernel_at_zero = False``) in the same process, and compares the
two paths' logits on one decode step. Prints the rows and writes JSON.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _gpu_run import run_info  # noqa: E402 (benchmarks/scripts is on sys.path when run as a script)

from teal.bench.decode import _rel
from teal.bench.results import write_json
from teal.engine import Generator


def rate(gen: Generator, ids: torch.Tensor, new_tokens: int, repeats: int) -> float:
    gen.generate(ids, 8, stop=[])  # capture / compile
    return statistics.median(gen.generate(ids, new_tokens, stop=[]).tokens_per_s for _ in range(repeats))


def step_logits(gen: Generator, ids: torch.Tensor) -> torch.Tensor:
    engine = gen.engine
    with torch.inference_mode():
        engine.prefill(ids[:-1])
        return engine.decode(ids[-1:], torch.tensor([len(ids) - 1], device=ids.device)).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3-8b")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", dest="json_path", required=True)
    args = parser.parse_args()
    gen = Generator.from_pretrained(args.shape, max_seq_len=args.prompt_len + args.new_tokens + 8)
    engine = gen.engine
    ids = torch.randint(0, engine.config.vocab_size, (args.prompt_len,), device=engine.device,
                        generator=torch.Generator(device=engine.device).manual_seed(0))
    data = {**run_info(engine.device), "shape": args.shape, "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens, "repeats": args.repeats, "transposed": engine.transposed,
            "default_groups_on_kernel": list(engine.groups_on_kernel_at_zero()),
            "layer0_groups_on_kernel": list(engine.sparse_flags[0]), "rows": []}
    default_logits = step_logits(gen, ids)
    data["rows"].append({"path": "default", "tokens_per_s": rate(gen, ids, args.new_tokens, args.repeats)})
    engine.kernel_at_zero = False
    engine.set_thresholds(None)
    cublas = Generator(engine, mode=gen.mode)
    cublas_logits = step_logits(cublas, ids)
    data["rows"].append({"path": "cuBLAS x @ w_t everywhere", "tokens_per_s": rate(cublas, ids, args.new_tokens,
                                                                                   args.repeats)})
    data["default_vs_cublas_logits_rel_err"] = _rel(default_logits, cublas_logits)
    data["speedup_default_vs_cublas"] = data["rows"][0]["tokens_per_s"] / data["rows"][1]["tokens_per_s"]
    for row in data["rows"]:
        print(f"{row['path']:28s} {row['tokens_per_s']:7.1f} tok/s")
    print({k: data[k] for k in ("transposed", "default_groups_on_kernel", "layer0_groups_on_kernel",
                                "default_vs_cublas_logits_rel_err", "speedup_default_vs_cublas")})
    write_json(data, args.json_path)


if __name__ == "__main__":
    main()
