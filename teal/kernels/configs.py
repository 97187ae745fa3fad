"""Launch configurations of the sparse GEMV kernel: a tuned table keyed by shape, and a heuristic.

The table is filled offline by ``teal.kernels.tune`` on the GPU (``python -m teal.bench.kernels
--tune``); a decode loop only ever looks configurations up, so it never autotunes mid-run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

#: Batch sizes above this use the dense fallback (cuBLAS on the masked input): the union of the
#: surviving rows of more than 8 inputs is nearly dense at every useful sparsity.
MAX_KERNEL_BATCH = 8

#: Heuristic for untuned shapes: batches above this use the dense fallback. On the H200 the union of
#: two or more inputs' surviving rows was never cheaper through the kernel than through cuBLAS.
DENSE_FROM_BATCH = 1

#: Multiprocessor count assumed when no CUDA device can be asked (the H200 has 132).
DEFAULT_SM_COUNT = 132


@dataclass(frozen=True)
class KernelConfig:
    """Tile shape and launch parameters of one sparse GEMV launch.

    ``block_n`` output columns and ``block_r`` weight rows per loop step; ``split_k`` programs share
    the rows of one column block (their fp32 partials are summed by the last one to finish);
    ``use_dot`` computes the block with ``tl.dot`` (tensor cores; batch padded to 16) instead of
    fp32 FMAs; ``num_stages`` is Triton's own pipelining (1: only the kernel's hand-written prefetch).
    ``dense`` selects the dense fallback (cuBLAS on the masked input) for this shape and batch.
    ``compact`` (batch 1 only; a table entry for a larger bucket is rejected) first lists each program's
    surviving rows, then gathers only those rows, so the work, not only the bytes, scales with the density.
    ``gather`` (batch 1) lists the surviving rows once per call in a separate launch shared by all
    column blocks, then splits each segment's list evenly over ``split_k`` programs per column block;
    when more than ``dense_above`` of the entries survive (decided on the device, per segment), the
    programs stream every row instead (``dense_above`` is used by ``gather`` only). With ``gather``,
    ``num_stages`` is the software-pipelining depth of the row loop (1: one tile prefetched by hand).
    ``cuda`` (batches 1..8, compute capability 9.0+) runs the CUDA C++ kernel of ``teal.kernels.cuda``
    instead: ``block_n`` columns per program (one or two 16-byte vectors per lane), ``block_r`` rows per
    warp and loop step, ``split_k`` programs per column block forming one cluster (at most 8),
    ``num_warps`` warps; with several rows it reads the union of their surviving weight rows once.
    ``cuda`` with ``use_dot`` computes the products on tensor cores (mma, 16 rows per warp and step; bf16 and
    fp16 inputs, ``block_n`` 128 or 256, warps bounded by its registers: ``cuda.register_problem``), which keeps
    batches of 4-8 rows off the FMA pipes. ``cuda`` with ``num_stages`` > 1 on int4 codes (batch 1, ``block_n``
    256) streams the codes through a cp.async ring of that many steps per warp in shared memory
    (``cuda.ring_stages``; ``register_problem`` refuses it with int8 codes or more rows); the 16-bit loop ignores it.
    Devices where it cannot run take the Triton table's configuration.
    """

    block_n: int = 256
    block_r: int = 32
    split_k: int = 8
    num_warps: int = 4
    num_stages: int = 1
    use_dot: bool = False
    dense: bool = False
    compact: bool = False
    gather: bool = False
    dense_above: float = 0.9
    cuda: bool = False

    def __post_init__(self) -> None:
        for name in ("block_n", "block_r", "split_k"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"KernelConfig.{name} must be a power of two >= 1, got {value}")
        if self.gather and (self.compact or self.use_dot):
            raise ValueError("KernelConfig: gather cannot be combined with compact or use_dot")
        if self.compact and self.use_dot:
            raise ValueError("KernelConfig: compact (batch 1) cannot be combined with use_dot (batches)")
        if not 0.0 <= self.dense_above <= 1.0:
            raise ValueError(f"KernelConfig.dense_above must be a fraction in [0, 1], got {self.dense_above}")
        if self.num_stages < 1:
            raise ValueError(f"KernelConfig.num_stages must be >= 1, got {self.num_stages}")
        if self.cuda and (self.gather or self.compact or self.dense):
            raise ValueError("KernelConfig: cuda cannot be combined with gather, compact or dense")
        if self.cuda and (self.split_k > 8 or self.block_r > 32 or self.num_warps > 32):
            raise ValueError(f"KernelConfig: a cuda config needs split_k <= 8 (one cluster), block_r <= 32 and "
                             f"num_warps <= 32, got split_k={self.split_k}, block_r={self.block_r}, "
                             f"num_warps={self.num_warps}")
        if self.use_dot and self.block_r < 16:
            raise ValueError(f"KernelConfig.block_r must be >= 16 with use_dot, got {self.block_r}")

    def as_dict(self) -> dict[str, int | bool]:
        return dataclasses.asdict(self)


def batch_bucket(batch: int) -> int:
    """Power-of-two bucket (1, 2, 4, 8, ...) that a batch size is tuned under."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    return 1 << (batch - 1).bit_length()


