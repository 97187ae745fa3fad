"""lm-evaluation-harness's own task definitions on a model sparsified in place.

lm-eval's ``HFLM(pretrained=model)`` takes an already loaded transformers model, so a model that
``teal.sparsify_`` has changed is evaluated as it is: the same prompts, metrics and normalisation that
papers report. Task data comes through ``datasets`` (the hub, or its local cache); offline without it,
one clear error. ``include_path`` adds task YAMLs of your own (lm-eval's format), e.g. on local files.
teal's offline tasks (:mod:`teal.eval.tasks`) remain the CPU default of ``teal eval tasks``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from teal.sparsify import measured_sparsity, reset_counters

__all__ = ["HarnessError", "lm_eval_tasks"]


class HarnessError(ValueError):
    """lm-eval is missing, a task is unknown, or a task's data cannot be loaded."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _headline(metrics: dict[str, Any]) -> tuple[str, float] | None:
    """acc_norm where the task reports it, else acc, else its first numeric metric."""
    values = {k.split(",")[0]: v for k, v in metrics.items()
              if isinstance(v, (int, float)) and "_stderr" not in k and k != "alias"}
    for name in ("acc_norm", "acc", *values):
        if name in values:
            return name, float(values[name])
    return None


def load_tasks(tasks: list[str], include_path: str | Path | None = None) -> dict:
    """lm-eval's task objects (their data loaded), or :class:`HarnessError` with what to do."""
    try:
        from lm_eval.tasks import TaskManager, get_task_dict
    except ImportError as e:
        raise HarnessError("--harness lm-eval needs lm-evaluation-harness: pip install 'teal-sparsity[eval]'") from e
    if include_path is not None and not Path(include_path).is_dir():
        raise HarnessError(f"--include-path {include_path}: no such directory of lm-eval task YAMLs")
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise HarnessError(f"lm-eval has no task {', '.join(map(repr, unknown))}; `lm-eval ls tasks` lists them "
                           "(or add your own YAML with --include-path DIR)")
    try:
        return get_task_dict(tasks, manager)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; one line with the cause
        from teal.data import _hf_offline

        why = "offline mode is set (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)" if _hf_offline() else \
            "the hub could not be reached and the data is not in the local datasets cache"
        raise HarnessError(f"lm-eval could not load the data of {', '.join(tasks)}: {why} ({_first_line(e)}). Run "
                           "once where the hub is reachable to cache it, or use teal's offline tasks "
                           "(teal eval tasks without --harness lm-eval).") from e


def lm_eval_tasks(model: nn.Module, tokenizer: Any, tasks: list[str], limit: int | None = None,
                  batch_size: int = 8, include_path: str | Path | None = None, task_dict: dict | None = None,
                  seed: int = 1234) -> dict[str, Any]:
    """Run lm-eval's ``tasks`` on ``model`` as it is (dense or sparsified) through ``HFLM(pretrained=model)``.

    Returns ``{"tasks": {name: {"metric", "score", "metrics"}}, "average", "measured_sparsity"}`` in the same
    shape as :func:`teal.eval.tasks.run_tasks`' results."""
    import random

    import numpy as np
    import torch
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    task_dict = task_dict if task_dict is not None else load_tasks(tasks, include_path)
    device = next(model.parameters()).device
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    reset_counters(model)
    out = evaluate(lm=lm, task_dict=task_dict, limit=limit)
    per: dict[str, Any] = {}
    for name, metrics in (out or {}).get("results", {}).items():
        head = _headline(metrics)
        if head is not None:
            per[name] = {"metric": head[0], "score": head[1],
                         "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
    scores = [per[t]["score"] for t in tasks if t in per]
    return {"tasks": per, "average": sum(scores) / len(scores) if scores else float("nan"),
            "measured_sparsity": float(measured_sparsity(model)), "harness": "lm-eval", "limit": limit}
