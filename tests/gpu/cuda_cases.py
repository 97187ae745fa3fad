"""What the CUDA C++ kernel's GPU tests share: the device, the odd problem widths, three launch geometries,
and the module-level skip where the kernel cannot run."""

from __future__ import annotations

import pytest
import torch

from teal.kernels import KernelConfig, ops

CUDA = torch.device("cuda")
K_ODD, SPLITS = 1003, [1000, 504, 248]  # widths multiples of the 8-element vectors, K odd
CONFIGS = {
    "cluster": KernelConfig(block_n=256, block_r=8, split_k=4, num_warps=8, cuda=True),
    "one-split": KernelConfig(block_n=256, block_r=4, split_k=1, num_warps=16, cuda=True),
    "wide": KernelConfig(block_n=512, block_r=8, split_k=2, num_warps=4, cuda=True),
}


@pytest.fixture(scope="module", autouse=True)
def cuda_kernel():
    if not ops.cuda_kernel_available(CUDA):
        pytest.skip("the CUDA C++ kernel needs compute capability 9.0+ and NVRTC")
