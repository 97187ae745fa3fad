"""Sparsity allocation: how one effective (model-wide) sparsity splits across projections.

``uniform``: every projection at the same level (needs no search).
``greedy``: TEAL's block-wise greedy search within each decoder layer (`teal.allocate_greedy`).
``fisher`` and ``cross-layer``: model-wide allocations across layers (`teal.allocate_xl`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from teal.allocate_greedy import (DEFAULT_GREEDY_SEQ_LEN, DEFAULT_GREEDY_TOKENS, DEFAULT_MAX_LEVEL, DEFAULT_STEP,
                                  allocate_greedy)
from teal.allocate_xl import allocate_xl
from teal.artifact import Thresholds
from teal.calibrate import follow_allocation

METHODS = ("uniform", "greedy", "fisher", "cross-layer")


def allocate(
    model: nn.Module,
    thresholds: Thresholds,
    method: str = "greedy",
    data: str = "sotu",
    tokens: int = DEFAULT_GREEDY_TOKENS,
    seq_len: int | None = DEFAULT_GREEDY_SEQ_LEN,
    step: float = DEFAULT_STEP,
    max_level: float = DEFAULT_MAX_LEVEL,
    progress: bool = True,
    windows: torch.Tensor | None = None,
    tokenizer: Any = None,
    lazy: bool = False,
) -> Thresholds:
    """Add the ``method`` allocation table to ``thresholds`` (in place; also returned).

    The table lists, for effective sparsity 0, step, 2*step, ... up to ``max_level``, the
    sparsity of every projection; :meth:`Thresholds.sparsities` interpolates between rows.
    ``lazy``: greedy only (`teal.allocate_greedy.greedy_layer`). Where the artifact has a sequential
    uniform table, the method's own sequential table is measured too (`teal.calibrate.follow_allocation`).
    """
    if method == "uniform":
        thresholds.method = "uniform"
        return thresholds
    if method in ("fisher", "cross-layer"):
        allocate_xl(model, thresholds, method, data=data, tokens=tokens, seq_len=seq_len,
                    step=step, max_level=max_level, progress=progress, windows=windows,
                    tokenizer=tokenizer)
    elif method == "greedy":
        allocate_greedy(model, thresholds, data=data, tokens=tokens, seq_len=seq_len, step=step,
                        max_level=max_level, progress=progress, windows=windows, tokenizer=tokenizer, lazy=lazy)
    else:
        raise ValueError(f"unknown allocation method {method!r}; choose one of {METHODS}")
    # an artifact calibrated sequentially gets the new allocation's sequential table (teal.calibrate)
    return follow_allocation(model, thresholds, method, tokenizer, windows, progress)
