"""MLP-speculator drafting: a token-conditioned multi-stage MLP over the target's last feature, expanded as a tree."""

from __future__ import annotations

import torch

from hf_decoding_ext.speculative.heads.mlp_speculator import MLPSpeculator
from hf_decoding_ext.core.tree import normalize_choices
from hf_decoding_ext.speculative.drafters.feature_head import DEFAULT_MAX_NODES, FeatureHeadDrafter


class MLPSpeculatorDrafter(FeatureHeadDrafter):
    """MLP speculator (Wertheimer et al., "Accelerating Production LLMs with Combined Token/Embedding Speculators",
    arXiv 2404.19124).

    From the target's feature ``h_j`` of the last verified position and the known next token ``x_{j+1}`` (the
    tree's root), stage ``d`` of the speculator proposes candidates for ``x_{j+1+d}`` from the state stage ``d - 1``
    left and the token drafted before. Unlike Medusa's independent heads the candidates at a node depend on its
    ancestors: node ``(i_1, ..., i_d)`` of the tree holds the rank-``i_d`` token of stage ``d`` run on its parent's
    path. The tree is filled depth by depth with one batched stage call over every parent of a depth (the reference
    expands a full ``top_k_tokens_per_head`` product tree and keeps the best ``n_candidates`` paths; here the tree
    is a sparse rank tree, by default the ``max_nodes`` paths with the highest expected acceptance under the head's
    measured top-k accuracies). With greedy acceptance the output is token-identical to greedy decoding.

    Args:
        heads: an :class:`~hf_decoding_ext.speculative.heads.mlp_speculator.MLPSpeculator`, a folder or Hub id, or
            ``"shipped"`` (the checkpoint trained on SmolLM2-135M-Instruct shipped with the package).
        tree_choices: explicit tree as candidate-rank paths, e.g. ``[[0], [1], [0, 0]]``.
        max_nodes: size of the default tree; ``"auto"``: from the verify-cost curve measured on the target's device (see
            :data:`~hf_decoding_ext.speculative.drafters.feature_head.CPU_MAX_NODES`); ``None``: the whole tree.

    Example:
        >>> from hf_decoding_ext.speculative import SpeculativeDecoding
        >>> from hf_decoding_ext.speculative.drafters.mlp_speculator import MLPSpeculatorDrafter
        >>> out = model.generate(**inputs, max_new_tokens=64, do_sample=False,
        ...                      custom_generate=SpeculativeDecoding(MLPSpeculatorDrafter("shipped")))  # doctest: +SKIP
    """

    head_class = MLPSpeculator

    def __init__(self, heads="shipped", tree_choices=None, max_nodes: int | str | None = DEFAULT_MAX_NODES):
        super().__init__(heads, tree_choices, max_nodes)
        self.choices = normalize_choices(self.choices)  # node i of a built tree is choices[i] (build_choice_tree)
        width = max(c[-1] for c in self.choices) + 1
        draft_vocab = int(self.head.d2t.shape[0])
        if width > draft_vocab:
            raise ValueError(f"the tree asks for rank {width - 1} but the draft vocabulary has {draft_vocab} tokens")
        self._root_state: torch.Tensor | None = None
        self._root_token: torch.Tensor | None = None
        # path of ranks -> (stage state computed at that node, its ranked candidate tokens)
        self._expanded: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}


    def prepare(self, state, feature, root_token):
        self._root_state = self.head.initial_state(feature[None])  # (1, hidden)
        self._root_token = root_token.reshape(1).to(self.head.device)
        self._expanded = {}

    def topk(self, depth, parents, k):
        """Run stage ``depth`` once over every parent: the input state of a parent is the state its own parent's
        stage produced (the scaled feature for the root) and its input token is the parent's token (the root token
        for depth 1). The new states are kept per parent path, so its children find them by their node index."""
        states, tokens, paths = [], [], []
        for p in parents:
            if p < 0:
                path = ()
                states.append(self._root_state[0])
                tokens.append(self._root_token[0])
            else:
                path = self.choices[p]
                parent_state, parent_cands = self._expanded[path[:-1]]
                states.append(parent_state)
                tokens.append(parent_cands[path[-1]])
            if len(path) != depth - 1:
                raise RuntimeError(f"node {p} is not at depth {depth - 1}")
            paths.append(path)
        new_state = self.head.step(depth, torch.stack(states), torch.stack(tokens))
        logits = self.head.stage_logits(depth, new_state)
        cands = self.head.to_target(logits.topk(k, dim=-1).indices)  # (len(parents), k)
        for path, s, c in zip(paths, new_state, cands):
            self._expanded[path] = (s, c)
        return cands
