"""Branch a decoding state and roll out continuations of its rows in one batch.

Lookahead methods (Cautious NTP's trials up to punctuation, AdaDec's reranking rollouts, IPS's candidate forwards,
step-level searches) all need the same thing: copy the KV cache of some rows of a :class:`GenerationState`, extend
each row by ``k`` continuations that run as one batch (one forward per step for all of them), stop each continuation
on its own condition, and score it. :class:`Branch` is that copy; :func:`rollout` runs continuations on it until each
one ends and returns a :class:`Rollout` (tokens, lengths, summed log-probabilities, how each ended).

The state itself is never changed by a branch or a rollout (its cache, ``input_ids`` and attention mask stay as they
are) unless :meth:`Branch.commit` adopts a branch as the state's continuation.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hf_decoding_ext.core import lifecycle
from hf_decoding_ext.core.loop import GenerationState, select_cache

END_EOS = "eos"
"""The continuation emitted an eos token of the generation config."""
END_CRITERIA = "criteria"
"""The state's stopping criteria fired on the continued sequence (``max_new_tokens``, ``max_length``, custom ...)."""
END_STOP = "stop"
"""The continuation emitted one of the caller's stop tokens or its text contains one of the caller's stop strings."""
END_CAP = "cap"
"""The continuation reached ``max_tokens`` tokens."""

Processor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(input_ids (n, len), logits (n, vocab)) -> scores (n, vocab)``, the ``LogitsProcessorList`` convention."""

# --------------------------------------------------------------------------------------------- stop token sets
DEFAULT_PUNCTUATION = ".,;:!?\n)]}"
"""The default set of :func:`punctuation_token_ids`: Cautious NTP's punctuation (``. , \\n ? ! : ; ) ] }``)."""

_PUNCT_CACHE: weakref.WeakKeyDictionary[Any, dict[str, frozenset[int]]] = weakref.WeakKeyDictionary()


def punctuation_token_ids(tokenizer, punctuation: str = DEFAULT_PUNCTUATION) -> frozenset[int]:
    """Ids of the tokens whose decoded text ends in one of ``punctuation`` (trailing spaces/tabs ignored; a
    trailing newline counts when ``"\\n"`` is in ``punctuation``). Computed once per tokenizer instance and cached
    (weakly, so the cache dies with the tokenizer). Use it as ``stop_token_ids`` of :func:`rollout` to end
    continuations at punctuation.

    Example:
        >>> from hf_decoding_ext.core.models import load_model
        >>> from hf_decoding_ext.core.rollout import punctuation_token_ids
        >>> _, tokenizer = load_model()  # doctest: +SKIP
        >>> tokenizer.encode(".", add_special_tokens=False)[0] in punctuation_token_ids(tokenizer)  # doctest: +SKIP
        True
    """
    if not punctuation:
        raise ValueError("punctuation must contain at least one character")
    try:
        per_tok = _PUNCT_CACHE.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: compute without caching
        per_tok = {}
    if punctuation in per_tok:
        return per_tok[punctuation]
    chars = set(punctuation)
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    ids = set()
    for i, text in enumerate(texts):
        if "\n" in chars and text.endswith("\n"):
            ids.add(i)
            continue
        stripped = text.rstrip(" \t")
        if stripped and stripped[-1] in chars:
            ids.add(i)
    result = frozenset(ids)
    per_tok[punctuation] = result
    return result


# --------------------------------------------------------------------------------------------- branches
def _as_rows(rows, batch_size: int, device) -> torch.Tensor:
    if rows is None:
        return torch.arange(batch_size, device=device)
    rows = torch.as_tensor(rows, dtype=torch.long, device=device)
    if rows.dim() != 1 or rows.numel() == 0:
        raise ValueError(f"rows must be a non-empty 1-D list of row indices, got shape {tuple(rows.shape)}")
    if bool(((rows < 0) | (rows >= batch_size)).any()):
        raise ValueError(f"rows must index the state's batch of {batch_size}, got {rows.tolist()}")
    return rows


