"""Quality of activation sparsity on quantized weights: PPL and the six-task average per weight format.

For every weight format (``bf16``: the model's own weights; ``int8`` per output channel; ``int4-rtn``
and ``int4-hqq``: group-wise int4, group 128, round to nearest or HQQ's optimiser, ``teal.quant``) the
model is loaded afresh, quantized, and calibrated *on the quantized model* (magnitude score, the
calibration split of ``--calib-data``, dense calibration as in the quality report), the ``fisher``
allocation is added (the best allocation of the quality report), and every method (``teal-uniform``,
``teal-fisher``) and nominal sparsity is measured with the harness of ``run_quality.py``
(``prefill="sparse"``, PPL on the evaluation splits of olmo-wiki and lambada, the six tasks).

Writes ``<out>/<model>-quant.json`` (rewritten after every setting; ``--resume`` skips the settings
already in it and adds the tasks to its rows measured without them, PPL kept, where ``--task-sparsities``
now asks for them) and ``<out>/<model>-quant.md`` (the tables: direct rows, PPL at equal measured
sparsity, and where quantization and sparsity errors compound). ``--replot`` rewrites the .md from the
JSON.

    python benchmarks/quality/run_quant_quality.py --model smollm2-135m --out benchmarks/quality \
        --artifacts out/quant-quality/artifacts --resume --threads 2
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import teal
from teal.artifact import atomic_write_json
from teal.data import token_windows
from teal.eval.tasks import DEFAULT_TASKS
from teal.quant import QuantLinear, quantize_weights

_spec = importlib.util.spec_from_file_location("run_quality", Path(__file__).resolve().parent / "run_quality.py")
rq = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rq)  # the report's harness: evaluate, bracket, interpolate, slug, versions

# label -> (teal.quant format, int4 method)
FORMATS = {"bf16": ("bf16", "rtn"), "int8": ("int8", "rtn"), "int4-rtn": ("int4", "rtn"),
           "int4-hqq": ("int4", "hqq")}
METHODS = ("teal-uniform", "teal-fisher")
TARGETS = (0.25, 0.4, 0.5)
# widest bracket (in measured sparsity) interpolated across: the grid's widest step, dense to 0.25 (up to 0.26
# measured on lambada); a wider one (e.g. dense to 0.49 where only 0.5 was measured) would print a guess as if
# it were a measurement
MAX_BRACKET = 0.3
# budgets that may differ between the runs of one JSON (--resume): which rows get the tasks
RESUMABLE_BUDGETS = ("task_sparsities", "task_formats", "ppl_only_methods", "calibration_levels")
# each measured sparsity of a row and the text it was measured on
MEASURED = {"measured_sparsity": "olmo-wiki", "measured_sparsity_lambada": "lambada",
            "measured_sparsity_tasks": "the tasks"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--formats", default=",".join(FORMATS), help=f"comma list of {', '.join(FORMATS)}")
    p.add_argument("--group-size", type=int, default=128, help="int4 group size")
    p.add_argument("--methods", default=",".join(METHODS), help="teal-uniform and/or teal-fisher")
    p.add_argument("--sparsities", default="0.25,0.4,0.5,0.55",
                   help="nominal levels (0.55 brackets the 50 %% measured comparison from above)")
    p.add_argument("--task-sparsities", default="0.25,0.4,0.5",
                   help="levels at which the tasks run (besides dense); 'none' skips them")
    p.add_argument("--task-formats", default=None, help="formats whose rows run the tasks (default: all)")
    p.add_argument("--ppl-only-methods", default="",
                   help="methods measured without tasks (a reduced grid)")
    p.add_argument("--limit", type=int, default=50, help="items per task")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--tokens", type=int, default=4096, help="evaluation tokens per PPL source")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--calib-data", default="olmo-wiki")
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--calib-seq-len", type=int, default=2048)
    p.add_argument("--calibration", default="dense", choices=("dense", "sequential"),
                   help="teal.calibrate's calibration: dense (the quality report's: it predates sequential "
                        "calibration) or sequential (tables at the evaluated levels)")
    p.add_argument("--fisher-tokens", type=int, default=2048)
    p.add_argument("--alloc-seq-len", type=int, default=512)
    p.add_argument("--step", type=float, default=0.05)
    p.add_argument("--artifacts", type=Path, default=None, help="keep/reuse the thresholds artifacts here")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--replot", action="store_true", help="only rewrite the .md from the JSON")
    p.add_argument("--merge", type=Path, nargs="+", default=None,
                   help="combine the JSONs of runs split by format (each run's --out) into --out's JSON and .md")
    return p.parse_args(argv)


def floats(text: str) -> list[float]:
    return [] if text == "none" else [float(x) for x in text.split(",") if x.strip()]


def materialize(model: torch.nn.Module) -> int:
    """Swap each ``QuantLinear`` for an ``nn.Linear`` holding its dequantized weight: the same forward
    (``QuantLinear.forward`` multiplies by exactly this matrix), without dequantizing at every call."""
    from teal.arch import get_adapter

    adapter = get_adapter(model)
    n = 0
    for key, module in adapter.projections().items():
        if isinstance(module, QuantLinear):
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                     device=module.codes.device, dtype=module.scales.dtype)
            with torch.no_grad():
                linear.weight.copy_(module.weight)
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            adapter.replace(key, linear)
            n += 1
    return n


def weight_error(model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> float:
    """Relative Frobenius error of the projections' weights against ``reference`` (all projections)."""
    from teal.arch import get_adapter

    num = den = 0.0
    for key, module in get_adapter(model).projections().items():
        w, r = module.weight.detach().double(), reference[key].double()
        num += float((w - r).pow(2).sum())
        den += float(r.pow(2).sum())
    return math.sqrt(num / den)


