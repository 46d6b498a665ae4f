"""Classifier-free guidance for autoregressive text: push the conditional distribution away from the unconditional."""

from __future__ import annotations

import torch

from hf_decoding_ext.contrastive.context import ContrastiveContextProcessor, check_strength, model_vocab_size, second_view_from_texts


def cfg_scores(cond_log_probs: torch.Tensor, uncond_log_probs: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Guided log-probabilities ``log p(y) + gamma * (log p(y | x) - log p(y))`` (unnormalised; softmax to sample)."""
    return uncond_log_probs + gamma * (cond_log_probs - uncond_log_probs)


def unconditional_input_ids(tokenizer, chat: bool | None = None) -> list[int]:
    """Token ids of an unconditional prompt: an empty user turn under the chat template for instruct models, else
    the BOS token (or EOS when there is no BOS)."""
    use_chat = (getattr(tokenizer, "chat_template", None) is not None) if chat is None else chat
    if use_chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": ""}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids:
            return list(ids)
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return [int(tid)]
    raise ValueError("the tokenizer has no chat template, BOS or EOS token to build an unconditional prompt from")


class ClassifierFreeGuidanceProcessor(ContrastiveContextProcessor):
    r"""
    [`LogitsProcessor`] for classifier-free guidance (CFG) of an autoregressive model as in "Guiding Image Captioning
    Models Toward More Specific Captions" (Kornblith, Li, Wang and Nguyen, ICCV 2023, arXiv 2307.16686), applied to
    any conditional text prompt: the main prompt carries the condition (there: the image; here: e.g. an instruction,
    a document, a persona) and the second view is the same model on the prompt without it (or an unconditional
    prompt). At each step

    .. math::
        \log \tilde p(y_t) = \log p(y_t \mid y_{<t})
        + \gamma\,\big(\log p(y_t \mid x, y_{<t}) - \log p(y_t \mid y_{<t})\big)

    i.e. sampling/greedy decoding from ``p(y|x)^gamma * p(y)^(1 - gamma)``, computed on **log-probabilities** (both
    views are log-softmaxed first; since the normalisers are per-row constants, the next-token distribution is the
    same as with raw logits). ``gamma = 1`` is ordinary decoding; ``gamma > 1`` trades ``p(caption | image)`` for
    ``p(image | caption)``: more specific outputs. Default ``gamma = 2.0``, the paper's headline setting ("decoding
    with a guidance scale of 2"); ``gamma < 1`` is rejected (it moves toward the unconditional model).

    Deviation: the paper fine-tunes its captioner to also model the unconditional distribution (the image dropped
    with some probability during training); here a pretrained LM's own distribution under the prompt without the
    condition plays that role, as in classifier-free guidance for LMs generally. transformers' built-in
    ``guidance_scale`` (for arXiv 2306.17806) applies the same formula with one unconditional prompt for the whole
    batch; this processor takes per-row prompts and supports cache rollbacks.

    Args:
        model: the model (the same one that generates).
        second_input_ids (`torch.LongTensor`): the unconditional prompts (one per row or one for all).
        second_attention_mask (`torch.LongTensor`, *optional*): their attention mask.
        gamma (`float`, *optional*, defaults to 2.0): the guidance scale, ``>= 1``.
        pad_token_id (`int`, *optional*): pad id used to re-pack second-view prompts.

    Examples:

    ```python
    >>> from hf_decoding_ext.core.models import load_model, encode_prompts
    >>> from hf_decoding_ext.contrastive.cfg import ClassifierFreeGuidanceProcessor
    >>> model, tokenizer = load_model()  # doctest: +SKIP
    >>> inputs = encode_prompts(tokenizer, ["Describe a red vintage car in one sentence."])  # doctest: +SKIP
    >>> cfg = ClassifierFreeGuidanceProcessor.for_model(model, tokenizer, unconditional_prompts=None,
    ...                                                 gamma=2.0)  # doctest: +SKIP
    >>> out = model.generate(**inputs, logits_processor=[cfg], do_sample=False, max_new_tokens=30)  # doctest: +SKIP
    ```
    """

    space = "log_probs"

    def __init__(self, model, second_input_ids: torch.Tensor | None = None,
                 second_attention_mask: torch.Tensor | None = None, gamma: float = 2.0,
                 pad_token_id: int | None = None, vocab_size: int | None = None):
        self.gamma = check_strength("gamma", gamma, minimum=1.0)
        super().__init__(model, second_input_ids, second_attention_mask, pad_token_id=pad_token_id,
                         vocab_size=vocab_size)

    @classmethod
    def for_model(cls, model=None, tokenizer=None, unconditional_prompts=None, gamma: float = 2.0,
                  chat: bool | None = None) -> ClassifierFreeGuidanceProcessor:
        """Build from text. ``unconditional_prompts`` (a string or one per row) is the prompt without the condition;
        ``None`` uses :func:`unconditional_input_ids` (an empty user turn, or BOS), shared by all rows."""
        if model is None or tokenizer is None:
            raise ValueError("ClassifierFreeGuidanceProcessor.for_model needs the model and its tokenizer")
        if unconditional_prompts is None:
            ids = torch.tensor([unconditional_input_ids(tokenizer, chat=chat)], dtype=torch.long)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            return cls(model, ids, gamma=gamma, pad_token_id=int(pad), vocab_size=model_vocab_size(model))
        return cls(model, gamma=gamma, vocab_size=model_vocab_size(model),
                   **second_view_from_texts(tokenizer, unconditional_prompts, chat=chat))

    def combine(self, main: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return cfg_scores(main, second, self.gamma)
