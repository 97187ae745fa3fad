"""Per-token relative thresholds (SmolLM2-135M): score |x_i| / rms(x) of the token's own input row, against
plain |x_i|, both applied by the same forward pre-hooks (so the comparison is like for like); optionally only
at the un-normalised sites (attention output, SiLU(gate) * up), where a token's scale varies most. Mode
"abs-sink" is plain |x_i| with each window's first position left dense (a diagnostic: how much of the loss
the attention-sink position carries under the every-position protocol).

    python benchmarks/quality/experiments/token_relative_threshold.py [LEVELS [MODES]]   # 0.4,0.5 abs,rel,rel-unnorm
"""
import sys
import time

import torch

import teal
from teal.arch import get_adapter
from teal.data import token_windows

SAMPLE_TOKENS = 2048  # calibration rows kept per site for the quantiles
levels = [float(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "0.4,0.5").split(",")]
torch.manual_seed(0)
model, tok = teal.load_model("smollm2-135m")
model.eval()
calw = token_windows(tok, "sotu", 16384, 2048, split="calibration")
evw = token_windows(tok, "olmo-wiki", 8192, 2048, split="evaluation")
projs = get_adapter(model).projections()
# projections sharing an input (q/k/v, gate/up) see the same rows: one site per module input
site_of = {k: k.rsplit(".", 1)[0] + "." + {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "attn_out",
                                            "gate": "mlp_in", "up": "mlp_in", "down": "mlp_mid"}[k.rsplit(".", 1)[1]]
           for k in projs}
UNNORMALISED = ("attn_out", "mlp_mid")


def score(x: torch.Tensor, relative: bool) -> torch.Tensor:
    a = x.abs().float()
    return a / x.float().pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12) if relative else a


def calibrate(mode: str) -> dict[str, torch.Tensor]:
    """Sorted scores per site (a sample of rows), under `mode`: abs | rel | rel-unnorm."""
    kept: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for k, m in projs.items():
        site = site_of[k]
        if site in kept or k.endswith((".k", ".v", ".up")):
            continue
        kept[site] = []
        relative = mode == "rel" or (mode == "rel-unnorm" and site.endswith(UNNORMALISED))

        def pre(_m, args, site=site, relative=relative):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            kept[site].append(score(x[:: max(1, x.shape[0] // 256)], relative).flatten())
        hooks.append(m.register_forward_pre_hook(pre))
    with torch.no_grad():
        for w in calw[: max(1, SAMPLE_TOKENS // calw[0].numel() * 4)]:
            model(w[None], use_cache=False)
    for h in hooks:
        h.remove()
    return {site: torch.cat(v).sort().values for site, v in kept.items()}


def evaluate(mode: str, sorted_scores: dict[str, torch.Tensor], level: float) -> tuple[float, float]:
    thresholds = {site: float(v[min(v.numel() - 1, int(level * v.numel()))]) for site, v in sorted_scores.items()}
    counts = {"zero": 0, "total": 0}
    hooks = []
    for k, m in projs.items():
        site = site_of[k]
        relative = mode == "rel" or (mode == "rel-unnorm" and site.endswith(UNNORMALISED))

        def pre(_m, args, site=site, relative=relative):
            x = args[0]
            keep = score(x, relative) > thresholds[site]
            if mode == "abs-sink" and keep.dim() == 3:
                keep[:, 0, :] = True
            counts["zero"] += int((~keep).sum()) * _m.weight.shape[0]
            counts["total"] += keep.numel() * _m.weight.shape[0]
            return (x * keep,)
        hooks.append(m.register_forward_pre_hook(pre))
    try:
        r = teal.eval.perplexity(model, tok, windows=evw, progress=False)
    finally:
        for h in hooks:
            h.remove()
    return counts["zero"] / counts["total"], r["ppl"]


dense = teal.eval.perplexity(model, tok, windows=evw, progress=False)["ppl"]
print(f"dense ppl {dense:.3f}", flush=True)
modes = sys.argv[2].split(",") if len(sys.argv) > 2 else ["abs", "rel", "rel-unnorm"]
for mode in modes:
    t0 = time.time()
    scores = calibrate(mode)
    for level in levels:
        measured, ppl = evaluate(mode, scores, level)
        print(f"{mode:11s} nominal {level} measured {measured:.3f} ppl {ppl:.3f} (+{ppl - dense:.2f})"
              f"  ({time.time() - t0:.0f}s)", flush=True)
