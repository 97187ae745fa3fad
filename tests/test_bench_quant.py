"""`--weights` on `teal bench decode`, `teal bench kernels` and `teal serve` (CPU): option parsing, the decode
benchmark's quantized rows and their `weights` field, its correctness check against float64 (which a broken
kernel fails), the torchao row's one-line failure, and the quantized kernel bench's check row."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import types

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported (the kernels' check on the CPU)

import pytest
import torch
from typer.testing import CliRunner

from teal.cli import app

runner = CliRunner()


def _plain(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"\x1b\[[0-9;]*m", "", text).replace("│", " "))


def _no_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the command would run past parsing")


# ------------------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize("args, message", [
    (["--weights", "int4,fp8"], "--weights takes a comma list of bf16, int8, int4"),
    (["--weights", "int4", "--group-size", "48"], "the int4 group size must be one of 32, 64, 128"),
    (["--weights", "bf16,int4", "--tp", "2"], "quantized weights are not supported with --tp"),
    (["--weights", "bf16,int4,int8", "--group-size", "64", "--no-torchao"], "runs on a CUDA GPU"),  # parsed
])
def test_bench_decode_weights_option_parses_alike_through_both_entry_points(args, message, capsys):
    from teal.bench.entry import run_module

    _no_gpu()
    result = runner.invoke(app, ["bench", "decode", *args])
    assert result.exit_code == 2 and message in _plain(result.output), result.output
    with pytest.raises(SystemExit) as exit_info:
        run_module("decode", args)
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and message in _plain(captured.out + captured.err)


@pytest.mark.parametrize("args, message", [
    (["--weights", "int3"], "--weights takes a comma list of bf16, int8, int4"),
    (["--weights", "int4", "--group-size", "100"], "the int4 group size must be one of 32, 64, 128"),
    (["--weights", "int8,int4", "--group-size", "32"], "runs on a CUDA GPU"),  # parsed
    (["--weights", "int4", "--quant-kernels", "cuda-mma"], "--quant-kernels takes a comma list of cuda, triton"),
    (["--weights", "int4", "--quant-kernels", "cuda,triton"], "runs on a CUDA GPU"),  # parsed
    (["--weights", "int4", "--quant-configs", "tune"], "--quant-configs takes default or sweep"),
    (["--quant-configs", "sweep"], "--quant-configs sweep times the quantized kernel: add int8 or int4"),
    (["--weights", "int4", "--quant-configs", "sweep", "--tune", "--table-out", "t.json"],
     "--table-out takes one table: drop --tune or --quant-configs sweep"),
    (["--weights", "int8,int4", "--quant-configs", "sweep"], "runs on a CUDA GPU"),  # parsed
])
def test_bench_kernels_weights_option(args, message):
    _no_gpu()
    result = runner.invoke(app, ["bench", "kernels", *args])
    assert result.exit_code == 2 and message in _plain(result.output), result.output


def test_bench_decode_weights_reach_the_benchmark(monkeypatch):
    """The parsed formats, group size and torchao switch are what `decode.run` receives."""
    from teal.bench import decode

    seen = {}
    monkeypatch.setattr(decode, "run", lambda **kw: seen.update(kw))
    result = runner.invoke(app, ["bench", "decode", "--device", "cpu", "--shape", "tiny-llama", "--weights",
                                 "int4,bf16", "--group-size", "64", "--no-torchao"])
    assert result.exit_code == 0, result.output
    assert seen["weights"] == ["int4", "bf16"] and seen["group_size"] == 64 and seen["torchao"] is False


def test_serve_weights_option_reaches_the_engine(monkeypatch):
    """`teal serve --weights int8` builds the served generator with int8 projections (and the model card says so)."""
    import teal.serve
    from teal.serve import build_served

    built = {}

    def fake_build(model, artifact, sparsity, method, **kw):
        built.update(kw)
        return build_served("tiny-llama", None, 0.0, None, max_seq_len=32, device="cpu", dtype=torch.float32,
                            weights=kw["weights"], group_size=kw["group_size"])

    monkeypatch.setattr(teal.serve, "build_served", fake_build)
    monkeypatch.setattr(teal.serve, "serve", lambda served, **kw: built.update(served=served))
    result = runner.invoke(app, ["serve", "tiny-llama", "--weights", "int4", "--group-size", "32", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert built["weights"] == "int4" and built["group_size"] == 32
    engine = built["served"].generator.engine
    assert engine.weight_format == "int4" and engine.group_size == 32
    assert "int4 weights" in _plain(result.output)
    bad = runner.invoke(app, ["serve", "tiny-llama", "--weights", "int2"])
    assert bad.exit_code == 2 and "int2" in _plain(bad.output)


# ------------------------------------------------------------------------------ decode benchmark
def _tiny_engine(weights: str = "int4"):
    from teal.engine import engine_random

    engine = engine_random("tiny-llama", dtype=torch.float32, device="cpu", max_seq_len=128)
    engine.quantize_weights(weights, 32)
    return engine


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_quantized_check_passes_and_fails_on_a_broken_kernel(weights, monkeypatch):
    from teal.bench.quant_decode import check_quantized
    from teal.engine import projection

    engine = _tiny_engine(weights)
    good = check_quantized(engine, steps=16)
    assert good["passed"], good
    assert good["projections"]["max_rel_err"] <= 1e-2 and good["decode"]["sparse"]["top1_agreement"] >= 0.9
    assert good["decode"]["sparse"]["torch_float32_products"]["median_rel_err"] < 1e-3, good["decode"]
    for part in ("dense", "sparse"):  # every product of the kernels' run beside its float32 torch product
        assert good["decode"][part]["products"]["passed"] and good["decode"][part]["products"]["calls"] > 16

    kernel = projection.quant_sparse_linear
    broken = {
        "zeros": lambda x, qw, t, splits, cs=None: torch.zeros_like(kernel(x, qw, t, splits, cs)),
        "last segment dropped": lambda x, qw, t, splits, cs=None: torch.cat(
            [kernel(x, qw, t, splits, cs)[:, :-splits[-1]], torch.zeros(x.shape[0], splits[-1], dtype=x.dtype)], 1),
        "threshold ignored": lambda x, qw, t, splits, cs=None: kernel(x, qw, None, splits, cs),
    }
    for name, fn in broken.items():
        monkeypatch.setattr(projection, "quant_sparse_linear", fn)
        bad = check_quantized(engine, steps=16)
        assert not bad["passed"] and not bad["projections"]["passed"], name
        # the decode steps alone catch each one too, on the sparse steps beside float32 torch products, and on the
        # dense steps where the fault touches them
        assert not bad["decode"]["sparse"]["passed"], (name, bad["decode"])
        assert bad["decode"]["dense"]["passed"] == (name == "threshold ignored"), (name, bad["decode"]["dense"])
        assert not bad["decode"]["sparse"]["products"]["passed"], (name, bad["decode"]["sparse"]["products"])
        monkeypatch.setattr(projection, "quant_sparse_linear", kernel)


def test_float32_products_can_leave_the_prefill_to_the_engines_path(monkeypatch):
    """`torch_quant_products(max_rows=8)` replaces the decode steps' products only: a 9-row call (a prefill)
    runs what the engine would run, a 1-row call the float32 reference."""
    from teal.bench.quant_decode import torch_quant_products
    from teal.engine import projection
    from teal.quant import quantize

    qw = quantize(torch.randn(64, 48), "int8")
    seen = []
    monkeypatch.setattr(projection, "quant_sparse_linear", lambda x, *a, **k: seen.append(x.shape[0]) or x[:, :48] * 0)
    with torch_quant_products(torch.float32, max_rows=8):
        big = projection.quant_sparse_linear(torch.randn(9, 64), qw, None, [48])
        one = projection.quant_sparse_linear(torch.randn(1, 64), qw, None, [48])
    assert seen == [9] and bool((big == 0).all()) and float(one.abs().sum()) > 0
    with torch_quant_products(torch.float32):
        projection.quant_sparse_linear(torch.randn(9, 64), qw, None, [48])
    assert seen == [9]


def test_decode_check_references_share_the_engines_prefill(monkeypatch):
    """Every torch-product run of `check_decode` (the float64 reference and the float32 floor) replaces only
    the decode steps' products, so that the runs differ in the decode kernels alone: a float64 prefill in the
    reference moved the KV cache enough to fail the dense top-1 bound on an H100 with correct kernels."""
    from teal.bench import quant_decode
    from teal.kernels import quant_gemv

    entered = []
    original = quant_decode.torch_quant_products

    def recording(compute_dtype=torch.float64, max_rows=None):
        entered.append((compute_dtype, max_rows))
        return original(compute_dtype, max_rows=max_rows)

    monkeypatch.setattr(quant_decode, "torch_quant_products", recording)
    res = quant_decode.check_decode(_tiny_engine("int4"), "int4", 32, steps=8)
    assert res["passed"], res
    assert (torch.float64, quant_gemv.MAX_BATCH) in entered and (torch.float32, quant_gemv.MAX_BATCH) in entered
    assert all(rows == quant_gemv.MAX_BATCH for _, rows in entered), entered


def test_decode_check_twin_takes_the_engines_quant_method(monkeypatch):
    """`check_quantized` on an hqq engine quantizes its shallow twin by hqq too (the codes being timed): the
    twin's codes are the hqq codes of its own weights, which differ from their rtn codes."""
    pytest.importorskip("hqq", reason="the hqq package (extra [quant]) provides --quant-method hqq")
    from teal.bench.quant_decode import check_quantized
    from teal.engine import engine_random
    from teal.engine.model import Engine
    from teal.quant import quantize

    engine = engine_random("tiny-llama", dtype=torch.float32, device="cpu", max_seq_len=128)
    engine.quantize_weights("int4", 32, "hqq")
    assert engine.quant_method == "hqq"
    original, twins = Engine.quantize_weights, []

    def spy(self, weights, group_size=128, method="rtn"):
        self.to_layout(True)  # as quantize_weights does first: the [K, N] weight the codes are of
        w = self.layers[0].qkv.clone()
        original(self, weights, group_size, method)
        twins.append((self, w))

    monkeypatch.setattr(Engine, "quantize_weights", spy)
    res = check_quantized(engine, steps=8)
    assert res["passed"], res
    (twin, w), = twins
    assert (twin.weight_format, twin.group_size, twin.quant_method) == ("int4", 32, "hqq")
    hqq, rtn = quantize(w, "int4", 32, "hqq"), quantize(w, "int4", 32, "rtn")
    assert torch.equal(twin.layers[0].qkv, hqq.codes) and not torch.equal(hqq.codes, rtn.codes)
    assert torch.equal(twin.quant_params[0]["qkv"][0], hqq.scales)


