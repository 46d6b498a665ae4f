"""Lattice decoding: best-first search with path recombination.

Paper: "Massive-scale Decoding for Text Generation using Lattices" (Jiacheng Xu, Greg Durrett, NAACL 2022,
arXiv 2112.07660). Official code: jiacheng-xu/lattice-generation (``src/recom_search/model/model_astar.py``,
``beam_state.py``, ``bfs_util.py``, ``new_merge.py``, ``merge.py``; README flags ``-beam_size 16 -ngram_suffix 4
-avg_score 0.75 -merge zip|imp -adhoc``).

The search builds a lattice (a DAG of token nodes) instead of a list of hypotheses: a max-heap holds frontier nodes
(the top-k alternatives seen along every explored path); the best one is popped and completed greedily to its end
(``-adhoc``), pushing its top-k alternatives at every step; whenever the greedy next token closes an n-gram that
already ends some node of the lattice (and the two prefixes have similar lengths), the new path is *recombined* into
that node and the completion stops. The budget is the number of model calls (next-token distributions) that beam
search would use. :class:`Lattice` holds the result, counts its complete paths exactly, extracts the k best, and lists
its unique n-grams.
"""

from __future__ import annotations

import copy
import heapq
import math
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from hf_decoding_ext.core import lifecycle
from hf_decoding_ext.core.loop import DecodingLoop, GenerationState, select_cache

MERGE_MODES = ("zip", "imp", "none")


# ----------------------------------------------------------------------------------------------- the lattice
@dataclass
class LatticeNode:
    """One node of a :class:`Lattice`: a generated token reached from one or several parents.

    Attributes:
        id: node id (the root, the prompt, has id 0 and ``token=None``).
        token: the token id.
        parents: parent node ids; the first is the *primary* parent (the prefix the node was generated from).
        parent_logprobs: per parent, the log-probability of ``token`` on that edge (under the generate() processors,
            at the context the edge was scored in).
        edge_contexts: per parent, the generated tokens the model saw when it scored the edge (the scoring context
            of a recombined edge is the dropped hypothesis's prefix).
        children: child node ids.
        finished: a complete hypothesis may end here (eos or the caller's stopping criteria fired).
        history: the node's primary prefix: the generated tokens up to and including ``token`` it was created with.
        logprob: log-probability of ``token`` at ``history[:-1]`` (processed distribution).
        raw_logprob: the same under the raw model distribution.
        rank: rank of ``token`` among the top-k at its primary prefix (0: the greedy token).
    """

    id: int
    token: int | None
    parents: list[int] = field(default_factory=list)
    parent_logprobs: list[float] = field(default_factory=list)
    edge_contexts: list[tuple[int, ...]] = field(default_factory=list)
    children: list[int] = field(default_factory=list)
    finished: bool = False
    history: tuple[int, ...] = ()
    logprob: float = 0.0
    raw_logprob: float = 0.0
    rank: int = 0


@dataclass
class MergeRecord:
    """One recombination: the dropped hypothesis ``dropped_history`` (generated tokens, ending with the greedy token
    that closed the n-gram) was merged into node ``kept``, whose matched path ``matched_tokens`` (through the nodes
    ``matched_nodes``, newest first) ends with the same ``n`` tokens. ``pairs``: nodes zipped (``zip``) or 1
    (``imp``)."""

    kind: str
    kept: int
    dropped_history: tuple[int, ...]
    matched_tokens: tuple[int, ...]
    matched_nodes: tuple[int, ...]
    pairs: int


@dataclass
class Hypothesis:
    """A complete path of a lattice: generated ``tokens``, summed edge log-probability ``logprob`` and the ranking
    score ``score = logprob / len(tokens) ** length_penalty``."""

    tokens: tuple[int, ...]
    logprob: float
    score: float


