"""DoLa: decoding by contrasting the final layer with a dynamically chosen premature layer of the same model.

Paper: "DoLa: Decoding by Contrasting Layers Improves Factuality in Large Language Models" (Chuang et al., ICLR 2024,
arXiv 2309.03883). transformers 4.4x shipped it in core (``generate(dola_layers=...)``); transformers 5 moved it to a
Hub repository (``transformers-community/dola``) that needs remote code, so this module is the library's own
reference implementation, written as a ``custom_generate`` loop.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from transformers import RepetitionPenaltyLogitsProcessor

from hf_decoding_ext.core.anatomy import exit_logits, num_layers
from hf_decoding_ext.core.plausibility import plausibility_mask
from hf_decoding_ext.core.loop import DecodingLoop, GenerationState

logger = logging.getLogger(__name__)

BUCKETS = ("low", "high")
DIVERGENCES = ("js", "transformers")


# --------------------------------------------------------------------------------------------- DoLa maths
def dola_candidate_layers(dola_layers: str | Sequence[int], num_layers: int, tie_word_embeddings: bool
                          ) -> list[int]:
    """Candidate premature layers, with the rules of transformers 4.4x (``_dola_decoding``).

    Layer ``j`` is ``hidden_states[j]``: 0 is the word embedding output, ``j`` the output of the ``j``-th decoder layer,
    ``N = num_layers`` the final (mature) layer, which cannot be a candidate.

    * ``start = 0`` if the embeddings are not tied, else ``2`` if ``N > 2``, ``1`` if ``N == 2``, ``0`` otherwise
      (with tied embeddings the early exit of layer 0 is nearly the identity map, so it is skipped).
    * ``"low"``: ``[start]`` if ``start == N // 2``; else ``range(start, N // 2, 2)`` for ``N <= 40`` and
      ``range(start, 20, 2)`` for ``N > 40``.
    * ``"high"``: ``range(N // 2, N, 2)`` for ``N <= 40``, ``range(N - 20, N, 2)`` for ``N > 40``.
    * a list of indices: used as given (deduplicated), each must be in ``[0, N - 1]``.

    Example: SmolLM2-135M (``N = 30``, tied embeddings): ``"low"`` = 2, 4, ..., 14 and ``"high"`` = 15, 17, ..., 29.

    >>> dola_candidate_layers("low", 30, True)
    [2, 4, 6, 8, 10, 12, 14]
    >>> dola_candidate_layers("high", 30, True)
    [15, 17, 19, 21, 23, 25, 27, 29]
    >>> dola_candidate_layers("low", 32, False)
    [0, 2, 4, 6, 8, 10, 12, 14]
    """
    n = int(num_layers)
    if isinstance(dola_layers, str):
        if dola_layers not in BUCKETS:
            raise ValueError(f"unknown dola_layers bucket {dola_layers!r}; use 'low', 'high' or a list of layer "
                             "indices")
        if not tie_word_embeddings:
            start = 0
        elif n > 2:
            start = 2
        elif n == 2:
            start = 1
        else:
            start = 0
        if dola_layers == "low":
            if start == n // 2:
                return [start]
            return list(range(start, n // 2, 2)) if n <= 40 else list(range(start, 20, 2))
        return list(range(n // 2, n, 2)) if n <= 40 else list(range(n - 20, n, 2))
    layers: list[int] = []
    for j in dola_layers:
        if isinstance(j, bool) or not isinstance(j, int):
            raise ValueError(f"dola_layers indices must be integers, got {j!r}")
        if not 0 <= j < n:
            raise ValueError(
                f"premature layer index {j} out of range: this model has {n} decoder layers, so candidates must be in "
                f"[0, {n - 1}] (0 = embeddings; {n} is the final, mature layer and cannot be contrasted with itself)"
            )
        if j not in layers:
            layers.append(j)
    if not layers:
        raise ValueError("dola_layers is an empty list")
    return layers


def layer_divergence(final_logits: torch.Tensor, premature_logits: torch.Tensor, variant: str = "js") -> torch.Tensor:
    """Divergence between the final layer's next-token distribution ``(batch, vocab)`` and each candidate's
    ``(n_layers, batch, vocab)``; returns ``(n_layers, batch)``.

    ``"js"``: the Jensen-Shannon divergence of the paper, ``0.5 KL(q_N || m) + 0.5 KL(q_j || m)`` with
    ``m = (q_N + q_j) / 2`` (nats). ``"transformers"``: the quantity the reference code and transformers 4.4x computed,
    ``0.5 * (mean_v m (log m - log q_N) + mean_v m (log m - log q_j))`` (``F.kl_div`` with the arguments of
    ``KL(m || q)``, averaged over the vocabulary), which can rank layers differently.
    """
    lp = torch.log_softmax(final_logits.float(), dim=-1)[None]
    lq = torch.log_softmax(premature_logits.float(), dim=-1)
    p, q = lp.exp(), lq.exp()
    m = 0.5 * (p + q)
    lm = torch.log(m.clamp_min(torch.finfo(m.dtype).tiny))
    if variant == "js":
        return 0.5 * (torch.xlogy(p, p) - p * lm).sum(-1) + 0.5 * (torch.xlogy(q, q) - q * lm).sum(-1)
    if variant == "transformers":
        return 0.5 * ((torch.xlogy(m, m) - m * lp).mean(-1) + (torch.xlogy(m, m) - m * lq).mean(-1))
    raise ValueError(f"unknown divergence {variant!r}; use one of {DIVERGENCES}")



def premature_choice(final_logits: torch.Tensor, premature_logits: torch.Tensor, divergence: str = "js"):
    """The premature layer of each row: the candidate whose distribution diverges most from the final layer's.

    Returns ``(logits (batch, vocab) of the chosen layer, index (batch,) into the candidates, divergences
    (n_layers, batch))`` (:func:`layer_divergence`)."""
    div = layer_divergence(final_logits, premature_logits, divergence)
    idx = div.argmax(dim=0)
    rows = torch.arange(final_logits.shape[0], device=final_logits.device)
    return premature_logits[idx, rows].float(), idx, div


def dola_scores(final_logits: torch.Tensor, premature_logits: torch.Tensor, candidate_layers: Sequence[int],
                alpha: float = 0.1, divergence: str = "js"):
    """DoLa next-token scores and the premature layer chosen per row.

    Args:
        final_logits: ``(batch, vocab)`` logits of the final layer.
        premature_logits: ``(n_layers, batch, vocab)`` early-exit logits of ``candidate_layers``.
        candidate_layers: the layer index of each entry of ``premature_logits``.

    Returns:
        ``(scores, chosen, divergences)``: ``scores (batch, vocab)`` = ``log q_N - log q_M`` on ``V_head`` and ``-inf``
        elsewhere; ``chosen (batch,)`` the premature layer ``M`` of each row (argmax of the divergence);
        ``divergences (n_layers, batch)``.
    """
    base, idx, div = premature_choice(final_logits, premature_logits, divergence)
    layers = torch.as_tensor(list(candidate_layers), device=final_logits.device)
    scores = dola_token_scores(final_logits, base, alpha, relative_top_value=float("-inf"))
    return scores, layers[idx], div


# --------------------------------------------------------------------------------------------- the loop
class DoLa(DecodingLoop):
    r"""DoLa decoding loop: contrast the final layer with the premature layer that diverges most from it.

    From "DoLa: Decoding by Contrasting Layers Improves Factuality in Large Language Models" (Chuang et al.,
    arXiv 2309.03883). At each step one forward pass with ``output_hidden_states=True`` gives the final-layer
    distribution ``q_N`` and, for every candidate layer ``j``, an early-exit distribution
    ``q_j = softmax(head(norm(h_j)))`` (the final norm and LM head applied to the layer's hidden state). Per row:

    .. math::

        M = \arg\max_{j \in J} \mathrm{JSD}(q_N \,\|\, q_j), \qquad
        F(x) = \begin{cases} \log q_N(x) - \log q_M(x) & x \in V_{head} \\ -\infty & \text{otherwise} \end{cases}

    with ``V_head = {x : q_N(x) >= alpha * max_w q_N(w)}`` (``alpha = 0.1``). The caller's logits processors
    (repetition penalty, temperature, top-k/top-p, ...) are applied to ``F`` after the contrast, as transformers did,
    then the next token is the argmax (greedy) or sampled (``do_sample=True``). Rows of a batch choose their premature
    layer independently; left padding is handled by :class:`GenerationState`.

    Candidate layers (``dola_layers``): ``"high"`` (upper half; the paper/transformers' choice for short-answer tasks
    such as TruthfulQA), ``"low"`` (lower half; long-answer reasoning) or an explicit list of ``hidden_states`` indices
    (0 = embeddings). The buckets follow transformers 4.4x exactly, see :func:`dola_candidate_layers` (for the
    30-layer, tied-embedding SmolLM2-135M: ``"low"`` = 2, 4, ..., 14 and ``"high"`` = 15, 17, ..., 29).

    Repetition penalty: DoLa tends to repeat itself; the paper uses a repetition penalty of 1.2 and transformers warned
    below it ("The recommended value for DoLa decoding is `repetition_penalty>=1.2`"). Pass ``repetition_penalty=1.2``
    either to ``generate()`` or to this constructor (not both); this loop logs a warning when neither is set.

    Differences from the reference code (voidism/DoLa and transformers 4.4x), all switchable:

    * early exit: the reference code applied only the LM head to intermediate hidden states
      (``lm_head(outputs.hidden_states[layer])``); here the final norm is applied first (``final_norm=True``), which
      is what the final layer itself gets. ``final_norm=False`` reproduces the reference.
    * divergence: the paper's Jensen-Shannon divergence (``divergence="js"``); the reference code computed
      ``F.kl_div(log q, m)`` terms, i.e. ``KL(m || q)`` averaged over the vocabulary (``divergence="transformers"``).
    * batches: the reference code averaged the divergence over the batch and used one premature layer for all rows;
      here each row picks its own.

    Measured on SmolLM2-135M-Instruct (this library's 58-question factual multiple-choice set, each choice scored
    with the reference TruthfulQA-MC protocol, summed :func:`dola_token_scores` against summed log-probabilities,
    ``results/contrastive_quality.json``): plain 0.483, DoLa ``"high"`` 0.328, ``"low"`` 0.310. A 135M
    model's layer contrast does not help factuality here; the paper's gains are on 7B-65B LLaMA models. (The
    reference's TruthfulQA-MC script defaults to ``relative_top = 0``, no head mask; the scorer keeps the paper's
    ``alpha = 0.1``: pass ``alpha=0`` to :func:`dola_scorer` for the script's default.)

    Inspection: after a run, ``self.last_premature_layers`` holds, per generated step, the list of chosen layers (one
    per row); with ``return_dict_in_generate=True`` the output also has a ``premature_layers`` field (same list) and
    ``output_logits=True`` records the final-layer logits, ``output_scores=True`` the processed contrast scores.

    Args:
        dola_layers: ``"low"``, ``"high"`` or a list of candidate layer indices in ``[0, N - 1]``.
        alpha: adaptive plausibility threshold in ``[0, 1]`` (paper: 0.1). ``alpha = 1`` keeps only the final layer's
            most likely token, so greedy DoLa then equals greedy decoding.
        final_norm: apply the model's final norm before the LM head for early exits.
        divergence: ``"js"`` (paper) or ``"transformers"`` (reference code's variant).
        repetition_penalty: if set, a ``RepetitionPenaltyLogitsProcessor`` applied to the contrast scores before the
            caller's processors (for callers, like the CLI, that cannot pass it to ``generate()``).

    Example:
        >>> from hf_decoding_ext.core.models import load_model, encode_prompts
        >>> from hf_decoding_ext.contrastive.dola import DoLa
        >>> model, tokenizer = load_model()  # doctest: +SKIP
        >>> loop = DoLa(dola_layers="high")
        >>> inputs = encode_prompts(tokenizer, "What is the capital of Australia?")  # doctest: +SKIP
        >>> out = model.generate(**inputs, custom_generate=loop, do_sample=False, max_new_tokens=32,
        ...                      repetition_penalty=1.2)  # doctest: +SKIP
        >>> loop.last_premature_layers[:2]  # doctest: +SKIP
        [[17], [29]]
    """

    def __init__(self, dola_layers: str | Sequence[int] = "high", alpha: float = 0.1, final_norm: bool = True,
                 divergence: str = "js", repetition_penalty: float | None = None):
        if isinstance(dola_layers, str):
            if dola_layers not in BUCKETS:
                raise ValueError(f"unknown dola_layers bucket {dola_layers!r}; use 'low', 'high' or a list of layer "
                                 "indices")
        else:
            try:
                dola_layers = list(dola_layers)
            except TypeError as err:
                raise ValueError(f"dola_layers must be 'low', 'high' or a list of integers, got {dola_layers!r}"
                                 ) from err
            if not dola_layers:
                raise ValueError("dola_layers is an empty list")
            for j in dola_layers:
                if isinstance(j, bool) or not isinstance(j, int):
                    raise ValueError(f"dola_layers indices must be integers, got {j!r}")
                if j < 0:
                    raise ValueError(f"premature layer index {j} out of range: indices start at 0 (embeddings)")
        try:
            alpha = float(alpha)
        except (TypeError, ValueError) as err:
            raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}") from err
        if not 0.0 <= alpha <= 1.0:  # also rejects NaN
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if divergence not in DIVERGENCES:
            raise ValueError(f"unknown divergence {divergence!r}; use one of {DIVERGENCES}")
        if repetition_penalty is not None:
            try:
                repetition_penalty = float(repetition_penalty)
            except (TypeError, ValueError) as err:
                raise ValueError(f"repetition_penalty must be a positive number, got {repetition_penalty!r}") from err
            if not repetition_penalty > 0.0:
                raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
        self.dola_layers = dola_layers
        self.alpha = alpha
        self.final_norm = bool(final_norm)
        self.divergence = divergence
        self.repetition_penalty = repetition_penalty
        self.last_premature_layers: list[list[int]] = []

    def candidate_layers(self, model) -> list[int]:
        """The candidate premature layers of this loop for ``model`` (see :func:`dola_candidate_layers`)."""
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        tied = bool(getattr(cfg, "tie_word_embeddings", getattr(model.config, "tie_word_embeddings", False)))
        return dola_candidate_layers(self.dola_layers, num_layers(model), tied)

    def _check_repetition_penalty(self, state: GenerationState) -> None:
        caller = [p for p in state.logits_processor if isinstance(p, RepetitionPenaltyLogitsProcessor)]
        if self.repetition_penalty is not None and caller:
            raise ValueError("repetition_penalty is set both on DoLa and in generate(); set it in one place only")
        penalty = self.repetition_penalty if self.repetition_penalty is not None else (
            caller[0].penalty if caller else 1.0)
        if penalty < 1.2:
            logger.warning("DoLa runs with repetition_penalty=%s; the recommended value for DoLa decoding is "
                           "repetition_penalty>=1.2 (paper and transformers)", penalty)

    @torch.no_grad()
    def run(self, state: GenerationState):
        model = state.model
        layers = self.candidate_layers(model)
        n = num_layers(model)
        self._check_repetition_penalty(state)
        own_penalty = None
        if self.repetition_penalty is not None:  # like generate(): left padding is not penalised
            padding = (state.attention_mask != 0).int().argmax(dim=1)
            own_penalty = RepetitionPenaltyLogitsProcessor(self.repetition_penalty, prompt_ignore_length=padding)
        trace: list[list[int]] = []
        self.last_premature_layers = trace
        counts = {j: 0 for j in layers}
        while not state.done:
            out = state.forward(output_hidden_states=True)
            hidden = out.hidden_states
            if hidden is None or len(hidden) != n + 1:
                got = 0 if hidden is None else len(hidden)
                raise ValueError(f"{type(model).__name__} returned {got} hidden states; DoLa expects "
                                 f"its number of decoder layers + 1 = {n + 1}")
            final = out.logits[:, -1, :]
            premature = torch.stack([exit_logits(hidden[j][:, -1, :], model, self.final_norm) for j in layers])
            scores, chosen, _ = dola_scores(final, premature.to(final.device), layers, self.alpha, self.divergence)
            if own_penalty is not None:
                scores = own_penalty(state.input_ids, scores)
            scores = state.process(scores)
            state.record(scores, final)
            tokens = state.select(scores)
            step = chosen.tolist()
            trace.append(step)
            for r, j in enumerate(step):
                if bool(state.unfinished[r]):
                    counts[j] += 1
            state.append(tokens)
        state.stats["premature_layer_counts"] = counts
        return {"premature_layers": trace}


# --------------------------------------------------------------------------------------------- scoring (MC tasks)
RELATIVE_TOP_VALUE = -1000.0
"""Score given to tokens outside ``V_head`` when DoLa scores a given text (the reference code's
``relative_top_value``), so that the scores of given continuations stay finite."""


def dola_token_scores(final_logits: torch.Tensor, premature_logits: torch.Tensor, alpha: float = 0.1,
                      post_softmax: bool = False, relative_top_value: float = RELATIVE_TOP_VALUE) -> torch.Tensor:
    """Per-token DoLa scores of a given text, with the reference code's ``lm_score`` (voidism/DoLa, ``mode="dola"``).

    ``log_softmax(final) - log_softmax(premature)`` (each over the full vocabulary), then, with ``post_softmax``, a
    log-softmax of that difference, then tokens outside the plausibility head ``V_head`` of the final layer
    (:func:`~hf_decoding_ext.core.plausibility.plausibility_mask`, threshold ``alpha``) set to
    ``relative_top_value``. The reference's TruthfulQA-MC script uses ``post_softmax=False`` (the default here) and
    sums these values over the answer's tokens.

    Args:
        final_logits: ``(rows, vocab)`` final-layer logits.
        premature_logits: ``(rows, vocab)`` early-exit logits of the premature layer chosen for each row.
        alpha: plausibility threshold in ``[0, 1]`` (reference ``relative_top = 0.1``); ``0`` disables the mask.
        post_softmax: log-normalise the difference before the mask (the reference's FACTOR setting).
        relative_top_value: the value of tokens outside ``V_head`` (reference: ``-1000``).

    Example:
        >>> import torch
        >>> final, early = torch.tensor([[2.0, 1.0, -5.0]]), torch.tensor([[1.0, 1.0, 1.0]])
        >>> dola_token_scores(final, early, alpha=0.1)[0, 2].item()
        -1000.0
    """
    if final_logits.shape != premature_logits.shape:
        raise ValueError(f"final and premature logits must have one shape, got {tuple(final_logits.shape)} and "
                         f"{tuple(premature_logits.shape)}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    diff = torch.log_softmax(final_logits.float(), dim=-1) - torch.log_softmax(premature_logits.float(), dim=-1)
    if post_softmax:
        diff = torch.log_softmax(diff, dim=-1)
    keep = plausibility_mask(final_logits, alpha)
    return diff.masked_fill(~keep, float(relative_top_value))


def dola_scorer(model, dola_layers: str | Sequence[int] = "high", alpha: float = 0.1, final_norm: bool = True,
                divergence: str = "js", post_softmax: bool = False):
    """DoLa as a scoring function for likelihood-based multiple choice (the paper's TruthfulQA-MC / FACTOR setting).

    Returns ``score_fn(input_ids (1, T)) -> (T, vocab)``: at every position, :func:`dola_token_scores` (the
    reference code's ``lm_score``): ``log q_N - log q_M`` with both log-softmaxes over the full vocabulary and the
    premature layer ``M`` chosen per position by the divergence (as in generation); tokens outside the
    plausibility head get :data:`RELATIVE_TOP_VALUE` after the difference. The rows are not log-probabilities (no
    renormalisation, as in the reference's TruthfulQA-MC protocol, ``post_softmax=False``); an answer's score is
    the sum of its tokens' values (``evaluate_multiple_choice(..., length_normalize=False)``). Called with
    ``first=k`` it scores positions ``k..T-1`` only (``supports_first``). Use it with
    :func:`hf_decoding_ext.bench.tasks.contrastive.evaluate_multiple_choice`.

    Example:
        >>> from hf_decoding_ext.contrastive.dola import dola_scorer
        >>> from hf_decoding_ext.bench.tasks.contrastive import evaluate_multiple_choice, load_factual_mc
        >>> acc = evaluate_multiple_choice(load_factual_mc(), tokenizer, dola_scorer(model))  # doctest: +SKIP
    """
    loop = DoLa(dola_layers=dola_layers, alpha=alpha, final_norm=final_norm, divergence=divergence)
    layers = loop.candidate_layers(model)

    @torch.no_grad()
    def score(input_ids: torch.Tensor, first: int = 0) -> torch.Tensor:
        device = next(model.parameters()).device
        out = model(input_ids=input_ids.to(device), use_cache=False, output_hidden_states=True, return_dict=True)
        final = out.logits[0, first:].float()  # (T - first, vocab): positions play the role of batch rows
        premature = torch.stack([exit_logits(out.hidden_states[j][0, first:], model, loop.final_norm)
                                 for j in layers]).float()
        base, _, _ = premature_choice(final, premature, loop.divergence)
        return dola_token_scores(final, base, loop.alpha, post_softmax)

    score.supports_first = True
    return score
