"""The quality path of an 8B model on one GPU, timed through the CLI as a user runs it: a random
Llama-3-8B-shape checkpoint (bf16) with a word-level tokenizer, then ``teal calibrate`` (the default
sequential calibration), ``teal allocate --method greedy`` and ``teal eval ppl`` at 0 and 0.5.

Target (the reliability issue): calibration plus greedy allocation of an 8B model in <= 10 min on one GPU.
Each step runs as its own ``teal`` process with a time limit; a step over its limit is recorded as such
(``rc`` 124), never dropped. ``--device cpu --shape tiny-llama`` is a smoke test."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpu_run import run_info  # noqa: E402

WORDS = [f"w{i}" for i in range(8000)]
SPECIAL = ["<unk>", "<s>", "</s>", "."]
SHAPES = {
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "tiny-llama": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=8,
                       num_key_value_heads=2, vocab_size=8192),
}


def text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) for i in range(len(WORDS))]
    words = rng.choices(WORDS, weights, k=n_words)
    return " ".join(w + (" ." if i % 12 == 11 else "") for i, w in enumerate(words))


def build(root: Path, shape: str, dtype: torch.dtype) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=False, torch_dtype=dtype)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(dtype).eval()
    out = root / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    return out


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", dest="json_path", required=True)
    parser.add_argument("--shape", default="llama-3-8b", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--limit", type=float, default=420.0, help="seconds per step")
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--workdir", default=None, help="where the checkpoint goes (default: a temp dir)")
    args = parser.parse_args()
    device = torch.device(args.device)
    data = {**run_info(device), "shape": args.shape, "target_calibrate_plus_greedy_s": 600.0, "steps": []}
    root = Path(args.workdir or tempfile.mkdtemp(prefix="teal-8b-"))
    t0 = time.perf_counter()
    model_dir = build(root, args.shape, torch.bfloat16)
    data["build_s"] = round(time.perf_counter() - t0, 1)
    corpus = root / "text.txt"
    corpus.write_text(text(400000, 1) + "\n")
    art = root / "thresholds"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    teal = [sys.executable, "-m", "teal.cli"]
    dev = ["--device", args.device]
    steps = [
        ("calibrate", [*teal, "calibrate", str(model_dir), "--data", f"file:{corpus}", "-o", str(art), *dev]),
        ("allocate greedy", [*teal, "allocate", str(model_dir), str(art), "--method", "greedy",
                             "--data", f"file:{corpus}", *dev]),
        ("eval ppl 0,0.5", [*teal, "eval", "ppl", str(model_dir), str(art), "--sparsity", "0,0.5",
                            "--data", f"file:{corpus}", "--tokens", str(args.eval_tokens), *dev]),
    ]
    for name, cmd in steps:
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.limit)
            rc, out = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            rc = 124
            out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        seconds = round(time.perf_counter() - t, 1)
        row = {"step": name, "command": " ".join(["teal", *cmd[3:]]), "rc": rc, "seconds": seconds,
               "output_tail": out[-1500:]}
        data["steps"].append(row)
        print(f"{name:18s} rc={rc:<4d} {seconds:8.1f} s", flush=True)
        if rc != 0:
            print(out[-3000:], flush=True)
            break
    done = {r["step"]: r for r in data["steps"] if r["rc"] == 0}
    if "calibrate" in done and "allocate greedy" in done:
        total = done["calibrate"]["seconds"] + done["allocate greedy"]["seconds"]
        data["calibrate_plus_greedy_s"] = round(total, 1)
        data["target_met"] = total <= 600.0
        print(f"calibrate + greedy: {total:.1f} s (target 600 s: {'met' if total <= 600 else 'MISSED'})")
    else:
        data["target_met"] = False
    Path(args.json_path).write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {args.json_path}")


if __name__ == "__main__":
    main()
