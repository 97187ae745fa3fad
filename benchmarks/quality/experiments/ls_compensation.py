# Least-squares compensation of dynamic input sparsity: W' = W C_xm (C_mm + lam I)^-1
import time, torch, sys
import teal
from teal.data import token_windows
from teal.arch import get_adapter
torch.manual_seed(0)
torch.set_num_threads(2)
model, tok = teal.load_model("smollm2-135m")
model.eval()
calw = token_windows(tok, "sotu", 16384, 2048, split="calibration")
evw = token_windows(tok, "olmo-wiki", 8192, 2048, split="evaluation")
ad = get_adapter(model); projs = ad.projections(); sites = ad.sites()
th = teal.calibrate(model, tok, windows=calw, progress=False)
th.check_model = lambda *a, **k: None
levels = [float(x) for x in sys.argv[1].split(",")] if len(sys.argv) > 1 else [0.5]

orig = {k: m.weight.detach().clone() for k, m in projs.items()}
for s in levels:
    thr = {site: th.threshold(ps[0], s) for site, ps in sites.items()}
    Cxm = {}; Cmm = {}
    hooks = []
    for site, ps in sites.items():
        m0 = projs[ps[0]]
        K = m0.in_features
        Cxm[site] = torch.zeros(K, K, dtype=torch.float64); Cmm[site] = torch.zeros(K, K, dtype=torch.float64)
        def hook(_m, a, site=site, K=K):
            x = a[0].reshape(-1, K).float()
            m = torch.where(x.abs() > thr[site], x, 0.0)
            Cxm[site] += (x.T @ m).double(); Cmm[site] += (m.T @ m).double()
        hooks.append(m0.register_forward_pre_hook(hook))
    t0 = time.time()
    with torch.inference_mode():
        for w in calw:
            model.model(input_ids=w[None])
    for h in hooks: h.remove()
    print("stats", round(time.time() - t0, 1), flush=True)
    for lam in [float(v) for v in sys.argv[2].split(",")]:
        for site, ps in sites.items():
            if len(sys.argv) > 3 and not site.endswith(tuple(sys.argv[3].split(","))): continue
            C = Cmm[site]; lamI = lam * torch.diag(C).mean() * torch.eye(C.shape[0], dtype=C.dtype)
            A = torch.linalg.solve(C + lamI, Cxm[site].T).T  # A = Cxm (Cmm+lam)^-1
            for p in ps:
                projs[p].weight.data = (orig[p].double() @ A).float()
        teal.sparsify_(model, th, s, prefill="sparse")
        r = teal.eval.perplexity(model, tok, windows=evw, progress=False)
        print("compensated", s, lam, round(r["measured_sparsity"], 3), round(r["ppl"], 3), flush=True)
        teal.densify_(model)
        for p in projs: projs[p].weight.data = orig[p].clone()
