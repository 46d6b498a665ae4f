"""Several drafters verified together: their trees merged into one trie, one target forward per step."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hf_decoding_ext.core.tree import DraftTree
from hf_decoding_ext.speculative.drafters.base import Draft, Drafter, VerifyResult
from hf_decoding_ext.speculative.policies.tree_policy import NodeBudget


class MergedDrafter(Drafter):
    """Union of the drafts of several drafters, verified in one forward (engine machinery, not a paper's method).

    Every step each drafter proposes its tree; the trees are merged into a trie (shared prefixes verified once) and,
    when ``max_nodes`` is set, cut to that many nodes taking the drafters' nodes in turn (first drafter first), so
    each keeps its own top nodes. After verification every drafter observes the result restricted to its own nodes:
    its tree's logits, the part of the accepted path its tree contains and, for the one drafter that may use side
    nodes (Lookahead Decoding's window), the side logits; drafters that read the target's features (trained heads)
    observe the merged result, whose accepted path and features cover every committed token. Deterministic drafts
    only (greedy or speculative sampling with one-hot drafts), so the engine's acceptance stays lossless.

    Args:
        drafters: the drafters to merge (at least one; at most one with side nodes; none that samples its drafts).
        max_nodes: cap on the merged tree (``None``: no cap; ``"auto"``: on CPU the largest tree whose verification
            costs at most a 1-token forward on the packaged verify-cost curve, no cap on an accelerator; see
            :class:`~hf_decoding_ext.speculative.policies.tree_policy.NodeBudget`).

    Example:
        >>> from hf_decoding_ext.speculative import SpeculativeDecoding
        >>> from hf_decoding_ext.speculative.drafters.merged import MergedDrafter
        >>> from hf_decoding_ext.speculative.drafters.prompt_lookup import PromptLookupDrafter
        >>> from hf_decoding_ext.speculative.drafters.token_recycling import TokenRecyclingDrafter
        >>> loop = SpeculativeDecoding(MergedDrafter([PromptLookupDrafter(), TokenRecyclingDrafter()]))
        >>> out = model.generate(**inputs, max_new_tokens=128, custom_generate=loop)  # doctest: +SKIP
    """

    def __init__(self, drafters: Sequence[Drafter], max_nodes: int | str | None = None,
                 gains: str | list | None = None):
        drafters = list(drafters)
        if not drafters or not all(isinstance(d, Drafter) for d in drafters):
            raise ValueError("MergedDrafter needs a non-empty list of Drafter instances")
        if any("assistant_model" in d.needs for d in drafters):
            raise ValueError("MergedDrafter does not take draft-model drafters (their drafts are sampled)")
        self.budget = NodeBudget(max_nodes, accelerator=None, gains=gains)
        self.drafters = drafters
        self.max_nodes = max_nodes
        self._cap = self.budget.resolve("cpu")  # "auto": the CPU cap until a generate() call sees the device
        self.needs = frozenset().union(*(d.needs for d in drafters))
        self._maps: list[list[int]] = []
        self._drafts: list[Draft] = []

    @property
    def committed_k(self) -> int:
        """The widest ``committed_k`` of the merged drafters (each reads its own first columns)."""
        return max((getattr(d, "committed_k", 0) for d in self.drafters), default=0)

    def reset(self) -> None:
        for d in self.drafters:
            d.reset()

    def begin(self, state) -> None:
        self._cap = self.budget.resolve(state.model.device, model=state.model)
        for d in self.drafters:
            d.begin(state)

    def kernel_modules(self) -> list:
        return [m for d in self.drafters for m in d.kernel_modules()]

    def propose(self, state) -> Draft:
        drafts = [d.propose(state) for d in self.drafters]
        sides = [i for i, d in enumerate(drafts) if d.side_tokens is not None and d.side_tokens.numel()]
        if len(sides) > 1:
            raise ValueError("at most one merged drafter may use side nodes")
        if any(d.tree.draft_probs is not None for d in drafts):
            raise ValueError("MergedDrafter needs deterministic drafts (no draft_probs)")
        tokens: list[int] = []
        parents: list[int] = []
        index: dict[tuple[int, int], int] = {}
        maps: list[list[int]] = [[-1] * len(d.tree) for d in drafts]
        cursors = [0] * len(drafts)
        cap = self._cap if self._cap is not None else sum(len(d.tree) for d in drafts)
        # round-robin over the drafters, each contributing its nodes in order (parents before children)
        while len(tokens) < cap and any(c < len(d.tree) for c, d in zip(cursors, drafts)):
            for j, d in enumerate(drafts):
                if cursors[j] >= len(d.tree) or len(tokens) >= cap:
                    continue
                i = cursors[j]
                cursors[j] += 1
                p = int(d.tree.parents[i])
                parent = -1 if p < 0 else maps[j][p]
                if p >= 0 and parent < 0:  # parent was cut: so are its descendants
                    continue
                key = (parent, int(d.tree.tokens[i]))
                if key not in index:
                    index[key] = len(tokens)
                    tokens.append(key[1])
                    parents.append(parent)
                maps[j][i] = index[key]
        self._maps, self._drafts = maps, drafts
        tree = DraftTree(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long))
        if sides:
            s = drafts[sides[0]]
            return Draft(tree, s.side_tokens, s.side_allowed, s.side_depth)
        return Draft(tree)

    def observe(self, state, result: VerifyResult) -> None:
        # the engine may have cut the merged tree (``SpeculativeDecoding(max_draft_nodes=...)``) to its first nodes:
        # merged nodes past the verified tree were not verified, like nodes cut by ``max_nodes``
        verified = len(result.draft.tree)
        for j, (drafter, draft) in enumerate(zip(self.drafters, self._drafts)):
            if drafter.needs & {"last_hidden_state", "all_hidden_states", "target_cache"}:
                # feature-conditioned heads track the features of every committed token, including tokens accepted
                # from another drafter's nodes: they observe the merged tree and the whole accepted path
                drafter.observe(state, result)
                continue
            own = [m if m < verified else -1 for m in self._maps[j]]
            kept = [i for i, m in enumerate(own) if m >= 0]
            if len(kept) < len(own):  # nodes cut (max_nodes, the engine's cap): the drafter sees the kept subtree
                remap = {old: new for new, old in enumerate(kept)}
                parents = [remap.get(int(draft.tree.parents[i]), -1) for i in kept]
                draft = Draft(DraftTree(draft.tree.tokens[kept], torch.tensor(parents, dtype=torch.long)),
                              draft.side_tokens, draft.side_allowed, draft.side_depth, draft.info)
            merged_nodes = [own[i] for i in kept]
            rows = torch.tensor([0] + [m + 1 for m in merged_nodes], dtype=torch.long)
            position = {m: k for k, m in enumerate(merged_nodes)}
            accepted = []
            for node in result.accepted:  # the accepted path's prefix that lies in this drafter's tree
                if node not in position:
                    break
                accepted.append(position[node])
            has_side = draft.side_tokens is not None and draft.side_tokens.numel()
            drafter.observe(state, VerifyResult(draft, result.tree_logits[rows],
                                                result.side_logits if has_side else None, accepted,
                                                result.tokens, result.committed_logits,
                                                committed_top_k=result.committed_top_k))
