"""Token Recycling: candidate tokens from past verifications, stored in an adjacency matrix, drafted as a tree."""

from __future__ import annotations

import torch

from hf_decoding_ext.core.tree import DraftTree, best_first_paths
from hf_decoding_ext.speculative.drafters.base import Draft, Drafter, VerifyResult
from hf_decoding_ext.speculative.policies.tree_policy import NodeBudget

# The paper's default static tree (template "2.2.2", 80 nodes over 6 levels), written as the number of children of
# each node, a node being the path of candidate ranks from the root. Child ``i`` of a node holding token ``t`` is
# ``M[t, i]``, the i-th best candidate recorded after ``t``.
PAPER_TREE_CHILDREN: dict[tuple[int, ...], int] = {
    (): 8,
    (0,): 8, (1,): 4, (2,): 3, (3,): 2, (4,): 1, (5,): 1, (6,): 1, (7,): 1,
    (0, 0): 8, (0, 1): 3, (0, 2): 2, (0, 3): 1, (0, 4): 1, (0, 5): 1, (0, 6): 1, (0, 7): 1,
    (1, 0): 2, (1, 1): 1, (2, 0): 1, (3, 0): 1, (4, 0): 1, (5, 0): 1,
    (0, 0, 0): 5, (0, 0, 1): 2, (0, 0, 2): 1, (0, 0, 3): 1, (0, 0, 4): 1, (0, 1, 0): 1, (0, 2, 0): 1,
    (1, 0, 0): 1, (2, 0, 0): 1, (3, 0, 0): 1,
    (0, 0, 0, 0): 3, (0, 0, 0, 1): 1, (0, 0, 0, 2): 1, (0, 0, 1, 0): 1, (0, 1, 0, 0): 1, (1, 0, 0, 0): 1,
    (0, 0, 0, 0, 0): 2, (0, 0, 0, 1, 0): 1,
}


# Fallback ranking of the paper's tree, used only when the shipped acceptance statistics (GAINS_NAME) are missing:
# nodes ranked by how often they were on the accepted path with the full tree on SmolLM2-135M-Instruct (greedy, 817
# steps, hot start) -- counted on 24 *benchmark* prompts by an earlier session, which is why the default order now
# comes from the distillation prompts instead. Every node's parent comes before it, so any prefix is a valid subtree.
NODE_PRIORITY: list[tuple[int, ...]] = [
    (0,), (0, 0), (1,), (0, 0, 0), (2,), (0, 1), (1, 0), (0, 0, 0, 0), (0, 0, 1), (3,), (0, 0, 1, 0),
    (0, 0, 0, 0, 0), (0, 1, 0), (4,), (5,), (0, 0, 1, 0, 0), (1, 1), (1, 0, 0), (2, 0), (7,), (0, 2), (6,), (3, 0),
    (0, 0, 2), (0, 0, 0, 1), (0, 1, 0, 0), (0, 5), (1, 2), (0, 0, 0, 0, 0, 0), (0, 3), (0, 6), (4, 0),
]

# Tree size of ``max_nodes="auto"`` on CPU when no acceptance statistics are shipped (hand-set before the kernel
# feature; with the statistics the size comes from the measured verify-cost curve, see GAINS_NAME).
CPU_MAX_NODES = 16

GAINS_NAME = "token-recycling"
"""Name of the acceptance statistics (``hf_decoding_ext/data/acceptance/gains.json``, counted on the distillation
prompts by ``scripts/tune_drafters.py``) that size ``max_nodes="auto"`` with the verify-cost curve measured on the
running device (:mod:`hf_decoding_ext.speculative.policies.tuning`); :data:`CPU_MAX_NODES` is the fallback when they
are missing."""


def _shipped_path_gains() -> dict[tuple[int, ...], float] | None:
    """``{node path: acceptance gain}`` counted on the distillation prompts (:data:`GAINS_NAME`), if shipped."""
    from hf_decoding_ext.speculative.policies.tuning import shipped_entry

    entry = shipped_entry(GAINS_NAME)
    if not entry or "paths" not in entry or len(entry["paths"]) != len(entry["gains"]):
        return None
    return {tuple(p): float(g) for p, g in zip(entry["paths"], entry["gains"])}


