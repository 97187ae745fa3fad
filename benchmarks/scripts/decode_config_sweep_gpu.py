"""Kernel configurations chosen by end-to-end decode speed, one projection group at a time.

Run once on the H200 (about 4 minutes):

    PYTHONPATH=. python3 benchmarks/scripts/decode_config_sweep_gpu.py --json OUT.json

The per-call sweeps (``teal.bench.kernels``, ``producer_gpu.py``) time one kernel repeated in a CUDA
graph; in the decode step each kernel follows a different one, and with programmatic dependent launch
their launches overlap, so the best configuration can differ. This script builds the Llama-3-8B-shaped
random engine (bf16, transposed layout, thresholds at s = 0.5 from quantiles of |x| over a random
prompt, the engine's defaults otherwise) and, by coordinate descent, for each group in turn (o, q|k|v,
gate|up, down, the attention config at this cache length, then the add + RMSNorm producer's chunk; or
those of ``--groups``) times greedy decoding (compiled-graph, prompt 128, 256 new tokens, median of 3) with each candidate configuration in place of the table's,
keeping a candidate only if it beats the incumbent by more than ``--min-gain`` (run-to-run spread of
separate captures is about 1 %). Every candidate's 32 greedy tokens must equal the first
configuration's (a configuration changes the summation order only: on a mismatch the row is flagged,
not dropped). Prints a table and writes JSON (with the winning entries).
"""

from __future__ import annotations

import argparse
import json
import traceback
from typing import Any

import torch

from _gpu_run import run_info  # noqa: E402 (benchmarks/scripts is on sys.path when run as a script)
from teal.bench.results import write_json
from teal.bench.timing import copy_bandwidth, time_engine
from teal.engine import Generator, engine_random
from teal.engine.reference import activation_threshold_levels
from teal.kernels import attention as attention_ops
from teal.kernels import configs, producer
from teal.kernels.attention import AttentionConfig
from teal.kernels.configs import KernelConfig

PROMPT, NEW, REPEATS, CHECK_TOKENS = 128, 256, 3, 32
KC = KernelConfig
# group -> (table, key, candidates; the table's entry is added first)
GROUPS: dict[str, tuple[dict, tuple, list[KernelConfig]]] = {
    "o": (configs.TUNED, (4096, 4096, 1, "bf16"), [
        KC(block_n=64, block_r=32, split_k=8),
        KC(block_n=64, block_r=64, split_k=16, num_warps=2),
        KC(block_n=128, block_r=64, split_k=8),
        KC(block_n=64, block_r=32, split_k=8, compact=True),
        KC(block_n=64, block_r=32, split_k=8, num_stages=1, gather=True),
        KC(block_n=64, block_r=32, split_k=16, num_stages=1, gather=True),
    ]),
    "qkv": (configs.TUNED_GATHER, (4096, 6144, "bf16"), [
        KC(block_n=64, block_r=32, split_k=4, num_stages=1, gather=True),
        KC(block_n=64, block_r=32, split_k=16, num_stages=1, gather=True),
        KC(block_n=32, block_r=32, split_k=8, num_stages=1, gather=True),
        KC(block_n=128, block_r=32, split_k=8, num_stages=1, gather=True),
        KC(block_n=64, block_r=16, split_k=8, num_stages=1, gather=True),
    ]),
    "gate_up": (configs.TUNED_GATHER, (4096, 28672, "bf16"), [
        KC(block_n=64, block_r=32, split_k=4, num_stages=1, gather=True),
        KC(block_n=128, block_r=32, split_k=2, num_stages=1, gather=True),
        KC(block_n=128, block_r=32, split_k=1, num_stages=1, gather=True),
        KC(block_n=64, block_r=16, split_k=2, num_stages=1, gather=True),
    ]),
    "down": (configs.TUNED, (14336, 4096, 1, "bf16"), [
        KC(block_n=128, block_r=32, split_k=8, compact=True),
        KC(block_n=64, block_r=32, split_k=16, compact=True),
        KC(block_n=128, block_r=64, split_k=16, compact=True),
        KC(block_n=128, block_r=32, split_k=16),
    ]),
}
ATTENTION = [AttentionConfig(block_l=32), AttentionConfig(block_l=64, waves=1), AttentionConfig(block_l=64, waves=4),
             AttentionConfig(block_l=128)]  # the "ticket" merge candidates lost and are deleted (notes/paths.md)
