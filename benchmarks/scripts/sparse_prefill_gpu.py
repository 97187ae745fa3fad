"""The engine's sparse prefill on the GPU against the same engine on the CPU (fp32; correctness only).

    PYTHONPATH=. python3 benchmarks/scripts/sparse_prefill_gpu.py --json OUT.json

A tiny random Llama-family HF model is built on the CPU; thresholds at 50 % come from quantiles of a random
prompt (`teal.engine.reference.activation_thresholds`, computed once on the CPU and used on both devices). The engine with `prefill_policy="sparse"` runs on the
CPU (plain-torch masking) and on CUDA (`sparse_linear`: the kernel for prompts of up to 8 positions, the
masked dense path above), for prompts of 6 and 40 positions, magnitude and weight-aware rules, then four
decode steps. Prints the relative errors and writes JSON; fails (exit 1) above 1e-4.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
from _gpu_run import run_info  # noqa: E402 (benchmarks/scripts is on sys.path when run as a script)

from teal.bench.results import write_json
from teal.engine import engine_from_hf_model
from teal.engine.reference import activation_thresholds


def tiny_hf(seed: int = 0) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)
    return tf.LlamaForCausalLM(cfg).eval()


def thresholds_on_cpu(hf: torch.nn.Module, calib: torch.Tensor, weight_aware: bool) -> tuple[dict, dict | None]:
    """One set of thresholds (and column scales) for both devices: computed separately, their last-bit
    differences would move entries that sit on a threshold."""
    engine = engine_from_hf_model(hf, max_seq_len=64, transposed=True, dtype=torch.float32)
    scales = engine.weight_column_norms() if weight_aware else None
    return activation_thresholds(engine, calib, 0.5, scales), scales


def run_case(hf: torch.nn.Module, device: str, ids: torch.Tensor, th: dict, scales: dict | None) -> torch.Tensor:
    engine = engine_from_hf_model(hf, max_seq_len=64, transposed=True, dtype=torch.float32, device=torch.device(device))
    engine.set_thresholds(th, None if scales is None else {k: v.to(device) for k, v in scales.items()})
    engine.set_prefill_policy("sparse")
    ids = ids.to(device)
    prompt = ids.shape[0] - 4
    outs = [engine.prefill(ids[:prompt], all_logits=True).float().cpu()]
    for t in range(prompt, ids.shape[0]):
        outs.append(engine.decode(ids[t : t + 1], torch.tensor([t], device=device)).float().cpu())
    return torch.cat(outs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", dest="json_path", required=True)
    args = parser.parse_args()
    hf = tiny_hf()
    gen = torch.Generator().manual_seed(1)
    calib = torch.randint(0, 512, (32,), generator=gen)
    data: dict[str, Any] = {**run_info(torch.device("cuda")), "rows": []}
    ok = True
    with torch.inference_mode():
        for n_tokens in (10, 44):  # prompts of 6 and 40 positions, then 4 decode steps
            ids = torch.randint(0, 512, (n_tokens,), generator=gen)
            for weight_aware in (False, True):
                th, scales = thresholds_on_cpu(hf, calib, weight_aware)
                cpu = run_case(hf, "cpu", ids, th, scales)
                gpu = run_case(hf, "cuda", ids, th, scales)
                err = float((gpu - cpu).norm() / cpu.norm())
                row = {"prompt": n_tokens - 4, "weight_aware": weight_aware, "rel_err": err, "passed": err <= 1e-4}
                ok &= row["passed"]
                data["rows"].append(row)
                print(row, flush=True)
    data["passed"] = ok
    write_json(data, args.json_path)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
