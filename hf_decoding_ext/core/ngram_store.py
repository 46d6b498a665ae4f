"""An online n-gram store of next-token distributions, truncated to their top-k, with longest-context lookup.

Shared by the model-free drafters that keep statistics of the target's own outputs: STAND's logit-based n-gram
module (the sampled distributions, merged by running average) and ADED's adaptive tri-gram table (one-hot updates
with the emitted tokens, whose running average is the empirical next-token frequency).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class TopKNGramStore:
    """Next-token distributions keyed by the preceding ``1..order`` tokens.

    Each context keeps at most ``k`` ``(token, probability)`` entries and the number of updates merged into it. An
    update with a distribution ``d`` (top-``k`` ids and their probabilities) replaces the stored ``s`` by the
    running average ``(n * s + d) / (n + 1)`` over the union of their tokens (a token missing from one side counts
    as 0), truncated to the ``k`` most probable (STAND's merge: "weighted average, truncated to the top 10").
    :meth:`lookup` returns the entry of the longest stored context that ends the given tokens (back-off from
    ``order`` tokens to 1).

    Args:
        order: longest context, in tokens (``>= 1``).
        k: entries kept per context (``>= 1``).
        min_order: shortest context used by :meth:`lookup` and updated by :meth:`update` (``1..order``).

    Example:
        >>> store = TopKNGramStore(order=2, k=2)
        >>> store.update([5, 6], [7, 8], [0.75, 0.25])    # after "5 6": 7 (0.75) or 8 (0.25)
        >>> store.update([9, 6], [8], [1.0])                # after "9 6": 8
        >>> store.lookup([5, 6])                            # the 2-token context "5 6"
        ([7, 8], [0.75, 0.25])
        >>> store.lookup([1, 6])                            # backs off to "6": the average of both updates
        ([8, 7], [0.625, 0.375])
    """

    def __init__(self, order: int = 4, k: int = 10, min_order: int = 1):
        for name, value in (("order", order), ("k", k), ("min_order", min_order)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if min_order > order:
            raise ValueError(f"min_order must be <= order, got min_order={min_order}, order={order}")
        self.order, self.k, self.min_order = order, k, min_order
        self.table: dict[tuple[int, ...], tuple[dict[int, float], int]] = {}

    def __len__(self) -> int:
        return len(self.table)

    def clear(self) -> None:
        self.table.clear()

    def _merge(self, key: tuple[int, ...], new: dict[int, float]) -> None:
        old = self.table.get(key)
        if old is None:
            merged, n = new, 0
        else:
            entries, n = old
            merged = {t: (n * entries.get(t, 0.0) + new.get(t, 0.0)) / (n + 1) for t in entries.keys() | new.keys()}
        if len(merged) > self.k:
            merged = dict(sorted(merged.items(), key=lambda kv: (-kv[1], kv[0]))[: self.k])
        self.table[key] = (merged, n + 1)

    def update(self, context: Sequence[int], tokens: Sequence[int], probs: Sequence[float]) -> None:
        """Merge the distribution ``{tokens[i]: probs[i]}`` (at most ``k`` entries are kept) into every stored
        context that ends ``context`` (its last ``min_order..order`` tokens)."""
        context = [int(t) for t in context]
        new: dict[int, float] = {}
        for t, p in zip(tokens, probs):
            new[int(t)] = new.get(int(t), 0.0) + float(p)
        if len(new) > self.k:
            new = dict(sorted(new.items(), key=lambda kv: (-kv[1], kv[0]))[: self.k])
        for n in range(self.min_order, min(self.order, len(context)) + 1):
            self._merge(tuple(context[-n:]), new)

    def update_from_probs(self, context: Sequence[int], probs: torch.Tensor) -> None:
        """:meth:`update` with the top-``k`` of a full distribution ``probs`` ``(vocab,)``."""
        top = probs.float().topk(min(self.k, probs.shape[-1]))
        self.update(context, top.indices.tolist(), top.values.tolist())

    def lookup(self, context: Sequence[int]) -> tuple[list[int], list[float]] | None:
        """``(tokens, probabilities)`` of the longest stored context ending ``context``, most probable first
        (ties: smaller id first); ``None`` when no context of ``min_order..order`` tokens is stored."""
        context = [int(t) for t in context]
        for n in range(min(self.order, len(context)), self.min_order - 1, -1):
            hit = self.table.get(tuple(context[-n:]))
            if hit is not None:
                items = sorted(hit[0].items(), key=lambda kv: (-kv[1], kv[0]))
                return [t for t, _ in items], [p for _, p in items]
        return None

    def count(self, context: Sequence[int]) -> int:
        """Number of updates merged into exactly this context (0 if absent)."""
        hit = self.table.get(tuple(int(t) for t in context))
        return 0 if hit is None else hit[1]
