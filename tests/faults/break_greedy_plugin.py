"""pytest plugin: a broken greedy allocation, to watch `tests/test_smollm2.py`'s greedy check fail.

The first half of the layers take twice their greedy level (capped at 0.99), the second half none (a wrong
layer split of the table; about the same effective sparsity). Not collected as a test; run it by hand:

    PYTHONPATH=tests/faults python -m pytest -q -p break_greedy_plugin \
        tests/test_smollm2.py::test_greedy_close_to_uniform_at_equal_measured_sparsity

2026-12-07, CPU: the test failed at 0.4 with greedy PPL 12,198 against uniform's 28.0 (as it should). A
layer-reversed table did not fail it: greedy gives every layer the same level, so reversal changes little.
"""
import re

from teal import artifact

_real = artifact.Thresholds.sparsities


def _half(self, level, method=None):
    out = _real(self, level, method)
    if (method or self.method) != "greedy":
        return out
    n = 1 + max(int(re.search(r"layers\.(\d+)\.", p).group(1)) for p in out)
    return {p: (min(2 * v, 0.99) if int(re.search(r"layers\.(\d+)\.", p).group(1)) < n // 2 else 0.0)
            for p, v in out.items()}


artifact.Thresholds.sparsities = _half
