"""Time `teal --help` (process start to exit) and check that it imports no torch; print and write JSON.

    PYTHONPATH=. python benchmarks/scripts/cli_help_time.py --json benchmarks/results/DATE-cpu-cli-help-time.json

A benchmark, not a test: wall time depends on the machine and its load (recorded beside the numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args()

    exe = shutil.which("teal", path=os.path.dirname(sys.executable)) or shutil.which("teal")
    cmd = [exe, "--help"] if exe else [sys.executable, "-m", "teal.cli", "--help"]
    subprocess.run(cmd, capture_output=True, check=True)  # warm the file cache
    seconds = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True)
        seconds.append(time.perf_counter() - t0)
    probe = ("import sys; sys.argv = ['teal', '--help']\nfrom teal.cli import main\ntry:\n    main()\n"
             "except SystemExit:\n    pass\nprint('torch' in sys.modules, file=sys.stderr)")
    torch_loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stderr.strip()
    baseline = []  # the interpreter alone, for scale
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        baseline.append(time.perf_counter() - t0)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "load_average_1m": os.getloadavg()[0],
        "versions": {"python": platform.python_version()},
        "command": "PYTHONPATH=. python " + " ".join(sys.argv),
        "source_commit": commit(),
        "timed": " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd)),
        "repeats": args.repeats,
        "seconds": [round(s, 4) for s in seconds],
        "median_s": round(statistics.median(seconds), 4),
        "min_s": round(min(seconds), 4),
        "python_start_median_s": round(statistics.median(baseline), 4),
        "imports_torch": torch_loaded == "True",
    }
    print(f"teal --help: median {result['median_s']:.3f} s, min {result['min_s']:.3f} s over {args.repeats} runs "
          f"(bare python start {result['python_start_median_s']:.3f} s; load average {result['load_average_1m']:.1f}; "
          f"imports torch: {result['imports_torch']})")
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json_path}")


if __name__ == "__main__":
    main()
