"""Model-wide sparsity allocations that beat TEAL's per-block greedy at equal effective sparsity.

Two methods, both producing the greedy table's format (``levels`` + per-projection
``sparsities``), so ``Thresholds.sparsities(level, method)`` hits ``level`` exactly:

``fisher`` (the better one; see :func:`allocate_fisher`) gives every *projection* its own level
from a diagonal Fisher estimate of how much zeroing its small inputs moves the model's output.

``cross-layer`` gives every *layer* its own level from measured KL probes. TEAL's greedy search
splits a layer-level effective sparsity ``e`` among the layer's projections, but sets every
layer to the same ``e``. Layers are not equally sensitive, so ``cross-layer``:

1. measures, on calibration windows, how far the model's next-token distribution moves from the
   dense one (mean KL(dense || sparse) per token) when *only* layer ``l`` is sparsified at a few
   probe levels (default 0.25, 0.5, 0.75, 0.9; the within-layer split is the greedy table's);
2. interpolates each layer's curve (power law from 0 to the first probe, geometric between
   probes) and takes its lower convex hull;
3. assuming the layers' KL contributions add, minimizes their sum subject to
   ``sum_l |W_l| e_l / sum_l |W_l| = target``: the hull segments of all layers, sorted by KL
   cost per weight removed, are filled in that order until the target is reached (the optimum of
   the convexified problem). The order is fixed, so every ``e_l`` only grows with the target and
   the table is monotone; the last segment is filled fractionally, so the target is met exactly.

Per-projection sparsities inside layer ``l`` are the greedy table's at level ``e_l``.

Cost: one dense pass, then ``n_layers * len(probes)`` passes through layers ``l..L-1`` plus the
LM head, on ``tokens`` calibration tokens (default 1024), after the greedy table (computed here
if the artifact lacks it). Dense next-token log-probabilities are held in memory:
``tokens * vocab * 4`` bytes (1 GiB for Gemma-3's 262k vocabulary at 1024 tokens).

``fisher``: one forward + backward pass per calibration window. With labels sampled from the
model's own next-token distribution, the loss gradient ``g`` at a projection's input estimates
the Fisher information, and zeroing input entry ``x_i`` raises KL(dense || sparse) by about
``(g_i x_i)^2 / 2`` (second order, diagonal: interactions between entries, projections and
layers are ignored). Summing ``(g_i x_i)^2`` per projection into bins of the entry's score
(``|x_i|``, or ``|x_i| * ||W[:, i]||`` for weight-aware artifacts) gives, for every sparsity
``s``, the predicted damage ``D_p(s)`` of the threshold that zeroes ``s`` of the entries. The
per-projection curves go through the same convex-hull solver, with projections as units.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from teal import stats
from teal.arch import PROJECTIONS, Adapter, get_adapter, proj_key
from teal.allocate_greedy import allocate_greedy, capture_layer_inputs, prepare_allocation
from teal.artifact import Thresholds
from teal.calibrate import base_model, model_device
from teal.nn import TealLinear, dense_linear

CROSS_LAYER = "cross-layer"
FISHER = "fisher"
METHODS = (FISHER, CROSS_LAYER)
WITHIN = "greedy"
DEFAULT_PROBES = (0.25, 0.5, 0.75, 0.9)
DEFAULT_XL_TOKENS = 1024
DEFAULT_XL_SEQ_LEN = 512
DEFAULT_CHECK_LEVELS = (0.5,)
DEFAULT_FISHER_TOKENS = 2048
FISHER_MAX_SPARSITY = 0.95  # per-projection cap of the fisher allocation
FISHER_GRID_STEP = 0.01
# resolution of the interpolated per-layer curves before taking their convex hulls
CURVE_STEP = 0.005
_HEAD_CHUNK = 256  # positions per LM-head chunk (bounds the fp32 logits held at once)
_KL_FLOOR = 1e-9


# ---- the optimization (pure numpy) ---------------------------------------------------------
def interpolate_curve(probes: Sequence[float], values: Sequence[float], grid: np.ndarray) -> np.ndarray:
    """A layer's KL at every level of ``grid``, from its values at ``probes`` (f(0) = 0).

    Power law ``f1 * (e / e1) ** p`` below the first probe (``p`` from the first two probes,
    clamped to [1, 3]); geometric interpolation between probes; beyond the last probe, the last
    segment's geometric rate. The result is non-decreasing.
    """
    e = np.asarray(probes, dtype=np.float64)
    f = np.maximum.accumulate(np.maximum(np.asarray(values, dtype=np.float64), _KL_FLOOR))
    if len(e) == 0 or np.any(np.diff(e) <= 0) or e[0] <= 0:
        raise ValueError(f"probe levels must be positive and increasing, got {list(probes)}")
    g = np.asarray(grid, dtype=np.float64)
    out = np.empty_like(g)
    logf = np.log(f)
    if len(e) >= 2:
        p = (logf[1] - logf[0]) / (math.log(e[1]) - math.log(e[0]))
        p = min(max(p, 1.0), 3.0)
        rate = (logf[-1] - logf[-2]) / (e[-1] - e[-2])
    else:
        p, rate = 2.0, 0.0
    low = g < e[0]
    out[low] = f[0] * (np.maximum(g[low], 0.0) / e[0]) ** p
    mid = (g >= e[0]) & (g <= e[-1])
    out[mid] = np.exp(np.interp(g[mid], e, logf))
    high = g > e[-1]
    out[high] = np.exp(logf[-1] + rate * (g[high] - e[-1]))
    return np.maximum.accumulate(out)


def lower_hull(x: np.ndarray, y: np.ndarray) -> list[int]:
    """Indices of the lower convex hull of points sorted by ``x`` (Andrew's monotone chain)."""
    hull: list[int] = []
    for i in range(len(x)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b if it lies on or above the chord a -> i
            if (y[b] - y[a]) * (x[i] - x[a]) >= (y[i] - y[a]) * (x[b] - x[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def solve_levels(
    curves: Sequence[tuple[np.ndarray, np.ndarray]],
    layer_sizes: Sequence[float],
    targets: Sequence[float],
) -> np.ndarray:
    """Per-layer levels ``[len(targets), n_layers]`` minimizing the summed (convexified) cost.

    ``curves[l] = (levels, cost)``: layer ``l``'s cost sampled on increasing levels starting at
    0. Each row satisfies ``sum_l size_l * e_l == target * sum_l size_l`` (up to float error);
    every column is non-decreasing in the target. Targets above the smallest top level of the
    curves are refused.
    """
    sizes = np.asarray(layer_sizes, dtype=np.float64)
    if len(curves) != len(sizes):
        raise ValueError(f"{len(curves)} curves for {len(sizes)} layers")
    top = min(float(c[0][-1]) for c in curves)
    segments = []  # (slope per weight removed, layer, order, weights removed, level length)
    for layer, (lv, cost) in enumerate(curves):
        lv = np.asarray(lv, dtype=np.float64)
        cost = np.asarray(cost, dtype=np.float64)
        if lv[0] != 0 or np.any(np.diff(lv) <= 0):
            raise ValueError(f"curve {layer}: levels must start at 0 and increase")
        keep = lv <= top + 1e-12
        lv, cost = lv[keep], cost[keep]
        hull = lower_hull(lv, cost)
        for order, (a, b) in enumerate(zip(hull, hull[1:])):
            length = lv[b] - lv[a]
            removed = length * sizes[layer]
            segments.append(((cost[b] - cost[a]) / removed, layer, order, removed, length))
    segments.sort(key=lambda s: (s[0], s[1], s[2]))
    total = float(sizes.sum())
    out = np.zeros((len(targets), len(sizes)))
    for row, target in enumerate(targets):
        if not 0 <= target <= top + 1e-12:
            raise ValueError(f"target {target} outside [0, {top:.3f}] covered by the layer curves")
        budget = min(target, top) * total
        for _slope, layer, _order, removed, length in segments:
            if budget <= 0:
                break
            take = min(1.0, budget / removed)
            out[row, layer] += take * length
            budget -= take * removed
    return np.minimum(out, top)


# ---- measuring the per-layer sensitivities ---------------------------------------------------
def _layer_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


class _Tail:
    """Runs a causal LM from the input of decoder layer ``l`` to next-token log-probabilities."""

    def __init__(self, model: nn.Module, windows: torch.Tensor) -> None:
        self.model = model
        self.adapter = get_adapter(model)
        body = base_model(model)
        self.norm = getattr(body, "norm", None)
        self.head = model.get_output_embeddings()
        if self.norm is None or self.head is None:
            raise ValueError(
                f"{type(model).__name__} lacks a final `norm` or an output embedding; "
                "cross-layer allocation needs a decoder-only causal LM."
            )
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        x, self.layer_kwargs = capture_layer_inputs(model, windows)
        self.inputs: list[torch.Tensor] = []
        with torch.inference_mode():
            for i, layer in enumerate(self.adapter.layers):
                self.inputs.append(x)
                x = _layer_output(layer(x, **self.layer_kwargs[i]))
        self.final = x

    def hidden_from(self, start: int) -> torch.Tensor:
        """Final hidden states when running layers ``start..L-1`` from the cached dense input."""
        x = self.inputs[start]
        with torch.inference_mode():
            for i in range(start, len(self.adapter.layers)):
                x = _layer_output(self.adapter.layers[i](x, **self.layer_kwargs[i]))
        return x

    def log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 next-token log-probabilities ``[positions, vocab]`` from final hidden states."""
        h = hidden.reshape(-1, hidden.shape[-1])
        parts = []
        with torch.inference_mode():
            for s in range(0, len(h), _HEAD_CHUNK):
                parts.append(self._chunk_log_probs(h[s : s + _HEAD_CHUNK]))
        return torch.cat(parts)

    def _chunk_log_probs(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.norm(h)).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return F.log_softmax(logits, dim=-1)

    def kl_to(self, dense_lp: torch.Tensor, hidden: torch.Tensor) -> float:
        """Mean per-position KL(dense || model) in nats."""
        h = hidden.reshape(-1, hidden.shape[-1])
        total = 0.0
        with torch.inference_mode():
            for s in range(0, len(h), _HEAD_CHUNK):
                lp = self._chunk_log_probs(h[s : s + _HEAD_CHUNK])
                ref = dense_lp[s : s + _HEAD_CHUNK]
                total += float(F.kl_div(lp, ref, log_target=True, reduction="sum"))
        return total / len(h)


def _sparsify_layers(
    adapter: Adapter, thresholds: Thresholds, levels: dict[int, float], within: str
) -> dict[str, nn.Module]:
    """Swap in TealLinear for the projections of the given layers; return the originals."""
    originals: dict[str, nn.Module] = {}
    for layer, level in levels.items():
        if level <= 0:
            continue
        row = thresholds.sparsities(level, within)
        for p in PROJECTIONS:
            key = proj_key(layer, p)
            linear = dense_linear(adapter.projections()[key])
            originals[key] = linear
            module = TealLinear(linear, thresholds.threshold(key, row[key]),
                                thresholds.col_scale(key), prefill="sparse")
            adapter.replace(key, module)
    return originals


def _restore(adapter: Adapter, originals: dict[str, nn.Module]) -> None:
    for key, linear in originals.items():
        adapter.replace(key, linear)


def layer_sensitivities(
    model: nn.Module,
    thresholds: Thresholds,
    windows: torch.Tensor,
    probes: Sequence[float] = DEFAULT_PROBES,
    within: str = WITHIN,
    progress: bool = True,
    tail: _Tail | None = None,
) -> np.ndarray:
    """KL(dense || layer-l-sparse) per token, ``[n_layers, len(probes)]``.

    Only layer ``l`` is sparsified, at each probe level with the ``within`` table's split.
    """
    tail = tail or _Tail(model, windows)
    adapter = tail.adapter
    dense_lp = tail.log_probs(tail.final)
    out = np.zeros((len(adapter.layers), len(probes)))
    bar = tqdm(total=out.size, desc="layer sensitivity", unit="pass", disable=not progress)
    for layer in range(len(adapter.layers)):
        for j, e in enumerate(probes):
            originals = _sparsify_layers(adapter, thresholds, {layer: e}, within)
            try:
                out[layer, j] = tail.kl_to(dense_lp, tail.hidden_from(layer))
            finally:
                _restore(adapter, originals)
            bar.update()
    bar.close()
    return out


def joint_kl(
    thresholds: Thresholds, levels: Sequence[float], within: str, tail: _Tail, dense_lp: torch.Tensor,
) -> float:
    """KL(dense || sparse) per token with every layer ``l`` sparsified at ``levels[l]``."""
    originals = _sparsify_layers(tail.adapter, thresholds, dict(enumerate(levels)), within)
    try:
        return tail.kl_to(dense_lp, tail.hidden_from(0))
    finally:
        _restore(tail.adapter, originals)


# ---- fisher: per-projection damage curves from one backward pass -----------------------------
def weighted_histogram(scores: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sum of ``weights`` per bin of ``scores`` on :mod:`teal.stats`' grid (float64)."""
    s = scores.detach().reshape(-1).float()
    idx = (torch.log2(s) - stats.LOG2_MIN) * stats.BINS_PER_OCTAVE
    idx = torch.nan_to_num(idx, nan=0.0, neginf=-1.0, posinf=float(stats.NUM_BINS))
    idx = (idx.floor() + 1).clamp_(0, stats.NUM_BINS - 1).long()
    return torch.bincount(idx, weights=weights.detach().reshape(-1).double(),
                          minlength=stats.NUM_BINS)


def fisher_damage(
    model: nn.Module,
    thresholds: Thresholds,
    windows: torch.Tensor,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Per projection: ``sum (g_i x_i)^2`` per token, binned by the score of ``x_i``.

    ``g`` is the gradient, through that projection only, of the summed next-token loss for
    labels sampled from the model's own distribution (one draw per position, fixed ``seed``).
    """
    adapter = get_adapter(model)
    projections = adapter.projections()
    device = model_device(model)
    damage = {k: torch.zeros(stats.NUM_BINS, dtype=torch.float64, device=device)
              for k in projections}
    scales = {k: None if (c := thresholds.col_scale(k)) is None else c.to(device)
              for k in projections}
    inputs: dict[str, torch.Tensor] = {}
    hooks = []

    def add_hooks(key: str, module: nn.Module) -> None:
        def keep_input(_mod, args):
            inputs[key] = args[0].detach()

        def accumulate(_mod, grad_input, _grad_output):
            x = inputs.pop(key)
            score = x.abs().float()
            if scales[key] is not None:
                score = score * scales[key]
            damage[key] += weighted_histogram(score, (grad_input[0].float() * x.float()).pow(2))

        hooks.append(module.register_forward_pre_hook(keep_input))
        hooks.append(module.register_full_backward_hook(accumulate))

    for key, module in projections.items():
        add_hooks(key, module)
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    generator = torch.Generator(device="cpu").manual_seed(seed)
    embed = model.get_input_embeddings()
    try:
        for p, _ in grad_flags:
            p.requires_grad_(False)
        with torch.enable_grad():
            for i in tqdm(range(len(windows)), desc="fisher", unit="window", disable=not progress):
                ids = windows[i : i + 1].to(device)
                emb = embed(ids).detach().requires_grad_(True)
                logits = model(inputs_embeds=emb, use_cache=False).logits[0].float()
                with torch.no_grad():
                    probs = torch.softmax(logits, dim=-1).cpu()
                    labels = torch.multinomial(probs, 1, generator=generator)[:, 0].to(device)
                F.cross_entropy(logits, labels, reduction="sum").backward()
                inputs.clear()
    finally:
        for h in hooks:
            h.remove()
        for p, flag in grad_flags:
            p.requires_grad_(flag)
    n_tokens = windows.numel()
    return {k: (v / n_tokens).cpu() for k, v in damage.items()}


def damage_curve(
    thresholds: Thresholds, key: str, damage: torch.Tensor, grid: np.ndarray
) -> np.ndarray:
    """Predicted damage of projection ``key`` at every sparsity of ``grid`` (non-decreasing)."""
    total = float(damage.sum())
    if total <= 0:
        return np.zeros(len(grid))
    values = [
        0.0 if s <= 0 else stats.fraction_at_or_below(damage, thresholds.threshold(key, float(s)))
        * total
        for s in grid
    ]
    return np.maximum.accumulate(np.asarray(values))


def allocate_fisher(
    model: nn.Module,
    thresholds: Thresholds,
    data: str = "sotu",
    tokens: int = DEFAULT_FISHER_TOKENS,
    seq_len: int | None = DEFAULT_XL_SEQ_LEN,
    step: float = 0.025,
    max_level: float = 0.9,
    progress: bool = True,
    windows: torch.Tensor | None = None,
    tokenizer: Any = None,
    seed: int = 0,
    max_sparsity: float = FISHER_MAX_SPARSITY,
) -> Thresholds:
    """Add the ``fisher`` allocation table to ``thresholds`` (in place; also returned).

    Every projection gets its own level; rows: effective sparsity 0, step, ... ``max_level``.
    ``max_sparsity`` caps each projection's level.
    """
    if not max_level < max_sparsity <= 0.99:
        raise ValueError(f"max_sparsity must be in ({max_level}, 0.99], got {max_sparsity}")
    windows, source = prepare_allocation(model, thresholds, data, tokens, seq_len, step, max_level,
                               windows, tokenizer)
    t0 = time.perf_counter()
    damage = fisher_damage(model, thresholds, windows, seed, progress)
    keys = list(thresholds.proj_sizes)
    grid = np.linspace(0.0, max_sparsity, int(round(max_sparsity / FISHER_GRID_STEP)) + 1)
    curves = [(grid, damage_curve(thresholds, k, damage[k], grid)) for k in keys]
    levels = _level_grid(max_level, step)
    solution = solve_levels(curves, [thresholds.proj_sizes[k] for k in keys], levels)
    thresholds.allocations[FISHER] = {
        "levels": levels,
        "sparsities": {k: [float(v) for v in solution[:, j]] for j, k in enumerate(keys)},
        "step": step,
        "objective": "diagonal Fisher estimate of KL(dense || sparse), sampled labels",
        "predicted_kl": [
            0.5 * sum(float(np.interp(row[j], *curves[j])) for j in range(len(keys)))
            for row in solution
        ],
        "max_sparsity": max_sparsity,
        "seed": seed,
        "data": source,
        "tokens": int(windows.numel()),
        "seq_len": int(windows.shape[1]),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    thresholds.method = FISHER
    return thresholds


def _level_grid(top: float, step: float) -> list[float]:
    levels = [round(j * step, 6) for j in range(int(top / step + 1e-6) + 1)]
    if top - levels[-1] > 1e-6:
        levels.append(round(top, 6))
    return levels


def allocate_xl(model: nn.Module, thresholds: Thresholds, method: str, **kwargs: Any) -> Thresholds:
    """Dispatch for :func:`teal.allocate`: ``method`` is ``"fisher"`` or ``"cross-layer"``."""
    if method == FISHER:
        return allocate_fisher(model, thresholds, **kwargs)
    if method == CROSS_LAYER:
        return allocate_cross_layer(model, thresholds, **kwargs)
    raise ValueError(f"unknown cross-layer allocation method {method!r}; choose one of {METHODS}")


# ---- the allocation ------------------------------------------------------------------------
def allocate_cross_layer(
    model: nn.Module,
    thresholds: Thresholds,
    data: str = "sotu",
    tokens: int = DEFAULT_XL_TOKENS,
    seq_len: int | None = DEFAULT_XL_SEQ_LEN,
    step: float = 0.025,
    max_level: float = 0.9,
    progress: bool = True,
    windows: torch.Tensor | None = None,
    tokenizer: Any = None,
    probes: Sequence[float] = DEFAULT_PROBES,
    check_levels: Sequence[float] = DEFAULT_CHECK_LEVELS,
) -> Thresholds:
    """Add the ``cross-layer`` allocation table to ``thresholds`` (in place; also returned).

    Needs the within-layer ``greedy`` table; when the artifact lacks it, it is computed first
    (on the same windows). Rows: effective sparsity 0, step, ... up to ``max_level`` (capped by
    the greedy table's top). ``check_levels``: levels at which the joint KL of this allocation
    and of greedy are measured and stored beside the additive prediction (``"check"``).
    """
    windows, source = prepare_allocation(model, thresholds, data, tokens, seq_len, step, max_level,
                               windows, tokenizer)
    t0 = time.perf_counter()
    if WITHIN not in thresholds.allocations:
        previous = thresholds.method
        allocate_greedy(model, thresholds, windows=windows, step=step, max_level=max_level, progress=progress)
        thresholds.method = previous
    top = min(max_level, float(thresholds.allocations[WITHIN]["levels"][-1]))
    probes = sorted(float(p) for p in probes if 0 < p <= top + 1e-9)
    if len(probes) < 2:
        raise ValueError(f"need at least two probe levels in (0, {top:.3f}], got {probes}")

    windows = windows.to(model_device(model))
    tail = _Tail(model, windows)
    kl = layer_sensitivities(model, thresholds, windows, probes, WITHIN, progress, tail)
    n_layers = len(tail.adapter.layers)
    sizes = [
        sum(thresholds.proj_sizes[proj_key(i, p)] for p in PROJECTIONS) for i in range(n_layers)
    ]
    n_curve = int(round(top / CURVE_STEP))
    grid_curve = np.linspace(0.0, top, n_curve + 1)
    curves = [(grid_curve, interpolate_curve(probes, kl[i], grid_curve)) for i in range(n_layers)]
    levels = _level_grid(top, step)
    per_layer = solve_levels(curves, sizes, levels)

    table: dict[str, list[float]] = {k: [] for k in thresholds.proj_sizes}
    for row in per_layer:
        for i, e in enumerate(row):
            within_row = thresholds.sparsities(float(e), WITHIN)
            for p in PROJECTIONS:
                key = proj_key(i, p)
                table[key].append(within_row[key])

    check = []
    if check_levels:
        dense_lp = tail.log_probs(tail.final)
        for level in check_levels:
            if not 0 < level <= top:
                continue
            j = int(np.argmin(np.abs(np.asarray(levels) - level)))
            mine = per_layer[j]
            predicted = sum(float(np.interp(mine[i], *curves[i])) for i in range(n_layers))
            check.append({
                "level": levels[j],
                "kl_predicted": predicted,
                "kl_measured": joint_kl(thresholds, mine, WITHIN, tail, dense_lp),
                f"kl_measured_{WITHIN}": joint_kl(thresholds, [levels[j]] * n_layers, WITHIN, tail, dense_lp),
            })
    thresholds.allocations[CROSS_LAYER] = {
        "levels": levels,
        "sparsities": table,
        "step": step,
        "within": WITHIN,
        "layer_levels": [[round(float(e), 6) for e in row] for row in per_layer],
        "probes": probes,
        "layer_kl": [[float(v) for v in row] for row in kl],
        "objective": "mean KL(dense || sparse) per token, summed over layers",
        "check": check,
        "data": source,
        "tokens": int(windows.numel()),
        "seq_len": int(windows.shape[1]),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    thresholds.method = CROSS_LAYER
    return thresholds


__all__ = [
    "FISHER",
    "CROSS_LAYER",
    "METHODS",
    "allocate_cross_layer",
    "allocate_fisher",
    "allocate_xl",
    "damage_curve",
    "fisher_damage",
    "weighted_histogram",
    "interpolate_curve",
    "joint_kl",
    "layer_sensitivities",
    "lower_hull",
    "solve_levels",
]