def dtype_name(dtype: torch.dtype) -> str:
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    if dtype not in names:
        raise ValueError(f"sparse_linear supports bf16, fp16 and fp32 inputs, got {dtype}")
    return names[dtype]


# (K, N, batch bucket, dtype) -> config, measured on an NVIDIA H200 (see benchmarks/notes/tuned-tables.md).
# fp16 shares the bf16 entries (same element size); shapes not listed use `heuristic_config`.

#: The table in use. Batch-1 entries of version 3 (predicated loads / per-program compaction, tuned by
#: `python -m teal.bench.kernels --tune`, benchmarks/results/2026-11-28-h200-kernels.json), except Llama-3
#: gate|up, where version 4's gather path (global compaction + balanced gather,
#: benchmarks/results/2026-11-28-h200-kernels-v4.json) won clearly (37.6 vs 50.8 us at s = 0.5, equal at
#: s = 0); elsewhere its fixed cost (a second launch, one more dependent load) lost to the v3 entries.
#: Batches of 2 or more take the dense fallback (DENSE_FROM_BATCH), which beat every kernel variant there.
#: An end-to-end sweep with programmatic dependent launch on (benchmarks/results/
#: 2026-11-29-h200-decode-config-sweep.json) kept every entry except o, where in-kernel lists
#: (``KernelConfig(64, 32, 8, compact=True)``) decoded 1.3 % faster at s = 0.5; per call they are faster
#: only from s = 0.5 on and 20 % slower at s = 0 (benchmarks/results/2026-11-29-h200-kernels-pdl-o-compact.json),
#: and allocations give o lower levels than the average, so o keeps its v3 entry.
TUNED: dict[tuple[int, int, int, str], KernelConfig] = {
    (4096, 6144, 1, "bf16"): KernelConfig(block_n=128, block_r=64, split_k=8),
    (4096, 4096, 1, "bf16"): KernelConfig(block_n=64, block_r=64, split_k=8, num_warps=2),
    (4096, 28672, 1, "bf16"): KernelConfig(block_n=128, block_r=32, split_k=2, num_stages=1, gather=True),
    (14336, 4096, 1, "bf16"): KernelConfig(block_n=128, block_r=32, split_k=16, compact=True),
    (4096, 12288, 1, "bf16"): KernelConfig(block_n=128, block_r=64, split_k=4),
    (4096, 22016, 1, "bf16"): KernelConfig(block_n=128, block_r=64, split_k=2),
    (11008, 4096, 1, "bf16"): KernelConfig(block_n=128, block_r=32, split_k=16, compact=True),
    # Gemma 3 12B's text decoder, tuned with `python -m teal.bench.kernels --shapes gemma-3-12b --batches 1
    # --tune --tune-families all` (benchmarks/results/2026-11-29-h200-kernels-gemma-3-12b.json).
    (3840, 8192, 1, "bf16"): KernelConfig(block_n=128, block_r=32, split_k=8, compact=True),
    (4096, 3840, 1, "bf16"): KernelConfig(block_n=64, block_r=64, split_k=8, num_warps=2),
    (3840, 30720, 1, "bf16"): KernelConfig(block_n=128, block_r=32, split_k=2, num_stages=1, gather=True),
    (15360, 3840, 1, "bf16"): KernelConfig(block_n=128, block_r=32, split_k=16, compact=True),
}

