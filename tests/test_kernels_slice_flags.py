"""Per-slice flags between gate|up and down (teal/kernels/slice_flags.py, ``SLICE_FLAGS`` in sparse_gemv.cu).

CPU: the protocol simulated (random interleavings, fewer SM slots than programs, PDL's launch rule, several
calls back to back as graph replays, the 32-bit wrap), and each deliberate break of it caught: a flag
released before the data, an epoch that does not advance, a producer that skips its wait, a naive compare at
the wrap (stale reads); a missing release (reported by the bounded spin, a hang without it); a consumer
launched before all producer programs started (the deadlock the launch rule prevents). The buffer's layout
against the kernel source. The sm_90 compile and SASS checks are in test_kernels_cuda.py; the kernels
themselves in tests/gpu/test_slice_flags_gpu.py.
"""

from __future__ import annotations

import re

import pytest
import torch

from teal.kernels import cuda
from teal.kernels import slice_flags as S
from teal.kernels.configs import KernelConfig

SEEDS = range(4)


@pytest.mark.parametrize("slots,trigger,placement", [(3, "start", "random"), (6, "end", "random"),
                                                     (4, "start", "newest"), (64, "start", "random")])
def test_protocol_delivers_each_call_its_own_data(slots, trigger, placement):
    """Four calls back to back, one flag buffer, nothing reset: every consumer warp reads only its call's
    values, no wait times out, nothing hangs, whether all programs fit at once (64 slots) or come in waves
    (3 slots: fewer than either kernel's programs), with unbounded waits too."""
    for seed in SEEDS:
        for spin_limit in (200, None):
            res = S.simulate(slots=slots, producer_trigger=trigger, placement=placement, seed=seed,
                             spin_limit=spin_limit, calls=4)
            assert res.ok and res.calls_done == 4, (seed, spin_limit, res.stale_reads[:4], res.error, res.hang)


def test_protocol_across_the_32_bit_wrap():
    """Starting one call before the targets wrap to 0 (2^32 / arrivals earlier calls), the wrap-safe compare
    keeps the protocol whole; a naive ``flag >= target`` reads stale data there."""
    start = S.MASK32 // S.arrivals_per_slice(2)
    for seed in SEEDS:
        assert S.simulate(start_call=start, seed=seed).ok
    broken = [S.simulate(start_call=start, seed=seed, faults=["naive_compare"]) for seed in SEEDS]
    assert any(r.stale_reads for r in broken)


@pytest.mark.parametrize("fault", ["release_before_data", "epoch_not_advanced", "producer_skips_wait"])
def test_broken_protocols_read_stale_data(fault):
    results = [S.simulate(seed=seed, faults=[fault]) for seed in SEEDS]
    assert any(r.stale_reads for r in results), fault
    assert not any(r.hang for r in results)


def test_missing_release_is_reported_not_hung():
    """One producer program of the last call never releases: the bounded spin reports the slice and the
    target it waited for, and the run ends; with unbounded waits the same run hangs."""
    res = S.simulate(faults=["missing_release"], calls=3)
    assert not res.hang and res.error is not None
    assert res.error["slice"] == 0 and res.error["call"] == 2
    assert res.error["target"] == S.consumer_target(2 * 6, 6, 4) and res.error["flag_seen"] == res.error["target"] - 1
    assert S.simulate(faults=["missing_release"], calls=3, spin_limit=None, max_steps=60_000).hang


def test_consumer_launched_before_its_producer_is_placed_deadlocks():
    """The deadlock PDL's launch rule rules out: with 4 SM slots and the newest kernel's programs placed first,
    consumers that launch once the first producer program triggered fill the slots and spin on slices whose
    producers are never placed: a reported timeout with the spin bound, a hang without it. The same schedule
    under the real rule completes (the test above)."""
    for seed in SEEDS:
        bounded = S.simulate(slots=4, placement="newest", faults=["launch_early"], seed=seed)
        assert bounded.error is not None and not bounded.hang and bounded.max_consumers_spinning == 4
        assert S.simulate(slots=4, placement="newest", faults=["launch_early"], seed=seed, spin_limit=None,
                          max_steps=60_000).hang
        assert S.simulate(slots=4, placement="newest", seed=seed, spin_limit=None).ok


