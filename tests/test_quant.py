"""Weight formats (teal.quant) and the fused threshold + dequantize + sparse GEMV (teal.kernels.quant_gemv).

The Triton entry is called directly under TRITON_INTERPRET=1 and checked against a float64
dequantize-then-multiply reference at odd shapes, batch 1-8, both rules, s in {0, 0.5, 0.99}.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported

import pytest
import torch

from teal.kernels.quant_gemv import quant_sparse_linear_reference, quant_sparse_linear_triton
from teal.quant import QuantizedWeight, dequantize, pack_int4, quantize, unpack_int4

interpreted = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="Triton kernels run on CPU only under TRITON_INTERPRET=1"
)


def _float64_reference(x, qw, thresholds, splits, col_scale=None):
    """Dequantize in float64 from the raw codes (independent of teal.quant.dequantize), mask, multiply."""
    k, n = qw.shape
    if qw.format == "int8":
        w = qw.codes.double() * qw.scales.double()[None, :]
    else:
        lo = (qw.codes & 0xF).double()
        hi = (qw.codes >> 4).double()
        q = torch.empty(k, 2 * qw.codes.shape[1], dtype=torch.float64)
        q[:, 0::2], q[:, 1::2] = lo, hi
        g = torch.arange(k) // qw.group_size
        w = (q[:, :n] - qw.zeros.double()[g]) * qw.scales.double()[g]
    xd = x.double()
    outs, start = [], 0
    for j, width in enumerate(splits):
        score = xd.abs() * (col_scale[j].double() if col_scale is not None else 1.0)
        outs.append(torch.where(score > thresholds[j].double(), xd, 0.0) @ w[:, start:start + width])
        start += width
    return torch.cat(outs, dim=1)


def _thresholds_at(x, splits, sparsity, col_scale=None):
    """Per-segment thresholds that zero about ``sparsity`` of the first batch row's entries."""
    out = []
    for j in range(len(splits)):
        score = x[0].float().abs() * (col_scale[j] if col_scale is not None else 1.0)
        out.append(torch.quantile(score, sparsity).item() if sparsity > 0 else -1.0)
    return torch.tensor(out)


