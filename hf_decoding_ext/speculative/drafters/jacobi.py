"""Jacobi parallel decoding: refine a block of guessed tokens by fixed-point iteration, verified as a chain."""

from __future__ import annotations

import torch

from hf_decoding_ext.speculative.drafters.base import Draft, Drafter, VerifyResult
from hf_decoding_ext.core.tree import DraftTree

MODES = ("gs-jacobi", "jacobi")


class JacobiDrafter(Drafter):
    """Jacobi and GS-Jacobi parallel decoding (Santilli et al., "Accelerating Transformer Inference for Translation
    via Parallel Decoding", arXiv 2305.10427), for the speculative engine.

    Greedy decoding is the solution of the nonlinear system ``y_i = argmax p(. | x, y_<i)``. Jacobi iteration
    updates every unknown of a block at once from the previous iterate: ``y_i^(t+1) = argmax p(. | x, y_<i^(t))``.
    Here each step feeds the last committed token and the current guesses as a chain; the engine's greedy acceptance
    keeps the guesses that reached the fixed point (they equal the argmax given the prefix) plus one token (the
    argmax after them, which is always correct), and the next iterate for the remaining positions is the target's
    argmax at the positions after the accepted prefix (the Jacobi update, computed from the previous iterate). New
    positions are initialised with the paper's ``[PAD]`` token. The output is token-identical to greedy decoding, and
    every step adds at least one token (the paper's convergence guarantee).

    Modes:
        - ``"gs-jacobi"`` (default): the paper's GS-Jacobi decoding: the output is split into consecutive blocks of
          ``block_size`` input tokens (the first being already fixed), each solved by Jacobi iteration until its
          fixed point (all of its tokens committed), blocks in sequence (Gauss-Seidel across blocks). With the
          paper's default ``block_size = 3`` a step verifies at most 2 guesses.
        - ``"jacobi"``: a sliding Jacobi window: ``block_size - 1`` guesses after the last committed token, refilled
          with ``[PAD]`` as the fixed prefix advances. With ``block_size`` at least the output length this is the
          paper's (whole-sequence) Jacobi decoding; a causal LM has no target length, hence the window.

    Args:
        block_size: tokens fed per step (last committed token + ``block_size - 1`` guesses); default 3, the
            paper's GS-Jacobi block size.
        mode: ``"gs-jacobi"`` or ``"jacobi"``.
        init_token: initialisation token of new positions (default the model's pad token, as in the paper, else
            eos, else 0).

    Deviations: the paper targets encoder-decoder translation models with a known (or over-provisioned) target
    length; here the blocks tile an open-ended causal-LM output up to ``max_new_tokens``. Its Hybrid GS-Jacobi's
    eos-based early stop is subsumed by the engine's eos handling.

    Example:
        >>> from hf_decoding_ext.speculative import SpeculativeDecoding
        >>> from hf_decoding_ext.speculative.drafters.jacobi import JacobiDrafter
        >>> loop = SpeculativeDecoding(JacobiDrafter(block_size=3))
        >>> out = model.generate(**inputs, max_new_tokens=64, do_sample=False, custom_generate=loop)  # doctest: +SKIP
    """

    def __init__(self, block_size: int = 3, mode: str = "gs-jacobi", init_token: int | None = None):
        if block_size < 2:
            raise ValueError(f"block_size must be >= 2 (the last committed token and at least one guess), got "
                             f"{block_size}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if init_token is not None and init_token < 0:
            raise ValueError(f"init_token must be a token id >= 0, got {init_token}")
        self.block_size = block_size
        self.mode = mode
        self.init_token = init_token
        self.guess: list[int] = []
        self._init = 0
        self._block_last = -1  # sequence index of the current block's last input (gs-jacobi)
        self._length = 0

    def begin(self, state) -> None:
        if state.input_ids.shape[0] != 1:
            raise ValueError("JacobiDrafter supports batch size 1 only")
        if self.init_token is not None:
            self._init = self.init_token
        else:
            cfg = state.generation_config
            eos = cfg.eos_token_id
            eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
            pad = cfg.pad_token_id
            self._init = int(pad if pad is not None else eos if eos is not None else 0)
        self.guess = []
        self._block_last = -1

    def propose(self, state) -> Draft:
        length = state.input_ids.shape[1]
        self._length = length
        root = length - 1
        if self.mode == "jacobi":
            self.guess = (self.guess + [self._init] * self.block_size)[: self.block_size - 1]
        elif root > self._block_last:  # the previous block is solved: a new block starts at the root
            self._block_last = root + self.block_size - 1
            self.guess = [self._init] * (self.block_size - 1)
        return Draft(DraftTree.chain(torch.tensor(self.guess, dtype=torch.long)))

    def jacobi_update(self, tree_logits: torch.Tensor, accepted: int) -> list[int]:
        """Next iterate for the positions after the accepted prefix and its bonus token.

        ``tree_logits`` ``(1 + n, vocab)`` at the root and the ``n`` guesses; the argmax at guess ``i`` (conditioned
        on the previous iterate) is the new guess for position ``i + 1``. Guesses ``1..accepted`` were right and the
        bonus fixes the next position, so the update starts at row ``accepted + 1``.
        """
        return tree_logits[accepted + 1:].argmax(dim=-1).tolist()

    def observe(self, state, result: VerifyResult) -> None:
        k = len(result.accepted)
        nxt = self.jacobi_update(result.tree_logits, k)
        if self.mode == "gs-jacobi":
            new_root = self._length - 1 + k + 1
            nxt = nxt[: max(0, self._block_last - new_root)]  # keep the block's positions only
        self.guess = nxt
