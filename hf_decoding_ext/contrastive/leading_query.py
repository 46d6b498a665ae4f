"""Leading-query contrastive decoding (LQCD): suppress tokens favoured only because of a leading query."""

from __future__ import annotations

import math

import torch

from hf_decoding_ext.core.plausibility import plausibility_mask
from hf_decoding_ext.contrastive.context import ContrastiveContextProcessor, check_strength, model_vocab_size, second_view_from_texts



def lqcd_scores(logits: torch.Tensor, leading_logits: torch.Tensor, alpha: float = 1.0, beta: float = 0.1):
    """LQCD's logits ``(1 + alpha) * logit(y | x) - alpha * logit(y | x_leading)``, ``-inf`` outside the plausible
    head ``{y : p(y | x) >= beta * max_w p(w | x)}``."""
    contrast = (1.0 + alpha) * logits - alpha * leading_logits
    return contrast.masked_fill(~plausibility_mask(logits, beta), -math.inf)


class LeadingQueryContrastiveProcessor(ContrastiveContextProcessor):
    r"""
    [`LogitsProcessor`] for Leading Query Contrastive Decoding (LQCD) from "Towards Analyzing and Mitigating
    Sycophancy in Large Vision-Language Models" (Zhao, Zhang, Xiao, Ke, Hou, Hao, Guo and Chen, 2024,
    arXiv 2408.11261), applied to text prompts.

    The main prompt holds the neutral query; the second view is the same model on the prompt with the leading
    (sycophantic) query, e.g. "... The answer is 'Rome', isn't it?". Tokens whose probability rises only because of
    the leading cue are suppressed:

    .. math::
        (1 + \alpha)\,\mathrm{logit}(y_t \mid x, y_{<t}) - \alpha\,\mathrm{logit}(y_t \mid x_{\mathrm{lead}}, y_{<t}),
        \quad y_t \in V_\mathrm{head}

    on **raw logits**, restricted to the adaptive plausibility head ``V_head = {y : p(y | x) >= beta * max_w
    p(w | x)}`` of the neutral view (other tokens get ``-inf``), the visual-contrastive-decoding form the paper
    builds on. Defaults ``alpha = 1.0`` and ``beta = 0.1``: the defaults of visual contrastive decoding (Leng et al.,
    arXiv 2311.16922), the formulation LQCD adopts (not checked against the paper's own hyper-parameter table).
    ``alpha = 0`` with ``beta = 0`` is regular decoding.

    Deviation: the paper works on vision-language models (image + query); here the "image" is absent and the
    contrast is purely between the text queries.

    Args:
        model: the model (the same one that generates).
        second_input_ids (`torch.LongTensor`): the prompts with the leading query (one per row or one for all).
        second_attention_mask (`torch.LongTensor`, *optional*): their attention mask.
        alpha (`float`, *optional*, defaults to 1.0): the contrast strength, ``>= 0``.
        beta (`float`, *optional*, defaults to 0.1): the plausibility cut-off in ``[0, 1]``.
        pad_token_id (`int`, *optional*): pad id used to re-pack second-view prompts.

    Examples:

    ```python
    >>> from hf_decoding_ext.core.models import load_model, encode_prompts
    >>> from hf_decoding_ext.contrastive.leading_query import LeadingQueryContrastiveProcessor
    >>> model, tokenizer = load_model()  # doctest: +SKIP
    >>> q = "What is the capital of France?"
    >>> inputs = encode_prompts(tokenizer, [q])  # doctest: +SKIP
    >>> proc = LeadingQueryContrastiveProcessor.for_model(
    ...     model, tokenizer, leading_prompts=[q + " I'm sure it is Lyon, right?"])  # doctest: +SKIP
    >>> out = model.generate(**inputs, logits_processor=[proc], do_sample=False, max_new_tokens=10)  # doctest: +SKIP
    ```
    """

    space = "logits"

    def __init__(self, model, second_input_ids: torch.Tensor | None = None,
                 second_attention_mask: torch.Tensor | None = None, alpha: float = 1.0, beta: float = 0.1,
                 pad_token_id: int | None = None, vocab_size: int | None = None):
        self.alpha = check_strength("alpha", alpha, minimum=0.0)
        self.beta = check_strength("beta", beta, minimum=0.0, maximum=1.0)
        super().__init__(model, second_input_ids, second_attention_mask, pad_token_id=pad_token_id,
                         vocab_size=vocab_size)

    @classmethod
    def for_model(cls, model=None, tokenizer=None, leading_prompts=None, alpha: float = 1.0, beta: float = 0.1,
                  chat: bool | None = None) -> LeadingQueryContrastiveProcessor:
        """Build from text: ``leading_prompts`` (a string or one per row) is the prompt with the leading query."""
        if model is None or tokenizer is None:
            raise ValueError("LeadingQueryContrastiveProcessor.for_model needs the model and its tokenizer")
        if leading_prompts is None:
            raise ValueError("leading-query contrastive decoding needs `leading_prompts`: the prompt with the "
                             "leading (sycophantic) query")
        return cls(model, alpha=alpha, beta=beta, vocab_size=model_vocab_size(model),
                   **second_view_from_texts(tokenizer, leading_prompts, chat=chat))

    def combine(self, main: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return lqcd_scores(main, second, self.alpha, self.beta)
