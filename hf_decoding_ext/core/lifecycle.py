"""An explicit lifecycle for logits processors that keep per-row state across calls.

transformers calls a logits processor as ``processor(input_ids, scores)`` once per step on the same rows, so a
processor that keeps state between calls (a second view's KV cache, Mirostat's ``mu``, a hidden state captured from
the model's forward) can infer everything from the calls. This library's loops and engine call processors in other
ways: on branches of some rows (lookahead rollouts, trials), on reordered rows (Superposed Decoding), on the nodes of
a draft tree whose tokens are mostly rejected, or on a forward that covers many positions at once. A processor that
implements :class:`StatefulLogitsProcessor` is told what happens:

* :meth:`~StatefulLogitsProcessor.begin` ``(input_ids)``: a new generation starts on these prompts;
* :meth:`~StatefulLogitsProcessor.select_rows` ``(indices)``: the rows become these rows of the current ones (rows
  may repeat, e.g. ``k`` trials per row; in the new order), in place;
* :meth:`~StatefulLogitsProcessor.fork` ``(indices=None)``: an independent copy (of the rows ``indices``) for a
  branch: what the copy sees never reaches the original, so drafted or trial tokens never enter its state;
* :meth:`~StatefulLogitsProcessor.adopt` ``(other)``: take over the state of a fork (the branch, or the draft path,
  that was accepted);
* :meth:`~StatefulLogitsProcessor.locate` ``(rows=None, positions=None)``: the next call's scores come from these
  rows / positions of the model's latest forward (only processors that read the model's forward care);
* :meth:`~StatefulLogitsProcessor.reset`: forget everything.

The functions of this module drive a whole ``LogitsProcessorList`` (transformers' own processors are stateless and
are shared by forks). A processor that declares ``stateful = True`` without implementing the lifecycle is refused
with a ``ValueError`` by the loops that would corrupt it (:func:`require_lifecycle`).
"""

from __future__ import annotations

import abc
import copy
from collections.abc import Iterable

import torch
from transformers import LogitsProcessorList


class StatefulLogitsProcessor(abc.ABC):
    r"""Mixin for logits processors with per-row state that this library's loops and engine keep exact.

    Subclasses implement :meth:`reset` and :meth:`select_rows` and list the attributes holding their per-call state
    in ``state_attributes`` (copied by :meth:`fork`, taken over by :meth:`adopt`); they may override :meth:`locate`
    when they read the model's forward. A subclass whose state is recomputed from the ``input_ids`` of each call (it
    re-synchronises to any prefix of the same rows, e.g. by cropping a cache to the common prefix) sets
    ``tracks_prefix = True``: a fork of the same rows is then the processor itself (no copy), which is what the
    speculative engine calls on tree paths.

    Attributes:
        stateful: ``True``; the marker :func:`is_stateful` reads.
        tracks_prefix: whether the state follows the tokens of each call for unchanged rows.
        state_attributes: names of the attributes that hold the per-generation state.

    Example:

    ```python
    >>> import torch
    >>> from transformers import LogitsProcessor, LogitsProcessorList
    >>> from hf_decoding_ext.core.lifecycle import StatefulLogitsProcessor, fork, select_rows
    >>> class CountCalls(StatefulLogitsProcessor, LogitsProcessor):  # per-row call counter, subtracted from scores
    ...     state_attributes = ("calls",)
    ...     def __init__(self):
    ...         self.reset()
    ...     def reset(self):
    ...         self.calls = None
    ...     def select_rows(self, indices):
    ...         self.calls = None if self.calls is None else self.calls[indices]
    ...     def __call__(self, input_ids, scores):
    ...         self.calls = torch.zeros(scores.shape[0]) if self.calls is None else self.calls + 1
    ...         return scores - self.calls[:, None]
    >>> procs = LogitsProcessorList([CountCalls()])
    >>> _ = procs(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 5))
    >>> trials = fork(procs, torch.tensor([0, 0, 1, 1]))  # two trials per row, on a copy
    >>> _ = trials(torch.zeros(4, 4, dtype=torch.long), torch.zeros(4, 5))
    >>> trials[0].calls.tolist(), procs[0].calls.tolist()  # the original is untouched
    ([1.0, 1.0, 1.0, 1.0], [0.0, 0.0])

    ```
    """

    stateful: bool = True
    tracks_prefix: bool = False
    state_attributes: tuple[str, ...] = ()

    def begin(self, input_ids: torch.LongTensor) -> None:
        """A new generation starts on the prompts ``input_ids`` ``(batch, len)``; the default forgets everything."""
        self.reset()

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget all per-generation state."""

    @abc.abstractmethod
    def select_rows(self, indices: torch.LongTensor) -> None:
        """Keep the rows ``indices`` (``(n,)`` long, rows may repeat) of the per-row state, in that order."""

    def locate(self, rows: torch.LongTensor | None = None, positions: torch.LongTensor | None = None) -> None:
        """The next call's scores come from rows ``rows`` and positions ``positions`` (``(batch,)`` each, indices
        into the batch and sequence dimensions of the model's latest forward; ``None``: every row / the last
        position). Only processors that read the model's forward use it; the default ignores it."""

    def fork(self, indices: torch.LongTensor | None = None):
        """An independent copy whose state is that of the rows ``indices`` (``None``: every row, in order)."""
        if indices is None and self.tracks_prefix:
            return self
        new = copy.copy(self)
        for name in self.state_attributes:
            setattr(new, name, self.copy_state(getattr(self, name)))
        if indices is not None:
            new.select_rows(torch.as_tensor(indices, dtype=torch.long))
        return new

    def copy_state(self, value):
        """Copy of one state attribute for a fork (default: a deep copy; a subclass that never modifies its
        state tensors in place may return them as they are)."""
        return copy.deepcopy(value)

    def adopt(self, other) -> None:
        """Take over the state of ``other`` (a fork of this processor), e.g. the fork of the accepted branch."""
        if other is self:
            return
        if type(other) is not type(self):
            raise ValueError(f"{type(self).__name__} cannot adopt the state of a {type(other).__name__}")
        for name in self.state_attributes:
            setattr(self, name, getattr(other, name))