class Branch:
    r"""Continuations of some rows of a :class:`GenerationState` on their own copy of its KV cache.

    The branch holds ``len(rows) * k`` sequences in row-major order (continuation ``c`` of ``rows[i]`` is branch row
    ``i * k + c``, as with ``repeat_interleave``), each starting as a copy of its state row (``input_ids``, attention
    mask, cached keys/values). Tokens added with :meth:`extend` and fed with :meth:`forward` only touch the copy; the
    copy of the cache is made on the first forward, so a branch whose continuations all end without a forward costs
    nothing. :meth:`keep` drops branch rows (e.g. finished continuations); :meth:`commit` makes a branch holding one
    continuation per state row the state's own continuation.

    :meth:`process` applies the state's logits processors on the branch rows through a :func:`fork
    <hf_decoding_ext.core.lifecycle.fork>` of them (made on first use): stateful processors (a contrastive second
    view, Mirostat's ``mu``) continue from the state rows' own state, follow :meth:`keep`, and the state's processors
    are untouched unless :meth:`commit` adopts the branch's.

    Args:
        state: the decoding state to branch.
        rows: state rows to branch (``(m,)``; rows may repeat); ``None``: every row.
        k: continuations per branched row.

    Example:
        >>> import torch
        >>> from hf_decoding_ext.core.rollout import Branch
        >>> # inside a DecodingLoop.run(state): feed the top-3 candidates of every row in one batched forward
        >>> def candidate_forward(state, scores):  # scores: (batch, vocab)
        ...     branch = Branch(state, k=3)
        ...     branch.extend(scores.topk(3, dim=-1).indices.reshape(-1))
        ...     return branch, branch.forward(output_hidden_states=True)  # logits (batch * 3, 1, vocab)
    """

    def __init__(self, state: GenerationState, rows: Sequence[int] | torch.Tensor | None = None, k: int = 1):
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        self.state = state
        self.rows = _as_rows(rows, state.batch_size, state.device).repeat_interleave(k)
        self.input_ids = state.input_ids[self.rows]
        self.attention_mask = state.attention_mask[self.rows]
        self.start = state.input_ids.shape[1]
        self._cache = None
        self._committed = False
        self._processors = None  # fork of the state's logits processors on the branch rows

    @property
    def size(self) -> int:
        """Number of sequences in the branch."""
        return self.input_ids.shape[0]

    @property
    def tokens(self) -> torch.Tensor:
        """The tokens added to the branch so far, ``(size, n_added)``."""
        return self.input_ids[:, self.start:]

    @property
    def cache(self):
        """The branch's KV cache (a copy of the state's cache rows, made on first use)."""
        self._check_open()
        if self._cache is None:
            self._cache = select_cache(self.state.cache, self.rows)
        return self._cache

    def _check_open(self) -> None:
        if self._committed:
            raise RuntimeError("this branch was committed to its state; branch again to continue")

    def extend(self, tokens: torch.Tensor) -> None:
        """Append ``tokens`` (``(size,)`` or ``(size, t)``) to every branch sequence (not fed yet)."""
        self._check_open()
        tokens = torch.as_tensor(tokens, device=self.input_ids.device)
        if tokens.dim() == 1:
            tokens = tokens[:, None]
        if tokens.dim() != 2 or tokens.shape[0] != self.size:
            raise ValueError(f"tokens must have shape ({self.size},) or ({self.size}, t), got {tuple(tokens.shape)}")
        self.input_ids = torch.cat([self.input_ids, tokens.to(self.input_ids.dtype)], dim=1)
        self.attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones(tokens.shape)], dim=1)

    @property
    def processors(self):
        """The state's logits processors forked onto the branch rows (made on first use)."""
        self._check_open()
        if self._processors is None:
            self._processors = lifecycle.fork(self.state.logits_processor, self.rows, caller="a Branch")
        return self._processors

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """The state's logits processors (their branch fork) applied to next-token ``logits`` ``(size, vocab)``
        after each branch sequence."""
        return self.processors(self.input_ids, logits)

    def forward(self, **kwargs):
        """Run the model on the branch's uncached tokens (see :meth:`GenerationState.forward` for ``kwargs``)."""
        return self.state.forward(cache=self.cache, input_ids=self.input_ids, attention_mask=self.attention_mask,
                                  **kwargs)

    def next_token_logits(self) -> torch.Tensor:
        """Raw float32 next-token logits ``(size, vocab)`` after each branch sequence. When the cache already covers
        the whole sequence, the copy is cropped by one position and the last token is fed again."""
        cache = self.cache
        extra = cache.get_seq_length() - self.input_ids.shape[1] + 1
        if extra > 0:
            cache.crop(-extra)
        return self.forward().logits[:, -1, :]

    def keep(self, index: torch.Tensor) -> None:
        """Keep only the branch rows ``index`` (``(n,)`` long, in the new order)."""
        self._check_open()
        index = torch.as_tensor(index, dtype=torch.long, device=self.input_ids.device)
        self.rows = self.rows[index]
        self.input_ids = self.input_ids[index]
        self.attention_mask = self.attention_mask[index]
        if self._cache is not None:
            self._cache.batch_select_indices(index)
        if self._processors is not None:
            lifecycle.select_rows(self._processors, index)

    def commit(self) -> int:
        """Make this branch the state's continuation: the state takes the branch's cache and appends its tokens
        (through :meth:`GenerationState.append`, so eos, stopping criteria and the streamer apply) and its logits
        processors adopt the branch fork's state (when :meth:`process` was used). The branch must hold exactly one
        sequence per state row, in order. Returns the number of positions appended."""
        self._check_open()
        if not torch.equal(self.rows, torch.arange(self.state.batch_size, device=self.rows.device)):
            raise ValueError(f"commit needs one branch row per state row in order, got rows {self.rows.tolist()}")
        if self._cache is not None:
            self.state.cache = self._cache
        if self._processors is not None:
            lifecycle.adopt(self.state.logits_processor, self._processors)
        self._committed = True
        return self.state.append(self.tokens) if self.tokens.shape[1] else 0


