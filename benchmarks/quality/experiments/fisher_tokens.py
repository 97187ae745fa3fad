# Does a larger Fisher budget help? SmolLM2, fisher allocation from 2,048 (report) vs 8,192 tokens.
import sys, time, torch
import teal
from teal.data import token_windows
torch.set_num_threads(2)
model, tok = teal.load_model("smollm2-135m"); model.eval()
th = teal.Thresholds.load(sys.argv[1], model=model)  # the report's magnitude artifact
evw = token_windows(tok, "olmo-wiki", 4096, 2048, split="evaluation")
def ppl(level):
    teal.sparsify_(model, th, level, method="fisher", prefill="sparse")
    r = teal.eval.perplexity(model, tok, windows=evw, progress=False); teal.densify_(model)
    return round(r["measured_sparsity"], 4), round(r["ppl"], 3)
print("fisher 2048 tokens:", ppl(0.5), ppl(0.55), flush=True)
for n in (8192,):
    t0 = time.time()
    w = token_windows(tok, "olmo-wiki", n, 512, split="calibration")
    teal.allocate(model, th, "fisher", windows=w, step=0.05, progress=False)
    print(f"fisher {n} tokens ({time.time() - t0:.0f} s):", ppl(0.5), ppl(0.55), flush=True)
