"""Per-channel keep frequencies of a sparsified model: recorded over text, saved and loaded as one file.

At a target sparsity, with the model sparsified on every position (each position thresholded as a decode
step is), channel c of a site survives at a token iff |x_c| > t, the rule of `teal.nn.TealLinear` with the
site's threshold. A profile holds, per sparsity level and per site (``layers.{i}.attn_in`` feeding q|k|v,
``attn_out`` feeding o, ``mlp_in`` feeding gate|up, ``mlp_mid`` feeding down):

- ``counts`` [K]: at how many of the counted tokens each input channel survived (frequency = counts / tokens);
- ``token_quantiles`` [Q]: quantiles of the per-token keep fraction, how much the number of survivors varies
  from token to token (the mask sampler of `teal.bench.masks` draws each token's rate from them).

Real models keep some channels almost always and others rarely; random weights scatter survivors uniformly.
The benchmarks draw survivor masks from these profiles (`teal bench kernels --masks real:PROFILE`).

Recorded per site, so the site's projections must share one threshold: the magnitude rule with the
uniform allocation (q, k and v then share a threshold, as do gate and up). The first positions of each
window (``skip``) are not counted: a window's first tokens (BOS, attention sinks) are not decode steps.

File: one safetensors file; tensors ``{level}/layers.{i}.{site}/counts`` (int16 when the token count fits,
else int32) and ``.../token_quantiles`` (float32); the metadata entry ``teal_keep_profile`` holds the JSON
description (model and its widths, text, token count, thresholds' calibration, levels with their measured
sparsity, the command that made it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT = "teal-keep-profile"
VERSION = 1
METADATA_KEY = "teal_keep_profile"
SITES = ("attn_in", "attn_out", "mlp_in", "mlp_mid")
DEFAULT_SKIP = 8
N_TOKEN_QUANTILES = 101


class KeepProfileError(ValueError):
    """A keep profile could not be read or does not hold what was asked."""


def level_key(level: float) -> str:
    """The key of a sparsity level in a profile: ``0.5`` -> ``"0.5"``."""
    return f"{float(level):g}"


@dataclass
class KeepProfile:
    """Per-channel survivor counts of a model's sites at one or more sparsity levels."""

    info: dict[str, Any]
    tokens: int  # tokens counted at every site
    counts: dict[str, dict[str, torch.Tensor]]  # level key -> site key -> int64 counts [K]
    token_quantiles: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # level -> site -> [Q]

    @property
    def levels(self) -> list[float]:
        return sorted(float(k) for k in self.counts)

    @property
    def n_layers(self) -> int:
        return 1 + max(int(key.split(".")[1]) for key in next(iter(self.counts.values())))

    @property
    def name(self) -> str:
        return str(self.info.get("name") or self.info.get("model", {}).get("name_or_path") or "?")

    def _level(self, level: float) -> str:
        key = level_key(level)
        if key not in self.counts:
            raise KeepProfileError(f"the keep profile of {self.name} has levels "
                                   f"{', '.join(level_key(v) for v in self.levels)}, not {key}; record it with "
                                   "benchmarks/scripts/record_keep_profiles.py --levels ... or pick one of those")
        return key

    def frequencies(self, level: float, site: str | None = None) -> dict[str, torch.Tensor] | list[torch.Tensor]:
        """float64 keep frequencies at ``level``: {site key: [K]}, or for one site kind (``"mlp_mid"``) the
        list over layers."""
        counts = self.counts[self._level(level)]
        if site is None:
            return {k: v.double() / self.tokens for k, v in counts.items()}
        if site not in SITES:
            raise KeepProfileError(f"site must be one of {', '.join(SITES)}, not {site!r}")
        return [counts[f"layers.{i}.{site}"].double() / self.tokens for i in range(self.n_layers)]

    def rate_quantiles(self, level: float, site: str) -> list[torch.Tensor]:
        """Per layer, the quantiles [Q] of the per-token keep fraction of one site kind at ``level``."""
        q = self.token_quantiles[self._level(level)]
        return [q[f"layers.{i}.{site}"].double() for i in range(self.n_layers)]

    # ---- file ------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the profile atomically (the user's umask), as one safetensors file."""
        from safetensors.torch import save

        from teal.artifact import _atomic_write_bytes, make_dirs

        dtype = torch.int16 if self.tokens <= torch.iinfo(torch.int16).max else torch.int32
        tensors: dict[str, torch.Tensor] = {}
        for level, sites in self.counts.items():
            for key, c in sites.items():
                tensors[f"{level}/{key}/counts"] = c.to(dtype).contiguous()
        for level, sites in self.token_quantiles.items():
            for key, q in sites.items():
                tensors[f"{level}/{key}/token_quantiles"] = q.float().contiguous()
        meta = dict(self.info, format=FORMAT, version=VERSION, tokens=int(self.tokens))
        path = Path(path)
        make_dirs(path.parent)
        _atomic_write_bytes(path, save(tensors, metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)}))
        return path

    @classmethod
    def load(cls, path: str | Path) -> KeepProfile:
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise KeepProfileError(f"keep profile {path} does not exist (make one with "
                                   "benchmarks/scripts/record_keep_profiles.py)")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta_text = (f.metadata() or {}).get(METADATA_KEY)
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as err:
            raise KeepProfileError(f"{path} is not a readable safetensors file: {err}") from None
        if meta_text is None:
            raise KeepProfileError(f"{path} is not a teal keep profile (no {METADATA_KEY!r} metadata)")
        info = json.loads(meta_text)
        if info.get("format") != FORMAT or int(info.get("version", 0)) > VERSION:
            raise KeepProfileError(f"{path}: format {info.get('format')!r} version {info.get('version')} is not "
                                   f"{FORMAT!r} version <= {VERSION}")
        tokens = int(info.pop("tokens"))
        info.pop("format"), info.pop("version")
        counts: dict[str, dict[str, torch.Tensor]] = {}
        quantiles: dict[str, dict[str, torch.Tensor]] = {}
        for name, t in tensors.items():
            level, key, kind = name.split("/")
            target = counts if kind == "counts" else quantiles
            target.setdefault(level, {})[key] = t.long() if kind == "counts" else t.double()
        return cls(info=info, tokens=tokens, counts=counts, token_quantiles=quantiles)


