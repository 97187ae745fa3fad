# Fisher at the operating point: gradients from the model already sparsified at the fisher allocation.
import time, torch, numpy as np, sys
import torch.nn.functional as F
import teal
from teal import stats
from teal.data import token_windows
from teal.arch import get_adapter
from teal.allocate_xl import weighted_histogram, damage_curve, solve_levels, FISHER_GRID_STEP
torch.set_num_threads(2)
model, tok = teal.load_model("smollm2-135m"); model.eval()
th = teal.Thresholds.load("out/quality-v2/artifacts/smollm2-135m-magnitude", model=model)
evw = token_windows(tok, "olmo-wiki", 4096, 2048, split="evaluation")
fw = token_windows(tok, "olmo-wiki", 2048, 512, split="calibration")
LEVEL = float(sys.argv[1]) if len(sys.argv) > 1 else 0.5
ad = get_adapter(model); projs = ad.projections()
def fisher_at(op_sparsities):
    thr = {k: th.threshold(k, s) for k, s in op_sparsities.items()} if op_sparsities else None
    damage = {k: torch.zeros(stats.NUM_BINS, dtype=torch.float64) for k in projs}
    inputs = {}; hooks = []
    for k, m in projs.items():
        def pre(_m, a, k=k):
            x = a[0]
            inputs[k] = x.detach()
            if thr is not None and thr[k] >= 0:
                return (torch.where(x.abs() > thr[k], x, torch.zeros_like(x)),)
        def bw(_m, gi, go, k=k):
            x = inputs.pop(k)
            damage[k] += weighted_histogram(x.abs().float(), (gi[0].float() * x.float()).pow(2))
        hooks += [m.register_forward_pre_hook(pre), m.register_full_backward_hook(bw)]
    for p in model.parameters(): p.requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    with torch.enable_grad():
        for w in fw:
            emb = model.get_input_embeddings()(w[None]).detach().requires_grad_(True)
            lg = model(inputs_embeds=emb, use_cache=False).logits[0].float()
            lab = torch.multinomial(torch.softmax(lg.detach(), -1), 1, generator=gen)[:, 0]
            F.cross_entropy(lg, lab, reduction="sum").backward()
    for h in hooks: h.remove()
    return damage
def solve(damage, level):
    keys = list(th.proj_sizes)
    grid = np.linspace(0.0, 0.95, int(round(0.95 / FISHER_GRID_STEP)) + 1)
    curves = [(grid, damage_curve(th, k, damage[k], grid)) for k in keys]
    sol = solve_levels(curves, [th.proj_sizes[k] for k in keys], [0.0, level])
    return {k: float(sol[1, j]) for j, k in enumerate(keys)}
def ppl_at(sp):
    th.allocations["tmp"] = {"levels": [0.0, LEVEL], "sparsities": {k: [0.0, v] for k, v in sp.items()}}
    teal.sparsify_(model, th, LEVEL, method="tmp", prefill="sparse")
    r = teal.eval.perplexity(model, tok, windows=evw, progress=False); teal.densify_(model)
    return round(r["measured_sparsity"], 4), round(r["ppl"], 3)
sp1 = th.sparsities(LEVEL, "fisher")
print("fisher", ppl_at(sp1), flush=True)
t0 = time.time()
sp = sp1
for it in range(2):
    d2 = fisher_at(sp)
    sp = solve(d2, LEVEL)
    print(f"fisher-op iter {it+1}", round(time.time() - t0), ppl_at(sp), flush=True)
    # damped: average with previous
    avg = {k: 0.5 * (sp[k] + sp1[k]) for k in sp}
    print(f"  avg with fisher", ppl_at(avg), flush=True)