# an allocation table's wall-time field: not part of the thresholds (a table recomputed on the same text
# differs only there), so not in its fingerprint
VOLATILE = ("seconds",)
# fingerprints recorded before that hashed the table's "seconds" too (0.01 s resolution): a recomputed table
# is the recorded one where some time below this bound gives the recorded hash
LEGACY_MAX_SECONDS = 3600


def table_hash(table: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(table, sort_keys=True, default=str).encode()).hexdigest()[:16]


def artifact_fingerprint(th: teal.Thresholds) -> dict[str, str]:
    """sha256 (16 hex digits) of the artifact's histograms and of each allocation table (its wall time left
    out): a resumed run must sparsify with the thresholds that measured the rows it adds tasks to."""
    h = hashlib.sha256()
    for key in sorted(th.histograms):
        h.update(key.encode())
        h.update(th.histograms[key].double().contiguous().numpy().tobytes())
    out = {"histograms": h.hexdigest()[:16]}
    for name, table in th.allocations.items():
        out[name] = table_hash({k: v for k, v in table.items() if k not in VOLATILE})
    return out


def matches_with_some_time(table: dict[str, Any], recorded: str) -> bool:
    """Whether ``table`` with its ``seconds`` set to some time in [0, LEGACY_MAX_SECONDS) s (0.01 s steps)
    hashes to ``recorded``: the fingerprint form that hashed the allocation's wall time too."""
    sentinel = "__seconds__"
    text = json.dumps({**table, "seconds": sentinel}, sort_keys=True, default=str)
    head, _, tail = text.partition(json.dumps(sentinel))
    prefix = hashlib.sha256(head.encode())
    tail_bytes = tail.encode()
    for i in range(LEGACY_MAX_SECONDS * 100):
        h = prefix.copy()
        h.update(json.dumps(round(i / 100, 2)).encode())
        h.update(tail_bytes)
        if h.hexdigest()[:16] == recorded:
            return True
    return False


def artifact_changes(recorded: dict[str, str], th: teal.Thresholds) -> tuple[dict[str, str], list[str]]:
    """(the fingerprint to record, the names of the recorded fingerprints ``th`` does not match). A recorded
    fingerprint that ``th``'s table matches with some wall time is kept as recorded, so that the parts of one
    report agree on it."""
    now = artifact_fingerprint(th)
    changed = [k for k, v in recorded.items() if now.get(k, v) != v
               and not (k in th.allocations and matches_with_some_time(th.allocations[k], v))]
    return {**now, **recorded}, changed


