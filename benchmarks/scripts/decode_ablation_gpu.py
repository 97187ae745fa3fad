"""Where a decode step's time goes, measured in the CUDA graph by leaving parts out (timing only).

    PYTHONPATH=. python3 benchmarks/scripts/decode_ablation_gpu.py --shape llama-3-8b --sparsity 0.5 --json OUT.json

A profiler's kernel durations overlap under programmatic dependent launch (a kernel starts early and
waits), so they do not add up to the step. This script instead times the engine's compiled CUDA-graph
decode (random weights of ``--shape``, thresholds at ``--sparsity`` from quantiles of a random prompt, as
``teal bench decode``) with parts of the layer replaced by trivial stand-ins, each in a fresh generator:

- ``gemv``: every projection of the layer (q|k|v, o, gate|up, down) returns zeros without reading weights;
- ``attention``: the attention op returns the q part of the q|k|v row (no cache read or write);
- ``norms``: RMSNorm returns its input (the residual add stays). At a sparsity above 0 this row is not the
  norms' cost: the thresholds then see unnormalised inputs, every projection keeps a different fraction, and
  the GEMVs differ (H100, 50 %: "saved" 1,797 µs of a 3,644 µs step). Read it at ``--sparsity 0`` only;
  ``attention`` changes o's input the same way, less so.

The difference from the full step is what that part costs inside the graph, overlap included. The
outputs are meaningless and nothing is checked. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from typing import Any, Iterator

import torch
from _gpu_run import run_info  # noqa: E402 (benchmarks/scripts is on sys.path when run as a script)

import teal.engine.model as model
import teal.engine.projection as projection
from teal.bench.results import write_json
from teal.engine.reference import activation_threshold_levels
from teal.engine import Generator, engine_random

PARTS = ("gemv", "attention", "norms")


@contextlib.contextmanager
def without(parts: set[str]) -> Iterator[None]:
    """Replace the named parts of the decode layer by trivial stand-ins (module attributes, restored after)."""
    saved: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, value: Any) -> None:
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    if "gemv" in parts:
        def zeros(p, x):
            return x.new_zeros(x.shape[0], p.weight.shape[1] if p.transposed else p.weight.shape[0])

        patch(model, "project", zeros)
        patch(projection, "project", zeros)
        patch(projection.ops, "sparse_linear_glu", lambda gu, w, *rest, **kw: gu.new_zeros(gu.shape[0], w.shape[1]))
    if "attention" in parts:
        def q_only(qkv, cos, sin, kc, vc, mask, n_valid, scale, n_heads, *norms):
            return qkv[:, : n_heads * kc.shape[-1]].contiguous()

        patch(model.attention_ops, "decode_attention_rope", q_only)
    if "norms" in parts:
        patch(model, "rms_norm", lambda x, weight, eps, offset=0.0: x)
        patch(projection, "rms_norm", lambda x, weight, eps, offset=0.0: x)
    try:
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3-8b")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sets", default="none,gemv,attention,norms,attention+norms,gemv+attention+norms",
                        help="comma list of part sets to leave out ('+' joins parts; 'none': the full step)")
    parser.add_argument("--json", dest="json_path", required=True)
    parser.add_argument("--device", default="cuda", help="cuda; cpu runs eagerly (a smoke test)")
    args = parser.parse_args()
    device = torch.device(args.device)
    mode = "compiled-graph" if device.type == "cuda" else "eager"
    engine = engine_random(args.shape, max_seq_len=args.prompt_len + args.new_tokens + 16, dtype=torch.bfloat16,
                           device=device, transposed=True)
    ids = torch.randint(0, engine.config.vocab_size, (args.prompt_len,), device=device,
                        generator=torch.Generator(device=device).manual_seed(0))
    if args.sparsity > 0:
        engine.set_thresholds(activation_threshold_levels(engine, ids, [args.sparsity])[0])
    else:
        engine.set_thresholds(None)
    data: dict[str, Any] = {**run_info(device), "shape": args.shape, "sparsity": args.sparsity,
                            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
                            "sparse_path": engine.effective_sparse_path, "rows": []}
    for spec in args.sets.split(","):
        parts = set() if spec == "none" else set(spec.split("+"))
        unknown = parts - set(PARTS)
        if unknown:
            raise SystemExit(f"unknown part(s) {sorted(unknown)}; choose from {', '.join(PARTS)}")
        with without(parts):
            gen = Generator(engine, mode=mode)
            gen.generate(ids, 8, stop=[])
            rate = statistics.median(gen.generate(ids, args.new_tokens, stop=[]).tokens_per_s
                                     for _ in range(args.repeats))
            del gen
        row = {"without": spec, "tokens_per_s": rate, "us_per_step": 1e6 / rate}
        data["rows"].append(row)
        print(f"without {spec:28s} {rate:7.1f} tok/s  {row['us_per_step']:7.1f} us/step", flush=True)
    full = data["rows"][0]["us_per_step"] if data["rows"] and data["rows"][0]["without"] == "none" else None
    if full:
        for row in data["rows"]:
            row["saved_us_per_step"] = full - row["us_per_step"]
            row["saved_us_per_layer"] = row["saved_us_per_step"] / engine.config.n_layers
        print("saved per layer (us): "
              + ", ".join(f"{r['without']} {r['saved_us_per_layer']:.1f}" for r in data["rows"]))
    write_json(data, args.json_path)


if __name__ == "__main__":
    main()
