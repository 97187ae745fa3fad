"""Tensor-parallel sparse decoding: one engine split over the N ranks (GPUs) of one host.

Megatron-style split of every decoder layer, with TEAL thresholding on every rank:

- column-parallel q, k, v (by attention heads; GQA: by key/value heads, each rank keeping the query heads
  that read its kv heads) and gate, up (by intermediate channels). Each rank holds the full input
  (attn_in, mlp_in), thresholds it with the per-projection thresholds and weight-aware column scales,
  and reads only the weight rows of the surviving entries of its output slice;
- row-parallel o and down (by input channels K). Their input is already split (rank r holds its heads of
  the attention output, its channels of act(gate) * up); each rank thresholds its own slice with the same
  thresholds (and its slice of the column scales), multiplies by its weight rows, and one all-reduce
  (sum) per projection joins the partial products; the bias is added after the sum;
- the static KV cache is split by kv heads; norms and the embedding are replicated; lm_head is split by
  vocabulary rows (column-parallel) and the logit slices are all-gathered, so every rank samples the same
  token from the same logits (replicated lm_head when the vocabulary does not divide by N).

So sparsity saves weight bytes on every rank. A decode step issues 2 all-reduces per layer and one
all-gather; on CUDA the whole step, collectives included, is captured in one CUDA graph per rank (NCCL
collectives are capturable), exactly as on one device. Ranks must be seeded alike (`launch` does) so
that sampled tokens agree.

    def work(rank, world_size, group):
        engine = engine_random("llama-3-8b", device=f"cuda:{rank}")
        gen = Generator(shard_engine(engine, rank, world_size, group))
        ...
    launch(work, world_size=2, device="cuda")

With world size 1 the shard is the engine itself (same tensors, no collectives).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from teal.engine.config import EngineConfig
from teal.engine.collectives import (ALL_REDUCES, all_gather_last_dim, release_symmetric_buffers,
                                     setup_symmetric_buffers)
from teal.engine.model import GROUPS, PROJECTIONS, Engine, LayerWeights, Observer

ROW_PARALLEL = ("o", "down")
DEFAULT_LAUNCH_TIMEOUT_S = 1800.0
#: NVLink multicast off in NCCL, PyTorch's symmetric memory and NVSHMEM, in every rank (teal's sums use
#: peer-to-peer loads only; multicast can take shared GPUs out of service)
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


# ------------------------------------------------------------------------------------- the sharded engine
class TensorParallelEngine(Engine):
    """This rank's shard of an `Engine`. `config` holds the per-rank head and intermediate counts (what the
    shared prefill / decode code needs); `full_config` the whole model's. Thresholds and column scales are
    given for the whole model (keys and sizes as for the unsharded engine) and sliced here."""

    rank: int
    world_size: int
    group: Any
    full_config: EngineConfig

    def _column_slice(self, proj: str) -> slice | None:
        """The input channels of `proj` this rank holds (None: all of them)."""
        if proj == "o":
            width = self.config.q_size
        elif proj == "down":
            width = self.config.intermediate
        else:
            return None
        return slice(self.rank * width, (self.rank + 1) * width)

    def set_thresholds(
        self,
        thresholds: Mapping[str, float] | None,
        col_scales: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """As `Engine.set_thresholds`, with whole-model column scales: o and down get this rank's slice."""
        if col_scales is not None:
            full_in = {p: k for p, (k, _) in self.full_config.projection_shapes().items()}
            local = {}
            for key, scale in col_scales.items():
                proj = key.rsplit(".", 1)[-1]
                if proj not in full_in:
                    raise ValueError(f"column scale key {key!r} is not a projection key 'layers.{{i}}.{{p}}'")
                if scale.numel() != full_in[proj]:
                    raise ValueError(
                        f"column scale {key!r} has {scale.numel()} entries but the {proj} projection of "
                        f"{self.full_config.name} has {full_in[proj]} input channels; give whole-model scales"
                    )
                cols = self._column_slice(proj)
                local[key] = scale.reshape(-1) if cols is None else scale.reshape(-1)[cols]
            col_scales = local
        super().set_thresholds(thresholds, col_scales)

    def set_all_reduce(self, impl: str) -> str:
        """How the o and down partial products are summed: "nccl", "symm_mem" (`teal.engine.collectives`;
        CUDA only) or "auto" (symm_mem on CUDA where it can be set up, else nccl; the shards' default: on
        two H200s symm_mem decoded Llama-2-70B at 49.1 against 46.5 tok/s dense, 77.0 against 72.6 at 50 %,
        benchmarks/results/2026-11-29-h200-x2-decode-tp2-llama-2-70b.json). Returns the implementation
        now in use. A collective call: every rank must make it. Raises `RuntimeError` with the cause when
        "symm_mem" cannot be set up (the engine then keeps its current implementation). Generators pick up
        a change with new CUDA graphs."""
        if impl not in (*ALL_REDUCES, "auto"):
            raise ValueError(f"unknown all-reduce {impl!r}; choose one of {', '.join((*ALL_REDUCES, 'auto'))}")
        if impl == "auto":
            if self.tp_group is None or self.device.type != "cuda":
                impl = "nccl"
            else:
                try:
                    return self.set_all_reduce("symm_mem")
                except RuntimeError as exc:
                    import logging

                    logging.getLogger(__name__).warning("symmetric-memory all-reduce unavailable (%s); using NCCL", exc)
                    impl = "nccl"
        if impl == "symm_mem" and self.tp_group is not None:
            setup_symmetric_buffers(self.tp_group, self.device, self.dtype, [self.config.hidden])
        self.all_reduce = impl
        return impl

    def _gathering(self, observer: Observer | None) -> Observer | None:
        """An observer that sees whole-model inputs: this rank's slices of the row-parallel inputs (o, down)
        are all-gathered first, so that thresholds and measured sparsities are those of the whole model."""
        if observer is None or self.tp_group is None:
            return observer
        group = self.tp_group

        def observe(layer: int, site: str, x: torch.Tensor) -> None:
            if site in ("attn_out", "mlp_mid"):
                x = all_gather_last_dim(x.reshape(x.shape[0], -1), group)
            observer(layer, site, x)

        return observe

    def prefill(self, ids: torch.Tensor, observer: Observer | None = None, all_logits: bool = False) -> torch.Tensor:
        return super().prefill(ids, observer=self._gathering(observer), all_logits=all_logits)

    def decode(self, *args: Any, observer: Observer | None = None, **kwargs: Any) -> torch.Tensor:
        return super().decode(*args, observer=self._gathering(observer), **kwargs)

    def weight_column_norms(self) -> dict[str, torch.Tensor]:
        """L2 norms of the whole model's weight columns (the weight-aware c_i), from the shards: the
        column-parallel norms are summed in squares over the ranks, the row-parallel ones gathered."""
        local = super().weight_column_norms()
        if self.tp_group is None:
            return local
        import torch.distributed as dist

        out = {}
        for key in sorted(local, key=_key_order):
            norms = local[key]
            if key.rsplit(".", 1)[-1] in ROW_PARALLEL:
                out[key] = all_gather_last_dim(norms[None], self.group)[0]
            else:
                squares = norms.square()
                dist.all_reduce(squares, group=self.group)
                out[key] = squares.sqrt()
        return out