def check_row(row: dict[str, Any]) -> None:
    """Raise ValueError where a row claims a setting its measurements do not show: tasks without the
    sparsity measured while they ran, a dense row that zeroed inputs, or a sparse row whose PPL or tasks
    ran (nearly) dense, i.e. measured below half the nominal level it claims."""
    name = f"{row['weights']} {row['method']} at nominal {row['sparsity']:.2f}"
    if row.get("tasks_avg") is not None and row.get("measured_sparsity_tasks") is None:
        raise ValueError(f"{name}: has a tasks average but no measured_sparsity_tasks")
    for key, text in MEASURED.items():
        m = row.get(key)
        if m is None:
            if key != "measured_sparsity_tasks":
                raise ValueError(f"{name}: no {key}")
            continue
        if row["method"] == "dense" or row["sparsity"] == 0:
            if m > 1e-6:
                raise ValueError(f"{name}: the dense row zeroed {m:.3f} of the inputs on {text}")
        elif not m >= 0.5 * row["sparsity"]:
            raise ValueError(f"{name}: measured {m:.3f} on {text}, below half the level it claims; "
                             "the rows were not measured sparse")


def load_quantized(args, label: str, log) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    from teal.arch import get_adapter

    fmt, method = FORMATS[label]
    model, tok = teal.load_model(args.model, dtype=torch.float32)
    model.eval()
    info: dict[str, Any] = {"format": fmt, "method": method if fmt == "int4" else ("rtn" if fmt == "int8" else None),
                            "group_size": args.group_size if fmt == "int4" else None}
    if fmt != "bf16":
        ref = {k: m.weight.detach().clone() for k, m in get_adapter(model).projections().items()}
        t0 = time.perf_counter()
        quantize_weights(model, fmt, args.group_size, method)
        info["quantize_seconds"] = round(time.perf_counter() - t0, 1)
        info["weight_rel_err"] = weight_error(model, ref)
        materialize(model)
        info["weight_rel_err_after_materialize"] = weight_error(model, ref)
        log(f"{label}: quantized in {info['quantize_seconds']} s, weight rel. error {info['weight_rel_err']:.4f}")
    return model, tok, info


def build_artifact(model, tok, args, label: str, allocations: list[str], levels: list[float], log) -> teal.Thresholds:
    path = None if args.artifacts is None else args.artifacts / f"{rq.slug(args.model)}-{label}"
    th = rq.reusable_artifact(path, model, log)
    if th is None:
        t0 = time.perf_counter()
        th = teal.calibrate(model, tok, data=args.calib_data, tokens=args.calib_tokens, seq_len=args.calib_seq_len,
                            score="magnitude", progress=False, calibration=args.calibration,
                            **({"levels": levels} if args.calibration == "sequential" else {}))
        log(f"{label}: calibrated in {time.perf_counter() - t0:.0f} s")
        if path is not None:
            th.save(path)
    for alloc in allocations:
        if alloc == "uniform" or alloc in th.allocations:
            continue
        windows = token_windows(tok, args.calib_data, args.fisher_tokens, args.alloc_seq_len, split="calibration")
        t0 = time.perf_counter()
        teal.allocate(model, th, alloc, windows=windows, step=args.step, progress=False)
        log(f"{label}: {alloc} allocation in {time.perf_counter() - t0:.0f} s")
        if path is not None:
            th.save(path)
    return th


# the numbers that make a row's PPL measurement; a setting in several parts must carry the same ones
PPL_KEYS = ("ppl", "ppl_lambada", "measured_sparsity", "measured_sparsity_lambada")
TASK_KEYS = ("tasks", "tasks_avg", "measured_sparsity_tasks")


def budget_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The budgets (and the task list) in which two runs' JSONs differ, besides those a resumed run may change."""
    ba, bb = a.get("budgets", {}), b.get("budgets", {})
    differ = sorted(k for k in {**ba, **bb} if k not in RESUMABLE_BUDGETS and ba.get(k) != bb.get(k))
    return differ + (["tasks"] if a.get("tasks") != b.get("tasks") else [])


