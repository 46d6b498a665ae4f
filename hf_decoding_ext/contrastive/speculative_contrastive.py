"""Speculative contrastive decoding (SCD): the amateur of contrastive decoding drafts, the expert verifies."""

from __future__ import annotations

import math

import torch

from hf_decoding_ext.speculative.acceptance import AcceptanceRule, get_acceptance_rule
from hf_decoding_ext.speculative.drafters.draft_model import DraftModelDrafter
from hf_decoding_ext.speculative.engine import SpeculativeDecoding
from hf_decoding_ext.core.plausibility import plausibility_mask
from hf_decoding_ext.contrastive.context import check_strength, model_vocab_size

BONUS_MODES = ("contrastive", "expert")


def scd_scores(expert_logits: torch.Tensor, amateur_logits: torch.Tensor, beta: float = 0.5, alpha: float = 0.1,
               amateur_temperature: float = 1.0) -> torch.Tensor:
    """Contrastive scores of speculative contrastive decoding (the form of O'Brien & Lewis, arXiv 2309.09117).

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
    position is the contrastive distribution (the form of O'Brien & Lewis, "Contrastive Decoding Improves Reasoning
    in Large Language Models", arXiv 2309.09117, which SCD builds on):

    .. math:: p_c(x) \propto \exp\big((1+\beta) \log p_e(x) - \beta \log q_a(x)\big)\ \text{ for } x \in V_\alpha,
              \ 0 \text{ elsewhere},\qquad V_\alpha = \{x : p_e(x) \ge \alpha \max_w p_e(w)\}

    from the expert's and the amateur's log-probabilities at that position (:func:`scd_scores`; the amateur's logits
    are divided by ``amateur_temperature``). A draft token ``x`` is accepted with probability
    ``min(1, p_c(x) / q(x))``; on rejection the token is resampled from ``norm(max(0, p_c - q))``
    (:class:`~hf_decoding_ext.speculative.acceptance.SpeculativeSamplingAcceptance`). Greedy (``do_sample=False``):
    ``x`` is accepted iff it is the argmax of ``p_c``, else the argmax is emitted
    (:class:`~hf_decoding_ext.speculative.acceptance.GreedyAcceptance`). The caller's logits processors
    (temperature, top-k/p, repetition penalty, ...) are applied *after* the contrast, to the contrastive scores,
    as with a contrastive-decoding processor placed first in ``generate()``.

    With ``bonus="contrastive"`` (default) the amateur runs one more step on the last draft token, so the bonus
    token after a fully accepted draft is also drawn from ``p_c``: the output is then distributed exactly as
    contrastive decoding (token-identical to greedy ``generate()`` with the equivalent
    :class:`~hf_decoding_ext.contrastive.context.ContrastiveContextProcessor` when ``do_sample=False``, up to float
    ties). With ``bonus="expert"`` the bonus is drawn from the expert alone at that position, which is what the
    paper's algorithm does as we read it (the amateur has not scored that position); unverified.

    The contrast demotes exactly the tokens the amateur favours, so the amateur's drafts are accepted less often than
    in plain speculative decoding with the same draft model; with this library's untrained early exits
    (``"self:N"``) as amateurs of SmolLM2-135M-Instruct acceptance is a few percent (self:4 to self:16) to ~20%
    (self:24), which does not pay for the drafting on CPU.

    Deviations and unverified points:
        * the defaults ``beta = 0.5``, ``alpha = 0.1`` are O'Brien & Lewis's; the exact SCD defaults could not be
          verified from the paper text;
        * the amateur drafts from its logits after the caller's logits processors (the distribution the draft was
          sampled from is what the acceptance test divides by, so this is lossless for any processors), while the
          contrast uses its raw logits at ``amateur_temperature``;
        * no confidence-threshold early stop of the draft: always ``num_tokens`` draft tokens (fewer near
          ``max_new_tokens``).

    Args:
        amateur: the amateur causal LM; must share the expert's vocabulary (checked).
        beta (`float`, *optional*, defaults to 0.5): contrast strength ``>= 0`` (0: the expert restricted to
            ``V_alpha``).
        alpha (`float`, *optional*, defaults to 0.1): plausibility cut-off in ``[0, 1]``.
        num_tokens (`int`, *optional*, defaults to 4): draft length ``gamma``.
        bonus (`str`, *optional*, defaults to ``"contrastive"``): ``"contrastive"`` or ``"expert"`` (see above).
        amateur_temperature (`float`, *optional*, defaults to 1.0): divides the amateur's logits in the contrast.
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
    ```
    """

    accepts_assistant_model = False

    def __init__(self, amateur, beta: float = 0.5, alpha: float = 0.1, num_tokens: int = 4,
                 bonus: str = "contrastive", amateur_temperature: float = 1.0,
                 acceptance: str | AcceptanceRule = "auto", seed: int | None = None):
        if amateur is None or not callable(amateur):
            raise ValueError("speculative contrastive decoding needs an amateur model")
        self.beta = check_strength("beta", beta, minimum=0.0)
        self.alpha = check_strength("alpha", alpha, minimum=0.0, maximum=1.0)
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
    def for_model(cls, model=None, tokenizer=None, amateur="self:4", beta: float = 0.5, alpha: float = 0.1,
                  num_tokens: int = 4, bonus: str = "contrastive",
                  amateur_temperature: float = 1.0) -> SpeculativeContrastiveDecoding:
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
                   amateur_temperature=amateur_temperature)

    # ------------------------------------------------------------------------------------------------ engine hooks
    def verification_scores(self, state, draft, tree_logits):
        """Contrast the expert's raw logits with the amateur's at every node the amateur scored (the rest, i.e. the
        bonus position with ``bonus="expert"``, keeps the expert's logits); the engine then applies the caller's
        processors."""
        amateur = draft.info["assistant_logits"].to(tree_logits.device)
        m = min(amateur.shape[0], tree_logits.shape[0])
        contrast = scd_scores(tree_logits[:m], amateur[:m], self.beta, self.alpha, self.amateur_temperature)
        return torch.cat([contrast, tree_logits[m:]]) if m < tree_logits.shape[0] else contrast

    # ------------------------------------------------------------------------------------------------ summaries
    def summary(self) -> dict:
        """The engine's aggregates plus ``acceptance_rate``: accepted draft tokens / drafted tokens."""
        out = super().summary()
        if out:
            drafted = sum(s.draft_size for s in self.last_stats)
            out["acceptance_rate"] = sum(s.accepted for s in self.last_stats) / drafted if drafted else float("nan")
        return out
