"""Launch-level changes of the decode step, each switched on and off in one run: tokens/s and token checks.

Run once on the H200 (about 4 minutes, compile time included):

    PYTHONPATH=. python3 benchmarks/scripts/decode_fusions_gpu.py --json OUT.json

Switches (base: all off):
- ``pdl``: ``$TEAL_PDL`` 0 / 1 (programmatic dependent launch of our Triton kernels:
  ``teal/kernels/_pdl_triton.py``);
- ``rope``: the attention op with the rotary embedding and cache write inside
  (``teal::decode_attention_rope``) or the unfused steps (the engine's rope and ``index_copy_``, then
  ``teal::decode_attention``), selected by replacing the op's entry point in ``teal.engine.model``;
- ``glu``: down's GEMV from the gate|up row with SiLU * up inside (``teal::sparse_linear_glu``) or
  ``silu(gate) * up`` compiled by inductor, then ``teal::sparse_linear`` (same replacement trick);
- ``inductor_pdl``: inductor's own PDL (``torch._inductor.config.triton.enable_pdl``) for the kernels it
  generates.
Builds the Llama-3-8B-shaped random engine (bf16) once, in the transposed layout, with thresholds from
quantiles of |x| over a random prompt, and times greedy decoding (compiled-graph mode, prompt 128, 256
new tokens, median of 3) at s = 0 (cuBLAS ``x @ w_t``) and s = 0.5 (producer path) for each listed
combination. Token checks before timing: 64 greedy steps generated twice must repeat (a race would
show), and must equal those of the same fusions with PDL off (PDL changes no arithmetic; the fused
rope and SiLU round once where inductor's code may round otherwise, so fusions compare with themselves).
The fused kernels are checked against their references on Llama-3-8B shapes first.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback
from typing import Any

import torch

import teal.engine.model as engine_model
import teal.engine.projection as engine_projection
from _gpu_run import run_info  # noqa: E402 (benchmarks/scripts is on sys.path when run as a script)
from teal.bench.results import write_json
from teal.bench.timing import copy_bandwidth, time_engine
from teal.engine import Generator, engine_random
from teal.engine.model import apply_rope
from teal.engine.reference import activation_threshold_levels
from teal.kernels import attention as attention_ops
from teal.kernels import ops as kernel_ops

#: (pdl, rope, glu, inductor_pdl) per sparsity; the first row of each is the base.
COMBOS = {
    0.0: [(0, False, False, False), (1, False, False, False), (0, True, False, False), (1, True, False, False)],
    0.5: [(0, False, False, False), (1, False, False, False), (1, True, False, False), (0, True, True, False),
          (1, True, True, False), (1, True, True, True)],
}

PROMPT, NEW, REPEATS, CHECK_TOKENS = 128, 256, 3, 64


def _inductor_pdl_available() -> bool:
    import torch._inductor.config as cfg

    return hasattr(cfg.triton, "enable_pdl")


def unfused_rope_attention(qkv, cos, sin, k_cache, v_cache, mask, n_valid, scale, n_heads):
    """The engine's steps before the rope-fused op: rope, cache writes, then ``teal::decode_attention``."""
    n_kv, _, d = k_cache.shape
    q, k, v = qkv.split([n_heads * d, n_kv * d, n_kv * d], dim=-1)
    q = apply_rope(q.view(1, n_heads, d), cos, sin)
    k = apply_rope(k.view(1, n_kv, d), cos, sin)
    pos = n_valid - 1
    k_cache.index_copy_(1, pos, k.transpose(0, 1))
    v_cache.index_copy_(1, pos, v.view(1, n_kv, d).transpose(0, 1))
    return attention_ops.decode_attention(q, k_cache, v_cache, mask, n_valid, scale)


class UnfusedGlu:
    """Stands in for ``teal.kernels.ops`` in the engine's projections: down's input computed by torch, then
    sparse_linear."""

    sparse_linear = staticmethod(kernel_ops.sparse_linear)

    @staticmethod
    def sparse_linear_glu(gate_up, w_t, thresholds, col_scale=None, **kw):
        return kernel_ops.sparse_linear(kernel_ops.silu_mul(gate_up), w_t, thresholds, None, col_scale, **kw)


