"""PEARL's verification rule: speculative sampling (or argmax matching) with no bonus token after an accepted leaf."""

from __future__ import annotations

from hf_decoding_ext.speculative.acceptance.greedy import GreedyAcceptance
from hf_decoding_ext.speculative.acceptance.speculative_sampling import SpeculativeSamplingAcceptance


class PEARLAcceptance(SpeculativeSamplingAcceptance):
    """PEARL's verification (Liu et al., arXiv 2408.11850): speculative sampling along the draft (argmax matching
    without sampling), **without a bonus token after a fully accepted draft**: when the walk accepts a leaf, that
    leaf is the step's last token and nothing is drawn from the target after it.

    In PEARL the target never samples after the last verified draft token: a round that accepts every token it
    verifies hands over to the next round, which verifies the draft tokens drafted meanwhile (post-verify). Draw for
    draw the rule is :class:`~hf_decoding_ext.speculative.acceptance.SpeculativeSamplingAcceptance` (greedy:
    :class:`~hf_decoding_ext.speculative.acceptance.GreedyAcceptance`) up to the accepted leaf; a rejection ends the
    step with a token from the residual (greedy: the target's argmax). Every emitted token follows the target given
    the tokens before it, so the rule is lossless for every sibling scheme. Registered as ``acceptance="pearl"``.

    Args:
        greedy: argmax matching (``do_sample=False``) instead of speculative sampling; :meth:`for_sampling` sets it.

    Example:
        >>> import torch
        >>> from hf_decoding_ext.core.tree import DraftTree
        >>> scores = {-1: torch.tensor([-30.0, 30.0, -30.0]), 0: torch.tensor([-30.0, -30.0, 30.0])}
        >>> PEARLAcceptance(greedy=True).accept(DraftTree.chain([1, 2]), scores.__getitem__)  # leaf 2 ends the step
        ([0], 2)
        >>> PEARLAcceptance(greedy=True).accept(DraftTree.chain([0]), scores.__getitem__)  # rejected: the argmax
        ([], 1)
    """

    bonus_after_leaf = False

    def __init__(self, greedy: bool = False):
        if not isinstance(greedy, bool):
            raise ValueError(f"greedy must be a bool, got {greedy!r}")
        self.greedy = greedy

    @classmethod
    def for_sampling(cls, do_sample: bool) -> PEARLAcceptance:
        return cls(greedy=not do_sample)

    def accept(self, tree, scores_at, generator=None):
        if self.greedy:  # GreedyAcceptance's walk, which honours bonus_after_leaf
            return GreedyAcceptance.accept(self, tree, scores_at, generator)
        return super().accept(tree, scores_at, generator)


__all__ = ["PEARLAcceptance"]