@dataclass
class Rollout:
    """The continuations of a :func:`rollout`, one row per continuation (row-major: ``k`` per branched state row).

    Attributes:
        tokens: continuation tokens ``(n, max_length)`` (padded after each continuation's end with the pad token).
        lengths: number of tokens of each continuation ``(n,)``.
        logprobs: summed log-probabilities of each continuation under the raw model distribution ``(n,)``, float64.
        scores: summed log-probabilities under the processed distribution (``log_softmax`` of the ``process``
            hook's scores; equal to ``logprobs`` without a hook) ``(n,)``, float64.
        ends: how each continuation ended: ``"eos"``, ``"criteria"``, ``"stop"`` or ``"cap"``.
        rows: the state row each continuation extends ``(n,)``.
        step_scores, step_logits: with ``return_steps=True``, the processed scores and raw logits that chose each
            token, one ``(length_i, vocab)`` tensor per continuation.
        processor_states: with ``keep_processor_states=True``, the state's logits processors as each continuation
            left them (a one-row :func:`~hf_decoding_ext.core.lifecycle.fork` per continuation): adopt the chosen
            one (:func:`~hf_decoding_ext.core.lifecycle.adopt`) when appending its tokens to the state, so that
            stateful processors continue exactly as if the state had decoded them.
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    logprobs: torch.Tensor
    scores: torch.Tensor
    ends: list[str]
    rows: torch.Tensor
    step_scores: list[torch.Tensor] | None = None
    step_logits: list[torch.Tensor] | None = None
    processor_states: list | None = None

    def token_lists(self) -> list[list[int]]:
        """Each continuation's tokens as a list (without padding)."""
        return [self.tokens[i, :n].tolist() for i, n in enumerate(self.lengths.tolist())]