def check_glu_kernel(device: torch.device) -> dict[str, Any]:
    """sparse_linear_glu (one launch) against SiLU * up then sparse_linear, Llama-3-8B down, bf16."""
    out: dict[str, Any] = {}
    gen = torch.Generator(device=device).manual_seed(6)
    w_t = (torch.randn(14336, 4096, device=device, generator=gen) * 0.02).to(torch.bfloat16)
    for s in (0.0, 0.5, 0.9):
        gate_up = torch.randn(1, 2 * 14336, device=device, generator=gen).to(torch.bfloat16)
        mid = kernel_ops.silu_mul(gate_up)
        thr = torch.tensor([float(torch.quantile(mid.float().abs().flatten(), s)) if s else -1.0], device=device)
        y = kernel_ops.sparse_linear_glu(gate_up, w_t, thr)
        two = kernel_ops.sparse_linear(mid, w_t, thr)
        ref = kernel_ops.sparse_linear_reference(mid, w_t, thr, compute_dtype=torch.float64,
                                                 out_dtype=torch.float64)
        rel = float((y.double() - ref).norm() / ref.norm())
        out[f"s{s}"] = {"rel_err_vs_float64": rel, "max_abs_diff_vs_two_step": float((y - two).abs().max()),
                        "ok": rel < 1e-2 and not bool(torch.isnan(y).any())}
    return out


