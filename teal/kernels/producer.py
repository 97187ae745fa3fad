"""Producer ops: the kernel that computes an activation also lists its surviving entries.

The gather path of ``sparse_linear`` (``KernelConfig(gather=True)``) spends a whole launch (phase A,
``compact_input``) listing the entries of x that survive the threshold, before the gather GEMV (phase
B) reads only the weight rows of those entries. Here the lists come out of the kernel that produces
the activation anyway, and phase B runs on its own:

- ``teal::add_rmsnorm_compact``: residual add + RMSNorm (the input of q|k|v and gate|up), plus the
  survivor lists of the normalised input, one per output segment;
- ``teal::silu_mul_compact``: ``silu(gate) * up`` (the input of down), plus its survivor list (not
  used by the engine: ``sparse_linear``'s own path was faster for down on the H200);
- ``teal::gather_linear``: phase B alone on such lists.

Lists use phase A's layout (``SurvivorLists``): segment j's survivors, ascending, at
``idx/val[j*K + rank]``, one count per segment. Each chunk of the activation row is listed by its own
program, which counts the survivors before its chunk itself. Batch 1 only. Each op runs its Triton
kernel on CUDA (and on CPU tensors under ``TRITON_INTERPRET=1``), else a plain-torch reference; fake
implementations let ``torch.compile(fullgraph=True)`` trace them, and nothing on the Triton path
synchronises with the host, so CUDA graphs can capture them. Outputs are fresh tensors on every call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import List, NamedTuple, Optional

import torch
import torch.nn.functional as F

from teal.kernels.configs import KernelConfig, get_gather_config
from teal.kernels.ops import (
    _SUPPORTED_DTYPES,
    MAX_SEGMENTS_PER_LAUNCH,
    _interpreting,
    _pow2_ceil,
    _triton_kernels,
    launch_gather_gemv,
    pdl_launch,
    pdl_mode,
    sm_count,
)

#: Largest row ``add_rmsnorm_compact`` normalises (one block per program holds the whole row).
MAX_NORM_K = 16384

#: Entries per program of ``add_rmsnorm_compact`` (one program per segment and chunk; each program also
#: reads the whole row, for the sum of squares and its count of earlier survivors) and of
#: ``silu_mul_compact`` (one program per chunk). Upper bounds: a shorter row is one chunk.
NORM_CHUNK = 512
SILU_CHUNK = 1024

#: ``silu_mul_compact``: entries per step of a program's count of the survivors before its chunk (it
#: recomputes SiLU * up there), and warps per program: 1024 / (32 * 8) = 4 exponentials per thread and
#: step.
SILU_PREFIX = 1024
SILU_WARPS = 8


def list_chunk(k: int, wanted: int) -> int:
    """Entries per program for a row of K entries when ``wanted`` are asked for: a power of two, at most
    ``pow2_ceil(K)`` (one program)."""
    return min(_pow2_ceil(wanted), _pow2_ceil(k))


class SurvivorLists(NamedTuple):
    """Per-segment survivor lists of one activation row of K entries (phase A's layout).

    The survivors of segment j, ascending, are ``idx[j*K : j*K + counts[j]]`` (int32) with values
    ``val[...]`` (fp32); other entries are unspecified. ``counts`` [S] int32; ``xm[j*K : (j+1)*K]`` is
    the masked activation in fp32 (the gather's dense-branch input).
    """

    idx: torch.Tensor
    val: torch.Tensor
    xm: torch.Tensor
    counts: torch.Tensor

    def survivors(self, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per segment, (indices, values) of all its survivors in ascending order (reads counts: syncs)."""
        return [(self.idx[j * k : j * k + n], self.val[j * k : j * k + n])
                for j, n in enumerate(self.counts.reshape(-1).tolist())]


def uses_triton(device: torch.device) -> bool:
    """Whether the ops run their Triton kernels on tensors of ``device``."""
    return device.type == "cuda" or _interpreting()


# ----------------------------------------------------------------------------------------------
# Argument checks (shapes and dtypes only: safe under fake tensors, no host sync)


def _check_rule(name: str, k: int, device: torch.device, thresholds: torch.Tensor,
                col_scale: Optional[torch.Tensor], segments: int) -> None:
    """Checks the threshold rule's tensors: fp thresholds [S], optional fp col_scale [S, K], one device."""
    if not 1 <= segments <= MAX_SEGMENTS_PER_LAUNCH:
        raise ValueError(f"{name}: segments must be 1..{MAX_SEGMENTS_PER_LAUNCH}, got {segments}")
    if thresholds.dim() > 1 or thresholds.numel() != segments or not thresholds.is_floating_point():
        raise ValueError(f"{name}: thresholds must be a float tensor with one value per segment ({segments}), "
                         f"got shape {tuple(thresholds.shape)} {thresholds.dtype}")
    if col_scale is not None and (col_scale.shape != (segments, k) or not col_scale.is_floating_point()):
        raise ValueError(f"{name}: col_scale must be a float tensor [S={segments}, K={k}], "
                         f"got shape {tuple(col_scale.shape)} {col_scale.dtype}")
    for label, t in (("thresholds", thresholds), ("col_scale", col_scale)):
        if t is not None and t.device != device:
            raise ValueError(f"{name}: {label} is on {t.device} but the activation is on {device}")


def _check_row(name: str, label: str, t: torch.Tensor, width: int) -> None:
    """Checks that ``t`` is one activation row [1, width] of a supported dtype."""
    if t.dim() != 2 or t.shape[0] != 1 or t.shape[1] != width:
        raise ValueError(f"{name}: {label} must be one row [1, {width}] (batch 1), got shape {tuple(t.shape)}")
    if t.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"{name}: {label} must be bf16, fp16 or fp32, got {t.dtype}")


def _check_add_rmsnorm(x: torch.Tensor, delta: torch.Tensor, norm_weight: torch.Tensor, thresholds: torch.Tensor,
                       col_scale: Optional[torch.Tensor], segments: int) -> None:
    name = "add_rmsnorm_compact"
    k = x.shape[-1] if x.dim() else 0
    _check_row(name, "x", x, k)
    if k > MAX_NORM_K:
        raise ValueError(f"{name}: rows of at most {MAX_NORM_K} entries are supported, got K={k}")
    if delta.shape != x.shape or delta.dtype != x.dtype or delta.device != x.device:
        raise ValueError(f"{name}: delta must match x ({tuple(x.shape)} {x.dtype} on {x.device}), got "
                         f"{tuple(delta.shape)} {delta.dtype} on {delta.device}")
    if norm_weight.shape != (k,) or norm_weight.dtype != x.dtype or norm_weight.device != x.device:
        raise ValueError(f"{name}: norm_weight must be [{k}] {x.dtype} on {x.device}, got "
                         f"{tuple(norm_weight.shape)} {norm_weight.dtype} on {norm_weight.device}")
    _check_rule(name, k, x.device, thresholds, col_scale, segments)


def _check_silu_mul(gate_up: torch.Tensor, thresholds: torch.Tensor, col_scale: Optional[torch.Tensor]) -> int:
    name = "silu_mul_compact"
    width = gate_up.shape[-1] if gate_up.dim() else 0
    _check_row(name, "gate_up", gate_up, width)
    if width % 2:
        raise ValueError(f"{name}: gate_up must hold gate | up, an even width, got {width}")
    _check_rule(name, width // 2, gate_up.device, thresholds, col_scale, 1)
    return width // 2


def _check_gather(idx: torch.Tensor, val: torch.Tensor, xm: torch.Tensor, counts: torch.Tensor, w_t: torch.Tensor,
                  splits: Optional[Sequence[int]]) -> list[int]:
    name = "gather_linear"
    if w_t.dim() != 2 or not w_t.is_contiguous() or w_t.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"{name}: w_t must be a contiguous bf16/fp16/fp32 [K, N] weight (prepare_weight), got "
                         f"{tuple(w_t.shape)} {w_t.dtype}")
    k, n = w_t.shape
    split_list = [int(n)] if splits is None else [int(s) for s in splits]
    if any(s <= 0 for s in split_list) or sum(split_list) != n:
        raise ValueError(f"{name}: splits {split_list} must be positive widths summing to N={n}")
    segments = len(split_list)
    if segments > MAX_SEGMENTS_PER_LAUNCH:
        raise ValueError(f"{name}: at most {MAX_SEGMENTS_PER_LAUNCH} segments, got {segments}")
    for label, t, dtype, numel in (("idx", idx, torch.int32, segments * k), ("val", val, torch.float32, segments * k),
                                   ("xm", xm, torch.float32, segments * k)):
        if t.dim() != 1 or t.numel() != numel or t.dtype != dtype or not t.is_contiguous():
            raise ValueError(f"{name}: {label} must be a contiguous {dtype} vector of {numel} entries (S*K lists of "
                             f"a producer op), got {tuple(t.shape)} {t.dtype}")
    if counts.dim() != 1 or counts.numel() != segments or counts.dtype != torch.int32 or not counts.is_contiguous():
        raise ValueError(f"{name}: counts must be a contiguous int32 vector of S={segments} survivor counts (a "
                         f"producer op's), got {tuple(counts.shape)} {counts.dtype}")
    for label, t in (("idx", idx), ("val", val), ("xm", xm), ("counts", counts)):
        if t.device != w_t.device:
            raise ValueError(f"{name}: {label} is on {t.device} but w_t is on {w_t.device}")
    return split_list


# ----------------------------------------------------------------------------------------------
# References (plain torch)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm computed in fp32, the numerics the producer kernel reproduces and the engine's ``rms_norm``
    (which is this function). offset 0: cast back to x's dtype, then scaled by the weight (HF Llama's order
    of operations); otherwise scaled by (offset + weight) in fp32, then cast (HF Gemma 3's)."""
    normed = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    if offset == 0.0:
        return normed.to(x.dtype) * weight
    return (normed * (offset + weight.float())).to(x.dtype)


def survivor_lists_reference(act: torch.Tensor, thresholds: torch.Tensor, col_scale: Optional[torch.Tensor],
                             segments: int) -> SurvivorLists:
    """The lists of ``act`` [1, K] for each segment's rule ``|a| * c_j > t_j`` (fp32); unused list entries
    are zero."""
    k = act.shape[-1]
    row = act.reshape(k)
    score = row.abs().float()
    thr = thresholds.reshape(-1).float()
    idx = torch.zeros(segments * k, dtype=torch.int32, device=act.device)
    val = torch.zeros(segments * k, dtype=torch.float32, device=act.device)
    xm = torch.zeros(segments * k, dtype=torch.float32, device=act.device)
    counts = torch.zeros(segments, dtype=torch.int32, device=act.device)
    for j in range(segments):
        keep = (score if col_scale is None else score * col_scale[j].float()) > thr[j]
        xm[j * k : (j + 1) * k] = torch.where(keep, row.float(), 0.0)
        kept = torch.nonzero(keep).flatten()
        idx[j * k : j * k + kept.numel()] = kept.to(torch.int32)
        val[j * k : j * k + kept.numel()] = row[kept].float()
        counts[j] = kept.numel()
    return SurvivorLists(idx, val, xm, counts)


def add_rmsnorm_compact_reference(x: torch.Tensor, delta: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                                  thresholds: torch.Tensor, col_scale: Optional[torch.Tensor], segments: int,
                                  norm_offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, SurvivorLists]:
    """Plain-torch ``add_rmsnorm_compact``: ``(x + delta, rms_norm(x + delta) * w, lists of h)``."""
    _check_add_rmsnorm(x, delta, norm_weight, thresholds, col_scale, segments)
    x_new = x + delta
    h = rms_norm_reference(x_new, norm_weight, eps, norm_offset)
    return x_new, h, survivor_lists_reference(h, thresholds, col_scale, segments)


def silu_mul_compact_reference(gate_up: torch.Tensor, thresholds: torch.Tensor, col_scale: Optional[torch.Tensor],
                               ) -> tuple[torch.Tensor, SurvivorLists]:
    """Plain-torch ``silu_mul_compact``: ``(silu(gate) * up, its list)`` with eager PyTorch's roundings."""
    k = _check_silu_mul(gate_up, thresholds, col_scale)
    gate, up = gate_up.split([k, k], dim=-1)
    mid = F.silu(gate) * up
    return mid, survivor_lists_reference(mid, thresholds, col_scale, 1)


def gather_linear_reference(idx: torch.Tensor, val: torch.Tensor, xm: torch.Tensor, counts: torch.Tensor,
                            w_t: torch.Tensor, splits: Optional[Sequence[int]] = None, *,
                            compute_dtype: torch.dtype = torch.float32,
                            out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Plain-torch ``gather_linear``: ``y[0, seg_j] = xm_j @ w_t[:, seg_j]`` in ``compute_dtype``, returned in
    ``out_dtype`` (default: w_t's dtype)."""
    split_list = _check_gather(idx, val, xm, counts, w_t, splits)
    k = w_t.shape[0]
    outs, start = [], 0
    for j, width in enumerate(split_list):
        xm_j = xm[j * k : (j + 1) * k].to(compute_dtype)
        outs.append(xm_j @ w_t[:, start : start + width].to(compute_dtype))
        start += width
    return torch.cat(outs).reshape(1, -1).to(out_dtype or w_t.dtype)


# ----------------------------------------------------------------------------------------------
# Triton paths


def empty_lists(device: torch.device, k: int, segments: int) -> SurvivorLists:
    """Fresh (uninitialised) list tensors for ``segments`` segments of K entries (counts [S])."""
    return SurvivorLists(
        torch.empty(segments * k, dtype=torch.int32, device=device),
        torch.empty(segments * k, dtype=torch.float32, device=device),
        torch.empty(segments * k, dtype=torch.float32, device=device),
        torch.empty(segments, dtype=torch.int32, device=device),
    )


def _rule_tensors(thresholds: torch.Tensor, col_scale: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 contiguous thresholds, and the scale pointer argument (the thresholds when there is no scale)."""
    thr = thresholds.reshape(-1).to(torch.float32).contiguous()
    return thr, thr if col_scale is None else col_scale.to(torch.float32).contiguous()


def _check_out_lists(name: str, lists: SurvivorLists, k: int, segments: int) -> None:
    """Checks that ``out`` lists have the shapes ``empty_lists`` gives (the kernels index by them)."""
    want = empty_lists(torch.device("meta"), k, segments)
    if any(t.shape != w.shape or t.dtype != w.dtype or not t.is_contiguous() for t, w in zip(lists, want)):
        raise ValueError(f"{name}: out lists must be shaped {[tuple(w.shape) for w in want]}, got "
                         f"{[tuple(t.shape) for t in lists]}")


def add_rmsnorm_compact_triton(x: torch.Tensor, delta: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                               thresholds: torch.Tensor, col_scale: Optional[torch.Tensor], segments: int,
                               norm_offset: float = 0.0, *, chunk: Optional[int] = None,
                               out: Optional[tuple[torch.Tensor, torch.Tensor, SurvivorLists]] = None,
                               ) -> tuple[torch.Tensor, torch.Tensor, SurvivorLists]:
    """The Triton implementation (one launch, one program per segment and chunk of ``list_chunk(K, chunk)``
    entries); ``out`` receives the results (``(x_new, h, lists)`` shaped like the return value; tests
    poison it) instead of fresh tensors."""
    _check_add_rmsnorm(x, delta, norm_weight, thresholds, col_scale, segments)
    k = x.shape[1]
    if out is None:
        out = (torch.empty_like(x), torch.empty_like(x), empty_lists(x.device, k, segments))
    else:
        _check_out_lists("add_rmsnorm_compact", out[2], k, segments)
    x_new, h, lists = out
    thr, scale = _rule_tensors(thresholds, col_scale)
    block_k = _pow2_ceil(k)
    chunk = list_chunk(k, chunk or NORM_CHUNK)  # read at call time: tuning scripts may set NORM_CHUNK
    _triton_kernels().add_rmsnorm_compact_kernel[(segments, -(-k // chunk))](
        x.contiguous(), delta.contiguous(), norm_weight.contiguous(), thr, scale, x_new, h, *lists, k, float(eps),
        HAS_SCALE=col_scale is not None, BLOCK_K=block_k, CHUNK=chunk, OFFSET=float(norm_offset),
        num_warps=4 if block_k <= 4096 else 8, **pdl_launch(pdl_mode(x.device)),
    )
    return x_new, h, lists


def silu_mul_compact_triton(gate_up: torch.Tensor, thresholds: torch.Tensor, col_scale: Optional[torch.Tensor], *,
                            chunk: int = SILU_CHUNK, prefix: int = SILU_PREFIX, num_warps: int = SILU_WARPS,
                            out: Optional[tuple[torch.Tensor, SurvivorLists]] = None,
                            ) -> tuple[torch.Tensor, SurvivorLists]:
    """The Triton implementation (one launch, one program per chunk of ``list_chunk(K, chunk)`` entries,
    each counting earlier survivors ``prefix`` entries per step); ``out`` receives ``(mid, lists)``."""
    k = _check_silu_mul(gate_up, thresholds, col_scale)
    if out is None:
        out = (gate_up.new_empty((1, k)), empty_lists(gate_up.device, k, 1))
    else:
        _check_out_lists("silu_mul_compact", out[1], k, 1)
    mid, lists = out
    thr, scale = _rule_tensors(thresholds, col_scale)
    chunk = list_chunk(k, chunk)
    _triton_kernels().silu_mul_compact_kernel[(-(-k // chunk),)](
        gate_up.contiguous(), mid, thr, scale, *lists, k,
        HAS_SCALE=col_scale is not None, CHUNK=chunk, PREFIX=list_chunk(k, prefix), num_warps=num_warps,
        **pdl_launch(pdl_mode(gate_up.device)),
    )
    return mid, lists


def gather_linear_triton(idx: torch.Tensor, val: torch.Tensor, xm: torch.Tensor, counts: torch.Tensor,
                         w_t: torch.Tensor, splits: Optional[Sequence[int]] = None, *,
                         config: Optional[KernelConfig] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The Triton implementation (``gather_gemv_kernel``, one launch). ``config`` overrides the table lookup
    (``get_gather_config``); ``out`` [1, N] in w_t's dtype receives the result."""
    split_list = _check_gather(idx, val, xm, counts, w_t, splits)
    k, n = w_t.shape
    if config is None:
        config = get_gather_config(k, n, w_t.dtype, sm_count(w_t.device))
    if not config.gather:
        raise ValueError(f"gather_linear needs a gather configuration (KernelConfig(gather=True)), got {config}")
    if out is None:
        out = w_t.new_empty((1, n))
    elif out.shape != (1, n) or out.dtype != w_t.dtype or out.device != w_t.device or not out.is_contiguous():
        raise ValueError(f"gather_linear: out must be a contiguous [1, {n}] {w_t.dtype} tensor on {w_t.device}")
    launch_gather_gemv(idx, val, xm, counts, w_t, out, split_list, config)
    return out


# ----------------------------------------------------------------------------------------------
# The custom ops


@torch.library.custom_op("teal::add_rmsnorm_compact", mutates_args=())
def _add_rmsnorm_compact_op(x: torch.Tensor, delta: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                            thresholds: torch.Tensor, col_scale: Optional[torch.Tensor], segments: int,
                            norm_offset: float = 0.0,
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    run = add_rmsnorm_compact_triton if uses_triton(x.device) else add_rmsnorm_compact_reference
    x_new, h, lists = run(x, delta, norm_weight, eps, thresholds, col_scale, segments, norm_offset)
    return (x_new, h, *lists)


@_add_rmsnorm_compact_op.register_fake
def _add_rmsnorm_compact_fake(x: torch.Tensor, delta: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                              thresholds: torch.Tensor, col_scale: Optional[torch.Tensor], segments: int,
                              norm_offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_add_rmsnorm(x, delta, norm_weight, thresholds, col_scale, segments)
    return (torch.empty_like(x), torch.empty_like(x), *empty_lists(x.device, x.shape[1], segments))


@torch.library.custom_op("teal::silu_mul_compact", mutates_args=())
def _silu_mul_compact_op(gate_up: torch.Tensor, thresholds: torch.Tensor, col_scale: Optional[torch.Tensor],
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    run = silu_mul_compact_triton if uses_triton(gate_up.device) else silu_mul_compact_reference
    mid, lists = run(gate_up, thresholds, col_scale)
    return (mid, *lists)


@_silu_mul_compact_op.register_fake
def _silu_mul_compact_fake(gate_up: torch.Tensor, thresholds: torch.Tensor, col_scale: Optional[torch.Tensor],
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    k = _check_silu_mul(gate_up, thresholds, col_scale)
    return (gate_up.new_empty((1, k)), *empty_lists(gate_up.device, k, 1))


@torch.library.custom_op("teal::gather_linear", mutates_args=())
def _gather_linear_op(idx: torch.Tensor, val: torch.Tensor, xm: torch.Tensor, counts: torch.Tensor,
                      w_t: torch.Tensor, splits: Optional[List[int]] = None) -> torch.Tensor:
    run = gather_linear_triton if uses_triton(w_t.device) else gather_linear_reference
    return run(idx, val, xm, counts, w_t, splits)


@_gather_linear_op.register_fake
def _gather_linear_fake(idx: torch.Tensor, val: torch.Tensor, xm: torch.Tensor, counts: torch.Tensor,
                        w_t: torch.Tensor, splits: Optional[List[int]] = None) -> torch.Tensor:
    _check_gather(idx, val, xm, counts, w_t, splits)
    return w_t.new_empty((1, w_t.shape[1]))


# ----------------------------------------------------------------------------------------------
# Public entry points


def add_rmsnorm_compact(x: torch.Tensor, delta: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                        thresholds: torch.Tensor, col_scale: Optional[torch.Tensor] = None, norm_offset: float = 0.0,
                        ) -> tuple[torch.Tensor, torch.Tensor, SurvivorLists]:
    """``x_new = x + delta``, ``h = rms_norm(x_new) * norm_weight`` (the engine's roundings; with a nonzero
    ``norm_offset``, Gemma's ``(offset + norm_weight)`` in fp32) and, per segment j, the survivor list of
    ``h`` under ``|h| * c_j > t_j``.

    x, delta [1, K] (bf16/fp16/fp32, K <= MAX_NORM_K); norm_weight [K] in x's dtype; thresholds fp32
    [S] (S <= 4); col_scale fp32 [S, K] or None. Returns ``(x_new, h, SurvivorLists)``.
    """
    out = torch.ops.teal.add_rmsnorm_compact(x, delta, norm_weight, float(eps), thresholds, col_scale,
                                             thresholds.numel(), float(norm_offset))
    return out[0], out[1], SurvivorLists(*out[2:])


def silu_mul_compact(gate_up: torch.Tensor, thresholds: torch.Tensor,
                     col_scale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, SurvivorLists]:
    """``mid = silu(gate) * up`` (eager PyTorch's roundings) from ``gate_up = gate | up`` [1, 2K], and the
    survivor list of ``mid`` under ``|mid| * c > t``; thresholds fp32 [1],
    col_scale fp32 [1, K] or None.
    Returns ``(mid [1, K], SurvivorLists)``."""
    out = torch.ops.teal.silu_mul_compact(gate_up, thresholds, col_scale)
    return out[0], SurvivorLists(*out[1:])


def gather_linear(lists: SurvivorLists, w_t: torch.Tensor, splits: Optional[Sequence[int]] = None) -> torch.Tensor:
    """``y[0, seg_j] = xm_j @ w_t[:, seg_j]`` (fp32 accumulation, y [1, N] in w_t's dtype) from a producer's
    survivor lists, reading only the weight rows of surviving entries (phase B of the gather path).

    w_t [K, N] contiguous (``prepare_weight`` / ``fuse_weights``); splits: the S segment widths (None: one).
    """
    return torch.ops.teal.gather_linear(*lists, w_t, None if splits is None else [int(s) for s in splits])
