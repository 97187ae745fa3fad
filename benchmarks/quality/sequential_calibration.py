"""Sequential vs dense calibration at equal measured sparsity, with the quality report's harness.

One artifact per model, built as `run_quality.py` builds the report's: dense histograms on
``--calib-tokens`` of the calibration split of ``--calib-data`` (olmo-wiki), TEAL's greedy allocation
(lazy, ``--alloc-tokens``, ``--step``) where ``--methods`` has it, then the sequential table of every
method as the default ``teal calibrate`` / ``teal allocate`` build them (the first ``--seq-tokens``
tokens of the calibration windows, one pass per level of ``--seq-levels``: the default grid 0.1, 0.2,
...; levels above the largest evaluated one never change its thresholds, so the grid may stop there).

For every method, with ``calibration="dense"`` (TEAL's thresholds) and ``"sequential"`` (the
default), at every nominal level of ``--levels``: PPL on the olmo-wiki and lambada evaluation splits
and the measured effective sparsity on each (`run_quality.evaluate`: same text and windows as the
quality report). Where a series' settings do not bracket a ``--targets`` level in measured sparsity,
one more setting is added just beyond it (nominal moved by the shortfall). Then the six-task average
(same tasks, items and seed as the report; the costly part) on the dense model and on the two settings
of each series that bracket each ``--task-targets`` level. Every comparison is made at equal
*measured* sparsity, interpolated between the two bracketing settings with the report's own rule
(`run_quality.interpolate`). Writes ``sequential-calibration-<model>.json`` (rewritten after every
setting; ``--resume`` keeps the rows of a run with the same budgets, with the artifact kept in
``--artifacts``; a larger ``--task-targets`` adds tasks to kept rows) and the ``.md`` tables beside it
(``--replot`` rewrites the ``.md`` from the JSON).

    python benchmarks/quality/sequential_calibration.py --model smollm2-135m --levels 0.25,0.4,0.5
    (defaults: the quality report's budgets; the committed results used a reduced grid on the contended
    CPU, their commands in benchmarks/quality/README.md, "Reproduce")
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import teal
from teal.artifact import atomic_write_json
from teal.calibrate import calibrate_sequential, first_tokens
from teal.data import token_windows
from teal.eval.tasks import DEFAULT_TASKS

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run_quality import bracket, evaluate, evaluate_tasks, interpolate, slug, sparsified, versions  # noqa: E402  (the report's harness)

CALIBRATIONS = ("dense", "sequential")
KEYS = {"ppl": "measured_sparsity", "ppl_lambada": "measured_sparsity_lambada", "tasks_avg": "measured_sparsity"}


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", default="uniform,greedy")
    p.add_argument("--levels", default="0.25,0.4,0.5", help="nominal levels measured for every series")
    p.add_argument("--targets", default=None, help="measured levels compared (default: --levels)")
    p.add_argument("--calib-data", default="olmo-wiki")
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--calib-seq-len", type=int, default=2048)
    p.add_argument("--seq-tokens", type=int, default=8192, help="tokens of each sequential pass (library default)")
    p.add_argument("--seq-levels", default="0.1,0.2,0.3,0.4,0.5,0.6",
                   help="levels of the sequential tables (the library default grid, cut above the levels used)")
    p.add_argument("--alloc-tokens", type=int, default=1024)
    p.add_argument("--alloc-seq-len", type=int, default=512)
    p.add_argument("--step", type=float, default=0.05)
    p.add_argument("--tokens", type=int, default=4096, help="evaluation tokens per PPL source")
    p.add_argument("--seq-len", type=int, default=2048, help="evaluation window length")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    p.add_argument("--limit", type=int, default=50, help="items per task")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--task-targets", default=None,
                   help="measured levels where the tasks are compared (default: --targets; 'none': no tasks, "
                        "a later --resume may add them); the tasks run on "
                        "the dense model and on the two settings of each series that bracket each of them")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--artifacts", type=Path, default=None, help="keep/reuse the artifact here")
    p.add_argument("--resume", action="store_true", help="keep the rows of a run with the same budgets")
    p.add_argument("--out", type=Path, default=HERE)
    p.add_argument("--replot", action="store_true", help="only rewrite the .md from the JSON")
    return p.parse_args(argv)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True, check=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def series_points(results: list[dict], method: str, cal: str, key: str) -> list[dict]:
    """The settings of one (method, calibration) series, plus the dense model at 0, as the
    report's :func:`run_quality.bracket` reads them (``measured`` on the text of ``key``)."""
    axis = KEYS[key]
    pts = [{"nominal": 0.0, "measured": 0.0, key: r.get(key)} for r in results if r["method"] == "dense"]
    pts += [{"nominal": r["sparsity"], "measured": r[axis], key: r.get(key)} for r in results
            if r["method"] == method and r["calibration"] == cal]
    return pts


