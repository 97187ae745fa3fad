"""`python -m teal.bench.decode`: the `teal bench decode` command (one definition: `teal.bench.cli`).

The entry module of the package: nothing imports it, so its import of the command line (which imports
`teal.bench.decode`) closes no circle.
"""

from teal.bench.entry import run_module

run_module("decode")
