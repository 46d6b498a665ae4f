"""Prompt-lookup n-gram drafter (training-free)."""

from __future__ import annotations

import torch

from hf_decoding_ext.speculative.drafters.base import Draft, Drafter
from hf_decoding_ext.speculative.policies.tree_policy import NodeBudget
from hf_decoding_ext.core.suffix_index import context_continuations
from hf_decoding_ext.core.tree import DraftTree

GAINS_NAME = "prompt-lookup"
"""Acceptance statistics per chain position (``hf_decoding_ext/data/acceptance/gains.json``, counted on the
distillation prompts with 16-token drafts by ``scripts/tune_drafters.py``) that size ``num_tokens="auto"``."""

AUTO_MAX_TOKENS = 16
"""The longest draft ``num_tokens="auto"`` may pick (the length the gains were counted with)."""


class PromptLookupDrafter(Drafter):
    """Draft the continuation of the most recent earlier occurrence of the sequence's last n-gram.

    Prompt lookup decoding (Saxena, 2023, https://github.com/apoorvumang/prompt-lookup-decoding), the method behind
    transformers' ``prompt_lookup_num_tokens``; it has no paper, so the registry cites the speculative-decoding paper
    it accelerates (Leviathan et al., "Fast Inference from Transformers via Speculative Decoding", arXiv 2211.17192).
    The last ``n`` tokens (``n`` from ``max_ngram`` down to ``min_ngram``) are searched in the prompt and the text
    generated so far; the ``num_tokens`` tokens that followed the match are proposed as a chain, stopping before an
    eos token. ``match="first"`` takes the earliest occurrence, exactly as transformers does (same drafts, hence the
    same number of target forwards, tested); the default ``"last"`` takes the most recent one, which follows the
    text being generated more closely.

    Args:
        num_tokens: draft length (transformers' ``prompt_lookup_num_tokens``; default 10). ``"auto"``: the length
            maximising expected accepted tokens per unit of verification time, from the verify-cost curve measured
            on the running device and model (cached) and the acceptance per chain position counted on the
            distillation prompts (:data:`GAINS_NAME`; at most :data:`AUTO_MAX_TOKENS`), resolved at each
            ``generate()`` call.
        max_ngram: longest n-gram to match (transformers' ``max_matching_ngram_size``; default 2).
        min_ngram: shortest n-gram to match (default 1).
        match: ``"last"`` (most recent occurrence, default) or ``"first"`` (earliest, transformers' choice).

    Example:
        >>> from hf_decoding_ext.speculative import SpeculativeDecoding
        >>> from hf_decoding_ext.speculative.drafters.prompt_lookup import PromptLookupDrafter
        >>> loop = SpeculativeDecoding(PromptLookupDrafter(num_tokens=10))
        >>> out = model.generate(**inputs, max_new_tokens=128, custom_generate=loop)  # doctest: +SKIP
    """

    def __init__(self, num_tokens: int | str = 10, max_ngram: int = 2, min_ngram: int = 1, match: str = "last"):
        if match not in ("first", "last"):
            raise ValueError(f"match must be 'first' or 'last', got {match!r}")
        self.match = match
        if num_tokens != "auto" and (isinstance(num_tokens, bool) or not isinstance(num_tokens, int)
                                     or num_tokens < 1):
            raise ValueError(f"num_tokens must be an int >= 1 or 'auto', got {num_tokens!r}")
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.budget = NodeBudget(num_tokens, accelerator=AUTO_MAX_TOKENS, gains=GAINS_NAME)
        self.num_tokens = AUTO_MAX_TOKENS if num_tokens == "auto" else num_tokens
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self._eos: set[int] = set()

    def begin(self, state) -> None:
        if self.budget.is_auto:
            size = self.budget.resolve(state.model.device, model=state.model)
            self.num_tokens = AUTO_MAX_TOKENS if size is None else min(size, AUTO_MAX_TOKENS)
        eos = state.generation_config.eos_token_id
        self._eos = set([eos] if isinstance(eos, int) else (eos or []))

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Continuation ``(<= num_tokens,)`` of the last (or first) match of the trailing n-gram in 1D ``ids``."""
        conts = context_continuations(ids, self.num_tokens, self.max_ngram, self.min_ngram, limit=1, order=self.match)
        return ids.new_tensor(conts[0]) if conts else ids.new_zeros(0)

    def continuation(self, ids: torch.Tensor) -> torch.Tensor:
        """:meth:`lookup` on 1D ``ids``, cut before the first eos token (the tokens :meth:`propose` drafts; staged
        speculation also asks it for continuations of the draft model's own chain)."""
        cont = self.lookup(ids)
        if self._eos and cont.numel():
            stop = [i for i, t in enumerate(cont.tolist()) if t in self._eos]
            if stop:
                cont = cont[: stop[0]]
        return cont

    def propose(self, state) -> Draft:
        return Draft(DraftTree.chain(self.continuation(state.input_ids[0]).cpu()))
