"""Draft trees, tree attention masks and position ids (shared by every accelerator).

A draft is a token tree rooted at the last committed token: node ``i`` holds ``tokens[i]`` and its parent index
``parents[i]`` (``-1`` for a child of the root), with parents listed before children. A chain is the tree whose
``parents`` are ``[-1, 0, 1, ...]``. Verifying a tree needs one forward over the uncached committed tokens plus the
tree nodes, where each node attends to the committed prefix, its ancestors and itself (a 4D additive mask) and sits
at position ``last_committed_position + depth``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class DraftTree:
    """A token tree to verify.

    Args:
        tokens: ``(n,)`` draft token ids.
        parents: ``(n,)`` parent index of each node, ``-1`` for children of the root; ``parents[i] < i``.
        draft_probs: optional ``(n, vocab)`` distributions the drafter sampled each node's token from (the
            distribution at the node's parent). ``None`` means a deterministic draft (treated as one-hot by the
            speculative-sampling rule, which keeps it lossless).
        sibling_scheme: how the children of a node were produced, which decides the acceptance rules that stay
            lossless on the draft (each rule checks it, see
            :meth:`~hf_decoding_ext.speculative.acceptance.AcceptanceRule.check_tree`):

            - ``"deterministic"``: chosen without randomness (top-k candidates, n-gram lookups, argmax drafts);
              ``draft_probs`` must be ``None``.
            - ``"iid"``: each child sampled independently from its ``draft_probs`` row (a sampled chain is i.i.d.
              too: one sample per node). Drafters that sample one token per node or independent siblings set this.
            - ``"without_replacement"``: siblings sampled from ``draft_probs`` without replacement (distinct tokens),
              as in Recursive Speculative Decoding; ``draft_probs`` holds the distribution before any removal.

            ``None`` (default): ``"deterministic"`` without ``draft_probs``, ``"iid"`` with them. Sampled schemes
            need ``draft_probs``.

    Example:
        >>> import torch
        >>> from hf_decoding_ext.core.tree import DraftTree
        >>> tree = DraftTree(torch.tensor([5, 6, 7]), [-1, -1, 0])  # root -> 5 -> 7, root -> 6
        >>> tree.depth.tolist(), tree.paths(), tree.sibling_scheme
        ([1, 1, 2], [[1], [0, 2]], 'deterministic')
    """

    SIBLING_SCHEMES = ("deterministic", "iid", "without_replacement")

    def __init__(self, tokens: torch.Tensor, parents, draft_probs: torch.Tensor | None = None,
                 sibling_scheme: str | None = None):
        tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
        parents = torch.as_tensor(parents, dtype=torch.long).reshape(-1)
        if tokens.shape != parents.shape:
            raise ValueError(f"tokens {tuple(tokens.shape)} and parents {tuple(parents.shape)} differ in length")
        n = tokens.shape[0]
        if n and bool(((parents >= torch.arange(n)) | (parents < -1)).any()):
            raise ValueError("every parent index must be -1 or smaller than its child's index")
        if draft_probs is not None and draft_probs.shape[0] != n:
            raise ValueError("draft_probs must have one row per node")
        if sibling_scheme is None:
            sibling_scheme = "deterministic" if draft_probs is None else "iid"
        if sibling_scheme not in self.SIBLING_SCHEMES:
            raise ValueError(f"sibling_scheme must be one of {self.SIBLING_SCHEMES}, got {sibling_scheme!r}")
        if (sibling_scheme == "deterministic") != (draft_probs is None):
            raise ValueError(f"sibling_scheme={sibling_scheme!r} "
                             + ("takes no draft_probs" if draft_probs is not None else
                                "needs draft_probs (the distributions the siblings were sampled from)"))
        self.sibling_scheme = sibling_scheme
        self.tokens = tokens
        self.parents = parents
        self.draft_probs = draft_probs
        plist = parents.tolist()
        depth = []
        for p in plist:
            depth.append(1 if p < 0 else depth[p] + 1)
        self.depth = torch.tensor(depth, dtype=torch.long)
        self._children: dict[int, list[int]] = {}
        for i, p in enumerate(plist):
            self._children.setdefault(p, []).append(i)
        self._plist = plist

    @classmethod
    def chain(cls, tokens, draft_probs: torch.Tensor | None = None, sibling_scheme: str | None = None) -> DraftTree:
        tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
        return cls(tokens, torch.arange(tokens.shape[0]) - 1, draft_probs, sibling_scheme)

    @classmethod
    def empty(cls) -> DraftTree:
        return cls(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))

    @classmethod
    def from_sequences(cls, sequences) -> DraftTree:
        """Merge token sequences (drafts continuing the root) into a trie, sharing common prefixes."""
        tokens, parents, index = [], [], {}
        for seq in sequences:
            parent = -1
            for tok in (int(t) for t in seq):
                key = (parent, tok)
                if key not in index:
                    index[key] = len(tokens)
                    tokens.append(tok)
                    parents.append(parent)
                parent = index[key]
        return cls(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long))

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def children(self, node: int) -> list[int]:
        """Children of ``node`` (``-1`` = root), in index order."""
        return self._children.get(node, [])

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root's first child down to ``node``."""
        path = []
        while node >= 0:
            path.append(node)
            node = self._plist[node]
        return path[::-1]

    def paths(self) -> list[list[int]]:
        """Root-to-leaf node paths."""
        return [self.path_to(i) for i in range(len(self)) if not self.children(i)]

    def ancestor_mask(self) -> torch.Tensor:
        """``(n, n)`` bool: ``[i, j]`` is true when ``j`` is ``i`` or an ancestor of ``i``."""
        n = len(self)
        allowed = torch.eye(n, dtype=torch.bool)
        for i, p in enumerate(self._plist):
            if p >= 0:
                allowed[i] |= allowed[p]
        return allowed

    def truncate(self, max_nodes: int) -> DraftTree:
        """The first ``max_nodes`` nodes (still a valid tree since parents precede children)."""
        if max_nodes >= len(self):
            return self
        probs = None if self.draft_probs is None else self.draft_probs[:max_nodes]
        return DraftTree(self.tokens[:max_nodes], self.parents[:max_nodes], probs, self.sibling_scheme)


