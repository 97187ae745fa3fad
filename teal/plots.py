"""Figures from result JSON files (matplotlib, PNG)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def load_results(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"result file {str(p)!r} does not exist")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise ValueError(f"{p} has no 'results' list; expected a teal eval or bench JSON")
    return data


def plot(paths: list[str | Path], out: str | Path, metric: str = "ppl") -> Path:
    """Draw ``metric`` against measured sparsity, one line per (file, method).

    Kernel benchmark JSONs (``teal bench kernels --json``: ``"benchmark": "kernels"``) are drawn by the
    kernel benchmark's own plot (time vs sparsity against the ideal (1 - s) line); decode benchmark JSONs
    (``"benchmark": "decode"``) by tokens/s against measured sparsity.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = [load_results(p) for p in paths]
    kinds = [d.get("benchmark", d.get("kind")) for d in datasets]
    if "kernels" in kinds:
        if len(datasets) != 1:
            raise ValueError("plot one kernel benchmark JSON at a time")
        from teal.bench.kernels import plot as plot_kernels

        plot_kernels(datasets[0], out)
        return Path(out)
    if any(kind in ("decode", "decode-tp") for kind in kinds):
        metric = "tokens_per_s"
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for path, data in zip(paths, datasets):
        by_method: dict[str, list[tuple[float, float]]] = {}
        for row in data["results"]:
            if metric not in row:
                continue
            x = row.get("measured_sparsity", row.get("sparsity", 0.0))
            by_method.setdefault(row.get("method", "?"), []).append((x, row[metric]))
        for method, pts in by_method.items():
            pts.sort()
            label = method if len(paths) == 1 else f"{Path(path).stem}: {method}"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    values = [y for line in ax.get_lines() for y in line.get_ydata()]
    if not values:
        plt.close(fig)
        found = sorted({k for d in datasets for row in d["results"] if isinstance(row, dict) for k in row})
        raise ValueError(f"no result row has {metric!r} to plot (keys found: {', '.join(found[:12])})")
    if metric == "ppl" and values and min(values) > 0 and max(values) / min(values) > 10:
        ax.set_yscale("log")  # high-sparsity blow-ups would flatten the interesting range
    model = datasets[0].get("model", "")
    data_name = datasets[0].get("data", "")
    ax.set_xlabel("measured effective sparsity")
    ax.set_ylabel({"ppl": "perplexity", "tasks_avg": "downstream average"}.get(metric, metric))
    ax.set_title(f"{model} on {data_name}".strip())
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=130)
    plt.close(fig)
    tmp.replace(out)
    return out
