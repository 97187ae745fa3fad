"""Why do sparse CUDA-graph tokens differ from eager tokens with the fused attention op? (H200, fp32)

Builds the decode benchmark's 4-layer fp32 twin of the Llama-3-8B shape, sparsifies it at 50 % with
the same thresholds, and for each (attention op on/off, sparse path) generates 12 greedy tokens in
`compiled-graph` and in `eager` mode. For both sequences it scores every generated token with HF under
the same input masks (`masked_hf_logits`): the argmax agreement and the top-1 / top-2 logit gap at the
first diverging step tell a near-tie flip (gap ~1e-5) from a wrong computation (gap large).

    PYTHONPATH=. python3 benchmarks/scripts/twin_graph_vs_eager.py
"""

from __future__ import annotations

import copy

import torch
from transformers import AutoModelForCausalLM

from teal.bench.decode import TWIN_SEED
from teal.engine import Generator, engine_from_hf_model
from teal.engine.config import shape_hf_config
from teal.engine.reference import activation_thresholds, masked_hf_logits


def main() -> None:
    cfg = copy.deepcopy(shape_hf_config("llama-3-8b"))
    cfg.num_hidden_layers = 4
    with torch.random.fork_rng(devices=[0]), torch.device("cuda"):
        torch.manual_seed(TWIN_SEED)
        hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    ids = torch.randint(0, cfg.vocab_size, (48,), device="cuda", generator=torch.Generator(device="cuda").manual_seed(3))
    prompt = ids[:32]
    for fused in (False, True):
        for path in ("kernel", "producer"):
            for sparse in (False, True):
                e = engine_from_hf_model(hf, max_seq_len=64)
                e.fused_attention = fused
                e.set_sparse_path(path)
                th = None
                if sparse:
                    e.to_layout(transposed=True)
                    th = activation_thresholds(e, ids[:40], 0.5)
                    e.set_thresholds(th)
                seqs = {m: Generator(e, mode=m).generate(prompt, 12, stop=[]).tokens for m in ("compiled-graph", "eager")}
                line = f"fused={fused!s:5} path={path:8} sparse={sparse!s:5} graph==eager {seqs['compiled-graph'] == seqs['eager']}"
                for m, toks in seqs.items():
                    full = torch.cat([prompt, torch.tensor(toks, device="cuda")])
                    with torch.inference_mode():
                        ref = (masked_hf_logits(hf, full, th, dense_prefix=32) if sparse
                               else hf(full[None]).logits[0]).float()
                    steps = ref[31:31 + len(toks)]
                    agree = [int(steps[i].argmax()) == t for i, t in enumerate(toks)]
                    first_bad = next((i for i, ok in enumerate(agree) if not ok), None)
                    gap = None
                    if first_bad is not None:
                        top2 = steps[first_bad].topk(2).values
                        gap = float(top2[0] - top2[1])
                    line += f" | {m}: HF agrees {sum(agree)}/{len(toks)} first_bad={first_bad} gap={gap}"
                print(line, flush=True)
                del e


if __name__ == "__main__":
    main()