def _site_thresholds(model: nn.Module) -> dict[str, nn.Module]:
    """Site key -> the TealLinear whose threshold the site's projections share (ValueError where they
    differ: per-projection thresholds give per-projection masks, not one per site)."""
    from teal.arch import get_adapter
    from teal.nn import TealLinear

    adapter = get_adapter(model)
    modules = adapter.projections()
    out: dict[str, nn.Module] = {}
    for site, projs in adapter.sites().items():
        mods = [modules[p] for p in projs]
        if not all(isinstance(m, TealLinear) for m in mods):
            raise ValueError(f"{site}: the model is not sparsified")
        values = {m.threshold_value for m in mods}
        if len(values) != 1 or any(m.col_scale is not None for m in mods):
            raise ValueError(f"{site}: its projections {projs} do not share one magnitude threshold ({sorted(values)}); "
                             "keep profiles are recorded per site: use the magnitude score and the uniform allocation")
        out[site] = mods[0]
    return out


def record(
    model: nn.Module,
    thresholds: Any,
    levels: list[float] | tuple[float, ...],
    windows: torch.Tensor,
    *,
    skip: int = DEFAULT_SKIP,
    batch_size: int = 1,
    progress: bool = True,
    info: dict[str, Any] | None = None,
) -> KeepProfile:
    """Keep counts of every site's channels over ``windows`` [n, L] of token ids, at each of ``levels``.

    The model is sparsified (uniform allocation, every position thresholded, the artifact's calibration) at
    each level in turn and densified again at the end. Positions ``skip`` and later of each window count.
    """
    from teal.artifact import check_sparsity
    from teal.calibrate import run_windows
    from teal.models import model_info
    from teal.sparsify import densify_, sparsify_

    if not 0 <= int(skip) < windows.shape[1]:
        raise ValueError(f"skip must be in [0, {windows.shape[1]}) for windows of {windows.shape[1]} tokens, got {skip}")
    if thresholds.score != "magnitude":
        raise ValueError("keep profiles are recorded for the magnitude score (one mask per site); "
                         f"these thresholds use {thresholds.score!r}")
    levels = [check_sparsity(float(v)) for v in levels]
    if not levels or min(levels) <= 0:
        raise ValueError(f"levels must be sparsities in (0, 1), got {levels}")
    n_tokens = int(windows.shape[0]) * (int(windows.shape[1]) - int(skip))
    counts: dict[str, dict[str, torch.Tensor]] = {}
    quantiles: dict[str, dict[str, torch.Tensor]] = {}
    measured: dict[str, float] = {}
    probs = torch.linspace(0, 1, N_TOKEN_QUANTILES, dtype=torch.float64)
    try:
        for level in levels:
            sparsify_(model, thresholds, level, method="uniform", prefill="sparse", use_kernels=False)
            sites = _site_thresholds(model)
            site_counts: dict[str, torch.Tensor] = {}
            fractions: dict[str, list[torch.Tensor]] = {k: [] for k in sites}
            hooks = []

            def make_hook(key: str, module: nn.Module):
                def hook(_mod, args):
                    x = args[0]
                    keep = (x.abs().float() > module.threshold).reshape(-1, x.shape[-2], x.shape[-1])[:, skip:]
                    total = keep.sum(dim=(0, 1)).cpu()
                    site_counts[key] = site_counts[key] + total if key in site_counts else total
                    fractions[key].append(keep.float().mean(dim=-1).flatten().cpu())

                return hook

            for key, module in sites.items():
                hooks.append(module.register_forward_pre_hook(make_hook(key, module)))
            try:
                run_windows(model, windows, batch_size, f"record s={level:g}", progress)
            finally:
                for h in hooks:
                    h.remove()
            lk = level_key(level)
            counts[lk] = {k: v.long() for k, v in site_counts.items()}
            quantiles[lk] = {k: torch.quantile(torch.cat(v).double(), probs) for k, v in fractions.items()}
            measured[lk] = _effective_sparsity(thresholds, counts[lk], n_tokens)
    finally:
        densify_(model)
    meta = dict(info or {})
    meta.setdefault("model", model_info(model))
    meta.update(skip=int(skip), windows=int(windows.shape[0]), seq_len=int(windows.shape[1]),
                calibration=dict(thresholds.calibration, method="uniform",
                                 sequential="uniform" in thresholds.sequential),
                measured_sparsity=measured)
    return KeepProfile(info=meta, tokens=n_tokens, counts=counts, token_quantiles=quantiles)


def _effective_sparsity(thresholds: Any, site_counts: dict[str, torch.Tensor], tokens: int) -> float:
    """The parameter-weighted zero fraction of the recorded tokens (every projection zeroes what its site does)."""
    from teal.arch import PROJ_SITE, split_key

    zeros = total = 0.0
    for proj, size in thresholds.proj_sizes.items():
        layer, p = split_key(proj)
        c = site_counts[f"layers.{layer}.{PROJ_SITE[p]}"]
        zeros += size * (1.0 - float(c.sum()) / (tokens * c.numel()))
        total += size
    return zeros / total


__all__ = ["KeepProfile", "KeepProfileError", "SITES", "level_key", "record"]
