"""PEARL: parallel speculative decoding with adaptive draft length (pre-verify / post-verify), on the one engine,
with a simulated cost clock for the overlap of the draft and the target."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from hf_decoding_ext.core import lifecycle
from hf_decoding_ext.core.cost_clock import ESTIMATES, CostClock, measure_step_cost
from hf_decoding_ext.core.tree import DraftTree
from hf_decoding_ext.speculative.acceptance.pearl import PEARLAcceptance
from hf_decoding_ext.speculative.drafters.base import Draft
from hf_decoding_ext.speculative.drafters.draft_model import DraftModelDrafter

DEFAULT_GAMMA = 4
"""The official code's default window size (``--gamma 4`` in ``src/util.py``; its scripts use 3 to 5 by model pair)."""

MAX_AUTO_GAMMA = 16
"""Upper bound of the window size chosen from the measured speed ratio (``gamma=None``)."""

CALIBRATION_REPS = 5
"""Timed decoding forwards per model when ``gamma=None`` measures the speed ratio (median taken)."""


@dataclass(frozen=True)
class PEARLRound:
    """One PEARL round (one target verification): its mode (``"pre"``: pre-verify, the first draft token only;
    ``"post"``: post-verify, ``gamma`` tokens), the draft-model forwards run during it, the draft tokens verified
    and accepted, and the tokens appended (accepted, plus the residual token after a rejection)."""

    mode: str
    drafted: int
    verified: int
    accepted: int
    appended: int


@dataclass
class PEARLCall:
    """The record of one ``generate()`` call of a :class:`PEARLDrafter`: the window size, whether it sampled, the
    most new tokens it could generate, its rounds and its :class:`~hf_decoding_ext.core.cost_clock.CostClock`."""

    gamma: int | None
    sampled: bool
    max_new_tokens: int
    rounds: list[PEARLRound] = field(default_factory=list)
    clock: CostClock = field(default_factory=CostClock)

    @property
    def tokens(self) -> int:
        """Tokens generated."""
        return sum(r.appended for r in self.rounds)

    def outcomes(self) -> list[bool]:
        """Per generated position, whether the draft token verified there was accepted (PEARL verifies a draft
        token at every position it generates: no bonus tokens)."""
        out: list[bool] = []
        for r in self.rounds:
            out += [True] * r.accepted
            if r.accepted < r.verified:
                out.append(False)
        return out[: self.tokens]

    def sd_steps(self, window: int | None = None) -> list[tuple[int, int]]:
        """``(drafted, accepted)`` of every step of plain speculative decoding with the same draft model and a window
        of ``window`` tokens (default: this call's ``gamma``) producing the same tokens: a step drafts ``window``
        tokens (fewer near the end, leaving room for its bonus token, as
        :class:`~hf_decoding_ext.speculative.drafters.draft_model.DraftModelDrafter` does), accepts them up to the
        first position where PEARL's draft token was rejected (counting only tokens kept: an eos token ends the count),
        and adds one token from the target. Exact for greedy
        decoding, where the draft token at a position is the draft's argmax after the same committed tokens in both
        methods; under sampling it replays PEARL's per-position outcomes (an estimate)."""
        window = self.gamma if window is None else window
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1, got {window!r}")
        outcomes, n, steps, s = self.outcomes(), self.tokens, [], 0
        while s < n:
            drafted = max(0, min(window, self.max_new_tokens - s - 1))
            accepted = 0
            while accepted < drafted and s + accepted < n and outcomes[s + accepted]:
                accepted += 1
            steps.append((drafted, accepted))
            s += accepted + 1
        return steps


