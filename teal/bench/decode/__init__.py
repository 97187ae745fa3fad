"""End-to-end batch-1 decode benchmark: the engine dense and sparse, HF generate, and the roofline.

For each setting: a random prompt of `prompt_len` tokens, `new_tokens` greedy tokens, the median
decode tokens/s over `repeats`, and the roofline tokens/s = copy bandwidth / bytes read per token
(sparsified projection weights x (1 - measured sparsity) + the dense rest + KV cache reads), with the
copy bandwidth measured in the same run. Baselines in the same run: our dense engine, HF `generate`
with a static cache (its automatic torch.compile) and eager HF generate, on the same weights.
Before timing, the engine is checked against HF (`check_twin`: fp32 exact, bf16 relative to HF's own error).
Survivor masks (`masks`): a random-weight model scatters survivors uniformly ("random"); with a real model's
keep profile ("real:PROFILE") its weights are first scaled per channel so that its survivors follow the
profile at each sparsity (`teal.bench.shaping`), and the rows of both are timed in the same run. Each
(sparsity, mask source) gets a report of its decode masks (`mask_reports`: imbalance over static channel
splits, keep rate, per-channel fit to the profile) and `mask_comparison` puts real against random.

Run: ``python -m teal.bench.decode --shape llama-3-8b --json out.json`` (needs CUDA; CPU runs are
for smoke tests with ``--shape tiny-llama --device cpu``).
"""

from __future__ import annotations

import gc
import json
import os
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch

from teal.engine import MODES, Generator, engine_from_hf_model, engine_random, resolve_thresholds  
from teal.engine.model import SPARSE_PATHS, Engine  
from teal.engine.reference import activation_threshold_levels, decode_sparsity
from teal.kernels.ops import cuda_kernel_available
from teal.bench.decode.checks import (  # noqa: F401 (also imported as teal.bench.decode.X)
    FP32_REL_ERR_BOUND, SPARSE_CHECK_STEPS, TWIN_SEED, _Clock, _decode_errors, _hf_greedy, _rel, build_hf_twin,
    check_dense, check_sparse_decode, check_twin, dense_weight_products, hf_decode_rate, profile_decode,
    shallow_hf_twin, teacher_forced_logits)
from teal.bench.masks import MaskSource
from teal.bench.results import decode_header, process_start_time, write_json  
from teal.bench.shaping import ProfileShaper, decode_thresholds, keep_rates, mask_report
from teal.bench.timing import bytes_per_token, copy_bandwidth, time_engine  

DEFAULT_SPARSITIES = (0.0, 0.25, 0.4, 0.5, 0.65)
MASK_STEPS = 64  # eager decode steps whose masks each (sparsity, mask source) report describes
SHAPE_PROMPTS = 2  # random prompts (of up to 256 tokens) whose activations set the shaping factors
THRESHOLD_STEPS = 32  # with a real mask source: eager decode steps whose |x| quantiles give every row's thresholds

# Targets for the Llama-3-8B shape on an H200 (see benchmarks/notes/decode-step.md).
TARGETS = {
    "dense_frac_roofline": 0.85, "dense_vs_hf_static": 2.0, "sparse50_vs_dense": 1.8,
    "sparse50_frac_roofline": 0.80, "sparse40_vs_dense": 1.55, "startup_s": 60.0,
}


