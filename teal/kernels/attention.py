"""``teal::decode_attention``: one query token against a static KV cache, reading only its valid positions.

The engine's decode attention (``teal.engine.model.decode_attention``) multiplies the query by the
whole static cache (``max_seq_len`` positions) and masks the positions past the current one. This op
takes the number of positions that can be visible, ``n_valid`` (a device tensor: ``pos + 1``), and
never reads past it. On CUDA (and on CPU tensors under ``TRITON_INTERPRET=1``) it runs a split-KV
Triton kernel (``teal.kernels._attention_triton``: grid (kv heads, splits), online softmax per split;
the partials are merged by a second, combine launch; ``CONFIG_TABLE`` picks the config by cache length); elsewhere a
plain-torch reference. Nothing on the Triton path synchronises with the host or allocates by
``n_valid``, and the config and the number of splits depend only on the cache's shape, so CUDA graphs
capture the op once for every position (call it once before capture so that its workspace exists).

``teal::decode_attention_rope`` is the same kernel fed with the projection's un-rotated q|k|v row: it
applies the half-split rotary embedding to q and to the new key (fp32, rounded once), writes the new key
and value to the caches at ``pos = n_valid - 1`` and attends to that position from registers, so the
engine runs no separate rope or cache-write kernels (it mutates the caches).

Numerics against the engine's math (``decode_attention``):

- the engine rounds ``q . k`` to q's dtype before scaling (its matmul's output dtype); the kernel keeps
  the fp32 dot product. In bf16 that rounding (relative 2^-9 of a score) is the larger error of the two:
  the kernel is closer to a float64 reference;
- softmax in fp32 in both; the engine rounds the normalised probabilities to q's dtype before the
  product with V, the kernel rounds the unnormalised ``exp(s - m)`` (the same relative rounding, 2^-9 in
  bf16) and divides by the fp32 sum at the end; the output is rounded once to q's dtype;
- fp32 caches: the kernel's products are IEEE fp32 (no TF32); results agree to fp32 rounding;
- a query that sees no position (every valid position masked, or ``n_valid`` = 0) gives zeros; the
  engine's softmax gives NaN there (it never happens in the engine: a token always sees itself).
"""

from __future__ import annotations

import functools
import math
from types import ModuleType
from typing import NamedTuple, Optional

import torch

from teal.kernels.ops import (
    _SUPPORTED_DTYPES,
    _interpreting,
    _pow2_ceil,
    _workspace,
    import_triton_module,
    pdl_launch,
    pdl_mode,
    sm_count,
)
from teal.kernels.producer import uses_triton


class AttentionConfig(NamedTuple):
    """Launch parameters of the split-KV kernel.

    block_l: cache positions per step of a program's loop; waves: programs per multiprocessor aimed at
    (splits per kv head = ceil(waves * SMs / Hkv), at most one per ``block_l`` positions of the cache).
    """

    block_l: int = 32
    waves: int = 2
    num_warps: int = 4
    num_stages: int = 2


COMBINE_ROWS = 64  # partials the combine kernel loads per step (64 x D fp32 per program)
# (largest cache length L, config) in increasing L: ``default_config`` takes the first row with L >= the
# cache's length (the last row past the table). benchmarks/scripts/attention_gpu.py --table-out writes it.
# Rows: the Llama-3-8B winners (mean over n_valid = L/2 and L) of the 16-variant sweep in
# benchmarks/results/2026-11-29-h200-attention-variants.json (H200, bf16): 6.1 / 7.2 / 10.4 us at
# L = 384 / 1024 / 4096, against 8.2 / 9.7 / 16.6 us for inductor's code over the whole cache. Every
# winner merged the partials in a second launch with tl.dot products and no prefetch; the other variants
# of that sweep (one-launch "ticket" merge, fp32 multiply-and-sum products, K/V prefetch) are deleted.
CONFIG_TABLE: tuple[tuple[int, AttentionConfig], ...] = (
    (384, AttentionConfig(block_l=32)),
    (1 << 62, AttentionConfig(block_l=64)),
)


def default_config(length: int) -> AttentionConfig:
    """The launch config of ``CONFIG_TABLE`` for a cache of ``length`` positions (a shape: CUDA-graph safe)."""
    return next((config for max_len, config in CONFIG_TABLE if length <= max_len), CONFIG_TABLE[-1][1])