def check_rope_kernel(device: torch.device) -> dict[str, Any]:
    """decode_attention_rope (Triton) against its reference: Llama-3-8B heads, bf16, several lengths."""
    out: dict[str, Any] = {}
    gen = torch.Generator(device=device).manual_seed(5)
    for length, n_valid in ((448, 1), (448, 200), (448, 448), (4096, 3000)):
        qkv = torch.randn(1, 48 * 128, device=device, generator=gen).to(torch.bfloat16)
        ang = torch.rand(64, device=device, generator=gen) * 6
        cos, sin = (torch.cat([ang.cos()] * 2).to(torch.bfloat16), torch.cat([ang.sin()] * 2).to(torch.bfloat16))
        k = torch.randn(8, length, 128, device=device, generator=gen).to(torch.bfloat16)
        v = torch.randn(8, length, 128, device=device, generator=gen).to(torch.bfloat16)
        mask = torch.zeros(length, device=device)
        nv = torch.tensor([n_valid], device=device)
        k2, v2 = k.clone(), v.clone()
        y = attention_ops.decode_attention_rope_triton(qkv, cos, sin, k, v, mask, nv, 0.088, 32)
        ref = attention_ops.decode_attention_rope_reference(qkv, cos, sin, k2, v2, mask, nv, 0.088, 32,
                                                            compute_dtype=torch.float64)
        rel = float((y.double() - ref.double()).norm() / ref.double().norm())
        cache_diff = int((k != k2).sum() + (v != v2).sum())
        out[f"L{length}_n{n_valid}"] = {"rel_err": rel, "cache_entries_differing": cache_diff,
                                        "ok": rel < 1e-2 and cache_diff <= 8 and not bool(torch.isnan(y).any())}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", dest="json_path", required=True)
    parser.add_argument("--sparsity", default="0,0.5", help=f"levels to time, of {sorted(COMBOS)}")
    args = parser.parse_args()
    device = torch.device("cuda")
    data: dict[str, Any] = {**run_info(device), "inductor_pdl_available": _inductor_pdl_available(),
                            "rows": [], "errors": [], "checks": {}}
    try:
        from teal.kernels._pdl_triton import HAS_GDC
        data["triton_has_gdc"] = HAS_GDC
    except Exception as err:  # noqa: BLE001
        data["triton_has_gdc"] = f"{type(err).__name__}: {err}"
    print(json.dumps({k: data[k] for k in ("versions", "inductor_pdl_available", "triton_has_gdc")}), flush=True)
    for name, check in (("rope_kernel", check_rope_kernel), ("glu_kernel", check_glu_kernel)):
        data["checks"][name] = check(device)
        print(name, json.dumps(data["checks"][name]), flush=True)
        if not all(v["ok"] for v in data["checks"][name].values()):
            data["errors"].append(f"{name} differs from its reference")
    data["copy_bandwidth_Bps"] = copy_bandwidth(device)
    engine = engine_random("llama-3-8b", dtype=torch.bfloat16, device=device,
                           max_seq_len=-(-(PROMPT + NEW + 8) // 64) * 64)
    engine.to_layout(transposed=True)
    gen_ids = torch.Generator(device=device)
    ids = torch.randint(0, engine.config.vocab_size, (PROMPT,), device=device, generator=gen_ids.manual_seed(0))
    calib = torch.randint(0, engine.config.vocab_size, (PROMPT,), device=device, generator=gen_ids.manual_seed(2))
    sparsities = [float(s) for s in args.sparsity.split(",")]
    levels = dict(zip(sparsities, activation_threshold_levels(engine, calib, sparsities)))
    reference: dict[tuple, list[int]] = {}
    import torch._inductor.config as inductor_cfg

    fused_rope_entry = engine_model.attention_ops.decode_attention_rope
    real_ops = engine_projection.ops
    for s in sparsities:
        engine.set_thresholds(levels[s], None)
        for pdl, rope, glu, inductor_pdl in COMBOS[s]:
            label = f"s={s} pdl={pdl} rope={rope} glu={glu} inductor_pdl={inductor_pdl}"
            os.environ["TEAL_PDL"] = str(pdl)
            if data["inductor_pdl_available"]:
                inductor_cfg.triton.enable_pdl = inductor_pdl
            elif inductor_pdl:
                continue
            engine_model.attention_ops.decode_attention_rope = fused_rope_entry if rope else unfused_rope_attention
            engine_projection.ops = real_ops if glu else UnfusedGlu
            torch._dynamo.reset()
            try:
                t0 = time.perf_counter()
                gen = Generator(engine, mode="compiled-graph")
                tokens = gen.generate(ids, max_new_tokens=CHECK_TOKENS, stop=[]).tokens
                again = gen.generate(ids, max_new_tokens=CHECK_TOKENS, stop=[]).tokens
                key = (s, rope, glu)
                reference.setdefault(key, tokens)
                same = tokens == reference[key]
                data["checks"][label] = {"matches_pdl_off": same, "repeats_itself": again == tokens}
                if not same:
                    first = next(i for i, (a, b) in enumerate(zip(tokens, reference[key])) if a != b)
                    data["errors"].append(f"{label}: tokens differ from the first run of these fusions at step {first}")
                if again != tokens:
                    data["errors"].append(f"{label}: a second generation gave other tokens")
                row = time_engine(gen, ids, NEW, REPEATS)
                del gen
                row.update(sparsity=s, pdl=pdl, rope=rope, glu=glu, inductor_pdl=inductor_pdl, tokens_match=same,
                           repeats_itself=again == tokens, wall_s=time.perf_counter() - t0)
                data["rows"].append(row)
                print(f"{label}: {row['tokens_per_s']:.1f} tok/s {row['tokens_per_s_runs']} match={same} "
                      f"({row['wall_s']:.0f}s)", flush=True)
            except Exception as err:  # noqa: BLE001 - record and go on
                data["errors"].append(f"{label}: {type(err).__name__}: {err}")
                traceback.print_exc()
            write_json(data, args.json_path)
    engine_model.attention_ops.decode_attention_rope = fused_rope_entry
    engine_projection.ops = real_ops
    print(f"\n{'s':>5} {'pdl':>4} {'rope':>6} {'glu':>6} {'ind.pdl':>7} {'tok/s':>8} {'x base':>6} match repeat")
    for row in data["rows"]:
        base = next(r["tokens_per_s"] for r in data["rows"] if r["sparsity"] == row["sparsity"])
        row["speedup_vs_base"] = ratio = row["tokens_per_s"] / base
        print(f"{row['sparsity']:5.2f} {row['pdl']:4d} {str(row['rope']):>6} {str(row['glu']):>6} "
              f"{str(row['inductor_pdl']):>7} {row['tokens_per_s']:8.1f} {ratio:6.3f} {row['tokens_match']} "
              f"{row['repeats_itself']}")
    write_json(data, args.json_path)
    print("errors:", data["errors"] or "none")


if __name__ == "__main__":
    main()
