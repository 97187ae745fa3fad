"""Weight formats for the sparse kernels: int8 per output channel and int4 group-wise along the input.

Both keep the kernels' row layout: the transposed weight ``w_t`` is [K, N] (one row per input channel), and
each input channel's codes are contiguous, so a zeroed input entry skips its bytes.

- ``int8``: ``w_t[i, n] = codes[i, n] * scale[n]`` — symmetric, one scale per output channel (W8A16).
- ``int4``: ``w_t[i, n] = (q[i, n] - zero[g, n]) * scale[g, n]`` with ``g = i // group_size`` —
  asymmetric, one (scale, zero) pair per group of ``group_size`` input channels and output channel.
  Two codes share a byte along N (column ``2j`` in the low nibble, ``2j + 1`` in the high one), so row
  ``i`` is ``ceil(N / 2)`` contiguous bytes. Scales and zeros are [G, N] in the weight's dtype: the
  pair of group ``g`` is one row, read without touching any code row.

Quantization is round-to-nearest (RTN); int4 can instead take HQQ's half-quadratic optimiser of the
(scale, zero) pairs (``method="hqq"``, the ``hqq`` package): it needs no calibration data, runs in seconds,
and its zero point is a float, which this format stores as it is. ``dequantize`` is the exact inverse map used by every kernel and
by the float64 references in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

WEIGHT_FORMATS = ("bf16", "int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128)
INT4_METHODS = ("rtn", "hqq")


@dataclass(frozen=True)
class QuantizedWeight:
    """A transposed weight [K, N] in one of the quantized formats (see the module docstring)."""

    format: str  # "int8" | "int4"
    codes: torch.Tensor  # int8 [K, N] or uint8 [K, ceil(N/2)]
    scales: torch.Tensor  # [N] (int8) or [G, N] (int4), in the compute dtype
    zeros: torch.Tensor | None  # [G, N] (int4), in the compute dtype
    shape: tuple[int, int]  # (K, N) of the transposed weight
    group_size: int = 0  # int4 only

    @property
    def dtype(self) -> torch.dtype:
        return self.scales.dtype

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def nbytes(self) -> int:
        """Bytes a dense GEMV reads: codes, scales and zeros."""
        parts = [self.codes, self.scales] + ([self.zeros] if self.zeros is not None else [])
        return sum(t.numel() * t.element_size() for t in parts)

    def to(self, device: torch.device | str) -> "QuantizedWeight":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QuantizedWeight(self.format, move(self.codes), move(self.scales), move(self.zeros), self.shape,
                               self.group_size)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The transposed weight [K, N] these codes stand for (float32 arithmetic, then ``dtype``)."""
        return dequantize(self, dtype)


def check_format(weights: str, group_size: int = 128) -> None:
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weight format {weights!r}: use one of {', '.join(WEIGHT_FORMATS)}")
    if weights == "int4" and group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")


HQQ_MISSING = "quantization method 'hqq' needs the hqq package: pip install 'teal-sparsity[quant]'"


def check_method(weights: str, method: str = "rtn") -> None:
    """``method`` fits ``weights`` and can run, checked before any work: rtn for every format, hqq for int4 only
    and with the ``hqq`` package installed (the ``[quant]`` extra; an ImportError naming it otherwise)."""
    if method not in INT4_METHODS:
        raise ValueError(f"unknown quantization method {method!r}: use one of {', '.join(INT4_METHODS)}")
    if method == "rtn":
        return
    if weights != "int4":
        raise ValueError(f"quantization method {method!r} is for int4 weights; {weights} weights take rtn "
                         "(round to nearest)")
    try:
        import hqq.core.optimize  # noqa: F401
    except ImportError:
        raise ImportError(HQQ_MISSING) from None


def weights_setting(weights: str, group_size: int | None = 128, method: str | None = "rtn") -> dict[str, Any]:
    """What an artifact's ``calibration`` records of the weights it was calibrated on: ``weights`` (bf16, int8,
    int4), ``group_size`` (int4, else None) and ``quant_method`` (rtn or hqq; None for bf16)."""
    return {"weights": weights, "group_size": group_size if weights == "int4" else None,
            "quant_method": (method or "rtn") if weights != "bf16" else None}


