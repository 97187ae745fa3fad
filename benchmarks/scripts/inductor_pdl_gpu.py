"""Why inductor's PDL changed dense greedy tokens: compare decode logits of separate compiles, step by step.

Run on the H200 (about 1.5 minutes):

    PYTHONPATH=. python3 benchmarks/scripts/inductor_pdl_gpu.py --json OUT.json

`benchmarks/scripts/decode_fusions_gpu.py` found that with ``torch._inductor.config.triton.enable_pdl``
the dense (s = 0) greedy tokens of the Llama-3-8B-shaped engine differ from the non-PDL compile after
~40 steps, while repeating themselves. Here the compiled decode layer (no CUDA graph) runs teacher-forced
decode steps after one prefill, for compiles A (PDL off), B (PDL on) and C (PDL on again): if B's logits
equal C's bitwise and differ from A's from the first step on by rounding-sized amounts, inductor emitted
different code (a numerics change, no race); bitwise equal first steps with later divergence, or B != C,
would point at a race. Prints the per-step differences and writes JSON.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from _gpu_run import run_info  # noqa: E402 (benchmarks/scripts is on sys.path when run as a script)
from teal.bench.results import write_json
from teal.engine import Generator, engine_random

STEPS = 24


def decode_logits(engine, ids: torch.Tensor, pdl: bool) -> torch.Tensor:
    import torch._inductor.config as inductor_cfg

    inductor_cfg.triton.enable_pdl = pdl
    torch._dynamo.reset()
    layer_fn = Generator(engine, mode="compiled-graph")._layer_fn()
    out = []
    with torch.inference_mode():
        engine.prefill(ids[:64])
        for t in range(64, 64 + STEPS):
            out.append(engine.decode(ids[t:t + 1], torch.tensor([t], device=ids.device), layer_fn=layer_fn)[0].float())
    return torch.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", dest="json_path", required=True)
    args = parser.parse_args()
    device = torch.device("cuda")
    data: dict[str, Any] = {**run_info(device), "steps": STEPS}
    engine = engine_random("llama-3-8b", dtype=torch.bfloat16, device=device, max_seq_len=128)
    ids = torch.randint(0, engine.config.vocab_size, (64 + STEPS,), device=device,
                        generator=torch.Generator(device=device).manual_seed(0))
    a = decode_logits(engine, ids, False)
    b = decode_logits(engine, ids, True)
    c = decode_logits(engine, ids, True)
    a2 = decode_logits(engine, ids, False)

    def per_step(x: torch.Tensor, y: torch.Tensor) -> list[float]:
        return [float((x[i] - y[i]).abs().max()) for i in range(STEPS)]

    data["max_abs_diff_per_step"] = {"off_vs_on": per_step(a, b), "on_vs_on": per_step(b, c),
                                     "off_vs_off": per_step(a, a2)}
    data["argmax_equal_off_vs_on"] = [bool(a[i].argmax() == b[i].argmax()) for i in range(STEPS)]
    for name, diffs in data["max_abs_diff_per_step"].items():
        print(f"{name:11s} " + " ".join(f"{d:.2g}" for d in diffs), flush=True)
    print("argmax equal off vs on:", data["argmax_equal_off_vs_on"])
    write_json(data, args.json_path)


if __name__ == "__main__":
    main()
