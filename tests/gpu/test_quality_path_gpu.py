"""The quality path on CUDA (run by ``make test-gpu``): a small random Llama saved as an HF directory with its
own word-level tokenizer, through every CLI command (calibrate, allocate with every method, eval ppl, eval
tasks, generate on both paths), and the Python API: ``sparsify_`` on a CUDA model, and ``sparsify_`` ->
``.to("cuda")`` -> ``.to("cpu")``."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

import teal
from teal.sparsify import measured_sparsity, teal_modules

pytestmark = pytest.mark.gpu

WORDS = [f"w{i}" for i in range(500)]
SPECIAL = ["<unk>", "<s>", "</s>", "."]


def _text(n_words: int, seed: int) -> str:
    """Zipf-like random word text, sentences ending in '.'."""
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) for i in range(len(WORDS))]
    words = rng.choices(WORDS, weights, k=n_words)
    return " ".join(w + (" ." if i % 12 == 11 else "") for i, w in enumerate(words))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """An HF directory: random Llama (2 layers, hidden 256) + a word-level fast tokenizer; and a text file."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("gpu-quality")
    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    out = root / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    text = root / "text.txt"
    text.write_text(_text(40000, 1) + "\n")
    task = root / "task.jsonl"
    rng = random.Random(2)
    task.write_text("\n".join(json.dumps({"context": " ".join(rng.choices(WORDS[:50], k=6)),
                                          "choices": [rng.choice(WORDS), rng.choice(WORDS)], "gold": i % 2})
                              for i in range(6)) + "\n")
    return out, text, task, root


def _invoke(*args):
    from typer.testing import CliRunner

    from teal.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, f"teal {' '.join(map(str, args))}\n{result.output}\n{result.exception!r}"
    return result


@pytest.fixture(scope="module")
def artifact(model_dir):
    model, text, _, root = model_dir
    art = root / "art"
    _invoke("calibrate", model, "--data", f"file:{text}", "--tokens", 8192, "--seq-len", 256, "-o", art,
            "--device", "cuda")
    cfg = json.loads((art / "teal_config.json").read_text())
    assert cfg["calibration"]["device"].startswith("cuda"), cfg["calibration"]
    return art


@pytest.mark.parametrize("method", ["uniform", "greedy", "fisher", "cross-layer"])
def test_cli_allocate_every_method_on_cuda(model_dir, artifact, method):
    model, text, _, _ = model_dir
    _invoke("allocate", model, artifact, "--method", method, "--data", f"file:{text}", "--tokens", 512,
            "--seq-len", 128, "--step", 0.05, "--max-level", 0.6, "--lazy", "--device", "cuda")
    if method != "uniform":
        assert method in json.loads((artifact / "teal_config.json").read_text())["allocations"]


def test_cli_eval_ppl_and_tasks_on_cuda(model_dir, artifact, tmp_path):
    model, text, task, _ = model_dir
    _invoke("allocate", model, artifact, "--method", "greedy", "--data", f"file:{text}", "--tokens", 512,
            "--seq-len", 128, "--step", 0.05, "--max-level", 0.6, "--lazy", "--device", "cuda")
    js = tmp_path / "ppl.json"
    _invoke("eval", "ppl", model, artifact, "--sparsity", "0,0.5", "--method", "uniform,greedy", "--data",
            f"file:{text}", "--tokens", 2048, "--seq-len", 256, "--json", js, "--device", "cuda")
    data = json.loads(js.read_text())
    assert "cpu" not in data["device"].lower(), data["device"]
    rows = {(r["method"], r["sparsity"]): r for r in data["results"]}
    assert rows[("teal-uniform", 0)]["measured_sparsity"] == 0.0
    for method in ("teal-uniform", "teal-greedy"):
        assert abs(rows[(method, 0.5)]["measured_sparsity"] - 0.5) < 0.08, rows[(method, 0.5)]
        # a random model: sparsity moves its (near-uniform) perplexity, in either direction
        assert math.isfinite(rows[(method, 0.5)]["ppl"]) and rows[(method, 0.5)]["ppl"] != rows[(method, 0)]["ppl"]
    js = tmp_path / "tasks.json"
    _invoke("eval", "tasks", model, artifact, "--sparsity", "0,0.5", "--tasks", f"file:{task}", "--json", js,
            "--device", "cuda")
    data = json.loads(js.read_text())
    assert [r["sparsity"] for r in data["results"]] == [0, 0.5]
    assert data["results"][1]["measured_sparsity"] > 0.3
    assert all(r["tasks"][f"file:{task}"]["n"] == 6 for r in data["results"])


@pytest.mark.parametrize("engine", [False, True], ids=["hf", "engine"])
def test_cli_generate_on_cuda(model_dir, artifact, engine):
    model, _, _, _ = model_dir
    r = _invoke("generate", model, artifact, "--sparsity", 0.5, "--prompt", "w1 w2 w3 w4", "--max-new-tokens", 8,
                "--device", "cuda", *(["--engine"] if engine else []))
    assert "tokens" in r.output
    if not engine:
        measured = float(r.output.rsplit("measured sparsity", 1)[1].strip(" ]\n"))
        assert 0.3 < measured < 0.7, r.output


