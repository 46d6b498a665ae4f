"""Multi-Candidate Speculative Decoding: several draft candidates per position, verified as one tree."""

from __future__ import annotations

from hf_decoding_ext.speculative.drafters.draft_model import DraftModelTreeDrafter


class MCSDDrafter(DraftModelTreeDrafter):
    """The drafts of "Multi-Candidate Speculative Decoding" (Yang, Huang, Chen, Jiang, Wang; arXiv 2401.06706): the
    draft model proposes ``k`` candidates at each position of the draft, the target verifies the whole candidate
    tree in one forward, and the candidates are accepted by recursive rejection sampling over siblings
    (``SpeculativeDecoding(..., acceptance="speculative")``), lossless for candidates sampled without replacement
    (the official code's default, ``replacement=False``: a rejected candidate is also removed from the draft
    distribution) and with replacement (i.i.d., SpecInfer-style multi-step sampling).

    Args:
        assistant_model: the draft model.
        branching: candidates per node at each depth (default ``(4, 2, 2)``, the official code's ``k_config``).
        sibling_scheme: ``"without_replacement"`` (default) or ``"iid"`` (with replacement).

    See :class:`~hf_decoding_ext.speculative.drafters.draft_model.DraftModelTreeDrafter` for the tree (one draft
    forward per depth with a tree mask, as the official code's tree attention). The official code's naive variant
    (MCNS: one target sample matched against the candidates) is not implemented.

    Example:
        >>> from hf_decoding_ext.speculative import SpeculativeDecoding
        >>> from hf_decoding_ext.speculative.drafters.mcsd import MCSDDrafter
        >>> loop = SpeculativeDecoding(MCSDDrafter(small_model))  # doctest: +SKIP
        >>> out = model.generate(**inputs, do_sample=True, max_new_tokens=64, custom_generate=loop)  # doctest: +SKIP
    """

    @classmethod
    def for_model(cls, model=None, tokenizer=None, assistant: str = "distilled", branching=(4, 2, 2),
                  sibling_scheme: str = "without_replacement") -> MCSDDrafter:
        """Registry/CLI factory (``assistant`` as in :meth:`DraftModelDrafter.load_assistant`)."""
        return cls(cls.load_assistant(model, assistant), branching=tuple(branching), sibling_scheme=sibling_scheme)

    def __init__(self, assistant_model=None, branching=(4, 2, 2), sibling_scheme: str = "without_replacement"):
        super().__init__(assistant_model, branching=branching, sibling_scheme=sibling_scheme)


__all__ = ["MCSDDrafter"]
