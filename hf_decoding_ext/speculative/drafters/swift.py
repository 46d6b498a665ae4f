"""SWIFT: on-the-fly self-speculative decoding with an optimised set of skipped attention and MLP sub-layers."""

from __future__ import annotations

import math

import numpy as np
import torch

from hf_decoding_ext.core.anatomy import (
    crop_layers,
    num_layers,
    skip_sublayers,
    sublayer_parameters,
    _check_sublayer_model,
)
from hf_decoding_ext.core.tree import DraftTree, additive_mask
from hf_decoding_ext.speculative.drafters.base import Draft, Drafter


# ---------------------------------------------------------------------------------------------- Gaussian process
class _GaussianProcessUCB:
    """A small Gaussian-process regressor with a Matern-5/2 kernel and the UCB acquisition, standing in for the
    ``bayes_opt`` package the official code uses (``BayesianOptimization`` with ``set_gp_params(alpha=1e-2)`` and
    ``UtilityFunction(kind="ucb", kappa=2.5)``): targets normalised to zero mean and unit variance, the isotropic
    length scale chosen by the log marginal likelihood (on a grid, where scikit-learn runs L-BFGS with restarts),
    and the acquisition maximised over ``[0, 1]^d`` by random warm-up points then projected gradient ascent from the
    best of them (where ``bayes_opt`` runs L-BFGS-B)."""

    LENGTH_SCALES = tuple(float(x) for x in np.geomspace(0.05, 50.0, 25))

    def __init__(self, alpha: float = 1e-2, kappa: float = 2.5, n_warmup: int = 4096, n_refine: int = 8,
                 refine_steps: int = 30):
        self.alpha, self.kappa = alpha, kappa
        self.n_warmup, self.n_refine, self.refine_steps = n_warmup, n_refine, refine_steps
        self.x: list[np.ndarray] = []
        self.y: list[float] = []

    def register(self, point: np.ndarray, target: float) -> None:
        self.x.append(np.asarray(point, dtype=np.float64))
        self.y.append(float(target))

    @staticmethod
    def _kernel(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
        d = torch.cdist(a, b) * (math.sqrt(5.0) / scale)
        return (1.0 + d + d * d / 3.0) * torch.exp(-d)

    def _fit(self):
        x = torch.tensor(np.stack(self.x), dtype=torch.float64)
        y = torch.tensor(self.y, dtype=torch.float64)
        mean, std = y.mean(), y.std(unbiased=False)
        std = std if float(std) > 0 else torch.tensor(1.0, dtype=torch.float64)
        yn = (y - mean) / std
        best = None
        eye = torch.eye(len(y), dtype=torch.float64)
        for scale in self.LENGTH_SCALES:
            k = self._kernel(x, x, scale) + self.alpha * eye
            chol, info = torch.linalg.cholesky_ex(k)
            if int(info):
                continue
            w = torch.cholesky_solve(yn[:, None], chol)[:, 0]
            lml = -0.5 * float(yn @ w) - float(torch.log(torch.diagonal(chol)).sum())
            if best is None or lml > best[0]:
                best = (lml, scale, chol, w)
        _, scale, chol, w = best
        return x, mean, std, scale, chol, w

    def suggest(self, dim: int, rng: np.random.Generator) -> np.ndarray:
        """The point of ``[0, 1]^dim`` maximising ``mean + kappa * std`` of the posterior (a random point when
        nothing is registered yet, as ``bayes_opt`` does)."""
        if not self.x:
            return rng.random(dim)
        with torch.inference_mode(False), torch.enable_grad():  # the refinement differentiates the acquisition
            return self._suggest(dim, rng)

    def _suggest(self, dim: int, rng: np.random.Generator) -> np.ndarray:
        x, mean, std, scale, chol, w = self._fit()

        def ucb(points: torch.Tensor) -> torch.Tensor:
            ks = self._kernel(points, x, scale)
            mu = ks @ w
            v = torch.cholesky_solve(ks.T, chol)
            var = (1.0 - (ks * v.T).sum(-1)).clamp(min=1e-12)
            return (mu + self.kappa * var.sqrt()) * std + mean

        with torch.no_grad():
            warm = torch.tensor(rng.random((self.n_warmup, dim)), dtype=torch.float64)
            values = torch.cat([ucb(chunk) for chunk in warm.split(1024)])
        order = values.argsort(descending=True)[: self.n_refine]
        points = warm[order].clone().requires_grad_(True)
        lr = 0.05
        for _ in range(self.refine_steps):
            (grad,) = torch.autograd.grad(ucb(points).sum(), points)
            with torch.no_grad():
                grad = torch.nan_to_num(grad)
                points += lr * grad / (grad.norm(dim=-1, keepdim=True) + 1e-12)
                points.clamp_(0.0, 1.0)
        with torch.no_grad():
            candidates = torch.cat([warm[order[:1]], points.detach()])
            best = ucb(candidates).argmax()
        return candidates[best].numpy()


# ---------------------------------------------------------------------------------------------- drafter
def confidence_fanout(top1_probs, sampling: bool = False) -> list[int]:
    """Candidates per draft depth from the draft's top-1 probability there (the official ``get_choices_list``):
    ``> 0.95``, ``> 0.8``, ``> 0.5``, else -> 3, 5, 8, 10 candidates (greedy) or 1, 3, 5, 10 (sampling).

    Example:
        >>> confidence_fanout([0.99, 0.9, 0.6, 0.3])
        [3, 5, 8, 10]
    """
    sizes = (1, 3, 5, 10) if sampling else (3, 5, 8, 10)
    out = []
    for p in top1_probs:
        out.append(sizes[0] if p > 0.95 else sizes[1] if p > 0.8 else sizes[2] if p > 0.5 else sizes[3])
    return out


def swift_tree(topk_tokens, fanout) -> DraftTree:
    """SWIFT's draft tree: the top-1 chain, and at every depth ``d`` the top ``fanout[d]`` draft candidates as the
    children of the chain node at depth ``d - 1`` (the root for ``d = 0``); the chain node is the first of them.

    Example:
        >>> import torch
        >>> t = swift_tree([torch.tensor([5, 6, 7]), torch.tensor([8, 9, 4])], [2, 3])
        >>> t.tokens.tolist(), t.parents.tolist()
        ([5, 6, 8, 9, 4], [-1, -1, 0, 0, 0])
    """
    tokens, parents = [], []
    chain = -1
    for top, k in zip(topk_tokens, fanout):
        first = len(tokens)
        for j in range(int(k)):
            tokens.append(int(top[j]))
            parents.append(chain)
        chain = first
    return DraftTree(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long))


