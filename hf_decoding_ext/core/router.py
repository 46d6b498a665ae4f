"""A router loop: a small and a large model writing one sequence, each with its own lazily caught-up KV cache.

:class:`RouterLoop` is the shared base of the small/large collaboration methods (``hf_decoding_ext.collaboration``:
entropy-adaptive hand-over, and later sentence-start or keyword-triggered hand-over). At each step a subclass hook,
:meth:`RouterLoop.choose`, names the model that produces the next token (or the next span of tokens); the router
produces the token(s) from that model's logits after the caller's logits processors (greedy or sampling as
``generate()`` asked), appends them through :meth:`GenerationState.append` (eos, ``max_new_tokens``, stopping
criteria, streamer) and accounts the compute of each model: forwards, tokens fed, tokens produced.

Both models see every committed token: a model's cache holds keys/values for a prefix of the committed sequence and,
the next time that model runs, one forward feeds every token it has not seen yet (prompt, its own last token, and the
tokens the other model wrote meanwhile) and returns its next-token logits ("KV catch-up"). The large model is the
model ``generate()`` is called on (``state.model``, whose cache is ``generate()``'s, possibly prefilled); the small
model is held by the loop and gets a fresh ``DynamicCache`` per call.

This module imports nothing from the method families; loaders of a particular small model live with the methods.
"""

from __future__ import annotations

import abc
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import DynamicCache

from hf_decoding_ext.core.loop import DecodingLoop, GenerationState

# ----------------------------------------------------------------- text helpers for methods that read the generated text
Decoder = Callable[[Sequence[int]], str]


def make_decoder(tokenizer=None, decode: Decoder | None = None) -> Decoder:
    """A ``list[int] -> str`` decoder: ``decode`` itself, else ``tokenizer.decode(ids, skip_special_tokens=True)``.

    Raises:
        ValueError: when neither is given, or ``decode`` is not callable.
    """
    if decode is not None:
        if not callable(decode):
            raise ValueError(f"decode must be a callable mapping a list of token ids to text, got {decode!r}")
        return decode
    if tokenizer is None or not hasattr(tokenizer, "decode"):
        raise ValueError(f"a tokenizer (with .decode) or a decode callable is needed to read the generated text, got "
                         f"tokenizer={tokenizer!r}")
    return lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True)


def decode_tail(decode: Decoder, input_ids: torch.Tensor, start: int, k: int) -> str:
    """Decoded text of the last ``k`` tokens of row 0 of ``input_ids`` that lie at positions ``>= start`` (e.g. the
    generated part: ``start = prompt length``); ``""`` when there are none."""
    lo = max(start, input_ids.shape[1] - k)
    return decode(input_ids[0, lo:].tolist()) if lo < input_ids.shape[1] else ""


SENTENCE_END = re.compile(r"(\n|[.!?][\"')\]]*\s*)$")
"""End of a sentence: text ending with a newline, or with ``.``, ``!`` or ``?`` (optionally followed by closing
quotes/brackets and whitespace)."""


def sentence_ends(text: str) -> bool:
    """True when ``text`` (the decoded tail of the generated tokens) ends a sentence (:data:`SENTENCE_END`): the next
    token starts a new sentence. A digit followed by a point at the end of a token ("3." before "14") also counts:
    a known false positive of a rule that cannot look ahead."""
    return bool(SENTENCE_END.search(text))


# --------------------------------------------------------------------------------------------- FoReaL


MODELS = ("small", "large")
"""The two roles a :class:`RouterLoop` routes between."""


def vocabulary_size(model) -> int:
    """Rows of the model's output embedding (its logits' width)."""
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


