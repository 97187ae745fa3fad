"""Write the kernel configuration table in use before the dense / sparse regimes split (commit 6b53f89), as an
override for `TEAL_KERNEL_CONFIGS` (unmarked entries: both regimes), for A/B runs against the current tables;
with --mlp-dense-before: only the dense regime's Llama-3-8B gate|up and down entries as before.

    python3 benchmarks/scripts/regime_ab_table.py OUT.json [--mlp-dense-before]
    TEAL_KERNEL_CONFIGS=OUT.json python3 -m teal.bench.kernels ...
"""

import json
import sys

from teal.kernels.configs import KernelConfig, table_to_json


def old(block_n: int, block_r: int, split_k: int, num_warps: int) -> KernelConfig:
    return KernelConfig(block_n=block_n, block_r=block_r, split_k=split_k, num_warps=num_warps, cuda=True)


BEFORE = {
    (4096, 6144, 1, "bf16"): old(256, 8, 8, 8),
    (4096, 4096, 1, "bf16"): old(256, 8, 8, 8),
    (4096, 28672, 1, "bf16"): old(256, 4, 1, 32),
    (14336, 4096, 1, "bf16"): old(256, 8, 8, 8),
    (4096, 22016, 1, "bf16"): old(256, 8, 2, 16),
    (11008, 4096, 1, "bf16"): old(256, 8, 8, 8),
    (3840, 30720, 1, "bf16"): old(256, 4, 1, 32),
}

if __name__ == "__main__":
    if "--mlp-dense-before" in sys.argv[2:]:
        keys = [(4096, 28672, 1, "bf16"), (14336, 4096, 1, "bf16")]
        table = table_to_json({}, {key: BEFORE[key] for key in keys})
    else:
        table = table_to_json(BEFORE)
    with open(sys.argv[1], "w", encoding="utf-8") as fh:
        json.dump(table, fh, indent=1)