def test_targets_and_slices():
    assert S.consumer_target(0, 128, 2) == 2 and S.consumer_target(127, 128, 2) == 2
    assert S.consumer_target(128, 128, 2) == 4
    assert S.consumer_target((2**31 - 1) * 128, 128, 2) == 0  # call 2^31 - 1 waits for 2^32 = 0 (mod 2^32)
    assert S.reached(0, 0) and S.reached(5, 4) and not S.reached(3, 4)
    assert not S.reached(2**32 - 2, 0) and S.reached(0, 2**32 - 2)  # across the wrap
    assert list(S.warp_slices(0, 224, 256)) == [0]
    assert list(S.warp_slices(224, 448, 256)) == [0, 1]
    assert list(S.warp_slices(300, 300, 256)) == []


def test_buffer_layout_matches_the_kernel_source():
    src = cuda.source()
    for name, value in (("SF_TICKET", S.TICKET_WORD), ("SF_ERROR", S.ERROR_WORD), ("SF_FLAGS", S.FLAGS_WORD)):
        assert re.search(rf"#define {name} {value}\b", src), name
    assert S.FLAGS_WORD * 4 % 128 == 0 and (S.ERROR_WORD + 6) <= S.FLAGS_WORD  # flags on their own lines


def test_slice_flags_buffer_and_error_report():
    producer = KernelConfig(block_n=256, block_r=8, split_k=2, num_warps=8, cuda=True)
    flags = S.SliceFlags(1000, producer, torch.bfloat16, torch.device("cpu"), spin_limit=500)
    assert (flags.slice_width, flags.slices, flags.arrivals) == (256, 4, 4)
    assert flags.buffer.numel() == S.FLAGS_WORD + 4 and flags.error() is None
    args = flags.launch_args(2)
    assert (args.role, args.slice_width, args.arrivals, args.spin_limit) == (2, 256, 4, 500)
    flags.buffer[S.ERROR_WORD : S.ERROR_WORD + 6] = torch.tensor([1, 3, 17, 5, -1, 8], dtype=torch.int32)
    assert flags.error() == {"slice": 3, "program": 17, "warp": 5, "flag_seen": 2**32 - 1, "target": 8}
    flags.reset()
    assert flags.error() is None and int(flags.buffer.abs().sum()) == 0
    with pytest.raises(ValueError, match="spin_limit"):
        S.SliceFlags(1000, producer, torch.bfloat16, torch.device("cpu"), spin_limit=0)


def test_pair_problem_names_what_is_wrong():
    producer = KernelConfig(block_n=256, block_r=8, split_k=2, num_warps=8, cuda=True)
    consumer = KernelConfig(block_n=256, block_r=8, split_k=4, num_warps=8, cuda=True)
    flags = S.SliceFlags(64, producer, torch.bfloat16, torch.device("cpu"))
    h = torch.zeros(1, 32, dtype=torch.bfloat16)
    w_gu = torch.zeros(32, 128, dtype=torch.bfloat16)
    w_d = torch.zeros(64, 16, dtype=torch.bfloat16)
    assert "one input row" in S.pair_problem(torch.zeros(2, 32, dtype=torch.bfloat16), w_gu, w_d, producer,
                                             consumer, flags)
    assert "[H, 2I]" in S.pair_problem(h, w_gu, torch.zeros(48, 16, dtype=torch.bfloat16), producer, consumer, flags)
    other = KernelConfig(block_n=512, block_r=8, split_k=2, num_warps=8, cuda=True)
    assert "another producer" in S.pair_problem(h, w_gu, w_d, other, consumer, flags)
    assert "CUDA tensors" in S.pair_problem(h, w_gu, w_d, producer, consumer, flags)


def test_simulate_rejects_unknown_faults():
    with pytest.raises(ValueError, match="unknown faults"):
        S.simulate(faults=["no_such_fault"])
