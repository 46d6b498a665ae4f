"""Greedy acceptance: the accepted path is the one greedy decoding of the target would produce."""

from __future__ import annotations

from hf_decoding_ext.core.tree import DraftTree
from hf_decoding_ext.speculative.acceptance.base import AcceptanceRule


class GreedyAcceptance(AcceptanceRule):
    """Accept the child equal to the target's argmax; the bonus is the argmax after the last accepted node.

    Token-identical to greedy decoding whatever produced the draft, so it is lossless for every sibling scheme.
    Only for ``do_sample=False`` (:meth:`for_sampling` refuses sampling).

    Example:
        >>> import torch
        >>> from hf_decoding_ext.core.tree import DraftTree
        >>> tree = DraftTree(torch.tensor([4, 2, 3]), [-1, -1, 1])  # root -> 4, root -> 2 -> 3
        >>> scores = {-1: torch.tensor([0.0, 0, 5, 0, 1]), 1: torch.tensor([0.0, 0, 0, 5, 0]),
        ...           2: torch.tensor([0.0, 7, 0, 0, 0])}
        >>> GreedyAcceptance().accept(tree, scores.__getitem__)
        ([1, 2], 1)
    """

    lossless_schemes = frozenset(DraftTree.SIBLING_SCHEMES)

    @classmethod
    def for_sampling(cls, do_sample: bool) -> GreedyAcceptance:
        if do_sample:
            raise ValueError("greedy acceptance with do_sample=True would not sample; use 'speculative' or 'auto'")
        return cls()

    def accept(self, tree, scores_at, generator=None):
        accepted, node = [], -1
        while True:
            best = int(scores_at(node).argmax())
            nxt = next((c for c in tree.children(node) if int(tree.tokens[c]) == best), None)
            if nxt is None:
                return accepted, best
            if not self.bonus_after_leaf and not tree.children(nxt):
                return accepted, best  # the accepted leaf ends the step
            accepted.append(nxt)
            node = nxt
