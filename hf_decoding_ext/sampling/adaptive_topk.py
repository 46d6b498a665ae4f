"""Adaptive top-k decoding with sparse (l0-penalised) Bregman decoders.

Paper: "Foundations of Top-k Decoding For Language Models", Noarov, Mallick, Wang, Joshi, Sun, Xie, Yu, Dobriban,
arXiv:2505.19371 (NeurIPS 2025).

Decoding one token is viewed as recovering a sparse distribution ``q`` from the model's next-token distribution
``p`` by the *primal sparse Bregman decoder*

    q_hat = argmin_{q in simplex}  D_phi(q, p) + lam * ||q||_0,

with a separable Bregman divergence ``D_phi(q, p) = sum_i phi(q_i) - phi(p_i) - phi'(p_i) (q_i - p_i)``.
For a fixed support ``S`` the optimal ``q`` is the *primal renormalisation* ``phi'(q_i) = phi'(p_i) + nu`` on ``S``
(``nu`` makes ``q`` sum to one); the optimal support is a top-``k`` set (greedy), and the objective

    F(k) = D_phi(q^(k), p) + lam * k

is discretely convex in ``k``, so the adaptive ``k`` is found by a binary search on ``F(k+1) - F(k) >= 0``.

Generators implemented:

* ``divergence="kl"``: ``phi(x) = x log x`` (generalised KL). ``q`` is the usual top-``k`` renormalisation
  ``p_S / P(S)`` and ``F(k) = -log P_k + lam k`` (``P_k`` = mass of the top ``k``), so standard top-k decoding is the
  KL special case and the adaptive ``k`` is the smallest ``k`` with ``log(1 + p_(k+1) / P_k) <= lam``.
* ``divergence="alpha"``: the alpha-entropy (Tsallis / power) generator ``phi_alpha(x) = (x^alpha - x) /
  (alpha (alpha - 1))``, alpha > 0, alpha != 1 (alpha -> 1 recovers KL). The renormalisation is
  ``q_i = (p_i^(alpha-1) + c)^(1/(alpha-1))`` on the top ``k`` (``alpha = 2``: ``q_i = p_i + (1 - P_k)/k``, the
  sparsemax-like additive shift; ``alpha < 1`` up-weights the larger probabilities non-linearly), and the
  off-support terms are ``D(0, p_i) = p_i^alpha / alpha``.
"""

from __future__ import annotations

import math

import torch
from transformers import LogitsProcessor

DIVERGENCES = ("kl", "alpha")
_BISECT_ITERS = 64


def _check(divergence: str, alpha: float | None) -> float:
    if divergence not in DIVERGENCES:
        raise ValueError(f"`divergence` has to be one of {DIVERGENCES}, but is {divergence!r}")
    if divergence == "kl":
        return 1.0
    if alpha is None or isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"`alpha` has to be a finite float for divergence='alpha', but is {alpha!r}")
    if alpha <= 0 or alpha == 1:
        raise ValueError(f"`alpha` has to be > 0 and != 1 (use divergence='kl' for alpha = 1), but is {alpha!r}")
    return float(alpha)