class PEARLDrafter(DraftModelDrafter):
    """The schedule of "PEARL: Parallel Speculative Decoding with Adaptive Draft Length" (Liu, Li, Lv, Liu, Zhu, Hu,
    Sun; ICLR 2025, arXiv 2408.11850) on the speculative engine, with a simulated cost clock of its overlap.

    PEARL runs the draft model and the target at the same time, in rounds. In every round the draft model drafts
    ``gamma`` more tokens, continuing its own draft, while the target verifies:

    - **pre-verify** (after a rejection, and at the start): the target verifies only the *first* of the ``gamma``
      tokens being drafted (its distribution there needs only the committed prefix). Rejected: the round ends with
      the residual token and the other ``gamma - 1`` drafts are dropped. Accepted: the next round post-verifies;
    - **post-verify**: the target verifies ``gamma`` draft tokens (the ``gamma - 1`` left from the previous round
      and the first one drafted in this round) while the draft model drafts the next ``gamma``, assuming they all
      pass. All accepted: the next round again post-verifies the tokens already drafted (no bonus token is drawn);
      a rejection at token ``n`` ends the round with the residual token and switches back to pre-verify.

    The mode follows the last verification, so the effective draft length adapts: one token where the draft fails
    at once, runs of ``gamma`` per round where it keeps up. Verification is standard speculative sampling, lossless
    (greedy: token-identical to greedy decoding up to floating-point near-ties, as for the engine).

    On the engine each round is one step: :meth:`propose` runs the round's ``gamma`` draft-model forwards and returns
    the tokens the target verifies this round as a chain; the step must use
    :class:`PEARLAcceptance` (``SpeculativeDecoding(drafter, acceptance="pearl")``), which ends a fully accepted chain
    on its last token instead of drawing a bonus token; :meth:`observe` keeps the drafted tokens beyond the chain for
    the next round and switches the mode. Another rule raises a ``ValueError`` at the first fully accepted chain.

    **Simulated clock.** Draft and target cannot overlap in one process, so the drafter records every draft-model
    forward (its measured seconds) and every verification (the seconds from the end of :meth:`propose` to
    :meth:`observe`: the target forward and the acceptance rule) in ``self.clock``, a
    :class:`~hf_decoding_ext.core.cost_clock.CostClock` whose rounds are parallel:
    ``self.clock.latency()`` is PEARL's simulated latency (``max(draft, target)`` per round),
    ``self.clock.serial_latency()`` the same forwards run one after another. :meth:`sd_clock` is plain speculative
    decoding's clock on the same run (same draft model and window, serial draft-then-verify steps; exact for greedy
    decoding, see :meth:`PEARLCall.sd_steps`), priced with the same per-call costs; a real run of the engine with
    a draft-model drafter is priced by :func:`speculative_decoding_clock`. :meth:`summary` gathers PEARL's round
    statistics and both latencies. ``self.calls`` keeps a :class:`PEARLCall` (rounds and clock) per
    ``generate()`` call until :meth:`reset`; ``self.clock`` / ``self.rounds`` are the last call's.

    What the clock shows (greedy decoding, ``t_target = gamma * t_draft``): between two positions where the draft
    fails, ``g`` positions apart, PEARL takes ``1 + ceil(g / gamma)`` rounds of ``t_target`` and plain SD
    ``ceil((g + 1) / (gamma + 1))`` steps of ``2 t_target``, so PEARL is never slower (up to SD's shorter drafts at
    the very end); it gains most where the first draft token is rejected (``g = 0``: PEARL runs at the target's own
    autoregressive speed, SD pays ``gamma`` draft forwards on top) and where the draft keeps up, and ties where
    every draft run breaks within ``1 <= g <= gamma``.

    Args:
        assistant_model: the draft model (``None``: ``generate(..., assistant_model=...)``).
        gamma: the window size, draft tokens per round (default 4, the official code's default; its scripts use 3
            to 5 by model pair). ``None``: set from the speed ratio as the paper prescribes (``gamma = c``, one target
            step takes ``c`` draft steps): ``round(t_target / t_draft)`` within ``[1, 16]``, from the given costs when
            both are given, else measured once on the first ``generate()`` call (median of
            :data:`CALIBRATION_REPS` cached one-token forwards of each model after the prompt) and kept until
            :meth:`reset` (``self.measured_costs``).
        t_draft, t_target: per-call costs in seconds for the clock (``None``: estimated from the measured calls of
            the run, see ``estimate``).
        estimate: how the clock estimates a per-call cost that is not given: ``"median"`` (default), ``"mean"`` or
            ``"each"`` (every call at its measured duration).

    Deviations: (1) the overlap is simulated by the clock, not run: in wall time the round's draft forwards run
    before its target forward. (2) The engine feeds the verified chain's last token to the target too (its logits
    are unused) and keeps in the target's KV cache only the accepted tokens before the chain's last one, so each
    verification forward has one token more than the official target's (``gamma + 1`` instead of ``gamma`` in
    post-verify, 2 instead of 1 after a rejection); the measured target cost includes it. (3) The official code
    re-seeds torch's global generator per position before each ratio test; here the ratio tests and residual
    draws use the engine's generator (``SpeculativeDecoding(seed=...)``) in order, and the draft samples torch's
    global generator: given the same draws the tokens are the same. (4) No draft token is drafted past
    ``max_length``. (5) ``gamma=None`` measures one-token decoding forwards; the paper gives ``c`` per model pair.

    Example:
        >>> from hf_decoding_ext.speculative import SpeculativeDecoding
        >>> from hf_decoding_ext.speculative.drafters.pearl import PEARLDrafter
        >>> drafter = PEARLDrafter(small_model, gamma=None)  # doctest: +SKIP
        >>> out = model.generate(**inputs, max_new_tokens=64, do_sample=False,
        ...                      custom_generate=SpeculativeDecoding(drafter, acceptance="pearl"))  # doctest: +SKIP
        >>> drafter.summary()["latency"] <= drafter.summary()["serial_latency"]  # doctest: +SKIP
        True
    """

    def __init__(self, assistant_model=None, gamma: int | None = DEFAULT_GAMMA, t_draft: float | None = None,
                 t_target: float | None = None, estimate: str = "median"):
        if gamma is not None and (isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 1):
            raise ValueError(f"gamma must be an int >= 1 or None (from the speed ratio), got {gamma!r}")
        if estimate not in ESTIMATES:
            raise ValueError(f"estimate must be one of {ESTIMATES}, got {estimate!r}")
        CostClock(t_draft, t_target, estimate)  # validates the costs
        super().__init__(assistant_model, num_tokens=gamma or DEFAULT_GAMMA, confidence_threshold=0.0,
                         schedule="constant")
        self.gamma = gamma
        self.t_draft, self.t_target, self.estimate = t_draft, t_target, estimate
        self.measured_costs: tuple[float, float] | None = None
        self._measured_for: tuple[int, int] | None = None
        self.calls: list[PEARLCall] = []
        self._gamma: int | None = gamma
        self._mode = "pre"
        self._stream: list[int] = []
        self._stream_probs: list[torch.Tensor] = []
        self._processors = None
        self._drafted = 0
        self._verify_start = 0.0

    @classmethod
    def for_model(cls, model=None, tokenizer=None, assistant: str = "distilled", gamma: int | None = DEFAULT_GAMMA
                  ) -> PEARLDrafter:
        """Registry/CLI factory; ``assistant`` as in :meth:`DraftModelDrafter.for_model` (default: the shipped
        distilled draft)."""
        return cls(DraftModelDrafter.for_model(model, tokenizer, assistant=assistant).assistant_model, gamma=gamma)

    # ------------------------------------------------------------------------------------------------ window size
    @property
    def window(self) -> int | None:
        """The window size in use (``None`` before the first ``generate()`` call with ``gamma=None``)."""
        return self._gamma

    def _resolve_gamma(self, state) -> int:
        if self.gamma is not None:
            return self.gamma
        if self.t_draft is not None and self.t_target is not None and self.t_draft > 0:
            t_draft, t_target = self.t_draft, self.t_target
        else:
            key = (id(state.model), id(self.assistant))
            if self.measured_costs is None or self._measured_for != key:
                ids = state.input_ids
                if ids.shape[1] < 2:  # a one-token prompt: time the step after it twice
                    ids = torch.cat([ids, ids], dim=1)
                self.measured_costs = (measure_step_cost(self.assistant, ids, CALIBRATION_REPS),
                                       measure_step_cost(state.model, ids, CALIBRATION_REPS))
                self._measured_for = key
            t_draft, t_target = self.measured_costs
        ratio = t_target / t_draft if t_draft > 0 else float(MAX_AUTO_GAMMA)
        return max(1, min(MAX_AUTO_GAMMA, round(ratio)))

    # ------------------------------------------------------------------------------------------------ drafting
    def begin(self, state) -> None:
        super().begin(state)
        self._gamma = self.gamma
        self.calls.append(PEARLCall(self.gamma, state.do_sample,
                                    state.generation_config.max_length - state.input_ids.shape[1], [],
                                    CostClock(self.t_draft, self.t_target, self.estimate)))
        self._mode = "pre"
        self._stream, self._stream_probs, self._processors = [], [], None

    def propose(self, state) -> Draft:
        if self._gamma is None:
            self._gamma = self.calls[-1].gamma = self._resolve_gamma(state)
        gamma = self._gamma
        ids, mask = state.input_ids, state.attention_mask
        left = state.generation_config.max_length - ids.shape[1]  # tokens still allowed (no bonus after a chain)
        if not self._stream:  # a new draft run starts from the committed sequence
            self._processors = lifecycle.fork(state.logits_processor, caller=type(self).__name__)
        cur_ids, cur_mask = ids, mask
        if self._stream:
            cur_ids = torch.cat([ids, ids.new_tensor([self._stream])], dim=1)
            cur_mask = torch.cat([mask, mask.new_ones((1, len(self._stream)))], dim=1)
        self._sync(cur_ids)
        drafted = max(0, min(gamma, left - len(self._stream)))
        for _ in range(drafted):  # the round's draft-model forwards (they overlap the verification in PEARL)
            t0 = time.perf_counter()
            logits = self._step(cur_ids, cur_mask)
            self.clock.record("draft", time.perf_counter() - t0)
            scores = self._processors(cur_ids, logits)
            if state.do_sample:
                p = torch.softmax(scores.float(), dim=-1)
                tok = torch.multinomial(p, 1)[:, 0]
                self._stream_probs.append(p[0])
            else:
                tok = scores.argmax(-1)
            self._stream.append(int(tok))
            cur_ids = torch.cat([cur_ids, tok[:, None].to(cur_ids.device)], dim=1)
            cur_mask = torch.cat([cur_mask, cur_mask.new_ones((1, 1))], dim=1)
        self._cached_ids = cur_ids[:, : self._cache.get_seq_length()]
        self._drafted = drafted
        length = min(1 if self._mode == "pre" else gamma, len(self._stream), max(0, left))
        tokens = torch.tensor(self._stream[:length], dtype=torch.long)
        probs = torch.stack(self._stream_probs[:length]) if state.do_sample and length else None
        draft = Draft(DraftTree.chain(tokens, probs, "deterministic" if probs is None else "iid"),
                      info={"pearl_mode": self._mode})
        self._verify_start = time.perf_counter()
        return draft

    def observe(self, state, result) -> None:
        self.clock.record("target", time.perf_counter() - self._verify_start)
        self.clock.end_round(parallel=True)
        chain = [int(t) for t in result.draft.tree.tokens]
        if chain and len(result.accepted) >= len(chain):
            raise ValueError("PEARLDrafter needs PEARL's verification (no bonus token after a fully accepted draft): "
                             "use SpeculativeDecoding(drafter, acceptance='pearl'), got a rule that accepted the "
                             f"whole chain and drew a bonus token ({len(result.accepted)} accepted of {len(chain)})")
        tokens = [int(t) for t in result.tokens]
        full = bool(chain) and tokens == chain
        self.rounds.append(PEARLRound(self._mode, self._drafted, len(chain),
                                      len(chain) if full else len(result.accepted), _appended(state, tokens)))
        if full:  # every verified token accepted: the rest of the draft run stays, post-verify next
            del self._stream[: len(chain)]
            del self._stream_probs[: len(chain)]
            self._mode = "post"
        else:  # a rejection: drop the draft run (the draft cache is cropped at the next proposal), pre-verify next
            self._stream, self._stream_probs, self._processors = [], [], None
            self._mode = "pre"

    def reset(self) -> None:
        super().reset()
        self.measured_costs = None
        self._measured_for = None
        self.calls = []

    # ------------------------------------------------------------------------------------------------ records
    @property
    def clock(self) -> CostClock:
        """The last call's clock (an empty one before the first call)."""
        return self.calls[-1].clock if self.calls else CostClock(self.t_draft, self.t_target, self.estimate)

    @property
    def clocks(self) -> list[CostClock]:
        """The clock of every call since construction or :meth:`reset`."""
        return [call.clock for call in self.calls]

    @property
    def rounds(self) -> list[PEARLRound]:
        """The last call's rounds."""
        return self.calls[-1].rounds if self.calls else []

    def _selected(self, all_calls: bool) -> list[PEARLCall]:
        return list(self.calls) if all_calls else self.calls[-1:]

    def pearl_clock(self, all_calls: bool = False) -> CostClock:
        """PEARL's clock of the last call (``all_calls``: of every call, combined; its per-call costs are then
        estimated over all of them)."""
        if not all_calls:
            return self.clock
        return CostClock.combine(self.clocks, self.t_draft, self.t_target, self.estimate)

    def sd_clock(self, all_calls: bool = False, window: int | None = None, t_draft: float | None = None,
                 t_target: float | None = None) -> CostClock:
        """The simulated clock of plain speculative decoding on the same run: the steps of :meth:`PEARLCall.sd_steps`
        (same draft model, window ``window``, default PEARL's; exact for greedy decoding) as serial rounds (the
        step's draft-model forwards, then one verification), priced with ``t_draft`` / ``t_target`` or else with
        :meth:`pearl_clock`'s per-call costs, so that ``pearl_clock().latency()`` and ``sd_clock().latency()``
        compare the two schedules on equal terms."""
        pearl = self.pearl_clock(all_calls)
        t_draft = pearl.cost("draft") if t_draft is None else t_draft
        t_target = pearl.cost("target") if t_target is None else t_target
        clock = CostClock(t_draft, t_target)
        for call in self._selected(all_calls):
            for drafted, _ in call.sd_steps(window):
                clock.add_round(draft=drafted, target=1, parallel=False)
        return clock

    # ------------------------------------------------------------------------------------------------ statistics
    def summary(self, all_calls: bool = False) -> dict:
        """PEARL's statistics of the last call (``all_calls``: of every call since :meth:`reset`) and the figures of
        its clock: window size, rounds in each mode, mean draft tokens accepted and tokens generated per round (per
        target verification), the official code's mean accepted run (draft tokens accepted between two rejections),
        the clock's :meth:`~hf_decoding_ext.core.cost_clock.CostClock.summary` (per-call costs and their ratio,
        PEARL's simulated ``latency``, the ``serial_latency`` of the same forwards), and plain speculative
        decoding's simulated latency on the same run (:meth:`sd_clock`: ``sd_latency``, ``latency_over_sd``;
        ``sd_exact``: false when the run sampled, where it is an estimate)."""
        calls = self._selected(all_calls)
        rounds = [r for call in calls for r in call.rounds]
        out: dict = {"gamma": self._gamma if not all_calls else sorted({c.gamma for c in calls} - {None}),
                     "calls": len(calls), "rounds": len(rounds)}
        if rounds:
            runs, run = [], 0
            for r in rounds:
                run += r.accepted
                if r.accepted < r.verified:
                    runs.append(run)
                    run = 0
            out.update({
                "tokens": sum(r.appended for r in rounds),
                "pre_rounds": sum(r.mode == "pre" for r in rounds),
                "post_rounds": sum(r.mode == "post" for r in rounds),
                "mean_accepted_per_round": sum(r.accepted for r in rounds) / len(rounds),
                "mean_tokens_per_round": sum(r.appended for r in rounds) / len(rounds),
                "mean_accepted_run": sum(runs) / len(runs) if runs else float(run),
            })
        pearl = self.pearl_clock(all_calls)
        out.update({k: v for k, v in pearl.summary().items() if k != "rounds"})
        if "latency" in out:
            sd = self.sd_clock(all_calls).latency()
            out.update({"sd_latency": sd, "latency_over_sd": out["latency"] / sd if sd > 0 else 1.0,
                        "sd_exact": not any(c.sampled for c in calls)})
        return out


