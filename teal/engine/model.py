"""The compact Llama-family decoder used by the decode engine.

Weights are fused (q|k|v and gate|up) and kept in one of two layouts:

- dense layout: each fused weight is [N, K] (nn.Linear's), decode runs `F.linear` (cuBLAS);
- transposed layout: each fused weight is [K, N] contiguous, the layout of `teal.kernels.sparse_linear`,
  which skips the weight rows of zeroed inputs. Prefill multiplies by the same tensors (`x @ w_t`), so
  there is one copy of each weight whatever the mode.

The prompt is dense (or thresholded at every position with prefill policy "sparse"). Single-token decode
steps are sparse where a projection group has a finite threshold. Each group is multiplied as one
`teal.engine.projection.Projection` (weight, bias, thresholds, column scales, segments, regime, TP role).
The decode path is written as plain tensor code, one function per layer (`decode_layer`), so that it can
run eagerly, be captured in a CUDA graph, or be compiled by `torch.compile` once and reused for every layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from teal.engine.collectives import all_gather_last_dim
from teal.engine.config import EngineConfig
from teal.engine.projection import SPARSE_PATHS, Projection, glu_project, norm_project, project, rms_norm
from teal.kernels import attention as attention_ops
from teal.kernels import ops, producer
from teal.nn import PREFILL_POLICIES  # how the prompt is processed once thresholds are set (`Engine.prefill_policy`)

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
# Projection groups that share an input (a site) and one fused weight.
GROUPS: dict[str, tuple[str, ...]] = {"qkv": ("q", "k", "v"), "o": ("o",), "gate_up": ("gate", "up"), "down": ("down",)}
GROUP_SITE = {"qkv": "attn_in", "o": "attn_out", "gate_up": "mlp_in", "down": "mlp_mid"}

# An observer sees the input of each projection group: observer(layer, site, x[T, K]).
Observer = Callable[[int, str, torch.Tensor], None]


class LayerWeights(NamedTuple):
    """Weights of one decoder layer; fused matrices in the engine's layout."""

    attn_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    mlp_norm: torch.Tensor
    gate_up: torch.Tensor
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None
    # Gemma 3's sandwich norms: of the attention output (HF post_attention_layernorm) and of the MLP output
    # (post_feedforward_layernorm), applied before each residual add. None elsewhere.
    post_attn_norm: torch.Tensor | None = None
    post_mlp_norm: torch.Tensor | None = None


class LayerSparsity(NamedTuple):
    """Per-layer thresholds (fp32 [S], one per projection in the group) and optional column scales [S, K]."""

    qkv: torch.Tensor
    o: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor
    qkv_scale: torch.Tensor | None = None
    o_scale: torch.Tensor | None = None
    gate_up_scale: torch.Tensor | None = None
    down_scale: torch.Tensor | None = None


class DecodeLayer(NamedTuple):
    """What one layer's decode step reads: its norms and projections, and the Python constants of its
    attention and MLP (hashable, so compiled code specializes on them). Built by `Engine.decode_layer_args`."""

    attn_norm: torch.Tensor
    qkv: Projection
    q_norm: torch.Tensor | None  # per-head q/k norms (Qwen3, Gemma 3)
    k_norm: torch.Tensor | None
    o: Projection
    post_attn_norm: torch.Tensor | None  # Gemma 3's sandwich norms, applied before each residual add
    mlp_norm: torch.Tensor
    gate_up: Projection
    down: Projection
    post_mlp_norm: torch.Tensor | None
    n_heads: int
    n_kv_heads: int
    head_dim: int
    eps: float
    norm_offset: float  # RMSNorm weight used as (offset + w), Gemma style, when nonzero
    act: str  # MLP activation of the gate: "silu" or "gelu_tanh" (Gemma 3)
    softmax_scale: float  # scale of q·k
    # attention through `teal.kernels.attention.decode_attention_rope` (one split-KV kernel reading positions
    # 0..pos only, which also applies the q/k norms and the rotary embedding and writes the caches) instead
    # of `decode_attention` over the whole static cache (`Engine.use_fused_attention`)
    fused_attention: bool


class LayerProjections(NamedTuple):
    qkv: Projection
    o: Projection
    gate_up: Projection
    down: Projection


def producer_available(device: torch.device) -> bool:
    """Whether the producer ops (`teal.kernels.producer`) run their Triton kernels on `device`."""
    return producer.uses_triton(device)


