"""Static instruction mix of the quantized sparse GEMV's weight loop, per code byte, from its sm_90 machine code.

PYTHONPATH=. python3 benchmarks/scripts/quant_kernel_isa.py [--batches 1,4,8] [--json OUT.json]

No GPU: NVRTC compiles `teal/kernels/sparse_gemv.cu` for sm_90 at the configuration the dispatch picks
(`configs.quant_cuda_config`, Llama-3-8B gate|up by default: K 4096, N 2 x 14336, bf16 inputs, int4 group 128)
for int8 and int4, and nvdisasm (Triton's wheel ships it) disassembles it. The weight loop is the backward
branch whose body holds the most code loads (the non-128-bit LDG.E.NA). Its *hot path* is that body less the
regions a forward branch skips when the int4 group does not change (they hold the scale/zero loads,
LDG.E.NA.128: the fold and the next group's prefetch, run once per group); those are counted apart (`cold_*`). Hot instructions are divided by the code
bytes one step of the loop reads per lane (rows per step x vectors x 8 int8 / 4 int4 bytes).

A static count: every hot instruction issues once per step whether or not its predicate is on; the int4
loop's exits every 8 rows (taken only at the end of a group's listed rows, i.e. under sparsity) make it an
upper bound there. It measures issue slots, not time: the GPU run decides (`teal bench kernels --weights int4`).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import glob
import os
import re
import shlex
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import torch

from teal.kernels import cuda
from teal.kernels.configs import quant_cuda_config

#: Instruction classes (by opcode, before the first dot). IMAD and its aliases issue on the FMA pipe, but they
#: do integer work here (addresses): they are counted as integer/logic.
CLASSES = {
    "memory": ("LDG", "LDS", "LDC", "ULDC", "STG", "STS", "LD", "ST", "ATOM", "ATOMS", "RED", "LDSM", "LDGSTS"),
    "integer/logic": ("IADD3", "IMAD", "LOP3", "SHF", "ISETP", "SEL", "LEA", "VIADD", "IABS", "POPC", "FLO",
                      "IMNMX", "VIMNMX", "PLOP3", "P2R", "R2P", "BMSK", "SGXT", "IADD", "ULOP3", "UIADD3", "UIMAD",
                      "USHF", "ULEA", "USEL", "UISETP", "UPLOP3", "UPOPC", "UFLO", "LOP", "SHL", "SHR", "BREV"),
    "conversion/permute": ("PRMT", "I2F", "F2I", "F2F", "I2FP", "F2FP", "FRND", "UPRMT", "I2I", "F2IP"),
    "fma": ("FFMA", "FADD", "FMUL", "HFMA2", "HADD2", "HMUL2", "FMNMX", "FSEL", "FSETP", "DFMA", "HMMA"),
    "move": ("MOV", "CS2R", "S2R", "S2UR", "UMOV", "R2UR", "MOVM"),
    "warp": ("VOTE", "VOTEU", "SHFL", "BAR", "WARPSYNC", "MATCH", "REDUX", "UCGABAR_ARV", "UCGABAR_WAIT"),
    "control": ("BRA", "BSSY", "BSYNC", "EXIT", "NOP", "CALL", "RET", "BREAK", "YIELD", "JMP", "ACQBULK", "DEPBAR",
                "ELECT"),
}
_CLASS_OF = {op: cls for cls, ops in CLASSES.items() for op in ops}
#: The classes the table prints (the rest are summed as "other").
TABLE_CLASSES = ("memory", "integer/logic", "conversion/permute", "fma")

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\.[A-Z0-9_.]+)?\s*([^;]*);")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


@dataclass
class Instr:
    addr: int
    op: str  # opcode without modifiers
    mods: str  # ".NA.CONSTANT" etc.
    pred: str  # "@P0 " or ""
    args: str

    @property
    def text(self) -> str:
        return f"{self.pred}{self.op}{self.mods} {self.args}".strip()


def instruction_class(ins: Instr) -> str:
    if ins.op == "HFMA2" and ins.mods == ".MMA" and "-RZ, RZ" in ins.args:  # the zero-register idiom
        return "move"
    if ins.op == "IMAD" and ins.mods == ".MOV.U32":  # a move on the FMA pipe
        return "move"
    return _CLASS_OF.get(ins.op, "other")


def find_disassembler() -> Optional[str]:
    """nvdisasm: on PATH, else the one Triton's wheel ships (triton/backends/nvidia/bin)."""
    for name in ("nvdisasm",):
        for folder in os.environ.get("PATH", "").split(os.pathsep):
            path = os.path.join(folder, name)
            if os.access(path, os.X_OK):
                return path
    prefix = os.path.dirname(os.path.dirname(sys.executable))
    found = sorted(glob.glob(os.path.join(prefix, "lib", "python*", "site-packages", "triton", "backends", "nvidia",
                                          "bin", "nvdisasm")))
    try:
        import triton

        found += glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm"))
    except ImportError:
        pass
    return found[0] if found else None


