"""The decode engine's GPU paths against HF across families, dtypes and threshold rules, in one run.

Run on the H200 (about 3 minutes):

    PYTHONPATH=. python3 benchmarks/scripts/engine_matrix_gpu.py --json OUT.json

The CPU tests run the Triton kernels interpreted, without programmatic dependent launch, compiled
code or CUDA graphs; this script runs the real thing on small random models of each supported family
(Llama with grouped-query attention, Mistral with a sliding window, Qwen2 with q|k|v bias, Qwen3 with
q/k norms: the one family that keeps the engine's own rope, Gemma 3 with its sandwich norms and GELU gate), in fp32, bf16 and fp16, with the
magnitude rule and the weight-aware rule (``|x_i| * ||W[:, i]||``). For each: thresholds at 50 % from
a dense prefill, then teacher-forced sparse decode steps of the engine (its CUDA defaults: the kernel
path, on compute capability 9.0+ through the CUDA C++ kernel, rope-fused attention, SiLU-fused down, PDL) against HF's logits with the same inputs masked
(``masked_hf_logits``, fp32 model); fp32 must agree to 1e-4, bf16 / fp16 to 1.5x HF's own error in
that dtype + 0.01 (as ``teal bench decode``'s twin check). Greedy tokens of the compiled CUDA-graph
generator must equal the eager generator's on the "kernel" path in fp32 (informational elsewhere: an
ulp can flip a mask entry at its threshold). Then the same engine without thresholds (dense decode, the
engine's default groups on the kernel with every threshold -inf) against HF's dense logits, same bounds.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import traceback
from typing import Any

import torch

from _gpu_run import run_info  # noqa: E402 (benchmarks/scripts is on sys.path when run as a script)
from teal.bench.decode import _decode_errors, _rel
from teal.bench.results import write_json
from teal.engine import Generator, engine_from_hf_model
from teal.engine.reference import activation_thresholds, masked_hf_logits

BASE = dict(vocab_size=1024, hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=1024, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2)
FAMILIES: dict[str, dict[str, Any]] = {
    "llama-gqa": dict(model_type="llama"),
    "mistral-window": dict(model_type="mistral", sliding_window=16),
    "qwen2-bias": dict(model_type="qwen2", use_sliding_window=False),
    "qwen3-qknorm": dict(model_type="qwen3", head_dim=64, use_sliding_window=False),
    # Gemma 3 (session 5): GELU gate, sandwich and (1 + w) norms, scaled embeddings, a sliding layer with its
    # own rope beside a linearly scaled global one, final soft-capping; the "kernel" sparse path only
    "gemma3-sandwich": dict(model_type="gemma3_text", head_dim=64, query_pre_attn_scalar=64, sliding_window=16,
                            layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=30.0,
                            rope_parameters={
                                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0}}),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROMPT, TOTAL = 40, 56


def hf_model(family: str, device: torch.device) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {**BASE, **FAMILIES[family]}
    cfg = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []), torch.device(device):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
        with torch.no_grad():  # random biases and norm weights, so they matter
            for name, p in model.named_parameters():
                if name.endswith("bias") or "norm" in name:
                    p.add_(0.1 * torch.randn_like(p))
    return model


def check(family: str, dtype_name: str, score: str, device: torch.device) -> dict[str, Any]:
    hf32 = hf_model(family, device)
    ids = torch.randint(0, BASE["vocab_size"], (TOTAL,), device=device,
                        generator=torch.Generator(device=device).manual_seed(1))
    probe = engine_from_hf_model(hf32, max_seq_len=64)
    probe.to_layout(transposed=True)
    cs = probe.weight_column_norms() if score == "weight-aware" else None
    th = activation_thresholds(probe, ids[:PROMPT], 0.5, cs)
    del probe
    with torch.inference_mode():
        ref32 = masked_hf_logits(hf32, ids, th, dense_prefix=PROMPT, col_scales=cs)
    dtype = DTYPES[dtype_name]
    hf_d = copy.deepcopy(hf32).to(dtype)
    engine = engine_from_hf_model(hf_d, max_seq_len=64)
    engine.to_layout(transposed=True)
    engine.set_thresholds(th, None if cs is None else {k: v.to(device) for k, v in cs.items()})
    row: dict[str, Any] = {"family": family, "dtype": dtype_name, "score": score,
                           "sparse_path": engine.effective_sparse_path, "fused_attention": engine.use_fused_attention}
    row["decode_rel_err"] = _decode_errors(engine, ref32, ids, PROMPT)
    if dtype == torch.float32:
        row["bound"] = 1e-4
    else:
        with torch.inference_mode():
            ref_d = masked_hf_logits(hf_d, ids, th, dense_prefix=PROMPT, col_scales=cs)
        row["hf_own_rel_err"] = max(_rel(ref_d[t], ref32[t]) for t in range(PROMPT, TOTAL))
        row["bound"] = 1.5 * row["hf_own_rel_err"] + 0.01
    row["logits_ok"] = bool(row["decode_rel_err"] <= row["bound"])
    for path in ("kernel", "producer"):
        engine.set_sparse_path(path)
        graph_mode = "compiled-graph" if device.type == "cuda" else "eager"  # --device cpu: a smoke test
        graph = Generator(engine, mode=graph_mode).generate(ids[:32], 12, stop=[]).tokens
        eager = Generator(engine, mode="eager").generate(ids[:32], 12, stop=[]).tokens
        row[f"graph_tokens_match_eager_{path}"] = graph == eager
    engine.set_sparse_path(None)
    # dense decode with no thresholds: the engine's default groups take the kernel (every threshold -inf)
    with torch.inference_mode():
        dense32 = hf32(ids[None]).logits[0].float()
        engine.set_thresholds(None)
        row["dense_groups_on_kernel"] = list(engine.sparse_flags[0])
        row["dense_decode_rel_err"] = _decode_errors(engine, dense32, ids, PROMPT)
        if dtype == torch.float32:
            row["dense_bound"] = 1e-4
        else:
            own = hf_d(ids[None]).logits[0].float()
            row["dense_bound"] = 1.5 * max(_rel(own[t], dense32[t]) for t in range(PROMPT, TOTAL)) + 0.01
    row["dense_ok"] = bool(row["dense_decode_rel_err"] <= row["dense_bound"])
    row["passed"] = (row["logits_ok"] and row["dense_ok"]
                     and (dtype != torch.float32 or row["graph_tokens_match_eager_kernel"]))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", dest="json_path", required=True)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    data: dict[str, Any] = {**run_info(device), "rows": [], "errors": []}
    for family in args.families.split(","):
        for dtype_name in args.dtypes.split(","):
            for score in ("magnitude", "weight-aware"):
                try:
                    row = check(family, dtype_name, score, device)
                    data["rows"].append(row)
                    print(f"{family:15s} {dtype_name:5s} {score:12s} err {row['decode_rel_err']:.2e} "
                          f"(bound {row['bound']:.2e}) dense {row['dense_decode_rel_err']:.2e} "
                          f"(bound {row['dense_bound']:.2e}, kernel {row['dense_groups_on_kernel']}) "
                          f"tokens graph==eager kernel "
                          f"{row['graph_tokens_match_eager_kernel']} producer "
                          f"{row['graph_tokens_match_eager_producer']} -> {'ok' if row['passed'] else 'FAIL'}",
                          flush=True)
                except Exception as err:  # noqa: BLE001 - record and go on
                    data["errors"].append(f"{family} {dtype_name} {score}: {type(err).__name__}: {err}")
                    traceback.print_exc()
                write_json(data, args.json_path)
    data["passed"] = not data["errors"] and all(r["passed"] for r in data["rows"])
    from teal.kernels import ops

    data["sparse_gemv_calls_by_path"] = dict(ops.path_counts)  # "cuda": the CUDA C++ kernel, "triton", "dense"
    write_json(data, args.json_path)
    print("passed:", data["passed"], "errors:", data["errors"] or "none", "calls by path:", dict(ops.path_counts))


if __name__ == "__main__":
    main()
