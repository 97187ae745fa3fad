"""What every GPU script records about its run: date, device, software versions and the exact command."""

from __future__ import annotations

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
    }
