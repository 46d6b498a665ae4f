"""Hidden Transfer drafting: pseudo hidden states from an intermediate layer through the target's upper layers."""

from __future__ import annotations

import torch

from hf_decoding_ext.speculative.drafters.base import VerifyResult
from hf_decoding_ext.speculative.drafters.feature_head import (
    DEFAULT_MAX_NODES,
    FeatureHeadDrafter,
)
from hf_decoding_ext.speculative.heads.hidden_transfer import HiddenTransfer


class HiddenTransferDrafter(FeatureHeadDrafter):
    """Hidden Transfer (Wu et al., "Parallel Decoding via Hidden Transfer for Lossless Large Language Model
    Acceleration", arXiv 2404.12022).

    After each verification the drafter keeps the target's layer-``l`` hidden state ``h^l_j`` of the last verified
    position ``j`` (from the verification forward's hidden states). The head's ``k`` transfer layers map it to pseudo
    hidden states for positions ``j + 1 .. j + k``, which run the target's own layers ``l .. L - 1`` on the target's
    KV cache (the real context; the cache is cropped back afterwards), and the lm_head reads them: pseudo ``i``'s
    ranking fills depth ``i`` of the draft tree (the root, ``x_{j+1}``, is the target's own prediction). The tree
    is a sparse tree of candidate-rank paths sized from the head's measured held-out accuracies, as for Medusa, and
    the target verifies it, so greedy acceptance is token-identical to greedy decoding.

    Deviation (listed in :data:`~hf_decoding_ext.speculative.heads.hidden_transfer.PAPER_FIDELITY`): the paper runs
    the pseudo tokens in the same forward as the verified tree; here they take a separate pass of the upper layers
    (``k`` tokens) after each verification, which costs speed, not exactness.

    Args:
        heads: a :class:`~hf_decoding_ext.speculative.heads.hidden_transfer.HiddenTransfer`, a folder or Hub id, or
            ``"shipped"`` (the checkpoint trained on SmolLM2-135M-Instruct shipped with the package).
        tree_choices: explicit tree as candidate-rank paths, e.g. ``[[0], [1], [0, 0]]``.
        max_nodes: size of the default tree; ``"auto"``: from the verify-cost curve of the target's device;
            ``None``: the whole default tree.

    Batch size 1 only (the engine's tree verification is single-sequence); the head refuses architectures whose
    decoder cannot be re-entered with hidden states (e.g. GPT-2) with a ``ValueError``.

    Example:
        >>> from hf_decoding_ext.speculative import SpeculativeDecoding
        >>> from hf_decoding_ext.speculative.drafters.hidden_transfer import HiddenTransferDrafter
        >>> out = model.generate(**inputs, max_new_tokens=64, do_sample=False,
        ...                      custom_generate=SpeculativeDecoding(HiddenTransferDrafter("shipped")))  # doctest: +SKIP
    """

    needs = frozenset({"all_hidden_states", "target_cache"})

    head_class = HiddenTransfer
    attach_in_for_model = False  # at the first generate(), which refuses unsupported architectures

    def __init__(self, heads="shipped", tree_choices=None, max_nodes: int | str | None = DEFAULT_MAX_NODES):
        super().__init__(heads, tree_choices, max_nodes)
        self._candidates: torch.Tensor | None = None
        self._cache = None


    def reset_sequence(self, state) -> None:
        if state.input_ids.shape[0] != 1:
            raise ValueError(f"HiddenTransferDrafter drafts for one sequence at a time, got batch size "
                             f"{state.input_ids.shape[0]}")
        self._cache = None
        self._candidates = None

    def observe(self, state, result: VerifyResult) -> None:
        hidden = result.all_hidden_states[self.head.config.transfer_layer]
        side = 0 if result.draft.side_tokens is None else result.draft.side_tokens.numel()
        s = hidden.shape[0] - len(result.draft.tree) - side  # uncached committed tokens, then the block
        last = s - 1 if not result.accepted else s + result.accepted[-1]
        self.last_feature = hidden[last]
        self._cache = result.target_cache

    def prepare(self, state, feature, root_token):
        cache = self._cache if self._cache is not None else state.cache
        width = max(c[-1] for c in self.choices) + 1
        mask = state.attention_mask[0] if state.attention_mask is not None else None
        position = int(mask.sum()) - 1 if mask is not None else state.input_ids.shape[1] - 1  # the root's position
        logits = self.head.draft_from_cache(feature, cache, position,
                                            None if mask is None else mask[: cache.get_seq_length()])
        self._candidates = self.head.to_target(logits.topk(width, dim=-1).indices)  # (k, width)

    def topk(self, depth, parents, k):
        return self._candidates[depth - 1, :k].expand(len(parents), k)