@dataclass
class VerifyBlock:
    """Tokens fed in one verification forward after the committed prefix.

    ``allowed[i, j]``: node ``i`` may attend to block node ``j``; ``depth[i]``: position offset after the last
    committed token. The draft tree's nodes come first; drafters may append side nodes (e.g. Lookahead Decoding's
    Jacobi window) that are verified in the same forward but never accepted.
    """

    tokens: torch.Tensor
    allowed: torch.Tensor
    depth: torch.Tensor

    @classmethod
    def from_tree(cls, tree: DraftTree) -> VerifyBlock:
        return cls(tree.tokens, tree.ancestor_mask(), tree.depth)

    def extend(self, tokens: torch.Tensor, allowed: torch.Tensor, depth: torch.Tensor) -> VerifyBlock:
        """Append side nodes that attend only among themselves (and to the committed prefix)."""
        n, m = self.tokens.shape[0], tokens.shape[0]
        full = torch.zeros(n + m, n + m, dtype=torch.bool)
        full[:n, :n] = self.allowed
        full[n:, n:] = allowed
        return VerifyBlock(torch.cat([self.tokens, tokens.long()]), full, torch.cat([self.depth, depth.long()]))


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The 4D additive attention mask ``(batch, 1, query, key)`` of a boolean ``allowed`` pattern.

    ``allowed`` is ``(query, key)`` (one sequence) or ``(batch, query, key)``; allowed entries become 0 and the rest
    the dtype's most negative value, the form transformers accepts as a custom 4D ``attention_mask`` (tree
    attention, trie exploration, draft heads).

    Example:
        >>> import torch
        >>> additive_mask(torch.tensor([[True, False], [True, True]])).shape
        torch.Size([1, 1, 2, 2])
    """
    if allowed.dim() == 2:
        allowed = allowed[None]
    mask = torch.zeros(allowed.shape[0], 1, *allowed.shape[1:], dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)


def build_verify_inputs(committed: torch.Tensor, committed_mask: torch.Tensor, cache_length: int, block: VerifyBlock,
                        dtype: torch.dtype = torch.float32):
    """Inputs of one verification forward for a single sequence.

    Args:
        committed: ``(1, s)`` committed tokens not yet in the cache (usually the last accepted token).
        committed_mask: ``(1, cache_length + s)`` 2D padding mask of the committed sequence.
        cache_length: number of cached positions.
        block: tree (and side) nodes.
        dtype: dtype of the additive mask (the model's dtype).

    Returns:
        ``input_ids (1, s + n)``, additive ``attention_mask (1, 1, s + n, cache_length + s + n)`` and
        ``position_ids (1, s + n)``.
    """
    device = committed.device
    s, n = committed.shape[1], block.tokens.shape[0]
    total = cache_length + s + n
    allowed = torch.zeros(s + n, total, dtype=torch.bool, device=device)
    valid = committed_mask[0].bool()
    # committed rows: causal over the committed prefix
    causal = torch.tril(torch.ones(s, cache_length + s, dtype=torch.bool, device=device), diagonal=cache_length)
    allowed[:s, : cache_length + s] = causal & valid[None, :]
    # block rows: the whole committed prefix, then the block pattern
    allowed[s:, : cache_length + s] = valid[None, :]
    allowed[s:, cache_length + s:] = block.allowed.to(device)
    mask = additive_mask(allowed, dtype)
    positions_committed = (committed_mask.long().cumsum(-1) - 1).clamp(min=0)[:, cache_length:]
    last = positions_committed[0, -1] if s else (committed_mask.long().sum() - 1)
    positions = torch.cat([positions_committed[0], last + block.depth.to(device)])[None]
    input_ids = torch.cat([committed[0], block.tokens.to(device)])[None]
    return input_ids, mask, positions


# ---------------------------------------------------------------------------------------------- choice trees
def normalize_choices(choices) -> list[tuple[int, ...]]:
    """Validate a tree given as candidate-rank paths (Medusa's ``medusa_choices``) and sort it so that parents come
    before children: ``[(0,), (1,), (0, 0)]`` = the top-2 candidates at depth 1 and the top candidate after the first.
    Every prefix of a path must itself be a path of the tree."""
    out = sorted({tuple(int(i) for i in c) for c in choices}, key=lambda c: (len(c), c))
    present = set(out)
    for c in out:
        if not c or min(c) < 0:
            raise ValueError(f"tree choices must be non-empty paths of ranks >= 0, got {c}")
        if len(c) > 1 and c[:-1] not in present:
            raise ValueError(f"tree choice {c} lacks its parent {c[:-1]}")
    return out


def best_first_paths(expand, budget: int, max_depth: int | None = None, root_score: float = 1.0) -> list[tuple]:
    """A budgeted best-first tree from any score: repeatedly add the highest-scored frontier node until ``budget``
    nodes are picked (or no node is left).

    The frontier starts as the root's children; picking a node adds its children (unless it sits at ``max_depth``).
    The result is prefix-closed by construction (a node enters the frontier only once its parent is picked). When a
    child never scores above its parent (path-product probabilities, summed log-probabilities), the picked nodes are
    exactly the ``budget`` highest-scored nodes of the whole tree, which is also the prefix-closed subtree of that
    size with the largest total score (Medusa's sparse tree, EAGLE-2's expansion). Ties go to the lexicographically
    smaller path.

    Args:
        expand: ``expand(path, score)`` returns ``(label, child_score)`` pairs for the children of the node ``path``
            (a tuple of labels from the root, ``()`` for the root) whose score is ``score``. Labels are orderable
            (candidate ranks or token ids) and distinct among siblings; the child's score is its full score (e.g.
            ``score * accuracy`` or ``score + log_prob``).
        budget: number of nodes to pick (``>= 0``).
        max_depth: nodes at this depth are not expanded (``None``: no limit).
        root_score: the score handed to ``expand`` for the root (1 for products, 0 for sums of log-probabilities).

    Returns:
        The picked paths in pick order (non-increasing score for scores that never rise along a path).

    Example:
        >>> acc = {(): [0.6, 0.2], (0,): [0.5, 0.1]}
        >>> best_first_paths(lambda path, s: [(i, s * a) for i, a in enumerate(acc.get(path, []))], budget=3)
        [(0,), (0, 0), (1,)]
    """
    import heapq
    import math

    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise ValueError(f"budget must be an int >= 0, got {budget!r}")
    if max_depth is not None and (isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < 1):
        raise ValueError(f"max_depth must be None or an int >= 1, got {max_depth!r}")
    heap: list = []

    def push(path: tuple, score: float) -> None:
        labels = set()
        for label, child in expand(path, score):
            child = float(child)
            if math.isnan(child):
                raise ValueError(f"score of node {path + (label,)} is NaN")
            if label in labels:
                raise ValueError(f"node {path} has two children labelled {label!r}")
            labels.add(label)
            heapq.heappush(heap, (-child, path + (label,)))

    picked: list[tuple] = []
    if budget:
        push((), root_score)
    while heap and len(picked) < budget:
        neg, path = heapq.heappop(heap)
        picked.append(path)
        if max_depth is None or len(path) < max_depth:
            push(path, -neg)
    return picked


def fuse_trees(trees, values, max_nodes: int | None) -> tuple[DraftTree, list[list[int]]]:
    """Fuse deterministic draft trees into one trie by longest-prefix matching and keep the ``max_nodes`` best nodes.

    Every path of every tree is inserted into one trie rooted at the shared root, so a node whose path from the
    root already exists (in an earlier tree) is matched instead of duplicated (RASD's tree fusion). A fused node's
    value is the largest value any tree gives it; with values that never rise along a path (path probabilities,
    products of accuracies, branch frequencies) the fused values do not either, and the kept set, the ``max_nodes``
    highest-valued nodes picked best first (:func:`best_first_paths`), is prefix-closed.

    Args:
        trees: :class:`DraftTree` instances without ``draft_probs``.
        values: one sequence of per-node values per tree.
        max_nodes: node budget of the fused tree (``None``: keep every node).

    Returns:
        The fused tree (laid out best first) and, per input tree, the fused index of each of its nodes (``-1``
        where the node was cut).

    Example:
        >>> a = DraftTree(torch.tensor([5, 6, 7]), [-1, 0, -1])         # 5 -> 6, and 7
        >>> b = DraftTree.chain(torch.tensor([5, 6, 9]))                # 5 -> 6 -> 9
        >>> fused, maps = fuse_trees([a, b], [[0.6, 0.3, 0.2], [0.5, 0.5, 0.4]], max_nodes=4)
        >>> fused.tokens.tolist(), fused.parents.tolist(), maps
        ([5, 6, 9, 7], [-1, 0, 1, -1], [[0, 1, 3], [0, 1, 2]])
    """
    trees, values = list(trees), [list(map(float, v)) for v in values]
    if len(trees) != len(values) or any(len(t) != len(v) for t, v in zip(trees, values)):
        raise ValueError("fuse_trees needs one value per node of every tree")
    if any(t.draft_probs is not None for t in trees):
        raise ValueError("fuse_trees fuses deterministic trees only (no draft_probs)")
    value: dict[tuple[int, ...], float] = {}
    children: dict[tuple[int, ...], set[int]] = {}
    node_paths: list[list[tuple[int, ...]]] = []
    for tree, vals in zip(trees, values):
        paths: list[tuple[int, ...]] = []
        for i in range(len(tree)):
            p = int(tree.parents[i])
            path = (paths[p] if p >= 0 else ()) + (int(tree.tokens[i]),)
            paths.append(path)
            children.setdefault(path[:-1], set()).add(path[-1])
            value[path] = max(value.get(path, float("-inf")), vals[i])
        node_paths.append(paths)
    budget = len(value) if max_nodes is None else min(int(max_nodes), len(value))
    picked = best_first_paths(lambda path, _: [(t, value[path + (t,)]) for t in sorted(children.get(path, ()))],
                              budget)
    index = {p: i for i, p in enumerate(picked)}
    fused = DraftTree(torch.tensor([p[-1] for p in picked], dtype=torch.long),
                      torch.tensor([index[p[:-1]] if len(p) > 1 else -1 for p in picked], dtype=torch.long))
    return fused, [[index.get(p, -1) for p in paths] for paths in node_paths]


def choices_from_accuracies(accuracies, num_nodes: int, max_depth: int | None = None) -> list[tuple[int, ...]]:
    """The ``num_nodes`` tree paths with the highest expected acceptance, from measured per-depth accuracies.

    ``accuracies[d][i]`` is the probability that the rank-``i`` candidate at depth ``d + 1`` is accepted given an
    accepted prefix; a path's value is the product of its ranks' accuracies (the probability the whole path is
    accepted), and the expected number of accepted tokens of a tree is the sum of its paths' values. The greedy pick
    of the best paths (Medusa's sparse-tree construction) is :func:`best_first_paths` with that product as the score;
    it keeps the tree prefix-closed because extending a path never raises its value.

    Example:
        >>> choices_from_accuracies([[0.6, 0.2], [0.5, 0.1]], num_nodes=3)
        [(0,), (1,), (0, 0)]
    """
    depth = len(accuracies) if max_depth is None else min(max_depth, len(accuracies))
    if num_nodes < 1 or depth < 1:
        raise ValueError(f"num_nodes and the number of depths must be >= 1, got {num_nodes} and {depth}")

    def expand(path, score):
        return [(i, score * float(a)) for i, a in enumerate(accuracies[len(path)])]

    return normalize_choices(best_first_paths(expand, num_nodes, max_depth=depth))


def build_choice_tree(choices, topk_fn, on_level=None) -> DraftTree:
    """Fill a tree of rank paths depth by depth.

    ``topk_fn(depth, parents, k)`` returns ``(len(parents), k)`` ranked candidate token ids for the children of the
    given node indices (``-1`` = the root) at ``depth`` (1-based); it is called once per depth with every parent of
    that depth, so conditioned heads (Hydra, EAGLE) batch their forward. Node ``i`` of the result is
    ``choices[i]`` (sorted by :func:`normalize_choices`).
    """
    choices = normalize_choices(choices)
    index: dict[tuple[int, ...], int] = {}
    tokens: list[int] = []
    parents: list[int] = []
    start = 0
    while start < len(choices):
        depth = len(choices[start])
        end = start
        while end < len(choices) and len(choices[end]) == depth:
            end += 1
        level = choices[start:end]
        parent_keys = list(dict.fromkeys(c[:-1] for c in level))
        parent_nodes = [index[p] if p else -1 for p in parent_keys]
        k = max(c[-1] for c in level) + 1
        cand = topk_fn(depth, parent_nodes, k)
        row = {p: r for r, p in enumerate(parent_keys)}
        first = len(tokens)
        for c in level:
            index[c] = len(tokens)
            tokens.append(int(cand[row[c[:-1]], c[-1]]))
            parents.append(index[c[:-1]] if c[:-1] else -1)
        if on_level is not None:
            on_level(depth, list(range(first, len(tokens))), parents[first:], tokens[first:])
        start = end
    return DraftTree(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long))
