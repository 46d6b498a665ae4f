"""Medusa-1 drafting: trained heads over the target's last feature, a sparse tree of their top candidates."""

from __future__ import annotations

import torch

from hf_decoding_ext.speculative.heads.medusa import MedusaHeads
from hf_decoding_ext.speculative.drafters.feature_head import DEFAULT_MAX_NODES, FeatureHeadDrafter


class MedusaDrafter(FeatureHeadDrafter):
    """Medusa-1 (Cai et al., "Medusa: Simple LLM Inference Acceleration Framework with Multiple Decoding Heads",
    arXiv 2401.10774).

    From the target's feature ``h_j`` of the last verified position, head ``k`` proposes candidates for token
    ``x_{j+1+k}`` (the base lm_head already gave ``x_{j+1}``, the tree's root). The heads are independent of one
    another, so every node at depth ``k`` draws from head ``k``'s ranking: node ``(i_1, ..., i_k)`` of the tree holds
    head ``k``'s rank-``i_k`` token. The tree (Medusa's "choices") defaults to the ``max_nodes`` paths with the
    highest expected acceptance under the head's measured top-k accuracies. With greedy acceptance the output is
    token-identical to greedy decoding; ``acceptance="typical"`` on the engine gives Medusa's typical acceptance.

    Args:
        heads: a :class:`~hf_decoding_ext.speculative.heads.medusa.MedusaHeads`, a folder or Hub id, or
            ``"shipped"`` (the checkpoint trained on SmolLM2-135M-Instruct shipped with the package).
        tree_choices: explicit tree as candidate-rank paths, e.g. ``[[0], [1], [0, 0]]``.
        max_nodes: size of the default tree; ``"auto"``: from the verify-cost curve measured on the target's device (see
            :data:`~hf_decoding_ext.speculative.drafters.feature_head.CPU_MAX_NODES`); ``None``: the whole tree.

    Example:
        >>> from hf_decoding_ext.speculative import SpeculativeDecoding
        >>> from hf_decoding_ext.speculative.drafters.medusa import MedusaDrafter
        >>> out = model.generate(**inputs, max_new_tokens=64, do_sample=False,
        ...                      custom_generate=SpeculativeDecoding(MedusaDrafter("shipped")))  # doctest: +SKIP
    """

    head_class = MedusaHeads

    def __init__(self, heads="shipped", tree_choices=None, max_nodes: int | str | None = DEFAULT_MAX_NODES):
        super().__init__(heads, tree_choices, max_nodes)
        self._candidates: torch.Tensor | None = None


    def prepare(self, state, feature, root_token):
        width = max(c[-1] for c in self.choices) + 1
        logits = self.head(feature[None].to(self.head.dtype))[:, 0]  # (num_heads, draft_vocab)
        self._candidates = self.head.to_target(logits.topk(width, dim=-1).indices)  # (num_heads, width)

    def topk(self, depth, parents, k):
        return self._candidates[depth - 1, :k].expand(len(parents), k)