def mlp_activation(gate: torch.Tensor, act: str) -> torch.Tensor:
    """The gate's activation: SiLU, or GELU with the tanh approximation (Gemma's gelu_pytorch_tanh)."""
    return F.silu(gate) if act == "silu" else F.gelu(gate, approximate="tanh")


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, half-split layout. x [T, H, D]; cos, sin [T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """One query position against the whole static cache. q [1, Hq, D]; caches [Hkv, L, D]; mask [L] additive fp32.

    The default off CUDA; on CUDA decode steps take `teal.kernels.attention.decode_attention_rope` (the same
    math over positions 0..pos only, one kernel; `Engine.use_fused_attention`).
    """
    n_kv, _, head_dim = k_cache.shape
    n_heads = q.shape[1]
    qg = q.reshape(n_kv, n_heads // n_kv, head_dim)
    scores = torch.matmul(qg, k_cache.transpose(1, 2)).float() * scale + mask
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    return torch.matmul(probs, v_cache).reshape(1, n_heads * head_dim)


def attend(layer: DecodeLayer, qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
           cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, n_valid: torch.Tensor) -> torch.Tensor:
    """The decode step's attention from the q|k|v row [1, q + 2 kv]: q/k norms, rotary embedding, K and V
    written to the caches at `pos`, attention over the cache. Returns [1, Hq * D]."""
    L = layer
    if L.fused_attention:  # one kernel: q/k norms, rope, cache write, attention over 0..pos
        return attention_ops.decode_attention_rope(qkv, cos, sin, k_cache, v_cache, mask, n_valid, L.softmax_scale,
                                                   L.n_heads, L.q_norm, L.k_norm, L.eps, L.norm_offset)
    q_size, kv_size = L.n_heads * L.head_dim, L.n_kv_heads * L.head_dim
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q = q.view(1, L.n_heads, L.head_dim)
    k = k.view(1, L.n_kv_heads, L.head_dim)
    if L.q_norm is not None:
        q = rms_norm(q, L.q_norm, L.eps, L.norm_offset)
        k = rms_norm(k, L.k_norm, L.eps, L.norm_offset)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k_cache.index_copy_(1, pos, k.transpose(0, 1))  # no host sync; compilers keep it in place
    v_cache.index_copy_(1, pos, v.view(1, L.n_kv_heads, L.head_dim).transpose(0, 1))
    return decode_attention(q, k_cache, v_cache, mask, L.softmax_scale)


def decode_layer(
    layer: DecodeLayer,
    x: torch.Tensor,
    delta: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor,
    n_valid: torch.Tensor | None = None,
    observe: Callable[[str, torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoder layer for one token. Returns (residual stream, this layer's MLP output).

    The residual add of the previous layer happens here (x + delta), so that a compiler can fuse it with
    the norm that follows. n_valid: pos + 1, computed once per step by the caller (None: here).
    `observe(site, x)` sees the input of each projection group.
    """
    L = layer
    n_valid = pos + 1 if n_valid is None else n_valid
    x, qkv = norm_project(L.qkv, x, delta, L.attn_norm, L.eps, L.norm_offset, _at(observe, "attn_in"))
    attn = attend(L, qkv, k_cache, v_cache, pos, cos, sin, mask, n_valid)
    if observe is not None:
        observe("attn_out", attn)
    o = project(L.o, attn)
    if L.post_attn_norm is not None:
        o = rms_norm(o, L.post_attn_norm, L.eps, L.norm_offset)
    x, gate_up = norm_project(L.gate_up, x, o, L.mlp_norm, L.eps, L.norm_offset, _at(observe, "mlp_in"))
    if L.down.sparse and L.act == "silu" and observe is None:
        out = glu_project(L.down, gate_up)  # SiLU(gate) * up computed inside the sparse GEMV
    else:
        gate, up = gate_up.chunk(2, dim=-1)
        mid = mlp_activation(gate, L.act) * up
        if observe is not None:
            observe("mlp_mid", mid)
        out = project(L.down, mid)
    if L.post_mlp_norm is not None:  # Gemma 3 normalises the MLP output before the residual add
        out = rms_norm(out, L.post_mlp_norm, L.eps, L.norm_offset)
    return x, out


def _at(observe: Callable[[str, torch.Tensor], None] | None, site: str) -> Callable[[torch.Tensor], None] | None:
    return None if observe is None else (lambda t: observe(site, t))


def final_logits(x: torch.Tensor, delta: torch.Tensor, norm: torch.Tensor, lm_head: torch.Tensor, eps: float,
                 vocab_group: Any = None, norm_offset: float = 0.0, softcap: float | None = None) -> torch.Tensor:
    """Last residual add, final norm and the output projection. Returns logits [T, V].

    vocab_group: the ProcessGroup over which `lm_head` is split by vocabulary rows (tensor parallelism);
    each rank's logit slice is then all-gathered. None: `lm_head` is whole. softcap: logits -> c·tanh(logits/c).
    """
    logits = F.linear(rms_norm(x + delta, norm, eps, norm_offset), lm_head)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits if vocab_group is None else all_gather_last_dim(logits, vocab_group)


class Engine:
    """Weights, static KV cache and the prefill / decode computations of one model."""

    def __init__(
        self,
        config: EngineConfig,
        layers: list[LayerWeights],
        embed: torch.Tensor,
        final_norm: torch.Tensor,
        lm_head: torch.Tensor,
        *,
        transposed: bool,
        max_seq_len: int,
    ) -> None:
        self.config = config
        self.layers = layers
        self.embed = embed
        self.final_norm = final_norm
        self.lm_head = lm_head
        self.transposed = transposed
        self.device = embed.device
        self.dtype = embed.dtype
        self.max_seq_len = 0
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []
        self.sparsity: list[LayerSparsity] | None = None
        self.sparse_flags: tuple[tuple[bool, bool, bool, bool], ...] = tuple((False,) * 4 for _ in layers)
        # per layer and group: the kernel's tuned table, "dense" for groups on the kernel with every threshold
        # -inf (`kernel_at_zero`), else "sparse" (set by `set_thresholds`)
        self.kernel_regimes: tuple[tuple[str, str, str, str], ...] = tuple(("sparse",) * 4 for _ in layers)
        # use the sparse kernel even for groups whose thresholds are all -inf (on the CUDA C++ kernel, a dense
        # product): True / False for every group, one flag per group (q|k|v, o, gate|up, down), or None for
        # `default_kernel_at_zero`
        self.kernel_at_zero: bool | tuple[bool, bool, bool, bool] | None = None
        # how sparse groups are multiplied (SPARSE_PATHS; set_sparse_path); None: `default_sparse_path`
        self.sparse_path: str | None = None
        # decode attention through the split-KV op (`teal.kernels.attention`, reads positions 0..pos only);
        # None: on CUDA (6-10 us per layer vs inductor's 8-17 us over the whole cache on the H200,
        # benchmarks/results/2026-11-29-h200-attention-variants.json); False: `decode_attention`, compiled
        # by inductor; True: also elsewhere (the Triton kernel under TRITON_INTERPRET=1, else its reference).
        self.fused_attention: bool | None = None
        # Tensor parallelism (set by teal.engine.tp.shard_engine): the ProcessGroup summing the o and down
        # partial products, and the one over which lm_head's vocabulary rows are split. None: one device.
        self.tp_group: Any = None
        self.vocab_group: Any = None
        self.all_reduce = "nccl"  # how the row-parallel products are summed (TensorParallelEngine.set_all_reduce)
        # prefill policy (`PREFILL_POLICIES`): "dense" (the default: every prompt position through the dense
        # weights) or "sparse" (every position thresholded like a decode step, as `teal.sparsify_(...,
        # prefill="sparse")`; the same masked products, computed densely, so no faster)
        self.prefill_policy = "dense"
        # weight format of the four projection groups ("bf16": the model's dtype; "int8" / "int4": the layers'
        # fused weights hold codes in the transposed layout and `quant_params[i][group]` their (scales, zeros);
        # set by `quantize_weights`; `quant_method`: how the codes were chosen, "rtn" or "hqq", None for bf16)
        self.weight_format = "bf16"
        self.group_size = 0
        self.quant_method: str | None = None
        self.quant_params: list[dict[str, tuple[torch.Tensor, torch.Tensor | None]]] = []
        # one rotary table per rope index (config.rope_table): (inverse frequencies, cos/sin scale)
        self._rope = [config.rope_inv_freq(layer_type) for layer_type in config.rope_layer_types]
        self.allocate_cache(max_seq_len)

    # ----------------------------------------------------------------- setup
    def allocate_cache(self, max_seq_len: int) -> None:
        """(Re)allocate the static KV cache and the rotary tables for `max_seq_len` positions."""
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
        cfg = self.config
        shape = (cfg.n_kv_heads, max_seq_len, cfg.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(cfg.n_layers)]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(cfg.n_layers)]
        positions = torch.arange(max_seq_len, dtype=torch.float32)
        self.cos_tables, self.sin_tables = [], []
        for inv_freq, scale in self._rope:
            freqs = torch.outer(positions, inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            self.cos_tables.append((emb.cos() * scale).to(device=self.device, dtype=self.dtype))
            self.sin_tables.append((emb.sin() * scale).to(device=self.device, dtype=self.dtype))
        self.positions = torch.arange(max_seq_len, device=self.device)
        self.max_seq_len = max_seq_len

    def projections(self, i: int, prefill: bool = False) -> LayerProjections:
        """Layer i's four projection groups as the decode step multiplies them (`prefill`: as the prompt's
        forward does: thresholded only with `prefill_policy` "sparse", never on the producer path, and summed
        over tensor-parallel ranks by NCCL, whose buffers are not limited to one token)."""
        cfg, w = self.config, self.layers[i]
        sp = self.sparsity[i] if self.sparsity is not None else None
        if prefill:
            on = self._prefill_flags(i)
            regimes, producers, all_reduce = ("sparse",) * 4, (False,) * 4, "nccl"
        else:
            on, regimes, producers, all_reduce = (self.sparse_flags[i], self.kernel_regimes[i], self.producer_flags(i),
                                                  self.all_reduce)
        inter = w.gate_up.shape[1 if self.transposed else 0] // 2
        splits = {"qkv": (cfg.q_size, cfg.kv_size, cfg.kv_size), "gate_up": (inter, inter),
                  "o": (w.o.shape[1 if self.transposed else 0],), "down": (w.down.shape[1 if self.transposed else 0],)}
        row_parallel = {"o", "down"}
        if self.weight_format != "bf16":  # codes: the quantized kernel, never the producer path
            producers = (False,) * 4
            splits["o"] = splits["down"] = (cfg.hidden,)
            splits["gate_up"] = (cfg.intermediate, cfg.intermediate)
        quant = self.quant_params[i] if self.quant_params else {}
        return LayerProjections(*(
            Projection(getattr(w, g), getattr(w, g + "_bias"), None if sp is None else getattr(sp, g),
                       None if sp is None else getattr(sp, g + "_scale"), splits[g], self.transposed, on[gi],
                       regimes[gi], producers[gi], self.tp_group if g in row_parallel else None, all_reduce,
                       *quant.get(g, (None, None)), self.weight_format, self.group_size)
            for gi, g in enumerate(GROUPS)))

    def quantize_weights(self, weights: str, group_size: int = 128, method: str = "rtn") -> None:
        """Store the four projection groups' weights as `teal.quant` codes (int8 or int4), in place: decode and
        prefill then multiply through `teal.kernels.quant_gemv`. Embeddings, norms and lm_head stay as they
        are. Irreversible; "bf16" is a no-op."""
        from teal.quant import check_format, quantize

        check_format(weights, group_size)
        if weights == "bf16":
            return
        if self.weight_format != "bf16":
            raise ValueError(f"the engine's weights are already {self.weight_format}")
        if self.tp_group is not None:
            raise ValueError("quantized weights are not supported with tensor parallelism")
        self.to_layout(True)
        self.quant_params = []
        for i, w in enumerate(self.layers):
            fields, params = w._asdict(), {}
            for g in GROUPS:
                qw = quantize(fields[g], weights, group_size, method)
                fields[g], params[g] = qw.codes, (qw.scales, qw.zeros)
            self.layers[i] = LayerWeights(**fields)
            self.quant_params.append(params)
        self.weight_format, self.group_size = weights, (group_size if weights == "int4" else 0)
        self.quant_method = method

    def decode_layer_args(self, i: int) -> DecodeLayer:
        """What `decode_layer` reads for layer i: its norms, projections and constants."""
        cfg, w = self.config, self.layers[i]
        p = self.projections(i)
        return DecodeLayer(w.attn_norm, p.qkv, w.q_norm, w.k_norm, p.o, w.post_attn_norm, w.mlp_norm, p.gate_up,
                           p.down, w.post_mlp_norm, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.rms_eps,
                           cfg.norm_offset, cfg.activation, cfg.attn_scale or 1.0 / math.sqrt(cfg.head_dim),
                           self.use_fused_attention)

    @property
    def use_fused_attention(self) -> bool:
        """Whether decode steps take the split-KV attention op: `fused_attention` if set, else on CUDA."""
        return self.fused_attention if self.fused_attention is not None else self.device.type == "cuda"

    def set_sparse_path(self, path: str | None) -> None:
        """Choose how sparse groups are multiplied: "producer" or "kernel" (`SPARSE_PATHS`); None: the default
        (`default_sparse_path`)."""
        if path is not None and path not in SPARSE_PATHS:
            raise ValueError(f"unknown sparse path {path!r}; choose one of {', '.join(SPARSE_PATHS)}")
        self.sparse_path = path

    @property
    def default_sparse_path(self) -> str:
        """"kernel" where the CUDA C++ sparse GEMV runs (compute capability 9.0+; faster than the producer
        path on the H200, benchmarks/notes/decode-step.md), "producer" on other CUDA devices (faster there than
        the Triton kernels alone: benchmarks/results/2026-11-29-h200-decode-producer.json), "kernel" off
        CUDA (on the CPU the producer kernels would only run interpreted; ask for them with
        `set_sparse_path("producer")`)."""
        if self.device.type != "cuda":
            return "kernel"
        return "kernel" if ops.cuda_kernel_available(self.device) else "producer"

    @property
    def default_kernel_at_zero(self) -> tuple[bool, bool, bool, bool]:
        """Groups whose dense product (every threshold -inf, or no thresholds) takes the sparse kernel by
        default, where the CUDA C++ kernel runs on the "kernel" path (none elsewhere): q|k|v and o always;
        gate|up and down where the kernel's "dense" table has an entry for their shape
        (`teal.kernels.configs.has_dense_entry`: where the decode graph ran faster so), else cuBLAS.
        On the H200 (dense decode, tok/s; every group on the kernel / q|k|v and o only / cuBLAS only):
        Llama-3-8B 223.6 / 224.1 / 211.8, Llama-2-7B 240.0 / 241.7 / 235.6, Gemma-3-12B 143.7 / 138.6 /
        135.8 (benchmarks/results/2026-11-29-h200-x2-decode-*-final.json). Set `kernel_at_zero` to True for
        the kernel everywhere, False for cuBLAS everywhere."""
        on = (self.device.type == "cuda" and self.effective_sparse_path == "kernel"
              and ops.cuda_kernel_available(self.device))
        if not on:
            return (False, False, False, False)
        from teal.kernels.configs import has_dense_entry

        cfg = self.config
        return (True, True, has_dense_entry(cfg.hidden, 2 * cfg.intermediate, self.dtype),
                has_dense_entry(cfg.intermediate, cfg.hidden, self.dtype))

    def groups_on_kernel_at_zero(self) -> tuple[bool, ...]:
        """`kernel_at_zero` as one flag per group (its default where None)."""
        at_zero = self.kernel_at_zero
        if at_zero is None:
            return self.default_kernel_at_zero
        at_zero = tuple(at_zero) if isinstance(at_zero, (tuple, list)) else (bool(at_zero),) * len(GROUPS)
        if len(at_zero) != len(GROUPS):
            raise ValueError(f"kernel_at_zero takes one flag or {len(GROUPS)} (one per group: {', '.join(GROUPS)})")
        return at_zero

    @property
    def effective_sparse_path(self) -> str:
        """The sparse path decode steps take: the one set, else the default."""
        return self.sparse_path if self.sparse_path is not None else self.default_sparse_path

    def producer_flags(self, i: int) -> tuple[bool, bool, bool, bool]:
        """Groups of layer i that take the producer path: the sparse ones fed by a norm (q|k|v, gate|up), when
        `sparse_path` is "producer" and the device runs the kernels. (down stays on `sparse_linear`: on the
        H200 its own kernel, 23.5 us, beat SiLU's survivor list + gather, 26.6 us.)"""
        if self.effective_sparse_path != "producer" or not producer_available(self.device):
            return (False, False, False, False)
        qkv, _, gate_up, _ = self.sparse_flags[i]
        return (qkv, False, gate_up, False)

    def to_layout(self, transposed: bool) -> None:
        """Convert the fused weights in place to the dense ([N, K]) or transposed ([K, N]) layout."""
        if transposed == self.transposed:
            return
        if self.weight_format != "bf16":
            raise ValueError(f"{self.weight_format} codes have one layout, the transposed one")
        for i, w in enumerate(self.layers):
            fields = w._asdict()
            for name in ("qkv", "o", "gate_up", "down"):
                fields[name] = fields[name].t().contiguous()  # old tensor freed when the tuple is replaced
            self.layers[i] = LayerWeights(**fields)
        self.transposed = transposed
        if not transposed:
            self.set_thresholds(None)

    # ------------------------------------------------------------- sparsity
    def set_thresholds(
        self,
        thresholds: Mapping[str, float] | None,
        col_scales: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Set per-projection thresholds {"layers.{i}.{p}": t} (None: dense decode).

        Scores are >= 0, so a negative threshold zeroes nothing: a group (q|k|v, o, gate|up, down) uses
        the sparse kernel when any of its thresholds is >= 0 (or where `groups_on_kernel_at_zero` says so),
        else the dense product. With None, groups that `groups_on_kernel_at_zero` names still take the
        kernel (every threshold -inf: a dense product) when the layout is transposed. Values are written
        into persistent tensors, so CUDA graphs already captured see the new values; a change of which
        groups are sparse needs a new graph.
        """
        n = self.config.n_layers
        at_zero = self.groups_on_kernel_at_zero()
        if thresholds is None:
            if not (self.transposed and any(at_zero)):
                self.sparse_flags = tuple((False,) * 4 for _ in range(n))
                self.kernel_regimes = tuple(("sparse",) * 4 for _ in range(n))
                return
            thresholds, col_scales = {f"layers.{i}.{p}": -math.inf for i in range(n) for p in PROJECTIONS}, None
        expected = {f"layers.{i}.{p}" for i in range(n) for p in PROJECTIONS}
        missing = sorted(expected - set(thresholds), key=_key_order)
        extra = sorted(set(thresholds) - expected)
        if missing or extra:
            raise ValueError(
                "thresholds do not match the model's projections: "
                + (f"missing {missing[:6]}{'...' if len(missing) > 6 else ''} " if missing else "")
                + (f"unexpected {extra[:6]}{'...' if len(extra) > 6 else ''}" if extra else "")
            )
        if not self.transposed:
            raise ValueError("sparse decode needs the transposed weight layout; call engine.to_layout(transposed=True)")
        if self.sparsity is None:
            self.sparsity = [
                LayerSparsity(*(torch.full((len(GROUPS[g]),), -math.inf, device=self.device) for g in GROUPS))
                for _ in range(n)
            ]
        flags, regimes = [], []
        for i in range(n):
            sp = self.sparsity[i]
            layer_flags, layer_regimes = [], []
            scales = {}
            for gi, (g, projs) in enumerate(GROUPS.items()):
                values = [float(thresholds[f"layers.{i}.{p}"]) for p in projs]
                getattr(sp, g).copy_(torch.tensor(values, dtype=torch.float32))
                finite = any(v >= 0.0 for v in values)
                layer_flags.append(at_zero[gi] or finite)
                layer_regimes.append("dense" if at_zero[gi] and not finite else "sparse")
                if col_scales is not None:
                    cols = [col_scales[f"layers.{i}.{p}"] for p in projs]
                    scales[g + "_scale"] = torch.stack([c.float() for c in cols]).to(self.device).contiguous()
            self.sparsity[i] = sp._replace(**scales) if col_scales is not None else sp._replace(
                qkv_scale=None, o_scale=None, gate_up_scale=None, down_scale=None)
            flags.append(tuple(layer_flags))
            regimes.append(tuple(layer_regimes))
        self.sparse_flags = tuple(flags)
        self.kernel_regimes = tuple(regimes)

    def weight_column_norms(self) -> dict[str, torch.Tensor]:
        """L2 norm of each input column of every projection (the weight-aware score's c_i), fp32."""
        out = {}
        for name, w in self.hf_state_dict().items():
            if name.endswith("_proj.weight"):
                proj = name.split(".")[-2].removesuffix("_proj")
                layer = int(name.split(".")[2])
                out[f"layers.{layer}.{proj}"] = w.float().norm(dim=0)
        return out

    # ------------------------------------------------------------- forward
    def set_prefill_policy(self, policy: str) -> None:
        """"dense" (default) or "sparse": whether prompt positions are thresholded too (`PREFILL_POLICIES`)."""
        if policy not in PREFILL_POLICIES:
            raise ValueError(f"unknown prefill policy {policy!r}; choose one of {', '.join(PREFILL_POLICIES)}")
        self.prefill_policy = policy

    def _prefill_flags(self, i: int) -> tuple[bool, ...]:
        """Which groups of layer i threshold the prompt (sparse prefill, finite thresholds)."""
        if self.prefill_policy != "sparse" or self.sparsity is None:
            return (False, False, False, False)
        return tuple(on and regime == "sparse" for on, regime in zip(self.sparse_flags[i], self.kernel_regimes[i]))

    def prefill(self, ids: torch.Tensor, observer: Observer | None = None, all_logits: bool = False) -> torch.Tensor:
        """Forward over the prompt ids [T] at positions 0..T-1 (dense, or thresholded at every position with
        `prefill_policy` "sparse"); fills the KV cache.

        Returns the logits of the last position [1, V] (of every position [T, V] with `all_logits`).
        """
        cfg = self.config
        n_tokens = ids.shape[0]
        if n_tokens == 0:
            raise ValueError("the prompt is empty: give at least one token")
        if n_tokens > self.max_seq_len:
            raise ValueError(
                f"the prompt has {n_tokens} tokens but the static KV cache holds {self.max_seq_len}; "
                "build the generator with a larger max_seq_len"
            )
        q_size, kv_size = cfg.q_size, cfg.kv_size
        off = cfg.norm_offset
        x = self.embed_tokens(ids)
        for i, w in enumerate(self.layers):
            p = self.projections(i, prefill=True)
            rope = cfg.rope_table(i)
            cos, sin = self.cos_tables[rope][:n_tokens], self.sin_tables[rope][:n_tokens]
            h = rms_norm(x, w.attn_norm, cfg.rms_eps, off)
            if observer is not None:
                observer(i, "attn_in", h)
            q, k, v = project(p.qkv, h).split([q_size, kv_size, kv_size], dim=-1)
            q = q.view(n_tokens, cfg.n_heads, cfg.head_dim)
            k = k.view(n_tokens, cfg.n_kv_heads, cfg.head_dim)
            v = v.view(n_tokens, cfg.n_kv_heads, cfg.head_dim)
            if w.q_norm is not None:
                q = rms_norm(q, w.q_norm, cfg.rms_eps, off)
                k = rms_norm(k, w.k_norm, cfg.rms_eps, off)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            self.k_cache[i][:, :n_tokens] = k.transpose(0, 1)
            self.v_cache[i][:, :n_tokens] = v.transpose(0, 1)
            attn = _prefill_attention(q, k, v, cfg.layer_windows[i], cfg.softmax_scale).reshape(n_tokens, q_size)
            if observer is not None:
                observer(i, "attn_out", attn)
            o = project(p.o, attn)
            x = x + (o if w.post_attn_norm is None else rms_norm(o, w.post_attn_norm, cfg.rms_eps, off))
            h = rms_norm(x, w.mlp_norm, cfg.rms_eps, off)
            if observer is not None:
                observer(i, "mlp_in", h)
            gate, up = project(p.gate_up, h).chunk(2, dim=-1)
            mid = mlp_activation(gate, cfg.activation) * up
            if observer is not None:
                observer(i, "mlp_mid", mid)
            out = project(p.down, mid)
            x = x + (out if w.post_mlp_norm is None else rms_norm(out, w.post_mlp_norm, cfg.rms_eps, off))
        if not all_logits:
            x = x[-1:]
        return final_logits(x, torch.zeros_like(x), self.final_norm, self.lm_head, cfg.rms_eps, self.vocab_group,
                            off, cfg.final_softcap)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [T, hidden] (times Gemma's sqrt(hidden), rounded to the weights' dtype first)."""
        x = F.embedding(ids, self.embed)
        if self.config.embed_scale is not None:
            x = x * torch.tensor(self.config.embed_scale, dtype=x.dtype)
        return x

    def decode_masks(self, pos: torch.Tensor) -> dict[int | None, torch.Tensor]:
        """Additive fp32 masks [L] for the query at `pos`, one per distinct attention window."""
        masks = {}
        for window in set(self.config.layer_windows):
            visible = self.positions <= pos
            if window is not None:
                visible = visible & (self.positions > pos - window)
            masks[window] = torch.where(visible, 0.0, -math.inf)
        return masks

    def decode(
        self,
        token: torch.Tensor,
        pos: torch.Tensor,
        layer_fn: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
        observer: Observer | None = None,
    ) -> torch.Tensor:
        """One decode step: token [1] at position pos [1] (device tensors). Returns logits [1, V].

        `layer_fn` replaces `decode_layer` (e.g. its compiled version); the code path is the same.
        """
        layer_fn = layer_fn or decode_layer
        cfg = self.config
        x = self.embed_tokens(token)
        delta = torch.zeros_like(x)
        rope = [(cos[pos], sin[pos]) for cos, sin in zip(self.cos_tables, self.sin_tables)]
        masks = self.decode_masks(pos)
        n_valid = pos + 1  # once per step, not once per layer
        for i in range(cfg.n_layers):
            observe = None if observer is None else (lambda site, t, i=i: observer(i, site, t))
            kwargs = {} if observe is None else {"observe": observe}
            cos, sin = rope[cfg.rope_table(i)]
            x, delta = layer_fn(self.decode_layer_args(i), x, delta, self.k_cache[i], self.v_cache[i],
                                pos, cos, sin, masks[cfg.layer_windows[i]], n_valid, **kwargs)
        return final_logits(x, delta, self.final_norm, self.lm_head, cfg.rms_eps, self.vocab_group,
                            cfg.norm_offset, cfg.final_softcap)

    # ------------------------------------------------------------ export
    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Views of the weights under HF Llama parameter names ([out, in] each; no copies)."""
        cfg = self.config
        sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": self.embed, "model.norm.weight": self.final_norm}
        if not cfg.tie_embeddings:
            sd["lm_head.weight"] = self.lm_head
        split = {"qkv": [cfg.q_size, cfg.kv_size, cfg.kv_size], "gate_up": [cfg.intermediate] * 2}
        for i, w in enumerate(self.layers):
            p = f"model.layers.{i}."
            sd[p + "input_layernorm.weight"] = w.attn_norm
            if w.post_attn_norm is not None:  # Gemma 3's names
                sd[p + "post_attention_layernorm.weight"] = w.post_attn_norm
                sd[p + "pre_feedforward_layernorm.weight"] = w.mlp_norm
                sd[p + "post_feedforward_layernorm.weight"] = w.post_mlp_norm
            else:
                sd[p + "post_attention_layernorm.weight"] = w.mlp_norm
            if w.q_norm is not None:
                sd[p + "self_attn.q_norm.weight"] = w.q_norm
                sd[p + "self_attn.k_norm.weight"] = w.k_norm
            for group, prefix, names in (("qkv", "self_attn.", ("q", "k", "v")), ("o", "self_attn.", ("o",)),
                                         ("gate_up", "mlp.", ("gate", "up")), ("down", "mlp.", ("down",))):
                weight = getattr(w, group)
                if self.weight_format != "bf16":  # a dequantized copy (codes have no HF parameter form)
                    weight = self.projections(i).__getattribute__(group)
                    from teal.engine.projection import quantized_weight

                    weight = quantized_weight(weight).dequantize(self.dtype)
                dense = weight.t() if self.transposed else weight
                bias = getattr(w, group + "_bias")
                parts = dense.split(split[group], dim=0) if group in split else (dense,)
                if bias is None:
                    bias_parts: tuple = (None,) * len(names)
                else:
                    bias_parts = bias.split(split[group]) if group in split else (bias,)
                for name, part, b in zip(names, parts, bias_parts):
                    sd[f"{p}{prefix}{name}_proj.weight"] = part
                    if b is not None:
                        sd[f"{p}{prefix}{name}_proj.bias"] = b
        return sd

    def iter_weight_bytes(self) -> Iterator[tuple[str, int]]:
        """(kind, bytes) of every weight tensor: kind is a projection name, 'embed', 'lm_head' or 'norm'."""
        cfg = self.config
        item = self.embed.element_size()
        shapes = cfg.projection_shapes()
        for i, _ in enumerate(self.layers):
            if self.weight_format != "bf16":  # codes, scales and zeros, per group (q|k|v, gate|up fused)
                for g, p in self.projections(i)._asdict().items():
                    from teal.engine.projection import quantized_weight

                    yield g, quantized_weight(p).nbytes()
            else:
                for p in PROJECTIONS:
                    k, n = shapes[p]
                    yield p, k * n * item
            yield "norm", 2 * cfg.hidden * item
        yield "embed", self.embed.numel() * item
        if not cfg.tie_embeddings:
            yield "lm_head", self.lm_head.numel() * item


def _prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None,
                       scale: float | None = None) -> torch.Tensor:
    """Causal attention over the prompt. q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D]."""
    n_tokens = q.shape[0]
    qt, kt, vt = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    if window is None or window >= n_tokens:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True, scale=scale)
    else:
        i = torch.arange(n_tokens, device=q.device)
        mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=True, scale=scale)
    return out.squeeze(0).transpose(0, 1)


def _key_order(key: str) -> tuple[int, int]:
    _, layer, proj = key.split(".")
    return int(layer), PROJECTIONS.index(proj) if proj in PROJECTIONS else len(PROJECTIONS)
