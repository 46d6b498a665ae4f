"""STAND: stochastic n-gram drafting from a store of the target's own sampled distributions."""

from __future__ import annotations

import torch

from hf_decoding_ext.core import lifecycle
from hf_decoding_ext.core.ngram_store import TopKNGramStore
from hf_decoding_ext.core.tree import DraftTree
from hf_decoding_ext.speculative.drafters.base import Draft, Drafter, VerifyResult
from hf_decoding_ext.speculative.drafters.token_recycling import expand_template

# Default tree, as {rank path: number of children}: 17 nodes, 4 levels, wide at the root and narrowing with depth.
# Hand-set for the 2-core development CPU (a verification forward of ~17 nodes costs about 1.5 one-token forwards
# with the fast kernels); the paper profiles a compact tree (~80 nodes) on GPUs, see STANDDrafter.profile_tree.
DEFAULT_TREE: dict[tuple[int, ...], int] = {
    (): 4, (0,): 3, (1,): 2, (2,): 1, (0, 0): 2, (0, 1): 1, (1, 0): 1, (0, 0, 0): 1, (0, 0, 1): 1,
    (0, 0, 0, 0): 1,
}


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
        tree: ``{rank path: number of children}`` template; default :data:`DEFAULT_TREE` (17 nodes).
        stochastic: sample the children (the paper); ``False`` drafts the top-ranked stored tokens deterministically
            (the "deterministic n-gram drafting" baseline of the paper's ablation).
        persist: keep the store across ``generate()`` calls (default; the paper's trajectories of one prompt share
            it); ``False`` empties it at the start of every call (independent prompts, or sampled outputs that
            must be reproducible from the seed alone: the drafts, and so the random draws, depend on the store).

    Deviations: the paper's data-driven tree (a large tree profiled per node, the best ~80 nodes kept) targets GPUs;
    the default here is a small hand-set tree for the CPU, and :meth:`profile_tree` ranks a template's nodes by
    measured acceptance. Gumbel noise is drawn per step instead of precomputed (a GPU-side optimisation). The store
    is updated at the root and accepted nodes (the distributions tokens were emitted from), not at rejected ones.

    Example:
        >>> from hf_decoding_ext.speculative import SpeculativeDecoding
        >>> from hf_decoding_ext.speculative.drafters.stand import STANDDrafter
        >>> loop = SpeculativeDecoding(STANDDrafter())
        >>> outs = [model.generate(**inputs, max_new_tokens=128, do_sample=True, custom_generate=loop)
        ...         for _ in range(4)]  # doctest: +SKIP
    """

    def __init__(self, order: int = 4, k: int = 10, tree: dict[tuple[int, ...], int] | None = None,
                 stochastic: bool = True, persist: bool = True):
        self.store = TopKNGramStore(order=order, k=k)
        tree = DEFAULT_TREE if tree is None else tree
        paths = expand_template(tree)
        if not paths:
            raise ValueError(f"tree must have at least one node, got {tree!r}")
        if any(r >= k for p in paths for r in p):
            raise ValueError(f"the tree template uses child ranks >= k={k}")
        for name, value in (("stochastic", stochastic), ("persist", persist)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be a bool, got {value!r}")
        self.persist = persist
        self.order, self.k, self.stochastic = order, k, stochastic
        self.paths = paths
        self._vocab = 0

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
        ids = torch.cat([state.input_ids, torch.tensor([path], dtype=torch.long, device=state.input_ids.device)], 1)
        base = state.input_ids.shape[1]
        processors = lifecycle.fork(state.logits_processor, caller=type(self).__name__)
        for j, node in enumerate([-1] + list(result.accepted)):  # the root, then each accepted node
            row = result.tree_logits[node + 1]
            upto = ids[:, : base + j]
            scores = processors(upto, row[None].clone())[0] if len(processors) else row
            self.store.update_from_probs(upto[0, -self.order:].tolist(), torch.softmax(scores.float(), -1))
