"""The adaptive plausibility constraint shared by every contrastive method (CD, LQCD, DoLa, LOL, SCD).

Li et al. (Contrastive Decoding, arXiv 2210.15097) restrict the contrast to the head of the expert's distribution,
``V_head = {x : p(x) >= alpha * max_w p(w)}``; DoLa, LOL, LQCD and SCD use the same set (DoLa calls the threshold
``relative_top``).
"""

from __future__ import annotations

import math

import torch


def plausibility_mask(logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """Adaptive plausibility set ``{x : p(x) >= alpha * max_w p(w)}`` with ``p = softmax(logits)``, as a boolean
    mask of the shape of ``logits`` (any leading shape ``(..., vocab)``).

    The most likely token is always kept; ``alpha <= 0`` keeps every token.

    Example:
        >>> import torch
        >>> plausibility_mask(torch.tensor([[2.0, 1.0, -5.0]]), 0.1).tolist()
        [[True, True, False]]
    """
    log_p = torch.log_softmax(logits.float(), dim=-1)
    if alpha <= 0.0:
        return torch.ones_like(log_p, dtype=torch.bool)
    return log_p >= log_p.max(dim=-1, keepdim=True).values + math.log(alpha)
