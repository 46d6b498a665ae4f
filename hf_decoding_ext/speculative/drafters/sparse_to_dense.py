"""Sparse-to-Dense (StD): the model drafts with top-K attention over its own KV cache and verifies densely."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from hf_decoding_ext.core import lifecycle
from hf_decoding_ext.core.anatomy import decoder, decoder_layers
from hf_decoding_ext.core.tree import DraftTree
from hf_decoding_ext.speculative.drafters.base import Draft, Drafter, pick_draft_token


# ------------------------------------------------------------------------------------------------------ probe
def _attention_module(model, layer_idx: int):
    """The attention module of decoder layer ``layer_idx``: Llama-style (``self_attn.q_proj`` with the decoder's
    rotary embeddings: Llama, Qwen2/3, Mistral, SmolLM, ...) or GPT-2's (``attn.c_attn``); anything else gets a
    ``ValueError`` naming the architecture."""
    block = decoder_layers(model)[layer_idx]
    attn = getattr(block, "self_attn", None)
    if attn is not None and hasattr(attn, "q_proj") and getattr(decoder(model), "rotary_emb", None) is not None:
        return attn
    attn = getattr(block, "attn", None)
    if attn is not None and hasattr(attn, "c_attn") and hasattr(attn, "scaling"):
        return attn
    raise ValueError(f"SparseToDenseDrafter supports Llama-style attention (self_attn.q_proj and rotary position "
                     f"embeddings) and GPT-2's (attn.c_attn), not {type(model).__name__}")


def _window_queries(attn, hidden: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                    head_dim: int) -> torch.Tensor:
    """The layer's queries ``(heads, w, head_dim)`` at ``w`` positions, from the attention module's inputs, exactly as
    the module computes them (Llama-style: ``q_proj``, ``q_norm`` if any, RoPE; GPT-2: the query third of
    ``c_attn``)."""
    w = hidden.shape[0]
    if hasattr(attn, "c_attn"):  # GPT-2: absolute positions are in the hidden states, no rotation
        weight = attn.c_attn.weight
        q = attn.c_attn(hidden.to(weight.dtype)[None])[..., : attn.embed_dim]
        return q.view(w, -1, head_dim).transpose(0, 1)
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q = attn.q_proj(hidden.to(attn.q_proj.weight.dtype)[None]).view(1, w, -1, head_dim)
    if getattr(attn, "q_norm", None) is not None:
        q = attn.q_norm(q)
    q = q.transpose(1, 2)  # (1, heads, w, head_dim)
    q, _ = apply_rotary_pos_emb(q, q, cos[None].to(q.dtype), sin[None].to(q.dtype))
    return q[0]


def window_importance(attn, hidden: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                      keys: torch.Tensor, query_index: torch.Tensor,
                      key_real: torch.Tensor | None = None) -> torch.Tensor:
    """Accumulated attention ``(kv_heads, length)`` (float32) of a window of queries over one layer's cached keys.

    ``attn`` is the layer's attention module, ``hidden`` ``(w, hidden)`` its inputs (after the layer's input norm) at
    ``w`` committed positions, ``cos``/``sin`` ``(w, head_dim)`` their rotary embeddings as the model computed them
    (``None`` for GPT-2), ``keys`` ``(1, kv_heads, length, head_dim)`` the layer's cached keys (RoPE applied, as
    transformers caches them), ``query_index`` ``(w,)`` the cache index of each query (it attends causally to keys
    ``<=`` its own index, as in the model), ``key_real`` ``(length,)`` bool: keys that are not padding. Each query's
    softmax attention, per query head, is recomputed as the layer scores it (its own ``scaling``) and summed over
    the window and over the query heads sharing each key/value head (grouped-query attention).

    Example:
        >>> imp = window_importance(model.model.layers[0].self_attn, h, cos, sin, cache.layers[0].keys,
        ...                         torch.arange(length - 8, length))  # doctest: +SKIP
    """
    w = hidden.shape[0]
    head_dim = keys.shape[-1]
    q = _window_queries(attn, hidden, cos, sin, head_dim)
    kv_heads, length = keys.shape[1], keys.shape[2]
    groups = q.shape[0] // kv_heads
    q = q.float().reshape(kv_heads, groups, w, head_dim)
    scaling = float(getattr(attn, "scaling", head_dim ** -0.5))
    logits = torch.einsum("hgwd,hld->hgwl", q, keys[0].float()) * scaling
    allowed = torch.arange(length, device=keys.device)[None] <= query_index.to(keys.device)[:, None]  # (w, length)
    if key_real is not None:
        allowed = allowed & key_real.to(keys.device)[None]
    logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num_(0.0).sum(dim=(1, 2))


# ------------------------------------------------------------------------------------------------------ drafter
class SparseToDenseDrafter(Drafter):
    """Sparse-to-Dense decoding, text-only (Zhang, Du, Yu, Wu, Zhang, Gao, Liu, "Sparse-to-Dense: A Free Lunch for
    Lossless Acceleration of Video Understanding in LLMs", arXiv 2505.19155; no official code was found).

    The paper's observation: while decoding, a model's attention over a long input is concentrated on a few cached
    positions. Its draft (the *sparse* model) is the target itself with top-K attention: in every layer each new
    token attends only to the ``top_k`` cached positions of highest attention score (plus the recent text); it drafts
    ``num_tokens`` (gamma) tokens autoregressively, and the *dense* model (the same weights, full attention) verifies
    them in one forward with the standard acceptance rule, so greedy output equals greedy decoding and sampling keeps
    the model's distribution. No second model, no training.

    This implementation (text-only; the paper's kept "textual tokens" around a video become the recent text):

    - **selection** (after the prefill, once; every ``refresh_every`` verifications if set): for every layer the
      queries of the last ``recent`` committed tokens, recomputed from the attention modules' inputs captured during
      the target's own verification forward (no extra target forward), score the layer's cached keys with the
      layer's exact softmax attention; the scores are summed over those queries and, per key/value head, over the
      query heads of its group (``per_head=True``; ``False``: summed over all heads, one position set per layer);
      the ``top_k`` positions of highest score before the recent window are kept, per layer (and per key/value head);
    - **always kept**: the last ``recent`` positions at selection time and every token committed since (the paper
      keeps all text tokens and the generated ones; only the long context is sparsified);
    - **drafting**: a small draft cache is built from the target's own cache (the selected keys/values gathered, then
      the kept tail: keys are cached after RoPE, so their positions stay right), the model runs the uncommitted
      token and the draft tokens on it one at a time at their true ``position_ids`` (the mask is built on the draft
      cache's own indices), and the draft cache is discarded; the target's cache is never modified;
    - an input whose candidates fit ``top_k`` is drafted on the whole cache (sparse = dense: every greedy draft
      token is accepted, up to floating-point near-ties).

    The first step drafts nothing (the prompt is prefilled by the verification forward, whose attention inputs give
    the first selection), as plain decoding's first step. Llama-style attention (Llama, Qwen2/3, Mistral without a
    sliding window, SmolLM, ...) and GPT-2's are supported; padding positions are never selected.

    Args:
        top_k: cached positions kept per layer (and per key/value head) outside the recent window (``K``).
        num_tokens: draft tokens per step (``gamma``).
        recent: the most recent committed positions whose queries score the cache and that are always kept.
        per_head: select per key/value head (``True``) or one set per layer from all heads' summed scores.
        refresh_every: re-select every this many verifications (``None``: once, after the prefill).

    Deviations: (1) text-only: there is no visual/text split, so the kept "text" is the last ``recent`` tokens of
    the input plus everything generated, and the sparsified part is the rest of the input; (2) the paper's exact
    granularity of the top-K (per layer / per head), the queries that score it, how often it is refreshed and its
    K and gamma defaults could not be confirmed offline (no code, paper text not available here): the defaults
    (K=1024, gamma=4, a 32-token window, per key/value head, selected once after the prefill) are this library's;
    (3) the top-K set is fixed between selections (the draft does not re-rank per draft token), which is what makes
    its KV reads K-sized; (4) the draft cache is gathered with a copy at each step (a fused top-K attention kernel
    would read the selected entries in place): on this CPU that copy is K + tail entries per layer.

    Example:
        >>> from hf_decoding_ext.speculative import SpeculativeDecoding
        >>> from hf_decoding_ext.speculative.drafters.sparse_to_dense import SparseToDenseDrafter
        >>> loop = SpeculativeDecoding(SparseToDenseDrafter(top_k=256, num_tokens=4))
        >>> out = model.generate(**long_inputs, max_new_tokens=64, do_sample=False,
        ...                      custom_generate=loop)  # doctest: +SKIP
        >>> loop.summary()["tokens_per_forward"]  # doctest: +SKIP
    """

    needs = frozenset({"target_cache"})

    def __init__(self, top_k: int = 1024, num_tokens: int = 4, recent: int = 32, per_head: bool = True,
                 refresh_every: int | None = None):
        for name, value in (("top_k", top_k), ("num_tokens", num_tokens), ("recent", recent)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if type(per_head) is not bool:
            raise ValueError(f"per_head must be a bool, got {per_head!r}")
        if refresh_every is not None and (isinstance(refresh_every, bool) or not isinstance(refresh_every, int)
                                          or refresh_every < 1):
            raise ValueError(f"refresh_every must be a positive integer or None, got {refresh_every!r}")
        self.top_k, self.num_tokens, self.recent = top_k, num_tokens, recent
        self.per_head, self.refresh_every = per_head, refresh_every
        self._hooks: list = []

    # ------------------------------------------------------------------------------------------------ lifecycle
    def begin(self, state) -> None:
        self._remove_hooks()
        model = state.model
        self._attn = [_attention_module(model, i) for i in range(len(decoder_layers(model)))]
        self._selected: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer: gathered (keys, values)
        self._tail_start = 0  # cache index from which every position is kept
        self._steps_since = 0
        self._queries: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None  # per layer (h, cos, sin)
        self._captured: list[list] = []
        self._capture_keep = 0
        self.selections: list[dict] = []  # one entry per selection (for inspection and tests)
        self.draft_cache_sizes: list[int] = []  # draft cache length (per layer, before the first draft token)
        self.context_sizes: list[int] = []  # the target's cache length at each drafting proposal

    def reset(self) -> None:
        self._remove_hooks()

    # ------------------------------------------------------------------------------------------------ capture
    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _add_hooks(self, keep: int) -> None:
        """Capture, per layer, the attention module's input and rotary embeddings at the last ``keep`` positions of
        every forward until :meth:`observe` (the verification forward and the engine's chunked prefill)."""
        self._remove_hooks()
        self._captured = [[] for _ in self._attn]
        self._capture_keep = keep

        def make(i):
            def hook(module, args, kwargs):
                hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                n = self._capture_keep
                rope = kwargs.get("position_embeddings")
                if rope is None:  # GPT-2: no rotation (placeholders keep the rows aligned)
                    cos = sin = hidden.new_zeros(hidden.shape[0], hidden.shape[1], 0)
                else:
                    cos, sin = rope
                self._captured[i].append((hidden[0, -n:].detach(), cos[0, -n:].detach(), sin[0, -n:].detach()))
                if len(self._captured[i]) > 1:  # bound the memory: only the last ``keep`` rows are ever needed
                    parts = [torch.cat(p)[-n:] for p in zip(*self._captured[i])]
                    self._captured[i] = [tuple(parts)]
            return hook

        self._hooks = [a.register_forward_pre_hook(make(i), with_kwargs=True) for i, a in enumerate(self._attn)]

    def _selection_due(self) -> bool:
        if self._selected is None:
            return True
        return self.refresh_every is not None and self._steps_since >= self.refresh_every

    # ------------------------------------------------------------------------------------------------ draft
    def _draft_cache(self, target_cache, length: int, config) -> DynamicCache:
        cache = DynamicCache(config=config)
        for i, layer in enumerate(target_cache.layers):
            gk, gv = self._selected[i]
            k = torch.cat([gk, layer.keys[:, :, self._tail_start:length]], dim=2)
            v = torch.cat([gv, layer.values[:, :, self._tail_start:length]], dim=2)
            cache.update(k, v, i)
        return cache

    def propose(self, state) -> Draft:
        ids, mask = state.input_ids, state.attention_mask
        length = state.cache.get_seq_length()
        room = state.generation_config.max_length - ids.shape[1] - 1
        tokens, probs = [], []
        if self._selected is not None and room > 0 and length > 0:
            model = state.model
            cache = self._draft_cache(state.cache, length, model.config)
            self.draft_cache_sizes.append(cache.get_seq_length())
            self.context_sizes.append(length)
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
            new, pos = ids[:, length:], positions[:, length:]
            last = int(positions[0, -1])
            cur_ids = ids
            processors = lifecycle.fork(state.logits_processor, caller=type(self).__name__)
            for step in range(min(self.num_tokens, room)):
                out = model(input_ids=new, position_ids=pos, cache=cache, use_cache=True,
                            logits_to_keep=1, return_dict=True)
                scores = processors(cur_ids, out.logits[:, -1].float())
                tok, p = pick_draft_token(scores, state.do_sample, probs)
                tokens.append(int(tok))
                cur_ids = torch.cat([cur_ids, tok[:, None]], dim=1)
                new = tok[:, None]
                pos = torch.tensor([[last + step + 1]], device=ids.device)
            del cache
        if self._selected is None or self.refresh_every is not None:  # capture the verification's attention inputs
            self._add_hooks(self.recent + len(tokens))
        draft_probs = torch.stack(probs) if probs else None
        return Draft(DraftTree.chain(torch.tensor(tokens, dtype=torch.long), draft_probs,
                                     "deterministic" if draft_probs is None else "iid"))

    # ------------------------------------------------------------------------------------------------ selection
    def observe(self, state, result) -> None:
        self._steps_since += 1
        if not self._hooks:
            return
        self._remove_hooks()
        if not self._captured or not self._captured[0]:
            return
        n_block = len(result.draft.tree)
        accepted = torch.tensor(result.accepted, dtype=torch.long)
        queries = []
        for i, parts in enumerate(self._captured):
            rows = parts[0]
            total = rows[0].shape[0]
            keep = torch.cat([torch.arange(total - n_block), total - n_block + accepted])
            new = [r.index_select(0, keep.to(r.device)) for r in rows]
            if self._queries is not None:
                new = [torch.cat([old, r]) for old, r in zip(self._queries[i], new)]
            queries.append(tuple(r[-self.recent:] for r in new))
        self._queries = queries
        self._captured = []
        if self._selection_due():
            self._select(state, result)

    @torch.no_grad()
    def _select(self, state, result) -> None:
        cache = result.target_cache
        length = cache.layers[0].keys.shape[2]
        real = torch.cat([state.attention_mask[0].bool(),
                          state.attention_mask.new_ones(len(result.accepted)).bool()])[:length]
        w = self._queries[0][0].shape[0]
        tail = max(0, length - self.recent)
        candidates = real[:tail]
        n_cand = int(candidates.sum())
        query_index = torch.arange(length - w, length)
        selected = []
        for i, layer in enumerate(cache.layers):
            keys, values = layer.keys, layer.values
            kv_heads = keys.shape[1]
            if n_cand <= self.top_k:
                idx = candidates.nonzero()[:, 0].to(keys.device)[None].expand(kv_heads, -1)
            else:
                h, cos, sin = self._queries[i]
                rope = cos.shape[-1] > 0
                imp = window_importance(self._attn[i], h, cos if rope else None, sin if rope else None, keys,
                                        query_index, real)[:, :tail]
                if not self.per_head:
                    imp = imp.sum(0, keepdim=True).expand(kv_heads, -1)
                imp = imp.masked_fill(~candidates.to(imp.device)[None], float("-inf"))
                idx = imp.topk(self.top_k, dim=-1).indices.sort(dim=-1).values
            gather = idx[None, :, :, None].expand(1, kv_heads, idx.shape[1], keys.shape[3])
            selected.append((keys.gather(2, gather), values.gather(2, gather)))
            if i == 0:
                first = idx.cpu()
        self._selected = selected
        self._tail_start = tail
        self._steps_since = 0
        self.selections.append({"context": length, "tail_start": tail, "kept": int(selected[0][0].shape[2]),
                                "candidates": n_cand, "layer0": first})


__all__ = ["SparseToDenseDrafter", "window_importance"]
