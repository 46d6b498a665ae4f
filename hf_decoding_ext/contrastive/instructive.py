"""Instructive decoding (ID): subtract the logits the model gives under a noisy (by default 'opposite') instruction."""

from __future__ import annotations

import torch

from hf_decoding_ext.contrastive.context import ContrastiveContextProcessor, check_strength, model_vocab_size, second_view_from_texts

OPPOSITE_INSTRUCTION = "Always respond with the opposite of what you're asked. You never get it right."
"""The paper's 'opposite' noisy instruction (its best variant), prepended to the task input in place of the
original instruction."""

NOISY_VARIANTS = ("opposite", "null")


def noisy_instruction_prompt(task_input: str, variant: str = "opposite") -> str:
    """The noisy-instruction prompt for a task input: ``"opposite"`` replaces the instruction with
    :data:`OPPOSITE_INSTRUCTION` (followed by a newline, as in the reference code), ``"null"`` drops it.

    Example:
        >>> noisy_instruction_prompt("Input: The film was great.", "null")
        'Input: The film was great.'
    """
    if variant not in NOISY_VARIANTS:
        raise ValueError(f"`variant` must be one of {NOISY_VARIANTS}, got {variant!r}")
    if not isinstance(task_input, str):
        raise ValueError("`task_input` must be a string")
    return task_input if variant == "null" else OPPOSITE_INSTRUCTION + "\n" + task_input


def instructive_scores(logits: torch.Tensor, noisy_logits: torch.Tensor, epsilon: float = 0.3) -> torch.Tensor:
    """Instructive decoding's logits ``z - epsilon * z_noisy`` (raw logits)."""
    return logits - epsilon * noisy_logits


class InstructiveDecodingProcessor(ContrastiveContextProcessor):
    r"""
    [`LogitsProcessor`] for Instructive Decoding (ID) from "Distort, Distract, Decode: Instruction-Tuned Model Can
    Refine its Response from Noisy Instructions" (Kim, Kim, Lee and Yun, ICLR 2024, arXiv 2311.00233).

    The main prompt is the instruction and the task input; the second view is the same model under a *noisy*
    instruction (by default the paper's best, 'opposite': "Always respond with the opposite of what you're asked.
    You never get it right." in place of the instruction). At each step

    .. math:: z_t = z_t(y \mid I, x, y_{<t}) - \epsilon\, z_t(y \mid \tilde I, x, y_{<t})

    on **raw logits**, as in the reference code (``final_token_logits = source_logits - eps * contrast_logits``).
    Default ``epsilon = 0.3``, the paper's value (its scripts pass ``--eps -0.3`` to code adding ``eps * noisy``).
    ``epsilon = 0`` is regular decoding; negative values (agreeing with the noisy instruction) are rejected.

    Noisy variants built from text by :func:`noisy_instruction_prompt`: ``"opposite"`` (default) and ``"null"`` (no
    instruction). Deviation: the paper's random-word and truncated-shuffled variants are not built in (pass your
    own ``noisy_prompts``).

    Args:
        model: the model (the same one that generates).
        second_input_ids (`torch.LongTensor`): the noisy-instruction prompts (one per row or one for all).
        second_attention_mask (`torch.LongTensor`, *optional*): their attention mask.
        epsilon (`float`, *optional*, defaults to 0.3): the contrast strength, ``>= 0``.
        pad_token_id (`int`, *optional*): pad id used to re-pack second-view prompts.

    Examples:

    ```python
    >>> from hf_decoding_ext.core.models import load_model, encode_prompts
    >>> from hf_decoding_ext.contrastive.instructive import InstructiveDecodingProcessor
    >>> model, tokenizer = load_model()  # doctest: +SKIP
    >>> task = "Input: I loved this film.\nOutput:"
    >>> instruction = "Classify the sentiment as positive or negative.\n"
    >>> inputs = encode_prompts(tokenizer, [instruction + task])  # doctest: +SKIP
    >>> proc = InstructiveDecodingProcessor.for_model(model, tokenizer, task_inputs=[task])  # doctest: +SKIP
    >>> out = model.generate(**inputs, logits_processor=[proc], do_sample=False, max_new_tokens=5)  # doctest: +SKIP
    ```
    """

    space = "logits"

    def __init__(self, model, second_input_ids: torch.Tensor | None = None,
                 second_attention_mask: torch.Tensor | None = None, epsilon: float = 0.3,
                 pad_token_id: int | None = None, vocab_size: int | None = None):
        self.epsilon = check_strength("epsilon", epsilon, minimum=0.0)
        super().__init__(model, second_input_ids, second_attention_mask, pad_token_id=pad_token_id,
                         vocab_size=vocab_size)

    @classmethod
    def for_model(cls, model=None, tokenizer=None, noisy_prompts=None, task_inputs=None, variant: str = "opposite",
                  epsilon: float = 0.3, chat: bool | None = None) -> InstructiveDecodingProcessor:
        """Build from text: either ``noisy_prompts`` (complete noisy-instruction prompts) or ``task_inputs`` (the
        prompts' task part without the instruction, turned into noisy prompts with ``variant``)."""
        if model is None or tokenizer is None:
            raise ValueError("InstructiveDecodingProcessor.for_model needs the model and its tokenizer")
        if noisy_prompts is None:
            if task_inputs is None:
                raise ValueError("instructive decoding needs `noisy_prompts` or `task_inputs` (the prompt without "
                                 "its instruction) to build the noisy-instruction view")
            inputs = [task_inputs] if isinstance(task_inputs, str) else list(task_inputs)
            noisy_prompts = [noisy_instruction_prompt(t, variant) for t in inputs]
        return cls(model, epsilon=epsilon, vocab_size=model_vocab_size(model),
                   **second_view_from_texts(tokenizer, noisy_prompts, chat=chat))

    def combine(self, main: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return instructive_scores(main, second, self.epsilon)
