"""Tree policy of the speculative engine: which nodes a draft tree holds, and how many.

A drafter that can propose more candidates than it is worth verifying needs two decisions each step:

- **shape**: which nodes to keep. :func:`best_first_paths` (in :mod:`hf_decoding_ext.core.tree`, re-exported here)
  builds a budgeted best-first tree from any score: path-product accuracies (Medusa's sparse trees, Cai et al.,
  arXiv 2401.10774), summed draft log-probabilities (EAGLE-2's expansion, Li et al., arXiv 2406.16858) or measured
  acceptance frequencies (Token Recycling's node ranking). :func:`best_first_tree` does the same with token labels
  and returns a :class:`~hf_decoding_ext.core.tree.DraftTree`.
- **size**: the node budget. :class:`VerifyCostCurve` is the measured cost of a verification forward over ``n``
  tokens relative to a 1-token forward (packaged: ``hf_decoding_ext/data/verify_cost.json``, copied from
  ``results/verify_cost.json``); :func:`node_budget` turns it into a number of nodes; :class:`NodeBudget` resolves a
  drafter's ``max_nodes`` argument (an int, ``None`` or ``"auto"``) for the device the target runs on.

The budget rule: a step that verifies ``n`` nodes (a forward over the root and the nodes, ``n + 1`` tokens) appends
``1 + E[accepted | n]`` tokens on average (the accepted nodes and the bonus token). Given the expected gain of each
node (``gains[i]``: the expected number of accepted tokens the ``i``-th picked node adds, e.g. its path-product
accuracy), :func:`node_budget` picks the ``n`` maximising ``(1 + sum(gains[:n])) / cost(n + 1)``: expected tokens per
unit of verification cost. Without gains it uses the simpler rule "the largest ``n`` whose forward over ``n + 1``
tokens costs at most ``max_cost`` 1-token forwards" (default 1: verifying is never dearer than a plain decoding step).
Drafting time is not in either rule; drafters whose end-to-end sweep found a better size keep that measured size
(:class:`NodeBudget`'s ``cpu`` argument).

Example:
    >>> from hf_decoding_ext.speculative.policies.tree_policy import VerifyCostCurve, node_budget
    >>> curve = VerifyCostCurve((1, 2, 4, 8), (1.0, 1.0, 1.2, 2.0))
    >>> node_budget(curve)  # largest n with cost(n + 1) <= 1
    1
    >>> node_budget(curve, gains=[0.6, 0.3, 0.2, 0.01])  # argmax of (1 + accepted) / cost
    3
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass

import torch

from hf_decoding_ext.core.resources import data_file
from hf_decoding_ext.core.tree import DraftTree, best_first_paths

__all__ = [
    "ACCELERATOR_MAX_NODES", "NodeBudget", "VerifyCostCurve", "best_first_paths", "best_first_tree",
    "check_max_nodes", "node_budget",
]

ACCELERATOR_MAX_NODES = 16
"""Node budget of ``"auto"`` on an accelerator for drafters without a size of their own: there a forward over a few
dozen tokens costs about as much as one token (not measured by this library: no GPU was available)."""

COST_FILE = "verify_cost.json"
"""Packaged verify-cost curve (``hf_decoding_ext/data/verify_cost.json``)."""


def best_first_tree(expand, budget: int, max_depth: int | None = None, root_score: float = 0.0) -> DraftTree:
    """:func:`best_first_paths` with token ids as labels, as a :class:`DraftTree` (node ``i`` = the ``i``-th pick).

    Args:
        expand: ``expand(path, score)`` returns ``(token_id, child_score)`` pairs for the children of ``path`` (a
            tuple of token ids after the root).
        budget: number of nodes (``>= 0``).
        max_depth: deepest node depth (``None``: no limit).
        root_score: the root's score (0 for summed log-probabilities, the default; 1 for products).

    Example:
        >>> import math
        >>> logp = {(): {5: math.log(0.7), 6: math.log(0.3)}, (5,): {7: math.log(0.9)}}
        >>> tree = best_first_tree(lambda p, s: [(t, s + lp) for t, lp in logp.get(p, {}).items()], budget=2)
        >>> tree.tokens.tolist(), tree.parents.tolist()
        ([5, 7], [-1, 0])
    """
    return DraftTree.from_sequences(best_first_paths(expand, budget, max_depth=max_depth, root_score=root_score))


def check_max_nodes(max_nodes) -> None:
    """Raise ``ValueError`` unless ``max_nodes`` is ``None``, ``"auto"`` or an int ``>= 1``."""
    if max_nodes is None or max_nodes == "auto":
        return
    if isinstance(max_nodes, bool) or not isinstance(max_nodes, int) or max_nodes < 1:
        raise ValueError(f"max_nodes must be a positive integer, 'auto' or None, got {max_nodes!r}")


@dataclass(frozen=True)
class VerifyCostCurve:
    """Measured cost of a verification forward over ``n`` new tokens, relative to a 1-token forward.

    Args:
        tokens: increasing forward sizes (``>= 1``) at which the cost was measured.
        cost: the cost at each size (``> 0``), in units of one 1-token forward; linearly interpolated in between.
        source: where the numbers come from.

    Example:
        >>> curve = VerifyCostCurve((1, 3), (1.0, 2.0))
        >>> curve(2)
        1.5
    """

    tokens: tuple[int, ...]
    cost: tuple[float, ...]
    source: str = ""

    def __post_init__(self):
        tokens = tuple(int(t) for t in self.tokens)
        cost = tuple(float(c) for c in self.cost)
        if not tokens or len(tokens) != len(cost):
            raise ValueError(f"tokens and cost must be non-empty and of equal length, got {len(tokens)} and "
                             f"{len(cost)}")
        if tokens[0] < 1 or any(b <= a for a, b in zip(tokens, tokens[1:])):
            raise ValueError(f"tokens must be increasing and >= 1, got {tokens}")
        if any(not c > 0 or math.isinf(c) for c in cost):
            raise ValueError(f"costs must be finite and > 0, got {cost}")
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "cost", cost)

    @classmethod
    def packaged(cls, layout: str = "weight_left") -> VerifyCostCurve:
        """The curve shipped in the package (SmolLM2-135M-Instruct, float32, the 2-core development CPU).

        ``layout="weight_left"`` (default): the engine's CPU kernel layout (:mod:`hf_decoding_ext.core.kernels`),
        what a drafter under ``SpeculativeDecoding()`` pays; ``"pytorch"``: PyTorch's own linear kernels
        (``small_batch_linear=False``). Both are relative to a 1-token forward with PyTorch's kernels.
        """
        data = json.loads(data_file(COST_FILE).read_text(encoding="utf-8"))
        key = f"{layout}_ratio"
        rows = data["cost"]
        if not rows or key not in rows[0]:
            raise ValueError(f"layout must be 'weight_left' or 'pytorch', got {layout!r}")
        return cls(tuple(r["tokens"] for r in rows), tuple(r[key] for r in rows),
                   f"{data.get('source', COST_FILE)} ({layout})")

    @property
    def max_tokens(self) -> int:
        """Largest measured forward size (the curve is not extrapolated)."""
        return self.tokens[-1]

    def __call__(self, n_tokens: int) -> float:
        """Cost of a forward over ``n_tokens`` tokens (``1 <= n_tokens <= max_tokens``)."""
        if not 1 <= n_tokens <= self.max_tokens:
            raise ValueError(f"n_tokens must be in [1, {self.max_tokens}] (the measured range), got {n_tokens}")
        if n_tokens <= self.tokens[0]:
            return self.cost[0]
        for (t0, c0), (t1, c1) in itertools.pairwise(zip(self.tokens, self.cost)):
            if n_tokens <= t1:
                return c0 + (c1 - c0) * (n_tokens - t0) / (t1 - t0)
        return self.cost[-1]  # unreachable: n_tokens <= max_tokens


def node_budget(curve: VerifyCostCurve, gains=None, max_cost: float = 1.0, max_nodes: int | None = None) -> int:
    """Number of draft nodes to verify per step, from a verify-cost curve (see the module docstring for the rule).

    Args:
        curve: cost of a forward over ``n`` tokens; a step with ``k`` nodes runs ``k + 1`` tokens (root and nodes).
        gains: optional expected accepted tokens added by each node in pick order (``>= 0``, e.g. the path-product
            accuracies of :func:`~hf_decoding_ext.core.tree.choices_from_accuracies`'s picks). Given: the ``k <=
            len(gains)`` maximising ``(1 + sum(gains[:k])) / curve(k + 1)`` (the smaller ``k`` on ties).
        max_cost: without ``gains``: the largest ``k`` with ``curve(k + 1) <= max_cost`` (``> 0``; 0 nodes when even
            the root alone costs more).
        max_nodes: optional cap on the result (``>= 0``).

    Returns:
        The number of nodes, at most ``curve.max_tokens - 1``.

    Example:
        >>> node_budget(VerifyCostCurve((1, 2, 3, 4), (1.0, 0.9, 1.1, 1.3)))
        1
    """
    if not max_cost > 0:
        raise ValueError(f"max_cost must be > 0, got {max_cost!r}")
    if max_nodes is not None and (isinstance(max_nodes, bool) or not isinstance(max_nodes, int) or max_nodes < 0):
        raise ValueError(f"max_nodes must be None or an int >= 0, got {max_nodes!r}")
    limit = curve.max_tokens - 1 if max_nodes is None else min(max_nodes, curve.max_tokens - 1)
    if gains is None:
        fitting = [k for k in range(limit + 1) if curve(k + 1) <= max_cost]
        return max(fitting) if fitting else 0
    gains = [float(g) for g in gains]
    if any(not g >= 0 or math.isinf(g) for g in gains):
        raise ValueError(f"gains must be finite and >= 0, got {gains}")
    best, best_rate, accepted = 0, 1.0 / curve(1), 0.0
    for k in range(1, min(limit, len(gains)) + 1):
        accepted += gains[k - 1]
        rate = (1.0 + accepted) / curve(k + 1)
        if rate > best_rate:
            best, best_rate = k, rate
    return best


class NodeBudget:
    """A drafter's ``max_nodes`` argument resolved for the device its target runs on.

    Args:
        max_nodes: an int ``>= 1`` (that many nodes everywhere), ``None`` (no cap: the drafter's whole tree) or
            ``"auto"``: on CPU ``cpu`` when given, else :func:`node_budget` on the packaged curve
            (:meth:`VerifyCostCurve.packaged`, the engine's kernel layout); on an accelerator ``accelerator``.
        cpu: a size measured end to end for this drafter on the development CPU (it overrides the curve rule, which
            ignores drafting time); ``None``: the curve rule.
        accelerator: the ``"auto"`` size off CPU (``None``: no cap). Default :data:`ACCELERATOR_MAX_NODES`.
        curve: the cost curve of the ``"auto"`` CPU rule (``None``: the packaged one, loaded when first needed).
        max_cost: the curve rule's cost limit when no gains are given (see :func:`node_budget`).
        gains: acceptance gains per node (a list) or the name of shipped ones
            (:func:`~hf_decoding_ext.speculative.policies.tuning.shipped_gains`): with them, and the model passed to
            :meth:`resolve`, ``"auto"`` is the measured rule on every device (``cpu``/``accelerator`` are fallbacks
            for when no gains exist).

    Example:
        >>> import torch
        >>> budget = NodeBudget("auto", cpu=3)
        >>> budget.resolve(torch.device("cpu")), budget.resolve(torch.device("cuda"))
        (3, 16)
        >>> NodeBudget("auto").resolve(torch.device("cpu"))  # the packaged curve: 6 tokens cost <= 1 forward
        5
    """

    def __init__(self, max_nodes: int | str | None = "auto", cpu: int | None = None,
                 accelerator: int | None = ACCELERATOR_MAX_NODES, curve: VerifyCostCurve | None = None,
                 max_cost: float = 1.0, gains: str | list | None = None):
        check_max_nodes(max_nodes)
        if gains is not None and not isinstance(gains, str):
            gains = [float(g) for g in gains]
            if any(not g >= 0 or math.isinf(g) for g in gains):
                raise ValueError(f"gains must be finite and >= 0, got {gains}")
        self.gains = gains
        for name, value in (("cpu", cpu), ("accelerator", accelerator)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")
        if not max_cost > 0:
            raise ValueError(f"max_cost must be > 0, got {max_cost!r}")
        self.max_nodes = max_nodes
        self.cpu = cpu
        self.accelerator = accelerator
        self.curve = curve
        self.max_cost = max_cost

    @property
    def is_auto(self) -> bool:
        return self.max_nodes == "auto"

    def measured_gains(self) -> list[float] | None:
        """The acceptance gains of the tuned rule: the list given, or the ones shipped under the name given."""
        if isinstance(self.gains, str):
            from hf_decoding_ext.speculative.policies.tuning import shipped_gains

            return shipped_gains(self.gains)
        return self.gains

    def resolve(self, device, gains=None, model=None) -> int | None:
        """The node cap on ``device`` (a ``torch.device`` or its string; ``None`` = no cap). ``gains`` feed the
        curve rule (see :func:`node_budget`), whose result is raised to at least 1 node.

        With acceptance gains (``gains`` here, or the budget's own) and the ``model``, ``"auto"`` is tuned by
        measurement on any device: :func:`node_budget` on the model's measured verify-cost curve
        (:func:`~hf_decoding_ext.speculative.policies.tuning.device_curve`) and the gains."""
        if not self.is_auto:
            return self.max_nodes
        gains = gains if gains is not None else self.measured_gains()
        if gains is not None and model is not None:
            from hf_decoding_ext.speculative.policies.tuning import device_curve

            return max(1, node_budget(device_curve(model), gains))
        if torch.device(device).type != "cpu":
            return self.accelerator
        if self.cpu is not None:
            return self.cpu
        if self.curve is None:
            self.curve = VerifyCostCurve.packaged()
        return max(1, node_budget(self.curve, gains, max_cost=self.max_cost))
