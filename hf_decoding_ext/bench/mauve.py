"""MAUVE (Pillutla et al., 2021): the gap between human text and model text, from quantised embeddings.

"MAUVE: Measuring the Gap Between Neural Text and Human Text using Divergence Frontiers" (Pillutla, Swayamdipta,
Zellers, Thickstun, Welleck, Choi and Harchaoui, NeurIPS 2021, arXiv:2102.01454). Both samples are embedded
(``(n, dim)`` features), the joint set is L2-normalised, reduced by PCA to the components explaining 90% of the
variance and quantised by k-means into ``num_buckets`` clusters (default ``round(min(n_p, n_q) / 10)``, at least 2);
the two cluster histograms ``P`` (human) and ``Q`` (model) give the divergence curve

.. math::

    \\mathcal{C}(P, Q) = \\{ (e^{-c\\,KL(Q \\| R_\\lambda)},\\; e^{-c\\,KL(P \\| R_\\lambda)}) :
    R_\\lambda = \\lambda P + (1 - \\lambda) Q,\\ \\lambda \\in (0, 1) \\}

with scaling ``c = 5``, and MAUVE is the area under it: 1 for identical histograms, close to 0 for disjoint ones.
The defaults follow the reference implementation's (25 mixture weights, 5 k-means restarts of up to 500 iterations,
no whitening). Everything runs in torch (the reference uses scikit-learn's PCA and FAISS k-means), so results match
the reference up to the k-means solution. The reference featurises with GPT-2 large; :func:`text_features` uses the
model at hand (final hidden state of the last token, or the mean over tokens), a documented deviation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "MauveResult",
    "divergence_curve",
    "kmeans",
    "mauve",
    "mauve_from_histograms",
    "quantize",
    "text_features",
]


@dataclass
class MauveResult:
    """``mauve`` (area under the divergence curve), the curve ``(points, 2)``, and the histograms of both samples."""

    mauve: float
    curve: torch.Tensor
    p_hist: torch.Tensor
    q_hist: torch.Tensor
    num_buckets: int


def _kl(a: torch.Tensor, b: torch.Tensor) -> float:
    """KL(a || b) in nats for histograms; 0 log 0 = 0, and ``inf`` where ``a > 0 = b``."""
    mask = a > 0
    if bool((b[mask] <= 0).any()):
        return math.inf
    return float((a[mask] * (a[mask].log() - b[mask].log())).sum())


def _check_hist(name: str, hist: torch.Tensor) -> torch.Tensor:
    hist = torch.as_tensor(hist, dtype=torch.float64).flatten()
    if hist.numel() == 0 or bool((hist < 0).any()) or not math.isfinite(float(hist.sum())) or float(hist.sum()) <= 0:
        raise ValueError(f"`{name}` must be a non-empty histogram of non-negative counts, got {hist.tolist()!r}")
    return hist / hist.sum()


def divergence_curve(p_hist, q_hist, scaling_factor: float = 5.0, num_points: int = 25) -> torch.Tensor:
    """The points ``(exp(-c KL(Q||R)), exp(-c KL(P||R)))`` for ``R = w P + (1 - w) Q``, ``w`` in ``(0, 1)``.

    The two extreme points ``(1, 0)`` and ``(0, 1)`` (``w`` = 0 and 1) are included; returns float64
    ``(num_points + 2, 2)`` in the order of ``w`` (the second coordinate increases, the first decreases).
    """
    if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 1:
        raise ValueError(f"`num_points` must be a positive integer, got {num_points!r}")
    if not scaling_factor > 0:
        raise ValueError(f"`scaling_factor` must be positive, got {scaling_factor!r}")
    p, q = _check_hist("p_hist", p_hist), _check_hist("q_hist", q_hist)
    if p.shape != q.shape:
        raise ValueError(f"the histograms differ in size: {p.numel()} and {q.numel()}")
    points = [(0.0, math.inf)]
    for w in torch.linspace(1e-6, 1 - 1e-6, num_points, dtype=torch.float64).tolist():
        r = w * p + (1 - w) * q
        points.append((_kl(q, r), _kl(p, r)))
    points.append((math.inf, 0.0))
    return torch.exp(-scaling_factor * torch.tensor(points, dtype=torch.float64))


def _area(curve: torch.Tensor) -> float:
    return float(torch.trapezoid(curve[:, 0], curve[:, 1]))


def mauve_from_histograms(p_hist, q_hist, scaling_factor: float = 5.0, num_points: int = 25) -> float:
    """MAUVE of two histograms over the same buckets: the trapezoidal area under :func:`divergence_curve`.

    Examples:

    ```python
    >>> from hf_decoding_ext.bench.mauve import mauve_from_histograms
    >>> round(mauve_from_histograms([1, 1, 2], [1, 1, 2]), 6)
    1.0
    >>> mauve_from_histograms([1, 0], [0, 1]) < 0.01
    True
    ```
    """
    return _area(divergence_curve(p_hist, q_hist, scaling_factor, num_points))


def kmeans(x: torch.Tensor, k: int, num_redo: int = 5, max_iter: int = 500, seed: int = 25) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding: the cluster label ``(n,)`` of each row of ``x`` ``(n, dim)``.

    ``num_redo`` restarts (seeded from ``seed``); the one with the lowest inertia wins. Empty clusters keep their
    centre.
    """
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"`x` must be a non-empty (n, dim) tensor, got shape {tuple(x.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= x.shape[0]:
        raise ValueError(f"`k` must be an integer in [1, {x.shape[0]}], got {k!r}")
    x = x.double()
    gen = torch.Generator().manual_seed(seed)
    best_labels, best_inertia = None, math.inf
    for _ in range(max(1, num_redo)):
        centres = x[torch.randint(x.shape[0], (1,), generator=gen)]
        for _ in range(1, k):  # k-means++: next centre drawn proportionally to the squared distance
            d2 = torch.cdist(x, centres).pow(2).min(-1).values
            probs = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full_like(d2, 1.0 / d2.numel())
            centres = torch.cat([centres, x[torch.multinomial(probs, 1, generator=gen)]])
        labels = None
        for _ in range(max_iter):
            new = torch.cdist(x, centres).argmin(-1)
            if labels is not None and torch.equal(new, labels):
                break
            labels = new
            counts = torch.bincount(labels, minlength=k).to(x.dtype)
            sums = torch.zeros_like(centres).index_add_(0, labels, x)
            filled = counts > 0
            centres[filled] = sums[filled] / counts[filled, None]
        inertia = float((x - centres[labels]).pow(2).sum())
        if inertia < best_inertia:
            best_labels, best_inertia = labels, inertia
    return best_labels


