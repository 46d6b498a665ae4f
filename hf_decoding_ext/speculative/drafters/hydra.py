"""Hydra drafting: sequentially dependent heads fill a sparse tree depth by depth."""

from __future__ import annotations

import torch

from hf_decoding_ext.speculative.heads.hydra import HydraHeads
from hf_decoding_ext.speculative.drafters.feature_head import DEFAULT_MAX_NODES, FeatureHeadDrafter


class HydraDrafter(FeatureHeadDrafter):
    """Hydra (Ankner et al., "Hydra: Sequentially-Dependent Draft Heads for Medusa Decoding", arXiv 2402.05109).

    From the target's feature ``h_j`` of the last verified position and the known next token ``x_{j+1}`` (the tree
    root), head ``k`` proposes candidates for ``x_{j+1+k}`` conditioned on the tokens of the path it extends: the
    children of a depth-``(k - 1)`` node are head ``k``'s ranking given the root token and that node's path tokens.
    The tree is filled depth by depth with one batched head call per depth (all parents of the depth at once). Its
    shape (rank paths, Medusa's "choices") defaults to the ``max_nodes`` paths with the highest expected acceptance
    under the head's measured top-k accuracies. With greedy acceptance the output is token-identical to greedy
    decoding; ``acceptance="typical"`` on the engine gives Medusa's (and Hydra's) typical acceptance.

    Args:
        heads: a :class:`~hf_decoding_ext.speculative.heads.hydra.HydraHeads`, a folder or Hub id, or ``"shipped"``
            (the checkpoint trained on SmolLM2-135M-Instruct shipped with the package).
        tree_choices: explicit tree as candidate-rank paths, e.g. ``[[0], [1], [0, 0]]``.
        max_nodes: size of the default tree; ``"auto"``: from the verify-cost curve measured on the target's device (see
            :data:`~hf_decoding_ext.speculative.drafters.feature_head.CPU_MAX_NODES`); ``None``: the whole tree.

    Example:
        >>> from hf_decoding_ext.speculative import SpeculativeDecoding
        >>> from hf_decoding_ext.speculative.drafters.hydra import HydraDrafter
        >>> out = model.generate(**inputs, max_new_tokens=64, do_sample=False,
        ...                      custom_generate=SpeculativeDecoding(HydraDrafter("shipped")))  # doctest: +SKIP
    """

    head_class = HydraHeads

    def __init__(self, heads="shipped", tree_choices=None, max_nodes: int | str | None = DEFAULT_MAX_NODES):
        super().__init__(heads, tree_choices, max_nodes)
        self._feature: torch.Tensor | None = None
        self._root: torch.Tensor | None = None
        self._tokens: dict[tuple[int, ...], int] = {}  # rank path -> drafted token id (this step)


    def prepare(self, state, feature, root_token):
        self._feature = feature.to(self.head.dtype)
        self._root = torch.as_tensor(root_token, dtype=torch.long, device=feature.device).reshape(())
        self._tokens = {}

    def path_tokens(self, node: int) -> list[int]:
        """Draft tokens from the root's child down to ``node`` (``-1``: the root, an empty path).

        ``build_choice_tree`` numbers nodes in the order of ``self.choices`` (sorted rank paths), so node ``i`` is the
        rank path ``self.choices[i]``; the token at each prefix of that path was recorded by :meth:`topk`.
        """
        if node < 0:
            return []
        path = self.choices[node]
        return [self._tokens[path[:i]] for i in range(1, len(path) + 1)]

    def topk(self, depth, parents, k):
        paths = [self.path_tokens(p) for p in parents]
        if any(len(p) != depth - 1 for p in paths):
            raise RuntimeError(f"parents {parents} are not all at depth {depth - 1}")
        device = self._feature.device
        drafted = torch.tensor(paths, dtype=torch.long, device=device).reshape(len(parents), depth - 1)
        ids = torch.cat([self._root.expand(len(parents), 1), drafted], dim=1)  # (m, depth): x_{j+1} .. x_{j+depth}
        hidden = self._feature.expand(len(parents), -1)
        logits = self.head.head_logits(depth, hidden, ids)  # (m, draft_vocab)
        cand = self.head.to_target(logits.topk(k, dim=-1).indices)  # (m, k)
        for row, p in enumerate(parents):
            prefix = self.choices[p] if p >= 0 else ()
            for r, tok in enumerate(cand[row].tolist()):
                self._tokens[prefix + (r,)] = tok
        return cand
