"""SpecTr's K-SEQ acceptance for k i.i.d. drafts (lossless in distribution)."""

from __future__ import annotations

import torch

from hf_decoding_ext.core.tree import DraftTree
from hf_decoding_ext.speculative.acceptance.base import AcceptanceRule, target_probs
from hf_decoding_ext.speculative.acceptance.greedy import GreedyAcceptance


def kseq_rho(p: torch.Tensor, q: torch.Tensor, k: int, iters: int = 50) -> tuple[float, float]:
    """K-SEQ's division factor for ``k`` i.i.d. draws: the smallest ``rho`` in ``[1, k]`` (to bisection precision,
    rounded up) with ``f(rho) = (1 - (1 - beta)^k) / beta <= rho``, where ``beta(rho) = sum_x min(q(x), p(x) /
    rho)`` is one draw's acceptance probability. Returns ``(rho, beta)``. ``f <= rho`` is what keeps the residual
    non-negative (the rule lossless); the smallest such ``rho`` accepts most. ``k = 1`` gives ``rho = 1`` (standard
    speculative sampling)."""
    p64, q64 = p.double(), q.double()

    def beta(rho: float) -> float:
        return float(torch.minimum(q64, p64 / rho).sum())

    def feasible(rho: float) -> bool:
        b = beta(rho)
        if b <= 0:
            return True
        return (1 - (1 - b) ** k) / b <= rho * (1 + 1e-12)

    if k <= 1 or feasible(1.0):
        return 1.0, beta(1.0)
    lo, hi = 1.0, float(k)  # f(k) <= k always (a sum of k terms <= 1)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if feasible(mid):
            hi = mid
        else:
            lo = mid
    return hi, beta(hi)


class SpecTrAcceptance(AcceptanceRule):
    """K-SEQ, the draft selection of "SpecTr: Fast Speculative Decoding via Optimal Transport" (Sun, Mendlovic,
    Leviathan, Aharoni, Beirami, Ro, Suresh; NeurIPS 2023, arXiv 2310.15141), for drafts of ``k`` i.i.d. draft
    sequences.

    At an accepted prefix, the ``m`` draft tokens continuing it (the next tokens of every draft sequence that
    matches the prefix, with repeats: i.i.d. draws from the draft distribution ``q`` there) are checked in order;
    draw ``x`` is accepted with probability ``min(1, p(x) / (rho q(x)))``, with the division factor ``rho`` in
    ``[1, m]`` of :func:`kseq_rho`. If all ``m`` are rejected, the token is drawn from the residual::

        r(x) ∝ p(x) - min(q(x), p(x) / rho) (1 - (1 - beta)^m) / beta,    beta = sum_x min(q(x), p(x) / rho)

    which makes the emitted token's marginal exactly ``p``. After an acceptance the sequences that drafted the
    accepted token continue to the next position (their continuations are again i.i.d. draws from ``q`` given the
    new prefix). With ``m = 1`` (``k = 1``) ``rho = 1`` and the rule is speculative sampling, draw for draw.

    Drafts: the tree's children of one node are i.i.d. draws (``sibling_scheme="iid"``, with ``draft_probs`` rows
    giving ``q``); draft sequences that share a prefix may be separate branches (duplicate tokens among siblings
    are separate draws) — the rule merges every branch with the accepted prefix. The accepted path reported is the
    one ending at the last accepted node (all merged branches spell the same tokens). Greedy generation uses
    :class:`~hf_decoding_ext.speculative.acceptance.greedy.GreedyAcceptance`.

    Deviation: the paper's optimal-transport LP (its optimal but costly selection) is not implemented, only K-SEQ,
    which the paper proposes for practice ((1 - 1/e)-optimal); ``rho`` is found by bisection.

    Example:
        >>> import torch
        >>> from hf_decoding_ext.core.tree import DraftTree
        >>> q = torch.tensor([[0.5, 0.5, 0.0]] * 2)
        >>> tree = DraftTree(torch.tensor([0, 1]), torch.tensor([-1, -1]), q, "iid")  # two i.i.d. draws at the root
        >>> rule = SpecTrAcceptance()
        >>> path, bonus = rule.accept(tree, lambda node: torch.tensor([0.0, 0.0, -30.0]),
        ...                           torch.Generator().manual_seed(0))
        >>> len(path)  # p == q at the root: the first draw is accepted
        1
    """

    lossless_schemes = frozenset({"iid"})

    @classmethod
    def for_sampling(cls, do_sample: bool) -> AcceptanceRule:
        return cls() if do_sample else GreedyAcceptance()

    def check_tree(self, tree: DraftTree) -> None:
        if len(tree) == 0:  # an empty draft (no room left): the bonus token is drawn from the target
            return
        super().check_tree(tree)

    def accept(self, tree: DraftTree, scores_at, generator=None):
        nodes, last = [-1], -1  # the tree nodes that spell the accepted prefix (merged branches)
        while True:
            p = target_probs(scores_at(last))
            draws = [c for n in nodes for c in tree.children(n)]
            if not draws:
                return self._path(tree, last), self.draw_token(p, generator)
            q = tree.draft_probs[draws[0]].to(p.device, torch.float32)
            m = len(draws)
            rho, beta = kseq_rho(p, q, m)
            chosen = None
            for c in draws:
                x = int(tree.tokens[c])
                px, qx = float(p[x]), float(q[x])
                if px > 0 and qx > 0 and self.draw_bernoulli(min(1.0, px / (rho * qx)), generator):
                    chosen = c
                    break
            if chosen is None:
                return self._path(tree, last), self.draw_token(self.kseq_residual(p, q, rho, beta, m), generator)
            x = int(tree.tokens[chosen])
            nodes = [c for c in draws if int(tree.tokens[c]) == x]
            last = chosen

    @staticmethod
    def kseq_residual(p: torch.Tensor, q: torch.Tensor, rho: float, beta: float, m: int) -> torch.Tensor:
        """The distribution the token is drawn from when all ``m`` draws are rejected (normalised)."""
        if beta <= 0:
            return p
        scale = (1 - (1 - beta) ** m) / beta
        if m == 1 and rho == 1.0:  # exactly speculative sampling's residual
            residual = (p - torch.minimum(q, p)).clamp(min=0)
        else:
            residual = (p - torch.minimum(q, p / rho) * scale).clamp(min=0)
        total = residual.sum()
        return residual / total if total > 0 else p

    @staticmethod
    def _path(tree: DraftTree, node: int) -> list[int]:
        path = []
        while node >= 0:
            path.append(node)
            node = int(tree.parents[node])
        return path[::-1]


__all__ = ["SpecTrAcceptance", "kseq_rho"]