def check_tp_size(config: EngineConfig, world_size: int) -> None:
    """Raise `ValueError` naming what does not divide when `config` cannot be split over `world_size` ranks."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"the tensor-parallel world size must be a positive integer, got {world_size!r}")
    problems = []
    if config.n_kv_heads % world_size:
        problems.append(f"n_kv_heads={config.n_kv_heads} (key/value heads are split across ranks)")
    if config.n_heads % world_size:
        problems.append(f"n_heads={config.n_heads}")
    if config.intermediate % world_size:
        problems.append(f"intermediate_size={config.intermediate}")
    if problems:
        sizes = [n for n in range(1, config.n_kv_heads + 1)
                 if config.n_kv_heads % n == 0 and config.n_heads % n == 0 and config.intermediate % n == 0]
        raise ValueError(
            f"cannot split {config.name} over {world_size} ranks: {', '.join(problems)} not divisible by "
            f"{world_size}; use a tensor-parallel size among {sizes}"
        )


def shard_engine(
    engine: Engine,
    rank: int,
    world_size: int,
    group: Any = None,
    *,
    vocab_parallel: bool = True,
    all_reduce: str = "auto",
) -> TensorParallelEngine:
    """This rank's shard of `engine` for tensor parallelism over `world_size` ranks of process group
    `group` (default: the default group). Every rank must call it, on identical engines.

    The shard owns copies of its slices (delete `engine` afterwards to free the rest); it keeps the
    engine's layout, cache length and thresholds. vocab_parallel: split lm_head by vocabulary rows
    (needs vocab_size % world_size == 0, else lm_head stays whole). all_reduce: as for
    `TensorParallelEngine.set_all_reduce` (default "auto"). With world_size 1 the shard reuses
    the engine's tensors and runs no collective.
    """
    cfg = engine.config
    if isinstance(engine, TensorParallelEngine) and engine.world_size > 1:
        raise ValueError("this engine is already a tensor-parallel shard; shard the whole engine instead")
    local, group = _local_config(cfg, rank, world_size, group)
    n = world_size
    q_l, kv_l, inter_l = local.q_size, local.kv_size, local.intermediate
    qkv_rows = [(rank * q_l, (rank + 1) * q_l),
                (cfg.q_size + rank * kv_l, cfg.q_size + (rank + 1) * kv_l),
                (cfg.q_size + cfg.kv_size + rank * kv_l, cfg.q_size + cfg.kv_size + (rank + 1) * kv_l)]
    gate_up_rows = [(rank * inter_l, (rank + 1) * inter_l),
                    (cfg.intermediate + rank * inter_l, cfg.intermediate + (rank + 1) * inter_l)]
    t = engine.transposed

    layers = []
    for w in engine.layers:
        layers.append(w if n == 1 else LayerWeights(
            attn_norm=w.attn_norm,
            qkv=_shard_weight(w.qkv, t, rows=qkv_rows),
            qkv_bias=_shard_bias(w.qkv_bias, qkv_rows),
            q_norm=w.q_norm,
            k_norm=w.k_norm,
            o=_shard_weight(w.o, t, cols=(rank * q_l, (rank + 1) * q_l)),
            o_bias=w.o_bias,
            mlp_norm=w.mlp_norm,
            gate_up=_shard_weight(w.gate_up, t, rows=gate_up_rows),
            gate_up_bias=_shard_bias(w.gate_up_bias, gate_up_rows),
            down=_shard_weight(w.down, t, cols=(rank * inter_l, (rank + 1) * inter_l)),
            down_bias=w.down_bias,
            post_attn_norm=w.post_attn_norm,  # Gemma 3: applied to the all-reduced outputs, so whole
            post_mlp_norm=w.post_mlp_norm,
        ))
    split_vocab = n > 1 and vocab_parallel and cfg.vocab_size % n == 0
    lm_head = engine.lm_head
    if split_vocab:
        v_l = cfg.vocab_size // n
        lm_head = lm_head[rank * v_l:(rank + 1) * v_l]
        if lm_head.untyped_storage().data_ptr() != engine.embed.untyped_storage().data_ptr():
            lm_head = lm_head.clone()  # an untied head: own the slice so the whole head can be freed

    shard = _make_shard(local, cfg, layers, engine.embed, engine.final_norm, lm_head, t, engine.max_seq_len,
                        rank, n, group, split_vocab)
    shard.kernel_at_zero = engine.kernel_at_zero
    shard.fused_attention = engine.fused_attention
    if engine.sparsity is not None and any(any(f) for f in engine.sparse_flags):
        shard.set_thresholds(*_current_thresholds(engine))
    shard.set_all_reduce(all_reduce)
    return shard


def _make_shard(local: EngineConfig, full: EngineConfig, layers: list[LayerWeights], embed: torch.Tensor,
                final_norm: torch.Tensor, lm_head: torch.Tensor, transposed: bool, max_seq_len: int, rank: int,
                world_size: int, group: Any, split_vocab: bool) -> TensorParallelEngine:
    shard = TensorParallelEngine(local, layers, embed, final_norm, lm_head, transposed=transposed,
                                 max_seq_len=max_seq_len)
    shard.rank, shard.world_size, shard.full_config = rank, world_size, full
    shard.group = group if world_size > 1 else None
    shard.tp_group = group if world_size > 1 else None
    shard.vocab_group = group if split_vocab else None
    # The producer path has not run on several GPUs (only in CPU tests): shards multiply through
    # `sparse_linear` (the "kernel" path), the default where the CUDA C++ kernel runs (Hopper).
    shard.sparse_path = "kernel"
    return shard


def random_shard(
    shape: str | object,
    rank: int,
    world_size: int,
    group: Any = None,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cuda",
    max_seq_len: int = 2048,
    transposed: bool = False,
    seed: int = 0,
    all_reduce: str = "auto",
) -> TensorParallelEngine:
    """This rank's shard of a random-weight model of a named shape (or HF config), built directly: no rank
    ever holds the whole model, so shapes larger than one GPU (Llama-2-70B in bf16) fit. Each rank draws its
    own slices (seed + rank); embedding, norms and the lm_head rows are drawn alike on every rank from
    `seed`. For speed only: the shards of different world sizes are not slices of one model."""
    from teal.engine.config import shape_hf_config
    from teal.engine.loading import engine_random

    hf_config = shape_hf_config(shape) if isinstance(shape, str) else shape
    full = EngineConfig.from_hf(hf_config)
    local, group = _local_config(full, rank, world_size, group)
    n = world_size
    local_hf = hf_config.__class__.from_dict(hf_config.to_dict())
    local_hf.num_attention_heads = full.n_heads // n
    local_hf.num_key_value_heads = full.n_kv_heads // n
    local_hf.intermediate_size = full.intermediate // n
    local_hf.head_dim = full.head_dim
    layers_engine = engine_random(local_hf, dtype=dtype, device=device, max_seq_len=2, transposed=transposed,
                                  seed=seed + 1 + rank)
    replicated = engine_random(_embedding_only(hf_config), dtype=dtype,
                               device=device, max_seq_len=2, seed=seed)
    split_vocab = n > 1 and full.vocab_size % n == 0
    lm_head = replicated.lm_head
    if split_vocab:
        v_l = full.vocab_size // n
        lm_head = lm_head[rank * v_l:(rank + 1) * v_l].clone()
    shard = _make_shard(local, full, layers_engine.layers, replicated.embed, replicated.final_norm, lm_head,
                        transposed, max_seq_len, rank, n, group, split_vocab)
    del layers_engine, replicated
    shard.set_all_reduce(all_reduce)
    return shard


def shard_from_checkpoint(
    path: str | os.PathLike[str],
    rank: int,
    world_size: int,
    group: Any = None,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cuda",
    max_seq_len: int = 2048,
    transposed: bool = False,
    all_reduce: str = "auto",
) -> TensorParallelEngine:
    """This rank's shard of an HF checkpoint directory (safetensors), reading only its slices from disk:
    q/k/v and gate/up rows, o and down columns, lm_head rows (vocab-parallel when the vocabulary divides),
    the rest whole. The same engine as `shard_engine(engine_from_checkpoint(path), ...)` without any rank
    holding the whole model."""
    from teal.engine.loading import _build, checkpoint_reader

    device = torch.device(device)
    full, _, _ = checkpoint_reader(path, device)
    local, group = _local_config(full, rank, world_size, group)
    n = world_size
    split_vocab = n > 1 and full.vocab_size % n == 0
    rows = {"q_proj": local.q_size, "k_proj": local.kv_size, "v_proj": local.kv_size,
            "gate_proj": local.intermediate, "up_proj": local.intermediate}
    cols = {"o_proj": local.q_size, "down_proj": local.intermediate}

    def slicer(name: str, part: Any) -> torch.Tensor:
        pieces = name.split(".")
        proj, kind = (pieces[-2], pieces[-1]) if len(pieces) >= 2 else ("", "")
        if n > 1 and proj in rows and kind in ("weight", "bias"):
            width = rows[proj]
            return part[rank * width:(rank + 1) * width]
        if n > 1 and proj in cols and kind == "weight":
            width = cols[proj]
            return part[:, rank * width:(rank + 1) * width]
        if split_vocab and name.endswith("lm_head.weight") and not full.tie_embeddings:
            v_l = full.vocab_size // n
            return part[rank * v_l:(rank + 1) * v_l]
        return part[:]

    _, get, has = checkpoint_reader(path, device, slicer)
    built = _build(local, get, dtype=dtype, device=device, max_seq_len=2, transposed=transposed, has=has)
    lm_head = built.lm_head
    if split_vocab and full.tie_embeddings:
        v_l = full.vocab_size // n
        lm_head = lm_head[rank * v_l:(rank + 1) * v_l]  # a view of the (whole) embedding
    shard = _make_shard(local, full, built.layers, built.embed, built.final_norm, lm_head, transposed,
                        max_seq_len, rank, n, group, split_vocab)
    del built
    shard.set_all_reduce(all_reduce)
    return shard


def _embedding_only(hf_config: Any) -> Any:
    """`hf_config` with no decoder layers: what `engine_random` needs to draw the replicated tensors."""
    config = hf_config.__class__.from_dict(hf_config.to_dict())
    config.num_hidden_layers = 0
    if hasattr(config, "layer_types") and config.layer_types is not None:
        config.layer_types = []
    return config


def _local_config(full: EngineConfig, rank: int, world_size: int, group: Any) -> tuple[EngineConfig, Any]:
    """One rank's config (its heads and intermediate channels) after checking the split, and the checked
    process group (None for a world size of 1)."""
    check_tp_size(full, world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size}) for a world size of {world_size}")
    if world_size > 1:
        group = _checked_group(group, rank, world_size)
    n = world_size
    local = dataclasses.replace(full, n_heads=full.n_heads // n, n_kv_heads=full.n_kv_heads // n,
                                intermediate=full.intermediate // n)
    return local, group


def _checked_group(group: Any, rank: int, world_size: int) -> Any:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"tensor parallelism over {world_size} ranks needs an initialized torch.distributed process group: "
            "start the ranks with teal.engine.tp.launch (or torchrun) before sharding"
        )
    group = group if group is not None else dist.group.WORLD
    size, group_rank = dist.get_world_size(group), dist.get_rank(group)
    if size != world_size or group_rank != rank:
        raise ValueError(
            f"the process group has {size} ranks and this process is its rank {group_rank}, "
            f"but shard_engine was given rank {rank} of {world_size}"
        )
    return group


def _shard_weight(w: torch.Tensor, transposed: bool, rows: Sequence[tuple[int, int]] | None = None,
                  cols: tuple[int, int] | None = None) -> torch.Tensor:
    """Output rows (`rows`, concatenated) or input columns (`cols`) of a weight in [N, K] terms, returned in
    the weight's own layout ([K, N] when `transposed`) as a new contiguous tensor."""
    dense = w.t() if transposed else w
    if rows is not None:
        dense = torch.cat([dense[a:b] for a, b in rows], dim=0)
    if cols is not None:
        dense = dense[:, cols[0]:cols[1]]
    out = dense.t() if transposed else dense
    return out.clone(memory_format=torch.contiguous_format)


