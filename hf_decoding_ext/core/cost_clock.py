"""A simulated cost clock for two-model decoding schedules (a draft model and a target model).

On a machine where the draft and the target cannot really run at the same time (one CPU, one process), the latency
of a *parallel* schedule such as PEARL's (arXiv 2408.11850: the draft keeps drafting while the target verifies) can
only be simulated: record every draft-model and target forward of the run, grouped into the rounds of the schedule,
give each call a cost (measured or given), and add up the rounds:

- a **parallel** round costs ``max(draft, target) + sync`` (the two lanes overlap and wait for each other at the end
  of the round, e.g. PEARL's ``accelerator.gather``);
- a **serial** round costs ``draft + target`` (plain speculative decoding: draft, then verify).

:meth:`CostClock.latency` applies each round's own kind; :meth:`CostClock.serial_latency` prices the same calls run
one after another (what the run would cost on one device without overlap). The same class prices a plain
speculative-decoding run (serial rounds, e.g. from the engine's per-step statistics with :meth:`CostClock.add_round`)
with the same per-call costs, so a parallel and a serial schedule can be compared on equal terms.

Per-call costs: ``t_draft`` / ``t_target`` when given; otherwise estimated from the measured durations of the
recorded calls of that lane (``estimate="median"``, the default, robust to a noisy shared machine; ``"mean"``; or
``"each"``: every call at its own measured duration, so e.g. a prefill counts at its real cost).

Example:
    >>> from hf_decoding_ext.core.cost_clock import CostClock
    >>> clock = CostClock(t_draft=1.0, t_target=4.0)
    >>> clock.add_round(draft=4, target=1, parallel=True)   # max(4 * 1, 4) = 4
    >>> clock.add_round(draft=2, target=1, parallel=False)  # 2 * 1 + 4 = 6
    >>> clock.latency(), clock.serial_latency()
    (10.0, 14.0)
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field

LANES = ("draft", "target")
"""The two lanes of a schedule: draft-model forwards and target forwards."""

ESTIMATES = ("median", "mean", "each")
"""How a lane's per-call cost is estimated when it is not given (see :class:`CostClock`)."""


@dataclass
class ClockRound:
    """One round of a schedule: the measured seconds of its draft and target calls (``nan``: not measured) and
    whether the two lanes overlap."""

    draft: list[float] = field(default_factory=list)
    target: list[float] = field(default_factory=list)
    parallel: bool = False