def weights_mismatch(calibration: dict[str, Any], weights: str, group_size: int = 128,
                     method: str = "rtn") -> str | None:
    """One line saying how the weights of this run differ from those an artifact was calibrated on (its
    ``calibration`` dict), and what to do; None where they agree. Thresholds follow the activations of the
    weights they were calibrated on, so a difference in format, int4 group size or method matters.

    Artifacts written before a key was recorded still load: a missing ``group_size`` or ``quant_method`` is
    not compared (nothing is known of it, so nothing is claimed), and a missing ``weights`` means bf16 (the
    only format there was then)."""
    asked = weights_setting(weights, group_size, method)
    done = {k: calibration[k] for k in ("group_size", "quant_method") if k in calibration}
    done["weights"] = calibration.get("weights", "bf16")
    if all(done[k] == asked[k] for k in done):
        return None

    def label(s: dict[str, Any]) -> str:
        details = ([f"group size {s['group_size']}"] if s.get("group_size") else []) + \
            ([s["quant_method"]] if s.get("quant_method") else [])
        return f"{s['weights']} weights" + (f" ({', '.join(details)})" if details else "")

    def flags(s: dict[str, Any]) -> str:
        return f"--weights {s['weights']}" + (f" --group-size {s['group_size']}" if s.get("group_size") else "") + \
            (f" --quant-method {s['quant_method']}" if s.get("quant_method") else "")

    return (f"the thresholds were calibrated with {label(done)} and this run uses {label(asked)}; recalibrate "
            f"with `teal calibrate MODEL -o DIR {flags(asked)}`, or run with {flags(done)}, for thresholds that "
            "follow this model's activations")


def quantize_int8(w_t: torch.Tensor) -> QuantizedWeight:
    """Symmetric int8 with one scale per output channel (column of ``w_t`` [K, N])."""
    k, n = w_t.shape
    w = w_t.float()
    amax = w.abs().amax(dim=0)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax)).to(w_t.dtype)
    codes = torch.round(w / scale.float()).clamp_(-127, 127).to(torch.int8)
    return QuantizedWeight("int8", codes.contiguous(), scale.contiguous(), None, (k, n))


def quantize_int4(w_t: torch.Tensor, group_size: int = 128, method: str = "rtn") -> QuantizedWeight:
    """Asymmetric int4 with a (scale, zero) per group of ``group_size`` input channels and output channel."""
    check_format("int4", group_size)
    if method not in INT4_METHODS:
        raise ValueError(f"int4 method must be one of {INT4_METHODS}, got {method!r}")
    k, n = w_t.shape
    groups = -(-k // group_size)
    w = w_t.float()
    pad = groups * group_size - k
    if pad:  # the last group is partial: pad with its own first row, which leaves min and max unchanged
        w = torch.cat([w, w[-group_size + pad:][:1].expand(pad, n)], dim=0)
    wg = w.view(groups, group_size, n)
    lo = wg.amin(dim=1).clamp(max=0)  # the range always holds 0, so the integer zero point is exact (as GPTQ)
    hi = wg.amax(dim=1).clamp(min=0)
    scale = ((hi - lo) / 15.0).to(w_t.dtype).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / scale).clamp_(0, 15)
    if method == "hqq":
        q, scale, zero = _hqq_refine(wg, scale, zero)
    else:
        q = torch.round(wg / scale[:, None, :] + zero[:, None, :]).clamp_(0, 15)
    q = q.to(torch.uint8).reshape(groups * group_size, n)[:k]
    return QuantizedWeight("int4", pack_int4(q), scale.to(w_t.dtype).contiguous(), zero.to(w_t.dtype).contiguous(),
                           (k, n), group_size)


