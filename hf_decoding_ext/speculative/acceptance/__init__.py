"""Acceptance rules of the speculative engine, one per file, and the name -> rule table.

- :class:`GreedyAcceptance` (``"greedy"``): a child is accepted when it is the target's argmax. Token-identical to
  greedy decoding.
- :class:`SpeculativeSamplingAcceptance` (``"speculative"``): rejection sampling (Leviathan et al. 2023, Chen et al.
  2023), recursive over a tree's children (SpecInfer, and Recursive Speculative Decoding for siblings drawn without
  replacement). Lossless in distribution for every sibling scheme.
- :class:`TypicalAcceptance` (``"typical"``): Medusa's typical acceptance, lossy.
- :class:`SpecTrAcceptance` (``"spectr"``): SpecTr's K-SEQ for k i.i.d. draft sequences (division factor and
  residual), lossless in distribution; greedy acceptance without sampling.
- :class:`ReflectiveAcceptance` (``"reflective"``): Reflective Verification's strict-or-fused rule (lossy), with the
  reflective distributions of :class:`~hf_decoding_ext.speculative.drafters.reflective.ReflectiveDrafter`.
- :class:`PEARLAcceptance` (``"pearl"``): PEARL's rule, greedy or speculative sampling with no bonus token after
  an accepted leaf (the next round verifies the tokens drafted meanwhile); lossless.
- ``"auto"``: greedy without sampling, speculative sampling with it.

A new rule is one file with an :class:`AcceptanceRule` subclass plus one line: an entry of
:data:`ACCEPTANCE_RULES` or a call ``register_acceptance_rule("name", MyRule)``.
"""

from __future__ import annotations

from collections.abc import Callable

from hf_decoding_ext.speculative.acceptance.base import AcceptanceRule, ScoresAt, target_probs
from hf_decoding_ext.speculative.acceptance.greedy import GreedyAcceptance
from hf_decoding_ext.speculative.acceptance.pearl import PEARLAcceptance
from hf_decoding_ext.speculative.acceptance.reflective import ReflectiveAcceptance
from hf_decoding_ext.speculative.acceptance.speculative_sampling import SpeculativeSamplingAcceptance
from hf_decoding_ext.speculative.acceptance.spectr import SpecTrAcceptance
from hf_decoding_ext.speculative.acceptance.typical import TypicalAcceptance

RuleFactory = Callable[[bool], AcceptanceRule]


def _auto(do_sample: bool) -> AcceptanceRule:
    return SpeculativeSamplingAcceptance() if do_sample else GreedyAcceptance()


ACCEPTANCE_RULES: dict[str, RuleFactory] = {
    "auto": _auto,
    "greedy": GreedyAcceptance.for_sampling,
    "speculative": SpeculativeSamplingAcceptance.for_sampling,
    "typical": TypicalAcceptance.for_sampling,
    "spectr": SpecTrAcceptance.for_sampling,
    "pearl": PEARLAcceptance.for_sampling,
    "reflective": ReflectiveAcceptance.for_sampling,
}
"""Name -> factory ``factory(do_sample) -> AcceptanceRule`` of the rules ``SpeculativeDecoding(acceptance=...)``
accepts by name."""


def register_acceptance_rule(name: str, rule: type[AcceptanceRule] | RuleFactory, overwrite: bool = False) -> None:
    """Make a rule available by name to :func:`get_acceptance_rule` (and so to ``SpeculativeDecoding(acceptance=
    name)``).

    Args:
        name: the rule's name (a non-empty string).
        rule: an :class:`AcceptanceRule` subclass (built with its :meth:`~AcceptanceRule.for_sampling`) or a factory
            ``factory(do_sample) -> AcceptanceRule``.
        overwrite: replace an existing entry (otherwise a taken name raises a ``ValueError``).

    Example:
        >>> from hf_decoding_ext.speculative.acceptance import (ACCEPTANCE_RULES, GreedyAcceptance,
        ...                                                     get_acceptance_rule, register_acceptance_rule)
        >>> class MyRule(GreedyAcceptance):
        ...     pass
        >>> register_acceptance_rule("my-rule", MyRule)
        >>> type(get_acceptance_rule("my-rule", do_sample=False)).__name__
        'MyRule'
        >>> del ACCEPTANCE_RULES["my-rule"]
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"an acceptance rule's name must be a non-empty string, got {name!r}")
    if name in ACCEPTANCE_RULES and not overwrite:
        raise ValueError(f"acceptance rule {name!r} is already registered; pass overwrite=True to replace it")
    if isinstance(rule, type) and issubclass(rule, AcceptanceRule):
        factory = rule.for_sampling
    elif callable(rule) and not isinstance(rule, type):
        factory = rule
    else:
        raise ValueError(f"rule must be an AcceptanceRule subclass or a factory(do_sample), got {rule!r}")
    ACCEPTANCE_RULES[name] = factory


def get_acceptance_rule(rule: str | AcceptanceRule, do_sample: bool) -> AcceptanceRule:
    """The rule for a name of :data:`ACCEPTANCE_RULES` (``"auto"`` picks greedy without sampling and speculative
    sampling with it) or an :class:`AcceptanceRule` instance as is.

    Example:
        >>> type(get_acceptance_rule("auto", do_sample=True)).__name__
        'SpeculativeSamplingAcceptance'
    """
    if isinstance(rule, AcceptanceRule):
        return rule
    if not isinstance(rule, str) or rule not in ACCEPTANCE_RULES:
        raise ValueError(f"unknown acceptance rule {rule!r}; use one of {sorted(ACCEPTANCE_RULES)} or an "
                         "AcceptanceRule instance")
    built = ACCEPTANCE_RULES[rule](do_sample)
    if not isinstance(built, AcceptanceRule):
        raise ValueError(f"acceptance rule {rule!r} built a {type(built).__name__}, not an AcceptanceRule")
    return built


resolve_rule = get_acceptance_rule
"""Former name of :func:`get_acceptance_rule` (kept for one release)."""

__all__ = ["ACCEPTANCE_RULES", "AcceptanceRule", "GreedyAcceptance", "PEARLAcceptance", "ReflectiveAcceptance",
           "ScoresAt", "SpeculativeSamplingAcceptance", "SpecTrAcceptance", "TypicalAcceptance", "get_acceptance_rule",
           "register_acceptance_rule", "resolve_rule", "target_probs"]