def attention_splits(n_kv: int, length: int, sms: int, config: AttentionConfig | None = None) -> int:
    """Programs per kv head: enough for ``config.waves`` programs per multiprocessor, at most one per
    ``config.block_l`` cache positions (``config`` defaults to ``default_config(length)``). Depends on the
    cache's shape only (CUDA-graph safe)."""
    config = config or default_config(length)
    wanted = -(-config.waves * sms // n_kv)
    return max(1, min(wanted, -(-length // config.block_l)))


# ----------------------------------------------------------------------------------------------
# Argument checks (shapes and dtypes only: safe under fake tensors, no host sync)


def _check_args(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, mask: torch.Tensor,
                n_valid: torch.Tensor) -> None:
    name = "decode_attention"
    if q.dim() != 3 or q.shape[0] != 1:
        raise ValueError(f"{name}: q must be one token's heads [1, Hq, D], got shape {tuple(q.shape)}")
    if q.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"{name}: q must be bf16, fp16 or fp32, got {q.dtype}")
    n_heads, head_dim = q.shape[1], q.shape[2]
    for label, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dim() != 3 or cache.shape[2] != head_dim or cache.dtype != q.dtype or not cache.is_contiguous():
            raise ValueError(f"{name}: {label} must be a contiguous {q.dtype} cache [Hkv, L, D={head_dim}], got "
                             f"shape {tuple(cache.shape)} {cache.dtype}"
                             f"{'' if cache.is_contiguous() else ' (not contiguous)'}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"{name}: v_cache {tuple(v_cache.shape)} must match k_cache {tuple(k_cache.shape)}")
    n_kv, length = k_cache.shape[0], k_cache.shape[1]
    if n_kv == 0 or n_heads % n_kv:
        raise ValueError(f"{name}: the Hq={n_heads} query heads must split evenly over the Hkv={n_kv} kv heads")
    if mask.shape != (length,) or mask.dtype != torch.float32:
        raise ValueError(f"{name}: mask must be an additive fp32 vector [L={length}], got shape {tuple(mask.shape)} "
                         f"{mask.dtype}")
    if n_valid.numel() != 1 or n_valid.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: n_valid must be an int32/int64 tensor of one element (the positions that can be "
                         f"visible, pos + 1), got shape {tuple(n_valid.shape)} {n_valid.dtype}")
    for label, t in (("k_cache", k_cache), ("v_cache", v_cache), ("mask", mask), ("n_valid", n_valid)):
        if t.device != q.device:
            raise ValueError(f"{name}: {label} is on {t.device} but q is on {q.device}")


# ----------------------------------------------------------------------------------------------
# Reference (plain torch) and Triton path


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, mask: torch.Tensor,
                               n_valid: torch.Tensor, scale: float, *,
                               compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Plain-torch ``decode_attention``: the engine's math (``teal.engine.model.decode_attention``) with the
    positions at or past ``n_valid`` masked out, and zeros for a query that sees no position.

    ``compute_dtype`` (e.g. float64, for test references) replaces q's dtype in every product and in the
    rounding of the probabilities; the result is returned in q's dtype.
    """
    _check_args(q, k_cache, v_cache, mask, n_valid)
    n_kv, length, head_dim = k_cache.shape
    dtype = compute_dtype or q.dtype
    qg = q.reshape(n_kv, -1, head_dim).to(dtype)
    visible = torch.arange(length, device=mask.device) < n_valid.reshape(())
    bias = torch.where(visible, mask, -math.inf).to(torch.promote_types(dtype, torch.float32))
    scores = torch.matmul(qg, k_cache.to(dtype).transpose(1, 2)).to(bias.dtype) * scale + bias
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(scores.amax(dim=-1, keepdim=True) == -math.inf, 0.0, probs).to(dtype)
    return torch.matmul(probs, v_cache.to(dtype)).reshape(1, -1).to(q.dtype)


def _check_rope_args(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                     n_heads: int, q_norm: torch.Tensor | None = None,
                     k_norm: torch.Tensor | None = None) -> tuple[int, int]:
    """Checks the q|k|v row, the rotary tables and the optional per-head norm weights of
    ``decode_attention_rope``; returns (Hkv, D)."""
    name = "decode_attention_rope"
    if k_cache.dim() != 3:
        raise ValueError(f"{name}: k_cache must be [Hkv, L, D], got shape {tuple(k_cache.shape)}")
    n_kv, _, head_dim = k_cache.shape
    width = (n_heads + 2 * n_kv) * head_dim
    if qkv.dim() != 2 or qkv.shape != (1, width) or not qkv.is_contiguous():
        raise ValueError(f"{name}: qkv must be one token's contiguous q|k|v row [1, (Hq + 2*Hkv) * D = {width}] "
                         f"(Hq={n_heads}, Hkv={n_kv}, D={head_dim}), got shape {tuple(qkv.shape)}")
    if head_dim % 2:
        raise ValueError(f"{name}: the rotary embedding needs an even head dim, got D={head_dim}")
    for label, t in (("cos", cos), ("sin", sin)):
        if t.numel() != head_dim or t.dtype != qkv.dtype or t.device != qkv.device:
            raise ValueError(f"{name}: {label} must hold this position's {head_dim} values in {qkv.dtype} on "
                             f"{qkv.device}, got shape {tuple(t.shape)} {t.dtype} on {t.device}")
    if (q_norm is None) != (k_norm is None):
        raise ValueError(f"{name}: give both q_norm and k_norm (the per-head RMSNorm weights) or neither")
    for label, t in (("q_norm", q_norm), ("k_norm", k_norm)):
        if t is not None and (t.numel() != head_dim or t.dtype != qkv.dtype or t.device != qkv.device):
            raise ValueError(f"{name}: {label} must be the head's {head_dim} RMSNorm weights in {qkv.dtype} on "
                             f"{qkv.device}, got shape {tuple(t.shape)} {t.dtype} on {t.device}")
    return n_kv, head_dim


def head_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm of each head x [..., D] with the engine's roundings: fp32 normalisation, then cast and scaled
    (offset 0: Llama / Qwen3), or scaled by (offset + weight) in fp32 and cast (Gemma 3)."""
    normed = torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    if offset == 0.0:
        return normed.to(x.dtype) * weight
    return (normed * (offset + weight.float())).to(x.dtype)


def apply_rope_rounded(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split rotary embedding of x [..., D] in fp32, rounded once to x's dtype (the kernel's rounding)."""
    half = x.shape[-1] // 2
    xf = x.float()
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos.reshape(-1).float() + rotated * sin.reshape(-1).float()).to(x.dtype)


def decode_attention_rope_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                                    v_cache: torch.Tensor, mask: torch.Tensor, n_valid: torch.Tensor, scale: float,
                                    n_heads: int, q_norm: torch.Tensor | None = None,
                                    k_norm: torch.Tensor | None = None, eps: float = 1e-6, norm_offset: float = 0.0,
                                    *, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Plain-torch ``decode_attention_rope``: per-head RMSNorm of q and k when their weights are given
    (``head_rms_norm``), rotary embedding of q and k (``apply_rope_rounded``), k and v written to the caches
    at ``pos = n_valid - 1`` (in place; nothing when n_valid < 1), then ``decode_attention_reference``."""
    n_kv, head_dim = _check_rope_args(qkv, cos, sin, k_cache, n_heads, q_norm, k_norm)
    q, k, v = qkv.reshape(-1).split([n_heads * head_dim, n_kv * head_dim, n_kv * head_dim])
    q, k = q.view(1, n_heads, head_dim), k.view(n_kv, head_dim)
    if q_norm is not None and k_norm is not None:
        q, k = head_rms_norm(q, q_norm, eps, norm_offset), head_rms_norm(k, k_norm, eps, norm_offset)
    q = apply_rope_rounded(q, cos, sin)
    pos = int(n_valid.reshape(()).clamp(0, k_cache.shape[1])) - 1
    if pos >= 0:
        k_cache[:, pos] = apply_rope_rounded(k, cos, sin)
        v_cache[:, pos] = v.view(n_kv, head_dim)
    return decode_attention_reference(q, k_cache, v_cache, mask, n_valid, scale, compute_dtype=compute_dtype)


@functools.cache
def _attention_kernels() -> ModuleType:
    return import_triton_module("_attention_triton", "decode_attention")


def decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, mask: torch.Tensor,
                            n_valid: torch.Tensor, scale: float, *, config: AttentionConfig | None = None,
                            splits: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton implementation (two launches when the cache is split). ``config`` defaults to
    ``default_config(L)``; ``splits`` overrides ``attention_splits``; ``out`` [1, Hq*D] in q's dtype receives
    the result (tests poison it) instead of a fresh tensor."""
    _check_args(q, k_cache, v_cache, mask, n_valid)
    return _launch(q.contiguous(), None, k_cache, v_cache, mask, n_valid, scale, q.shape[1], config, splits, out)


def decode_attention_rope_triton(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                                 v_cache: torch.Tensor, mask: torch.Tensor, n_valid: torch.Tensor, scale: float,
                                 n_heads: int, q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None,
                                 eps: float = 1e-6, norm_offset: float = 0.0, *, config: AttentionConfig | None = None,
                                 splits: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton implementation of ``decode_attention_rope`` (the q/k norms, the rotary embedding and the
    cache write inside ``decode_attention_kernel``; arguments as ``decode_attention_triton``)."""
    n_kv, head_dim = _check_rope_args(qkv, cos, sin, k_cache, n_heads, q_norm, k_norm)
    q = qkv.view(1, -1)[:, : n_heads * head_dim].view(1, n_heads, head_dim)
    _check_args(q, k_cache, v_cache, mask, n_valid)
    norms = None
    if q_norm is not None and k_norm is not None:
        norms = (q_norm.reshape(-1).contiguous(), k_norm.reshape(-1).contiguous(), float(eps), float(norm_offset))
    return _launch(qkv, (cos.reshape(-1).contiguous(), sin.reshape(-1).contiguous()), k_cache, v_cache, mask,
                   n_valid, scale, n_heads, config, splits, out, norms)


def _launch(q_rows: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, k_cache: torch.Tensor,
            v_cache: torch.Tensor, mask: torch.Tensor, n_valid: torch.Tensor, scale: float, n_heads: int,
            config: AttentionConfig | None, splits: int | None, out: torch.Tensor | None,
            norms: tuple[torch.Tensor, torch.Tensor, float, float] | None = None) -> torch.Tensor:
    """Launches the kernels: ``q_rows`` is q [1, Hq, D] (``rope`` None) or the q|k|v row with ``rope`` = (cos, sin)
    and optionally ``norms`` = (q_norm, k_norm, eps, offset)."""
    q = q_rows
    n_kv, length, head_dim = k_cache.shape
    group = n_heads // n_kv
    width = n_heads * head_dim
    config = config or default_config(length)
    if out is None:
        out = q.new_empty((1, width))
    elif out.shape != (1, width) or out.dtype != q.dtype or out.device != q.device or not out.is_contiguous():
        raise ValueError(f"decode_attention: out must be a contiguous [1, {width}] {q.dtype} tensor on {q.device}")
    if splits is None:
        splits = attention_splits(n_kv, length, sm_count(q.device), config)
    if splits < 1:
        raise ValueError(f"decode_attention: splits must be at least 1, got {splits}")
    block_d = max(16, _pow2_ceil(head_dim))
    partials = n_kv * splits * group
    ws_m = _workspace.get(q.device, "attention_max", partials, torch.float32)
    ws_l = _workspace.get(q.device, "attention_sum", partials, torch.float32)
    ws_acc = _workspace.get(q.device, "attention_acc", partials * head_dim, torch.float32)
    kernels = _attention_kernels()
    pdl = pdl_launch(pdl_mode(q.device))
    cos, sin = rope if rope is not None else (q, q)
    q_norm, k_norm, eps, offset = norms if norms is not None else (q, q, 0.0, 0.0)
    kernels.decode_attention_kernel[(n_kv, splits)](
        q, k_cache, v_cache, mask.contiguous(), n_valid.reshape(1), out, ws_m, ws_l, ws_acc, cos, sin,
        q_norm, k_norm, float(eps), float(offset),
        float(scale), length, group, head_dim, n_heads * head_dim, (n_heads + n_kv) * head_dim,
        SPLITS=splits,
        BLOCK_G=max(16, _pow2_ceil(group)),  # tl.dot needs 16 rows
        BLOCK_L=max(16, _pow2_ceil(config.block_l)),
        BLOCK_D=block_d,
        DOT_FP32=_interpreting() or q.dtype == torch.float32,
        ROPE=rope is not None,
        QK_NORM=norms is not None,
        OFFSET=norms is not None and offset != 0.0,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **pdl,
    )
    if splits > 1:
        kernels.combine_partials_kernel[(n_heads,)](
            ws_m, ws_l, ws_acc, out, group, head_dim,
            SPLITS=splits, BLOCK_D=block_d, RED_S=min(_pow2_ceil(splits), COMBINE_ROWS), num_warps=4, **pdl,
        )
    return out


# ----------------------------------------------------------------------------------------------
# The custom op and its entry point


@torch.library.custom_op("teal::decode_attention", mutates_args=())
def _decode_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, mask: torch.Tensor,
                         n_valid: torch.Tensor, scale: float) -> torch.Tensor:
    run = decode_attention_triton if uses_triton(q.device) else decode_attention_reference
    return run(q, k_cache, v_cache, mask, n_valid, scale)


@_decode_attention_op.register_fake
def _decode_attention_fake(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, mask: torch.Tensor,
                           n_valid: torch.Tensor, scale: float) -> torch.Tensor:
    _check_args(q, k_cache, v_cache, mask, n_valid)
    return q.new_empty((1, q.shape[1] * q.shape[2]))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, mask: torch.Tensor,
                     n_valid: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of one token's queries q [1, Hq, D] (bf16/fp16/fp32) over the cache positions
    ``0 .. n_valid - 1`` of k_cache / v_cache [Hkv, L, D] (contiguous, q's dtype; Hq a multiple of Hkv:
    query heads h*G .. h*G + G - 1 share kv head h), with the additive fp32 mask [L] (0 or -inf) and
    ``softmax(q . k * scale + mask) @ v``. n_valid: int32/int64 device tensor of one element; positions
    at or past it are never read. Returns [1, Hq * D] in q's dtype (see the module docstring for the
    roundings; a query that sees no position gives zeros)."""
    return torch.ops.teal.decode_attention(q, k_cache, v_cache, mask, n_valid, float(scale))


@torch.library.custom_op("teal::decode_attention_rope", mutates_args=("k_cache", "v_cache"))
def _decode_attention_rope_op(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                              v_cache: torch.Tensor, mask: torch.Tensor, n_valid: torch.Tensor, scale: float,
                              n_heads: int, q_norm: Optional[torch.Tensor], k_norm: Optional[torch.Tensor],
                              eps: float, norm_offset: float) -> torch.Tensor:
    run = decode_attention_rope_triton if uses_triton(qkv.device) else decode_attention_rope_reference
    return run(qkv, cos, sin, k_cache, v_cache, mask, n_valid, scale, n_heads, q_norm, k_norm, eps, norm_offset)


@_decode_attention_rope_op.register_fake
def _decode_attention_rope_fake(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                                v_cache: torch.Tensor, mask: torch.Tensor, n_valid: torch.Tensor, scale: float,
                                n_heads: int, q_norm: Optional[torch.Tensor], k_norm: Optional[torch.Tensor],
                                eps: float, norm_offset: float) -> torch.Tensor:
    _, head_dim = _check_rope_args(qkv, cos, sin, k_cache, n_heads, q_norm, k_norm)
    return qkv.new_empty((1, n_heads * head_dim))


def decode_attention_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                          v_cache: torch.Tensor, mask: torch.Tensor, n_valid: torch.Tensor, scale: float,
                          n_heads: int, q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None,
                          eps: float = 1e-6, norm_offset: float = 0.0) -> torch.Tensor:
    """One decode step's attention from the projection's output: the half-split rotary embedding (cos, sin:
    this position's D values, qkv's dtype) applied to q and k of the q|k|v row qkv [1, (Hq + 2*Hkv) * D], k
    and v written to k_cache / v_cache at ``pos = n_valid - 1``, then ``decode_attention`` of q over
    positions 0..pos (the new position from registers). With ``q_norm`` / ``k_norm`` (the per-head RMSNorm
    weights [D] of Qwen3 and Gemma 3; ``eps``; ``norm_offset``: Gemma's 1 + w) q's heads and k are
    normalised first, with the engine's roundings (``head_rms_norm``). One kernel on CUDA; it replaces the
    norms, rope and cache writes the engine otherwise runs before ``decode_attention``. Mutates the caches;
    returns [1, Hq * D]."""
    return torch.ops.teal.decode_attention_rope(qkv, cos, sin, k_cache, v_cache, mask, n_valid, float(scale),
                                                int(n_heads), q_norm, k_norm, float(eps), float(norm_offset))
