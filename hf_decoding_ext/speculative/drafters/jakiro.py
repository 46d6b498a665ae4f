"""Jakiro drafting: EAGLE-style tree drafting with decoupled (per-expert) siblings and a parallel last depth."""

from __future__ import annotations

import torch

from hf_decoding_ext.speculative.drafters.eagle import EagleDrafter
from hf_decoding_ext.speculative.drafters.feature_head import (
    DEFAULT_MAX_NODES,
    load_head,
)
from hf_decoding_ext.speculative.heads.jakiro import JakiroDrafterModel, untrained_head


class JakiroDrafter(EagleDrafter):
    """Jakiro (Huang et al., "Jakiro: Boosting Speculative Decoding with Decoupled Multi-Head via MoE",
    arXiv 2502.06282) on the library's EAGLE drafting loop (:class:`~hf_decoding_ext.speculative.drafters.eagle.
    EagleDrafter`: own KV cache, tree levels fed depth by depth, static tree from the head's measured accuracies).

    Differences from EAGLE drafting:

    - **decoupled siblings**: the children of a node are ranked by
      :meth:`~hf_decoding_ext.speculative.heads.jakiro.JakiroDrafterModel.decoupled_topk`: rank 0 from the weighted
      MoE feature, ranks 1.. alternating over the selected experts' own features (``decoupled=False``: EAGLE's
      top-k of the MoE feature);
    - **hybrid inference**: the last ``parallel_depths`` depths (the head's config, 1 by default) are not fed
      through the drafter: the children of a node ``n`` there are the top-k of the contrastive feature of the
      forward that proposed ``n`` (it predicts the feature one step further ahead), as the official
      ``topK_genrate`` does for the last depth.

    The drafts are deterministic; the engine's acceptance rule verifies them (greedy: token-identical to greedy
    decoding; speculative sampling with one-hot draft probabilities: exact). Deviations from the paper and code:
    :data:`~hf_decoding_ext.speculative.heads.jakiro.PAPER_FIDELITY`.

    Args:
        heads: a :class:`~hf_decoding_ext.speculative.heads.jakiro.JakiroDrafterModel`, a folder or Hub id, or
            ``"shipped"`` (``"untrained"`` through :meth:`for_model`).
        tree_choices: explicit tree as candidate-rank paths.
        max_nodes: size of the default tree (``"auto"``: from the device's verify-cost curve; ``None``: whole tree).
        decoupled: rank siblings across experts (Jakiro) or on the MoE feature alone (EAGLE's top-k).
        parallel_depths: override of the head's ``parallel_depths`` (0: autoregressive at every depth).

    Example:
        >>> from hf_decoding_ext.speculative import SpeculativeDecoding
        >>> from hf_decoding_ext.speculative.drafters.jakiro import JakiroDrafter
        >>> out = model.generate(**inputs, max_new_tokens=64, do_sample=False,
        ...                      custom_generate=SpeculativeDecoding(JakiroDrafter("shipped")))  # doctest: +SKIP
    """

    head_class = JakiroDrafterModel

    def __init__(self, heads="shipped", tree_choices=None, max_nodes: int | str | None = DEFAULT_MAX_NODES,
                 decoupled: bool = True, parallel_depths: int | None = None):
        head = load_head(heads, JakiroDrafterModel, "jakiro")
        par = head.config.parallel_depths if parallel_depths is None else parallel_depths
        if par not in (0, 1) or par >= head.depth or (par and not head.config.contrastive):
            raise ValueError(f"parallel_depths must be 0 or 1 (less than the depth {head.depth}) and 1 needs a "
                             f"contrastive head, got {parallel_depths!r}")
        self.decoupled = bool(decoupled)
        self.parallel_depths = par
        super(EagleDrafter, self).__init__(head, tree_choices, max_nodes)

    @classmethod
    def for_model(cls, model=None, tokenizer=None, heads="shipped", tree_choices=None,
                  max_nodes: int | str | None = DEFAULT_MAX_NODES, decoupled: bool = True,
                  parallel_depths: int | None = None) -> JakiroDrafter:
        """Build for ``model`` (the head is attached to it); ``heads="untrained"``: a random head shaped for
        ``model`` (:func:`~hf_decoding_ext.speculative.heads.jakiro.untrained_head`, lossless but drafts rarely
        accepted)."""
        if isinstance(heads, str) and heads == "untrained":
            if model is None:
                raise ValueError("heads='untrained' needs the model to shape the head")
            heads = untrained_head(model)
        out = cls(heads, tree_choices, max_nodes, decoupled, parallel_depths)
        if model is not None:
            out.head.attach(model)
        return out

    def _reset_tree(self):
        super()._reset_tree()
        self.out_experts: dict[int, torch.Tensor] = {}
        self.out_parallel: dict[int, torch.Tensor] = {}

    def on_level(self, depth, nodes, parents, tokens) -> None:
        for node, parent, tok in zip(nodes, parents, tokens):  # parents at the last depth are never fed
            self.token[node] = tok
            self.in_feature[node] = self.out_feature.get(parent)
            self.ancestors[node] = ([] if parent < 0 else self.ancestors[parent] + [parent])

    def _keep_aux(self, nodes: list[int], rows) -> None:
        aux = self.head.aux_out
        for node, r in zip(nodes, rows):
            self.out_experts[node] = aux["experts"][0, r]
            if "parallel" in aux:
                self.out_parallel[node] = aux["parallel"][0, r]

    def prepare(self, state, feature, root_token) -> None:
        super().prepare(state, feature, root_token)
        self._keep_aux([-1], [-1])

    def _feed(self, nodes: list[int], depth: int) -> None:
        super()._feed(nodes, depth)
        self._keep_aux(nodes, range(len(nodes)))

    def topk(self, depth, parents, k):
        if depth > 1 and depth > self.max_depth - self.parallel_depths:
            # parallel depth: the contrastive feature of the forward that proposed each parent
            feats = torch.stack([self.out_parallel[self.ancestors[p][-1] if self.ancestors[p] else -1]
                                 for p in parents])
            return self.head.to_target(self.head.logits_from(feats).topk(k, dim=-1).indices)
        todo = [p for p in parents if p not in self.out_feature]
        if todo:
            self._feed(todo, depth - 1)
        mixed = torch.stack([self.out_feature[p] for p in parents])
        if not self.decoupled:
            return self.head.to_target(self.head.logits_from(mixed).topk(k, dim=-1).indices)
        experts = torch.stack([self.out_experts[p] for p in parents])
        return self.head.to_target(self.head.decoupled_topk(mixed, experts, k))
