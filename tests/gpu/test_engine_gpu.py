"""The engine's compiled CUDA graph (bf16, the kernels) against float64-accurate fp32 eager references, for
every supported family (run by ``make test-gpu``)."""

from __future__ import annotations

import pytest
import torch

from teal.engine import Generator, engine_from_hf_model
from teal.engine.reference import activation_thresholds, masked_hf_logits
from test_engine import FAMILIES, TINY

pytestmark = pytest.mark.gpu

# wider than the CPU tests' models, so the kernels' tiles and clusters are exercised
WIDER = dict(hidden_size=256, intermediate_size=688, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
             vocab_size=512, max_position_embeddings=512)
PROMPT, LENGTH = 10, 40


def wide_hf_model(family: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {**TINY, **FAMILIES[family], **WIDER}
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # non-trivial norms and biases, so every weight matters
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.06 * torch.randn_like(p))
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm())


def graph_logits(gen: Generator, ids: torch.Tensor) -> torch.Tensor:
    """Teacher-forced logits of decode steps PROMPT..LENGTH-1, each a replay of one CUDA graph of the
    generator's own (compiled) decode layer, after an eager prefill of the prompt."""
    eng = gen.engine
    layer_fn = gen._layer_fn()
    tok = torch.zeros(1, dtype=torch.long, device="cuda")
    pos = torch.zeros(1, dtype=torch.long, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.inference_mode():
        for _ in range(3):  # compile and warm up (writes K/V at position 0, which the prefill overwrites)
            eng.decode(tok, pos, layer_fn=layer_fn)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        logits = eng.decode(tok, pos, layer_fn=layer_fn)
    rows = []
    with torch.inference_mode():
        eng.prefill(ids[:PROMPT].to("cuda"))
        for t in range(PROMPT, LENGTH):
            tok.fill_(int(ids[t]))
            pos.fill_(t)
            graph.replay()
            rows.append(logits.reshape(-1).float().cpu().clone())
    return torch.stack(rows)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_model(request):
    return request.param, wide_hf_model(request.param)


def test_compiled_graph_fp32_matches_eager_fp32(family_model):
    """The engine in fp32 on CUDA at 50 % sparsity (the sparse kernels, compiled graph) against the masked HF
    model in fp32 on the CPU: the same masks, so the logits agree closely (a threshold 20 % off gives a
    relative error of ~0.8 on these models)."""
    family, hf = family_model
    err, agree, effect = _check_compiled_graph(hf, 0.5, torch.float32)
    assert err <= 1e-2 and agree >= 0.95, f"{family}: rel err {err:.3e}, top-1 agreement {agree:.2f}"


def test_compiled_graph_bf16_dense_matches_eager_fp32():
    """bf16 at sparsity 0: the dense groups (on the kernel's "dense" regime where the CUDA C++ kernel runs)."""
    err, agree, _ = _check_compiled_graph(wide_hf_model("llama3-rope"), 0.0, torch.bfloat16)
    assert err <= 3e-2 and agree >= 0.9, f"rel err {err:.3e}, top-1 agreement {agree:.2f}"


def test_compiled_graph_bf16_sparse_against_eager_fp32():
    """bf16 at 50 %: activations rounded to bf16 cross thresholds the fp32 ones do not, so the logits move by
    about half the sparsification's own effect (0.36-0.46 against 0.70-0.88 with bf16 eager on the CPU); a
    kernel returning zeros or ignoring the thresholds moves them by the whole effect or more."""
    err, agree, effect = _check_compiled_graph(wide_hf_model("llama3-rope"), 0.5, torch.bfloat16)
    assert err <= 0.75 * effect, f"rel err {err:.3e} against the sparsification's own effect {effect:.3e}"


def _check_compiled_graph(hf: torch.nn.Module, sparsity: float, dtype: torch.dtype) -> tuple[float, float, float]:
    """(relative error, top-1 agreement, sparsification effect) of the compiled graph's teacher-forced logits
    against the fp32 masked HF model; also runs the generator's own graph loop."""
    vocab = hf.config.vocab_size
    ids = torch.randint(0, vocab, (LENGTH,), generator=torch.Generator().manual_seed(9))
    calib = torch.randint(0, vocab, (64,), generator=torch.Generator().manual_seed(7))
    reference = engine_from_hf_model(hf, max_seq_len=80)  # fp32, CPU, eager (64 calibration tokens)
    th = activation_thresholds(reference, calib, sparsity) if sparsity else None
    with torch.no_grad():
        dense = hf(ids[None]).logits[0][PROMPT:]
        exact = masked_hf_logits(hf, ids, th, dense_prefix=PROMPT)[PROMPT:] if th else dense
    gen = Generator.from_pretrained(hf, thresholds=th, sparsity=sparsity, device="cuda", dtype=dtype,
                                    compile=True, max_seq_len=LENGTH + 8)
    assert gen.mode == "compiled-graph"
    got = graph_logits(gen, ids)
    assert gen.compile_error is None, gen.compile_error
    err = rel_err(got, exact)
    agree = float((got.argmax(-1) == exact.argmax(-1)).float().mean())
    effect = rel_err(exact, dense) if th else 0.0
    out = gen.generate(ids[:PROMPT], max_new_tokens=12, stop=[])  # the generator's own loop of graph replays
    assert gen.mode == "compiled-graph" and gen.compile_error is None and len(out.tokens) == 12
    if dtype == torch.float32:  # greedy tokens: the reference's top ones (up to near-ties)
        seq = torch.cat([ids[:PROMPT], torch.tensor(out.tokens[:-1])])
        with torch.no_grad():
            ref = masked_hf_logits(hf, seq, th, dense_prefix=PROMPT) if th else hf(seq[None]).logits[0]
        ref = ref[PROMPT - 1:]
        margin = 4 * float((got - exact).abs().max()) + 1e-4
        picked = ref.gather(1, torch.tensor(out.tokens)[:, None])[:, 0]
        assert bool((picked >= ref.max(-1).values - margin).all()), (out.tokens, ref.argmax(-1).tolist())
    return err, agree, effect