def alpha_renormalize(p_sorted: torch.Tensor, ks: torch.Tensor, alpha: float) -> torch.Tensor:
    """Primal alpha-renormalisation of the top ``k`` of a descending probability vector, for several ``k`` at once.

    Args:
        p_sorted: ``(V,)`` probabilities sorted in descending order (float64 recommended).
        ks: ``(n,)`` support sizes ``1 <= k <= V``.
        alpha: generator exponent (> 0, != 1).

    Returns:
        ``(n, K)`` with ``K = max(ks)``: row ``j`` holds ``q^(ks[j])`` on its first ``ks[j]`` entries and 0 after,
        where ``q_i = (p_i^(alpha-1) + c)^(1/(alpha-1))`` and ``c`` solves ``sum_i q_i = 1`` (found by bisection).
    """
    beta = alpha - 1.0
    K = int(ks.max())
    p = p_sorted[:K].to(torch.float64)
    mask = torch.arange(K, device=p.device)[None, :] < ks[:, None].to(p.device)
    pb = p.pow(beta)  # beta < 0: p = 0 gives inf, whose q is 0
    if alpha == 2.0:  # closed form: additive shift
        mass = torch.where(mask, p, torch.zeros_like(p)).sum(-1)
        c = (1.0 - mass) / ks.to(p)
        return torch.where(mask, p + c[:, None], torch.zeros_like(p))
    # parametrise c by t in [0, 1] so that sum(q) is increasing in t:
    # beta > 0: c = t (c = 1 gives every q_i >= 1); beta < 0: c = -t p_1^beta (t -> 1 sends q_1 -> inf)
    scale = 1.0 if beta > 0 else -float(pb[0])

    def q_of(t):
        base = (pb[None, :] + (t * scale)[:, None]).clamp_min(0.0)
        q = base.pow(1.0 / beta)
        return torch.where(mask, q, torch.zeros_like(q))

    lo = torch.zeros(len(ks), dtype=torch.float64, device=p.device)
    hi = torch.ones_like(lo)
    for _ in range(_BISECT_ITERS):
        mid = 0.5 * (lo + hi)
        over = q_of(mid).sum(-1) > 1.0
        hi = torch.where(over, mid, hi)
        lo = torch.where(over, lo, mid)
    q = q_of(0.5 * (lo + hi))
    return q / q.sum(-1, keepdim=True)  # remove the last bisection rounding error


def bregman_objective(p_sorted: torch.Tensor, ks: torch.Tensor, lam: float, divergence: str = "kl",
                      alpha: float | None = None, tail_alpha: torch.Tensor | None = None) -> torch.Tensor:
    """The primal sparse Bregman objective ``F(k) = D_phi(q^(k), p) + lam * k`` for the given support sizes.

    Args:
        p_sorted: ``(V,)`` probabilities sorted in descending order.
        ks: ``(n,)`` support sizes.
        lam: the l0 penalty ``lambda`` (>= 0).
        divergence: ``"kl"`` or ``"alpha"``.
        alpha: exponent of the alpha generator (``divergence="alpha"``).
        tail_alpha: optional precomputed ``(V,)`` suffix sums ``sum_{i >= j} p_i^alpha / alpha`` (speed-up).

    Returns:
        ``(n,)`` float64 objective values.
    """
    alpha = _check(divergence, alpha)
    p = p_sorted.to(torch.float64)
    ks = ks.to(device=p.device, dtype=torch.long)
    if divergence == "kl":
        mass = p[: int(ks.max())].cumsum(0)[ks - 1]
        return -torch.log(mass) + lam * ks.to(p)
    q = alpha_renormalize(p, ks, alpha)
    K = q.shape[-1]
    pk = p[:K][None, :]
    mask = torch.arange(K, device=p.device)[None, :] < ks[:, None]
    a = alpha
    safe_pk = torch.where(pk > 0, pk, torch.ones_like(pk))
    term = (q.pow(a) - pk.pow(a)) / (a * (a - 1.0)) - safe_pk.pow(a - 1.0) * (q - pk) / (a - 1.0)
    support = torch.where(mask & (pk > 0), term, torch.zeros_like(term)).sum(-1)
    if tail_alpha is None:
        tail_alpha = (p.pow(a) / a).flip(0).cumsum(0).flip(0)
    tail = torch.where(ks < len(p), tail_alpha[ks.clamp(max=len(p) - 1)], torch.zeros_like(support))
    return support + tail + lam * ks.to(p)


