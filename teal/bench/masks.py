"""Survivor masks for the benchmarks: uniformly random, or drawn from a real model's keep profile.

Random weights give uniformly scattered survivors; real models keep some channels almost always and others
rarely (`teal.keep_profile` records how often). To time the kernels on realistic masks, a recorded
profile (SmolLM2 at width 576, Gemma 3 at 640, ...) is

1. stretched to the benchmark's width (`stretch`): the sorted frequencies are interpolated at the new
   width's quantile positions (the distribution's shape is kept), shifted on the logit scale so that
   their mean is exactly the target keep rate 1 - s, and spread over the channels by a random permutation
   with a fixed seed (channel order in a real model's hidden and MLP widths is arbitrary: a permutation
   of the units is the same model; `index_structure` measures what a recorded order holds beyond that).
   o's input is not arbitrary: its channels come in attention heads, and whole heads are mostly silent
   (SmolLM2 at 50 %: the spread of 8 blocks' means is 4x that of the same channels permuted). It is
   stretched head by head (`stretch_blocks`): whole source heads, each stretched within itself;
2. sampled (`sample_masks`): each token draws its keep rate from the profile's per-token quantiles
   (real tokens differ in how many channels survive), its channel probabilities are the profile's
   shifted to that rate, and exactly round(rate * K) survivors are drawn with those inclusion
   probabilities (systematic sampling in a random order: channel c survives with probability p_c exactly).
   Uniform masks ("random") are the same sampler with every p_c = 1 - s and no rate variation.

`inputs_for_masks` turns masks into inputs of the threshold rule (|x| > 1 exactly where the mask is set),
and `imbalance` measures how unevenly survivors fall on static, contiguous channel splits (one per SM, or
per split-K slice): a split by channel index is what real patterns can starve.

Spelling on the command line: ``--masks random`` or ``--masks real:PROFILE`` (a file, or a name under
benchmarks/profiles/, e.g. ``real:smollm2-135m``); several, comma-separated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from teal.keep_profile import KeepProfile, KeepProfileError

PROFILE_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "profiles"
# the benchmark projection groups and the site that feeds each
GROUP_SITE = {"qkv": "attn_in", "o": "attn_out", "gate_up": "mlp_in", "down": "mlp_mid"}
IMBALANCE_PARTS = (8, 32, 132)  # static splits measured by `imbalance` (132: one per H100 SM)
_EPS = 1e-9


@dataclass(frozen=True)
class MaskSource:
    """``random`` or a recorded profile (``real:NAME``)."""

    spec: str
    profile: KeepProfile | None = None
    _stretched_cache: dict = field(default_factory=dict, compare=False, repr=False)  # reused across rows

    @property
    def is_random(self) -> bool:
        return self.profile is None

    def check_levels(self, sparsities: list[float] | tuple[float, ...]) -> None:
        """Raise KeepProfileError naming the sparsities (> 0) the profile lacks."""
        if self.profile is None:
            return
        have = {round(v, 6) for v in self.profile.levels}
        missing = [s for s in sparsities if s > 0 and round(s, 6) not in have]
        if missing:
            raise KeepProfileError(
                f"--masks {self.spec}: the profile has sparsities {', '.join(f'{v:g}' for v in self.profile.levels)}; "
                f"{', '.join(f'{v:g}' for v in missing)} not among them (ask only for those, or record them)")

    def probabilities(self, site: str, layer: int, width: int, sparsity: float, seed: int = 0,
                      head_dim: int | None = None) -> torch.Tensor:
        """Per-channel keep probabilities [width] (float64) of one layer's site at ``sparsity``. o's input
        (``attn_out``) with ``head_dim``: stretched head by head (`stretch_blocks`), the recorded model's heads
        being its attention heads."""
        rate = 1.0 - sparsity
        if self.profile is None:
            return torch.full((width,), rate, dtype=torch.float64)
        key = (site, layer, width, round(sparsity, 9), seed, head_dim)
        if key not in self._stretched_cache:
            self._stretched_cache[key] = self._stretched(site, layer, width, sparsity, seed, head_dim)
        return self._stretched_cache[key]

    def _stretched(self, site: str, layer: int, width: int, sparsity: float, seed: int, head_dim: int | None
                   ) -> torch.Tensor:
        rate = 1.0 - sparsity
        freqs = self.profile.frequencies(sparsity, site)
        source = freqs[layer % len(freqs)]
        heads = (self.profile.info.get("model") or {}).get("num_attention_heads")
        if site == "attn_out" and head_dim and heads and source.numel() % int(heads) == 0 and width % head_dim == 0:
            return stretch_blocks(source, source.numel() // int(heads), width, head_dim, rate=rate,
                                  seed=_seed(seed, layer, site))
        return stretch(source, width, rate=rate, seed=_seed(seed, layer, site))

    def rate_quantiles(self, site: str, layer: int, sparsity: float) -> torch.Tensor | None:
        if self.profile is None or not self.profile.token_quantiles:
            return None
        q = self.profile.rate_quantiles(sparsity, site)
        return q[layer % len(q)]


def _seed(seed: int, layer: int, site: str) -> int:
    return (seed * 1_000_003 + layer * 101 + GROUP_SITE_INDEX[site]) % (2**31)


GROUP_SITE_INDEX = {"attn_in": 0, "attn_out": 1, "mlp_in": 2, "mlp_mid": 3}


def parse_masks(text: str) -> list[MaskSource]:
    """``random`` and ``real:PROFILE`` entries of a comma list (KeepProfileError naming a bad one)."""
    out = []
    for spec in [v.strip() for v in text.split(",") if v.strip()]:
        if spec == "random":
            out.append(MaskSource("random"))
        elif spec.startswith("real:") and spec[5:]:
            out.append(MaskSource(spec, resolve_profile(spec[5:])))
        else:
            raise KeepProfileError(f"--masks takes a comma list of random and real:PROFILE, got {spec!r}")
    if not out:
        raise KeepProfileError("--masks is empty: give random and/or real:PROFILE")
    if len({m.spec for m in out}) != len(out):
        raise KeepProfileError(f"--masks lists an entry twice: {text!r}")
    return out


def resolve_profile(name: str) -> KeepProfile:
    """A profile file path, or a name under benchmarks/profiles/ (``smollm2-135m``)."""
    path = Path(name)
    if not path.is_file():
        path = PROFILE_DIR / f"{name}.safetensors"
    if not path.is_file():
        have = sorted(p.stem for p in PROFILE_DIR.glob("*.safetensors")) if PROFILE_DIR.is_dir() else []
        raise KeepProfileError(f"no keep profile {name!r}: not a file, nor a name in "
                               f"{PROFILE_DIR} (it has: {', '.join(have) or 'none'})")
    return KeepProfile.load(path)


# ---- profiles ---------------------------------------------------------------------------------------
def _logit(p: torch.Tensor) -> torch.Tensor:
    p = p.double().clamp(_EPS, 1 - _EPS)
    return torch.log(p) - torch.log1p(-p)


def _shift(logit: torch.Tensor, rates: torch.Tensor) -> torch.Tensor:
    """Per rate [R], the d with mean(sigmoid(logit + d)) = rate (bisection; the mean increases with d)."""
    rates = rates.reshape(-1, 1)
    lo = torch.full_like(rates, -40.0)
    hi = torch.full_like(rates, 40.0)
    for _ in range(64):
        mid = (lo + hi) / 2
        above = torch.sigmoid(logit + mid).mean(dim=-1, keepdim=True) > rates
        hi = torch.where(above, mid, hi)
        lo = torch.where(above, lo, mid)
    return ((lo + hi) / 2).flatten()


def shift_to_rate(p: torch.Tensor, rate: torch.Tensor | float) -> torch.Tensor:
    """``sigmoid(logit(p) + d)`` with d such that the mean over the channels equals ``rate`` (one rate: [K];
    a [T] tensor of rates: [T, K]). Order-preserving; 0 and 1 move only by 1e-9."""
    rate_t = torch.as_tensor(rate, dtype=torch.float64)
    if bool(((rate_t < 0) | (rate_t > 1)).any()):
        raise ValueError(f"keep rates must lie in [0, 1], got {rate_t.min().item()}..{rate_t.max().item()}")
    logit = _logit(p.flatten())
    flat, inverse = rate_t.flatten().unique(return_inverse=True)
    if flat.numel() > 16:  # many rates: bisect on a grid of them, interpolate d (smooth and increasing in rate)
        grid = torch.linspace(float(flat.min()), float(flat.max()), 33, dtype=torch.float64)
        d_grid = _shift(logit, grid)
        pos = (flat - grid[0]) / max(float(grid[1] - grid[0]), 1e-300)
        i = pos.floor().long().clamp(0, 31)
        w = (pos - i).clamp(0, 1)
        d = d_grid[i] * (1 - w) + d_grid[i + 1] * w
    else:
        d = _shift(logit, flat)
    d = d[inverse.flatten()]
    out = torch.sigmoid(logit[None, :] + d[:, None])
    return out.reshape(*rate_t.shape, -1) if rate_t.dim() else out[0]


def stretch(freqs: torch.Tensor, width: int, *, rate: float | None = None, seed: int = 0) -> torch.Tensor:
    """A profile of ``width`` channels with the distribution of ``freqs``: the sorted values interpolated at
    the new width's quantile positions, shifted to mean ``rate`` (None: kept as they are), then permuted
    with a fixed seed. float64 [width]."""
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    src = freqs.double().flatten().sort().values
    k = src.numel()
    if k == 0:
        raise ValueError("an empty profile cannot be stretched")
    pos = (torch.arange(width, dtype=torch.float64) + 0.5) / width * k - 0.5  # source index of each quantile
    pos = pos.clamp(0, k - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=k - 1)
    frac = pos - lo
    values = src[lo] * (1 - frac) + src[hi] * frac
    if rate is not None:
        values = shift_to_rate(values, rate)
    gen = torch.Generator().manual_seed(int(seed))
    return values[torch.randperm(width, generator=gen)]


def stretch_blocks(freqs: torch.Tensor, src_block: int, width: int, dst_block: int, *, rate: float | None = None,
                   seed: int = 0) -> torch.Tensor:
    """`stretch` for a profile made of blocks whose channels belong together (o's input: one block per attention
    head, and heads differ: some are mostly silent). Destination block j takes the source block at quantile
    position (j + 0.5) / n_dst of the blocks sorted by mean frequency, stretched (and permuted) within itself
    to ``dst_block`` channels; the blocks are then permuted with a fixed seed and the whole shifted to mean
    ``rate``. Keeps the distribution of block means and each block's own distribution. float64 [width]."""
    f = freqs.double().flatten()
    if f.numel() % src_block or width % dst_block:
        raise ValueError(f"block sizes must divide the widths: {f.numel()} / {src_block}, {width} / {dst_block}")
    src = f.view(-1, src_block)
    n_src, n_dst = src.shape[0], width // dst_block
    order = src.mean(dim=1).argsort()
    pick = ((torch.arange(n_dst, dtype=torch.float64) + 0.5) / n_dst * n_src - 0.5).round().long().clamp(0, n_src - 1)
    blocks = torch.stack([stretch(src[order[i]], dst_block, seed=seed * 7919 + j) for j, i in enumerate(pick.tolist())])
    gen = torch.Generator().manual_seed(int(seed))
    values = blocks[torch.randperm(n_dst, generator=gen)].flatten()
    return shift_to_rate(values, rate) if rate is not None else values


