"""Lookahead Decoding: a 2D Jacobi window generates n-grams that a verification branch checks in the same forward."""

from __future__ import annotations

import random

import torch

from hf_decoding_ext.speculative.drafters.base import Draft, Drafter, VerifyResult
from hf_decoding_ext.core.tree import DraftTree


def lookahead_pattern(level_sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention pattern and position offsets of the lookahead window (side nodes), root column excluded.

    Levels are laid out one after the other: level 0 (the oldest Jacobi iterate, ``T - 1`` tokens) then levels
    ``1..L`` (``T`` tokens each). With the last committed token as column 0 of level 0 (it is in the committed prefix
    that every side node attends to), token ``j`` of level 0 sits at offset ``j + 1`` and attends to level-0 tokens
    ``0..j`` (causal); token ``r`` of level ``l >= 1`` sits at offset ``l + r`` and attends to level-0 tokens
    ``0..r-1`` and to column ``r`` of levels ``1..l``. This is the reference implementation's mask
    (``j_make_causal_mask_multilevel``) without the root column.

    Returns:
        ``allowed (m, m)`` bool and ``depth (m,)`` offsets after the last committed token, ``m = sum(level_sizes)``.
    """
    l0 = level_sizes[0]
    size = l0 + 1
    if any(s != size for s in level_sizes[1:]):
        raise ValueError(f"levels after the first must hold {size} tokens, got {level_sizes}")
    m = sum(level_sizes)
    allowed = torch.zeros(m, m, dtype=torch.bool)
    depth = torch.zeros(m, dtype=torch.long)
    allowed[:l0, :l0] = torch.tril(torch.ones(l0, l0, dtype=torch.bool))
    depth[:l0] = torch.arange(1, l0 + 1)
    cols = torch.arange(size)
    for level in range(1, len(level_sizes)):
        rows = l0 + (level - 1) * size + cols
        depth[rows] = level + cols
        allowed[rows, :l0] = torch.tril(torch.ones(size, l0, dtype=torch.bool), diagonal=-1)
        for k in range(1, level + 1):
            allowed[rows, l0 + (k - 1) * size + cols] = True
    return allowed, depth


class LookaheadDrafter(Drafter):
    """Lookahead Decoding (Fu et al., "Break the Sequential Dependency of LLM Inference Using Lookahead Decoding",
    arXiv 2402.02057), for the speculative engine.

    Every target forward runs two branches next to the committed prefix:

    - **lookahead branch** (side nodes): a 2D window of ``N - 1`` levels of Jacobi iterates over ``W`` future
      positions (see :func:`lookahead_pattern` for its mask and positions). The argmax outputs at the newest level
      complete ``W`` n-grams along the window's diagonals: ``(key, level_1[i], ..., level_{N-2}[i], out[i])`` with
      ``key`` the last committed token for ``i = 0`` and ``level_0[i - 1]`` otherwise. They enter the n-gram pool
      (keyed by their first token, at most ``G`` continuations per key, least recently used evicted). The window then
      shifts one level (``level_0 <- level_1[1:]``, ``level_l <- level_{l+1}``, newest level ``<- out``), always by one
      position whatever was accepted (the reference's ``ALWAYS_FWD_ONE``); eos tokens in the newest level are replaced
      by random tokens of the sequence.
    - **verification branch** (the draft tree): the pool's n-grams (up to ``G``) whose key is the last committed
      token, merged into a trie. The engine's acceptance picks the longest matching path, so the output is
      token-identical to greedy decoding (and speculative sampling keeps the distribution with ``do_sample=True``).

    As in the reference implementation, the window starts as ``W + N - 3`` random tokens of the prompt and is filled
    level by level during the first ``N - 2`` steps (no verification branch then): each warm-up step drops the first
    token of every level and appends the argmax outputs as a new level.

    Args:
        window_size: ``W``, future positions of the lookahead window (the paper's 7B/A100 setting, 15).
        ngram_size: ``N``, n-gram length, ``>= 3`` (the paper's setting, 5); the window has ``N - 1`` levels.
        max_guesses: ``G``, n-grams kept per key and verified per step (default ``W``, as in the paper).
        pool_from_prompt: also seed the pool with the prompt's n-grams and add the generated text's n-grams (the
            reference's ``POOL_FROM_PROMPT``, off by default there).
        keep_pool: keep the n-gram pool across ``generate()`` calls (``reset()`` empties it); the window always
            restarts.
        seed: seed of the random window initialisation (``None``: nondeterministic).

    Deviations: the engine compacts the KV cache and handles eos/stopping criteria/logits processors itself; the
    verification branch is one trie instead of separate chains (same accepted tokens under greedy acceptance).

    Example:
        >>> from hf_decoding_ext.speculative import SpeculativeDecoding
        >>> from hf_decoding_ext.speculative.drafters.lookahead import LookaheadDrafter
        >>> loop = SpeculativeDecoding(LookaheadDrafter(window_size=15, ngram_size=5))
        >>> out = model.generate(**inputs, max_new_tokens=64, do_sample=False, custom_generate=loop)  # doctest: +SKIP
    """

    def __init__(self, window_size: int = 15, ngram_size: int = 5, max_guesses: int | None = None,
                 pool_from_prompt: bool = False, keep_pool: bool = False, seed: int | None = 0):
        if window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {window_size}")
        if ngram_size < 3:
            raise ValueError(f"ngram_size must be >= 3 (the window needs two levels), got {ngram_size}")
        max_guesses = window_size if max_guesses is None else max_guesses
        if max_guesses < 0:
            raise ValueError(f"max_guesses must be >= 0, got {max_guesses}")
        self.window_size = window_size
        self.ngram_size = ngram_size
        self.max_guesses = max_guesses
        self.pool_from_prompt = pool_from_prompt
        self.keep_pool = keep_pool
        self.seed = seed
        self.pool: dict[int, list[tuple[int, ...]]] = {}
        self.levels: list[list[int] | None] = []
        self.fill_level = 0
        self._rng = random.Random(seed)
        self._eos: set[int] = set()
        self._root: int | None = None

    # ------------------------------------------------------------------------------------------------ pool
    def reset(self) -> None:
        self.pool = {}

    def add_ngram(self, key: int, continuation) -> None:
        """Insert ``continuation`` (``N - 1`` tokens) after ``key``; least recently used eviction beyond ``G``."""
        if self.max_guesses == 0:
            return
        tup = tuple(int(t) for t in continuation)
        entries = self.pool.setdefault(int(key), [])
        if tup in entries:
            entries.remove(tup)
        elif len(entries) >= self.max_guesses:
            entries.pop(0)
        entries.append(tup)

    def _add_from_sequence(self, tokens: list[int]) -> None:
        n = self.ngram_size
        for start in range(len(tokens) - n + 1):
            self.add_ngram(tokens[start], tokens[start + 1:start + n])

    # ------------------------------------------------------------------------------------------------ drafter
    def _sequence(self, state) -> list[int]:
        ids = state.input_ids[0]
        mask = getattr(state, "attention_mask", None)
        if mask is not None and mask.shape[-1] == ids.shape[0]:
            ids = ids[mask[0].bool()]
        return ids.tolist()

    def begin(self, state) -> None:
        if state.input_ids.shape[0] != 1:
            raise ValueError("LookaheadDrafter supports batch size 1 only")
        eos = state.generation_config.eos_token_id
        self._eos = set([eos] if isinstance(eos, int) else (eos or []))
        if not self.keep_pool:
            self.pool = {}
        seq = self._sequence(state)
        self._seq_tokens = seq
        w, n = self.window_size, self.ngram_size
        self.levels = [[self._rng.choice(seq) for _ in range(w + n - 3)]] + [None] * (n - 2)
        self.fill_level = 0
        if self.pool_from_prompt:
            self._add_from_sequence(seq)

    @property
    def window_full(self) -> bool:
        return self.fill_level == self.ngram_size - 2

    def window_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Side-node tokens, attention pattern and depths of the current lookahead window."""
        present = [lvl for lvl in self.levels[: self.fill_level + 1]]
        allowed, depth = lookahead_pattern([len(lvl) for lvl in present])
        tokens = torch.tensor([t for lvl in present for t in lvl], dtype=torch.long)
        return tokens, allowed, depth

    def propose(self, state) -> Draft:
        root = int(state.input_ids[0, -1])
        self._root = root
        tree = DraftTree.empty()
        if self.window_full and self.pool.get(root):
            tree = DraftTree.from_sequences(self.pool[root])
        tokens, allowed, depth = self.window_inputs()
        return Draft(tree, side_tokens=tokens, side_allowed=allowed, side_depth=depth)

    def update_window(self, root: int, outputs: list[int]) -> None:
        """Apply one step's argmax ``outputs`` at the newest level: warm-up fill, or pool update and shift."""
        levels, f = self.levels, self.fill_level
        if not self.window_full:
            if f == 0:
                levels[0] = levels[0][1:]
                levels[1] = list(outputs)
            else:
                for level in range(f + 1):
                    levels[level] = levels[level][1:]
                levels[f + 1] = list(outputs[1:])
            self.fill_level += 1
            return
        top = self.ngram_size - 2
        for i in range(self.window_size):
            key = root if i == 0 else levels[0][i - 1]
            self.add_ngram(key, [levels[level][i] for level in range(1, top + 1)] + [outputs[i]])
        levels[0] = levels[1][1:]
        for level in range(1, top):
            levels[level] = levels[level + 1]
        levels[top] = [self._rng.choice(self._seq_tokens) if t in self._eos else int(t) for t in outputs]

    def observe(self, state, result: VerifyResult) -> None:
        newest = len(self.levels[self.fill_level])
        outputs = result.side_logits[-newest:].argmax(dim=-1).tolist()
        root = self._root if self._root is not None else int(state.input_ids[0, -1])
        self.update_window(root, outputs)
        self._seq_tokens = self._sequence(state) + list(result.tokens)
        if self.pool_from_prompt:
            n = self.ngram_size
            self._add_from_sequence(self._seq_tokens[-(n - 1 + len(result.tokens)):])
