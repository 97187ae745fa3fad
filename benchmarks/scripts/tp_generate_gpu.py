"""`teal generate --tp 2` on two GPUs against one device, from a saved HF checkpoint (random Llama weights).

    NCCL_NVLS_ENABLE=0 PYTHONPATH=$PWD python3 benchmarks/scripts/tp_generate_gpu.py --json OUT.json

Saves a small random Llama (GQA) as safetensors in several files, calibrates a thresholds artifact on random
ids, then generates greedily with the single-device engine and with `teal.engine.tp.generate_tp` (each rank
reading its slices of the checkpoint), dense and at 50 %, in fp32 (tokens must match) and bf16 (reported).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from _gpu_run import run_info  # noqa: E402 (benchmarks/scripts is on sys.path when run as a script)
import teal
from teal.bench.results import write_json
from teal.engine import Generator
from teal.engine.tp import generate_tp


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", dest="json_path", required=True)
    parser.add_argument("--new-tokens", type=int, default=48)
    args = parser.parse_args()
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                                  num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
                                  max_position_embeddings=1024, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config).eval()
    data = {**run_info(torch.device("cuda", 0)), "benchmark": "generate-tp", "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, art = Path(tmp, "ckpt"), Path(tmp, "artifact")
        hf.save_pretrained(ckpt, safe_serialization=True, max_shard_size="50MB")
        windows = torch.randint(0, 32000, (8, 128), generator=torch.Generator().manual_seed(1))
        teal.calibrate(hf, None, windows=windows, tokens=1024, progress=False).save(art)
        prompt = [int(t) for t in torch.randint(0, 32000, (32,), generator=torch.Generator().manual_seed(2))]
        for dtype in (torch.float32, torch.bfloat16):
            for sparsity in (0.0, 0.5):
                th = teal.Thresholds.load(art) if sparsity else None
                gen = Generator.from_pretrained(str(ckpt), thresholds=th, sparsity=sparsity, dtype=dtype,
                                                device="cuda")
                gen.generate(prompt, args.new_tokens, stop=[])
                one = gen.generate(prompt, args.new_tokens, stop=[])
                del gen
                torch.cuda.empty_cache()
                t = time.perf_counter()
                tp = generate_tp(str(ckpt), 2, prompt, thresholds=art if sparsity else None, sparsity=sparsity,
                                 max_new_tokens=args.new_tokens, device="cuda", dtype=dtype, stream=False)
                row = {"dtype": str(dtype).removeprefix("torch."), "sparsity": sparsity,
                       "tokens_match": tp["tokens"][: len(one.tokens)] == one.tokens,
                       "first_mismatch": next((i for i, (a, b) in enumerate(zip(tp["tokens"], one.tokens)) if a != b),
                                              None),
                       "one_device_tokens_per_s": one.tokens_per_s, "tp_tokens_per_s": tp["tokens_per_s"],
                       "tp_all_reduce": tp["all_reduce"], "tp_summary": tp["summary"],
                       "tp_call_s": time.perf_counter() - t}
                data["rows"].append(row)
                print(json.dumps(row), flush=True)
                write_json(data, args.json_path)  # after every row: a run cut short keeps what it measured
    data["passed"] = all(r["tokens_match"] for r in data["rows"] if r["dtype"] == "float32")
    write_json(data, args.json_path)
    print("passed:", data["passed"])


if __name__ == "__main__":
    main()
