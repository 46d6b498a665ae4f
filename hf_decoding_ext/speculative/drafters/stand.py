"""STAND: stochastic n-gram drafting from a store of the target's own sampled distributions."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from hf_decoding_ext.core import lifecycle
from hf_decoding_ext.core.ngram_store import TopKNGramStore
from hf_decoding_ext.core.tree import DraftTree, normalize_choices
from hf_decoding_ext.speculative.drafters.base import Draft, Drafter, VerifyResult
from hf_decoding_ext.speculative.drafters.token_recycling import expand_template

# The hand-set tree, as {rank path: number of children}: 17 nodes, 4 levels, wide at the root and narrowing with
# depth, set for the 2-core development CPU (a verification forward of ~17 nodes costs about 1.5 one-token forwards
# with the fast kernels). The default is the profiled tree (PROFILED_TREE_FILE); this one is kept for comparison
# and as the fallback when the shipped file is absent.
HAND_SET_TREE: dict[tuple[int, ...], int] = {
    (): 4, (0,): 3, (1,): 2, (2,): 1, (0, 0): 2, (0, 1): 1, (1, 0): 1, (0, 0, 0): 1, (0, 0, 1): 1,
    (0, 0, 0, 0): 1,
}

# The large template profiled by scripts/profile_stand_tree.py (the paper starts from ~625 nodes of depth 20 on GPUs;
# here 7 children at the root, one fewer per rank and per level, the top-1 chain continued to depth 10: 130 nodes, a
# verification of which costs about five one-token forwards on the CPU, affordable for an offline profiling pass).
def _profile_template(width: int = 7, depth: int = 10) -> dict[tuple[int, ...], int]:
    out, frontier = {}, [()]
    while frontier:
        nxt = []
        for path in frontier:
            n = max(0, width - len(path) - sum(path)) if len(path) < depth else 0
            n = max(n, 1) if len(path) < depth and all(r == 0 for r in path) else n  # the top-1 chain reaches depth
            if n:
                out[path] = n
                nxt += [path + (i,) for i in range(n)]
        frontier = nxt
    return out


PROFILE_TEMPLATE: dict[tuple[int, ...], int] = _profile_template()

PROFILED_TREE_FILE = Path(__file__).resolve().parents[2] / "data" / "stand" / "tree.json"
"""The shipped profiled tree (``hf_decoding_ext/data/stand/tree.json``: rank paths, the per-node acceptance counts
they were chosen by, and the profiling settings), written by ``scripts/profile_stand_tree.py``."""


def check_tree_paths(paths: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """Validate a tree given as rank paths: :func:`~hf_decoding_ext.core.tree.normalize_choices` (every prefix
    present, parents first), non-empty and without repeats, and sibling ranks contiguous from 0 (rank ``i`` is the
    ``i``-th Gumbel-Top-K draw, so the without-replacement verification needs draws ``0..i-1`` in the tree too)."""
    out = normalize_choices(paths)
    if not out or len(out) != len(paths):
        raise ValueError(f"tree paths must be non-empty and distinct, got {list(paths)!r}")
    have = set(out)
    for p in out:
        if p[-1] > 0 and p[:-1] + (p[-1] - 1,) not in have:
            raise ValueError(f"tree path {p} lacks its elder sibling {p[:-1] + (p[-1] - 1,)}")
    return out


def compact_tree(hits: dict[tuple[int, ...], int], num_nodes: int) -> list[tuple[int, ...]]:
    """The paper's data-driven tree: the ``num_nodes`` nodes of a profiled template accepted most often (``hits``:
    rank path -> steps on which the node was on the accepted path), kept closed under parents and elder siblings
    (a node enters with the ones it needs, if the budget still has room for all of them)."""
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
        raise ValueError(f"num_nodes must be an int >= 1, got {num_nodes!r}")
    kept: list[tuple[int, ...]] = []
    have: set[tuple[int, ...]] = set()
    for path in sorted(hits, key=lambda p: (-hits[p], len(p), p)):
        need, stack = [], [path]
        while stack:  # the node, its ancestors and every elder sibling of each of them
            p = stack.pop()
            if p in have or p in need or not p:
                continue
            need.append(p)
            stack.append(p[:-1])
            if p[-1] > 0:
                stack.append(p[:-1] + (p[-1] - 1,))
        if len(kept) + len(need) <= num_nodes:
            kept += need
            have.update(need)
        if len(kept) == num_nodes:
            break
    return check_tree_paths(kept)


def load_profiled_tree() -> list[tuple[int, ...]] | None:
    """The shipped profiled tree's rank paths (``None`` if the file is absent)."""
    if not PROFILED_TREE_FILE.exists():
        return None
    return check_tree_paths(json.loads(PROFILED_TREE_FILE.read_text())["paths"])


