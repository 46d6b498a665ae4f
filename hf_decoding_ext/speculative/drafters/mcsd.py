"""Multi-Candidate Speculative Decoding: several draft candidates per position, verified as one tree."""

from __future__ import annotations

from hf_decoding_ext.speculative.drafters.draft_model import DraftModelTreeDrafter


class MCSDDrafter(DraftModelTreeDrafter):
    """The drafts of "Multi-Candidate Speculative Decoding" (Yang, Huang, Chen, Jiang, Wang; arXiv 2401.06706): the
    draft model proposes ``k`` candidates at each position of the draft, the target verifies the whole candidate
    tree in one forward, and the candidates are accepted by recursive rejection sampling over siblings
    (``SpeculativeDecoding(..., acceptance="speculative")``), lossless for candidates sampled with replacement
    (i.i.d., the paper's main setting) and without replacement (its improved variant).

    Args:
        assistant_model: the draft model.
        branching: candidates per node at each depth (default ``(3, 2, 1, 1)``: 3 at the first position, 2 below
            each, then single continuations).
        sibling_scheme: ``"iid"`` (with replacement, default) or ``"without_replacement"``.

    See :class:`~hf_decoding_ext.speculative.drafters.draft_model.DraftModelTreeDrafter` for the tree and its
    deviation (one draft forward per node).

    Example:
        >>> from hf_decoding_ext.speculative import SpeculativeDecoding
        >>> from hf_decoding_ext.speculative.drafters.mcsd import MCSDDrafter
        >>> loop = SpeculativeDecoding(MCSDDrafter(small_model))  # doctest: +SKIP
        >>> out = model.generate(**inputs, do_sample=True, max_new_tokens=64, custom_generate=loop)  # doctest: +SKIP
    """

    def __init__(self, assistant_model=None, branching=(3, 2, 1, 1), sibling_scheme: str = "iid"):
        super().__init__(assistant_model, branching=branching, sibling_scheme=sibling_scheme)


__all__ = ["MCSDDrafter"]
