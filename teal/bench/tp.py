"""The decode benchmark of a tensor-parallel engine (`teal bench decode --tp N`): the engine split over
`tp` ranks of this host (`teal.engine.tp`), beside the unsharded engine on one device of the same run."""

from __future__ import annotations

import gc
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from teal.bench.results import decode_header, process_start_time, write_json
from teal.bench.timing import bytes_per_token, copy_bandwidth, time_engine
from teal.engine.config import EngineConfig
from teal.engine.collectives import release_symmetric_buffers
from teal.engine.model import Engine
from teal.engine.tp import (TensorParallelEngine, checkpoint_dir, init_rank, launch, random_shard,
                            shard_engine, shard_from_checkpoint)

#: Targets of the tensor-parallel benchmark (issue 6: a Llama-2-70B shape on the largest lent kind): the
#: fastest dense row against the per-rank roofline, and 50 % sparsity against that dense row.
TP_TARGETS = {"dense_frac_roofline": 0.75, "sparse50_vs_dense": 1.6}


def run_decode_bench(tp: int, json_path: str | os.PathLike[str] | None = None, **options: Any) -> dict[str, Any]:
    """`teal.bench.decode.run(..., tp=N)`: the decode benchmark of a tensor-parallel engine over `tp`
    ranks, beside the unsharded engine on one device of the same run. Spawns `tp` processes, or, when
    started by torchrun with WORLD_SIZE == tp, runs this process's rank. Rank 0 writes the JSON."""
    import tempfile

    if tp < 1:
        raise ValueError(f"--tp must be at least 1, got {tp}")
    if os.environ.get("WORLD_SIZE") == str(tp) and "RANK" in os.environ:  # torchrun
        import torch.distributed as dist

        rank = int(os.environ["RANK"])
        device = options.get("device", "cuda")
        group = init_rank(rank, tp, "env://", torch.device(device).type,
                          device_index=int(os.environ.get("LOCAL_RANK", rank)))
        try:
            return _bench_rank(rank, tp, group, options, json_path) or {}
        finally:
            release_symmetric_buffers()
            dist.destroy_process_group()
    with tempfile.TemporaryDirectory(prefix="teal-tp-") as tmp:
        out = Path(tmp) / "decode_tp.json"
        launch(_bench_rank, tp, (options, str(out)), device=options.get("device", "cuda"))
        data = json.loads(out.read_text())
    if json_path is not None:
        write_json(data, json_path)
    return data


