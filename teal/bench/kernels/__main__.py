"""`python -m teal.bench.kernels`: the `teal bench kernels` command (one definition: `teal.bench.cli`).

The entry module of the package: nothing imports it, so its import of the command line (which imports
`teal.bench.kernels`) closes no circle.
"""

from teal.bench.entry import run_module

run_module("kernels")
