"""SpecTr's drafts: ``k`` i.i.d. draft sequences from a draft model, verified as one tree with K-SEQ."""

from __future__ import annotations

import torch

from hf_decoding_ext.core import lifecycle
from hf_decoding_ext.core.tree import DraftTree
from hf_decoding_ext.speculative.drafters.base import Draft
from hf_decoding_ext.speculative.drafters.draft_model import DraftModelDrafter


class SpecTrDrafter(DraftModelDrafter):
    """Draft ``num_drafts`` independent sequences of up to ``num_tokens`` tokens from the draft model, as in "SpecTr:
    Fast Speculative Decoding via Optimal Transport" (Sun et al., NeurIPS 2023, arXiv 2310.15141), for the K-SEQ rule
    (:class:`~hf_decoding_ext.speculative.acceptance.spectr.SpecTrAcceptance`, ``acceptance="spectr"``).

    Each sequence is sampled from the draft model's distribution after the caller's logits processors (run on a
    fresh :func:`~hf_decoding_ext.core.lifecycle.fork` per sequence); the sequences become separate branches of one
    draft tree (``sibling_scheme="iid"``), verified in one target forward. Without sampling the sequences would all
    be the argmax chain, so greedy generation drafts one chain (plain draft-model speculative decoding).

    Args:
        assistant_model: the draft model (``None``: ``generate(..., assistant_model=...)``).
        num_drafts: ``k``, the number of i.i.d. draft sequences (the paper's experiments use 2 to 8).
        num_tokens: draft length ``L`` (default 4).

    Deviation: the sequences are sampled one after another on the draft model's cache (cropped back to the
    committed prefix in between), ``k * L`` draft forwards, rather than as one ``k``-row batch.

    Example:
        >>> from hf_decoding_ext.speculative import SpeculativeDecoding
        >>> from hf_decoding_ext.speculative.drafters.spectr import SpecTrDrafter
        >>> loop = SpeculativeDecoding(SpecTrDrafter(small_model, num_drafts=4), acceptance="spectr")  # doctest: +SKIP
        >>> out = model.generate(**inputs, do_sample=True, max_new_tokens=64, custom_generate=loop)  # doctest: +SKIP
    """

    @classmethod
    def for_model(cls, model=None, tokenizer=None, assistant: str = "distilled", num_drafts: int = 4,
                  num_tokens: int = 4) -> SpecTrDrafter:
        """Registry/CLI factory (``assistant`` as in :meth:`DraftModelDrafter.load_assistant`)."""
        return cls(cls.load_assistant(model, assistant), num_drafts=num_drafts, num_tokens=num_tokens)

    def __init__(self, assistant_model=None, num_drafts: int = 4, num_tokens: int = 4):
        if isinstance(num_drafts, bool) or not isinstance(num_drafts, int) or num_drafts < 1:
            raise ValueError(f"num_drafts must be a positive integer, got {num_drafts!r}")
        super().__init__(assistant_model, num_tokens=num_tokens, confidence_threshold=0.0, schedule="constant")
        self.num_drafts = num_drafts

    def propose(self, state) -> Draft:
        if not state.do_sample or self.num_drafts == 1:
            return super().propose(state)
        ids, mask = state.input_ids, state.attention_mask
        room = state.generation_config.max_length - ids.shape[1] - 1
        length = max(0, min(self.length_policy.length(), room))
        tokens, parents, probs = [], [], []
        for _ in range(self.num_drafts):
            self._sync(ids)  # back to the committed prefix
            processors = lifecycle.fork(state.logits_processor, caller=type(self).__name__)
            cur_ids, cur_mask, parent = ids, mask, -1
            for _ in range(length):
                scores = processors(cur_ids, self._step(cur_ids, cur_mask))
                p = torch.softmax(scores, dim=-1)
                tok = torch.multinomial(p, 1)[:, 0]
                tokens.append(int(tok))
                parents.append(parent)
                probs.append(p[0])
                parent = len(tokens) - 1
                cur_ids = torch.cat([cur_ids, tok[:, None]], dim=1)
                cur_mask = torch.cat([cur_mask, cur_mask.new_ones((1, 1))], dim=1)
            self._cached_ids = cur_ids[:, : self._cache.get_seq_length()]
        if not tokens:
            return Draft(DraftTree.chain(torch.zeros(0, dtype=torch.long)))
        return Draft(DraftTree(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents), torch.stack(probs),
                               "iid"))


__all__ = ["SpecTrDrafter"]
