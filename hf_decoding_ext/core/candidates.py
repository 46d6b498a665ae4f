"""Candidate pools and the reranking loop: sample ``n`` complete candidates per prompt, pick one.

Minimum Bayes risk, quality-aware reranking, best-of-N under a (calibrated) reward, sampling-importance-resampling and
equilibrium ranking all share one shape: draw a pool of complete continuations from a proposal, score the pool,
return one member. :func:`sample_pool` draws the pool with one batched :func:`~hf_decoding_ext.core.rollout.rollout`
(all ``n`` candidates of every prompt row advance together on a copy of the prompt's cache) and keeps, per
candidate, its tokens, its log-probability under the raw model and under the *actual* proposal (the caller's
``generate()`` processors: temperature, top-k/top-p truncation...), which importance-weighting methods need.
:class:`RerankingLoop` is the ``custom_generate`` loop around it: subclasses implement :meth:`RerankingLoop.select`.

Example:
    >>> import torch
    >>> from hf_decoding_ext.core.candidates import RerankingLoop, Selection
    >>> class MostLikely(RerankingLoop):  # best-of-n under the model's own log-probability
    ...     def select(self, pool, state, row):
    ...         return Selection(int(pool.logprobs.argmax()), pool.logprobs.float())
    >>> # model.generate(**inputs, do_sample=True, max_new_tokens=32, custom_generate=MostLikely(n=4))
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

import torch

from hf_decoding_ext.core.loop import DecodingLoop, GenerationState
from hf_decoding_ext.core.rollout import rollout


@dataclass
class CandidatePool:
    """The ``n`` candidates sampled for one prompt row.

    Attributes:
        tokens: each candidate's continuation token ids (no padding), a list of ``n`` lists.
        logprobs: ``log p_model(candidate | prompt)`` under the raw model distribution, ``(n,)`` float64.
        proposal_logprobs: the same under the proposal that drew them (the ``generate()`` processors' distribution:
            temperature, truncation ...), ``(n,)`` float64; equal to ``logprobs`` for plain ancestral sampling.
        ends: how each candidate ended (``"eos"``, ``"criteria"``: ``max_new_tokens`` or another stopping criterion).
        prompt: the prompt row's token ids (attended positions only), 1-D long tensor.
        step_scores: with ``RerankingLoop(return_steps=True)``, the processed scores that drew each token, one
            ``(length_i, vocab)`` tensor per candidate (for ``output_scores``); else ``None``.
        step_logits: likewise the raw logits.
    """

    tokens: list[list[int]]
    logprobs: torch.Tensor
    proposal_logprobs: torch.Tensor
    ends: list[str]
    prompt: torch.Tensor
    step_scores: list[torch.Tensor] | None = None
    step_logits: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def lengths(self) -> torch.Tensor:
        """Number of tokens of each candidate, ``(n,)`` long."""
        return torch.tensor([len(t) for t in self.tokens], dtype=torch.long)

    def texts(self, tokenizer, skip_special_tokens: bool = True) -> list[str]:
        """The candidates decoded with ``tokenizer``."""
        return [tokenizer.decode(t, skip_special_tokens=skip_special_tokens) for t in self.tokens]


@dataclass
class Selection:
    """What a selector picked from a pool: the candidate ``index`` and the per-candidate ``scores`` it ranked by
    (``(n,)``; for inspection, returned under ``selection_scores`` in a ``return_dict_in_generate`` output), plus any
    method-specific ``extra`` (e.g. an MBR utility matrix, importance weights)."""

    index: int
    scores: torch.Tensor
    extra: dict[str, Any] = field(default_factory=dict)


def sample_pool(state: GenerationState, n: int, *, generator: torch.Generator | None = None,
                return_steps: bool = False, max_tokens: int | None = None) -> list[CandidatePool]:
    """Sample ``n`` complete candidates for every row of ``state`` in one batched rollout.

    Each candidate runs until eos or the state's stopping criteria (``max_new_tokens`` ...), drawn from the state's
    processed distribution (the caller's ``generate()`` processors; ``do_sample`` semantics: multinomial). The state
    is not changed.

    Args:
        state: the decoding state (prompt rows).
        n: candidates per row (``>= 1``).
        generator: random generator for the draws.
        return_steps: also keep the per-token processed scores and raw logits.
        max_tokens: optional cap on candidate length (in addition to the stopping criteria).

    Returns:
        one :class:`CandidatePool` per state row.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    r = rollout(state, n, process=state.logits_processor, do_sample=True, generator=generator,
                use_stopping_criteria=True, max_tokens=max_tokens, return_steps=return_steps)
    tokens = r.token_lists()
    pools = []
    for row in range(state.batch_size):
        sl = slice(row * n, (row + 1) * n)
        prompt = state.input_ids[row][state.attention_mask[row].bool()].detach().cpu()
        pools.append(CandidatePool(
            tokens=tokens[sl], logprobs=r.logprobs[sl].cpu(), proposal_logprobs=r.scores[sl].cpu(),
            ends=list(r.ends[sl]), prompt=prompt,
            step_scores=r.step_scores[sl] if return_steps else None,
            step_logits=r.step_logits[sl] if return_steps else None))
    return pools


class RerankingLoop(DecodingLoop):
    """Base ``custom_generate`` loop of the reranking methods: a pool of ``n`` sampled candidates per prompt row
    (:func:`sample_pool`), one chosen by :meth:`select`, appended as the output.

    Candidates are drawn with the caller's sampling settings, so ``generate()`` must be called with
    ``do_sample=True`` (with greedy decoding every candidate would be the same). Batches work row by row: each row
    gets its own pool and choice. ``output_scores`` / ``output_logits`` return the chosen candidate's per-token
    scores; a ``return_dict_in_generate`` output also holds ``selection_scores`` (one ``(n,)`` tensor per row) and
    ``candidates`` (each row's pool as token-id lists).

    Args:
        n: candidates per prompt.
        seed: seed of the generator that draws the candidates (``None``: torch's global generator).
    """

    supports_greedy = False

    def __init__(self, n: int = 8, seed: int | None = None):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError(f"seed must be an integer or None, got {seed!r}")
        self.n = n
        self.seed = seed

    def pools(self, state: GenerationState) -> list[CandidatePool]:
        """The candidate pools of the state's rows (override to draw them another way, e.g. from beams)."""
        generator = None
        if self.seed is not None:
            generator = torch.Generator(device=state.device).manual_seed(self.seed)
        return sample_pool(state, self.n, generator=generator,
                           return_steps=state.scores is not None or state.logits is not None)

    @abc.abstractmethod
    def select(self, pool: CandidatePool, state: GenerationState, row: int) -> Selection:
        """Choose one candidate of ``pool`` (the pool of state row ``row``)."""

    def run(self, state: GenerationState):
        pools = self.pools(state)
        selections = [self.select(pool, state, row) for row, pool in enumerate(pools)]
        for row, sel in enumerate(selections):
            if not 0 <= int(sel.index) < len(pools[row]):
                raise ValueError(f"{type(self).__name__}.select returned index {sel.index} for a pool of "
                                 f"{len(pools[row])}")
        chosen = [pools[row].tokens[int(sel.index)] for row, sel in enumerate(selections)]
        width = max(len(t) for t in chosen)
        pad = int(state.pad_token_id) if state.pad_token_id is not None else 0
        block = torch.full((state.batch_size, width), pad, dtype=torch.long, device=state.device)
        for row, toks in enumerate(chosen):
            block[row, :len(toks)] = torch.tensor(toks, dtype=torch.long)
        if state.scores is not None or state.logits is not None:  # one recorded row per appended position
            for j in range(width):
                rows_s, rows_l = [], []
                for row, sel in enumerate(selections):
                    steps_s = pools[row].step_scores[int(sel.index)]
                    steps_l = pools[row].step_logits[int(sel.index)]
                    k = min(j, steps_s.shape[0] - 1)
                    rows_s.append(steps_s[k] if j < steps_s.shape[0] else torch.full_like(steps_s[k], float("-inf")))
                    rows_l.append(steps_l[k])
                state.record(torch.stack(rows_s), torch.stack(rows_l))
        appended = state.append(block)
        for recorded in (state.scores, state.logits):  # stopped early: keep the lists aligned with the tokens
            if recorded is not None:
                del recorded[appended:]
        return {"selection_scores": [sel.scores for sel in selections],
                "candidates": [pool.tokens for pool in pools]}