class _Ends:
    """The stop predicates of one rollout, evaluated on the continuations that are still running."""

    def __init__(self, state: GenerationState, max_tokens, stop_token_ids, stop_strings, tokenizer, stop_on_eos,
                 use_stopping_criteria):
        if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)
                                       or max_tokens < 1):
            raise ValueError(f"max_tokens must be None or a positive integer, got {max_tokens!r}")
        if max_tokens is None and not use_stopping_criteria:
            raise ValueError("a rollout needs a bound: pass max_tokens or use_stopping_criteria=True")
        if isinstance(stop_strings, str):
            stop_strings = (stop_strings,)
        stop_strings = tuple(stop_strings or ())
        if any(not isinstance(s, str) or not s for s in stop_strings):
            raise ValueError(f"stop_strings must be non-empty strings, got {stop_strings!r}")
        if stop_strings and tokenizer is None:
            raise ValueError(f"stop_strings {stop_strings!r} need the tokenizer to decode the continuations")
        device = state.device
        eos = getattr(state.generation_config, "_eos_token_tensor", None) if stop_on_eos else None
        self.eos = None if eos is None else eos.to(device).reshape(-1)
        ids = sorted({int(i) for i in stop_token_ids}) if stop_token_ids is not None else []
        self.stop_ids = torch.tensor(ids, dtype=torch.long, device=device) if ids else None
        self.stop_strings, self.tokenizer = stop_strings, tokenizer
        self.max_tokens = max_tokens
        self.criteria = state.stopping_criteria if use_stopping_criteria else None

    def __call__(self, branch: Branch, last: torch.Tensor, length: int) -> list[str | None]:
        """Why each running continuation ends after its newest token ``last`` (``None``: it goes on). Precedence:
        eos, the state's stopping criteria, the caller's stop tokens/strings, the token cap."""
        n = last.shape[0]
        none = torch.zeros(n, dtype=torch.bool, device=last.device)
        eos = torch.isin(last, self.eos) if self.eos is not None else none
        crit = self.criteria(branch.input_ids, None).to(last.device) if self.criteria is not None else none
        stop = torch.isin(last, self.stop_ids) if self.stop_ids is not None else none
        if self.stop_strings:
            texts = self.tokenizer.batch_decode(branch.tokens, skip_special_tokens=False,
                                                clean_up_tokenization_spaces=False)
            hit = [any(s in t for s in self.stop_strings) for t in texts]
            stop = stop | torch.tensor(hit, dtype=torch.bool, device=last.device)
        cap = self.max_tokens is not None and length >= self.max_tokens
        ends: list[str | None] = []
        for e, c, s in zip(eos.tolist(), crit.tolist(), stop.tolist()):
            ends.append(END_EOS if e else END_CRITERIA if c else END_STOP if s else END_CAP if cap else None)
        return ends


class _BranchProcess:
    """``process`` hook of a rollout that runs the state's processors on their branch fork."""

    def __init__(self, branch: Branch):
        self.branch = branch

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return self.branch.processors(input_ids, logits)


