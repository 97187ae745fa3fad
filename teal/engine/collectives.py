"""Collectives of tensor-parallel decoding: the sum of the row-parallel partial products and the gather of
the vocabulary-split logits.

Two implementations of the sum (`ALL_REDUCES`):

- "nccl": `torch.distributed.all_reduce` (the functional collective under torch.compile), any backend;
- "symm_mem": PyTorch's symmetric-memory one-shot all-reduce (CUDA, ranks of one host): every rank copies
  its partial product into a buffer the others can read over NVLink, and one kernel reads all of them and
  sums. A decode step's partial products are tiny ([1, hidden]), so the NCCL call's fixed cost dominates;
  the one-shot kernel is a single launch with a device-side barrier, capturable in CUDA graphs. It uses
  peer-to-peer loads, not NVLink multicast. Buffers are set up once per (group, device, dtype, size) by
  `setup_symmetric_buffers`, a collective call; prefill sums (any size) take NCCL, and a symm_mem sum
  without its buffer raises rather than falling back.
"""

from __future__ import annotations

from typing import Any

import torch

ALL_REDUCES = ("nccl", "symm_mem")

# (group name, device index, dtype, numel) -> the rendezvoused symmetric buffer of that shape
_SYMMETRIC_BUFFERS: dict[tuple[str, int, torch.dtype, int], torch.Tensor] = {}


def all_reduce_sum(t: torch.Tensor, group: Any, impl: str = "nccl") -> torch.Tensor:
    """Sum of `t` over the ranks of `group`. impl "nccl": in-place `torch.distributed.all_reduce` (eager and
    CUDA-graph capture) or the traceable functional collective (torch.compile); "symm_mem": the one-shot
    symmetric-memory kernel through the buffer of t's size (`setup_symmetric_buffers`). There is no silent
    fallback: a "symm_mem" sum without its buffer raises, so a result labelled symm_mem ran symm_mem (the
    engine asks for "nccl" where sizes vary: prefill)."""
    if impl == "symm_mem":
        if not (t.is_cuda and symmetric_buffer_key(t, group) in _SYMMETRIC_BUFFERS):
            raise RuntimeError(f"symm_mem all-reduce: no symmetric buffer for a {tuple(t.shape)} {t.dtype} tensor on "
                               f"{t.device} (setup_symmetric_buffers sets them up; TensorParallelEngine.set_all_reduce"
                               f"('symm_mem') does for decode steps)")
        return torch.ops.teal.one_shot_all_reduce(t.contiguous(), _group_name(group))
    if torch.compiler.is_compiling():
        import torch.distributed._functional_collectives as funcol

        return funcol.all_reduce(t, "sum", group)
    import torch.distributed as dist

    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def all_gather_last_dim(t: torch.Tensor, group: Any) -> torch.Tensor:
    """Concatenate the [T, n] slices of all ranks of `group` along the last dimension -> [T, world * n]."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    rows, width = t.shape
    out = torch.empty((world * rows, width), dtype=t.dtype, device=t.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the new name from torch 2.13
    gather(out, t.contiguous(), group=group)
    return out.view(world, rows, width).transpose(0, 1).reshape(rows, world * width)


# ------------------------------------------------------------------------------- symmetric-memory sums
def _group_name(group: Any) -> str:
    import torch.distributed as dist

    return str((group if group is not None else dist.group.WORLD).group_name)


def symmetric_buffer_key(t: torch.Tensor, group: Any) -> tuple[str, int, torch.dtype, int]:
    return (_group_name(group), t.device.index or 0, t.dtype, t.numel())


def symmetric_memory_problem(device: torch.device) -> str | None:
    """Why the symmetric-memory all-reduce cannot run on `device` (None: it can be tried)."""
    if device.type != "cuda":
        return f"the symmetric-memory all-reduce needs CUDA devices, not {device.type}"
    try:
        import torch.distributed._symmetric_memory  # noqa: F401
    except ImportError as exc:  # builds without distributed support
        return f"this PyTorch has no symmetric memory ({exc})"
    if not hasattr(torch.ops.symm_mem, "one_shot_all_reduce"):
        return "this PyTorch has no torch.ops.symm_mem.one_shot_all_reduce"
    return None


def setup_symmetric_buffers(group: Any, device: torch.device, dtype: torch.dtype, sizes: list[int]) -> None:
    """Allocate and rendezvous one symmetric buffer per size in `sizes` (a collective: every rank of `group`
    calls it with the same arguments). Raises `RuntimeError` naming the cause when this PyTorch or machine
    cannot (no peer access between the GPUs, no symmetric-memory support)."""
    problem = symmetric_memory_problem(device)
    if problem is not None:
        raise RuntimeError(problem)
    import torch.distributed._symmetric_memory as symm_mem

    name = _group_name(group)
    enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
    if enable is not None:  # needed by older PyTorch before a rendezvous (idempotent)
        enable(name)
    for numel in sorted(set(sizes)):
        key = (name, device.index or 0, dtype, numel)
        if key in _SYMMETRIC_BUFFERS:
            continue
        buffer = symm_mem.empty(numel, dtype=dtype, device=device)
        symm_mem.rendezvous(buffer, name)
        _SYMMETRIC_BUFFERS[key] = buffer


def release_symmetric_buffers(group: Any = None) -> None:
    """Forget the buffers of `group` (None: of every group); call before destroying the process group."""
    name = None if group is None else _group_name(group)
    for key in [k for k in _SYMMETRIC_BUFFERS if name is None or k[0] == name]:
        del _SYMMETRIC_BUFFERS[key]


@torch.library.custom_op("teal::one_shot_all_reduce", mutates_args=())
def one_shot_all_reduce(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """Sum of x over the ranks of the group named `group_name` through its symmetric buffer of x's size
    (opaque to torch.compile, so that compiled layers call the kernel as it is)."""
    buffer = _SYMMETRIC_BUFFERS[(group_name, x.device.index or 0, x.dtype, x.numel())]
    ops = torch.ops.symm_mem
    if hasattr(ops, "one_shot_all_reduce_copy"):  # copy and sum in one kernel
        out = ops.one_shot_all_reduce_copy(buffer, x.reshape(-1), "sum", group_name)
    else:
        buffer.copy_(x.reshape(-1))
        out = ops.one_shot_all_reduce(buffer, "sum", group_name)
    return out.view(x.shape)


@one_shot_all_reduce.register_fake
def _(x: torch.Tensor, group_name: str) -> torch.Tensor:
    return torch.empty_like(x)
