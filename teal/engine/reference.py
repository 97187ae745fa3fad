"""Checks of the engine against HF transformers, and thresholds measured through the engine itself.

Used by the tests (CPU, fp32) and by `teal.bench.decode` before timing (GPU, bf16).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence

import torch

from teal.engine.model import GROUP_SITE, GROUPS, PROJECTIONS, Engine

PROJ_SITE = {p: GROUP_SITE[g] for g, projs in GROUPS.items() for p in projs}
_HF_MODULE = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def keep_mask(x: torch.Tensor, threshold: float, col_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The TEAL rule: entry i survives iff |x_i| * c_i > t (ties zeroed)."""
    score = x.abs().float()
    if col_scale is not None:
        score = score * col_scale.to(score.device)
    return score > threshold


@torch.no_grad()
def masked_hf_logits(
    model: torch.nn.Module,
    ids: torch.Tensor,
    thresholds: Mapping[str, float],
    dense_prefix: int,
    col_scales: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Logits [T, V] of an HF Llama-family model over ids [T], with the input of every projection
    masked by its threshold at positions >= dense_prefix (dense prompt, sparse generated tokens)."""
    hooks = []

    def make_hook(key: str):
        def hook(_module, args):
            x = args[0]
            keep = keep_mask(x, thresholds[key], None if col_scales is None else col_scales[key])
            keep[..., :dense_prefix, :] = True
            return (x * keep.to(x.dtype),) + tuple(args[1:])

        return hook

    try:
        for key in thresholds:
            _, layer, proj = key.split(".")
            module = model.get_submodule(f"model.layers.{layer}.{_HF_MODULE[proj]}")
            hooks.append(module.register_forward_pre_hook(make_hook(key)))
        return model(ids.to(next(model.parameters()).device)[None]).logits[0]
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def activation_thresholds(
    engine: Engine,
    ids: torch.Tensor,
    sparsity: float | Mapping[str, float],
    col_scales: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Thresholds that zero a fraction `sparsity` (one level, or one per projection key) of each
    projection's inputs over a dense prefill of ids [T] through the engine."""
    return activation_threshold_levels(engine, ids, [sparsity], col_scales)[0]


@torch.no_grad()
def activation_threshold_levels(
    engine: Engine,
    ids: torch.Tensor,
    levels: Sequence[float | Mapping[str, float]],
    col_scales: Mapping[str, torch.Tensor] | None = None,
) -> list[dict[str, float]]:
    """`activation_thresholds` for several levels from one prefill (scores sorted once)."""
    sites: dict[tuple[int, str], torch.Tensor] = {}

    def observe(layer: int, site: str, x: torch.Tensor) -> None:
        sites[(layer, site)] = x.detach().abs().float().flatten()

    engine.prefill(ids.to(engine.device), observer=observe)
    out: list[dict[str, float]] = [{} for _ in levels]
    for i in range(engine.config.n_layers):
        for p in PROJECTIONS:
            key = f"layers.{i}.{p}"
            score = sites[(i, PROJ_SITE[p])]
            if col_scales is not None:
                score = (score.view(-1, col_scales[key].numel()) * col_scales[key].to(score.device)).flatten()
            ordered = score.sort().values.cpu()
            for j, level in enumerate(levels):
                s = float(level[key] if isinstance(level, Mapping) else level)
                if s <= 0.0:
                    out[j][key] = -1.0
                else:
                    k = max(1, min(ordered.numel(), round(s * ordered.numel())))
                    out[j][key] = float(ordered[k - 1])
    return out


@torch.no_grad()
def decode_sparsity(
    engine: Engine,
    ids: torch.Tensor,
    steps: int,
    thresholds: Mapping[str, float],
    col_scales: Mapping[str, torch.Tensor] | None = None,
    tokens: Sequence[int] | None = None,
) -> tuple[float, dict[str, float]]:
    """Measured sparsity of `steps` decode steps after a dense prefill of ids [T], eagerly: greedy, or fed
    `tokens` (teacher-forced: step i decodes tokens[i], e.g. the tokens a timed generation produced).

    Returns (effective sparsity weighted by each projection's parameter count, per-projection values).
    """
    zeros: dict[str, float] = defaultdict(float)
    totals: dict[str, float] = defaultdict(float)

    def observe(layer: int, site: str, x: torch.Tensor) -> None:
        for p in (p for p, s in PROJ_SITE.items() if s == site):
            key = f"layers.{layer}.{p}"
            keep = keep_mask(x, thresholds[key], None if col_scales is None else col_scales[key])
            zeros[key] += float((~keep).sum())
            totals[key] += keep.numel()

    ids = ids.to(engine.device)
    logits = engine.prefill(ids)
    token = logits.argmax(-1)
    if tokens is not None and len(tokens) < steps:
        raise ValueError(f"decode_sparsity: {steps} steps need at least {steps} tokens, got {len(tokens)}")
    for step in range(steps):
        pos = torch.tensor([ids.shape[0] + step], device=engine.device)
        if tokens is not None:
            token = torch.tensor([int(tokens[step])], device=engine.device)
        token = engine.decode(token, pos, observer=observe).argmax(-1)
    per = {k: zeros[k] / totals[k] for k in totals}
    sizes = engine.config.projection_shapes()
    weight = {k: math.prod(sizes[k.split(".")[2]]) for k in per}
    effective = sum(per[k] * weight[k] for k in per) / sum(weight.values())
    return effective, per
