"""Medusa's typical acceptance (lossy)."""

from __future__ import annotations

import torch

from hf_decoding_ext.speculative.acceptance.base import AcceptanceRule, target_probs


class TypicalAcceptance(AcceptanceRule):
    """Typical acceptance, from "Medusa: Simple LLM Inference Acceleration Framework with Multiple Decoding Heads"
    (Cai et al., arXiv 2401.10774). Lossy: a candidate passes when ``p(x) > min(epsilon, delta * exp(-H(p)))``
    and the longest passing path is taken, so it takes drafts of any sibling scheme.

    Args:
        epsilon: hard threshold (Medusa's ``posterior_threshold``, default 0.09).
        delta: entropy-dependent threshold factor (Medusa's ``posterior_alpha``, default ``sqrt(epsilon)`` = 0.3).
        sample_bonus: sample the bonus token from ``p`` (else argmax).

    Example:
        >>> import torch
        >>> from hf_decoding_ext.core.tree import DraftTree
        >>> rule = TypicalAcceptance(sample_bonus=False)
        >>> scores = {-1: torch.log(torch.tensor([0.1, 0.8, 0.1])), 0: torch.log(torch.tensor([0.7, 0.2, 0.1]))}
        >>> rule.accept(DraftTree.chain([1]), scores.__getitem__), rule.lossless
        (([0], 0), False)
    """

    lossless_schemes = frozenset()

    def __init__(self, epsilon: float = 0.09, delta: float | None = None, sample_bonus: bool = True):
        if not 0 < epsilon < 1:
            raise ValueError(f"epsilon must be in (0, 1), got {epsilon}")
        self.epsilon = epsilon
        self.delta = epsilon ** 0.5 if delta is None else delta
        if self.delta <= 0:
            raise ValueError(f"delta must be > 0, got {self.delta}")
        self.sample_bonus = sample_bonus

    @classmethod
    def for_sampling(cls, do_sample: bool) -> TypicalAcceptance:
        return cls(sample_bonus=do_sample)

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
                cache[node] = target_probs(scores_at(node))
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
        bonus = self.draw_token(p, generator) if self.sample_bonus else int(p.argmax())
        return best, bonus