def _bench_rank(rank: int, world_size: int, group: Any, options: dict[str, Any],
                json_path: str | os.PathLike[str] | None) -> dict[str, Any] | None:
    """One rank of the benchmark. Every control-flow decision is identical on all ranks (no deadlines,
    no per-phase error recovery), so the collectives stay in step."""
    from teal.engine.generator import Generator, resolve_thresholds
    from teal.engine.loading import engine_from_hf_model, engine_random
    from teal.engine.reference import activation_threshold_levels, decode_sparsity

    import torch.distributed as dist

    opts = dict(model=None, shape="llama-3-8b", sparsities=(0.0, 0.25, 0.4, 0.5, 0.65), prompt_len=128,
                new_tokens=256, repeats=3, thresholds=None, modes=("graph", "compiled-graph"), device="cuda",
                dtype=torch.bfloat16, single_device_baseline=True, command=None, check_tokens=16, build="auto",
                all_reduces=("auto",))
    unknown = set(options) - set(opts)
    if unknown:
        raise TypeError(f"unknown tensor-parallel benchmark options {sorted(unknown)}")
    opts.update(options)
    lead = rank == 0
    log: Callable[[str], None] = print if lead else (lambda _: None)
    device = torch.device("cuda", torch.cuda.current_device()) if opts["device"] == "cuda" else torch.device("cpu")
    modes = tuple(opts["modes"]) if device.type == "cuda" else ("eager",)
    sparsities = sorted({float(s) for s in opts["sparsities"]} | {0.0})
    prompt_len, new_tokens, repeats = opts["prompt_len"], opts["new_tokens"], opts["repeats"]
    max_seq_len = -(-(prompt_len + new_tokens + 8) // 64) * 64
    context = prompt_len + new_tokens / 2
    t_process = process_start_time()
    data = decode_header(opts["model"], opts["shape"], device, opts["dtype"], prompt_len, new_tokens, repeats,
                         max_seq_len, opts["command"])
    data.update(benchmark="decode-tp", tp=world_size,
                roofline="per rank: copy bandwidth / (this rank's weight slices x (1 - measured sparsity) + its "
                         "lm_head rows + embedding row + norms + its kv heads at the mean context); "
                         "collective time not included", single_device=[])
    data["copy_bandwidth_Bps"] = bw = copy_bandwidth(device)
    log(f"[tp={world_size}] copy bandwidth {bw / 1e12:.3f} TB/s on {data['device']}")
    build = _build_choice(opts["build"], opts["model"], opts["shape"], opts["dtype"], device)
    data["build"] = build
    data["all_reduces"] = list(opts["all_reduces"])
    if build == "shard":
        return _bench_shards(rank, world_size, group, opts, data, json_path, t_process, log)

    # 1. the whole engine on every rank (identical weights), thresholds and references from it
    if opts["model"] is None:
        full = engine_random(opts["shape"], dtype=opts["dtype"], device=device, max_seq_len=max_seq_len)
    else:
        from teal.models import load_model

        hf, _ = load_model(opts["model"], dtype=opts["dtype"], device="cpu")
        full = engine_from_hf_model(hf.eval(), device=device, max_seq_len=max_seq_len)
        del hf
    cfg = full.config
    data["model_info"] = {"name": cfg.name, "model_type": cfg.model_type, "n_layers": cfg.n_layers,
                          "hidden": cfg.hidden, "intermediate": cfg.intermediate, "vocab": cfg.vocab_size,
                          "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
                          "weight_bytes": sum(b for _, b in full.iter_weight_bytes())}
    ids = torch.randint(0, cfg.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(0)).to(device)
    calib = torch.randint(0, cfg.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(2)).to(device)
    n_check = min(opts["check_tokens"], max_seq_len - prompt_len)
    with torch.inference_mode():
        ref_prefill = full.prefill(ids, all_logits=True).float()
    ref_tokens = Generator(full, mode="eager").generate(ids, n_check, stop=[]).tokens
    full.to_layout(transposed=True)
    if opts["thresholds"] is not None:
        levels = {s: resolve_thresholds(opts["thresholds"], s, full) for s in sparsities}
    else:
        levels = {s: (th, None) for s, th in zip(sparsities, activation_threshold_levels(full, calib, sparsities))}
    measured: dict[float, tuple[float, dict[str, float]]] = {0.0: (0.0, {})}
    for s in sparsities[1:]:
        full.set_thresholds(*levels[s])  # measured along the sparse trajectory itself
        measured[s] = decode_sparsity(full, calib[:64], 4, *levels[s])
    check_level = max(sparsities)
    full.set_thresholds(*levels[check_level])
    ref_sparse_tokens = Generator(full, mode="eager").generate(ids, n_check, stop=[]).tokens

    def time_levels(engine: Engine, level_modes: Sequence[str], per_rank: bool) -> list[dict[str, Any]]:
        return _time_levels(engine, level_modes, per_rank, sparsities, levels, measured, ids, new_tokens, repeats,
                            context, bw, log, opts["all_reduces"] if per_rank else ("nccl",), data)

    # 2. optional: the unsharded engine on rank 0's device, for speed-ups within this run
    if opts["single_device_baseline"]:
        if lead:
            data["single_device"] = time_levels(full, modes[-1:], per_rank=False)
            data["single_device_mode"] = modes[-1]
        dist.barrier(group=group)

    # 3. shard, check against the whole engine, time
    t = time.perf_counter()
    engine = shard_engine(full, rank, world_size, group)
    del full
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    data["shard_s"] = time.perf_counter() - t
    data["lm_head"] = "column-parallel (vocab rows) + all-gather" if engine.vocab_group is not None else "replicated"
    engine.set_thresholds(None)
    engine.to_layout(transposed=False)
    with torch.inference_mode():
        prefill = engine.prefill(ids, all_logits=True).float()
    tokens = Generator(engine, mode="eager").generate(ids, n_check, stop=[]).tokens
    engine.to_layout(transposed=True)
    engine.set_thresholds(*levels[check_level])
    sparse_tokens = Generator(engine, mode="eager").generate(ids, n_check, stop=[]).tokens
    engine.set_thresholds(None)
    data["checks"] = {
        "prefill_rel_err_vs_single_device": float((prefill - ref_prefill).norm() / ref_prefill.norm()),
        "greedy_tokens_match_single_device": tokens == ref_tokens,
        f"sparse{check_level:g}_greedy_tokens_match_single_device": sparse_tokens == ref_sparse_tokens,
        "note": "fp32 should agree exactly; in bf16 the split sums round differently, so tokens may diverge",
    }
    log(f"checks: {json.dumps(data['checks'])}")
    data["results"] = time_levels(engine, modes, per_rank=True)
    return _finish(data, lead, json_path, t_process, log)


def _finish(data: dict[str, Any], lead: bool, json_path: str | os.PathLike[str] | None, t_process: float,
            log: Callable[[str], None]) -> dict[str, Any] | None:
    """Speed-ups, the table, and rank 0's JSON."""

    dense_tp = {}
    for r in data["results"]:
        if r["op"] == "F.linear" or r["sparsity"] == 0.0:
            key = r.get("all_reduce", "nccl")
            dense_tp[key] = max(dense_tp.get(key, 0.0), r["tokens_per_s"])
    best_dense = max(dense_tp.values())
    single = {(r["sparsity"], r["op"]): r["tokens_per_s"] for r in data["single_device"]}
    single_dense = max((r["tokens_per_s"] for r in data["single_device"] if r["sparsity"] == 0.0), default=None)
    # greedy tokens of the timed runs (first 16): the same across all-reduce implementations, and (bf16
    # rounding permitting) as on one device
    nccl_tokens = {(r["sparsity"], r["op"], r["mode"]): r.get("first_tokens") for r in data["results"]
                   if r.get("all_reduce", "nccl") == "nccl"}
    single_tokens = {(r["sparsity"], r["op"], r["mode"]): r.get("first_tokens") for r in data["single_device"]}
    for r in data["results"]:
        key = (r["sparsity"], r["op"], r["mode"])
        if r.get("all_reduce", "nccl") != "nccl" and nccl_tokens.get(key) is not None:
            r["tokens_match_nccl"] = r.get("first_tokens") == nccl_tokens[key]
        if single_tokens.get(key) is not None:
            r["tokens_match_single_device"] = r.get("first_tokens") == single_tokens[key]
    for r in data["results"]:
        r["speedup_vs_tp_dense"] = r["tokens_per_s"] / best_dense  # the fastest dense row of any op / all-reduce
        base = single.get((r["sparsity"], r["op"]))
        r["speedup_vs_single_device_same_setting"] = r["tokens_per_s"] / base if base else None
        r["speedup_vs_single_device_dense"] = r["tokens_per_s"] / single_dense if single_dense else None
    data["dense_tokens_per_s"] = best_dense
    data["targets"] = tp_targets(data["results"])
    data["total_s"] = time.time() - t_process
    if not lead:
        return None
    if json_path is not None:
        write_json(data, json_path)
    bw = data["copy_bandwidth_Bps"]
    log(f"\n== decode tp={data['tp']} {data['model']} on {data['device']} ({data['dtype']}), "
        f"lm_head {data['lm_head']}, copy {bw / 1e12:.2f} TB/s, build {data['build']} ==")
    log(f"{'sparsity':>8} {'measured':>8} {'op':>8} {'all-reduce':>10} {'mode':>15} {'tok/s':>8} {'roof/rk':>8} "
        f"{'of roof':>7} {'x tp dense':>10} {'x 1 dev':>8}")
    for r in data["results"]:
        same = r["speedup_vs_single_device_same_setting"]
        log(f"{r['sparsity']:8.2f} {r['measured_sparsity']:8.3f} {r['op']:>8} {r.get('all_reduce', 'nccl'):>10} "
            f"{r['mode']:>15} {r['tokens_per_s']:8.1f} {r['roofline_tokens_per_s']:8.1f} "
            f"{r['frac_of_roofline']:7.2f} {r['speedup_vs_tp_dense']:10.2f} {(f'{same:.2f}' if same else '-'):>8}"
            + ("" if r.get("tokens_match_nccl", True) else "  tokens differ from nccl"))
    if data["single_device"]:
        log("1 device: " + ", ".join(f"s={r['sparsity']:g} {r['op']} {r['tokens_per_s']:.1f}"
                                     for r in data["single_device"]))
    for impl, why in data.get("all_reduce_errors", {}).items():
        log(f"all-reduce {impl} not timed: {why}")
    for name, t in data["targets"].items():
        log(f"target {name:<22} {t['value']:8.3f} vs {t['target']:6.2f}  {'met' if t['met'] else 'MISSED'}")
    log(f"median tok/s over {data['repeats']} repeats; total {data['total_s']:.1f}s")
    return data


def tp_targets(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """`TP_TARGETS` as {value, target, met} from a run's rows: the fastest dense row (any op, any all-reduce)
    and the fastest 50 % row."""
    dense = [r for r in rows if r["sparsity"] == 0.0]
    half = [r for r in rows if abs(r["sparsity"] - 0.5) < 1e-9]
    out: dict[str, dict[str, Any]] = {}
    if dense:
        best = max(dense, key=lambda r: r["tokens_per_s"])
        value = best["frac_of_roofline"]
        out["dense_frac_roofline"] = {"value": value, "target": TP_TARGETS["dense_frac_roofline"],
                                      "met": value >= TP_TARGETS["dense_frac_roofline"]}
        if half:
            value = max(r["tokens_per_s"] for r in half) / best["tokens_per_s"]
            out["sparse50_vs_dense"] = {"value": value, "target": TP_TARGETS["sparse50_vs_dense"],
                                        "met": value >= TP_TARGETS["sparse50_vs_dense"]}
    return out


def _time_levels(engine: Engine, level_modes: Sequence[str], per_rank: bool, sparsities: Sequence[float],
                 levels: Mapping[float, tuple[Any, Any]], measured: Mapping[float, tuple[float, dict[str, float]]],
                 ids: torch.Tensor, new_tokens: int, repeats: int, context: float, bw: float,
                 log: Callable[[str], None], all_reduces: Sequence[str], data: dict[str, Any]) -> list[dict[str, Any]]:
    """Time dense (F.linear on the [N, K] layout) and every sparsity level (the sparse kernel on [K, N];
    at 0 the kernel or `x @ w_t`, as the engine's default) in each mode, for each all-reduce implementation
    (a tensor-parallel engine; every rank makes the same calls in the same order)."""
    from teal.engine.generator import Generator

    rows: list[dict[str, Any]] = []
    tp = isinstance(engine, TensorParallelEngine) and engine.tp_group is not None
    who = "tp" if per_rank else "1 device"
    for impl in (all_reduces if tp else ("nccl",)):
        if tp:
            try:
                impl = engine.set_all_reduce(impl)
            except RuntimeError as exc:  # the same on every rank: no peer access, no symmetric memory
                data.setdefault("all_reduce_errors", {})[impl] = str(exc)
                log(f"  all-reduce {impl}: not available ({exc})")
                continue
        tag = {"all_reduce": impl} if tp else {}
        engine.to_layout(transposed=False)
        nbytes = bytes_per_token(engine, None, context)
        for mode in level_modes:
            row = time_engine(Generator(engine, mode=mode), ids, new_tokens, repeats)
            rows.append({"sparsity": 0.0, "measured_sparsity": 0.0, "op": "F.linear", **tag, **row,
                         "bytes_per_token": nbytes, "roofline_tokens_per_s": bw / nbytes,
                         "frac_of_roofline": row["tokens_per_s"] * nbytes / bw})
            log(f"  {who} {impl if tp else ''} dense F.linear {row['mode']}: {row['tokens_per_s']:.1f} tok/s")
        engine.to_layout(transposed=True)
        for s in sparsities:
            engine.set_thresholds(*levels[s])
            op = "kernel" if s > 0 or any(any(f) for f in engine.sparse_flags) else "x @ w_t"
            for mode in level_modes:
                row = time_engine(Generator(engine, mode=mode), ids, new_tokens, repeats)
                nbytes = bytes_per_token(engine, measured[s][1] or None, context)
                rows.append({"sparsity": s, "measured_sparsity": measured[s][0], "op": op, **tag, **row,
                             "bytes_per_token": nbytes, "roofline_tokens_per_s": bw / nbytes,
                             "frac_of_roofline": row["tokens_per_s"] * nbytes / bw})
                log(f"  {who} {impl if tp else ''} s={s:.2f} ({measured[s][0]:.3f}) {op} {row['mode']}: "
                    f"{row['tokens_per_s']:.1f} tok/s, roofline {bw / nbytes:.1f}")
        engine.set_thresholds(None)
    if tp:
        engine.set_all_reduce("auto")
    return rows


def _build_choice(build: str, model: str | None, shape: str | None, dtype: torch.dtype, device: torch.device) -> str:
    """"full" (every rank holds the whole model first: checks against one device) or "shard" (each rank builds
    only its shard: random slices of a --shape, or its slices of a --model checkpoint's safetensors; for
    models that do not fit one device twice over). "auto": "shard" for a random shape or a checkpoint
    directory whose weights exceed 40 % of the device's memory."""
    if build not in ("auto", "full", "shard"):
        raise ValueError(f"unknown build {build!r}; choose auto, full or shard")
    if build != "auto":
        return build
    if device.type != "cuda" or (model is not None and not Path(model).is_dir()):
        return "full"  # a model name (alias, .gguf, hub id) is loaded whole
    from teal.engine.config import shape_hf_config

    if model is not None:
        from transformers import AutoConfig

        cfg = EngineConfig.from_hf(AutoConfig.from_pretrained(model))
    else:
        cfg = EngineConfig.from_hf(shape_hf_config(shape or "llama-3-8b"))
    nbytes = cfg.parameter_count() * torch.empty((), dtype=dtype).element_size()
    return "shard" if nbytes > 0.4 * torch.cuda.get_device_properties(device).total_memory else "full"


def _bench_shards(rank: int, world_size: int, group: Any, opts: dict[str, Any], data: dict[str, Any],
                  json_path: str | os.PathLike[str] | None, t_process: float,
                  log: Callable[[str], None]) -> dict[str, Any] | None:
    """The benchmark on shards built directly (`random_shard` for a shape, `shard_from_checkpoint` for a
    model): no single-device baseline and no token checks (no rank holds the whole model); thresholds
    from the artifact (a model) or from the shards' own prefill, with the row-parallel inputs gathered, so
    they are whole-model thresholds as in the full build."""
    from teal.engine.generator import resolve_thresholds
    from teal.engine.reference import activation_threshold_levels, decode_sparsity

    device = torch.device("cuda", torch.cuda.current_device()) if opts["device"] == "cuda" else torch.device("cpu")
    modes = tuple(opts["modes"]) if device.type == "cuda" else ("eager",)
    sparsities = sorted({float(s) for s in opts["sparsities"]} | {0.0})
    prompt_len, new_tokens, repeats = opts["prompt_len"], opts["new_tokens"], opts["repeats"]
    max_seq_len = -(-(prompt_len + new_tokens + 8) // 64) * 64
    context = prompt_len + new_tokens / 2
    if opts["thresholds"] is not None and opts["model"] is None:
        raise ValueError("a thresholds artifact needs the model it was calibrated on: give --model with it")
    t = time.perf_counter()
    if opts["model"] is None:
        engine = random_shard(opts["shape"], rank, world_size, group, dtype=opts["dtype"], device=device,
                              max_seq_len=max_seq_len)
        source = "random shards"
    else:
        path = checkpoint_dir(opts["model"])
        if opts["thresholds"] is not None:
            from transformers import AutoConfig

            opts["thresholds"].check_config(AutoConfig.from_pretrained(path), str(opts["model"]))
        engine = shard_from_checkpoint(path, rank, world_size, group, dtype=opts["dtype"], device=device,
                                       max_seq_len=max_seq_len)
        source = "checkpoint shards"
    data["shard_s"] = time.perf_counter() - t
    cfg = engine.full_config
    data["model_info"] = {"name": cfg.name, "model_type": cfg.model_type, "n_layers": cfg.n_layers,
                          "hidden": cfg.hidden, "intermediate": cfg.intermediate, "vocab": cfg.vocab_size,
                          "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
                          "weight_bytes_per_rank": sum(b for _, b in engine.iter_weight_bytes())}
    data["lm_head"] = "column-parallel (vocab rows) + all-gather" if engine.vocab_group is not None else "replicated"
    data["checks"] = {"note": f"{source} built directly (build='shard'): no single-device reference"}
    log(f"[tp={world_size}] {source} of {cfg.name} built in {data['shard_s']:.1f}s, "
        f"{data['model_info']['weight_bytes_per_rank'] / 1e9:.1f} GB per rank")
    ids = torch.randint(0, cfg.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(0)).to(device)
    calib = torch.randint(0, cfg.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(2)).to(device)
    engine.to_layout(transposed=True)
    if opts["thresholds"] is not None:
        levels = {s: resolve_thresholds(opts["thresholds"], s, engine) for s in sparsities}
    else:
        levels = {s: (th, None) for s, th in zip(sparsities, activation_threshold_levels(engine, calib, sparsities))}
    measured: dict[float, tuple[float, dict[str, float]]] = {0.0: (0.0, {})}
    for s in sparsities[1:]:
        engine.set_thresholds(*levels[s])
        measured[s] = decode_sparsity(engine, calib[:64], 4, *levels[s])
    engine.set_thresholds(None)
    data["results"] = _time_levels(engine, modes, True, sparsities, levels, measured, ids, new_tokens, repeats,
                                   context, data["copy_bandwidth_Bps"], log, opts["all_reduces"], data)
    return _finish(data, rank == 0, json_path, t_process, log)