@torch.no_grad()
def rollout(state: GenerationState, k: int = 1, *, rows: Sequence[int] | torch.Tensor | None = None,
            first_tokens: torch.Tensor | None = None, logits: torch.Tensor | None = None,
            scores: torch.Tensor | None = None, process: Processor | None = None, do_sample: bool = False,
            generator: torch.Generator | None = None, max_tokens: int | None = None,
            stop_token_ids: Iterable[int] | None = None, stop_strings: str | Sequence[str] = (), tokenizer=None,
            stop_on_eos: bool = True, use_stopping_criteria: bool = False, return_steps: bool = False,
            keep_processor_states: bool = False,
            end_before: Callable[[torch.Tensor, int], torch.Tensor] | None = None) -> Rollout:
    r"""Roll out ``k`` continuations of each of the state's ``rows`` in one batch, each until its own end.

    The rows are branched (:class:`Branch`: a copy of their cache, the state is left untouched) and every running
    continuation is extended by one token per step, all of them in one batched forward. A token is chosen from the
    processed scores (the ``process`` hook applied to the raw logits, e.g. the caller's ``state.logits_processor``):
    the argmax, or a sample with ``do_sample=True`` (from ``generator`` if given). A continuation ends, in this order
    of precedence, at

    * ``"eos"``: an eos token of the generation config (``stop_on_eos``);
    * ``"criteria"``: the state's stopping criteria fire on the continued sequence (``use_stopping_criteria``);
    * ``"stop"``: one of ``stop_token_ids`` (e.g. punctuation, a step delimiter token), or its decoded text
      contains one of ``stop_strings`` (a step delimiter such as ``"\n\n"``; needs ``tokenizer``);
    * ``"cap"``: ``max_tokens`` tokens;

    the ending token included. ``end_before`` adds a test on the *next* token's distribution: a running
    continuation of ``length >= 1`` tokens whose raw next-token logits make ``end_before(logits, length)`` true ends
    there (``"stop"``) without drawing that token (e.g. CARDS' entropy-triggered segment boundary). Ended continuations leave the batch. At least one of ``max_tokens`` and
    ``use_stopping_criteria`` bounds the rollout.

    Args:
        state: the decoding state (its cache may cover any prefix of ``input_ids``).
        k: continuations per row.
        rows: the state rows to continue (``(m,)``); ``None``: every row.
        first_tokens: forced first tokens ``(m, k)`` (or ``(m * k,)``), e.g. candidates to rerank; their
            log-probabilities count in the sums.
        logits: raw next-token logits ``(m, vocab)`` of the rows when the caller already has them (saves a forward);
            ``None``: computed on the branch.
        scores: the processed scores ``(m, vocab)`` that go with ``logits`` (``None``: ``process(logits)``).
        process: logits processing hook ``(input_ids, logits) -> scores`` (``None``: the raw logits). The state's
            own ``state.logits_processor`` runs as :meth:`Branch.process`, on a fork of its stateful processors
            (:mod:`hf_decoding_ext.core.lifecycle`), so the continuations never touch the state's processors.
        do_sample: sample tokens (multinomial over the processed distribution) instead of taking the argmax.
        generator: random generator for sampling.
        max_tokens: cap on a continuation's length (forced first token included).
        stop_token_ids, stop_strings, tokenizer: the caller's stop predicates.
        stop_on_eos: end a continuation at an eos token.
        use_stopping_criteria: end a continuation when the state's stopping criteria fire.
        return_steps: also return the per-token processed scores and raw logits (:attr:`Rollout.step_scores`).
        keep_processor_states: also return the state's processors as each continuation left them
            (:attr:`Rollout.processor_states`).
        end_before: ``(raw_logits (n_running, vocab), length) -> (n_running,) bool``: end these continuations before
            their next token (see above).

    Returns:
        a :class:`Rollout`.

    Example:
        >>> from hf_decoding_ext.core.models import load_model, encode_prompts
        >>> from hf_decoding_ext.core.loop import DecodingLoop
        >>> from hf_decoding_ext.core.rollout import rollout
        >>> class BestOfFourSentences(DecodingLoop):  # sample 4 sentences, append the most likely one
        ...     def run(self, state):
        ...         while not state.done:
        ...             r = rollout(state, 4, process=state.logits_processor, do_sample=True,
        ...                         stop_strings=".", tokenizer=tokenizer, use_stopping_criteria=True)
        ...             best = int((r.scores / r.lengths).argmax())
        ...             state.append(r.tokens[best:best + 1, :int(r.lengths[best])])
        >>> model, tokenizer = load_model()  # doctest: +SKIP
        >>> out = model.generate(**encode_prompts(tokenizer, "Tell me about owls."), do_sample=True,
        ...                      custom_generate=BestOfFourSentences(), max_new_tokens=40)  # doctest: +SKIP
    """
    ends_of = _Ends(state, max_tokens, stop_token_ids, stop_strings, tokenizer, stop_on_eos, use_stopping_criteria)
    branch = Branch(state, rows, k)
    if process is not None and process is state.logits_processor:
        process = _BranchProcess(branch)
    n, m = branch.size, branch.size // k
    device = state.device
    if first_tokens is not None:
        first_tokens = torch.as_tensor(first_tokens, device=device).reshape(-1)
        if first_tokens.numel() != n:
            raise ValueError(f"first_tokens must hold {m} x {k} tokens, got {first_tokens.numel()}")
    if scores is not None and logits is None:
        raise ValueError("scores need the raw logits they were computed from (pass logits=...)")
    if logits is not None:
        if logits.dim() != 2 or logits.shape[0] != m:
            raise ValueError(f"logits must have shape ({m}, vocab), got {tuple(logits.shape)}")
        if scores is not None and scores.shape != logits.shape:
            raise ValueError(f"scores must have the shape of logits {tuple(logits.shape)}, got {tuple(scores.shape)}")
        raw = logits.float().repeat_interleave(k, dim=0)
    else:
        raw = branch.next_token_logits()
    all_rows = branch.rows

    pad = state.pad_token_id if state.pad_token_id is not None else 0
    columns: list[torch.Tensor] = []
    lengths = torch.zeros(n, dtype=torch.long, device=device)
    sum_raw = torch.zeros(n, dtype=torch.float64, device=device)
    sum_proc = torch.zeros(n, dtype=torch.float64, device=device)
    ends: list[str | None] = [None] * n
    steps_s: list[list[torch.Tensor]] | None = [[] for _ in range(n)] if return_steps else None
    steps_l: list[list[torch.Tensor]] | None = [[] for _ in range(n)] if return_steps else None
    active = torch.arange(n, device=device)  # branch row j holds continuation active[j]
    proc_states: list | None = [None] * n if keep_processor_states else None
    step = 0
    while True:
        if end_before is not None and step > 0:
            fire = torch.as_tensor(end_before(raw, step), dtype=torch.bool, device=device).reshape(-1)
            if fire.shape[0] != active.shape[0]:
                raise ValueError(f"end_before must return {active.shape[0]} flags, got {fire.shape[0]}")
            if bool(fire.any()):
                for j in fire.nonzero().flatten().tolist():
                    ends[int(active[j])] = END_STOP
                    if proc_states is not None:
                        proc_states[int(active[j])] = lifecycle.fork(branch.processors, torch.tensor([j]))
                if bool(fire.all()):
                    break
                keep = (~fire).nonzero().flatten()
                branch.keep(keep)
                active = active[keep]
                raw = raw[keep]
        raw_logp = torch.log_softmax(raw, dim=-1)  # before the hook, which may work in place
        if step == 0 and scores is not None:
            proc = scores.repeat_interleave(k, dim=0)
        else:
            proc = raw if process is None else process(branch.input_ids, raw)
        if first_tokens is not None and step == 0:
            nxt = first_tokens
        elif do_sample:
            nxt = torch.multinomial(torch.softmax(proc, dim=-1), num_samples=1, generator=generator).squeeze(1)
        else:
            nxt = proc.argmax(dim=-1)
        nxt = nxt.to(device=device, dtype=torch.long)
        column = torch.full((n,), int(pad), dtype=torch.long, device=device)
        column[active] = nxt
        columns.append(column)
        lengths[active] += 1
        sum_raw[active] += raw_logp.gather(1, nxt[:, None]).squeeze(1).double()
        sum_proc[active] += torch.log_softmax(proc, dim=-1).gather(1, nxt[:, None]).squeeze(1).double()
        if return_steps:
            for j, i in enumerate(active.tolist()):
                steps_s[i].append(proc[j])
                steps_l[i].append(raw[j])
        branch.extend(nxt)
        step += 1
        why = ends_of(branch, nxt, step)
        still = [j for j, w in enumerate(why) if w is None]
        for j, w in enumerate(why):
            if w is not None:
                ends[int(active[j])] = w
                if proc_states is not None:
                    proc_states[int(active[j])] = lifecycle.fork(branch.processors, torch.tensor([j]))
        if not still:
            break
        if len(still) < len(why):  # ended continuations leave the batch
            keep = torch.tensor(still, dtype=torch.long, device=device)
            branch.keep(keep)
            active = active[keep]
        raw = branch.forward().logits[:, -1, :]
    return Rollout(
        tokens=torch.stack(columns, dim=1),
        lengths=lengths,
        logprobs=sum_raw,
        scores=sum_proc,
        ends=ends,
        rows=all_rows,
        step_scores=[torch.stack(s) for s in steps_s] if return_steps else None,
        step_logits=[torch.stack(s) for s in steps_l] if return_steps else None,
        processor_states=proc_states,
    )
