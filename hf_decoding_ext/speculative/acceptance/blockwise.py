"""Blockwise Parallel Decoding's relaxed acceptance criteria (lossy), from Stern, Shazeer, Uszkoreit, "Blockwise
Parallel Decoding for Deep Autoregressive Models" (NeurIPS 2018, arXiv 1811.03115), its approximate-inference
criteria.

The paper's default criterion, "accept the longest prefix whose proposals equal the base model's argmax", is the
engine's :class:`~hf_decoding_ext.speculative.acceptance.greedy.GreedyAcceptance` (``acceptance="greedy"``,
token-identical to greedy decoding). The two relaxed criteria trade exactness for longer accepted blocks:

- :class:`BlockwiseTopKAcceptance` (``"blockwise-top-k"``): a proposal passes when it is among the base model's
  ``k`` highest-scoring tokens at its position.
- :class:`BlockwiseDistanceAcceptance` (``"blockwise-distance"``): a proposal passes when its distance to the base
  model's argmax is at most ``epsilon``; the paper uses it for ordinal outputs (pixel intensities), here the distance
  is between token ids, meaningful only when the vocabulary is ordinal (ids of numbers, intensities).

Both are LOSSY: the output may differ from greedy decoding wherever a non-argmax proposal is accepted; at ``k=1`` /
``epsilon=0`` they are exactly the greedy criterion. Importing this module registers both names with
:func:`~hf_decoding_ext.speculative.acceptance.register_acceptance_rule` (the blockwise drafters import it).
"""

from __future__ import annotations

import abc

from hf_decoding_ext.speculative.acceptance import ACCEPTANCE_RULES, register_acceptance_rule
from hf_decoding_ext.speculative.acceptance.base import AcceptanceRule


class _LongestPassingPrefix(AcceptanceRule):
    """Longest path of passing proposals (depth first, children in order); bonus = the argmax after it."""

    lossless_schemes = frozenset()

    @classmethod
    def for_sampling(cls, do_sample: bool):
        if do_sample:
            raise ValueError(f"{cls.__name__} is a greedy-decoding criterion; use do_sample=False")
        return cls()

    @abc.abstractmethod
    def passes(self, scores, token: int) -> bool:
        """Whether ``token`` passes the criterion under the target's ``scores`` at its position."""

    def accept(self, tree, scores_at, generator=None):
        best: list[int] = []
        stack = [(-1, [])]
        while stack:
            node, path = stack.pop()
            if len(path) > len(best):
                best = path
            scores = scores_at(node)
            for c in reversed(tree.children(node)):
                if self.passes(scores, int(tree.tokens[c])):
                    stack.append((c, path + [c]))
        return best, int(scores_at(best[-1] if best else -1).argmax())


class BlockwiseTopKAcceptance(_LongestPassingPrefix):
    """Top-k selection criterion of Blockwise Parallel Decoding (Stern et al. 2018, arXiv 1811.03115, approximate inference):
    accept the longest prefix of proposals each of which is among the base model's top ``k`` tokens at its position.
    Lossy (``k=1`` is the exact greedy criterion).

    Args:
        k: size of the top-k set (>= 1).

    Example:
        >>> import torch
        >>> from hf_decoding_ext.core.tree import DraftTree
        >>> scores = {-1: torch.tensor([0.0, 3.0, 2.0]), 0: torch.tensor([5.0, 0.0, 1.0])}
        >>> BlockwiseTopKAcceptance(k=2).accept(DraftTree.chain([2]), scores.__getitem__)
        ([0], 0)
        >>> BlockwiseTopKAcceptance(k=1).accept(DraftTree.chain([2]), scores.__getitem__)
        ([], 1)
    """

    def __init__(self, k: int = 2):
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        self.k = k

    def passes(self, scores, token: int) -> bool:
        return bool((scores > scores[token]).sum() < self.k)


class BlockwiseDistanceAcceptance(_LongestPassingPrefix):
    """Distance-based criterion of Blockwise Parallel Decoding (Stern et al. 2018, arXiv 1811.03115, approximate inference):
    accept the longest prefix of proposals within ``epsilon`` of the base model's argmax, the distance being
    ``|token_id - argmax_id|`` (the paper's ordinal outputs; meaningful only for an ordinal vocabulary). Lossy
    (``epsilon=0`` is the exact greedy criterion).

    Args:
        epsilon: the largest accepted distance (>= 0).

    Example:
        >>> import torch
        >>> from hf_decoding_ext.core.tree import DraftTree
        >>> scores = {-1: torch.tensor([0.0, 3.0, 2.0, 0.0]), 0: torch.tensor([5.0, 0.0, 1.0, 0.0])}
        >>> BlockwiseDistanceAcceptance(epsilon=1).accept(DraftTree.chain([2]), scores.__getitem__)
        ([0], 0)
    """

    def __init__(self, epsilon: int = 1):
        if not isinstance(epsilon, int) or epsilon < 0:
            raise ValueError(f"epsilon must be an integer >= 0, got {epsilon!r}")
        self.epsilon = epsilon

    def passes(self, scores, token: int) -> bool:
        return abs(token - int(scores.argmax())) <= self.epsilon


RULES = {"blockwise-top-k": BlockwiseTopKAcceptance, "blockwise-distance": BlockwiseDistanceAcceptance}
"""Names under which the relaxed criteria are registered."""

for _name, _rule in RULES.items():
    if _name not in ACCEPTANCE_RULES:
        register_acceptance_rule(_name, _rule)
