"""Quality-aware decoding (QAD) for machine translation (Fernandes et al., NAACL 2022, arXiv 2205.00978): N-best
reranking with quality-estimation features (fixed F-RR, tuned T-RR), MBR with a reference-based utility, and the
two-stage T-RR shortlist followed by MBR."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

from hf_decoding_ext.core.candidates import CandidatePool, RerankingLoop, Selection
from hf_decoding_ext.core.loop import GenerationState
from hf_decoding_ext.core.scoring import LengthNormalizedLogProbScorer
from hf_decoding_ext.search.mbr import build_utility_scorer, mbr_select

FEATURES = ("logprob_norm", "logprob")
"""Built-in reference-free features computed from the pool for free: the candidate's log-probability under the
raw model divided by its length (``"logprob_norm"``), and its summed log-probability (``"logprob"``)."""

STRATEGIES = ("f-rr", "t-rr", "mbr", "t-rr+mbr")
"""Quality-aware decoding rules: fixed reranking by one QE feature, tuned reranking by a linear combination of
features, MBR, and tuned reranking to a shortlist followed by MBR on it."""


class RoundTripLogProb:
    r"""A reference-free QE stand-in: how well the candidate translation explains the source, as the length-normalised
    log-probability of the source given a back-translation prompt built from the candidate,
    :math:`\frac{1}{|x|}\log p(x \mid \mathrm{template}(y))`, under a causal LM (e.g. the generating model).

    Args:
        model: the causal LM that back-translates.
        tokenizer: its tokenizer.
        source_fn (callable): ``source_fn(prompt_text) -> source_text``: the source sentence of a forward-translation
            prompt (decoded with special tokens removed).
        template (`str`, *optional*): the back-translation prompt, with a ``{hypothesis}`` field; the source follows
            it after a space.
        use_chat_template (`bool`, *optional*): wrap the template as a user turn (default: whether the tokenizer has
            a chat template).

    Example:
        >>> feature = RoundTripLogProb(model, tokenizer, source_fn=lambda prompt: sources[prompt])  # doctest: +SKIP
        >>> feature("Le chat dort.", prompt_text)  # doctest: +SKIP
        -1.7
    """

    def __init__(self, model, tokenizer, source_fn: Callable[[str], str],
                 template: str = "Translate this French sentence into English.\nFrench: {hypothesis}\nEnglish:",
                 use_chat_template: bool | None = None):
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"model must be a causal LM, got {type(model).__name__}")
        if tokenizer is None or not callable(getattr(tokenizer, "encode", None)):
            raise ValueError(f"RoundTripLogProb needs a tokenizer, got {type(tokenizer).__name__}")
        if not callable(source_fn):
            raise ValueError(f"source_fn must be callable, got {type(source_fn).__name__}")
        if not isinstance(template, str) or "{hypothesis}" not in template:
            raise ValueError(f"template must be a string with a {{hypothesis}} field, got {template!r}")
        if use_chat_template is None:
            use_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self.model, self.tokenizer, self.source_fn, self.template = model, tokenizer, source_fn, template
        self.use_chat_template = bool(use_chat_template)
        self.scorer = LengthNormalizedLogProbScorer(model)

    def __call__(self, hypothesis: str, prompt_text: str) -> float:
        source = self.source_fn(prompt_text)
        if not isinstance(source, str) or not source.strip():
            raise ValueError(f"source_fn returned {source!r} for the prompt {prompt_text!r:.80}")
        text = self.template.format(hypothesis=hypothesis.strip())
        if self.use_chat_template:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
            prompt = self.tokenizer.encode(text, add_special_tokens=False)
            target = self.tokenizer.encode(source.strip(), add_special_tokens=False)
        else:
            prompt = self.tokenizer.encode(text, add_special_tokens=True)
            target = self.tokenizer.encode(" " + source.strip(), add_special_tokens=False)
        return float(self.scorer.score([target], context=prompt)[0])


def rerank_scores(features: torch.Tensor, weights: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Linear reranker scores ``features @ weights`` (``(n, m) x (m,) -> (n,)``, float64)."""
    w = torch.as_tensor(weights, dtype=torch.float64)
    if features.dim() != 2 or w.shape != (features.shape[1],):
        raise ValueError(f"features must be (n, {w.numel()}) for {w.numel()} weights, got {tuple(features.shape)}")
    return features.double() @ w


def reranker_objective(features: Sequence[torch.Tensor], metric: Sequence[torch.Tensor],
                       weights: Sequence[float] | torch.Tensor) -> float:
    """Mean over sentences of the reference metric of the candidate the linear reranker picks (first on ties)."""
    picked = [float(m[int(torch.argmax(rerank_scores(f, weights)))]) for f, m in zip(features, metric)]
    return sum(picked) / len(picked)


