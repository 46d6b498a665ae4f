"""Speculative contrastive decoding (SCD): the amateur of contrastive decoding drafts, the expert verifies."""

from __future__ import annotations

import inspect
import math

import torch

from hf_decoding_ext.speculative.acceptance import AcceptanceRule, get_acceptance_rule
from hf_decoding_ext.speculative.drafters.draft_model import DraftModelDrafter
from hf_decoding_ext.speculative.engine import SpeculativeDecoding
from hf_decoding_ext.core.plausibility import plausibility_mask
from hf_decoding_ext.contrastive.context import check_strength, model_vocab_size
from hf_decoding_ext.contrastive.contrastive_decoding import contrastive_decoding_scores

BONUS_MODES = ("contrastive", "expert")
FORMS = ("li", "obrien")
"""Contrastive targets: ``"li"``, the registered contrastive decoding (:func:`contrastive_decoding_scores`, Li et al.);
``"obrien"``, O'Brien & Lewis's ``(1 + beta)``-weighted form (:func:`scd_scores`)."""


def _default(fn, name):
    return inspect.signature(fn).parameters[name].default


FORM_DEFAULTS = {
    "li": {"beta": None, "amateur_temperature": _default(contrastive_decoding_scores, "amateur_temperature")},
    "obrien": {"beta": 0.5, "amateur_temperature": 1.0},
}
"""Per-form defaults of ``beta`` and ``amateur_temperature``: the registered contrastive decoding's temperature for
``"li"`` (no ``beta``: the formula has none), O'Brien & Lewis's ``beta = 0.5`` and an untempered amateur for
``"obrien"``."""


def scd_scores(expert_logits: torch.Tensor, amateur_logits: torch.Tensor, beta: float = 0.5, alpha: float = 0.1,
               amateur_temperature: float = 1.0) -> torch.Tensor:
    """Contrastive scores of O'Brien & Lewis (arXiv 2309.09117): the ``form="obrien"`` target of
    :class:`SpeculativeContrastiveDecoding` (its default, ``form="li"``, is
    :func:`~hf_decoding_ext.contrastive.contrastive_decoding.contrastive_decoding_scores`).

    ``(1 + beta) * log p_e(x) - beta * log q_a(x)`` for ``x`` in ``V_alpha = {x : p_e(x) >= alpha * max_w p_e(w)}``
    and ``-inf`` elsewhere, with ``p_e = softmax(expert_logits)`` and ``q_a = softmax(amateur_logits /
    amateur_temperature)``; ``softmax`` of the result is the contrastive distribution ``p_c``. Any leading shape
    ``(..., vocab)``; float32 result.

    Example:
        >>> import torch
        >>> s = scd_scores(torch.tensor([2.0, 1.0, -5.0]), torch.tensor([4.0, 0.0, 0.0]))
        >>> bool(s[1] > s[0]), bool(torch.isinf(s[2]))
        (True, True)
    """
    beta = check_strength("beta", beta, minimum=0.0)
    alpha = check_strength("alpha", alpha, minimum=0.0, maximum=1.0)
    if not (isinstance(amateur_temperature, (int, float)) and amateur_temperature > 0):
        raise ValueError(f"`amateur_temperature` must be > 0, got {amateur_temperature!r}")
    log_e = torch.log_softmax(expert_logits.float(), dim=-1)
    log_a = torch.log_softmax(amateur_logits.float() / amateur_temperature, dim=-1)
    scores = (1.0 + beta) * log_e - beta * log_a
    return scores.masked_fill(~plausibility_mask(expert_logits, alpha), -math.inf)