def expand_template(children: dict[tuple[int, ...], int]) -> list[tuple[int, ...]]:
    """Breadth-first list of node paths (parents before children) of a ``{path: n_children}`` template."""
    nodes, frontier = [], [()]
    while frontier:
        nxt = []
        for path in frontier:
            for i in range(children.get(path, 0)):
                nodes.append(path + (i,))
                nxt.append(path + (i,))
        frontier = nxt
    return nodes


class TokenRecyclingDrafter(Drafter):
    """Token Recycling (Luo et al., "Turning Trash into Treasure: Accelerating Inference of Large Language Models
    with Token Recycling", arXiv 2408.08696).

    An adjacency matrix ``M (vocab, k)`` stores, for every token, the top-``k`` candidate next tokens that the target
    model produced the last time that token was an input. Each step a static tree is filled breadth-first from the
    last committed token (child ``i`` of a node holding ``t`` is ``M[t, i]``), verified by the engine's tree
    attention, and the target's top-``k`` at *every* verified position (root, draft nodes and uncached prompt
    tokens) overwrite the rows of ``M``. ``M`` persists across prompts (the paper's "hot start"); ``reset()``
    empties it. Nodes whose row of ``M`` is still empty are pruned from the tree.

    Args:
        k: candidates per token (the paper's top-k, default 8).
        tree: ``{path: n_children}`` template; default the paper's 80-node tree "2.2.2".
        max_depth: optional cap on tree depth.
        max_nodes: keep only this many nodes of the template, the most often accepted first: the best-first tree
            (:func:`~hf_decoding_ext.core.tree.best_first_paths`) scored by each node's acceptance counted on the
            distillation prompts (:data:`GAINS_NAME`; :data:`NODE_PRIORITY` when they are missing), laid out in
            that order; ``None`` keeps the whole template; ``"auto"`` (default) picks, at each ``generate()`` call,
            the size maximising expected accepted tokens per unit of verification time on the verify-cost curve
            measured on the running device and model (cached; 11 nodes with the fast kernels on the 2-core
            development CPU, where 80 nodes cost ~4x a 1-token forward: a deviation from the paper, which targets
            GPUs and verifies all 80); without the statistics :data:`CPU_MAX_NODES` on CPU, the whole template
            elsewhere.

    Example:
        >>> from hf_decoding_ext.speculative import SpeculativeDecoding
        >>> from hf_decoding_ext.speculative.drafters.token_recycling import TokenRecyclingDrafter
        >>> loop = SpeculativeDecoding(TokenRecyclingDrafter())
        >>> out = model.generate(**inputs, max_new_tokens=128, do_sample=False, custom_generate=loop)  # doctest: +SKIP
    """

    needs = frozenset({"committed_top_k"})

    def __init__(self, k: int = 8, tree: dict[tuple[int, ...], int] | None = None, max_depth: int | None = None,
                 max_nodes: int | str | None = "auto"):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        tree = PAPER_TREE_CHILDREN if tree is None else tree
        paths = expand_template(tree)
        if max_depth is not None:
            if max_depth < 1:
                raise ValueError(f"max_depth must be >= 1, got {max_depth}")
            paths = [p for p in paths if len(p) <= max_depth]
        if any(i >= k for p in paths for i in p):
            raise ValueError(f"the tree template uses candidate ranks >= k={k}")
        self.k = k
        self.max_nodes = max_nodes
        template = set(paths)
        ranked = [p for p in NODE_PRIORITY if p in template]
        fallback = ranked + [p for p in paths if p not in set(ranked)]
        children: dict[tuple[int, ...], list[int]] = {}
        for p in fallback:
            children.setdefault(p[:-1], []).append(p[-1])
        gain_of = _shipped_path_gains()
        rank = {p: i for i, p in enumerate(fallback)}
        if gain_of is not None and template <= set(gain_of):
            # the nodes most often accepted on the distillation prompts first (ties: NODE_PRIORITY's order)
            self._template = best_first_paths(
                lambda path, _: [(r, gain_of[path + (r,)] - 1e-9 * rank[path + (r,)]) for r in children.get(path, [])],
                len(fallback))
            self.node_gains: list[float] | None = [gain_of[p] for p in self._template]
        else:
            self._template, self.node_gains = fallback, None
        self.budget = NodeBudget(max_nodes, cpu=CPU_MAX_NODES, accelerator=None,
                                 gains=self.node_gains if self.node_gains is not None else GAINS_NAME)
        self._children = {}
        for p in self._template:
            self._children.setdefault(p[:-1], []).append(p[-1])
        self._score = {p: -float(i) for i, p in enumerate(self._template)}  # earlier in the template = better
        self._set_tree(len(self._template) if max_nodes in (None, "auto") else max_nodes)
        self.adjacency: torch.Tensor | None = None

    def _set_tree(self, n: int) -> None:
        """Use the ``n`` best template nodes (the first ``n``: parents precede children), laid out in that order (so
        a merged tree cut to its first nodes keeps the best ones)."""
        paths = best_first_paths(lambda path, _: [(r, self._score[path + (r,)]) for r in self._children.get(path, [])],
                                 n)
        self.paths = paths
        index = {p: i for i, p in enumerate(paths)}
        self._parents = torch.tensor([index[p[:-1]] if len(p) > 1 else -1 for p in paths], dtype=torch.long)
        self._ranks = torch.tensor([p[-1] for p in paths], dtype=torch.long)
        self._depths = [len(p) for p in paths]
        self._levels = []
        for d in sorted(set(self._depths)):
            idx = torch.tensor([i for i, dd in enumerate(self._depths) if dd == d], dtype=torch.long)
            self._levels.append((idx, self._parents[idx], self._ranks[idx]))

    @property
    def committed_k(self) -> int:
        """Top-k ids the engine computes at the prompt's tokens (``"committed_top_k"``): the adjacency width."""
        return self.k

    @property
    def num_nodes(self) -> int:
        return len(self._depths)

    def reset(self) -> None:
        self.adjacency = None

    def begin(self, state) -> None:
        if self.budget.is_auto:
            size = self.budget.resolve(state.model.device, model=state.model)
            self._set_tree(len(self._template) if size is None else min(size, len(self._template)))
        vocab = state.model.get_output_embeddings().weight.shape[0]
        if self.adjacency is None or self.adjacency.shape[0] != vocab:
            self.adjacency = torch.full((vocab, self.k), -1, dtype=torch.long)

    def propose(self, state) -> Draft:
        root = state.input_ids[0, -1].cpu()
        tokens = torch.full((self.num_nodes,), -1, dtype=torch.long)
        adj = self.adjacency
        for idx, parents, ranks in self._levels:  # level by level: a node's token is its parent's ranked candidate
            src = root.expand(idx.shape) if int(parents[0]) < 0 else tokens[parents]
            tokens[idx] = torch.where(src >= 0, adj[src.clamp(min=0), ranks], -1)
        keep = tokens >= 0
        if bool(keep.all()):
            return Draft(DraftTree(tokens, self._parents))
        new_index = torch.cumsum(keep.long(), 0) - 1
        parents = self._parents[keep]
        parents = torch.where(parents >= 0, new_index[parents.clamp(min=0)], parents)
        return Draft(DraftTree(tokens[keep], parents), info={"node_ids": keep.nonzero().flatten().tolist()})

    def observe(self, state, result: VerifyResult) -> None:
        tree = result.draft.tree
        inputs = torch.cat([state.input_ids[0, -1:].cpu(), tree.tokens])
        top = result.tree_logits.topk(self.k, dim=-1).indices.cpu()
        if result.committed_top_k is not None and result.committed_top_k.shape[0]:
            c = result.committed_top_k.shape[0]
            inputs = torch.cat([state.input_ids[0, -1 - c:-1].cpu(), inputs])
            top = torch.cat([result.committed_top_k[:, : self.k].cpu(), top])
        self.adjacency[inputs] = top
