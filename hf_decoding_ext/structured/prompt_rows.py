"""Which prompt each batch row continues: the only state the structured logits processors keep across calls.

The structured processors (grammar / JSON schema, extractive spans, monitor-guided decoding) compute a row's mask
from the row's tokens after the prompt and, for some, from a per-prompt argument (a context, a code prefix). What
they must remember between calls is therefore the prompt (its tokens, hence its length) and, for every current row,
the prompt row it descends from. transformers gives processors no start-of-generation signal, so a processor used
with plain ``generate()`` takes a call on another batch size, or on rows that do not extend the prompt, for a new
generation. This library's loops change the rows on purpose (lookahead branches and trials run on ``k`` copies of a
row, Superposed Decoding turns one prompt row into ``k`` drafts and reorders them, beam search reorders beams): there
that guess restarts the processor on the current tokens, which drops everything generated so far from its state.

:class:`PromptTrackingProcessor` keeps the prompt and the rows' origins, and implements the lifecycle of
:mod:`hf_decoding_ext.core.lifecycle` so that the loops tell it how rows change instead (``begin``, ``select_rows``,
``fork``, ``adopt``). Everything else a subclass computes is a function of each call's ``input_ids`` (or is
re-synchronised to them, like the grammar matchers), so a fork of the same rows is the processor itself
(``tracks_prefix``): the speculative engine may call it on any tree node, accepted or not.
"""

from __future__ import annotations

import torch

from hf_decoding_ext.core.lifecycle import StatefulLogitsProcessor
from hf_decoding_ext.core.rows import is_new_prompt


class PromptTrackingProcessor(StatefulLogitsProcessor):
    r"""Mixin for logits processors whose mask is a function of each row's generated tokens and of the prompt row it
    continues.

    State: ``_prompt`` (the ``(batch, length)`` prompt of the current rows) and ``_origin`` (``(batch,)`` long: the
    row of the first call, or of :meth:`begin`, that each current row descends from). Both are replaced, never
    modified in place, so forks share them. Subclasses extend :meth:`reset`, :meth:`_start` (per-prompt-row setup)
    and :meth:`select_rows`, and list their own per-row attributes in ``state_attributes``.

    Example:

    ```python
    >>> import torch
    >>> from transformers import LogitsProcessor
    >>> from hf_decoding_ext.structured.prompt_rows import PromptTrackingProcessor
    >>> class LastTokenBan(PromptTrackingProcessor, LogitsProcessor):  # bans the token generated last, if any
    ...     def __init__(self):
    ...         self.reset()
    ...     def __call__(self, input_ids, scores):
    ...         generated = self.generated(input_ids)
    ...         for r, g in enumerate(generated):
    ...             if g:
    ...                 scores[r, g[-1]] = float("-inf")
    ...         return scores
    >>> ban = LastTokenBan()
    >>> ban.begin(torch.tensor([[7, 8]]))
    >>> ban.select_rows(torch.tensor([0, 0, 0]))  # three trials of the row: still the same prompt
    >>> out = ban(torch.tensor([[7, 8, 1], [7, 8, 2], [7, 8, 3]]), torch.zeros(3, 5))
    >>> (out == float("-inf")).nonzero().tolist(), ban.prompt_length, ban.origin(2)
    ([[0, 1], [1, 2], [2, 3]], 2, 0)

    ```
    """

    tracks_prefix = True
    state_attributes: tuple[str, ...] = ("_prompt", "_origin")

    def reset(self) -> None:
        """Forget the prompt: the next call (or :meth:`begin`) starts a new generation."""
        self._prompt: torch.Tensor | None = None
        self._origin: torch.Tensor | None = None

    def begin(self, input_ids: torch.LongTensor) -> None:
        """A generation starts on ``input_ids`` ``(batch, length)`` (called by this library's loops)."""
        self.reset()
        self._start(input_ids)

    def _start(self, input_ids: torch.LongTensor) -> None:
        """Record ``input_ids`` as the prompt; subclasses add their per-prompt-row setup."""
        self._prompt = input_ids.detach().clone()
        self._origin = torch.arange(input_ids.shape[0])

    def generated(self, input_ids: torch.LongTensor) -> list[list[int]]:
        """Each row's tokens after the prompt. Starts a new generation first when ``input_ids`` does not continue
        the prompt (another batch size, other prompt tokens): the plain ``generate()`` case, where nothing tells
        the processor that a generation starts."""
        if is_new_prompt(self._prompt, input_ids):
            self.reset()
            self._start(input_ids)
        return input_ids[:, self._prompt.shape[1]:].tolist()

    @property
    def prompt_length(self) -> int:
        """Length of the prompt (0 before the first call)."""
        return 0 if self._prompt is None else int(self._prompt.shape[1])

    def origin(self, row: int) -> int:
        """The row of the prompt that current ``row`` continues."""
        return int(self._origin[row])

    def select_rows(self, indices: torch.LongTensor) -> None:
        """The rows become the rows ``indices`` of the current ones (they keep their prompts and origins)."""
        if self._prompt is None:
            return
        indices = torch.as_tensor(indices, dtype=torch.long).cpu()
        self._prompt = self._prompt[indices.to(self._prompt.device)]
        self._origin = self._origin[indices]

    def copy_state(self, value):
        """The state attributes are replaced, never modified in place: a fork may share them."""
        return value


__all__ = ["PromptTrackingProcessor"]
