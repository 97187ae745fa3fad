"""Persistent sparse MLP block (prototype for the persistent decode path): RMSNorm + threshold, gate|up,
SiLU * up + threshold and down in ONE launch whose stages hand over per slice through device-side flags
(``persistent_mlp.cu`` has the design). This module builds the work list, compiles the kernel with NVRTC
(the same mechanism as ``teal.kernels.cuda``), sizes the grid with the occupancy API and launches it with
``cuLaunchKernelEx`` on PyTorch's current stream (so CUDA graphs capture it), and holds a plain-torch
reference of the same fused computation.

    y = mask_d(silu(g) * u) @ W_d,  [g | u] = [mask_g(h) @ W_gu[:, :I] | mask_u(h) @ W_gu[:, I:]],
    h = rms_norm(x) * w_norm,  mask_j(v) = v * (|v| > t_j)

Weights in the transposed layout (``W_gu`` [K, 2I], ``W_d`` [I, H]); thresholds fp32 [3] (gate, up,
down); magnitude rule only; batch 1; bf16, fp16 or fp32. Compute capability 9.0+ (sm_90), NVRTC and the
driver library, as the CUDA GEMV.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.resources
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from teal.kernels import cuda as _cuda
from teal.kernels.ops import sparse_linear_reference
from teal.kernels.producer import rms_norm_reference

KERNEL_NAME = "teal_persistent_mlp"
SOURCE_FILE = "persistent_mlp.cu"

OP_NORM, OP_GATE_UP, OP_DOWN = 0, 1, 2
OP_NAMES = {OP_NORM: "norm", OP_GATE_UP: "gate_up", OP_DOWN: "down"}
#: Layout of the int32 control words (``persistent_mlp.cu``'s CTRL_*): limits on the slice counts.
CTRL_WORDS = 2048
CTRL_ERR = 64
MAX_NORM_SLICES = 64
MAX_MID_SLICES = 512
MAX_DOWN_BLOCKS = 512
ELEMS_PER_VECTOR = {torch.bfloat16: 8, torch.float16: 8, torch.float32: 4}


@dataclass(frozen=True)
class PersistentConfig:
    """Compile-time shape of the kernel (``warps``, ``gu_vecs``, ``d_vecs``, ``unroll``, ``min_blocks``,
    ``timing``) and run-time decomposition of the work (``norm_slices`` = KS, ``d_group`` slices of down's
    input per down tile, ``lag``: column blocks of gate|up listed between a down group's last producer and
    the group's tiles)."""

    warps: int = 8
    gu_vecs: int = 1
    d_vecs: int = 2
    unroll: int = 8
    min_blocks: int = 2
    norm_slices: int = 8
    d_group: int = 2
    lag: int = 4
    timing: bool = False

    def gu_block(self, dtype: torch.dtype) -> int:
        return 32 * ELEMS_PER_VECTOR[dtype] * self.gu_vecs

    def d_block(self, dtype: torch.dtype) -> int:
        return 32 * ELEMS_PER_VECTOR[dtype] * self.d_vecs


# ----------------------------------------------------------------------------------------------
# The work list (host side; tested on the CPU)


def build_schedule(norm_slices: int, mid_slices: int, down_blocks: int, d_group: int, lag: int) -> list[tuple[int, int, int]]:
    """The items in claim order, as (op, a, b): NORM (ks, 0) for every slice of h; GATE_UP (cb, ks) column block
    by column block; DOWN (g, cd) for every group of ``d_group`` consecutive slices of down's input, listed
    ``lag`` column blocks after the group's last gate|up block (at the end where that runs past the last)."""
    if min(norm_slices, mid_slices, down_blocks, d_group) < 1 or lag < 0:
        raise ValueError("build_schedule: slice counts and d_group must be >= 1 and lag >= 0")
    groups = -(-mid_slices // d_group)
    due: dict[int, list[int]] = {}
    for g in range(groups):
        last = min(mid_slices, (g + 1) * d_group) - 1
        due.setdefault(min(mid_slices - 1, last + lag), []).append(g)
    items: list[tuple[int, int, int]] = [(OP_NORM, ks, 0) for ks in range(norm_slices)]
    for cb in range(mid_slices):
        items += [(OP_GATE_UP, cb, ks) for ks in range(norm_slices)]
        for g in due.get(cb, []):
            items += [(OP_DOWN, g, cd) for cd in range(down_blocks)]
    return items


def dependencies(item: tuple[int, int, int], norm_slices: int, mid_slices: int, d_group: int) -> list[tuple[int, int, int]]:
    """The items whose results ``item`` waits for: a gate|up tile for its NORM slice; a down tile for every
    gate|up tile of its group's column blocks (the last of them publishes the slice)."""
    op, a, b = item
    if op == OP_NORM:
        return []
    if op == OP_GATE_UP:
        return [(OP_NORM, b, 0)]
    return [(OP_GATE_UP, cb, ks) for cb in range(a * d_group, min(mid_slices, (a + 1) * d_group))
            for ks in range(norm_slices)]


def check_schedule(items: Sequence[tuple[int, int, int]], norm_slices: int, mid_slices: int, down_blocks: int,
                   d_group: int) -> None:
    """Raise ValueError unless every item appears once and waits only for items listed before it (what
    makes ticket-ordered claiming free of deadlock for any number of resident programs)."""
    groups = -(-mid_slices // d_group)
    expected = ({(OP_NORM, ks, 0) for ks in range(norm_slices)}
                | {(OP_GATE_UP, cb, ks) for cb in range(mid_slices) for ks in range(norm_slices)}
                | {(OP_DOWN, g, cd) for g in range(groups) for cd in range(down_blocks)})
    position = {}
    for i, item in enumerate(items):
        if item in position:
            raise ValueError(f"schedule lists {item} twice")
        position[item] = i
    if set(position) != expected:
        missing = sorted(expected - set(position))[:3]
        extra = sorted(set(position) - expected)[:3]
        raise ValueError(f"schedule does not cover the work: missing {missing}, unexpected {extra}")
    for item, i in position.items():
        for dep in dependencies(item, norm_slices, mid_slices, d_group):
            if position[dep] > i:
                raise ValueError(f"{item} (position {i}) waits for {dep}, listed later ({position[dep]})")


# ----------------------------------------------------------------------------------------------
# Plain-torch reference of the fused computation (the engine's roundings)


def mlp_block_reference(x: torch.Tensor, norm_w: torch.Tensor, w_gu: torch.Tensor, w_d: torch.Tensor,
                        thresholds: torch.Tensor, eps: float, *,
                        compute_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, gate|up, y) of the fused block for x [K] or [1, K], each rounded to x's dtype as the per-projection
    path rounds them; ``compute_dtype`` is the accumulation dtype of the two products (float64: test
    reference)."""
    x2 = x.reshape(1, -1)
    inter = w_gu.shape[1] // 2
    thr = thresholds.reshape(-1).float()
    h = rms_norm_reference(x2, norm_w, eps)
    gu = sparse_linear_reference(h, w_gu, thr[:2], [inter, inter], compute_dtype=compute_dtype)
    gate, up = gu.split([inter, inter], dim=-1)
    mid = F.silu(gate) * up
    y = sparse_linear_reference(mid, w_d, thr[2:3], compute_dtype=compute_dtype)
    return h.reshape(-1), gu.reshape(-1), y.reshape(-1)


def emulate_schedule(x: torch.Tensor, norm_w: torch.Tensor, w_gu: torch.Tensor, w_d: torch.Tensor,
                     thresholds: torch.Tensor, eps: float, config: PersistentConfig) -> torch.Tensor:
    """The kernel's decomposition in plain torch (CPU): the work list in order, survivor lists per slice, fp32
    partial sums per tile, and the finishers' in-order sums. Returns y in x's dtype. Checks that the
    decomposition itself computes the block (the kernel's arithmetic order aside)."""
    dtype = x.dtype
    k, two_i = w_gu.shape
    inter, hidden = two_i // 2, w_d.shape[1]
    ks_n, bn, dn = config.norm_slices, config.gu_block(dtype), config.d_block(dtype)
    problem = shape_problem(k, inter, hidden, dtype, config)
    if problem:
        raise ValueError(problem)
    ncb, ncd = inter // bn, hidden // dn
    groups = -(-ncb // config.d_group)
    thr = thresholds.reshape(-1).float()
    rows = k // ks_n
    h = rms_norm_reference(x.reshape(1, -1), norm_w, eps).reshape(-1).float()
    lists_norm: dict[tuple[int, int], torch.Tensor] = {}
    part_gu = torch.zeros(ks_n, two_i)
    done_gu = [0] * ncb
    lists_mid: dict[int, torch.Tensor] = {}
    part_d = torch.zeros(groups, hidden)
    done_d = [0] * ncd
    gu_out = torch.zeros(two_i)
    y = torch.zeros(hidden, dtype=dtype)
    for op, a, b in build_schedule(ks_n, ncb, ncd, config.d_group, config.lag):
        if op == OP_NORM:
            sl = torch.arange(a * rows, (a + 1) * rows)
            for seg in range(2):
                lists_norm[(seg, a)] = sl[h[sl].abs() > thr[seg]]
        elif op == OP_GATE_UP:
            cb, ks = a, b
            for seg in range(2):
                idx = lists_norm[(seg, ks)]
                cols = slice(seg * inter + cb * bn, seg * inter + (cb + 1) * bn)
                part_gu[ks, cols] = h[idx] @ w_gu[idx, cols].float()
            done_gu[cb] += 1
            if done_gu[cb] == ks_n:
                cols = torch.arange(cb * bn, (cb + 1) * bn)
                g = part_gu[:, cols].sum(0).to(dtype)
                u = part_gu[:, inter + cols].sum(0).to(dtype)
                gu_out[cols], gu_out[inter + cols] = g.float(), u.float()
                act = (F.silu(g) * u).float()
                lists_mid[cb] = torch.stack([cols[act.abs() > thr[2]].float(), act[act.abs() > thr[2]]])
        else:
            g_idx, cd = a, b
            cols = slice(cd * dn, (cd + 1) * dn)
            acc = torch.zeros(dn)
            for s in range(g_idx * config.d_group, min(ncb, (g_idx + 1) * config.d_group)):
                idx, val = lists_mid[s][0].long(), lists_mid[s][1]
                acc += val @ w_d[idx, cols].float()
            part_d[g_idx, cols] = acc
            done_d[cd] += 1
            if done_d[cd] == groups:
                y[cols] = part_d[:, cols].sum(0).to(dtype)
    return y


# ----------------------------------------------------------------------------------------------
# Build and launch


@functools.cache
def source() -> str:
    return importlib.resources.files("teal.kernels").joinpath(SOURCE_FILE).read_text(encoding="utf-8")


def defines(config: PersistentConfig, dtype: torch.dtype) -> list[str]:
    return [f"-DELEM={_cuda.ELEM_CODES[dtype]}", f"-DWARPS={config.warps}", f"-DGU_VECS={config.gu_vecs}",
            f"-DD_VECS={config.d_vecs}", f"-DUNROLL={config.unroll}", f"-DTIMING={int(config.timing)}",
            f"-DMIN_BLOCKS={config.min_blocks}"]


def shape_problem(k: int, inter: int, hidden: int, dtype: torch.dtype, config: PersistentConfig) -> Optional[str]:
    """Why the kernel cannot take this block (None when it can)."""
    if dtype not in ELEMS_PER_VECTOR:
        return f"unsupported dtype {dtype}"
    bn, dn = config.gu_block(dtype), config.d_block(dtype)
    if k % config.norm_slices:
        return f"K={k} is not a multiple of norm_slices={config.norm_slices}"
    if not 1 <= config.norm_slices <= MAX_NORM_SLICES:
        return f"norm_slices must be 1..{MAX_NORM_SLICES}"
    if inter % bn or not 1 <= inter // bn <= MAX_MID_SLICES:
        return f"I={inter} must be a multiple of the gate|up block {bn} with at most {MAX_MID_SLICES} blocks"
    if hidden % dn or not 1 <= hidden // dn <= MAX_DOWN_BLOCKS:
        return f"H={hidden} must be a multiple of the down block {dn} with at most {MAX_DOWN_BLOCKS} blocks"
    if k * 2 * inter >= 2**31 or inter * hidden >= 2**31:
        return "weights above 2^31 elements"
    return None


class _Kernel:
    def __init__(self, config: PersistentConfig, dtype: torch.dtype, device_index: int) -> None:
        lib = _cuda._library()
        major, minor = torch.cuda.get_device_capability(device_index)
        if major < 9:
            raise RuntimeError(f"the persistent kernel needs compute capability 9.0+, got {major}.{minor}")
        cubin = _compile(tuple(defines(config, dtype)), f"sm_{major}{minor}")
        with torch.cuda.device(device_index):
            torch.cuda.current_stream()
            self.module = ctypes.c_void_p()
            lib.check_cuda(lib.cuda.cuModuleLoadData(ctypes.byref(self.module), cubin), "cuModuleLoadData")
            self.func = ctypes.c_void_p()
            lib.check_cuda(lib.cuda.cuModuleGetFunction(ctypes.byref(self.func), self.module, KERNEL_NAME.encode()),
                           "cuModuleGetFunction")
            blocks = ctypes.c_int()
            lib.check_cuda(lib.cuda.cuOccupancyMaxActiveBlocksPerMultiprocessor(
                ctypes.byref(blocks), self.func, ctypes.c_int(32 * config.warps), ctypes.c_size_t(0)),
                "cuOccupancyMaxActiveBlocksPerMultiprocessor")
        self.blocks_per_sm = blocks.value
        self.registers = _attribute(self.func, 4)
        self.local_bytes = _attribute(self.func, 3)


def _attribute(func: ctypes.c_void_p, attr: int) -> int:
    lib = _cuda._library()
    value = ctypes.c_int()
    lib.check_cuda(lib.cuda.cuFuncGetAttribute(ctypes.byref(value), attr, func), "cuFuncGetAttribute")
    return value.value


@functools.cache
def _compile(options: tuple[str, ...], arch: str) -> bytes:
    return _cuda.nvrtc_compile(source(), SOURCE_FILE,
                               [f"--gpu-architecture={arch}", "-std=c++17", "--device-as-default-execution-space", *options])


class PersistentMLP:
    """One MLP block's persistent launch: its buffers, work list and grid for fixed shapes, dtype and device.

    ``run(x, norm_w, w_gu, w_d, thresholds)`` launches once on the current stream and returns y [H] (a
    buffer reused by every call, like a graph's output); ``h`` and ``gate_up`` hold the block's
    intermediates of the last call. ``error()`` reads the spin-timeout report (None when clean);
    ``stamps()`` the per-item globaltimer stamps of the last call (``timing=True`` configs)."""

    def __init__(self, k: int, inter: int, hidden: int, dtype: torch.dtype, device: torch.device,
                 config: PersistentConfig = PersistentConfig(), *, grid: Optional[int] = None,
                 eps: float = 1e-5, spin_limit: int = 1 << 22) -> None:
        problem = shape_problem(k, inter, hidden, dtype, config)
        if problem:
            raise ValueError(f"persistent MLP: {problem}")
        self.k, self.inter, self.hidden, self.dtype, self.config = k, inter, hidden, dtype, config
        self.device = torch.device(device)
        self.device_index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self.eps, self.spin_limit = float(eps), int(spin_limit)
        self.kernel = _Kernel(config, dtype, self.device_index)
        sms = torch.cuda.get_device_properties(self.device_index).multi_processor_count
        self.grid = grid or self.kernel.blocks_per_sm * sms
        if self.grid < 1:
            raise RuntimeError("the occupancy API reports no resident program of the persistent kernel")
        ks = config.norm_slices
        self.mid_slices = inter // config.gu_block(dtype)
        self.down_blocks = hidden // config.d_block(dtype)
        self.groups = -(-self.mid_slices // config.d_group)
        items = build_schedule(ks, self.mid_slices, self.down_blocks, config.d_group, config.lag)
        check_schedule(items, ks, self.mid_slices, self.down_blocks, config.d_group)
        self.schedule = items
        dev = self.device
        i32, f32 = torch.int32, torch.float32
        self.items = torch.tensor([[op, a, b, 0] for op, a, b in items], dtype=i32, device=dev)
        self.list_norm_idx = torch.zeros(2 * k, dtype=i32, device=dev)
        self.list_norm_val = torch.zeros(2 * k, dtype=f32, device=dev)
        self.count_norm = torch.zeros(2 * ks, dtype=i32, device=dev)
        self.list_mid_idx = torch.zeros(inter, dtype=i32, device=dev)
        self.list_mid_val = torch.zeros(inter, dtype=f32, device=dev)
        self.count_mid = torch.zeros(self.mid_slices, dtype=i32, device=dev)
        self.part_gu = torch.zeros(ks * 2 * inter, dtype=f32, device=dev)
        self.part_d = torch.zeros(self.groups * hidden, dtype=f32, device=dev)
        self.ctrl = torch.zeros(CTRL_WORDS, dtype=i32, device=dev)
        self.stamps_buf = torch.zeros(4 * len(items), dtype=torch.int64, device=dev)
        self.h = torch.zeros(k, dtype=dtype, device=dev)
        self.gate_up = torch.zeros(2 * inter, dtype=dtype, device=dev)
        self.y = torch.zeros(hidden, dtype=dtype, device=dev)

    def _check(self, x: torch.Tensor, norm_w: torch.Tensor, w_gu: torch.Tensor, w_d: torch.Tensor,
               thresholds: torch.Tensor) -> None:
        want = {"x": (x, (self.k,)), "norm_w": (norm_w, (self.k,)), "w_gu": (w_gu, (self.k, 2 * self.inter)),
                "w_d": (w_d, (self.inter, self.hidden))}
        for name, (t, shape) in want.items():
            if tuple(t.reshape(-1).shape if name in ("x", "norm_w") else t.shape) != shape:
                raise ValueError(f"persistent MLP: {name} must have shape {shape}, got {tuple(t.shape)}")
            if t.dtype != self.dtype or t.device != self.y.device or not t.is_contiguous() or t.data_ptr() % 16:
                raise ValueError(f"persistent MLP: {name} must be a contiguous 16-byte aligned {self.dtype} tensor "
                                 f"on {self.y.device}")
        if thresholds.dtype != torch.float32 or thresholds.numel() != 3 or thresholds.device != self.y.device:
            raise ValueError("persistent MLP: thresholds must be fp32 [3] (gate, up, down) on the kernel's device")

    def run(self, x: torch.Tensor, norm_w: torch.Tensor, w_gu: torch.Tensor, w_d: torch.Tensor,
            thresholds: torch.Tensor) -> torch.Tensor:
        self._check(x, norm_w, w_gu, w_d, thresholds)
        ptr = lambda t: ctypes.c_void_p(t.data_ptr())  # noqa: E731
        holders = [
            ptr(x), ptr(norm_w), ptr(w_gu), ptr(w_d), ptr(self.h), ptr(self.gate_up), ptr(self.y), ptr(thresholds),
            ptr(self.list_norm_idx), ptr(self.list_norm_val), ptr(self.count_norm), ptr(self.list_mid_idx),
            ptr(self.list_mid_val), ptr(self.count_mid), ptr(self.part_gu), ptr(self.part_d), ptr(self.ctrl),
            ptr(self.items), ctypes.c_int(len(self.schedule)), ctypes.c_int(self.k), ctypes.c_int(self.inter),
            ctypes.c_int(self.hidden), ctypes.c_int(self.config.norm_slices), ctypes.c_int(self.config.d_group),
            ctypes.c_float(self.eps), ctypes.c_longlong(self.spin_limit), ptr(self.stamps_buf),
        ]
        params = (ctypes.c_void_p * len(holders))(*[ctypes.cast(ctypes.byref(h), ctypes.c_void_p) for h in holders])
        stream = torch.cuda.current_stream(self.device).cuda_stream
        cfg = _cuda._LaunchConfig(self.grid, 1, 1, 32 * self.config.warps, 1, 1, 0, ctypes.c_void_p(stream), None, 0)
        lib = _cuda._library()
        with torch.cuda.device(self.device_index):
            lib.check_cuda(lib.cuda.cuLaunchKernelEx(ctypes.byref(cfg), self.kernel.func, params, None),
                           "cuLaunchKernelEx")
        return self.y

    def error(self) -> Optional[dict[str, int | str]]:
        """The spin-timeout report of the calls so far (None when clean). Synchronises. After a report the
        control words are zeroed so the next call starts clean."""
        err = self.ctrl[CTRL_ERR:CTRL_ERR + 5].tolist()
        if err[0] == 0:
            return None
        self.ctrl.zero_()
        return {"item": err[1], "waiting_for": OP_NAMES.get(err[2], str(err[2])), "slice": err[3], "program": err[4]}

    def stamps(self) -> list[dict[str, int | str]]:
        """Per item of the last call (``timing`` configs): op, claim / ready / end in ns relative to the first
        claim, SM and program."""
        if not self.config.timing:
            raise RuntimeError("stamps need a PersistentConfig(timing=True) kernel")
        raw = self.stamps_buf.view(-1, 4).tolist()
        t0 = min(r[0] for r in raw)
        out = []
        for (op, a, b), (claim, ready, end, where) in zip(self.schedule, raw):
            out.append({"op": OP_NAMES[op], "a": a, "b": b, "claim": claim - t0, "ready": ready - t0,
                        "end": end - t0, "sm": (where >> 32) & 0xFFFFFFFF, "program": where & 0xFFFFFFFF})
        return out


def stage_account(stamps: Sequence[dict[str, int | str]]) -> dict[str, dict[str, float]]:
    """Per stage, from a call's stamps (µs): first claim, last end, summed wait (claim -> ready) and summed
    work (ready -> end) over its items, and the item count."""
    out: dict[str, dict[str, float]] = {}
    for op in OP_NAMES.values():
        rows = [s for s in stamps if s["op"] == op]
        if not rows:
            continue
        out[op] = {
            "items": len(rows),
            "first_claim_us": min(int(s["claim"]) for s in rows) / 1e3,
            "last_end_us": max(int(s["end"]) for s in rows) / 1e3,
            "wait_us_sum": sum(int(s["ready"]) - int(s["claim"]) for s in rows) / 1e3,
            "work_us_sum": sum(int(s["end"]) - int(s["ready"]) for s in rows) / 1e3,
        }
    return out
