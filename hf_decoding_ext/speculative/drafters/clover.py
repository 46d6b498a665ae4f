"""Clover drafting: regressive heads with an attention decoder over the augmented context fill a tree depth by
depth."""

from __future__ import annotations

import torch

from hf_decoding_ext.core.tree import additive_mask
from hf_decoding_ext.speculative.drafters.feature_head import FeatureHeadDrafter
from hf_decoding_ext.speculative.heads.clover import CloverModel


class CloverDrafter(FeatureHeadDrafter):
    """Clover (Xiao et al., "Clover: Regressive Lightweight Speculative Decoding with Sequential Knowledge",
    arXiv 2405.00263; see :mod:`hf_decoding_ext.speculative.heads.clover` for the head and its deviations).

    The augmenting block keeps a KV cache over the committed sequence (fed with the target's features of the newly
    verified positions each step) and the attention decoder's keys/values over the augmented states grow with it.
    Each step, from the feature ``h_j`` and the root token ``x_{j+1}``, depth ``d`` of the tree is conditioned on
    the token of the path it extends: a node's state (regressive connection + cross-attention) is computed once and
    its children are the next head's ranking; all parents of a depth go through one batched call. The tree shape
    follows the head's measured per-depth accuracies. Greedy acceptance keeps the output token-identical to greedy
    decoding. Batch size 1 (the engine's tree drafters).

    Args:
        heads: a :class:`~hf_decoding_ext.speculative.heads.clover.CloverModel`, a folder or Hub id, or ``"shipped"``.
        tree_choices: explicit tree as candidate-rank paths, e.g. ``[[0], [1], [0, 0]]``.
        max_nodes: size of the default tree; ``"auto"``: from the verify-cost curve of the target's device;
            ``None``: the whole tree.

    Example:
        >>> from hf_decoding_ext.speculative import SpeculativeDecoding
        >>> from hf_decoding_ext.speculative.drafters.clover import CloverDrafter
        >>> out = model.generate(**inputs, max_new_tokens=64, do_sample=False,
        ...                      custom_generate=SpeculativeDecoding(CloverDrafter("shipped")))  # doctest: +SKIP
    """

    head_class = CloverModel


    def reset_sequence(self, state) -> None:
        self.cache = self.head.new_cache()
        self.keys = self.values = None
        self.pending: list[torch.Tensor] = []
        self.n_fed = 0
        self.node_state: dict[int, torch.Tensor] = {}
        self.node_token: dict[int, int] = {}
        self.node_parent: dict[int, int] = {}

    def on_features(self, state, features, result) -> None:
        self.pending.append(features)

    def prepare(self, state, feature, root_token) -> None:
        head = self.head
        feats = torch.cat(self.pending).to(head.dtype)
        self.pending = []
        t = feats.shape[0]
        device = feats.device
        allowed = torch.ones(t, self.n_fed + t, dtype=torch.bool, device=device)
        allowed[:, self.n_fed:] = torch.tril(torch.ones(t, t, dtype=torch.bool, device=device))
        pos = torch.arange(self.n_fed, self.n_fed + t, device=device)[None]
        aug = head.augment(feats[None], pos, additive_mask(allowed, head.dtype), cache=self.cache)
        k, v = head.context_kv(aug)
        self.keys = k if self.keys is None else torch.cat([self.keys, k], dim=2)
        self.values = v if self.values is None else torch.cat([self.values, v], dim=2)
        self.n_fed += t
        root = torch.as_tensor(root_token, dtype=torch.long, device=device).reshape(1, 1)
        self.node_state = {-1: head.step(feature.to(head.dtype).reshape(1, 1, -1), root, self.keys, self.values)[0, 0]}
        self.node_token, self.node_parent = {}, {}

    def on_level(self, depth, nodes, parents, tokens) -> None:
        for node, parent, tok in zip(nodes, parents, tokens):
            self.node_token[node] = tok
            self.node_parent[node] = parent

    def topk(self, depth, parents, k):
        head = self.head
        todo = [p for p in parents if p not in self.node_state]
        if todo:  # states of the depth-(depth - 1) nodes: regressive step from their parent's state and their token
            prev = torch.stack([self.node_state[self.node_parent[p]] for p in todo])[None]
            toks = torch.tensor([[self.node_token[p] for p in todo]], device=prev.device)
            new = head.step(prev, toks, self.keys, self.values)[0]
            for r, p in enumerate(todo):
                self.node_state[p] = new[r]
        states = torch.stack([self.node_state[p] for p in parents])
        return head.to_target(head.head_logits(depth, states).topk(k, dim=-1).indices)
