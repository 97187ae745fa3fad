# Sparse + low-rank (R-Sparse-like): y = W (x*m) + A (B (x*(1-m))), A B = rank-r approximation of W
# (plain: truncated SVD of W; weighted: SVD of W diag(sigma), B = V_r^T diag(1/sigma), sigma_i = RMS
# of the DROPPED part of input channel i on the calibration text, dense model, at that level's thresholds).
# Compared at equal bytes: effective sparsity = measured activation sparsity - sum r(N+K) / sum N K
# (over all sparsified projections; measured sparsity is already weighted by N K).
#
# usage (repository root, CPU):
#   python benchmarks/quality/experiments/lowrank_compensation.py check
#       full-rank compensation must reproduce the dense logits (one window); rank 0 = plain TEAL
#   python benchmarks/quality/experiments/lowrank_compensation.py levels VARIANT RANKS LEVELS
#       every (rank fraction, nominal level) pair, e.g. `levels plain 0,1/32 0.5,0.55`
#   python benchmarks/quality/experiments/lowrank_compensation.py targets VARIANT RANKS TARGETS
#       for each rank fraction and target effective sparsity: search nominal levels (secant steps)
#       until two runs bracket the target, then interpolate log PPL linearly in effective sparsity
# VARIANT: plain | weighted. RANKS: ','-list of fractions of min(N, K) (0 = plain TEAL, no low-rank).
# Thresholds are cached in /tmp/teal_lowrank_cache (delete to recalibrate).
import math, os, sys, time
from fractions import Fraction
import torch
import teal
from teal.artifact import Thresholds
from teal.data import token_windows
from teal.arch import get_adapter
from teal.nn import TealLinear, dense_linear

torch.manual_seed(0)
torch.set_num_threads(2)
CACHE = "/tmp/teal_lowrank_cache"
mode = sys.argv[1] if len(sys.argv) > 1 else "check"
model, tok = teal.load_model("smollm2-135m")
model.eval()
calw = token_windows(tok, "sotu", 16384, 2048, split="calibration")
evw = token_windows(tok, "olmo-wiki", 8192, 2048, split="evaluation")
ad = get_adapter(model); sites = ad.sites()
site_of = {p: s for s, ps in sites.items() for p in ps}
t0 = time.time()
if os.path.isdir(CACHE):
    th = Thresholds.load(CACHE)
else:
    th = teal.calibrate(model, tok, windows=calw, progress=False)
    th.save(CACHE)
th.check_model = lambda *a, **k: None
assert th.score == "magnitude"
print("calibrate/load", round(time.time() - t0, 1), flush=True)

W = {p: dense_linear(m).weight.detach() for p, m in ad.projections().items()}
assert all(dense_linear(m).bias is None for m in ad.projections().values())
W_total = sum(w.numel() for w in W.values())


def rank_of(p, frac):
    N, K = W[p].shape
    r = frac * min(N, K)
    assert r == int(r), (p, frac)
    return int(r)


def lr_fraction(frac):
    return sum(rank_of(p, frac) * sum(W[p].shape) for p in W) / W_total


_svd = {}


def plain_svd(p):
    if p not in _svd:
        U, S, Vh = torch.linalg.svd(W[p].double(), full_matrices=False)
        _svd[p] = (U * S, Vh)
    return _svd[p]


def dropped_rms(s):
    """sigma[site]: RMS over calibration tokens of x_i * 1(|x_i| <= t) (dense model), float64."""
    thr = {site: th.threshold(ps[0], s) for site, ps in sites.items()}
    projs = ad.projections(); acc = {}; hooks = []
    for site, ps in sites.items():
        acc[site] = [0.0, 0]
        def hook(_m, a, site=site):
            x = a[0].reshape(-1, a[0].shape[-1]).float()
            d = torch.where(x.abs() > thr[site], 0.0, x)
            acc[site][0] = acc[site][0] + (d.double() ** 2).sum(0); acc[site][1] += x.shape[0]
        hooks.append(projs[ps[0]].register_forward_pre_hook(hook))
    with torch.inference_mode():
        for w in calw:
            model.model(input_ids=w[None])
    for h in hooks: h.remove()
    return {site: (q / n).sqrt() for site, (q, n) in acc.items()}


_sigma = {}


def factors(variant, frac, s):
    """{proj: (A [N, r] fp32, B [r, K] fp32)}"""
    out = {}
    if frac == 0:
        return out
    if variant == "weighted" and s not in _sigma:
        t = time.time(); _sigma[s] = dropped_rms(s); print("sigma stats", s, round(time.time() - t, 1), flush=True)
    for p in W:
        r = rank_of(p, frac)
        if variant == "plain":
            US, Vh = plain_svd(p)
            A, B = US[:, :r], Vh[:r]
        else:
            sig = _sigma[s][site_of[p]]
            sig = sig.clamp_min(1e-3 * sig.mean())
            U, S, Vh = torch.linalg.svd(W[p].double() * sig[None], full_matrices=False)
            A, B = U[:, :r] * S[:r], Vh[:r] / sig[None]
        out[p] = (A.float().contiguous(), B.float().contiguous())
    return out


