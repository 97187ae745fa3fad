# Loss-driven refinement of the fisher allocation: coordinate descent on per-unit levels
# (units per layer: q|k|v, o, gate|up, down), each move +-DELTA compensated by a uniform additive
# shift of all other projections so the effective (parameter-weighted) sparsity stays at LEVEL;
# a move is kept iff the calibration loss (olmo-wiki calibration split, every position sparsified)
# drops. Then PPL on the olmo-wiki evaluation split (4,096 tokens, windows of 2,048) for fisher vs
# refined. Usage: python loss_refinement.py [LEVEL] [CAL_TOKENS] [CAL_SEQ] [BUDGET_S] [DELTA] [ORDER]
#   [MAX_LAYER]
#   ORDER: "all" (layer order, 4 units each), "mlp" (only gate|up and down units)
import sys, time, math, json
import numpy as np, torch
import torch.nn.functional as F
import teal
from teal.arch import get_adapter, split_key
from teal.data import token_windows
from teal.sparsify import teal_modules, reset_counters, measured_sparsity

torch.set_num_threads(2)
LEVEL = float(sys.argv[1]) if len(sys.argv) > 1 else 0.5
CAL_TOKENS = int(sys.argv[2]) if len(sys.argv) > 2 else 1024
CAL_SEQ = int(sys.argv[3]) if len(sys.argv) > 3 else 512
BUDGET_S = float(sys.argv[4]) if len(sys.argv) > 4 else 900
DELTA = float(sys.argv[5]) if len(sys.argv) > 5 else 0.05
ORDER = sys.argv[6] if len(sys.argv) > 6 else "all"
MAX_LAYER = int(sys.argv[7]) if len(sys.argv) > 7 else 10**9  # only units of layers <= MAX_LAYER
MAXS = 0.95

model, tok = teal.load_model("smollm2-135m"); model.eval()
th = teal.Thresholds.load("out/quality-v2/artifacts/smollm2-135m-magnitude", model=model)
calw = token_windows(tok, "olmo-wiki", CAL_TOKENS, CAL_SEQ, split="calibration")
evw = token_windows(tok, "olmo-wiki", 4096, 2048, split="evaluation")
keys = list(th.proj_sizes)
size = np.array([th.proj_sizes[k] for k in keys], dtype=np.float64)
W = size / size.sum()

teal.sparsify_(model, th, LEVEL, method="fisher", prefill="sparse")
mods = teal_modules(model)


def set_levels(sp):
    for k, s in sp.items():
        mods[k].set_threshold(th.threshold(k, float(s)) if s > 0 else -1.0)


def mean_nll(windows, sp):
    set_levels(sp)
    reset_counters(model)
    tot, n = 0.0, 0
    with torch.inference_mode():
        for w in windows:
            lg = model(input_ids=w[None], use_cache=False).logits[0, :-1].float()
            tot += float(F.cross_entropy(lg, w[1:], reduction="sum")); n += w.numel() - 1
    return tot / n, float(measured_sparsity(model))


def to_vec(sp): return np.array([sp[k] for k in keys])
def to_dict(v): return {k: float(x) for k, x in zip(keys, v)}


def compensate(v, unit_idx, target):
    """Shift every projection outside unit_idx by one additive c (clipped to [0, MAXS]) so that
    the effective sparsity equals target; None if impossible."""
    mask = np.ones(len(v), bool); mask[unit_idx] = False
    def eff(c):
        u = v.copy(); u[mask] = np.clip(v[mask] + c, 0.0, MAXS); return u, float(W @ u)
    lo, hi = -1.0, 1.0
    if eff(lo)[1] > target + 1e-12 or eff(hi)[1] < target - 1e-12:
        return None
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if eff(mid)[1] < target: lo = mid
        else: hi = mid
    return eff(0.5 * (lo + hi))[0]


units = []  # (name, indices)
layers = sorted({split_key(k)[0] for k in keys})
groups = [("qkv", ("q", "k", "v")), ("o", ("o",)), ("gate_up", ("gate", "up")), ("down", ("down",))]
if ORDER == "mlp":
    groups = groups[2:]
for L in [l for l in layers if l <= MAX_LAYER]:
    for g, names in groups:
        idx = [i for i, k in enumerate(keys) if split_key(k)[0] == L and split_key(k)[1] in names]
        if idx:
            units.append((f"L{L}.{g}", np.array(idx)))

sp_f = th.sparsities(LEVEL, "fisher")
v = to_vec(sp_f); target = float(W @ v)
print(f"fisher effective {target:.5f} (th.effective {th.effective(sp_f):.5f}); {len(units)} units; "
      f"cal {calw.shape}, eval {evw.shape}", flush=True)
t0 = time.time(); best, ms = mean_nll(calw, to_dict(v)); t_eval = time.time() - t0
print(f"cal loss fisher {best:.5f} (measured {ms:.4f}); one loss evaluation {t_eval:.2f}s", flush=True)
loss0 = best
accepted = []; n_eval = 1; start = time.time(); stopped = False
for pas in range(10):
    changed = False
    for name, idx in units:
        if time.time() - start + 2 * t_eval > BUDGET_S:
            stopped = True; break
        for d in (+DELTA, -DELTA):
            u = v.copy(); u[idx] = np.clip(v[idx] + d, 0.0, MAXS)
            if np.allclose(u[idx], v[idx]):
                continue
            u = compensate(u, idx, target)
            if u is None:
                continue
            l, ms = mean_nll(calw, to_dict(u)); n_eval += 1
            if l < best - 1e-6:
                accepted.append((pas, name, d, best, l))
                print(f"  pass {pas} {name} {d:+.2f}: {best:.5f} -> {l:.5f} (eff {W @ u:.5f}, "
                      f"measured {ms:.4f}) [{time.time() - start:.0f}s]", flush=True)
                best, v, changed = l, u, True
                break
    print(f"pass {pas} done: {n_eval} evaluations, {len(accepted)} accepted, cal loss {best:.5f}, "
          f"{time.time() - start:.0f}s, stopped={stopped}", flush=True)
    if stopped or not changed:
        break

sp_r = to_dict(v)
print(f"cal loss: fisher {loss0:.5f} -> refined {best:.5f}; effective fisher {target:.5f} refined "
      f"{th.effective(sp_r):.5f}; {len(accepted)} moves accepted of {n_eval - 1} tried", flush=True)
res = {}
for nm, sp in (("fisher", sp_f), ("refined", sp_r)):
    nll, ms = mean_nll(evw, sp)
    res[nm] = (ms, math.exp(nll))
    print(f"EVAL {nm}: measured sparsity {ms:.4f}, PPL {math.exp(nll):.3f}", flush=True)
# per-unit-type mean level, fisher vs refined
for g, names in groups:
    idx = [i for i, k in enumerate(keys) if split_key(k)[1] in names]
    print(f"  {g}: fisher mean level {np.average(to_vec(sp_f)[idx], weights=size[idx]):.4f} "
          f"refined {np.average(v[idx], weights=size[idx]):.4f}")
json.dump({"level": LEVEL, "cal_tokens": CAL_TOKENS, "delta": DELTA, "t_eval": t_eval,
           "loss_fisher": loss0, "loss_refined": best, "accepted": accepted, "eval": res,
           "refined": sp_r}, open(f"/tmp/loss_refinement_{CAL_TOKENS}_{ORDER}_{MAX_LAYER}.json", "w"), indent=1)
