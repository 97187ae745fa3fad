"""Per-slice flags between the gate|up and down launches of the CUDA sparse GEMV (``sparse_gemv.cu``,
``SLICE_FLAGS``): down starts on a slice of its input as soon as that slice is final, instead of waiting for
the whole gate|up grid (issue 22's second candidate; not wired into the engine).

The pair (batch 1, bf16 / fp16 / fp32):

- Producer: the gate|up launch over two equal segments [I, I] (gate, then up). Column block b of either
  segment holds channels ``[b * block_n, (b + 1) * block_n)`` of down's input; each of its ``split_k``
  programs, once its columns are stored, release-adds 1 to flag b. A slice is final when its flag has grown
  by ``arrivals = 2 * split_k`` (gate and up, every rank) in this call.
- Consumer: down's launch with SiLU * up inside (``glu``). It skips ``griddepcontrol.wait``; each warp waits
  (acquire-polls) only for the flags of the slices its rows read, then lists its survivors and streams its
  weight rows, so its first weight loads overlap the producer's tail.

Nothing is reset between calls (so CUDA graph replays need no memset node): flags only grow, and the
consumer learns its call number from a 64-bit ticket each of its programs takes (``ticket // programs``)
before it lets the next kernel launch. Call e's programs wait for ``flag >= (e + 1) * arrivals``, compared
modulo 2^32 (``reached``).

Why this cannot deadlock (under programmatic dependent launch, with PDL off it is plain stream order):

1. A dependent grid launches only once every program of its primary has executed
   ``griddepcontrol.launch_dependents`` or exited (CUDA programming guide, "Programmatic Dependent Launch and
   Synchronization"; the driver's graph port CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC "activates when all blocks
   of the kernel have performed cudaTriggerProgrammaticLaunchCompletion() or have terminated"). A program can
   only trigger while it runs, so when any consumer program is placed on an SM, every producer program has
   already been placed (it runs or is done): a spinning consumer never holds an SM a producer still needs.
   The primary grid need not be resident all at once; each of its programs has started.
2. Every wait is for older work whose programs have all started: a consumer waits for its producer's
   flags; a producer's ``griddepcontrol.wait`` waits for the kernel before it, which (the consumer included,
   through its flags) completes only after its own waits are over. By induction over launch order, every
   wait ends. The simulation below checks this with fewer SM slots than programs, and shows the deadlock
   when a consumer may launch before all producer programs started (``faults={"launch_early"}``).
3. Call ordering: a producer writes only after its ``griddepcontrol.wait``, so call e + 1's producer writes
   the gate|up row and adds to the flags only after call e's consumer completed; the flags of call e reach
   exactly (e + 1) * arrivals before any program of call e + 1 adds to them. Consumer tickets of call e + 1
   follow those of call e because each program takes its ticket before it triggers the next launch.
4. The consumer's writes to its output and the producer's reads of its input are ordered by the same chain
   (down writes only after acquiring flags released after the producer's wait; the producer has read its
   input before it releases).

Contract: the consumer launch directly follows its producer in one stream; one ``SliceFlags`` buffer per
stream of pairs (the pairs of one stream may share it); a launch of one side alone desynchronises the counts
(the next wait times out and reports; ``reset`` with no kernel in flight repairs it).

A wait longer than ``spin_limit`` polls (about 0.1-0.5 µs each) records (slice, program, warp, flag seen,
target) in the buffer and the kernel returns; every later wait gives up at once until ``reset``.
``SliceFlags.error`` reads the report: a hang becomes an error.

``simulate`` runs the protocol on the CPU: programs as interleaved steps under a random scheduler with a
bounded number of SM slots, PDL's launch rule, tickets, flags and a data word per channel tagged with the
call that wrote it; it reports stale reads, timeouts and hangs. ``faults`` breaks it on purpose (release
before the data, an epoch that does not advance, a missing release, a naive comparison at wrap-around, a
producer that skips its wait, a consumer launched before its producer's programs all started). The model is
sequentially consistent: the fences themselves are checked on the GPU (tests/gpu/test_slice_flags_gpu.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import torch

from teal.kernels import cuda
from teal.kernels.configs import KernelConfig

#: Word offsets in the flag buffer (32-bit words; ``sparse_gemv.cu``'s SF_TICKET / SF_ERROR / SF_FLAGS).
TICKET_WORD = 0  # the consumer's 64-bit ticket (words 0-1)
ERROR_WORD = 8  # 0, or 1 and then slice, program, warp, flag seen, target
FLAGS_WORD = 32  # flag of slice s at FLAGS_WORD + s (its own cache lines, apart from the ticket)
#: Default poll bound of a consumer wait (a poll is an L2 round trip plus a 64 ns sleep: well under a second).
DEFAULT_SPIN_LIMIT = 1 << 20
MASK32 = 0xFFFFFFFF


def arrivals_per_slice(producer_split: int) -> int:
    """Release-adds a slice's flag gets per call: gate and up, from each of the producer's ``split_k`` ranks."""
    return 2 * producer_split


def consumer_target(ticket: int, programs: int, arrivals: int) -> int:
    """The flag value (mod 2^32) a consumer program holding ``ticket`` waits for: its call is
    ``ticket // programs`` (0-based), whose slices are final at ``(call + 1) * arrivals``."""
    return ((ticket // programs + 1) * arrivals) & MASK32


def reached(flag: int, target: int) -> bool:
    """Whether a flag (mod 2^32) has reached ``target`` (mod 2^32): wrap-safe, since a flag is never more than
    a few calls away from the target its consumer waits for."""
    return ((flag - target) & MASK32) < 2**31


def warp_slices(row_lo: int, row_hi: int, slice_width: int) -> range:
    """The input slices a warp owning rows ``[row_lo, row_hi)`` waits for."""
    if row_lo >= row_hi:
        return range(0)
    return range(row_lo // slice_width, (row_hi - 1) // slice_width + 1)


# ----------------------------------------------------------------------------------------------
# The buffer and the launch of a pair


class SliceFlags:
    """The flag buffer of one gate|up -> down pair problem, allocated (zeroed) once.

    ``inter``: down's input width I (gate|up has 2I columns); ``producer``: the gate|up launch config (its
    ``block_n`` is the slice width, its ``split_k`` sets the arrivals).
    """

    def __init__(self, inter: int, producer: KernelConfig, dtype: torch.dtype, device: torch.device,
                 spin_limit: int = DEFAULT_SPIN_LIMIT) -> None:
        geo = cuda.geometry(1, [inter, inter], producer, dtype)
        self.inter = inter
        self.slice_width = geo.block_n
        self.slices = -(-inter // geo.block_n)
        self.arrivals = arrivals_per_slice(producer.split_k)
        self.spin_limit = int(spin_limit)
        if not 0 < self.spin_limit < 2**32:
            raise ValueError(f"spin_limit must be in 1..2^32-1 polls, got {spin_limit}")
        self.buffer = torch.zeros(FLAGS_WORD + self.slices, dtype=torch.int32, device=device)

    def launch_args(self, role: int) -> cuda.FlagLaunch:
        return cuda.FlagLaunch(role, self.buffer, self.slice_width, self.arrivals, self.spin_limit)

    def error(self) -> Optional[dict[str, int]]:
        """The first timed-out wait since the last ``reset`` (synchronises with the device), or None."""
        words = self.buffer[: FLAGS_WORD].to("cpu", torch.int64) & MASK32
        if int(words[ERROR_WORD]) == 0:
            return None
        slice_, program, warp, seen, target = (int(v) for v in words[ERROR_WORD + 1 : ERROR_WORD + 6])
        return {"slice": slice_, "program": program, "warp": warp, "flag_seen": seen, "target": target}

    def reset(self) -> None:
        """Zero the buffer (only with no kernel of the pair in flight): after an error, or a lone launch."""
        self.buffer.zero_()


def pair_problem(h: torch.Tensor, w_gu: torch.Tensor, w_d: torch.Tensor, producer: KernelConfig,
                 consumer: KernelConfig, flags: SliceFlags) -> Optional[str]:
    """Why ``launch_pair`` cannot run these operands (None when it can)."""
    inter = w_gu.shape[1] // 2
    if h.dim() != 2 or h.shape[0] != 1 or h.shape[1] != w_gu.shape[0]:
        return f"the flagged pair takes one input row [1, {w_gu.shape[0]}], got {tuple(h.shape)}"
    if w_gu.shape[1] != 2 * inter or w_d.shape[0] != inter:
        return f"gate|up must be [H, 2I] and down [I, N]; got {tuple(w_gu.shape)} and {tuple(w_d.shape)}"
    if not (producer.cuda and consumer.cuda) or producer.dense or consumer.dense:
        return "both sides of the flagged pair must be CUDA kernel configurations"
    if flags.inter != inter or flags.buffer.device != h.device:
        return f"the flag buffer was made for I={flags.inter} on {flags.buffer.device}, not I={inter} on {h.device}"
    geo = cuda.geometry(1, [inter, inter], producer, h.dtype)
    if geo.block_n != flags.slice_width or flags.arrivals != arrivals_per_slice(producer.split_k):
        return "the flag buffer was made for another producer configuration (block_n or split_k)"
    for x, w, splits, cfg in ((h, w_gu, [inter, inter], producer), (h.new_empty(1, 2 * inter), w_d, [w_d.shape[1]],
                                                                   consumer)):
        reason = cuda.unsupported_reason(x, w, splits, cfg)
        if reason is not None:
            return reason
    return None


def launch_pair(h: torch.Tensor, w_gu: torch.Tensor, w_d: torch.Tensor, thresholds: torch.Tensor,
                gate_up: torch.Tensor, y: torch.Tensor, producer: KernelConfig, consumer: KernelConfig,
                flags: SliceFlags, *, producer_pdl: int = 1, consumer_pdl: int = 2) -> None:
    """gate_up[1, 2I] = mask(h) @ w_gu (thresholds[0:2]), then y[1, N] = mask(silu(gate) * up) @ w_d
    (thresholds[2]), down waiting per slice on ``flags`` (``pair_problem`` must have said None).

    ``producer_pdl``: when gate|up lets down launch (1 at its start, 2 after its weight loop; 0 no PDL);
    ``consumer_pdl``: the same for the kernel after down. The engine's own launches do not use this.
    """
    inter = w_gu.shape[1] // 2
    thr = thresholds.reshape(-1).to(torch.float32)
    cuda.launch_flagged(h, w_gu, gate_up, thr[0:2], None, [inter, inter], producer, flags.launch_args(1),
                        pdl=producer_pdl)
    cuda.launch_flagged(gate_up, w_d, y, thr[2:3], None, [w_d.shape[1]], consumer, flags.launch_args(2),
                        pdl=consumer_pdl)


# ----------------------------------------------------------------------------------------------
# The protocol on the CPU

FAULTS = frozenset({
    "release_before_data",  # the producer releases its flag, then stores its columns
    "epoch_not_advanced",  # the consumer always waits for the first call's target
    "missing_release",  # one producer program of the last call never releases
    "naive_compare",  # flag >= target without wrap-around (the run starts 2 calls before 2^32)
    "producer_skips_wait",  # the producer writes before the kernel before it completed
    "launch_early",  # the consumer launches once the producer's first program triggered
})


@dataclass
class SimResult:
    """What a simulated run saw."""

    calls_done: int = 0
    stale_reads: list[tuple[int, int, int]] = field(default_factory=list)  # (call, channel, tag read)
    error: Optional[dict[str, int]] = None  # the first timeout report (as ``SliceFlags.error``)
    hang: bool = False  # no step could run and work was left (without a spin bound)
    max_consumers_spinning: int = 0
    steps: int = 0

    @property
    def ok(self) -> bool:
        return not self.stale_reads and self.error is None and not self.hang


@dataclass
class _Kernel:
    kind: str  # "producer" or "consumer"
    call: int
    programs: list[Iterator[str]] = field(default_factory=list)
    launched: bool = False
    started: int = 0
    signalled: set[int] = field(default_factory=set)  # programs that triggered the next launch or exited
    exited: int = 0

    @property
    def complete(self) -> bool:
        return self.exited == len(self.programs)


def simulate(inter: int = 40, slice_width: int = 8, producer_split: int = 2, consumer_blocks: int = 3,
             consumer_split: int = 2, consumer_warps: int = 3, calls: int = 4, slots: int = 6, seed: int = 0,
             spin_limit: Optional[int] = 200, producer_trigger: str = "start", placement: str = "random",
             start_call: int = 0, faults: Sequence[str] = (), max_steps: int = 200_000) -> SimResult:
    """Run ``calls`` gate|up -> down pairs back to back in one stream (as graph replays or layers do) with
    ``slots`` programs resident at most, steps interleaved at random.

    ``producer_trigger``: where producer programs let the consumer launch ("start" or "end" of their work:
    PDL 1 / 2). ``placement``: which launched program the block scheduler places on a free slot ("random", or
    "newest": the most recently launched kernel's first, the adversary of a dependent launched too early).
    ``start_call``: the state after that many earlier calls (near 2^32 / arrivals the targets wrap). A
    consumer warp owns a contiguous share of its program's rows (as on the GPU) and checks that every gate
    and up value it reads carries its own call's tag. ``spin_limit`` None: unbounded waits (a deadlock shows
    as ``hang``)."""
    unknown = set(faults) - FAULTS
    if unknown:
        raise ValueError(f"unknown faults {sorted(unknown)}; choose from {sorted(FAULTS)}")
    if producer_trigger not in ("start", "end") or placement not in ("random", "newest"):
        raise ValueError("producer_trigger is 'start' or 'end'; placement is 'random' or 'newest'")
    rng = random.Random(seed)
    res = SimResult()
    n_slices = -(-inter // slice_width)
    arrivals = arrivals_per_slice(producer_split)
    consumer_programs = consumer_blocks * consumer_split
    state: dict[str, Any] = {"ticket": start_call * consumer_programs, "error": None}
    flags = [(start_call * arrivals) & MASK32] * n_slices
    gate = [-1] * inter  # the call that last wrote each channel
    up = [-1] * inter
    rows_per_split = -(-inter // consumer_split)
    rows_per_warp = -(-rows_per_split // consumer_warps)
    kernels: list[_Kernel] = []

    def is_reached(flag: int, target: int) -> bool:
        return flag >= target if "naive_compare" in faults else reached(flag, target)

    def producer(k: _Kernel, index: int, seg: int, block: int, rank: int) -> Iterator[str]:
        if producer_trigger == "start":
            k.signalled.add(index)
        position = kernels.index(k)
        while "producer_skips_wait" not in faults and position > 0 and not kernels[position - 1].complete:
            yield "wait"  # griddepcontrol.wait
        lo = block * slice_width
        cols = range(lo + rank, min(inter, lo + slice_width), producer_split)  # this rank's share of the block
        dst = gate if seg == 0 else up
        release = not ("missing_release" in faults and k.call == calls - 1 and (seg, block, rank) == (1, 0, 0))
        if "release_before_data" in faults and release:
            flags[block] = (flags[block] + 1) & MASK32
            yield "work"
        for c in cols:
            dst[c] = start_call + k.call
            yield "work"
        if "release_before_data" not in faults and release:
            flags[block] = (flags[block] + 1) & MASK32
        k.signalled.add(index)

    def consumer(k: _Kernel, index: int, block: int, split: int) -> Iterator[str]:
        ticket = state["ticket"]
        state["ticket"] += 1
        if "epoch_not_advanced" in faults:
            target = consumer_target(start_call * consumer_programs, consumer_programs, arrivals)
        else:
            target = consumer_target(ticket, consumer_programs, arrivals)
        k.signalled.add(index)  # the ticket is taken before the next kernel may launch
        yield "work"
        warps = []
        for w in range(consumer_warps):
            lo = min(inter, split * rows_per_split + w * rows_per_warp)
            hi = min(min(inter, (split + 1) * rows_per_split), lo + rows_per_warp)
            warps.append(warp(k, lo, hi, target))
        while warps:  # the program's warps run interleaved
            w = rng.randrange(len(warps))
            try:
                yield next(warps[w])
            except StopIteration:
                warps.pop(w)

    def warp(k: _Kernel, lo: int, hi: int, target: int) -> Iterator[str]:
        for s in warp_slices(lo, hi, slice_width):
            spins = 0
            while not is_reached(flags[s], target):
                if state["error"] is not None:
                    break
                spins += 1
                if spin_limit is not None and spins > spin_limit:
                    state["error"] = {"slice": s, "call": k.call, "flag_seen": flags[s], "target": target}
                    break
                yield "spin"
        for c in range(lo, hi):
            for tag in (gate[c], up[c]):
                if tag != start_call + k.call:
                    res.stale_reads.append((k.call, c, tag))
            yield "work"

    for e in range(calls):
        p = _Kernel("producer", e)
        p.programs = [producer(p, i, seg, b, r) for i, (seg, b, r) in enumerate(
            (seg, b, r) for seg in (0, 1) for b in range(n_slices) for r in range(producer_split))]
        c = _Kernel("consumer", e)
        c.programs = [consumer(c, i, b, s) for i, (b, s) in enumerate(
            (b, s) for b in range(consumer_blocks) for s in range(consumer_split))]
        kernels += [p, c]
    kernels[0].launched = True
    pending: list[tuple[int, _Kernel, Iterator[str]]] = [(0, kernels[0], g) for g in kernels[0].programs]
    running: list[tuple[_Kernel, Iterator[str]]] = []
    stalled = 0
    limit_stall = 20 * (slots + 1) * (consumer_warps + 1) * (spin_limit or 1000)
    while res.steps < max_steps:
        res.steps += 1
        # PDL's launch rule: kernel i + 1 launches once every program of kernel i triggered or exited (so every
        # one of them was placed); the "launch_early" fault launches it once the first program triggered
        for i, k in enumerate(kernels[:-1]):
            nxt = kernels[i + 1]
            if k.launched and not nxt.launched:
                ready = len(k.signalled) == len(k.programs)
                if ready or ("launch_early" in faults and nxt.kind == "consumer" and k.signalled):
                    nxt.launched = True
                    pending += [(i + 1, nxt, g) for g in nxt.programs]
        while pending and len(running) < slots:  # the block scheduler places launched programs on free slots
            if placement == "newest":
                newest = max(order for order, _, _ in pending)
                at = next(j for j, item in enumerate(pending) if item[0] == newest)
            else:
                at = rng.randrange(len(pending))
            _, k, g = pending.pop(at)
            k.started += 1
            running.append((k, g))
        if not running:
            break
        res.max_consumers_spinning = max(res.max_consumers_spinning,
                                         sum(1 for k, _ in running if k.kind == "consumer"))
        i = rng.randrange(len(running))
        k, prog = running[i]
        try:
            what = next(prog)
        except StopIteration:
            running.pop(i)
            k.exited += 1
            k.signalled.add(k.programs.index(prog))
            if k.kind == "consumer" and k.complete:
                res.calls_done += 1
            stalled = 0
            continue
        stalled = stalled + 1 if what in ("spin", "wait") else 0
        if stalled > limit_stall:  # nothing but waits for far longer than any bounded spin: stuck
            res.hang = True
            break
    else:
        res.hang = True
    if state["error"] is not None:
        res.error = state["error"]
    return res