class RouterRun:
    """Per-call state of a :class:`RouterLoop`: the small model's cache, per-model counters and per-step records.

    Attributes:
        small_cache: the small model's ``DynamicCache`` (keys/values of a prefix of the committed sequence).
        counts: ``{"small": {...}, "large": {...}}`` with ``forwards`` (model calls), ``tokens_fed`` (positions fed
            to the model, catch-up included) and ``tokens_produced`` (generated tokens that model chose).
        records: one dict per produced token: ``step`` (0-based index of the generated token), ``model`` (who
            produced it), ``token``, ``fed`` (``{"small": n, "large": n}``: positions each model was fed at this step)
            and whatever :meth:`note` added (e.g. the entropy EAD decided on).
        current: the model that produced the previous token (``None`` before the first).
        extra: free per-run storage for subclasses (e.g. an entropy window).
    """

    def __init__(self, small, state: GenerationState):
        self.small = small
        self.small_cache = DynamicCache(config=small.config)
        self.counts = {m: {"forwards": 0, "tokens_fed": 0, "tokens_produced": 0} for m in MODELS}
        self.records: list[dict[str, Any]] = []
        self.current: str | None = None
        self.spans = {m: 0 for m in MODELS}
        self.extra: dict[str, Any] = {}
        self.prompt_length = state.prompt_length
        self.large_cached_at_start = state.cache.get_seq_length()
        self._pending: dict[str, Any] = {}
        self._fed = {m: 0 for m in MODELS}

    def note(self, **info) -> None:
        """Attach ``info`` to the record of the token being produced (call from :meth:`RouterLoop.choose`)."""
        self._pending.update(info)

    @property
    def generated(self) -> int:
        return sum(c["tokens_produced"] for c in self.counts.values())

    def summary(self) -> dict[str, Any]:
        """Per-model accounting: ``{"small": {forwards, tokens_fed, tokens_produced}, "large": {...}, "generated",
        "large_fraction" (share of generated tokens the large model produced), "spans" (maximal runs of tokens per
        model), "handovers" (changes of the producing model)}``."""
        gen = self.generated
        return {
            "small": dict(self.counts["small"]),
            "large": dict(self.counts["large"]),
            "generated": gen,
            "large_fraction": self.counts["large"]["tokens_produced"] / gen if gen else 0.0,
            "spans": dict(self.spans),
            "handovers": max(sum(self.spans.values()) - 1, 0),
        }


