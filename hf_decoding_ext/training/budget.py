"""Equal training budgets: compare head kinds after they have seen the same number of supervised positions.

Head kinds batch differently (position heads count positions per batch, sequence heads whole sequences), so a fair
comparison fixes the supervised target positions, not the steps: :meth:`TrainingBudget.steps_for` turns a budget
into steps for one head from the positions its own batches carry (:meth:`DraftHeadModel.batch_positions`), and the
trainer records the positions actually seen (``config.training["positions"]``) next to ``train_seconds``.

Example:
    >>> from hf_decoding_ext.training.budget import BUDGETS
    >>> BUDGETS["comparison"].positions
    600000
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class TrainingBudget:
    """A number of supervised target positions (summed over training steps)."""

    positions: int
    label: str = ""

    def __post_init__(self):
        if self.positions < 1:
            raise ValueError(f"positions must be >= 1, got {self.positions!r}")

    def steps_for(self, head, seqs, batch_size: int, *, probe: int = 16, seed: int = 0) -> int:
        """Steps of ``batch_size`` that give ``head`` about this many positions: the mean positions of its first
        ``probe`` training batches over ``seqs`` (the training split) sets the rate."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        batches = head.train_batches(seqs, batch_size, seed=seed)
        seen = [head.batch_positions(b) for b in itertools.islice(batches, probe)]
        per_step = sum(seen) / max(1, len(seen))
        if per_step <= 0:
            raise ValueError(f"{type(head).__name__}'s batches carry no supervised positions")
        return max(1, math.ceil(self.positions / per_step))


BUDGETS: dict[str, TrainingBudget] = {
    "comparison": TrainingBudget(600_000, "about two passes over the ~270k training positions of the distillation data"),
    "small": TrainingBudget(150_000, "for heads that backpropagate through target layers (PPD, Hidden Transfer)"),
    "smoke": TrainingBudget(2_000, "seconds-long smoke runs"),
}
"""Named budgets (``hf-decoding-ext train KIND --budget NAME``); every arm of a comparison uses the same one."""


def resolve_budget(budget) -> TrainingBudget | None:
    """``None``, a :class:`TrainingBudget`, a name from :data:`BUDGETS` or a number of positions."""
    if budget is None or isinstance(budget, TrainingBudget):
        return budget
    if isinstance(budget, str) and budget in BUDGETS:
        return BUDGETS[budget]
    try:
        return TrainingBudget(int(budget), "custom")
    except (TypeError, ValueError):
        raise ValueError(f"budget must be one of {sorted(BUDGETS)} or a number of positions, got {budget!r}") from None
