"""Contrastive decoding (CD): expert log-probability minus an amateur model's, over the expert's plausible head."""

from __future__ import annotations

import math

import torch

from hf_decoding_ext.core.plausibility import plausibility_mask
from hf_decoding_ext.contrastive.context import ContrastiveContextProcessor, check_strength, model_vocab_size


def contrastive_decoding_scores(expert_logits: torch.Tensor, amateur_logits: torch.Tensor, alpha: float = 0.1,
                                amateur_temperature: float = 0.5) -> torch.Tensor:
    """Contrastive decoding's token scores (Li et al., arXiv 2210.15097).

    ``log p_exp(y) - log p_ama(y)`` for ``y`` in ``V_head = {y : p_exp(y) >= alpha * max_w p_exp(w)}``, ``-inf``
    elsewhere; ``p_exp = softmax(expert_logits)``, ``p_ama = softmax(amateur_logits / amateur_temperature)``. Works
    on any leading shape ``(..., vocab)`` (a batch of steps, or every position of a sequence), float32 result.
    Importable on its own (e.g. for speculative contrastive decoding).

    Example:
        >>> import torch
        >>> s = contrastive_decoding_scores(torch.tensor([[2.0, 1.0, -5.0]]), torch.tensor([[2.0, 0.0, 0.0]]))
        >>> bool(s[0, 1] > s[0, 0]), bool(torch.isinf(s[0, 2]))
        (True, True)
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must be in [0, 1], got {alpha!r}")
    if not amateur_temperature > 0.0:
        raise ValueError(f"`amateur_temperature` must be > 0, got {amateur_temperature!r}")
    log_exp = torch.log_softmax(expert_logits.float(), dim=-1)
    log_ama = torch.log_softmax(amateur_logits.float() / amateur_temperature, dim=-1)
    return (log_exp - log_ama).masked_fill(~plausibility_mask(expert_logits, alpha), -math.inf)


class ContrastiveDecodingProcessor(ContrastiveContextProcessor):
    r"""
    [`LogitsProcessor`] for Contrastive Decoding (CD) from "Contrastive Decoding: Open-ended Text Generation as
    Optimization" (Li, Holtzman, Fried, Liang, Eisner, Hashimoto, Zettlemoyer and Lewis, ACL 2023, arXiv 2210.15097).

    The second view is an *amateur* model (smaller, same tokenizer) reading the same prompt and continuation. Each
    token is scored by

    .. math:: \mathrm{CD}(y_t) = \log p_\mathrm{EXP}(y_t \mid y_{<t}) - \log p_\mathrm{AMA}(y_t \mid y_{<t})
              \ \text{ if } y_t \in V_\mathrm{head}, \text{ else } -\infty,
    .. math:: V_\mathrm{head} = \{y : p_\mathrm{EXP}(y \mid y_{<t}) \ge \alpha \max_w p_\mathrm{EXP}(w \mid y_{<t})\}

    on **log-probabilities** (:func:`contrastive_decoding_scores`), with the amateur's softmax at temperature
    ``tau``. Defaults: ``alpha = 0.1`` (the paper's plausibility constraint) and ``amateur_temperature = 0.5`` (the
    reference implementation's GPT-2 command, ``--student_temperature 0.5``; the paper uses ``tau = 1.0`` for OPT).
    The paper searches the CD objective with beam search (``num_beams=5`` in ``generate()``) or, as here,
    greedily (``do_sample=False``, the registry default); the returned scores are unnormalised, so sampling from
    their softmax is not the paper's procedure.

    The expert's scores are the ``scores`` given to the processor (the main model's logits in greedy ``generate()``,
    its log-probabilities in beam search: the same after log-softmax). The amateur runs on its own device/dtype.

    Args:
        amateur: the amateur causal LM; must share the expert's vocabulary (checked).
        alpha (`float`, *optional*, defaults to 0.1): the plausibility cut-off, in ``[0, 1]``.
        amateur_temperature (`float`, *optional*, defaults to 0.5): the amateur's temperature ``tau > 0``.
        prompt_attention_mask (`torch.LongTensor`, *optional*): the prompt's attention mask (left padding); without
            it the leading run of ``pad_token_id`` in each row is taken as padding.
        pad_token_id (`int`, *optional*): the pad token id.
        second_input_ids / second_attention_mask (*optional*): a different prompt for the amateur (default: the
            expert's prompt).
        vocab_size (`int`, *optional*): the expert's vocabulary size, checked against the amateur's.

    Examples:

    ```python
    >>> from hf_decoding_ext.core.models import load_model, encode_prompts
    >>> from hf_decoding_ext.contrastive.contrastive_decoding import ContrastiveDecodingProcessor
    >>> model, tokenizer = load_model()  # doctest: +SKIP
    >>> inputs = encode_prompts(tokenizer, ["Write a short story about a lighthouse."])  # doctest: +SKIP
    >>> cd = ContrastiveDecodingProcessor.for_model(model, tokenizer, amateur="self:4")  # doctest: +SKIP
    >>> out = model.generate(**inputs, logits_processor=[cd], do_sample=False, max_new_tokens=40)  # doctest: +SKIP
    ```
    """

    space = "logits"

    def __init__(self, amateur, alpha: float = 0.1, amateur_temperature: float = 0.5,
                 prompt_attention_mask: torch.Tensor | None = None, pad_token_id: int | None = None,
                 second_input_ids: torch.Tensor | None = None, second_attention_mask: torch.Tensor | None = None,
                 vocab_size: int | None = None):
        self.alpha = check_strength("alpha", alpha, minimum=0.0, maximum=1.0)
        self.amateur_temperature = check_strength("amateur_temperature", amateur_temperature, minimum=0.0)
        if self.amateur_temperature == 0.0:
            raise ValueError("`amateur_temperature` must be > 0, got 0")
        super().__init__(amateur, second_input_ids, second_attention_mask, share_prompt=second_input_ids is None,
                         prompt_attention_mask=prompt_attention_mask, pad_token_id=pad_token_id,
                         vocab_size=vocab_size)

    @property
    def amateur(self):
        return self.model

    @classmethod
    def for_model(cls, model=None, tokenizer=None, amateur="self:4", alpha: float = 0.1,
                  amateur_temperature: float = 0.5) -> ContrastiveDecodingProcessor:
        """Build for ``model`` (the expert). ``amateur`` is a model object, a model name/path (loaded with
        :func:`~hf_decoding_ext.core.models.load_model` on the expert's device and dtype) or ``"self:N"``: the expert's
        first ``N`` layers with its final norm and head (:func:`~hf_decoding_ext.core.models.truncated_model`), a weak
        stand-in where no smaller model of the same family is available (the default, ``"self:4"``)."""
        from hf_decoding_ext.core.models import resolve_amateur

        amateur = resolve_amateur(model, amateur)
        if amateur is None:
            raise ValueError("contrastive decoding needs an amateur model")
        pad = None
        if tokenizer is not None:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(amateur, alpha=alpha, amateur_temperature=amateur_temperature, pad_token_id=pad,
                   vocab_size=None if model is None else model_vocab_size(model))

    def combine(self, main: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return contrastive_decoding_scores(main, second, self.alpha, self.amateur_temperature)