class STANDDrafter(Drafter):
    """STAND, STochastic Adaptive N-gram Drafting (Song et al., "Accelerated Test-Time Scaling with Model-Free
    Speculative Sampling", arXiv 2506.04708, EMNLP 2025), on the speculative engine.

    A logit-based n-gram store (:class:`~hf_decoding_ext.core.ngram_store.TopKNGramStore`) keeps, for every context
    of 1 to ``order`` tokens seen in the output, the top-``k`` of the distribution the next token was sampled from
    (the target's processed distribution at the root and at every accepted node), merged over repeated occurrences
    by running average and truncated to the top ``k``. Drafting fills a token tree (``tree``, paths of child ranks)
    from the longest stored context of each node (back-off to shorter contexts): the children of a node are
    *sampled* from its stored distribution without replacement with Gumbel-Top-K (rank ``i`` is the ``i``-th
    Gumbel-Top-K pick), and the distribution is recorded as the node's ``draft_probs`` with
    ``sibling_scheme="without_replacement"``, so the engine's tree speculative sampling (recursive rejection with
    the earlier siblings removed) keeps the target's distribution exactly. With ``do_sample=False`` (or
    ``stochastic=False``) the children are the ``k`` most probable stored tokens, a deterministic draft (greedy:
    token-identical to greedy decoding).

    The store persists across ``generate()`` calls until :meth:`reset`: trajectories sampled for the same prompt
    (best-of-N, self-consistency) share it, which is the paper's setting.

    Args:
        order: longest n-gram context in tokens (default 4, back-off to 1; the paper's 4-gram to unigram lookup).
        k: entries kept per context (default 10, the paper's top-10).
        tree: ``{rank path: number of children}`` template or a list of rank paths (closed under parents and elder
            siblings); default: the shipped profiled tree (:data:`PROFILED_TREE_FILE`, 17 nodes chosen by measured
            acceptance from :data:`PROFILE_TEMPLATE`: 5 root children, the top-1 chain to depth 9, 3 children of
            the top root child, a chain of 2 under the second), else :data:`HAND_SET_TREE` if the file is absent.
        stochastic: sample the children (the paper); ``False`` drafts the top-ranked stored tokens deterministically
            (the "deterministic n-gram drafting" baseline of the paper's ablation).
        persist: keep the store across ``generate()`` calls (default; the paper's trajectories of one prompt share
            it); ``False`` empties it at the start of every call (independent prompts, or sampled outputs that
            must be reproducible from the seed alone: the drafts, and so the random draws, depend on the store).

    Tree profiling (the paper's data-driven tree): with ``record_hits=True`` the drafter counts, per rank path, the
    steps on which the node was on the accepted path (``node_hits``); :func:`compact_tree` keeps the most accepted
    nodes. ``scripts/profile_stand_tree.py`` does this on distillation prompts and ships the result.

    Deviations: the paper profiles a ~625-node, depth-20 template and keeps ~80 nodes for GPUs; here the template is
    :data:`PROFILE_TEMPLATE` and the budget 17 nodes (what a CPU verification affords). Gumbel noise is drawn per
    step instead of precomputed (a GPU-side optimisation). The store is updated at the root and accepted nodes (the distributions tokens were emitted from), not at rejected ones.

    Example:
        >>> from hf_decoding_ext.speculative import SpeculativeDecoding
        >>> from hf_decoding_ext.speculative.drafters.stand import STANDDrafter
        >>> loop = SpeculativeDecoding(STANDDrafter())
        >>> outs = [model.generate(**inputs, max_new_tokens=128, do_sample=True, custom_generate=loop)
        ...         for _ in range(4)]  # doctest: +SKIP
    """

    def __init__(self, order: int = 4, k: int = 10,
                 tree: dict[tuple[int, ...], int] | Sequence[Sequence[int]] | None = None, stochastic: bool = True,
                 persist: bool = True, record_hits: bool = False):
        self.store = TopKNGramStore(order=order, k=k)
        if tree is None:
            paths = load_profiled_tree() or expand_template(HAND_SET_TREE)
        elif isinstance(tree, dict):
            paths = expand_template(tree)
            if not paths:
                raise ValueError(f"tree must have at least one node, got {tree!r}")
        else:
            paths = check_tree_paths(tree)
        if any(r >= k for p in paths for r in p):
            raise ValueError(f"the tree template uses child ranks >= k={k}")
        for name, value in (("stochastic", stochastic), ("persist", persist), ("record_hits", record_hits)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be a bool, got {value!r}")
        self.persist = persist
        self.order, self.k, self.stochastic = order, k, stochastic
        self.paths = paths
        self._vocab = 0
        self.node_hits: dict[tuple[int, ...], int] | None = {p: 0 for p in paths} if record_hits else None
        self._node_paths: list[tuple[int, ...]] = []

    def reset(self) -> None:
        self.store.clear()

    def begin(self, state) -> None:
        if state.input_ids.shape[0] != 1:
            raise ValueError("STANDDrafter supports batch size 1 only")
        self._vocab = state.model.get_output_embeddings().weight.shape[0]
        if not self.persist:
            self.store.clear()

    def _children(self, context: list[int], sample: bool) -> tuple[list[int], torch.Tensor | None] | None:
        """Ranked children of a node from the store (Gumbel-Top-K order when sampling) and the distribution they
        were drawn from (``None`` for a deterministic draft)."""
        hit = self.store.lookup(context)
        if hit is None:
            return None
        ids, probs = hit
        p = torch.tensor(probs, dtype=torch.float32)
        p = p / p.sum()
        if not sample:
            return ids, None
        gumbel = -torch.log(-torch.log(torch.rand(len(ids)).clamp(min=1e-20)))
        order = torch.argsort(torch.log(p) + gumbel, descending=True).tolist()
        return [ids[i] for i in order], p.new_zeros(self._vocab).index_put_((torch.tensor(ids),), p)

    def propose(self, state) -> Draft:
        sample = state.do_sample and self.stochastic
        committed = state.input_ids[0, -self.order:].tolist()
        expanded: dict[tuple[int, ...], tuple[list[int], torch.Tensor | None] | None] = {}
        index: dict[tuple[int, ...], int] = {}
        tokens, parents, rows = [], [], []
        self._node_paths = node_paths = []
        for path in self.paths:
            parent = path[:-1]
            if parent and parent not in index:
                continue  # the parent was pruned
            if parent not in expanded:
                ctx = committed + [tokens[index[parent[: i + 1]]] for i in range(len(parent))]
                expanded[parent] = self._children(ctx, sample)
            hit = expanded[parent]
            if hit is None or path[-1] >= len(hit[0]):
                continue
            index[path] = len(tokens)
            node_paths.append(path)
            tokens.append(hit[0][path[-1]])
            parents.append(index[parent] if parent else -1)
            rows.append(hit[1])
        if not tokens:
            return Draft(DraftTree.empty())
        if sample:
            probs = torch.stack(rows).to(state.device)
            tree = DraftTree(torch.tensor(tokens), torch.tensor(parents), probs, "without_replacement")
        else:
            tree = DraftTree(torch.tensor(tokens), torch.tensor(parents))
        return Draft(tree)

    def observe(self, state, result: VerifyResult) -> None:
        tree = result.draft.tree
        path = [int(tree.tokens[i]) for i in result.accepted]
        if self.node_hits is not None:
            for i in result.accepted:
                self.node_hits[self._node_paths[i]] += 1
        ids = torch.cat([state.input_ids, torch.tensor([path], dtype=torch.long, device=state.input_ids.device)], 1)
        base = state.input_ids.shape[1]
        processors = lifecycle.fork(state.logits_processor, caller=type(self).__name__)
        for j, node in enumerate([-1] + list(result.accepted)):  # the root, then each accepted node
            row = result.tree_logits[node + 1]
            upto = ids[:, : base + j]
            scores = processors(upto, row[None].clone())[0] if len(processors) else row
            self.store.update_from_probs(upto[0, -self.order:].tolist(), torch.softmax(scores.float(), -1))
