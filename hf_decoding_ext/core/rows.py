"""Per-row helpers shared by logits processors: recognising a new ``generate()`` call, one value per batch row."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch

T = TypeVar("T")


def is_new_prompt(prompt: torch.Tensor | None, input_ids: torch.Tensor) -> bool:
    """Whether ``input_ids`` starts a new generation for a processor that saw ``prompt`` (its first call's
    ``input_ids``, ``(batch, length)``): no prompt yet, another batch size, a shorter sequence, or other prompt
    tokens. transformers gives processors no start-of-generation signal, so stateful processors use this and offer
    ``reset()`` for a new call whose prompt extends the previous output."""
    if prompt is None:
        return True
    b, length = prompt.shape
    if input_ids.shape[0] != b or input_ids.shape[1] < length:
        return True
    return not torch.equal(input_ids[:, :length], prompt.to(input_ids.device))


def broadcast_rows(name: str, values: Sequence[T], batch: int) -> list[T]:
    """``values`` for every row: one value is repeated, otherwise exactly one per row (else a ``ValueError``)."""
    values = list(values)
    if len(values) == 1:
        return values * batch
    if len(values) != batch:
        raise ValueError(f"{name} has {len(values)} entries for a batch of {batch} rows: give one for all rows or "
                         "one per row")
    return values
