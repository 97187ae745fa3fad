import time, math, torch, sys
import teal
from teal.data import token_windows
from teal.arch import get_adapter
torch.manual_seed(0)
model, tok = teal.load_model("smollm2-135m")
model.eval()
calw = token_windows(tok, "sotu", 16384, 2048, split="calibration")
evw = token_windows(tok, "olmo-wiki", 8192, 2048, split="evaluation")
ad = get_adapter(model)
cfg = model.config
d = cfg.hidden_size; H = cfg.num_attention_heads; Hkv = cfg.num_key_value_heads; D = d // H
cov = torch.zeros(d, d, dtype=torch.float64)
covo = torch.zeros(Hkv, D, D, dtype=torch.float64)
hooks = []
def norm_hook(mod, args):
    h = args[0].double().reshape(-1, d)
    u = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + mod.variance_epsilon)
    cov.add_(u.T @ u)
def o_hook(mod, args):
    a = args[0].double().reshape(-1, H, D)
    g = a.reshape(-1, Hkv, H // Hkv, D).transpose(0, 1).reshape(Hkv, -1, D)
    covo.add_(g.transpose(1, 2) @ g)
for L in ad.layers:
    hooks.append(L.input_layernorm.register_forward_pre_hook(norm_hook))
    hooks.append(L.post_attention_layernorm.register_forward_pre_hook(norm_hook))
    hooks.append(L.self_attn.o_proj.register_forward_pre_hook(o_hook))
t0 = time.time()
with torch.inference_mode():
    for w in calw[:4]:
        model.model(input_ids=w[None])
for h in hooks: h.remove()
print("cov", time.time() - t0, flush=True)
ev, Q = torch.linalg.eigh(cov); Q = Q.flip(-1); ev = ev.flip(-1)
print("resid spectrum top/median", (ev[:8] / ev.sum()).tolist(), float(ev[d//2] / ev.sum()))
R = []
for g in range(Hkv):
    e, r = torch.linalg.eigh(covo[g]); R.append(r.flip(-1))

def ppl(m, windows):
    return teal.eval.perplexity(m, tok, windows=windows, progress=False)

@torch.no_grad()
def rotate(model, Q, R, resid=True, vo=True):
    ad = get_adapter(model)
    Qf = Q
    if resid:
        E = model.model.embed_tokens.weight
        lm = model.lm_head.weight
        gf = model.model.norm.weight.double()
        new_lm = (lm.double() * gf) @ Qf
        model.model.embed_tokens.weight.data = (E.double() @ Qf).float()
        model.lm_head.weight = torch.nn.Parameter(new_lm.float())
        model.config.tie_word_embeddings = False
        model.model.norm.weight.fill_(1.0)
    for L in ad.layers:
        at, mlp = L.self_attn, L.mlp
        if resid:
            for norm, projs in ((L.input_layernorm, (at.q_proj, at.k_proj, at.v_proj)), (L.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj))):
                g = norm.weight.double()
                for p in projs:
                    p.weight.data = ((p.weight.double() * g) @ Qf).float()
                norm.weight.fill_(1.0)
            for p in (at.o_proj, mlp.down_proj):
                p.weight.data = (Qf.T @ p.weight.double()).float()
        if vo:
            Wv = at.v_proj.weight.double().clone(); Wo = at.o_proj.weight.double().clone()
            for g in range(Hkv):
                Wv[g*D:(g+1)*D] = R[g].T @ Wv[g*D:(g+1)*D]
                for h in range(g*(H//Hkv), (g+1)*(H//Hkv)):
                    Wo[:, h*D:(h+1)*D] = Wo[:, h*D:(h+1)*D] @ R[g]
            at.v_proj.weight.data = Wv.float(); at.o_proj.weight.data = Wo.float()

base = ppl(model, evw); print("dense", base["ppl"], flush=True)
def sweep(tag):
    out = {}
    for score in ("magnitude", "weight-aware"):
        th = teal.calibrate(model, tok, windows=calw, score=score, progress=False)
        for s in (0.4, 0.5):
            teal.sparsify_(model, th, s, prefill="sparse")
            r = ppl(model, evw); teal.densify_(model)
            print(tag, score, s, round(r["measured_sparsity"], 3), round(r["ppl"], 3), flush=True)
sweep("orig")
import copy
which = sys.argv[1] if len(sys.argv) > 1 else "both"
rotate(model, Q, R, resid=which in ("both", "resid"), vo=which in ("both", "vo"))
r = ppl(model, evw); print("dense rotated", r["ppl"], flush=True)
sweep("rot-" + which)
