"""Adaptive Weighted Rejection Sampling (AWRS): locally constrained sampling that evaluates the constraint only on the
tokens it draws, with an unbiased estimate of the local normaliser as importance weight.

Paper: "Fast Controlled Generation from Language Models with Adaptive Weighted Rejection Sampling" (Lipkin, LeBrun,
Vigly, Loula, MacIver, Du, Eisner, Cotterell, Mansinghka, O'Donnell, Lew, Vieira; COLM 2025, arXiv 2504.05410).
"""

from __future__ import annotations

import math
import string
from typing import Callable, Iterator, Sequence

import torch

from hf_decoding_ext.core.loop import DecodingLoop, GenerationState

Predicate = Callable[[list, int], bool]
"""``predicate(prefix_token_ids, token_id) -> bool``: may ``token_id`` follow the generated tokens ``prefix``?"""

MaskFn = Callable[[torch.Tensor], torch.Tensor]
"""``mask_fn(input_ids (batch, seq)) -> (batch, vocab)`` bool: the allowed next tokens of every row."""


# ----------------------------------------------------------------------------------------------- one AWRS step
def _gumbel_keys(logp: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``log p + Gumbel(0, 1)`` noise; sorting the keys in decreasing order samples the tokens without replacement
    from ``p`` (Gumbel-top-k). Zero-probability tokens get key ``-inf`` and are never drawn."""
    u = torch.rand(logp.shape, dtype=torch.float64, generator=generator).clamp_min_(torch.finfo(torch.float64).tiny)
    return logp - torch.log(-torch.log(u))


def _descending(keys: torch.Tensor, first: int = 256) -> Iterator[int]:
    """Indices of ``keys`` in decreasing order, stopping at the first ``-inf`` key. Only the top ``first`` keys are
    selected at first (a walk usually ends within a few tokens); a longer walk falls back once to a full sort."""
    n = keys.numel()
    vals, idx = torch.topk(keys, min(first, n))
    vals, idx = vals.tolist(), idx.tolist()
    for v, i in zip(vals, idx):
        if v == -math.inf:
            return
        yield i
    if len(idx) == n:
        return
    seen = set(idx)
    vals, idx = torch.sort(keys, descending=True, stable=True)
    for v, i in zip(vals.tolist(), idx.tolist()):
        if v == -math.inf:
            return
        if i not in seen:
            yield i


def _awrs(logp: torch.Tensor, accept: Callable[[int], bool],
          generator: torch.Generator | None = None) -> tuple[int | None, float, int]:
    """AWRS on normalised log-probabilities ``logp`` (1-D float64 on the CPU; ``-inf`` allowed).

    Returns ``(token, log_weight, n_evals)``; ``token`` is ``None`` and ``log_weight`` is ``-inf`` when no token of
    positive probability is allowed (``Z = 0``). ``accept`` is called at most once per token.
    """
    verdicts: dict[int, bool] = {}

    def check(t: int) -> bool:
        v = verdicts.get(t)
        if v is None:
            v = verdicts[t] = bool(accept(t))
        return v

    # loop 1: adaptive rejection sampling = sampling without replacement until the first allowed token
    token, rejected = None, []
    for t in _descending(_gumbel_keys(logp, generator)):
        if check(t):
            token = t
            break
        rejected.append(t)
    if token is None:
        return None, -math.inf, len(verdicts)
    if rejected:
        logp = logp.clone()
        logp[rejected] = -math.inf
    log_mass = float(torch.logsumexp(logp, dim=0))  # log(1 - rejected mass), without cancellation
    # loop 2: a second adaptive rejection run on what loop 1 left (the tokens rejected in loop 1 are known), until an
    # allowed token (loop 1's token included) is drawn; only its rejections matter
    n_rejected_2 = 0
    for t in _descending(_gumbel_keys(logp, generator)):
        if t == token or check(t):
            break
        n_rejected_2 += 1
    log_weight = log_mass - math.log(len(rejected) + n_rejected_2 + 1)
    return token, log_weight, len(verdicts)


def awrs_step(probs: torch.Tensor, predicate_on_token: Callable[[int], bool],
              generator: torch.Generator | None = None) -> tuple[int | None, float, int]:
    r"""One step of Adaptive Weighted Rejection Sampling on a probability vector.

    From "Fast Controlled Generation from Language Models with Adaptive Weighted Rejection Sampling" (Lipkin et al.,
    arXiv 2504.05410). Draws a token ``x`` from the constrained distribution ``p(t) 1[allowed(t)] / Z`` and an
    unbiased estimate ``Z_hat`` of the local normaliser ``Z = sum_{t allowed} p(t)``, calling the constraint only on
    tokens it draws:

    1. sample tokens from ``p`` *without replacement* (rejected tokens are removed and ``p`` renormalised) until one
       is allowed: that token is ``x``; ``R_1`` is the set of rejected tokens;
    2. run a second adaptive rejection loop from ``p`` restricted to ``V \ R_1`` until it draws an allowed token
       (possibly ``x`` again, whose verdict is known), counting its rejections ``|R_2|``;
    3. ``Z_hat = (1 - p(R_1)) / (|R_1| + |R_2| + 1)``.

    Args:
        probs: ``(vocab,)`` non-negative probabilities (normalised here; zero-probability tokens are never drawn).
        predicate_on_token: ``token_id -> bool``; called at most once per token.
        generator: optional ``torch.Generator`` (CPU) for the sampling noise.

    Returns:
        ``(token, log_weight, n_evals)``: the sampled token id, ``log Z_hat`` and the number of predicate calls. When
        no token of positive probability is allowed, ``(None, -inf, n_evals)``.

    Example:
        >>> import torch
        >>> from hf_decoding_ext.structured.awrs import awrs_step
        >>> probs = torch.tensor([0.5, 0.3, 0.2])
        >>> token, log_w, n = awrs_step(probs, lambda t: t != 0, torch.Generator().manual_seed(0))
        >>> token in (1, 2) and n <= 3
        True
    """
    if not isinstance(probs, torch.Tensor) or probs.dim() != 1 or probs.numel() == 0:
        raise ValueError(f"probs must be a non-empty 1-D tensor, got {getattr(probs, 'shape', type(probs))}")
    if not callable(predicate_on_token):
        raise ValueError("predicate_on_token must be callable (token_id -> bool)")
    p = probs.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(p).all()) or bool((p < 0).any()):
        raise ValueError("probs must be finite and non-negative")
    total = float(p.sum())
    if total <= 0:
        raise ValueError("probs must have positive total mass")
    return _awrs(torch.log(p / total), predicate_on_token, generator)


# ----------------------------------------------------------------------------------------------- named constraints
_LOWERCASE_CHARS = frozenset(string.ascii_lowercase + " .,;:!?'\"-\n")
_PRINTABLE_ASCII = frozenset(string.printable)

CONSTRAINTS: dict[str, tuple[Callable[[str], bool], str]] = {
    "no-letter-e": (lambda s: "e" not in s.lower(), "no token whose text contains the letter e (a lipogram)"),
    "lowercase": (lambda s: bool(s) and all(c in _LOWERCASE_CHARS for c in s),
                  "only tokens made of lowercase ASCII letters, space, newline and . , ; : ! ? ' \" -"),
    "no-digits": (lambda s: not any(c.isdigit() for c in s), "no token containing a digit"),
    "ascii": (lambda s: bool(s) and all(c in _PRINTABLE_ASCII for c in s), "only printable-ASCII tokens"),
}
"""Built-in named token constraints (context-free tests on a token's decoded text), selectable by name."""


def _eos_ids(model=None, tokenizer=None, eos_token_id=None) -> frozenset[int]:
    ids = eos_token_id
    if ids is None and model is not None:
        ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if ids is None and tokenizer is not None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return frozenset()
    return frozenset(int(i) for i in (ids if isinstance(ids, (list, tuple, set, frozenset)) else [ids]))


class TokenTextPredicate:
    """A token predicate that tests each token's decoded text, ignoring the prefix.

    Each token is decoded on demand (and remembered), so a sampler that only asks about a few tokens per step pays for
    those only. Eos tokens are allowed when ``allow_eos`` (ending the text adds no character); the other special
    tokens are refused, and so are ids beyond the tokenizer.

    Args:
        tokenizer: the model's tokenizer.
        test: ``text -> bool`` on a token's decoded text.
        eos_token_id: eos id(s) (default: the tokenizer's).
        allow_eos: whether eos passes the predicate.
    """

    def __init__(self, tokenizer, test: Callable[[str], bool], eos_token_id=None, allow_eos: bool = True):
        if tokenizer is None:
            raise ValueError("TokenTextPredicate needs a tokenizer")
        if not callable(test):
            raise ValueError("test must be callable (text -> bool)")
        self.tokenizer = tokenizer
        self.test = test
        self.eos_token_ids = _eos_ids(None, tokenizer, eos_token_id)
        self.allow_eos = bool(allow_eos)
        self.special_ids = frozenset(int(i) for i in tokenizer.all_special_ids)
        self.size = len(tokenizer)
        self._texts: dict[int, str] = {}

    def text(self, token_id: int) -> str:
        """The decoded text of one token (cached)."""
        t = self._texts.get(token_id)
        if t is None:
            t = self._texts[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False,
                                                              clean_up_tokenization_spaces=False)
        return t

    def __call__(self, prefix: Sequence[int], token_id: int) -> bool:
        token_id = int(token_id)
        if token_id in self.eos_token_ids:
            return self.allow_eos
        if token_id in self.special_ids or not 0 <= token_id < self.size:
            return False
        return bool(self.test(self.text(token_id)))


def named_predicate(name: str, tokenizer, eos_token_id=None) -> TokenTextPredicate:
    """The built-in constraint ``name`` (a key of :data:`CONSTRAINTS`) as a predicate for ``tokenizer``."""
    if name not in CONSTRAINTS:
        raise ValueError(f"unknown constraint {name!r}; built-in constraints: {sorted(CONSTRAINTS)}")
    return TokenTextPredicate(tokenizer, CONSTRAINTS[name][0], eos_token_id=eos_token_id)


# ----------------------------------------------------------------------------------------------- decoding loop
class AdaptiveWeightedRejectionSampling(DecodingLoop):
    r"""Adaptive Weighted Rejection Sampling (AWRS) as a ``custom_generate`` decoding loop.

    From "Fast Controlled Generation from Language Models with Adaptive Weighted Rejection Sampling" (Lipkin et al.,
    COLM 2025, arXiv 2504.05410). Locally constrained decoding samples each token from
    ``p(t | prefix) 1[allowed(prefix, t)] / Z(prefix)``. Token masking evaluates the constraint on the whole
    vocabulary at every step; AWRS instead samples from ``p`` *without replacement* (Gumbel-top-k), evaluating the
    constraint only on the tokens it draws, until one is allowed. That token has exactly the locally constrained
    distribution. A second adaptive rejection run (which starts with the first run's rejections removed, so it is
    short) gives the paper's unbiased, low-variance estimate of the local normaliser:

    .. math:: \hat Z = \frac{1 - \sum_{r \in R_1} p(r)}{|R_1| + |R_2| + 1}, \qquad \mathbb{E}[\hat Z] = Z,

    with ``R_1``, ``R_2`` the tokens rejected by the two runs (see :func:`awrs_step`). The product of the per-step
    ``Z_hat`` is an unbiased estimate of the probability that the model's unconstrained sample satisfies the
    constraint at every step, so ``exp(log weight)`` makes the sequences *properly weighted* for the globally
    constrained distribution ``p(y) 1[y allowed] / P(allowed)`` (the importance weights of the paper's AWRS-SMC).

    The distribution ``p`` is the caller's processed distribution: ``generate()``'s logits processors (temperature,
    top-k, top-p, ...) are applied first, and ``Z`` is relative to it. Batch rows are independent (each row is one
    particle); eos is subject to the constraint like any other token. Sampling only: ``do_sample=True`` is required.

    Outputs: with ``return_dict_in_generate=True`` the output has the fields ``awrs_log_weights`` (``(batch,)``
    float64: the sum over steps of ``log Z_hat``), ``awrs_num_evals`` (``(batch,)``: constraint evaluations, i.e.
    predicate calls or mask look-ups), ``awrs_num_steps`` (``(batch,)``: tokens sampled) and ``awrs_failed``
    (``(batch,)`` bool, see below). The same tensors are kept on the instance after each call as
    ``last_log_weights``, ``last_num_evals``, ``last_num_steps`` and ``last_failed``. With ``output_scores=True`` the
    recorded scores are the processed scores before the constraint.

    Args:
        predicate: ``predicate(prefix_token_ids, token_id) -> bool`` where ``prefix_token_ids`` (``list[int]``) are the
            tokens the row generated so far (the prompt excluded) and ``token_id`` the candidate next token.
        mask_fn: optional fast path ``mask_fn(input_ids) -> (batch, vocab)`` bool tensor of allowed next tokens
            (``input_ids`` is the whole ``(batch, seq)`` sequence, prompt and left padding included; a narrower mask
            leaves the ids beyond it disallowed). When given, AWRS looks the drawn tokens up in the mask instead of
            calling ``predicate``.
        constraint: name of a built-in constraint (:data:`CONSTRAINTS`: ``"no-letter-e"``, ``"lowercase"``,
            ``"no-digits"``, ``"ascii"``) instead of ``predicate``; needs ``tokenizer``.
        tokenizer: tokenizer for ``constraint``.
        eos_token_id: eos id(s) that the named constraints allow (default: the tokenizer's).
        seed: seed of a private ``torch.Generator`` for the sampling noise (each call restarts from it); ``None``
            uses torch's global RNG (``torch.manual_seed``).

    Rows that cannot continue: when no token of positive (processed) probability is allowed, ``Z = 0``: the row's log
    weight becomes ``-inf``, ``awrs_failed`` is set, and the row is finished (it receives the pad token, or eos when
    there is no pad token), like a killed particle in the paper's SMC.

    Deviations: (1) sampling without replacement is realised with Gumbel-top-k keys (one noise vector per rejection
    run) rather than repeated renormalised draws; the two are equivalent in distribution. (2) This loop is the
    paper's per-token proposal with its weights; the sequential Monte Carlo layer (resampling particles by weight) is
    left to the caller: the batch rows are independent importance samples. (3) The reference library's optional
    ``max_rejects`` cut-off and its later recursive/geometric estimator variants are not implemented; the estimator
    is the paper's two-run one above. (4) The predicate sees the generated tokens only, not the prompt.

    Example:
        >>> from hf_decoding_ext.core.models import load_model, encode_prompts
        >>> from hf_decoding_ext.structured.awrs import AdaptiveWeightedRejectionSampling
        >>> model, tokenizer = load_model()  # doctest: +SKIP
        >>> awrs = AdaptiveWeightedRejectionSampling.for_model(
        ...     model, tokenizer, constraint="no-letter-e")  # doctest: +SKIP
        >>> inputs = encode_prompts(tokenizer, "Name a fruit.")  # doctest: +SKIP
        >>> out = model.generate(**inputs, custom_generate=awrs, do_sample=True, top_k=0, max_new_tokens=20,
        ...                      return_dict_in_generate=True)  # doctest: +SKIP
        >>> out.awrs_log_weights, out.awrs_num_evals  # doctest: +SKIP
    """

    supports_greedy = False

    def __init__(self, predicate: Predicate | None = None, mask_fn: MaskFn | None = None, *,
                 constraint: str | None = None, tokenizer=None, eos_token_id=None, seed: int | None = None):
        if predicate is not None and constraint is not None:
            raise ValueError("give either predicate or constraint, not both")
        if constraint is not None:
            if not isinstance(constraint, str):
                raise ValueError(f"constraint must be the name of a built-in constraint, got {constraint!r}")
            if tokenizer is None:
                raise ValueError(f"constraint={constraint!r} needs the tokenizer "
                                 "(use for_model(model, tokenizer, ...))")
            predicate = named_predicate(constraint, tokenizer, eos_token_id=eos_token_id)
        if predicate is not None and not callable(predicate):
            raise ValueError(f"predicate must be callable (prefix_token_ids, token_id) -> bool, got {predicate!r}")
        if mask_fn is not None and not callable(mask_fn):
            raise ValueError(f"mask_fn must be callable input_ids -> (batch, vocab) bool, got {mask_fn!r}")
        if predicate is None and mask_fn is None:
            raise ValueError("AdaptiveWeightedRejectionSampling needs a constraint: predicate=, mask_fn= or "
                             f"constraint= (one of {sorted(CONSTRAINTS)})")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError(f"seed must be None or an integer, got {seed!r}")
        self.predicate = predicate
        self.mask_fn = mask_fn
        self.constraint = constraint
        self.seed = seed
        self.last_log_weights: torch.Tensor | None = None
        self.last_num_evals: torch.Tensor | None = None
        self.last_num_steps: torch.Tensor | None = None
        self.last_failed: torch.Tensor | None = None

    @classmethod
    def for_model(cls, model=None, tokenizer=None, constraint: str | None = "no-letter-e",
                  predicate: Predicate | None = None, mask_fn: MaskFn | None = None,
                  seed: int | None = None, grammar=None, json_schema=None, regex: str | None = None,
                  lark: str | None = None, grammar_mask: bool = False) -> "AdaptiveWeightedRejectionSampling":
        """Build for ``model``: a named ``constraint`` (default ``"no-letter-e"``) with the model's eos ids, an
        explicit ``predicate`` / ``mask_fn``, or a grammar (``grammar`` / ``json_schema`` / ``regex`` / ``lark``, as
        in :class:`~hf_decoding_ext.structured.json_schema.GrammarConstrainedLogitsProcessor`), which take precedence
        over the default constraint. A grammar is checked token by token on the drawn tokens
        (:class:`~hf_decoding_ext.structured.grammar.GrammarTokenPredicate`); ``grammar_mask=True`` uses the
        engine's full token mask instead (the fast path when most of the vocabulary is forbidden)."""
        if any(g is not None for g in (grammar, json_schema, regex, lark)):
            from hf_decoding_ext.structured.json_schema import GrammarConstrainedLogitsProcessor
            from hf_decoding_ext.structured.grammar import GrammarTokenPredicate

            if predicate is not None or mask_fn is not None:
                raise ValueError("give a grammar or predicate= / mask_fn=, not both")
            proc = GrammarConstrainedLogitsProcessor.for_model(model, tokenizer, grammar, json_schema=json_schema,
                                                               regex=regex, lark=lark)
            if grammar_mask or getattr(proc, "deferred", None) is not None:
                # keywords checked on completion (unmaskable="validate") live in the processor's mask, not the
                # engine's token check
                mask_fn = proc.allowed_tokens
            else:
                predicate = GrammarTokenPredicate(proc.compiled)
        if predicate is not None or mask_fn is not None:
            constraint = None
        if constraint is not None and tokenizer is None:
            raise ValueError(f"constraint={constraint!r} needs the model's tokenizer")
        eos = _eos_ids(model, tokenizer) if constraint is not None else None
        return cls(predicate=predicate, mask_fn=mask_fn, constraint=constraint, tokenizer=tokenizer,
                   eos_token_id=sorted(eos) if eos else None, seed=seed)

    # ----------------------------------------------------------------------------------------- decoding
    def _mask(self, input_ids: torch.Tensor, vocab: int) -> torch.Tensor:
        mask = self.mask_fn(input_ids)
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] != input_ids.shape[0]:
            raise ValueError(f"mask_fn must return a (batch={input_ids.shape[0]}, vocab) tensor, got "
                             f"{getattr(mask, 'shape', type(mask))}")
        if mask.shape[1] > vocab:
            raise ValueError(f"mask_fn returned {mask.shape[1]} columns for a vocabulary of {vocab}")
        mask = mask.detach().to("cpu").bool()
        if mask.shape[1] < vocab:
            mask = torch.cat([mask, mask.new_zeros((mask.shape[0], vocab - mask.shape[1]))], dim=1)
        return mask

    def _fill_token(self, state: GenerationState) -> int:
        if state.pad_token_id is not None:
            return int(state.pad_token_id)
        eos = state.generation_config.eos_token_id
        if eos is not None:
            return int(eos[0] if isinstance(eos, (list, tuple)) else eos)
        return 0

    @torch.no_grad()
    def run(self, state: GenerationState):
        batch = state.batch_size
        log_weights = torch.zeros(batch, dtype=torch.float64)
        num_evals = torch.zeros(batch, dtype=torch.long)
        num_steps = torch.zeros(batch, dtype=torch.long)
        failed = torch.zeros(batch, dtype=torch.bool)
        generator = torch.Generator().manual_seed(self.seed) if self.seed is not None else None
        fill = self._fill_token(state)
        while not state.done:
            logits, _ = state.next_token_logits()
            scores = state.process(logits)
            state.record(scores, logits)
            logp = torch.log_softmax(scores.double(), dim=-1).cpu()
            mask = self._mask(state.input_ids, scores.shape[-1]) if self.mask_fn is not None else None
            tokens = torch.full((batch,), fill, dtype=torch.long)
            active = state.unfinished.tolist()
            for row in range(batch):
                if not active[row]:
                    continue
                if mask is not None:
                    row_mask = mask[row]

                    def accept(t, row_mask=row_mask):
                        return bool(row_mask[t])
                else:
                    prefix = state.input_ids[row, state.prompt_length:].tolist()

                    def accept(t, prefix=prefix):
                        return self.predicate(prefix, t)

                token, log_w, n = _awrs(logp[row], accept, generator)
                num_evals[row] += n
                num_steps[row] += 1
                log_weights[row] += log_w
                if token is None:  # Z = 0: nothing allowed can follow; finish the row (a killed particle)
                    failed[row] = True
                    state.unfinished[row] = False
                else:
                    tokens[row] = token
            state.append(tokens.to(state.device))
        device = state.device
        self.last_log_weights = log_weights.to(device)
        self.last_num_evals = num_evals.to(device)
        self.last_num_steps = num_steps.to(device)
        self.last_failed = failed.to(device)
        return {"awrs_log_weights": self.last_log_weights, "awrs_num_evals": self.last_num_evals,
                "awrs_num_steps": self.last_num_steps, "awrs_failed": self.last_failed}


__all__ = ["AdaptiveWeightedRejectionSampling", "awrs_step", "named_predicate", "TokenTextPredicate", "CONSTRAINTS"]