class SpeculativeContrastiveDecoding(SpeculativeDecoding):
    r"""
    Speculative Contrastive Decoding (SCD) from "Speculative Contrastive Decoding" (Yuan, Lu, Huang, Yuan and Zhou,
    arXiv 2311.08981), as a ``custom_generate`` loop on this library's speculative engine.

    The amateur model of contrastive decoding (smaller, same vocabulary) drafts ``gamma`` tokens, sampling from its
    distribution ``q`` (greedy: argmax). The expert scores every draft position in one forward. The *target* at each
    position is the contrastive distribution ``p_c = softmax(s)`` of contrastive scores ``s`` computed from the
    expert's and the amateur's logits at that position. By default (``form="li"``) ``s`` is exactly the registered
    ``contrastive-decoding`` method
    (:func:`~hf_decoding_ext.contrastive.contrastive_decoding.contrastive_decoding_scores`, Li et al., arXiv
    2210.15097, with its defaults ``alpha = 0.1`` and ``amateur_temperature = 0.5``):

    .. math:: s(x) = \log p_e(x) - \log q_a(x)\ \text{ for } x \in V_\alpha,\ -\infty \text{ elsewhere},\qquad
              V_\alpha = \{x : p_e(x) \ge \alpha \max_w p_e(w)\}

    with ``p_e = softmax(expert_logits)`` and ``q_a = softmax(amateur_logits / amateur_temperature)``. With
    ``form="obrien"`` it is the form of O'Brien & Lewis ("Contrastive Decoding Improves Reasoning in Large Language
    Models", arXiv 2309.09117; :func:`scd_scores`): ``s(x) = (1 + beta) log p_e(x) - beta log q_a(x)`` on the same
    ``V_alpha``, defaults ``beta = 0.5`` and ``amateur_temperature = 1.0``.

    A draft token ``x`` is accepted with probability ``min(1, p_c(x) / q(x))``; on rejection the token is resampled
    from ``norm(max(0, p_c - q))``
    (:class:`~hf_decoding_ext.speculative.acceptance.SpeculativeSamplingAcceptance`). Greedy (``do_sample=False``):
    ``x`` is accepted iff it is the argmax of ``p_c``, else the argmax is emitted
    (:class:`~hf_decoding_ext.speculative.acceptance.GreedyAcceptance`). The caller's logits processors
    (temperature, top-k/p, repetition penalty, ...) are applied *after* the contrast, to the contrastive scores,
    as with a contrastive-decoding processor placed first in ``generate()``.

    With ``bonus="contrastive"`` (default) the amateur runs one more step on the last draft token, so the bonus
    token after a fully accepted draft is also drawn from ``p_c``: the output is then distributed exactly as
    contrastive decoding sampled from ``p_c``; with ``do_sample=False`` and the default form it is token-identical to
    greedy ``generate()`` with :class:`~hf_decoding_ext.contrastive.contrastive_decoding.ContrastiveDecodingProcessor`
    built with its defaults and the same amateur (up to floating-point near-ties: the expert scores a block of draft
    positions in one forward, the processor one position at a time). With ``bonus="expert"`` the bonus is drawn from
    the expert alone at that position, which is what the paper's algorithm does as we read it (the amateur has not
    scored that position); unverified.

    The contrast demotes exactly the tokens the amateur favours, so the amateur's drafts are accepted less often than
    in plain speculative decoding with the same draft model; with this library's untrained early exits
    (``"self:N"``) as amateurs of SmolLM2-135M-Instruct acceptance is a few percent, which does not pay for the
    drafting on CPU.

    Deviations and unverified points:
        * the default target is this library's registered contrastive decoding (Li et al.'s formula, with the
          reference implementation's amateur temperature 0.5), so that SCD and ``contrastive-decoding`` decode the
          same distribution; which form, ``beta``, ``alpha`` and amateur temperature the SCD paper uses could not be
          verified from its text (``form="obrien"`` gives O'Brien & Lewis's ``beta``-weighted form);
        * the scores are unnormalised log-ratios; sampling from their softmax (the target here with
          ``do_sample=True``) is not contrastive decoding's own procedure (greedy or beam search);
        * the amateur drafts from its logits after the caller's logits processors (the distribution the draft was
          sampled from is what the acceptance test divides by, so this is lossless for any processors), while the
          contrast uses its raw logits at ``amateur_temperature``;
        * no confidence-threshold early stop of the draft: always ``num_tokens`` draft tokens (fewer near
          ``max_new_tokens``).

    Args:
        amateur: the amateur causal LM; must share the expert's vocabulary (checked).
        form (`str`, *optional*, keyword-only, defaults to ``"li"``): the contrastive target, one of
            :data:`FORMS`: ``"li"`` (the registered contrastive decoding) or ``"obrien"`` (O'Brien & Lewis).
        beta (`float`, *optional*): contrast strength ``>= 0`` of ``form="obrien"`` (defaults to 0.5; 0: the
            expert restricted to ``V_alpha``); ``form="li"`` has none and refuses it.
        alpha (`float`, *optional*, defaults to 0.1): plausibility cut-off in ``[0, 1]``.
        num_tokens (`int`, *optional*, defaults to 4): draft length ``gamma``.
        bonus (`str`, *optional*, defaults to ``"contrastive"``): ``"contrastive"`` or ``"expert"`` (see above).
        amateur_temperature (`float`, *optional*): divides the amateur's logits in the contrast; defaults to 0.5
            for ``form="li"`` (the registered contrastive decoding's) and 1.0 for ``form="obrien"``.
        acceptance: ``"auto"`` (greedy or speculative sampling following ``do_sample``), the name of another
            lossless rule of :data:`~hf_decoding_ext.speculative.acceptance.ACCEPTANCE_RULES` or an
            :class:`~hf_decoding_ext.speculative.acceptance.AcceptanceRule`.
        seed (`int`, *optional*): seed of the acceptance rule's draws.

    Batch size 1 only. :meth:`summary` adds ``acceptance_rate`` (accepted / drafted tokens) to the engine's figures
    (``tokens_per_forward``: tokens per expert forward, ``mean_accepted``).

    Examples:

    ```python
    >>> from hf_decoding_ext.core.models import load_model, encode_prompts
    >>> from hf_decoding_ext.contrastive.speculative_contrastive import SpeculativeContrastiveDecoding
    >>> model, tokenizer = load_model()  # doctest: +SKIP
    >>> inputs = encode_prompts(tokenizer, ["Write a short story about a lighthouse."])  # doctest: +SKIP
    >>> scd = SpeculativeContrastiveDecoding.for_model(model, tokenizer, amateur="self:4")  # doctest: +SKIP
    >>> out = model.generate(**inputs, custom_generate=scd, do_sample=False, max_new_tokens=40)  # doctest: +SKIP
    >>> scd.summary()["acceptance_rate"]  # doctest: +SKIP
    >>> obrien = SpeculativeContrastiveDecoding.for_model(model, form="obrien", beta=0.5)  # doctest: +SKIP
    ```
    """

    accepts_assistant_model = False

    def __init__(self, amateur, beta: float | None = None, alpha: float = 0.1, num_tokens: int = 4,
                 bonus: str = "contrastive", amateur_temperature: float | None = None,
                 acceptance: str | AcceptanceRule = "auto", seed: int | None = None, *, form: str = "li"):
        if amateur is None or not callable(amateur):
            raise ValueError("speculative contrastive decoding needs an amateur model")
        if form not in FORMS:
            raise ValueError(f"`form` must be one of {FORMS}, got {form!r}")
        if form == "li" and beta is not None:
            raise ValueError(f"`beta` ({beta!r}) is the strength of form='obrien'; the default form='li' (the "
                             "registered contrastive decoding, log p_e - log q_a) has none")
        self.form = form
        defaults = FORM_DEFAULTS[form]
        self.beta = None if form == "li" else check_strength("beta", defaults["beta"] if beta is None else beta,
                                                             minimum=0.0)
        self.alpha = check_strength("alpha", alpha, minimum=0.0, maximum=1.0)
        if amateur_temperature is None:
            amateur_temperature = defaults["amateur_temperature"]
        self.amateur_temperature = check_strength("amateur_temperature", amateur_temperature, minimum=0.0)
        if self.amateur_temperature == 0.0:
            raise ValueError("`amateur_temperature` must be > 0, got 0")
        if bonus not in BONUS_MODES:
            raise ValueError(f"`bonus` must be one of {BONUS_MODES}, got {bonus!r}")
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"`num_tokens` must be an integer >= 1, got {num_tokens!r}")
        if isinstance(acceptance, str) and not get_acceptance_rule(acceptance, do_sample=False).lossless:
            raise ValueError(f"`acceptance` must name a lossless rule ('auto', 'greedy', 'speculative', ...) or be an "
                             f"AcceptanceRule, got {acceptance!r} (a lossy rule would not keep the contrastive "
                             "distribution)")
        self.bonus = bonus
        self.amateur = amateur
        drafter = DraftModelDrafter(amateur, num_tokens=num_tokens, confidence_threshold=0.0, schedule="constant",
                                    keep_logits=True, extra_step=bonus == "contrastive")
        super().__init__(drafter, acceptance=acceptance, seed=seed)

    @classmethod
    def for_model(cls, model=None, tokenizer=None, amateur="self:4", form: str = "li", beta: float | None = None,
                  alpha: float = 0.1, num_tokens: int = 4, bonus: str = "contrastive",
                  amateur_temperature: float | None = None) -> SpeculativeContrastiveDecoding:
        """Build for ``model`` (the expert). ``amateur`` is a model object, a model name/path (loaded with
        :func:`~hf_decoding_ext.core.models.load_model` on the expert's device and dtype) or ``"self:N"``: the expert's
        first ``N`` layers with its final norm and head (:func:`~hf_decoding_ext.core.models.truncated_model`), a weak
        stand-in where no smaller model of the same family is available. ``tokenizer`` is accepted for the registry's
        uniform signature and not used."""
        from hf_decoding_ext.core.models import resolve_amateur

        amateur = resolve_amateur(model, amateur)
        if amateur is None:
            raise ValueError("speculative contrastive decoding needs an amateur model")
        if model is not None and model_vocab_size(amateur) != model_vocab_size(model):
            raise ValueError(f"the amateur's vocabulary ({model_vocab_size(amateur)}) differs from the expert's "
                             f"({model_vocab_size(model)}); the amateur must share the expert's tokenizer")
        return cls(amateur, beta=beta, alpha=alpha, num_tokens=num_tokens, bonus=bonus,
                   amateur_temperature=amateur_temperature, form=form)

    # ------------------------------------------------------------------------------------------------ engine hooks
    def contrast(self, expert_logits: torch.Tensor, amateur_logits: torch.Tensor) -> torch.Tensor:
        """The contrastive scores of :attr:`form` (``softmax`` of them is the target ``p_c``), ``(..., vocab)``.

        Example:
            >>> import torch
            >>> from hf_decoding_ext.core.models import truncated_model
            >>> scd = SpeculativeContrastiveDecoding(truncated_model(model, 1))  # doctest: +SKIP
            >>> scd.contrast(torch.tensor([2.0, 1.0, -5.0]), torch.tensor([2.0, 0.0, 0.0]))  # doctest: +SKIP
        """
        if self.form == "li":
            return contrastive_decoding_scores(expert_logits, amateur_logits, self.alpha, self.amateur_temperature)
        return scd_scores(expert_logits, amateur_logits, self.beta, self.alpha, self.amateur_temperature)

    def verification_scores(self, state, draft, tree_logits):
        """Contrast (:meth:`contrast`) the expert's raw logits with the amateur's at every node the amateur scored
        (the rest, i.e. the bonus position with ``bonus="expert"``, keeps the expert's logits); the engine then
        applies the caller's processors."""
        amateur = draft.info["assistant_logits"].to(tree_logits.device)
        m = min(amateur.shape[0], tree_logits.shape[0])
        contrast = self.contrast(tree_logits[:m], amateur[:m])
        return torch.cat([contrast, tree_logits[m:]]) if m < tree_logits.shape[0] else contrast

    # ------------------------------------------------------------------------------------------------ summaries
    def summary(self) -> dict:
        """The engine's aggregates plus ``acceptance_rate``: accepted draft tokens / drafted tokens."""
        out = super().summary()
        if out:
            drafted = sum(s.draft_size for s in self.last_stats)
            out["acceptance_rate"] = sum(s.accepted for s in self.last_stats) / drafted if drafted else float("nan")
        return out