def run(
    model: str | None = None,
    shape: str | None = "llama-3-8b",
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    prompt_len: int = 128,
    new_tokens: int = 256,
    repeats: int = 3,
    json_path: str | os.PathLike[str] | None = None,
    thresholds: Any = None,
    *,
    modes: Sequence[str] = ("graph", "compiled-graph"),
    hf_baselines: bool = True,
    hf_eager_tokens: int = 32,
    device: str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    time_budget_s: float = 480.0,
    profile: bool = True,
    command: str | None = None,
    log: Callable[[str], None] = print,
    tp: int = 1,
    sparse_paths: Sequence[str] | None = None,
    fused_attention: bool | None = None,
    tp_build: str = "auto",
    all_reduces: Sequence[str] = ("auto",),
    masks: Sequence[MaskSource] = (MaskSource("random"),),
    mask_steps: int = MASK_STEPS,
    mask_seed: int = 0,
    weights: Sequence[str] = ("bf16",),
    group_size: int = 128,
    torchao: bool = True,
    quant_method: str = "rtn",
) -> dict[str, Any]:
    """Benchmark decode speed; returns (and writes to `json_path`) the results dict.

    tp > 1: tensor-parallel engine over `tp` GPUs of this host (`teal.bench.tp.run_decode_bench`:
    spawns the ranks, or runs this torchrun rank; the unsharded engine is timed on rank 0 alongside;
    no HF baselines, profiles or time budget). tp = 1 is the single-device benchmark below.
    sparse_paths: how sparse groups are multiplied (`teal.engine.model.SPARSE_PATHS`); every sparse setting
    is timed with each, and each result row records its `sparse_path` (None for the cuBLAS rows).
    fused_attention: decode attention through the split-KV op (True), the compiled torch code (False),
    or the engine's default (None: the op on CUDA).
    tp_build (tp > 1): "full" (every rank builds the whole engine, then shards it: checks against one device),
    "shard" (each rank builds only its shard: random slices of `shape`, or its slices of `model`'s safetensors;
    for models too large for one device), "auto" (shard for a random shape or a checkpoint directory over
    40 % of the device's memory). all_reduces (tp > 1): sum implementations to time, "nccl",
    "symm_mem" (`teal.engine.collectives`) or "auto" (symm_mem where it can be set up).
    masks: survivor-mask sources (`teal.bench.masks`), each timed at every sparsity > 0 (rows' field
    ``masks``; s = 0 rows are "random"); a real profile needs a random-weight shape (no model, no thresholds
    artifact) and every sparsity > 0 among its levels. mask_steps: decode steps of each mask report (0: none).
    weights: weight formats to time ("bf16", "int8", "int4"; `teal.quant`, int4 in groups of `group_size`);
    bf16 is always timed (the quantized targets compare against our bf16 dense engine), then each quantized
    format by `teal.bench.quant_decode` (with torchao's weight-only config of that format in HF static-cache
    generate when `torchao` and it imports). Every row carries its `weights`. quant_method: how int4 is
    quantized, "rtn" or "hqq" (`teal.quant`; int8 is always rtn): the same kernels and bytes, other codes.
    """
    from teal.quant import WEIGHT_FORMATS, check_format, check_method

    unknown_formats = [w for w in weights if w not in WEIGHT_FORMATS]
    if unknown_formats:
        raise ValueError(f"unknown weight formats {unknown_formats}; choose from {', '.join(WEIGHT_FORMATS)}")
    check_format("int4", group_size)
    quant_formats = [w for w in dict.fromkeys(weights) if w != "bf16"]
    if quant_method != "rtn" and "int4" not in quant_formats:
        raise ValueError(f"quantization method {quant_method!r} is for int4 weights; add int4 to the weights timed")
    check_method("int4" if "int4" in quant_formats else "bf16", quant_method)
    if quant_formats and tp != 1:
        raise ValueError("quantized weights are not supported with tensor parallelism (--tp 1)")
    masks = list(masks) or [MaskSource("random")]
    real = [m for m in masks if not m.is_random]
    if real and (model is not None or thresholds is not None):
        raise ValueError("--masks real:PROFILE shapes a random-weight model (--shape); a real model (--model) or a "
                         "thresholds artifact times its own activations: use --masks random")
    if real and tp != 1:
        raise ValueError("--masks real:PROFILE is not supported with --tp")
    for source in masks:
        source.check_levels([s for s in sparsities if s > 0])
    if sparse_paths is None:  # the engine's default on one device; shards always use "kernel"
        cuda_device = str(device).startswith("cuda")
        producer = tp == 1 and cuda_device and not cuda_kernel_available(torch.device(device))
        sparse_paths = ["producer" if producer else "kernel"]
    sparse_paths = list(dict.fromkeys(sparse_paths))
    unknown_paths = [p for p in sparse_paths if p not in SPARSE_PATHS]
    if unknown_paths or not sparse_paths:
        raise ValueError(f"sparse paths {sparse_paths} must be a non-empty list from {', '.join(SPARSE_PATHS)}")
    if tp != 1:
        if sparse_paths != ["kernel"]:
            raise ValueError("the tensor-parallel decode benchmark times the default sparse path only")
        from teal.bench.tp import run_decode_bench

        return run_decode_bench(tp, json_path=json_path, model=model, shape=shape, sparsities=sparsities,
                                prompt_len=prompt_len, new_tokens=new_tokens, repeats=repeats,
                                thresholds=thresholds, modes=modes, device=device, dtype=dtype, command=command,
                                build=tp_build, all_reduces=tuple(all_reduces))
    t_process = process_start_time()
    device_t = torch.device(device)
    if device_t.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("teal bench decode needs a CUDA GPU; none is visible to torch (use --device cpu for a smoke test)")
    if device_t.type != "cuda":
        modes = ("eager",)
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown modes {unknown}; choose from {', '.join(MODES)}")
    sparsities = sorted({float(s) for s in sparsities} | {0.0})
    max_seq_len = -(-(prompt_len + new_tokens + 8) // 64) * 64
    context = prompt_len + new_tokens / 2  # mean positions attended per step
    deadline = time.time() + time_budget_s
    data: dict[str, Any] = decode_header(model, shape, device_t, dtype, prompt_len, new_tokens, repeats, max_seq_len,
                                   command)
    errors: list[str] = data["errors"]
    data["masks"] = [m.spec for m in masks]
    data["mask_profiles"] = {m.spec: m.profile.info for m in real}
    data["mask_reports"] = []
    data["shaping"] = []
    data["weights"] = ["bf16", *quant_formats]
    data["group_size"] = group_size if "int4" in quant_formats else None
    data["quant_method"] = quant_method if "int4" in quant_formats else None

    def save() -> None:
        if json_path is not None:
            write_json(data, json_path)

    def phase(name: str, fn: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        try:
            out = fn()
            log(f"[{time.time() - t_process:7.1f}s] {name}: {time.perf_counter() - t:.1f}s")
            return out
        except Exception as err:  # noqa: BLE001 - keep benchmarking what still works, record what failed
            errors.append(f"{name}: {type(err).__name__}: {err}")
            log(f"[{time.time() - t_process:7.1f}s] {name} FAILED: {type(err).__name__}: {err}")
            traceback.print_exc()
            return None
        finally:
            save()

    data["copy_bandwidth_Bps"] = bw = copy_bandwidth(device_t)
    data["programmatic_dependent_launch"] = _pdl_mode(device_t)
    log(f"copy bandwidth {bw / 1e12:.3f} TB/s on {data['device']}")

    # 1. engine straight from process start: build, compile + capture, first token
    hf = None
    if model is None:
        engine = engine_random(shape, dtype=dtype, device=device_t, max_seq_len=max_seq_len)
    else:
        from teal.models import load_model

        hf, tokenizer = load_model(model, dtype=dtype, device=device_t)
        engine = engine_from_hf_model(hf.eval(), max_seq_len=max_seq_len)
    engine.fused_attention = fused_attention
    data["fused_attention"] = engine.use_fused_attention
    _sync(device_t)
    t_built = time.time()
    data["model_info"] = {"name": engine.config.name, "model_type": engine.config.model_type,
                          "n_layers": engine.config.n_layers, "hidden": engine.config.hidden,
                          "intermediate": engine.config.intermediate, "vocab": engine.config.vocab_size,
                          "n_heads": engine.config.n_heads, "n_kv_heads": engine.config.n_kv_heads,
                          "weight_bytes": sum(b for _, b in engine.iter_weight_bytes())}
    gen0 = Generator(engine, mode=modes[-1])
    ids = torch.randint(0, engine.config.vocab_size, (prompt_len,), device=device_t,
                        generator=torch.Generator(device=device_t).manual_seed(0))
    first = gen0.generate(ids, max_new_tokens=2, stop=[])
    t_first = time.time()
    data["startup"] = {"mode": gen0.mode, "process_to_engine_s": t_built - t_process,
                       "compile_capture_s": gen0.capture_s, "process_to_first_token_s": t_first - t_process,
                       "first_token_prefill_s": first.prefill_s, "compile_error": gen0.compile_error}
    log(f"startup: {json.dumps(data['startup'])}")
    save()

    # 2. HF twin and bf16 correctness
    if hf is None:
        hf = phase("build HF model", lambda: build_hf_twin(engine))
    check_ids = torch.randint(0, engine.config.vocab_size, (48,), device=device_t,
                              generator=torch.Generator(device=device_t).manual_seed(1))
    data["checks"]["twin"] = phase("check shallow twin fp32 + bf16 vs HF",
                                   lambda: check_twin(engine, modes[-1], source=hf if model else None))
    if hf is not None:  # informational: 32 random layers amplify bf16 rounding differences
        data["checks"]["full_model_bf16"] = phase("full model bf16 vs HF bf16",
                                                  lambda: check_dense(engine, hf, check_ids))

    # 3. dense engine, every mode, dense layout (F.linear)
    dense_rows: list[dict[str, Any]] = data["dense_variants"]
    for mode in modes:
        gen = Generator(engine, mode=mode)
        row = phase(f"dense engine {mode}", lambda: time_engine(gen, ids, new_tokens, repeats))
        if row:
            dense_rows.append({"weights": "bf16", "layout": "[N,K] F.linear", "requested_mode": mode, **row})
            log(f"  dense {mode}: {row['tokens_per_s']:.1f} tok/s")
        del gen

    if profile and device_t.type == "cuda" and dense_rows:
        gen = Generator(engine, mode=max(dense_rows, key=lambda r: r["tokens_per_s"])["mode"])
        data["profiles"]["dense"] = phase("profile dense", lambda: profile_decode(gen, ids))
        del gen

    # 4. HF baselines
    if hf is not None and hf_baselines:
        data["baselines"]["hf_static_compile"] = phase(
            "HF generate static cache", lambda: {"weights": "bf16",
                                                 **hf_decode_rate(hf, ids, new_tokens, repeats, "static")})
        if hf_eager_tokens and time.time() < deadline:
            data["baselines"]["hf_eager"] = phase(
                "HF generate eager", lambda: {"weights": "bf16", **hf_decode_rate(hf, ids, hf_eager_tokens, 1, None)})

    # 5. transposed layout: thresholds, sparse check against HF
    engine.to_layout(transposed=True)
    calib_ids = torch.randint(0, engine.config.vocab_size, (prompt_len,), device=device_t,
                              generator=torch.Generator(device=device_t).manual_seed(2))
    levels: dict[float, tuple[dict[str, float], dict[str, torch.Tensor] | None]] = {}
    if thresholds is not None:
        levels = {s: resolve_thresholds(thresholds, s, engine) for s in sparsities}
    else:
        levels = {s: (th, None) for s, th in zip(sparsities, activation_threshold_levels(engine, calib_ids, sparsities))}
    data["thresholds_source"] = ("artifact" if thresholds is not None else "quantiles of |x| over a random prompt"
                                 if not real else f"s > 0: quantiles of |x| over {THRESHOLD_STEPS} greedy decode steps "
                                 "after a random prompt, per mask source (its weights shaped first)")
    data["measured_sparsity_source"] = ("zeros of the timed generation's decode steps (its prompt and tokens, "
                                        "replayed eagerly), per sparsity setting: the first timed row's tokens")
    del hf
    gc.collect()
    _empty_cache(device_t)

    # 6. transposed layout timings: s = 0 through cuBLAS (x @ w_t) and through the kernel, then s > 0
    dense_best = max((r["tokens_per_s"] for r in dense_rows), default=float("nan"))
    hf_static = (data["baselines"].get("hf_static_compile") or {}).get("tokens_per_s")
    best_first = sorted(dense_rows, key=lambda r: -r["tokens_per_s"])
    sparse_modes = list(dict.fromkeys([r["mode"] for r in best_first] + list(modes)))
    priority = [s for s in (0.5, 0.4) if s in levels] + [s for s in sparsities if s not in (0.5, 0.4)]
    shaper = ProfileShaper(engine) if real else None
    shape_len = min(256, max_seq_len)
    shape_ids = [torch.randint(0, engine.config.vocab_size, (shape_len,), device=device_t,
                               generator=torch.Generator(device=device_t).manual_seed(10 + i))
                 for i in range(SHAPE_PROMPTS)]
    settings = [(s, source) for s in priority for source in (masks if s > 0 else [MaskSource("random")])]
    for s, source in settings:
        th, cs = levels[s]
        if shaper is not None and s > 0:  # shape the weights to this source (random: undo), then thresholds
            summary = phase(f"shape {source.spec} s={s}", lambda: shaper.apply(source, s, shape_ids, mask_seed))
            th = phase(f"thresholds {source.spec} s={s}", lambda: decode_thresholds(
                engine, calib_ids, min(THRESHOLD_STEPS, max_seq_len - prompt_len), s))
            if summary is None or th is None:
                continue
            data["shaping"].append(summary)
        # mask reports only in runs that compare real masks (a random-only run times as before)
        reported = mask_steps <= 0 or s == 0 or all(m.is_random for m in masks)
        # s = 0: the kernel for every group (the engine's default where the CUDA C++ kernel runs), cuBLAS for
        # every group, and the kernel for q|k|v and o with cuBLAS for the MLP (in isolation on the H200 the
        # kernel wins on the small projections at s = 0, cuBLAS on the large)
        # (s > 0: groups left at -inf, e.g. by a greedy artifact, as the engine does by default)
        variants = ([("kernel", True), ("x @ w_t", False), ("mixed", (True, True, False, False))] if s == 0
                    else [("kernel", None)])
        if s == 0 and engine.default_kernel_at_zero not in ((True,) * 4, (False,) * 4, (True, True, False, False)):
            variants.append(("default", None))  # the engine's own choice, where it is none of the three
        for op, at_zero in variants:
            engine.kernel_at_zero = at_zero
            engine.set_thresholds(th, cs)
            measured, per = (0.0, {}) if s == 0 else (None, {})  # from the first timed run's tokens, below
            for path in sparse_paths if op == "kernel" else sparse_paths[:1]:
                engine.set_sparse_path(path)
                for mode in sparse_modes:
                    if time.time() > deadline:
                        errors.append(f"time budget reached: skipped s={s} {source.spec} {op} {path} {mode}")
                        continue
                    label = op if op != "kernel" or path == "kernel" else f"{op}/{path}"
                    gen = Generator(engine, mode=mode)
                    row = phase(f"s={s} {label} {mode}", lambda: time_engine(gen, ids, new_tokens, repeats, True))
                    del gen
                    if not row:
                        continue
                    if measured is None:  # the timed run's decode steps, replayed eagerly with its tokens
                        measured, per = decode_sparsity(engine, ids, len(row["tokens"]) - 1, th, cs, row["tokens"])
                    if not reported:  # survivor masks of the same tokens' first decode steps
                        reported = True
                        steps = min(mask_steps, len(row["tokens"]) - 1)
                        report = phase(f"masks s={s} {source.spec}", lambda: mask_report(
                            keep_rates(engine, ids, steps, th, row["tokens"]),
                            shaper.targets if shaper is not None and not source.is_random else None))
                        if report is not None:
                            data["mask_reports"].append({"sparsity": s, "masks": source.spec, "steps": steps,
                                                         "measured_sparsity": measured, "sites": report})
                    row.pop("tokens")
                    nbytes = bytes_per_token(engine, per if s > 0 else None, context)
                    roof = bw / nbytes
                    result = {"weights": "bf16", "sparsity": s, "measured_sparsity": measured, "masks": source.spec, "op": op,
                              "sparse_path": path if op == "kernel" else None, "requested_mode": mode, **row,
                              "bytes_per_token": nbytes, "roofline_tokens_per_s": roof,
                              "frac_of_roofline": row["tokens_per_s"] / roof,
                              "speedup_vs_dense": row["tokens_per_s"] / dense_best,
                              "speedup_vs_hf_static": row["tokens_per_s"] / hf_static if hf_static else None}
                    data["results"].append(result)
                    key = (f"s0.5-{row['mode']}" + ("" if path == "kernel" else f"-{path}")
                           + ("" if source.is_random else f"-{source.spec}"))
                    if profile and device_t.type == "cuda" and s == 0.5 and key not in data["profiles"]:
                        gen = Generator(engine, mode=mode)
                        data["profiles"][key] = phase(f"profile s=0.5 {path}", lambda: profile_decode(gen, ids))
                        del gen
                    log(f"  s={s:.2f} ({measured:.3f}) {source.spec:10s} {label:15s} {mode:15s} {row['tokens_per_s']:7.1f} tok/s "
                        f"roofline {roof:7.1f} ({result['frac_of_roofline']:.0%})")
        engine.kernel_at_zero = None
        engine.set_sparse_path(None)
    if shaper is not None:
        shaper.reset()
    data["results"].sort(key=lambda r: (r["sparsity"], r["masks"], r["op"], r["sparse_path"] or "", r["mode"]))
    data["dense_roofline_tokens_per_s"] = bw / bytes_per_token(engine, None, context)
    data["dense_best"] = dense_baseline(data)
    for r in data["results"]:  # ratios against the fastest dense path, whichever it is
        r["speedup_vs_dense"] = r["tokens_per_s"] / data["dense_best"]["tokens_per_s"]
    if quant_formats:  # 7. int8 / int4 weights: the engine built again per format (teal.bench.quant_decode)
        from teal.bench import quant_decode

        del engine, gen0
        gc.collect()
        _empty_cache(device_t)

        def build_engine() -> Engine:
            if model is None:
                return engine_random(shape, dtype=dtype, device=device_t, max_seq_len=max_seq_len)
            from teal.models import load_model

            source, _ = load_model(model, dtype=dtype, device=device_t)
            return engine_from_hf_model(source.eval(), max_seq_len=max_seq_len)

        def build_hf(engine: Engine) -> torch.nn.Module:
            if model is None:
                return build_hf_twin(engine)
            from teal.models import load_model

            return load_model(model, dtype=dtype, device=device_t)[0].eval()

        for fmt in quant_formats:
            quant_decode.run_quantized(data, fmt, group_size, build_engine, build_hf, lambda: None, ids,
                                       sparsities, sparse_modes, new_tokens, repeats, bw, context, thresholds,
                                       torchao and hf_baselines, deadline, phase, log,
                                       quant_method=quant_method if fmt == "int4" else "rtn")
        quant_decode.finish_quantized(data)
    data["targets"] = evaluate_targets(data)
    data["mask_comparison"] = mask_comparison(data)
    if quant_formats:
        data["targets"].update(quant_decode.quant_targets(data))
    data["total_s"] = time.time() - t_process
    save()
    print_table(data, log)
    return data


def mask_comparison(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Per sparsity > 0, op, sparse path and mode: each real mask source's tokens/s against the random masks'
    of the same run (``ratio`` < 1: slower on the real pattern), with both measured sparsities."""
    rows = {(r["sparsity"], r["op"], r.get("sparse_path"), r["mode"], r.get("masks", "random")): r
            for r in data["results"] if r["sparsity"] > 0}
    out = []
    for (s, op, path, mode, masks), r in rows.items():
        base = rows.get((s, op, path, mode, "random"))
        if masks != "random" and base is not None:
            out.append({"sparsity": s, "op": op, "sparse_path": path, "mode": mode, "masks": masks,
                        "tokens_per_s": r["tokens_per_s"], "random_tokens_per_s": base["tokens_per_s"],
                        "ratio": r["tokens_per_s"] / base["tokens_per_s"], "measured_sparsity": r["measured_sparsity"],
                        "random_measured_sparsity": base["measured_sparsity"]})
    return out


def dense_baseline(data: dict[str, Any]) -> dict[str, Any]:
    """The fastest dense path of this run, named: the cuBLAS variants (``[N,K] F.linear`` per mode, and the
    engine's ``x @ w_t`` rows at s = 0) or the sparse kernel with every threshold at -inf (the ``kernel``
    rows at s = 0: on the H200 the CUDA C++ kernel reads all rows faster than cuBLAS)."""
    rows = [dict(path=f"cuBLAS [N,K] F.linear ({r['mode']})", tokens_per_s=r["tokens_per_s"])
            for r in data["dense_variants"] if r.get("tokens_per_s")]
    for r in data["results"]:
        if r["sparsity"] == 0 and r.get("tokens_per_s") and r.get("weights", "bf16") == "bf16":
            names = {"kernel": f"sparse kernel, thresholds -inf ({r.get('sparse_path')})",
                     "mixed": "sparse kernel at -inf for q|k|v and o, cuBLAS x @ w_t for the MLP",
                     "default": "the engine's default dense groups (Engine.default_kernel_at_zero)"}
            name = names.get(r["op"], "cuBLAS x @ w_t")
            rows.append(dict(path=f"{name} ({r['mode']})", tokens_per_s=r["tokens_per_s"]))
    return max(rows, key=lambda r: r["tokens_per_s"]) if rows else dict(path=None, tokens_per_s=float("nan"))


def evaluate_targets(data: dict[str, Any]) -> dict[str, Any]:
    """Each target as {value, target, met} from this run's numbers (dense: ``dense_baseline``)."""
    dense = (data.get("dense_best") or dense_baseline(data))["tokens_per_s"]
    dense = dense if dense == dense else None  # NaN: no dense row
    roof = data.get("dense_roofline_tokens_per_s")
    hf = (data["baselines"].get("hf_static_compile") or {}).get("tokens_per_s")

    def best(s: float) -> dict[str, Any] | None:  # the targets are the bf16 random-mask rows'
        rows = [r for r in data["results"] if abs(r["sparsity"] - s) < 1e-9 and r["op"] == "kernel"
                and r.get("weights", "bf16") == "bf16" and r.get("masks", "random") == "random"]
        return max(rows, key=lambda r: r["tokens_per_s"]) if rows else None

    out: dict[str, Any] = {}

    def add(name: str, value: float | None, target: float, higher: bool = True) -> None:
        if value is not None:
            out[name] = {"value": value, "target": target, "met": value >= target if higher else value <= target}

    if dense and roof:
        add("dense_frac_roofline", dense / roof, TARGETS["dense_frac_roofline"])
    if dense and hf:
        add("dense_vs_hf_static", dense / hf, TARGETS["dense_vs_hf_static"])
    s50, s40 = best(0.5), best(0.4)
    if s50 and dense:
        add("sparse50_vs_dense", s50["tokens_per_s"] / dense, TARGETS["sparse50_vs_dense"])
        add("sparse50_frac_roofline", s50["frac_of_roofline"], TARGETS["sparse50_frac_roofline"])
    if s40 and dense:
        add("sparse40_vs_dense", s40["tokens_per_s"] / dense, TARGETS["sparse40_vs_dense"])
    startup = data.get("startup", {}).get("process_to_first_token_s")
    add("startup_s", startup, TARGETS["startup_s"], higher=False)
    return out


def print_table(data: dict[str, Any], log: Callable[[str], None] = print) -> None:
    """Plain-text summary (the last lines of a device run's output)."""
    bw = data.get("copy_bandwidth_Bps", 0.0)
    log(f"\n== decode {data['model']} on {data['device']} ({data['dtype']}), prompt {data['prompt_len']}, "
        f"{data['new_tokens']} new tokens, copy {bw / 1e12:.2f} TB/s ==")
    for r in data["dense_variants"]:
        log(f"dense  [N,K] F.linear  {r['mode']:15s} {r['tokens_per_s']:8.1f} tok/s  capture {r['capture_s']:.1f}s"
            + (f"  (compile failed: {r['compile_error'][:80]})" if r.get("compile_error") else ""))
    for name, b in data["baselines"].items():
        if b and "tokens_per_s" in b:
            log(f"{name:22s} {b['tokens_per_s']:8.1f} tok/s  ({b['new_tokens']} tokens, warm-up {b['warmup_s']:.1f}s)")
        elif b:
            log(f"{name:22s} not timed: {b.get('error') or b.get('skipped')}")
    log(f"{'weights':>7} {'sparsity':>8} {'measured':>8} {'masks':>10} {'op':>12} {'path':>8} {'mode':>15} {'tok/s':>8} "
        f"{'roofline':>8} {'%roof':>6} {'x dense':>7} {'x HF':>6} {'ttft ms':>7}")
    for r in data["results"]:
        hf = r.get("speedup_vs_hf_static") or r.get("speedup_vs_torchao")
        dense = r.get("speedup_vs_dense")
        log(f"{r.get('weights', 'bf16'):>7} {r['sparsity']:8.2f} {r['measured_sparsity']:8.3f} "
            f"{r.get('masks', 'random'):>10} {r['op']:>12} "
            f"{r.get('sparse_path') or '-':>8} {r['mode']:>15} {r['tokens_per_s']:8.1f} "
            f"{r['roofline_tokens_per_s']:8.1f} {r['frac_of_roofline']:6.0%} {(f'{dense:.2f}' if dense else '-'):>7} "
            f"{(f'{hf:.2f}' if hf else '-'):>6} {r['ttft_s'] * 1e3:7.1f}")
    log("(x dense: against the fastest dense row of the same weights; x HF: HF static-cache generate, bf16 rows, "
        "or torchao's of the same format, quantized rows)")
    log("startup: " + json.dumps({k: (round(v, 2) if isinstance(v, float) else v)
                                  for k, v in data.get("startup", {}).items()}))
    log("checks: " + json.dumps(data.get("checks", {}), default=str))
    if data.get("dense_best"):
        log(f"dense baseline (x dense): {data['dense_best']['path']} at {data['dense_best']['tokens_per_s']:.1f} tok/s")
    for name, t in data.get("targets", {}).items():
        log(f"target {name:24s} {t['value']:8.3f} vs {t['target']:6.2f}  {'met' if t['met'] else 'MISSED'}")
    for name, prof in data.get("profiles", {}).items():
        if prof:
            log(f"profile {name} ({prof['mode']}): {prof['kernels_per_step']:.0f} kernels, "
                f"{prof['kernel_us_per_step']:.0f} us of kernels per step; top: "
                + "; ".join(f"{r['kernel'][:40]} x{r['per_step']:.0f} {r['us_per_step']:.0f}us" for r in prof["top"][:6]))
    for c in data.get("mask_comparison", []):
        log(f"masks {c['masks']} vs random s={c['sparsity']:g} {c['op']}/{c['sparse_path']} {c['mode']}: "
            f"{c['tokens_per_s']:.1f} vs {c['random_tokens_per_s']:.1f} tok/s (x{c['ratio']:.3f}), measured sparsity "
            f"{c['measured_sparsity']:.4f} vs {c['random_measured_sparsity']:.4f}")
    for m in data.get("mask_reports", []):
        log(f"mask report s={m['sparsity']:g} {m['masks']}: " + "; ".join(
            f"{site} keep {e['keep_rate']:.3f}, busiest of 132 slices {e['imbalance'].get('132', {}).get('max_over_mean', float('nan')):.2f}x"
            + (f", channel fit r={e['channel_fit']['corr']:.3f}, target of kept / zeroed {e['target_of_kept']:.3f} / "
               f"{e['target_of_zeroed']:.3f} (ideal {e['ideal_target_of_kept']:.3f} / {e['ideal_target_of_zeroed']:.3f})"
               if "channel_fit" in e else "")
            for site, e in m["sites"].items()))
    for e in data["errors"]:
        log(f"error: {e}")


def _pdl_mode(device: torch.device) -> int | None:
    """The kernels' programmatic dependent launch mode on `device` (`teal.kernels.ops.pdl_mode`), None
    without teal.kernels."""
    try:
        from teal.kernels.ops import pdl_mode
    except ImportError:  # pragma: no cover - depends on the install
        return None
    return pdl_mode(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