def _check_cost(name: str, value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0 or None, got {value!r}")
    return float(value)


class CostClock:
    """Records the draft-model and target calls of a run, round by round, and prices the schedule.

    Args:
        t_draft: cost in seconds of one draft-model forward; ``None``: estimated from the recorded calls.
        t_target: cost in seconds of one target forward (a verification); ``None``: estimated likewise.
        estimate: ``"median"`` (default) or ``"mean"`` of the measured durations of the lane's calls, or
            ``"each"``: every call at its own measured duration (calls recorded without one count at the lane's
            median). Ignored for a lane whose cost is given.
        sync: seconds added to every parallel round (the synchronisation of the two lanes; default 0).

    Rounds are built with :meth:`record` (one or more calls of a lane, with their measured seconds) and closed with
    :meth:`end_round`; :meth:`add_round` records and closes a round in one call. Calls recorded after the last
    :meth:`end_round` are not priced until the round is closed.

    Example:
        >>> clock = CostClock(estimate="median")
        >>> for seconds in (0.010, 0.011, 0.012):
        ...     clock.record("draft", seconds)
        >>> clock.record("target", 0.030)
        >>> clock.end_round(parallel=True)
        >>> round(clock.latency(), 3), round(clock.serial_latency(), 3)  # max(3 * 0.011, 0.030), 0.033 + 0.030
        (0.033, 0.063)
    """

    def __init__(self, t_draft: float | None = None, t_target: float | None = None, estimate: str = "median",
                 sync: float = 0.0):
        self.t_draft = _check_cost("t_draft", t_draft)
        self.t_target = _check_cost("t_target", t_target)
        if estimate not in ESTIMATES:
            raise ValueError(f"estimate must be one of {ESTIMATES}, got {estimate!r}")
        self.estimate = estimate
        self.sync = _check_cost("sync", sync)
        self.rounds: list[ClockRound] = []
        self._open = ClockRound()

    # ------------------------------------------------------------------------------------------------ recording
    def record(self, lane: str, seconds: float | None = None, count: int = 1) -> None:
        """Record ``count`` calls of ``lane`` (``"draft"`` or ``"target"``) in the open round, each of
        ``seconds`` measured seconds (``None``: not measured; it is then priced at the lane's cost)."""
        if lane not in LANES:
            raise ValueError(f"lane must be one of {LANES}, got {lane!r}")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"count must be an int >= 0, got {count!r}")
        value = _check_cost("seconds", seconds)
        getattr(self._open, lane).extend([math.nan if value is None else value] * count)

    def end_round(self, parallel: bool) -> None:
        """Close the open round; ``parallel``: its draft and target calls overlap."""
        if not isinstance(parallel, bool):
            raise ValueError(f"parallel must be a bool, got {parallel!r}")
        self._open.parallel = parallel
        self.rounds.append(self._open)
        self._open = ClockRound()

    def add_round(self, draft: int = 0, target: int = 0, parallel: bool = False,
                  draft_seconds: float | None = None, target_seconds: float | None = None) -> None:
        """Record ``draft`` draft-model and ``target`` target calls (each of the given measured seconds, if any) as
        one closed round."""
        self.record("draft", draft_seconds, draft)
        self.record("target", target_seconds, target)
        self.end_round(parallel)

    def reset(self) -> None:
        """Forget every recorded round (the given costs stay)."""
        self.rounds = []
        self._open = ClockRound()

    # ------------------------------------------------------------------------------------------------ costs
    def measured(self, lane: str) -> list[float]:
        """The measured seconds of the lane's calls in the closed rounds (unmeasured calls left out)."""
        if lane not in LANES:
            raise ValueError(f"lane must be one of {LANES}, got {lane!r}")
        return [s for r in self.rounds for s in getattr(r, lane) if not math.isnan(s)]

    def cost(self, lane: str) -> float:
        """The per-call cost of ``lane``: the given ``t_draft`` / ``t_target``, else the median (or mean) of the
        lane's measured calls. A ``ValueError`` when neither exists (nothing to price the calls with)."""
        given = self.t_draft if lane == "draft" else self.t_target if lane == "target" else None
        if lane not in LANES:
            raise ValueError(f"lane must be one of {LANES}, got {lane!r}")
        if given is not None:
            return given
        values = self.measured(lane)
        if not values:
            raise ValueError(f"no cost for the {lane} lane: give t_{lane}= or record measured calls")
        return float(statistics.mean(values) if self.estimate == "mean" else statistics.median(values))

    def _lane_seconds(self, calls: list[float], lane: str) -> float:
        if not calls:
            return 0.0
        given = self.t_draft if lane == "draft" else self.t_target
        if given is not None or self.estimate != "each":
            return len(calls) * self.cost(lane)
        fallback = None
        total = 0.0
        for s in calls:
            if math.isnan(s):
                if fallback is None:
                    fallback = float(statistics.median(self.measured(lane) or [math.nan]))
                    if math.isnan(fallback):
                        raise ValueError(f"no cost for the {lane} lane: give t_{lane}= or record measured calls")
                s = fallback
            total += s
        return total

    def round_costs(self) -> list[tuple[float, float, bool]]:
        """``(draft_seconds, target_seconds, parallel)`` of every closed round."""
        return [(self._lane_seconds(r.draft, "draft"), self._lane_seconds(r.target, "target"), r.parallel)
                for r in self.rounds]

    def latency(self) -> float:
        """Simulated latency of the recorded schedule: ``max(draft, target) + sync`` per parallel round,
        ``draft + target`` per serial round."""
        return sum(max(d, t) + self.sync if par else d + t for d, t, par in self.round_costs())

    def serial_latency(self) -> float:
        """Simulated latency of the same calls run one after another (every round serial)."""
        return sum(d + t for d, t, _ in self.round_costs())

    def counts(self) -> dict[str, int]:
        """Numbers of closed rounds, draft-model calls and target calls."""
        return {"rounds": len(self.rounds), "draft_calls": sum(len(r.draft) for r in self.rounds),
                "target_calls": sum(len(r.target) for r in self.rounds)}

    def summary(self) -> dict:
        """Counts, the per-call costs used (``None`` for a lane without one), the simulated latency of the schedule
        and of the same calls run serially, and their ratio (left out when a lane's calls cannot be priced)."""
        out: dict = dict(self.counts())
        if not self.rounds:
            return out
        lanes = {lane: self._safe_cost(lane) for lane in LANES}
        out["t_draft"], out["t_target"] = lanes["draft"], lanes["target"]
        if lanes["draft"] and lanes["target"] is not None:
            out["cost_ratio"] = lanes["target"] / lanes["draft"]
        try:
            latency, serial = self.latency(), self.serial_latency()
        except ValueError:  # a lane with calls but no cost: nothing to price
            return out
        out["latency"], out["serial_latency"] = latency, serial
        out["latency_over_serial"] = latency / serial if serial > 0 else 1.0
        return out

    def _safe_cost(self, lane: str) -> float | None:
        try:
            return self.cost(lane)
        except ValueError:
            return None

    # ------------------------------------------------------------------------------------------------ combining
    def with_costs(self, t_draft: float | None = None, t_target: float | None = None) -> CostClock:
        """A copy of this clock (same rounds, estimate and sync) priced with other per-call costs."""
        other = CostClock(t_draft, t_target, self.estimate, self.sync)
        other.rounds = [ClockRound(list(r.draft), list(r.target), r.parallel) for r in self.rounds]
        return other

    @classmethod
    def combine(cls, clocks, t_draft: float | None = None, t_target: float | None = None,
                estimate: str = "median", sync: float = 0.0) -> CostClock:
        """One clock holding the closed rounds of ``clocks`` in order (e.g. one per prompt), priced with the given
        costs (``None``: estimated over all of their measured calls together)."""
        out = cls(t_draft, t_target, estimate, sync)
        for clock in clocks:
            out.rounds.extend(ClockRound(list(r.draft), list(r.target), r.parallel) for r in clock.rounds)
        return out


