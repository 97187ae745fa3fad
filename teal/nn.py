"""TealLinear: an nn.Linear whose input entries with a small score are zeroed.

Entry i of the input survives iff ``|x_i| * c_i > threshold`` (c_i = 1 for TEAL's magnitude
rule, the weight column norm for the weight-aware rule); ties are zeroed. On CUDA, forwards of at
most ``KERNEL_MAX_TOKENS`` thresholded tokens run the fused threshold + sparse GEMV kernel; elsewhere
the masked input goes through the ordinary dense matmul, which gives the same numbers.

Threshold, weight-aware scale and sparsity counters are buffers on the weight's device, so
``model.to(device)`` moves them with the weights; the kernel's transposed weight is a view of the
``nn.Linear``'s own (its layout survives ``.to``).
"""

from __future__ import annotations

import torch
from torch import nn

PREFILL_POLICIES = ("sparse", "dense")
KERNEL_MAX_TOKENS = 8


def check_prefill(prefill: str, dense_prefix: int) -> None:
    if prefill not in PREFILL_POLICIES:
        raise ValueError(f"prefill must be one of {PREFILL_POLICIES}, got {prefill!r}")
    if int(dense_prefix) < 0:
        raise ValueError(f"dense_prefix must be >= 0, got {dense_prefix}")


class TealLinear(nn.Module):
    """Thresholded wrapper around an existing ``nn.Linear`` (shares its weight)."""

    def __init__(
        self,
        linear: nn.Linear,
        threshold: float,
        col_scale: torch.Tensor | None = None,
        prefill: str = "sparse",
        dense_prefix: int = 0,
    ) -> None:
        super().__init__()
        check_prefill(prefill, dense_prefix)
        self.linear = linear
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.prefill = prefill
        self.dense_prefix = int(dense_prefix)
        self.use_kernel = False
        #: With ``"auto"``, the kernel layout is switched on by the first CUDA forward (a model sparsified
        #: on the CPU and then moved to the GPU decodes through the kernel, as one sparsified there).
        self.kernel_auto = False
        device = linear.weight.device
        self.register_buffer("threshold", torch.tensor(0.0, device=device), persistent=False)
        self.register_buffer("zeros", torch.zeros((), dtype=torch.long, device=device), persistent=False)
        self.register_buffer("total", torch.zeros((), dtype=torch.long, device=device), persistent=False)
        self.register_buffer("col_scale", None, persistent=False)
        self.set_threshold(threshold, col_scale)

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias

    def set_threshold(self, threshold: float, col_scale: torch.Tensor | None = None) -> None:
        """Change the threshold (and weight-aware scale) in place; -1 (or < 0) disables it."""
        self.threshold_value = float(threshold)
        self.threshold.fill_(self.threshold_value)
        if col_scale is not None:
            if col_scale.shape != (self.in_features,):
                raise ValueError(
                    f"col_scale has shape {tuple(col_scale.shape)}, expected ({self.in_features},)"
                )
            col_scale = col_scale.to(self.weight.device, torch.float32)
        self.col_scale = col_scale

    def _apply(self, fn, recurse=True):
        """``.to(device)`` moves threshold and scale; a dtype change (``model.half()``) leaves them fp32, so
        the rule is not rounded to the activations' dtype."""
        fp32 = {name: self._buffers[name] for name in ("threshold", "col_scale") if self._buffers[name] is not None}
        super()._apply(fn, recurse)
        for name, old in fp32.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    def reset_counters(self) -> None:
        self.zeros.zero_()
        self.total.zero_()

    @property
    def w_t(self) -> torch.Tensor | None:
        """The kernel's weight [K, N] (a transposed view of the ``nn.Linear``'s), None until ``enable_kernel``."""
        return self.linear.weight.detach().t() if self.use_kernel else None

    def enable_kernel(self) -> None:
        """Store the weight transposed ([K, N], contiguous) for the sparse GEMV kernel.

        The ``nn.Linear`` keeps a transposed view of the same storage: no second copy.
        """
        weight = self.linear.weight
        if not weight.detach().t().is_contiguous():
            weight.data = weight.detach().t().contiguous().t()
        self.use_kernel = True

    def _mask(self, x: torch.Tensor) -> torch.Tensor:
        score = x.abs().float()  # compare in fp32, like the kernel (no bf16-rounded threshold)
        if self.col_scale is not None:
            score = score * self.col_scale
        keep = score > self.threshold
        self.zeros += (score <= self.threshold).sum()  # true zeros: a NaN entry is neither kept nor zeroed
        self.total += keep.numel()
        return x * keep.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.threshold_value < 0:
            return self.linear(x)
        tokens = x.shape[-2] if x.dim() >= 2 else 1
        if tokens > 1 and self.prefill == "dense":
            return self.linear(x)
        if tokens > 1 and self.dense_prefix > 0:  # the first dense_prefix positions stay dense, always
            head, tail = x[..., : self.dense_prefix, :], x[..., self.dense_prefix :, :]
            return torch.cat([self.linear(head), self._sparse_forward(tail)], dim=-2)
        return self._sparse_forward(x)

    def _sparse_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Every position of ``x`` thresholded: the kernel for a few tokens on CUDA, else the masked matmul."""
        if x.numel() == 0:
            return self.linear(x)
        if kernel_runs_on(x) and x.numel() // max(x.shape[-1], 1) <= KERNEL_MAX_TOKENS:
            if self.kernel_auto and not self.use_kernel:
                self.enable_kernel()
            if self.use_kernel:
                return self._kernel_forward(x)
        return self.linear(self._mask(x))

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        from teal.kernels import sparse_linear

        if not self.w_t.is_contiguous():  # a weight replaced or re-laid out since enable_kernel
            self.enable_kernel()
        x2 = x.reshape(-1, x.shape[-1])
        scale = None if self.col_scale is None else self.col_scale[None]
        y = sparse_linear(x2, self.w_t, self.threshold.reshape(1), None, scale)
        score = x2.abs().float() if scale is None else x2.abs().float() * scale
        self.zeros += (score <= self.threshold).sum()  # true zeros: a NaN entry is neither kept nor zeroed
        self.total += x2.numel()
        if self.linear.bias is not None:
            y = y + self.linear.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, threshold={self.threshold_value:.4g}, "
            f"weight_aware={self.col_scale is not None}, prefill={self.prefill}, "
            f"dense_prefix={self.dense_prefix}, kernel={self.use_kernel}"
        )


def kernel_runs_on(x: torch.Tensor) -> bool:
    """Whether the sparse GEMV kernel runs on ``x``'s device (CUDA). Tests replace it to run the interpreted
    Triton kernel on the CPU."""
    return x.is_cuda


def dense_linear(module: nn.Module) -> nn.Linear:
    """The plain ``nn.Linear`` behind ``module`` (itself if it is not a TealLinear)."""
    return module.linear if isinstance(module, TealLinear) else module


__all__ = ["TealLinear", "dense_linear", "check_prefill"]
