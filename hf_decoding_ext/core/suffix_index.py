"""Exact-suffix retrieval over a token corpus (REST-style sparse retrieval) and the continuation-to-trie builder.

:class:`SuffixIndex` finds the longest suffix of a context (``max_ngram`` down to ``min_ngram`` tokens) that occurs
in a corpus of token sequences and returns the continuations that follow its occurrences; :func:`continuation_trie`
merges continuations into the most frequent prefix-closed token tree under a node budget (REST's trie of retrieved
candidates, He et al., arXiv 2311.08252); :func:`context_continuations` is the same retrieval over the sequence being
generated (prompt lookup). Used by prompt lookup decoding, as the sparse-retrieval baseline of DReSD and as the
retrieval sources of RASD.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from hf_decoding_ext.core.tree import DraftTree, best_first_paths


def continuation_trie(continuations: Iterable[Sequence[int]], max_nodes: int,
                      weights: Iterable[float] | None = None) -> DraftTree:
    """The ``max_nodes`` most frequent nodes of the trie of ``continuations`` (each a token sequence following
    the root), as a :class:`~hf_decoding_ext.core.tree.DraftTree` laid out best first.

    A node's frequency is the (weighted) number of continuations passing through it, which never rises along a
    path, so the picked set is prefix-closed (:func:`~hf_decoding_ext.core.tree.best_first_paths`). Ties: smaller
    token id first.

    Example:
        >>> tree = continuation_trie([[5, 6, 7], [5, 6, 8], [9]], max_nodes=3)
        >>> tree.tokens.tolist(), tree.parents.tolist()
        ([5, 6, 7], [-1, 0, 1])
    """
    if isinstance(max_nodes, bool) or not isinstance(max_nodes, int) or max_nodes < 0:
        raise ValueError(f"max_nodes must be an int >= 0, got {max_nodes!r}")
    counts: dict[tuple[int, ...], float] = {}
    children: dict[tuple[int, ...], set[int]] = {}
    weights = None if weights is None else list(weights)
    for i, seq in enumerate(continuations):
        w = 1.0 if weights is None else weights[i]
        path: tuple[int, ...] = ()
        for tok in (int(t) for t in seq):
            children.setdefault(path, set()).add(tok)
            path = path + (tok,)
            counts[path] = counts.get(path, 0.0) + w
    picked = best_first_paths(lambda path, _: [(t, counts[path + (t,)] - 1e-9 * t)
                                               for t in sorted(children.get(path, ()))], max_nodes)
    index = {p: i for i, p in enumerate(picked)}
    return DraftTree(torch.tensor([p[-1] for p in picked], dtype=torch.long),
                     torch.tensor([index[p[:-1]] if len(p) > 1 else -1 for p in picked], dtype=torch.long))


def context_continuations(ids, length: int, max_ngram: int = 3, min_ngram: int = 1, limit: int | None = 16,
                          order: str = "last") -> list[list[int]]:
    """Prompt-lookup retrieval over the context itself: the continuations (``length`` tokens) that followed the
    earlier occurrences of the longest trailing n-gram (``max_ngram`` down to ``min_ngram``) of the 1D token
    sequence ``ids`` that has any, most recent occurrence first (``order="first"``: earliest first), at most
    ``limit`` (``None``: all). Prompt lookup decoding drafts the first one; RASD retrieves several.

    Example:
        >>> context_continuations(torch.tensor([1, 2, 3, 1, 2, 4, 1, 2]), length=2)
        [[4, 1], [3, 1]]
    """
    if order not in ("first", "last"):
        raise ValueError(f"order must be 'first' or 'last', got {order!r}")
    ids = torch.as_tensor(ids).reshape(-1)
    n_total = ids.shape[0]
    for n in range(min(max_ngram, n_total - 1), min_ngram - 1, -1):
        windows = ids.unfold(0, n, 1)[:-1]  # the trailing n-gram itself excluded
        hits = (windows == ids[-n:]).all(dim=1).nonzero().flatten().tolist()
        out = []
        for start in (reversed(hits) if order == "last" else hits):
            cont = ids[start + n: start + n + length].tolist()
            if cont:
                out.append(cont)
            if limit is not None and len(out) >= limit:
                break
        if out:
            return out
    return []


class SuffixIndex:
    """Occurrences of every ``min_ngram..max_ngram``-gram of a corpus, for exact-suffix retrieval.

    Args:
        sequences: token sequences (continuations never cross from one sequence into the next).
        max_ngram, min_ngram: the longest and shortest suffix tried (longest first).

    Example:
        >>> index = SuffixIndex([[1, 2, 3, 4, 5], [7, 2, 3, 9]], max_ngram=3, min_ngram=2)
        >>> index.continuations([8, 2, 3], length=2)   # "2 3" occurs twice
        [[4, 5], [9]]
        >>> index.continuations([1, 2, 3], length=2)   # "1 2 3" occurs once: the longest match wins
        [[4, 5]]
    """

    def __init__(self, sequences: Iterable[Sequence[int]], max_ngram: int = 6, min_ngram: int = 2):
        if isinstance(min_ngram, bool) or not isinstance(min_ngram, int) or min_ngram < 1 or max_ngram < min_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got min_ngram={min_ngram!r}, max_ngram={max_ngram!r}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.tokens: list[int] = []
        self.ends: list[int] = []  # end (exclusive) of the sequence holding each position
        self.table: dict[tuple[int, ...], list[int]] = {}
        for seq in sequences:
            seq = [int(t) for t in seq]
            start = len(self.tokens)
            self.tokens += seq
            self.ends += [start + len(seq)] * len(seq)
            for i in range(len(seq)):
                for n in range(min_ngram, max_ngram + 1):
                    if i + n > len(seq):
                        break
                    self.table.setdefault(tuple(seq[i:i + n]), []).append(start + i + n)  # continuation start

    def __len__(self) -> int:
        return len(self.tokens)

    def continuations(self, context: Sequence[int], length: int, limit: int | None = None) -> list[list[int]]:
        """Up to ``limit`` continuations (``length`` tokens, cut at their sequence's end) of the occurrences of the
        longest suffix of ``context`` found in the corpus, in corpus order; ``[]`` when no suffix of at least
        ``min_ngram`` tokens occurs."""
        context = [int(t) for t in context]
        for n in range(min(self.max_ngram, len(context)), self.min_ngram - 1, -1):
            hits = self.table.get(tuple(context[-n:]))
            if hits:
                out = []
                for pos in hits[:limit]:
                    stop = min(pos + length, self.ends[pos - 1])
                    if stop > pos:
                        out.append(self.tokens[pos:stop])
                return out
        return []