NORM_CHUNKS = [256, 1024, 2048]  # entries per program of add_rmsnorm_compact (producer.NORM_CHUNK)


def check_candidates(groups: list[str], device: torch.device) -> list[dict[str, Any]]:
    """Every kernel candidate of the swept groups, once per call on fresh random bf16 inputs at s = 0, 0.5 and
    0.9, against a float64 reference (relative error <= 1e-2, no NaN); down's through the SiLU-gated op. A
    failing candidate is reported and removed from its group's list."""
    from teal.kernels.ops import (sparse_linear_glu_reference, sparse_linear_glu_triton, sparse_linear_reference,
                                  sparse_linear_triton)

    splits = {"o": [4096], "qkv": [4096, 1024, 1024], "gate_up": [14336, 14336], "down": [4096]}
    rows = []
    gen = torch.Generator(device=device).manual_seed(5)
    for group, (table, key, candidates) in GROUPS.items():
        if group not in groups:
            continue
        k, n = key[0], key[1]
        w_t = (torch.randn(k, n, device=device, generator=gen) * k**-0.5).to(torch.bfloat16)
        kept = []
        for cfg in [table.get(key), *candidates]:
            errs = []
            for s in (0.0, 0.5, 0.9):
                if group == "down":
                    x = torch.randn(1, 2 * k, device=device, generator=gen).to(torch.bfloat16)
                    mid = torch.nn.functional.silu(x[:, :k]) * x[:, k:]
                    thr = torch.tensor([float(torch.quantile(mid.abs().float(), s)) if s else -1.0], device=device)
                    y = sparse_linear_glu_triton(x, w_t, thr, config=cfg)
                    ref = sparse_linear_glu_reference(x, w_t, thr, compute_dtype=torch.float64, out_dtype=torch.float64)
                else:
                    x = torch.randn(1, k, device=device, generator=gen).to(torch.bfloat16)
                    q = float(torch.quantile(x.abs().float(), s)) if s else -1.0
                    thr = torch.full((len(splits[group]),), q, device=device)
                    y = sparse_linear_triton(x, w_t, thr, splits[group], config=cfg)
                    ref = sparse_linear_reference(x, w_t, thr, splits[group], compute_dtype=torch.float64,
                                                  out_dtype=torch.float64)
                err = float((y.double() - ref).norm() / ref.norm().clamp_min(1e-30))
                errs.append(err if not bool(y.isnan().any()) else float("nan"))
            ok = all(e <= 1e-2 for e in errs)
            rows.append(dict(group=group, config=cfg.as_dict(), rel_err=errs, ok=ok))
            print(f"check {group:8s} ok={ok} errs={[f'{e:.1e}' for e in errs]} {cfg}", flush=True)
            if ok and cfg is not table.get(key):
                kept.append(cfg)
        GROUPS[group] = (table, key, kept)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", dest="json_path", required=True)
    parser.add_argument("--min-gain", type=float, default=0.01)
    parser.add_argument("--groups", default=",".join([*GROUPS, "attention", "norm_chunk"]),
                        help="groups to sweep, in this order")
    args = parser.parse_args()
    device = torch.device("cuda")
    data: dict[str, Any] = {**run_info(device), "rows": [], "errors": [], "winners": {}}
    data["copy_bandwidth_Bps"] = copy_bandwidth(device)
    max_seq_len = -(-(PROMPT + NEW + 8) // 64) * 64
    engine = engine_random("llama-3-8b", dtype=torch.bfloat16, device=device, max_seq_len=max_seq_len)
    engine.to_layout(transposed=True)
    gen_ids = torch.Generator(device=device)
    ids = torch.randint(0, engine.config.vocab_size, (PROMPT,), device=device, generator=gen_ids.manual_seed(0))
    calib = torch.randint(0, engine.config.vocab_size, (PROMPT,), device=device, generator=gen_ids.manual_seed(2))
    engine.set_thresholds(activation_threshold_levels(engine, calib, [0.5])[0], None)
    first_tokens: list[int] = []

    def measure(group: str, label: str) -> float | None:
        torch._dynamo.reset()
        try:
            gen = Generator(engine, mode="compiled-graph")
            tokens = gen.generate(ids, max_new_tokens=CHECK_TOKENS, stop=[]).tokens
            if not first_tokens:
                first_tokens.extend(tokens)
            row = time_engine(gen, ids, NEW, REPEATS)
            del gen
            row.update(group=group, config=label, tokens_match=tokens == first_tokens)
            data["rows"].append(row)
            print(f"{group:8s} {label:100s} {row['tokens_per_s']:7.1f} tok/s match={row['tokens_match']}", flush=True)
            write_json(data, args.json_path)
            return row["tokens_per_s"]
        except Exception as err:  # noqa: BLE001 - a config that fails to compile or run is recorded, not fatal
            data["errors"].append(f"{group} {label}: {type(err).__name__}: {err}")
            traceback.print_exc()
            return None

    def descend(group: str, incumbent: Any, candidates: list[Any], apply: Any) -> tuple[Any, float | None]:
        """Time the incumbent, then each candidate (``apply(value)`` puts a value in place); return the best,
        which is left in place, and its rate. A candidate must beat the best by ``--min-gain``."""
        apply(incumbent)
        best, best_rate = incumbent, measure(group, f"table {incumbent}")
        for cand in candidates:
            apply(cand)
            rate = measure(group, repr(cand))
            if rate is not None and (best_rate is None or rate > best_rate * (1 + args.min_gain)):
                best, best_rate = cand, rate
        apply(best)
        return best, best_rate

    groups = args.groups.split(",")
    data["per_call_checks"] = check_candidates(groups, device)
    for group, (table, key, candidates) in GROUPS.items():
        if group in groups:
            incumbent = table.get(key)
            best, rate = descend(group, incumbent, candidates, lambda cfg, t=table, k=key: t.__setitem__(k, cfg))
            data["winners"][group] = {"key": list(key), "config": best.as_dict(), "tokens_per_s": rate,
                                      "changed": best != incumbent}
    if "attention" in groups:
        original = attention_ops.CONFIG_TABLE
        row = next(i for i, (max_len, _) in enumerate(original) if max_seq_len <= max_len)

        def set_attention(cfg: AttentionConfig) -> None:
            rows = list(original)
            rows[row] = (rows[row][0], cfg)
            attention_ops.CONFIG_TABLE = tuple(rows)

        best, rate = descend("attention", original[row][1], ATTENTION, set_attention)
        data["winners"]["attention"] = {"max_len": original[row][0], "config": best._asdict(), "tokens_per_s": rate,
                                        "changed": best != original[row][1]}
        attention_ops.CONFIG_TABLE = original
    if "norm_chunk" in groups:
        incumbent = producer.NORM_CHUNK
        best, rate = descend("norm_chunk", incumbent, NORM_CHUNKS, lambda c: setattr(producer, "NORM_CHUNK", c))
        data["winners"]["norm_chunk"] = {"config": {"chunk": best}, "tokens_per_s": rate,
                                         "changed": best != incumbent}
        producer.NORM_CHUNK = incumbent
    print("\nwinners:")
    for group, win in data["winners"].items():
        print(f"  {group:9s} {win['tokens_per_s']:7.1f} tok/s changed={win['changed']} {json.dumps(win['config'])}")
    write_json(data, args.json_path)
    print("errors:", data["errors"] or "none")


if __name__ == "__main__":
    main()