def _shard_bias(bias: torch.Tensor | None, rows: Sequence[tuple[int, int]]) -> torch.Tensor | None:
    return None if bias is None else torch.cat([bias[a:b] for a, b in rows]).contiguous()


def _current_thresholds(engine: Engine) -> tuple[dict[str, float], dict[str, torch.Tensor] | None]:
    """The thresholds (and whole-model column scales) an engine holds, as `set_thresholds` takes them."""
    assert engine.sparsity is not None
    values: dict[str, float] = {}
    scales: dict[str, torch.Tensor] = {}
    for i, sp in enumerate(engine.sparsity):
        for g, projs in GROUPS.items():
            th, scale = getattr(sp, g), getattr(sp, g + "_scale")
            for j, p in enumerate(projs):
                values[f"layers.{i}.{p}"] = float(th[j])
                if scale is not None:
                    scales[f"layers.{i}.{p}"] = scale[j]
    return values, (scales or None)


def _key_order(key: str) -> tuple[int, int]:
    _, layer, proj = key.split(".")
    return int(layer), PROJECTIONS.index(proj)



# ---------------------------------------------------------------------------------------------- launching
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    *,
    device: str = "cpu",
    timeout_s: float = DEFAULT_LAUNCH_TIMEOUT_S,
    collective_timeout_s: float = 600.0,
) -> None:
    """Run `fn(rank, world_size, group, *args)` in `world_size` new processes joined in a process group
    on 127.0.0.1 (gloo on CPU; NCCL on CUDA, rank r on GPU r, NVLink multicast off). `fn` must be a
    module-level function (processes are spawned). Raises the first rank's error with its traceback, or
    `TimeoutError` (after stopping the processes) when they run past `timeout_s`."""
    import torch.multiprocessing as mp

    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    device_type = torch.device(device).type
    if device_type == "cuda" and torch.cuda.device_count() < world_size:
        raise RuntimeError(
            f"tensor parallelism over {world_size} GPUs needs {world_size} visible CUDA devices; "
            f"torch sees {torch.cuda.device_count()}"
        )
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"tensor parallelism runs on 'cpu' (gloo) or 'cuda' (NCCL), not {device!r}")
    init_method = f"tcp://127.0.0.1:{free_port()}"
    context = mp.start_processes(
        _rank_entry, args=(world_size, init_method, device_type, collective_timeout_s, fn, args),
        nprocs=world_size, join=False, start_method="spawn",
    )
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            for process in context.processes:
                process.join(5.0)
            raise TimeoutError(f"tensor-parallel ranks still running after {timeout_s:.0f}s; stopped them")