# ------------------------------------------------------------------ the Python API
def _load(model_dir, device, dtype):
    model, tok = teal.load_model(str(model_dir[0]), dtype=dtype, device=device)
    return model.eval(), tok


@pytest.fixture(scope="module")
def thresholds(model_dir, artifact):
    return teal.Thresholds.load(artifact)


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids.to(next(model.parameters()).device), use_cache=False).logits.float().cpu()


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_sparsify_on_a_cuda_model_kernel_against_masked(model_dir, thresholds):
    """On CUDA, forwards of <= 8 tokens go through the kernel: the same logits and counters as the masked path."""
    model, _ = _load(model_dir, "cuda", torch.bfloat16)
    ids = torch.randint(4, 504, (1, 6), generator=torch.Generator().manual_seed(3))
    dense = _logits(model, ids)
    teal.sparsify_(model, thresholds, 0.5, use_kernels=False)
    masked = _logits(model, ids)
    masked_sparsity = measured_sparsity(model)
    teal.sparsify_(model, thresholds, 0.5)  # "auto": the kernel on CUDA
    assert all(m.use_kernel and m.threshold.is_cuda and m.zeros.is_cuda for m in teal_modules(model).values())
    kernel = _logits(model, ids)
    assert _rel(kernel, masked) <= 2e-2 < 0.25 * _rel(masked, dense)
    assert measured_sparsity(model) == pytest.approx(masked_sparsity, abs=0.01)
    teal.densify_(model)
    assert _rel(_logits(model, ids), dense) <= 1e-3


def test_dense_prefix_holds_on_the_cuda_kernel_path(model_dir, thresholds):
    """6 tokens (the kernel's range) with dense_prefix=3: the first 3 positions are the dense model's."""
    model, _ = _load(model_dir, "cuda", torch.bfloat16)
    ids = torch.randint(4, 504, (1, 6), generator=torch.Generator().manual_seed(4))
    dense = _logits(model, ids)
    teal.sparsify_(model, thresholds, 0.5, dense_prefix=3)
    got = _logits(model, ids)
    assert _rel(got[:, :3], dense[:, :3]) <= 1e-2
    assert _rel(got[:, 3:], dense[:, 3:]) > 0.02


def test_sparsify_then_to_cuda_and_back(model_dir, thresholds):
    model, _ = _load(model_dir, "cpu", torch.float32)
    ids = torch.randint(4, 504, (1, 40), generator=torch.Generator().manual_seed(5))
    teal.sparsify_(model, thresholds, 0.5)
    cpu_logits = _logits(model, ids)
    cpu_sparsity = measured_sparsity(model)
    teal.sparsify.reset_counters(model)
    model.to("cuda")
    for key, m in teal_modules(model).items():
        assert {t.device.type for t in (m.threshold, m.zeros, m.total, m.weight)} == {"cuda"}, key
    cuda_logits = _logits(model, ids)  # 40 tokens: the masked path
    assert _rel(cuda_logits, cpu_logits) <= 1e-3
    assert measured_sparsity(model) == pytest.approx(cpu_sparsity, abs=2e-3)
    _logits(model, ids[:, :1])  # one token: the kernel, switched on by the first CUDA forward ("auto")
    thresholded = {k: m for k, m in teal_modules(model).items() if m.threshold_value >= 0}  # others stay dense
    assert thresholded and [k for k, m in thresholded.items() if not m.use_kernel] == []
    model.to("cpu")
    assert {m.threshold.device.type for m in teal_modules(model).values()} == {"cpu"}
    assert _rel(_logits(model, ids), cpu_logits) <= 1e-5
    teal.densify_(model)
    assert all(p.is_contiguous() for p in model.parameters())


@pytest.mark.parametrize("backend", ["auto", "hf"])
def test_cli_chat_on_cuda(model_dir, artifact, backend):
    """`teal chat` on a CUDA device: two turns from stdin, each reply ending with its tok/s and the measured
    decode sparsity (auto: the engine where a GPU is present; hf: HF generate)."""
    import re

    from typer.testing import CliRunner

    from teal.cli import app

    model, _, _, _ = model_dir
    r = CliRunner().invoke(app, ["chat", str(model), str(artifact), "--sparsity", "0.5", "--max-new-tokens", "8",
                                 "--backend", backend, "--no-chat-template", "--device", "cuda"],
                           input="w1 w2 w3\nw4 w5\n")
    assert r.exit_code == 0, f"{r.output}\n{r.exception!r}"
    stats = re.findall(r"\[(\d+) tokens, ([\d.]+) tok/s, measured decode sparsity ([\d.]+)", r.output)
    assert len(stats) == 2, r.output
    for _n, tps, measured in stats:
        assert float(tps) > 0 and 0.3 < float(measured) < 0.7, r.output
