"""Chimera drafting: the trigram encoder and the full-context decoder give one feature per step; the residual heads
fill a Medusa-style tree."""

from __future__ import annotations

import torch

from hf_decoding_ext.speculative.drafters.feature_head import FeatureHeadDrafter
from hf_decoding_ext.speculative.heads.chimera import ChimeraModel


class ChimeraDrafter(FeatureHeadDrafter):
    """Chimera (Zeng et al., "Chimera: A Lossless Decoding Method for Accelerating Large Language Models Inference
    by Fusing all Tokens", arXiv 2402.15758; head and deviations in :mod:`hf_decoding_ext.speculative.heads.chimera`).

    The full-context decoder keeps a KV cache over the target's last hidden states of the committed sequence; each
    step it feeds the newly verified positions' features plus one query, the trigram feature of
    ``(x_{j-1}, x_j, x_{j+1})`` (``x_{j+1}`` = the root token), whose output ``o`` the residual heads read with
    ``h_j``; the query is dropped from the cache afterwards. Head ``k``'s top candidates fill depth ``k`` of a static
    tree shaped by the measured per-depth accuracies (every node of a depth has the same ranking, as in Medusa).
    Greedy acceptance keeps the output token-identical to greedy decoding. Batch size 1.

    Args:
        heads: a :class:`~hf_decoding_ext.speculative.heads.chimera.ChimeraModel`, a folder or Hub id, or
            ``"shipped"``.
        tree_choices: explicit tree as candidate-rank paths.
        max_nodes: size of the default tree; ``"auto"``: from the verify-cost curve of the target's device;
            ``None``: the whole tree.

    Example:
        >>> from hf_decoding_ext.speculative import SpeculativeDecoding
        >>> from hf_decoding_ext.speculative.drafters.chimera import ChimeraDrafter
        >>> out = model.generate(**inputs, max_new_tokens=64, do_sample=False,
        ...                      custom_generate=SpeculativeDecoding(ChimeraDrafter("shipped")))  # doctest: +SKIP
    """

    head_class = ChimeraModel


    def reset_sequence(self, state) -> None:
        self.cache = self.head.new_cache()
        self.pending: list[torch.Tensor] = []
        self.n_fed = 0
        self._ranked = None

    def on_features(self, state, features, result) -> None:
        self.pending.append(features)

    def prepare(self, state, feature, root_token) -> None:
        head = self.head
        feats = torch.cat(self.pending).to(head.dtype)
        self.pending = []
        t = feats.shape[0]
        device = feats.device
        ids = state.input_ids[0]
        tri = ids[-3:]
        if tri.shape[0] < 3:
            tri = torch.cat([tri[:1].expand(3 - tri.shape[0]), tri])
        g = head.encode_trigrams(tri[None, None])  # (1, 1, H), query at position j + 1
        x = torch.cat([feats[None], g], dim=1)
        allowed = torch.ones(t + 1, self.n_fed + t + 1, dtype=torch.bool, device=device)
        allowed[:t, self.n_fed:] = torch.tril(torch.ones(t, t + 1, dtype=torch.bool, device=device))
        pos = torch.arange(self.n_fed, self.n_fed + t + 1, device=device)[None]
        out = head.decode(x, pos, allowed[None], cache=self.cache)
        self.cache.crop(-1)  # drop the query: the cache holds h_0..h_j only
        self.n_fed += t
        o = out[0, -1]
        h = feature.to(head.dtype)
        self._logits = [head.head_logits(k, h, o) for k in range(1, head.config.num_heads + 1)]

    def topk(self, depth, parents, k):
        cand = self.head.to_target(self._logits[depth - 1].topk(k, dim=-1).indices)
        return cand[None].expand(len(parents), -1)