def disassemble(cubin: bytes, disassembler: str) -> tuple[list[Instr], dict[str, int]]:
    """The instructions of ``cubin`` (in address order) and each label's address."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as fh:
            fh.write(cubin)
        text = subprocess.run([disassembler, "-c", path], capture_output=True, text=True, check=True).stdout
    instrs: list[Instr] = []
    labels: dict[str, int] = {}
    pending: list[str] = []
    for line in text.splitlines():
        lab = _LABEL.match(line)
        if lab:
            pending.append(lab.group(1))
            continue
        m = _LINE.search(line)
        if m:
            addr = int(m.group(1), 16)
            for name in pending:
                labels[name] = addr
            pending = []
            instrs.append(Instr(addr, m.group(3), m.group(4) or "", (m.group(2) or "").strip() + (" " if m.group(2) else ""),
                                m.group(5).strip()))
    for name in pending:  # a label after the last instruction
        labels[name] = (instrs[-1].addr + 16) if instrs else 0
    return instrs, labels


def is_code_load(ins: Instr) -> bool:
    """A load of weight codes: LDG.E.NA (32-bit int4) or LDG.E.NA.64 (int8), not the 128-bit scale loads."""
    return ins.op == "LDG" and ins.mods.startswith(".E.NA") and ".128" not in ins.mods


def is_scale_load(ins: Instr) -> bool:
    return ins.op == "LDG" and ins.mods.startswith(".E.NA.128")


@dataclass
class LoopMix:
    """The weight loop of one compiled variant."""

    loop_bytes: int  # machine code between the loop's head and its backward branch
    hot: int  # instructions on the path of a step that stays in one group
    hot_by_class: dict[str, int]
    hot_ops: dict[str, int]
    code_loads: int  # code loads on the hot path (rows x vectors per step)
    cold_regions: int  # regions skipped while the group does not change (0 for int8)
    cold_per_region: float  # their mean size: the instructions of one group change
    cold_ops: dict[str, int] = field(default_factory=dict)


def weight_loop(instrs: Sequence[Instr], labels: dict[str, int]) -> LoopMix:
    """Find the loop (the backward branch whose body holds the most code loads) and split hot and cold."""
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    best = None
    for i, ins in enumerate(instrs):
        if ins.op != "BRA":
            continue
        t = _TARGET.search(ins.args)
        if not t or labels.get(t.group(1), 1 << 62) > ins.addr:
            continue
        head = index[labels[t.group(1)]]
        loads = sum(is_code_load(x) for x in instrs[head:i + 1])
        if best is None or loads > best[0]:
            best = (loads, head, i)
    if best is None or best[0] == 0:
        raise RuntimeError("no loop with code loads found in the disassembly")
    _, head, tail = best
    body = list(range(head, tail + 1))
    cold: set[int] = set()
    regions = []
    for i in body:  # forward branches whose skipped range holds scale/zero loads: taken unless the group changes
        ins = instrs[i]
        if ins.op != "BRA" or i in cold:
            continue
        t = _TARGET.search(ins.args)
        if not t or not ins.pred:
            continue
        target = labels.get(t.group(1))
        if target is None or target <= ins.addr or target > instrs[tail].addr:
            continue
        skipped = [j for j in range(i + 1, index.get(target, tail + 1)) if j <= tail]
        if any(is_scale_load(instrs[j]) for j in skipped):
            regions.append(skipped)
            cold.update(skipped)
    hot = [instrs[i] for i in body if i not in cold]
    cold_list = [instrs[i] for i in sorted(cold)]
    return LoopMix(
        loop_bytes=instrs[tail].addr + 16 - instrs[head].addr,
        hot=len(hot),
        hot_by_class=dict(Counter(instruction_class(x) for x in hot)),
        hot_ops=dict(Counter(x.op for x in hot).most_common()),
        code_loads=sum(is_code_load(x) for x in hot),
        cold_regions=len(regions),
        cold_per_region=(len(cold_list) / len(regions)) if regions else 0.0,
        cold_ops=dict(Counter(x.op for x in cold_list).most_common()),
    )


#: Llama-3-8B projections (K, segment widths) the script can count at.
SHAPES = {"gate_up": (4096, [14336, 14336]), "qkv": (4096, [4096, 1024, 1024]), "o": (4096, [4096]),
          "down": (14336, [4096])}
#: The formats of the table's rows.
FORMATS = ("int8", "int4")
CODE_BYTES_PER_VECTOR = {"int8": 8, "int4": 4}  # a lane's 8 columns of one row


def variant_of(fmt: str, batch: int, shape: str = "gate_up", dtype: torch.dtype = torch.bfloat16,
               group: int = 128, sm_count: int = 132) -> cuda.Variant:
    """The variant the dispatch launches for this call (``quant_cuda_config``, PDL 2 as on an H100)."""
    k, splits = SHAPES[shape]
    cfg = quant_cuda_config(k, sum(splits), batch, sm_count, fmt)
    geo = cuda.geometry(k, splits, cfg, dtype, batch)
    return cuda.variant_for(cfg, dtype, has_scale=False, glu=False, pdl=2, rows_per_warp=geo.rows_per_warp,
                            batch=batch, weights=fmt, group=group)


def count_variant(variant: cuda.Variant, disassembler: str, source: Optional[str] = None) -> dict[str, Any]:
    """Compile ``variant`` for sm_90 and count its weight loop: a row of the table (see the module docstring)."""
    code, log = cuda.nvrtc_compile_with_log(source if source is not None else cuda.source(), cuda.SOURCE_FILE,
                                            [*cuda.nvrtc_options(variant, "sm_90"), "-Xptxas", "-v"])
    instrs, labels = disassemble(code, disassembler)
    mix = weight_loop(instrs, labels)
    fmt = {1: "int8", 2: "int4"}[variant.weights]
    step_bytes = variant.unroll * variant.vecs * CODE_BYTES_PER_VECTOR[fmt]
    regs = re.search(r"Used (\d+) registers", log)
    spills = [int(s) for s in re.findall(r"(\d+) bytes spill stores", log)]
    rows_per_group = variant.group if fmt == "int4" else 0
    group_bytes = rows_per_group * variant.vecs * CODE_BYTES_PER_VECTOR[fmt]
    return {
        "format": fmt,
        "batch": variant.batch, "unroll": variant.unroll, "vecs": variant.vecs, "group": variant.group or None,
        "registers": int(regs.group(1)) if regs else None, "spill_store_bytes": max(spills) if spills else None,
        "code_bytes_per_step": step_bytes,
        "loop_machine_code_bytes": mix.loop_bytes,
        "hot_instructions_per_step": mix.hot,
        "hot_per_code_byte": mix.hot / step_bytes,
        "hot_by_class_per_code_byte": {c: n / step_bytes for c, n in sorted(mix.hot_by_class.items())},
        "hot_by_class": mix.hot_by_class,
        "hot_opcodes": mix.hot_ops,
        "code_loads_per_step": mix.code_loads,
        "group_change_regions": mix.cold_regions,
        "group_change_instructions": mix.cold_per_region,
        "dense_per_code_byte_with_group_change": (mix.hot / step_bytes + mix.cold_per_region / group_bytes
                                                  if group_bytes else mix.hot / step_bytes),
        "group_change_opcodes": mix.cold_ops,
        "variant": asdict(variant),
    }


def hot_per_code_byte(fmt: str, batch: int = 1, source: Optional[str] = None,
                      disassembler: Optional[str] = None) -> float:
    """The hot path's instructions per code byte of one variant (the tests' entry)."""
    dis = disassembler or find_disassembler()
    if dis is None:
        raise RuntimeError("nvdisasm not found (Triton's wheel ships it under triton/backends/nvidia/bin)")
    return count_variant(variant_of(fmt, batch), dis, source)["hot_per_code_byte"]


def print_table(rows: Sequence[dict[str, Any]]) -> None:
    head = ["format", "B", "rows/step", "bytes/step", "hot instr", "per byte", *TABLE_CLASSES, "other",
            "group change", "dense incl. change", "regs"]
    print(" | ".join(head))
    for r in rows:
        per = r["hot_by_class_per_code_byte"]
        other = sum(v for c, v in per.items() if c not in TABLE_CLASSES)
        print(" | ".join([
            r["format"], str(r["batch"]), str(r["unroll"]), str(r["code_bytes_per_step"]),
            str(r["hot_instructions_per_step"]), f"{r['hot_per_code_byte']:.2f}",
            *[f"{per.get(c, 0.0):.2f}" for c in TABLE_CLASSES], f"{other:.2f}",
            f"{r['group_change_instructions']:.0f}" if r["group_change_regions"] else "-",
            f"{r['dense_per_code_byte_with_group_change']:.2f}", str(r["registers"]),
        ]))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,4,8", help="comma list of input rows (1..8)")
    parser.add_argument("--shape", default="gate_up", choices=sorted(SHAPES), help="Llama-3-8B projection")
    parser.add_argument("--json", dest="json_path", default=None, help="write the rows here")
    args = parser.parse_args(argv)
    dis = find_disassembler()
    if dis is None:
        print("error: nvdisasm not found; install triton (its wheel ships nvdisasm) or put CUDA's bin on PATH",
              file=sys.stderr)
        return 2
    try:
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        print(f"error: --batches takes a comma list of integers, got {args.batches!r}", file=sys.stderr)
        return 2
    if not batches or any(not 1 <= b <= cuda.MAX_BATCH for b in batches):
        print(f"error: --batches takes values in 1..{cuda.MAX_BATCH}, got {args.batches!r}", file=sys.stderr)
        return 2
    rows = []
    for batch in batches:
        for fmt in FORMATS:
            row = count_variant(variant_of(fmt, batch, args.shape), dis)
            row["shape"] = args.shape
            rows.append(row)
    print_table(rows)
    if args.json_path:
        from teal.bench.results import git_commit, write_json

        version = subprocess.run([dis, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
        write_json({
            "benchmark": "quant_kernel_isa",
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "device": "none (static count of sm_90 machine code)",
            "command": "PYTHONPATH=. python3 benchmarks/scripts/quant_kernel_isa.py " + shlex.join(argv or sys.argv[1:]),
            "git_commit": git_commit(),
            "nvrtc": cuda.nvrtc_version(),
            "disassembler": version[-1] if version else dis,
            "torch": torch.__version__,
            "method": __doc__,
            "classes": {c: list(ops) for c, ops in CLASSES.items()},
            "rows": rows,
        }, args.json_path)
        print(f"wrote {args.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