def at_measured(results: list[dict], method: str, cal: str, key: str, level: float) -> dict | None:
    b = bracket(series_points(results, method, cal, key), level)
    if b is None:
        return None
    lo, hi = b
    return {"value": interpolate(lo, hi, level, key), "from": [lo["nominal"], hi["nominal"]],
            "measured": [round(lo["measured"], 4), round(hi["measured"], 4)]}


def comparisons(data: dict) -> list[dict]:
    out = []
    for level in data["targets"]:
        for method in data["methods"]:
            row: dict[str, Any] = {"method": method, "measured": level}
            for cal in CALIBRATIONS:
                row[cal] = {k: at_measured(data["results"], method, cal, k, level) for k in KEYS}
            out.append(row)
    return out


def markdown(data: dict) -> str:
    b = data["budgets"]
    lines = [
        f"### Sequential vs dense calibration: {data['model']}",
        "",
        f"Artifact: dense histograms on {b['calib_tokens']:,} tokens of {data['calib_data']} (calibration split, "
        f"windows of {b['calib_seq_len']})"
        + (f", greedy lazy on {b['alloc_tokens']:,} tokens (step {b['step']})" if "greedy" in data["methods"] else "")
        + "; "
        f"sequential tables on the first {b['seq_tokens']:,} of those tokens at levels "
        f"{', '.join(f'{v:g}' for v in b['seq_levels'])}. Evaluation: olmo-wiki and lambada (evaluation splits, "
        f"{b['eval_tokens']:,} tokens each, windows of {b['eval_seq_len']}, every position sparsified), "
        + (f"{len(data['tasks'])} tasks ({b['task_limit']} items each, seed {b['task_seed']}; run on the dense model "
           f"and on the two settings of each series that bracket measured "
           f"{', '.join(f'{v:g}' for v in data['task_targets'])}, empty elsewhere); " if data["task_targets"] else "")
        + f"{data['dtype']} on the CPU. "
        f"Sequential tables measured on their calibration text: "
        + "; ".join(f"{m} {', '.join(f'{v:.3f}' for v in t['measured_on_calibration'])} ({t['seconds']:.0f} s)"
                    for m, t in data.get("sequential_tables", {}).items()) + ".",
        "",
        "Direct measurements (`measured`: zeros produced on olmo-wiki / lambada; `drift`: olmo-wiki measured − nominal):",
        "",
        "| allocation | calibration | nominal | measured wiki / lambada | drift | PPL wiki | PPL lambada | tasks avg |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in data["results"]:
        cal = r.get("calibration") or ""
        tasks = "" if r.get("tasks_avg") is None else f"{r['tasks_avg']:.3f}"
        drift = "" if r["method"] == "dense" else f"{r['measured_sparsity'] - r['sparsity']:+.3f}"
        lines.append(f"| {r['method']} | {cal} | {r['sparsity']:.3f} | {r['measured_sparsity']:.3f} / "
                     f"{r['measured_sparsity_lambada']:.3f} | {drift} | {r['ppl']:.3f} | {r['ppl_lambada']:.2f} | {tasks} |")
    lines += [
        "",
        "At equal measured sparsity (each series interpolated between its two settings that bracket the target, "
        "the dense model being the setting at 0; log-PPL and tasks avg linear in measured sparsity; lambada PPL "
        "along lambada's measured sparsity): dense calibration → sequential calibration, and the relative change "
        "(`-`: no bracketing setting):",
        "",
        "| measured | allocation | PPL wiki | PPL lambada | tasks avg |",
        "|---|---|---|---|---|",
    ]

    def cell(c: dict, key: str) -> str:
        d, s = c["dense"][key], c["sequential"][key]
        if d is None or s is None or d["value"] is None or s["value"] is None:
            return "-"
        if key == "tasks_avg":
            return f"{d['value']:.3f} → {s['value']:.3f} ({s['value'] - d['value']:+.3f})"
        return f"{d['value']:.2f} → {s['value']:.2f} ({s['value'] / d['value'] - 1:+.1%})"

    for c in comparisons(data):
        lines.append(f"| {c['measured']:.2f} | {c['method']} | " + " | ".join(cell(c, k) for k in KEYS) + " |")
    return "\n".join(lines) + "\n"


def write_md(data: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(markdown(data))
    os.replace(tmp, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    name = slug(args.model)
    json_path = args.out / f"sequential-calibration-{name}.json"
    md_path = json_path.with_suffix(".md")
    if args.replot:
        data = json.loads(json_path.read_text())
        data["comparisons"] = comparisons(data)
        write_md(data, md_path)
        print(markdown(data))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    levels, methods = floats(args.levels), [m for m in args.methods.split(",") if m]
    targets = floats(args.targets) if args.targets else levels
    seq_levels = floats(args.seq_levels)
    task_targets = ([] if args.task_targets == "none" else
                    floats(args.task_targets) if args.task_targets else targets)
    if max(levels + targets) > max(seq_levels):
        raise SystemExit(f"--seq-levels must reach the largest level evaluated ({max(levels + targets)})")
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", flush=True)

    budgets = {"calib_tokens": args.calib_tokens, "calib_seq_len": args.calib_seq_len, "seq_tokens": args.seq_tokens,
               "seq_levels": seq_levels, "alloc_tokens": args.alloc_tokens, "alloc_seq_len": args.alloc_seq_len,
               "step": args.step, "eval_tokens": args.tokens, "eval_seq_len": args.seq_len,
               "task_limit": args.limit, "task_seed": args.seed}
    data: dict[str, Any] = {
        "kind": "sequential-calibration",
        "model": args.model,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "commit": git_commit(),
        "device": f"cpu ({platform.machine()}, {torch.get_num_threads()} threads, shared)",
        "versions": versions(),
        "dtype": args.dtype,
        "calib_data": args.calib_data,
        "budgets": budgets,
        "tasks": args.tasks.split(","),
        "methods": methods,
        "levels": levels,
        "targets": targets,
        "task_targets": task_targets,
        "protocol": ("PPL: olmo-wiki and lambada evaluation splits, every position sparsified (prefill sparse); "
                     "measured = parameter-weighted fraction of zeros produced on that text; tasks: zero-shot, "
                     "acc_norm where reported else acc (run_quality.evaluate)"),
        "results": [],
    }
    if args.resume and json_path.is_file():
        old = json.loads(json_path.read_text())
        if old.get("budgets") == budgets and old.get("dtype") == args.dtype and old.get("tasks") == data["tasks"]:
            if args.artifacts is None:
                raise SystemExit("--resume needs --artifacts (the rows were measured with that artifact)")
            data["results"] = old["results"]
            data["history"] = [*old.get("history", []), {k: old.get(k) for k in ("date", "command", "commit")}]
            log(f"resuming: {len(data['results'])} rows of {json_path}")
        else:
            log(f"not resuming: the budgets of {json_path} differ")

    def save() -> None:
        data["comparisons"] = comparisons(data)
        data["seconds_total"] = round(time.perf_counter() - t_start, 1) + sum(
            h.get("seconds_total") or 0 for h in data.get("history", []))
        atomic_write_json(json_path, data)
        write_md(data, md_path)

    model, tok = teal.load_model(args.model, dtype=getattr(torch, args.dtype), device="cpu")
    model.eval()
    art = None if args.artifacts is None else args.artifacts / name
    th = None
    if art is not None and art.is_dir():
        th = teal.Thresholds.load(art, model=model)
        if not all(m in th.sequential for m in methods) or th.sequential[methods[0]]["levels"] != seq_levels:
            th = None
        else:
            log(f"reusing the artifact {art}")
    if th is None:
        if data["results"]:
            raise SystemExit(f"--resume: the artifact {art} is missing or incomplete; rows would mix two artifacts")
        calib = token_windows(tok, args.calib_data, args.calib_tokens, args.calib_seq_len, split="calibration")
        t0 = time.perf_counter()
        th = teal.calibrate(model, tok, windows=calib, calibration="dense", progress=False)
        th.calibration["data"] = args.calib_data
        data["seconds"] = {"dense_histograms": round(time.perf_counter() - t0, 1)}
        log(f"dense histograms: {data['seconds']['dense_histograms']} s")
        for m in methods:
            if m == "uniform":
                continue
            t0 = time.perf_counter()
            alloc = token_windows(tok, args.calib_data, args.alloc_tokens, args.alloc_seq_len, split="calibration")
            teal.allocate(model, th, m, windows=alloc, step=args.step, progress=False,
                          **({"lazy": True} if m == "greedy" else {}))
            data["seconds"][f"{m}_allocation"] = round(time.perf_counter() - t0, 1)
            log(f"{m} allocation: {data['seconds'][f'{m}_allocation']} s")
        seq_windows = first_tokens(calib, args.seq_tokens)
        for m in methods:
            calibrate_sequential(model, th, m, seq_levels, windows=seq_windows, data=args.calib_data, progress=False)
            log(f"sequential table ({m}): {th.sequential[m]['seconds']} s, measured on calibration "
                f"{th.sequential[m]['measured_on_calibration']}")
        if art is not None:
            th.save(art)
    data["sequential_tables"] = {m: {k: v for k, v in th.sequential[m].items() if k != "quantiles"} for m in methods}
    windows = {src: token_windows(tok, src, args.tokens, args.seq_len, split="evaluation")
               for src in ("olmo-wiki", "lambada")}

    def have(method: str, cal: str | None, level: float) -> bool:
        return any(r["method"] == method and r.get("calibration") == cal and abs(r["sparsity"] - level) < 1e-9
                   for r in data["results"])

    def measure(method: str, cal: str | None, level: float) -> dict:
        if have(method, cal, level):
            return next(r for r in data["results"] if r["method"] == method and r.get("calibration") == cal
                        and abs(r["sparsity"] - level) < 1e-9)
        teal.densify_(model)
        if method != "dense":
            teal.sparsify_(model, th, level, method=method, calibration=cal, prefill="sparse")
        try:
            row = {"method": method, "calibration": cal, "sparsity": round(level, 4),
                   **evaluate(model, tok, windows, args, False)}
        finally:
            teal.densify_(model)
        data["results"].append(row)
        save()
        log(f"{method:<8} {cal or '':<10} nominal {level:.3f} measured {row['measured_sparsity']:.3f} / "
            f"{row['measured_sparsity_lambada']:.3f}  ppl {row['ppl']:.3f} / {row['ppl_lambada']:.2f}  "
            f"tasks {row.get('tasks_avg')} ({row['seconds']:.0f} s)")
        return row

    measure("dense", None, 0.0)
    for level in levels:
        for m in methods:
            for cal in CALIBRATIONS:
                measure(m, cal, level)
    # one more setting per target a series does not bracket, nominal moved by the shortfall (twice at most)
    for m in methods:
        for cal in CALIBRATIONS:
            for _ in range(2):
                missing = [t for t in targets for k in ("ppl", "ppl_lambada")
                           if bracket(series_points(data["results"], m, cal, k), t) is None]
                if not missing:
                    break
                t = max(missing)
                top = max((r for r in data["results"] if r["method"] == m and r["calibration"] == cal),
                          key=lambda r: r["sparsity"])
                short = t - min(top["measured_sparsity"], top["measured_sparsity_lambada"])
                measure(m, cal, round(top["sparsity"] + short + 0.01, 3))
    # the tasks (the costly part, after every PPL): the dense model, then the two settings of each series
    # that bracket each task target
    dense_row = next(r for r in data["results"] if r["method"] == "dense")
    if task_targets and dense_row.get("tasks_avg") is None:
        dense_row.update(evaluate_tasks(model, tok, args))
        save()
        log(f"dense: tasks {dense_row['tasks_avg']:.3f} ({dense_row['tasks_seconds']:.0f} s)")
    for m in methods:
        for cal in CALIBRATIONS:
            for t in task_targets:
                b = bracket(series_points(data["results"], m, cal, "tasks_avg"), t)
                for p in b or ():
                    row = next((r for r in data["results"] if r["method"] == m and r["calibration"] == cal
                                and abs(r["sparsity"] - p["nominal"]) < 1e-9), None)
                    if row is None or row.get("tasks_avg") is not None:
                        continue  # the dense model (tasks measured first) or done already
                    with sparsified(model, th, row["sparsity"], method=m, calibration=cal):
                        row.update(evaluate_tasks(model, tok, args))
                    save()
                    log(f"{m:<8} {cal:<10} nominal {row['sparsity']:.3f}: tasks {row['tasks_avg']:.3f} "
                        f"(measured {row['measured_sparsity_tasks']:.3f} on the tasks, {row['tasks_seconds']:.0f} s)")
    order = {"dense": 0, **{m: i + 1 for i, m in enumerate(methods)}}
    data["results"].sort(key=lambda r: (order.get(r["method"], 99), r.get("calibration") or "", r["sparsity"]))
    save()
    print(markdown(data))
    log(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
