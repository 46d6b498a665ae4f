"""FoReaL-Decoding, "Follow the Reasoning Leader" (Ming Li, Zhengyuan Yang, Xiyao Wang, Dianqi Li, Linjie Li, Kevin
Lin, Tianyi Zhou, Lijuan Wang, "What makes Reasoning Models Different? Follow the Reasoning Leader for Efficient
Decoding", arXiv 2506.06998, 2025; no official code found).

Also holds the text helpers shared with :mod:`.speculative_thinking` (:func:`make_decoder`, :func:`decode_tail`,
:func:`sentence_ends`); they are generic and may move to :mod:`hf_decoding_ext.core.router`.
"""

from __future__ import annotations

import math
from numbers import Real

import torch

from hf_decoding_ext.core.router import Decoder, RouterLoop, RouterRun, decode_tail, make_decoder, sentence_ends  # noqa: F401

DEFAULT_LEAD_TOKENS = 8
"""Default n: leader-written tokens at a gated sentence start (this library's choice, not taken from the paper)."""

DEFAULT_LEAD_PROBABILITY = 0.5
"""Default p: probability that the gate hands a sentence start to the leader (this library's choice)."""

TAIL_TOKENS = 4
"""Tokens decoded to detect a sentence end after each generated token."""

PAPER_FIDELITY = (
    ("rule", ("faithful to the abstract and the brief: at each sentence start a stochastic gate lets the leading "
              "(large) model write the first n tokens with probability p; the draft (small) model writes the rest of "
              "the sentence; both models share the context (KV catch-up, hf_decoding_ext.core.router)")),
    ("knob names and defaults", ("choice: `n` (leading tokens, default 8, math.inf allowed: the leader writes the "
                                 "whole sentence) and `p` (gate probability, default 0.5); the paper's names and "
                                 "values were not read (no code); p=0 or n=0 is the draft alone, p=1 with n=inf the "
                                 "leader alone")),
    ("gate", ("choice: one Bernoulli(p) draw per sentence start from the loop's own torch.Generator seeded with `seed` "
              "at the start of every generate() call (reproducible, independent of sampling's global RNG)")),
    ("sentence boundary", ("choice: after each generated token the last 4 generated tokens are decoded; the sentence "
                           "ends when that text ends with a newline or with . ! ? (optionally followed by closing "
                           "quotes/brackets and whitespace); the first generated token starts a sentence; a "
                           "decimal point at a token's end counts as a boundary (known false positive). If a sentence "
                           "ends inside the leader's n tokens, the next sentence start draws the gate again")),
    ("models", ("deviation: small = the library's distilled draft of SmolLM2-135M-Instruct, large = the full model "
                "(paper: a large reasoning model leading a weaker draft model); any pair sharing a tokenizer")),
    ("FLOPs", ("reported as per-model forwards / tokens fed / tokens produced (router summary), not as theoretical "
               "FLOPs")),
    ("batch", "deviation: batch size 1 only"),
)


def fidelity_markdown() -> str:
    return "\n".join(f"- **{k}**: {v}" for k, v in PAPER_FIDELITY)


def _check_probability(p) -> float:
    if isinstance(p, bool) or not isinstance(p, Real) or not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"p must be a probability in [0, 1], got {p!r}")
    return float(p)


