import time, torch, sys
import teal, sys as _s
import teal.calibrate
tc = _s.modules["teal.calibrate"]
from teal.data import token_windows
from teal.arch import get_adapter
import torch.nn.functional as F
torch.manual_seed(0)
model, tok = teal.load_model("smollm2-135m")
model.eval()
calw = token_windows(tok, "sotu", 16384, 2048, split="calibration")
fw = token_windows(tok, "sotu", 4096, 512, split="calibration")
evw = token_windows(tok, "olmo-wiki", 8192, 2048, split="evaluation")
ad = get_adapter(model); projs = ad.projections()
g2 = {k: torch.zeros(m.in_features, dtype=torch.float64) for k, m in projs.items()}
g2x2 = {k: torch.zeros(m.in_features, dtype=torch.float64) for k, m in projs.items()}
x2 = {k: torch.zeros(m.in_features, dtype=torch.float64) for k, m in projs.items()}
inputs = {}; hooks = []
for k, m in projs.items():
    def pre(_m, a, k=k): inputs[k] = a[0].detach()
    def bw(_m, gi, go, k=k):
        x = inputs.pop(k).double().reshape(-1, g2[k].numel()); g = gi[0].double().reshape(-1, g2[k].numel())
        g2[k] += (g * g).sum(0); g2x2[k] += (g * g * x * x).sum(0); x2[k] += (x * x).sum(0)
    hooks += [m.register_forward_pre_hook(pre), m.register_full_backward_hook(bw)]
for p in model.parameters(): p.requires_grad_(False)
gen = torch.Generator().manual_seed(0)
t0 = time.time()
with torch.enable_grad():
    for w in fw:
        emb = model.get_input_embeddings()(w[None]).detach().requires_grad_(True)
        lg = model(inputs_embeds=emb, use_cache=False).logits[0].float()
        lab = torch.multinomial(torch.softmax(lg.detach(), -1), 1, generator=gen)[:, 0]
        F.cross_entropy(lg, lab, reduction="sum").backward()
for h in hooks: h.remove()
print("fisher pass", time.time() - t0, flush=True)
variants = {
    "fch-g": {k: g2[k].sqrt().float() for k in projs},
    "fch-gx": {k: (g2x2[k] / x2[k].clamp_min(1e-30)).sqrt().float() for k in projs},
}
byid = {}
orig_cn = tc.column_norms
for name, sc in variants.items():
    for k, m in projs.items(): byid[id(m.weight)] = sc[k] / sc[k].mean()
    tc.column_norms = lambda w: byid[id(w)]
    th = teal.calibrate(model, tok, windows=calw, score="weight-aware", progress=False)
    tc.column_norms = orig_cn
    for s in (0.4, 0.5):
        teal.sparsify_(model, th, s, prefill="sparse")
        r = teal.eval.perplexity(model, tok, windows=evw, progress=False); teal.densify_(model)
        print(name, s, round(r["measured_sparsity"], 3), round(r["ppl"], 3), flush=True)
