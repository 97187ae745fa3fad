"""Pick the CUDA kernel's PDL mode (or another ``$TEAL_CUDA_*`` mode) from tuning runs made under each value.

python3 benchmarks/scripts/cuda_pdl_pick.py DIR [NAME]   (DIR holds tune-NAME{0,1,2}.json from
``python -m teal.bench.kernels --tune --tune-families cuda --json``; NAME defaults to ``pdl``, ``pipe``
for ``$TEAL_CUDA_PIPE``). Prints, per mode, the mean over shapes and tuning sparsities of the best CUDA
configuration's time relative to the best mode's, and writes the winning mode to DIR/NAME_mode (one digit).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def best_cuda_times(path: Path) -> dict[tuple[int, int], list[float]]:
    data = json.loads(path.read_text())
    out = {}
    for entry in data["tuning"]:
        rows = [t for cfg, t in entry["times_us"].items() if "cuda=True" in cfg]
        if rows:
            out[(entry["K"], entry["N"])] = [min(r[i] for r in rows) for i in range(len(rows[0]))]
    return out


def main(folder: str, name: str = "pdl") -> None:
    root = Path(folder)
    files = {m: root / f"tune-{name}{m}.json" for m in (0, 1, 2)}
    runs = {m: best_cuda_times(path) for m, path in files.items() if path.exists()}
    shapes = sorted(set.intersection(*(set(r) for r in runs.values())))
    score = {}
    for mode, times in runs.items():
        ratios = []
        for shape in shapes:
            for i, t in enumerate(times[shape]):
                ratios.append(t / min(r[shape][i] for r in runs.values()))
        score[mode] = sum(ratios) / len(ratios)
        per_shape = "  ".join(f"{s[0]}x{s[1]} " + "/".join(f"{t:.1f}" for t in times[s]) for s in shapes)
        print(f"TEAL_CUDA_{name.upper()}={mode}: {per_shape}  score {score[mode]:.3f}")
    best = min(score, key=score.get)
    (root / f"{name}_mode").write_text(str(best))
    print(f"best mode: {best}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