def _appended(state, tokens: list[int]) -> int:
    """How many of ``tokens`` the engine appends: up to ``max_length`` and, with an eos criterion, up to and
    including the first eos token (other stopping criteria are not foreseen)."""
    n = min(len(tokens), max(0, state.generation_config.max_length - state.input_ids.shape[1]))
    eos = state.generation_config.eos_token_id
    if eos is None or not getattr(state, "has_eos_criterion", True):
        return n
    eos = {int(e) for e in (torch.as_tensor(eos).reshape(-1).tolist())}
    return next((i + 1 for i, t in enumerate(tokens[:n]) if t in eos), n)


def speculative_decoding_clock(stats, t_draft: float, t_target: float) -> CostClock:
    """The simulated clock of a plain speculative-decoding run of the engine with a draft-model chain drafter:
    every step of ``stats`` (the engine's :class:`~hf_decoding_ext.speculative.engine.StepStats`, e.g.
    ``loop.last_stats``) is a serial round of ``draft_size`` draft-model forwards, then one verification, priced at
    ``t_draft`` / ``t_target`` seconds per call (e.g. those of a PEARL run's clock, to compare the two schedules).

    Example:
        >>> from types import SimpleNamespace
        >>> steps = [SimpleNamespace(draft_size=4), SimpleNamespace(draft_size=4)]
        >>> speculative_decoding_clock(steps, t_draft=1.0, t_target=4.0).latency()  # 2 * (4 * 1 + 4)
        16.0
    """
    clock = CostClock(t_draft, t_target)
    for step in stats:
        clock.add_round(draft=int(step.draft_size), target=1, parallel=False)
    return clock


__all__ = ["DEFAULT_GAMMA", "PEARLAcceptance", "PEARLCall", "PEARLDrafter", "PEARLRound", "speculative_decoding_clock"]
