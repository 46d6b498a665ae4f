"""Reflective Verification's drafts: any chain draft, plus a reflection prompt and the draft again as side nodes."""

from __future__ import annotations

import dataclasses

import torch

from hf_decoding_ext.speculative.drafters.base import Draft, Drafter, VerifyResult

DEFAULT_REFLECTION_PROMPT = " ... I mean,"
"""The reflection prompt of :class:`ReflectiveDrafter`: a self-correction cue after which the target restates (or
corrects) the draft. This library's wording, 4 tokens for SmolLM2 (the paper's prompt is not reproduced): on the
default model it matched the target's own token more often than an explicit instruction ("Wait, let me check the
text above and write it again correctly:", 17 tokens, whose reflective distributions mostly predict a newline), and
costs fewer side nodes."""


def reflection_block(draft_tokens: list[int], prompt_ids: list[int]):
    """Side nodes of one reflective verification of the chain ``draft_tokens`` (``k`` tokens ``d_1..d_k``) with the
    reflection prompt ``prompt_ids`` (``m`` tokens ``r_1..r_m``).

    The side nodes are ``d_1..d_k, r_1..r_m, d_1..d_{k-1}``, one causal chain after the committed prefix (they see the
    committed tokens and each other, never the tree), at position offsets ``1..2k+m-1`` after the last committed
    token: the target reads ``prefix, draft, reflection prompt, draft`` (the first copy gives the prompt the draft
    to reflect on; it computes what the tree nodes compute). The prediction of ``d_1`` after the prompt is the
    logits at ``r_m``, that of ``d_{j+1}`` at the second copy of ``d_j``.

    Returns:
        ``(tokens (2k+m-1,), allowed (2k+m-1, 2k+m-1), depth (2k+m-1,), rows (1+k,))``: ``rows[0]`` the side row
        with the reflective distribution at the root (of ``d_1``), ``rows[j+1]`` the one after tree node ``j`` (of
        ``d_{j+2}``), ``-1`` after the last node.

    Example:
        >>> tokens, allowed, depth, rows = reflection_block([7, 8, 9], [1, 2])
        >>> tokens.tolist(), depth.tolist(), rows.tolist()
        ([7, 8, 9, 1, 2, 7, 8], [1, 2, 3, 4, 5, 6, 7], [4, 5, 6, -1])
    """
    k, m = len(draft_tokens), len(prompt_ids)
    tokens = torch.tensor(list(draft_tokens) + list(prompt_ids) + list(draft_tokens[:-1]), dtype=torch.long)
    n = tokens.shape[0]
    allowed = torch.tril(torch.ones(n, n, dtype=torch.bool))
    depth = torch.arange(1, n + 1, dtype=torch.long)
    rows = torch.tensor([k + m - 1 + j for j in range(k)] + [-1], dtype=torch.long)
    return tokens, allowed, depth, rows


