"""Speculative Jacobi Decoding: a Jacobi window whose tokens keep the distributions they were sampled from."""

from __future__ import annotations

import torch

from hf_decoding_ext.core import lifecycle
from hf_decoding_ext.core.tree import DraftTree
from hf_decoding_ext.speculative.drafters.base import Draft, Drafter, VerifyResult

INIT_SCHEMES = ("random",)


class SpeculativeJacobiDrafter(Drafter):
    """Speculative Jacobi Decoding (SJD; Teng et al., "Accelerating Auto-regressive Text-to-Image Generation with
    Training-free Speculative Jacobi Decoding", arXiv 2410.01699, ICLR 2025), applied to text, on the speculative
    engine.

    A window of ``window`` draft tokens follows the accepted prefix; each token is stored with the distribution it
    was sampled from. One target forward over the last committed token and the window gives a new distribution at
    every window position; the engine's speculative-sampling rule scans the window left to right, accepts token
    ``x_i`` with probability ``min(1, p_now(x_i) / p_prev(x_i))`` and at the first rejection samples the bonus token
    from ``norm(max(p_now - p_prev, 0))`` (the paper's probabilistic parallel decoding). The window positions after
    the rejection take fresh samples from ``p_now`` (the Jacobi update: they become the next iteration's drafts and
    ``p_prev``), and the window is refilled at its end with new tokens initialised as in the official code's default
    ``multi_token_init_scheme="random"``: uniform random token ids whose recorded distribution is the one-hot on the
    token, accepted with probability ``p_now(x)``.

    Each draft token is sampled from a known distribution independently of the acceptance draws, so the output has
    exactly the target's sampling distribution (the caller's temperature/top-k/top-p are applied by the engine to
    ``p_now`` and by this drafter, on a fork of the caller's processors, to the rows it samples from: both
    distributions are the processed ones, as the paper's code applies the same processors to both). With
    ``do_sample=False`` SJD reduces to Jacobi decoding (the argmax update over the window, exact-match acceptance),
    token-identical to greedy decoding.

    Args:
        window: draft tokens kept after the accepted prefix (the official code's ``max_num_new_tokens``, default 16).
        init: how new window positions are initialised: ``"random"`` (the official default; the image-specific
            ``"repeat_horizon"``/``"sample_horizon"`` schemes use the image grid and have no text analogue).

    Deviations: the paper targets text-to-image models (lower-entropy image tokens); on text the window positions
    far from the prefix are rarely accepted. The official code applies SJD only inside the image-token span
    (``jacobi_loop_interval``); here it runs over the whole continuation. Batch size 1 only.

    Example:
        >>> from hf_decoding_ext.speculative import SpeculativeDecoding
        >>> from hf_decoding_ext.speculative.drafters.speculative_jacobi import SpeculativeJacobiDrafter
        >>> loop = SpeculativeDecoding(SpeculativeJacobiDrafter(window=16))
        >>> out = model.generate(**inputs, max_new_tokens=64, do_sample=True, custom_generate=loop)  # doctest: +SKIP
    """

    def __init__(self, window: int = 16, init: str = "random"):
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1, got {window!r}")
        if init not in INIT_SCHEMES:
            raise ValueError(f"init must be one of {INIT_SCHEMES}, got {init!r}")
        self.window = window
        self.init = init
        self.tokens: list[int] = []
        self.probs: list[torch.Tensor | None] = []  # per window token: the distribution it was sampled from
        self._vocab = 0

    def begin(self, state) -> None:
        if state.input_ids.shape[0] != 1:
            raise ValueError("SpeculativeJacobiDrafter supports batch size 1 only")
        self._vocab = state.model.get_output_embeddings().weight.shape[0]
        self.tokens, self.probs = [], []

    def _refill(self) -> None:
        """Fill the window's end with new positions (uniform random ids, one-hot recorded distribution)."""
        missing = self.window - len(self.tokens)
        if missing > 0:
            new = torch.randint(0, self._vocab, (missing,)).tolist()
            self.tokens += new
            self.probs += [None] * missing  # None: the one-hot on the token (materialised in propose)

    def propose(self, state) -> Draft:
        self._refill()
        tokens = torch.tensor(self.tokens[: self.window], dtype=torch.long)
        if not state.do_sample:
            return Draft(DraftTree.chain(tokens))
        rows = []
        for tok, row in zip(self.tokens[: self.window], self.probs[: self.window]):
            if row is None:
                row = torch.zeros(self._vocab, device=state.device)
                row[tok] = 1.0
            rows.append(row)
        return Draft(DraftTree.chain(tokens, torch.stack(rows), "iid"))

    def observe(self, state, result: VerifyResult) -> None:
        k = len(result.accepted)
        tree = result.draft.tree
        rows = result.tree_logits[k + 1:]  # the target at the window positions after the bonus token
        if rows.shape[0] == 0:
            self.tokens, self.probs = [], []
            return
        if not state.do_sample:
            self.tokens, self.probs = rows.argmax(dim=-1).tolist(), [None] * rows.shape[0]
            return
        # p_now after each window token k+1..n, processed as the engine processes its own rows; the samples are the
        # next iteration's drafts, these rows their recorded distributions
        processors = lifecycle.fork(state.logits_processor, caller=type(self).__name__)
        ids = torch.cat([state.input_ids, tree.tokens.to(state.input_ids.device)[None]], dim=1)
        base = state.input_ids.shape[1]
        tokens, probs = [], []
        for i in range(rows.shape[0]):
            node = k + 1 + i  # row of tree_logits: after window token node - 1 (0-based)
            scores = processors(ids[:, : base + node], rows[i][None].clone())[0] if len(processors) else rows[i]
            p = torch.softmax(scores.float(), dim=-1)
            tokens.append(int(torch.multinomial(p, 1)))
            probs.append(p)
        self.tokens, self.probs = tokens, probs