#: The CUDA C++ kernel's table (devices where it runs: ``get_config(cuda_ok=True)``), tuned with
#: ``python -m teal.bench.kernels --tune --tune-families cuda --tune-sparsities 0,0.5,0.9``, which times
#: its candidates against the ``TUNED`` entry at batch 1 (the CUDA kernel won every shape) and against the
#: dense fallback at batches (benchmarks/notes/tuned-tables.md); all with ``TEAL_CUDA_PDL=2``.
TUNED_CUDA: dict[tuple[int, int, int, str], KernelConfig] = {
    # Llama-3-8B: the TEAL_CUDA_PDL=2 tuning of 2026-11-29-h200-kernels-cuda-pdl.json, which the decode run
    # 2026-11-29-h200-decode-cuda.json used (the later full run picked the same except q|k|v: split 4, 16 warps)
    (4096, 6144, 1, "bf16"): KernelConfig(block_n=256, block_r=8, split_k=8, num_warps=8, cuda=True),
    (4096, 4096, 1, "bf16"): KernelConfig(block_n=256, block_r=8, split_k=8, num_warps=8, cuda=True),
    # gate|up: the fastest at s = 0.5 of 2026-11-29-h200-kernels-cuda.json (30.1 us against 32.1 for the
    # earlier (256, 4, 1, 32) entry, faster at s = 0; the dense regime takes (512, 8, 2, 8) there)
    (4096, 28672, 1, "bf16"): KernelConfig(block_n=256, block_r=8, split_k=1, num_warps=16, cuda=True),
    (14336, 4096, 1, "bf16"): KernelConfig(block_n=256, block_r=8, split_k=8, num_warps=8, cuda=True),
    # Llama-2-7B and Gemma-3-12B: 2026-11-29-h200-kernels-cuda.json (the Gemma decode run used these, except for
    # the two gate|up entries: (256, 8, 2, 16) and (256, 4, 1, 32) then, now the fastest at s = 0.5)
    (4096, 12288, 1, "bf16"): KernelConfig(block_n=256, block_r=8, split_k=2, num_warps=16, cuda=True),
    (4096, 22016, 1, "bf16"): KernelConfig(block_n=256, block_r=8, split_k=2, num_warps=8, cuda=True),
    (11008, 4096, 1, "bf16"): KernelConfig(block_n=256, block_r=8, split_k=8, num_warps=8, cuda=True),
    (3840, 8192, 1, "bf16"): KernelConfig(block_n=256, block_r=4, split_k=2, num_warps=32, cuda=True),
    (4096, 3840, 1, "bf16"): KernelConfig(block_n=256, block_r=8, split_k=8, num_warps=16, cuda=True),
    (3840, 30720, 1, "bf16"): KernelConfig(block_n=256, block_r=8, split_k=1, num_warps=16, cuda=True),
    (15360, 3840, 1, "bf16"): KernelConfig(block_n=256, block_r=8, split_k=8, num_warps=16, cuda=True),
    # One rank of Llama-2-70B over two GPUs (q|k|v, o, gate|up, down): the fastest at s = 0.5 in
    # 2026-11-29-h200-x2-kernels-70b-tp2.json
    (8192, 5120, 1, "bf16"): KernelConfig(block_n=256, block_r=8, split_k=8, num_warps=8, cuda=True),
    (4096, 8192, 1, "bf16"): KernelConfig(block_n=256, block_r=8, split_k=4, num_warps=8, cuda=True),
    (8192, 28672, 1, "bf16"): KernelConfig(block_n=512, block_r=8, split_k=2, num_warps=8, cuda=True),
    (14336, 8192, 1, "bf16"): KernelConfig(block_n=256, block_r=16, split_k=4, num_warps=8, cuda=True),
    # Batches (the union of the rows' survivors): 2026-11-29-h200-kernels-cuda-batched.json, picked by
    # `tune.pick_best` (never slower than 1.03x the dense fallback at s = 0, 0.5, 0.9), and the tensor-core
    # entries (use_dot) of session 10's tuning, 2026-11-29-h200-kernels-mma-tuning.json, where they won in both
    # of that session's runs; buckets not listed take the dense fallback (MLP down at 2, 4 and 8 rows, o and
    # Llama-2 q|k|v at 8, Llama-3 gate|up at 8, where the two runs disagreed). Llama-2 down at 2 rows lost its
    # entry: at s = 0.4 (not a tuned sparsity) it ran 31.2 us against the fallback's 28.6 (2026-11-29-h200-
    # kernels-final-mma.json), the partly dense union of two rows being slower to gather than to stream.
    (4096, 6144, 2, "bf16"): KernelConfig(block_n=256, block_r=8, split_k=4, num_warps=16, cuda=True),
    (4096, 6144, 4, "bf16"): KernelConfig(block_n=128, block_r=16, split_k=4, num_warps=8, cuda=True, use_dot=True),
    (4096, 6144, 8, "bf16"): KernelConfig(block_n=256, block_r=16, split_k=4, num_warps=8, cuda=True, use_dot=True),
    (4096, 4096, 2, "bf16"): KernelConfig(block_n=128, block_r=16, split_k=8, num_warps=4, cuda=True, use_dot=True),
    (4096, 4096, 4, "bf16"): KernelConfig(block_n=128, block_r=16, split_k=8, num_warps=4, cuda=True, use_dot=True),
    (4096, 28672, 2, "bf16"): KernelConfig(block_n=256, block_r=8, split_k=1, num_warps=16, cuda=True),
    (4096, 28672, 4, "bf16"): KernelConfig(block_n=256, block_r=8, split_k=1, num_warps=16, cuda=True),
    (4096, 12288, 2, "bf16"): KernelConfig(block_n=256, block_r=4, split_k=2, num_warps=16, cuda=True),
    (4096, 12288, 4, "bf16"): KernelConfig(block_n=256, block_r=8, split_k=4, num_warps=8, cuda=True),
    (4096, 22016, 2, "bf16"): KernelConfig(block_n=256, block_r=8, split_k=4, num_warps=8, cuda=True),
    (4096, 22016, 4, "bf16"): KernelConfig(block_n=256, block_r=16, split_k=4, num_warps=4, cuda=True, use_dot=True),
    (4096, 22016, 8, "bf16"): KernelConfig(block_n=256, block_r=16, split_k=4, num_warps=4, cuda=True, use_dot=True),
}

