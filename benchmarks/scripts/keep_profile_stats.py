"""What the recorded keep profiles hold (CPU, reads benchmarks/profiles/*.safetensors).

Per model, level and site kind (averaged over layers):
- the spread of the per-channel keep frequencies (quantiles 5/25/50/75/95 %, share of channels kept at
  under 10 % and over 90 % of tokens);
- the per-token keep fraction's spread (5-95 % quantiles);
- index structure: the spread (std / mean) of the mean frequency over 8 and 32 contiguous channel blocks in the
  recorded channel order, against the same channels randomly permuted (what `teal.bench.masks.stretch` does);
- the imbalance of masks sampled from the profile's middle layer stretched to Llama-3-8B's widths (as
  `teal bench kernels --masks real:...` does: o's input head by head) over 132 static slices, against uniform
  masks at the same rate.

Run: PYTHONPATH=$PWD python benchmarks/scripts/keep_profile_stats.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from teal.bench.masks import PROFILE_DIR, MaskSource, imbalance, index_structure, sample_masks
from teal.keep_profile import SITES, KeepProfile

WIDTH = {"attn_in": 4096, "attn_out": 4096, "mlp_in": 4096, "mlp_mid": 14336}  # Llama-3-8B


def main() -> None:
    paths = [Path(p) for p in sys.argv[1:]] or sorted(PROFILE_DIR.glob("*.safetensors"))
    print("| model | s | site | freq q05 / q25 / q50 / q75 / q95 | < 0.1 | > 0.9 | token keep q05-q95 | "
          "block spread 8 (32): recorded / permuted | busiest of 132 slices, 8B width: real / uniform |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in paths:
        profile = KeepProfile.load(path)
        for level in profile.levels:
            for site in SITES:
                freqs = profile.frequencies(level, site)
                allf = torch.cat(freqs)
                q = torch.quantile(allf, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64))
                tq = torch.stack(profile.rate_quantiles(level, site))
                s8 = [index_structure(f, 8, seed=i) for i, f in enumerate(freqs)]
                s32 = [index_structure(f, 32, seed=i) for i, f in enumerate(freqs)]

                def mean(rows, key):
                    return sum(r[key] for r in rows) / len(rows)

                layer = profile.n_layers // 2
                p = MaskSource(f"real:{path.stem}", profile).probabilities(site, layer, WIDTH[site], level, 0, 128)
                real = imbalance(sample_masks(p, 256, rate_quantiles=profile.rate_quantiles(level, site)[layer]),
                                 (132,))["132"]["max_over_mean"]
                uniform = imbalance(sample_masks(torch.full_like(p, 1 - level), 256), (132,))["132"]["max_over_mean"]
                print(f"| {profile.name} | {level:g} | {site} | " + " / ".join(f"{v:.2f}" for v in q.tolist())
                      + f" | {float((allf < 0.1).double().mean()):.0%} | {float((allf > 0.9).double().mean()):.0%} | "
                      f"{float(tq[:, 5].mean()):.2f}-{float(tq[:, 95].mean()):.2f} | "
                      f"{mean(s8, 'recorded_order'):.3f} ({mean(s32, 'recorded_order'):.3f}) / "
                      f"{mean(s8, 'permuted'):.3f} ({mean(s32, 'permuted'):.3f}) | {real:.2f} / {uniform:.2f} |")


if __name__ == "__main__":
    main()