def _rank_entry(rank: int, world_size: int, init_method: str, device_type: str, collective_timeout_s: float,
                fn: Callable[..., Any], args: tuple) -> None:
    """One spawned rank: environment, process group, fn, teardown."""
    os.environ.update(MULTICAST_OFF)  # NVLink multicast stays off
    if device_type == "cpu" and "GLOO_SOCKET_IFNAME" not in os.environ and Path("/sys/class/net/lo").exists():
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    group = init_rank(rank, world_size, init_method, device_type, collective_timeout_s)
    try:
        fn(rank, world_size, group, *args)
    finally:
        import torch.distributed as dist

        release_symmetric_buffers()
        dist.destroy_process_group()


def init_rank(rank: int, world_size: int, init_method: str, device_type: str,
              collective_timeout_s: float = 600.0, device_index: int | None = None) -> Any:
    """Join the default process group as `rank` (gloo on CPU with a fair share of the cores; NCCL on
    CUDA, GPU `device_index` (default `rank`), with one warm-up all-reduce so that the communicators
    exist before any CUDA-graph capture). Seeds every rank alike."""
    import torch.distributed as dist

    if os.environ.get("NCCL_NVLS_ENABLE", "0") != "0":
        raise RuntimeError("NCCL_NVLS_ENABLE must stay 0 (NVLink multicast off) for tensor-parallel decoding")
    os.environ.update(MULTICAST_OFF)
    timeout = datetime.timedelta(seconds=collective_timeout_s)
    if device_type == "cuda":
        index = rank if device_index is None else device_index
        torch.cuda.set_device(index)
        dist.init_process_group("nccl", init_method=init_method, rank=rank, world_size=world_size,
                                timeout=timeout, device_id=torch.device("cuda", index))
        warm = torch.ones(1, device="cuda")
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size, timeout=timeout)
        warm = torch.ones(1)
    torch.manual_seed(0)  # ranks sample alike
    dist.all_reduce(warm)
    return dist.group.WORLD


