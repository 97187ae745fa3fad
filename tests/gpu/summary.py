"""Summarise a ``make test-gpu`` run: pytest's JUnit XML -> one JSON (date, device, versions, command, commit,
passed / failed / skipped / error counts, the failing tests' names and first message line).

    python tests/gpu/summary.py RESULTS/junit.xml --command "make test-gpu" -o RESULTS/summary.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "triton", "transformers", "pytest"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def _device() -> str:
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device"
    props = torch.cuda.get_device_properties(0)
    return f"{props.name} (compute capability {props.major}.{props.minor}, {props.multi_processor_count} SMs)"


def _commit() -> str | None:
    """``$TEAL_SOURCE_COMMIT`` (a copy of the tree without its history, as on the GPU machine), else git's."""
    stated = os.environ.get("TEAL_SOURCE_COMMIT")
    if stated:
        return stated
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def summarise(junit: Path, command: str) -> dict:
    root = ET.parse(junit).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    seconds = 0.0
    failed, skipped = [], []
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0))
        seconds += float(suite.get("time", 0.0))
        for case in suite.iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            for tag in ("failure", "error"):
                node = case.find(tag)
                if node is not None:
                    failed.append({"test": name, "kind": tag, "message": (node.get("message") or "").split("\n")[0][:300]})
            node = case.find("skipped")
            if node is not None:
                skipped.append({"test": name, "reason": (node.get("message") or "")[:300]})
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {
        "kind": "test-gpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": _device(),
        "versions": _versions(),
        "command": command,
        "source_commit": _commit(),
        "passed": passed,
        "failed": counts["failures"],
        "errors": counts["errors"],
        "skipped": counts["skipped"],
        "seconds": round(seconds, 1),
        "failures": failed,
        "skips": skipped,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("junit", type=Path)
    parser.add_argument("--command", default="make test-gpu")
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args(argv)
    summary = summarise(args.junit, args.command)
    args.output.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{summary['passed']} passed, {summary['failed']} failed, {summary['errors']} errors, "
          f"{summary['skipped']} skipped on {summary['device']} -> {args.output}")
    if summary["skipped"] or not summary["passed"]:  # on the GPU machine nothing may be skipped
        print("make test-gpu: nothing passed, or tests were skipped (see 'skips' in the summary): a failure on the GPU machine")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