def attach(fac):
    """Forward hooks on the TealLinear modules adding A (B (x - x*keep)), keep exactly TEAL's mask."""
    hooks = []
    for p, m in ad.projections().items():
        assert isinstance(m, TealLinear) and m.col_scale is None and m.dense_prefix == 0
        if p not in fac:
            continue
        A, B = fac[p]
        def hook(mod, args, out, A=A, B=B):
            x = args[0]
            keep = x.abs().float() > mod.threshold  # as TealLinear._mask (ties dropped)
            d = x * (~keep).to(x.dtype)
            return out + (d @ B.T) @ A.T
        hooks.append(m.register_forward_hook(hook))
    return hooks


def run(variant, frac, s, windows=evw):
    fac = factors(variant, frac, s)
    teal.sparsify_(model, th, s, prefill="sparse")
    hooks = attach(fac)
    t = time.time()
    r = teal.eval.perplexity(model, tok, windows=windows, progress=False)
    for h in hooks: h.remove()
    teal.densify_(model)
    lf = lr_fraction(frac)
    res = dict(variant=variant if frac else "teal", frac=frac, s=s, meas=r["measured_sparsity"], lr=lf,
               eff=r["measured_sparsity"] - lf, ppl=r["ppl"])
    print(f"RUN variant={res['variant']} rank_frac={Fraction(frac).limit_denominator(1000)} nominal={s:.4f} "
          f"measured={res['meas']:.4f} lowrank_bytes={lf:.4f} effective={res['eff']:.4f} ppl={res['ppl']:.4f} "
          f"({time.time() - t:.0f}s)", flush=True)
    return res


def parse_fracs(a):
    return [float(Fraction(x)) for x in a.split(",")]


if mode == "check":
    w1 = evw[:1]
    with torch.inference_mode():
        ref = model(input_ids=w1, use_cache=False).logits
    for frac, s in ((1.0, 0.5), (0.0, 0.5)):
        fac = factors("plain", frac, s)
        teal.sparsify_(model, th, s, prefill="sparse")
        hooks = attach(fac)
        with torch.inference_mode():
            lg = model(input_ids=w1, use_cache=False).logits
        from teal.sparsify import measured_sparsity
        print(f"check rank_frac={frac} s={s}: max|logit - dense| = {(lg - ref).abs().max().item():.3e} "
              f"(measured sparsity {measured_sparsity(model):.4f})", flush=True)
        for h in hooks: h.remove()
        teal.densify_(model)
elif mode == "levels":
    variant, fracs, levels = sys.argv[2], parse_fracs(sys.argv[3]), [float(x) for x in sys.argv[4].split(",")]
    for frac in fracs:
        for s in levels:
            run(variant, frac, s)
elif mode == "targets":
    variant, fracs, targets = sys.argv[2], parse_fracs(sys.argv[3]), [float(x) for x in sys.argv[4].split(",")]
    summary = []
    for frac in fracs:
        lf = lr_fraction(frac)
        for tgt in targets:
            pts = []
            s = round(tgt + lf, 4)  # first guess: measured ~ nominal
            for it in range(5):
                pts.append(run(variant, frac, s))
                lo = [q for q in pts if q["eff"] <= tgt]; hi = [q for q in pts if q["eff"] >= tgt]
                if lo and hi:
                    break
                e = pts[-1]["eff"]
                step = tgt - e
                step += math.copysign(0.004, step)  # overshoot a little so the next run brackets
                s = round(s + step, 4)
            lo = max(lo, key=lambda q: q["eff"]); hi = min(hi, key=lambda q: q["eff"])
            if hi["eff"] == lo["eff"]:
                ppl = lo["ppl"]
            else:
                w = (tgt - lo["eff"]) / (hi["eff"] - lo["eff"])
                ppl = math.exp((1 - w) * math.log(lo["ppl"]) + w * math.log(hi["ppl"]))
            summary.append((variant if frac else "teal", frac, tgt, ppl, lo, hi))
            print(f"INTERP variant={variant if frac else 'teal'} rank_frac={Fraction(frac).limit_denominator(1000)} "
                  f"effective={tgt} ppl={ppl:.3f} (between eff {lo['eff']:.4f}->{lo['ppl']:.3f} and "
                  f"{hi['eff']:.4f}->{hi['ppl']:.3f})", flush=True)
    print("SUMMARY")
    for v, frac, tgt, ppl, lo, hi in summary:
        print(f"  {v:8s} r={Fraction(frac).limit_denominator(1000)!s:5s} eff {tgt}: ppl {ppl:.3f}")
else:
    raise SystemExit(f"unknown mode {mode!r}")
