"""Make a random-weight engine's activations follow a real model's keep profile, without touching the engine.

In a random-weight model every channel of a site is alike, so survivors are scattered uniformly. Scaling
channel c of a site by a factor f_c scales |x_c|, and with it how often |x_c| clears the site's threshold.
`ProfileShaper.apply` picks, for every layer and site, the factors that make channel c survive a common
threshold t at the rate p_c of the profile (stretched to the engine's widths, `teal.bench.masks`):

- q|k|v and gate|up inputs (``attn_in``, ``mlp_in``): the RMSNorm weight of channel c (Gemma's ``1 + w``
  as a whole);
- o's input (``attn_out``): column c of v (attention mixes v's channels over positions, never across them;
  with grouped KV heads one v channel feeds the heads of its group, so the profile is stretched head by head
  to the v channels and shared by the group's heads);
- down's input (``mlp_mid``): column c of up (act(gate) * up is linear in up).

f_c = t / q_c, where q_c is the (1 - p_c) quantile of |x_c| over a dense prefill of random tokens with
every earlier site already shaped (measured site by site, in the order the forward pass meets them: the
observer stops the prefill at the site it waits for), and t the median q_c (factors around 1). The engine's
kernels, thresholds and code paths are the ones timed with random masks; only the weights' values change.
The bench then calibrates thresholds as usual (quantiles of |x|) and measures the sparsity on the decode
steps; `keep_rates` measures each channel's decode keep rate against its target.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from teal.bench.masks import MaskSource, channel_rate_fit, imbalance

SITE_ORDER = ("attn_in", "attn_out", "mlp_in", "mlp_mid")
SITE_PROJ = {"attn_in": "q", "attn_out": "o", "mlp_in": "gate", "mlp_mid": "down"}
MAX_FACTOR = 1e3  # factors are kept within [median / MAX_FACTOR, median * MAX_FACTOR]


class _Stop(Exception):
    """Raised by the observer once the site it waits for has been seen."""


def _groups(engine: Any, site: str) -> tuple[int, int]:
    """(number of scale groups, channels per group) of a site; a group's channels share one factor."""
    cfg = engine.config
    if site == "attn_out":
        return cfg.n_kv_heads * cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
    if site == "mlp_mid":
        return cfg.intermediate, 1
    return cfg.hidden, 1


def _grouped(engine: Any, site: str, x: torch.Tensor) -> torch.Tensor:
    """|x| [T, K] as [groups, samples]: row g holds every token's value of every channel in group g."""
    x = x.abs().float().reshape(-1, x.shape[-1])
    if site != "attn_out":
        return x.t()
    cfg = engine.config
    rep = cfg.n_heads // cfg.n_kv_heads
    t = x.shape[0]
    # channel h * head_dim + d, head h reads kv head h // rep: group (h // rep, d)
    v = x.view(t, cfg.n_kv_heads, rep, cfg.head_dim).permute(1, 3, 0, 2)
    return v.reshape(cfg.n_kv_heads * cfg.head_dim, t * rep)


def expand_groups(engine: Any, site: str, values: torch.Tensor) -> torch.Tensor:
    """Per-group values [groups] as per-channel values [K] of the site."""
    if site != "attn_out":
        return values
    cfg = engine.config
    rep = cfg.n_heads // cfg.n_kv_heads
    v = values.view(cfg.n_kv_heads, 1, cfg.head_dim).expand(cfg.n_kv_heads, rep, cfg.head_dim)
    return v.reshape(-1)