class FoReaLDecoding(RouterLoop):
    """FoReaL-Decoding (Li et al., arXiv 2506.06998): at each sentence start a seeded stochastic gate lets the leading
    (large) model write the sentence's first ``n`` tokens with probability ``p``; the draft (small) model writes the
    rest of the sentence. Lossy; both models ingest every token, each only when it writes
    (``small_logits_every_step = False``).

    A sentence starts at the first generated token and after every token where the decoded tail of the generated text
    ends a sentence (:func:`sentence_ends`: a newline, or ``. ! ?``). Endpoints: ``p=0`` (or ``n=0``) gives the small
    model's own output and ``p=1, n=math.inf`` the large model's (greedy: token for token). Over many sentences of
    lengths ``L`` whose text does not depend on the routing, the leader's expected share of tokens is
    ``p * sum(min(n, L)) / sum(L)``. Per-token records (``router_steps``) carry ``sentence`` (0-based index),
    ``in_sentence`` (position in it) and ``lead`` (the gate's draw for that sentence).

    Deviations and choices: :data:`PAPER_FIDELITY`.

    Args:
        small: the draft model (shares the large model's tokenizer).
        tokenizer: used to decode generated tokens (sentence boundaries); or pass ``decode``.
        n: leader tokens per gated sentence start (int >= 0 or ``math.inf``).
        p: gate probability in [0, 1].
        seed: seed of the gate's ``torch.Generator`` (re-seeded at every call).
        decode: a ``list[int] -> str`` callable replacing ``tokenizer.decode``.

    Example:
        >>> from hf_decoding_ext.core.models import load_model
        >>> from hf_decoding_ext.collaboration.foreal import FoReaLDecoding
        >>> model, tok = load_model()  # doctest: +SKIP
        >>> loop = FoReaLDecoding.for_model(model, tok, n=8, p=0.5, seed=0)  # doctest: +SKIP
        >>> inputs = tok("Explain why the sky is blue.", return_tensors="pt")  # doctest: +SKIP
        >>> out = model.generate(**inputs, max_new_tokens=64, do_sample=False, custom_generate=loop,
        ...                      return_dict_in_generate=True)  # doctest: +SKIP
        >>> share = out.router["large_fraction"]  # doctest: +SKIP
        >>> FoReaLDecoding(None, decode=str, p=1.5)
        Traceback (most recent call last):
        ValueError: p must be a probability in [0, 1], got 1.5
    """

    small_logits_every_step = False

    def __init__(self, small, tokenizer=None, n: float = DEFAULT_LEAD_TOKENS,
                 p: float = DEFAULT_LEAD_PROBABILITY, seed: int = 0, decode: Decoder | None = None):
        self.p = _check_probability(p)
        if not (n == math.inf and not isinstance(n, bool)) and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise ValueError(f"n must be an integer >= 0 or math.inf, got {n!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")  # noqa: TRY004 (the library's convention)
        self.decode = make_decoder(tokenizer, decode)
        super().__init__(small)
        self.n, self.seed = n, seed

    @classmethod
    def for_model(cls, model=None, tokenizer=None, small="distilled", n: float = DEFAULT_LEAD_TOKENS,
                  p: float = DEFAULT_LEAD_PROBABILITY, seed: int = 0) -> FoReaLDecoding:
        """Registry/CLI factory. ``small``: a model, or a name as in
        :meth:`~hf_decoding_ext.speculative.drafters.draft_model.DraftModelDrafter.load_assistant` (``"distilled"``:
        the library's distilled draft of the default model; ``"self:N"``: the large model's first N layers). Without
        ``tokenizer`` the large model's own is loaded (``AutoTokenizer``)."""
        _check_probability(p)
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
        if isinstance(small, str):
            from hf_decoding_ext.speculative.drafters.draft_model import (
                DraftModelDrafter,
            )

            small = DraftModelDrafter.load_assistant(model, small)
        return cls(small, tokenizer, n=n, p=p, seed=seed)

    def begin(self, state, run: RouterRun) -> None:
        gen = torch.Generator()
        gen.manual_seed(self.seed)
        run.extra.update(generator=gen, sentence=-1, in_sentence=0, lead=False, draws=[])

    def at_sentence_start(self, state, run: RouterRun) -> bool:
        if state.input_ids.shape[1] == run.prompt_length:
            return True
        return sentence_ends(decode_tail(self.decode, state.input_ids, run.prompt_length, TAIL_TOKENS))

    def choose(self, state, run: RouterRun, small_logits):
        x = run.extra
        if self.at_sentence_start(state, run):
            x["sentence"] += 1
            x["in_sentence"] = 0
            x["lead"] = bool(torch.rand((), generator=x["generator"]).item() < self.p)
            x["draws"].append(x["lead"])
        else:
            x["in_sentence"] += 1
        run.note(sentence=x["sentence"], in_sentence=x["in_sentence"], lead=x["lead"])
        return "large" if x["lead"] and x["in_sentence"] < self.n else "small"
