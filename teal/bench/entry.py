"""What `python -m teal.bench.kernels` / `python -m teal.bench.decode` run (their `__main__` modules): the
`teal bench` commands of `teal.bench.cli` under those program names, or one line saying that typer is missing
(the GPU image has no typer: carry its wheel on PYTHONPATH). In teal/, only those
`__main__` modules import this one."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def run_module(name: str, argv: Sequence[str] | None = None) -> None:
    try:
        from teal.bench.cli import run_command
    except ModuleNotFoundError as exc:
        if exc.name not in ("typer", "click"):
            raise
        print(f"error: python -m teal.bench.{name} needs the {exc.name} package (pip install typer, or put its "
              "wheel on PYTHONPATH)", file=sys.stderr)
        raise SystemExit(2) from None
    run_command(name, None if argv is None else list(argv))
