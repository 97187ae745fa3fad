"""Where does the decode benchmark's fp32 sparse twin error come from? (`fp32_sparse_decode_rel_err`)

Builds the benchmark's 4-layer fp32 twin of a shape (random weights, `TWIN_SEED`), calibrates 50 %
thresholds on a 40-token prompt and decodes 64 teacher-forced steps. Per step it prints the relative logit
error against HF with the same input masks (`masked_hf_logits`, one forward over all positions) of:
- the engine on its kernels ("kernel" sparse path),
- the same engine with every sparse product in plain torch (`dense_weight_products`: masked input x dense
  weight), which cannot skip a row wrongly,
and the error between those two. If the torch run has the same error against HF, the kernels are not the
cause: mask entries flip where an activation sits within rounding of its threshold.

    PYTHONPATH=. python3 benchmarks/scripts/twin_sparse_steps.py [--shape llama-3-8b] [--device cuda] [--json F]
"""

from __future__ import annotations

import argparse
import copy

import torch
from _gpu_run import run_info  # noqa: E402 (benchmarks/scripts is on sys.path when run as a script)
from transformers import AutoModelForCausalLM

from teal.bench.decode.checks import TWIN_SEED, dense_weight_products, teacher_forced_logits
from teal.bench.results import write_json
from teal.engine import engine_from_hf_model
from teal.engine.config import shape_hf_config
from teal.engine.reference import activation_thresholds, masked_hf_logits


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-3-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--json")
    a = ap.parse_args()
    dev = torch.device(a.device)
    cfg = copy.deepcopy(shape_hf_config(a.shape))
    cfg.num_hidden_layers = a.layers
    with torch.random.fork_rng(devices=[0] if dev.type == "cuda" else []), torch.device(dev):
        torch.manual_seed(TWIN_SEED)
        hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    prompt = 40
    ids = torch.randint(0, cfg.vocab_size, (prompt + a.steps,), device=dev,
                        generator=torch.Generator(device=dev).manual_seed(3))
    e = engine_from_hf_model(hf, max_seq_len=-(-(prompt + a.steps) // 64) * 64)
    e.to_layout(transposed=True)
    th = activation_thresholds(e, ids[:prompt], 0.5)
    e.set_thresholds(th)
    with torch.inference_mode():
        ref = masked_hf_logits(hf, ids, th, dense_prefix=prompt)[prompt:].float()
    kernel = teacher_forced_logits(e, ids, prompt)
    with dense_weight_products(e):
        plain = teacher_forced_logits(e, ids, prompt)

    def err(x: torch.Tensor, y: torch.Tensor) -> list[float]:
        return ((x - y).norm(dim=-1) / y.norm(dim=-1)).tolist()

    rows = {"kernel_vs_hf": err(kernel, ref), "torch_products_vs_hf": err(plain, ref),
            "kernel_vs_torch_products": err(kernel, plain)}
    for name, v in rows.items():
        bad = [i for i, x in enumerate(v) if x > 1e-4]
        print(f"{name:26s} max {max(v):.2e} median {sorted(v)[len(v) // 2]:.2e} steps > 1e-4: {len(bad)}"
              f" (first {bad[0] if bad else None})")
    print("per step (kernel vs HF / torch vs HF / kernel vs torch):")
    print(" ".join(f"{i}:{a:.0e}/{b:.0e}/{c:.0e}" for i, (a, b, c) in enumerate(zip(*rows.values()))))
    if a.json:
        out = run_info(dev)
        out.update({"shape": a.shape, "layers": a.layers, "steps": a.steps, "device_arg": a.device, "errors": rows})
        write_json(out, a.json)


if __name__ == "__main__":
    main()
