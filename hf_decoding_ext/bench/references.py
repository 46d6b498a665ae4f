"""Reference drafters for benchmarks (not methods of the registry)."""

from __future__ import annotations

from hf_decoding_ext.speculative.drafters.base import Draft, Drafter
from hf_decoding_ext.core.tree import DraftTree


class RepeatLastTokenDrafter(Drafter):
    """Drafts one node: the last committed token again.

    A near-null drafter (the target rarely repeats a token, so about one token per forward): timed through the
    speculative engine it measures what a 2-token verification forward costs against plain greedy decoding, i.e.
    the share of a drafter's speed-up that comes from the engine's forward (kernel layout, see
    :mod:`hf_decoding_ext.core.kernels`) rather than from its drafts.
    """

    def propose(self, state) -> Draft:
        return Draft(DraftTree.chain(state.input_ids[0, -1:].cpu()))