def test_bench_decode_quantized_rows_carry_weights_and_their_bytes(tmp_path, monkeypatch):
    from teal.bench import decode

    for var in ("TEAL_QUANT_KERNEL", "TEAL_QUANT_LARGE_BATCH"):  # the defaults, in the JSON
        monkeypatch.delenv(var, raising=False)

    path = tmp_path / "decode.json"
    data = decode.run(shape="tiny-llama", sparsities=(0.5,), prompt_len=16, new_tokens=4, repeats=1, json_path=path,
                      hf_baselines=False, device="cpu", dtype=torch.float32, log=lambda _: None,
                      weights=("bf16", "int4"), group_size=32, profile=False, time_budget_s=1e6)
    assert not data["errors"], data["errors"]
    saved = json.loads(path.read_text())
    rows = saved["results"] + saved["dense_variants"]
    assert rows and all(r["weights"] in ("bf16", "int8", "int4") for r in rows)
    assert saved["weights"] == ["bf16", "int4"]
    for fmt in ("int4",):
        assert saved["checks"][f"quant_{fmt}"]["passed"]
        mine = {r["sparsity"]: r for r in saved["results"] if r["weights"] == fmt}
        assert set(mine) == {0.0, 0.5}
        assert 0.4 < mine[0.5]["measured_sparsity"] < 0.6
        assert mine[0.5]["bytes_per_token"] < mine[0.0]["bytes_per_token"]
        assert mine[0.5]["speedup_vs_dense"] == pytest.approx(mine[0.5]["tokens_per_s"] / mine[0.0]["tokens_per_s"])
        # the CPU's paths, counted per timed row: the 16-token prefill's products above 8 rows, decode's below
        assert set(mine[0.5]["quant_kernel_calls"]) == {"dequant-matmul", "reference"}
        for r in mine.values():  # one prefill: every projection group of every layer on the large-batch path
            assert list(r["prefill_quant_kernel_calls"]) == ["dequant-matmul"]
            assert r["prefill_quant_kernel_calls"]["dequant-matmul"] % 4 == 0, r["prefill_quant_kernel_calls"]
    assert saved["quant_dispatch"] == {"TEAL_QUANT_KERNEL": "auto", "TEAL_QUANT_LARGE_BATCH": "dequant-matmul"}
    bf16 = next(r for r in saved["results"] if r["weights"] == "bf16" and r["sparsity"] == 0)
    i4 = next(r for r in saved["results"] if r["weights"] == "int4" and r["sparsity"] == 0)
    assert i4["bytes_per_token"] < bf16["bytes_per_token"]
    assert {"int4_sparse50_vs_int4_dense", "int4_sparse50_vs_bf16_dense", "int4_dense_frac_roofline"} <= set(
        saved["targets"])
    # the bf16 targets still use only the bf16 rows
    best = max(r["tokens_per_s"] for r in saved["results"] if r["weights"] == "bf16" and r["sparsity"] == 0.5
               and r["op"] == "kernel")
    assert saved["targets"]["sparse50_vs_dense"]["value"] == pytest.approx(best / saved["dense_best"]["tokens_per_s"])


