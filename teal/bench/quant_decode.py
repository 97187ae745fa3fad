"""Decode with int8 / int4 weights in `teal bench decode --weights bf16,int4,int8` (`teal.bench.decode.run`).

Per quantized format: the engine is built again with the bf16 run's weights (same seed or checkpoint),
HF generate with a static cache on torchao's weight-only config of that format (int4 at the run's group size,
`torchao_config`) is timed on the bf16 weights (when torchao imports; a failure is recorded with its one-line
reason), then the engine is quantized (`Engine.quantize_weights`, `teal.quant`: int8 per output channel, int4
group-wise) and checked before any timing (`check_quantized`: the fused quantized kernel against a float64
dequantize-then-multiply reference, per projection and through teacher-forced decode steps of a shallow twin
quantized alike; a format that fails is not timed). Then our dense and sparse decode are timed at every
sparsity. Rows carry `weights`, the quantized paths the timed code called (`quant_kernel_calls`) and those of
one prefill of the prompt (`prefill_quant_kernel_calls`, beside `ttft_s`); the roofline counts codes, scales,
zeros and what stays bf16 (lm_head, norms, embedding row, KV cache).
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from teal.bench.decode.checks import (_rel, build_hf_twin, call_rel_err, hf_decode_rate,  # noqa: F401
                                     product_summary, shallow_hf_twin, teacher_forced_logits)
from teal.bench.timing import bytes_per_token, time_engine
from teal.engine import Generator, engine_from_hf_model, resolve_thresholds
from teal.engine.model import Engine
from teal.engine.projection import quantized_weight
from teal.engine.reference import activation_threshold_levels, activation_thresholds, decode_sparsity
from teal.kernels import quant_gemv
from teal.kernels.quant_gemv import quant_sparse_linear_reference
from teal.quant import INT4_GROUP_SIZES

QUANT_FORMATS = ("int8", "int4")
KERNEL_REL_ERR = 1e-2  # the bound on each kernel against the float64 reference
TWIN_TOP1_MIN = 0.9  # teacher-forced top-1 agreement of the kernels with the float64 products (shallow twin)
TWIN_MEDIAN_REL_ERR = 0.03  # their median relative logit error (bf16 rounding of the outputs only)
SPARSE_TOP1_SLACK, SPARSE_ERR_RATIO, SPARSE_ERR_SLACK = 0.1, 1.5, 0.005  # sparse: beside float32 torch products


def torchao_config(weights: str, group_size: int = 128) -> tuple[str, dict[str, Any]]:
    """torchao's weight-only config of `weights` as (class name in `torchao.quantization`, keyword arguments):
    int4 at this run's `group_size` (the one our int4 rows use), int8 per output channel. The row's `config`
    text (`torchao_config_text`) is built from the same pair, so it names what was run."""
    if weights == "int4":
        if group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"torchao's int4 group size must be one of {INT4_GROUP_SIZES}, got {group_size}")
        return "Int4WeightOnlyConfig", {"group_size": group_size, "int4_packing_format": "tile_packed_to_4d"}
    if weights == "int8":
        return "Int8WeightOnlyConfig", {}
    raise ValueError(f"no torchao weight-only config for {weights!r}: use int4 or int8")


def torchao_config_text(weights: str, group_size: int = 128) -> str:
    """The config as written in Python, e.g. "Int4WeightOnlyConfig(group_size=64, int4_packing_format=...)"."""
    name, kwargs = torchao_config(weights, group_size)
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"


GPT_FAST_INT4_H100 = 241.0  # tok/s, gpt-fast's int4 Llama-3.1-8B on an H100 (torchao's README)
QUANT_TARGETS = {
    "int4_dense_frac_roofline": 0.80, "int4_dense_vs_torchao_int4": 2.0,
    "int4_dense_vs_gpt_fast_h100": GPT_FAST_INT4_H100, "int4_sparse50_vs_int4_dense": 1.6,
    "int8_sparse50_vs_int8_dense": 1.7, "int4_sparse50_vs_bf16_dense": 2.8,
}


@contextlib.contextmanager
def torch_quant_products(compute_dtype: torch.dtype = torch.float64, max_rows: int | None = None) -> Iterator[None]:
    """Within: every quantized product of the engine is `quant_sparse_linear_reference` in `compute_dtype`
    (dequantize, mask, multiply in plain torch; rounded to the activations' dtype at the output) instead of
    the kernel. float64 is the reference; float32 rounds like the kernel (fp32 sums, output rounded to the
    activations' dtype) but cannot skip or misread a row. `max_rows`: only calls of at most that many rows
    (the decode steps' products) are replaced; larger ones (the prompt's prefill) run as they would without
    this context."""
    from teal.engine import projection

    saved = projection.quant_sparse_linear

    def reference(x, qw, thresholds, split_sizes, col_scale=None):
        if max_rows is not None and x.shape[0] > max_rows:
            return saved(x, qw, thresholds, split_sizes, col_scale)
        return quant_sparse_linear_reference(x.to(compute_dtype), qw, thresholds, split_sizes, col_scale,
                                             compute_dtype=compute_dtype).to(x.dtype)

    projection.quant_sparse_linear = reference
    try:
        yield
    finally:
        projection.quant_sparse_linear = saved


@contextlib.contextmanager
def recorded_quant_products() -> Iterator[list[dict[str, Any]]]:
    """Within: every quantized product runs as usual and, on the very same input, the float32 torch product
    (`quant_sparse_linear_reference`); the yielded list gets one {"call", "rel_err"} per product (as
    `teal.bench.decode.checks.recorded_products` does for bf16 weights): the kernels at the model's widths,
    thresholds and activations, without the step-to-step divergence of mask flips."""
    from teal.engine import projection

    saved = projection.quant_sparse_linear
    calls: list[dict[str, Any]] = []

    def record(x, qw, thresholds, split_sizes, col_scale=None):
        y = saved(x, qw, thresholds, split_sizes, col_scale)
        ref = quant_sparse_linear_reference(x.float(), qw, thresholds, split_sizes, col_scale,
                                            compute_dtype=torch.float32)
        calls.append({"call": f"{x.shape[0]} rows", "rel_err": call_rel_err(y, ref)})
        return y

    projection.quant_sparse_linear = record
    try:
        yield calls
    finally:
        projection.quant_sparse_linear = saved


def prefill_paths(engine: Engine, ids: torch.Tensor) -> dict[str, int]:
    """How many products of one prefill of `ids` took each path of `teal::quant_sparse_linear` (its
    `path_counts`: "dequant-matmul" above 8 prompt tokens, else the small-batch kernels). The timed rows' TTFT
    is that prefill; `quant_kernel_calls` mixes it with the decode graphs' captures."""
    before = dict(quant_gemv.path_counts)
    with torch.inference_mode():
        engine.prefill(ids)
    return {k: v - before.get(k, 0) for k, v in quant_gemv.path_counts.items() if v != before.get(k, 0)}


def check_projections(engine: Engine, layers: Sequence[int] | None = None, batches: Sequence[int] = (1, 4, 16),
                      sparsities: Sequence[float] = (0.0, 0.5), seed: int = 0) -> dict[str, Any]:
    """Each projection group of `layers` (default: the first and the last) through `quant_sparse_linear` (the
    engine's dispatch: the fused kernels at batch 1 and 4, `dequant_matmul` at 16, prefill's path) against the
    float64 reference, on random inputs at each batch and sparsity (thresholds: quantiles of |x|): relative
    error <= `KERNEL_REL_ERR`, no NaN."""
    from teal.engine import projection

    layers = [0, engine.config.n_layers - 1] if layers is None else list(layers)
    gen = torch.Generator(device=engine.device).manual_seed(seed)
    cases = []
    for i in dict.fromkeys(layers):
        for group, p in engine.projections(i)._asdict().items():
            qw = quantized_weight(p)
            for b in batches:
                x = torch.randn(b, qw.shape[0], device=engine.device, dtype=engine.dtype, generator=gen)
                for s in sparsities:
                    t = (float("-inf") if s == 0 else float(torch.quantile(x.abs().float().flatten()[:2**16], s)))
                    thr = torch.full((len(p.splits),), t, device=engine.device)
                    with torch.inference_mode():
                        y = projection.quant_sparse_linear(x, qw, thr, p.splits)
                        ref = quant_sparse_linear_reference(x.double(), qw, thr, p.splits, compute_dtype=torch.float64)
                    finite = bool(torch.isfinite(y).all())
                    err = float((y.double() - ref).norm() / ref.norm().clamp_min(1e-30)) if finite else float("inf")
                    cases.append({"layer": i, "group": group, "batch": b, "sparsity": s, "rel_err": err,
                                  "finite": finite})
    worst = max(cases, key=lambda c: c["rel_err"])
    return {"cases": len(cases), "max_rel_err": worst["rel_err"], "worst": worst, "bound": KERNEL_REL_ERR,
            "passed": all(c["finite"] and c["rel_err"] <= KERNEL_REL_ERR for c in cases)}


def check_decode(engine: Engine, weights: str, group_size: int, source: torch.nn.Module | None = None,
                 n_layers: int = 4, sparsity: float = 0.5, steps: int = 48, method: str = "rtn") -> dict[str, Any]:
    """Teacher-forced decode steps of a shallow twin (the engine's widths, `n_layers` layers), quantized alike
    (`weights`, `group_size` and `method`: the codes of the method being timed),
    through the kernels against the same steps with float64 products (`torch_quant_products`), dense and at
    `sparsity` (thresholds: quantiles of the twin's own activations).

    Dense passes when the median relative logit error is <= `TWIN_MEDIAN_REL_ERR`, without NaN, and the top-1
    token agrees on >= `TWIN_TOP1_MIN` of the steps or, where the same steps with float32 torch products agree
    less, on at least their share less `SPARSE_TOP1_SLACK` (`dense_twin_passed`). Sparse cannot use absolute bounds: an activation within
    a rounding step of its threshold flips its mask entry, and in a random twin at 8B widths such flips move
    the logits a lot (H100: median error 0.28 against float64 with correct kernels,
    `benchmarks/results/2026-12-07-h100-quant-decode-llama-3-8b-check-failed.json`). So the kernels' run is
    judged beside the same steps with float32 torch products in the decode steps, which round alike but
    cannot skip or misread a row (the rule of `teal.bench.decode.checks.check_sparse_decode`): top-1
    agreement with the float64 run at least the float32 run's less `SPARSE_TOP1_SLACK`, and median error at
    most `SPARSE_ERR_RATIO` x the float32 run's + `SPARSE_ERR_SLACK`. The float32 run's prompt prefill takes
    the kernels' run's path (above 8 rows: the weight dequantized to bf16, then cuBLAS), so that the two
    differ only in the decode products; the float64 run's prefill takes it too, for dense as for sparse
    (`check_projections` checks that path against float64 at 16 rows). With a float64 prefill in the
    reference, the dense kernels' run agreed on 43 of 48 top-1 tokens (H100, int4: 0.896 < 0.9; the bf16
    weight rounding of the prefill path moves the KV cache,
    `benchmarks/results/2026-12-07-h100-quant-decode-llama-3-8b-dense-check-failed.json`).
    With an fp32 prefill in the float32 run instead, the kernels' run
    measured median 0.53 against 0.28 on the H100 (int4 and int8) once that path was the default (the only
    change to the default quantized path since 0.28 against 0.28,
    `benchmarks/results/2026-12-07-h100-decode-bf16-int4-llama-3-8b-checks.json`). On a twin
    where rounding flips nothing, that is as strict as the dense bounds.
    Dense and sparse also pass only if every product of the kernels' run agrees with the float32 torch
    product of the same input (`recorded_quant_products`; 90th percentile <= `PRODUCT_REL_ERR_P90`), which
    does not depend on how chaotic the twin is."""
    hf32, n_layers = shallow_hf_twin(engine, source, n_layers)
    prompt = 32
    max_seq_len = -(-(prompt + steps) // 64) * 64
    twin = engine_from_hf_model(hf32.to(engine.dtype), max_seq_len=max_seq_len)
    del hf32
    twin.quantize_weights(weights, group_size, method)
    ids = torch.randint(0, engine.config.vocab_size, (prompt + steps,), device=engine.device,
                        generator=torch.Generator(device=engine.device).manual_seed(3))
    out: dict[str, Any] = {"n_layers": n_layers, "steps": steps, "sparsity": sparsity}
    th = activation_thresholds(twin, ids[:prompt], sparsity)

    def score(logits: torch.Tensor, ref: torch.Tensor) -> dict[str, Any]:
        errs = (logits - ref).norm(dim=-1) / ref.norm(dim=-1)
        return {"top1_agreement": float((logits.argmax(-1) == ref.argmax(-1)).float().mean()),
                "median_rel_err": float(errs.median()), "max_rel_err": float(errs.max()),
                "finite": bool(torch.isfinite(logits).all())}

    for name, thresholds in (("dense", None), ("sparse", th)):
        twin.set_thresholds(thresholds)
        with recorded_quant_products() as calls:
            kernel = teacher_forced_logits(twin, ids, prompt)
        with torch_quant_products(torch.float64, max_rows=quant_gemv.MAX_BATCH):
            ref = teacher_forced_logits(twin, ids, prompt)
        res = score(kernel, ref)
        res["products"] = product_summary(calls)
        with torch_quant_products(torch.float32, max_rows=quant_gemv.MAX_BATCH):
            floor = score(teacher_forced_logits(twin, ids, prompt), ref)
        res["torch_float32_products"] = floor
        res["passed"] = (dense_twin_passed if name == "dense" else sparse_twin_passed)(res, floor)
        out[name] = res
    out["bounds"] = {"dense_top1_min": TWIN_TOP1_MIN, "dense_median_rel_err": TWIN_MEDIAN_REL_ERR,
                     "sparse_top1_slack": SPARSE_TOP1_SLACK, "sparse_err_ratio": SPARSE_ERR_RATIO,
                     "sparse_err_slack": SPARSE_ERR_SLACK}
    out["passed"] = bool(out["dense"]["passed"] and out["sparse"]["passed"])
    return out


def dense_twin_passed(res: dict[str, Any], floor: dict[str, Any]) -> bool:
    """The dense twin's rule: no NaN, median relative logit error <= `TWIN_MEDIAN_REL_ERR`, every product within
    its bound, and top-1 agreement >= `TWIN_TOP1_MIN` or, where the float32 torch products (the same bf16
    output rounding, no kernel) agree less, at least theirs less `SPARSE_TOP1_SLACK`: in a random twin a
    near-tie argmax flips under any rounding (the H100 passed at 44 of 48, one flip from failing)."""
    top1_min = min(TWIN_TOP1_MIN, floor["top1_agreement"] - SPARSE_TOP1_SLACK)
    return bool(res["finite"] and res["top1_agreement"] >= top1_min and res["median_rel_err"] <= TWIN_MEDIAN_REL_ERR
                and res["products"]["passed"])


def sparse_twin_passed(res: dict[str, Any], floor: dict[str, Any]) -> bool:
    """The sparse twin's rule, beside the float32 torch products (see `check_decode`)."""
    return bool(res["finite"] and res["top1_agreement"] >= floor["top1_agreement"] - SPARSE_TOP1_SLACK
                and res["median_rel_err"] <= SPARSE_ERR_RATIO * floor["median_rel_err"] + SPARSE_ERR_SLACK
                and res["products"]["passed"])


def check_quantized(engine: Engine, source: torch.nn.Module | None = None, steps: int = 48) -> dict[str, Any]:
    """`check_projections` on the engine's own (quantized) weights and `check_decode` (`steps` teacher-forced
    steps) on a shallow twin quantized as the engine is (format, group size and method)."""
    proj = check_projections(engine)
    dec = check_decode(engine, engine.weight_format, engine.group_size or 128, source, steps=steps,
                       method=engine.quant_method or "rtn")
    return {"projections": proj, "decode": dec, "passed": bool(proj["passed"] and dec["passed"])}


def torchao_decode_rate(hf: torch.nn.Module, weights: str, ids: torch.Tensor, new_tokens: int,
                        repeats: int, group_size: int = 128) -> dict[str, Any]:
    """HF generate (static cache) with torchao's weight-only `weights` config (`torchao_config`; int4 at
    `group_size`) on every decoder projection (lm_head stays bf16, as in our engine). A missing torchao or a
    failure is returned as a row with its one-line reason (`skipped` / `error`), not raised."""
    name, kwargs = torchao_config(weights, group_size)
    row: dict[str, Any] = {"weights": weights, "op": "torchao", "config": torchao_config_text(weights, group_size),
                           "group_size": kwargs.get("group_size"), "path": "HF generate, static cache"}
    try:
        import torchao.quantization
    except ImportError as err:
        row["skipped"] = f"torchao is not importable ({err}); pip install torchao==0.18.0"
        return row
    row["torchao"] = torchao.__version__
    try:
        config = getattr(torchao.quantization, name)(**kwargs)
        torchao.quantization.quantize_(
            hf, config, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and "lm_head" not in fqn)
        row.update(hf_decode_rate(hf, ids, new_tokens, repeats, "static"))
    except Exception as err:  # noqa: BLE001 - the row records why torchao could not run here
        row["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"[:300]
    return row


def run_quantized(
    data: dict[str, Any],
    weights: str,
    group_size: int,
    build_engine: Callable[[], Engine],
    build_hf: Callable[[Engine], torch.nn.Module],
    source: Callable[[], torch.nn.Module | None],
    ids: torch.Tensor,
    sparsities: Sequence[float],
    modes: Sequence[str],
    new_tokens: int,
    repeats: int,
    bw: float,
    context: float,
    thresholds: Any,
    torchao: bool,
    deadline: float,
    phase: Callable[[str, Callable[[], Any]], Any],
    log: Callable[[str], None] = print,
    quant_method: str = "rtn",
) -> None:
    """Time one quantized format (see the module docstring); rows go to `data["results"]`, the torchao row to
    `data["baselines"]`, the check to `data["checks"]` (before the check's phase saves the JSON); the dispatch's
    settings ($TEAL_QUANT_KERNEL, $TEAL_QUANT_LARGE_BATCH) to `data["quant_dispatch"]`.
    `quant_method` quantizes the engine ("rtn" or "hqq") and the check's shallow twin alike, so that the check
    runs on the codes being timed."""
    data["quant_dispatch"] = {quant_gemv.QUANT_KERNEL_ENV: quant_gemv.quant_kernel_choice(),
                              quant_gemv.QUANT_LARGE_BATCH_ENV: quant_gemv.large_batch_choice()}
    engine = build_engine()
    device = engine.device
    if torchao:
        hf = build_hf(engine)
        data["baselines"][f"torchao_{weights}_hf_static"] = row = phase(
            f"torchao {weights} HF generate static cache", lambda: torchao_decode_rate(hf, weights, ids, new_tokens,
                                                                                        repeats, group_size))
        if row:
            log(f"  torchao {weights}: " + (f"{row['tokens_per_s']:.1f} tok/s" if "tokens_per_s" in row
                                             else row.get("error") or row.get("skipped")))
        del hf
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    engine.quantize_weights(weights, group_size, quant_method)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    data["model_info"].setdefault("weight_bytes_by_format", {})[weights] = sum(b for _, b in engine.iter_weight_bytes())
    def checked() -> dict[str, Any]:  # recorded before the phase saves the JSON: a run killed later keeps it
        data["checks"][f"quant_{weights}"] = result = check_quantized(engine, source())
        return result

    check = phase(f"check {weights} kernels vs float64", checked)
    if not check or not check["passed"]:
        data["errors"].append(f"{weights}: the correctness check failed; {weights} is not timed")
        log(f"  {weights}: correctness check FAILED, not timed")
        return
    calib_ids = torch.randint(0, engine.config.vocab_size, (ids.numel(),), device=device,
                              generator=torch.Generator(device=device).manual_seed(2))
    if thresholds is not None:
        levels = {s: resolve_thresholds(thresholds, s, engine) for s in sparsities}
    else:  # quantiles of the quantized engine's own activations
        levels = {s: (th, None) for s, th in zip(sparsities, activation_threshold_levels(engine, calib_ids, sparsities))}
    for s in sparsities:
        th, cs = levels[s]
        engine.set_thresholds(th if s > 0 else None, cs if s > 0 else None)
        measured, per = (0.0, {}) if s == 0 else (None, {})
        for mode in modes:
            if time.time() > deadline:
                data["errors"].append(f"time budget reached: skipped {weights} s={s} {mode}")
                continue
            calls_before = dict(quant_gemv.path_counts)
            gen = Generator(engine, mode=mode)
            row = phase(f"{weights} s={s} {mode}", lambda: time_engine(gen, ids, new_tokens, repeats, True))
            del gen
            if row:  # which kernel the timed code called (a CUDA graph replays what its capture called)
                row["quant_kernel_calls"] = {k: v - calls_before.get(k, 0) for k, v in quant_gemv.path_counts.items()
                                             if v != calls_before.get(k, 0)}
                row["prefill_quant_kernel_calls"] = prefill_paths(engine, ids)
            if not row:
                continue
            if measured is None:
                measured, per = decode_sparsity(engine, ids, len(row["tokens"]) - 1, th, cs, row["tokens"])
            row.pop("tokens")
            nbytes = bytes_per_token(engine, per if s > 0 else None, context)
            result = {"weights": weights, "group_size": group_size if weights == "int4" else None,
                      "quant_method": quant_method, "sparsity": s,
                      "measured_sparsity": measured, "op": "quant-kernel", "sparse_path": None,
                      "requested_mode": mode, **row, "bytes_per_token": nbytes, "roofline_tokens_per_s": bw / nbytes,
                      "frac_of_roofline": row["tokens_per_s"] * nbytes / bw}
            data["results"].append(result)
            log(f"  {weights} s={s:.2f} ({measured:.3f}) {mode:15s} {row['tokens_per_s']:7.1f} tok/s "
                f"roofline {bw / nbytes:7.1f} ({result['frac_of_roofline']:.0%})  TTFT {row['ttft_s'] * 1e3:.1f} ms "
                f"(prefill {', '.join(row['prefill_quant_kernel_calls']) or '?'})")
    del engine
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def finish_quantized(data: dict[str, Any]) -> None:
    """Ratios of the quantized rows (against this format's fastest dense row, our bf16 dense and torchao's HF
    static-cache rate of the format) and the quantized targets, into `data`."""
    bf16 = (data.get("dense_best") or {}).get("tokens_per_s")
    for fmt in QUANT_FORMATS:
        rows = [r for r in data["results"] if r.get("weights") == fmt]
        if not rows:
            continue
        dense = max((r["tokens_per_s"] for r in rows if r["sparsity"] == 0), default=None)
        ao = (data["baselines"].get(f"torchao_{fmt}_hf_static") or {}).get("tokens_per_s")
        for r in rows:
            r["speedup_vs_dense"] = r["tokens_per_s"] / dense if dense else None
            r["speedup_vs_bf16_dense"] = r["tokens_per_s"] / bf16 if bf16 and bf16 == bf16 else None
            r["speedup_vs_torchao"] = r["tokens_per_s"] / ao if ao else None
            r["speedup_vs_hf_static"] = None
    data.setdefault("targets", {}).update(quant_targets(data))


def quant_targets(data: dict[str, Any]) -> dict[str, Any]:
    """The issue's int4 / int8 targets, each {value, target, met} where this run has the numbers."""
    def best(fmt: str, s: float) -> dict[str, Any] | None:
        rows = [r for r in data["results"] if r.get("weights") == fmt and abs(r["sparsity"] - s) < 1e-9]
        return max(rows, key=lambda r: r["tokens_per_s"]) if rows else None

    out: dict[str, Any] = {}

    def add(name: str, value: float | None, note: str | None = None) -> None:
        if value is not None:
            out[name] = {"value": value, "target": QUANT_TARGETS[name], "met": value >= QUANT_TARGETS[name]}
            if note:
                out[name]["note"] = note

    bf16 = (data.get("dense_best") or {}).get("tokens_per_s")
    bf16 = bf16 if bf16 and bf16 == bf16 else None
    i4, i4s, i8, i8s = best("int4", 0.0), best("int4", 0.5), best("int8", 0.0), best("int8", 0.5)
    ao4 = (data["baselines"].get("torchao_int4_hf_static") or {}).get("tokens_per_s")
    if i4:
        add("int4_dense_frac_roofline", i4["frac_of_roofline"])
        add("int4_dense_vs_torchao_int4", i4["tokens_per_s"] / ao4 if ao4 else None)
        if "H100" in str(data.get("device")) and str(data.get("model", "")).endswith(("llama-3-8b", "llama-3.1-8b")):
            add("int4_dense_vs_gpt_fast_h100", i4["tokens_per_s"], "tok/s against gpt-fast's published 241 tok/s "
                                                                  "(int4, Llama-3.1-8B, H100)")
    if i4 and i4s:
        add("int4_sparse50_vs_int4_dense", i4s["tokens_per_s"] / i4["tokens_per_s"])
    if i8 and i8s:
        add("int8_sparse50_vs_int8_dense", i8s["tokens_per_s"] / i8["tokens_per_s"])
    if i4s and bf16:
        add("int4_sparse50_vs_bf16_dense", i4s["tokens_per_s"] / bf16)
    return out
