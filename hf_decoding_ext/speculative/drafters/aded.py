"""ADED: an adaptive tri-gram representative of the target, drafted by a PUCT tree search."""

from __future__ import annotations

import math

import torch

from hf_decoding_ext.core.ngram_store import TopKNGramStore
from hf_decoding_ext.core.tree import DraftTree
from hf_decoding_ext.speculative.drafters.base import Draft, Drafter, VerifyResult


class ADEDDrafter(Drafter):
    """ADED, Adaptive Draft-Verification (Liu, Lei, Zhang and Xu, "Adaptive Draft-Verification for Efficient Large
    Language Model Decoding", arXiv 2407.12021, AAAI 2025), on the speculative engine.

    The "LLM representative" is a tri-gram table (:class:`~hf_decoding_ext.core.ngram_store.TopKNGramStore` with
    2-token contexts, backing off to 1 token) of next-token frequencies, updated online with every token the target
    emits (adaptive; with ``adaptive=False`` it is filled from the prompt only and then frozen). Each step, a Monte
    Carlo tree search over the table builds the draft tree: ``simulations`` descents from the root choose, at each
    node, the child maximising the PUCT score ``Q + c_puct * P * sqrt(N_parent) / (1 + N_child)`` (``P`` the
    table's probability, ``N`` visit counts, ``Q`` the mean value backed up through the child, the value of a
    reached node being its path probability: the estimated chance the target accepts the whole path), expanding one
    new node per descent (up to ``max_depth``). The ``max_nodes`` most visited nodes form the tree (a prefix-closed
    set: a child is never visited more than its parent), verified by tree attention; the target's outputs then
    update the table. Deterministic drafts: token-identical to greedy decoding, lossless under sampling.

    Args:
        max_nodes: draft tree size (default 16, for the 2-core CPU).
        simulations: search descents per step (default 32).
        c_puct: exploration weight (default 1.0).
        max_depth: deepest draft token (default 8).
        k: children per node, the table's top-``k`` (default 8).
        adaptive: update the table with the target's outputs (the method); ``False`` freezes it after the prompt
            (the "frozen tri-gram table" ablation).

    Deviations: the official code (an anonymous 4open.science repository) was not available offline, so the search
    details (the value of a node, expansion one node per descent, the node budget as the most visited nodes) are
    this library's reading of the paper's description; the table starts from the prompt's tri-grams and persists
    across ``generate()`` calls until :meth:`reset`.

    Example:
        >>> from hf_decoding_ext.speculative import SpeculativeDecoding
        >>> from hf_decoding_ext.speculative.drafters.aded import ADEDDrafter
        >>> loop = SpeculativeDecoding(ADEDDrafter())
        >>> out = model.generate(**inputs, max_new_tokens=128, do_sample=False, custom_generate=loop)  # doctest: +SKIP
    """

    def __init__(self, max_nodes: int = 16, simulations: int = 32, c_puct: float = 1.0, max_depth: int = 8,
                 k: int = 8, adaptive: bool = True):
        for name, value in (("max_nodes", max_nodes), ("simulations", simulations), ("max_depth", max_depth),
                            ("k", k)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not c_puct >= 0 or math.isinf(c_puct):
            raise ValueError(f"c_puct must be finite and >= 0, got {c_puct!r}")
        if not isinstance(adaptive, bool):
            raise ValueError(f"adaptive must be a bool, got {adaptive!r}")
        self.max_nodes, self.simulations, self.c_puct = max_nodes, simulations, float(c_puct)
        self.max_depth, self.k, self.adaptive = max_depth, k, adaptive
        self.table = TopKNGramStore(order=2, k=k)

    def reset(self) -> None:
        self.table.clear()

    def _feed(self, ids: list[int], start: int) -> None:
        """Add the tri-grams ending at positions ``start..`` of ``ids`` (one-hot updates: frequencies)."""
        for i in range(max(1, start), len(ids)):
            self.table.update(ids[max(0, i - 2):i], [ids[i]], [1.0])

    def begin(self, state) -> None:
        if state.input_ids.shape[0] != 1:
            raise ValueError("ADEDDrafter supports batch size 1 only")
        ids = state.input_ids[0].tolist()
        self._feed(ids, 1)  # the prompt's tri-grams (frozen after this when adaptive=False)

    def search(self, context: list[int]) -> list[tuple[int, ...]]:
        """The draft tree as token paths from the root, most visited first (parents before children)."""
        visits: dict[tuple[int, ...], int] = {(): 0}
        value: dict[tuple[int, ...], float] = {}
        prior: dict[tuple[int, ...], float] = {}
        kids: dict[tuple[int, ...], list[int]] = {}

        def children(path):
            if path not in kids:
                hit = self.table.lookup((context + list(path))[-2:])
                kids[path] = [] if hit is None else hit[0]
                if hit is not None:
                    total = sum(hit[1])
                    for t, p in zip(*hit):
                        prior[path + (t,)] = p / total
            return kids[path]

        for _ in range(self.simulations):
            path, trail = (), [()]
            reach = 1.0
            while len(path) < self.max_depth:
                options = children(path)
                if not options:
                    break
                root_n = math.sqrt(max(1, visits[path]))
                best = max(options, key=lambda t: (value.get(path + (t,), 0.0) / max(1, visits.get(path + (t,), 0))
                                                   + self.c_puct * prior[path + (t,)] * root_n
                                                   / (1 + visits.get(path + (t,), 0)), -t))
                path = path + (best,)
                reach *= prior[path]
                trail.append(path)
                if path not in visits:  # expand one new node per descent
                    visits[path] = 0
                    break
            for p in trail:  # back up the reached node's path probability
                visits[p] = visits.get(p, 0) + 1
                value[p] = value.get(p, 0.0) + reach
        nodes = [p for p in visits if p and visits[p] > 0]
        nodes.sort(key=lambda p: (-visits[p], len(p), p))
        picked = set()
        for p in nodes:  # most visited first; a child never outnumbers its parent, but keep it prefix-closed
            if len(picked) >= self.max_nodes:
                break
            if len(p) == 1 or p[:-1] in picked:
                picked.add(p)
        return sorted(picked, key=lambda p: (len(p), -visits[p], p))

    def propose(self, state) -> Draft:
        context = state.input_ids[0, -2:].tolist()
        paths = self.search(context)
        if not paths:
            return Draft(DraftTree.empty())
        index = {p: i for i, p in enumerate(paths)}
        return Draft(DraftTree(torch.tensor([p[-1] for p in paths]),
                               torch.tensor([index[p[:-1]] if len(p) > 1 else -1 for p in paths])))

    def observe(self, state, result: VerifyResult) -> None:
        if not self.adaptive:
            return
        ids = state.input_ids[0].tolist() + list(result.tokens)
        self._feed(ids, len(state.input_ids[0]))
