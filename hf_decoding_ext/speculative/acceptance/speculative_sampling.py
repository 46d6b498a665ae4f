"""Speculative sampling for chains and trees (lossless in distribution)."""

from __future__ import annotations

import torch

from hf_decoding_ext.speculative.acceptance.base import AcceptanceRule, target_probs


class SpeculativeSamplingAcceptance(AcceptanceRule):
    """Speculative sampling, from "Fast Inference from Transformers via Speculative Decoding" (Leviathan, Kalman and
    Matias, arXiv 2211.17192) and "Accelerating Large Language Model Decoding with Speculative Sampling" (Chen et
    al., arXiv 2302.01318), extended to trees by recursive rejection over the children (SpecInfer, Miao et al.,
    arXiv 2305.09781).

    At a node with target distribution ``p``, children ``x_1..x_k`` are tried in order: ``x_i`` is accepted with
    probability ``min(1, p(x_i) / q(x_i))``; on rejection ``p <- norm(max(p - q, 0))``. ``q`` is the child's
    ``draft_probs`` row, or one-hot on ``x_i`` for deterministic drafts (then a rejected token is removed from the
    residual). If every child is rejected, the bonus token is sampled from the residual ``p``.

    Lossless for deterministic drafts and for siblings drawn i.i.d. from ``draft_probs``. Siblings drawn *without
    replacement* are not i.i.d. (the second one cannot repeat the first), so dividing by ``q`` is wrong for them;
    :meth:`check_tree` refuses such drafts (Recursive Speculative Decoding's rule handles them).

    Example:
        >>> import torch
        >>> from hf_decoding_ext.core.tree import DraftTree
        >>> rule = SpeculativeSamplingAcceptance()
        >>> tree = DraftTree.chain([1])  # a deterministic one-token draft
        >>> scores = {-1: torch.tensor([-30.0, 30.0, -30.0]), 0: torch.tensor([-30.0, -30.0, 30.0])}
        >>> rule.accept(tree, scores.__getitem__, torch.Generator().manual_seed(0))  # p(1) = 1: accepted
        ([0], 2)
    """

    lossless_schemes = frozenset({"deterministic", "iid"})

    def accept(self, tree, scores_at, generator=None):
        accepted, node = [], -1
        while True:
            p = target_probs(scores_at(node))
            chosen = None
            for c in tree.children(node):
                x = int(tree.tokens[c])
                if tree.draft_probs is None:
                    px = float(p[x])
                    if px > 0 and self.draw_bernoulli(px, generator):
                        chosen = c
                        break
                    p = p.clone()
                    p[x] = 0.0
                    total = p.sum()
                    if total <= 0:  # numerically everything was rejected: fall back to the target argmax
                        p = target_probs(scores_at(node))
                        break
                    p = p / total
                else:
                    q = tree.draft_probs[c].to(p.device, torch.float32)
                    ratio = float(p[x]) / max(float(q[x]), 1e-20)
                    if self.draw_bernoulli(min(1.0, ratio), generator):
                        chosen = c
                        break
                    residual = (p - q).clamp(min=0)
                    total = residual.sum()
                    if total <= 0:
                        break
                    p = residual / total
            if chosen is None:
                return accepted, self.draw_token(p, generator)
            accepted.append(chosen)
            node = chosen
