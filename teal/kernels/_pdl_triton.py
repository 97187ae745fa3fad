"""Programmatic dependent launch (PDL) inside the Triton kernels. Imported lazily (imports Triton).

A kernel launched with ``launch_pdl=True`` may start while the kernel before it on the stream is still
running: its programs are scheduled as soon as every program of the previous kernel has signalled
(``gdc_launch_dependents``) or exited. Each of our kernels therefore calls ``pdl_wait`` before its first
access to memory another kernel writes or reads (inputs, outputs, workspaces); ``gdc_wait`` returns
once the previous kernel has completed and its writes are visible, so work before it overlaps only the
previous kernel's tail and the launch itself.

``PDL`` (a constexpr of every kernel): 0 off (the default on devices before Hopper and under the
interpreter); 1 wait and signal at the start; 2 wait at the start, signal after the main loop
(``pdl_release``), so the next kernel's programs do not take slots from this one's main loop.
"""

from __future__ import annotations

import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAS_GDC = True
except ImportError:  # pragma: no cover - Triton without grid dependency control: PDL stays 0
    gdc_launch_dependents = gdc_wait = None
    HAS_GDC = False


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Before the first dependent memory access: wait for the previous kernel (PDL > 0); PDL == 1 also
    lets the next kernel launch now."""
    if PDL > 0:
        gdc_wait()
    if PDL == 1:
        gdc_launch_dependents()


@triton.jit
def pdl_release(PDL: tl.constexpr):
    """After the main loop (PDL == 2): let the next kernel launch."""
    if PDL == 2:
        gdc_launch_dependents()
