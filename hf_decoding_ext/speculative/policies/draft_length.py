"""Draft-length policies: how many tokens a chain drafter proposes next, from how its past drafts fared.

These are transformers' assisted-generation schedules (``GenerationConfig.num_assistant_tokens_schedule``, see
``AssistedCandidateGenerator.update_candidate_strategy``; the assisted-generation blog post of Joao Gante, 2023),
written as small classes with one interface:

- :meth:`DraftLengthPolicy.begin` at the start of every ``generate()`` call,
- :meth:`DraftLengthPolicy.length` before each draft (the maximum draft length),
- :meth:`DraftLengthPolicy.update` after each verification with the number of drafted and accepted tokens,
- :meth:`DraftLengthPolicy.stop` inside a draft: stop once the drafter's probability of its own token falls below
  ``confidence_threshold`` (transformers' ``assistant_confidence_threshold``, a fixed threshold here; transformers
  re-fits it online when scikit-learn is installed).

:data:`SCHEDULES` maps transformers' schedule names to the classes; :func:`draft_length_policy` builds one by name.

Example:
    >>> from hf_decoding_ext.speculative.policies.draft_length import draft_length_policy
    >>> policy = draft_length_policy("heuristic", num_tokens=5)
    >>> policy.begin(); policy.length()
    5
    >>> policy.update(num_drafted=5, num_accepted=5); policy.length()  # fully accepted: +2
    7
    >>> policy.update(num_drafted=7, num_accepted=2); policy.length()  # a rejection: -1
    6
"""

from __future__ import annotations

import abc
import functools

__all__ = ["SCHEDULES", "ConstantLength", "DraftLengthPolicy", "HeuristicLength", "draft_length_policy"]


class DraftLengthPolicy(abc.ABC):
    """Base class of draft-length policies.

    Args:
        num_tokens: the draft length at the start (``>= 1``).
        confidence_threshold: stop a draft once the drafter's probability of its own token is below it (in
            ``[0, 1)``; 0 never stops early).
    """

    name: str = ""

    def __init__(self, num_tokens: int, confidence_threshold: float = 0.0):
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"num_tokens must be an int >= 1, got {num_tokens!r}")
        if not 0 <= confidence_threshold < 1:
            raise ValueError(f"confidence_threshold must be in [0, 1), got {confidence_threshold!r}")
        self.num_tokens = num_tokens
        self.confidence_threshold = float(confidence_threshold)
        self._length = num_tokens

    def begin(self) -> None:
        """Start of a ``generate()`` call."""

    def length(self) -> int:
        """Maximum length of the next draft (``>= 1``)."""
        return self._length

    def update(self, num_drafted: int, num_accepted: int) -> None:
        """Record one verified draft: ``num_drafted`` tokens proposed, the first ``num_accepted`` accepted."""
        if num_drafted < 0 or not 0 <= num_accepted <= num_drafted:
            raise ValueError(f"need 0 <= num_accepted <= num_drafted, got num_drafted={num_drafted!r}, "
                             f"num_accepted={num_accepted!r}")
        self._update(num_drafted, num_accepted)

    def _update(self, num_drafted: int, num_accepted: int) -> None:
        pass

    def stop(self, probability: float) -> bool:
        """Whether to end the draft after a token the drafter gave ``probability``."""
        return probability < self.confidence_threshold

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_tokens={self.num_tokens}, "
                f"confidence_threshold={self.confidence_threshold}, length={self._length})")


class ConstantLength(DraftLengthPolicy):
    """Every draft has at most ``num_tokens`` tokens (transformers' ``"constant"`` schedule).

    Example:
        >>> policy = ConstantLength(4)
        >>> policy.update(4, 4); policy.length()
        4
    """

    name = "constant"


class HeuristicLength(DraftLengthPolicy):
    """Transformers' ``"heuristic"`` schedule: the draft length grows by 2 after a fully accepted draft (an empty
    draft counts as fully accepted, as in transformers) and shrinks by 1 otherwise, never below 1.

    Args:
        num_tokens: the starting length.
        confidence_threshold: see :class:`DraftLengthPolicy`.
        transient: restart from ``num_tokens`` at every :meth:`begin` (``"heuristic_transient"``); otherwise the
            length carries over from one ``generate()`` call to the next (``"heuristic"``).

    Example:
        >>> policy = HeuristicLength(2)
        >>> for drafted, accepted in [(2, 2), (4, 1), (3, 0), (2, 0), (1, 0)]:
        ...     policy.update(drafted, accepted)
        >>> policy.length()
        1
    """

    def __init__(self, num_tokens: int, confidence_threshold: float = 0.0, transient: bool = False):
        super().__init__(num_tokens, confidence_threshold)
        self.transient = bool(transient)
        self.name = "heuristic_transient" if self.transient else "heuristic"

    def begin(self) -> None:
        if self.transient:
            self._length = self.num_tokens

    def _update(self, num_drafted: int, num_accepted: int) -> None:
        if num_accepted == num_drafted:
            self._length += 2
        else:
            self._length = max(1, self._length - 1)


SCHEDULES = {
    "constant": ConstantLength,
    "heuristic": HeuristicLength,
    "heuristic_transient": functools.partial(HeuristicLength, transient=True),
}
"""Transformers' ``num_assistant_tokens_schedule`` names -> policy constructors ``(num_tokens,
confidence_threshold)``."""


def draft_length_policy(schedule: str, num_tokens: int, confidence_threshold: float = 0.0) -> DraftLengthPolicy:
    """The policy of a transformers schedule name (``"constant"``, ``"heuristic"``, ``"heuristic_transient"``).

    Example:
        >>> draft_length_policy("constant", 3)
        ConstantLength(num_tokens=3, confidence_threshold=0.0, length=3)
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {tuple(SCHEDULES)}, got {schedule!r}")
    return SCHEDULES[schedule](num_tokens, confidence_threshold)


def expected_tokens(alpha: float, draft_length: int) -> float:
    """Expected tokens per round ``(1 - a^(d+1)) / (1 - a)`` (``d`` drafts, each accepted with probability ``a``
    given the previous ones; the bonus token included), computed as ``sum_{k=0}^{d} a^k`` (exact at ``a = 1``).

    Example:
        >>> expected_tokens(0.5, 2)
        1.75
    """
    return float(sum(alpha ** k for k in range(draft_length + 1)))


def break_even_acceptance(cost_fraction: float, draft_length: int, verify_cost: float = 1.0) -> float:
    """The per-token acceptance ``a`` at which a linear draft of ``draft_length`` tokens, each costing
    ``cost_fraction`` of a full forward, with a verification costing ``verify_cost`` forwards, breaks even with plain
    decoding: ``(1 - a^(d+1)) / (1 - a) = d * cost_fraction + verify_cost`` (bisection; ``1.0`` when even full
    acceptance does not pay). Used by the self-speculative drafters' cost reports (DEL, EESD).

    Example:
        >>> round(break_even_acceptance(0.5, 1), 3)  # 1 + a = 1.5
        0.5
    """
    if isinstance(draft_length, bool) or not isinstance(draft_length, int) or draft_length < 1:
        raise ValueError(f"draft_length must be a positive integer, got {draft_length!r}")
    need = draft_length * cost_fraction + verify_cost
    if expected_tokens(1.0, draft_length) <= need:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected_tokens(mid, draft_length) < need else (lo, mid)
    return (lo + hi) / 2
