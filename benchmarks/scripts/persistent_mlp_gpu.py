"""The persistent sparse MLP block against today's per-projection kernels, and where a 50 % step's GEMV time
goes against a bytes / copy-bandwidth model, in one GPU run.

    TEAL_SOURCE_COMMIT=<commit> PYTHONPATH=. python3 benchmarks/scripts/persistent_mlp_gpu.py --json OUT.json

1. Correctness first: the persistent kernel (teal/kernels/persistent.py) against the float64 reference of the
   fused block (RMSNorm, thresholds, gate|up, SiLU * up, threshold, down), bf16 / fp16 / fp32, s = 0, 0.5,
   0.9, random and skewed inputs; h bit-exact with the engine's norm; three calls in a row (the kernel resets
   its own control words); no spin timeout. Timing runs only if every check passes.
2. Per-projection account (today's ``ops.sparse_linear`` / ``sparse_linear_glu`` in CUDA graphs, Llama-3-8B
   shapes, rotated weights): measured µs against kept bytes / copy bandwidth.
3. The MLP block (Llama-3-8B shape, bf16), s = 0, 0.4, 0.5, 0.65, random and skewed survivor patterns: today's
   two launches (gate|up, then down with SiLU * up inside), with and without the eager norm before them,
   against the persistent launch in several decompositions (each checked first); then the best one rebuilt
   with globaltimer stamps, whose per-stage spans say where its time goes.

"skewed": channel scales exp(z) with z shared by blocks of 128 channels (N(0, 1)) plus per-channel N(0, 0.5),
on x and on the up columns of W_gu, so survivors cluster by channel index as real models' frequent channels
do (a synthetic stand-in: no keep frequencies recorded from real models are used here).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from _gpu_run import start_rows_run  # noqa: E402 (benchmarks/scripts is on sys.path when run as a script)

from teal.bench.results import write_json
from teal.bench.timing import measure_copy_bandwidth
from teal.kernels import ops
from teal.kernels import persistent as P
from teal.kernels.tune import time_graph_us

EPS = 1e-5
LLAMA = (4096, 14336, 4096)
SMALL = (512, 1024, 512)
CONFIGS = {
    "ks8 g2 lag4": P.PersistentConfig(norm_slices=8, d_group=2, lag=4),
    "ks4 g2 lag4": P.PersistentConfig(norm_slices=4, d_group=2, lag=4),
    "ks16 g2 lag4": P.PersistentConfig(norm_slices=16, d_group=2, lag=4),
    "ks8 g1 lag8": P.PersistentConfig(norm_slices=8, d_group=1, lag=8),
    "ks8 g4 lag2": P.PersistentConfig(norm_slices=8, d_group=4, lag=2),
    "ks8 g2 lag16": P.PersistentConfig(norm_slices=8, d_group=2, lag=16),
    "ks8 g2 lag4 1/SM": P.PersistentConfig(norm_slices=8, d_group=2, lag=4, min_blocks=1),
    "ks8 g2 lag4 unroll16 1/SM": P.PersistentConfig(norm_slices=8, d_group=2, lag=4, min_blocks=1, unroll=16),
}


def channel_scales(n: int, gen: torch.Generator, device: torch.device, block: int = 128) -> torch.Tensor:
    z = torch.randn(n // block, generator=gen, device=device).repeat_interleave(block)
    return torch.exp(z + 0.5 * torch.randn(n, generator=gen, device=device))


def make_block(shape: tuple[int, int, int], dtype: torch.dtype, pattern: str, device: torch.device, seed: int = 0,
               copies: int = 1) -> dict[str, Any]:
    k, inter, hidden = shape
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(k, generator=gen, device=device)
    if pattern == "skewed":
        x = x * channel_scales(k, gen, device)
    norm_w = 1 + 0.1 * torch.randn(k, generator=gen, device=device)
    ws = []
    for _ in range(copies):
        w_gu = torch.randn(k, 2 * inter, generator=gen, device=device) * k**-0.5
        if pattern == "skewed":
            w_gu[:, inter:] *= channel_scales(inter, gen, device)
        w_d = torch.randn(inter, hidden, generator=gen, device=device) * inter**-0.5
        ws.append((w_gu.to(dtype), w_d.to(dtype)))
    return {"x": x.to(dtype), "norm_w": norm_w.to(dtype), "weights": ws}


def thresholds_at(b: dict[str, Any], s: float) -> torch.Tensor:
    x, norm_w = b["x"], b["norm_w"]
    w_gu = b["weights"][0][0]
    dev = x.device
    if s == 0:
        return torch.full((3,), float("-inf"), device=dev)
    h = P.rms_norm_reference(x.reshape(1, -1), norm_w, EPS).float()
    t = float(torch.quantile(h.abs().flatten(), s))
    inter = w_gu.shape[1] // 2
    gu = ops.sparse_linear_reference(h.to(x.dtype), w_gu, torch.tensor([t, t], device=dev), [inter, inter])
    mid = (F.silu(gu[:, :inter]) * gu[:, inter:]).float().flatten()
    return torch.tensor([t, t, float(torch.quantile(mid.abs(), s))], device=dev)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def per_projection(b: dict[str, Any], thr: torch.Tensor, inter: int, w_gu: torch.Tensor, w_d: torch.Tensor,
                   h: torch.Tensor, regime: str) -> torch.Tensor:
    gu = ops.sparse_linear(h.reshape(1, -1), w_gu, thr[:2], [inter, inter], regime=regime)
    return ops.sparse_linear_glu(gu, w_d, thr[2:3], regime=regime).reshape(-1)


def main() -> None:
    args, device, data = start_rows_run(__doc__, skip_timing="0")
    bw = measure_copy_bandwidth()
    data["copy_bandwidth_Bps"] = bw
    data["sm_count"] = torch.cuda.get_device_properties(device).multi_processor_count
    print(f"{data['device']}: copy bandwidth {bw / 1e12:.3f} TB/s, {data['sm_count']} SMs", flush=True)

    # ---- 1. correctness
    checks = []
    blocks: dict[Any, P.PersistentMLP] = {}
    for dtype, shapes in ((torch.bfloat16, (SMALL, LLAMA)), (torch.float16, (SMALL, LLAMA)), (torch.float32, (SMALL,))):
        for shape in shapes:
            for pattern in ("random", "skewed"):
                b = make_block(shape, dtype, pattern, device, seed=1)
                w_gu, w_d = b["weights"][0]
                for s in (0.0, 0.5, 0.9):
                    thr = thresholds_at(b, s)
                    key = (shape, dtype)
                    if key not in blocks:
                        blocks[key] = P.PersistentMLP(*shape, dtype, device, P.PersistentConfig(norm_slices=8), eps=EPS)
                    blk = blocks[key]
                    outs = [blk.run(b["x"], b["norm_w"], w_gu, w_d, thr).clone() for _ in range(3)]
                    report = blk.error()
                    h64, gu64, y64 = P.mlp_block_reference(b["x"], b["norm_w"], w_gu, w_d, thr, EPS,
                                                           compute_dtype=torch.float64)
                    err = rel_err(outs[-1], y64)
                    bound = 1e-5 if dtype == torch.float32 else 2e-2
                    row = {"check": "kernel vs float64", "shape": shape, "dtype": str(dtype), "pattern": pattern,
                           "s": s, "rel_err": err, "bound": bound, "spin_report": report,
                           "h_mismatch": float((blk.h != h64).float().mean()), "gate_up_rel_err": rel_err(blk.gate_up, gu64),
                           "repeat_identical": all(torch.equal(o, outs[0]) for o in outs),
                           "kept": {"gate": int(blk.count_norm[:8].sum()), "up": int(blk.count_norm[8:].sum()),
                                    "down": int(blk.count_mid.sum())}}
                    if dtype != torch.float32 and shape == LLAMA:
                        today = per_projection(b, thr, shape[1], w_gu, w_d, h64, "sparse")
                        row["today_rel_err"] = rel_err(today, y64)
                    # 16-bit h: the engine's roundings, bit-exact but where the sum order moves a last bit; fp32 h: close
                    h_ok = (row["h_mismatch"] < 0.01 if dtype != torch.float32 else rel_err(blk.h, h64) < 1e-6)
                    row["ok"] = (err < bound and report is None and h_ok and row["repeat_identical"])
                    checks.append(row)
                    print(f"check {str(dtype):15s} {str(shape):20s} {pattern:7s} s={s:.1f}: rel err {err:.2e} "
                          f"(today's path {row.get('today_rel_err', float('nan')):.2e}) h mismatch {row['h_mismatch']:.4f} "
                          f"repeat {row['repeat_identical']} report {report} -> {'ok' if row['ok'] else 'FAIL'}",
                          flush=True)
                del b
    data["checks"] = checks
    data["checks_passed"] = all(c["ok"] for c in checks)
    write_json(data, args.json_path)
    if not data["checks_passed"]:
        print("correctness checks failed: no timing", flush=True)
        return
    if args.skip_timing == "1":
        return

    # ---- 2. per-projection account, Llama-3-8B shapes
    shapes = {"qkv": (4096, [4096, 1024, 1024]), "o": (4096, [4096]), "gate_up": (4096, [14336, 14336]),
              "down (SiLU*up inside)": (14336, [4096])}
    account = []
    gen = torch.Generator(device=device).manual_seed(3)
    for name, (k, splits) in shapes.items():
        n = sum(splits)
        weights = [(torch.randn(k, n, generator=gen, device=device) * k**-0.5).to(torch.bfloat16) for _ in range(2)]
        glu = name.startswith("down")
        xin = torch.randn(1, 2 * k if glu else k, generator=gen, device=device).to(torch.bfloat16)
        src = (F.silu(xin[:, :k]) * xin[:, k:]) if glu else xin
        for s in (0.0, 0.5):
            t = float(torch.quantile(src.float().abs().flatten(), s)) if s else float("-inf")
            thr = torch.full((1 if glu else len(splits),), t, device=device)
            regime = "dense" if s == 0 else "sparse"
            if glu:
                calls = [lambda w=w: ops.sparse_linear_glu(xin, w, thr, regime=regime) for w in weights]
            else:
                calls = [lambda w=w: ops.sparse_linear(xin, w, thr, splits, regime=regime) for w in weights]
            us = time_graph_us(calls, replays=20)
            kept = float((src.float().abs() > t).float().mean())
            model = kept * k * n * 2 / bw * 1e6
            account.append({"projection": name, "K": k, "N": n, "s": s, "kept": kept, "us": us, "model_us": model,
                            "efficiency": model / us, "excess_us": us - model})
            print(f"today {name:22s} s={s:.1f} kept {kept:.3f}: {us:6.1f} µs, bytes/bw {model:6.1f} µs "
                  f"({model / us:.0%}), excess {us - model:.1f} µs", flush=True)
        del weights
    per_layer = {s: sum(r["us"] for r in account if r["s"] == s) for s in (0.0, 0.5)}
    per_layer_model = {s: sum(r["model_us"] for r in account if r["s"] == s) for s in (0.0, 0.5)}
    lm_head_us = 128256 * 4096 * 2 / bw * 1e6
    data["account"] = {"rows": account, "per_layer_us": per_layer, "per_layer_model_us": per_layer_model,
                       "step_gemv_us_32_layers": {s: 32 * v for s, v in per_layer.items()},
                       "step_gemv_model_us_32_layers": {s: 32 * v for s, v in per_layer_model.items()},
                       "lm_head_model_us": lm_head_us}
    for s in (0.0, 0.5):
        print(f"step account s={s}: GEMVs 32 x {per_layer[s]:.1f} = {32 * per_layer[s]:.0f} µs against "
              f"bytes/bw {32 * per_layer_model[s]:.0f} µs; lm_head bytes/bw {lm_head_us:.0f} µs", flush=True)
    write_json(data, args.json_path)

    # ---- 3. the MLP block: today's two launches against the persistent launch
    k, inter, hidden = LLAMA
    dtype = torch.bfloat16
    rows = []
    persistent_blocks = {name: P.PersistentMLP(k, inter, hidden, dtype, device, cfg, eps=EPS)
                         for name, cfg in CONFIGS.items()}
    data["configs"] = {name: {"config": vars(cfg), "grid": persistent_blocks[name].grid,
                              "blocks_per_sm": persistent_blocks[name].kernel.blocks_per_sm,
                              "registers": persistent_blocks[name].kernel.registers,
                              "local_bytes": persistent_blocks[name].kernel.local_bytes} for name, cfg in CONFIGS.items()}
    print("configs: " + "; ".join(f"{n}: grid {v['grid']} ({v['blocks_per_sm']}/SM, {v['registers']} regs)"
                                  for n, v in data["configs"].items()), flush=True)
    for pattern in ("random", "skewed"):
        b = make_block(LLAMA, dtype, pattern, device, seed=7, copies=2)
        for s in (0.0, 0.4, 0.5, 0.65):
            thr = thresholds_at(b, s)
            regime = "dense" if s == 0 else "sparse"
            w0 = b["weights"][0]
            h64, gu64, y64 = P.mlp_block_reference(b["x"], b["norm_w"], *w0, thr, EPS, compute_dtype=torch.float64)
            h = P.rms_norm_reference(b["x"].reshape(1, -1), b["norm_w"], EPS)
            row: dict[str, Any] = {"pattern": pattern, "s": s}
            row["today_gemvs_us"] = time_graph_us(
                [lambda w=w: per_projection(b, thr, inter, w[0], w[1], h, regime) for w in b["weights"]], replays=20)
            row["today_norm_gemvs_us"] = time_graph_us(
                [lambda w=w: per_projection(b, thr, inter, w[0], w[1],
                                            P.rms_norm_reference(b["x"].reshape(1, -1), b["norm_w"], EPS), regime)
                 for w in b["weights"]], replays=20)
            row["today_gate_up_us"] = time_graph_us(
                [lambda w=w: ops.sparse_linear(h, w[0], thr[:2], [inter, inter], regime=regime) for w in b["weights"]],
                replays=20)
            gu = ops.sparse_linear(h, w0[0], thr[:2], [inter, inter], regime=regime)
            row["today_down_us"] = time_graph_us(
                [lambda w=w: ops.sparse_linear_glu(gu, w[1], thr[2:3], regime=regime) for w in b["weights"]], replays=20)
            row["today_rel_err"] = rel_err(per_projection(b, thr, inter, *w0, h, regime), y64)
            persistent = {}
            for name, blk in persistent_blocks.items():
                y = blk.run(b["x"], b["norm_w"], *w0, thr).clone()
                report = blk.error()
                err = rel_err(y, y64)
                if report is not None or err > 2e-2:
                    persistent[name] = {"rel_err": err, "spin_report": report, "us": None}
                    continue
                us = time_graph_us([lambda w=w, blk=blk: blk.run(b["x"], b["norm_w"], w[0], w[1], thr)
                                    for w in b["weights"]], replays=20)
                persistent[name] = {"rel_err": err, "us": us, "spin_report": blk.error()}
            row["persistent"] = persistent
            blk = persistent_blocks["ks8 g2 lag4"]
            blk.run(b["x"], b["norm_w"], *w0, thr)
            kept_g = int(blk.count_norm[:8].sum())
            kept_u = int(blk.count_norm[8:].sum())
            kept_d = int(blk.count_mid.sum())
            mid_counts = blk.count_mid.float()
            row["kept"] = {"gate": kept_g / k, "up": kept_u / k, "down": kept_d / inter,
                           "down_slice_count_cv": float(mid_counts.std() / mid_counts.mean().clamp_min(1)),
                           "norm_slice_count_cv": float(blk.count_norm.float().std()
                                                        / blk.count_norm.float().mean().clamp_min(1))}
            row["model_gate_up_us"] = (kept_g + kept_u) * inter * 2 / bw * 1e6
            row["model_down_us"] = kept_d * hidden * 2 / bw * 1e6
            row["model_us"] = row["model_gate_up_us"] + row["model_down_us"]
            timed = {n: v["us"] for n, v in persistent.items() if v["us"] is not None}
            best = min(timed, key=timed.get) if timed else None
            row["persistent_best"] = best
            if best is not None:  # the stamps of the best decomposition
                cfg = CONFIGS[best]
                tblk = P.PersistentMLP(k, inter, hidden, dtype, device,
                                       P.PersistentConfig(**{**vars(cfg), "timing": True}), eps=EPS)
                accounts = []
                for _ in range(5):
                    tblk.run(b["x"], b["norm_w"], *w0, thr)
                    torch.cuda.synchronize()
                    stamps = tblk.stamps()
                    acc = P.stage_account(stamps)
                    acc["total_us"] = max(s_["end"] for s_ in stamps) / 1e3
                    accounts.append(acc)
                accounts.sort(key=lambda a: a["total_us"])
                row["stamps_account"] = accounts[len(accounts) // 2]
                row["stamps_timing_variant_us"] = time_graph_us(
                    [lambda w=w: tblk.run(b["x"], b["norm_w"], w[0], w[1], thr) for w in b["weights"]], replays=10)
                if s == 0.5:
                    row["stamps_items"] = stamps
            rows.append(row)
            bu = timed.get(best) if best else float("nan")
            print(f"MLP {pattern:6s} s={s:.2f} kept g/u/d {row['kept']['gate']:.3f}/{row['kept']['up']:.3f}/"
                  f"{row['kept']['down']:.3f}: model {row['model_us']:.1f} µs | today gemvs {row['today_gemvs_us']:.1f} "
                  f"(gate|up {row['today_gate_up_us']:.1f} + down {row['today_down_us']:.1f}), with norm "
                  f"{row['today_norm_gemvs_us']:.1f} | persistent best {best} {bu:.1f} µs "
                  f"(x{row['today_gemvs_us'] / bu:.2f} vs today's gemvs)", flush=True)
            print("    persistent: " + "; ".join(f"{n} {v['us']:.1f}" if v["us"] else f"{n} FAIL {v}"
                                                 for n, v in persistent.items()), flush=True)
            if "stamps_account" in row:
                a = row["stamps_account"]
                print("    stamps: total {:.1f} µs; ".format(a["total_us"]) + "; ".join(
                    f"{op}: {v['items']} items, {v['first_claim_us']:.1f}->{v['last_end_us']:.1f} µs, "
                    f"wait {v['wait_us_sum']:.0f}, work {v['work_us_sum']:.0f} item-µs"
                    for op, v in a.items() if op != "total_us"), flush=True)
            data["rows"] = rows
            write_json(data, args.json_path)
        del b
    write_json(data, args.json_path)


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"done in {time.time() - t0:.0f} s", flush=True)