def implements_lifecycle(processor) -> bool:
    """Whether ``processor`` implements :class:`StatefulLogitsProcessor`."""
    return isinstance(processor, StatefulLogitsProcessor)


def is_stateful(processor) -> bool:
    """Whether ``processor`` keeps per-row state across calls (it declares ``stateful = True``)."""
    return bool(getattr(processor, "stateful", False))


def _members(processors) -> list:
    return [] if processors is None else list(processors)


def require_lifecycle(processors: Iterable | None, caller: str) -> None:
    """Refuse (``ValueError``) a stateful processor that does not implement :class:`StatefulLogitsProcessor`:
    ``caller`` (a loop that branches, reorders or rolls back rows) would corrupt its state."""
    for p in _members(processors):
        if is_stateful(p) and not implements_lifecycle(p):
            raise ValueError(
                f"{caller} calls logits processors on branched, reordered or rejected rows, and "
                f"{type(p).__name__} declares per-row state (stateful = True) without the lifecycle of "
                "hf_decoding_ext.core.lifecycle.StatefulLogitsProcessor (begin, select_rows, fork, adopt, reset); "
                "implement it, or use this processor with plain generate()"
            )


def has_stateful(processors: Iterable | None) -> bool:
    """Whether any processor of the list implements the lifecycle."""
    return any(implements_lifecycle(p) for p in _members(processors))


def begin(processors: Iterable | None, input_ids: torch.LongTensor) -> None:
    """Tell every lifecycle processor of the list that a generation starts on ``input_ids``."""
    for p in _members(processors):
        if implements_lifecycle(p):
            p.begin(input_ids)


def select_rows(processors: Iterable | None, indices: torch.LongTensor, caller: str = "this loop") -> None:
    """Select rows ``indices`` of every lifecycle processor of the list, in place (refuses stateful processors
    without the lifecycle)."""
    require_lifecycle(processors, caller)
    indices = torch.as_tensor(indices, dtype=torch.long)
    for p in _members(processors):
        if implements_lifecycle(p):
            p.select_rows(indices)


def fork(processors: Iterable | None, indices: torch.LongTensor | None = None,
         caller: str = "this loop") -> LogitsProcessorList:
    """A ``LogitsProcessorList`` in which each lifecycle processor is replaced by its :meth:`fork
    <StatefulLogitsProcessor.fork>` on the rows ``indices`` (stateless processors are shared)."""
    require_lifecycle(processors, caller)
    if indices is not None:
        indices = torch.as_tensor(indices, dtype=torch.long)
    return LogitsProcessorList([p.fork(indices) if implements_lifecycle(p) else p for p in _members(processors)])


def adopt(processors: Iterable | None, forked: Iterable) -> None:
    """Every lifecycle processor of ``processors`` takes over the state of its counterpart in ``forked`` (a list
    returned by :func:`fork` of ``processors``)."""
    mine, theirs = _members(processors), _members(forked)
    if len(mine) != len(theirs):
        raise ValueError(f"cannot adopt a fork of {len(theirs)} processors into a list of {len(mine)}")
    for p, q in zip(mine, theirs):
        if implements_lifecycle(p):
            p.adopt(q)


def locate(processors: Iterable | None, rows: torch.LongTensor | None = None,
           positions: torch.LongTensor | None = None) -> None:
    """Tell every lifecycle processor where in the model's latest forward the next call's scores come from."""
    for p in _members(processors):
        if implements_lifecycle(p):
            p.locate(rows, positions)
