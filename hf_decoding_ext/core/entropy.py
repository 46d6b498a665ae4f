"""Entropy and surprise utilities shared by entropy-triggered methods and the quality metrics."""

from __future__ import annotations

import math

import torch


def entropy(scores: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy in nats of the distribution ``softmax(scores)`` along ``dim`` (``-inf`` entries allowed)."""
    logp = torch.log_softmax(scores.float(), dim=dim)
    p = logp.exp()
    return -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(dim)


def surprise(scores: torch.Tensor, tokens: torch.Tensor, base: float = 2.0) -> torch.Tensor:
    """Surprise ``-log_base p(token)`` under ``softmax(scores)``; ``scores (batch, vocab)``, ``tokens (batch,)``."""
    logp = torch.log_softmax(scores.float(), dim=-1).gather(-1, tokens[:, None].long()).squeeze(-1)
    return -logp / math.log(base)