class ReflectiveDrafter(Drafter):
    """The drafts of "Think Before You Accept: Semantic Reflective Verification for Faster Speculative Decoding"
    (Wang et al., arXiv 2505.18629): the chain of any chain drafter, with the reflection probe as side nodes of the
    same verification forward, for :class:`~hf_decoding_ext.speculative.acceptance.reflective.ReflectiveAcceptance`
    (``SpeculativeDecoding(ReflectiveDrafter(...), acceptance=ReflectiveAcceptance(weight))``, or
    ``acceptance="reflective"``).

    Every step the wrapped drafter proposes a chain ``d_1..d_k``; the target then reads, in one forward, the chain
    as tree nodes (the original distributions) and, as side nodes that never enter the cache, the draft again, the
    reflection prompt and the draft once more (:func:`reflection_block`): the target's predictions of the draft
    tokens after the prompt are the reflective distributions, aligned with the tree through ``Draft.side_rows``. The
    wrapped drafter observes each verification as if alone (its own draft, no side logits).

    Args:
        drafter: a drafter that proposes chains (no side nodes of its own); ``None``: a
            :class:`~hf_decoding_ext.speculative.drafters.draft_model.DraftModelDrafter` over ``generate(...,
            assistant_model=...)``; :meth:`for_model` builds one over the shipped distilled draft.
        tokenizer: the target's tokenizer, to encode ``prompt`` (not needed with ``prompt_ids``).
        prompt: the reflection prompt text (default :data:`DEFAULT_REFLECTION_PROMPT`).
        prompt_ids: the reflection prompt as token ids (instead of ``tokenizer`` and ``prompt``).

    Cost: each verification forward has ``2k + m - 1`` side nodes besides the ``k`` tree nodes (``m`` prompt
    tokens). Deviations: the reflection prompt is this library's (the paper's wording and position in the chat
    template were not available here); the draft is fed twice as side nodes (the engine's side nodes cannot attend
    to tree nodes), which costs ``k`` extra positions but computes the same as the paper's ``prefix, draft, prompt,
    draft`` sequence; chain drafts only.

    Example:
        >>> from hf_decoding_ext.speculative import SpeculativeDecoding
        >>> from hf_decoding_ext.speculative.acceptance.reflective import ReflectiveAcceptance
        >>> from hf_decoding_ext.speculative.drafters.reflective import ReflectiveDrafter
        >>> drafter = ReflectiveDrafter.for_model(model, tok)  # doctest: +SKIP
        >>> out = model.generate(**inputs, max_new_tokens=64, do_sample=False, custom_generate=SpeculativeDecoding(
        ...     drafter, acceptance=ReflectiveAcceptance(weight=0.5)))  # doctest: +SKIP
    """

    def __init__(self, drafter: Drafter | None = None, tokenizer=None, prompt: str = DEFAULT_REFLECTION_PROMPT,
                 prompt_ids=None):
        if drafter is None:
            from hf_decoding_ext.speculative.drafters.draft_model import DraftModelDrafter

            drafter = DraftModelDrafter()
        if not isinstance(drafter, Drafter):
            raise ValueError(f"drafter must be a Drafter, got {type(drafter).__name__}")
        if prompt_ids is None:
            if tokenizer is None:
                raise ValueError("ReflectiveDrafter needs the tokenizer (to encode the reflection prompt) or "
                                 "prompt_ids")
            if not isinstance(prompt, str) or not prompt:
                raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        prompt_ids = [int(t) for t in prompt_ids]
        if not prompt_ids or min(prompt_ids) < 0:
            raise ValueError(f"the reflection prompt must be at least one token id >= 0, got {prompt_ids!r}")
        self.drafter = drafter
        self.prompt = prompt
        self.prompt_ids = prompt_ids
        self.needs = drafter.needs

    @classmethod
    def for_model(cls, model=None, tokenizer=None, assistant: str = "distilled",
                  prompt: str = DEFAULT_REFLECTION_PROMPT, num_tokens: int | None = None) -> ReflectiveDrafter:
        """Registry/CLI factory: a :class:`~hf_decoding_ext.speculative.drafters.draft_model.DraftModelDrafter`
        over ``assistant`` (default: the shipped distilled draft; see ``DraftModelDrafter.for_model``) wrapped with
        the reflection prompt ``prompt`` encoded by ``tokenizer``."""
        from hf_decoding_ext.speculative.drafters.draft_model import DraftModelDrafter

        inner = DraftModelDrafter.for_model(model, tokenizer, assistant=assistant, num_tokens=num_tokens)
        return cls(inner, tokenizer=tokenizer, prompt=prompt)

    def begin(self, state) -> None:
        self.drafter.begin(state)

    def propose(self, state) -> Draft:
        draft = self.drafter.propose(state)
        if draft.side_tokens is not None and draft.side_tokens.numel():
            raise ValueError(f"ReflectiveDrafter wraps drafters without side nodes; {type(self.drafter).__name__} "
                             "proposed some")
        tree = draft.tree
        k = len(tree)
        if k == 0:
            return draft
        if not torch.equal(tree.parents, torch.arange(k) - 1):
            raise ValueError(f"ReflectiveDrafter wraps chain drafters; {type(self.drafter).__name__} proposed a "
                             "tree")
        tokens, allowed, depth, rows = reflection_block(tree.tokens.tolist(), self.prompt_ids)
        return dataclasses.replace(draft, side_tokens=tokens, side_allowed=allowed, side_depth=depth,
                                   side_rows=rows, info={**draft.info, "inner_draft": draft})

    def observe(self, state, result: VerifyResult) -> None:
        inner = result.draft.info.get("inner_draft", result.draft)
        side = 0 if result.draft.side_tokens is None else int(result.draft.side_tokens.numel())
        hidden, every = result.hidden_states, result.all_hidden_states
        if side:  # the features of the side nodes come last: the wrapped drafter sees its own positions only
            hidden = None if hidden is None else hidden[:-side]
            every = None if every is None else tuple(h[:-side] for h in every)
        self.drafter.observe(state, dataclasses.replace(result, draft=inner, side_logits=None, hidden_states=hidden,
                                                        all_hidden_states=every))

    def kernel_modules(self) -> list:
        return self.drafter.kernel_modules()

    def reset(self) -> None:
        self.drafter.reset()

    @property
    def committed_k(self) -> int:
        """The wrapped drafter's ``committed_k`` (for a drafter that needs ``"committed_top_k"``)."""
        return getattr(self.drafter, "committed_k", 0)


__all__ = ["DEFAULT_REFLECTION_PROMPT", "ReflectiveDrafter", "reflection_block"]
