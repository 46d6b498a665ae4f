"""Context-aware decoding (CAD): amplify what the context adds to the next-token logits."""

from __future__ import annotations

import torch

from hf_decoding_ext.contrastive.context import ContrastiveContextProcessor, check_strength, model_vocab_size, second_view_from_texts


def cad_scores(logits_with_context: torch.Tensor, logits_without_context: torch.Tensor, alpha: float = 0.5):
    """CAD's adjusted logits ``(1 + alpha) * logit(y | c, x) - alpha * logit(y | x)`` (any shape, same for both)."""
    return (1.0 + alpha) * logits_with_context - alpha * logits_without_context


class ContextAwareDecodingProcessor(ContrastiveContextProcessor):
    r"""
    [`LogitsProcessor`] for context-aware decoding (CAD) from "Trusting Your Evidence: Hallucinate Less with
    Context-aware Decoding" (Shi, Han, Lewis, Tsvetkov, Zettlemoyer and Yih, NAACL 2024, arXiv 2305.14739), as
    reproduced for query-focused summarisation in "Context-aware Decoding Reduces Hallucination in Query-focused
    Summarization" (Xu, 2023, arXiv 2312.14335).

    The main prompt holds the context ``c`` and the query ``x``; the second view is the same model on the query
    alone. At each step the output is

    .. math::
        (1 + \alpha)\,\mathrm{logit}_\theta(y_t \mid c, x, y_{<t}) - \alpha\,\mathrm{logit}_\theta(y_t \mid x, y_{<t})

    on **raw logits** (the paper's Eq. 2: ``y_t ~ softmax[(1+a) logit(y_t|c,x,y<t) - a logit(y_t|x,y<t)]``), which
    is the product of experts ``p(y|c,x) * (p(y|c,x) / p(y|x))^alpha``. ``alpha = 0`` is regular decoding. Defaults:
    ``alpha = 0.5``, the paper's value for summarisation (general use); the paper uses ``alpha = 1`` for its
    knowledge-conflict datasets (MemoTrap, NQ-Swap), where the context contradicts the model's prior. The main
    scores given to the processor are whatever earlier processors produced (raw logits in plain greedy/sampling
    ``generate()``). No plausibility constraint is applied (the paper applies none).

    Args:
        model: the model (the same one that generates).
        second_input_ids (`torch.LongTensor`): the prompts *without* the context, one per batch row (or one for
            all), left padding allowed; see :class:`ContrastiveContextProcessor`.
        second_attention_mask (`torch.LongTensor`, *optional*): their attention mask.
        alpha (`float`, *optional*, defaults to 0.5): the contrast strength, ``>= 0``.
        pad_token_id (`int`, *optional*): pad id used to re-pack second-view prompts.

    Examples:

    ```python
    >>> from hf_decoding_ext.core.models import load_model, encode_prompts
    >>> from hf_decoding_ext.contrastive.cad import ContextAwareDecodingProcessor
    >>> model, tokenizer = load_model()  # doctest: +SKIP
    >>> question = "Where is the Eiffel Tower? Answer in one word."
    >>> inputs = encode_prompts(tokenizer, ["The Eiffel Tower is located in Rome.\n" + question])  # doctest: +SKIP
    >>> cad = ContextAwareDecodingProcessor.for_model(model, tokenizer, no_context_prompts=[question],
    ...                                               alpha=1.0)  # doctest: +SKIP
    >>> out = model.generate(**inputs, logits_processor=[cad], do_sample=False, max_new_tokens=8)  # doctest: +SKIP
    ```
    """

    space = "logits"

    def __init__(self, model, second_input_ids: torch.Tensor | None = None,
                 second_attention_mask: torch.Tensor | None = None, alpha: float = 0.5,
                 pad_token_id: int | None = None, vocab_size: int | None = None):
        self.alpha = check_strength("alpha", alpha, minimum=0.0)
        super().__init__(model, second_input_ids, second_attention_mask, pad_token_id=pad_token_id,
                         vocab_size=vocab_size)

    @classmethod
    def for_model(cls, model=None, tokenizer=None, no_context_prompts=None, alpha: float = 0.5,
                  chat: bool | None = None) -> ContextAwareDecodingProcessor:
        """Build from text: ``no_context_prompts`` (a string or one per batch row) is the query without the context,
        tokenised like the main prompt (chat template for instruct models, see ``encode_prompts``)."""
        if model is None or tokenizer is None:
            raise ValueError("ContextAwareDecodingProcessor.for_model needs the model and its tokenizer")
        if no_context_prompts is None:
            raise ValueError("context-aware decoding needs `no_context_prompts`: the prompt without its context")
        return cls(model, alpha=alpha, vocab_size=model_vocab_size(model),
                   **second_view_from_texts(tokenizer, no_context_prompts, chat=chat))

    def combine(self, main: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return cad_scores(main, second, self.alpha)
