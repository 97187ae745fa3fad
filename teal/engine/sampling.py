"""Token sampling without host synchronization, so it can live inside a CUDA graph."""

from __future__ import annotations

import torch


def sample(
    logits: torch.Tensor,
    greedy: bool,
    temperature: torch.Tensor | float = 1.0,
    top_p: torch.Tensor | float = 1.0,
    use_top_p: bool = False,
) -> torch.Tensor:
    """Next token ids [B] from logits [B, V].

    greedy: argmax. Otherwise softmax(logits / temperature), restricted to the nucleus (the smallest set
    of most likely tokens whose probability reaches `top_p`) when `use_top_p`, then sampled with the
    exponential-race trick (argmax p_i / E_i, E_i ~ Exp(1)), which needs no host sync.
    """
    if greedy:
        return argmax_last(logits)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if use_top_p:
        probs = top_p_filter(probs, top_p)
    race = torch.empty_like(probs).exponential_(1.0)
    return argmax_last(probs / race)


#: Vocabularies at least this wide take the two-stage argmax on CUDA.
SPLIT_ARGMAX_FROM = 16384


def argmax_last(x: torch.Tensor) -> torch.Tensor:
    """``torch.argmax(x, dim=-1)`` (the first maximum's index) for x [B, V].

    On CUDA a wide row is reduced in two stages, the maxima of C equal chunks then the first chunk holding
    the largest: ATen reduces one row with one thread block (35 us for V = 128256 on the H200), the split
    keeps the GPU busy. ``torch.max`` returns the first maximum of each chunk, and the first chunk with the
    largest value holds the row's first maximum, so ties resolve as ``torch.argmax`` does.
    """
    v = x.shape[-1]
    chunks = _argmax_chunks(v) if x.device.type == "cuda" and v >= SPLIT_ARGMAX_FROM else 1
    return torch.argmax(x, dim=-1) if chunks == 1 else split_argmax(x, chunks)


def split_argmax(x: torch.Tensor, chunks: int) -> torch.Tensor:
    """``torch.argmax(x, dim=-1)`` through the maxima of ``chunks`` equal chunks (``chunks`` divides V)."""
    v = x.shape[-1]
    values, index = x.reshape(*x.shape[:-1], chunks, v // chunks).max(dim=-1)
    best = torch.argmax(values, dim=-1, keepdim=True)
    return (best * (v // chunks) + index.gather(-1, best)).squeeze(-1)


def _argmax_chunks(v: int) -> int:
    """The most chunks, at most 256, that divide v into rows of at least 256 entries (1: none does)."""
    return next((c for c in range(min(256, v // 256), 1, -1) if v % c == 0), 1)


def top_p_filter(probs: torch.Tensor, top_p: torch.Tensor | float) -> torch.Tensor:
    """Zero every token outside the nucleus of `top_p`; the most likely token is always kept."""
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