@pytest.mark.parametrize("fmt,group", [("int8", 0), ("int4", 32), ("int4", 64), ("int4", 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantize_roundtrip_error_is_small(fmt, group, dtype):
    gen = torch.Generator().manual_seed(0)
    w_t = (torch.randn(300, 77, generator=gen) * 0.05).to(dtype)  # odd N, partial last int4 group
    qw = quantize(w_t, fmt, group_size=group or 128)
    err = (dequantize(qw, torch.float32) - w_t.float()).abs()
    step = w_t.float().abs().max() / (127 if fmt == "int8" else 7.5)
    assert err.max() <= step * 0.51 + 1e-6  # RTN: at most half a step, per column/group
    assert qw.codes.shape == ((300, 77) if fmt == "int8" else (300, 39))


def test_int4_layout_rows_contiguous_and_packing_inverse():
    q = torch.randint(0, 16, (5, 9), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (5, 5) and packed.is_contiguous()
    assert torch.equal(unpack_int4(packed, 9), q)
    assert packed[0, 0].item() == q[0, 0].item() | (q[0, 1].item() << 4)  # column 0 low nibble, 1 high


def test_int4_zero_point_is_asymmetric():
    w_t = torch.linspace(0.1, 1.0, 128).reshape(128, 1).repeat(1, 4)  # all positive: zero point at 0
    qw = quantize(w_t, "int4", group_size=128)
    assert torch.all(qw.zeros == 0)
    assert (dequantize(qw, torch.float32) - w_t).abs().max() < (1.0 / 15) * 0.51
    shifted = quantize(w_t - 0.3, "int4", group_size=128)  # range [-0.2, 0.7]: the zero point moves up
    assert torch.all(shifted.zeros == 3)
    assert (dequantize(shifted, torch.float32) - (w_t - 0.3)).abs().max() < (0.9 / 15) * 0.51


@interpreted
@pytest.mark.parametrize("fmt,group", [("int8", 0), ("int4", 32), ("int4", 64), ("int4", 128)])
@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.99])
def test_triton_matches_float64(fmt, group, batch, sparsity):
    gen = torch.Generator().manual_seed(batch)
    k, splits = 200, [40, 24, 26]  # odd widths, K not a multiple of the int4 group
    w_t = (torch.randn(k, sum(splits), generator=gen) * k**-0.5).to(torch.bfloat16)
    qw = quantize(w_t, fmt, group_size=group or 128)
    x = torch.randn(batch, k, generator=gen).to(torch.bfloat16)
    thr = _thresholds_at(x, splits, sparsity)
    out = quant_sparse_linear_triton(x, qw, thr, splits, block_r=16, block_n=32, split_k=2)
    ref = _float64_reference(x, qw, thr, splits)
    err = (out.double() - ref).norm() / ref.norm().clamp_min(1e-12)
    assert not torch.isnan(out).any()
    assert err < 1e-2, f"relative error {err:.2e}"


@interpreted
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_triton_weight_aware_rule(fmt):
    gen = torch.Generator().manual_seed(7)
    k, splits = 96, [32, 48]
    w_t = (torch.randn(k, sum(splits), generator=gen) * 0.1).to(torch.float16)
    qw = quantize(w_t, fmt, group_size=32)
    col_scale = torch.rand(len(splits), k, generator=gen) + 0.5
    x = torch.randn(2, k, generator=gen).to(torch.float16)
    thr = _thresholds_at(x, splits, 0.5, col_scale)
    out = quant_sparse_linear_triton(x, qw, thr, splits, col_scale, block_r=16, block_n=16)
    ref = _float64_reference(x, qw, thr, splits, col_scale)
    assert ((out.double() - ref).norm() / ref.norm()) < 1e-2
    plain = _float64_reference(x, qw, thr, splits)  # the magnitude rule gives another answer: the scale is used
    assert ((out.double() - plain).norm() / plain.norm()) > 5e-2


@interpreted
def test_triton_skips_rows_of_zeroed_inputs():
    """Neither the codes nor the group's scale/zero of a zeroed input row are read: poison a whole group whose
    inputs are all zeroed with inf scales and extreme codes; the output stays finite and unchanged."""
    gen = torch.Generator().manual_seed(3)
    k, splits = 96, [32]
    qw = quantize(torch.randn(k, 32, generator=gen).to(torch.bfloat16), "int4", group_size=32)
    x = torch.randn(1, k, generator=gen).to(torch.bfloat16)
    x[0, 32:64] = 0  # group 1 entirely zeroed: threshold 0 drops it (ties dropped)
    thr = torch.tensor([0.0])
    clean = quant_sparse_linear_triton(x, qw, thr, splits, block_r=16, block_n=32)
    scales, codes = qw.scales.clone(), qw.codes.clone()
    scales[1], codes[32:64] = float("inf"), 0xFF
    poisoned = QuantizedWeight("int4", codes, scales, qw.zeros, qw.shape, qw.group_size)
    assert torch.equal(quant_sparse_linear_triton(x, poisoned, thr, splits, block_r=16, block_n=32), clean)


def test_reference_agrees_with_float64():
    gen = torch.Generator().manual_seed(1)
    qw = quantize(torch.randn(130, 50, generator=gen).to(torch.bfloat16), "int4", group_size=64)
    x = torch.randn(4, 130, generator=gen).to(torch.bfloat16)
    thr = torch.tensor([0.3, 0.8])
    out = quant_sparse_linear_reference(x, qw, thr, [20, 30])
    ref = _float64_reference(x, qw, thr, [20, 30])
    assert ((out.double() - ref).norm() / ref.norm()) < 1e-2


def test_bad_arguments_are_refused():
    qw = quantize(torch.randn(64, 16).to(torch.bfloat16), "int8")
    with pytest.raises(ValueError, match="sum to N=16"):
        quant_sparse_linear_reference(torch.randn(1, 64), qw, torch.tensor([0.0]), [8])
    with pytest.raises(ValueError, match="unknown weight format"):
        quantize(torch.randn(4, 4), "int3")
    with pytest.raises(ValueError, match="group_size"):
        quantize(torch.randn(4, 4), "int4", group_size=48)


def _tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantize_weights_swaps_projections_and_computes_with_the_codes(fmt):
    from teal.arch import get_adapter
    from teal.quant import QuantLinear, quantize_weights

    model = _tiny_llama()
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        dense = model(ids).logits
        expected = {k: dequantize(quantize(m.weight.detach().t(), fmt, 32), torch.float32).t()
                    for k, m in get_adapter(model).projections().items()}
        quantize_weights(model, fmt, group_size=32)
        mods = get_adapter(model).projections()
        assert all(isinstance(m, QuantLinear) for m in mods.values()) and len(mods) == 14
        for k, m in mods.items():
            assert torch.equal(m.weight, expected[k])
        quant = model(ids).logits
    assert model.lm_head.weight.dtype == torch.float32 and not isinstance(model.lm_head, QuantLinear)
    rel = (quant - dense).norm() / dense.norm()
    assert 0 < rel < (0.05 if fmt == "int8" else 0.3)  # changed, but still the same model
    assert model.teal_weights["format"] == fmt


def test_sparsify_runs_on_a_quantized_model():
    import teal
    from teal.quant import quantize_weights

    model = _tiny_llama(1)
    quantize_weights(model, "int4", group_size=32)
    ids = torch.randint(0, 64, (2, 16))
    th = teal.calibrate(model, None, windows=ids, progress=False)  # on the quantized model's activations
    teal.sparsify_(model, th, sparsity=0.5)
    with torch.no_grad():
        model(ids)
    assert 0.4 < teal.measured_sparsity(model) < 0.6


def test_quantize_weights_refuses_twice_and_bad_formats():
    from teal.quant import quantize_weights

    model = _tiny_llama()
    quantize_weights(model, "int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_weights(model, "int4")
    with pytest.raises(ValueError, match="unknown weight format"):
        quantize_weights(_tiny_llama(), "fp4")


def test_top_level_quantize_weights_quantizes_int4_projections():
    """`teal.quantize_weights` (the package's export) swaps every projection for int4 codes at the group size
    asked for; lm_head stays dense."""
    import teal
    from teal.quant import QuantLinear

    model = _tiny_llama(3)
    w = model.model.layers[1].mlp.down_proj.weight.detach().clone()  # [64, 128]: K = 128, one full group
    assert teal.quantize_weights(model, "int4", group_size=128) is model
    down = model.model.layers[1].mlp.down_proj
    assert isinstance(down, QuantLinear) and (down.format, down.group_size) == ("int4", 128)
    assert down.qweight.codes.dtype == torch.uint8 and down.qweight.scales.shape == (1, 64)
    assert torch.equal(down.weight, dequantize(quantize(w.t(), "int4", 128), torch.float32).t())
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)
    assert not isinstance(model.lm_head, QuantLinear)
    assert (model.teal_weights["format"], model.teal_weights["group_size"]) == ("int4", 128)


def test_hqq_lowers_the_int4_weight_error_against_rtn():
    pytest.importorskip("hqq", reason="the hqq package (extra [quant]) provides the optimiser")
    gen = torch.Generator().manual_seed(5)
    w_t = (torch.randn(256, 96, generator=gen) * 0.02).to(torch.float16)
    w_t[::17] *= 6  # a few outlier rows, where the min-max grid is poor
    rtn = quantize(w_t, "int4", group_size=64)
    hqq = quantize(w_t, "int4", group_size=64, method="hqq")
    assert hqq.codes.dtype == torch.uint8 and hqq.zeros.shape == (4, 96)
    err = lambda q: (dequantize(q, torch.float32) - w_t.float()).abs().mean()  # noqa: E731  (HQQ's objective: lp error)
    assert err(hqq) < 0.97 * err(rtn)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """An HF directory (random Llama + a word-level tokenizer) and a text file, for the CLI."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(60)]
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    root = tmp_path_factory.mktemp("quant-cli")
    model = _tiny_llama(2)
    model.config.vocab_size = len(vocab)
    model.resize_token_embeddings(len(vocab))
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rng = random.Random(0)
    (root / "text.txt").write_text(" ".join(rng.choices(words, k=6000)) + "\n")
    return root


def test_cli_weights_int4_calibrate_eval_and_mismatch_warning(tiny_model_dir):
    import json

    from typer.testing import CliRunner

    from teal.cli import app

    root = tiny_model_dir
    run = lambda *a: CliRunner().invoke(app, [str(x) for x in a])  # noqa: E731
    common = ("--data", f"file:{root / 'text.txt'}", "--seq-len", 64)
    r = run("calibrate", root / "model", "-o", root / "art4", "--tokens", 1024, *common, "--weights", "int4",
            "--group-size", 32, "--calibration", "dense")
    assert r.exit_code == 0, r.output
    assert json.loads((root / "art4" / "teal_config.json").read_text())["calibration"]["weights"] == "int4"
    js = root / "ppl.json"
    r = run("eval", "ppl", root / "model", root / "art4", "--sparsity", "0,0.5", "--tokens", 256, *common,
            "--weights", "int4", "--group-size", 32, "--json", js)
    assert r.exit_code == 0, r.output
    assert "warning" not in r.output
    rows = {x["sparsity"]: x for x in json.loads(js.read_text())["results"]}
    assert 0.4 < rows[0.5]["measured_sparsity"] < 0.6
    r = run("eval", "ppl", root / "model", root / "art4", "--sparsity", "0", "--tokens", 256, *common,
            "--weights", "int8")
    assert "calibrated with int4 weights" in r.output  # a mismatch is named (then the model check decides)
    r = run("eval", "ppl", root / "model", "--sparsity", "0", "--tokens", 256, *common, "--weights", "int4",
            "--group-size", 48)
    assert r.exit_code == 2 and "group size must be 32, 64 or 128" in r.output


@pytest.mark.parametrize("args", [
    ("calibrate", "{model}", "-o", "{root}/never", "--weights", "int8", "--group-size", "64"),
    ("allocate", "{model}", "{root}/never", "--weights", "bf16", "--group-size", "32"),
    ("generate", "{model}", "--engine", "--weights", "int8", "--group-size", "128"),
    ("generate", "{model}", "--group-size", "64"),  # bf16 by default
    ("eval", "ppl", "{model}", "--sparsity", "0", "--weights", "int8", "--group-size", "32"),
    ("eval", "tasks", "{model}", "--sparsity", "0", "--weights", "bf16", "--group-size", "64"),
    ("chat", "{model}", "--weights", "int8", "--group-size", "64"),
    ("serve", "{model}", "--weights", "bf16", "--group-size", "64"),
    ("bench", "decode", "--device", "cpu", "--weights", "bf16,int8", "--group-size", "64"),
    ("bench", "kernels", "--weights", "int8", "--group-size", "32"),
])
def test_cli_group_size_without_int4_is_one_line(args, tiny_model_dir, monkeypatch, capsys):
    """An explicit --group-size with a format that has no groups (bf16, int8) is refused in one line (exit code 2)
    that names the fix, before any model is loaded, instead of being silently ignored."""
    import teal.bench.decode
    import teal.models
    from teal.cli import main
    from teal.engine.generator import Generator

    def no_work(*a, **k):
        raise AssertionError("work started before --group-size was checked")

    monkeypatch.setattr(teal.models, "load_model", no_work)
    monkeypatch.setattr(Generator, "from_pretrained", no_work)
    monkeypatch.setattr(teal.bench.decode, "run", no_work)
    with pytest.raises(SystemExit) as exit_info:
        main([a.format(model=tiny_model_dir / "model", root=tiny_model_dir) for a in args])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert "--group-size applies to --weights int4 only" in err and "drop --group-size" in err, err
    assert not (tiny_model_dir / "never").exists()


def test_cli_group_size_defaults_to_128_for_int4_and_eval_json_records_the_weights(tiny_model_dir, quant_calls,
                                                                                 tmp_path, monkeypatch):
    """Without --group-size, int4 is quantized at group 128 (as before the option's default became unset); eval
    ppl and eval tasks --json record `weights`, `group_size` (int4 only) and `quant_method` (None for bf16)."""
    import json

    import teal.bench.decode

    root = tiny_model_dir
    data = ("--data", f"file:{root / 'text.txt'}", "--seq-len", 64)
    task = tmp_path / "words.jsonl"
    task.write_text("\n".join(json.dumps({"context": f"w{i} w{i + 1}", "choices": [f"w{i + 2}", f"w{i + 7}"],
                                          "gold": i % 2}) for i in range(4)) + "\n")
    for weights, extra, expected in (("int4", (), ("int4", 128, "rtn")),
                                     ("int4", ("--group-size", 32), ("int4", 32, "rtn")),
                                     ("int8", (), ("int8", None, "rtn")), ("bf16", (), ("bf16", None, None))):
        quant_calls.clear()
        js = tmp_path / f"ppl-{weights}.json"
        r = _cli("eval", "ppl", root / "model", "--sparsity", "0", "--tokens", 64, *data, "--weights", weights,
                 *extra, "--json", js)
        assert r.exit_code == 0, r.output
        saved = json.loads(js.read_text())
        assert (saved["weights"], saved["group_size"], saved["quant_method"]) == expected, saved
        assert quant_calls == ([] if weights == "bf16" else [("hf", weights, expected[1] or 128, "rtn")])
        js = tmp_path / f"tasks-{weights}.json"
        r = _cli("eval", "tasks", root / "model", "--sparsity", "0", "--tasks", f"file:{task}", "--weights", weights,
                 *extra, "--json", js)
        assert r.exit_code == 0, r.output
        saved = json.loads(js.read_text())
        assert (saved["weights"], saved["group_size"], saved["quant_method"]) == expected, saved
    runs = []
    monkeypatch.setattr(teal.bench.decode, "run", lambda **kw: runs.append(kw))
    r = _cli("bench", "decode", "--device", "cpu", "--shape", "tiny-llama", "--weights", "bf16,int4")
    assert r.exit_code == 0, r.output
    assert runs[-1]["group_size"] == 128 and runs[-1]["weights"] == ["bf16", "int4"]


@pytest.mark.parametrize("var,value", [("TEAL_QUANT_LARGE_BATCH", "default"), ("TEAL_QUANT_KERNEL", "fast")])
def test_cli_bad_quant_env_switch_is_one_line_before_any_work(var, value, tiny_model_dir, monkeypatch, capsys):
    """A bad $TEAL_QUANT_LARGE_BATCH / $TEAL_QUANT_KERNEL is one line (exit code 2) naming the variable, before any
    work, in `teal bench decode` with a quantized format (it used to time the bf16 rows, then raise a traceback
    when the quantized rows started) and in `teal generate --engine` with quantized weights; bf16-only runs never
    read it."""
    import teal.bench.decode
    import teal.models
    from teal.cli import main
    from teal.engine.generator import Generator

    def no_work(*a, **k):
        raise AssertionError(f"work started before ${var} was checked")

    monkeypatch.setenv(var, value)
    monkeypatch.setattr(teal.models, "load_model", no_work)
    monkeypatch.setattr(Generator, "from_pretrained", no_work)
    monkeypatch.setattr(teal.bench.decode, "run", no_work)
    model = str(tiny_model_dir / "model")
    for argv in (["bench", "decode", "--device", "cpu", "--shape", "tiny-llama", "--weights", "bf16,int4"],
                 ["bench", "decode", "--device", "cpu", "--shape", "tiny-llama", "--weights", "int8"],
                 ["generate", model, "--engine", "--weights", "int4", "--device", "cpu"],
                 ["serve", model, "--weights", "int8", "--device", "cpu"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1, (argv, err)
        assert f"${var} must be" in err and repr(value) in err and "unset it" in err, (argv, err)
    runs = []
    monkeypatch.setattr(teal.bench.decode, "run", lambda **kw: runs.append(kw))
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "decode", "--device", "cpu", "--shape", "tiny-llama", "--weights", "bf16"])
    assert exit_info.value.code == 0 and len(runs) == 1


def _int8_decode_from_source(src: str):
    """The int8 decode as ``sparse_gemv.cu`` writes it (``decode_codes`` and ``biased_byte``), read off the source:
    the mask each word is XORed with, the exponent constant and selector of the byte permute, the constant
    subtracted, the words per lane vector and which output each byte feeds. Returns decode(words int64
    [.., words per vector]) -> float32 [.., 4 * words per vector]."""
    import re

    def body(signature: str) -> str:
        text = src[src.index(signature):]
        return text[:text.index("\n}\n")]

    perm = re.search(r"__byte_perm\(word, (0x[0-9A-Fa-f]+)u, (0x[0-9A-Fa-f]+) \| j\)", body("float biased_byte("))
    exp, select = int(perm.group(1), 16), int(perm.group(2), 16)
    codes = body("void decode_codes(")
    flip = int(re.search(r"v\.u\[w\] \^ (0x[0-9A-Fa-f]+)u", codes).group(1), 16)
    words = int(re.search(r"for \(int w = 0; w < (\d+); \+\+w\)", codes).group(1))
    out = re.search(r"out\[([^\]]+)\] = biased_byte\(biased, j\) - ([0-9.]+)f;", codes)
    index, offset = out.group(1), torch.tensor(float(out.group(2)), dtype=torch.float32)

    def decode(vecs: torch.Tensor) -> torch.Tensor:
        res: dict[int, torch.Tensor] = {}
        for w in range(words):
            biased = vecs[..., w] ^ flip
            for j in range(4):
                bits = _byte_perm(biased, exp, select | j).to(torch.int32).view(torch.float32)
                res[eval(index, {}, {"w": w, "j": j})] = bits - offset  # the C index expression, e.g. 4 * w + j
        assert sorted(res) == list(range(4 * words)), sorted(res)
        return torch.stack([res[i] for i in range(4 * words)], dim=-1)

    return decode, words


def _with_fault(src: str, faults: dict[str, tuple[str, str]], fault: str | None) -> str:
    """``src`` with ``faults[fault]`` (old, new) replaced once (the old text must occur exactly once); None: as is."""
    if fault is None:
        return src
    old, new = faults[fault]
    assert src.count(old) == 1, old
    return src.replace(old, new)


_INT8_FAULTS = {
    "sign bit not flipped": ("v.u[w] ^ 0x80808080u", "v.u[w] ^ 0x00000000u"),
    "wrong bias subtracted": ("biased_byte(biased, j) - 8388736.0f", "biased_byte(biased, j) - 8388608.0f"),
    "wrong exponent bits": ("__byte_perm(word, 0x4B000000u, 0x7540 | j)", "__byte_perm(word, 0x4A000000u, 0x7540 | j)"),
    "wrong byte selected": ("__byte_perm(word, 0x4B000000u, 0x7540 | j)", "__byte_perm(word, 0x4B000000u, 0x7541 | j)"),
    "bytes reversed": ("out[4 * w + j] = biased_byte", "out[4 * w + 3 - j] = biased_byte"),
}


@pytest.mark.parametrize("fault", [None, *_INT8_FAULTS])
def test_int8_decode_emulated_from_the_source_reproduces_dequantize(fault):
    """The CUDA kernel's int8 decode (``sparse_gemv.cu``'s ``decode_codes``, WFMT 1) emulated from its own source
    text: every byte 0..255 at every position of a lane's vector decodes bit-exactly to its signed code, and the
    codes summed as x * q, then scaled per column (the int8 loop's fold), give x @ dequantize. Each fault injected
    into the source breaks it. (The int4 loop: `test_int4_decode_emulated_from_the_source_reproduces_dequantize`.)"""
    from teal.kernels import cuda

    src = _with_fault(cuda.source(), _INT8_FAULTS, fault)
    decode, words = _int8_decode_from_source(src)
    per_vec = 4 * words
    # every byte at every position: vector v holds byte (v + p) % 256 at position p
    byte = (torch.arange(256)[:, None] + torch.arange(per_vec)[None, :]) % 256
    vecs = torch.stack([sum(byte[:, 4 * w + i] << (8 * i) for i in range(4)) for w in range(words)], dim=-1)
    exact = torch.equal(decode(vecs), byte.to(torch.uint8).view(torch.int8).float())
    gen = torch.Generator().manual_seed(3)
    k, n = 96, 4 * per_vec
    qw = quantize(torch.randn(k, n, generator=gen), "int8")
    b = qw.codes.view(torch.uint8).to(torch.int64).reshape(k, n // 4, 4)
    q = decode((b[..., 0] | b[..., 1] << 8 | b[..., 2] << 16 | b[..., 3] << 24).reshape(k, -1, words)).reshape(k, n)
    x = torch.randn(k, generator=gen, dtype=torch.float64)
    y = (x @ q.double()) * qw.scales.double()  # the int8 loop: fp32 sums of x * q, then the column's scale
    ref = x @ qw.dequantize(torch.float64)
    err = float((y - ref).norm() / ref.norm())
    assert (exact and err <= 1e-6) == (fault is None), (fault, exact, err)


def test_quant_op_compiles_whole_and_a_bad_kernel_choice_is_named(monkeypatch):
    """The dispatch is one custom op: torch.compile(fullgraph=True) takes it and gives the reference's result;
    a bad $TEAL_QUANT_KERNEL is refused with the variable's name."""
    from teal.kernels import quant_gemv

    qw = quantize(torch.randn(64, 24), "int4", group_size=32)
    x, t = torch.randn(2, 64), torch.tensor([0.3, 0.6])
    fn = torch.compile(lambda v: quant_gemv.quant_sparse_linear(v, qw, t, [16, 8]), fullgraph=True, backend="eager")
    assert torch.equal(fn(x), quant_sparse_linear_reference(x, qw, t, [16, 8]))
    monkeypatch.setenv("TEAL_QUANT_KERNEL", "fast")
    with pytest.raises(ValueError, match="TEAL_QUANT_KERNEL"):
        quant_gemv.quant_kernel_choice()


# ------------------------------------------------------------------ the CUDA kernel's int4 decode, emulated
def _byte_perm(x: torch.Tensor, y: torch.Tensor | int, selector: int) -> torch.Tensor:
    """CUDA's __byte_perm on int64 tensors holding 32-bit words (``y`` a tensor or a constant word): result byte k
    is byte (selector >> 4k) & 7 of the 8 bytes (x, y) (x's bytes 0-3, y's 4-7)."""
    y = y if torch.is_tensor(y) else torch.full_like(x, y)
    out = torch.zeros_like(x)
    for k in range(4):
        pick = (selector >> (4 * k)) & 7
        out |= (((x if pick < 4 else y) >> (8 * (pick % 4))) & 0xFF) << (8 * k)
    return out


def _int4_decode_from_source(src: str):
    """The int4 decode as ``sparse_gemv.cu`` writes it, read off the source: the masks of ``decode_int4``,
    which masked word (lo / hi) feeds output 2j and 2j + 1, the exponent constant, the selector and the bias
    folded into the zero point. Returns (decode(words int64 [..]) -> float32 [.., 8], bias)."""
    import re

    define = lambda name: re.search(rf"#define {name} (\S+)", src).group(1)  # noqa: E731
    exp, select = int(define("INT4_EXP").rstrip("u"), 16), int(define("INT4_SELECT"), 16)
    bias = float(define("INT4_BIAS").rstrip("f"))
    body = src[src.index("void decode_int4("):]
    body = body[:body.index("\n}\n")]
    masks = re.search(r"lo = word & (0x[0-9A-Fa-f]+)u, hi = \(word >> (\d+)\) & (0x[0-9A-Fa-f]+)u;", body)
    lo_mask, shift, hi_mask = int(masks.group(1), 16), int(masks.group(2)), int(masks.group(3), 16)
    feeds = dict(re.findall(r"out\[(2 \* j(?: \+ 1)?)\] = __uint_as_float\(__byte_perm\((lo|hi), INT4_EXP, "
                            r"INT4_SELECT \| \(j << 8\)\)\);", body))
    assert set(feeds) == {"2 * j", "2 * j + 1"}, body

    def decode(words: torch.Tensor) -> torch.Tensor:
        masked = {"lo": words & lo_mask, "hi": (words >> shift) & hi_mask}
        out = []
        for j in range(4):
            for slot in ("2 * j", "2 * j + 1"):
                bits = _byte_perm(masked[feeds[slot]], exp, select | (j << 8))
                out.append(bits.to(torch.int32).view(torch.float32))
        return torch.stack(out, dim=-1)

    return decode, bias


def _int4_matvec(src: str, qw, x: torch.Tensor) -> torch.Tensor:
    """y = x @ w the int4 loop's way, per lane word: codes decoded as the source says, fp32 sums of x * decoded
    per group in row order (x is 16-bit and decoded <= 143, so each product is exact and an FMA is a rounded
    add), the group's sum of x in fp32, folded as scale * (sum - (bias + zero) * sum_x) (the two FMAs in
    float64, then rounded to fp32)."""
    decode, bias = _int4_decode_from_source(src)
    k, n = qw.shape
    b = qw.codes.to(torch.int64)  # [K, N/2] bytes; a lane's word is 4 consecutive bytes (columns 8l .. 8l+7)
    words = b[:, 0::4] | (b[:, 1::4] << 8) | (b[:, 2::4] << 16) | (b[:, 3::4] << 24)
    q = decode(words).reshape(k, -1)[:, :n]  # [K, N] fp32
    xf = x.float()
    acc = torch.zeros(n, dtype=torch.float32)
    for g in range(-(-k // qw.group_size)):
        rows = range(g * qw.group_size, min(k, (g + 1) * qw.group_size))
        gsum, xsum = torch.zeros(n, dtype=torch.float32), torch.zeros((), dtype=torch.float32)
        for r in rows:
            gsum = gsum + xf[r] * q[r]
            xsum = xsum + xf[r]
        s, z = qw.scales[g].double(), qw.zeros[g].double()
        inner = (-(z.float() + bias).double() * xsum.double() + gsum.double()).float()
        acc = (s * inner.double() + acc.double()).float()
    return acc


_INT4_FAULTS = {
    "nibbles swapped": ("out[2 * j] = __uint_as_float(__byte_perm(lo,", "out[2 * j] = __uint_as_float(__byte_perm(hi,"),
    "zero point not shifted by the bias": ("#define INT4_BIAS 128.0f", "#define INT4_BIAS 0.0f"),
    "wrong byte selected": ("#define INT4_SELECT 0x7044", "#define INT4_SELECT 0x7144"),
    "high nibble not shifted": ("hi = (word >> 4) & 0x0F0F0F0Fu", "hi = (word >> 0) & 0x0F0F0F0Fu"),
}


@pytest.mark.parametrize("fault", [None, *_INT4_FAULTS])
def test_int4_decode_emulated_from_the_source_reproduces_dequantize(fault):
    """The CUDA kernel's int4 loop (``sparse_gemv.cu``, WFMT 2) emulated from its own source text: every code 0..15
    at every nibble position of a word decodes bit-exactly to bias + code, and the per-group sums folded with
    the bias in the zero point match x @ dequantize in float64 (RTN and float zero points, groups 32 and 128,
    a partial last group) within 2e-5 relative: the bias costs about log2(128 / |q - zero|) bits of the fp32
    sums, far below the kernels' 1e-2 bound. Each fault injected into the source breaks it."""
    from teal.kernels import cuda

    src = _with_fault(cuda.source(), _INT4_FAULTS, fault)
    decode, bias = _int4_decode_from_source(src)
    # every code at every position: word w holds code (w + p) % 16 at nibble p
    nib = (torch.arange(16)[:, None] + torch.arange(8)[None, :]) % 16
    words = sum(nib[:, p].to(torch.int64) << (4 * p) for p in range(8))
    exact = torch.equal(decode(words), nib.float() + 128.0) and bias == 128.0
    gen = torch.Generator().manual_seed(11)
    errors = []
    for k, n, group, method in ((96 + 40, 24, 32, "rtn"), (256, 16, 128, "rtn"), (160, 16, 32, "float zeros")):
        qw = quantize(torch.randn(k, n, generator=gen).to(torch.bfloat16), "int4", group_size=group)
        if method == "float zeros":  # HQQ stores float zero points: the fold takes them as they are
            qw = QuantizedWeight("int4", qw.codes, qw.scales,
                                 (qw.zeros.float() + torch.rand(qw.zeros.shape, generator=gen) - 0.5).to(qw.dtype),
                                 qw.shape, group)
        codes = unpack_int4(qw.codes, n)
        assert set(codes.unique().tolist()) == set(range(16)) or k < 200  # random groups cover the codes
        x = torch.randn(k, generator=gen).to(torch.bfloat16)
        ref = x.double() @ qw.dequantize(torch.float64)
        y = _int4_matvec(src, qw, x)
        errors.append(float((y.double() - ref).norm() / ref.norm()))
    ok = exact and max(errors) <= 2e-5
    assert ok == (fault is None), (fault, exact, errors)


# ---- the CLI's weight options on the tiny HF directory (issue 19: every command, the artifact's record) -------
def _cli(*args, **kw):
    from typer.testing import CliRunner

    from teal.cli import app

    return CliRunner().invoke(app, [str(x) for x in args], **kw)


def _flat(output: str) -> str:
    return " ".join(output.split())  # rich wraps long lines


@pytest.fixture
def quant_calls(monkeypatch):
    """(path, weights, group_size, method) of every quantization the command asked for: the HF model's
    (`teal.quant.quantize_weights`) and the engine's (`Engine.quantize_weights`)."""
    import teal.quant
    from teal.engine.model import Engine

    calls = []
    hf_quantize, engine_quantize = teal.quant.quantize_weights, Engine.quantize_weights

    def on_hf(model, weights="int4", group_size=128, method="rtn"):
        calls.append(("hf", weights, group_size, method))
        return hf_quantize(model, weights, group_size, method)

    def on_engine(self, weights, group_size=128, method="rtn"):
        calls.append(("engine", weights, group_size, method))
        return engine_quantize(self, weights, group_size, method)

    monkeypatch.setattr(teal.quant, "quantize_weights", on_hf)
    monkeypatch.setattr(Engine, "quantize_weights", on_engine)
    return calls


@pytest.fixture(scope="module")
def int4_artifact(tiny_model_dir):
    """Thresholds of the tiny model calibrated on its int4 (group 32, rtn) weights."""
    root = tiny_model_dir
    r = _cli("calibrate", root / "model", "-o", root / "art4-g32", "--tokens", 1024, "--data",
             f"file:{root / 'text.txt'}", "--seq-len", 64, "--weights", "int4", "--group-size", 32,
             "--calibration", "dense")
    assert r.exit_code == 0, r.output
    return root / "art4-g32"


def test_weights_mismatch_names_format_group_size_and_method():
    from teal.quant import weights_mismatch

    cal = {"weights": "int4", "group_size": 32, "quant_method": "hqq"}
    assert weights_mismatch(cal, "int4", 32, "hqq") is None
    for asked, named in ((("int4", 32, "rtn"), ("int4 weights (group size 32, hqq)", "int4 weights (group size 32, rtn)")),
                         (("int4", 64, "hqq"), ("group size 32, hqq", "group size 64, hqq")),
                         (("int8", 128, "rtn"), ("int4 weights (group size 32, hqq)", "int8 weights (rtn)"))):
        message = weights_mismatch(cal, *asked)
        assert message is not None and "\n" not in message, asked
        assert all(n in message for n in named), message
        assert f"--weights {asked[0]}" in message and "--weights int4 --group-size 32 --quant-method hqq" in message
    bf16 = {"weights": "bf16", "group_size": None, "quant_method": None}
    assert weights_mismatch(bf16, "bf16", 128, "rtn") is None and weights_mismatch(bf16, "int8") is not None
    # artifacts from before a key was recorded: what is missing is not compared; no "weights" at all means bf16
    assert weights_mismatch({"weights": "int4"}, "int4", 64, "hqq") is None
    assert weights_mismatch({}, "bf16") is None and "calibrated with bf16 weights" in weights_mismatch({}, "int4")


def test_cli_calibration_records_group_size_and_method_and_every_command_checks_them(tiny_model_dir, quant_calls,
                                                                                     monkeypatch):
    """`--quant-method hqq` reaches the quantizer (HF and engine), the artifact records format, group size and
    method, and eval, generate --engine and bench decode --artifact warn in one line on a mismatch of any."""
    import json
    import shutil

    pytest.importorskip("hqq", reason="the hqq package (extra [quant]) provides --quant-method hqq")
    root = tiny_model_dir
    data = ("--data", f"file:{root / 'text.txt'}", "--seq-len", 64)
    r = _cli("calibrate", root / "model", "-o", root / "art-hqq", "--tokens", 512, *data, "--weights", "int4",
             "--group-size", 32, "--quant-method", "hqq", "--calibration", "dense")
    assert r.exit_code == 0, r.output
    cal = json.loads((root / "art-hqq" / "teal_config.json").read_text())["calibration"]
    assert (cal["weights"], cal["group_size"], cal["quant_method"]) == ("int4", 32, "hqq")
    assert quant_calls == [("hf", "int4", 32, "hqq")]

    def ppl(artifact, *weights):
        r = _cli("eval", "ppl", root / "model", artifact, "--sparsity", "0", "--tokens", 64, *data, *weights)
        assert r.exit_code == 0, r.output
        warnings = [line for line in r.output.splitlines() if "warning" in line]
        assert len(warnings) <= 1, r.output  # one line (rich does not wrap it)
        return warnings[0] if warnings else None

    assert ppl(root / "art-hqq", "--weights", "int4", "--group-size", 32, "--quant-method", "hqq") is None
    line = ppl(root / "art-hqq", "--weights", "int4", "--group-size", 32)
    assert "(group size 32, hqq) and this run uses int4 weights (group size 32, rtn)" in line
    assert "--quant-method rtn" in line and "--quant-method hqq" in line
    line = ppl(root / "art-hqq", "--weights", "int4", "--group-size", 64, "--quant-method", "hqq")
    assert "group size 32" in line and "group size 64" in line
    # an artifact written before group_size and quant_method were recorded: no warning for what it lacks
    shutil.copytree(root / "art-hqq", root / "art-old", dirs_exist_ok=True)
    cfg = json.loads((root / "art-old" / "teal_config.json").read_text())
    del cfg["calibration"]["group_size"], cfg["calibration"]["quant_method"]
    (root / "art-old" / "teal_config.json").write_text(json.dumps(cfg))
    assert ppl(root / "art-old", "--weights", "int4", "--group-size", 64) is None
    assert "calibrated with int4 weights and this run uses int8 weights" in ppl(root / "art-old", "--weights", "int8")

    quant_calls.clear()
    r = _cli("generate", root / "model", root / "art-hqq", "--engine", "--weights", "int4", "--group-size", 32,
             "--quant-method", "hqq", "--sparsity", 0.5, "--prompt", "w1 w2 w3", "--max-new-tokens", 3,
             "--no-chat-template")
    assert r.exit_code == 0 and "warning" not in r.output, r.output
    assert quant_calls == [("engine", "int4", 32, "hqq")]

    # bench decode --artifact: the same check, before the benchmark (stubbed: it is the GPU's job)
    import teal.bench.decode

    runs = []
    monkeypatch.setattr(teal.bench.decode, "run", lambda **kw: runs.append(kw))
    bench = ("bench", "decode", "--device", "cpu", "--model", root / "model", "--artifact", root / "art-hqq")
    r = _cli(*bench, "--weights", "int4", "--group-size", 32)
    assert r.exit_code == 0, r.output
    assert "warning: int4: the thresholds were calibrated with int4 weights (group size 32, hqq)" in r.output
    assert runs[-1]["quant_method"] == "rtn" and runs[-1]["weights"] == ["int4"]
    r = _cli(*bench, "--weights", "int4", "--group-size", 32, "--quant-method", "hqq")
    assert r.exit_code == 0 and "warning" not in r.output, r.output
    assert runs[-1]["quant_method"] == "hqq"


@pytest.mark.parametrize("args", [
    ("calibrate", "{model}", "-o", "{root}/never", "--weights", "int4", "--quant-method", "hqq"),
    ("generate", "{model}", "--engine", "--weights", "int4", "--quant-method", "hqq"),
    ("chat", "{model}", "--weights", "int4", "--quant-method", "hqq"),
    ("bench", "decode", "--device", "cpu", "--weights", "int4", "--quant-method", "hqq"),
])
def test_cli_quant_method_hqq_without_the_package_is_one_line(args, tiny_model_dir, monkeypatch, capsys):
    """No hqq package: one line naming the [quant] extra, exit code 2, before any model is loaded."""
    import sys

    import teal.bench.decode
    import teal.models
    from teal.cli import main

    for name in ("hqq", "hqq.core", "hqq.core.optimize"):
        monkeypatch.setitem(sys.modules, name, None)  # `import hqq...` raises ImportError

    def no_work(*a, **k):
        raise AssertionError("work started before --quant-method was checked")

    monkeypatch.setattr(teal.models, "load_model", no_work)
    monkeypatch.setattr(teal.bench.decode, "run", no_work)
    argv = [a.format(model=tiny_model_dir / "model", root=tiny_model_dir) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, err
    assert len(err.splitlines()) == 1 and "needs the hqq package" in err and "teal-sparsity[quant]" in err, err
    assert not (tiny_model_dir / "never").exists()


@pytest.mark.parametrize("args,message", [
    (("eval", "ppl", "{model}", "--sparsity", "0", "--weights", "int8", "--quant-method", "hqq"),
     "quantization method 'hqq' is for int4 weights; int8 weights take rtn"),
    (("eval", "ppl", "{model}", "--sparsity", "0", "--quant-method", "gptq"), "'gptq' is not one of 'rtn', 'hqq'"),
    (("bench", "decode", "--device", "cpu", "--weights", "bf16,int8", "--quant-method", "hqq"),
     "--quant-method hqq is for int4 weights; add int4 to --weights"),
    (("generate", "{model}", "--tp", "2", "--weights", "int4"), "--weights int4 is not available with --tp"),
])
def test_cli_weight_options_that_cannot_apply_are_one_line(args, message, tiny_model_dir, capsys):
    from teal.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([a.format(model=tiny_model_dir / "model") for a in args])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_cli_chat_takes_weights_on_hf_and_engine(tiny_model_dir, int4_artifact, quant_calls):
    """`teal chat --weights int4 --group-size 32`: both backends quantize alike and answer alike (greedy)."""
    replies = {}
    for backend in ("hf", "engine"):
        quant_calls.clear()
        r = _cli("chat", tiny_model_dir / "model", int4_artifact, "--backend", backend, "--sparsity", 0.5,
                 "--weights", "int4", "--group-size", 32, "--no-chat-template", "--max-new-tokens", 4,
                 input="w1 w2 w3\n")
        assert r.exit_code == 0, r.output
        out = _flat(r.output)
        assert f"on {backend} (sparsity 0.5, int4 weights)" in out and "warning" not in out, out
        assert quant_calls == [(backend, "int4", 32, "rtn")]
        replies[backend] = out.split("teal> ")[1].split(" [")[0]
        assert "measured decode sparsity" in out
    assert replies["hf"] == replies["engine"] and len(replies["hf"].split()) == 4
    r = _cli("chat", tiny_model_dir / "model", int4_artifact, "--backend", "hf", "--weights", "int8",
             "--no-chat-template", "--max-new-tokens", 2, input="w1\n")
    assert r.exit_code == 0 and "calibrated with int4 weights (group size 32, rtn) and this run uses int8" in \
        _flat(r.output), r.output


def test_cli_generate_engine_int4_matches_hf_int4(tiny_model_dir, int4_artifact, quant_calls):
    """`teal generate --engine --weights int4 --sparsity 0.5` with an int4-calibrated artifact runs on the CPU
    engine (it checks the bf16 checkpoint, then quantizes) and writes what the int4 HF model writes."""
    args = (tiny_model_dir / "model", int4_artifact, "--weights", "int4", "--group-size", 32, "--sparsity", 0.5,
            "--prompt", "w1 w2 w3", "--max-new-tokens", 6, "--no-chat-template")
    engine = _cli("generate", *args, "--engine")
    hf = _cli("generate", *args)
    assert engine.exit_code == 0 and hf.exit_code == 0, engine.output + hf.output
    assert quant_calls == [("engine", "int4", 32, "rtn"), ("hf", "int4", 32, "rtn")]
    text = lambda out: _flat(out).split("w1 w2 w3", 1)[1].split(" [")[0]  # noqa: E731
    assert text(engine.output) == text(hf.output) and len(text(hf.output).split()) == 6
    flat = _flat(engine.output)
    assert "warning" not in flat and "measured decode sparsity" in flat and "sparsity setting 0.5]" in flat


def test_cli_allocate_weights_int8(tiny_model_dir, quant_calls):
    import json

    root = tiny_model_dir
    data = ("--data", f"file:{root / 'text.txt'}", "--seq-len", 64)
    r = _cli("calibrate", root / "model", "-o", root / "art8", "--tokens", 512, *data, "--weights", "int8",
             "--calibration", "dense")
    assert r.exit_code == 0, r.output
    r = _cli("allocate", root / "model", root / "art8", "--weights", "int8", "--tokens", 128, *data,
             "--step", 0.05, "--max-level", 0.5, "--lazy")
    assert r.exit_code == 0 and "warning" not in r.output, r.output
    assert quant_calls == [("hf", "int8", 128, "rtn")] * 2
    cfg = json.loads((root / "art8" / "teal_config.json").read_text())
    assert cfg["calibration"]["weights"] == "int8" and cfg["allocations"]["greedy"]["levels"][-1] == 0.5


def test_cli_eval_tasks_weights_int4(tiny_model_dir, int4_artifact, quant_calls, tmp_path):
    import json

    task = tmp_path / "words.jsonl"
    task.write_text("\n".join(json.dumps({"context": f"w{i} w{i + 1}", "choices": [f"w{i + 2}", f"w{i + 7}"],
                                          "gold": i % 2}) for i in range(6)) + "\n")
    js = tmp_path / "tasks.json"
    r = _cli("eval", "tasks", tiny_model_dir / "model", int4_artifact, "--sparsity", "0,0.5", "--tasks",
             f"file:{task}", "--weights", "int4", "--group-size", 32, "--json", js)
    assert r.exit_code == 0 and "warning" not in r.output, r.output
    assert quant_calls == [("hf", "int4", 32, "rtn")]
    rows = json.loads(js.read_text())["results"]
    assert [x["sparsity"] for x in rows] == [0, 0.5] and all(x["tasks"][f"file:{task}"]["n"] == 6 for x in rows)
    assert rows[0]["measured_sparsity"] == 0.0 and 0.4 < rows[1]["measured_sparsity"] < 0.6


def test_cli_serve_passes_the_weight_options_and_checks_the_artifact(tiny_model_dir, int4_artifact, monkeypatch):
    import teal.serve

    pytest.importorskip("hqq", reason="the hqq package (extra [quant]) provides --quant-method hqq")
    seen = {}

    def fake_build(*args, **kwargs):
        seen.update(kwargs)
        raise SystemExit(0)

    monkeypatch.setattr(teal.serve, "build_served", fake_build)
    r = _cli("serve", tiny_model_dir / "model", int4_artifact, "--device", "cpu", "--weights", "int4", "--group-size",
             32, "--quant-method", "hqq")
    assert r.exit_code == 0, r.output
    assert (seen["weights"], seen["group_size"], seen["quant_method"]) == ("int4", 32, "hqq")
    assert "calibrated with int4 weights (group size 32, rtn) and this run uses int4 weights (group size 32, hqq)" \
        in _flat(r.output)
