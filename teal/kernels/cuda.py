"""The sparse GEMV in CUDA C++ (``sparse_gemv.cu``) for 1..8 input rows, compiled at run time with NVRTC
(each variant once per machine: the machine code is cached under ``$TEAL_CACHE/cuda-kernels``).

``KernelConfig(cuda=True)`` selects it: ``block_n`` output columns per program (256 or 512 for 16-bit
inputs: one or two 16-byte vectors per lane), ``block_r`` weight rows per warp and loop step (the rows
whose loads are issued together), ``split_k`` programs per column block (one thread-block cluster, at
most 8, whose partial sums are added over distributed shared memory) and ``num_warps`` warps each.

Needs a GPU of compute capability 9.0 or later (clusters), NVRTC (shipped with PyTorch's CUDA wheels as
``nvidia-cuda-nvrtc``) and the driver library. ``ops`` calls ``supported`` first and falls back to the
Triton kernel, with a warning naming the reason, where it says no. Launches go through the driver's
``cuLaunchKernelEx`` on PyTorch's current stream, so CUDA graphs capture them; programmatic dependent
launch is requested when ``ops.pdl_mode`` says so.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import glob
import hashlib
import importlib.resources
import os
import sys
import tempfile
import threading
from pathlib import Path
import warnings
from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING, Optional, Sequence

import torch

from teal.kernels.configs import KernelConfig

if TYPE_CHECKING:
    from teal.quant import QuantizedWeight

KERNEL_NAME = "teal_sparse_gemv"
SOURCE_FILE = "sparse_gemv.cu"

#: Element-type codes of the source's ``ELEM`` macro and the elements per 16-byte vector.
ELEM_CODES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
ELEMS_PER_VECTOR = {torch.bfloat16: 8, torch.float16: 8, torch.float32: 4}

#: Codes of the source's ``WFMT`` macro: weights in the element type, int8 or int4 codes (``teal.quant``).
WEIGHT_CODES = {"bf16": 0, "int8": 1, "int4": 2}
#: Registers a lane holds per row and vector of weights: 16 bytes, 8 int8 codes, 8 int4 codes.
REGISTERS_PER_VECTOR = {0: 4, 1: 2, 2: 1}

#: Input rows one launch takes (more: the caller's dense fallback).
MAX_BATCH = 8
#: Up to 4 segments per launch, like the Triton kernel (``ops.MAX_SEGMENTS_PER_LAUNCH``).
MAX_SEGMENTS = 4


@functools.cache
def source() -> str:
    """The kernel's CUDA C++ source, shipped beside this module."""
    return importlib.resources.files("teal.kernels").joinpath(SOURCE_FILE).read_text(encoding="utf-8")


@dataclass(frozen=True)
class Variant:
    """One compiled instance of the kernel (the source's macros)."""

    elem: int
    warps: int
    unroll: int
    vecs: int
    split: int
    has_scale: bool
    glu: bool
    pdl: int  # 0 off, 1 let the next kernel launch at the start, 2 after the weight loop
    list_step: int = 4  # input entries per lane and listing round
    batch: int = 1
    mma: int = 0  # the inner product on tensor cores: 0 off, else 64-column slots per lane group (2 or 4)
    weights: int = 0  # WEIGHT_CODES: 0 element type, 1 int8, 2 int4
    group: int = 0  # int4: input rows per (scale, zero) group
    stamps: bool = False  # the per-stage timeline (``STAMPS``; measuring only, ``launch(stamps=...)``)
    qpipe: int = 0  # int4 at batch 1: steps in the cp.async ring of each warp (``QPIPE``; 0: code words in registers)

    def defines(self) -> list[str]:
        out = [f"-DLIST_STEP={self.list_step}", f"-DBATCH={self.batch}", f"-DMMA={int(self.mma)}",
            f"-DELEM={self.elem}", f"-DWARPS={self.warps}", f"-DUNROLL={self.unroll}", f"-DVECS={self.vecs}",
            f"-DSPLIT={self.split}", f"-DHAS_SCALE={int(self.has_scale)}", f"-DGLU={int(self.glu)}",
            f"-DPDL={int(self.pdl)}",
        ]
        if self.weights:
            out += [f"-DWFMT={self.weights}", f"-DGROUP={max(1, self.group)}"]
        if self.qpipe:
            out.append(f"-DQPIPE={self.qpipe}")
        if self.stamps:
            out.append("-DSTAMPS=1")
        return out


