"""The CUDA sparse GEMV's per-stage timeline on the CPU: ``teal.bench.gemv_stages`` on stamps of known durations,
its monotonicity check on broken stamps, and benchmarks/scripts/gemv_stages_gpu.py's checks and tables with the
launch and the graph timing replaced by CPU stand-ins (the script itself needs a Hopper GPU; the STAMPS build's
compile is tested in test_kernels_cuda.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from teal.bench import gemv_stages
from teal.kernels import cuda

WARPS = 4


def _call_stamps(programs: int, base: int) -> torch.Tensor:
    """One call's stamps [programs, WARPS + 1, 5]: program p starts at base + 10 p; warp w waits 100 + w ns, lists
    200 ns, its first load is back 300 + 10 w ns later, its loop ends 1000 + 50 w ns after that; the program's
    warps meet 5 ns after the last loop end, then 40 / 60 / 80 ns for sums, cluster wait, split-K + store."""
    out = torch.zeros(programs, WARPS + 1, 5, dtype=torch.int64)
    for p in range(programs):
        for w in range(WARPS):
            start = base + 10 * p
            waited = start + 100 + w
            listed = waited + 200
            first = listed + 300 + 10 * w
            streamed = first + 1000 + 50 * w
            out[p, w] = torch.tensor([start, waited, listed, first, streamed])
        met = int(out[p, :WARPS, 4].max()) + 5
        out[p, WARPS] = torch.tensor([p % 3, met, met + 40, met + 100, met + 180])
    return out


EPOCH = 1_700_000_000_000_000_000  # %globaltimer counts ns since the epoch: far beyond float64's ns precision


def test_call_account_recovers_known_durations():
    programs = 6
    acct = gemv_stages.call_account(_call_stamps(programs, EPOCH))
    last = WARPS - 1
    expect = {"wait": 100 + last, "list": 200, "first load": 300 + 10 * last, "stream": 1000 + 50 * last,
              "warps meet": 5, "warp sums": 40, "cluster wait": 60, "split-K + store": 80}
    assert list(acct["stages"]) == list(expect)
    for name, ns in expect.items():  # the same in every program: median = p90 = max
        assert acct["stages"][name] == pytest.approx({"median_us": ns / 1e3, "p90_us": ns / 1e3, "max_us": ns / 1e3}), name
    program_ns = sum(expect.values())
    assert acct["program_us"]["median_us"] == pytest.approx(program_ns / 1e3)
    assert acct["warp_loop_end_spread"]["median_us"] == pytest.approx((1 + 10 + 50) * last / 1e3)  # warp w: 61 w later
    assert acct["start_spread_us"] == pytest.approx(10 * (programs - 1) / 1e3)
    # ends at 10 p + program_ns: the last is 10 (programs - 1) after the first, the median half of that
    assert acct["end_tail_us"] == pytest.approx(10 * (programs - 1) / 2 / 1e3)
    assert acct["span_us"] == pytest.approx((10 * (programs - 1) + program_ns) / 1e3)
    assert acct["programs"] == programs and acct["sms"] == 3 and acct["monotone_programs"] == programs


def test_sequence_account_measures_each_call_against_the_one_before():
    period = 2_000
    stamps = torch.stack([_call_stamps(5, EPOCH + c * period) for c in range(4)])
    acct = gemv_stages.sequence_account(stamps)
    assert acct["calls"] == 3 and acct["all_monotone"]
    m = acct["median"]
    assert m["period_us"] == pytest.approx(period / 1e3)
    one = gemv_stages.call_account(stamps[0])
    # a call's first start against the previous call's last end (here 8 ns before it: the calls overlap)
    assert m["first_start_after_previous_us"] == pytest.approx(period / 1e3 - one["span_us"]) == pytest.approx(-0.008)
    assert m["stages"]["stream"]["median_us"] == pytest.approx((1000 + 50 * (WARPS - 1)) / 1e3)
    assert acct["timer_step_ns"] == 1
    with pytest.raises(ValueError, match="calls >= 2"):
        gemv_stages.sequence_account(stamps[:1])


@pytest.mark.parametrize("break_it", ["unwritten", "first_sentinel", "swap", "late_warp", "program_order"])
def test_monotone_flags_a_broken_program(break_it):
    stamps = _call_stamps(4, EPOCH)
    assert gemv_stages.monotone(stamps).all()
    if break_it == "unwritten":  # a warp's start never written (the buffer's zero)
        stamps[2, 1, 0] = 0
    elif break_it == "first_sentinel":  # the first-load read's 0 (its word was 0xffffffff)
        stamps[2, 1, 3] = 0
    elif break_it == "swap":  # listed after the first load
        stamps[2, 1, 2], stamps[2, 1, 3] = stamps[2, 1, 3].clone(), stamps[2, 1, 2].clone()
    elif break_it == "late_warp":  # thread 0's own loop end after its own read past the barrier
        stamps[2, 0, 4] = stamps[2, WARPS, 1] + 1
    else:  # the cluster's sums ready before the warp sums
        stamps[2, WARPS, 3] = stamps[2, WARPS, 2] - 1
    assert gemv_stages.monotone(stamps).tolist() == [True, True, False, True]
    acct = gemv_stages.sequence_account(torch.stack([_call_stamps(4, EPOCH - 10_000), stamps]))
    assert not acct["all_monotone"]


def test_monotone_compares_only_one_threads_reads():
    """Another warp's loop end after thread 0's read past the barrier is timer skew across warps (H100: a
    median 1.18 µs), not a broken program; thread 0's own order is still checked (`late_warp` above)."""
    stamps = _call_stamps(4, EPOCH)
    stamps[2, WARPS - 1, 4] = stamps[2, WARPS, 1] + 1_000
    assert gemv_stages.monotone(stamps).all()


