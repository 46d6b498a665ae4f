"""A*-decoding: best-first search over reasoning steps guided by a process reward (Chatziveroglou, 2025,
arXiv:2505.13672).

A trace (the text after the prompt) is cut into steps at a delimiter (``"\\n"``). Every partial trace ``s`` in the
open set has a priority ``f(s) = g(s) + h(s)`` with ``h(s) = 1 - r(s)`` from a process reward ``r`` in ``[0, 1]``
and ``g(s)`` the cost accumulated along the path before ``s``. The search pops the lowest-``f`` trace, samples ``k``
next steps of it (one batched rollout from its shared prefix cache, :class:`~hf_decoding_ext.core.step_search.
StepSearch`), scores the ``k`` new prefixes with the process reward and pushes them. The first complete trace popped
is returned; a token / process-reward budget ends the search earlier.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from typing import Any

import torch

from hf_decoding_ext.core.loop import DecodingLoop, GenerationState
from hf_decoding_ext.core.step_search import (
    DelimiterSegmenter,
    SearchBudget,
    SearchNode,
    SearchStats,
    StepSearch,
    StepSegmenter,
    append_trace,
)

ON_EXHAUSTED = ("complete", "partial")


class _CappedSegmenter(StepSegmenter):
    """``base`` with its step length capped at ``cap`` tokens (so that ``k`` steps fit in the remaining budget)."""

    def __init__(self, base: StepSegmenter, cap: int):
        self.base, self.max_tokens = base, cap

    def rollout_kwargs(self, tokenizer) -> dict[str, Any]:
        kwargs = dict(self.base.rollout_kwargs(tokenizer))
        limit = kwargs.get("max_tokens")
        kwargs["max_tokens"] = self.max_tokens if limit is None else min(int(limit), self.max_tokens)
        return kwargs

    def split(self, text: str) -> list[str]:
        return self.base.split(text)


def _positive_int_or_none(value, name: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be None or a positive integer, got {value!r}")
    return value


class AStarDecoding(DecodingLoop):
    r"""A*-decoding (`custom_generate` loop): best-first search over reasoning steps with a process reward.

    Paper: "A*-Decoding: Token-Efficient Inference Scaling" (Giannis Chatziveroglou, arXiv 2505.13672). Official code:
    gchatz22/a_star_decoding (not readable here: the code index holds none of its files; only its README, through a
    mirror, was seen).

    Per prompt row, independently (a batch is searched row by row):

    1. The open set starts with the empty trace (the prompt), ``g = h = 0``.
    2. Pop the trace ``s`` with the lowest ``f(s) = cost_weight * g(s) + h(s)`` (ties: the deeper trace first, then
       the older one). If it is complete (eos, or the generation's stopping criteria such as ``max_new_tokens``),
       return it: this is the goal test of A*, applied when a trace is *popped*, not when it is generated.
    3. Otherwise sample ``k`` next steps of ``s`` from the model under the ``generate()`` sampling settings (a step ends
       at the first token containing ``delimiter``, at eos or after ``max_step_tokens`` tokens), score each new prefix
       ``s'`` with the process reward ``r(s')`` in ``[0, 1]`` and push it with ``h(s') = 1 - r(s')`` and
       ``g(s') = g(s) + h(s)``: the path cost is the process-reward loss ``1 - r`` accumulated over the earlier
       prefixes of the path, so ``f(s')`` is the summed loss of every prefix on the path. Since ``h >= 0``, ``f`` never
       decreases along a path, hence (with ``cost_weight >= 1``) traces are popped in non-decreasing ``f`` and the
       first complete trace popped has the lowest ``f`` of every complete trace the search generated.
    4. Before an expansion the budget is checked: ``max_generated_tokens`` (tokens of all sampled steps) and
       ``max_prm_calls`` (process-reward calls) are never exceeded: ``k`` shrinks to the remaining reward calls and
       the steps' length cap to the remaining tokens divided by ``k``; ``max_expansions`` bounds the expansions.
       When the budget ends first, the complete trace with the lowest ``f`` generated so far (not yet popped) is
       returned; if there is none, the open trace with the lowest ``f`` is returned as it is
       (``on_exhausted="partial"``) or rolled out greedily to the end of the generation (``"complete"``, default;
       the tokens of that rollout are counted in ``search_stats`` and, separately, as ``finish_tokens``: they are
       the only tokens outside the budget; the completed trace is not scored again, its reported ``f``, ``g`` and
       ``h`` are those of the open trace and its ``reward`` is ``None``).

    The ``return_dict_in_generate`` output gets ``search_stats`` (one :meth:`SearchStats.as_dict` per row) and
    ``a_star`` (per row: the expansions in order with their ``f``, ``g``, ``h`` and depth, the ``f`` of every complete
    trace generated, the returned trace's ``f``, reward and whether it is complete, why the search stopped, the
    budget, ``finish_tokens``).

    Args:
        tokenizer: the model's tokenizer (steps end at tokens whose text contains the delimiter; the process reward
            reads decoded text).
        prm (callable, *optional*): the process reward ``text -> float`` in ``[0, 1]``, called on the decoded trace
            so far (special tokens skipped; with ``include_prompt`` the decoded prompt is put before it). Default:
            :class:`~hf_decoding_ext.core.arithmetic.ArithmeticStepVerifier` without the answer (the fraction of true
            ``x op y = z`` statements; a stated answer must equal the last statement's result). A value outside
            ``[0, 1]`` raises a ``ValueError``.
        k (`int`, *optional*, defaults to 4): candidate steps sampled per expansion.
        max_generated_tokens (`int`, *optional*, defaults to 512): token budget per row (``None``: unlimited).
        max_prm_calls (`int`, *optional*): process-reward calls per row (``None``: unlimited).
        max_expansions (`int`, *optional*): expansions per row (``None``: unlimited).
        delimiter (`str`, *optional*, defaults to ``"\n"``): the step delimiter.
        max_step_tokens (`int`, *optional*, defaults to 64): the longest step.
        segmenter (:class:`~hf_decoding_ext.core.step_search.StepSegmenter`, *optional*): replaces ``delimiter`` /
            ``max_step_tokens`` (e.g. an entropy segmenter).
        cost_weight (`float`, *optional*, defaults to 1.0): weight of ``g`` in ``f`` (0: greedy best-first on the
            process reward alone; the ordering guarantee of step 2 needs ``>= 1``).
        on_exhausted (`str`, *optional*, defaults to ``"complete"``): ``"complete"`` or ``"partial"`` (see 4).
        include_prompt (`bool`, *optional*, defaults to `False`): score ``prompt + trace`` instead of the trace.
        seed (`int`, *optional*): seed of the generator that samples the steps (``None``: torch's global generator).

    Example:
        >>> from hf_decoding_ext import encode_prompts, load_model
        >>> from hf_decoding_ext.core.arithmetic import load_problems, problem_prompt
        >>> from hf_decoding_ext.search.a_star import AStarDecoding
        >>> model, tokenizer = load_model()  # doctest: +SKIP
        >>> inputs = encode_prompts(tokenizer, problem_prompt(load_problems("dev")[0]))  # doctest: +SKIP
        >>> loop = AStarDecoding(tokenizer, k=4, max_generated_tokens=256, seed=0)  # doctest: +SKIP
        >>> out = model.generate(**inputs, do_sample=True, temperature=0.7, top_k=0, max_new_tokens=64,
        ...                      custom_generate=loop, return_dict_in_generate=True)  # doctest: +SKIP
        >>> out.search_stats[0]["generated_tokens"], out.a_star[0]["returned"]  # doctest: +SKIP

    Deviations, stand-ins and what was confirmed:
        * Process reward: the rule-based :class:`~hf_decoding_ext.core.arithmetic.ArithmeticStepVerifier` (it checks
          the arithmetic of each ``x op y = z`` statement, not whether the steps solve the problem) stands in for the
          paper's learned PRMs (not available offline at this scale); any ``text -> [0, 1]`` callable plugs in. The
          root (the bare prompt) is not scored (``h = 0``): it is expanded first whatever its value.
        * Confirmed from the paper (abstract, and its method section as quoted by third-party summaries): states are
          partial reasoning traces, the start state is the prompt and goal states end with eos; a transition samples
          ``k`` candidate continuations from the policy and ranks successors by ``f = g + h``; ``h(s) = 1 - r(s)``
          with a PRM reward ``r`` in ``[0, 1]``; ``g`` is a cost accumulated from the start state; A* keeps an open
          set so the search can return to an earlier branch; budgets in tokens and PRM passes; comparison with
          best-of-N and particle filtering at equal budgets.
        * Not confirmed (the paper's text beyond that and the official code were not readable here): the exact form
          of ``g`` (here: the summed ``1 - r`` of the earlier prefixes, chosen so that ``f`` is monotone along paths),
          the paper's ``k`` (4 here), its step delimiter (``"\n"`` here; SmolLM2 writes one statement per line),
          its budgets, its tie-breaking (deeper first here), whether the goal test is made when a trace is popped
          (here, as in textbook A*) or when it is generated, and what the paper returns when the budget ends without
          a complete trace (``on_exhausted`` here). The ``cost_weight`` knob is this library's.
        * Sampling uses the ``generate()`` settings (temperature, top-k/top-p); the paper's sampling temperature was
          not confirmed.
    """

    supports_greedy = False  # k sampled candidates per expansion; greedy would give k copies of one step
    supports_output_scores = False  # the returned trace is assembled from steps; no per-token score rows are kept

    def __init__(self, tokenizer=None, prm: Callable[[str], float] | None = None, k: int = 4,
                 max_generated_tokens: int | None = 512, max_prm_calls: int | None = None,
                 max_expansions: int | None = None, delimiter: str = "\n", max_step_tokens: int = 64,
                 segmenter: StepSegmenter | None = None, cost_weight: float = 1.0, on_exhausted: str = "complete",
                 include_prompt: bool = False, seed: int | None = None):
        if tokenizer is None:
            raise ValueError("AStarDecoding needs the tokenizer (steps end at delimiter tokens and the process reward "
                             "reads text); got tokenizer=None")
        if prm is not None and not callable(prm):
            raise ValueError(f"prm must be a callable text -> [0, 1] or None, got {prm!r}")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        self.max_generated_tokens = _positive_int_or_none(max_generated_tokens, "max_generated_tokens")
        self.max_prm_calls = _positive_int_or_none(max_prm_calls, "max_prm_calls")
        self.max_expansions = _positive_int_or_none(max_expansions, "max_expansions")
        if segmenter is not None and not isinstance(segmenter, StepSegmenter):
            raise ValueError(f"segmenter must be a StepSegmenter or None, got {segmenter!r}")
        if isinstance(cost_weight, bool) or not isinstance(cost_weight, (int, float)) or not (
                math.isfinite(cost_weight) and cost_weight >= 0):
            raise ValueError(f"cost_weight must be a finite non-negative number, got {cost_weight!r}")
        if on_exhausted not in ON_EXHAUSTED:
            raise ValueError(f"on_exhausted must be one of {ON_EXHAUSTED}, got {on_exhausted!r}")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError(f"seed must be None or an integer, got {seed!r}")
        if prm is None:
            from hf_decoding_ext.core.arithmetic import ArithmeticStepVerifier

            prm = ArithmeticStepVerifier()
        self.tokenizer = tokenizer
        self.prm = prm
        self.k = k
        self.segmenter = segmenter if segmenter is not None else DelimiterSegmenter(delimiter, max_step_tokens)
        self.cost_weight = float(cost_weight)
        self.on_exhausted = on_exhausted
        self.include_prompt = bool(include_prompt)
        self.seed = seed

    # ------------------------------------------------------------------------------------------ pieces
    def budget(self) -> SearchBudget:
        """The per-row :class:`SearchBudget`."""
        return SearchBudget(max_generated_tokens=self.max_generated_tokens, max_scorer_calls=self.max_prm_calls)

    def reward(self, search: StepSearch, node: SearchNode) -> float:
        """The process reward of ``node``'s trace (one scorer call, counted)."""
        text = search.text(node)
        if self.include_prompt:
            text = search.prompt_text() + text
        value = self.prm(text)
        search.stats.scorer_calls += 1
        value = float(value)
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"the process reward must return a value in [0, 1], got {value!r} for {text!r}")
        return value

    def priority(self, node: SearchNode) -> float:
        return self.cost_weight * node.data["g"] + node.data["h"]

    # ------------------------------------------------------------------------------------------ search
    def search_row(self, state: GenerationState, row: int,
                   generator: torch.Generator | None = None) -> tuple[SearchNode, SearchStats, dict[str, Any]]:
        """A* over the steps of one prompt row; returns the chosen node, the counters and the trace info."""
        stats = SearchStats()
        search = StepSearch(state, row, self.segmenter, tokenizer=self.tokenizer, stats=stats)
        budget = self.budget()
        root = search.root
        root.data.update(g=0.0, h=0.0, reward=None)
        order = itertools.count()
        open_set: list[tuple[float, int, int, SearchNode]] = []

        def push(node: SearchNode) -> None:
            heapq.heappush(open_set, (self.priority(node), -node.depth, next(order), node))

        push(root)
        expansions: list[dict[str, Any]] = []
        goals: list[float] = []
        chosen, reason = None, None
        while open_set:
            f, _, _, node = open_set[0]
            if node.complete:
                heapq.heappop(open_set)
                chosen, reason = node, "goal"
                break
            remaining = budget.remaining(stats)
            if self.max_expansions is not None and len(expansions) >= self.max_expansions:
                reason = "max_expansions"
                break
            width = int(min(self.k, remaining["scorer_calls"], remaining["generated_tokens"]))
            if width < 1:
                reason = "budget"
                break
            cap = remaining["generated_tokens"] // width
            cap = int(min(cap, self.segmenter.max_tokens)) if math.isfinite(cap) else int(self.segmenter.max_tokens)
            heapq.heappop(open_set)
            segmenter = self.segmenter if cap >= self.segmenter.max_tokens else _CappedSegmenter(self.segmenter, cap)
            children = search.expand(node, width, do_sample=True, generator=generator, segmenter=segmenter)
            expansions.append({"f": f, "g": node.data["g"], "h": node.data["h"], "depth": node.depth,
                               "tokens": len(node.tokens), "children": len(children)})
            for child in children:
                r = self.reward(search, child)
                child.data.update(g=node.data["g"] + node.data["h"], h=1.0 - r, reward=r)
                if child.complete:
                    goals.append(self.priority(child))
                push(child)
        search_tokens = stats.generated_tokens
        finish_tokens = 0
        if chosen is None:
            complete = [entry for entry in open_set if entry[3].complete]
            if complete:
                chosen = min(complete)[3]
                reason = f"{reason}: best complete trace generated"
            else:
                chosen = min(open_set)[3]
                if self.on_exhausted == "complete":
                    finished = search.complete(chosen, 1, do_sample=False)
                    tokens = finished.token_lists()[0]
                    finish_tokens = len(tokens)
                    finished_node = SearchNode(tokens=chosen.tokens + tokens, step=tokens, parent=chosen,
                                               end=finished.ends[0], depth=chosen.depth + 1,
                                               data={"g": chosen.data["g"], "h": chosen.data["h"], "reward": None,
                                                     "completed_greedily": True})
                    reason = f"{reason}: lowest-f open trace completed greedily"
                    chosen = finished_node
                else:
                    reason = f"{reason}: lowest-f open trace returned incomplete"
        stats.stop()
        info = {
            "expansions": expansions,
            "goals": goals,
            "returned": {"f": self.priority(chosen), "g": chosen.data["g"], "h": chosen.data["h"],
                         "reward": chosen.data["reward"], "complete": chosen.complete, "depth": chosen.depth,
                         "tokens": len(chosen.tokens),
                         "completed_greedily": bool(chosen.data.get("completed_greedily", False))},
            "stop_reason": reason,
            "budget": {"max_generated_tokens": self.max_generated_tokens, "max_prm_calls": self.max_prm_calls,
                       "max_expansions": self.max_expansions},
            "search_tokens": search_tokens,
            "finish_tokens": finish_tokens,
        }
        return chosen, stats, info

    def run(self, state: GenerationState) -> dict[str, Any]:
        generator = None
        if self.seed is not None:
            generator = torch.Generator(device=state.device).manual_seed(self.seed)
        traces, all_stats, infos = [], [], []
        for row in range(state.batch_size):
            node, stats, info = self.search_row(state, row, generator)
            traces.append(list(node.tokens))
            all_stats.append(stats.as_dict())
            infos.append(info)
        append_trace(state, traces)
        return {"search_stats": all_stats, "a_star": infos}