def _positive_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


class SWIFTDrafter(Drafter):
    """SWIFT (Xia, Li, Zhang, Du, Li, "SWIFT: On-the-Fly Self-Speculative Decoding for LLM Inference
    Acceleration", ICLR 2025, arXiv 2410.06916; official code hemingkx/SWIFT, ``model/swift/utils.py``,
    ``evaluation_llama/inference_swift.py``, ``eval_llama.sh``).

    The draft is the target model itself with some attention and MLP sub-layers skipped
    (:func:`~hf_decoding_ext.core.anatomy.skip_sublayers`, run on the target's own KV cache: the skipped attention
    sub-layers neither read nor write it, the engine crops the drafted positions back). Candidates are the two
    sub-layers of layers ``1 .. L-2`` (the first and last layers always run); the initial set skips both sub-layers
    of every other layer (``1, 3, 5, ...``). The set is optimised *on the fly*, during decoding, with no data but the
    text being generated:

    * once more than ``context_window + 1`` tokens have been generated, every ``opt_interval`` verification steps one
      optimisation iteration proposes a set of ``int(skip_ratio * 2 (L - 2))`` skipped sub-layers: uniformly at
      random, or, every ``bayes_interval``-th iteration, by Gaussian-process Bayesian optimisation (UCB, ``kappa``)
      over the ``2 (L - 2)`` continuous skip scores of every probed set (the top scores are skipped);
    * the proposal is scored by its *matchness*: in one parallel draft forward over the first ``context_window + 1``
      generated tokens (attending to the prompt's KV computed by the full model), the fraction of those tokens the
      draft predicts by argmax from their prefix; it replaces the current set only if it scores higher;
    * optimisation stops for good when a set scores above ``max_score``, after ``max_tolerance_iter`` iterations
      without improvement or after ``max_opt_iter`` iterations. The set, its score and the optimiser's state carry
      over to later ``generate()`` calls (the paper's task stream) until :meth:`reset`.

    Drafting: from the last committed token, argmax tokens up to ``max_draft_len``, stopping after the first whose
    draft probability is below ``stop_threshold`` (confidence-aware inference). The draft tree keeps the top-1 chain
    and, at every depth, the draft's top candidates as alternatives whose number depends on the top-1 probability
    there (:func:`confidence_fanout`); the engine verifies the tree in one target forward. Lossless: greedy output
    is token-identical to greedy ``generate()``; with ``do_sample=True`` the deterministic tree is verified by
    speculative sampling (one-hot draft), which keeps the target distribution.

    Args:
        skip_ratio: fraction of the ``2 (L - 2)`` candidate sub-layers a searched set skips (official 0.45).
        optimization: run the on-the-fly optimisation (official script: on); off: the current set is kept.
        bayes: use the Bayesian-optimisation proposal every ``bayes_interval`` iterations (official script: on).
        opt_interval: verification steps between optimisation iterations (official 1).
        bayes_interval: every ``bayes_interval``-th iteration is a Bayesian one (official 25).
        max_opt_iter: optimisation iterations at most (official 1000).
        max_tolerance_iter: iterations without improvement before stopping (official 300).
        max_score: stop optimising once a set's matchness exceeds it (official script 0.90; CLI default 0.95).
        context_window: generated tokens whose continuation the matchness scores (official 32).
        max_draft_len: draft tokens per step at most (official ``max_step_draft`` 25).
        stop_threshold: stop drafting after a token whose draft top-1 probability is below it (official 0.8).
        tree: draft the confidence-binned tree (official); ``False``: the top-1 chain only.
        top_k: draft candidates kept per depth (official ``TOPK`` 10; the fan-out never exceeds it).
        kappa: UCB exploration weight (official 2.5). gp_alpha: GP noise (official ``alpha=1e-2``).
        rescore_incumbent: score the current set on the window before the first proposal of every generation
            (see the deviations; ``False`` is the official behaviour).
        initial: ``None`` for the every-other-layer set, or ``(attention, mlp)`` skipped layer indices.
        seed: seed of the random search and of the acquisition's random points (official ``--seed 2024``).

    Statistics (``self.stats``, accumulated until :meth:`reset`): ``steps``, ``accepted`` (draft tokens accepted),
    ``draft_forwards``, ``draft_cost`` (draft forwards weighted by the fraction of the model's parameters they
    touch), ``opt_forwards`` / ``opt_tokens`` / ``opt_cost`` (the optimisation's extra parallel forwards, the tokens
    they process and their cost in full-forward units per token), ``opt_iter``, ``bayes_iter``. The optimisation
    trace is in ``self.history``.

    Deviations from the official code: (1) the Gaussian process and its UCB maximisation are this library's
    (``_GaussianProcessUCB``: Matern-5/2, length scale on a grid by marginal likelihood, acquisition by 4,096
    random points then projected gradient ascent) instead of the ``bayes_opt`` package (scikit-learn GP, L-BFGS-B);
    (2) ``rescore_incumbent=True`` (default) scores the current set on the window before the first proposal of each
    generation and compares proposals with that score; the official code starts the score at 0 (so its first
    proposal always replaces the initial set unscored) and carries the best score over from earlier prompts'
    windows; the extra forward is counted in ``opt_forwards``; (3) the first verification step drafts nothing (the
    engine verifies the prompt, as the official code's prefill does, and the draft starts from the full model's KV);
    (4) with ``do_sample=True`` the draft tree is deterministic (the draft's top candidates, verified as one-hot
    proposals) where the official code samples the draft chain from the processed draft distribution; the
    sampling fan-out (1, 3, 5, 10) is used; (5) the draft length is also capped by ``max_new_tokens``, as the
    official ``new_token_num + step + 2 >= max_new_tokens`` test does, at the remaining budget minus one; (6) the
    random search draws from a NumPy generator seeded with ``seed`` (the official code seeds NumPy's global state);
    (7) the draft appends its KV to the target's own cache (kept attention layers only) and crops it back, where the
    official code drafts on a copy of the cache (the same values).

    On SmolLM2-135M (30 layers) a draft forward touches about 0.63 (initial set) to 0.68 (a searched 25-sub-layer
    set) of a full forward's parameters, since the tied embedding/LM head (21%) is always paid: measured
    acceptance and the break-even are in the registry entry (``results/swift_acceptance.json``); the paper's
    wall-clock speed-up does not transfer to this model size.

    Example:
        >>> from hf_decoding_ext.speculative import SpeculativeDecoding
        >>> from hf_decoding_ext.speculative.drafters.swift import SWIFTDrafter
        >>> drafter = SWIFTDrafter()
        >>> out = model.generate(**inputs, max_new_tokens=128, do_sample=False,
        ...                      custom_generate=SpeculativeDecoding(drafter))  # doctest: +SKIP
        >>> drafter.skip_sets(), drafter.stats["opt_iter"]  # doctest: +SKIP
    """

    needs = frozenset({"target_cache"})

    def __init__(self, skip_ratio: float = 0.45, optimization: bool = True, bayes: bool = True, opt_interval: int = 1,
                 bayes_interval: int = 25, max_opt_iter: int = 1000, max_tolerance_iter: int = 300,
                 max_score: float = 0.90, context_window: int = 32, max_draft_len: int = 25,
                 stop_threshold: float = 0.8, tree: bool = True, top_k: int = 10, kappa: float = 2.5,
                 gp_alpha: float = 1e-2, rescore_incumbent: bool = True, initial=None, seed: int = 2024):
        if isinstance(skip_ratio, bool) or not isinstance(skip_ratio, (int, float)) or not 0 < skip_ratio < 1:
            raise ValueError(f"skip_ratio must be a number in (0, 1), got {skip_ratio!r}")
        for name, value in (("optimization", optimization), ("bayes", bayes), ("tree", tree),
                            ("rescore_incumbent", rescore_incumbent)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be a bool, got {value!r}")
        for name, value in (("opt_interval", opt_interval), ("bayes_interval", bayes_interval),
                            ("max_opt_iter", max_opt_iter), ("context_window", context_window),
                            ("max_draft_len", max_draft_len), ("top_k", top_k)):
            _positive_int(name, value)
        _positive_int("max_tolerance_iter", max_tolerance_iter, 0)
        if tree and top_k < 10:
            raise ValueError(f"top_k must be >= 10 with tree=True (the fan-out reaches 10), got {top_k!r}")
        for name, value, lo, hi in (("max_score", max_score, 0.0, 1.0), ("stop_threshold", stop_threshold, 0.0, 1.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
                raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {value!r}")
        for name, value in (("kappa", kappa), ("gp_alpha", gp_alpha)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")
        if initial is not None:
            if not (isinstance(initial, (tuple, list)) and len(initial) == 2):
                raise ValueError(f"initial must be None or (attention, mlp) skipped layer indices, got {initial!r}")
            initial = (tuple(initial[0]), tuple(initial[1]))
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.skip_ratio, self.optimization, self.bayes = float(skip_ratio), optimization, bayes
        self.opt_interval, self.bayes_interval = opt_interval, bayes_interval
        self.max_opt_iter, self.max_tolerance_iter, self.max_score = max_opt_iter, max_tolerance_iter, float(max_score)
        self.context_window, self.max_draft_len, self.stop_threshold = context_window, max_draft_len, stop_threshold
        self.tree, self.top_k, self.kappa, self.gp_alpha = tree, top_k, float(kappa), float(gp_alpha)
        self.rescore_incumbent, self.initial, self.seed = rescore_incumbent, initial, seed
        self.reset()

    # ------------------------------------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget the optimised set, its score, the optimiser's state and the statistics."""
        self._model_id = None
        self.attention: tuple[int, ...] = ()
        self.mlp: tuple[int, ...] = ()
        self.score = 0.0
        self.optimizing = self.optimization
        self.tolerance_iter = 0
        self.history: list[dict] = []
        self._gp = _GaussianProcessUCB(alpha=self.gp_alpha, kappa=self.kappa)
        self._rng = np.random.default_rng(self.seed)
        self._views: dict = {}
        self.stats = {"steps": 0, "accepted": 0, "draft_forwards": 0, "draft_cost": 0.0, "opt_forwards": 0,
                      "opt_tokens": 0, "opt_cost": 0.0, "opt_iter": 0, "bayes_iter": 0}

    def skip_sets(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The current ``(attention, mlp)`` skipped layer indices."""
        return self.attention, self.mlp

    def _setup(self, model) -> None:
        _check_sublayer_model(model)
        total = num_layers(model)
        self._model_id = id(model)
        self.total = total
        self.candidates = 2 * max(total - 2, 0)
        self.num_skip = int(self.candidates * self.skip_ratio)
        if total < 3:  # no layer between the first and the last: nothing to skip, nothing to search
            import warnings

            warnings.warn(f"SWIFT skips sub-layers of layers 1 .. L-2; this {total}-layer "
                          f"{type(model).__name__} has none, so the draft is the full model (lossless, no search)",
                          UserWarning, stacklevel=2)
            self.attention, self.mlp, self.optimizing = (), (), False
            self.sizes = sublayer_parameters(model)
            self._views = {}
            return
        if self.num_skip < 1:
            raise ValueError(f"skip_ratio={self.skip_ratio} skips no sub-layer of this {total}-layer model")
        if self.initial is None:
            every_other = tuple(range(1, total - 1, 2))
            self.attention, self.mlp = every_other, every_other
        else:
            for what, layers in zip(("attention", "mlp"), self.initial):
                bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < total]
                if bad or len(set(layers)) != len(layers):
                    raise ValueError(f"initial {what} layers must be distinct indices in [0, {total}), got "
                                     f"{layers!r}")
            self.attention, self.mlp = tuple(sorted(self.initial[0])), tuple(sorted(self.initial[1]))
        self.sizes = sublayer_parameters(model)
        self._views = {}

    def begin(self, state) -> None:
        if state.batch_size != 1:
            raise ValueError(f"SWIFTDrafter drafts one sequence; got batch size {state.batch_size}")
        if self._model_id != id(state.model):
            self._setup(state.model)
        self._step = 0
        self._window_scored = not (self.rescore_incumbent and self.optimizing)

    # ------------------------------------------------------------------------------------------------ helpers
    def cost_fraction(self, attention=None, mlp=None) -> float:
        """Parameters a draft forward touches, as a fraction of a full forward's (LM head and final norm always;
        the attention and MLP sub-layers that run); default: the current set."""
        attention = self.attention if attention is None else attention
        mlp = self.mlp if mlp is None else mlp
        s = self.sizes
        used = s["head"] + s["norm"]
        used += sum(n for i, n in enumerate(s["attention"]) if i not in set(attention))
        used += sum(n for i, n in enumerate(s["mlp"]) if i not in set(mlp))
        return used / s["total"]

    def _view(self, model, attention, mlp):
        key = (tuple(attention), tuple(mlp))
        view = self._views.get(key)
        if view is None:
            if len(self._views) > 8:
                self._views.clear()
            view = self._views[key] = skip_sublayers(model, attention=key[0], mlp=key[1], share_cache=True)
        return view

    def _vector(self, attention, mlp) -> np.ndarray:
        """The official code's point of ``[0, 1]^(2 (L-2))``: 1 where a candidate sub-layer is skipped."""
        x = np.zeros(self.candidates)
        for i in attention:
            if 1 <= i <= self.total - 2:
                x[i - 1] = 1.0
        for i in mlp:
            if 1 <= i <= self.total - 2:
                x[self.total - 2 + i - 1] = 1.0
        return x

    def _sets_from_scores(self, x: np.ndarray):
        """The ``num_skip`` candidates with the highest scores (ties in candidate order), as skipped layer sets."""
        top = sorted(np.argsort(-x, kind="stable")[: self.num_skip].tolist())
        half = self.total - 2
        return tuple(i + 1 for i in top if i < half), tuple(i - half + 1 for i in top if i >= half)

    @torch.no_grad()
    def matchness(self, model, cache, input_ids, attention_mask, start: int, attention, mlp) -> float:
        """Matchness of a skip set: the draft runs, in one parallel forward, over the ``context_window + 1``
        tokens ``input_ids[start : start + context_window + 1]`` attending to the cached positions before
        ``start`` (the target's KV) and to each other causally; the score is the fraction of the
        ``context_window`` next tokens it predicts by argmax. The drafted positions are cropped off ``cache``
        afterwards."""
        w = self.context_window
        window = input_ids[:, start: start + w + 1]
        if window.shape[1] != w + 1:
            raise ValueError(f"the matchness window needs {w + 1} tokens from position {start}, the sequence has "
                             f"{input_ids.shape[1]}")
        length = cache.get_seq_length()
        if length < start:
            raise ValueError(f"the cache holds {length} positions, fewer than the window's start {start}")
        device = input_ids.device
        allowed = torch.zeros(w + 1, length + w + 1, dtype=torch.bool, device=device)
        allowed[:, :start] = attention_mask[0, :start].bool()[None]
        allowed[:, length:] = torch.tril(torch.ones(w + 1, w + 1, dtype=torch.bool, device=device))
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start: start + w + 1]
        view = self._view(model, attention, mlp)
        try:
            out = view(input_ids=window, attention_mask=additive_mask(allowed, model.dtype), position_ids=positions,
                       past_key_values=cache, use_cache=True)
        finally:
            crop_layers(cache, length)
        predicted = out.logits[0, :-1].argmax(-1)
        self.stats["opt_forwards"] += 1
        self.stats["opt_tokens"] += w + 1
        self.stats["opt_cost"] += (w + 1) * self.cost_fraction(attention, mlp)
        return float((predicted == window[0, 1:]).sum()) / w

    # ------------------------------------------------------------------------------------------------ optimisation
    def _optimise(self, state) -> None:
        """One optimisation iteration (the official ``swift_optimization``)."""
        model, cache = state.model, state.cache
        start = state.prompt_length
        args = (model, cache, state.input_ids, state.attention_mask, start)
        if not self._window_scored:  # (deviation 2) the incumbent's score on this generation's window
            self.score = self.matchness(*args, self.attention, self.mlp)
            self._gp.register(self._vector(self.attention, self.mlp), self.score)
            self._window_scored = True
            self.history.append({"iter": self.stats["opt_iter"], "kind": "incumbent", "attention": self.attention,
                                 "mlp": self.mlp, "score": self.score, "incumbent": self.score, "kept": True})
            if self.score > self.max_score:
                self.optimizing = False
                return
        bayes = self.bayes and (self.stats["opt_iter"] + 1) % self.bayes_interval == 0
        if bayes:
            point = self._gp.suggest(self.candidates, self._rng)
            attention, mlp = self._sets_from_scores(point)
            self.stats["bayes_iter"] += 1
        else:
            chosen = self._rng.choice(self.candidates, self.num_skip, replace=False)
            point = np.zeros(self.candidates)
            point[chosen] = 1.0
            attention, mlp = self._sets_from_scores(point)
        score = self.matchness(*args, attention, mlp)
        self._gp.register(point, score)
        kept = score > self.score
        self.history.append({"iter": self.stats["opt_iter"], "kind": "bayes" if bayes else "random",
                             "attention": attention, "mlp": mlp, "score": score, "incumbent": self.score,
                             "kept": kept})
        if kept:
            self.attention, self.mlp, self.score = attention, mlp, score
            self.tolerance_iter = 0
            if score > self.max_score:
                self.optimizing = False
        else:
            self.tolerance_iter += 1
        self.stats["opt_iter"] += 1
        if self.tolerance_iter > self.max_tolerance_iter or self.stats["opt_iter"] > self.max_opt_iter:
            self.optimizing = False

    # ------------------------------------------------------------------------------------------------ drafting
    @torch.no_grad()
    def propose(self, state) -> Draft:
        step = self._step
        self._step += 1
        cache = state.cache
        n = state.input_ids.shape[1]
        length = cache.get_seq_length()
        if length != n - 1:  # the first step: the engine's verification prefills the prompt with the full model
            return Draft(DraftTree.empty())
        generated = n - state.prompt_length
        if (self.optimizing and generated > self.context_window + 1 and step % self.opt_interval == 0):
            self._optimise(state)
        budget = min(self.max_draft_len, state.generation_config.max_length - n - 1)
        if budget < 1:
            return Draft(DraftTree.empty())
        model = state.model
        view = self._view(model, self.attention, self.mlp)
        cost = self.cost_fraction()
        position = int(state.attention_mask[0].long().sum()) - 1
        ids = state.input_ids[:, -1:]
        mask = state.attention_mask
        ones = torch.ones(1, 1, dtype=mask.dtype, device=mask.device)
        top_tokens, top1 = [], []
        try:
            for depth in range(budget):
                out = view(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True,
                           position_ids=torch.tensor([[position + depth]], device=ids.device), logits_to_keep=1)
                self.stats["draft_forwards"] += 1
                self.stats["draft_cost"] += cost
                probs = torch.softmax(out.logits[0, -1].float(), dim=-1)
                top = probs.topk(self.top_k)
                top_tokens.append(top.indices)
                top1.append(float(top.values[0]))
                if top1[-1] < self.stop_threshold:
                    break
                ids = top.indices[:1].view(1, 1)
                mask = torch.cat([mask, ones], dim=1)
        finally:
            crop_layers(cache, length)
        fanout = confidence_fanout(top1, sampling=state.do_sample) if self.tree else [1] * len(top1)
        return Draft(swift_tree(top_tokens, fanout), info={"top1": top1})

    def observe(self, state, result) -> None:
        if len(result.draft.tree):
            self.stats["steps"] += 1
            self.stats["accepted"] += len(result.accepted)