def test_stage_names_follow_the_kernel_fields():
    assert gemv_stages.WARP_FIELDS == cuda.STAMP_FIELDS["warp"] and gemv_stages.PROGRAM_FIELDS[0] == "sm"
    names = [*gemv_stages.WARP_FIELDS, *gemv_stages.PROGRAM_FIELDS[1:]]
    assert [(lo, hi) for _, lo, hi in gemv_stages.STAGES] == list(zip(names, names[1:]))  # contiguous, in order


# ---- the GPU script's glue, with CPU stand-ins --------------------------------------------------------------

def _script():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "scripts" / "gemv_stages_gpu.py"
    spec = importlib.util.spec_from_file_location("gemv_stages_gpu", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _fake_launch(stamped_output_off: bool):
    """A CPU stand-in for ``cuda.launch``: the masked product (fp32 sums, like the kernel) and, for a stamped
    call, the stamps of a 1-µs call after the previous one."""
    from teal.kernels.ops import silu_mul

    calls = [0]

    def launch(x, w_t, y, thresholds, col_scale, split_list, config, *, glu=False, pdl=0, stamps=None):
        mid = silu_mul(x) if glu else x
        masked = torch.where(mid.abs().float() > thresholds[0], mid.float(), 0.0)
        y.copy_((masked @ w_t.float()).to(y.dtype))
        if stamps is not None:
            if stamped_output_off:
                y.add_(1.0)
            calls[0] += 1
            base = EPOCH + 1_000 * calls[0]
            warps = stamps.shape[1] - 1
            stamps[:, :warps] = torch.tensor([0, 50, 150, 400, 800]) + base
            stamps[:, warps] = torch.tensor([0, 810, 830, 850, 900]) + base
            stamps[:, warps, 0] = 7

    return launch


@pytest.mark.parametrize("stamped_output_off", [False, True])
def test_gpu_script_checks_and_tables_with_cpu_stand_ins(monkeypatch, tmp_path, capsys, stamped_output_off):
    from teal.kernels import tune

    script = _script()
    monkeypatch.setattr(cuda, "launch", _fake_launch(stamped_output_off))
    monkeypatch.setattr(cuda, "unsupported_reason", lambda *args: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)

    def time_calls(calls, **kwargs):
        for call in calls:
            call()
        return 3.0

    monkeypatch.setattr(tune, "time_graph_us", time_calls)
    gen = torch.Generator().manual_seed(0)
    k, splits = 512, (64,)
    ws = [(torch.randn(k, sum(splits), generator=gen) * k**-0.5).to(torch.bfloat16) for _ in range(2)]
    row = script.measure("down", k, splits, 0.5, ws, 2, 4, gen)
    script.derive(row, copy_bw=1e12)
    assert row["glu"] and row["calls"] == 4 and row["programs"] * (row["warps"] + 1) > 0
    assert row["measured_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert row["checks"]["rel_err"] < 1e-2 and row["checks"]["eager_stamps_monotone"]
    assert row["checks"]["stamps_equal_default"] is (not stamped_output_off)
    assert row["checks"]["ok"] is (not stamped_output_off)
    acct = row["account"]
    assert acct["all_monotone"] and acct["calls"] == 3
    assert acct["median"]["period_us"] == pytest.approx(1.0) and acct["median"]["span_us"] == pytest.approx(0.9)
    assert row["model_us"] == pytest.approx(0.5 * k * 64 * 2 / 1e12 * 1e6, rel=0.05)
    assert row["excess_us"] == pytest.approx(3.0 - row["model_us"]) and row["stamps_overhead"] == pytest.approx(0.0)
    script.print_tables([row], "title")
    out = capsys.readouterr().out
    assert "down" in out and ("FAILED" in out) is stamped_output_off


def test_gpu_script_refuses_bad_arguments_and_a_missing_gpu(capsys):
    script = _script()
    with pytest.raises(SystemExit):
        script.parse_args(["--json", "x.json", "--sparsities", "0,1.5"])
    with pytest.raises(SystemExit):
        script.parse_args(["--json", "x.json", "--projections", "qkv,lm_head"])
    args = script.parse_args(["--json", "x.json", "--sparsities", "0,0.5,0.9", "--pdl", "1"])
    assert args.sparsities == [0.0, 0.5, 0.9] and args.pdl == 1 and args.projections == list(script.PROJECTIONS)
    if not torch.cuda.is_available():
        assert script.main(["--json", "x.json"]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err
