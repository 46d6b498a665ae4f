"""Step-level search: partial traces split into steps, nodes that share their prefix KV cache, budget counters.

A*-decoding, phi-decoding, CARDS, TQ* and planning-guided decoding all search over *partial traces* of one prompt:
a trace is cut into steps (at a delimiter such as ``"\\n"``, where the model's next-token entropy is high, or every
``n`` tokens), a value or reward is put on each prefix, and the search decides which prefix to extend next. This
module holds what they share:

* :class:`StepSegmenter` and its kinds (:class:`DelimiterSegmenter`, :class:`EntropySegmenter`,
  :class:`FixedLengthSegmenter`): where a step ends, as arguments of :func:`~hf_decoding_ext.core.rollout.rollout`.
* :class:`SearchNode`: a partial trace (its tokens after the prompt, its last step, log-probabilities, how the step
  ended, a value slot and free ``data``), with a parent pointer.
* :class:`StepSearch`: the search space of one prompt row of a :class:`~hf_decoding_ext.core.loop.GenerationState`.
  A node's KV cache is computed once, when it is first expanded, from a copy of its parent's (so siblings share the
  prefix's keys and values, and expanding a node costs one forward of its last step plus the rollout); ``expand``
  samples ``k`` next steps of a node in one batched rollout; ``complete`` rolls a node out to the end (foresight,
  rollout values); ``release`` frees a node's cache.
* :class:`SearchStats` and :class:`SearchBudget`: the counters every search reports (model forwards, generated
  tokens, rollouts, scorer calls, cache hits, wall time) and the limits it must respect.

Example:
    >>> import torch
    >>> from hf_decoding_ext.core.loop import DecodingLoop
    >>> from hf_decoding_ext.core.step_search import DelimiterSegmenter, StepSearch
    >>> class GreedyStepBeam(DecodingLoop):  # keep the most likely of 4 sampled lines, line after line
    ...     def __init__(self, tokenizer):
    ...         self.tokenizer = tokenizer
    ...     def run(self, state):
    ...         search = StepSearch(state, 0, DelimiterSegmenter("\\n"), tokenizer=self.tokenizer)
    ...         node = search.root
    ...         while not node.complete:
    ...             node = max(search.expand(node, 4, do_sample=True), key=lambda c: c.logprob)
    ...         state.append(torch.tensor([node.tokens]))
    >>> # model.generate(**inputs, do_sample=True, max_new_tokens=64, custom_generate=GreedyStepBeam(tokenizer))
"""

from __future__ import annotations

import abc
import math
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from hf_decoding_ext.core.entropy import entropy
from hf_decoding_ext.core.loop import GenerationState, clone_cache, select_cache
from hf_decoding_ext.core.rollout import END_CRITERIA, END_EOS, Rollout, rollout

COMPLETE_ENDS = (END_EOS, END_CRITERIA)
"""Step ends that complete a trace: an eos token, or the generation's stopping criteria (``max_new_tokens`` ...)."""


