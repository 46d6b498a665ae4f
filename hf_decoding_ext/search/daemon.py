"""DAEMON: language model decoding as direct metrics optimization (Ji, Ke, Wang, Huang; ICLR 2024, arXiv:2310.01041).

The decoding distribution is the I-projection of the model onto the set of distributions whose expected metrics equal
those of human text,

.. math::
    p_{\\theta,\\mu}(x \\mid c) \\propto p_\\theta(x \\mid c)\\, \\exp(-\\mu^\\top f(x, c)),

with :math:`\\mu` the solution of the convex dual :math:`\\min_\\mu \\mathbb{E}_c \\log Z_c(\\mu) + \\mu^\\top
\\mathbb{E}_{\\text{human}}[f]`, estimated by weighted importance sampling on samples of a proposal
(:func:`fit_weights`). Decoding is conditional sampling-importance-resampling (:class:`DAEMONDecoding`): draw ``M``
candidates from the proposal :math:`q`, resample one with probability
:math:`w_i \\propto p_\\theta(x_i)/q(x_i) \\cdot \\exp(-\\mu^\\top f(x_i))`.

This module holds the metric functions (:func:`daemon_features`), the dual fit (:func:`fit_weights`), the shipped
weights loader (:func:`load_weights`) and the decoding loop.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from hf_decoding_ext.core.candidates import CandidatePool, RerankingLoop, Selection
from hf_decoding_ext.core.loop import GenerationState
from hf_decoding_ext.core.scoring import continuation_token_log_probs
from hf_decoding_ext.core.resources import data_path

__all__ = [
    "METRICS",
    "SHIPPED_WEIGHTS",
    "DAEMONDecoding",
    "DAEMONFit",
    "daemon_features",
    "diversity",
    "fit_weights",
    "load_weights",
    "repetition_rate",
    "shipped_weights_path",
]

METRICS = ("rep", "div", "coh", "info", "len")
"""The metrics of :func:`daemon_features`, in the order of the feature columns:

