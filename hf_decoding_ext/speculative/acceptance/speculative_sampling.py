"""Speculative sampling for chains and trees (lossless in distribution)."""

from __future__ import annotations

import torch

from hf_decoding_ext.core.tree import DraftTree
from hf_decoding_ext.speculative.acceptance.base import AcceptanceRule, target_probs


class SpeculativeSamplingAcceptance(AcceptanceRule):
    """Speculative sampling, from "Fast Inference from Transformers via Speculative Decoding" (Leviathan, Kalman and
    Matias, arXiv 2211.17192) and "Accelerating Large Language Model Decoding with Speculative Sampling" (Chen et
    al., arXiv 2302.01318), extended to trees by recursive rejection over the children (SpecInfer, Miao et al.,
    arXiv 2305.09781) and to siblings sampled without replacement (Recursive Speculative Decoding, Jeon et al.,
    arXiv 2402.14160).

    At a node with target distribution ``p``, children ``x_1..x_k`` are tried in order: ``x_i`` is accepted with
    probability ``min(1, p(x_i) / q_i(x_i))``; on rejection ``p <- norm(max(p - q_i, 0))`` (:meth:`residual`). ``q_i``
    (:meth:`draft_distribution`) is the distribution ``x_i`` was drawn from given the earlier siblings: one-hot on
    ``x_i`` for deterministic drafts (a rejected token is removed from the residual), the child's ``draft_probs``
    row for i.i.d. siblings, and that row with the earlier siblings' tokens removed and renormalised for siblings
    drawn without replacement. If every child is rejected, the bonus token is sampled from the residual ``p``
    (:meth:`bonus_distribution`). Each stage keeps the residual's distribution exactly, so the emitted tokens follow
    the target for all three sibling schemes.

    Example:
        >>> import torch
        >>> from hf_decoding_ext.core.tree import DraftTree
        >>> rule = SpeculativeSamplingAcceptance()
        >>> tree = DraftTree.chain([1])  # a deterministic one-token draft
        >>> scores = {-1: torch.tensor([-30.0, 30.0, -30.0]), 0: torch.tensor([-30.0, -30.0, 30.0])}
        >>> rule.accept(tree, scores.__getitem__, torch.Generator().manual_seed(0))  # p(1) = 1: accepted
        ([0], 2)
    """

    lossless_schemes = frozenset({"deterministic", "iid", "without_replacement"})

    def draft_distribution(self, tree: DraftTree, child: int, earlier: list[int], p: torch.Tensor) -> torch.Tensor:
        """``q_i``: the distribution ``(vocab,)`` child ``child`` was drawn from, given its earlier siblings' tokens
        ``earlier`` (all rejected); ``p`` gives the device and size."""
        x = int(tree.tokens[child])
        if tree.draft_probs is None:
            return torch.zeros_like(p).index_fill_(0, torch.tensor([x], device=p.device), 1.0)
        q = tree.draft_probs[child].to(p.device, torch.float32)
        if tree.sibling_scheme == "without_replacement" and earlier:
            q = q.index_fill(0, torch.tensor(earlier, device=p.device), 0.0)
            q = q / q.sum()
        return q

    def residual(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor | None:
        """The target after rejecting a draft from ``q``: ``norm(max(p - q, 0))`` (``None`` when nothing is left,
        which happens only numerically, since ``p == q`` accepts surely)."""
        residual = (p - q).clamp(min=0)
        total = residual.sum()
        return residual / total if total > 0 else None

    def bonus_distribution(self, residual: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The distribution the bonus token is drawn from at the last accepted node: the residual after every
        rejected child there (``target`` itself when the node has no children)."""
        return residual

    def relaxed_probs(self, node: int, scores: torch.Tensor) -> torch.Tensor | None:
        """A second distribution ``(vocab,)`` at ``node`` whose mass also passes a child's ratio test (the test
        uses ``max(p(x), relaxed(x))``), or ``None`` (the default: strict, lossless). Lossy relaxed rules
        (reflective verification) override it."""
        return None

    def accept(self, tree, scores_at, generator=None):
        accepted, node = [], -1
        while True:
            scores = scores_at(node)
            target = target_probs(scores)
            children = tree.children(node)
            relaxed = self.relaxed_probs(node, scores) if children else None
            p, chosen, earlier = target, None, []
            for c in children:
                x = int(tree.tokens[c])
                q = self.draft_distribution(tree, c, earlier, p)
                px, qx = float(p[x]), float(q[x])
                if relaxed is not None:
                    px = max(px, float(relaxed[x]))
                if px > 0 and qx > 0 and self.draw_bernoulli(min(1.0, px / qx), generator):
                    chosen = c
                    break
                residual = self.residual(p, q)
                if residual is None:
                    break
                p = residual
                earlier.append(x)
            if chosen is None:
                return accepted, self.draw_token(self.bonus_distribution(p, target), generator)
            if not self.bonus_after_leaf and not tree.children(chosen):
                return accepted, int(tree.tokens[chosen])  # the accepted leaf ends the step
            accepted.append(chosen)
            node = chosen