def row_quantiles(rows: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Quantile q[g] of each row g of [G, n] (linear interpolation between order statistics)."""
    ordered = rows.sort(dim=1).values
    n = ordered.shape[1]
    pos = q.double().clamp(0, 1).to(ordered.device) * (n - 1)
    lo = pos.floor().long().clamp(max=n - 1)
    hi = (lo + 1).clamp(max=n - 1)
    w = (pos - lo).to(ordered.dtype)
    return ordered.gather(1, lo[:, None])[:, 0] * (1 - w) + ordered.gather(1, hi[:, None])[:, 0] * w


@dataclass
class ProfileShaper:
    """Scales a random-weight engine's channels in place so that its survivors follow a keep profile."""

    engine: Any
    factors: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)  # applied, per group (fp32)
    targets: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)  # per channel, of the last apply
    source: str = "random"

    def __post_init__(self) -> None:
        if self.engine.weight_format != "bf16":
            raise ValueError(f"shaping scales the weights' values; {self.engine.weight_format} codes are not supported")

    # ---- weights -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def _scale(self, layer: int, site: str, factor: torch.Tensor) -> None:
        """Multiply the weights that produce the site's channels by ``factor`` [groups]."""
        eng, cfg = self.engine, self.engine.config
        w = eng.layers[layer]
        f = factor.to(eng.device)
        if site in ("attn_in", "mlp_in"):
            norm = w.attn_norm if site == "attn_in" else w.mlp_norm
            off = cfg.norm_offset
            norm.copy_(((off + norm.float()) * f - off).to(norm.dtype))
            return
        if site == "attn_out":
            fused, bias, start = w.qkv, w.qkv_bias, cfg.q_size + cfg.kv_size
        else:
            fused, bias, start = w.gate_up, w.gate_up_bias, cfg.intermediate
        cols = slice(start, start + f.numel())
        if eng.transposed:
            fused[:, cols] = (fused[:, cols].float() * f[None, :]).to(fused.dtype)
        else:
            fused[cols, :] = (fused[cols, :].float() * f[:, None]).to(fused.dtype)
        if bias is not None:
            bias[cols] = (bias[cols].float() * f).to(bias.dtype)

    def _capture(self, ids: torch.Tensor, layer: int, site: str) -> torch.Tensor:
        got: dict[str, torch.Tensor] = {}

        def observe(i: int, s: str, x: torch.Tensor) -> None:
            if i == layer and s == site:
                got["x"] = x.detach().clone()
                raise _Stop

        with torch.inference_mode():
            try:
                self.engine.prefill(ids, observer=observe)
            except _Stop:
                pass
        return got["x"]

    # ---- public ------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Undo every factor applied (the random engine again, up to bf16 rounding)."""
        for (layer, site), f in self.factors.items():
            self._scale(layer, site, 1.0 / f)
        self.factors.clear()
        self.targets.clear()
        self.source = "random"

    def apply(self, source: MaskSource, sparsity: float, ids: list[torch.Tensor] | torch.Tensor,
              seed: int = 0) -> dict[str, Any]:
        """Shape every layer's four sites to ``source`` at ``sparsity`` (a random source resets), measured on
        prefills of ``ids`` (one tensor of token ids, or several whose activations are pooled). Returns a
        summary: the factors' spread per site kind."""
        self.reset()
        if source.is_random:
            return {"masks": "random"}
        prompts = [ids] if isinstance(ids, torch.Tensor) else list(ids)
        spread: dict[str, list[float]] = {s: [] for s in SITE_ORDER}
        for layer in range(self.engine.config.n_layers):
            for site in SITE_ORDER:
                groups, _ = _groups(self.engine, site)
                p = source.probabilities(site, layer, groups, sparsity, seed, self.engine.config.head_dim)
                rows = torch.cat([_grouped(self.engine, site, self._capture(x, layer, site)) for x in prompts], dim=1)
                q = row_quantiles(rows, 1.0 - p).double().cpu().clamp_min(1e-30)
                t = q.median()
                f = (t / q).clamp(1.0 / MAX_FACTOR, MAX_FACTOR)
                self._scale(layer, site, f)
                self.factors[(layer, site)] = f.float()
                self.targets[(layer, site)] = expand_groups(self.engine, site, p)
                spread[site].append(float(f.log().std()))
        self.source = source.spec
        return {"masks": source.spec, "sparsity": sparsity, "calibration_tokens": sum(x.numel() for x in prompts),
                "log_factor_std": {s: sum(v) / len(v) for s, v in spread.items()}}