#: Which table a ``sparse_linear`` call takes its configuration from: "sparse" (``TUNED_CUDA``, tuned at
#: TEAL's sparsities; every caller by default) or "dense" (``TUNED_CUDA_DENSE``, tuned with every threshold
#: -inf, for callers using the kernel as a dense product: the engine's groups on ``kernel_at_zero``). The
#: fastest launch differs between the two: e.g. Llama-3-8B gate|up, (256 columns, 8 rows per step,
#: 1 program per cluster, 16 warps) 62.6 / 30.1 us at s = 0 / 0.5 against (512, 8, 2, 8) 57.0 / 31.7 us
#: (2026-11-29-h200-kernels-cuda.json).
REGIMES = ("sparse", "dense")

#: The "dense" regime's table (batch 1; shapes not listed take ``TUNED_CUDA``'s entry), checked inside the
#: decode graph: kernel-bench timings alone misled (Llama-3-8B gate|up (512, 8, 2, 8) ran 55.6 against 59.1 us
#: in isolation but decoded at 221.4 against 226.3 tok/s with every group on the kernel;
#: benchmarks/results/2026-11-29-h200-x2-decode-8b-*.json). An entry for an MLP shape also puts that group
#: on the kernel in dense decode by default (``Engine.default_kernel_at_zero``): only where the decode graph
#: ran faster so.
TUNED_CUDA_DENSE: dict[tuple[int, int, int, str], KernelConfig] = {
    # Llama-3-8B q|k|v and o (also Llama-2-7B's o): the fastest at s = 0 in 2026-11-29-h200-kernels-cuda.json;
    # 16.0 / 12.6 us against 17.3 / 13.2 for the sparse entries (2026-11-29-h200-x2-kernels-regimes-*.json)
    (4096, 6144, 1, "bf16"): KernelConfig(block_n=256, block_r=8, split_k=4, num_warps=16, cuda=True),
    (4096, 4096, 1, "bf16"): KernelConfig(block_n=256, block_r=16, split_k=8, num_warps=8, cuda=True),
    # one rank of Llama-2-70B over two GPUs, q|k|v and o: 2026-11-29-h200-x2-kernels-70b-tp2.json
    (8192, 5120, 1, "bf16"): KernelConfig(block_n=512, block_r=8, split_k=8, num_warps=8, cuda=True),
    (4096, 8192, 1, "bf16"): KernelConfig(block_n=256, block_r=16, split_k=4, num_warps=8, cuda=True),
    # Gemma-3-12B gate|up and down: dense decode 143.7 tok/s with them on the kernel, 138.6 on cuBLAS
    # (2026-11-29-h200-x2-decode-gemma-3-12b-final.json)
    (3840, 30720, 1, "bf16"): KernelConfig(block_n=256, block_r=8, split_k=1, num_warps=16, cuda=True),
    (15360, 3840, 1, "bf16"): KernelConfig(block_n=256, block_r=8, split_k=8, num_warps=16, cuda=True),
}