# --------------------------------------------------------------------------------------------- counters
@dataclass
class SearchStats:
    """Counters of one search (reported with its result so that efficiency claims can be checked).

    Attributes:
        model_calls: forwards of the model (any batch size).
        generated_tokens: tokens sampled or chosen by the model, in steps, rollouts and foresight alike (the
            papers' "tokens" budget).
        rollouts: continuations rolled out (each sampled step or completion counts once).
        scorer_calls: texts or prefixes scored by a reward / value / process-reward scorer.
        cache_hits: answers served from a cache instead of the model or the scorer (e.g. PG-TD's caches).
        program_runs: programs executed in the sandbox (code search).
        wall_seconds: elapsed time from the start of the search to the last :meth:`stop`.
    """

    model_calls: int = 0
    generated_tokens: int = 0
    rollouts: int = 0
    scorer_calls: int = 0
    cache_hits: int = 0
    program_runs: int = 0
    wall_seconds: float = 0.0
    _start: float = field(default_factory=time.perf_counter, repr=False)

    def stop(self) -> SearchStats:
        """Record the elapsed wall time; returns ``self``."""
        self.wall_seconds = time.perf_counter() - self._start
        return self

    def add(self, other: SearchStats) -> SearchStats:
        """Add another search's counters to these (wall times add up too); returns ``self``."""
        for name in ("model_calls", "generated_tokens", "rollouts", "scorer_calls", "cache_hits", "program_runs",
                     "wall_seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    def as_dict(self) -> dict[str, float]:
        return {"model_calls": self.model_calls, "generated_tokens": self.generated_tokens, "rollouts": self.rollouts,
                "scorer_calls": self.scorer_calls, "cache_hits": self.cache_hits,
                "program_runs": self.program_runs, "wall_seconds": round(self.wall_seconds, 4)}


def _check_limit(value, name: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be None or a positive integer, got {value!r}")
    return value


class SearchBudget:
    """Limits on a search's :class:`SearchStats` (``None``: unlimited).

    Args:
        max_generated_tokens: generated tokens (steps, rollouts and foresight together).
        max_model_calls: model forwards.
        max_scorer_calls: scorer calls.
        max_rollouts: rolled-out continuations.
        max_program_runs: sandboxed program executions.

    Example:
        >>> budget = SearchBudget(max_scorer_calls=2)
        >>> stats = SearchStats(scorer_calls=2)
        >>> budget.exhausted(stats), budget.remaining(stats)["scorer_calls"]
        (True, 0)
    """

    FIELDS = {"max_generated_tokens": "generated_tokens", "max_model_calls": "model_calls",
              "max_scorer_calls": "scorer_calls", "max_rollouts": "rollouts", "max_program_runs": "program_runs"}

    def __init__(self, max_generated_tokens: int | None = None, max_model_calls: int | None = None,
                 max_scorer_calls: int | None = None, max_rollouts: int | None = None,
                 max_program_runs: int | None = None):
        self.max_generated_tokens = _check_limit(max_generated_tokens, "max_generated_tokens")
        self.max_model_calls = _check_limit(max_model_calls, "max_model_calls")
        self.max_scorer_calls = _check_limit(max_scorer_calls, "max_scorer_calls")
        self.max_rollouts = _check_limit(max_rollouts, "max_rollouts")
        self.max_program_runs = _check_limit(max_program_runs, "max_program_runs")

    def remaining(self, stats: SearchStats) -> dict[str, float]:
        """What is left of each limit (``math.inf`` where unlimited), keyed by the counter's name."""
        out = {}
        for limit, counter in self.FIELDS.items():
            cap = getattr(self, limit)
            out[counter] = math.inf if cap is None else max(0, cap - getattr(stats, counter))
        return out

    def exhausted(self, stats: SearchStats) -> bool:
        """Whether any limit is reached."""
        return any(v <= 0 for v in self.remaining(stats).values())

    def as_dict(self) -> dict[str, int | None]:
        return {limit: getattr(self, limit) for limit in self.FIELDS}


# --------------------------------------------------------------------------------------------- segmenters
_DELIM_CACHE: weakref.WeakKeyDictionary[Any, dict[str, frozenset[int]]] = weakref.WeakKeyDictionary()


def delimiter_token_ids(tokenizer, delimiter: str) -> frozenset[int]:
    """Ids of the tokens whose decoded text contains ``delimiter`` (cached per tokenizer instance)."""
    try:
        per_tok = _DELIM_CACHE.setdefault(tokenizer, {})
    except TypeError:
        per_tok = {}
    if delimiter not in per_tok:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=False,
                                       clean_up_tokenization_spaces=False)
        per_tok[delimiter] = frozenset(i for i, t in enumerate(texts) if delimiter in t)
    return per_tok[delimiter]


class StepSegmenter(abc.ABC):
    """Where a step ends. :meth:`rollout_kwargs` gives the stop arguments of
    :func:`~hf_decoding_ext.core.rollout.rollout` that end a sampled step; ``max_tokens`` caps a step's length."""

    max_tokens: int = 64

    @abc.abstractmethod
    def rollout_kwargs(self, tokenizer) -> dict[str, Any]:
        """The stop arguments of :func:`~hf_decoding_ext.core.rollout.rollout` that end a step."""

    def split(self, text: str) -> list[str]:
        """Split a decoded trace into its steps (for process-reward scorers); default: one step."""
        return [text]


class DelimiterSegmenter(StepSegmenter):
    """A step ends at the first token whose text contains ``delimiter`` (included in the step), or after
    ``max_tokens`` tokens.

    Args:
        delimiter (`str`, *optional*, defaults to ``"\\n"``): the step delimiter.
        max_tokens (`int`, *optional*, defaults to 64): the longest step.

    Example:
        >>> DelimiterSegmenter("\\n").split("1 + 2 = 3\\n3 * 4 = 12\\n")
        ['1 + 2 = 3\\n', '3 * 4 = 12\\n']
    """

    def __init__(self, delimiter: str = "\n", max_tokens: int = 64):
        if not isinstance(delimiter, str) or not delimiter:
            raise ValueError(f"delimiter must be a non-empty string, got {delimiter!r}")
        self.delimiter = delimiter
        self.max_tokens = _check_limit(max_tokens, "max_tokens")

    def rollout_kwargs(self, tokenizer) -> dict[str, Any]:
        if tokenizer is None:
            raise ValueError(f"splitting steps at {self.delimiter!r} needs the tokenizer")
        kwargs: dict[str, Any] = {"stop_token_ids": delimiter_token_ids(tokenizer, self.delimiter),
                                  "max_tokens": self.max_tokens}
        if len(self.delimiter) > 1:  # the delimiter may also straddle two tokens
            kwargs.update(stop_strings=(self.delimiter,), tokenizer=tokenizer)
        return kwargs

    def split(self, text: str) -> list[str]:
        parts = text.split(self.delimiter)
        steps = [p + self.delimiter for p in parts[:-1]]
        if parts[-1]:
            steps.append(parts[-1])
        return steps


class EntropySegmenter(StepSegmenter):
    """A step ends once it has at least ``min_tokens`` tokens and the model's next-token entropy (nats, raw
    logits) reaches ``threshold``, or after ``max_tokens`` tokens (CARDS' uncertainty-based segmentation).

    Args:
        threshold (`float`): entropy threshold in nats.
        min_tokens (`int`, *optional*, defaults to 4): shortest step.
        max_tokens (`int`, *optional*, defaults to 64): longest step.

    Example:
        >>> import torch
        >>> seg = EntropySegmenter(threshold=1.0, min_tokens=2)
        >>> fire = seg.rollout_kwargs(None)["end_before"]
        >>> fire(torch.zeros(1, 8), 2).tolist(), fire(torch.zeros(1, 8), 1).tolist()  # entropy log(8) = 2.08
        ([True], [False])
    """

    def __init__(self, threshold: float, min_tokens: int = 4, max_tokens: int = 64):
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or threshold < 0:
            raise ValueError(f"threshold must be a non-negative number, got {threshold!r}")
        self.threshold = float(threshold)
        self.min_tokens = _check_limit(min_tokens, "min_tokens")
        self.max_tokens = _check_limit(max_tokens, "max_tokens")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({min_tokens}) must not exceed max_tokens ({max_tokens})")

    def fires(self, logits: torch.Tensor, length: int) -> torch.Tensor:
        if length < self.min_tokens:
            return torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
        return entropy(logits) >= self.threshold

    def rollout_kwargs(self, tokenizer) -> dict[str, Any]:
        return {"end_before": self.fires, "max_tokens": self.max_tokens}


class FixedLengthSegmenter(StepSegmenter):
    """A step is ``length`` tokens (shorter only at the end of the trace)."""

    def __init__(self, length: int):
        self.max_tokens = _check_limit(length, "length")

    def rollout_kwargs(self, tokenizer) -> dict[str, Any]:
        return {"max_tokens": self.max_tokens}


# --------------------------------------------------------------------------------------------- nodes
@dataclass(eq=False)
class SearchNode:
    """A partial trace of a step search.

    Attributes:
        tokens: the whole trace after the prompt (token ids).
        step: this node's last step (the suffix of ``tokens`` its parent did not have).
        parent: the node it extends (``None`` for the root).
        logprob: log-probability of ``step`` under the raw model; ``score``: under the proposal that drew it.
        end: how the step ended (``"stop"``/``"cap"``: a step boundary; ``"eos"``/``"criteria"``: the trace is
            complete; ``None`` for the root).
        depth: number of steps.
        value: a slot for the search's value of this prefix.
        data: free per-method data.
    """

    tokens: list[int]
    step: list[int] = field(default_factory=list)
    parent: SearchNode | None = None
    logprob: float = 0.0
    score: float = 0.0
    end: str | None = None
    depth: int = 0
    value: float | None = None
    data: dict[str, Any] = field(default_factory=dict)
    _cache: Any = field(default=None, repr=False)
    _logits: torch.Tensor | None = field(default=None, repr=False)

    @property
    def complete(self) -> bool:
        """Whether the trace is finished (eos or the generation's stopping criteria)."""
        return self.end in COMPLETE_ENDS

    @property
    def path(self) -> list[SearchNode]:
        """The nodes from the root to this one."""
        out, node = [], self
        while node is not None:
            out.append(node)
            node = node.parent
        return out[::-1]

    @property
    def cumulative_logprob(self) -> float:
        """Sum of the steps' log-probabilities along the path."""
        return sum(n.logprob for n in self.path)

    @property
    def steps(self) -> list[list[int]]:
        """The steps of the trace, in order."""
        return [n.step for n in self.path[1:]]


class StepSearch:
    """The step-search space of one prompt row of a decoding state.

    Args:
        state: the decoding state (its processors, stopping criteria, generation config and any prefilled cache of
            the row are used; the state itself is not changed).
        row: the prompt row.
        segmenter: where steps end (:class:`StepSegmenter`).
        tokenizer: needed by delimiter segmenters and :meth:`text`.
        stats: the counters to update (a new :class:`SearchStats` if ``None``).
        process: ``"state"`` (default): sample from the state's processed distribution (the caller's
            ``generate()`` processors: temperature, top-k ...); ``None``: the raw model; or any
            ``(input_ids, logits) -> scores`` hook.

    Stateful logits processors (:class:`~hf_decoding_ext.core.lifecycle.StatefulLogitsProcessor`) are refused: a
    search rolls out many unrelated prefixes of one row.
    """

    def __init__(self, state: GenerationState, row: int, segmenter: StepSegmenter | None = None, *, tokenizer=None,
                 stats: SearchStats | None = None, process: Callable | str | None = "state"):
        from hf_decoding_ext.core import lifecycle

        if lifecycle.has_stateful(state.logits_processor):
            raise ValueError("a step search rolls out many prefixes of one prompt and cannot keep a stateful logits "
                             "processor's per-row state exact; use it with plain generate()")
        if not 0 <= row < state.batch_size:
            raise ValueError(f"row must index the state's batch of {state.batch_size}, got {row!r}")
        self.state, self.row = state, row
        self.segmenter = segmenter
        self.tokenizer = tokenizer
        self.stats = stats if stats is not None else SearchStats()
        self.process = state.logits_processor if process == "state" else process
        self.prompt_ids = state.input_ids[row:row + 1]
        self.prompt_mask = state.attention_mask[row:row + 1]
        self.root = SearchNode(tokens=[])
        cached = state.cache.get_seq_length() if state.cache is not None else 0
        self._root_cache = select_cache(state.cache, torch.tensor([row], device=state.device)) if cached else None

    # ------------------------------------------------------------------------------------------ views
    def node_state(self, node: SearchNode, cache=None) -> GenerationState:
        """A one-row view of the state holding ``node``'s trace (sharing the state's model, processors, stopping
        criteria and forward counter) on ``cache``."""
        view = object.__new__(GenerationState)
        view.__dict__.update(self.state.__dict__)
        extra = torch.tensor([node.tokens], dtype=self.prompt_ids.dtype, device=self.prompt_ids.device)
        view.input_ids = torch.cat([self.prompt_ids, extra], dim=1)
        view.attention_mask = torch.cat([self.prompt_mask, self.prompt_mask.new_ones(extra.shape)], dim=1)
        view.unfinished = torch.ones(1, dtype=torch.bool, device=self.prompt_ids.device)
        view.cache = cache
        view.scores = view.logits = None
        view.streamer = None
        return view

    def _forward(self, view: GenerationState):
        before = self.state.stats["forwards"]
        out = view.forward()
        self.stats.model_calls += self.state.stats["forwards"] - before
        return out.logits[:, -1, :]

    def materialize(self, node: SearchNode) -> torch.Tensor:
        """Compute (once) ``node``'s KV cache (from a copy of its parent's) and its raw next-token logits
        ``(1, vocab)``."""
        if node._logits is None:
            if node.parent is None:
                base = clone_cache(self._root_cache) if self._root_cache is not None else None
            else:
                self.materialize(node.parent)
                base = clone_cache(node.parent._cache)
            if base is None:
                from transformers import DynamicCache

                base = DynamicCache(config=self.state.model.config)
            view = self.node_state(node, base)
            node._logits = self._forward(view)
            node._cache = view.cache
        return node._logits

    def release(self, node: SearchNode) -> None:
        """Free ``node``'s cache (it is recomputed if the node is expanded again)."""
        node._cache = None
        node._logits = None

    # ------------------------------------------------------------------------------------------ moves
    def _rollout(self, node: SearchNode, k: int, **kwargs) -> Rollout:
        logits = self.materialize(node)
        view = self.node_state(node, node._cache)
        before = self.state.stats["forwards"]
        r = rollout(view, k, logits=logits, process=self.process, use_stopping_criteria=True, **kwargs)
        self.stats.model_calls += self.state.stats["forwards"] - before
        self.stats.generated_tokens += int(r.lengths.sum())
        self.stats.rollouts += k
        return r

    def children_of(self, node: SearchNode, r: Rollout) -> list[SearchNode]:
        """Wrap each continuation of a rollout from ``node`` as a child node."""
        out = []
        for i, toks in enumerate(r.token_lists()):
            out.append(SearchNode(tokens=node.tokens + toks, step=toks, parent=node, logprob=float(r.logprobs[i]),
                                  score=float(r.scores[i]), end=r.ends[i], depth=node.depth + 1))
        return out

    def expand(self, node: SearchNode, k: int, *, do_sample: bool = True, generator: torch.Generator | None = None,
               first_tokens: torch.Tensor | None = None, segmenter: StepSegmenter | None = None) -> list[SearchNode]:
        """Sample (or, with ``do_sample=False``, greedily extend) ``k`` next steps of ``node`` in one batched
        rollout; returns the ``k`` children (not yet materialised). ``first_tokens`` ``(k,)`` forces each child's
        first token."""
        if node.complete:
            raise ValueError("cannot expand a complete trace")
        segmenter = segmenter or self.segmenter
        if segmenter is None:
            raise ValueError("expand needs a StepSegmenter (pass one to StepSearch or to expand)")
        kwargs = segmenter.rollout_kwargs(self.tokenizer)
        if first_tokens is not None:
            kwargs["first_tokens"] = torch.as_tensor(first_tokens).reshape(1, k)
        r = self._rollout(node, k, do_sample=do_sample, generator=generator, **kwargs)
        return self.children_of(node, r)

    def complete(self, node: SearchNode, k: int = 1, *, do_sample: bool = False,
                 generator: torch.Generator | None = None, max_tokens: int | None = None,
                 first_tokens: torch.Tensor | None = None, return_steps: bool = False) -> Rollout:
        """Roll ``node`` out ``k`` times to the end of the generation (eos or the stopping criteria; at most
        ``max_tokens`` more tokens); returns the :class:`~hf_decoding_ext.core.rollout.Rollout` of the
        continuations (foresight, rollout values; with ``return_steps`` also the scores and logits that chose each
        token). The node's children are not created."""
        if node.complete:
            raise ValueError("the trace is already complete")
        kwargs: dict[str, Any] = {"max_tokens": max_tokens, "return_steps": return_steps}
        if first_tokens is not None:
            kwargs["first_tokens"] = torch.as_tensor(first_tokens).reshape(1, k)
        return self._rollout(node, k, do_sample=do_sample, generator=generator, **kwargs)

    # ------------------------------------------------------------------------------------------ text
    def text(self, node: SearchNode | list[int], skip_special_tokens: bool = True) -> str:
        """The decoded trace of ``node`` (or a token list)."""
        if self.tokenizer is None:
            raise ValueError("decoding a trace needs the tokenizer")
        tokens = node.tokens if isinstance(node, SearchNode) else list(node)
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def prompt_text(self) -> str:
        """The decoded prompt (attended positions)."""
        if self.tokenizer is None:
            raise ValueError("decoding the prompt needs the tokenizer")
        ids = self.prompt_ids[0][self.prompt_mask[0].bool()].tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def append_trace(state: GenerationState, traces: list[list[int]]) -> int:
    """Append one token list per state row (right-padded with the pad token; ``state.append`` honours eos and the
    stopping criteria). Returns the number of positions appended."""
    if len(traces) != state.batch_size:
        raise ValueError(f"need one trace per row ({state.batch_size}), got {len(traces)}")
    width = max((len(t) for t in traces), default=0)
    if width == 0:
        return 0
    pad = int(state.pad_token_id) if state.pad_token_id is not None else 0
    block = torch.full((state.batch_size, width), pad, dtype=torch.long, device=state.device)
    for row, toks in enumerate(traces):
        if toks:
            block[row, :len(toks)] = torch.tensor(toks, dtype=torch.long)
    return state.append(block)
