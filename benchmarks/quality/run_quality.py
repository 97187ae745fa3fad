"""Quality of TEAL allocations on one model: perplexity and downstream tasks vs measured sparsity.

Calibrates a magnitude (TEAL) and a weight-aware artifact on the calibration split of
``--calib-data`` (the committed report uses ``olmo-wiki``; the default is ``sotu``), adds the
``greedy`` and ``fisher`` allocations (and ``cross-layer`` when asked) to both, then for every
method and nominal sparsity sparsifies the model (``prefill="sparse"``: every position) and
measures perplexity on ``olmo-wiki`` and ``lambada`` (evaluation split) and, at
``--task-sparsities``, the average of six zero-shot tasks. Writes ``<out>/<model>.json``
(rewritten after every setting; ``--resume`` skips the settings already in it and adds the tasks
to rows measured without them, keeping their PPL), ``<out>/<model>.png``, ``<out>/<model>.md``
(the tables) and ``<out>/<model>-<source>.json`` for source olmo-wiki and lambada (the issue's
schema: direct rows plus rows interpolated at measured sparsity 0.25/0.4/0.5/0.65).
``--replot`` rewrites all but the full JSON's rows from the existing JSON.

    python benchmarks/quality/run_quality.py --model smollm2-135m --limit 50 --tokens 4096 \
        --calib-data olmo-wiki --out benchmarks/quality
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import teal
from teal.artifact import atomic_write_json
from teal.data import token_windows
from teal.eval.perplexity import method_label, perplexity
from teal.eval.tasks import DEFAULT_TASKS, run_tasks

SCORES = {"teal": "magnitude", "wa": "weight-aware"}
ALLOCATIONS = ("uniform", "greedy", "fisher", "cross-layer")
DEFAULT_METHODS = (
    "teal-uniform", "teal-greedy", "teal-fisher", "wa-uniform", "wa-greedy", "wa-fisher",
)
DEFAULT_SPARSITIES = (0.25, 0.4, 0.5, 0.65)
EVAL_SOURCES = {"ppl": "olmo-wiki", "ppl_lambada": "lambada"}
TARGET_LEVEL = 0.5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="alias, hub id, local dir or .gguf")
    p.add_argument("--limit", type=int, default=50, help="items per downstream task")
    p.add_argument("--tokens", type=int, default=4096, help="evaluation tokens per PPL source")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    p.add_argument("--seq-len", type=int, default=1024, help="evaluation window length")
    p.add_argument("--calib-data", default="sotu",
                   help="text source of calibration and allocation (its calibration split; default sotu)")
    p.add_argument("--calib-tokens", type=int, default=16384, help="calibration tokens for histograms")
    p.add_argument("--calib-seq-len", type=int, default=1024)
    p.add_argument("--alloc-tokens", type=int, default=1024,
                   help="--calib-data tokens for the greedy and cross-layer searches")
    p.add_argument("--fisher-tokens", type=int, default=2048,
                   help="--calib-data tokens for the fisher allocation's backward passes")
    p.add_argument("--alloc-seq-len", type=int, default=512)
    p.add_argument("--step", type=float, default=0.05, help="allocation table step")
    p.add_argument("--sparsities", default=",".join(map(str, DEFAULT_SPARSITIES)))
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    p.add_argument("--task-sparsities", default=None,
                   help="sparsities at which tasks run (default: all); 'none' skips tasks")
    p.add_argument("--task-methods", default=None,
                   help="methods for which tasks run (default: all)")
    p.add_argument("--seed", type=int, default=1234, help="task item sampling seed")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--artifacts", type=Path, default=None,
                   help="directory to keep/reuse the thresholds artifacts (default: not kept)")
    p.add_argument("--resume", action="store_true", help="skip settings already in the JSON")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--replot", action="store_true",
                   help="only redraw the PNG, tables and per-source schema JSONs from the existing JSON")
    return p.parse_args(argv)


def reusable_artifact(path: Path | None, model, log) -> teal.Thresholds | None:
    """The artifact saved at ``path`` for this model, or None (no path, nothing there, or not loadable: said)."""
    if path is None or not path.is_dir():
        return None
    try:
        th = teal.Thresholds.load(path, model=model)
    except teal.ArtifactError as e:
        log(f"not reusing {path}: {e}")
        return None
    log(f"reusing {path} (allocations: {', '.join(th.allocations) or 'none'})")
    return th


def slug(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model).name if os.sep in model else model)


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def versions() -> dict[str, str]:
    import transformers

    return {
        "teal": teal.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def build_artifact(model, tok, score: str, args, methods: list[str], log,
                   must_reuse: bool = False) -> teal.Thresholds:
    """Calibrate (or reuse) the ``score`` artifact with the allocations ``methods`` need.

    ``must_reuse``: existing rows of the JSON were measured with this artifact (resume adds tasks
    to them), so recalibrating or re-allocating would silently mix two artifacts: refuse instead."""
    path = None if args.artifacts is None else args.artifacts / f"{slug(args.model)}-{score}"
    th = reusable_artifact(path, model, log)
    if must_reuse and (th is None or any(m not in th.allocations for m in methods if m != "uniform")):
        raise SystemExit(
            f"--resume: the JSON has rows measured with the {score} artifact, but {path} could not be "
            "reused with all its allocations; refusing to recompute it (pass the run's --artifacts)")
    if th is None:
        t0 = time.perf_counter()
        th = teal.calibrate(model, tok, data=args.calib_data, tokens=args.calib_tokens,
                            seq_len=args.calib_seq_len, score=score, progress=False)
        log(f"calibrated {score} on {th.calibration['tokens']} tokens in "
            f"{time.perf_counter() - t0:.0f} s")
    needed = [m for m in ALLOCATIONS[1:] if m in methods]
    if "cross-layer" in needed and "greedy" not in needed:
        needed.insert(0, "greedy")  # cross-layer splits each layer's level as greedy does
    for method in needed:
        if method in th.allocations:
            continue
        n_tokens = args.fisher_tokens if method == "fisher" else args.alloc_tokens
        windows = token_windows(tok, args.calib_data, n_tokens, args.alloc_seq_len, split="calibration")
        t0 = time.perf_counter()
        kw = {"lazy": True} if method == "greedy" else {}
        teal.allocate(model, th, method, windows=windows, step=args.step, progress=False, **kw)
        log(f"{score} {method} allocation in {time.perf_counter() - t0:.0f} s")
        if path is not None:
            th.save(path)
    return th


@contextmanager
def sparsified(model, thresholds, sparsity: float, **kwargs: Any):
    """``teal.sparsify_`` (prefill "sparse": every position measured) for the body, dense again after it."""
    teal.sparsify_(model, thresholds, sparsity, prefill="sparse", **kwargs)
    try:
        yield model
    finally:
        teal.densify_(model)


def evaluate(model, tok, windows: dict[str, torch.Tensor], args, with_tasks: bool) -> dict[str, Any]:
    """PPL on every evaluation source (measured sparsity of each) and, optionally, tasks."""
    row: dict[str, Any] = {}
    t0 = time.perf_counter()
    for key, source in EVAL_SOURCES.items():
        res = perplexity(model, tok, source, windows=windows[source], progress=False)
        row[key] = res["ppl"]
        suffix = "" if key == "ppl" else "_" + key.split("_", 1)[1]
        row[f"measured_sparsity{suffix}"] = res["measured_sparsity"]
    if with_tasks:
        teal.sparsify.reset_counters(model)
        res = run_tasks(model, tok, args.tasks.split(","), limit=args.limit, seed=args.seed,
                        progress=False)
        row["tasks_avg"] = res["average"]
        row["tasks"] = {name: r["score"] for name, r in res["tasks"].items()}
        row["measured_sparsity_tasks"] = float(teal.measured_sparsity(model))
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def evaluate_tasks(model, tok, args) -> dict[str, Any]:
    """Only the downstream tasks (added by ``--resume`` to a row whose PPL is already measured)."""
    t0 = time.perf_counter()
    teal.sparsify.reset_counters(model)
    res = run_tasks(model, tok, args.tasks.split(","), limit=args.limit, seed=args.seed,
                    progress=False)
    return {"tasks_avg": res["average"],
            "tasks": {name: r["score"] for name, r in res["tasks"].items()},
            "measured_sparsity_tasks": float(teal.measured_sparsity(model)),
            "tasks_seconds": round(time.perf_counter() - t0, 1)}


def at_measured(results: list[dict], method: str, key: str, level: float) -> float | None:
    """``key`` of ``method`` at measured sparsity ``level``, interpolated between the two settings
    that bracket it (:func:`interpolate`; None where one of them lacks ``key`` or none brackets it).
    Lambada PPL is placed by the sparsity measured on lambada, the rest by the one measured on
    olmo-wiki."""
    axis = "measured_sparsity_lambada" if key == "ppl_lambada" else "measured_sparsity"
    points = [{"nominal": r["sparsity"], "measured": 0.0 if r["method"] == "dense" else r[axis],
               key: r.get(key)} for r in results if r["method"] in (method, "dense")]
    b = bracket(points, level)
    return None if b is None else interpolate(*b, level, key)


SCHEMA_METHODS = ("teal-uniform", "teal-greedy", "wa-uniform", "wa-greedy", "teal-fisher", "wa-fisher")
SCHEMA_TARGETS = (0.25, 0.4, 0.5, 0.65)
# data source of each schema file -> (PPL key, measured-sparsity key) in the full JSON's rows
SCHEMA_SOURCES = {"olmo-wiki": ("ppl", "measured_sparsity"),
                  "lambada": ("ppl_lambada", "measured_sparsity_lambada")}


def bracket(points: list[dict], level: float) -> tuple[dict, dict] | None:
    """The two settings (dicts with ``measured``) whose measured sparsity brackets ``level``."""
    pts = sorted(points, key=lambda p: p["measured"])
    for lo, hi in zip(pts, pts[1:]):
        if lo["measured"] <= level <= hi["measured"] and hi["measured"] > lo["measured"]:
            return lo, hi
    return None


def interpolate(lo: dict, hi: dict, level: float, key: str) -> float | None:
    """``key`` at measured sparsity ``level`` between the settings ``lo`` and ``hi`` (dicts with
    ``measured`` and ``key``): perplexities (keys starting with ``ppl``) log-linear, the rest
    linear in measured sparsity. The one interpolation of every comparison between methods in
    this report. None where either setting lacks ``key``."""
    y0, y1 = lo.get(key), hi.get(key)
    if y0 is None or y1 is None:
        return None
    t = (level - lo["measured"]) / (hi["measured"] - lo["measured"])
    if key.startswith("ppl"):
        return math.exp(math.log(y0) + t * (math.log(y1) - math.log(y0)))
    return y0 + t * (y1 - y0)


def schema_reports(data: dict[str, Any], source_name: str = "") -> dict[str, dict[str, Any]]:
    """The issue's per-source files ``{"model", "data", "results", "notes", "source"}``.

    Per method: the direct measurement at every nominal level (``sparsity`` = nominal,
    ``measured_sparsity`` measured on that source's evaluation text), then one row at each target
    measured sparsity, interpolated between the two direct settings that bracket it (the dense
    model counts as a setting at 0): log-PPL and ``tasks_avg`` linear in measured sparsity.
    A target outside the measured range is left out (no extrapolation); the notes list those."""
    results = data["results"]
    dense = next((r for r in results if r["method"] == "dense"), None)
    reports = {}
    for source, (ppl_key, ms_key) in SCHEMA_SOURCES.items():
        rows: list[dict[str, Any]] = []
        omitted: list[str] = []
        no_tasks: list[str] = []
        if dense is not None:
            rows.append({"method": "dense", "sparsity": 0.0, "measured_sparsity": 0.0,
                         "ppl": dense[ppl_key], "tasks_avg": dense.get("tasks_avg")})
        for m in SCHEMA_METHODS:
            direct = sorted((r for r in results if r["method"] == m and r.get(ppl_key) is not None),
                            key=lambda r: r["sparsity"])
            if not direct:
                continue
            points = [{"nominal": r["sparsity"], "measured": r[ms_key], "ppl": r[ppl_key],
                       "tasks_avg": r.get("tasks_avg")} for r in direct]
            rows += [{"method": m, "sparsity": p["nominal"], "measured_sparsity": p["measured"],
                      "ppl": p["ppl"], "tasks_avg": p["tasks_avg"]} for p in points]
            if dense is not None:
                points.append({"nominal": 0.0, "measured": 0.0, "ppl": dense[ppl_key],
                               "tasks_avg": dense.get("tasks_avg")})
            for level in SCHEMA_TARGETS:
                b = bracket(points, level)
                if b is None:
                    lo_m, hi_m = min(p["measured"] for p in points), max(p["measured"] for p in points)
                    omitted.append(f"{m} at {level:g} (measured range {lo_m:.3f}-{hi_m:.3f})")
                    continue
                lo, hi = b
                ppl = interpolate(lo, hi, level, "ppl")
                tasks = interpolate(lo, hi, level, "tasks_avg")
                if tasks is None:
                    no_tasks.append(f"{m} at {level:g}")
                rows.append({"method": m, "sparsity": level, "measured_sparsity": level,
                             "ppl": ppl, "tasks_avg": tasks,
                             "interpolated": {"from": [lo["nominal"], hi["nominal"]],
                                              "measured": [lo["measured"], hi["measured"]]}})
        budgets = data.get("budgets", {})
        notes = [
            f"PPL on the {source} evaluation split ({budgets.get('eval_tokens_per_source')} tokens, "
            f"windows of {budgets.get('eval_seq_len')}), {data.get('dtype')} on the CPU, prefill "
            f"'{data.get('prefill')}' (every position thresholded). measured_sparsity is the "
            f"parameter-weighted fraction of zeroed inputs actually produced on the {source} "
            "evaluation text.",
            "Rows without 'interpolated' are direct measurements: sparsity is the nominal level "
            "the method was set to. Rows with 'interpolated' are at a target measured sparsity "
            "(sparsity = measured_sparsity = target), obtained between the two direct settings "
            "whose measured sparsity on this source brackets it ('from': their nominal levels, "
            "'measured': their measured sparsities; the dense model is the setting at 0): "
            "log-PPL and tasks_avg linear in measured sparsity. No extrapolation.",
            f"tasks_avg: mean of {', '.join(data.get('tasks', []))} (zero-shot, "
            f"{budgets.get('task_limit')} items per task, seed {budgets.get('task_seed')}, acc_norm "
            "where reported, else acc); measured on the tasks' own text at the same setting, "
            "interpolated here along this source's measured sparsity; null where not measured "
            "(one standard error of the average is ~2.9 points).",
        ]
        notes.append("Targets left out (outside the measured range, no extrapolation): "
                     + ("; ".join(omitted) if omitted else "none") + ".")
        if no_tasks:
            notes.append("Interpolated rows with tasks_avg null (a bracketing setting has no "
                         "task run): " + "; ".join(no_tasks) + ".")
        reports[source] = {"model": data["model"], "data": source, "results": rows,
                           "notes": " ".join(notes), "source": source_name}
    return reports


def write_schema(data: dict[str, Any], out: Path) -> list[Path]:
    """``<out>/<model>-<source>.json`` for every source of :func:`schema_reports`."""
    name = slug(data["model"])
    paths = []
    for source, report in schema_reports(data, f"{name}.json").items():
        path = out / f"{name}-{source}.json"
        atomic_write_json(path, report)
        paths.append(path)
    return paths


def summarize(results: list[dict]) -> dict[str, Any]:
    """The issue's targets at 50 % measured sparsity, met or missed."""
    dense = next((r for r in results if r["method"] == "dense"), None)
    methods = sorted({r["method"] for r in results} - {"dense"})
    if dense is None or not methods:
        return {}
    at50 = {m: {k: at_measured(results, m, k, TARGET_LEVEL)
                for k in ("ppl", "ppl_lambada", "tasks_avg")} for m in methods}
    out: dict[str, Any] = {"level": TARGET_LEVEL, "dense_ppl": dense["ppl"], "at_level": at50}
    mine = [m for m in methods if m.split("-", 1)[1] in ALLOCATIONS[2:]
            and at50[m]["ppl"] is not None]
    if "teal-uniform" in at50 and "teal-greedy" in at50 and mine:
        best = min(mine, key=lambda m: at50[m]["ppl"])
        inc = {m: at50[m]["ppl"] - dense["ppl"] for m in (best, "teal-uniform", "teal-greedy")
               if at50[m]["ppl"] is not None}
        out["best"] = best
        out["ppl_increase"] = inc
        if len(inc) == 3:
            out["ppl_increase_ratio_vs_teal_uniform"] = inc[best] / inc["teal-uniform"]
            out["met_ppl_half_of_uniform"] = inc[best] <= 0.5 * inc["teal-uniform"]
            out["met_ppl_below_greedy"] = inc[best] < inc["teal-greedy"]
        # tasks at the interpolated measured level (where both brackets have tasks); never at the
        # nominal level, where the methods' measured sparsities differ
        tb, tg = at50[best]["tasks_avg"], at50["teal-greedy"]["tasks_avg"]
        if tb is not None and tg is not None:
            out["met_tasks_at_least_greedy"] = tb >= tg
    return out


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    results = data["results"]
    dense = next((r for r in results if r["method"] == "dense"), None)
    panels = [("ppl", "PPL olmo-wiki"), ("ppl_lambada", "PPL lambada"), ("tasks_avg", "tasks avg")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    methods = [m for m in dict.fromkeys(r["method"] for r in results) if m != "dense"]
    colors = dict(zip(ALLOCATIONS, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    for ax, (key, title) in zip(axes, panels):
        for m in methods:
            pts = sorted((r["measured_sparsity"], r[key]) for r in results
                         if r["method"] == m and r.get(key) is not None)
            if dense is not None and dense.get(key) is not None:
                pts.insert(0, (0.0, dense[key]))
            if pts:
                style = "-" if m.startswith("wa-") else "--"
                ax.plot(*zip(*pts), style, marker="o" if m.startswith("wa-") else "s", ms=4,
                        label=m, color=colors.get(m.split("-", 1)[1]))
        if key.startswith("ppl"):
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("measured effective sparsity (olmo-wiki)")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{data['model']}: prefill sparse, {data['dtype']}")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def markdown(data: dict[str, Any]) -> str:
    """The direct measurements, the comparisons at equal measured sparsity and the target check.

    Methods reach different measured sparsities at the same nominal level (1-5 points apart), so
    every comparison between methods is made at a target measured sparsity, interpolated
    (:func:`interpolate`); the direct rows are listed as data, not compared."""
    lines = [
        f"### {data['model']}",
        "",
        "Direct measurements, one row per setting (`nominal`: the level the method was set to; "
        "methods reach different measured sparsities there, so they are compared only in the "
        "tables at equal measured sparsity below):",
        "",
        "| method | nominal | measured | PPL wiki | PPL lambada | tasks avg | "
        + " | ".join(data["tasks"]) + " |",
        "|---|---|---|---|---|---|" + "---|" * len(data["tasks"]),
    ]
    for r in data["results"]:
        tasks = r.get("tasks") or {}
        cells = [
            r["method"], f"{r['sparsity']:.2f}", f"{r['measured_sparsity']:.3f}",
            f"{r['ppl']:.3f}", f"{r['ppl_lambada']:.2f}",
            "" if r.get("tasks_avg") is None else f"{r['tasks_avg']:.3f}",
            *("" if tasks.get(t) is None else f"{tasks[t]:.2f}" for t in data["tasks"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    reports = schema_reports(data)
    interp = {src: {(r["method"], r["sparsity"]): r for r in rep["results"] if "interpolated" in r}
              for src, rep in reports.items()}
    if interp["olmo-wiki"]:
        lines += ["", "At equal measured sparsity (each method interpolated between its two settings "
                  "that bracket the target, log-PPL and tasks avg linear in measured sparsity; olmo-wiki "
                  "PPL and tasks avg along the sparsity measured on olmo-wiki, lambada PPL along "
                  "lambada's; `-`: outside the method's measured range, no extrapolation): "
                  "PPL wiki / PPL lambada / tasks avg", "",
                  "| method | " + " | ".join(f"{x:.2f}" for x in SCHEMA_TARGETS) + " |",
                  "|---|" + "---|" * len(SCHEMA_TARGETS)]
        for m in SCHEMA_METHODS:
            if not any(k[0] == m for k in interp["olmo-wiki"]):
                continue
            cells = []
            for x in SCHEMA_TARGETS:
                r, lam = interp["olmo-wiki"].get((m, x)), interp["lambada"].get((m, x))
                cells.append("-" if r is None else f"{r['ppl']:.2f} / "
                             + ("-" if lam is None else f"{lam['ppl']:.2f}") + " / "
                             + ("" if r["tasks_avg"] is None else f"{r['tasks_avg']:.3f}"))
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    s = summarize(data["results"])
    if s.get("at_level"):
        lines += ["", f"At {s['level']:.0%} measured sparsity (as above; "
                  f"dense PPL {s['dense_ppl']:.3f}):", "",
                  "| method | PPL wiki | ΔPPL | PPL lambada | tasks avg |", "|---|---|---|---|---|"]
        for m, v in s["at_level"].items():
            if v["ppl"] is None:
                continue
            tasks = "" if v["tasks_avg"] is None else f"{v['tasks_avg']:.3f}"
            lam = "" if v["ppl_lambada"] is None else f"{v['ppl_lambada']:.2f}"
            lines.append(f"| {m} | {v['ppl']:.3f} | {v['ppl'] - s['dense_ppl']:+.3f} | {lam} | {tasks} |")
    if "best" in s:
        lines += ["", f"Targets at {s['level']:.0%} measured sparsity (best = {s['best']}): PPL increase "
                  f"{s['ppl_increase'][s['best']]:.3f} "
                  f"vs TEAL-uniform {s['ppl_increase'].get('teal-uniform', float('nan')):.3f} "
                  f"(ratio {s.get('ppl_increase_ratio_vs_teal_uniform', float('nan')):.2f}, target "
                  f"<= 0.5: {'met' if s.get('met_ppl_half_of_uniform') else 'missed'}), vs "
                  f"TEAL-greedy {s['ppl_increase'].get('teal-greedy', float('nan')):.3f} "
                  f"({'met' if s.get('met_ppl_below_greedy') else 'missed'}); tasks avg >= "
                  f"TEAL-greedy's: {s.get('met_tasks_at_least_greedy', 'n/a')}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        prefix, _, alloc = m.partition("-")
        if prefix not in SCORES or alloc not in ALLOCATIONS:
            raise SystemExit(f"unknown method {m!r}: use <teal|wa>-<{'|'.join(ALLOCATIONS)}>")
    sparsities = floats(args.sparsities)
    task_levels = (sparsities if args.task_sparsities is None else
                   [] if args.task_sparsities == "none" else floats(args.task_sparsities))
    task_methods = methods if args.task_methods is None else args.task_methods.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"{slug(args.model)}.json"
    if args.replot:
        data = json.loads(json_path.read_text())  # the run's result file: read, never rewritten
        write_figures(data, args.out)
        for path in write_schema(data, args.out):
            print(f"wrote {path}")
        return 0
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.0f} s] {msg}", flush=True)

    dtype = getattr(torch, args.dtype)
    model, tok = teal.load_model(args.model, dtype=dtype)
    model.eval()
    data: dict[str, Any] = {
        "model": args.model,
        "model_info": {k: v for k, v in teal.models.model_info(model).items()},
        "data": {"calibration": f"{args.calib_data} (calibration split)",
                 "ppl": "olmo-wiki (evaluation split)", "ppl_lambada": "lambada (evaluation split)"},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "prefill": "sparse",
        "budgets": {
            "calibration_tokens": args.calib_tokens, "calibration_seq_len": args.calib_seq_len,
            "allocation_tokens": args.alloc_tokens, "allocation_seq_len": args.alloc_seq_len,
            "allocation_step": args.step, "fisher_tokens": args.fisher_tokens,
            "eval_tokens_per_source": args.tokens,
            "eval_seq_len": args.seq_len, "task_limit": args.limit, "task_seed": args.seed,
            "task_sparsities": task_levels,
        },
        "tasks": args.tasks.split(","),
        "task_methods": task_methods,
        "allocations": {},
        "results": [],
    }
    done: set[tuple[str, float]] = set()
    old_allocations: dict[str, Any] = {}

    def comparable(budgets: dict[str, Any] | None) -> dict[str, Any] | None:
        # the task levels may grow on resume: rows missing tasks get them, their PPL is kept
        return None if budgets is None else {k: v for k, v in budgets.items() if k != "task_sparsities"}

    if args.resume and json_path.is_file():
        old = json.loads(json_path.read_text())
        if (comparable(old.get("budgets")) == comparable(data["budgets"])
                and old.get("dtype") == args.dtype and old.get("tasks") == data["tasks"]):
            data["results"] = old["results"]
            done = {(r["method"], r["sparsity"]) for r in data["results"]}
            old_allocations = old.get("allocations") or {}
            data["history"] = [*old.get("history", []),
                               {k: old.get(k) for k in ("date", "command", "seconds_total", "versions")}]
            log(f"resuming: {len(done)} settings already in {json_path}")
        else:
            log(f"not resuming: budgets/dtype/tasks of {json_path} differ; measuring every setting")

    def save() -> None:
        data["summary"] = summarize(data["results"])
        data["seconds_total"] = round(time.perf_counter() - t_start, 1)
        atomic_write_json(json_path, data)

    artifacts = {}
    for prefix, score in SCORES.items():
        allocs = [m.partition("-")[2] for m in methods if m.startswith(prefix + "-")]
        if allocs:
            resumed = any(m.startswith(prefix + "-") for m, _ in done)
            artifacts[prefix] = build_artifact(model, tok, score, args, allocs, log,
                                               must_reuse=resumed)
            data["allocations"][prefix] = {
                name: {k: v for k, v in table.items() if k not in ("sparsities", "layer_kl")}
                | ({"layer_kl": table["layer_kl"]} if "layer_kl" in table else {})
                for name, table in artifacts[prefix].allocations.items()
            }
            if resumed and prefix in old_allocations and old_allocations[prefix] != data["allocations"][prefix]:
                raise SystemExit(f"--resume: the {score} artifact's allocations differ from those "
                                 f"recorded in {json_path}; refusing to mix them")
    windows = {src: token_windows(tok, src, args.tokens, args.seq_len, split="evaluation")
               for src in EVAL_SOURCES.values()}

    if ("dense", 0.0) not in done:
        teal.densify_(model)
        row = {"method": "dense", "sparsity": 0.0,
               **evaluate(model, tok, windows, args, bool(task_levels))}
        data["results"].insert(0, row)
        save()
        log(f"dense: ppl {row['ppl']:.3f} lambada {row['ppl_lambada']:.2f} "
            f"tasks {row.get('tasks_avg')}")
    for s in sparsities:
        for m in methods:
            if (m, s) in done:
                row = next(r for r in data["results"] if (r["method"], r["sparsity"]) == (m, s))
                if s in task_levels and m in task_methods and row.get("tasks_avg") is None:
                    # resume: add the tasks to a row measured without them; its PPL is kept
                    prefix, _, alloc = m.partition("-")
                    with sparsified(model, artifacts[prefix], s, method=alloc):
                        row.update(evaluate_tasks(model, tok, args))
                    save()
                    log(f"{m} @ {s:.2f}: tasks {row['tasks_avg']:.3f} added (PPL kept: "
                        f"{row['ppl']:.3f}) ({row['tasks_seconds']:.0f} s)")
                continue
            prefix, _, alloc = m.partition("-")
            th = artifacts[prefix]
            assert method_label(alloc, th.score) == m
            with sparsified(model, th, s, method=alloc):
                row = {"method": m, "sparsity": s,
                       **evaluate(model, tok, windows, args, s in task_levels and m in task_methods)}
            data["results"].append(row)
            save()
            log(f"{m} @ {s:.2f}: measured {row['measured_sparsity']:.3f} ppl {row['ppl']:.3f} "
                f"lambada {row['ppl_lambada']:.2f} tasks {row.get('tasks_avg')} "
                f"({row['seconds']:.0f} s)")
    order = {m: i for i, m in enumerate(["dense", *methods])}
    data["results"].sort(key=lambda r: (r["sparsity"], order.get(r["method"], 99)))
    save()
    write_figures(data, args.out)
    write_schema(data, args.out)
    log(f"wrote {json_path} and its per-source files")
    return 0


def write_figures(data: dict[str, Any], out: Path) -> None:
    """``<model>.png`` and ``<model>.md`` beside the JSON (printed too)."""
    name = slug(data["model"])
    plot(data, out / f"{name}.png")
    tmp = out / f".{name}.md.tmp"
    tmp.write_text(markdown(data))
    os.replace(tmp, out / f"{name}.md")
    print(markdown(data))


if __name__ == "__main__":
    sys.exit(main())