def has_dense_entry(k: int, n: int, dtype: torch.dtype) -> bool:
    """Whether ``TUNED_CUDA_DENSE`` (the built-in table, checked in the decode graph) has a batch-1 entry for a
    [K, N] weight. Entries of a ``$TEAL_KERNEL_CONFIGS`` table change launches, not this: they come from
    timings in isolation, which did not always carry into decoding."""
    name = dtype_name(dtype)
    return (k, n, 1, "bf16" if name == "fp16" else name) in TUNED_CUDA_DENSE

#: Environment variable naming a JSON table (``table_to_json``) whose entries take precedence over
#: ``TUNED`` and ``TUNED_CUDA`` (entries marked ``"regime": "dense"``: over ``TUNED_CUDA_DENSE``, and
#: unmarked entries over both); written by ``python -m teal.bench.kernels --tune --table-out PATH``.
CONFIGS_ENV = "TEAL_KERNEL_CONFIGS"

#: Environment variable naming a JSON table (``table_to_json``, batch bucket 1, ``gather=True``
#: entries) that takes precedence over ``TUNED_GATHER``; written by
#: ``benchmarks/scripts/producer_gpu.py --table-out PATH``.
GATHER_CONFIGS_ENV = "TEAL_GATHER_CONFIGS"

#: Environment variable naming a JSON table (``table_to_json``; an entry's ``dtype`` is the weight format, "int8"
#: or "int4") whose entries take precedence over ``TUNED_QUANT_CUDA``; written by ``teal bench kernels --weights
#: int4,int8 --quant-configs sweep --table-out PATH`` (the entries that won the sweep).
QUANT_CONFIGS_ENV = "TEAL_QUANT_CONFIGS"
#: The weight formats a ``$TEAL_QUANT_CONFIGS`` table is keyed by (its entries' ``dtype``).
QUANT_TABLE_FORMATS = ("int8", "int4")

TableKey = tuple[int, int, int, str]


def table_to_json(table: Mapping[TableKey, KernelConfig],
                  dense_table: Mapping[TableKey, KernelConfig] | None = None) -> dict[str, object]:
    """A configuration table as JSON-ready data (``load_table`` reads it back); ``dense_table``: entries of
    the "dense" regime, marked so."""
    entries = [dict(K=k, N=n, bucket=b, dtype=d, config=cfg.as_dict()) for (k, n, b, d), cfg in table.items()]
    entries += [dict(K=k, N=n, bucket=b, dtype=d, regime="dense", config=cfg.as_dict())
                for (k, n, b, d), cfg in (dense_table or {}).items()]
    return {"format": "teal-kernel-configs", "version": 1, "entries": entries}


def load_table(path: str | os.PathLike[str], regime: str = "sparse") -> dict[TableKey, KernelConfig]:
    """Read a table written from ``table_to_json``: the entries that apply to ``regime`` (its own, then the
    unmarked ones where it has none). Errors name the file and the bad entry."""
    if regime not in REGIMES:
        raise ValueError(f"unknown kernel regime {regime!r}; choose one of {', '.join(REGIMES)}")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read kernel configuration table {os.fspath(path)!r}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != "teal-kernel-configs":
        raise ValueError(f"{os.fspath(path)!r} is not a teal kernel configuration table (format key missing)")
    table: dict[TableKey, KernelConfig] = {}
    own: dict[TableKey, KernelConfig] = {}
    for i, entry in enumerate(data.get("entries", [])):
        try:
            key = (int(entry["K"]), int(entry["N"]), int(entry["bucket"]), str(entry["dtype"]))
            marked = entry.get("regime", "sparse")
            if marked not in REGIMES:
                raise ValueError(f"regime {marked!r} is not one of {', '.join(REGIMES)}")
            config = KernelConfig(**entry["config"])
            if config.compact and key[2] > 1:
                raise ValueError(f"compact=True runs batch 1 only, but its bucket is {key[2]}; drop compact "
                                 f"or the entry")
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{os.fspath(path)!r}: entry {i} is not a valid configuration: {exc}") from exc
        if marked == regime:
            own[key] = config
        elif marked == "sparse":
            table[key] = config
    return {**table, **own}


@functools.cache
def _override_table(path: str, regime: str = "sparse") -> dict[TableKey, KernelConfig]:
    return load_table(path, regime)


@functools.cache
def _quant_override_table(path: str) -> dict[TableKey, KernelConfig]:
    """A ``$TEAL_QUANT_CONFIGS`` table, read and checked once per path: one with no int8 / int4 entry is an error."""
    table = load_table(path)
    if not any(f in QUANT_TABLE_FORMATS for _, _, _, f in table):
        raise ValueError(f"${QUANT_CONFIGS_ENV}={path} has no int8 or int4 entry (a bf16 table belongs in "
                         f"${CONFIGS_ENV}); write one with teal bench kernels --quant-configs sweep --table-out")
    return table