@torch.no_grad()
def decode_thresholds(engine: Any, ids: torch.Tensor, steps: int, sparsity: float) -> dict[str, float]:
    """Thresholds that zero the fraction ``sparsity`` of each projection's inputs over ``steps`` greedy eager
    decode steps after a dense prefill of ``ids``: measured where the timed steps run (the prompt's positions
    see shorter attention averages than the decode steps', so prefill quantiles drift from the target)."""
    from teal.engine.model import PROJECTIONS
    from teal.engine.reference import PROJ_SITE

    values: dict[tuple[int, str], list[torch.Tensor]] = {}

    def observe(layer: int, site: str, x: torch.Tensor) -> None:
        values.setdefault((layer, site), []).append(x.detach().abs().float().flatten())

    engine.set_thresholds(None)
    ids = ids.to(engine.device)
    token = engine.prefill(ids).argmax(-1)
    for step in range(steps):
        pos = torch.tensor([ids.shape[0] + step], device=engine.device)
        token = engine.decode(token, pos, observer=observe).argmax(-1)
    out: dict[str, float] = {}
    for (layer, site), chunks in values.items():
        ordered = torch.cat(chunks).sort().values
        k = max(1, min(ordered.numel(), round(sparsity * ordered.numel())))
        t = float(ordered[k - 1]) if sparsity > 0 else -1.0
        for p in PROJECTIONS:
            if PROJ_SITE[p] == site:
                out[f"layers.{layer}.{p}"] = t
    return out


@torch.no_grad()
def keep_rates(engine: Any, ids: torch.Tensor, steps: int, thresholds: dict[str, float],
               tokens: list[int] | None = None) -> dict[tuple[int, str], torch.Tensor]:
    """Survivor masks [steps, K] of every (layer, site) over ``steps`` eager decode steps after a dense prefill
    of ``ids`` (teacher-forced with ``tokens`` where given), under each site's threshold (q's, o's, gate's
    and down's: the uniform level shares it)."""
    masks: dict[tuple[int, str], list[torch.Tensor]] = {}

    def observe(layer: int, site: str, x: torch.Tensor) -> None:
        t = thresholds[f"layers.{layer}.{SITE_PROJ[site]}"]
        masks.setdefault((layer, site), []).append((x.abs().float() > t).reshape(-1, x.shape[-1]).cpu())

    ids = ids.to(engine.device)
    token = engine.prefill(ids).argmax(-1)
    for step in range(steps):
        pos = torch.tensor([ids.shape[0] + step], device=engine.device)
        if tokens is not None:
            token = torch.tensor([int(tokens[step])], device=engine.device)
        token = engine.decode(token, pos, observer=observe).argmax(-1)
    return {key: torch.cat(v) for key, v in masks.items()}


def mask_report(masks: dict[tuple[int, str], torch.Tensor], targets: dict[tuple[int, str], torch.Tensor] | None
                ) -> dict[str, Any]:
    """Per site kind: the decode masks' imbalance over static channel splits (all layers' steps together),
    their keep rate, and (where targets are given) how the per-channel rates follow the profile's."""
    out: dict[str, Any] = {}
    for site in SITE_ORDER:
        keys = sorted(k for k in masks if k[1] == site)
        if not keys:
            continue
        stacked = torch.cat([masks[k] for k in keys])
        entry: dict[str, Any] = {"keep_rate": float(stacked.float().mean()), "imbalance": imbalance(stacked)}
        if targets:
            rates = torch.cat([masks[k].float().mean(dim=0) for k in keys])
            target = torch.cat([targets[k] for k in keys])
            entry["channel_fit"] = channel_rate_fit(target, rates)
            # per step: the targets of the channels kept and of those zeroed (greedy decoding of random weights
            # repeats tokens, which blurs rates over steps but not which channels each step keeps); a sampler
            # with exactly the target probabilities would give the ideal_ values
            kept = sum(float((masks[k].double() * targets[k]).sum()) for k in keys)
            zeroed = sum(float(((~masks[k]).double() * targets[k]).sum()) for k in keys)
            n_kept = sum(float(masks[k].sum()) for k in keys)
            n_zeroed = sum(float((~masks[k]).sum()) for k in keys)
            t = target.double()
            entry["target_of_kept"] = kept / max(n_kept, 1.0)
            entry["target_of_zeroed"] = zeroed / max(n_zeroed, 1.0)
            entry["ideal_target_of_kept"] = float((t * t).sum() / t.sum())
            entry["ideal_target_of_zeroed"] = float((t * (1 - t)).sum() / (1 - t).sum())
        out[site] = entry
    return out


__all__ = ["ProfileShaper", "decode_thresholds", "expand_groups", "keep_rates", "mask_report", "row_quantiles"]
