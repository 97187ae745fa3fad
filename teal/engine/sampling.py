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
        return torch.argmax(logits, dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if use_top_p:
        probs = top_p_filter(probs, top_p)
    race = torch.empty_like(probs).exponential_(1.0)
    return torch.argmax(probs / race, dim=-1)


def top_p_filter(probs: torch.Tensor, top_p: torch.Tensor | float) -> torch.Tensor:
    """Zero every token outside the nucleus of `top_p`; the most likely token is always kept."""
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