class Lattice:
    """A DAG of token nodes rooted at the prompt (node 0) that encodes many complete hypotheses.

    A *complete path* runs from the root to a ``finished`` node along parent -> child edges; its tokens are the
    nodes' tokens (the root has none) and its log-probability the sum of its edges' ``parent_logprobs``.

    Args:
        nodes: the nodes, keyed by id (parents/children must be consistent; :meth:`from_edges` builds one).
        merges: the recombinations that built it (:class:`MergeRecord`).
        ngram_suffix: the n of the recombination rule.

    Example:
        >>> lat = Lattice.from_edges({1: 5, 2: 6, 3: 7, 4: 2}, [(0, 1), (0, 2), (1, 3), (2, 3), (3, 4)], finished=[4])
        >>> lat.count_paths()
        2
        >>> [h.tokens for h in lat.k_best(2)]
        [(5, 7, 2), (6, 7, 2)]
    """

    def __init__(self, nodes: dict[int, LatticeNode], merges: list[MergeRecord] | None = None,
                 ngram_suffix: int | None = None):
        if 0 not in nodes or nodes[0].token is not None:
            raise ValueError("a lattice needs the root node 0 with token None")
        self.nodes = nodes
        self.merges = list(merges or [])
        self.ngram_suffix = ngram_suffix
        self._order: list[int] | None = None

    @classmethod
    def from_edges(cls, tokens: dict[int, int], edges, finished, logprobs: dict | None = None) -> Lattice:
        """Build a lattice from ``tokens`` (node id -> token, root 0 excluded), ``edges`` ``(parent, child)`` and
        the ``finished`` node ids; ``logprobs`` maps an edge to its log-probability (default 0)."""
        nodes = {0: LatticeNode(0, None)}
        for i, t in tokens.items():
            if i == 0:
                raise ValueError("node 0 is the root and has no token")
            nodes[i] = LatticeNode(int(i), int(t))
        for p, c in edges:
            nodes[c].parents.append(p)
            nodes[c].parent_logprobs.append(float((logprobs or {}).get((p, c), 0.0)))
            nodes[c].edge_contexts.append(())
            nodes[p].children.append(c)
        for i in finished:
            nodes[i].finished = True
        return cls(nodes)

    # ------------------------------------------------------------------------------------------- structure
    @property
    def num_nodes(self) -> int:
        """Number of token nodes (the root excluded)."""
        return len(self.nodes) - 1

    @property
    def num_edges(self) -> int:
        return sum(len(n.parents) for n in self.nodes.values())

    @property
    def ends(self) -> list[int]:
        """The finished node ids."""
        return [i for i, n in self.nodes.items() if n.finished]

    def topological_order(self) -> list[int]:
        """Node ids, parents before children (raises ``ValueError`` on a cycle)."""
        if self._order is None:
            indeg = {i: len(n.parents) for i, n in self.nodes.items()}
            ready = [i for i, d in indeg.items() if d == 0]
            order = []
            while ready:
                i = ready.pop()
                order.append(i)
                for c in self.nodes[i].children:
                    indeg[c] -= 1
                    if indeg[c] == 0:
                        ready.append(c)
            if len(order) != len(self.nodes):
                raise ValueError("the lattice has a cycle")
            self._order = order
        return self._order

    def _coreachable(self) -> set[int]:
        """Nodes from which a finished node can be reached (they lie on a complete path)."""
        good: set[int] = set()
        for i in reversed(self.topological_order()):
            n = self.nodes[i]
            if n.finished or any(c in good for c in n.children):
                good.add(i)
        return good

    # ------------------------------------------------------------------------------------------- paths
    def count_paths(self, max_length: int | None = None) -> int:
        """Exact number of distinct complete paths (root -> finished node), by dynamic programming over the DAG
        (no enumeration). With ``max_length``, only paths of at most that many tokens count."""
        order = self.topological_order()
        if max_length is None:
            count = {0: 1}
            for i in order:
                if i != 0:
                    count[i] = sum(count[p] for p in self.nodes[i].parents)
            return sum(count[i] for i in self.ends)
        by_len: dict[int, dict[int, int]] = {0: {0: 1}}
        for i in order:
            if i == 0:
                continue
            acc: dict[int, int] = defaultdict(int)
            for p in self.nodes[i].parents:
                for length, c in by_len[p].items():
                    if length + 1 <= max_length:
                        acc[length + 1] += c
            by_len[i] = dict(acc)
        return sum(sum(by_len[i].values()) for i in self.ends)

    def paths(self, limit: int | None = None) -> Iterator[tuple[int, ...]]:
        """Enumerate complete paths as node-id tuples (root excluded), depth first (brute force: for checks and
        small lattices; ``limit`` stops after that many)."""
        count = 0
        stack = [(0, ())]
        while stack:
            i, path = stack.pop()
            node = self.nodes[i]
            if i != 0 and node.finished:
                yield path
                count += 1
                if limit is not None and count >= limit:
                    return
            for c in reversed(node.children):
                stack.append((c, path + (c,)))

    def tokens_of(self, path) -> tuple[int, ...]:
        """The tokens of a node path."""
        return tuple(self.nodes[i].token for i in path)

    def path_logprob(self, path) -> float:
        """Summed edge log-probability of a node path (root excluded)."""
        total, prev = 0.0, 0
        for i in path:
            n = self.nodes[i]
            total += n.parent_logprobs[n.parents.index(prev)]
            prev = i
        return total

    def k_best(self, k: int, length_penalty: float = 1.0, max_length: int | None = None) -> list[Hypothesis]:
        """The ``k`` complete paths with the highest ``logprob / length ** length_penalty`` (exact: k-best dynamic
        programming over (node, length) states), at most ``max_length`` tokens long if given."""
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        # table[node][length] = list of (logprob, parent, parent_length, parent_index), best first, at most k
        table: dict[int, dict[int, list[tuple[float, int, int, int]]]] = {0: {0: [(0.0, -1, -1, -1)]}}
        for i in self.topological_order():
            if i == 0:
                continue
            node = self.nodes[i]
            acc: dict[int, list] = defaultdict(list)
            for p, w in zip(node.parents, node.parent_logprobs):
                for length, entries in table[p].items():
                    if max_length is not None and length + 1 > max_length:
                        continue
                    for j, entry in enumerate(entries):
                        acc[length + 1].append((entry[0] + w, p, length, j))
            table[i] = {length: heapq.nlargest(k, lst, key=lambda e: e[0]) for length, lst in acc.items()}
        finals = []
        for i in self.ends:
            for length, entries in table[i].items():
                for j, entry in enumerate(entries):
                    finals.append((entry[0] / length ** length_penalty, entry[0], i, length, j))
        finals = heapq.nlargest(k, finals, key=lambda e: (e[0], e[1]))
        out = []
        for score, logprob, i, length, j in finals:
            tokens = []
            while i != 0:
                tokens.append(self.nodes[i].token)
                _, p, pl, pj = table[i][length][j]
                i, length, j = p, pl, pj
            out.append(Hypothesis(tuple(reversed(tokens)), float(logprob), float(score)))
        return out

    def ngrams(self, n: int = 4) -> set[tuple[int, ...]]:
        """The unique token n-grams over all complete paths (computed on the DAG, without enumerating paths)."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        good = self._coreachable()
        suffixes: dict[int, set[tuple[int, ...]]] = {0: {()}}
        grams: set[tuple[int, ...]] = set()
        for i in self.topological_order():
            if i == 0:
                continue
            node = self.nodes[i]
            mine: set[tuple[int, ...]] = set()
            for p in node.parents:
                for s in suffixes[p]:
                    if i in good and len(s) == n - 1:
                        grams.add(s + (node.token,))
                    mine.add((s + (node.token,))[-(n - 1):] if n > 1 else ())
            suffixes[i] = mine
        return grams

    def to_dict(self) -> dict:
        """A JSON-friendly description (nodes with token, parents, edge log-probabilities, finished flag)."""
        return {"nodes": [{"id": n.id, "token": n.token, "parents": n.parents,
                           "parent_logprobs": n.parent_logprobs, "finished": n.finished}
                          for n in self.nodes.values()],
                "merges": len(self.merges)}

    def __repr__(self) -> str:
        return (f"Lattice(nodes={self.num_nodes}, edges={self.num_edges}, ends={len(self.ends)}, "
                f"merges={len(self.merges)})")


# ----------------------------------------------------------------------------------------------- the search
@dataclass
class _Node:
    id: int
    token: int | None
    parents: list[int]
    parent_logprobs: list[float]
    edge_contexts: list[tuple[int, ...]]
    history: tuple[int, ...]
    sum_logprob: float
    logprob: float
    raw_logprob: float
    rank: int
    finished: bool = False


@dataclass(order=True)
class _Frontier:
    priority: float
    order: int
    parent: int = field(compare=False)
    token: int = field(compare=False)
    logprob: float = field(compare=False)
    raw_logprob: float = field(compare=False)
    rank: int = field(compare=False)
    master: int = field(compare=False)
    history: tuple[int, ...] = field(compare=False)
    sum_logprob: float = field(compare=False)


class _Search:
    """State of the search for one prompt row (the lattice under construction, union-find of zipped nodes, the
    n-gram index and the heap)."""

    def __init__(self, loop: LatticeDecoding, state: GenerationState, row: int, root_cache, max_new_tokens: int,
                 budget: int):
        self.loop, self.state, self.row = loop, state, row
        self.prompt_ids = state.input_ids[row:row + 1]
        self.prompt_mask = state.attention_mask[row:row + 1]
        self.root_cache = root_cache
        self.max_new_tokens = max_new_tokens
        self.budget = budget
        self.calls = 0
        self.nodes: dict[int, _Node] = {0: _Node(0, None, [], [], [], (), 0.0, 0.0, 0.0, 0)}
        self.replaced: dict[int, int] = {}
        self.index: dict[tuple[int, ...], list[int]] = defaultdict(list)
        self.heap: list[_Frontier] = []
        self.counter = 0
        self.next_id = 1
        self.completed: list[tuple[int, ...]] = []  # histories of the completed hypotheses, in order
        self.merges: list[MergeRecord] = []
        self.first_chain: list[int] = []  # tokens of the first (greedy) branch

    # ------------------------------------------------------------------------------------------- graph helpers
    def find(self, i: int) -> int:
        while i in self.replaced:
            i = self.replaced[i]
        return i

    def parents_of(self, i: int) -> list[int]:
        out = []
        for p in self.nodes[i].parents:
            p = self.find(p)
            if p != i and p not in out:
                out.append(p)
        return out

    def ancestors(self, i: int) -> set[int]:
        seen: set[int] = set()
        stack = self.parents_of(i)
        while stack:
            p = stack.pop()
            if p in seen:
                continue
            seen.add(p)
            stack.extend(self.parents_of(p))
        return seen

    def new_node(self, parent: int, token: int, logprob: float, raw_logprob: float, rank: int,
                 history: tuple[int, ...], sum_logprob: float) -> _Node:
        node = _Node(self.next_id, token, [parent], [logprob], [history[:-1]], history, sum_logprob, logprob,
                     raw_logprob, rank)
        self.next_id += 1
        self.nodes[node.id] = node
        return node

    def is_finished(self, history: tuple[int, ...]) -> bool:
        ids = torch.cat([self.prompt_ids, self.prompt_ids.new_tensor([history])], dim=1) if history else self.prompt_ids
        return bool(self.state.stopping_criteria(ids, None)[0])

    # ------------------------------------------------------------------------------------------- n-gram index
    def index_add(self, parent: int, node: _Node) -> None:
        """Index ``node`` under every n-gram that ends at it (through any parents of ``parent``)."""
        n = self.loop.ngram_suffix
        if n == 1:
            self.index[(node.token,)].append(node.id)
            return
        paths = [(parent,)]
        for _ in range(n - 2):
            paths = [(q,) + path for path in paths for q in self.parents_of(path[0])]
        for path in paths:
            if any(i == 0 for i in path):
                continue
            key = tuple(self.nodes[i].token for i in path) + (node.token,)
            if len(key) == n:
                self.index[key].append(node.id)

    def query(self, ngram: tuple[int, ...]) -> list[int]:
        out = []
        for i in self.index.get(ngram, ()):
            i = self.find(i)
            if i in self.nodes and i not in out:
                out.append(i)
        return out

    def match_suffix(self, cand: int, ngram: tuple[int, ...]):
        """A path into ``cand`` spelling ``ngram`` (node ids newest first) and the tokens of that path continued along
        primary parents to the root; ``None`` when no path matches."""
        frontier = [[cand]]
        for tok in reversed(ngram):
            new = []
            for path in frontier:
                node = self.nodes[path[-1]]
                if node.token == tok:
                    new.extend(path + [p] for p in self.parents_of(path[-1]))
            frontier = new
            if not frontier:
                return None
        path = frontier[0]
        matched = tuple(path[:-1])
        before = []
        i = path[-1]
        while i != 0:
            before.append(self.nodes[i].token)
            i = self.parents_of(i)[0]
        return matched, tuple(reversed(before)) + tuple(ngram)

    # ------------------------------------------------------------------------------------------- merges
    def merge_imp(self, cand: int, top1: _Node, pointer: int) -> bool:
        if self.find(cand) == self.find(pointer):
            return False
        if pointer in self.ancestors(cand) or cand in self.ancestors(pointer):
            return False
        node = self.nodes[cand]
        node.parents.append(pointer)
        node.parent_logprobs.append(top1.logprob)
        node.edge_contexts.append(top1.history[:-1])
        return True

    def merge_zip(self, cand: int, top1: _Node, matched: tuple[int, ...]) -> int:
        zp: int | None = top1.id
        pairs = 0
        for par_id in matched:
            if zp is None or zp == 0:
                break
            par = self.find(par_id)
            zp = self.find(zp)
            if par == zp or self.nodes[par].token != self.nodes[zp].token:
                break
            if par in self.ancestors(zp) or zp in self.ancestors(par):
                break
            drop, keep = self.nodes[zp], self.nodes[par]
            next_zp = self.parents_of(zp)[0] if drop.parents else None
            for p, w, ctx in zip(drop.parents, drop.parent_logprobs, drop.edge_contexts):
                p = self.find(p)
                if p != par and p not in [self.find(q) for q in keep.parents]:
                    keep.parents.append(p)
                    keep.parent_logprobs.append(w)
                    keep.edge_contexts.append(ctx)
            keep.finished = keep.finished or drop.finished
            self.replaced[zp] = par
            del self.nodes[zp]
            pairs += 1
            zp = next_zp
        return pairs

    # ------------------------------------------------------------------------------------------- model
    def forward(self, cache, ids: torch.Tensor):
        mask = torch.cat([self.prompt_mask, self.prompt_mask.new_ones((1, ids.shape[1] - self.prompt_ids.shape[1]))],
                         dim=1)
        out = self.state.forward(cache=cache, input_ids=ids, attention_mask=mask)
        self.calls += 1
        return out.logits[:, -1, :]

    def distribution(self, ids: torch.Tensor, raw: torch.Tensor):
        scores = self.state.logits_processor(ids, raw.clone())
        return torch.log_softmax(scores.float(), dim=-1)[0], torch.log_softmax(raw.float(), dim=-1)[0]

    # ------------------------------------------------------------------------------------------- search
    def push_children(self, pointer: _Node, top1: _Node, logp, raw_logp, values, indices) -> None:
        loop = self.loop
        seen = [loop._text(int(indices[0]))] if loop.tokenizer is not None else []
        for rank in range(1, len(indices)):
            v, t = float(values[rank]), int(indices[rank])
            if not math.isfinite(v):
                continue
            if loop.tokenizer is not None:
                text = loop._text(t)
                if text in seen:
                    continue
                seen.append(text)
            history = pointer.history + (t,)
            total = pointer.sum_logprob + v
            score = total / (len(history) + 1) ** loop.avg_score if loop.avg_score > 0 else total
            self.counter += 1
            heapq.heappush(self.heap, _Frontier(-score, self.counter, pointer.id, t, v, float(raw_logp[t]), rank,
                                                top1.id, history, total))

    def expand(self, pointer: _Node, raw_first: torch.Tensor | None, first_chain: bool = False) -> None:
        """Complete ``pointer`` greedily until it ends, recombines or the budget runs out (the official ``adhoc``
        expansion), pushing the top-k alternatives of every step onto the heap."""
        loop = self.loop
        n = loop.ngram_suffix
        ids = torch.cat([self.prompt_ids, self.prompt_ids.new_tensor([pointer.history])], dim=1) \
            if pointer.history else self.prompt_ids
        cache = None
        while not pointer.finished and self.calls < self.budget:
            if raw_first is not None:
                raw, raw_first = raw_first, None
                self.calls += 1
            else:
                if cache is None:
                    cache = copy.deepcopy(self.root_cache)
                raw = self.forward(cache, ids)
            logp, raw_logp = self.distribution(ids, raw)
            values, indices = logp.topk(min(loop.k_best, logp.shape[-1]))
            t = int(indices[0])
            history = pointer.history + (t,)
            top1 = self.new_node(pointer.id, t, float(values[0]), float(raw_logp[t]), 0, history,
                                 pointer.sum_logprob + float(values[0]))
            top1.finished = self.is_finished(history)
            merged = False
            if loop.merge != "none" and len(history) >= n:
                ngram = history[-n:]
                hit = None
                for cand in self.query(ngram):
                    if cand == top1.id:
                        continue
                    found = self.match_suffix(cand, ngram)
                    if found is None:
                        continue
                    matched, cand_tokens = found
                    if abs(len(cand_tokens) - len(history)) < loop.len_diff:
                        hit = (cand, matched, cand_tokens)
                        break
                if hit is not None:
                    cand, matched, cand_tokens = hit
                    merged = True
                    if loop.merge == "imp":
                        pairs = 1 if self.merge_imp(cand, top1, pointer.id) else 0
                        merged = pairs == 1
                        del self.nodes[top1.id]  # imp: the new node is dropped (merged) or re-added below
                        if not merged:
                            self.nodes[top1.id] = top1
                    else:
                        pairs = self.merge_zip(cand, top1, matched)
                    if pairs:
                        self.merges.append(MergeRecord(loop.merge, cand, history, cand_tokens, matched, pairs))
            if not merged:
                self.index_add(pointer.id, top1)
            self.push_children(pointer, top1, logp, raw_logp, values, indices)
            if merged:
                if top1.id in self.nodes:  # zip refused at its first pair: the branch is dropped (official code)
                    del self.nodes[top1.id]
                return
            if first_chain:
                self.first_chain = list(history)
            pointer = top1
            if pointer.finished:
                self.completed.append(pointer.history)
                return
            ids = torch.cat([ids, ids.new_tensor([[t]])], dim=1)

    def run(self, root_raw: torch.Tensor) -> None:
        self.expand(self.nodes[0], root_raw, first_chain=True)
        while self.heap and self.calls < self.budget:
            item = heapq.heappop(self.heap)
            if self.loop.merge == "zip" and self.find(item.master) != item.master:
                continue  # official: skip the alternatives of a node that was zipped into another
            node = self.new_node(self.find(item.parent), item.token, item.logprob, item.raw_logprob, item.rank,
                                 item.history, item.sum_logprob)
            node.finished = self.is_finished(node.history)
            if node.finished:
                self.completed.append(node.history)
                continue
            self.expand(node, None)

    def lattice(self) -> Lattice:
        nodes: dict[int, LatticeNode] = {}
        for i, n in self.nodes.items():
            parents, logps, ctxs = [], [], []
            for p, w, c in zip(n.parents, n.parent_logprobs, n.edge_contexts):
                p = self.find(p)
                if p != i and p not in parents and p in self.nodes:
                    parents.append(p)
                    logps.append(w)
                    ctxs.append(c)
            nodes[i] = LatticeNode(i, n.token, parents, logps, ctxs, [], n.finished, n.history, n.logprob,
                                   n.raw_logprob, n.rank)
        for i, n in nodes.items():
            for p in n.parents:
                nodes[p].children.append(i)
        merges = [MergeRecord(r.kind, self.find(r.kept), r.dropped_history, r.matched_tokens,
                              tuple(self.find(i) for i in r.matched_nodes), r.pairs) for r in self.merges]
        return Lattice(nodes, merges, self.loop.ngram_suffix)


# ----------------------------------------------------------------------------------------------- the loop
class LatticeDecoding(DecodingLoop):
    r"""Lattice decoding (best-first search with path recombination) as a ``custom_generate`` loop.

    Paper: "Massive-scale Decoding for Text Generation using Lattices" (Xu & Durrett, NAACL 2022, arXiv 2112.07660);
    faithful to the official ``a_star`` search of jiacheng-xu/lattice-generation with ``-adhoc`` (greedy completion)
    and without its optional heuristics (``-use_heu`` off, as in the README commands).

    The search (per prompt):

    1. The prompt is expanded greedily to its end (eos or the generate() stopping criteria, e.g. ``max_new_tokens``):
       at each step the model's top-``k_best`` next tokens are computed; the top-1 extends the path, the others go onto
       a max-heap keyed by ``sum log p / (length + 1) ** avg_score`` (length counted like the official code, with the
       decoder start token; here the prompt stands for it).
    2. Before the top-1 token is added, its last ``ngram_suffix`` tokens are looked up in an index of the n-grams that
       end at lattice nodes (through any parents). If a node ``c`` ends with the same n-gram along some path whose
       length differs by less than ``len_diff`` tokens, the new path is recombined into ``c`` and the expansion stops:
       ``merge="imp"`` adds the current node as a parent of ``c``; ``merge="zip"`` identifies the new path's last
       ``ngram_suffix`` nodes with ``c``'s matched nodes (their parents join). Merges that would create a cycle are
       refused (``imp``: the expansion goes on; ``zip``: the branch is dropped, as in the official code).
    3. While the budget of model calls lasts, the best heap entry is popped (with ``zip``, entries whose greedy
       sibling was zipped into another node are skipped, as in the official code) and expanded as in 1-2; a popped
       entry that already ends (eos) becomes a complete hypothesis without a model call.

    The budget is ``beam_size * max_new_tokens`` model calls (the official ``comp_budget = beam_size * max_len``: what
    beam search of that width spends), or ``budget`` if given. A *model call* is one next-token distribution for one
    hypothesis (one row of one forward): exactly what beam search spends per beam and step. The generate() output is
    the best complete path of the lattice by ``logprob / length ** length_penalty`` among paths of at most
    ``max_new_tokens`` tokens; with ``return_dict_in_generate=True`` the output also has ``lattices`` (one
    :class:`Lattice` per row), ``hypotheses`` (the ``num_hypotheses`` best paths, :class:`Hypothesis`),
    ``completed`` (the token tuples of the hypotheses in the order the search completed them), ``model_calls`` (per
    row) and ``forwards`` (forward passes in all).

    Args:
        beam_size (`int`, defaults to 16): budget multiplier (README ``-beam_size 16``).
        budget (`int`, *optional*): total model calls per prompt (overrides ``beam_size * max_new_tokens``); at least
            ``max_new_tokens`` so that the first (greedy) hypothesis can complete.
        k_best (`int`, defaults to 5): alternatives considered per expansion step (official ``k_best=5``).
        ngram_suffix (`int`, defaults to 4): n of the recombination rule (README ``-ngram_suffix 4``).
        len_diff (`int`, defaults to 5): the two prefixes' lengths must differ by less than this (official default).
        avg_score (`float`, defaults to 0.75): length normalisation exponent of the heap priority (README
            ``-avg_score 0.75``; <= 0: plain summed log-probability).
        merge (`str`, defaults to ``"zip"``): ``"zip"`` (official default), ``"imp"`` or ``"none"`` (best-first
            search without recombination, the README's ``astar_baseline``).
        num_hypotheses (`int`, defaults to 16): k of the k-best paths returned.
        length_penalty (`float`, defaults to 1.0): exponent of the length normalisation ranking complete paths.
        tokenizer (*optional*): when given, alternatives whose decoded text (stripped, lower-cased) repeats that of
            the greedy token or of a better alternative at the same step are not pushed (official code).

    Deviations from the paper / official code:

    * decoder-only: the prompt takes the place of the encoder input and the decoder start token;
    * a hypothesis ends at eos or when the generate() stopping criteria fire (``max_new_tokens``, stop strings), not
      at a ``.`` or ``</s>`` token after ``min_len`` tokens (the XSum setting); a hypothesis cut at
      ``max_new_tokens`` counts as complete, as in transformers' beam search;
    * the budget is hard: the last expansion stops when the budget is spent (the official loop lets it finish);
    * the next-token distributions are those of the generate() logits processors (the raw model's when there are
      none, the default for greedy decoding);
    * the output is the best lattice path (length-normalised like transformers' beam search) and the k best paths
      are extracted exactly by dynamic programming; the official code returns the completed hypotheses (also
      returned here, as ``completed``); recombined paths may be a few tokens longer than ``max_new_tokens``
      (lengths differ by less than ``len_diff``): ``Lattice.count_paths()`` counts them, the output and
      ``hypotheses`` only use paths within ``max_new_tokens`` (``count_paths(max_length=...)``); if no path
      completes within the budget (only when the greedy branch itself is recombined), the output is the greedy
      prefix reached;
    * forwards are not batched across hypotheses: best-first search is sequential (each pop depends on the last
      expansion). Each expansion starts from a copy of the prompt's KV cache and feeds the popped node's generated
      prefix in one forward (one model call), then one token per step; prompts of a batch are searched one after
      the other (one shared prompt forward).

    No offline stand-in is involved (no scorer, judge or reward).

    Example:
        >>> from hf_decoding_ext import load_model, encode_prompts
        >>> from hf_decoding_ext.search.lattice import LatticeDecoding
        >>> model, tokenizer = load_model()  # doctest: +SKIP
        >>> inputs = encode_prompts(tokenizer, "Give me a title for a story about a lighthouse.")  # doctest: +SKIP
        >>> out = model.generate(**inputs, custom_generate=LatticeDecoding(beam_size=4, tokenizer=tokenizer),
        ...                      max_new_tokens=24, do_sample=False, return_dict_in_generate=True)  # doctest: +SKIP
        >>> out.lattices[0].count_paths(), len(out.hypotheses[0])  # doctest: +SKIP
    """

    supports_sampling = False
    supports_output_scores = False

    def __init__(self, beam_size: int = 16, budget: int | None = None, k_best: int = 5, ngram_suffix: int = 4,
                 len_diff: int = 5, avg_score: float = 0.75, merge: str = "zip", num_hypotheses: int = 16,
                 length_penalty: float = 1.0, tokenizer=None):
        for name, value, low in (("beam_size", beam_size, 1), ("k_best", k_best, 1), ("ngram_suffix", ngram_suffix, 1),
                                 ("len_diff", len_diff, 1), ("num_hypotheses", num_hypotheses, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 1):
            raise ValueError(f"budget must be None or a positive integer, got {budget!r}")
        if not isinstance(avg_score, (int, float)) or isinstance(avg_score, bool) or not math.isfinite(avg_score):
            raise ValueError(f"avg_score must be a finite number, got {avg_score!r}")
        if not isinstance(length_penalty, (int, float)) or isinstance(length_penalty, bool) \
                or not math.isfinite(length_penalty):
            raise ValueError(f"length_penalty must be a finite number, got {length_penalty!r}")
        if merge not in MERGE_MODES:
            raise ValueError(f"merge must be one of {MERGE_MODES}, got {merge!r}")
        self.beam_size = beam_size
        self.budget = budget
        self.k_best = k_best
        self.ngram_suffix = ngram_suffix
        self.len_diff = len_diff
        self.avg_score = float(avg_score)
        self.merge = merge
        self.num_hypotheses = num_hypotheses
        self.length_penalty = float(length_penalty)
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def _text(self, token: int) -> str:
        if token not in self._texts:
            self._texts[token] = self.tokenizer.decode([token]).strip().lower()
        return self._texts[token]

    def run(self, state: GenerationState):
        cfg = state.generation_config
        max_new = cfg.max_new_tokens
        if max_new is None and cfg.max_length is not None:
            max_new = cfg.max_length - state.prompt_length
        if max_new is None or max_new < 1:
            raise ValueError(f"LatticeDecoding needs a positive max_new_tokens (its budget is beam_size * "
                             f"max_new_tokens model calls), got {max_new!r}")
        for p in state.logits_processor or ():
            if lifecycle.is_stateful(p) or lifecycle.implements_lifecycle(p):
                raise ValueError(f"LatticeDecoding scores many branching prefixes; the stateful logits processor "
                                 f"{type(p).__name__} cannot follow them: use it with plain generate()")
        budget = self.budget if self.budget is not None else self.beam_size * max_new
        if budget < max_new:
            raise ValueError(f"budget must be at least max_new_tokens ({max_new}) so that the first hypothesis can "
                             f"complete, got {budget}")
        root_raw = state.next_token_logits()[0]  # one prompt forward for every row
        forwards_before = state.stats["forwards"]
        lattices, hyps, completed, calls, best = [], [], [], [], []
        for row in range(state.batch_size):
            rows = torch.tensor([row], device=state.device)
            search = _Search(self, state, row, select_cache(state.cache, rows), max_new, budget)
            search.run(root_raw[row:row + 1])
            lattice = search.lattice()
            k = lattice.k_best(self.num_hypotheses, self.length_penalty, max_length=max_new)
            lattices.append(lattice)
            hyps.append(k)
            completed.append(list(search.completed))
            calls.append(search.calls)
            if k:
                best.append(list(k[0].tokens))
            else:  # no complete path within the budget (the greedy branch was recombined): its greedy prefix
                best.append(search.first_chain)
        width = max(len(b) for b in best)
        pad = int(state.pad_token_id) if state.pad_token_id is not None else 0
        tokens = torch.full((state.batch_size, width), pad, dtype=torch.long, device=state.device)
        for row, b in enumerate(best):
            tokens[row, :len(b)] = torch.tensor(b, dtype=torch.long, device=state.device)
        state.append(tokens)
        state.stats["model_calls"] = calls
        if not state.return_dict:
            return None
        return {"lattices": lattices, "hypotheses": hyps, "completed": completed, "model_calls": calls,
                "forwards": state.stats["forwards"], "search_forwards": state.stats["forwards"] - forwards_before}
