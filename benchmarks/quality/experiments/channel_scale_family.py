"""Per-channel scales c_i in the score |x_i| * c_i beyond the weight column norm (SmolLM2-135M):
CHESS-like channel normalisation c_i = 1 / rms_i(x), and powers of the column norm ||W[:, i]||^a."""
import time, sys, torch
import teal, teal.calibrate
tc = sys.modules["teal.calibrate"]
from teal.data import token_windows
from teal.arch import get_adapter
torch.manual_seed(0)
model, tok = teal.load_model("smollm2-135m")
model.eval()
calw = token_windows(tok, "sotu", 16384, 2048, split="calibration")
evw = token_windows(tok, "olmo-wiki", 8192, 2048, split="evaluation")
ad = get_adapter(model); projs = ad.projections()
x2 = {k: torch.zeros(m.in_features, dtype=torch.float64) for k, m in projs.items()}
n = {"tokens": 0}
hooks = []
for k, m in projs.items():
    def pre(_m, a, k=k):
        x = a[0].detach().double().reshape(-1, x2[k].numel()); x2[k] += (x * x).sum(0)
    hooks.append(m.register_forward_pre_hook(pre))
with torch.no_grad():
    for w in calw[:4]:
        model(w[None], use_cache=False); n["tokens"] += w.numel()
for h in hooks: h.remove()
rms = {k: (x2[k] / n["tokens"]).sqrt().float() for k in projs}
colnorm = {k: m.weight.detach().float().norm(dim=0) for k, m in projs.items()}
variants = {
    "magnitude": None,
    "chess 1/rms": {k: 1.0 / rms[k].clamp_min(1e-6) for k in projs},
    "wa^0.5": {k: colnorm[k].sqrt() for k in projs},
    "wa^1": colnorm,
    "wa^2": {k: colnorm[k] ** 2 for k in projs},
}
orig = tc.column_norms
for name, sc in variants.items():
    t0 = time.time()
    if sc is None:
        th = teal.calibrate(model, tok, windows=calw, progress=False)
    else:
        byid = {id(m.weight): sc[k] / sc[k].mean() for k, m in projs.items()}
        tc.column_norms = lambda w: byid[id(w)]
        th = teal.calibrate(model, tok, windows=calw, score="weight-aware", progress=False)
        tc.column_norms = orig
    for s in (0.4, 0.5):
        teal.sparsify_(model, th, s, prefill="sparse")
        r = teal.eval.perplexity(model, tok, windows=evw, progress=False); teal.densify_(model)
        print(f"{name:12s} {s} measured {r['measured_sparsity']:.3f} ppl {r['ppl']:.3f}  ({time.time()-t0:.0f}s)", flush=True)
