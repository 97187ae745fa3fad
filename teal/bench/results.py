"""What every benchmark JSON records about its run, and how it is written: the source commit, the process
start, and an atomic write (a temporary file in the same folder, then a rename)."""

from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

_IMPORT_TIME = time.time()


def git_commit() -> str | None:
    """The source commit for the JSON: ``$TEAL_SOURCE_COMMIT`` when set (a copy of the tree without its own
    history, e.g. on a remote GPU machine, would otherwise report a stale or no HEAD), else ``git rev-parse
    HEAD`` of the checkout holding this package (not the caller's directory) with ``-dirty`` when its tree
    has uncommitted changes; None outside a git checkout."""
    stated = os.environ.get("TEAL_SOURCE_COMMIT")
    if stated:
        return stated
    try:
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=here)
        head = out.stdout.strip()
        if not head:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=here).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):  # no git binary, or it hung
        return None


def process_start_time() -> float:
    """Wall-clock start of this process (Linux /proc), else the import time of this module."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return _IMPORT_TIME


def write_json(data: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write ``data`` as JSON atomically (temporary file in the same folder, then rename)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1, default=str, allow_nan=True)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def teal_environment() -> dict[str, str]:
    """The ``$TEAL_*`` switches of this process (launch modes, tables, kernel choices), for a result's header: a
    run under ``TEAL_CUDA_PDL=1`` or ``TEAL_QUANT_CONFIGS=PATH`` says so itself. ``$TEAL_SOURCE_COMMIT`` is the
    header's ``git_commit``."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("TEAL_") and k != "TEAL_SOURCE_COMMIT"}


def decode_header(model: str | None, shape: str | None, device: torch.device, dtype: torch.dtype, prompt_len: int,
                  new_tokens: int, repeats: int, max_seq_len: int, command: str | None) -> dict[str, Any]:
    """The opening fields of a decode benchmark's JSON (`teal.bench.decode`, `teal.bench.tp`): the run's
    environment and settings, and the empty lists the run fills."""
    import platform

    import torch
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import teal

    return {
        "benchmark": "decode",
        "teal_version": getattr(teal, "__version__", None),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "triton": triton_version, "transformers": transformers.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(), "git_commit": git_commit(),
        "environment": teal_environment(), "command": command or "teal.bench.decode.run()",
        "model": model or f"random:{shape}", "dtype": str(dtype).removeprefix("torch."),
        "batch": 1, "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats,
        "max_seq_len": max_seq_len,
        "timing": "median over repeats of decode tokens/s (first to last new token, host clock, greedy)",
        "roofline": "copy bandwidth / (sparsified weights x (1 - measured sparsity) + lm_head + embedding row "
                    "+ norms + KV cache at the mean context)",
        "checks": {}, "baselines": {}, "dense_variants": [], "results": [], "profiles": {}, "errors": [],
    }
