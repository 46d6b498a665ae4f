"""Blockwise Parallel Decoding: predict a block with the proposal heads, verify it in one target forward, accept
the longest prefix that matches the target's argmax."""

from __future__ import annotations

from hf_decoding_ext.speculative.acceptance import blockwise as _relaxed_rules  # noqa: F401  (registers the rules)
from hf_decoding_ext.speculative.drafters.feature_head import FeatureHeadDrafter, load_head
from hf_decoding_ext.speculative.heads.blockwise import BlockwiseHeads


class BlockwiseDrafter(FeatureHeadDrafter):
    """Blockwise Parallel Decoding (Stern, Shazeer, Uszkoreit, "Blockwise Parallel Decoding for Deep Autoregressive
    Models", NeurIPS 2018, arXiv 1811.03115).

    *Predict*: the base model's own next token ``x_{j+1}`` (``p_1``, known from the previous verification) and the
    proposal heads' argmax tokens for ``x_{j+2} .. x_{j+k}`` from the feature of the last verified position form a
    block of ``k`` tokens. *Verify*: the speculative engine scores the block in ONE target forward. *Accept*: the
    longest prefix whose proposals equal the target's argmax (the engine's greedy acceptance), plus the target's next
    token after it; that same forward yields the features from which the next block is proposed (the paper's
    "combined scoring and proposal": one target call per iteration). The output is token-identical to greedy
    decoding.

    The paper's relaxed criteria are acceptance rules of the engine: ``SpeculativeDecoding(drafter,
    acceptance="blockwise-top-k")`` (a proposal passes when it is in the target's top ``k``, default 2) or
    ``"blockwise-distance"`` (token-id distance to the argmax at most ``epsilon``), or instances
    :class:`~hf_decoding_ext.speculative.acceptance.blockwise.BlockwiseTopKAcceptance` ``(k=...)`` /
    :class:`~hf_decoding_ext.speculative.acceptance.blockwise.BlockwiseDistanceAcceptance` ``(epsilon=...)``. They are
    LOSSY (the output may differ from greedy decoding where a non-argmax proposal is accepted); only the default exact
    criterion is lossless. Deviations from the paper: :data:`~hf_decoding_ext.speculative.heads.blockwise.PAPER_FIDELITY`.

    Args:
        heads: a :class:`~hf_decoding_ext.speculative.heads.blockwise.BlockwiseHeads`, a folder or Hub id, or
            ``"shipped"`` (the heads trained on SmolLM2-135M-Instruct shipped with the package).
        max_nodes: proposals verified per step after the known next token (``None``: all heads, a block of
            ``block_size``; an integer ``n`` >= 1 truncates the block to ``n + 1`` tokens).

    Example:
        >>> from hf_decoding_ext.speculative import SpeculativeDecoding
        >>> from hf_decoding_ext.speculative.drafters.blockwise import BlockwiseDrafter
        >>> out = model.generate(**inputs, max_new_tokens=64, do_sample=False,
        ...                      custom_generate=SpeculativeDecoding(BlockwiseDrafter("shipped")))  # doctest: +SKIP
    """

    def __init__(self, heads="shipped", max_nodes: int | None = None):
        head = load_head(heads, BlockwiseHeads)
        if max_nodes is not None and (isinstance(max_nodes, bool) or not isinstance(max_nodes, int) or max_nodes < 1):
            raise ValueError(f"max_nodes must be a positive integer or None, got {max_nodes!r}")
        length = head.depth if max_nodes is None else min(max_nodes, head.depth)
        self.block_nodes = length
        super().__init__(head, tree_choices=[[0] * d for d in range(1, length + 1)], max_nodes=None)
        self._proposals = None


    def prepare(self, state, feature, root_token):
        logits = self.head(feature[None].to(self.head.dtype))[:, 0]  # (num_heads, draft_vocab)
        self._proposals = self.head.to_target(logits.argmax(dim=-1))  # (num_heads,)

    def topk(self, depth, parents, k):
        return self._proposals[depth - 1].view(1, 1).expand(len(parents), k)
