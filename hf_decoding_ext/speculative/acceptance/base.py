"""The acceptance-rule interface: which draft nodes the target accepts, and the bonus token."""

from __future__ import annotations

import abc
from collections.abc import Callable

import torch

from hf_decoding_ext.core.tree import DraftTree

ScoresAt = Callable[[int], torch.Tensor]
"""``scores_at(node)``: the target's processed next-token scores ``(vocab,)`` after tree node ``node`` (``-1``: the
root, i.e. after the committed sequence)."""


class AcceptanceRule(abc.ABC):
    """Base class of acceptance rules.

    A rule walks the draft tree from the root. At each visited node it asks ``scores_at(node)`` for the target's
    processed next-token scores there and decides which child, if any, continues the accepted path.
    ``accept(tree, scores_at, generator)`` returns the accepted node indices (a root-to-node path) and one bonus
    token drawn from the target at the last accepted node, so every step adds at least one token.

    A rule declares in ``lossless_schemes`` the sibling schemes (:attr:`DraftTree.sibling_scheme
    <hf_decoding_ext.core.tree.DraftTree>`: ``"deterministic"``, ``"iid"``, ``"without_replacement"``) for which it
    keeps the target's output exactly (token-identical for greedy rules, in distribution for sampling rules);
    :meth:`check_tree` refuses any other scheme, and the engine calls it on every draft. A lossy rule declares none
    (``lossless`` is then false) and takes any draft. Every random draw goes through :meth:`draw_bernoulli` and
    :meth:`draw_token`, so a test can enumerate a rule's accept/reject paths exactly.

    Subclasses implement :meth:`accept`; :meth:`for_sampling` builds the rule the name table
    (:data:`~hf_decoding_ext.speculative.acceptance.ACCEPTANCE_RULES`) returns for ``do_sample``.

    Example:
        >>> import torch
        >>> from hf_decoding_ext.core.tree import DraftTree
        >>> from hf_decoding_ext.speculative.acceptance import AcceptanceRule
        >>> class RejectAll(AcceptanceRule):
        ...     def accept(self, tree, scores_at, generator=None):
        ...         return [], int(scores_at(-1).argmax())
        >>> RejectAll().accept(DraftTree.chain([1]), lambda node: torch.tensor([0.0, 1.0, 3.0]))
        ([], 2)
    """

    lossless_schemes: frozenset[str] = frozenset({"deterministic"})
    bonus_after_leaf: bool = True
    """Whether a fully accepted path (its last node a leaf of the tree) is followed by a bonus token from the target
    (``True``, the usual rule). ``False``: the accepted leaf itself ends the step and is returned as the step's last
    token, with no draw after it (PEARL, whose next round verifies the tokens drafted meanwhile). The greedy and
    speculative-sampling rules honour it."""
    uses_side_scores: bool = False
    """A rule that sets it gets a keyword ``side_scores_at`` in :meth:`accept`: ``side_scores_at(node)`` is the
    caller's processors applied to the side-node logits the drafter aligned with ``node``
    (:attr:`Draft.side_rows <hf_decoding_ext.speculative.drafters.base.Draft>`, e.g. the same position's
    prediction after a reflection prompt), ``None`` where there is none. Other rules are called as before."""

    @property
    def lossless(self) -> bool:
        """Whether the rule keeps the target's output for some sibling scheme."""
        return bool(self.lossless_schemes)

    @classmethod
    def for_sampling(cls, do_sample: bool) -> AcceptanceRule:
        """The rule for a ``generate()`` call with ``do_sample`` (default: ``cls()``; overridden where the rule
        depends on it)."""
        return cls()

    def check_tree(self, tree: DraftTree) -> None:
        """Raise a ``ValueError`` when a lossless rule gets a draft whose sibling scheme it is not lossless for."""
        if self.lossless and tree.sibling_scheme not in self.lossless_schemes:
            raise ValueError(
                f"{type(self).__name__} is lossless only for drafts whose siblings are "
                f"{sorted(self.lossless_schemes)}, got a draft with sibling_scheme={tree.sibling_scheme!r}; use a "
                "rule that is lossless for that scheme or a lossy rule such as acceptance='typical'")

    @abc.abstractmethod
    def accept(self, tree: DraftTree, scores_at: ScoresAt,
               generator: torch.Generator | None = None) -> tuple[list[int], int]:
        """Accepted node indices and the bonus token."""

    # ------------------------------------------------------------------------------------------------ random draws
    def draw_bernoulli(self, prob: float, generator: torch.Generator | None = None) -> bool:
        """True with probability ``prob`` (one uniform draw, on the generator's device: a CUDA generator cannot
        draw a CPU tensor)."""
        device = generator.device if generator is not None else None
        return float(torch.rand((), generator=generator, device=device)) < prob

    def draw_token(self, probs: torch.Tensor, generator: torch.Generator | None = None) -> int:
        """A token sampled from ``probs`` ``(vocab,)``."""
        return int(torch.multinomial(probs, 1, generator=generator))


def target_probs(scores: torch.Tensor) -> torch.Tensor:
    """float32 softmax of processed scores ``(vocab,)``."""
    return torch.softmax(scores.float(), dim=-1)