class RouterLoop(DecodingLoop):
    """Base of the small/large collaboration loops (``generate(custom_generate=loop)`` on the *large* model).

    Each step: (1) if :attr:`small_logits_every_step`, the small model catches up on the committed sequence and
    returns its raw next-token logits; (2) :meth:`choose` names the producing model, or a span of tokens for it;
    (3) that model catches up (one forward over every token it has not seen) and its logits, after the caller's
    logits processors, give the token (argmax, or a sample with ``do_sample=True``); the small model's logits of step
    (1) are reused when it produces. The other model does not run; it catches up lazily the next time it is needed.

    Efficiency: only the model that needs logits at a step runs a forward, except that with
    ``small_logits_every_step = True`` (entropy-triggered methods) the small model runs at every step, since its
    logits drive the decision even while the large model writes; the large model then runs only on the steps it
    produces, feeding everything it missed in one forward. Methods whose decision needs no logits (sentence starts,
    keywords) set ``small_logits_every_step = False`` and return spans, so the small model too runs only when it
    produces.

    Limits: batch size 1 (a batch > 1 is refused with a ``ValueError``: the two models would need per-row routing);
    decoder-only models; the small model must share the large model's tokenizer (a different vocabulary size is
    refused with a ``ValueError`` quoting both sizes). The small model runs on its own device and dtype; its logits
    are brought to the large model's device as float32.

    Per-call accounting is returned with ``return_dict_in_generate=True`` as ``router`` (:meth:`RouterRun.summary`)
    and ``router_steps`` (per-token records), and kept on the loop (:meth:`summary`, :attr:`last_run`).

    Args:
        small: the small model (a causal LM sharing the large model's tokenizer).
    """

    supports_batch = False
    small_logits_every_step: bool = True

    def __init__(self, small):
        if small is None or not callable(small) or not hasattr(small, "config"):
            raise ValueError(f"small must be a causal language model, got {small!r}")
        self.small = small
        self.last_run: RouterRun | None = None

    # ----------------------------------------------------------------------------------------------- subclass hooks
    def begin(self, state: GenerationState, run: RouterRun) -> None:
        """Start of a call (per-run state goes in ``run.extra``)."""

    @abc.abstractmethod
    def choose(self, state: GenerationState, run: RouterRun, small_logits: torch.Tensor | None):
        """Which model produces next: ``"small"`` or ``"large"`` for one token, or ``(model, n)`` for a span of ``n``
        tokens (``n >= 1``; :meth:`choose` is asked again after the span, or earlier if generation stops).

        Args:
            state: the generation state (``state.input_ids`` is the committed sequence).
            run: the per-call :class:`RouterRun` (``run.current`` is who produced the previous token; ``run.note``
                attaches information to this step's record).
            small_logits: the small model's raw float32 next-token logits ``(1, vocab)`` when
                :attr:`small_logits_every_step`, else ``None``.
        """

    # ----------------------------------------------------------------------------------------------- public
    def summary(self) -> dict[str, Any]:
        """Accounting of the last call (:meth:`RouterRun.summary`); ``{}`` before the first call."""
        return self.last_run.summary() if self.last_run is not None else {}

    def check_models(self, state: GenerationState) -> None:
        """Refuse a small model whose vocabulary differs from the large model's, or an encoder-decoder one."""
        large, small = vocabulary_size(state.model), vocabulary_size(self.small)
        if large != small:
            raise ValueError(f"the small model's vocabulary ({small} tokens) differs from the large model's ({large} "
                             f"tokens); the two models must share one tokenizer")
        if getattr(self.small.config, "is_encoder_decoder", False):
            raise ValueError(f"{type(self).__name__} supports decoder-only small models only")

    # ----------------------------------------------------------------------------------------------- forwards
    def small_logits(self, state: GenerationState, run: RouterRun) -> torch.Tensor:
        """Catch the small model up on the committed sequence (one forward over the tokens its cache lacks) and
        return its raw float32 next-token logits ``(1, vocab)`` on the large model's device."""
        cache = run.small_cache
        cached = cache.get_seq_length()
        ids, mask = state.input_ids, state.attention_mask
        new = ids[:, cached:]
        if new.shape[1] == 0:
            raise RuntimeError("the small model's cache already covers the whole sequence")
        device = self.small.device
        positions = state.position_ids(mask)[:, cached:]
        out = self.small(input_ids=new.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                         past_key_values=cache, use_cache=True, logits_to_keep=1, return_dict=True)
        self._count(run, "small", new.shape[1])
        return out.logits[:, -1, :].float().to(state.device)

    def large_logits(self, state: GenerationState, run: RouterRun) -> torch.Tensor:
        """Catch the large model up (its cache is ``state.cache``) and return its raw float32 next-token logits."""
        fed = state.input_ids.shape[1] - state.cache.get_seq_length()
        logits, _ = state.next_token_logits()
        self._count(run, "large", fed)
        return logits

    @staticmethod
    def _count(run: RouterRun, model: str, fed: int) -> None:
        run.counts[model]["forwards"] += 1
        run.counts[model]["tokens_fed"] += fed
        run._fed[model] += fed

    # ----------------------------------------------------------------------------------------------- loop
    @staticmethod
    def _parse(decision) -> tuple[str, int]:
        if isinstance(decision, str):
            name, n = decision, 1
        elif isinstance(decision, tuple) and len(decision) == 2:
            name, n = decision
        else:
            raise ValueError(f"choose() must return 'small', 'large' or (model, n_tokens), got {decision!r}")
        if name not in MODELS:
            raise ValueError(f"choose() named an unknown model {name!r}; expected one of {MODELS}")
        if isinstance(n, float) and math.isinf(n) and n > 0:
            n = math.inf
        elif isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"choose() returned a span of {n!r} tokens; it must be an integer >= 1")
        return name, n

    def run(self, state: GenerationState):
        self.check_models(state)
        run = RouterRun(self.small, state)
        self.last_run = run
        self.begin(state, run)
        name, remaining = None, 0
        while not state.done:
            small = self.small_logits(state, run) if self.small_logits_every_step else None
            if remaining == 0:
                name, remaining = self._parse(self.choose(state, run, small))
            if name == "small":
                raw = small if small is not None else self.small_logits(state, run)
            else:
                raw = self.large_logits(state, run)
            scores = state.process(raw)
            token = state.select(scores)
            state.record(scores, raw)
            appended = state.append(token)
            remaining -= 1
            if appended:
                run.counts[name]["tokens_produced"] += appended
                if run.current != name:
                    run.spans[name] += 1
                run.current = name
                record = {"step": len(run.records), "model": name, "token": int(token[0]),
                          "fed": dict(run._fed), **run._pending}
                run.records.append(record)
            run._pending = {}
            run._fed = {m: 0 for m in MODELS}
        return {"router": run.summary(), "router_steps": run.records}