def adaptive_k(p_sorted: torch.Tensor, lam: float, divergence: str = "kl", alpha: float | None = None,
               k_max: int | None = None) -> int:
    """The minimiser over ``k`` of :func:`bregman_objective`, by search on the discretely convex ``F``.

    An exponential (galloping) search first brackets the minimiser (``k = 1, 2, 4, ...`` until
    ``F(k+1) >= F(k)``), then a binary search finds the smallest ``k`` with ``F(k+1) - F(k) >= 0`` inside the
    bracket. By discrete convexity this is the (smallest) global minimiser, with ``O(log k)`` evaluations that
    touch only the top ``O(k)`` entries.

    Args:
        p_sorted: ``(V,)`` probabilities sorted in descending order.
        lam: the l0 penalty.
        divergence, alpha: the Bregman generator (see :func:`bregman_objective`).
        k_max: largest admissible ``k`` (defaults to the number of non-zero probabilities).
    """
    p = p_sorted.to(torch.float64)
    n_pos = int((p > 0).sum())
    k_max = max(1, min(n_pos, len(p) if k_max is None else k_max))
    tail = None
    if divergence == "alpha":
        a = _check(divergence, alpha)
        tail = (p.pow(a) / a).flip(0).cumsum(0).flip(0)

    def increasing_at(k: int) -> bool:  # F(k+1) - F(k) >= 0 ?
        if k >= k_max:
            return True
        f = bregman_objective(p, torch.tensor([k, k + 1]), lam, divergence, alpha, tail_alpha=tail)
        return bool(f[1] >= f[0])

    lo, hi = 1, 1
    while not increasing_at(hi):
        lo, hi = hi + 1, min(2 * hi, k_max)
    while lo < hi:
        mid = (lo + hi) // 2
        if increasing_at(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def bregman_decode(p: torch.Tensor, lam: float = 0.01, divergence: str = "kl", alpha: float | None = None,
                   k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse Bregman decoding of a batch of distributions.

    Args:
        p: ``(batch, V)`` probabilities.
        lam: the l0 penalty (ignored when ``k`` is given).
        divergence, alpha: the Bregman generator.
        k: fixed support size (the sparsity-constrained form); ``None`` = adaptive ``k`` from ``lam``.

    Returns:
        ``(q, ks)``: ``q (batch, V)`` the decoded distributions (float64) and ``ks (batch,)`` the support sizes.
    """
    alpha_f = _check(divergence, alpha)
    p = p.to(torch.float64)
    sorted_p, order = p.sort(dim=-1, descending=True)
    q = torch.zeros_like(p)
    ks = torch.empty(p.shape[0], dtype=torch.long, device=p.device)
    for r in range(p.shape[0]):
        n_pos = max(1, int((sorted_p[r] > 0).sum()))
        kr = min(k, n_pos) if k is not None else adaptive_k(sorted_p[r], lam, divergence, alpha)
        if divergence == "kl":
            top = sorted_p[r, :kr] / sorted_p[r, :kr].sum()
        else:
            top = alpha_renormalize(sorted_p[r], torch.tensor([kr], device=p.device), alpha_f)[0]
        q[r, order[r, :kr]] = top
        ks[r] = kr
    return q, ks


class AdaptiveTopKLogitsProcessor(LogitsProcessor):
    r"""
    [`LogitsProcessor`] for adaptive top-k decoding with a sparse primal Bregman decoder, from "Foundations of Top-k
    Decoding For Language Models" (Noarov et al., arXiv:2505.19371). For every row it solves
    ``min_q D_phi(q, p) + lam ||q||_0`` over the simplex: the support is the top ``k`` tokens, with ``k`` chosen per
    row by binary search on the discretely convex objective, and the kept probabilities are re-weighted by the
    primal renormalisation of the chosen divergence (plain renormalisation for KL). Use with ``do_sample=True``.

    With ``divergence="kl"`` the output keeps the original scores on the top ``k`` tokens and sets the rest to
    ``filter_value`` (exactly what [`TopKLogitsWarper`] does for a fixed ``k``); with ``divergence="alpha"`` it
    returns ``log q`` on the support. ``k=...`` switches to the fixed-``k`` (sparsity-constrained) decoder: KL then
    equals standard top-k, alpha gives the paper's alpha-renormalised top-k.

    In ``generate()`` user processors run *before* the temperature/top-k/top-p warpers built from the generation
    config, so pass ``top_k=0`` (transformers otherwise adds its default ``top_k=50`` after this processor, which would
    cap the adaptive ``k`` at 50), and note that ``generate(temperature=T)`` is then applied to ``q`` (sampling from
    ``q^(1/T)``); to decode the tempered distribution instead, put a ``TemperatureLogitsWarper`` before this
    processor in the list. Tokens already removed by earlier processors (``-inf``) are never selected.

    Deviations / choices: only the *primal* decoder is implemented (the paper also studies a dual form,
    ``D_phi(p, q)``, which is infinite for KL on sparse ``q``); the default ``lam=0.01`` is this library's choice (the
    paper's text with its hyper-parameters was not available to us); the KL objective is evaluated in closed form,
    the alpha normaliser by bisection in float64.

    Args:
        lam (`float`, *optional*, defaults to 0.01):
            The l0 penalty ``lambda`` (>= 0): larger values give smaller supports. For KL a token ``k+1`` is added
            while ``p_(k+1) / P_k > exp(lam) - 1``.
        divergence (`str`, *optional*, defaults to `"kl"`):
            ``"kl"`` or ``"alpha"`` (alpha-entropy / power generator).
        alpha (`float`, *optional*):
            Exponent of the alpha generator, > 0 and != 1; required for ``divergence="alpha"``.
        k (`int`, *optional*):
            Fixed support size instead of the adaptive one (``lam`` is then ignored).
        filter_value (`float`, *optional*, defaults to -inf):
            Value given to removed tokens.

    Examples:

    ```python
    >>> import torch
    >>> from hf_decoding_ext.sampling.adaptive_topk import AdaptiveTopKLogitsProcessor
    >>> scores = torch.log(torch.tensor([[0.80, 0.15, 0.03, 0.02], [0.3, 0.3, 0.2, 0.2]]))
    >>> proc = AdaptiveTopKLogitsProcessor(lam=0.1)
    >>> torch.isfinite(proc(torch.tensor([[0], [0]]), scores)).sum(-1).tolist()  # peaked row: small k
    [2, 4]

    >>> from hf_decoding_ext.core.models import load_model, encode_prompts
    >>> model, tok = load_model()  # doctest: +SKIP
    >>> enc = encode_prompts(tok, ["Tell me a story."])  # doctest: +SKIP
    >>> out = model.generate(**enc, do_sample=True, top_k=0, max_new_tokens=30,
    ...                      logits_processor=[AdaptiveTopKLogitsProcessor(lam=0.01)])  # doctest: +SKIP
    ```
    """

    def __init__(self, lam: float = 0.01, divergence: str = "kl", alpha: float | None = None, k: int | None = None,
                 filter_value: float = -float("inf")):
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
            raise ValueError(f"`lam` has to be a finite float >= 0, but is {lam!r}")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"`k` has to be None or an integer >= 1, but is {k!r}")
        if divergence == "kl" and alpha is not None:
            raise ValueError("`alpha` is only used with divergence='alpha'")
        checked = _check(divergence, alpha)
        self.alpha = checked if divergence == "alpha" else None
        self.lam = float(lam)
        self.divergence = divergence
        self.k = k
        self.filter_value = filter_value
        self.last_k: torch.Tensor | None = None  # support size per row at the last call (diagnostics)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        p = torch.softmax(scores.double(), dim=-1)
        q, ks = bregman_decode(p, self.lam, self.divergence, self.alpha, self.k)
        self.last_k = ks.to(scores.device)
        keep = q > 0
        if self.divergence == "kl":
            return scores.masked_fill(~keep, self.filter_value)
        out = torch.where(keep, torch.log(q.clamp_min(1e-300)), torch.full_like(q, self.filter_value))
        return out.to(scores.dtype)