def index_structure(freqs: torch.Tensor, parts: int, seed: int = 0) -> dict[str, float]:
    """How much a profile's channel order matters: the spread (std / mean) of the mean keep frequency over
    ``parts`` contiguous blocks, in the recorded order and after a random permutation."""
    f = freqs.double().flatten()
    usable = f.numel() // parts * parts

    def spread(v: torch.Tensor) -> float:
        blocks = v[:usable].view(parts, -1).mean(dim=1)
        return float(blocks.std() / blocks.mean().clamp_min(1e-12))

    perm = torch.randperm(f.numel(), generator=torch.Generator().manual_seed(seed))
    return {"recorded_order": spread(f), "permuted": spread(f[perm])}


# ---- masks ------------------------------------------------------------------------------------------
def token_rates(quantiles: list[torch.Tensor], counts: list[int], rate: float,
                generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Per-token keep rates for groups of tokens (``counts[i]`` tokens drawing from ``quantiles[i]`` [Q], the
    quantiles of a real model's per-token keep fraction): stratified over all the tokens together, each
    re-centred on ``rate`` (the quantiles' own mean removed), then shifted so that the mean over all tokens is
    exactly ``rate`` (a handful of tokens then averages to the target, not to a random draw near it)."""
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    total = sum(counts)
    u = (torch.randperm(total, generator=gen).double() + torch.rand(total, generator=gen, dtype=torch.float64)) / total
    out, start = [], 0
    for q, n in zip(quantiles, counts):
        q = q.double().flatten()
        grid = torch.linspace(0, 1, q.numel(), dtype=torch.float64)
        uu = u[start:start + n]
        idx = (uu * (q.numel() - 1)).floor().long().clamp(max=q.numel() - 2)
        w = (uu - grid[idx]) / (grid[idx + 1] - grid[idx])
        out.append(q[idx] * (1 - w) + q[idx + 1] * w - q.mean() + rate)
        start += n
    allr = torch.cat(out)
    shift = rate - float(allr.mean())
    return [(r + shift).clamp(1e-6, 1 - 1e-6) for r in out]


def sample_masks(
    p: torch.Tensor,
    n_tokens: int,
    *,
    rate_quantiles: torch.Tensor | None = None,
    rates: torch.Tensor | None = None,
    exact_count: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Survivor masks [n_tokens, K] (bool) with per-channel keep probabilities ``p`` [K].

    ``rate_quantiles`` [Q] (quantiles of a real model's per-token keep fraction): each token's rate is drawn
    from them (stratified over the tokens) and re-centred on mean(p), and its probabilities are p shifted to
    that rate; None: every token keeps mean(p) of the channels. ``exact_count``: each token keeps exactly
    round(rate * K) channels (systematic sampling in a random order, inclusion probabilities exactly the
    token's p); else independent Bernoulli draws. ``rates`` [n_tokens]: the tokens' rates, given (`token_rates`).
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    p = p.double().flatten()
    k = p.numel()
    mean = float(p.mean())
    if rates is not None:
        rates = rates.double().flatten().clamp(1.0 / k, 1.0 - 1.0 / k)
        if rates.numel() != n_tokens:
            raise ValueError(f"rates has {rates.numel()} entries for {n_tokens} tokens")
    elif rate_quantiles is not None:
        rates = token_rates([rate_quantiles], [n_tokens], mean, gen)[0].clamp(1.0 / k, 1.0 - 1.0 / k)
    else:
        rates = torch.full((n_tokens,), mean, dtype=torch.float64)
    if exact_count:
        counts = (rates * k).round().clamp(0, k)
        probs = shift_to_rate(p, counts / k)  # [T, K], each row sums to counts (to bisection precision)
        probs = probs * (counts / probs.sum(dim=-1)).unsqueeze(-1)
        probs = probs.clamp(max=1.0)
        order = torch.rand(n_tokens, k, generator=gen).argsort(dim=1)
        cum = torch.cumsum(probs.gather(1, order), dim=1)
        u = torch.rand(n_tokens, 1, generator=gen, dtype=torch.float64)
        prev = torch.cat([torch.zeros(n_tokens, 1, dtype=torch.float64), cum[:, :-1]], dim=1)
        chosen = torch.floor(cum - u) > torch.floor(prev - u)
        masks = torch.zeros(n_tokens, k, dtype=torch.bool)
        masks.scatter_(1, order, chosen)
        return masks
    probs = shift_to_rate(p, rates)
    return torch.rand(n_tokens, k, generator=gen, dtype=torch.float64) < probs


def inputs_for_masks(masks: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Inputs x [T, K] of `dtype` whose entries pass the threshold 1.0 (|x| > 1) exactly where ``masks`` is
    set: kept entries have |x| = 1.25 + |g|, zeroed ones |x| = 0.8 u (g normal, u uniform, random signs)."""
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    shape = masks.shape
    g = torch.randn(shape, generator=gen).abs()
    u = torch.rand(shape, generator=gen)
    sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
    return (sign * torch.where(masks, 1.25 + g, 0.8 * u)).to(dtype)


def imbalance(masks: torch.Tensor, parts: tuple[int, ...] = IMBALANCE_PARTS) -> dict[str, dict[str, float]]:
    """Survivor spread over static splits of the channels into ``parts`` contiguous slices (a split by index,
    as one per SM or one per split-K slice): per token, the busiest slice's survivors over the mean slice's
    (``max_over_mean``; 1 is even), and the slices' coefficient of variation, averaged over tokens; also the
    tokens' survivor counts' spread (``count_cv``) under the key ``"tokens"``."""
    m = masks.reshape(-1, masks.shape[-1]).float()
    k = m.shape[1]
    out: dict[str, dict[str, float]] = {}
    for n in parts:
        if n > k:
            continue
        edges = torch.linspace(0, k, n + 1).round().long()
        sizes = (edges[1:] - edges[:-1]).float()
        cum = torch.cat([torch.zeros(m.shape[0], 1), m.cumsum(dim=1)], dim=1)
        per = cum[:, edges[1:]] - cum[:, edges[:-1]]  # [T, n] survivors per slice
        density = per / sizes  # slices differ by at most one channel in size
        mean = density.mean(dim=1).clamp_min(1e-12)
        out[str(n)] = {"max_over_mean": float((density.max(dim=1).values / mean).mean()),
                       "cv": float((density.std(dim=1) / mean).mean())}
    counts = m.sum(dim=1)
    out["tokens"] = {"count_mean": float(counts.mean()), "count_cv": float(counts.std() / counts.mean().clamp_min(1e-12))
                     if counts.numel() > 1 else 0.0}
    return out


def channel_rate_fit(target: torch.Tensor, measured: torch.Tensor) -> dict[str, float]:
    """How well measured per-channel keep rates follow the target probabilities: Pearson correlation, mean
    absolute difference, and both means."""
    t, m = target.double().flatten(), measured.double().flatten()
    corr = float(torch.corrcoef(torch.stack([t, m]))[0, 1]) if t.std() > 0 and m.std() > 0 else math.nan
    return {"corr": corr, "mean_abs_diff": float((t - m).abs().mean()), "target_mean": float(t.mean()),
            "measured_mean": float(m.mean())}


__all__ = ["GROUP_SITE", "MaskSource", "channel_rate_fit", "imbalance", "index_structure", "inputs_for_masks",
           "parse_masks", "resolve_profile", "sample_masks", "shift_to_rate", "stretch", "stretch_blocks", "token_rates"]
