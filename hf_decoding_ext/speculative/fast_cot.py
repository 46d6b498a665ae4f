"""Fast Chain-of-Thought: Jacobi decoding of the reasoning, cut at a budget, with the approximate window kept as a
glance of the rest before the answer."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hf_decoding_ext.speculative.drafters.jacobi import JacobiDrafter
from hf_decoding_ext.speculative.engine import SpeculativeDecoding

DEFAULT_ANSWER_PROMPT = "\nSo the answer is"


class FastCoTDecoding(SpeculativeDecoding):
    """Fast Chain-of-Thought (Zhang et al., "Fast Chain-of-Thought: A Glance of Future from Parallel Decoding Leads to
    Answers Faster", arXiv 2311.08263), a ``custom_generate`` loop. Lossy: the answer conditions on approximate
    tokens.

    The reasoning is decoded by Jacobi iteration on the speculative engine: each target forward verifies the last
    committed token plus a window of ``window`` approximate future tokens (the previous iterate), appends the exact
    tokens (the window's converged prefix and one more, token-identical to greedy decoding) and refines the rest of
    the window from the same forward (the Jacobi update). When the reasoning budget (``budget`` target forwards) is
    spent before the model has finished, the window's approximate tokens are appended as a *glance* of the rest of
    the chain of thought, followed by ``answer_prompt``, and the answer is decoded (the same loop) until eos or
    ``max_new_tokens``. Without a budget, or with ``glance=False``, nothing is inserted: the loop is Jacobi decoding,
    equal to greedy decoding.

    Args:
        budget: target forwards for the reasoning before the glance (``None``: unlimited, i.e. plain Jacobi decoding).
        window: approximate future tokens refined per forward (the paper's context window ``c``; default 8).
        glance: insert the window at the budget (the method); ``False`` runs plain Jacobi decoding.
        answer_prompt: text appended after the glance to elicit the answer (needs ``tokenizer``), or token ids.
        tokenizer: encodes ``answer_prompt`` (no special tokens).

    Deviations: the paper's budget is wall-clock time; here it is a number of target forwards (the CPU's time per
    forward is constant, so the two are proportional). Greedy decoding only (the paper's setting); ``do_sample=True``
    is refused, and so are ``output_scores``/``output_logits`` (the inserted tokens have none). Batch size 1.

    Example:
        >>> from hf_decoding_ext.speculative.fast_cot import FastCoTDecoding
        >>> loop = FastCoTDecoding(budget=40, tokenizer=tokenizer)
        >>> out = model.generate(**inputs, max_new_tokens=128, do_sample=False, custom_generate=loop)  # doctest: +SKIP
    """

    supports_output_scores = False  # the inserted glance and answer-prompt tokens have no scores: refused

    def __init__(self, budget: int | None = None, window: int = 8, glance: bool = True,
                 answer_prompt: str | Sequence[int] = DEFAULT_ANSWER_PROMPT, tokenizer=None, **engine):
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
            raise ValueError(f"budget must be None or an int >= 1, got {budget!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1, got {window!r}")
        if not isinstance(glance, bool):
            raise ValueError(f"glance must be a bool, got {glance!r}")
        if isinstance(answer_prompt, str):
            if answer_prompt and tokenizer is None and glance and budget is not None:
                raise ValueError("answer_prompt as text needs tokenizer= (or pass token ids)")
            ids = tokenizer.encode(answer_prompt, add_special_tokens=False) if tokenizer is not None else []
        else:
            ids = [int(t) for t in answer_prompt]
        super().__init__(JacobiDrafter(block_size=window + 1, mode="jacobi"), **engine)
        self.budget, self.window, self.glance = budget, window, glance
        self.answer_ids = ids
        self.glance_tokens: list[int] = []  # the approximate tokens inserted by the last call
        self.reasoning_forwards = 0

    def _decode(self, state, rule, generator) -> None:
        if state.do_sample:
            raise ValueError("FastCoTDecoding is greedy (the paper's setting); use do_sample=False")
        if state.batch_size != 1:
            raise ValueError("FastCoTDecoding supports batch size 1 only")
        self.glance_tokens = []
        steps = 0
        while not state.done and (self.budget is None or steps < self.budget):
            self._step(state, rule, generator)
            steps += 1
        self.reasoning_forwards = steps
        if self.glance and not state.done:  # the budget ran out before the model finished: the glance
            self.glance_tokens = [int(t) for t in self.drafter.guess]  # the window after the last forward
            state.append(torch.tensor([self.glance_tokens + self.answer_ids], dtype=torch.long, device=state.device))
            self.drafter.guess = []  # the window restarts after the inserted tokens
        while not state.done:
            self._step(state, rule, generator)
