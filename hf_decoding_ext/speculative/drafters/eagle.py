"""EAGLE-style feature-level drafting (with an FSPAD-trained drafter): a one-layer drafter with its own KV cache
autoregresses over the target's features and fills a draft tree."""

from __future__ import annotations

import torch

from hf_decoding_ext.core.tree import additive_mask
from hf_decoding_ext.speculative.heads.eagle import EagleDrafterModel
from hf_decoding_ext.speculative.drafters.feature_head import DEFAULT_MAX_NODES, FeatureHeadDrafter


class EagleDrafter(FeatureHeadDrafter):
    """EAGLE drafting (Li et al., "EAGLE: Speculative Sampling Requires Rethinking Feature Uncertainty",
    arXiv 2401.15077) with a drafter trained by FSPAD (Gui et al., arXiv 2408.15562; see
    :mod:`hf_decoding_ext.speculative.heads.eagle`).

    The drafter keeps a KV cache over the committed sequence, fed with the target's true features ``f_p`` and the
    next tokens ``x_{p+1}``; each step it first catches up on the newly verified positions, which yields the predicted
    feature ``f^_{j+1}`` and the depth-1 candidates, then feeds every tree node that gets children (its token with the
    predicted feature that proposed it) with a tree attention mask, depth by depth, as in EAGLE's tree drafting. Tree
    entries are dropped from the drafter's cache after each step (the accepted tokens are re-fed next step with the
    target's true features). The tree's shape follows the drafter's measured per-depth accuracies (static choices
    tree, EAGLE-1 style; FSPAD's official code uses EAGLE-2's dynamic tree instead). Greedy acceptance keeps the output
    token-identical to greedy decoding. Which parts follow the papers and which are this library's reading:
    :data:`~hf_decoding_ext.speculative.heads.eagle.PAPER_FIDELITY`. A plain EAGLE drafter (FSPAD's components off,
    :data:`~hf_decoding_ext.speculative.heads.eagle.ABLATION_ARMS`) drafts through the same class.

    Args:
        drafter: an :class:`~hf_decoding_ext.speculative.heads.eagle.EagleDrafterModel`, a folder or Hub id, or
            ``"shipped"`` (trained on SmolLM2-135M-Instruct, shipped with the package).
        tree_choices: explicit tree as candidate-rank paths.
        max_nodes: size of the default tree; ``"auto"``: from the verify-cost curve measured on the target's device (see
            :data:`~hf_decoding_ext.speculative.drafters.feature_head.CPU_MAX_NODES`); ``None``: the whole tree.

    Example:
        >>> from hf_decoding_ext.speculative import SpeculativeDecoding
        >>> from hf_decoding_ext.speculative.drafters.eagle import EagleDrafter
        >>> out = model.generate(**inputs, max_new_tokens=64, do_sample=False,
        ...                      custom_generate=SpeculativeDecoding(EagleDrafter("shipped")))  # doctest: +SKIP
    """

    head_class = EagleDrafterModel

    def __init__(self, drafter="shipped", tree_choices=None, max_nodes: int | str | None = DEFAULT_MAX_NODES):
        super().__init__(drafter, tree_choices, max_nodes)


    # ------------------------------------------------------------------------------------------------ state
    def reset_sequence(self, state) -> None:
        self.cache = self.head.new_cache()
        self.pending: list[torch.Tensor] = []
        self.n_fed = 0
        self._reset_tree()

    def _reset_tree(self):
        self.out_feature: dict[int, torch.Tensor] = {}  # node (-1 = root) -> predicted feature proposing its children
        self.in_feature: dict[int, torch.Tensor] = {}  # node -> predicted feature that proposed it
        self.token: dict[int, int] = {}
        self.ancestors: dict[int, list[int]] = {}
        self.fed: list[int] = []  # tree nodes in the drafter's cache, after the n_fed committed entries

    def on_features(self, state, features, result) -> None:
        self.pending.append(features)

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        return additive_mask(allowed, self.head.dtype)

    # ------------------------------------------------------------------------------------------------ drafting
    def prepare(self, state, feature, root_token) -> None:
        feats = torch.cat(self.pending)
        self.pending = []
        if self.cache.get_seq_length() > self.n_fed:
            self.cache.crop(self.n_fed - self.cache.get_seq_length())  # a negative count
        t = feats.shape[0]
        ids = state.input_ids[0, self.n_fed + 1: self.n_fed + 1 + t]
        if ids.shape[0] != t:
            raise RuntimeError("EAGLE drafter out of step with the committed sequence")
        device = feats.device
        allowed = torch.ones(t, self.n_fed + t, dtype=torch.bool, device=device)
        allowed[:, self.n_fed:] = torch.tril(torch.ones(t, t, dtype=torch.bool, device=device))
        pos = torch.arange(self.n_fed, self.n_fed + t, device=device)[None]
        out = self.head(feats[None], ids[None], pos, self._additive(allowed), cache=self.cache)
        self.n_fed += t
        self._reset_tree()
        self.out_feature[-1] = out[0, -1]

    def on_level(self, depth, nodes, parents, tokens) -> None:
        for node, parent, tok in zip(nodes, parents, tokens):
            self.token[node] = tok
            self.in_feature[node] = self.out_feature[parent]
            self.ancestors[node] = ([] if parent < 0 else self.ancestors[parent] + [parent])

    def _feed(self, nodes: list[int], depth: int) -> None:
        """Feed tree nodes of one depth (their token with the feature that proposed them) at position
        ``j + depth``, attending to the committed entries, their ancestors and themselves."""
        feats = torch.stack([self.in_feature[n] for n in nodes])
        device = feats.device
        ids = torch.tensor([self.token[n] for n in nodes], device=device)
        m = len(nodes)
        width = self.n_fed + len(self.fed) + m
        allowed = torch.zeros(m, width, dtype=torch.bool, device=device)
        allowed[:, : self.n_fed] = True
        col = {node: self.n_fed + i for i, node in enumerate(self.fed)}
        for r, n in enumerate(nodes):
            for a in self.ancestors[n]:
                allowed[r, col[a]] = True
            allowed[r, self.n_fed + len(self.fed) + r] = True
        pos = torch.full((1, m), self.n_fed - 1 + depth, device=device)
        out = self.head(feats[None], ids[None], pos, self._additive(allowed), cache=self.cache)
        self.fed.extend(nodes)
        for r, n in enumerate(nodes):
            self.out_feature[n] = out[0, r]

    def topk(self, depth, parents, k):
        todo = [p for p in parents if p not in self.out_feature]
        if todo:
            self._feed(todo, depth - 1)
        feats = torch.stack([self.out_feature[p] for p in parents])
        return self.head.to_target(self.head.logits_from(feats).topk(k, dim=-1).indices)
