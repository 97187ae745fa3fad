"""``teal::sparse_linear``: fused threshold + sparse GEMV as a torch.library custom op.

On CUDA the op runs the Triton kernel of ``teal.kernels._triton`` (batch 1..8) or the dense fallback
(cuBLAS on the masked input); elsewhere it runs the plain-torch reference. A fake implementation
lets ``torch.compile(fullgraph=True)`` trace it, and nothing on the CUDA path synchronises with the
host, so CUDA graphs can capture it (call it once before capture so its workspace exists).
"""

from __future__ import annotations

import collections
import functools
import importlib
import os
import threading
from collections.abc import Sequence
from itertools import accumulate
from types import ModuleType
from typing import List, Optional

import torch
import torch.nn.functional as F

from teal.kernels.configs import DEFAULT_SM_COUNT, MAX_KERNEL_BATCH, REGIMES, KernelConfig, get_config

#: Segments one kernel launch resolves; more are launched in groups of this many.
MAX_SEGMENTS_PER_LAUNCH = 4

#: How many calls took each path ("triton", "cuda" or "dense"), for tests and benchmarks. Host-side only.
path_counts: collections.Counter[str] = collections.Counter()

_SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# ----------------------------------------------------------------------------------------------
# Weight helpers


def prepare_weight(weight: torch.Tensor) -> torch.Tensor:
    """The kernel's weight layout: ``nn.Linear`` weight [N, K] -> contiguous transpose ``w_t`` [K, N]."""
    if weight.dim() != 2:
        raise ValueError(f"prepare_weight expects a 2-D linear weight [out, in], got shape {tuple(weight.shape)}")
    return weight.detach().t().contiguous()


