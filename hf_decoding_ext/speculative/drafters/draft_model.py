"""Draft-model chain drafter: a small causal LM sharing the target's tokenizer proposes the draft."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from .base import Draft, Drafter
from ..tree import DraftTree


class DraftModelDrafter(Drafter):
    """Chain drafts from a small model (speculative decoding as in Leviathan et al., arXiv 2211.17192).

    The draft model keeps its own KV cache, cropped back to the accepted prefix before each proposal, and drafts up
    to ``num_tokens`` tokens. Greedy generation drafts argmax tokens (deterministic, so greedy and sampling
    acceptance are both lossless) and, like transformers' assisted generation, stops a draft early once the draft
    model's probability of its own token falls below ``confidence_threshold``. With ``do_sample=True`` it samples
    from the draft model's distribution after the caller's logits processors and hands those distributions to the
    speculative-sampling rule.

    Args:
        assistant_model: the draft model; its vocabulary must match the target's.
        num_tokens: maximum draft length (transformers' ``num_assistant_tokens``, default 20).
        confidence_threshold: stop drafting when the draft's top probability is below it (transformers'
            ``assistant_confidence_threshold``, default 0.4; 0 disables).

    Example:
        >>> from hf_decoding_ext.speculative import SpeculativeDecoding
        >>> from hf_decoding_ext.speculative.drafters.draft_model import DraftModelDrafter
        >>> loop = SpeculativeDecoding(DraftModelDrafter(small_model))
        >>> out = model.generate(**inputs, max_new_tokens=64, custom_generate=loop)  # doctest: +SKIP
    """

    def __init__(self, assistant_model, num_tokens: int = 20, confidence_threshold: float = 0.4):
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        if not 0 <= confidence_threshold < 1:
            raise ValueError(f"confidence_threshold must be in [0, 1), got {confidence_threshold}")
        self.assistant = assistant_model
        self.num_tokens = num_tokens
        self.confidence_threshold = confidence_threshold
        self._cache = None
        self._cached_ids: torch.Tensor | None = None

    def begin(self, state) -> None:
        target_vocab = state.model.get_output_embeddings().weight.shape[0]
        draft_vocab = self.assistant.get_output_embeddings().weight.shape[0]
        if target_vocab != draft_vocab:
            raise ValueError(f"the draft model's vocabulary ({draft_vocab}) differs from the target's "
                             f"({target_vocab}); a draft model must share the target's tokenizer")
        self._cache = DynamicCache(config=self.assistant.config)
        self._cached_ids = state.input_ids.new_zeros((1, 0))

    def _sync(self, ids: torch.Tensor) -> None:
        """Crop the draft cache to the longest prefix it shares with ``ids``."""
        n = min(self._cached_ids.shape[1], ids.shape[1] - 1)
        same = (self._cached_ids[0, :n] == ids[0, :n]).long()
        common = int(same.cumprod(0).sum()) if n else 0
        extra = self._cache.get_seq_length() - common
        if extra > 0:
            self._cache.crop(-extra)
        self._cached_ids = ids[:, :common]

    def propose(self, state) -> Draft:
        ids = state.input_ids
        mask = state.attention_mask
        self._sync(ids)
        device = self.assistant.device
        tokens, probs = [], []
        room = state.generation_config.max_length - ids.shape[1] - 1
        cur_ids, cur_mask = ids, mask
        for _ in range(max(0, min(self.num_tokens, room))):
            cached = self._cache.get_seq_length()
            new = cur_ids[:, cached:]
            pos = (cur_mask.long().cumsum(-1) - 1).clamp(min=0)[:, cached:]
            out = self.assistant(input_ids=new.to(device), attention_mask=cur_mask.to(device),
                                 position_ids=pos.to(device), past_key_values=self._cache, use_cache=True,
                                 logits_to_keep=1, return_dict=True)
            logits = out.logits[:, -1].float().to(ids.device)
            scores = state.process(logits, cur_ids)
            p = torch.softmax(scores, dim=-1)
            if state.do_sample:
                tok = torch.multinomial(p, 1)[:, 0]
                probs.append(p[0])
            else:
                tok = scores.argmax(-1)
            tokens.append(int(tok))
            cur_ids = torch.cat([cur_ids, tok[:, None]], dim=1)
            cur_mask = torch.cat([cur_mask, cur_mask.new_ones((1, 1))], dim=1)
            if not state.do_sample and float(p[0, tok]) < self.confidence_threshold:
                break
        self._cached_ids = cur_ids[:, : self._cache.get_seq_length()]
        draft_probs = torch.stack(probs) if probs else None
        return Draft(DraftTree.chain(torch.tensor(tokens, dtype=torch.long), draft_probs))
