"""LongSpec drafting: a constant-memory draft layer reading the target's own KV cache."""

from __future__ import annotations

import torch

from hf_decoding_ext.core.tree import DraftTree
from hf_decoding_ext.speculative.drafters.base import Draft
from hf_decoding_ext.speculative.drafters.feature_head import (
    DEFAULT_MAX_NODES,
    SHIPPED,
    FeatureHeadDrafter,
    load_head,
)
from hf_decoding_ext.speculative.heads.longspec import (
    LongSpecConfig,
    LongSpecDrafterModel,
    _prefix_attention,
    hybrid_tree_attention,
    supports,
)


def untrained_head(model, **options) -> LongSpecDrafterModel:
    """An untrained LongSpec draft layer for ``model`` (for tests and as a training start,
    while no trained checkpoint is shipped; also the tiny-model tests' layer)."""
    cfg = LongSpecConfig(hidden_size=model.config.hidden_size, vocab_size=model.get_output_embeddings().weight.shape[0],
                         **options)
    cfg.from_base_config(model.config)
    head = LongSpecDrafterModel(cfg)
    # an unsupported architecture is refused when generation starts (the drafter attaches the head then)
    return head.attach(model) if supports(model) else head


class LongSpecDrafter(FeatureHeadDrafter):
    """LongSpec drafting (Yang, Du et al., "LongSpec: Long-Context Lossless Speculative Decoding with Efficient
    Drafting and Verification", arXiv 2502.17421; the draft layer and its deviations from the paper:
    :mod:`hf_decoding_ext.speculative.heads.longspec`).

    Each step the draft layer runs on the root token ``x_{n-1}`` and then on the tree nodes, depth by depth. Its
    self-attention reads a window cache of the last ``window`` committed tokens (their keys and values depend only on
    token and position, so they are computed once, at most ``window`` per step, also after an 8k-token prompt) plus
    the tree path, through :func:`~hf_decoding_ext.speculative.heads.longspec.hybrid_tree_attention` (window by the
    fused kernel, tree part masked, log-sum-exp merge). Its cross-attention reads the target's last-layer keys and
    values in place from the engine's cache (``needs={"target_cache"}``: read only, never copied), with the fused
    kernel. What the drafter itself holds (:meth:`state_bytes`) does not depend on the input length. The target
    verifies every tree: greedy output is token-identical to greedy decoding. Batch size 1 (as every tree drafter of
    the engine).

    Args:
        drafter: a :class:`~hf_decoding_ext.speculative.heads.longspec.LongSpecDrafterModel`, a folder or Hub id, or
            ``"shipped"`` (the checkpoint shipped with the package; a ``ValueError`` while none is shipped).
        tree_choices: explicit tree as candidate-rank paths.
        max_nodes: tree size (``"auto"``: from the verify-cost curve, as the other trained heads).

    Example:
        >>> from hf_decoding_ext.speculative import SpeculativeDecoding
        >>> from hf_decoding_ext.speculative.drafters.longspec import LongSpecDrafter
        >>> drafter = LongSpecDrafter.for_model(model)  # doctest: +SKIP
        >>> out = model.generate(**inputs, max_new_tokens=64, do_sample=False,
        ...                      custom_generate=SpeculativeDecoding(drafter))  # doctest: +SKIP
    """

    needs = frozenset({"target_cache"})

    def __init__(self, drafter="shipped", tree_choices=None, max_nodes: int | str | None = DEFAULT_MAX_NODES):
        if (drafter is None or drafter == "shipped") and "longspec" not in SHIPPED:
            raise ValueError("no trained LongSpec checkpoint is shipped yet: pass drafter= a trained "
                             "LongSpecDrafterModel or a checkpoint folder (untrained_head(model) drafts losslessly "
                             "but accepts next to nothing)")
        super().__init__(load_head(drafter, LongSpecDrafterModel, "longspec"), tree_choices, max_nodes)
        self.peak_state_bytes = 0
        self._reset_state()

    @classmethod
    def for_model(cls, model=None, tokenizer=None, drafter="shipped", tree_choices=None,
                  max_nodes: int | str | None = DEFAULT_MAX_NODES) -> LongSpecDrafter:
        """Build for ``model`` (the draft layer is attached to it when the architecture is supported; others are
        refused when generation starts)."""
        out = cls(drafter, tree_choices, max_nodes)
        if model is not None and supports(model):
            out.head.attach(model)
        return out

    # ------------------------------------------------------------------------------------------------ state
    def _reset_state(self) -> None:
        self.win_k = self.win_v = None
        self.win_end = 0  # the window holds draft keys of committed positions [win_end - len, win_end)
        self._reset_tree()

    def _reset_tree(self) -> None:
        self.tree_k: list[torch.Tensor] = []  # (1, Hkv, 1, d) per fed tree entry (root first)
        self.tree_v: list[torch.Tensor] = []
        self.col: dict[int, int] = {}  # node (-1 = root) -> column among tree entries
        self.out: dict[int, torch.Tensor] = {}  # node -> draft feature proposing its children
        self.token: dict[int, int] = {}
        self.ancestors: dict[int, list[int]] = {}

    def begin(self, state) -> None:
        if not supports(state.model):
            raise ValueError(f"LongSpec: unsupported architecture {type(state.model).__name__} (needs Llama-like "
                             f"decoder layers)")
        super().begin(state)

    def reset_sequence(self, state) -> None:
        self._reset_state()

    def state_bytes(self) -> int:
        """Bytes of the tensors the drafter holds between steps and during a step (window cache and tree entries):
        bounded by ``window`` and the tree size, independent of the input length (the target's cache is read in
        place, not held)."""
        ts = [t for t in (self.win_k, self.win_v) if t is not None] + self.tree_k + self.tree_v
        return sum(t.numel() * t.element_size() for t in ts)

    def observe(self, state, result) -> None:
        pass

    # ------------------------------------------------------------------------------------------------ drafting
    def propose(self, state) -> Draft:
        layer = state.cache.layers[-1] if len(getattr(state.cache, "layers", [])) else None
        keys = None if layer is None else getattr(layer, "keys", None)
        n = state.input_ids.shape[1]
        if keys is None or keys.shape[-2] == 0 or state.cache.get_seq_length() != n - 1:
            return Draft(DraftTree.empty())  # first step: the prompt has not been through the target yet
        self.peak_state_bytes = 0
        with torch.inference_mode():
            self.prepare(state, None, state.input_ids[0, -1])
            from hf_decoding_ext.core.tree import build_choice_tree

            tree = build_choice_tree(self.choices, self.topk, self.on_level)
        self.peak_state_bytes = self.state_bytes()
        self._reset_tree()
        return Draft(tree)

    def _position_base(self, state) -> int:
        mask = state.attention_mask
        n = state.input_ids.shape[1]
        return n - int(mask[0].sum()) if mask is not None else 0  # left padding (positions start after it)

    def prepare(self, state, feature, root_token) -> None:
        head = self.head
        ids = state.input_ids[0]
        n = ids.shape[0]
        pad = self._position_base(state)
        w = head.config.window
        committed = n - 1
        start = max(self.win_end, committed - w)
        if start < committed:
            pos = (torch.arange(start, committed, device=ids.device) - pad).clamp(min=0)[None]
            k, v = head.self_kv(ids[start:committed][None], pos)
            if self.win_k is not None and start == self.win_end:
                k, v = torch.cat([self.win_k, k], 2), torch.cat([self.win_v, v], 2)
            self.win_k, self.win_v = k[:, :, -w:], v[:, :, -w:]
            self.win_end = committed
        layer = state.cache.layers[-1]
        self.target_k, self.target_v = layer.keys, layer.values
        self.root_pos = committed - pad
        self._reset_tree()
        self._feed([-1], [int(root_token)], [[]], self.root_pos)

    def _feed(self, nodes: list[int], tokens: list[int], ancestors: list[list[int]], position: int) -> None:
        head = self.head
        device = self.target_k.device
        m = len(nodes)
        ids = torch.tensor([tokens], device=device)
        pos = torch.full((1, m), position, device=device)
        x, q, k, v = head.query_states(ids, pos)
        base = len(self.tree_k)
        for r, node in enumerate(nodes):
            self.col[node] = base + r
            self.tree_k.append(k[:, :, r:r + 1])
            self.tree_v.append(v[:, :, r:r + 1])
        kt, vt = torch.cat(self.tree_k, 2), torch.cat(self.tree_v, 2)
        mask = torch.zeros(m, kt.shape[2], dtype=torch.bool, device=device)
        for r, (node, anc) in enumerate(zip(nodes, ancestors)):
            for a in anc + [node]:
                mask[r, self.col[a]] = True
        if self.win_k is None:
            kp = vp = kt[:, :, :0]
        else:
            kp, vp = self.win_k, self.win_v
        o = hybrid_tree_attention(q, kp, vp, kt, vt, mask)
        h, qc = head.after_self(x, o, pos)
        oc, _ = _prefix_attention(qc, self.target_k.to(qc.dtype), self.target_v.to(qc.dtype),
                                  1.0 / head.head_dim ** 0.5)
        feats = head.finish(h, oc)
        for r, node in enumerate(nodes):
            self.out[node] = feats[0, r]

    def on_level(self, depth, nodes, parents, tokens) -> None:
        for node, parent, tok in zip(nodes, parents, tokens):
            self.token[node] = tok
            self.ancestors[node] = [-1] if parent < 0 else self.ancestors[parent] + [parent]

    def topk(self, depth, parents, k):
        todo = [p for p in parents if p not in self.out]
        if todo:  # nodes of depth ``depth - 1`` sit at position root + depth - 1
            self._feed(todo, [self.token[p] for p in todo], [self.ancestors[p] for p in todo],
                       self.root_pos + depth - 1)
        feats = torch.stack([self.out[p] for p in parents])
        return self.head.to_target(self.head.logits_from(feats).topk(k, dim=-1).indices)
