"""Extractive decoding: outputs restricted to spans of a context, and the exact most probable span.

Paper: "How Optimal is Greedy Decoding for Extractive Question Answering?" (Castel, Ram, Efrat and Levy, AKBC 2022,
arXiv 2108.05857).

* :class:`SpanIndex`: the contiguous spans of a context (one or several token sequences), as an implicit suffix trie.
* :class:`ExtractiveSpanLogitsProcessor`: a ``LogitsProcessor`` that lets greedy search or sampling produce only spans
  of the context followed by eos (the paper's "greedy" baseline made extractive).
* :class:`ExactExtractiveDecoding`: a ``custom_generate`` loop returning the most probable span (the paper's
  *exact-extract*), found by an exact best-first (branch-and-bound) search over the trie of spans.
* :func:`score_spans`: brute-force ``log p(span, eos | prompt)`` of given spans (plain causal forwards on the prompt's
  cache, no trie), the objective the exact search maximises; used to check it.

The shipped demo passages and their prompt are in :mod:`hf_decoding_ext.bench.tasks.extractive_qa`.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from typing import Any

import torch
from transformers import LogitsProcessor

from hf_decoding_ext.core.loop import DecodingLoop, GenerationState
from hf_decoding_ext.core.rows import broadcast_rows
from hf_decoding_ext.core.scoring import LogProbScorer
from hf_decoding_ext.core.tree import additive_mask
from hf_decoding_ext.structured.prompt_rows import PromptTrackingProcessor

SEARCHES = ("best_first", "exhaustive")
"""Search strategies of :class:`ExactExtractiveDecoding`."""


# ------------------------------------------------------------------------------------------------- span index
def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _as_sequence(seq, what: str) -> list[int]:
    if isinstance(seq, torch.Tensor):
        if seq.dim() != 1:
            raise ValueError(f"{what} must be a 1-D sequence of token ids, got a tensor of shape {tuple(seq.shape)}")
        return [int(t) for t in seq.tolist()]
    if isinstance(seq, (str, bytes)) or not isinstance(seq, Sequence):
        raise ValueError(f"{what} must be a sequence of token ids, got {type(seq).__name__}")
    out = []
    for t in seq:
        if isinstance(t, torch.Tensor) and t.dim() == 0:
            t = int(t)
        if not _is_int(t) or t < 0:
            raise ValueError(f"{what} must hold non-negative integer token ids, got {t!r}")
        out.append(int(t))
    return out


class SpanIndex:
    """The contiguous spans of a context, held as an implicit suffix trie.

    A context is one token sequence (the passage's tokenisation) or several alternative tokenisations of it (see
    :meth:`from_text`); a *span* is a non-empty contiguous subsequence of any of them. The sequences are stored
    end to end in ``flat`` with ``-1`` separators; a trie node (a span) is represented by its *occurrences*: the
    positions in ``flat`` right after each place where the span occurs. Its children are the distinct tokens at those
    positions. Token ids in ``exclude_ids`` (e.g. eos) act as separators: no span contains them.

    Args:
        sequences: a sequence of token ids, or a list of such sequences (alternative tokenisations).
        exclude_ids: token ids no span may contain.

    Example:
        >>> from hf_decoding_ext.structured.exact_extractive import SpanIndex
        >>> index = SpanIndex([5, 6, 5, 7])
        >>> sorted(index.spans(max_len=2))
        [(5,), (5, 6), (5, 7), (6,), (6, 5), (7,)]
        >>> index.next_tokens(index.advance(index.root(), 5)).tolist()
        [6, 7]
        >>> index.contains([6, 5, 7]), index.contains([7, 5])
        (True, False)
    """

    def __init__(self, sequences, exclude_ids: Sequence[int] = ()):
        if isinstance(sequences, torch.Tensor):
            sequences = [sequences] if sequences.dim() == 1 else list(sequences)
        if isinstance(sequences, (str, bytes)) or not isinstance(sequences, Sequence):
            raise ValueError(f"context must be a sequence of token ids or a list of them, got {type(sequences)}")
        if len(sequences) and (_is_int(sequences[0]) or (isinstance(sequences[0], torch.Tensor)
                                                         and sequences[0].dim() == 0)):
            sequences = [sequences]
        seqs = [_as_sequence(s, "a context sequence") for s in sequences]
        excl = {int(e) for e in exclude_ids}
        flat: list[int] = []
        for s in seqs:
            flat.extend(-1 if t in excl else t for t in s)
            flat.append(-1)
        self.sequences = seqs
        self.exclude_ids = frozenset(excl)
        self.flat = torch.tensor(flat, dtype=torch.long)
        self._root = torch.nonzero(self.flat >= 0).flatten()
        if self._root.numel() == 0:
            raise ValueError("the context is empty: it must hold at least one token (excluded ids do not count)")
        self._root_tokens = torch.unique(self.flat[self._root])

    # -------------------------------------------------------------------------------------------- construction
    @classmethod
    def from_text(cls, tokenizer, text: str, word_starts: bool = True, max_span_tokens: int | None = None,
                  exclude_ids: Sequence[int] | None = None) -> SpanIndex:
        """Index the spans of ``text`` in ``tokenizer``'s tokenisation.

        With a GPT-2-style byte-level BPE (or a Llama-style sentencepiece without a dummy prefix), a word inside the
        text is tokenised with its leading space (``"Ġbananas"``), while a model starting its answer with that word
        writes it without (``"bananas"``/``"Bananas"``). T5's sentencepiece, used in the paper, has no such
        asymmetry (``"▁word"`` everywhere). With ``word_starts=True`` the index therefore holds, besides the
        tokenisation of ``text``, the tokenisation of every suffix of ``text`` that starts a word (a non-space
        character after whitespace), so that every span starting at a word can begin in the form an answer would
        use; spans inside the text keep their leading-space tokens too (``" bananas"`` is also a span).
        ``max_span_tokens`` truncates the suffix tokenisations (they only serve spans starting at their first
        word). ``exclude_ids`` defaults to the tokenizer's special tokens.
        """
        if tokenizer is None:
            raise ValueError("SpanIndex.from_text needs a tokenizer")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"the context text must be a non-empty string, got {text!r}")
        if exclude_ids is None:
            exclude_ids = list(getattr(tokenizer, "all_special_ids", []) or [])
        seqs = [tokenizer(text, add_special_tokens=False)["input_ids"]]
        if word_starts:
            starts = [i for i in range(1, len(text)) if text[i - 1].isspace() and not text[i].isspace()]
            for i in starts:
                ids = tokenizer(text[i:], add_special_tokens=False)["input_ids"]
                seqs.append(ids[:max_span_tokens] if max_span_tokens else ids)
        return cls(seqs, exclude_ids=exclude_ids)

    # -------------------------------------------------------------------------------------------- trie walk
    def root(self) -> torch.Tensor:
        """Occurrences of the empty prefix (every token position)."""
        return self._root

    def next_tokens(self, occurrences: torch.Tensor) -> torch.Tensor:
        """Distinct tokens extending a prefix with these occurrences (sorted, ``(k,)`` long)."""
        if occurrences is self._root:
            return self._root_tokens
        nxt = self.flat[occurrences]
        return torch.unique(nxt[nxt >= 0])

    def advance(self, occurrences: torch.Tensor, token: int) -> torch.Tensor:
        """Occurrences of ``prefix + [token]`` given those of ``prefix`` (empty when it is not a span)."""
        return occurrences[self.flat[occurrences] == int(token)] + 1

    def find(self, tokens) -> torch.Tensor:
        """Occurrences of ``tokens`` (empty when ``tokens`` is not a span)."""
        occ = self._root
        for t in tokens:
            occ = self.advance(occ, int(t))
            if occ.numel() == 0:
                break
        return occ

    def contains(self, tokens) -> bool:
        """Whether ``tokens`` (non-empty) is a span of the context."""
        tokens = [int(t) for t in tokens]
        return len(tokens) > 0 and self.find(tokens).numel() > 0

    def spans(self, max_len: int | None = None) -> set[tuple[int, ...]]:
        """Every distinct span of at most ``max_len`` tokens (for brute-force checks on small contexts)."""
        out: set[tuple[int, ...]] = set()
        flat = self.flat.tolist()
        n = len(flat)
        for i in range(n):
            j = i
            while j < n and flat[j] >= 0 and (max_len is None or j - i < max_len):
                j += 1
                out.add(tuple(flat[i:j]))
        return out

    def __repr__(self) -> str:
        return f"SpanIndex(sequences={len(self.sequences)}, tokens={int(self._root.numel())})"


def _as_indices(context_ids, exclude_ids: Sequence[int] = ()) -> list[SpanIndex]:
    """Normalise the ``context_ids`` argument: one :class:`SpanIndex` for all rows (list of length 1) or one per row.

    Accepted: a :class:`SpanIndex`; a 1-D sequence/tensor of token ids (one context for every row); a list of
    :class:`SpanIndex` or of 1-D sequences/tensors, or a 2-D tensor (one context per batch row)."""
    if context_ids is None:
        raise ValueError("context_ids is required: the context's token ids (or a SpanIndex), one for all rows or one "
                         "per batch row")
    if isinstance(context_ids, SpanIndex):
        return [context_ids]
    if isinstance(context_ids, torch.Tensor):
        if context_ids.dim() == 1:
            return [SpanIndex(context_ids, exclude_ids)]
        if context_ids.dim() == 2:
            return [SpanIndex(row, exclude_ids) for row in context_ids]
        raise ValueError(f"context_ids tensor must be 1-D or 2-D, got shape {tuple(context_ids.shape)}")
    if isinstance(context_ids, (str, bytes)):
        raise ValueError("context_ids must be token ids; build from text with for_model(..., context=...) or "
                         "SpanIndex.from_text")
    if not isinstance(context_ids, Sequence) or len(context_ids) == 0:
        raise ValueError(f"context_ids must be a non-empty sequence, got {context_ids!r}")
    first = context_ids[0]
    if _is_int(first) or (isinstance(first, torch.Tensor) and first.dim() == 0):
        return [SpanIndex(context_ids, exclude_ids)]
    return [c if isinstance(c, SpanIndex) else SpanIndex(c, exclude_ids) for c in context_ids]


def _rows(indices: list[SpanIndex], batch: int, who: str) -> list[SpanIndex]:
    return broadcast_rows(f"{who}'s context list", indices, batch)


def _eos_list(eos_token_id) -> list[int]:
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, torch.Tensor):
        eos_token_id = eos_token_id.flatten().tolist()
    if _is_int(eos_token_id):
        eos_token_id = [eos_token_id]
    ids = list(eos_token_id) if isinstance(eos_token_id, Sequence) and not isinstance(eos_token_id, str) else None
    if not ids or not all(_is_int(e) and e >= 0 for e in ids):
        raise ValueError(f"eos_token_id must be a non-negative int or a non-empty list of them, got {eos_token_id!r}")
    return [int(e) for e in ids]


def _check_max_span(max_span_tokens) -> int | None:
    if max_span_tokens is not None and (not _is_int(max_span_tokens) or max_span_tokens < 1):
        raise ValueError(f"max_span_tokens must be None or an integer >= 1, got {max_span_tokens!r}")
    return max_span_tokens


def _contexts_from_text(tokenizer, context, word_starts: bool, max_span_tokens: int | None):
    if tokenizer is None:
        raise ValueError("building from text needs the tokenizer")
    if context is None:
        raise ValueError("extractive decoding needs `context`: the passage text (or a list, one per batch row)")
    texts = [context] if isinstance(context, str) else list(context)
    if not texts:
        raise ValueError("context must be a string or a non-empty list of strings")
    return [SpanIndex.from_text(tokenizer, t, word_starts=word_starts, max_span_tokens=max_span_tokens)
            for t in texts]


# --------------------------------------------------------------------------------------------- the processor
class ExtractiveSpanLogitsProcessor(PromptTrackingProcessor, LogitsProcessor):
    r"""
    [`LogitsProcessor`] that restricts generation to a span of a given context followed by eos, the extractive
    constraint of "How Optimal is Greedy Decoding for Extractive Question Answering?" (Castel, Ram, Efrat and Levy,
    AKBC 2022, arXiv 2108.05857).

    At each step only the tokens that extend some occurrence of the generated prefix in the context are kept
    (scores of the others are set to ``-inf``); eos is allowed once at least one token was generated (the prefix is
    then always a span). Greedy search with this processor is the paper's "greedy" decoding made extractive; sampling
    draws spans. Use :class:`ExactExtractiveDecoding` for the most probable span.

    Each row's state (the occurrences of its generated prefix in the context) is a function of the row's tokens
    after the prompt, walked down the trie and memoised per prefix, so any call order gives the masks of plain
    ``generate()``: tree nodes of the speculative engine, drafts, lookahead branches. The processor records the
    prompt at the first call and restarts automatically when a new generation begins (different batch size, or
    ``input_ids`` that do not continue the prompt); :meth:`reset` restarts explicitly. Inside this library's loops
    it follows branched and reordered rows through the lifecycle of :mod:`hf_decoding_ext.core.lifecycle`
    (:class:`~hf_decoding_ext.structured.prompt_rows.PromptTrackingProcessor`), so each row keeps its prompt and,
    with one context per row, its context. Rows that emitted eos
    keep their scores unchanged (``generate()`` pads them). When another processor (e.g. top-k) has already removed
    every allowed token of a row, the allowed tokens get score 0 (uniform) so the output stays a span.

    Args:
        context_ids: the context's token ids: a 1-D sequence (one context for every row), a list of 1-D sequences or
            a 2-D tensor (one per batch row, no padding), or :class:`SpanIndex` objects (e.g. from
            :meth:`SpanIndex.from_text`, which holds several tokenisations).
        eos_token_id (`int` or `list[int]`): the end-of-sequence token(s).
        max_span_tokens (`int`, *optional*): longest span; after that many tokens only eos is allowed.

    Deviations: the paper uses T5 (encoder-decoder, sentencepiece); here any decoder-only model. With
    :meth:`for_model` the context may be indexed with several tokenisations (see :meth:`SpanIndex.from_text`).

    Examples:

    ```python
    >>> import torch
    >>> from hf_decoding_ext.structured.exact_extractive import ExtractiveSpanLogitsProcessor
    >>> proc = ExtractiveSpanLogitsProcessor([5, 6, 7], eos_token_id=2)
    >>> scores = proc(torch.tensor([[1, 9]]), torch.zeros(1, 10))  # first step: any context token, no eos
    >>> torch.isfinite(scores[0]).nonzero().flatten().tolist()
    [5, 6, 7]
    >>> scores = proc(torch.tensor([[1, 9, 6]]), torch.zeros(1, 10))  # after 6: 7 (continues the span) or eos
    >>> torch.isfinite(scores[0]).nonzero().flatten().tolist()
    [2, 7]
    >>> from hf_decoding_ext.core.models import load_model, encode_prompts
    >>> model, tokenizer = load_model()  # doctest: +SKIP
    >>> context = "Marie Curie won the Nobel Prize in Physics in 1903."
    >>> question = "When did Marie Curie win the Nobel Prize?"
    >>> inputs = encode_prompts(tokenizer, context + "\nQuestion: " + question)  # doctest: +SKIP
    >>> proc = ExtractiveSpanLogitsProcessor.for_model(model, tokenizer, context=context)  # doctest: +SKIP
    >>> out = model.generate(**inputs, logits_processor=[proc], do_sample=False, max_new_tokens=16)  # doctest: +SKIP
    ```
    """

    def __init__(self, context_ids, eos_token_id, max_span_tokens: int | None = None):
        self.eos_token_ids = _eos_list(eos_token_id)
        if not self.eos_token_ids:
            raise ValueError("ExtractiveSpanLogitsProcessor needs eos_token_id (the span ends with eos)")
        self.indices = _as_indices(context_ids, exclude_ids=self.eos_token_ids)
        self.max_span_tokens = _check_max_span(max_span_tokens)
        self.reset()

    @classmethod
    def for_model(cls, model=None, tokenizer=None, context=None, word_starts: bool = True,
                  max_span_tokens: int | None = None, eos_token_id=None) -> ExtractiveSpanLogitsProcessor:
        """Build from the context text (a string, or one per batch row) with :meth:`SpanIndex.from_text`; eos
        defaults to the model's generation config (else the tokenizer's)."""
        indices = _contexts_from_text(tokenizer, context, word_starts, max_span_tokens)
        if eos_token_id is None:
            eos_token_id = _default_eos(model, tokenizer)
        return cls(indices, eos_token_id=eos_token_id, max_span_tokens=max_span_tokens)

    state_attributes = PromptTrackingProcessor.state_attributes + ("_contexts",)

    def reset(self) -> None:
        """Forget the prompt; the next call starts a new generation."""
        super().reset()
        self._contexts: list[SpanIndex] = []  # the context of each prompt row
        self._memo: dict[tuple[int, tuple[int, ...]], tuple[torch.Tensor | None, int, bool]] = {}

    def _start(self, input_ids: torch.LongTensor) -> None:
        super()._start(input_ids)
        self._contexts = _rows(self.indices, input_ids.shape[0], type(self).__name__)
        self._memo = {}

    def prefix_state(self, origin: int, generated: Sequence[int]) -> tuple[torch.Tensor | None, int, bool]:
        """``(occurrences, depth, done)`` after ``generated`` for prompt row ``origin``: the occurrences of the
        span in the context (``None``: the root), its length, and whether it ended with eos (later tokens are
        padding). Memoised per prefix: from the longest known prefix, one trie step per further token."""
        tokens = tuple(int(t) for t in generated)
        n = len(tokens)
        while n > 0 and (origin, tokens[:n]) not in self._memo:
            n -= 1
        state = self._memo.get((origin, tokens[:n]), (None, 0, False))
        index = self._contexts[origin]
        for i in range(n, len(tokens)):
            occ, depth, done = state
            if done or (depth >= 1 and tokens[i] in self.eos_token_ids):
                state = (occ, depth, True)
            else:
                state = (index.advance(index.root() if occ is None else occ, tokens[i]), depth + 1, False)
            self._memo[(origin, tokens[: i + 1])] = state
        return state

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        batch, vocab = scores.shape
        generated = self.generated(input_ids)
        allowed = torch.zeros(batch, vocab, dtype=torch.bool)
        eos = torch.tensor([e for e in self.eos_token_ids if e < vocab], dtype=torch.long)
        for b in range(batch):
            origin = self.origin(b)
            occ, depth, done = self.prefix_state(origin, generated[b])
            if done:
                allowed[b] = True
                continue
            if self.max_span_tokens is None or depth < self.max_span_tokens:
                index = self._contexts[origin]
                nxt = index.next_tokens(index.root() if occ is None else occ)
                allowed[b, nxt[nxt < vocab]] = True
            if depth >= 1:  # the prefix is a (non-empty) span: it may end here
                allowed[b, eos] = True
        allowed = allowed.to(scores.device)
        out = scores.masked_fill(~allowed, -float("inf"))
        dead = ~torch.isfinite(out).any(dim=-1) & allowed.any(dim=-1)
        if bool(dead.any()):  # another processor removed every allowed token: uniform over the allowed ones
            out[dead] = torch.where(allowed[dead], torch.zeros_like(out[dead]), out[dead])
        return out


def _default_eos(model, tokenizer):
    eos = None
    if model is not None and getattr(model, "generation_config", None) is not None:
        eos = model.generation_config.eos_token_id
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("no eos token id: pass eos_token_id=")
    return eos


# ------------------------------------------------------------------------------------------ brute-force scorer
def score_spans(model, prompt_ids, spans, eos_token_id, batch_size: int = 64) -> torch.Tensor:
    """``log p(span, eos | prompt)`` of each span by plain causal forwards: the objective of
    :class:`ExactExtractiveDecoding`, computed independently of its trie search (for checks and for scoring greedy
    outputs). It is :class:`~hf_decoding_ext.core.scoring.LogProbScorer` with eos as the end token: the prompt is
    run once and each chunk of spans is fed (right-padded) on a copy of its KV cache.

    Args:
        model: the causal LM.
        prompt_ids: ``(prompt_len,)`` token ids of one prompt, without padding.
        spans: list of non-empty token-id sequences.
        eos_token_id: eos id, or a list of ids (then the eos term is the log of their total probability).
        batch_size: spans per forward.

    Returns:
        ``(len(spans),)`` float32 tensor on the CPU.
    """
    eos = _eos_list(eos_token_id)
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long).flatten()
    spans = [[int(t) for t in s] for s in spans]
    if prompt.numel() == 0:
        raise ValueError("score_spans needs a non-empty prompt")
    if any(len(s) == 0 for s in spans):
        raise ValueError("score_spans: spans must be non-empty")
    return LogProbScorer(model, batch_size=batch_size, end_token_ids=eos).score(spans, prompt)


# ------------------------------------------------------------------------------------------ the exact search
class _Node:
    __slots__ = ("token", "parent", "depth", "score", "occ", "slot", "slots")

    def __init__(self, token: int, parent: _Node | None, depth: int, score: float, occ):
        self.token = token
        self.parent = parent
        self.depth = depth
        self.score = score  # log p(prefix | prompt)
        self.occ = occ  # occurrences, or the parent's occurrences (resolved lazily when the node is evaluated)
        self.slot = -1  # cache position of this node's key/value once evaluated
        self.slots: list[int] = []  # cache positions of its evaluated ancestors (excluding the root)

    def tokens(self) -> list[int]:
        out, node = [], self
        while node is not None:
            out.append(node.token)
            node = node.parent
        return out[::-1]


class ExactExtractiveDecoding(DecodingLoop):
    r"""Exact-extractive decoding: the most probable span of a context, from "How Optimal is Greedy Decoding for
    Extractive Question Answering?" (Castel, Ram, Efrat and Levy, AKBC 2022, arXiv 2108.05857), the paper's
    *exact-extract*.

    For each batch row it returns

    .. math:: \hat{s} = \arg\max_{s \,\in\, \mathrm{spans}(c)} \; \log p_\theta(s_1 \ldots s_{|s|}, \mathrm{eos}
              \mid \mathrm{prompt}),

    the span of the row's context ``c`` whose tokens followed by eos are most probable under the model (greedy search
    only approximates it, even with the extractive constraint of :class:`ExtractiveSpanLogitsProcessor`). The output
    is the span followed by eos.

    Search. The spans of ``c`` form a trie (:class:`SpanIndex`); a node's *prefix* score
    ``log p(s_1..s_k | prompt)`` upper-bounds the score of every span it prefixes and of the span itself ended by
    eos, since each further token or eos only adds a log-probability ``<= 0``. ``search="best_first"`` (default) is a
    best-first branch and bound: the frontier holds unevaluated nodes keyed by their prefix score (known from the
    parent's next-token distribution); each round evaluates up to ``nodes_per_forward`` best frontier nodes per row in
    **one** batched forward, giving each node's eos probability (a complete span score) and its children's prefix
    scores; nodes and children whose prefix score cannot beat the best complete span are pruned, and a row stops
    when its best frontier node cannot. The result is exact (ties: the first found). The prompt is run once and its
    KV cache reused; every evaluated trie node is fed exactly once, as one token attending to the prompt and to its
    evaluated ancestors in the cache (a tree attention mask), so the trie explored so far stays in the cache until
    the search ends (it is then cropped back to the prompt). ``search="exhaustive"`` evaluates every trie node up to
    the length limit (no pruning), i.e. scores all spans as the authors' implementation does (one teacher-forced pass
    per suffix of the passage); it is exact too and serves as a cost reference.

    Output. With ``return_dict_in_generate=True`` the output has ``span_log_probs`` (``(batch,)`` float tensor:
    ``log p(span, eos | prompt)``), ``span_tokens`` (list of token lists), ``num_forwards`` (model calls, the prompt
    forward included) and ``nodes_evaluated`` (trie nodes fed per row). The same is kept in :attr:`last_result` after
    every call.

    Args:
        context_ids: the context's token ids: a 1-D sequence (one context for every row), a list of 1-D sequences or
            a 2-D tensor (one per batch row, no padding), or :class:`SpanIndex` objects (:meth:`for_model` builds them
            from text with :meth:`SpanIndex.from_text`).
        eos_token_id (`int` or `list[int]`, *optional*): eos; defaults to ``generate()``'s. With several ids the eos
            term is the log of their total probability and the most probable one is emitted.
        max_span_tokens (`int`, *optional*): longest span considered. Spans longer than ``max_new_tokens`` are never
            considered either.
        nodes_per_forward (`int`, *optional*, defaults to 16): trie nodes evaluated per row per forward (``None``:
            the whole frontier). Larger: fewer forwards, possibly more nodes.
        search (`str`, *optional*, defaults to ``"best_first"``): ``"best_first"`` or ``"exhaustive"``.

    Deviations: the paper uses T5 (encoder-decoder) and scores every span, one decoder pass per passage suffix; here
    decoder-only models, a pruned best-first search over the trie of spans with the prompt's KV cache (same argmax),
    and :meth:`for_model` indexes the context with several tokenisations so that a span may start at a word in the
    form an answer would use (see :meth:`SpanIndex.from_text`; the paper's T5 sentencepiece does not need it). The
    caller's logits processors (temperature, repetition penalty, ...) are not applied: the objective is the model's
    own probability. Greedy only (``do_sample=False``).

    Example:
        >>> from hf_decoding_ext.core.models import load_model, encode_prompts
        >>> from hf_decoding_ext.structured.exact_extractive import ExactExtractiveDecoding
        >>> model, tokenizer = load_model()  # doctest: +SKIP
        >>> context = "Marie Curie won the Nobel Prize in Physics in 1903."
        >>> inputs = encode_prompts(tokenizer, context + "\nQuestion: Who won the prize?")  # doctest: +SKIP
        >>> loop = ExactExtractiveDecoding.for_model(model, tokenizer, context=context)  # doctest: +SKIP
        >>> out = model.generate(**inputs, custom_generate=loop, do_sample=False, max_new_tokens=16,
        ...                      return_dict_in_generate=True)  # doctest: +SKIP
        >>> out.span_log_probs, out.num_forwards  # doctest: +SKIP
    """

    supports_sampling = False
    supports_output_scores = False  # a search over spans: no per-step scores
    supports_sliding_window = False  # trie attention masks assume full attention

    def __init__(self, context_ids, eos_token_id=None, max_span_tokens: int | None = None,
                 nodes_per_forward: int | None = 16, search: str = "best_first"):
        self.eos_token_ids = _eos_list(eos_token_id) or None
        self.indices = _as_indices(context_ids, exclude_ids=self.eos_token_ids or ())
        self.max_span_tokens = _check_max_span(max_span_tokens)
        if nodes_per_forward is not None and (not _is_int(nodes_per_forward) or nodes_per_forward < 1):
            raise ValueError(f"nodes_per_forward must be None or an integer >= 1, got {nodes_per_forward!r}")
        if search not in SEARCHES:
            raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")
        self.nodes_per_forward = nodes_per_forward
        self.search = search
        self.last_result: dict[str, Any] | None = None

    @classmethod
    def for_model(cls, model=None, tokenizer=None, context=None, word_starts: bool = True,
                  max_span_tokens: int | None = None, nodes_per_forward: int | None = 16,
                  search: str = "best_first") -> ExactExtractiveDecoding:
        """Build from the context text (a string, or one per batch row) with :meth:`SpanIndex.from_text`."""
        indices = _contexts_from_text(tokenizer, context, word_starts, max_span_tokens)
        return cls(indices, max_span_tokens=max_span_tokens, nodes_per_forward=nodes_per_forward, search=search)

    # ------------------------------------------------------------------------------------------------ search
    @torch.no_grad()
    def run(self, state: GenerationState):
        eos = self.eos_token_ids
        if eos is None:
            eos = _eos_list(state.generation_config._eos_token_tensor)
        if not eos:
            raise ValueError("ExactExtractiveDecoding needs an eos token (the span ends with eos): set eos_token_id")
        batch = state.batch_size
        rows = _rows(self.indices, batch, type(self).__name__)
        limit = self.max_span_tokens or math.inf
        max_length = state.generation_config.max_length
        if max_length is not None:
            limit = min(limit, max_length - state.prompt_length)
        if limit < 1:
            raise ValueError("no room for a span: max_new_tokens must be >= 1")
        eos_set = set(eos)
        prune = self.search == "best_first"
        per_round = self.nodes_per_forward or math.inf

        logits, _ = state.next_token_logits()  # prompt forward: builds the prompt's cache
        root_logp = torch.log_softmax(logits.float(), dim=-1).cpu()
        cache = state.cache
        prompt_cached = cache.get_seq_length()
        prompt_mask = state.attention_mask.bool()
        last_position = state.attention_mask.long().sum(-1) - 1  # position of the last prompt token per row

        best = [-math.inf] * batch
        best_node: list[_Node | None] = [None] * batch
        best_eos = [eos[0]] * batch
        evaluated = [0] * batch
        heaps: list[list] = [[] for _ in range(batch)]
        counter = 0

        def push(b: int, node: _Node) -> None:
            nonlocal counter
            heapq.heappush(heaps[b], (-node.score, counter, node))
            counter += 1

        def expand(b: int, parent: _Node | None, occ: torch.Tensor, logp: torch.Tensor, depth: int) -> None:
            base = 0.0 if parent is None else parent.score
            toks = rows[b].next_tokens(occ)
            toks = toks[toks < logp.shape[-1]]
            if toks.numel() == 0:
                return
            scores = (base + logp[toks].double()).tolist()
            for tok, sc in zip(toks.tolist(), scores):
                if tok in eos_set or (prune and sc <= best[b]):
                    continue
                push(b, _Node(tok, parent, depth + 1, sc, occ))

        for b in range(batch):
            expand(b, None, rows[b].root(), root_logp[b], 0)

        try:
            while True:
                chosen: list[list[_Node]] = []
                for b in range(batch):
                    picked: list[_Node] = []
                    while heaps[b] and len(picked) < per_round:
                        node = heapq.heappop(heaps[b])[2]
                        if prune and node.score <= best[b]:
                            heaps[b].clear()  # every remaining node scores lower: the row is solved
                            break
                        picked.append(node)
                    chosen.append(picked)
                width = max(len(p) for p in chosen)
                if width == 0:
                    break
                logp = self._evaluate(state, cache, chosen, width, prompt_cached, prompt_mask, last_position)
                for b, picked in enumerate(chosen):
                    evaluated[b] += len(picked)
                    for k, node in enumerate(picked):
                        node.occ = rows[b].advance(node.occ, node.token)
                        lp = logp[b, k]
                        eos_lp = lp[eos]
                        complete = node.score + float(torch.logsumexp(eos_lp.double(), dim=0))
                        if complete > best[b]:
                            best[b], best_node[b] = complete, node
                            best_eos[b] = eos[int(eos_lp.argmax())]
                        if node.depth < limit:
                            expand(b, node, node.occ, lp, node.depth)
        finally:
            explored = cache.get_seq_length() - prompt_cached
            if explored > 0:
                cache.crop(-explored)  # drop the explored trie: the cache covers the prompt again

        spans = [n.tokens() if n is not None else [] for n in best_node]
        width = max(len(s) for s in spans) + 1
        pad = int(state.pad_token_id) if state.pad_token_id is not None else eos[0]
        out = torch.full((batch, width), pad, dtype=torch.long)
        for b, s in enumerate(spans):
            out[b, :len(s)] = torch.tensor(s, dtype=torch.long)
            out[b, len(s)] = best_eos[b]
        state.append(out.to(state.device))
        result = {
            "span_log_probs": torch.tensor(best, dtype=torch.float32),
            "span_tokens": spans,
            "num_forwards": int(state.stats["forwards"]),
            "nodes_evaluated": evaluated,
        }
        self.last_result = result
        return dict(result)

    def _evaluate(self, state: GenerationState, cache, chosen: list[list[_Node]], width: int, prompt_cached: int,
                  prompt_mask: torch.Tensor, last_position: torch.Tensor) -> torch.Tensor:
        """One forward feeding the chosen nodes (one token each) after the cached prompt and explored trie.

        Returns ``(batch, width, vocab)`` float32 log-probabilities on the CPU (the next-token distribution after
        each node)."""
        batch = len(chosen)
        device = state.device
        cached = cache.get_seq_length()
        total = cached + width
        ids = torch.zeros(batch, width, dtype=torch.long)
        positions = torch.zeros(batch, width, dtype=torch.long)
        allowed = torch.zeros(batch, width, total, dtype=torch.bool)
        allowed[:, :, :prompt_cached] = prompt_mask[:, None, :].cpu()
        last = last_position.cpu()
        for b, picked in enumerate(chosen):
            for k in range(width):
                slot = cached + k
                allowed[b, k, slot] = True  # itself (padding slots: the prompt and themselves, never attended)
                if k >= len(picked):
                    positions[b, k] = last[b] + 1
                    continue
                node = picked[k]
                parent = node.parent
                node.slots = [] if parent is None else parent.slots + [parent.slot]
                node.slot = slot
                ids[b, k] = node.token
                positions[b, k] = last[b] + node.depth
                if node.slots:
                    allowed[b, k, node.slots] = True
        mask = additive_mask(allowed, state.model.dtype)
        out = state.model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                          past_key_values=cache, use_cache=True, return_dict=True)
        state.stats["forwards"] += 1
        return torch.log_softmax(out.logits.float(), dim=-1).cpu()