# --------------------------------------------------------------------------------------------- generation
def checkpoint_dir(model: str | os.PathLike[str]) -> Path:
    """A local HF checkpoint directory for `model`: the directory itself, or a hub id's snapshot (config,
    safetensors and tokenizer files; downloaded when not cached). Raises `ValueError` naming what to give."""
    path = Path(model)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(model), allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model",
                                                                  "*.txt"]))
    except Exception as exc:  # noqa: BLE001 - offline, unknown id, gated model: one clear message
        raise ValueError(
            f"tensor-parallel decoding reads each rank's slices from an HF checkpoint directory (config.json + "
            f"*.safetensors); {str(model)!r} is not a directory and its hub snapshot could not be fetched ({exc})"
        ) from exc


def generate_tp(
    model: str | os.PathLike[str],
    world_size: int,
    prompt: str,
    *,
    thresholds: str | os.PathLike[str] | None = None,
    sparsity: float = 0.0,
    method: str | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    device: str = "cuda",
    dtype: torch.dtype | None = None,
    compile: bool = True,
    stream: bool = True,
    timeout_s: float = DEFAULT_LAUNCH_TIMEOUT_S,
) -> dict[str, Any]:
    """Generate from an HF checkpoint over `world_size` ranks of this host (GPUs r = 0..N-1, or gloo on CPU):
    each rank reads its shard (`shard_from_checkpoint`), takes the thresholds artifact's level `sparsity`
    (whole-model thresholds; weight-aware column scales sliced per rank), and decodes; rank 0 prints the
    text as it comes (`stream`). Returns rank 0's result: text, token ids, tok/s, and how decode ran."""
    import tempfile

    from teal.artifact import check_sparsity

    check_sparsity(sparsity)  # a negative or NaN level must not run dense silently
    if sparsity > 0 and thresholds is None:
        raise ValueError("sparsity > 0 needs a thresholds artifact (teal calibrate MODEL -o DIR)")
    directory = checkpoint_dir(model)
    if thresholds is not None:  # refuse another model's artifact before any rank starts
        from transformers import AutoConfig

        from teal import Thresholds

        Thresholds.load(thresholds).check_config(AutoConfig.from_pretrained(directory), str(model))
    options = dict(path=str(directory), prompt=prompt, thresholds=None if thresholds is None else str(thresholds),
                   sparsity=sparsity, method=method, max_new_tokens=max_new_tokens, temperature=temperature,
                   top_p=top_p, device=device, dtype=dtype, compile=compile, stream=stream)
    with tempfile.TemporaryDirectory(prefix="teal-tp-gen-") as tmp:
        out = Path(tmp) / "result.json"
        launch(_generate_rank, world_size, (options, str(out)), device=device, timeout_s=timeout_s)
        return json.loads(out.read_text())


