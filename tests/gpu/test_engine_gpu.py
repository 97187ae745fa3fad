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


def test_compiled_graph_matches_fp32_eager(family_model):
    """At 50 % sparsity (the sparse kernels) for every family."""
    _check_compiled_graph(*family_model, 0.5)


def test_compiled_graph_dense_matches_fp32_eager():
    """Sparsity 0: the dense groups (on the kernel's "dense" regime where the CUDA C++ kernel runs)."""
    _check_compiled_graph("llama3-rope", wide_hf_model("llama3-rope"), 0.0)


def _check_compiled_graph(family: str, hf: torch.nn.Module, sparsity: float) -> None:
    vocab = hf.config.vocab_size
    ids = torch.randint(0, vocab, (LENGTH,), generator=torch.Generator().manual_seed(9))
    calib = torch.randint(0, vocab, (64,), generator=torch.Generator().manual_seed(7))
    reference = engine_from_hf_model(hf, max_seq_len=LENGTH + 8)  # fp32, CPU, eager
    th = activation_thresholds(reference, calib, sparsity) if sparsity else None
    with torch.no_grad():
        dense = hf(ids[None]).logits[0][PROMPT:]
        exact = masked_hf_logits(hf, ids, th, dense_prefix=PROMPT)[PROMPT:] if th else dense
    gen = Generator.from_pretrained(hf, thresholds=th, sparsity=sparsity, device="cuda", dtype=torch.bfloat16,
                                    compile=True, max_seq_len=LENGTH + 8)
    assert gen.mode == "compiled-graph"
    got = graph_logits(gen, ids)
    assert gen.compile_error is None, gen.compile_error
    err = rel_err(got, exact)
    agree = float((got.argmax(-1) == exact.argmax(-1)).float().mean())
    assert err <= 3e-2 and agree >= 0.9, f"{family} s={sparsity}: rel err {err:.3e}, top-1 agreement {agree:.2f}"
    if sparsity:  # the thresholds matter, and the engine follows them far more closely than dense logits do
        effect = rel_err(exact, dense)
        assert err <= 0.25 * effect, f"{family}: rel err {err:.3e} vs sparsification's own effect {effect:.3e}"
    # the generator's own loop (graph replays, greedy) picks the reference's top tokens
    out = gen.generate(ids[:PROMPT], max_new_tokens=12, stop=[])
    assert gen.mode == "compiled-graph" and gen.compile_error is None
    seq = torch.cat([ids[:PROMPT], torch.tensor(out.tokens[:-1])])
    with torch.no_grad():
        ref = masked_hf_logits(hf, seq, th, dense_prefix=PROMPT) if th else hf(seq[None]).logits[0]
    ref = ref[PROMPT - 1:]
    margin = 4 * float((got - exact).abs().max())
    picked = ref.gather(1, torch.tensor(out.tokens)[:, None])[:, 0]
    assert bool((picked >= ref.max(-1).values - margin).all()), (out.tokens, ref.argmax(-1).tolist())
