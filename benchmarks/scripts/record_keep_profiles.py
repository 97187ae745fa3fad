"""Record the per-channel keep frequencies of real models (CPU): benchmarks/profiles/{model}.safetensors.

For each model: calibrate thresholds on the calibration half of the text (magnitude score, uniform
allocation, sequential calibration at the profile's levels), then count, at each level, how often each
input channel of every site survives its threshold over the evaluation half of the same text
(`teal.keep_profile.record`). The benchmarks draw survivor masks from these files
(`teal bench kernels --masks real:smollm2-135m`, `teal bench decode --masks real:gemma3-270m`).

Run from the repository root:
    PYTHONPATH=$PWD python benchmarks/scripts/record_keep_profiles.py
    (options: --models smollm2-135m,gemma3-270m --levels 0.4,0.5,0.65 --data sotu --tokens 8192 ...)
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--levels", default="0.4,0.5,0.65")
    ap.add_argument("--data", default="sotu")
    ap.add_argument("--calibration-tokens", type=int, default=4096)
    ap.add_argument("--sequential-tokens", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens counted (evaluation split), before skip")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--skip", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "profiles"))
    args = ap.parse_args(argv)

    import teal
    from teal.data import token_windows
    from teal.keep_profile import record
    from teal.models import load_model

    torch.set_num_threads(2)
    levels = [float(v) for v in args.levels.split(",")]
    command = "PYTHONPATH=$PWD python benchmarks/scripts/record_keep_profiles.py " + shlex.join(
        sys.argv[1:] if argv is None else argv)
    for name in args.models.split(","):
        t0 = time.perf_counter()
        model, tok = load_model(name, dtype=torch.float32, device="cpu")
        model.eval()
        th = teal.calibrate(model, tok, data=args.data, tokens=args.calibration_tokens, seq_len=args.seq_len,
                            levels=levels, sequential_tokens=args.sequential_tokens, progress=True)
        windows = token_windows(tok, args.data, args.tokens, args.seq_len, split="evaluation")
        info = {"name": name, "data": args.data, "split": "evaluation", "command": command,
                "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "teal_version": teal.__version__, "torch": torch.__version__, "dtype": "float32",
                "device": "cpu"}
        profile = record(model, th, levels, windows, skip=args.skip, info=info)
        path = profile.save(Path(args.out) / f"{name}.safetensors")
        print(f"{name}: {path} ({time.perf_counter() - t0:.0f} s); measured sparsity "
              + ", ".join(f"{k}: {v:.4f}" for k, v in profile.info["measured_sparsity"].items()), flush=True)


if __name__ == "__main__":
    main()