@dataclass(frozen=True)
class Geometry:
    """Grid, block and shared memory of one launch over ``len(split_list)`` segments."""

    grid: tuple[int, int, int]
    threads: int
    shared_bytes: int
    block_n: int
    rows_per_split: int
    rows_per_warp: int
    offsets: tuple[int, int, int]      # first column of segments 1..3 (N where absent)
    block_starts: tuple[int, int, int]  # first column block of segments 1..3
    n_end: int


def vectors_per_lane(config: KernelConfig, dtype: torch.dtype) -> int:
    """16-byte vectors per lane and row: ``block_n`` / (32 lanes x elements per vector), at least 1 (1 with the
    tensor-core inner product, whose lanes load one vector per 64-column slot)."""
    if config.use_dot:
        return 1
    return max(1, config.block_n // (32 * ELEMS_PER_VECTOR[dtype]))


def rows_per_step(config: KernelConfig, dtype: torch.dtype, batch: int = 1, weights: int = 0) -> int:
    """Rows per warp and step actually compiled: ``block_r``, capped so that a step's weight vectors (4
    registers each; quantized: ``REGISTERS_PER_VECTOR``) fit the register budget without spills: at batch
    1, 64 registers of vectors per lane with 16 or more warps (128 registers per thread), 128 below; with
    more rows, what the per-thread register limit leaves after the batch's fp32 sums (8 per row and
    vector; twice that for int4's group sums)."""
    vecs = vectors_per_lane(config, dtype)
    if config.use_dot:
        return MMA_ROWS
    per_vector = REGISTERS_PER_VECTOR[weights]
    if batch == 1:
        budget = 64 if config.num_warps >= 16 else 128
        if weights:  # the sums, scales and row indices of the quantized loop take their share
            budget -= 16 * vecs + 16
    else:
        limit = min(255, 65536 // (32 * config.num_warps))
        sums = 8 * batch * vecs * (2 if weights == 2 else 1) + (16 * vecs if weights else 0)
        budget = max(per_vector, min(128, limit - 40 - sums))
        if weights == 2 and batch > 4:  # each row's decoded codes meet 5-8 rows of sums (ptxas, sm_90: 32
            budget = min(budget, 16 * per_vector)  # rows per step spill 32 bytes at 8 rows, 16 do not)
    return max(1, min(config.block_r, budget // (per_vector * vecs)))


#: Dynamic shared memory one program may opt in to on sm_90 (227 KB); the device's own figure decides at launch.
SM90_SHARED_LIMIT = 232448

#: Rows per warp and step of the tensor-core inner product (the k of one mma.m16n8k16).
MMA_ROWS = 16
#: Output columns per program the tensor-core inner product takes (``block_n``): 64-column slots of 2 or 4.
MMA_BLOCK_NS = (128, 256)


def mma_slots(config: KernelConfig) -> int:
    """64-column slots per lane group of the tensor-core inner product (0 without ``use_dot``)."""
    return config.block_n // 64 if config.use_dot else 0


def mma_registers(config: KernelConfig) -> int:
    """Registers per thread the tensor-core inner product needs: per slot 16 fp32 sums and 16 for a step's
    weight vectors, and addressing (ptxas for sm_90: 155-158 at 4 slots, 86-94 at 2)."""
    return 32 * mma_slots(config) + 40


#: Most input entries a lane loads per listing round.
MAX_LIST_STEP = 8


def list_step(rows_per_warp: int, batch: int = 1) -> int:
    """Input entries per lane and listing round: the power of two that covers a warp's rows in one round,
    at most ``MAX_LIST_STEP`` (and at most 16 values of the batch in registers)."""
    per_lane = max(1, -(-rows_per_warp // 32))
    cap = max(1, min(MAX_LIST_STEP, 16 // batch))
    cap = 1 << (cap.bit_length() - 1)
    return min(cap, 1 << (per_lane - 1).bit_length())


def variant_for(config: KernelConfig, dtype: torch.dtype, *, has_scale: bool, glu: bool, pdl: int,
                rows_per_warp: int = 128, batch: int = 1, weights: str = "bf16", group: int = 0) -> Variant:
    """The compiled instance a launch of ``config`` on ``dtype`` inputs uses (``rows_per_warp``: from
    ``geometry``; ``weights``/``group``: the weight format, ``WEIGHT_CODES``)."""
    code = WEIGHT_CODES[weights]
    return Variant(ELEM_CODES[dtype], config.num_warps, rows_per_step(config, dtype, batch, code),
                   vectors_per_lane(config, dtype), config.split_k, has_scale, glu, pdl,
                   list_step(rows_per_warp, batch), batch, mma_slots(config), code, group if code == 2 else 0,
                   qpipe=ring_stages(config, weights))


def ring_stages(config: KernelConfig, weights: str = "bf16") -> int:
    """Steps in the int4 loop's cp.async ring (``QPIPE``): ``config.num_stages`` where it is above 1 on int4 codes
    (``register_problem`` names what it takes), else 0: the code words of a step go through registers."""
    return config.num_stages if weights == "int4" and config.cuda and config.num_stages > 1 else 0


def geometry(k: int, split_list: Sequence[int], config: KernelConfig, dtype: torch.dtype, batch: int = 1,
             weights: str = "bf16") -> Geometry:
    """Launch geometry (pure arithmetic; tested on the CPU). Column block b of segment j covers columns
    ``offsets[j-1] + (b - block_starts[j-1]) * block_n`` onward, clipped at the segment's end; program
    (b, s) owns rows ``[s * rows_per_split, (s + 1) * rows_per_split)``, warp w of it ``rows_per_warp`` of
    those. Shared memory: the survivor lists (then, reused, the warps' sums), and with an int4 ring
    (``ring_stages``) the ring after the lists."""
    if not 1 <= len(split_list) <= MAX_SEGMENTS:
        raise ValueError(f"the CUDA sparse GEMV takes 1..{MAX_SEGMENTS} segments per launch, got {len(split_list)}")
    block_n = config.block_n if mma_slots(config) else 32 * ELEMS_PER_VECTOR[dtype] * vectors_per_lane(config, dtype)
    n = sum(split_list)
    ends = list(accumulate(split_list))
    blocks = list(accumulate(-(-w // block_n) for w in split_list))
    pad = MAX_SEGMENTS - len(split_list)
    offsets = tuple((ends[:-1] + [n] * pad)[:3])
    starts = tuple((blocks[:-1] + [blocks[-1]] * pad)[:3])
    split = config.split_k
    rows_per_split = -(-k // split)
    rows_per_warp = -(-rows_per_split // config.num_warps)
    lists = 4 * (1 + batch) * config.num_warps * rows_per_warp
    sums = 4 * (config.num_warps + 1) * batch * block_n
    stages = ring_stages(config, weights)
    if stages:  # the ring follows the lists (16-byte aligned): stages x rows per step x 32 words per warp
        unroll = rows_per_step(config, dtype, batch, WEIGHT_CODES[weights])
        lists = -(-lists // 16) * 16 + 4 * config.num_warps * stages * unroll * 32
    return Geometry((blocks[-1], split, 1), 32 * config.num_warps, max(lists, sums), block_n, rows_per_split,
                    rows_per_warp, offsets, starts, n)  # type: ignore[arg-type]


#: The per-stage timeline of a ``STAMPS`` build (``launch(stamps=...)``): per program (``blockIdx.x * split +
#: blockIdx.y``) one row per warp, then one for the program, each of these int64 fields (%globaltimer, ns;
#: the program row's first field is the SM id). See the ``STAMPS`` macro in ``sparse_gemv.cu``.
STAMP_FIELDS = {
    "warp": ("start", "waited", "listed", "first", "streamed"),
    "program": ("sm", "met", "summed", "clustered", "end"),
}


def stamps_shape(k: int, split_list: Sequence[int], config: KernelConfig, dtype: torch.dtype,
                 batch: int = 1) -> tuple[int, int, int]:
    """Shape of the int64 ``stamps`` buffer one launch fills: (programs, warps + 1, 5)."""
    geo = geometry(k, split_list, config, dtype, batch)
    return (geo.grid[0] * geo.grid[1], config.num_warps + 1, len(STAMP_FIELDS["warp"]))


def register_problem(config: KernelConfig, dtype: torch.dtype, batch: int, weights: str = "bf16") -> Optional[str]:
    """Why the fp32 sums of ``batch`` rows (8 registers per row and 16-byte vector; int4 twice that, with its
    group sums) do not fit the per-thread register limit of ``config``'s block (None when they do)."""
    limit = min(255, 65536 // (32 * config.num_warps))
    if weights != "bf16":
        if dtype not in (torch.bfloat16, torch.float16):
            return f"quantized weights take bf16 or fp16 inputs on the CUDA kernel, not {dtype}"
        if config.use_dot:
            return "quantized weights take the FMA inner product (use_dot off)"
        vecs = vectors_per_lane(config, dtype)
        if config.num_stages > 1 and (weights != "int4" or vecs != 1 or batch != 1):
            return (f"the cp.async ring (num_stages={config.num_stages}) takes int4 codes at block_n 256 and one "
                    f"input row, not {weights} at block_n {config.block_n} with {batch} rows; use num_stages=1")
        sums = 8 * vecs * batch * (2 if weights == "int4" else 1) + 16 * vecs
        if sums + 48 > limit:
            return (f"{batch} rows x block_n={config.block_n} of {weights} need {sums} registers of sums and scales "
                    f"per thread; {config.num_warps} warps leave {limit}: use fewer warps or a narrower block")
        return None
    if config.use_dot:
        if dtype == torch.float32:
            return "the tensor-core inner product (use_dot) takes bf16 or fp16 inputs, not fp32"
        if config.block_n not in MMA_BLOCK_NS:
            return f"the tensor-core inner product (use_dot) takes block_n 128 or 256, got {config.block_n}"
        if limit < mma_registers(config):
            return (f"the tensor-core inner product (use_dot) needs {mma_registers(config)} registers per thread "
                    f"at block_n={config.block_n}; {config.num_warps} warps leave {limit}: use fewer warps")
        return None
    sums = ELEMS_PER_VECTOR[dtype] * vectors_per_lane(config, dtype) * batch
    if sums + 44 > limit:
        return (f"{batch} rows x block_n={config.block_n} need {sums} registers of sums per thread; "
                f"{config.num_warps} warps leave {limit}: use fewer warps or a narrower block")
    return None


# ----------------------------------------------------------------------------------------------
# NVRTC and the driver, through ctypes


class _Lib:
    """The CUDA driver library, loaded once (NVRTC: ``nvrtc_library``)."""

    def __init__(self) -> None:
        self.cuda = ctypes.CDLL("libcuda.so.1" if sys.platform.startswith("linux") else "nvcuda.dll")
        self.cuda.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]

    def check_cuda(self, result: int, what: str) -> None:
        if result != 0:
            msg = ctypes.c_char_p()
            self.cuda.cuGetErrorString(result, ctypes.byref(msg))
            raise RuntimeError(f"{what} failed: CUDA error {result} ({(msg.value or b'?').decode()})")


def _check_nvrtc(nv: ctypes.CDLL, result: int, what: str) -> None:
    if result != 0:
        raise RuntimeError(f"{what} failed: NVRTC error {result} ({nv.nvrtcGetErrorString(result).decode()})")


@functools.cache
def nvrtc_library() -> ctypes.CDLL:
    """NVRTC alone (compiling needs no GPU and no driver): PyTorch's own, else an ``nvidia-cuda-nvrtc``
    wheel on ``sys.path``, else the system's."""
    nv = _load_nvrtc()
    nv.nvrtcGetErrorString.restype = ctypes.c_char_p
    return nv


def _load_nvrtc() -> ctypes.CDLL:
    getter = getattr(getattr(torch.cuda, "_utils", None), "_get_gpu_rtc_library", None)
    if getter is not None and torch.version.cuda is not None:
        try:
            return getter()
        except Exception:  # noqa: BLE001 - fall through to our own search
            pass
    names = ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"]
    candidates: list[str] = []
    for base in sys.path:
        candidates += sorted(glob.glob(os.path.join(base, "nvidia", "*", "lib", "libnvrtc.so.*[0-9]")))
        candidates += sorted(glob.glob(os.path.join(base, "nvidia", "cu*", "lib", "libnvrtc.so.*[0-9]")))
    errors = []
    for name in names + [c for c in candidates if ".alt." not in c]:
        try:
            return ctypes.CDLL(name)
        except OSError as exc:
            errors.append(str(exc))
    raise RuntimeError("the CUDA sparse GEMV needs NVRTC (libnvrtc), which was not found; install PyTorch's "
                       "CUDA build (it depends on nvidia-cuda-nvrtc) or use the Triton kernels")


def nvrtc_compile(src: str, file_name: str, options: Sequence[str]) -> bytes:
    """Machine code (a cubin) of CUDA C++ ``src`` for the ``--gpu-architecture`` among ``options``; a
    compile error raises with NVRTC's log. Needs NVRTC only, so it also runs on machines without a GPU."""
    return nvrtc_compile_with_log(src, file_name, options)[0]


def nvrtc_compile_with_log(src: str, file_name: str, options: Sequence[str]) -> tuple[bytes, str]:
    """``nvrtc_compile`` and NVRTC's log (ptxas's register and spill report with ``-Xptxas -v``)."""
    nv = nvrtc_library()
    prog = ctypes.c_void_p()
    _check_nvrtc(nv, nv.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), file_name.encode(), 0, None, None),
                 "nvrtcCreateProgram")
    try:
        arr = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
        result = nv.nvrtcCompileProgram(prog, len(options), arr)
        size = ctypes.c_size_t()
        nv.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log_buf = ctypes.create_string_buffer(size.value)
        nv.nvrtcGetProgramLog(prog, log_buf)
        log = log_buf.value.decode(errors="replace")
        if result != 0:
            raise RuntimeError(f"NVRTC could not compile {file_name} ({' '.join(options)}):\n{log}")
        _check_nvrtc(nv, nv.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
        cubin = ctypes.create_string_buffer(size.value)
        _check_nvrtc(nv, nv.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
        return cubin.raw, log
    finally:
        nv.nvrtcDestroyProgram(ctypes.byref(prog))


_lib_lock = threading.Lock()
_lib: Optional[_Lib] = None


def _library() -> _Lib:
    global _lib
    with _lib_lock:
        if _lib is None:
            _lib = _Lib()
        return _lib


def nvrtc_options(variant: Variant, arch: str) -> list[str]:
    return [f"--gpu-architecture={arch}", "-std=c++17", "--device-as-default-execution-space"] + variant.defines()


def nvrtc_version() -> str:
    major, minor = ctypes.c_int(), ctypes.c_int()
    nv = nvrtc_library()
    _check_nvrtc(nv, nv.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
    return f"{major.value}.{minor.value}"


def cache_path(variant: Variant, arch: str, compiler: str) -> Path:
    """Where a compiled variant is kept between processes: ``$TEAL_CACHE`` (default ``~/.cache/teal``)
    ``/cuda-kernels/``, named by a hash of the source, the options, the architecture and the compiler
    version, so any change compiles afresh."""
    root = Path(os.environ["TEAL_CACHE"]).expanduser() if os.environ.get("TEAL_CACHE") else Path.home() / ".cache" / "teal"
    key = hashlib.sha256("\0".join([source(), *nvrtc_options(variant, arch), compiler]).encode()).hexdigest()[:32]
    return root / "cuda-kernels" / f"{KERNEL_NAME}-{arch}-{key}.cubin"


_ELF_MAGIC = b"\x7fELF"


def cubin_for(variant: Variant, arch: str) -> bytes:
    """The variant's machine code: from the on-disk cache when a valid entry exists, else compiled with
    NVRTC and stored (atomically; a cache that cannot be written is skipped, never an error)."""
    path = cache_path(variant, arch, nvrtc_version())
    try:
        data = path.read_bytes()
        if data.startswith(_ELF_MAGIC):
            return data
    except OSError:
        pass
    data = compile_cubin(variant, arch)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError:
        pass
    return data


def compile_cubin(variant: Variant, arch: str = "sm_90") -> bytes:
    """The variant's machine code for ``arch`` (NVRTC)."""
    return nvrtc_compile(source(), SOURCE_FILE, nvrtc_options(variant, arch))


class _Kernel:
    """A loaded variant: its module and function handles on one device."""

    def __init__(self, variant: Variant, device_index: int) -> None:
        lib = _library()
        major, minor = torch.cuda.get_device_capability(device_index)
        cubin = cubin_for(variant, f"sm_{major}{minor}")
        with torch.cuda.device(device_index):
            torch.cuda.current_stream()  # make sure the primary context is current
            self.module = ctypes.c_void_p()
            lib.check_cuda(lib.cuda.cuModuleLoadData(ctypes.byref(self.module), cubin), "cuModuleLoadData")
            self.func = ctypes.c_void_p()
            lib.check_cuda(lib.cuda.cuModuleGetFunction(ctypes.byref(self.func), self.module, KERNEL_NAME.encode()),
                           "cuModuleGetFunction")
        self.shared_limit = 48 * 1024

    def attributes(self) -> dict[str, int]:
        """Registers per thread and local (spill) bytes per thread of the loaded function."""
        lib = _library()
        out = {}
        for name, attr in (("registers", 4), ("local_bytes", 3)):  # CU_FUNC_ATTRIBUTE_NUM_REGS / LOCAL_SIZE_BYTES
            value = ctypes.c_int()
            lib.check_cuda(lib.cuda.cuFuncGetAttribute(ctypes.byref(value), attr, self.func), "cuFuncGetAttribute")
            out[name] = value.value
        return out

    def ensure_shared(self, nbytes: int) -> None:
        if nbytes > self.shared_limit:
            lib = _library()
            # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
            lib.check_cuda(lib.cuda.cuFuncSetAttribute(self.func, 8, nbytes), "cuFuncSetAttribute")
            self.shared_limit = nbytes


class _LaunchAttribute(ctypes.Structure):
    # value: the 64-byte CUlaunchAttributeValue union, as ints (a c_int array field is a view into the
    # structure, unlike a c_char array, which reads back as a bytes copy)
    _fields_ = [("id", ctypes.c_uint), ("pad", ctypes.c_uint), ("value", ctypes.c_int * 16)]


class _LaunchConfig(ctypes.Structure):
    _fields_ = [
        ("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
        ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
        ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
        ("attrs", ctypes.POINTER(_LaunchAttribute)), ("numAttrs", ctypes.c_uint),
    ]


#: CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
_PDL_ATTRIBUTE = 6

_kernels: dict[tuple[Variant, int], _Kernel] = {}
_kernels_lock = threading.Lock()


def kernel(variant: Variant, device_index: int) -> _Kernel:
    key = (variant, device_index)
    with _kernels_lock:
        found = _kernels.get(key)
    if found is None:
        found = _Kernel(variant, device_index)
        with _kernels_lock:
            _kernels.setdefault(key, found)
    return found


# ----------------------------------------------------------------------------------------------
# When the kernel applies, and the launch


@functools.cache
def device_problem(device_index: int) -> Optional[str]:
    major, _ = torch.cuda.get_device_capability(device_index)
    if major < 9:
        return f"compute capability {major}.x has no thread-block clusters (9.0 or later needed)"
    try:
        _library()
    except (OSError, RuntimeError) as exc:
        return str(exc)
    return None


def unsupported_reason(x: torch.Tensor, w_t: torch.Tensor, split_list: Sequence[int], config: KernelConfig) -> Optional[str]:
    """None when ``launch`` can run this call, else why not (the caller falls back to Triton)."""
    if x.device.type != "cuda":
        return "the CUDA kernel runs on CUDA tensors only"
    if not 1 <= x.shape[0] <= MAX_BATCH:
        return f"the CUDA kernel takes 1..{MAX_BATCH} input rows, got {x.shape[0]}"
    epv = ELEMS_PER_VECTOR.get(x.dtype)
    if epv is None:
        return f"unsupported dtype {x.dtype}"
    if any(width % epv for width in split_list) or w_t.stride(0) % epv or w_t.data_ptr() % 16:
        return (f"{ALIGNMENT_PREFIX} with segment widths and row stride multiples of {epv} "
                f"(widths {list(split_list)}, stride {w_t.stride(0)})")
    if w_t.shape[0] * w_t.stride(0) >= 2**31:
        return "weights above 2^31 elements"
    device_index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    problem = register_problem(config, x.dtype, x.shape[0])
    if problem:
        return problem
    # launches take up to MAX_SEGMENTS segments each (the caller splits); shared memory does not depend on them
    geo = geometry(w_t.shape[0], split_list[:MAX_SEGMENTS], config, x.dtype, x.shape[0])
    limit = torch.cuda.get_device_properties(device_index).shared_memory_per_block_optin
    if geo.shared_bytes > limit:
        return f"needs {geo.shared_bytes} bytes of shared memory per program (device limit {limit}); raise split_k"
    return device_problem(device_index)


#: Reasons that are properties of one call's shapes (the fallback is silent for them).
ALIGNMENT_PREFIX = "weights must be 16-byte aligned"

_warned: set[str] = set()


def warn_fallback(reason: str) -> None:
    """Warn once per reason that a CUDA configuration fell back to the Triton kernel (not for a call whose
    shapes or alignment the kernel does not take: that is a property of the call, not of the setup)."""
    if reason.startswith(ALIGNMENT_PREFIX):
        return
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"teal: CUDA sparse GEMV not used ({reason}); using the Triton kernel", RuntimeWarning,
                      stacklevel=3)


def launch(
    x: torch.Tensor,
    w_t: torch.Tensor,
    y: torch.Tensor,
    thresholds: torch.Tensor,
    col_scale: Optional[torch.Tensor],
    split_list: Sequence[int],
    config: KernelConfig,
    *,
    glu: bool = False,
    pdl: int = 0,
    stamps: Optional[torch.Tensor] = None,
) -> None:
    """``y[b, seg_j] = mask_j(x[b]) @ w_t[:, seg_j]`` (``unsupported_reason`` must have said None).

    x [B, K] with contiguous rows (B <= 8), or the gate|up row [1, 2K] with ``glu``; w_t [K, n] (may be a
    column view) and y [B, n] (contiguous rows); thresholds fp32 [S]; col_scale fp32 [S, K] or None; at
    most 4 segments. ``stamps``: an int64 tensor of ``stamps_shape`` on x's device, which the ``STAMPS`` build
    (compiled for this) fills with the call's per-stage timeline (``STAMP_FIELDS``); measuring only.
    """
    if glu and x.shape[0] != 1:
        raise ValueError("the CUDA kernel fuses the SiLU-gated input at batch 1 only")
    if stamps is not None:
        if config.use_dot:
            raise ValueError("stage stamps are taken in the FMA loop only; use_dot configs have none")
        shape = stamps_shape(w_t.shape[0], split_list, config, x.dtype, x.shape[0])
        if (tuple(stamps.shape) != shape or stamps.dtype != torch.int64 or stamps.device != x.device
                or not stamps.is_contiguous()):
            raise ValueError(f"stamps must be a contiguous int64 tensor of shape {shape} on {x.device}, got "
                             f"{stamps.dtype} {tuple(stamps.shape)} on {stamps.device}")
    _launch(x, w_t.data_ptr(), w_t.shape[0], w_t.stride(0), y, thresholds, col_scale, split_list, config,
            glu=glu, pdl=pdl, stamps=stamps)


def unsupported_quant_reason(x: torch.Tensor, qw: "QuantizedWeight", split_list: Sequence[int],
                             config: KernelConfig) -> Optional[str]:
    """None when ``launch_quant`` can run this call, else why not (the caller falls back to Triton)."""
    if x.device.type != "cuda":
        return "the CUDA kernel runs on CUDA tensors only"
    if not 1 <= x.shape[0] <= MAX_BATCH:
        return f"the CUDA kernel takes 1..{MAX_BATCH} input rows, got {x.shape[0]}"
    if not 1 <= len(split_list) <= MAX_SEGMENTS:
        return f"the CUDA kernel takes 1..{MAX_SEGMENTS} segments per launch, got {len(split_list)}"
    if any(width % 8 for width in split_list):
        return f"{ALIGNMENT_PREFIX} with segment widths multiples of 8 (widths {list(split_list)})"
    code_align = 8 if qw.format == "int8" else 4
    tensors = [qw.scales] + ([qw.zeros] if qw.zeros is not None else [])
    if (qw.codes.data_ptr() % code_align or qw.codes.stride(0) % code_align or not qw.codes.is_contiguous()
            or any(t.data_ptr() % 16 or not t.is_contiguous() for t in tensors)):
        return f"{ALIGNMENT_PREFIX} (quantized codes {code_align}-byte, scales and zeros 16-byte, contiguous)"
    if qw.codes.numel() >= 2**31:
        return "weights above 2^31 codes"
    device_index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    problem = register_problem(config, x.dtype, x.shape[0], qw.format)
    if problem:
        return problem
    if qw.scales.dtype != x.dtype:
        return f"the scales are {qw.scales.dtype} and the input {x.dtype}; the kernel takes one type"
    geo = geometry(qw.shape[0], split_list, config, x.dtype, x.shape[0], qw.format)
    limit = torch.cuda.get_device_properties(device_index).shared_memory_per_block_optin
    if geo.shared_bytes > limit:
        return f"needs {geo.shared_bytes} bytes of shared memory per program (device limit {limit}); raise split_k"
    return device_problem(device_index)


def launch_quant(x: torch.Tensor, qw: "QuantizedWeight", y: torch.Tensor, thresholds: torch.Tensor,
                 col_scale: Optional[torch.Tensor], split_list: Sequence[int], config: KernelConfig, *,
                 pdl: int = 0) -> None:
    """``y[b, seg_j] = mask_j(x[b]) @ dequantize(qw)[:, seg_j]`` on the codes (``unsupported_quant_reason``
    must have said None); y [B, N] contiguous rows, the input's dtype."""
    zeros = qw.zeros if qw.zeros is not None else qw.scales
    _launch(x, qw.codes.data_ptr(), qw.shape[0], qw.codes.stride(0), y, thresholds, col_scale, split_list, config,
            pdl=pdl, weights=qw.format, group=qw.group_size, qscale=qw.scales, qzero=zeros,
            stride_q=qw.scales.stride(0) if qw.format == "int4" else 0)


def _launch(x: torch.Tensor, w_ptr: int, k: int, stride_w: int, y: torch.Tensor, thresholds: torch.Tensor,
            col_scale: Optional[torch.Tensor], split_list: Sequence[int], config: KernelConfig, *, glu: bool = False,
            pdl: int = 0, weights: str = "bf16", group: int = 0, qscale: Optional[torch.Tensor] = None,
            qzero: Optional[torch.Tensor] = None, stride_q: int = 0, stamps: Optional[torch.Tensor] = None) -> None:
    batch = x.shape[0]
    device_index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    geo = geometry(k, split_list, config, x.dtype, batch, weights)
    variant = variant_for(config, x.dtype, has_scale=col_scale is not None, glu=glu, pdl=int(pdl),
                          rows_per_warp=geo.rows_per_warp, batch=batch, weights=weights, group=group)
    if stamps is not None:
        variant = dataclasses.replace(variant, stamps=True)
    kern = kernel(variant, device_index)
    kern.ensure_shared(geo.shared_bytes)
    scale = col_scale if col_scale is not None else thresholds
    qs = qscale if qscale is not None else thresholds
    qz = qzero if qzero is not None else thresholds
    holders = [
        ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(w_ptr), ctypes.c_void_p(y.data_ptr()),
        ctypes.c_void_p(thresholds.data_ptr()), ctypes.c_void_p(scale.data_ptr()),
        ctypes.c_int(k), ctypes.c_int(stride_w), ctypes.c_int(geo.rows_per_split), ctypes.c_int(geo.rows_per_warp),
        *(ctypes.c_int(v) for v in geo.offsets), *(ctypes.c_int(v) for v in geo.block_starts), ctypes.c_int(geo.n_end),
        ctypes.c_int(x.stride(0)), ctypes.c_int(y.stride(0)),
        ctypes.c_void_p(qs.data_ptr()), ctypes.c_void_p(qz.data_ptr()), ctypes.c_int(stride_q),
    ]
    if stamps is not None:  # the STAMPS build's extra last argument
        holders.append(ctypes.c_void_p(stamps.data_ptr()))
    params = (ctypes.c_void_p * len(holders))(*[ctypes.cast(ctypes.byref(h), ctypes.c_void_p) for h in holders])
    attrs = (_LaunchAttribute * 1)()
    n_attrs = 0
    if pdl:
        attrs[0].id = _PDL_ATTRIBUTE
        attrs[0].value[0] = 1  # programmaticStreamSerializationAllowed
        n_attrs = 1
    stream = torch.cuda.current_stream(x.device).cuda_stream
    cfg = _LaunchConfig(geo.grid[0], geo.grid[1], geo.grid[2], geo.threads, 1, 1, geo.shared_bytes,
                        ctypes.c_void_p(stream), attrs, n_attrs)
    lib = _library()
    if torch.cuda.current_device() != device_index:  # the driver launches in the current context
        with torch.cuda.device(device_index):
            lib.check_cuda(lib.cuda.cuLaunchKernelEx(ctypes.byref(cfg), kern.func, params, None), "cuLaunchKernelEx")
        return
    lib.check_cuda(lib.cuda.cuLaunchKernelEx(ctypes.byref(cfg), kern.func, params, None), "cuLaunchKernelEx")
