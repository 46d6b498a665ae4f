"""φ-Decoding: adaptive foresight sampling over reasoning steps (Xu et al., arXiv 2503.13288).

A step beam of partial traces; every iteration samples candidate next steps, prunes the unlikely ones in width,
rolls the survivors out to the end (*foresight*), and resamples the beam from a distribution that mixes the
foresight *advantage* with the size of the candidate's cluster of foresight texts (TF-IDF + k-means); the search
stops early in depth when the beams agree. The pure decision rules (:func:`width_prune`, :func:`select_steps`,
:func:`select_final`, :func:`cluster_texts`) are module functions so that they can be checked on scripted values.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

from hf_decoding_ext.core.loop import DecodingLoop, GenerationState
from hf_decoding_ext.core.rollout import rollout
from hf_decoding_ext.core.step_search import (
    DelimiterSegmenter,
    SearchNode,
    SearchStats,
    StepSearch,
    append_trace,
)

_EPS = 1e-8  # the official code's length guard: cumulative_logprob / (len + 1e-8)
_TIE = 1e-9  # width pruning never drops a candidate within this of the threshold (equal log-probs: no pruning)


# --------------------------------------------------------------------------------------------- decision rules
def normalized_logprob(logprob: float, length: int) -> float:
    """Length-normalised log-probability as in the official code: ``logprob / (length + 1e-8)``."""
    return float(logprob) / (int(length) + _EPS)


def _softmax(values: Sequence[float], temperature: float = 1.0) -> torch.Tensor:
    x = torch.tensor([float(v) for v in values], dtype=torch.float64) / temperature
    return torch.softmax(x, dim=0)


def sample_without_replacement(weights: torch.Tensor, k: int, generator: torch.Generator | None = None) -> list[int]:
    """``k`` distinct indices drawn one after another proportionally to ``weights`` (``numpy.random.choice`` with
    ``replace=False``, as the official code draws). Zero weights (float underflow) get a tiny floor so that the draw
    never fails."""
    w = torch.as_tensor(weights, dtype=torch.float64).clamp_min(1e-300)
    if not 1 <= k <= w.numel():
        raise ValueError(f"cannot draw {k} distinct indices from {w.numel()} weights")
    return torch.multinomial(w, k, replacement=False, generator=generator).tolist()


def width_prune(norm_logprobs: Sequence[float], sigma_rate: float = 1.0, min_keep: int = 1,
                temperature: float = 0.1, generator: torch.Generator | None = None) -> tuple[list[int], list[int]]:
    """In-width pruning (the official ``low_sigma`` strategy): keep the candidates whose length-normalised
    log-probability is above ``mean - sigma_rate * std`` (population std); if fewer than ``min_keep`` survive, refill
    from the pruned ones, drawn without replacement by ``softmax(logp / temperature)``.

    Returns ``(kept, pruned)`` index lists (sorted). Candidates within 1e-9 of the threshold are kept (the official
    code's strict ``>`` would prune every candidate when all log-probs are equal and then refill at random).

    Example:
        >>> width_prune([-1.0, -1.1, -0.9, -5.0], min_keep=2)
        ([0, 1, 2], [3])
        >>> width_prune([-2.0, -2.0, -2.0], min_keep=2)
        ([0, 1, 2], [])
    """
    x = torch.tensor([float(v) for v in norm_logprobs], dtype=torch.float64)
    if x.numel() == 0:
        return [], []
    threshold = float(x.mean() - sigma_rate * x.std(unbiased=False))
    kept = [i for i, v in enumerate(x.tolist()) if v >= threshold - _TIE]
    pruned = [i for i in range(x.numel()) if i not in set(kept)]
    need = min(min_keep, x.numel()) - len(kept)
    if need > 0:
        weights = _softmax([x[i] for i in pruned], temperature)
        add = [pruned[j] for j in sample_without_replacement(weights, need, generator)]
        kept = sorted(kept + add)
        pruned = [i for i in pruned if i not in set(add)]
    return kept, pruned


def cluster_texts(texts: Sequence[str], k: int, random_state: int | None = None):
    """Cluster labels of ``texts``: TF-IDF vectors (scikit-learn's default analyzer) and k-means with ``k``
    clusters, as in the official code. Raises ``ValueError`` when scikit-learn cannot cluster (fewer texts than
    clusters, an empty vocabulary); callers fall back as the official code does."""
    from sklearn.cluster import KMeans
    from sklearn.feature_extraction.text import TfidfVectorizer

    if len(texts) < k:
        raise ValueError(f"cannot make {k} clusters of {len(texts)} texts")
    features = TfidfVectorizer().fit_transform(list(texts))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fewer distinct points than clusters: k-means warns and still labels
        labels = KMeans(n_clusters=k, random_state=random_state).fit(features).labels_
    return [int(v) for v in labels]


def _random_state(generator: torch.Generator | None) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))


def select_steps(advantages: Sequence[float], texts: Sequence[str], beam_size: int, *, clustering: bool = True,
                 cluster_num: int = 3, adv_above0: bool = True, temperature: float = 0.1, threshold: float = 0.7,
                 generator: torch.Generator | None = None) -> tuple[list[int], dict[str, Any]]:
    """The official step selection (``strategy="cluster"``): ``beam_size`` distinct candidates drawn without
    replacement.

    With ``clustering``: the candidates with advantage > 0 (``adv_above0``) and a non-empty foresight text are
    clustered (:func:`cluster_texts`, ``cluster_num`` clusters); each is weighted
    ``0.5 * softmax(cluster_size_ratio) + 0.5 * softmax(advantage / temperature)`` (both softmaxes over those
    candidates), and a cluster holding more than ``threshold`` of them signals depth pruning (``early_stop``). When
    fewer than ``beam_size`` candidates qualify, or clustering fails, the draw is ``softmax(advantage / temperature)``
    over all candidates. Without ``clustering``: always that plain foresight-advantage draw.

    Returns the chosen indices (in draw order) and an info dict (``state``, ``weights`` over ``eligible``,
    ``labels``, ``early_stop``).
    """
    n = len(advantages)
    info: dict[str, Any] = {"early_stop": False, "labels": None}
    eligible = list(range(n))
    if clustering:
        eligible = [i for i in range(n) if (advantages[i] > 0 or not adv_above0) and texts[i] != ""]
        if len(eligible) >= beam_size:
            try:
                labels = cluster_texts([texts[i] for i in eligible], cluster_num, _random_state(generator))
            except ValueError as err:
                info.update(state="fail", error=str(err))
            else:
                sizes = [labels.count(c) for c in range(cluster_num)]
                ratio = [sizes[lab] / len(eligible) for lab in labels]
                weights = 0.5 * _softmax(ratio) + 0.5 * _softmax([advantages[i] for i in eligible], temperature)
                picked = sample_without_replacement(weights, beam_size, generator)
                info.update(state="success", labels=labels, eligible=eligible, weights=weights.tolist(),
                            early_stop=any(s / len(eligible) > threshold for s in sizes))
                return [eligible[j] for j in picked], info
        else:
            info["state"] = "cannot cluster"
    else:
        info["state"] = "advantage"
    weights = _softmax(advantages, temperature)
    info.update(eligible=list(range(n)), weights=weights.tolist())
    return sample_without_replacement(weights, beam_size, generator), info


def select_final(advantages: Sequence[float], texts: Sequence[str], *, clustering: bool = True,
                 adv_above0: bool = True, temperature: float = 0.1,
                 generator: torch.Generator | None = None) -> tuple[int, dict[str, Any]]:
    """The official final selection among the completed beams.

    With ``clustering``: the beams with advantage > 0 and a non-empty completion are split into 2 clusters
    (:func:`cluster_texts`); one beam of the *larger* cluster is drawn by ``softmax(advantage / temperature)`` (on a
    tie, the cluster labelled 1, as the official ``else`` branch). The official code draws from ``cluster1``'s
    weights but indexes ``cluster0`` in that branch; this implements the evident intent (index ``cluster1``). No
    eligible beam: ``softmax(-advantage / temperature)`` over all beams (the official code's negated fallback);
    clustering fails (e.g. one eligible beam): ``softmax(advantage / temperature)`` over all beams. Without
    ``clustering``: ``softmax(advantage / temperature)`` over all beams.
    """
    n = len(advantages)
    info: dict[str, Any] = {"labels": None}
    if clustering:
        eligible = [i for i in range(n) if (advantages[i] > 0 or not adv_above0) and texts[i] != ""]
        if not eligible:
            info["state"] = "no positive advantage"
            return sample_without_replacement(_softmax([-a for a in advantages], temperature), 1, generator)[0], info
        try:
            labels = cluster_texts([texts[i] for i in eligible], 2, _random_state(generator))
        except ValueError as err:
            info.update(state="fail", error=str(err))
        else:
            c0 = [eligible[j] for j, lab in enumerate(labels) if lab == 0]
            c1 = [eligible[j] for j, lab in enumerate(labels) if lab != 0]
            larger = c0 if len(c0) > len(c1) else c1
            pick = sample_without_replacement(_softmax([advantages[i] for i in larger], temperature), 1, generator)[0]
            info.update(state="success", labels=labels, eligible=eligible, cluster=larger)
            return larger[pick], info
    else:
        info["state"] = "advantage"
    return sample_without_replacement(_softmax(advantages, temperature), 1, generator)[0], info


# --------------------------------------------------------------------------------------------- the loop
class _Tempered:
    """Logits hook: the caller's processors, then division by a temperature the loop sets per phase."""

    def __init__(self, processors):
        self.processors = processors
        self.temperature = 1.0

    def __call__(self, input_ids, logits):
        scores = self.processors(input_ids, logits) if self.processors is not None else logits
        return scores if self.temperature == 1.0 else scores / self.temperature


def _check_int(value, name: str, low: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _check_positive(value, name: str, allow_zero: bool = False) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} number, got {value!r}")
    return float(value)


class PhiDecoding(DecodingLoop):
    r"""φ-Decoding, from "φ-Decoding: Adaptive Foresight Sampling for Balanced Inference-Time Exploration and
    Exploitation" (Fangzhi Xu, Hang Yan, Chang Ma, Haiteng Zhao, Jun Liu, Qika Lin, Zhiyong Wu; arXiv 2503.13288),
    following the official code (xufangzhi/phi-Decoding, ``phi_decoding.py``) and its defaults.

    Each prompt row is searched on its own (:class:`~hf_decoding_ext.core.step_search.StepSearch`, steps end at
    ``delimiter``). A beam of ``step_beam_size`` partial traces (all the prompt at first) is grown for at most
    ``num_foresight`` iterations:

    1. every beam samples ``num_rollout`` next steps (temperature ``step_temperature``; siblings share the beam's
       KV cache, one batched rollout per distinct beam);
    2. **in-width pruning** (``width_pruning``): candidates whose length-normalised step log-probability is below
       ``mean - sigma_rate * std`` get no foresight (refilled to the beam size by ``softmax(logp / 0.1)``); each
       pruned candidate is a foresight rollout saved (``width_pruned``);
    3. **foresight**: every surviving candidate is rolled out to the end (temperature ``foresight_temperature``);
       its value is the rollout's length-normalised log-probability and its *advantage* that value minus the value
       of the beam it extends (0 for the prompt);
    4. **selection** (:func:`select_steps`): the new beam is drawn without replacement from
       ``0.5 * softmax(cluster-size ratio) + 0.5 * softmax(advantage / 0.1)`` over the candidates with positive
       advantage, their foresight texts clustered by TF-IDF + k-means (``cluster_num``; scikit-learn), falling back
       to ``softmax(advantage / 0.1)`` over all candidates;
    5. **in-depth pruning** (``depth_pruning``): stop when all beams chose the same step text (from iteration
       index ``least_foresight_num`` on) or once a cluster has held more than ``threshold`` of the candidates (from
       ``least_foresight_num`` iterations on).

    Finally every beam is completed once (temperature ``foresight_temperature``) and one is chosen
    (:func:`select_final`): from the larger of 2 clusters of the completions by ``softmax(advantage / 0.1)``.

    With ``return_dict_in_generate=True`` the output holds ``search_stats``: one dict per row with the
    :class:`~hf_decoding_ext.core.step_search.SearchStats` counters (``generated_tokens`` counts steps, foresight
    and final completions) and ``iterations``, ``candidates``, ``foresight_rollouts``, ``width_pruned`` (foresight
    rollouts saved by width pruning), ``complete_candidates`` (kept candidates that ended the trace: no foresight
    needed), ``depth_stop`` (``"agreement"``, ``"cluster"``, ``"complete"`` or ``None``),
    ``depth_pruned_iterations`` (iterations skipped by depth pruning), ``cluster_fallbacks``, ``total_rollouts``
    (the official count: sampled steps + foresight + final completions); and with ``record_process=True`` a
    ``phi_trace`` per row (per-iteration candidates, values, advantages, weights, choices; the final choice).

    Args:
        step_beam_size (`int`, *optional*, defaults to 4): beams kept per iteration.
        num_rollout (`int`, *optional*, defaults to 4): candidate steps sampled per beam.
        num_foresight (`int`, *optional*, defaults to 8): maximum number of step iterations.
        tokenizer: the model's tokenizer (step delimiter, texts for clustering); required.
        delimiter (`str`, *optional*, defaults to ``"\n"``): the step delimiter.
        max_step_tokens (`int`, *optional*, defaults to 64): longest step.
        step_temperature (`float`, *optional*, defaults to 0.6): temperature of the candidate steps.
        foresight_temperature (`float`, *optional*, defaults to 1.0): temperature of foresight and final rollouts.
        max_foresight_tokens (`int`, *optional*): cap on a foresight rollout (default: to the generation's end).
        width_pruning (`bool`, *optional*, defaults to `True`): in-width pruning.
        sigma_rate (`float`, *optional*, defaults to 1.0): width-pruning threshold in standard deviations.
        depth_pruning (`bool`, *optional*, defaults to `True`): in-depth pruning (early stop).
        threshold (`float`, *optional*, defaults to 0.7): largest-cluster ratio that triggers depth pruning.
        least_foresight_num (`int`, *optional*, defaults to 4): iterations before depth pruning may stop.
        clustering (`bool`, *optional*, defaults to `True`): the cluster (alignment) term of the selection and the
            cluster-based final choice; ``False``: plain ``softmax(advantage / selection_temperature)`` draws.
        cluster_num (`int`, *optional*, defaults to 3): k-means clusters of the step selection.
        adv_above0 (`bool`, *optional*, defaults to `True`): cluster only candidates with positive advantage.
        selection_temperature (`float`, *optional*, defaults to 0.1): temperature of the advantage softmaxes (and of
            the width-pruning refill).
        record_process (`bool`, *optional*, defaults to `False`): return the search trace (``phi_trace``).
        seed (`int`, *optional*): seed of every draw (rollouts, selections, k-means), the same for every batch row
            (each row is searched on its own, as if alone); ``None``: torch's global RNG.

    Example:
        >>> from hf_decoding_ext.core.models import load_model, encode_prompts
        >>> from hf_decoding_ext.search.phi_decoding import PhiDecoding
        >>> model, tok = load_model()  # doctest: +SKIP
        >>> inputs = encode_prompts(tok, "Problem: (2 + 5) * 3")  # doctest: +SKIP
        >>> loop = PhiDecoding(step_beam_size=2, num_rollout=2, num_foresight=4, tokenizer=tok,
        ...                    seed=0)  # doctest: +SKIP
        >>> out = model.generate(**inputs, do_sample=True, max_new_tokens=48, custom_generate=loop,
        ...                      return_dict_in_generate=True)  # doctest: +SKIP
        >>> out.search_stats[0]["width_pruned"]  # doctest: +SKIP

    Deviations from the official code (no offline stand-in is needed: φ-Decoding uses only the model's own
    likelihoods):

    * Steps are the model's exact tokens up to and including the delimiter token (the official code strips the
      step text and re-joins steps with ``"\n"``, re-tokenising the prompt every iteration); beams share their
      prefix KV cache instead of vLLM prefix caching. Log-probabilities are the raw model's (not the
      temperature-scaled ones).
    * Width pruning keeps candidates within 1e-9 of the threshold (official: strict ``>``, which with equal
      log-probabilities prunes every candidate and refills at random).
    * Foresight rollouts of one iteration run as one left-padded batch, each until eos or the largest remaining
      token budget of the batch (``max_new_tokens`` minus the shortest trace; or ``max_foresight_tokens``),
      without the caller's other stopping criteria; the official code rolls out to ``<end_of_reasoning>`` or 1024
      tokens. Steps and the final completions honour the caller's stopping criteria exactly.
    * Traces can end inside the loop (eos or ``max_new_tokens``), which the official prompt-based driver never
      sees: a candidate step that completes its trace gets no foresight, its value is the step's own normalised
      log-probability and its text the step; a complete beam is carried to later iterations as its own single
      candidate (no rollout) with its advantage from when it was chosen; the loop stops when every beam is complete
      (``depth_stop="complete"``). At the end, a complete beam counts its last step as its completion.
    * The final selection indexes ``cluster1`` when ``cluster1`` is larger (official: ``cluster0``, a bug).
    * The depth-pruning rules keep the official off-by-one (agreement from iteration index
      ``least_foresight_num``, cluster from ``least_foresight_num`` iterations) and the official sticky cluster
      flag (once a cluster exceeded ``threshold`` it stays set for the prompt).
    * ``clustering=False`` is an ablation switch added here (official: always ``strategy="cluster"``).
    """

    supports_greedy = False
    supports_output_scores = False

    def __init__(self, step_beam_size: int = 4, num_rollout: int = 4, num_foresight: int = 8, tokenizer=None,
                 delimiter: str = "\n", max_step_tokens: int = 64, step_temperature: float = 0.6,
                 foresight_temperature: float = 1.0, max_foresight_tokens: int | None = None,
                 width_pruning: bool = True, sigma_rate: float = 1.0, depth_pruning: bool = True,
                 threshold: float = 0.7, least_foresight_num: int = 4, clustering: bool = True, cluster_num: int = 3,
                 adv_above0: bool = True, selection_temperature: float = 0.1, record_process: bool = False,
                 seed: int | None = None):
        self.step_beam_size = _check_int(step_beam_size, "step_beam_size")
        self.num_rollout = _check_int(num_rollout, "num_rollout")
        self.num_foresight = _check_int(num_foresight, "num_foresight")
        self.tokenizer = tokenizer
        self.segmenter = DelimiterSegmenter(delimiter, max_step_tokens)
        self.step_temperature = _check_positive(step_temperature, "step_temperature")
        self.foresight_temperature = _check_positive(foresight_temperature, "foresight_temperature")
        if max_foresight_tokens is not None:
            _check_int(max_foresight_tokens, "max_foresight_tokens")
        self.max_foresight_tokens = max_foresight_tokens
        for name, flag in (("width_pruning", width_pruning), ("depth_pruning", depth_pruning),
                           ("clustering", clustering), ("adv_above0", adv_above0),
                           ("record_process", record_process)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be a bool, got {flag!r}")
        self.width_pruning, self.depth_pruning, self.clustering = width_pruning, depth_pruning, clustering
        self.adv_above0, self.record_process = adv_above0, record_process
        self.sigma_rate = _check_positive(sigma_rate, "sigma_rate", allow_zero=True)
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0 <= threshold <= 1:
            raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
        self.threshold = float(threshold)
        self.least_foresight_num = _check_int(least_foresight_num, "least_foresight_num", low=0)
        self.cluster_num = _check_int(cluster_num, "cluster_num", low=2)
        self.selection_temperature = _check_positive(selection_temperature, "selection_temperature")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError(f"seed must be None or an int, got {seed!r}")
        self.seed = seed

    # ------------------------------------------------------------------------------------------ helpers
    def _remaining(self, state: GenerationState, node: SearchNode) -> int | None:
        max_length = getattr(state.generation_config, "max_length", None)
        if max_length is None:
            return None
        return int(max_length) - state.prompt_length - len(node.tokens)

    def _foresight(self, search: StepSearch, hook: _Tempered, nodes: list[SearchNode], generator):
        """Roll every node out to the end in one left-padded batch; returns (token lists, raw log-prob sums)."""
        state = search.state
        prompt = search.prompt_ids[0][search.prompt_mask[0].bool()]
        rows = [torch.cat([prompt, torch.tensor(n.tokens, dtype=prompt.dtype, device=prompt.device)]) for n in nodes]
        width = max(r.numel() for r in rows)
        pad = int(state.pad_token_id) if state.pad_token_id is not None else 0
        ids = torch.full((len(rows), width), pad, dtype=prompt.dtype, device=prompt.device)
        mask = torch.zeros((len(rows), width), dtype=search.prompt_mask.dtype, device=prompt.device)
        for i, r in enumerate(rows):
            ids[i, width - r.numel():] = r
            mask[i, width - r.numel():] = 1
        from transformers import DynamicCache

        view = object.__new__(GenerationState)
        view.__dict__.update(state.__dict__)
        view.input_ids, view.attention_mask = ids, mask
        view.unfinished = torch.ones(len(rows), dtype=torch.bool, device=prompt.device)
        view.cache = DynamicCache(config=state.model.config)
        view.scores = view.logits = None
        view.streamer = None
        horizon = self.max_foresight_tokens
        if horizon is None:
            budgets = [self._remaining(state, n) for n in nodes]
            horizon = max(budgets) if all(b is not None for b in budgets) else 1024  # the official cap
        horizon = max(1, int(horizon))
        hook.temperature = self.foresight_temperature
        before = state.stats["forwards"]
        r = rollout(view, 1, process=hook, do_sample=True, generator=generator, max_tokens=horizon)
        search.stats.model_calls += state.stats["forwards"] - before
        search.stats.generated_tokens += int(r.lengths.sum())
        search.stats.rollouts += len(nodes)
        return r.token_lists(), [float(v) for v in r.logprobs]

    def _text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    # ------------------------------------------------------------------------------------------ search of one row
    def search_row(self, state: GenerationState, row: int, generator=None, cpu_generator=None):
        """φ-Decoding on one prompt row; returns ``(trace tokens, counters dict, trace or None)``."""
        B, R = self.step_beam_size, self.num_rollout
        stats = SearchStats()
        hook = _Tempered(state.logits_processor)
        search = StepSearch(state, row, self.segmenter, tokenizer=self.tokenizer, stats=stats, process=hook)
        root = search.root
        root.value = 0.0
        root.data["advantage"] = 0.0
        beams = [root] * B
        counters = {"iterations": 0, "candidates": 0, "foresight_rollouts": 0, "width_pruned": 0,
                    "complete_candidates": 0,
                    "depth_stop": None, "depth_pruned_iterations": 0, "cluster_fallbacks": 0, "total_rollouts": 0}
        trace: list[dict] | None = [] if self.record_process else None
        cluster_flag = False  # the official stop_foresight flag (sticky for the prompt)
        previous: list[SearchNode] = []
        for T in range(self.num_foresight):
            if all(b.complete for b in beams):
                counters["depth_stop"] = "complete"
                break
            counters["iterations"] += 1
            # 1. candidate steps: num_rollout per incomplete beam (one batched rollout per distinct beam node),
            #    a complete beam is carried as its own single candidate
            hook.temperature = self.step_temperature
            groups: dict[int, list[int]] = {}
            for b, node in enumerate(beams):
                if not node.complete:
                    groups.setdefault(id(node), []).append(b)
            children: dict[int, list[SearchNode]] = {}
            for members in groups.values():
                node = beams[members[0]]
                kids = search.expand(node, len(members) * R, do_sample=True, generator=generator)
                for j, b in enumerate(members):
                    children[b] = kids[j * R:(j + 1) * R]
            for node in previous:  # the previous beams' caches are no longer needed once their children expanded
                if all(node is not b for b in beams):
                    search.release(node)
            cands: list[dict] = []
            for b, node in enumerate(beams):
                if node.complete:
                    cands.append({"node": node, "parent": node.parent, "carried": True})
                else:
                    cands.extend({"node": kid, "parent": node, "carried": False} for kid in children[b])
            for c in cands:
                c["step_nlp"] = normalized_logprob(c["node"].logprob, len(c["node"].step))
                c["step_text"] = self._text(c["node"].step)
            sampled = [i for i, c in enumerate(cands) if not c["carried"]]
            counters["candidates"] += len(sampled)
            # 2. in-width pruning of the sampled candidates
            carried = len(cands) - len(sampled)
            if self.width_pruning:
                kept_local, _ = width_prune([cands[i]["step_nlp"] for i in sampled], self.sigma_rate,
                                            min_keep=max(0, B - carried), temperature=self.selection_temperature,
                                            generator=cpu_generator)
                kept_sampled = [sampled[j] for j in kept_local]
            else:
                kept_sampled = list(sampled)
            counters["width_pruned"] += len(sampled) - len(kept_sampled)
            pool = sorted(kept_sampled + [i for i, c in enumerate(cands) if c["carried"]])
            # 3. foresight: roll every kept, incomplete candidate out to the end (one batch)
            need = [i for i in pool if not cands[i]["carried"] and not cands[i]["node"].complete]
            if need:
                toks, logps = self._foresight(search, hook, [cands[i]["node"] for i in need], generator)
                counters["foresight_rollouts"] += len(need)
                for i, t, lp in zip(need, toks, logps):
                    cands[i]["foresight"] = t
                    cands[i]["value"] = normalized_logprob(lp, len(t))
                    cands[i]["text"] = self._text(t)
            for i in pool:
                c = cands[i]
                if c["carried"]:
                    c["value"], c["text"] = c["node"].value, c["node"].data["text"]
                elif c["node"].complete:  # nothing to foresee: the step is the rest of the trace
                    c["value"], c["text"] = c["step_nlp"], c["step_text"]
                    counters["complete_candidates"] += 1
                c["advantage"] = c["value"] - (c["parent"].value if c["parent"] is not None else 0.0)
            # 4. selection of the new beams
            picked, info = select_steps([cands[i]["advantage"] for i in pool], [cands[i]["text"] for i in pool], B,
                                        clustering=self.clustering, cluster_num=self.cluster_num,
                                        adv_above0=self.adv_above0, temperature=self.selection_temperature,
                                        threshold=self.threshold, generator=cpu_generator)
            if self.clustering and info["state"] != "success":
                counters["cluster_fallbacks"] += 1
            cluster_flag = cluster_flag or info["early_stop"]
            previous = beams
            beams = []
            for j in picked:
                c = cands[pool[j]]
                node = c["node"]
                if not c["carried"]:
                    node.value = c["value"]
                    node.data["text"] = c["text"]
                    node.data["advantage"] = c["advantage"]
                beams.append(node)
            if trace is not None:
                trace.append({"iteration": T, "step_texts": [c["step_text"] for c in cands],
                              "step_nlp": [c["step_nlp"] for c in cands], "carried": [c["carried"] for c in cands],
                              "pool": pool, "foresight_values": [cands[i]["value"] for i in pool],
                              "foresight_texts": [cands[i]["text"] for i in pool],
                              "advantages": [cands[i]["advantage"] for i in pool],
                              "parent_values": [cands[i]["parent"].value if cands[i]["parent"] is not None else 0.0
                                                for i in pool],
                              "candidate_tokens": [cands[i]["node"].tokens for i in pool],
                              "foresight_tokens": [cands[i].get("foresight", []) for i in pool],
                              "selection": info, "chosen": [pool[j] for j in picked]})
            # 5. in-depth pruning
            if self.depth_pruning:
                texts = [self._text(b.step) for b in beams]
                if all(t == texts[0] for t in texts) and T >= self.least_foresight_num:
                    counters["depth_stop"] = "agreement"
                elif cluster_flag and T + 1 >= self.least_foresight_num:
                    counters["depth_stop"] = "cluster"
                if counters["depth_stop"] is not None:
                    counters["depth_pruned_iterations"] = self.num_foresight - T - 1
                    break
        # final completions and choice
        hook.temperature = self.foresight_temperature
        finals, advantages, texts = [], [], []
        for node in beams:
            if node.complete:
                finals.append([])
                advantages.append(node.data.get("advantage", 0.0))
                texts.append(self._text(node.step))
            else:
                r = search.complete(node, 1, do_sample=True, generator=generator)
                toks = r.token_lists()[0]
                finals.append(toks)
                advantages.append(normalized_logprob(float(r.logprobs[0]), len(toks)) - node.value)
                texts.append(self._text(toks))
        choice, final_info = select_final(advantages, texts, clustering=self.clustering, adv_above0=self.adv_above0,
                                          temperature=self.selection_temperature, generator=cpu_generator)
        counters["total_rollouts"] = (counters["candidates"] + counters["foresight_rollouts"]
                                      + sum(1 for b in beams if not b.complete))
        if trace is not None:
            trace.append({"final_texts": texts, "final_advantages": advantages, "selection": final_info,
                          "chosen": choice, "beam_tokens": [b.tokens for b in beams]})
        stats.stop()
        return beams[choice].tokens + finals[choice], {**stats.as_dict(), **counters}, trace

    # ------------------------------------------------------------------------------------------ generate()
    def run(self, state: GenerationState):
        if self.tokenizer is None:
            raise ValueError("PhiDecoding needs the tokenizer (step delimiter and foresight texts): pass tokenizer=")
        generator = cpu_generator = None
        traces, all_stats, all_traces = [], [], []
        for row in range(state.batch_size):
            if self.seed is not None:  # every row is searched on its own, with generators seeded alike
                generator = torch.Generator(device=state.device).manual_seed(self.seed)
                cpu_generator = torch.Generator().manual_seed(self.seed)
            tokens, counters, trace = self.search_row(state, row, generator, cpu_generator)
            traces.append(tokens)
            all_stats.append(counters)
            all_traces.append(trace)
        append_trace(state, traces)
        extra: dict[str, Any] = {"search_stats": all_stats}
        if self.record_process:
            extra["phi_trace"] = all_traces
        return extra