def _pow2_floor(value: float) -> int:
    return 1 << max(0, int(value).bit_length() - 1)


def heuristic_config(k: int, n: int, batch: int, sm_count: int) -> KernelConfig:
    """A reasonable configuration for a shape that is not in the tuned table.

    Column blocks of 128 (fewer for narrow outputs), and enough row splits that about four programs
    per multiprocessor stream weights, while each program still covers a few loop steps.
    """
    bucket = batch_bucket(batch)
    if bucket > DENSE_FROM_BATCH:
        return KernelConfig(dense=True)
    block_n = 128 if n >= 1024 else max(16, min(128, _pow2_floor(max(n, 16))))
    use_dot = bucket > 1
    block_r = 32 if use_dot else 64
    n_blocks = -(-n // block_n)
    wanted = max(1, (4 * sm_count) // n_blocks)
    max_split = max(1, k // (2 * block_r))
    split_k = max(1, min(_pow2_floor(wanted), _pow2_floor(max_split), 64))
    return KernelConfig(block_n=block_n, block_r=block_r, split_k=split_k, num_warps=4, use_dot=use_dot)


def heuristic_cuda_config(k: int, n: int, sm_count: int) -> KernelConfig:
    """A CUDA C++ configuration (batch 1) for a shape that is not in the tuned table: 256 columns per
    program, 8 rows per warp and step, clusters of the power-of-two size that puts about one program on
    each multiprocessor (at most 8), 16 warps when every warp still gets 32 rows, else 8 (the shapes of
    the H200 tuning, benchmarks/notes/tuned-tables.md)."""
    n_blocks = -(-n // 256)
    split = max(1, min(8, _pow2_floor(max(1, sm_count // n_blocks)), _pow2_floor(max(1, k // 256))))
    warps = 16 if -(-k // split) >= 16 * 32 else 8
    return KernelConfig(block_n=256, block_r=8, split_k=split, num_warps=warps, cuda=True)


#: Tuned CUDA C++ configurations of the quantized kernel, (K, N, batch bucket, format) -> config: the batch-1
#: winners of `teal bench kernels --shapes llama-3-8b --weights int4,int8 --sparsity 0,0.5 --batch 1,4
#: --quant-kernels cuda --quant-configs sweep` on an H100 (benchmarks/results/2026-12-08-h100-quant-kernels-sweep.json;
#: mean µs over s = 0 and 0.5 against the 8-warp heuristic's), kept because the decode step agreed: int4 dense
#: 252.1 -> 295.4 tok/s, int8 213.8 -> 246.9 (`…-quant-decode-table-{off-1,on,off-2}.json`). The sweep's batch-4
#: winners are not here: no run with 4 rows in a decode loop has checked them yet (benchmarks/notes/measuring.md).
TUNED_QUANT_CUDA: dict[tuple[int, int, int, str], KernelConfig] = {
    (4096, 6144, 1, "int4"): KernelConfig(block_n=256, block_r=32, split_k=4, num_warps=16, cuda=True),  # 9.4 / 9.8
    (4096, 4096, 1, "int4"): KernelConfig(block_n=256, block_r=32, split_k=8, num_warps=4, cuda=True),  # 8.6 / 11.8
    (4096, 28672, 1, "int4"): KernelConfig(block_n=256, block_r=32, split_k=1, num_warps=16, cuda=True),  # 23.6 / 28.9
    (14336, 4096, 1, "int4"): KernelConfig(block_n=256, block_r=32, split_k=4, num_warps=16, cuda=True),  # 20.9 / 28.0
    (4096, 6144, 1, "int8"): KernelConfig(block_n=512, block_r=32, split_k=8, num_warps=16, cuda=True),  # 11.2 / 13.2
    (4096, 4096, 1, "int8"): KernelConfig(block_n=256, block_r=32, split_k=4, num_warps=16, cuda=True),  # 10.1 / 14.8
    (4096, 28672, 1, "int8"): KernelConfig(block_n=256, block_r=32, split_k=1, num_warps=16, cuda=True),  # 33.1 / 35.8
    (14336, 4096, 1, "int8"): KernelConfig(block_n=256, block_r=32, split_k=4, num_warps=16, cuda=True),  # 24.1 / 32.6
}


def quant_cuda_config(k: int, n: int, batch: int, sm_count: int, fmt: str = "int8") -> KernelConfig:
    """The CUDA C++ configuration of an int8 / int4 call: a ``$TEAL_QUANT_CONFIGS`` table's entry of (K, N, batch
    bucket, ``fmt``), else ``TUNED_QUANT_CUDA``'s, else the heuristic: 256 columns per program (the blocks of 16-bit
    weights: a lane's 8 columns are 8 or 4 code bytes per row), clusters as ``heuristic_cuda_config``, 32 rows per
    warp and step at most (``cuda.rows_per_step`` caps it per batch), and 16 warps at batch 1, 8 above. Why 16:
    one 8-warp program of 156 (int4) or 244 (int8) registers per thread fills a multiprocessor's registers, so only
    8 warps' code loads were in flight on it; a 512-thread program has 128 registers per thread, which both loops
    fit at batch 1 without spills, and at the cluster size of this heuristic it was faster in all 8 (format,
    projection) pairs of the H100 sweep at Llama-3-8B widths (int4 gate|up 23.6 against 28.9 µs, mean of s = 0 and
    0.5; benchmarks/notes/quantization.md). With 2-8 rows the sums take the registers: 8 warps."""
    key = (k, n, batch_bucket(batch), fmt)
    override = os.environ.get(QUANT_CONFIGS_ENV)
    if override:
        entry = _quant_override_table(override).get(key)
        if entry is not None:
            if not entry.cuda:
                raise ValueError(f"${QUANT_CONFIGS_ENV}={override}: entry {key} is not a CUDA configuration "
                                 f"(cuda: false); the quantized kernel's table holds CUDA C++ configurations only")
            return entry
    tuned = TUNED_QUANT_CUDA.get(key)
    if tuned is not None:
        return tuned
    base = heuristic_cuda_config(k, n, sm_count)
    warps = 16 if batch_bucket(batch) == 1 else 8
    return KernelConfig(block_n=256, block_r=32, split_k=base.split_k, num_warps=warps, cuda=True)


def quant_cuda_candidates(k: int, n: int, sm_count: int, batch: int = 1) -> list[KernelConfig]:
    """What a sweep of the quantized kernel times beside the heuristic: 256 columns per program, and 512 at batch 1
    (two code loads per lane and row, 256 columns apart, half the programs; with 2-8 rows ptxas spills some of
    them: int8 at 4 rows and 29 rows per step spills 40 bytes); 4, 8 or 16 warps (a 512-thread program has 128
    registers per thread, which the int4 loop fits at batch 1 without spills: twice the warps, so twice the code
    loads in flight on a multiprocessor, where 8 warps of 156 registers leave one program per multiprocessor);
    and clusters of the size that puts about one program on each multiprocessor, half and twice that (1 to 8); 32
    rows per warp and step at most. At batch 1 two more take int4 codes through the cp.async ring (``num_stages``
    steps per warp in shared memory: 8 warps and 3 steps, 16 warps and 2 steps, at 256 columns and the base
    cluster size): the code loads in flight are then bound by shared memory, not registers. Whether a candidate
    fits the registers of a batch and format is ``cuda.register_problem``'s to say, and its shared memory the
    sweep's (``sweep_kernels``)."""
    out = []
    for block_n in (256, 512) if batch == 1 else (256,):
        blocks = -(-n // block_n)
        base = max(1, min(8, _pow2_floor(max(1, sm_count // blocks)), _pow2_floor(max(1, k // 256))))
        for split in sorted({max(1, base // 2), base, min(8, 2 * base)}):
            for warps in (4, 8, 16):
                out.append(KernelConfig(block_n=block_n, block_r=32, split_k=split, num_warps=warps, cuda=True))
            if batch == 1 and block_n == 256 and split == base:  # the int4 cp.async ring (int8: register_problem)
                for warps, stages in ((8, 3), (16, 2)):
                    out.append(KernelConfig(block_n=256, block_r=32, split_k=split, num_warps=warps,
                                            num_stages=stages, cuda=True))
    return out


def get_config(k: int, n: int, batch: int, dtype: torch.dtype, sm_count: int = DEFAULT_SM_COUNT,
               cuda_ok: bool = False, regime: str = "sparse") -> KernelConfig:
    """The configuration of one ``sparse_linear`` call.

    ``cuda_ok``: the device runs the CUDA C++ kernel (``ops.cuda_kernel_available``). Lookup order: the table
    named by ``$TEAL_KERNEL_CONFIGS`` (a CUDA entry only where ``cuda_ok``); with ``cuda_ok``, in the
    "dense" ``regime`` ``TUNED_CUDA_DENSE``, then ``TUNED_CUDA`` (any batch bucket), then at batch 1
    ``heuristic_cuda_config``; else ``TUNED`` (the Triton table) then ``heuristic_config`` (dense fallback
    for batches).
    """
    if regime not in REGIMES:
        raise ValueError(f"unknown kernel regime {regime!r}; choose one of {', '.join(REGIMES)}")
    bucket = batch_bucket(batch)
    if bucket > MAX_KERNEL_BATCH:
        return KernelConfig(dense=True)
    name = dtype_name(dtype)
    lookup = "bf16" if name == "fp16" else name
    key = (k, n, bucket, lookup)
    override = os.environ.get(CONFIGS_ENV)
    if override:
        entry = _override_table(override, regime).get(key)
        if entry is not None and (cuda_ok or not entry.cuda):
            return entry
    if cuda_ok:
        entry = (TUNED_CUDA_DENSE.get(key) if regime == "dense" else None) or TUNED_CUDA.get(key)
        if entry is not None:
            return entry
        if bucket == 1:
            return heuristic_cuda_config(k, n, sm_count)
    tuned = TUNED.get(key)
    if tuned is not None:
        return tuned
    return heuristic_config(k, n, batch, sm_count)


# ----------------------------------------------------------------------------------------------
# Phase B alone (``teal::gather_linear``): the survivor lists come from the kernel that produced the
# activation (``teal.kernels.producer``), so the gather has no compaction launch to amortise and is
# tuned separately from ``TUNED``. Batch 1 only.

#: (K, N, dtype) -> gather configuration. The Llama-3-8B entries are the fastest of the 48-config sweep
#: at s = 0.5 in ``benchmarks/results/2026-11-29-h200-producer-v3.json`` (``producer_gpu.py``); the
#: Llama-2 entries are untuned guesses (about four programs per SM).
TUNED_GATHER: dict[tuple[int, int, str], KernelConfig] = {
    (4096, 6144, "bf16"): KernelConfig(block_n=64, block_r=32, split_k=8, num_stages=1, gather=True),
    (4096, 28672, "bf16"): KernelConfig(block_n=64, block_r=32, split_k=2, num_stages=1, gather=True),
    (14336, 4096, "bf16"): KernelConfig(block_n=128, block_r=32, split_k=16, num_stages=1, gather=True),
    (4096, 12288, "bf16"): KernelConfig(block_n=128, block_r=32, split_k=4, num_stages=1, gather=True),
    (4096, 22016, "bf16"): KernelConfig(block_n=128, block_r=32, split_k=2, num_stages=1, gather=True),
    (11008, 4096, "bf16"): KernelConfig(block_n=128, block_r=32, split_k=16, num_stages=1, gather=True),
}


def heuristic_gather_config(k: int, n: int, sm_count: int) -> KernelConfig:
    """A gather configuration for a shape not in ``TUNED_GATHER``.

    Column blocks of 128 (narrower for narrow outputs), 32-row tiles with the hand-written prefetch,
    and the power-of-two row split that puts about four programs on each multiprocessor while every
    split still owns at least four tiles of rows.
    """
    block_n = 128 if n >= 1024 else max(16, min(128, _pow2_floor(max(n, 16))))
    block_r = 32
    n_blocks = -(-n // block_n)
    wanted = max(1, (4 * sm_count) // n_blocks)
    split_k = max(1, min(_pow2_floor(wanted), _pow2_floor(max(1, k // (4 * block_r))), 64))
    return KernelConfig(block_n=block_n, block_r=block_r, split_k=split_k, num_stages=1, gather=True)


def get_gather_config(k: int, n: int, dtype: torch.dtype, sm_count: int = DEFAULT_SM_COUNT) -> KernelConfig:
    """The gather configuration of a [K, N] weight: ``$TEAL_GATHER_CONFIGS``'s batch-1 entry when it is a
    gather one, else ``TUNED_GATHER`` (fp16 shares the bf16 entries), else the heuristic's.

    The override has its own variable: ``$TEAL_KERNEL_CONFIGS`` entries would also change the
    ``sparse_linear`` path of the same shapes."""
    name = dtype_name(dtype)
    lookup = "bf16" if name == "fp16" else name
    override = os.environ.get(GATHER_CONFIGS_ENV)
    if override:
        entry = _override_table(override).get((k, n, 1, lookup))
        if entry is not None and entry.gather:
            return entry
    tuned = TUNED_GATHER.get((k, n, lookup))
    return tuned if tuned is not None else heuristic_gather_config(k, n, sm_count)