def measure_step_cost(model, input_ids, reps: int = 5, tokens: int = 1) -> float:
    """Median seconds of one cached forward of ``model`` over ``tokens`` new tokens after ``input_ids`` ``(1, n)``
    (the cost of a decoding step; the prefix is prefilled once, untimed, in a fresh cache).

    Example:
        >>> seconds = measure_step_cost(model, input_ids, reps=3)  # doctest: +SKIP
    """
    import torch
    from transformers import DynamicCache

    if isinstance(reps, bool) or not isinstance(reps, int) or reps < 1:
        raise ValueError(f"reps must be an int >= 1, got {reps!r}")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"tokens must be an int >= 1, got {tokens!r}")
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    if ids.shape[1] < 2:
        raise ValueError("measure_step_cost needs at least 2 tokens in input_ids")
    prefix, step = ids[:, :-1], ids[:, -1:].repeat(1, tokens)
    cache = DynamicCache(config=model.config)
    times = []
    with torch.no_grad():
        model(input_ids=prefix, past_key_values=cache, use_cache=True, logits_to_keep=1)
        base = cache.get_seq_length()
        positions = torch.arange(base, base + tokens, device=device)[None]
        mask = torch.ones(1, base + tokens, dtype=torch.long, device=device)
        for _ in range(reps + 1):  # the first call warms up
            t0 = time.perf_counter()
            model(input_ids=step, attention_mask=mask, position_ids=positions, past_key_values=cache,
                  use_cache=True, logits_to_keep=1)
            times.append(time.perf_counter() - t0)
            cache.crop(-tokens)  # back to the prefix
    return float(statistics.median(times[1:]))


__all__ = ["ESTIMATES", "LANES", "ClockRound", "CostClock", "measure_step_cost"]