def _hqq_refine(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """HQQ's proximal optimiser of the zero points, from the RTN start; groups along dim 1 of ``wg`` [G, S, N]."""
    try:
        from hqq.core.optimize import optimize_weights_proximal_legacy
    except ImportError:
        raise ImportError(HQQ_MISSING) from None
    g, size, n = wg.shape
    flat = wg.permute(1, 0, 2).reshape(size, g * n)  # HQQ reduces along axis 0: one group per column
    q, inv_scale, zero = optimize_weights_proximal_legacy(
        flat, (1.0 / scale).reshape(1, -1), zero.reshape(1, -1), min_max=[0, 15], axis=0, device=str(wg.device))
    q = q.reshape(size, g, n).permute(1, 0, 2)
    return q, (1.0 / inv_scale).reshape(g, n), zero.reshape(g, n)


def quantize(w_t: torch.Tensor, weights: str, group_size: int = 128, method: str = "rtn") -> QuantizedWeight:
    """Quantize a transposed weight [K, N] to ``weights`` ("int8" or "int4"; int4 by ``method`` rtn or hqq)."""
    check_format(weights, group_size)
    if weights == "int8":
        if method != "rtn":
            raise ValueError("int8 is quantized round-to-nearest only (method='rtn')")
        return quantize_int8(w_t)
    if weights == "int4":
        return quantize_int4(w_t, group_size, method)
    raise ValueError("bf16 weights are not quantized")


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[K, N] codes in 0..15 → [K, ceil(N/2)] bytes, column 2j in the low nibble and 2j+1 in the high one."""
    k, n = q.shape
    if n % 2:
        q = torch.cat([q, torch.zeros(k, 1, dtype=q.dtype, device=q.device)], dim=1)
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of ``pack_int4``: [K, ceil(N/2)] bytes → [K, N] codes (uint8)."""
    lo = packed & 0xF
    hi = packed >> 4
    return torch.stack([lo, hi], dim=2).reshape(packed.shape[0], -1)[:, :n]


def dequantize(qw: QuantizedWeight, dtype: torch.dtype | None = None) -> torch.Tensor:
    k, n = qw.shape
    if qw.format == "int8":
        w = qw.codes.float() * qw.scales.float()[None, :]
    else:
        q = unpack_int4(qw.codes, n).float()
        group = torch.arange(k, device=q.device) // qw.group_size
        w = (q - qw.zeros.float()[group]) * qw.scales.float()[group]
    return w.to(dtype or qw.dtype)


class QuantLinear(torch.nn.Module):
    """A projection whose weight is stored quantized (``QuantizedWeight``, transposed layout).

    ``weight`` is the dequantized [N, K] matrix (what the model computes with), so everything that reads
    ``module.weight`` — calibration, TealLinear's masked dense path, fingerprints — sees the quantized
    model's weights. Swapped in by ``quantize_weights`` (torchao's ``quantize_`` pattern).
    """

    def __init__(self, linear: torch.nn.Linear, weights: str, group_size: int = 128, method: str = "rtn") -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        qw = quantize(linear.weight.detach().t(), weights, group_size, method)
        self.format, self.group_size = qw.format, qw.group_size
        self.register_buffer("codes", qw.codes)
        self.register_buffer("scales", qw.scales)
        self.register_buffer("zeros", qw.zeros)
        self.bias = linear.bias

    @property
    def qweight(self) -> QuantizedWeight:
        return QuantizedWeight(self.format, self.codes, self.scales, self.zeros, (self.in_features, self.out_features),
                               self.group_size)

    @property
    def weight(self) -> torch.Tensor:
        return self.qweight.dequantize().t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.format == "int4" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.format}{group}"


def quantize_weights(model: torch.nn.Module, weights: str = "int4", group_size: int = 128,
                     method: str = "rtn") -> torch.nn.Module:
    """Quantize every sparsifiable projection (q, k, v, o, gate, up, down) of ``model`` in place, round to
    nearest (``method="rtn"``) or, for int4, by HQQ (``method="hqq"``, see ``check_method``). Embeddings, norms and lm_head stay in the model's dtype. Run it before calibration: thresholds
    depend on the activations the quantized model produces. ``weights="bf16"`` leaves the model as it is."""
    check_format(weights, group_size)
    if weights == "bf16":
        return model
    check_method(weights, method)
    from teal.arch import get_adapter
    from teal.models import model_fingerprint

    adapter = get_adapter(model)
    dense_fingerprint = model_fingerprint(model)  # the checkpoint's: artifacts match it (teal.models.model_info)
    for key, module in adapter.projections().items():
        if isinstance(module, QuantLinear):
            raise ValueError(f"{key} is already quantized ({module.format}); load the model again to change format")
        if not isinstance(module, torch.nn.Linear):
            raise ValueError(f"{key} is a {type(module).__name__}; quantize before teal.sparsify_")
        adapter.replace(key, QuantLinear(module, weights, group_size, method))
    model.teal_weights = {  # type: ignore[attr-defined]
        "format": weights, "group_size": group_size if weights == "int4" else None, "method": method,
        "dense_fingerprint": dense_fingerprint}
    return model
