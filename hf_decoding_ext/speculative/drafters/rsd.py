"""Recursive Speculative Decoding (RSD-C): a draft tree whose siblings are sampled without replacement."""

from __future__ import annotations

from hf_decoding_ext.speculative.drafters.draft_model import DraftModelTreeDrafter


class RSDDrafter(DraftModelTreeDrafter):
    """RSD-C, the constant-branching variant of "Recursive Speculative Decoding: Accelerating LLM Inference via
    Sampling Without Replacement" (Jeon, Gagrani, Goel, Park, Lee, Lott; arXiv 2402.14160): at every node the
    draft model's distribution is sampled without replacement with the Gumbel-top-k trick (``branching[d]``
    distinct children at depth ``d``), and the tree is verified by recursive rejection sampling, where each rejected
    sibling is removed from the draft distribution of the next (``SpeculativeDecoding(..., acceptance=
    "speculative")`` reads ``sibling_scheme="without_replacement"``).

    Args:
        assistant_model: the draft model.
        branching: distinct children per node at each depth (default ``(2, 2, 2)``, this library's choice: the paper
            sweeps constant branching factors at fixed draft length and at fixed target budget).

    RSD-S (stochastic beam search drafts) is not implemented. See
    :class:`~hf_decoding_ext.speculative.drafters.draft_model.DraftModelTreeDrafter` for the deviation (one draft
    forward per node).

    Example:
        >>> from hf_decoding_ext.speculative import SpeculativeDecoding
        >>> from hf_decoding_ext.speculative.drafters.rsd import RSDDrafter
        >>> loop = SpeculativeDecoding(RSDDrafter(small_model))  # doctest: +SKIP
        >>> out = model.generate(**inputs, do_sample=True, max_new_tokens=64, custom_generate=loop)  # doctest: +SKIP
    """

    def __init__(self, assistant_model=None, branching=(2, 2, 2)):
        super().__init__(assistant_model, branching=branching, sibling_scheme="without_replacement")


__all__ = ["RSDDrafter"]