def merge_results(parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every setting of the parts once, sorted. Parts may be copies of one JSON, each resumed with the tasks of
    other formats or levels: a setting in several parts must have the same PPL measurement (else ValueError),
    and keeps the tasks of the part that measured them (ValueError where two parts measured them differently)."""
    merged: dict[tuple, dict[str, Any]] = {}
    for part in parts:
        for r in part["results"]:
            key = (r["weights"], r["method"], r["sparsity"])
            old = merged.setdefault(key, r)
            if old is r:
                continue
            name = f"{r['weights']} {r['method']} at nominal {r['sparsity']:.2f}"
            differ = [k for k in PPL_KEYS if old.get(k) != r.get(k)]
            if differ:
                raise ValueError(f"{name} was measured differently in two parts ({', '.join(differ)}); merge runs "
                                 "split by format, or copies of one JSON resumed apart")
            if r.get("tasks_avg") is None:
                continue
            if old.get("tasks_avg") is not None and any(old.get(k) != r.get(k) for k in TASK_KEYS):
                raise ValueError(f"{name}: two parts measured its tasks differently; keep one of the runs")
            merged[key] = r
    return sorted(merged.values(), key=lambda r: (list(FORMATS).index(r["weights"]), r["sparsity"],
                                                  ["dense", *METHODS].index(r["method"])))


def merge_format_info(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Each format's info (the last part's); ValueError where two parts recorded different thresholds
    artifacts for one format (their rows were sparsified with different thresholds)."""
    out: dict[str, Any] = {}
    for part in parts:
        for label, info in part["format_info"].items():
            a, b = out.get(label, {}).get("artifact", {}), info.get("artifact", {})
            differ = [k for k in a.keys() & b.keys() if a[k] != b[k]]
            if differ:
                raise ValueError(f"the {label} rows of two parts used different thresholds artifacts "
                                 f"({', '.join(differ)}); merge runs that share --artifacts")
            out[label] = {**info, "artifact": {**a, **b}} if (a or b) else info
    return out


# ------------------------------------------------------------------ tables
def points(results: list[dict], label: str, method: str, key: str) -> list[dict]:
    """Direct settings of (format, method) with the format's dense row at measured sparsity 0."""
    axis = "measured_sparsity_lambada" if key == "ppl_lambada" else "measured_sparsity"
    out = []
    for r in results:
        if r["weights"] != label or r["method"] not in (method, "dense"):
            continue
        out.append({"nominal": r["sparsity"], "measured": 0.0 if r["method"] == "dense" else r[axis],
                    key: r.get(key)})
    return out


def at_measured(results: list[dict], label: str, method: str, key: str, level: float) -> float | None:
    """``key`` of (format, method) at measured sparsity ``level`` (run_quality's interpolation, no
    extrapolation; None across a bracket wider than ``MAX_BRACKET``)."""
    b = rq.bracket(points(results, label, method, key), level)
    if b is None or b[1]["measured"] - b[0]["measured"] > MAX_BRACKET:
        return None
    return rq.interpolate(*b, level, key)


def compounding(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Per quantized format, method and nominal level s measured in both: the PPL factor of quantization on
    the sparse model (PPL(format, s) / PPL(bf16, s)) beside its factor on the dense model (PPL(format, 0) /
    PPL(bf16, 0)), with both rows' measured sparsities (each format is calibrated on its own model, so they
    measure alike: the pair is at equal measured sparsity where the two agree). `interaction` = the ratio of
    the two factors, i.e. the interaction on the log-PPL scale: 1 means the two errors add in log-PPL
    (independent), above 1 they compound (quantization hurts more on the sparse model), below 1 they overlap."""
    res = data["results"]
    labels = [label for label in data["formats"] if label != "bf16"]
    out = []
    for key, axis in (("ppl", "measured_sparsity"), ("ppl_lambada", "measured_sparsity_lambada")):
        def row(label: str, method: str, s: float) -> dict[str, Any] | None:
            return next((r for r in res if r["weights"] == label and r["method"] == method
                         and abs(r["sparsity"] - s) < 1e-9), None)

        base0 = row("bf16", "dense", 0.0)
        for label in labels:
            q0 = row(label, "dense", 0.0)
            if base0 is None or q0 is None:
                continue
            for method in data["methods"]:
                for s in sorted({r["sparsity"] for r in res if r["method"] == method}):
                    b, q = row("bf16", method, s), row(label, method, s)
                    if b is None or q is None:
                        continue
                    dense_factor, sparse_factor = q0[key] / base0[key], q[key] / b[key]
                    out.append({"source": "olmo-wiki" if key == "ppl" else "lambada", "weights": label,
                                "method": method, "sparsity": s, "measured_bf16": b[axis], "measured": q[axis],
                                "quant_factor_dense": dense_factor, "quant_factor_sparse": sparse_factor,
                                "interaction": sparse_factor / dense_factor, "ppl_bf16_sparse": b[key],
                                "ppl_quant_sparse": q[key]})
    return out


def compounding_at_measured(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Per quantized format, method and target measured sparsity (``TARGETS``): the interaction of the two
    errors at *equal measured* sparsity. ``ppl`` / ``ppl_lambada``: quantization's PPL factor there (the
    format's PPL over bf16's, both interpolated as ``at_measured``, each source along its own measured
    sparsity) over its factor on the dense model; 1 = independent in log-PPL, above 1 they compound.
    ``tasks_diff``: the format's tasks avg minus bf16's there, beside ``tasks_diff_dense``. None where either
    side has no bracket."""
    res = data["results"]
    dense = {label: next((r for r in res if r["weights"] == label and r["method"] == "dense"), None)
             for label in data["formats"]}
    if dense.get("bf16") is None:
        return []
    out = []
    for label in data["formats"]:
        if label == "bf16" or dense[label] is None:
            continue
        t0q, t0b = dense[label].get("tasks_avg"), dense["bf16"].get("tasks_avg")
        for method in data["methods"]:
            for s in TARGETS:
                row: dict[str, Any] = {"weights": label, "method": method, "measured": s}
                for key in ("ppl", "ppl_lambada"):
                    q, b = at_measured(res, label, method, key, s), at_measured(res, "bf16", method, key, s)
                    row[key] = (None if q is None or b is None
                                else (q / b) / (dense[label][key] / dense["bf16"][key]))
                tq, tb = at_measured(res, label, method, "tasks_avg", s), at_measured(res, "bf16", method, "tasks_avg", s)
                row["tasks_diff"] = None if tq is None or tb is None else tq - tb
                row["tasks_diff_dense"] = None if t0q is None or t0b is None else t0q - t0b
                out.append(row)
    return out


def commands(data: dict[str, Any]) -> list[str]:
    """Markdown lines listing the earlier commands whose rows the JSON holds (its ``history``, and for a merged
    JSON each part's), oldest first; none for a single run."""
    runs = []
    for run in data.get("runs", []):
        runs += [h["command"] for h in run.get("history") or []] + [run["command"]]
    runs += [h["command"] for h in data.get("history") or []]
    # parts copied from one JSON share their earlier runs: each command once
    lines = [f"- `{c}`" for c in dict.fromkeys(runs)]
    return ["Earlier runs whose rows it keeps, oldest first (the JSON's `runs` and `history`):", "", *lines,
            ""] if lines else []


def markdown(data: dict[str, Any]) -> str:
    res = data["results"]
    tasks = data["tasks"]
    lines = [f"### {data['model']}: quantized weights with activation sparsity", "",
             f"Command: `{data['command']}`", "", *commands(data),
             "Direct measurements (`nominal`: the level set; `measured`: zeros produced on the olmo-wiki "
             "evaluation text; fp32 arithmetic on the CPU, `prefill=\"sparse\"`; thresholds calibrated on each "
             "format's own quantized model). `weight err`: relative Frobenius error of the projections' weights.",
             "",
             "| weights | weight err | method | nominal | measured | PPL wiki | PPL lambada | measured tasks | "
             "tasks avg | " + " | ".join(tasks) + " |",
             "|---|---|---|---|---|---|---|---|---|" + "---|" * len(tasks)]
    for r in res:
        t = r.get("tasks") or {}
        err = data["format_info"].get(r["weights"], {}).get("weight_rel_err")
        lines.append("| " + " | ".join([
            r["weights"], "-" if err is None else f"{err:.4f}", r["method"], f"{r['sparsity']:.2f}",
            f"{r['measured_sparsity']:.3f}", f"{r['ppl']:.3f}", f"{r['ppl_lambada']:.2f}",
            "" if r.get("measured_sparsity_tasks") is None else f"{r['measured_sparsity_tasks']:.3f}",
            "" if r.get("tasks_avg") is None else f"{r['tasks_avg']:.3f}",
            *("" if t.get(x) is None else f"{t[x]:.2f}" for x in tasks)]) + " |")
    lines += ["", "PPL wiki / PPL lambada / tasks avg at equal measured sparsity (each format and method "
              "interpolated between its two settings bracketing the target, log-PPL and tasks avg linear in "
              "the sparsity measured on olmo-wiki, lambada PPL along lambada's, as `run_quality.py`; `-`: no "
              f"bracket at most {MAX_BRACKET} wide with that number in both settings, no extrapolation):", "",
              "| weights | method | dense | " + " | ".join(f"{x:.2f}" for x in TARGETS) + " |",
              "|---|---|---|" + "---|" * len(TARGETS)]
    for label in data["formats"]:
        dense = next((r for r in res if r["weights"] == label and r["method"] == "dense"), None)
        if dense is None:
            continue
        for method in data["methods"]:
            cells = [f"{dense['ppl']:.2f} / {dense['ppl_lambada']:.2f} / "
                     + ("" if dense.get("tasks_avg") is None else f"{dense['tasks_avg']:.3f}")]
            for s in TARGETS:
                p, lam = at_measured(res, label, method, "ppl", s), at_measured(res, label, method, "ppl_lambada", s)
                t = at_measured(res, label, method, "tasks_avg", s)
                tk = "-" if t is None else f"{t:.3f}"
                cells.append(("-" if p is None else f"{p:.2f}") + " / " + ("-" if lam is None else f"{lam:.2f}")
                             + " / " + tk)
            lines.append(f"| {label} | {method} | " + " | ".join(cells) + " |")
    settings = sorted({(r["method"], r["sparsity"]) for r in res if r.get("tasks_avg") is not None},
                      key=lambda x: (x[1], x[0] != "dense", x[0]))
    if settings:
        lines += ["", "Tasks avg by weight format at the same setting (each format calibrated on its own model, so a "
                  "setting measures alike in every format; in brackets the sparsity measured on olmo-wiki / on the "
                  "tasks' own text; empty: not measured):", "",
                  "| method | nominal | " + " | ".join(data["formats"]) + " |",
                  "|---|---|" + "---|" * len(data["formats"])]
        for m, s in settings:
            cells = []
            for label in data["formats"]:
                r = next((r for r in res if (r["weights"], r["method"]) == (label, m)
                          and abs(r["sparsity"] - s) < 1e-9), None)
                cells.append("" if r is None or r.get("tasks_avg") is None else
                             f"{r['tasks_avg']:.3f} ({r['measured_sparsity']:.3f} / {r['measured_sparsity_tasks']:.3f})")
            lines.append(f"| {m} | {s:.2f} | " + " | ".join(cells) + " |")
    at = [c for c in compounding_at_measured(data) if any(c[k] is not None for k in ("ppl", "ppl_lambada"))]
    if at:
        def cell(v: float | None, fmt: str) -> str:
            return "-" if v is None else format(v, fmt)

        lines += ["", "Where the errors compound, at equal measured sparsity: quantization's PPL factor at a measured "
                  "sparsity (the format's PPL over bf16's, both interpolated as in the table above) over its factor "
                  "on the dense model; 1 = the two errors add in log-PPL (independent), above 1 they compound, "
                  "below 1 they overlap. `tasks Δ`: the format's tasks avg minus bf16's at that measured sparsity "
                  "(dense: in brackets). `-`: no bracket.", "",
                  "| weights | method | measured | interaction wiki | interaction lambada | tasks Δ (dense) |",
                  "|---|---|---|---|---|---|"]
        for c in at:
            lines.append(f"| {c['weights']} | {c['method']} | {c['measured']:.2f} | {cell(c['ppl'], '.3f')} | "
                         f"{cell(c['ppl_lambada'], '.3f')} | {cell(c['tasks_diff'], '+.3f')} "
                         f"({cell(c['tasks_diff_dense'], '+.3f')}) |")
    comp = compounding(data)
    if comp:
        lines += ["", "Where the errors compound: the PPL factor of quantization on the sparse model "
                  "(PPL(format, s) / PPL(bf16, s), the same method and nominal level; `measured`: bf16's / the "
                  "format's measured sparsity on that source) against its factor on the dense model "
                  "(PPL(format, 0) / PPL(bf16, 0)). `interaction` = their ratio: 1 = the two errors add in "
                  "log-PPL (independent); above 1 they compound; below 1 they overlap.", "",
                  "| source | weights | method | nominal | measured | factor dense | factor sparse | interaction |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in comp:
            lines.append(f"| {c['source']} | {c['weights']} | {c['method']} | {c['sparsity']:.2f} | "
                         f"{c['measured_bf16']:.3f} / {c['measured']:.3f} | {c['quant_factor_dense']:.3f} | "
                         f"{c['quant_factor_sparse']:.3f} | {c['interaction']:.3f} |")
    return "\n".join(lines) + "\n"


def write_markdown(data: dict[str, Any], out: Path) -> Path:
    path = out / f"{rq.slug(data['model'])}-quant.md"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(markdown(data))
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    labels = [x for x in args.formats.split(",") if x]
    methods = [m for m in args.methods.split(",") if m]
    bad = [x for x in labels if x not in FORMATS] + [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"unknown format/method {bad}: formats {', '.join(FORMATS)}; methods {', '.join(METHODS)}")
    sparsities, task_levels = floats(args.sparsities), floats(args.task_sparsities)
    task_formats = labels if args.task_formats is None else args.task_formats.split(",")
    ppl_only = set(x for x in args.ppl_only_methods.split(",") if x)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"{rq.slug(args.model)}-quant.json"
    if args.merge:
        parts = [json.loads((d / f"{rq.slug(args.model)}-quant.json").read_text()) for d in args.merge]
        data = {k: v for k, v in parts[0].items() if k not in ("history", "seconds_total")}
        data["command"] = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
        data["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        data["formats"] = [x for x in FORMATS if any(x in p["formats"] for p in parts)]
        data["methods"] = list(dict.fromkeys(m for p in parts for m in p["methods"]))
        try:
            for d, part in zip(args.merge[1:], parts[1:]):
                differ = budget_differences(parts[0], part)
                if differ:
                    raise ValueError(f"{d} was measured with other settings than {args.merge[0]} "
                                     f"({', '.join(differ)})")
            data["results"] = merge_results(parts)
            data["format_info"] = merge_format_info(parts)
        except ValueError as e:
            print(f"--merge: {e}", file=sys.stderr)
            return 2
        # the runs the parts were themselves merged from (copies of a merged JSON resumed apart), then the parts;
        # each once, oldest first
        runs = [*(r for p in parts for r in p.get("runs", [])),
                *({k: p.get(k) for k in ("formats", "command", "date", "seconds_total", "history")} for p in parts)]
        data["runs"] = list({(r["command"], r.get("date")): r for r in runs}.values())
        for r in data["results"]:
            check_row(r)
        data["compounding"] = compounding(data)
        data["compounding_at_measured"] = compounding_at_measured(data)
        atomic_write_json(json_path, data)
        print(f"wrote {json_path} and {write_markdown(data, args.out)}")
        return 0
    if args.replot:
        data = json.loads(json_path.read_text())
        for r in data["results"]:
            check_row(r)
        print(f"wrote {write_markdown(data, args.out)}")
        return 0
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.0f} s] {msg}", flush=True)

    data: dict[str, Any] = {
        "model": args.model, "formats": labels, "methods": methods, "group_size": args.group_size,
        "data": {"calibration": f"{args.calib_data} (calibration split)", "ppl": "olmo-wiki (evaluation split)",
                 "ppl_lambada": "lambada (evaluation split)"},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": rq.versions(),
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "device": "cpu", "threads": torch.get_num_threads(), "dtype": "float32", "prefill": "sparse",
        "budgets": {"calibration_tokens": args.calib_tokens, "calibration_seq_len": args.calib_seq_len,
                    "calibration": args.calibration,
                    "calibration_levels": sparsities if args.calibration == "sequential" else None,
                    "fisher_tokens": args.fisher_tokens, "allocation_seq_len": args.alloc_seq_len,
                    "allocation_step": args.step, "eval_tokens_per_source": args.tokens, "eval_seq_len": args.seq_len,
                    "task_limit": args.limit, "task_seed": args.seed, "task_sparsities": task_levels,
                    "task_formats": task_formats, "ppl_only_methods": sorted(ppl_only)},
        "tasks": args.tasks.split(","), "format_info": {}, "results": [],
    }
    if args.resume and json_path.is_file():
        old = json.loads(json_path.read_text())

        differ = budget_differences(old, data)
        if differ:
            print(f"--resume: {json_path} was measured with other settings ({', '.join(differ)}); "
                  "give the same settings or another --out", file=sys.stderr)
            return 2
        data["results"] = old["results"]
        data["format_info"] = old.get("format_info", {})
        data["formats"] = [x for x in FORMATS if x in labels or x in old["formats"]]
        data["methods"] = [m for m in METHODS if m in methods or m in old["methods"]]
        data["history"] = [*old.get("history", []), {k: old.get(k) for k in ("date", "command", "seconds_total")}]
        if "runs" in old:  # a merged JSON: the commands of the runs it was merged from
            data["runs"] = old["runs"]
        log(f"resuming: {len(data['results'])} rows in {json_path}")
    done = {(r["weights"], r["method"], r["sparsity"]): r for r in data["results"]}

    def save() -> None:
        for r in data["results"]:
            check_row(r)
        data["compounding"] = compounding(data)
        data["compounding_at_measured"] = compounding_at_measured(data)
        data["seconds_total"] = round(time.perf_counter() - t_start, 1)
        atomic_write_json(json_path, data)

    def with_tasks(label: str, m: str, s: float) -> bool:
        """Whether the setting's row carries the tasks (dense: wherever any level does)."""
        if not task_levels or label not in task_formats:
            return False
        return m == "dense" or (s in task_levels and m not in ppl_only)

    def lacks_tasks(label: str, m: str, s: float) -> bool:
        row = done.get((label, m, s))
        return row is not None and row.get("tasks_avg") is None and with_tasks(label, m, s)

    for label in labels:
        settings = [(m, s) for s in sparsities for m in methods]
        todo = [(m, s) for m, s in settings if (label, m, s) not in done or lacks_tasks(label, m, s)]
        if (label, "dense", 0.0) in done and not lacks_tasks(label, "dense", 0.0) and not todo:
            continue
        model, tok, info = load_quantized(args, label, log)
        recorded = data["format_info"].get(label, {}).get("artifact", {})
        if recorded:
            info["artifact"] = recorded
        data["format_info"][label] = info
        windows = {src: token_windows(tok, src, args.tokens, args.seq_len, split="evaluation")
                   for src in rq.EVAL_SOURCES.values()}
        if (label, "dense", 0.0) not in done:
            row = {"weights": label, "method": "dense", "sparsity": 0.0,
                   **rq.evaluate(model, tok, windows, args, with_tasks(label, "dense", 0.0))}
            data["results"].append(row)
            save()
            log(f"{label} dense: ppl {row['ppl']:.3f} lambada {row['ppl_lambada']:.2f} tasks {row.get('tasks_avg')}")
        elif lacks_tasks(label, "dense", 0.0):
            row = done[(label, "dense", 0.0)]
            row.update(rq.evaluate_tasks(model, tok, args))
            save()
            log(f"{label} dense: tasks {row['tasks_avg']:.3f} added ({row['tasks_seconds']:.0f} s)")
        if todo:
            th = build_artifact(model, tok, args, label, [m.partition("-")[2] for m in methods], sparsities, log)
            info["artifact"], changed = artifact_changes(recorded, th)
            if changed:
                print(f"--resume: the {label} thresholds artifact differs from the one that measured the rows in "
                      f"{json_path} ({', '.join(changed)}); give the same --artifacts or another --out",
                      file=sys.stderr)
                return 2
            for m, s in todo:
                alloc = m.partition("-")[2]
                with rq.sparsified(model, th, s, method=alloc):
                    if (label, m, s) in done:  # measured without the tasks: add them, the PPL is kept
                        row = done[(label, m, s)]
                        row.update(rq.evaluate_tasks(model, tok, args))
                    else:
                        row = {"weights": label, "method": m, "sparsity": s,
                               **rq.evaluate(model, tok, windows, args, with_tasks(label, m, s))}
                        data["results"].append(row)
                try:
                    check_row(row)
                except ValueError as e:
                    print(f"not recorded: {e}", file=sys.stderr)
                    return 1
                done[(label, m, s)] = row
                save()
                log(f"{label} {m} @ {s:.2f}: measured {row['measured_sparsity']:.3f} ppl {row['ppl']:.3f} "
                    f"lambada {row['ppl_lambada']:.2f} tasks {row.get('tasks_avg')} "
                    f"(tasks measured {row.get('measured_sparsity_tasks')}; {row.get('seconds', 0):.0f} s PPL, "
                    f"{row.get('tasks_seconds', 0):.0f} s tasks)")
        del model
    order = {x: i for i, x in enumerate(data["formats"])}
    morder = {m: i for i, m in enumerate(["dense", *data["methods"]])}
    data["results"].sort(key=lambda r: (order.get(r["weights"], 99), r["sparsity"], morder.get(r["method"], 99)))
    save()
    print(markdown(data))
    log(f"wrote {json_path} and {write_markdown(data, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