def _pca(x: torch.Tensor, explained_variance: float) -> torch.Tensor:
    """Project centred ``x`` on the fewest principal components explaining ``explained_variance`` of the variance."""
    centred = x - x.mean(0, keepdim=True)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    var = s.pow(2)
    if float(var.sum()) <= 0:
        return centred[:, :1]
    ratio = torch.cumsum(var, 0) / var.sum()
    keep = int(torch.searchsorted(ratio, torch.tensor([explained_variance], dtype=ratio.dtype)).item()) + 1
    return centred @ vh[: min(keep, vh.shape[0])].T


def quantize(p_features: torch.Tensor, q_features: torch.Tensor, num_buckets: int | str = "auto",
             explained_variance: float = 0.9, num_redo: int = 5, max_iter: int = 500,
             seed: int = 25) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint L2 normalisation, PCA and k-means of both samples; returns the two normalised cluster histograms."""
    p, q = torch.as_tensor(p_features), torch.as_tensor(q_features)
    if p.dim() != 2 or q.dim() != 2 or p.shape[1] != q.shape[1] or p.shape[0] == 0 or q.shape[0] == 0:
        raise ValueError(f"features must be non-empty (n, dim) with equal dim, got {tuple(p.shape)} and "
                         f"{tuple(q.shape)}")
    if not 0 < explained_variance <= 1:
        raise ValueError(f"`explained_variance` must be in (0, 1], got {explained_variance!r}")
    if num_buckets == "auto":
        num_buckets = max(2, round(min(p.shape[0], q.shape[0]) / 10))
    if isinstance(num_buckets, bool) or not isinstance(num_buckets, int) or num_buckets < 1:
        raise ValueError(f"`num_buckets` must be a positive integer or 'auto', got {num_buckets!r}")
    data = torch.cat([p, q]).double()
    data = data / data.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    labels = kmeans(_pca(data, explained_variance), min(num_buckets, data.shape[0]), num_redo, max_iter, seed)
    k = int(labels.max()) + 1
    p_hist = torch.bincount(labels[: p.shape[0]], minlength=k).double()
    q_hist = torch.bincount(labels[p.shape[0]:], minlength=k).double()
    return p_hist / p_hist.sum(), q_hist / q_hist.sum()


def mauve(p_features: torch.Tensor, q_features: torch.Tensor, num_buckets: int | str = "auto",
          scaling_factor: float = 5.0, num_points: int = 25, explained_variance: float = 0.9, num_redo: int = 5,
          max_iter: int = 500, seed: int = 25) -> MauveResult:
    """MAUVE between human features ``p_features`` ``(n_p, dim)`` and model features ``q_features`` ``(n_q, dim)``.

    Args:
        p_features, q_features (`torch.Tensor`): one embedding per text (see :func:`text_features`).
        num_buckets (`int` or `"auto"`): k-means clusters; ``"auto"`` is ``max(2, round(min(n_p, n_q) / 10))``.
        scaling_factor (`float`, defaults to 5): the constant ``c`` of the divergence curve.
        num_points (`int`, defaults to 25): mixture weights on the curve.
        explained_variance (`float`, defaults to 0.9): PCA variance kept before k-means.
        num_redo, max_iter, seed: k-means restarts, iterations and seed.

    Examples:

    ```python
    >>> import torch
    >>> from hf_decoding_ext.bench.mauve import mauve
    >>> gen = torch.Generator().manual_seed(0)
    >>> human = torch.randn(200, 8, generator=gen)
    >>> round(mauve(human, human.clone()).mauve, 6)
    1.0
    >>> mauve(human, torch.randn(200, 8, generator=gen) + 5.0).mauve < 0.05
    True
    ```
    """
    p_hist, q_hist = quantize(p_features, q_features, num_buckets, explained_variance, num_redo, max_iter, seed)
    curve = divergence_curve(p_hist, q_hist, scaling_factor, num_points)
    return MauveResult(_area(curve), curve, p_hist, q_hist, p_hist.numel())


@torch.no_grad()
def text_features(model, token_rows: Sequence[Sequence[int]], pooling: str = "last",
                  batch_size: int = 16) -> torch.Tensor:
    """One feature vector per token sequence: the model's final hidden state at the last token, or the mean.

    Rows are right-padded per batch; ``pooling`` is ``"last"`` (MAUVE's choice, with GPT-2 large there) or
    ``"mean"``. Returns float32 ``(len(token_rows), hidden)`` on the CPU.
    """
    if pooling not in ("last", "mean"):
        raise ValueError(f"`pooling` must be 'last' or 'mean', got {pooling!r}")
    if not token_rows or any(len(r) == 0 for r in token_rows):
        raise ValueError("`token_rows` must be a non-empty list of non-empty token sequences")
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(token_rows), batch_size):
        rows = token_rows[start:start + batch_size]
        width = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.as_tensor(list(r), dtype=torch.long)
            mask[i, :len(r)] = 1
        ids, mask = ids.to(device), mask.to(device)
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1].float()
        if pooling == "last":
            feats = hidden[torch.arange(len(rows), device=device), mask.sum(-1) - 1]
        else:
            feats = (hidden * mask[..., None]).sum(1) / mask.sum(-1, keepdim=True)
        out.append(feats.cpu())
    return torch.cat(out)
