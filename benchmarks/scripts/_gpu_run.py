"""What every GPU script records about its run: date, device, software versions and the exact command."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from typing import Any

import torch


def run_info(device: torch.device) -> dict[str, Any]:
    import triton

    return {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
                     "python": platform.python_version()},
        "command": "PYTHONPATH=. python3 " + " ".join(sys.argv),
        "source_commit": os.environ.get("TEAL_SOURCE_COMMIT"),  # the GPU copy of the tree has no history of its own
    }


def rotated_weights(k: int, n: int, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> list[torch.Tensor]:
    """Random [K, N] weights in enough copies (at least 2) to span four times the L2 cache, so that calls
    rotating through them read from device memory."""
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    copies = max(2, -(-4 * l2 // (k * n * torch.finfo(dtype).bits // 8)))
    return [(torch.randn(k, n, device=device) * k**-0.5).to(dtype) for _ in range(copies)]


def start_rows_run(doc: str, **options: str) -> tuple[argparse.Namespace, torch.device, dict[str, Any]]:
    """The common start of a GPU script that writes rows to JSON: ``--json PATH`` (required) and one string
    option per keyword (its default), the CUDA device, and the JSON's header (``run_info``) with empty rows."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--json", dest="json_path", required=True)
    for name, default in options.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=default)
    args = parser.parse_args()
    device = torch.device("cuda")
    return args, device, {**run_info(device), "rows": []}