def test_quantized_bytes_per_token_counts_codes_scales_zeros_and_bf16_rest():
    from teal.bench.timing import bytes_per_token
    from teal.engine import engine_random

    bf16 = engine_random("tiny-llama", dtype=torch.float32, device="cpu", max_seq_len=64)
    int4 = _tiny_engine("int4")
    cfg = bf16.config
    shapes = cfg.projection_shapes()
    item = 4
    rest = bytes_per_token(bf16, None, 0) - sum(k * n * item for k, n in shapes.values()) * cfg.n_layers
    expected = rest + cfg.n_layers * sum(k * n / 2 + 2 * -(-k // 32) * n * item for k, n in shapes.values())
    assert bytes_per_token(int4, None, 0) == pytest.approx(expected)
    half = {f"layers.{i}.{p}": 0.5 for i in range(cfg.n_layers) for p in shapes}
    codes = cfg.n_layers * sum(k * n / 2 for k, n in shapes.values())
    assert bytes_per_token(int4, half, 0) == pytest.approx(expected - codes / 2)
    int8 = _tiny_engine("int8")
    expected8 = rest + cfg.n_layers * sum(k * n + n * item for k, n in shapes.values())
    assert bytes_per_token(int8, None, 0) == pytest.approx(expected8)


def test_torchao_row_records_a_missing_package_and_a_failure_in_one_line(monkeypatch):
    from teal.bench.quant_decode import torchao_decode_rate

    ids = torch.arange(4)
    monkeypatch.setitem(sys.modules, "torchao", None)
    row = torchao_decode_rate(torch.nn.Linear(2, 2), "int4", ids, 4, 1)
    assert row["weights"] == "int4" and "torchao is not importable" in row["skipped"] and "tokens_per_s" not in row

    fake = types.ModuleType("torchao")
    fake.__version__ = "0.18.0"
    quantization = types.ModuleType("torchao.quantization")

    def fail(model, config, filter_fn=None):
        raise RuntimeError("plain int4 needs mslk >= 1.0\nsecond line")

    quantization.quantize_ = fail
    quantization.Int4WeightOnlyConfig = lambda **kw: ("int4", kw)
    quantization.Int8WeightOnlyConfig = lambda **kw: ("int8", kw)
    fake.quantization = quantization
    monkeypatch.setitem(sys.modules, "torchao", fake)
    monkeypatch.setitem(sys.modules, "torchao.quantization", quantization)
    row = torchao_decode_rate(torch.nn.Linear(2, 2), "int8", ids, 4, 1)
    assert row["error"] == "RuntimeError: plain int4 needs mslk >= 1.0" and row["torchao"] == "0.18.0"
    assert row["config"] == "Int8WeightOnlyConfig()" and "tokens_per_s" not in row


def test_torchao_int4_config_takes_the_runs_group_size(monkeypatch):
    """torchao's int4 baseline is built at the run's group size (32, 64 or 128), and the row's `config` text
    names what was built; `run_quantized` passes its group size on."""
    from teal.bench import quant_decode

    assert quant_decode.torchao_config("int4", 64) == ("Int4WeightOnlyConfig", {
        "group_size": 64, "int4_packing_format": "tile_packed_to_4d"})
    assert quant_decode.torchao_config_text("int4", 128) == (
        "Int4WeightOnlyConfig(group_size=128, int4_packing_format='tile_packed_to_4d')")
    assert quant_decode.torchao_config_text("int8", 32) == "Int8WeightOnlyConfig()"
    with pytest.raises(ValueError, match="group size must be one of"):
        quant_decode.torchao_config("int4", 48)

    built = []
    fake = types.ModuleType("torchao")
    fake.__version__ = "0.18.0"
    quantization = types.ModuleType("torchao.quantization")
    quantization.quantize_ = lambda model, config, filter_fn=None: built.append(config)
    quantization.Int4WeightOnlyConfig = lambda **kw: ("int4", kw)
    quantization.Int8WeightOnlyConfig = lambda **kw: ("int8", kw)
    fake.quantization = quantization
    monkeypatch.setitem(sys.modules, "torchao", fake)
    monkeypatch.setitem(sys.modules, "torchao.quantization", quantization)
    monkeypatch.setattr(quant_decode, "hf_decode_rate", lambda *a: {"tokens_per_s": 1.0})
    for group in (32, 64, 128):
        row = quant_decode.torchao_decode_rate(torch.nn.Linear(2, 2), "int4", torch.arange(4), 4, 1, group)
        assert built[-1] == ("int4", {"group_size": group, "int4_packing_format": "tile_packed_to_4d"})
        assert row["config"] == quant_decode.torchao_config_text("int4", group) and row["group_size"] == group
        assert f"group_size={group}," in row["config"]

    seen = []
    monkeypatch.setattr(quant_decode, "torchao_decode_rate", lambda hf, w, ids, n, r, g=128: seen.append((w, g)) or {})
    monkeypatch.setattr(quant_decode, "check_quantized", lambda engine, source: {"passed": False})
    from teal.engine.loading import engine_random

    data = {"checks": {}, "errors": [], "results": [], "baselines": {}, "model_info": {}}
    quant_decode.run_quantized(
        data, "int4", 64, lambda: engine_random("tiny-llama", dtype=torch.float32, device="cpu", max_seq_len=64),
        lambda engine: None, lambda: None, torch.arange(1, 9), (0.5,), ("eager",), 2, 1, 1e12, 16.0, None, True,
        float("inf"), lambda name, fn: fn(), log=lambda _: None)
    assert seen == [("int4", 64)]


def test_quant_targets_met_and_missed():
    from teal.bench.quant_decode import quant_targets

    def row(fmt, s, tps, frac=0.5):
        return {"weights": fmt, "sparsity": s, "tokens_per_s": tps, "frac_of_roofline": frac}

    data = {"results": [row("int4", 0.0, 300.0, 0.85), row("int4", 0.5, 450.0), row("int8", 0.0, 200.0),
                        row("int8", 0.5, 360.0)],
            "baselines": {"torchao_int4_hf_static": {"tokens_per_s": 120.0}}, "dense_best": {"tokens_per_s": 200.0},
            "device": "NVIDIA H100 80GB HBM3", "model": "random:llama-3-8b"}
    t = quant_targets(data)
    assert t["int4_dense_frac_roofline"]["met"] and t["int4_dense_vs_torchao_int4"]["value"] == 2.5
    assert t["int4_dense_vs_gpt_fast_h100"]["met"]  # 300 > 241
    assert not t["int4_sparse50_vs_int4_dense"]["met"]  # 1.5 < 1.6
    assert t["int8_sparse50_vs_int8_dense"]["met"]  # 1.8
    assert not t["int4_sparse50_vs_bf16_dense"]["met"]  # 2.25 < 2.8


# ----------------------------------------------------------------------------- kernel benchmark
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the Triton kernel runs on CPU only under "
                                                                     "TRITON_INTERPRET=1")
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_kernel_bench_check_row_passes_and_fails_on_a_broken_kernel(fmt):
    from teal.bench.quant_kernels import check_row
    from teal.kernels.quant_gemv import quant_sparse_linear_triton
    from teal.quant import quantize

    torch.manual_seed(0)
    splits = (48, 16, 16)
    qw = quantize(torch.randn(96, 80).to(torch.bfloat16), fmt, 32)
    assert check_row(qw, splits, 2, 0.5, torch.bfloat16)["ok"]
    zeros = lambda x, q, t, s: torch.zeros(x.shape[0], sum(s), dtype=x.dtype)  # noqa: E731
    assert not check_row(qw, splits, 2, 0.5, torch.bfloat16, kernel=zeros)["ok"]

    def nan(x, q, t, s):
        y = quant_sparse_linear_triton(x, q, t, s)
        y[0, 0] = float("nan")
        return y

    bad = check_row(qw, splits, 2, 0.5, torch.bfloat16, kernel=nan)
    assert not bad["ok"] and not bad["finite"]


def test_bench_cli_weight_choices_match_teal_quant():
    from teal import quant
    from teal.bench import cli

    assert cli.WEIGHT_FORMATS == quant.WEIGHT_FORMATS and cli.INT4_GROUP_SIZES == quant.INT4_GROUP_SIZES


def test_kernel_bench_rows_are_cuda_then_triton():
    """One CUDA row per format where the device runs the CUDA kernel, then Triton; without it only Triton."""
    from teal.bench.quant_kernels import kernels_for
    from teal.kernels.quant_gemv import quant_sparse_linear_cuda, quant_sparse_linear_triton

    assert kernels_for(True) == [("cuda", quant_sparse_linear_cuda), ("triton", quant_sparse_linear_triton)]
    assert kernels_for(False) == [("triton", quant_sparse_linear_triton)]


def test_quant_kernel_selection():
    """`--quant-kernels` picks rows by name, None every row."""
    from teal.bench.quant_kernels import kernels_for, selected

    rows = kernels_for(True)
    assert selected(rows, None) == rows
    assert [n for n, _ in selected(rows, ["cuda"])] == ["cuda"]
    assert [n for n, _ in selected(rows, ["triton"])] == ["triton"]
    assert selected(kernels_for(False), ["cuda"]) == []


def test_bench_kernels_run_keeps_its_arguments():
    """`teal.bench.kernels.run` reads `weights` after its bf16 loop (which formats are quantized): a local in
    that loop that rebound the parameter made a bf16-only run treat every weight row as a format and crash.
    No parameter is rebound inside a loop (normalising one up front, `masks = list(masks)`, is fine)."""
    import ast
    import inspect
    import textwrap

    from teal.bench import kernels

    fn = ast.parse(textwrap.dedent(inspect.getsource(kernels.run))).body[0]
    params = {a.arg for a in fn.args.args + fn.args.kwonlyargs}
    rebound = sorted({t.id for loop in ast.walk(fn) if isinstance(loop, (ast.For, ast.While))
                      for stmt in loop.body for t in ast.walk(stmt)
                      if isinstance(t, ast.Name) and isinstance(t.ctx, ast.Store) and t.id in params})
    assert rebound == [], f"kernels.run rebinds its parameters {rebound} inside a loop"


def test_quantized_check_is_recorded_before_its_phase_saves(monkeypatch):
    """The quantized check's result is in ``data["checks"]`` when its phase saves the JSON (a phase saves in its
    ``finally``), so a run killed in a later phase keeps why a format was not timed (an H200 run lost it)."""
    import copy

    from teal.bench import quant_decode
    from teal.engine.loading import engine_random

    monkeypatch.setattr(quant_decode, "check_quantized", lambda engine, source: {"passed": False, "why": "marker"})
    data = {"checks": {}, "errors": [], "results": [], "baselines": {}, "model_info": {}}
    saved = []

    def phase(name, fn):  # as teal.bench.decode's: the JSON is written once the phase ends, whatever it returned
        try:
            return fn()
        finally:
            saved.append((name, copy.deepcopy(data["checks"])))

    quant_decode.run_quantized(
        data, "int4", 32, lambda: engine_random("tiny-llama", dtype=torch.float32, device="cpu", max_seq_len=64),
        lambda engine: None, lambda: None, torch.arange(1, 9), (0.5,), ("eager",), 2, 1, 1e12, 16.0, None, False,
        float("inf"), phase, log=lambda _: None)
    name, checks = saved[-1]
    assert name.startswith("check int4") and checks["quant_int4"]["why"] == "marker", saved
    assert any("int4" in e for e in data["errors"])


def test_dense_twin_rule_takes_near_ties_from_the_float32_products():
    """The dense twin passes at 0.9 top-1 agreement, or below it where the float32 torch products agree as little
    (a near tie flips under any rounding), never with a median error above 0.03, a failed product bound or NaN."""
    from teal.bench.quant_decode import dense_twin_passed

    ok = {"finite": True, "top1_agreement": 0.9, "median_rel_err": 0.013, "products": {"passed": True}}
    floor = {"top1_agreement": 0.92, "median_rel_err": 0.012}
    assert dense_twin_passed(ok, floor)
    near_tie = {**ok, "top1_agreement": 43 / 48}
    assert not dense_twin_passed(near_tie, {**floor, "top1_agreement": 1.0})  # no near tie flips without kernels
    assert dense_twin_passed(near_tie, floor)  # the float32 products flip ties too: within 0.1 of them
    assert not dense_twin_passed({**ok, "top1_agreement": 0.75}, {**floor, "top1_agreement": 0.9})
    for bad in ({"median_rel_err": 0.031}, {"products": {"passed": False}}, {"finite": False}):
        assert not dense_twin_passed({**ok, **bad}, {**floor, "top1_agreement": 0.5}), bad


def test_quant_config_table_and_candidates():
    """`quant_cuda_config` takes a `TUNED_QUANT_CUDA` entry of its (K, N, batch bucket, format), else the
    heuristic; the sweep's candidates cover 256 and 512 columns, 4, 8 and 16 warps and clusters of 1-8, once each."""
    from teal.kernels import configs

    heuristic = configs.quant_cuda_config(4096, 6144, 3, 132, "int4")
    assert (heuristic.block_n, heuristic.num_warps, heuristic.block_r) == (256, 8, 32) and heuristic.cuda
    one_row = configs.quant_cuda_config(4096, 12288, 1, 132, "int4")  # not in the table: the batch-1 heuristic
    assert (4096, 12288, 1, "int4") not in configs.TUNED_QUANT_CUDA
    split = configs.heuristic_cuda_config(4096, 12288, 132).split_k
    assert (one_row.block_n, one_row.num_warps, one_row.split_k) == (256, 16, split)
    assert configs.quant_cuda_config(4096, 12288, 2, 132, "int4").num_warps == 8
    tuned = configs.KernelConfig(block_n=512, block_r=32, split_k=2, num_warps=4, cuda=True)
    table = {(4096, 6144, 4, "int4"): tuned}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(configs, "TUNED_QUANT_CUDA", table)
        assert configs.quant_cuda_config(4096, 6144, 3, 132, "int4") == tuned  # batch 3: bucket 4
        assert configs.quant_cuda_config(4096, 6144, 3, 132, "int8") == heuristic  # another format
        assert configs.quant_cuda_config(4096, 6144, 8, 132, "int4") == heuristic  # another bucket
    # The built-in table: Llama-3-8B's four projections at batch 1 in both formats, each a CUDA configuration
    # that fits its registers (what the H100 decode step ran with).
    assert {(k, n) for k, n, b, f in configs.TUNED_QUANT_CUDA} == {(4096, 6144), (4096, 4096), (4096, 28672),
                                                                    (14336, 4096)}
    assert {(b, f) for _, _, b, f in configs.TUNED_QUANT_CUDA} == {(1, "int4"), (1, "int8")}
    import torch

    from teal.kernels import cuda

    for (k, n, b, f), cfg in configs.TUNED_QUANT_CUDA.items():
        assert cfg.cuda and cuda.register_problem(cfg, torch.bfloat16, b, f) is None, (k, n, f, cfg)
    cands = configs.quant_cuda_candidates(4096, 28672, 132)
    assert len(cands) == len(set(cands))
    assert {c.block_n for c in cands} == {256, 512} and {c.num_warps for c in cands} == {4, 8, 16}
    assert all(1 <= c.split_k <= 8 and c.cuda and not c.use_dot and c.block_r == 32 for c in cands)
    assert heuristic in configs.quant_cuda_candidates(4096, 6144, 132)
    assert {c.block_n for c in configs.quant_cuda_candidates(4096, 28672, 132, batch=4)} == {256}  # 512 spills there
    # The int4 cp.async ring: two candidates at batch 1 (256 columns, the base cluster size), none at 4 rows;
    # register_problem keeps it to int4 codes, one code word per lane and one input row.
    import torch

    from teal.kernels import cuda

    rings = [c for c in cands if c.num_stages > 1]
    assert sorted((c.num_warps, c.num_stages) for c in rings) == [(8, 3), (16, 2)]
    assert all(c.block_n == 256 and c.split_k == configs.heuristic_cuda_config(4096, 28672, 132).split_k for c in rings)
    assert not [c for c in configs.quant_cuda_candidates(4096, 28672, 132, batch=4) if c.num_stages > 1]
    ring = rings[0]
    assert cuda.register_problem(ring, torch.bfloat16, 1, "int4") is None
    for fmt, batch, cfg in (("int8", 1, ring), ("int4", 2, ring), ("int4", 1, dataclasses.replace(ring, block_n=512))):
        assert "cp.async ring" in cuda.register_problem(cfg, torch.bfloat16, batch, fmt), (fmt, batch, cfg)


def test_sweep_kernels_start_with_the_dispatch_config_and_keep_what_fits():
    from teal.bench.quant_kernels import config_label, sweep_kernels
    from teal.kernels import configs, cuda

    rows = sweep_kernels(4096, 6144, 8, "int4", torch.bfloat16, 132)
    assert rows[0][0] == "cuda" and rows[0][2] == configs.quant_cuda_config(4096, 6144, 8, 132, "int4")
    assert rows[0][1].keywords == {"config": rows[0][2]}
    rest = rows[1:]
    assert rest and all(name == config_label(cfg) and kern.keywords == {"config": cfg} for name, kern, cfg in rest)
    assert all(cfg != rows[0][2] and cuda.register_problem(cfg, torch.bfloat16, 8, "int4") is None
               for _, _, cfg in rest)
    cands = configs.quant_cuda_candidates(4096, 6144, 132, 8)
    dropped = [c for c in cands if c != rows[0][2] and cuda.register_problem(c, torch.bfloat16, 8, "int4") is not None]
    assert len(rest) + len(dropped) + 1 == len(cands)  # the heuristic is among them
    assert config_label(rows[0][2]) == "cuda bn256 w8 c4"
    assert config_label(dataclasses.replace(rows[0][2], num_stages=3)) == "cuda bn256 w8 c4 ring3"
    # At batch 1 the int4 sweep times the cp.async ring too; int8 cannot take it, and a ring whose lists and ring
    # overflow sm_90's shared memory (a very long K) is left out before any launch.
    names = [name for name, _, _ in sweep_kernels(4096, 28672, 1, "int4", torch.bfloat16, 132)]
    assert any(nm.endswith(" ring3") for nm in names) and any(nm.endswith(" ring2") for nm in names), names
    assert not [nm for nm, _, _ in sweep_kernels(4096, 28672, 1, "int8", torch.bfloat16, 132) if "ring" in nm]
    long_k = sweep_kernels(131072, 4096, 1, "int4", torch.bfloat16, 132)
    assert not [nm for nm, _, cfg in long_k if cfg.num_stages > 1 and cfg.num_warps == 16], [n for n, _, _ in long_k]
    assert all(cuda.geometry(131072, [4096], cfg, torch.bfloat16, 1, "int4").shared_bytes <= cuda.SM90_SHARED_LIMIT
               for _, _, cfg in long_k[1:])


def test_sweep_entries_name_a_config_only_where_it_wins_everywhere_timed():
    """The mean over the sparsities timed decides; a configuration with an error row at any of them is out;
    an entry only below the dispatch's mean / SWEEP_SLACK."""
    from teal.bench.quant_kernels import SWEEP_SLACK, sweep_entries

    def rows(times: dict[str, tuple[float, float]], k: int = 4096, batch: int = 1) -> list[dict]:
        out = []
        for name, per_s in times.items():
            bn = 512 if "bn512" in name else 256
            cfg = dict(block_n=bn, block_r=32, split_k=2, num_warps=4, cuda=True)
            for s, us in zip((0.0, 0.5), per_s):
                r = {"weights": "int4", "K": k, "N": 6144, "batch": batch, "sparsity": s, "kernel": name,
                     "config": cfg}
                if us is not None:
                    r["us"] = us
                out.append(r)
        return out

    won = sweep_entries(rows({"cuda bn256 w4 c2": (10.0, None),  # fastest where timed, but an error at 0.5
                              "cuda": (20.0, 12.0), "cuda bn512 w4 c2": (16.0, 10.0)}))
    assert len(won) == 1 and won[0]["best"] == "cuda bn512 w4 c2" and won[0]["best_us"] == 13.0
    assert won[0]["entry"].startswith('(4096, 6144, 1, "int4"): KernelConfig(block_n=512, block_r=32, split_k=2')
    close = 16.0 / SWEEP_SLACK + 0.01  # mean just above the slack's bound
    lost = sweep_entries(rows({"cuda": (16.0, 16.0), "cuda bn512 w4 c2": (close, close)}, batch=3))
    assert lost[0]["bucket"] == 4 and lost[0]["best"] == "cuda bn512 w4 c2" and "entry" not in lost[0]
    assert sweep_entries(rows({"cuda bn512 w4 c2": (1.0, 1.0)})) == []  # no dispatch row: nothing to beat
    ringed = sweep_entries([{**r, "config": {**r["config"], "num_stages": 3}} if r["kernel"] != "cuda" else r
                            for r in rows({"cuda": (20.0, 12.0), "cuda bn256 w4 c2 ring3": (10.0, 6.0)})])
    assert "num_warps=4, num_stages=3, cuda=True)" in ringed[0]["entry"], ringed  # the entry keeps the ring
    # The winners as a table that $TEAL_QUANT_CONFIGS reads back: only the entry that won, under its format.
    from teal.bench.quant_kernels import sweep_table
    from teal.kernels import configs

    table = sweep_table(won + lost)
    assert [(e["K"], e["N"], e["bucket"], e["dtype"]) for e in table["entries"]] == [(4096, 6144, 1, "int4")]
    assert table["entries"][0]["config"]["block_n"] == 512


def test_quant_configs_env_table_comes_first(tmp_path, monkeypatch):
    """A `$TEAL_QUANT_CONFIGS` table (what a sweep's --table-out writes) wins over `TUNED_QUANT_CUDA` and the
    heuristic for its own (K, N, bucket, format) only; a Triton entry there is one clear error."""
    from teal.bench.quant_kernels import sweep_table
    from teal.bench.results import write_json
    from teal.kernels import configs

    won = dict(block_n=512, block_r=32, split_k=1, num_warps=4, cuda=True)
    path = tmp_path / "quant.json"
    write_json(sweep_table([{"weights": "int4", "K": 4096, "N": 6144, "bucket": 1, "config": won},
                            {"weights": "int8", "K": 4096, "N": 6144, "bucket": 1}]), path)  # the second lost
    shipped = configs.quant_cuda_config(4096, 6144, 1, 132, "int4")  # the built-in table's entry
    builtin = configs.KernelConfig(block_n=256, block_r=32, split_k=2, num_warps=4, cuda=True)
    monkeypatch.setattr(configs, "TUNED_QUANT_CUDA", {(4096, 6144, 1, "int4"): builtin, (4096, 6144, 1, "int8"): builtin})
    monkeypatch.setenv(configs.QUANT_CONFIGS_ENV, str(path))
    assert configs.quant_cuda_config(4096, 6144, 1, 132, "int4") == configs.KernelConfig(**won)
    assert configs.quant_cuda_config(4096, 6144, 1, 132, "int8") == builtin  # no entry for int8: the table's
    assert configs.quant_cuda_config(4096, 6144, 2, 132, "int4") == configs.quant_cuda_config(4096, 6144, 2, 132)
    monkeypatch.delenv(configs.QUANT_CONFIGS_ENV)
    assert configs.quant_cuda_config(4096, 6144, 1, 132, "int4") == builtin != shipped
    bad = tmp_path / "bad.json"
    write_json(configs.table_to_json({(4096, 6144, 1, "int4"): configs.KernelConfig(block_n=64)}), bad)
    monkeypatch.setenv(configs.QUANT_CONFIGS_ENV, str(bad))
    with pytest.raises(ValueError, match=r"bad\.json: entry .* not a CUDA configuration"):
        configs.quant_cuda_config(4096, 6144, 1, 132, "int4")
    bf16_table = tmp_path / "bf16.json"  # a $TEAL_KERNEL_CONFIGS table set here by mistake: one line, not ignored
    write_json(configs.table_to_json({(4096, 6144, 1, "bf16"): configs.KernelConfig(block_n=256, cuda=True)}),
               bf16_table)
    monkeypatch.setenv(configs.QUANT_CONFIGS_ENV, str(bf16_table))
    with pytest.raises(ValueError, match="has no int8 or int4 entry"):
        configs.quant_cuda_config(4096, 6144, 1, 132, "int4")


def test_built_in_quant_table_is_the_sweeps_batch_one_winners():
    """`TUNED_QUANT_CUDA` holds exactly the batch-1 entries of the committed H100 sweep table (what the decode step
    ran with through $TEAL_QUANT_CONFIGS), none of its batch-4 ones."""
    from pathlib import Path

    from teal.kernels import configs

    path = Path(__file__).resolve().parents[1] / "benchmarks/results/2026-12-08-h100-quant-sweep-table.json"
    swept = configs.load_table(path)
    assert {key: cfg for key, cfg in swept.items() if key[2] == 1} == configs.TUNED_QUANT_CUDA
    assert any(key[2] == 4 for key in swept)


def test_decode_header_records_the_teal_switches(monkeypatch):
    """A result's header names the `$TEAL_*` switches it ran under (a PDL or table A/B says which side it is),
    but not the source commit, which is its own field."""
    import torch

    from teal.bench.results import decode_header

    for key in [k for k in __import__("os").environ if k.startswith("TEAL_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("TEAL_CUDA_PDL", "1")
    monkeypatch.setenv("TEAL_SOURCE_COMMIT", "0" * 40)
    head = decode_header(None, "tiny", torch.device("cpu"), torch.float32, 8, 4, 1, 32, None)
    assert head["environment"] == {"TEAL_CUDA_PDL": "1"} and head["git_commit"] == "0" * 40