def tune_reranker_weights(features: Sequence[torch.Tensor], metric: Sequence[torch.Tensor],
                          names: Sequence[str] | None = None, *, restarts: int = 30, rounds: int = 4,
                          seed: int = 0, init: Sequence[float] | None = None) -> tuple[dict[str, float], float]:
    """Tune the weights of the linear reranker (T-RR) on a dev set: maximise the mean reference metric of the
    reranker's pick, in place of the paper's MERT (travatar).

    The search is direct: the starting points are every one-hot weight vector (each feature alone: the fixed
    rerankers), ``init`` and ``restarts`` random directions; each is improved by coordinate search (each weight
    moved by multiples of a step on a grid, best move kept, the step halved each round), in units of each feature's
    standard deviation over the dev candidates. A move is kept only if it strictly improves the objective, so the
    result is never worse than the best single feature (F-RR) nor than ``init``; the all-zero vector (no ranking:
    the first candidate) is never a candidate.

    Args:
        features: per dev sentence, the ``(n_i, m)`` feature matrix of its candidates.
        metric: per dev sentence, the ``(n_i,)`` reference metric (e.g. chrF against the reference) of its candidates.
        names: the ``m`` feature names (default ``f0 ... f{m-1}``).
        restarts: random starting directions.
        rounds: coordinate-search rounds (step halves after each).
        seed: seed of the random directions.
        init: an extra starting weight vector.

    Returns:
        ``(weights, objective)``: the weights by feature name and the dev objective they reach.

    Example:
        >>> import torch
        >>> feats = [torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([[0.0, 0.0], [1.0, 1.0]])]
        >>> gold = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])]
        >>> w, obj = tune_reranker_weights(feats, gold, ["a", "b"], restarts=0)
        >>> obj
        1.0
    """
    if not features or len(features) != len(metric):
        raise ValueError(f"features and metric must be non-empty lists of equal length, got {len(features)} and "
                         f"{len(metric)}")
    feats = [torch.as_tensor(f, dtype=torch.float64) for f in features]
    gold = [torch.as_tensor(m, dtype=torch.float64) for m in metric]
    m = feats[0].shape[1] if feats[0].dim() == 2 else -1
    for f, g in zip(feats, gold):
        if f.dim() != 2 or f.shape[1] != m or f.shape[0] < 1 or g.shape != (f.shape[0],):
            raise ValueError(f"each feature matrix must be (n_i, {m}) with an (n_i,) metric, got {tuple(f.shape)} "
                             f"and {tuple(g.shape)}")
        if not torch.isfinite(f).all():
            raise ValueError("features must be finite")
    names = [f"f{k}" for k in range(m)] if names is None else list(names)
    if len(names) != m:
        raise ValueError(f"names must hold {m} names, got {names}")
    for what, v in (("restarts", restarts), ("rounds", rounds)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{what} must be a non-negative integer, got {v!r}")
    scale = torch.cat(feats).std(dim=0, unbiased=False)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    std = [f / scale for f in feats]  # search in standardised units; weights mapped back at the end

    def objective(w: torch.Tensor) -> float:
        return reranker_objective(std, gold, w)

    gen = torch.Generator().manual_seed(seed)
    starts = [torch.eye(m, dtype=torch.float64)[k] for k in range(m)]
    if init is not None:
        w0 = torch.as_tensor(init, dtype=torch.float64)
        if w0.shape != (m,):
            raise ValueError(f"init must hold {m} weights, got {list(init)}")
        starts.append(w0 * scale)
    starts += [torch.randn(m, generator=gen, dtype=torch.float64) for _ in range(restarts)]
    grid = (-2.0, -1.0, -0.5, -0.25, 0.25, 0.5, 1.0, 2.0)
    best_w, best = starts[0], objective(starts[0])
    for w in starts:
        w = w / w.norm().clamp_min(1e-12)
        value = objective(w)
        step = 1.0
        for _ in range(rounds):
            for k in range(m):
                for delta in grid:
                    trial = w.clone()
                    trial[k] += delta * step
                    if float(trial.abs().max()) < 1e-9:  # all-zero weights rank nothing (first candidate wins)
                        continue
                    v = objective(trial)
                    if v > value + 1e-12:
                        w, value = trial, v
            step /= 2
        if value > best + 1e-12:
            best_w, best = w, value
    raw = best_w / scale
    return {name: float(x) for name, x in zip(names, raw)}, best


class QualityAwareDecoding(RerankingLoop):
    r"""Quality-aware decoding, from "Quality-Aware Decoding for Neural Machine Translation" (Fernandes, Farinhas,
    Rei, de Souza, Ogayo, Neubig, Martins; NAACL 2022, https://arxiv.org/abs/2205.00978; official code
    deep-spin/qaware-decode).

    ``n`` candidates are sampled per prompt (one batched rollout; call ``generate()`` with ``do_sample=True``: the
    paper's pools come from beam search or ancestral / nucleus sampling), then one of four rules picks the output
    (``strategy=``):

    * ``"f-rr"`` (fixed N-best reranking): the candidate with the best single reference-free quality-estimation
      (QE) feature, ``fixed_feature``;
    * ``"t-rr"`` (tuned reranking): the best :math:`\sum_k w_k f_k(y)`, a linear combination of features with weights
      tuned on a dev set to maximise a reference metric (:func:`tune_reranker_weights`);
    * ``"mbr"``: minimum Bayes risk with a reference-based utility, the other candidates as pseudo-references
      (the MBR component of :mod:`hf_decoding_ext.search.mbr`, shared with :class:`~hf_decoding_ext.search.mbr.MBRDecoding`),
      optionally against a uniform subsample of ``num_pseudo_references`` of them (qaware-decode's
      ``num_subsamples``);
    * ``"t-rr+mbr"``: T-RR keeps the top ``shortlist`` candidates, MBR picks among them.

    Features (reference-free; the paper's QE metrics are neural): ``"logprob_norm"`` (length-normalised model
    log-probability), ``"logprob"`` (model log-probability), and any named callables in ``qe_metrics``,
    ``fn(hypothesis_text, prompt_text) -> float`` (e.g. :class:`RoundTripLogProb`, or COMET-QE / CometKiwi /
    TransQuest / OpenKiwi if the user has their weights locally).

    Offline stand-ins and deviations from the paper / official code:

    * **No neural metric ships offline**: COMET-QE, TransQuest/OpenKiwi and mBART-QE (QE features) and COMET / BLEURT
      (MBR utilities) need downloaded checkpoints. QE stand-ins: the model's length-normalised log-probability and,
      optionally, the round-trip back-translation log-probability (:class:`RoundTripLogProb`); MBR utilities: the
      paper's lexical rows, chrF (default) and BLEU (sacrebleu, sentence level), or any callable.
    * T-RR weights are tuned by a direct coordinate search with restarts (:func:`tune_reranker_weights`) instead of
      MERT in travatar; with ``weights=None`` T-RR uses equal weights, as qaware-decode's ``rerank`` does without
      trained weights.
    * The translation "model" is a causal LM prompted to translate; candidates are its samples.
    * A candidate drawn as a pseudo-reference is not compared with itself (qaware-decode's ``mbr_corpus`` includes
      it); with a full pool and chrF/BLEU (self-utility 100 for every candidate) the ranking is the same.

    Args:
        n (`int`, *optional*, defaults to 8): candidates per prompt.
        strategy (`str`, *optional*, defaults to ``"mbr"``): one of :data:`STRATEGIES`.
        utility (`str` or callable, *optional*, defaults to ``"chrf"``): the MBR utility (see
            :func:`~hf_decoding_ext.search.mbr.build_utility_scorer`).
        tokenizer (*optional*): decodes candidates for text utilities and QE callables.
        features (`tuple[str]`, *optional*, defaults to ``("logprob_norm",)``): built-in features (:data:`FEATURES`).
        qe_metrics (`dict[str, callable]`, *optional*): extra named QE features on text.
        weights (`dict[str, float]`, *optional*): T-RR weights by feature name (missing features weigh 0; ``None``:
            equal weights).
        fixed_feature (`str`, *optional*): the F-RR feature (default: the first feature).
        shortlist (`int`, *optional*, defaults to 4): candidates T-RR passes to MBR in ``"t-rr+mbr"``.
        num_pseudo_references (`int`, *optional*): MBR pseudo-reference subsample size.
        seed (`int`, *optional*): seed of the sampling and subsampling.

    Example:
        >>> from hf_decoding_ext.search.quality_aware import QualityAwareDecoding
        >>> loop = QualityAwareDecoding(n=8, strategy="mbr", utility="chrf", tokenizer=tokenizer)  # doctest: +SKIP
        >>> out = model.generate(**inputs, do_sample=True, max_new_tokens=48, custom_generate=loop)  # doctest: +SKIP
    """

    def __init__(self, n: int = 8, strategy: str = "mbr", utility: str | Callable = "chrf", tokenizer=None,
                 features: Sequence[str] = ("logprob_norm",), qe_metrics: Mapping[str, Callable] | None = None,
                 weights: Mapping[str, float] | None = None, fixed_feature: str | None = None, shortlist: int = 4,
                 num_pseudo_references: int | None = None, seed: int | None = None):
        super().__init__(n=n, seed=seed)
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
        if isinstance(features, str) or not isinstance(features, Sequence) or any(f not in FEATURES for f in features):
            raise ValueError(f"features must be a list of names from {list(FEATURES)}, got {features!r}")
        qe_metrics = dict(qe_metrics or {})
        for name, fn in qe_metrics.items():
            if not isinstance(name, str) or not callable(fn):
                raise ValueError(f"qe_metrics must map names to callables, got {name!r}: {fn!r}")
        self.feature_names = [*features, *qe_metrics]
        if len(set(self.feature_names)) != len(self.feature_names) or not self.feature_names:
            raise ValueError(f"feature names must be distinct and non-empty, got {self.feature_names}")
        if qe_metrics and tokenizer is None:
            raise ValueError("qe_metrics score text: pass the tokenizer")
        if weights is not None:
            weights = dict(weights)
            unknown = sorted(set(weights) - set(self.feature_names))
            if unknown:
                raise ValueError(f"weights name unknown features {unknown}; features: {self.feature_names}")
            if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                   for v in weights.values()):
                raise ValueError(f"weights must be finite numbers, got {weights}")
        fixed_feature = self.feature_names[0] if fixed_feature is None else fixed_feature
        if fixed_feature not in self.feature_names:
            raise ValueError(f"fixed_feature must be one of {self.feature_names}, got {fixed_feature!r}")
        if not isinstance(shortlist, int) or isinstance(shortlist, bool) or shortlist < 1:
            raise ValueError(f"shortlist must be an integer >= 1, got {shortlist!r}")
        self.strategy, self.tokenizer, self.qe_metrics = strategy, tokenizer, qe_metrics
        self.features = tuple(features)
        self.weights = weights
        self.fixed_feature, self.shortlist = fixed_feature, shortlist
        self.scorer = None
        if strategy in ("mbr", "t-rr+mbr"):
            if utility == "judge":
                raise ValueError("quality-aware decoding's MBR takes a translation utility (chrf, bleu, ...), not the "
                                 "instruction judge; use MBRDecoding for the judge")
            self.scorer = build_utility_scorer(utility, tokenizer=tokenizer,
                                               num_pseudo_references=num_pseudo_references, seed=seed)

    def weight_vector(self) -> torch.Tensor:
        """The T-RR weights in feature order (equal weights when none were given)."""
        if self.weights is None:
            return torch.ones(len(self.feature_names), dtype=torch.float64)
        return torch.tensor([float(self.weights.get(name, 0.0)) for name in self.feature_names], dtype=torch.float64)

    def pool_features(self, pool: CandidatePool) -> torch.Tensor:
        """``(n, m)`` float64 features of the pool's candidates, in :attr:`feature_names` order."""
        columns = []
        lengths = pool.lengths.clamp_min(1).double()
        for name in self.features:
            lp = pool.logprobs.double().cpu()
            columns.append(lp / lengths if name == "logprob_norm" else lp)
        if self.qe_metrics:
            prompt = self.tokenizer.decode(pool.prompt.tolist(), skip_special_tokens=True)
            texts = pool.texts(self.tokenizer)
            for name, fn in self.qe_metrics.items():
                values = [fn(text, prompt) for text in texts]
                if any(isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) for v in values):
                    raise ValueError(f"the QE metric {name!r} must return numbers, got {values}")
                columns.append(torch.tensor(values, dtype=torch.float64))
        return torch.stack(columns, dim=1)

    def rerank(self, pool: CandidatePool) -> Selection:
        """The quality-aware choice in a pool (usable outside ``generate()``)."""
        if self.strategy == "mbr":
            return mbr_select(self.scorer, pool)
        feats = self.pool_features(pool)
        extra = {"features": feats, "feature_names": list(self.feature_names)}
        if self.strategy == "f-rr":
            scores = feats[:, self.feature_names.index(self.fixed_feature)]
            return Selection(int(torch.argmax(scores)), scores.float(), extra)
        trr = rerank_scores(feats, self.weight_vector())
        if self.strategy == "t-rr":
            return Selection(int(torch.argmax(trr)), trr.float(), extra)
        order = sorted(range(len(pool)), key=lambda i: (-float(trr[i]), i))  # stable: first sampled on ties
        keep = sorted(order[:self.shortlist])
        sel = mbr_select(self.scorer, pool, subset=keep)
        sel.extra.update(extra, rerank_scores=trr.float(), shortlist=keep)
        return sel

    def select(self, pool: CandidatePool, state: GenerationState, row: int) -> Selection:
        return self.rerank(pool)
