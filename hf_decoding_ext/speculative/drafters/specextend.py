"""SpecExtend: the draft model reads a working KV cache of the context chunks the target attends to."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from hf_decoding_ext.core.anatomy import cache_keys, query_attention
from hf_decoding_ext.speculative.drafters.draft_model import DraftModelDrafter


class SpecExtendDrafter(DraftModelDrafter):
    """SpecExtend's cross-model retrieval (Cha, Kim, Cho, "SpecExtend: A Drop-in Enhancement for Speculative
    Decoding of Long Sequences", arXiv 2505.20776; official code jycha98/SpecExtend, ``classic/model_classic.py``).

    A draft model slows down and drafts worse on long inputs. SpecExtend keeps the draft model's KV of the whole
    sequence (the *full* cache) but runs the draft on a *working* cache made of a few chunks of it: the sequence is
    split into chunks of ``chunk_size`` tokens; every ``retrieve_every`` verification steps the target's last-layer
    attention of the last accepted token (read from its own cache and hidden states after the verification, no
    extra target forward) scores each chunk by its mean attention, and the ``top_k_chunks`` best chunks, in sequence
    order, become the working cache. Before the first retrieval the most recent chunks are used, as in the official
    code; new chunks (the generated text) join the selection as they are created. An input of at most
    ``top_k_chunks * chunk_size`` tokens is drafted with the full cache, exactly like
    :class:`~hf_decoding_ext.speculative.drafters.draft_model.DraftModelDrafter`.

    New committed tokens are run by the draft on the working cache and their KV appended to the full cache (as the
    official code does); their keys keep their sequence positions. Drafting, the confidence stop, sampling and the
    speculative-sampling acceptance are the draft-model drafter's, so the output is lossless.

    Args:
        assistant_model: the draft model (``None``: ``generate(..., assistant_model=...)``); Llama-style.
        chunk_size: tokens per chunk (official default 32).
        top_k_chunks: chunks in the working cache (official default 32, i.e. 1,024 tokens).
        retrieve_every: verification steps between retrievals (official default 8).
        num_tokens, confidence_threshold, schedule: the draft length policy of
            :class:`~hf_decoding_ext.speculative.drafters.draft_model.DraftModelDrafter`.

    Deviations: (1) the most recent chunk (the text just generated) is always in the working cache (the official code
    keeps it only while it was selected); (2) the working cache keeps the keys' original positions (transformers'
    caches hold keys already rotated), where the official draft re-indexes the working cache's positions
    contiguously; (3) the paper's hybrid tree attention for the target (prefix by a fast kernel, tree part masked,
    merged by log-sum-exp) is not built: on this CPU the engine's verification already runs SDPA with a 4D mask whose
    size is the draft tree times the sequence, a small cost next to the model's matrix products; (4) the target's
    attention scores are recomputed from its cache for the last accepted token rather than returned by a modified
    attention kernel (same values).

    Example:
        >>> from hf_decoding_ext.speculative import SpeculativeDecoding
        >>> from hf_decoding_ext.speculative.drafters.specextend import SpecExtendDrafter
        >>> loop = SpeculativeDecoding(SpecExtendDrafter.for_model(model))  # doctest: +SKIP
        >>> out = model.generate(**long_inputs, max_new_tokens=128, custom_generate=loop)  # doctest: +SKIP
    """

    needs = frozenset({"assistant_model", "all_hidden_states", "target_cache"})

    def __init__(self, assistant_model=None, chunk_size: int = 32, top_k_chunks: int = 32, retrieve_every: int = 8,
                 num_tokens: int | None = None, confidence_threshold: float | None = None,
                 schedule: str | None = None):
        for name, value in (("chunk_size", chunk_size), ("top_k_chunks", top_k_chunks),
                            ("retrieve_every", retrieve_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        super().__init__(assistant_model, num_tokens=num_tokens, confidence_threshold=confidence_threshold,
                         schedule=schedule)
        self.chunk_size, self.top_k_chunks, self.retrieve_every = chunk_size, top_k_chunks, retrieve_every

    @classmethod
    def for_model(cls, model=None, tokenizer=None, assistant: str = "distilled", chunk_size: int = 32,
                  top_k_chunks: int = 32, retrieve_every: int = 8, num_tokens: int | None = None,
                  confidence_threshold: float | None = None) -> SpecExtendDrafter:
        """Registry/CLI factory (``assistant`` as in :meth:`DraftModelDrafter.load_assistant`: the shipped distilled
        draft by default)."""
        return cls(cls.load_assistant(model, assistant), chunk_size=chunk_size, top_k_chunks=top_k_chunks,
                   retrieve_every=retrieve_every, num_tokens=num_tokens, confidence_threshold=confidence_threshold)

    # ------------------------------------------------------------------------------------------------ lifecycle
    def begin(self, state) -> None:
        super().begin(state)
        for m, who in ((state.model, "target"), (self.assistant, "draft")):
            if getattr(m.config, "sliding_window", None) and getattr(m.config, "use_sliding_window", True):
                raise ValueError(f"SpecExtendDrafter does not support sliding-window attention (the {who} model "
                                 f"has sliding_window={m.config.sliding_window})")
        self._keys: list[torch.Tensor] = []  # the full draft cache, per layer (1, kv_heads, capacity, head_dim)
        self._values: list[torch.Tensor] = []
        self._stored = 0  # sequence positions in the full cache
        self._selected: list[int] | None = None  # chosen chunk indices (None: the most recent chunks)
        self._steps = 0
        self._retrieved_upto = 0
        self._fed = 0  # sequence positions behind the working cache's last entry
        self._root_logits: torch.Tensor | None = None
        self.retrievals: list[list[int]] = []  # the chunks chosen at each retrieval (for inspection and tests)
        self.retrieval_scores: list[list[float]] = []  # every chunk's mean target attention at each retrieval
        self.working_sizes: list[int] = []  # working-cache length at each proposal

    # ------------------------------------------------------------------------------------------------ caches
    def _append_full(self, cache: DynamicCache, n: int) -> None:
        """Copy the last ``n`` entries of ``cache`` (every layer) into the full cache."""
        for i in range(len(cache.layers)):
            k, v = cache.layers[i].keys[:, :, -n:], cache.layers[i].values[:, :, -n:]
            if len(self._keys) <= i:
                cap = max(2 * n, 256)
                self._keys.append(k.new_empty(k.shape[0], k.shape[1], cap, k.shape[3]))
                self._values.append(v.new_empty(v.shape[0], v.shape[1], cap, v.shape[3]))
            if self._stored + n > self._keys[i].shape[2]:
                cap = 2 * (self._stored + n)
                for store in (self._keys, self._values):
                    grown = store[i].new_empty(store[i].shape[0], store[i].shape[1], cap, store[i].shape[3])
                    grown[:, :, : self._stored] = store[i][:, :, : self._stored]
                    store[i] = grown
            self._keys[i][:, :, self._stored: self._stored + n] = k
            self._values[i][:, :, self._stored: self._stored + n] = v
        self._stored += n

    def chunks(self) -> list[tuple[int, int]]:
        """``(start, end)`` of every chunk of the full cache."""
        return [(s, min(s + self.chunk_size, self._stored)) for s in range(0, self._stored, self.chunk_size)]

    def working_positions(self) -> torch.Tensor:
        """Sequence positions in the working cache: every position when the sequence fits the budget, else the
        selected chunks (the most recent ones before the first retrieval) plus the newest chunk."""
        chunks = self.chunks()
        if len(chunks) <= self.top_k_chunks:
            return torch.arange(self._stored)
        if self._selected is None:
            chosen = list(range(len(chunks) - self.top_k_chunks, len(chunks)))
        else:  # the retrieved chunks, the chunks created since, and the newest one
            newest = {i for i in range(len(chunks)) if chunks[i][0] >= self._retrieved_upto}
            chosen = sorted(set(self._selected) | newest | {len(chunks) - 1})
        return torch.cat([torch.arange(*chunks[i]) for i in chosen])

    def _working_cache(self) -> DynamicCache:
        cache = DynamicCache(config=self.assistant.config)
        if self._stored:
            pos = self.working_positions().to(self._keys[0].device)
            for i, (k, v) in enumerate(zip(self._keys, self._values)):
                cache.update(k.index_select(2, pos), v.index_select(2, pos), i)
        return cache

    def _forward(self, new: torch.Tensor, keep: int = 1) -> torch.Tensor:
        """The draft model on ``new`` ``(1, n)`` at sequence positions ``self._fed ...`` over the working cache."""
        device = self.assistant.device
        n = new.shape[1]
        past = self._cache.get_seq_length()
        pos = torch.arange(self._fed, self._fed + n, device=device)[None]
        out = self.assistant(input_ids=new.to(device), attention_mask=torch.ones(1, past + n, dtype=torch.long,
                                                                                  device=device),
                             position_ids=pos, past_key_values=self._cache, use_cache=True, logits_to_keep=keep,
                             return_dict=True)
        self._fed += n
        return out.logits[0, -keep:].float()

    # the draft-model drafter's hooks: _sync prepares the working cache and runs the new committed tokens
    def _sync(self, ids: torch.Tensor) -> None:
        self._cache = self._working_cache()
        self._fed = self._stored
        new = ids[:, self._stored:]
        if new.shape[1]:
            self._root_logits = self._forward(new).to(ids.device)
            self._append_full(self._cache, new.shape[1])
        self.working_sizes.append(self._cache.get_seq_length() - new.shape[1])
        self._cached_ids = ids

    def _step(self, cur_ids: torch.Tensor, cur_mask: torch.Tensor, keep: int = 1) -> torch.Tensor:
        if self._root_logits is not None and cur_ids.shape[1] == self._fed and keep == 1:
            out, self._root_logits = self._root_logits, None
            return out
        return self._forward(cur_ids[:, self._fed:], keep).to(cur_ids.device)

    def scores_after(self, state, path):
        """Refused: SpecExtend drafts chains from its working cache; tree drafters (DySpec, MCSD, ...) read the
        draft model through the full-cache :class:`DraftModelDrafter`."""
        raise ValueError("SpecExtendDrafter drafts chains only: scores_after() (tree drafting) needs the full-cache "
                         "DraftModelDrafter")

    # ------------------------------------------------------------------------------------------------ retrieval
    def observe(self, state, result) -> None:
        super().observe(state, result)
        self._root_logits = None
        self._steps += 1
        if self._steps % self.retrieve_every or len(self.chunks()) <= self.top_k_chunks:
            return
        hidden = result.all_hidden_states[-2]  # the input of the target's last decoder layer
        n_block = len(result.draft.tree) + (0 if result.draft.side_tokens is None
                                            else result.draft.side_tokens.numel())
        s = hidden.shape[0] - n_block
        row = s + result.accepted[-1] if result.accepted else s - 1
        cache = result.target_cache
        length = cache_keys(cache, -1).shape[2]
        attn = query_attention(state.model, hidden[row], length - 1, cache)
        scores = []
        for start, end in self.chunks():
            end = min(end, attn.shape[0])
            scores.append(float(attn[start:end].mean()) if end > start else 0.0)
        k = min(self.top_k_chunks, len(scores))
        self._selected = sorted(torch.tensor(scores).topk(k).indices.tolist())
        self._retrieved_upto = self._stored
        self.retrievals.append(list(self._selected))
        self.retrieval_scores.append(scores)


LONG_TEXT = ("specextend", "docutils_docstrings.jsonl")
"""Public-domain long text shipped for long-input tests (docutils docstrings, see the folder's README)."""


def long_document(tokenizer, n_tokens: int) -> str:
    """The first ``n_tokens`` tokens (by ``tokenizer``) of the shipped public-domain text (:data:`LONG_TEXT`), decoded
    back to a string: the documents of SpecExtend's 2-8K-token inputs.

    Example:
        >>> doc = long_document(tokenizer, 2048)  # doctest: +SKIP
    """
    from hf_decoding_ext.core.resources import read_jsonl

    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise ValueError(f"n_tokens must be a positive integer, got {n_tokens!r}")
    text = "\n\n".join(row["text"] for row in read_jsonl(*LONG_TEXT))
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < n_tokens:
        raise ValueError(f"the shipped text has {len(ids)} tokens, fewer than n_tokens={n_tokens}")
    return tokenizer.decode(ids[:n_tokens])


__all__ = ["LONG_TEXT", "SpecExtendDrafter", "long_document"]