def fuse_weights(weights: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """Fuse projections that share an input (q|k|v, gate|up) into one ``w_t`` [K, sum N_j] and its splits."""
    if not weights:
        raise ValueError("fuse_weights needs at least one weight")
    first = weights[0]
    for i, w in enumerate(weights):
        if w.dim() != 2 or w.shape[1] != first.shape[1]:
            raise ValueError(
                f"fuse_weights: weight {i} has shape {tuple(w.shape)}; every weight must be [N_j, "
                f"{first.shape[1] if first.dim() == 2 else 'K'}] (same input size)"
            )
        if w.dtype != first.dtype or w.device != first.device:
            raise ValueError(
                f"fuse_weights: weight {i} is {w.dtype} on {w.device}, weight 0 is {first.dtype} on "
                f"{first.device}; convert them to one dtype and device first"
            )
    w_t = torch.cat([w.detach() for w in weights], dim=0).t().contiguous()
    return w_t, [int(w.shape[0]) for w in weights]


# ----------------------------------------------------------------------------------------------
# Argument checks (shapes and dtypes only: safe under fake tensors, no host sync)


def _check_args(
    x: torch.Tensor,
    w_t: torch.Tensor,
    thresholds: torch.Tensor,
    splits: Optional[Sequence[int]],
    col_scale: Optional[torch.Tensor],
) -> list[int]:
    if x.dim() != 2:
        raise ValueError(f"sparse_linear: x must be [B, K], got shape {tuple(x.shape)}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"sparse_linear: x must be bf16, fp16 or fp32, got {x.dtype}")
    if w_t.dim() != 2 or w_t.shape[0] != x.shape[1]:
        raise ValueError(
            f"sparse_linear: w_t must be the transposed weight [K={x.shape[1]}, N], got shape "
            f"{tuple(w_t.shape)}; build it with teal.kernels.prepare_weight(linear.weight)"
        )
    if not w_t.is_contiguous():
        raise ValueError(
            "sparse_linear: w_t must be contiguous [K, N]; build it with teal.kernels.prepare_weight(linear.weight)"
        )
    if w_t.dtype != x.dtype:
        raise ValueError(f"sparse_linear: w_t is {w_t.dtype} but x is {x.dtype}; they must match")
    n = w_t.shape[1]
    split_list = [int(n)] if splits is None else [int(s) for s in splits]
    if any(s <= 0 for s in split_list) or sum(split_list) != n:
        raise ValueError(f"sparse_linear: splits {split_list} must be positive widths summing to N={n}")
    if thresholds.dim() > 1 or thresholds.numel() != len(split_list) or not thresholds.is_floating_point():
        raise ValueError(
            f"sparse_linear: thresholds must be a float tensor with one value per segment "
            f"({len(split_list)}), got shape {tuple(thresholds.shape)} {thresholds.dtype}"
        )
    if col_scale is not None:
        if col_scale.shape != (len(split_list), x.shape[1]) or not col_scale.is_floating_point():
            raise ValueError(
                f"sparse_linear: col_scale must be a float tensor [S={len(split_list)}, K={x.shape[1]}], "
                f"got shape {tuple(col_scale.shape)} {col_scale.dtype}"
            )
    for name, t in (("w_t", w_t), ("thresholds", thresholds), ("col_scale", col_scale)):
        if t is not None and t.device != x.device:
            raise ValueError(f"sparse_linear: {name} is on {t.device} but x is on {x.device}; move it to x's device")
    return split_list


# ----------------------------------------------------------------------------------------------
# Reference


def sparse_linear_reference(
    x: torch.Tensor,
    w_t: torch.Tensor,
    thresholds: torch.Tensor,
    splits: Optional[Sequence[int]] = None,
    col_scale: Optional[torch.Tensor] = None,
    *,
    compute_dtype: torch.dtype = torch.float32,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Plain-torch ``sparse_linear``: per segment, mask by ``|x| * c_j > t_j`` (fp32), then matmul.

    ``compute_dtype`` is the accumulation dtype (float64 gives a test reference); the result is
    returned in ``out_dtype`` (default: x's dtype).
    """
    split_list = _check_args(x, w_t, thresholds, splits, col_scale)
    score = x.abs().float()
    thr = thresholds.reshape(-1).float()
    xc = x.to(compute_dtype)
    outs = []
    start = 0
    for j, width in enumerate(split_list):
        seg_score = score if col_scale is None else score * col_scale[j].float()
        keep = seg_score > thr[j]
        xm = torch.where(keep, xc, torch.zeros((), dtype=compute_dtype, device=x.device))
        outs.append(xm @ w_t[:, start : start + width].to(compute_dtype))
        start += width
    y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    return y.to(out_dtype or x.dtype)


# ----------------------------------------------------------------------------------------------
# Triton path


def import_triton_module(module: str, op: str) -> ModuleType:
    """``teal.kernels.<module>`` (Triton kernels), or a RuntimeError saying that ``op`` needs Triton."""
    try:
        return importlib.import_module(f"teal.kernels.{module}")
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError(f"{op} on CUDA needs Triton; install it (pip install 'teal-sparsity[gpu]')") from exc


@functools.cache
def _triton_kernels() -> ModuleType:
    return import_triton_module("_triton", "sparse_linear")


def _interpreting() -> bool:
    """True when Triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


#: Programmatic dependent launch of the batch-1 kernels (see ``teal/kernels/_pdl_triton.py``): 0 off,
#: 1 signal at the start, 2 signal after the main loop. ``$TEAL_PDL`` overrides it.
DEFAULT_PDL = 1
PDL_MODES = (0, 1, 2)


@functools.cache
def _pdl_supported(device_index: int) -> bool:
    if torch.cuda.get_device_capability(device_index)[0] < 9:
        return False
    return bool(import_triton_module("_pdl_triton", "programmatic dependent launch").HAS_GDC)


#: ``$TEAL_CUDA_PDL``: the same for the CUDA C++ kernel (``teal/kernels/sparse_gemv.cu``): 1 lets the next
#: kernel launch when this one starts, 2 when its weight loop is done (measured best on the H200).
DEFAULT_CUDA_PDL = 2


@functools.lru_cache(maxsize=8)
def _parse_pdl(raw: str, variable: str = "TEAL_PDL") -> int:
    raw = raw.strip()
    if raw not in {str(m) for m in PDL_MODES}:
        raise ValueError(f"{variable} must be one of {', '.join(map(str, PDL_MODES))} (0 turns programmatic "
                         f"dependent launch off), got {raw!r}")
    return int(raw)


def pdl_mode(device: torch.device) -> int:
    """PDL mode for kernels launched on ``device``: ``$TEAL_PDL`` (or ``DEFAULT_PDL``) on a CUDA device of
    compute capability 9.0 or later whose Triton has grid dependency control, else 0 (never interpreted).
    Called on every launch: the variable's value is parsed once."""
    mode = _parse_pdl(os.environ.get("TEAL_PDL", str(DEFAULT_PDL)))
    if mode == 0 or device.type != "cuda" or _interpreting():
        return 0
    return mode if _pdl_supported(device.index if device.index is not None else torch.cuda.current_device()) else 0


def cuda_pdl_mode(device: torch.device) -> int:
    """PDL mode of the CUDA C++ kernel on ``device``: ``$TEAL_CUDA_PDL`` (or ``DEFAULT_CUDA_PDL``) where
    ``pdl_mode`` is on, else 0."""
    if pdl_mode(device) == 0:
        return 0
    return _parse_pdl(os.environ.get("TEAL_CUDA_PDL", str(DEFAULT_CUDA_PDL)), "TEAL_CUDA_PDL")


def pdl_launch(mode: int) -> dict[str, object]:
    """Launch keywords of a kernel taking the ``PDL`` constexpr: ``PDL=mode`` (+ ``launch_pdl`` when on)."""
    return {"PDL": mode, "launch_pdl": True} if mode else {"PDL": 0}


@functools.cache
def _sm_count(device_index: int) -> int:
    return int(torch.cuda.get_device_properties(device_index).multi_processor_count)


def sm_count(device: torch.device) -> int:
    """Multiprocessor count of ``device`` (the H200's 132 when it is not a CUDA device)."""
    if device.type != "cuda":
        return DEFAULT_SM_COUNT
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


class _Workspace:
    """Per-device scratch buffers of the kernel, by name; tickets are left at zero by every launch.

    Buffers only grow; replaced ones are kept alive so that CUDA graphs captured earlier still point
    at valid memory. Launches on one device share them, so they must be ordered (one stream).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffers: dict[tuple[str, Optional[int], str], torch.Tensor] = {}
        self._retired: list[torch.Tensor] = []

    def get(self, device: torch.device, name: str, numel: int, dtype: torch.dtype, zero: bool = False) -> torch.Tensor:
        key = (device.type, device.index, name)
        with self._lock:
            buf = self._buffers.get(key)
            if buf is None or buf.numel() < numel:
                if buf is not None:
                    self._retired.append(buf)
                size = 1 << max(10, (max(numel, 1) - 1).bit_length())
                buf = (torch.zeros if zero else torch.empty)(size, dtype=dtype, device=device)
                self._buffers[key] = buf
            return buf


_workspace = _Workspace()


def _launch(
    x: torch.Tensor,
    w_t: torch.Tensor,
    y: torch.Tensor,
    thresholds: torch.Tensor,
    col_scale: Optional[torch.Tensor],
    split_list: list[int],
    config: KernelConfig,
    glu: bool = False,
) -> None:
    """One kernel launch over up to MAX_SEGMENTS_PER_LAUNCH segments (w_t and y may be column views).

    glu: x is one gate|up row [1, 2K] and the kernel multiplies silu(gate) * up (batch-1 kernels only).
    ``config.compact`` (in-kernel survivor lists) is a batch-1 path: a ValueError for more rows."""
    batch, k = x.shape[0], w_t.shape[0]
    if config.compact and batch > 1:
        raise ValueError(f"sparse_linear: {config} has compact=True, which runs batch 1 only, but x has {batch} "
                         f"rows; use a config without compact (or KernelConfig(dense=True)) for batches")
    kernels = _triton_kernels()
    n = sum(split_list)
    block_n, block_r, split_k = config.block_n, config.block_r, config.split_k
    ends = list(accumulate(split_list))
    blocks = list(accumulate(-(-w // block_n) for w in split_list))
    pad = MAX_SEGMENTS_PER_LAUNCH - len(split_list)
    offs = (ends[:-1] + [n] * pad)[:3]
    cbs = (blocks[:-1] + [blocks[-1]] * pad)[:3]
    rows_per_split = -(-(-(-k // split_k)) // block_r) * block_r
    red_b = 1 << (batch - 1).bit_length()
    block_b = 16 if config.use_dot else red_b
    red_chunk = max(1, min(split_k, 1 << max(0, (4096 // (red_b * block_n)).bit_length() - 1)))
    partials = _workspace.get(x.device, "partials", split_k * batch * n if split_k > 1 else 1, torch.float32)
    tickets = _workspace.get(x.device, "tickets", blocks[-1], torch.int32, zero=True)
    compact = config.compact
    slots = blocks[-1] * split_k * rows_per_split if compact else 1
    row_list = _workspace.get(x.device, "rows", slots, torch.int32)
    value_list = _workspace.get(x.device, "values", slots, torch.float32)
    # Entries of x listed per step (compact): at most 4096.
    chunk = min(4096, 1 << (rows_per_split - 1).bit_length())
    scale = col_scale if col_scale is not None else thresholds
    kernels.sparse_gemv_kernel[(blocks[-1], split_k)](
        x,
        w_t,
        y,
        thresholds,
        scale,
        partials,
        tickets,
        row_list,
        value_list,
        batch,
        k,
        n,
        x.stride(0),
        w_t.stride(0),
        y.stride(0),
        rows_per_split,
        offs[0],
        offs[1],
        offs[2],
        cbs[0],
        cbs[1],
        cbs[2],
        HAS_SCALE=col_scale is not None,
        BLOCK_B=block_b,
        RED_B=red_b,
        BLOCK_R=block_r,
        BLOCK_N=block_n,
        SPLIT_K=split_k,
        RED_CHUNK=red_chunk,
        USE_DOT=config.use_dot,
        DOT_FP32=config.use_dot and (_interpreting() or x.dtype == torch.float32),
        COMPACT=compact,
        CHUNK=chunk,
        GLU=glu,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **pdl_launch(pdl_mode(x.device)),
    )


#: Survivors per step of phase A's prefix count, and entries per phase A program (upper bounds).
_COMPACT_PREFIX = 8192
_COMPACT_CHUNK = 1024

#: Column blocks of the last gather launch per device, for ``last_gather_branches``.
_last_gather_blocks: dict[tuple[str, Optional[int]], int] = {}


def _device_key(device: torch.device) -> tuple[str, Optional[int]]:
    """(type, index) with a CUDA device's missing index resolved, so "cuda" and "cuda:0" agree."""
    device = torch.device(device)
    index = device.index
    if device.type == "cuda" and index is None:
        index = torch.cuda.current_device()
    return device.type, index


def _pow2_ceil(value: int) -> int:
    return 1 << max(0, (max(value, 1) - 1).bit_length())


def compact_input(
    x: torch.Tensor, thresholds: torch.Tensor, col_scale: Optional[torch.Tensor], segments: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Phase A of the gather path: per segment, the surviving entries of ``x[0]`` as an index list.

    Returns workspace views ``(idx [S*K] int32, val [S*K] fp32, xm [S*K] fp32, counts [S] int32)``:
    segment j's survivors (ascending) are ``idx[j*K : j*K + counts[j]]`` with values ``val[...]``;
    ``xm[j*K : (j+1)*K]`` is the masked input. Buffers are reused by the next call on the device.
    """
    k = x.shape[1]
    idx = _workspace.get(x.device, "gather_rows", segments * k, torch.int32)
    val = _workspace.get(x.device, "gather_values", segments * k, torch.float32)
    xm = _workspace.get(x.device, "gather_masked", segments * k, torch.float32)
    counts = _workspace.get(x.device, "gather_counts", segments, torch.int32)
    chunk = min(_COMPACT_CHUNK, _pow2_ceil(k))
    prefix = min(_COMPACT_PREFIX, _pow2_ceil(k))
    _triton_kernels().compact_input_kernel[(segments, -(-k // chunk))](
        x, thresholds, col_scale if col_scale is not None else thresholds, idx, val, xm, counts, k,
        HAS_SCALE=col_scale is not None, CHUNK=chunk, PREFIX=prefix, num_warps=4, **pdl_launch(pdl_mode(x.device)),
    )
    return idx, val, xm, counts


def last_gather_branches(device: torch.device) -> torch.Tensor:
    """Per column block of the last gather launch on ``device``: True where it took the dense branch.

    Diagnostics for tests and benchmarks; reads device memory (synchronises).
    """
    key = _device_key(device)
    if key not in _last_gather_blocks:
        raise RuntimeError(f"no gather launch has run on {device} yet")
    blocks = _last_gather_blocks[key]
    flags = _workspace.get(torch.device(*key) if key[1] is not None else torch.device(key[0]), "gather_branch",
                           blocks, torch.int32)
    return flags[:blocks].bool()


def _launch_gather(
    x: torch.Tensor,
    w_t: torch.Tensor,
    y: torch.Tensor,
    thresholds: torch.Tensor,
    col_scale: Optional[torch.Tensor],
    split_list: list[int],
    config: KernelConfig,
) -> None:
    """Batch 1, two launches: compaction of x (phase A), then the balanced gather GEMV (phase B)."""
    idx, val, xm, counts = compact_input(x, thresholds, col_scale, len(split_list))
    launch_gather_gemv(idx, val, xm, counts, w_t, y, split_list, config)


def launch_gather_gemv(
    idx: torch.Tensor,
    val: torch.Tensor,
    xm: torch.Tensor,
    counts: torch.Tensor,
    w_t: torch.Tensor,
    y: torch.Tensor,
    split_list: list[int],
    config: KernelConfig,
) -> None:
    """Phase B alone: ``y[0, seg_j] = xm_j @ w_t[:, seg_j]`` from survivor lists in phase A's layout.

    ``idx``/``val``/``xm`` hold ``len(split_list)`` segments of K entries each (segment j's survivors,
    ascending, at ``idx/val[j*K : j*K + counts[j]]``) and ``counts`` their survivor counts (at least S
    entries; ``compact_input`` or a producer kernel wrote them); w_t [K, N] and y [1, N] may be column
    views; at most MAX_SEGMENTS_PER_LAUNCH segments.
    """
    k = w_t.shape[0]
    n = sum(split_list)
    block_n, block_r, split_k = config.block_n, config.block_r, config.split_k
    ends = list(accumulate(split_list))
    blocks = list(accumulate(-(-w // block_n) for w in split_list))
    pad = MAX_SEGMENTS_PER_LAUNCH - len(split_list)
    offs = (ends[:-1] + [n] * pad)[:3]
    cbs = (blocks[:-1] + [blocks[-1]] * pad)[:3]
    device = w_t.device
    partials = _workspace.get(device, "partials", split_k * n if split_k > 1 else 1, torch.float32)
    tickets = _workspace.get(device, "tickets", blocks[-1], torch.int32, zero=True)
    branch = _workspace.get(device, "gather_branch", blocks[-1], torch.int32)
    _last_gather_blocks[_device_key(device)] = blocks[-1]
    rows_per_split = -(-(-(-k // split_k)) // block_r) * block_r
    red_chunk = max(1, min(16, 4096 // block_n))  # fixed per width: one compiled variant for every split
    _triton_kernels().gather_gemv_kernel[(blocks[-1], split_k)](
        w_t, y, idx, val, xm, counts, partials, tickets, branch,
        k, n, w_t.stride(0), split_k, rows_per_split, offs[0], offs[1], offs[2], cbs[0], cbs[1], cbs[2],
        BLOCK_R=block_r, BLOCK_N=block_n, RED_CHUNK=red_chunk, DENSE_NUM=round(config.dense_above * 64),
        NUM_STAGES=config.num_stages, num_warps=config.num_warps, **pdl_launch(pdl_mode(device)),
    )


def cuda_kernel_available(device: torch.device) -> bool:
    """Whether the CUDA C++ kernel (``teal.kernels.cuda``) runs on ``device`` (CUDA, compute capability 9.0+,
    NVRTC found). Checked once per device; False off CUDA."""
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_kernels().device_problem(index) is None


def _cuda_or_fallback(x: torch.Tensor, w_t: torch.Tensor, split_list: list[int], config: KernelConfig) -> KernelConfig:
    """``config`` when the CUDA kernel can run this call, else the Triton table's (with a one-time warning
    on a CUDA device; CPU tensors, which only the Triton interpreter runs, fall back silently)."""
    if x.device.type == "cuda":
        reason = _cuda_kernels().unsupported_reason(x, w_t, split_list, config)
        if reason is None:
            return config
        _cuda_kernels().warn_fallback(reason)
    return get_config(w_t.shape[0], w_t.shape[1], x.shape[0], x.dtype, sm_count(x.device))


@functools.cache
def _cuda_kernels() -> ModuleType:
    return importlib.import_module("teal.kernels.cuda")


def _launch_cuda(
    x: torch.Tensor,
    w_t: torch.Tensor,
    y: torch.Tensor,
    thresholds: torch.Tensor,
    col_scale: Optional[torch.Tensor],
    split_list: list[int],
    config: KernelConfig,
    glu: bool = False,
) -> None:
    """One launch of the CUDA C++ kernel (``teal.kernels.cuda``) over up to 4 segments and 1..8 rows (the same
    signature as the Triton ``_launch``, so the callers pick either)."""
    _cuda_kernels().launch(x, w_t, y, thresholds, col_scale, split_list, config, glu=glu, pdl=cuda_pdl_mode(x.device))


#: Rows x narrowest segment width from which the dense fallback multiplies each segment separately (measured
#: crossover on the H200: Llama-3-8B q|k|v from 256 rows, gate|up and Llama-2-7B q|k|v from 64).
PER_SEGMENT_MIN_WORK = 2**18


def dense_masked_linear(
    x: torch.Tensor,
    w_t: torch.Tensor,
    thresholds: torch.Tensor,
    split_list: list[int],
    col_scale: Optional[torch.Tensor],
) -> torch.Tensor:
    """Dense fallback: one Triton launch masks x per segment ([S*B, K]), then cuBLAS.

    With S segments and few rows the product is one [S*B, K] @ [K, N] (it reads w_t once; segment j's columns
    come from rows j*B..j*B+B-1). From ``PER_SEGMENT_MIN_WORK`` rows x narrowest segment width on (a long
    prompt's sparse prefill), that stacked product, compute-bound by then, would multiply every segment's rows
    by every column, S times the work: each segment's rows multiply only its own columns instead (on the H200
    at 1024 rows: Llama-3-8B q|k|v 97.9 against 241.1 us, gate|up 438 against 780;
    benchmarks/results/2026-11-29-h200-dense-fallback-large-batches.json).
    """
    batch, k = x.shape
    segments = len(split_list)
    xm = torch.empty((segments * batch, k), dtype=x.dtype, device=x.device)
    thr = thresholds.reshape(-1).to(torch.float32).contiguous()
    scale = None if col_scale is None else col_scale.to(torch.float32).contiguous()
    block_k = 1024
    _triton_kernels().mask_input_kernel[(segments * batch, -(-k // block_k))](
        x.contiguous(), xm, thr, scale if scale is not None else thr, batch, k,
        HAS_SCALE=scale is not None, BLOCK_K=block_k, num_warps=4,
    )
    if segments == 1:
        return xm @ w_t
    per_segment = batch * min(split_list) >= PER_SEGMENT_MIN_WORK
    stacked = None if per_segment else xm @ w_t
    parts, start = [], 0
    for j, width in enumerate(split_list):
        rows = slice(j * batch, (j + 1) * batch)
        cols = slice(start, start + width)
        parts.append(xm[rows] @ w_t[:, cols] if per_segment else stacked[rows, cols])
        start += width
    return torch.cat(parts, dim=1)


def sparse_linear_triton(
    x: torch.Tensor,
    w_t: torch.Tensor,
    thresholds: torch.Tensor,
    splits: Optional[Sequence[int]] = None,
    col_scale: Optional[torch.Tensor] = None,
    *,
    config: Optional[KernelConfig] = None,
    out: Optional[torch.Tensor] = None,
    regime: str = "sparse",
) -> torch.Tensor:
    """The CUDA implementation (also runs on CPU tensors under ``TRITON_INTERPRET=1``).

    ``config`` overrides the table lookup (``regime``: which tuned table, ``configs.REGIMES``); ``out``
    receives the result (every element is written).
    Batches above ``MAX_KERNEL_BATCH``, and shapes whose config says ``dense``, take the dense
    fallback; ``path_counts`` records which path ran.
    """
    split_list = _check_args(x, w_t, thresholds, splits, col_scale)
    batch, k = x.shape
    n = w_t.shape[1]
    if config is None:
        config = get_config(k, n, batch, x.dtype, sm_count(x.device), cuda_ok=cuda_kernel_available(x.device),
                            regime=regime)
    if out is not None and (
        out.shape != (batch, n) or out.dtype != x.dtype or out.device != x.device or out.stride(1) != 1
    ):
        raise ValueError(f"sparse_linear: out must be a [{batch}, {n}] {x.dtype} tensor with contiguous rows")
    if batch == 0:
        return torch.empty((0, n), dtype=x.dtype, device=x.device) if out is None else out
    if config.cuda:
        config = _cuda_or_fallback(x, w_t, split_list, config)
    if config.dense or batch > MAX_KERNEL_BATCH or k * n >= 2**31:
        path_counts["dense"] += 1
        result = dense_masked_linear(x, w_t, thresholds, split_list, col_scale)
        if out is None:
            return result
        out.copy_(result)
        return out
    path_counts["cuda" if config.cuda else "triton"] += 1
    if out is None:
        out = torch.empty((batch, n), dtype=x.dtype, device=x.device)
    x = x.contiguous()
    thr = thresholds.reshape(-1).to(torch.float32).contiguous()
    scale = None if col_scale is None else col_scale.to(torch.float32).contiguous()
    start = 0
    for g in range(0, len(split_list), MAX_SEGMENTS_PER_LAUNCH):
        group = split_list[g : g + MAX_SEGMENTS_PER_LAUNCH]
        width = sum(group)
        whole = width == n
        launch = _launch_cuda if config.cuda else _launch_gather if config.gather and batch == 1 else _launch
        launch(
            x,
            w_t if whole else w_t[:, start : start + width],
            out if whole else out[:, start : start + width],
            thr[g : g + len(group)],
            None if scale is None else scale[g : g + len(group)],
            group,
            config,
        )
        start += width
    return out


# ----------------------------------------------------------------------------------------------
# The custom op


@torch.library.custom_op("teal::sparse_linear", mutates_args=())
def _sparse_linear_op(
    x: torch.Tensor,
    w_t: torch.Tensor,
    thresholds: torch.Tensor,
    splits: Optional[List[int]] = None,
    col_scale: Optional[torch.Tensor] = None,
    regime: str = "sparse",
) -> torch.Tensor:
    if x.device.type == "cuda":
        return sparse_linear_triton(x, w_t, thresholds, splits, col_scale, regime=regime)
    return sparse_linear_reference(x, w_t, thresholds, splits, col_scale)


@_sparse_linear_op.register_fake
def _sparse_linear_fake(
    x: torch.Tensor,
    w_t: torch.Tensor,
    thresholds: torch.Tensor,
    splits: Optional[List[int]] = None,
    col_scale: Optional[torch.Tensor] = None,
    regime: str = "sparse",
) -> torch.Tensor:
    _check_args(x, w_t, thresholds, splits, col_scale)
    _check_regime(regime)
    return x.new_empty((x.shape[0], w_t.shape[1]))


def sparse_linear(
    x: torch.Tensor,
    w_t: torch.Tensor,
    thresholds: torch.Tensor | float | Sequence[float],
    splits: Optional[Sequence[int]] = None,
    col_scale: Optional[torch.Tensor] = None,
    *,
    regime: str = "sparse",
) -> torch.Tensor:
    """``y[..., seg_j] = (x * (|x| * c_j > t_j)) @ w_t[:, seg_j]`` with fp32 accumulation, y in x's dtype.

    x [..., K]; w_t [K, N] contiguous (``prepare_weight`` / ``fuse_weights``); thresholds fp32 [S]
    on x's device (one per segment; a float is accepted outside graphs); splits: S widths summing
    to N (None: one segment); col_scale fp32 [S, K] (weight-aware rule) or None. regime: the tuned
    launch configuration to use, "sparse" (tuned at TEAL's sparsities) or "dense" (tuned with every
    threshold -inf: for callers that use the kernel as a dense product, as the engine's dense groups on
    Hopper); the result is the same, only the speed differs.
    """
    _check_regime(regime)
    if not isinstance(thresholds, torch.Tensor):
        thresholds = torch.tensor(thresholds, dtype=torch.float32, device=x.device)
    thresholds = thresholds.reshape(-1)
    if x.dim() == 0:
        raise ValueError("sparse_linear: x must have at least one dimension [..., K]")
    lead = x.shape[:-1]
    y = torch.ops.teal.sparse_linear(
        x.reshape(-1, x.shape[-1]), w_t, thresholds, None if splits is None else [int(s) for s in splits], col_scale,
        regime,
    )
    return y.reshape(*lead, w_t.shape[-1])


# ----------------------------------------------------------------------------------------------
# SiLU-gated input: down's product straight from the gate|up row


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of a gate|up tensor [..., 2K], in its dtype (the engine's eager roundings)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _glu_kernel_config(gate_up: torch.Tensor, w_t: torch.Tensor, regime: str = "sparse") -> Optional[KernelConfig]:
    """The config of the fused launch, or None where the SiLU product must be computed first (batch > 1,
    a dense or gather config, a weight too large for int32 offsets, or no Triton on this device)."""
    if gate_up.shape[0] != 1 or not (gate_up.device.type == "cuda" or _interpreting()):
        return None
    k, n = w_t.shape
    config = get_config(k, n, 1, gate_up.dtype, sm_count(gate_up.device), cuda_ok=cuda_kernel_available(gate_up.device),
                        regime=regime)
    if config.dense or config.gather or k * n >= 2**31:
        return None
    return config


def _check_glu_args(gate_up: torch.Tensor, w_t: torch.Tensor) -> None:
    if gate_up.dim() != 2 or gate_up.shape[1] != 2 * w_t.shape[0]:
        raise ValueError(f"sparse_linear_glu: gate_up must be [B, 2K] with K={w_t.shape[0]} the rows of w_t, got "
                         f"shape {tuple(gate_up.shape)}")


def sparse_linear_glu_triton(gate_up: torch.Tensor, w_t: torch.Tensor, thresholds: torch.Tensor,
                             col_scale: Optional[torch.Tensor] = None, *, config: Optional[KernelConfig] = None,
                             out: Optional[torch.Tensor] = None, regime: str = "sparse") -> torch.Tensor:
    """The Triton implementation: one batch-1 launch of ``sparse_gemv_kernel`` that computes the SiLU-gated
    input where it loads it (``config`` overrides the table; it must be a non-gather batch-1 config);
    elsewhere ``silu_mul`` then ``sparse_linear_triton``."""
    _check_glu_args(gate_up, w_t)
    fused = config or _glu_kernel_config(gate_up, w_t, regime)
    if fused is not None and fused.cuda:
        fused = _cuda_or_fallback(gate_up, w_t, [w_t.shape[1]], fused)
    if fused is None or fused.dense or fused.gather or gate_up.shape[0] != 1:
        return sparse_linear_triton(silu_mul(gate_up), w_t, thresholds, None, col_scale, config=config, out=out,
                                    regime=regime)
    k, n = w_t.shape
    split_list = _check_args(gate_up[:, :k], w_t, thresholds, None, col_scale)
    if out is None:
        out = torch.empty((1, n), dtype=gate_up.dtype, device=gate_up.device)
    elif out.shape != (1, n) or out.dtype != gate_up.dtype or out.device != gate_up.device or out.stride(1) != 1:
        raise ValueError(f"sparse_linear_glu: out must be a [1, {n}] {gate_up.dtype} tensor with contiguous rows")
    path_counts["cuda" if fused.cuda else "triton"] += 1
    thr = thresholds.reshape(-1).to(torch.float32).contiguous()
    scale = None if col_scale is None else col_scale.to(torch.float32).contiguous()
    (_launch_cuda if fused.cuda else _launch)(gate_up.contiguous(), w_t, out, thr, scale, split_list, fused, glu=True)
    return out


def sparse_linear_glu_reference(gate_up: torch.Tensor, w_t: torch.Tensor, thresholds: torch.Tensor,
                                col_scale: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
    """Plain torch: ``sparse_linear_reference(silu_mul(gate_up), ...)`` (kwargs go to it)."""
    _check_glu_args(gate_up, w_t)
    return sparse_linear_reference(silu_mul(gate_up), w_t, thresholds, None, col_scale, **kwargs)


@torch.library.custom_op("teal::sparse_linear_glu", mutates_args=())
def _sparse_linear_glu_op(gate_up: torch.Tensor, w_t: torch.Tensor, thresholds: torch.Tensor,
                          col_scale: Optional[torch.Tensor] = None, regime: str = "sparse") -> torch.Tensor:
    if gate_up.device.type == "cuda":
        return sparse_linear_glu_triton(gate_up, w_t, thresholds, col_scale, regime=regime)
    return sparse_linear_glu_reference(gate_up, w_t, thresholds, col_scale)


@_sparse_linear_glu_op.register_fake
def _sparse_linear_glu_fake(gate_up: torch.Tensor, w_t: torch.Tensor, thresholds: torch.Tensor,
                            col_scale: Optional[torch.Tensor] = None, regime: str = "sparse") -> torch.Tensor:
    _check_glu_args(gate_up, w_t)
    _check_regime(regime)
    _check_args(gate_up[:, : w_t.shape[0]], w_t, thresholds, None, col_scale)
    return gate_up.new_empty((gate_up.shape[0], w_t.shape[1]))


def sparse_linear_glu(gate_up: torch.Tensor, w_t: torch.Tensor, thresholds: torch.Tensor,
                      col_scale: Optional[torch.Tensor] = None, *, regime: str = "sparse") -> torch.Tensor:
    """``sparse_linear(silu(gate) * up, w_t, thresholds, None, col_scale)`` from the gate|up row(s) gate_up
    [B, 2K] (one segment; thresholds [1]). At batch 1 on CUDA the SiLU product is computed inside the GEMV
    kernel where it is loaded (no separate launch, no [1, K] round trip); otherwise it is computed first.
    regime: as for `sparse_linear`."""
    _check_regime(regime)
    return torch.ops.teal.sparse_linear_glu(gate_up, w_t, thresholds.reshape(-1), col_scale, regime)


def _check_regime(regime: str) -> None:
    if regime not in REGIMES:
        raise ValueError(f"unknown kernel regime {regime!r}; choose one of {', '.join(REGIMES)}")