def _generate_rank(rank: int, world_size: int, group: Any, options: dict[str, Any], out_path: str) -> None:
    from teal.engine.generator import DEFAULT_CUDA_MODE, Generator, _cuda_kernel_runs, _default_seq_len, _try_tokenizer

    device = torch.device("cuda", torch.cuda.current_device()) if options["device"] == "cuda" else torch.device("cpu")
    dtype = options["dtype"] or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    from transformers import AutoConfig

    seq = _default_seq_len(AutoConfig.from_pretrained(options["path"]))
    th = None
    if options["thresholds"] is not None:
        from teal import Thresholds

        th = Thresholds.load(options["thresholds"])
    transposed = th is not None or _cuda_kernel_runs(device)
    shard = shard_from_checkpoint(options["path"], rank, world_size, group, dtype=dtype, device=device,
                                  max_seq_len=seq, transposed=transposed)
    if th is None:
        shard.set_thresholds(None)
    mode = "eager" if device.type != "cuda" else (DEFAULT_CUDA_MODE if options["compile"] else "graph")
    tokenizer = _try_tokenizer(options["path"])
    gen = Generator(shard, tokenizer, mode=mode, thresholds=th, sparsity=options["sparsity"],
                    method=options["method"])
    emit = None
    if rank == 0 and options["stream"]:
        from teal.engine.generator import TextStream

        print(options["prompt"], end="", flush=True)
        emit = TextStream(tokenizer, lambda text: print(text, end="", flush=True))
    res = gen.generate(options["prompt"], max_new_tokens=options["max_new_tokens"],
                       temperature=options["temperature"], top_p=options["top_p"], stream=emit)
    if rank == 0:
        if options["stream"]:
            print(flush=True)
        from teal.engine.generator import engine_summary

        text = tokenizer.decode(res.tokens, skip_special_tokens=True) if tokenizer is not None else None
        result = {"tokens": [int(t) for t in res.tokens], "text": text, "tokens_per_s": res.tokens_per_s,
                  "world_size": world_size, "all_reduce": shard.all_reduce, "mode": gen.mode,
                  "summary": engine_summary(gen)}
        tmp = Path(out_path).with_suffix(".part")
        tmp.write_text(json.dumps(result))
        tmp.replace(out_path)
