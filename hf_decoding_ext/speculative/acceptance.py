"""Acceptance rules: which draft nodes the target model accepts, and the bonus token.

A rule walks the draft tree from the root. At each visited node it asks ``scores_at(node)`` for the target's
processed next-token scores there (the caller's logits processors applied to the committed sequence plus the path;
``-1`` is the root) and decides which child, if any, continues the accepted path. It returns the accepted node
indices and one extra token drawn from the target at the last accepted node, so every step adds at least one token.

- :class:`GreedyAcceptance`: a child is accepted when it is the argmax. Token-identical to greedy decoding.
- :class:`SpeculativeSamplingAcceptance`: Leviathan et al. (2023) / Chen et al. (2023) rejection sampling, extended
  to trees by recursive rejection over the children (SpecInfer, Miao et al. 2024). Lossless in distribution when
  sibling drafts are i.i.d. samples of ``draft_probs`` or when the draft is deterministic (``draft_probs=None``:
  one-hot proposals, each rejected token removed from the residual).
- :class:`TypicalAcceptance`: Medusa's typical acceptance (Cai et al. 2024), lossy: a candidate passes when
  ``p(x) > min(epsilon, delta * exp(-H(p)))``; the longest passing path is taken.

Further multi-draft rules (SpecTr's optimal transport, Recursive Speculative Decoding without replacement) plug in
by subclassing :class:`AcceptanceRule`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import torch

from hf_decoding_ext.core.tree import DraftTree

ScoresAt = Callable[[int], torch.Tensor]


class AcceptanceRule(abc.ABC):
    """Base class. ``accept(tree, scores_at, generator)`` returns ``(accepted_nodes, bonus_token)``."""

    lossless: bool = True

    @abc.abstractmethod
    def accept(self, tree: DraftTree, scores_at: ScoresAt,
               generator: torch.Generator | None = None) -> tuple[list[int], int]:
        """Accepted node indices and the bonus token."""


class GreedyAcceptance(AcceptanceRule):
    """Accept the child equal to the target's argmax; the bonus is the argmax after the last accepted node."""

    def accept(self, tree, scores_at, generator=None):
        accepted, node = [], -1
        while True:
            best = int(scores_at(node).argmax())
            nxt = next((c for c in tree.children(node) if int(tree.tokens[c]) == best), None)
            if nxt is None:
                return accepted, best
            accepted.append(nxt)
            node = nxt


def _probs(scores: torch.Tensor) -> torch.Tensor:
    return torch.softmax(scores.float(), dim=-1)


def _sample(p: torch.Tensor, generator=None) -> int:
    return int(torch.multinomial(p, 1, generator=generator))


class SpeculativeSamplingAcceptance(AcceptanceRule):
    """Speculative sampling for chains and trees (lossless in distribution).

    At a node with target distribution ``p``, children ``x_1..x_k`` are tried in order: ``x_i`` is accepted with
    probability ``min(1, p(x_i) / q(x_i))``; on rejection ``p <- norm(max(p - q, 0))``. ``q`` is the child's
    ``draft_probs`` row, or one-hot on ``x_i`` for deterministic drafts. If every child is rejected, the bonus token
    is sampled from the residual ``p``.
    """

    def accept(self, tree, scores_at, generator=None):
        accepted, node = [], -1
        while True:
            p = _probs(scores_at(node))
            chosen = None
            for c in tree.children(node):
                x = int(tree.tokens[c])
                if tree.draft_probs is None:
                    px = float(p[x])
                    if px > 0 and float(torch.rand((), generator=generator)) < px:
                        chosen = c
                        break
                    p = p.clone()
                    p[x] = 0.0
                    total = p.sum()
                    if total <= 0:  # numerically everything was rejected: fall back to the target argmax
                        p = _probs(scores_at(node))
                        break
                    p = p / total
                else:
                    q = tree.draft_probs[c].to(p.device, torch.float32)
                    ratio = float(p[x]) / max(float(q[x]), 1e-20)
                    if float(torch.rand((), generator=generator)) < min(1.0, ratio):
                        chosen = c
                        break
                    residual = (p - q).clamp(min=0)
                    total = residual.sum()
                    if total <= 0:
                        break
                    p = residual / total
            if chosen is None:
                return accepted, _sample(p, generator)
            accepted.append(chosen)
            node = chosen


class TypicalAcceptance(AcceptanceRule):
    """Medusa's typical acceptance (lossy).

    Args:
        epsilon: hard threshold (Medusa's ``posterior_threshold``, default 0.09).
        delta: entropy-dependent threshold factor (Medusa's ``posterior_alpha``, default ``sqrt(epsilon)`` = 0.3).
        sample_bonus: sample the bonus token from ``p`` (else argmax).
    """

    lossless = False

    def __init__(self, epsilon: float = 0.09, delta: float | None = None, sample_bonus: bool = True):
        if not 0 < epsilon < 1:
            raise ValueError(f"epsilon must be in (0, 1), got {epsilon}")
        self.epsilon = epsilon
        self.delta = epsilon ** 0.5 if delta is None else delta
        if self.delta <= 0:
            raise ValueError(f"delta must be > 0, got {self.delta}")
        self.sample_bonus = sample_bonus

    def _passes(self, p: torch.Tensor, x: int) -> bool:
        logp = torch.log(p.clamp(min=1e-30))
        ent = float(-(p * logp).sum())
        return float(p[x]) > min(self.epsilon, self.delta * float(torch.exp(torch.tensor(-ent))))

    def accept(self, tree, scores_at, generator=None):
        # longest passing path (depth-first, children in order)
        best: list[int] = []
        cache: dict[int, torch.Tensor] = {}

        def probs(node):
            if node not in cache:
                cache[node] = _probs(scores_at(node))
            return cache[node]

        stack = [(-1, [])]
        while stack:
            node, path = stack.pop()
            if len(path) > len(best):
                best = path
            p = probs(node)
            for c in reversed(tree.children(node)):
                if self._passes(p, int(tree.tokens[c])):
                    stack.append((c, path + [c]))
        last = best[-1] if best else -1
        p = probs(last)
        bonus = _sample(p, generator) if self.sample_bonus else int(p.argmax())
        return best, bonus


def resolve_rule(rule: str | AcceptanceRule, do_sample: bool) -> AcceptanceRule:
    """``"auto"`` picks greedy without sampling and speculative sampling with it."""
    if isinstance(rule, AcceptanceRule):
        return rule
    if rule == "auto":
        return SpeculativeSamplingAcceptance() if do_sample else GreedyAcceptance()
    if rule == "greedy":
        if do_sample:
            raise ValueError("greedy acceptance with do_sample=True would not sample; use 'speculative' or 'auto'")
        return GreedyAcceptance()
    if rule == "speculative":
        return SpeculativeSamplingAcceptance()
    if rule == "typical":
        return TypicalAcceptance(sample_bonus=do_sample)
    raise ValueError(f"unknown acceptance rule {rule!r}; use 'auto', 'greedy', 'speculative', 'typical' or an "
                     "AcceptanceRule instance")