* ``rep``: repetition, the mean of rep-2, rep-3 and rep-4 (:func:`repetition_rate`) over the continuation's tokens;
* ``div``: diversity, :math:`\\prod_{n=2}^4 (1 - \\text{rep-}n)` (:func:`diversity`);
* ``coh``: coherence, the cosine similarity of the model's mean-pooled last hidden states of the prefix and of the
  continuation, each encoded on its own (a stand-in for the paper's SimCSE sentence embeddings);
* ``info``: information, the continuation's mean per-token negative log-likelihood under the model given the prefix
  (nats per token);
* ``len``: length, the number of continuation tokens (a final eos not counted).
"""

SHIPPED_WEIGHTS = "daemon_weights_smollm2.json"
"""File (under ``hf_decoding_ext/data/search/``) of the weights fitted for SmolLM2-135M-Instruct
(``scripts/fit_daemon.py``)."""

_SIGNATURE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size")


def shipped_weights_path(name: str = SHIPPED_WEIGHTS) -> Path:
    """Path of a shipped DAEMON weights file (``hf_decoding_ext/data/search/<name>``)."""
    return data_path("search", name)


def model_signature(model) -> dict[str, Any]:
    """The config fields that identify a model for shipped weights (architecture and sizes)."""
    cfg = model.config
    return {k: getattr(cfg, k, None) for k in _SIGNATURE_KEYS}


def load_weights(source: str | Path | Mapping[str, float], model=None) -> tuple[dict[str, float], dict[str, Any]]:
    """``(mu per metric, record)`` from a weights file, a dict or ``"zero"``.

    Args:
        source: ``"zero"`` (all weights 0: DAEMON reduces to importance resampling towards :math:`p_\\theta`),
            ``"shipped"`` (the SmolLM2 file), a path to a JSON file written by ``scripts/fit_daemon.py`` or a mapping
            ``{metric: mu}``.
        model: with a weights file, the model it must match (its config's architecture and sizes are compared with
            the file's ``model`` record; a mismatch raises ``ValueError``).
    """
    if isinstance(source, Mapping):
        mu = {str(k): float(v) for k, v in source.items()}
        bad = sorted(set(mu) - set(METRICS))
        if bad:
            raise ValueError(f"unknown metric(s) {bad} in weights; valid: {list(METRICS)}")
        return mu, {"source": "dict"}
    if source == "zero":
        return dict.fromkeys(METRICS, 0.0), {"source": "zero"}
    path = shipped_weights_path() if source == "shipped" else Path(source)
    if not path.exists():
        raise ValueError(f"weights file {str(path)!r} does not exist")
    record = json.loads(path.read_text())
    if model is not None and record.get("model"):
        sig = model_signature(model)
        want = {k: record["model"].get(k) for k in _SIGNATURE_KEYS}
        if sig != want:
            raise ValueError(f"the DAEMON weights in {str(path)!r} were fitted for a model with {want}, not {sig}; "
                             "fit weights for this model with scripts/fit_daemon.py or pass weights='zero'")
    mu = {k: float(v) for k, v in record["mu"].items()}
    record["source"] = str(path)
    return mu, record


# --------------------------------------------------------------------------------------------------- metrics
def repetition_rate(tokens: Sequence[int], n: int) -> float:
    """rep-n: the fraction of the ``n``-grams of ``tokens`` that repeat an earlier one, ``1 - unique / total``
    (0 when there is no ``n``-gram)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def diversity(tokens: Sequence[int], ns: Sequence[int] = (2, 3, 4)) -> float:
    """The diversity of SimCTG and the DAEMON paper: :math:`\\prod_n (1 - \\text{rep-}n)`."""
    out = 1.0
    for n in ns:
        out *= 1.0 - repetition_rate(tokens, n)
    return out


def _strip(tokens: Sequence[int], stop_ids: set[int]) -> list[int]:
    tokens = list(tokens)
    while tokens and tokens[-1] in stop_ids:
        tokens.pop()
    return tokens


def _stop_ids(model, extra: Sequence[int] = ()) -> set[int]:
    ids = set(int(i) for i in extra)
    for cfg in (getattr(model, "generation_config", None), model.config):
        if cfg is None:
            continue
        for name in ("eos_token_id", "pad_token_id"):
            v = getattr(cfg, name, None)
            if v is None:
                continue
            ids.update(int(i) for i in (v if isinstance(v, (list, tuple)) else [v]))
    return ids


@torch.no_grad()
def _mean_hidden(model, seqs: list[list[int]], batch_size: int) -> torch.Tensor:
    """Mean-pooled last hidden state of each sequence encoded on its own, ``(n, hidden)`` float64 (zeros for an
    empty sequence)."""
    device = next(model.parameters()).device
    out = torch.zeros(len(seqs), model.config.hidden_size if hasattr(model.config, "hidden_size")
                      else model.config.n_embd, dtype=torch.float64)
    todo = [i for i, s in enumerate(seqs) if s]
    for start in range(0, len(todo), batch_size):
        idx = todo[start:start + batch_size]
        width = max(len(seqs[i]) for i in idx)
        ids = torch.zeros(len(idx), width, dtype=torch.long)
        mask = torch.zeros(len(idx), width, dtype=torch.long)
        for r, i in enumerate(idx):  # right padding: positions 0.. are the tokens
            ids[r, :len(seqs[i])] = torch.tensor(seqs[i])
            mask[r, :len(seqs[i])] = 1
        hidden = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True,
                       use_cache=False).hidden_states[-1].double().cpu()
        m = mask.double()[:, :, None]
        out[idx] = (hidden * m).sum(1) / m.sum(1)
    return out


def _continuation_nll(model, prefixes: list[list[int]], conts: list[list[int]], batch_size: int) -> torch.Tensor:
    """Mean per-token negative log-likelihood of each continuation given its prefix, ``(n,)`` float64 (0 when the
    continuation is empty), from :func:`~hf_decoding_ext.core.scoring.continuation_token_log_probs`."""
    per_token = continuation_token_log_probs(model, prefixes, conts, batch_size)
    return torch.tensor([float(-t.double().mean()) if t.numel() else 0.0 for t in per_token], dtype=torch.float64)


@torch.no_grad()
def daemon_features(model, prefixes: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
                    metrics: Sequence[str] = METRICS, stop_ids: Sequence[int] = (), batch_size: int = 8,
                    logprobs: torch.Tensor | Sequence[float] | None = None) -> torch.Tensor:
    """The DAEMON metric vector :math:`f(x, c)` of each continuation ``x`` of its prefix ``c`` (see :data:`METRICS`).

    Continuations are token ids of ``model``'s tokenizer; trailing eos/pad tokens (the model's generation config's,
    plus ``stop_ids``) are removed before measuring repetition, diversity, coherence and length, so a sampled
    candidate ending in eos and a human continuation are measured alike. Information is the mean negative
    log-likelihood of the continuation's tokens as given (a final eos included: its probability is part of the
    generated text's), from one forward over prefix + continuation, or from ``logprobs`` when the caller has the
    summed log-probabilities already (a candidate pool records them while sampling: no extra forward).

    Args:
        model: the causal LM (its hidden states give the coherence embeddings, its log-probabilities the information).
        prefixes: the prefix (prompt) token ids of each continuation.
        continuations: the continuations' token ids.
        metrics: which metrics (columns), a subset of :data:`METRICS` in any order.
        stop_ids: extra token ids to strip from the end of continuations.
        batch_size: rows per forward.
        logprobs: optional summed log-probabilities :math:`\\log p_\\theta(x \\mid c)` of the continuations as given
            (``(n,)``), used for the information metric instead of a forward.

    Returns:
        ``(n, len(metrics))`` float64 tensor.

    Example:
        >>> from hf_decoding_ext.search.daemon import daemon_features
        >>> # daemon_features(model, [prompt_ids], [candidate_ids])  -> tensor([[rep, div, coh, info, len]])
    """
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise ValueError(f"metrics must be a non-empty subset of {list(METRICS)}, got {list(metrics)!r}")
    if len(prefixes) != len(continuations):
        raise ValueError(f"{len(prefixes)} prefixes for {len(continuations)} continuations")
    stops = _stop_ids(model, stop_ids)
    conts = [_strip(c, stops) for c in continuations]
    prefs = [list(int(t) for t in p) for p in prefixes]
    cols: dict[str, torch.Tensor] = {}
    if "rep" in metrics:
        cols["rep"] = torch.tensor([sum(repetition_rate(c, n) for n in (2, 3, 4)) / 3 for c in conts],
                                   dtype=torch.float64)
    if "div" in metrics:
        cols["div"] = torch.tensor([diversity(c) for c in conts], dtype=torch.float64)
    if "len" in metrics:
        cols["len"] = torch.tensor([float(len(c)) for c in conts], dtype=torch.float64)
    if "info" in metrics:
        given = [list(int(t) for t in c) for c in continuations]
        if logprobs is not None:
            lp = torch.as_tensor(logprobs, dtype=torch.float64).reshape(-1).cpu()
            if lp.shape[0] != len(given):
                raise ValueError(f"logprobs needs {len(given)} values, got {lp.shape[0]}")
            lengths = torch.tensor([max(len(c), 1) for c in given], dtype=torch.float64)
            cols["info"] = torch.where(lengths > 0, -lp / lengths, torch.zeros_like(lp))
            cols["info"][torch.tensor([not c for c in given], dtype=torch.bool)] = 0.0
        else:
            cols["info"] = _continuation_nll(model, prefs, given, batch_size)
    if "coh" in metrics:
        unique = {}
        for p in prefs:
            unique.setdefault(tuple(p), len(unique))
        ph = _mean_hidden(model, [list(p) for p in unique], batch_size)
        ch = _mean_hidden(model, conts, batch_size)
        pref_h = ph[[unique[tuple(p)] for p in prefs]]
        coh = F.cosine_similarity(pref_h, ch, dim=-1)
        coh[torch.tensor([not c for c in conts], dtype=torch.bool)] = 0.0
        cols["coh"] = coh
    return torch.stack([cols[m] for m in metrics], dim=1)


# --------------------------------------------------------------------------------------------------- the dual
@dataclass
class DAEMONFit:
    """The result of :func:`fit_weights`.

    Attributes:
        mu: the fitted weights, one per metric (``(k,)`` float64), in the metrics' units.
        metrics: the metric names.
        grad_norm: Euclidean norm of the dual's gradient at ``mu`` (standardised units, L2 term included).
        constraint_gap: ``E_{p_mu}[f] - E_human[f]`` per metric under the WIS estimate, metric units.
        iterations: Newton iterations run.
        converged: ``grad_norm <= tol``.
        fitted_mean, proposal_mean, model_mean, human_mean: per-metric expectations: under :math:`p_{\\theta,\\mu}`
            (WIS), under the proposal (plain sample mean), under :math:`p_\\theta` (WIS with ``mu = 0``) and of
            human text.
        fixed: metrics left at ``mu = 0`` because their feature does not vary over the samples.
        history: ``(iteration, objective, grad_norm)`` per iteration.
    """

    mu: torch.Tensor
    metrics: tuple[str, ...]
    grad_norm: float
    constraint_gap: torch.Tensor
    iterations: int
    converged: bool
    fitted_mean: torch.Tensor
    proposal_mean: torch.Tensor
    model_mean: torch.Tensor
    human_mean: torch.Tensor
    fixed: tuple[str, ...] = ()
    history: list[tuple[int, float, float]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready record."""
        per = lambda t: {m: float(v) for m, v in zip(self.metrics, t.tolist())}
        return {"mu": per(self.mu), "grad_norm": self.grad_norm, "constraint_gap": per(self.constraint_gap),
                "iterations": self.iterations, "converged": self.converged, "fitted_mean": per(self.fitted_mean),
                "proposal_mean": per(self.proposal_mean), "model_mean": per(self.model_mean),
                "human_mean": per(self.human_mean), "fixed": list(self.fixed),
                "history": [list(h) for h in self.history]}


def _weighted_means(feats: list[torch.Tensor], log_ratios: list[torch.Tensor], mu: torch.Tensor):
    """Per-prompt self-normalised weights under ``mu`` and the prompt-averaged objective pieces."""
    logz, mean, second = 0.0, 0.0, 0.0
    for f, lr in zip(feats, log_ratios):
        a = lr - f @ mu
        lse = torch.logsumexp(a, 0)
        w = torch.exp(a - lse)
        m = w @ f
        logz = logz + lse - math.log(len(lr))
        mean = mean + m
        second = second + (f * w[:, None]).T @ f - torch.outer(m, m)
    c = len(feats)
    return logz / c, mean / c, second / c


def fit_weights(features: Sequence[torch.Tensor], log_ratios: Sequence[torch.Tensor] | None,
                human_mean: torch.Tensor | Sequence[float], metrics: Sequence[str] = METRICS, *, l2: float = 1e-4,
                max_iter: int = 200, tol: float = 1e-8) -> DAEMONFit:
    """Fit DAEMON's weights :math:`\\mu` by weighted importance sampling on the convex dual.

    With samples :math:`x_{c,i} \\sim q(\\cdot \\mid c)` for prompts :math:`c` and log-ratios
    :math:`\\ell_{c,i} = \\log p_\\theta(x_{c,i} \\mid c) - \\log q(x_{c,i} \\mid c)`, the WIS estimate of the dual is

    .. math::
        L(\\mu) = \\frac{1}{|C|} \\sum_c \\log \\frac{1}{N_c} \\sum_i e^{\\ell_{c,i} - \\mu^\\top f_{c,i}}
        + \\mu^\\top \\bar f_{\\text{human}} + \\frac{\\lambda}{2} \\lVert \\tilde\\mu \\rVert^2,

    whose gradient is :math:`\\bar f_{\\text{human}} - \\frac{1}{|C|}\\sum_c \\sum_i \\tilde w_{c,i} f_{c,i}`
    (self-normalised weights :math:`\\tilde w \\propto e^{\\ell - \\mu^\\top f}`): at the optimum the WIS estimate of
    :math:`\\mathbb{E}_{p_{\\theta,\\mu}}[f]` equals the human mean. The objective is convex; it is minimised by
    damped Newton steps with a backtracking line search, on features standardised by their pooled standard deviation
    (``l2`` is the ridge on the standardised weights :math:`\\tilde\\mu`, which keeps the optimum finite when a human
    mean lies outside the samples' convex hull). Metrics whose feature is constant over all samples stay at 0.

    Args:
        features: per prompt, the ``(N_c, k)`` features of its samples.
        log_ratios: per prompt, the ``(N_c,)`` log-ratios :math:`\\ell`; ``None``: samples from :math:`p_\\theta`
            itself (all 0).
        human_mean: ``(k,)`` mean features of human text.
        metrics: the metric names of the ``k`` columns.
        l2: ridge coefficient (standardised units).
        max_iter: Newton iteration cap.
        tol: convergence threshold on the gradient norm (standardised units).

    Returns:
        a :class:`DAEMONFit`.

    Example:
        >>> import torch
        >>> from hf_decoding_ext.search.daemon import fit_weights
        >>> g = torch.Generator().manual_seed(0)
        >>> feats = [torch.randn(64, 2, generator=g, dtype=torch.float64) for _ in range(4)]
        >>> fit = fit_weights(feats, None, torch.tensor([0.3, -0.2]), metrics=("a", "b"), l2=0.0)
        >>> fit.converged, bool(fit.constraint_gap.abs().max() < 1e-6)
        (True, True)
    """
    feats = [torch.as_tensor(f, dtype=torch.float64).cpu() for f in features]
    if not feats or any(f.dim() != 2 or f.shape[0] == 0 for f in feats):
        raise ValueError("features must be a non-empty list of non-empty (N_c, k) tensors")
    k = feats[0].shape[1]
    if any(f.shape[1] != k for f in feats) or len(metrics) != k:
        raise ValueError(f"every feature tensor needs {len(metrics)} columns (one per metric {list(metrics)})")
    if log_ratios is None:
        ratios = [torch.zeros(f.shape[0], dtype=torch.float64) for f in feats]
    else:
        ratios = [torch.as_tensor(r, dtype=torch.float64).cpu().reshape(-1) for r in log_ratios]
        if len(ratios) != len(feats) or any(r.shape[0] != f.shape[0] for r, f in zip(ratios, feats)):
            raise ValueError("log_ratios must give one value per sample of every prompt")
    human = torch.as_tensor(human_mean, dtype=torch.float64).reshape(-1)
    if human.shape[0] != k:
        raise ValueError(f"human_mean needs {k} values, got {human.shape[0]}")
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    pooled = torch.cat(feats)
    scale = pooled.std(0, unbiased=False)
    free = scale > 1e-9
    fixed = tuple(m for m, ok in zip(metrics, free.tolist()) if not ok)
    idx = free.nonzero().flatten()
    s = scale[idx]
    g_feats = [f[:, idx] / s for f in feats]
    h = human[idx] / s
    mu = torch.zeros(len(idx), dtype=torch.float64)

    def objective(m):
        logz, mean, second = _weighted_means(g_feats, ratios, m)
        val = float(logz + m @ h + 0.5 * l2 * (m @ m))
        grad = h - mean + l2 * m
        hess = second + l2 * torch.eye(len(m), dtype=torch.float64)
        return val, grad, hess

    history = []
    val, grad, hess = objective(mu)
    it = 0
    for it in range(1, max_iter + 1):
        gnorm = float(grad.norm())
        history.append((it - 1, val, gnorm))
        if gnorm <= tol:
            it -= 1
            break
        eye = torch.eye(len(mu), dtype=torch.float64)
        step = torch.linalg.solve(hess + 1e-10 * eye, grad)
        t = 1.0
        while True:  # backtracking (Armijo) on the convex objective
            cand = mu - t * step
            new_val, new_grad, new_hess = objective(cand)
            if new_val <= val - 1e-4 * t * float(grad @ step) or t < 1e-10:
                break
            t *= 0.5
        mu, val, grad, hess = cand, new_val, new_grad, new_hess
    gnorm = float(grad.norm())
    if not history or history[-1][0] != it:
        history.append((it, val, gnorm))
    mu_full = torch.zeros(k, dtype=torch.float64)
    mu_full[idx] = mu / s
    _, fitted, _ = _weighted_means(feats, ratios, mu_full)
    _, model_mean, _ = _weighted_means(feats, ratios, torch.zeros(k, dtype=torch.float64))
    proposal_mean = torch.stack([f.mean(0) for f in feats]).mean(0)
    return DAEMONFit(mu=mu_full, metrics=tuple(metrics), grad_norm=gnorm, constraint_gap=fitted - human,
                     iterations=it, converged=gnorm <= tol, fitted_mean=fitted, proposal_mean=proposal_mean,
                     model_mean=model_mean, human_mean=human, fixed=fixed, history=history)


def sir_expectations(features: torch.Tensor, log_ratios: torch.Tensor, mu: torch.Tensor) -> dict[str, torch.Tensor]:
    """Expected metrics of one pool (``(M, k)`` features, ``(M,)`` log-ratios): ``"proposal"`` (the plain mean: a
    draw from the proposal), ``"sir"`` (the resampling probabilities under ``mu`` times the features: the exact
    expectation of DAEMON's output given the pool) and ``"model"`` (the same with ``mu = 0``: SIR towards
    :math:`p_\\theta`)."""
    f = torch.as_tensor(features, dtype=torch.float64)
    lr = torch.as_tensor(log_ratios, dtype=torch.float64)
    mu = torch.as_tensor(mu, dtype=torch.float64)
    return {"proposal": f.mean(0), "sir": torch.softmax(lr - f @ mu, 0) @ f, "model": torch.softmax(lr, 0) @ f}


# --------------------------------------------------------------------------------------------------- human text
HUMAN_TEXT = "human_text.jsonl"
"""Committed public-domain human text (``hf_decoding_ext/data/search/``): prefix + continuation per passage,
attributed (author, work, year), with a ``split`` (``"dev"``: fitting, ``"test"``: evaluation)."""


def human_passages(split: str | None = None) -> list[dict[str, Any]]:
    """The committed human-text passages, optionally one split (``"dev"`` or ``"test"``)."""
    from hf_decoding_ext.core.resources import read_jsonl

    if split not in (None, "dev", "test"):
        raise ValueError(f"split must be None, 'dev' or 'test', got {split!r}")
    rows = read_jsonl("search", HUMAN_TEXT)
    return [r for r in rows if split is None or r["split"] == split]


def encode_passage(tokenizer, passage: Mapping[str, Any], max_tokens: int) -> tuple[list[int], list[int]]:
    """``(prefix ids, continuation ids)`` of a passage for raw-text continuation (no chat template); the
    continuation (after a space) is cut to ``max_tokens`` tokens, the budget of the decoded candidates."""
    prefix = tokenizer(passage["prefix"]).input_ids
    cont = tokenizer(" " + passage["continuation"], add_special_tokens=False).input_ids[:max_tokens]
    return list(prefix), list(cont)


class _PoolRecorder(RerankingLoop):
    """Draws the pools (as :class:`DAEMONDecoding` does) and keeps them; appends the first candidate."""

    def __init__(self, n, seed):
        super().__init__(n=n, seed=seed)
        self.recorded: list[CandidatePool] = []

    def select(self, pool, state, row):
        self.recorded.append(pool)
        return Selection(0, pool.logprobs)


@torch.no_grad()
def draw_pools(model, tokenizer, prefixes: Sequence[Sequence[int]], n: int, *, seed: int, max_new_tokens: int,
               batch_size: int = 8, **proposal) -> list[CandidatePool]:
    """``n`` proposal samples per prefix, one :class:`~hf_decoding_ext.core.candidates.CandidatePool` per prefix
    (tokens, raw-model and proposal log-probabilities), drawn as :class:`DAEMONDecoding` draws them (raw-text
    prompts, left-padded batches of ``batch_size`` prefixes). ``proposal`` holds the ``generate()`` sampling
    settings (``top_p``, ``top_k``, ``temperature``; ``top_k`` defaults to 0, i.e. no top-k truncation)."""
    proposal = {"top_k": 0, **proposal}
    out: list[CandidatePool] = []
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(prefixes), batch_size):
        chunk = [list(p) for p in prefixes[start:start + batch_size]]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for r, p in enumerate(chunk):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        loop = _PoolRecorder(n, seed + start)
        model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
                       max_new_tokens=max_new_tokens, custom_generate=loop, pad_token_id=pad, **proposal)
        out.extend(loop.recorded)
    return out


# --------------------------------------------------------------------------------------------------- the loop
FeatureFn = Callable[[Any, list[torch.Tensor], list[list[int]]], torch.Tensor]
"""``(model, prompts, candidates) -> (n, k)`` features: a replacement for :func:`daemon_features` (scripted tests,
other metrics)."""


class DAEMONDecoding(RerankingLoop):
    r"""DAEMON decoding, from "Language Model Decoding as Direct Metrics Optimization" (Ji, Ke, Wang, Huang; ICLR 2024,
    https://arxiv.org/abs/2310.01041): conditional sampling-importance-resampling from the I-projection
    :math:`p_{\theta,\mu}(x \mid c) \propto p_\theta(x \mid c) \exp(-\mu^\top f(x, c))` of the model onto the
    distributions whose expected metrics match human text's.

    Per prompt row, ``n`` (the paper's ``M``) complete candidates are drawn from the proposal :math:`q`, the caller's
    ``generate()`` sampling settings (temperature, ``top_p``, ``top_k`` ... : the pool records each candidate's
    log-probability under the raw model and under that processed distribution,
    :func:`~hf_decoding_ext.core.candidates.sample_pool`), and one is resampled with probability

    .. math::
        w_i \propto \frac{p_\theta(x_i \mid c)}{q(x_i \mid c)} \exp(-\mu^\top f(x_i, c))

    from a generator seeded with ``seed`` (so the whole output is reproducible). With ``mu = 0`` and an untruncated
    proposal (``top_k=0``, ``top_p=1``, ``temperature=1``) every weight is equal and the output is distributed exactly
    as ancestral sampling; with a truncated proposal and ``mu = 0``, SIR targets :math:`p_\theta` restricted to the
    proposal's support. ``return_dict_in_generate`` outputs carry ``selection_scores`` (the log-weights
    :math:`\log w_i` of each row's pool) and ``candidates``.

    The metrics (:data:`METRICS`, :func:`daemon_features`) are repetition (mean rep-2..4), diversity, coherence,
    information (per-token NLL under the model) and length; the weights ``mu`` are fitted on committed public-domain
    human text (``hf_decoding_ext/data/search/human_text.jsonl``, dev split) with :func:`fit_weights` by
    ``scripts/fit_daemon.py``. For SmolLM2-135M-Instruct the fitted weights are shipped
    (``data/search/daemon_weights_smollm2.json``) and used by default (``weights="auto"``); for any other model
    ``"auto"`` raises a ``ValueError`` asking for weights (a file fitted with the script, a dict or ``"zero"``), rather
    than silently decoding with weights fitted for another model.

    Deviations from the paper and offline stand-ins:

    * coherence uses the decoding model's own mean-pooled last hidden states (prefix and continuation encoded
      separately) instead of SimCSE sentence embeddings (not available offline); information is the NLL under the
      decoding model itself;
    * the human reference is 47 committed public-domain literary paragraphs (prefix + continuation, 24 dev / 23
      test), not the paper's Wikipedia/Wikinews data; human continuations are cut to the fitting budget (the shipped
      weights: 32 tokens, 8 samples per dev prompt, nucleus top_p 0.95, raw-text prompts without chat template, all
      recorded in the weights file), so the weights are fitted for that budget; the proposal only affects the
      estimate (mu defines :math:`p_{\theta,\mu}` whatever the proposal), so other sampling settings may be used;
    * information of a candidate counts the probability of its final eos, when it has one (the pool's recorded
      log-probability, no extra forward);
    * the dual is minimised by damped Newton steps on standardised features with a small ridge (``l2=1e-4``), not
      necessarily the paper's optimiser; the exact metric list, ``M`` and proposal of the paper could not be confirmed
      here (the paper names repetition, coherence, diversity and information; length is added as in the issue);
    * the candidates are complete continuations up to ``max_new_tokens`` / eos (sequence-level SIR); a pool is
      drawn once per prompt.

    Args:
        n: candidates per prompt (``M``).
        weights: ``"auto"`` (the shipped SmolLM2 weights when the model is SmolLM2-135M-Instruct, else a
            ``ValueError``), ``"shipped"``, ``"zero"``, a path to a weights JSON or a dict ``{metric: mu}`` (missing
            metrics are 0).
        metrics: the metrics used (default: all of :data:`METRICS`; with ``feature_fn`` and a dict of weights, its
            keys).
        feature_fn: optional replacement for :func:`daemon_features`, ``(model, prompts, candidates) -> (n, k)``
            in the order of ``metrics``.
        seed: seed of the candidate draws and of the resampling (``None``: torch's global generator).
        batch_size: rows per forward when computing the metrics.

    Example:
        >>> from hf_decoding_ext.core.models import load_model
        >>> from hf_decoding_ext.search.daemon import DAEMONDecoding
        >>> model, tokenizer = load_model()  # doctest: +SKIP
        >>> inputs = tokenizer("It was a dark and stormy night; the rain fell in torrents", return_tensors="pt")  # doctest: +SKIP
        >>> out = model.generate(**inputs, do_sample=True, top_k=0, top_p=0.95, max_new_tokens=32,
        ...                      custom_generate=DAEMONDecoding(n=8, seed=0))  # doctest: +SKIP
    """

    def __init__(self, n: int = 8, weights: str | Path | Mapping[str, float] = "auto",
                 metrics: Sequence[str] | None = None, feature_fn: FeatureFn | None = None,
                 seed: int | None = None, batch_size: int = 8):
        super().__init__(n=n, seed=seed)
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if feature_fn is not None and not callable(feature_fn):
            raise ValueError(f"feature_fn must be callable, got {feature_fn!r}")
        if feature_fn is None and metrics is not None:
            bad = [m for m in metrics if m not in METRICS]
            if bad or not metrics:
                raise ValueError(f"metrics must be a non-empty subset of {list(METRICS)}, got {metrics!r}")
        if isinstance(weights, Mapping):
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                       for v in weights.values()):
                raise ValueError(f"weights must map metric names to finite numbers, got {dict(weights)!r}")
            if feature_fn is None:
                load_weights(weights)  # validates the metric names
        elif not isinstance(weights, (str, Path)):
            raise ValueError(f"weights must be 'auto', 'shipped', 'zero', a path or a dict, got {weights!r}")
        elif isinstance(weights, str) and weights not in ("auto", "shipped", "zero") and not Path(weights).exists():
            raise ValueError(f"weights must be 'auto', 'shipped', 'zero', a weights JSON path or a dict; "
                             f"{weights!r} is none of these")
        if feature_fn is not None and metrics is None and not isinstance(weights, Mapping):
            raise ValueError("with feature_fn, pass metrics (the names of its columns) or weights as a dict")
        self.weights = weights
        self.metrics = tuple(metrics) if metrics is not None else None
        self.feature_fn = feature_fn
        self.batch_size = batch_size
        self._resolved: tuple[int, tuple[str, ...], torch.Tensor, dict] | None = None
        self._resample_generator: torch.Generator | None = None

    # ------------------------------------------------------------------------------------------ weights
    def resolve_weights(self, model) -> tuple[tuple[str, ...], torch.Tensor, dict]:
        """``(metrics, mu, record)`` for ``model`` (cached per model)."""
        if self._resolved is not None and self._resolved[0] == id(model):
            return self._resolved[1:]
        source = self.weights
        if isinstance(source, Mapping) and self.feature_fn is not None:
            mu_map, record = {str(k): float(v) for k, v in source.items()}, {"source": "dict"}
        elif source == "auto":
            sig = model_signature(model)
            shipped = json.loads(shipped_weights_path().read_text()) if shipped_weights_path().exists() else {}
            want = {k: shipped.get("model", {}).get(k) for k in _SIGNATURE_KEYS}
            if not shipped or sig != want:
                raise ValueError(
                    f"DAEMONDecoding(weights='auto') has fitted weights only for SmolLM2-135M-Instruct ({want}); this "
                    f"model is {sig}. Fit weights for it with scripts/fit_daemon.py and pass weights=<file>, or pass "
                    "weights='zero' (plain importance resampling towards the model) or a dict {metric: mu}")
            mu_map, record = load_weights("shipped", model)
        else:
            mu_map, record = load_weights(source, model)
        if self.metrics is not None:
            metrics = self.metrics
        elif self.feature_fn is not None:
            metrics = tuple(mu_map)
        else:
            metrics = tuple(METRICS)
        mu = torch.tensor([mu_map.get(m, 0.0) for m in metrics], dtype=torch.float64)
        self._resolved = (id(model), metrics, mu, record)
        return metrics, mu, record

    # ------------------------------------------------------------------------------------------ selection
    def features(self, state: GenerationState, pool: CandidatePool, metrics: Sequence[str]) -> torch.Tensor:
        """The ``(n, k)`` metric features of the pool's candidates."""
        prompts = [pool.prompt] * len(pool)
        if self.feature_fn is not None:
            f = torch.as_tensor(self.feature_fn(state.model, prompts, pool.tokens), dtype=torch.float64)
            if f.shape != (len(pool), len(metrics)):
                raise ValueError(f"feature_fn returned shape {tuple(f.shape)}, expected ({len(pool)}, {len(metrics)})")
            return f.cpu()
        return daemon_features(state.model, [p.tolist() for p in prompts], pool.tokens, metrics,
                               batch_size=self.batch_size, logprobs=pool.logprobs)

    def log_weights(self, pool: CandidatePool, feats: torch.Tensor | None, mu: torch.Tensor) -> torch.Tensor:
        """Unnormalised SIR log-weights :math:`\\log p_\\theta(x_i) - \\log q(x_i) - \\mu^\\top f(x_i)`, ``(n,)``."""
        logw = pool.logprobs.double().cpu() - pool.proposal_logprobs.double().cpu()
        if feats is not None:
            logw = logw - feats @ mu
        return logw

    def select(self, pool: CandidatePool, state: GenerationState, row: int) -> Selection:
        metrics, mu, _ = self.resolve_weights(state.model)
        feats = self.features(state, pool, metrics) if bool((mu != 0).any()) else None
        logw = self.log_weights(pool, feats, mu)
        probs = torch.softmax(logw, 0)
        index = int(torch.multinomial(probs.float(), 1, generator=self._resample_generator).item())
        extra = {"weights": probs, "log_ratio": (pool.logprobs.double() - pool.proposal_logprobs.double()).cpu()}
        if feats is not None:
            extra["features"] = feats
        return Selection(index, logw, extra)

    def run(self, state: GenerationState):
        self._resample_generator = None
        if self.seed is not None:  # a separate stream from the candidate draws (those use the state's device)
            self._resample_generator = torch.Generator().manual_seed(self.seed + 1)
        self.resolve_weights(state.model)  # fail before sampling when no weights fit the model
        return super().run(state)
