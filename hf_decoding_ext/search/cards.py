"""CARDS: Cascade Reward Sampling for Efficient Decoding-Time Alignment (Li, Wang, Grama, Zhang; arXiv:2406.16306).

Segment-level rejection sampling: the response is built segment by segment; a segment ends where the model becomes
uncertain (next-token entropy at or above a threshold, after at least 4 tokens) or at 64 tokens; each sampled segment
is scored, together with the accepted prefix, by a reward model and accepted when its reward passes a threshold that
rises linearly with the response length; a rejected segment is resampled from the same prefix, and after
``max_rejections`` rejections the best-scoring candidate seen for that segment is taken.

Read from the official code (lblaoke/CARDS, ``reward_sampling.py``, ``RewardSampling.seg_rs_generate``;
``tools/uncertainty.py``, ``entropy``); the code here is written for this library on
:class:`~hf_decoding_ext.core.step_search.StepSearch` (the accepted prefix's KV cache is computed once and every
resampled segment starts from a copy of it) and :class:`~hf_decoding_ext.core.step_search.EntropySegmenter`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import torch

from hf_decoding_ext.core.loop import DecodingLoop, GenerationState
from hf_decoding_ext.core.scoring import resolve_reward
from hf_decoding_ext.core.step_search import (
    EntropySegmenter,
    SearchNode,
    SearchStats,
    StepSearch,
    append_trace,
)

OPTIONS = ("soft", "hard")

CALIBRATION_FILE = "cards_calibration_smollm2.json"
"""Committed dev-split calibration of the entropy threshold, ``r*`` and ``beta`` for SmolLM2-135M-Instruct with the
VADER reward (``hf_decoding_ext/data/search/``, written by ``scripts/eval_cards.py --calibrate``)."""


def load_calibration() -> dict[str, Any]:
    """The committed SmolLM2 / VADER calibration (:data:`CALIBRATION_FILE`): ``entropy_threshold``,
    ``reward_threshold``, ``beta`` and how they were computed (dev prompts only)."""
    from hf_decoding_ext.core.resources import data_path

    return json.loads(data_path("search", CALIBRATION_FILE).read_text())


def threshold_schedule(reward0: float, reward_threshold: float, length: int, horizon: int) -> float:
    """CARDS' acceptance threshold after ``length`` response tokens: linear from ``reward0`` (at length 0) to
    ``reward_threshold`` (at ``horizon`` tokens), never above ``reward_threshold`` (``min`` as in the official code,
    so with ``reward0 > reward_threshold`` it is ``reward_threshold`` throughout).

    Example:
        >>> threshold_schedule(0.25, 0.5, 16, 32), threshold_schedule(0.25, 0.5, 64, 32)
        (0.375, 0.5)
    """
    return min(reward0 + length * (reward_threshold - reward0) / horizon, reward_threshold)


def acceptance_probability(reward: float, threshold: float, beta: float, option: str = "soft") -> float:
    """Probability that CARDS accepts a segment of reward ``reward`` at threshold ``threshold``: ``"soft"``
    :math:`\\min(1, e^{(r - \\tau)/\\beta})`, ``"hard"`` :math:`\\mathbb 1\\{r \\ge \\tau\\}`.

    Example:
        >>> round(acceptance_probability(0.0, 0.7, 0.7), 4), acceptance_probability(0.7, 0.7, 0.7, "hard")
        (0.3679, 1.0)
    """
    if option == "hard":
        return 1.0 if reward >= threshold else 0.0
    if option != "soft":
        raise ValueError(f"option must be one of {OPTIONS}, got {option!r}")
    return min(1.0, math.exp(min(0.0, (reward - threshold) / beta)))


def _positive_number(value, name: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _positive_int(value, name: str, allow_zero: bool = False) -> int:
    low = 0 if allow_zero else 1
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


class CascadeRewardSampling(DecodingLoop):
    r"""Cascade Reward Sampling (CARDS): "Cascade Reward Sampling for Efficient Decoding-Time Alignment" (Bolian Li,
    Yifan Wang, Ananth Grama, Ruqi Zhang; https://arxiv.org/abs/2406.16306), as in the official code's
    ``seg_rs_generate`` (lblaoke/CARDS).

    For each prompt row, with :math:`r(\cdot)` the reward of a (partial) response:

    1. :math:`r_0 = (1-\alpha)\, r(\text{empty response}) + \alpha\, r^*` (the official code scores the prompt alone
       with its reward model).
    2. Sample a segment from the accepted prefix (the caller's ``generate()`` sampling distribution), token by token,
       ending it *before* the next token once it has ``min_segment_tokens`` tokens and the model's next-token entropy
       (raw logits, nats) is ``>= entropy_threshold``, or after ``max_segment_tokens`` tokens (or at eos / the
       generation's stopping criteria).
    3. Score prefix + segment: :math:`r`. Threshold
       :math:`\tau = \min\big(r_0 + t\,(r^* - r_0)/H,\; r^*\big)` with :math:`t` the response length including the
       segment and :math:`H` the ``horizon`` (``max_new_tokens``).
    4. Unless ``max_rejections`` segments were already rejected since the last commit, accept with probability
       :math:`\min(1, e^{(r-\tau)/\beta})` (``option="soft"``) or iff :math:`r \ge \tau` (``"hard"``); a rejected
       segment is resampled from the same prefix. When the cap is reached, the best-reward candidate among those
       sampled for this segment (the current one included) is committed without a test.
    5. Repeat until the response is complete (eos or the stopping criteria, e.g. ``max_new_tokens``).

    The accepted prefix's KV cache is computed once (:class:`~hf_decoding_ext.core.step_search.StepSearch`); each
    candidate segment costs its own tokens' forwards. Rows are searched one after another, each with its own search
    and (with ``seed``) its own generator seeded with ``seed``, so a row's output does not depend on the other rows.

    With ``return_dict_in_generate=True`` the output holds ``search_stats`` (one
    :meth:`~hf_decoding_ext.core.step_search.SearchStats.as_dict` per row: ``model_calls`` = forwards,
    ``generated_tokens`` = every sampled token including rejected segments, ``rollouts`` = candidate segments,
    ``scorer_calls`` = reward calls, the :math:`r_0` call included), ``cards_stats`` (per row: ``segments``,
    ``candidates``, ``rejections``, ``fallbacks``, ``llm_calls`` and ``rm_calls`` counted as the official code counts
    them: one LLM call per sampled token plus one per entropy-triggered boundary test, one RM call per candidate),
    ``cards_segments`` (per row, per committed segment: ``length``, ``reward``, ``threshold``, ``how``
    ``"accepted"``/``"fallback"``, ``candidates``, ``end``) and ``rewards`` (the reward of each row's final
    response).

    Args:
        reward (callable or ``"vader"``, *optional*, defaults to ``"vader"``): the reward model, any callable
            ``text -> float`` applied to the **response text so far, without the prompt** (decoded with
            ``tokenizer``, special tokens skipped); with ``reward_uses_prompt=True`` it is called as
            ``reward(response, prompt)`` (the prompt decoded with its special tokens). Without a tokenizer it
            receives token id lists. ``"vader"``: :func:`~hf_decoding_ext.core.scoring.vader_reward`, the offline toy
            sentiment reward in ``[-1, 1]``.
        tokenizer (*optional*): decodes responses for a text reward (required for ``"vader"``).
        reward_threshold (`float`): :math:`r^*`, the final acceptance threshold, on the reward's scale (the official
            default is 8.5 on its reward model's scale; for SmolLM2 + VADER use the committed calibration,
            :func:`load_calibration`, or the registry's defaults).
        entropy_threshold (`float`, *optional*, defaults to 3.0): segment boundary entropy in nats (official
            default, for LLaMA-7B / Mistral-7B; the registry uses the SmolLM2 dev calibration).
        alpha (`float`, *optional*, defaults to 0.5): weight of :math:`r^*` in the initial threshold :math:`r_0`.
        beta (`float`, *optional*, defaults to 0.7): temperature of the soft acceptance (official default, on its
            reward model's scale).
        option (`str`, *optional*, defaults to ``"soft"``): ``"soft"`` or ``"hard"`` acceptance.
        max_rejections (`int`, *optional*, defaults to 20): rejections of one segment before the best candidate is
            taken (at most ``max_rejections + 1`` candidates per segment).
        min_segment_tokens (`int`, *optional*, defaults to 4), max_segment_tokens (`int`, *optional*, defaults to
            64): segment length bounds (official values).
        horizon (`int`, *optional*): :math:`H` of the threshold schedule (``None``: the generation's
            ``max_new_tokens``).
        reward_uses_prompt (`bool`, *optional*, defaults to `False`): call the reward as ``reward(response, prompt)``.
        seed (`int`, *optional*): seed of the generators drawing segments and soft-acceptance uniforms (``None``:
            torch's global generator).

    Deviations from the official code:

    * Reward: the official code scores prompt + response with a learned reward model (e.g.
      ``lblaoke/opt-125m-hh-rlhf-rm-trl-v5``, LLaMA RMs); here any callable, by default the VADER sentiment lexicon
      (:func:`~hf_decoding_ext.core.scoring.vader_reward`) on the response text without the prompt (offline stand-in;
      the paper's win-rate / GPT-4 / Claude evaluations are not reproduced). :math:`r(\text{prompt})` becomes the
      reward of the empty response (with ``reward_uses_prompt``: ``reward("", prompt)``).
    * Thresholds: ``entropy_threshold`` 3.0 and ``r* = 8.5`` / ``beta = 0.7`` are specific to the official models and
      reward scale; the registry defaults are a dev-split calibration for SmolLM2 + VADER
      (``data/search/cards_calibration_smollm2.json``: entropy threshold = the 90th percentile of SmolLM2's token
      entropy while sampling, ``r*`` = the 90th percentile of full-response rewards, ``beta`` = 0.7 times their
      standard deviation).
    * Sampling distribution: the official code samples top-k 40 at temperature ``beta`` (0.7); here segments are
      sampled from the caller's ``generate()`` distribution (pass ``temperature=0.7, top_k=40`` for the official
      setting) and ``beta`` is only the soft-acceptance temperature.
    * End of response: the official loop always generates ``max_new_token`` tokens (no eos test) and its last
      segment may run past it; here a segment also ends at eos or the generation's stopping criteria, so the response
      never exceeds ``max_new_tokens``, and a complete (eos) segment is subject to the same acceptance test.
    * Counting: the official ``(num_llm_call, num_rm_call)`` is reported in ``cards_stats``; the official count omits
      the reward call on the prompt, ``search_stats.scorer_calls`` includes it. The official code recomputes the
      whole sequence at every forward (KV cache disabled); here prefixes share their KV cache, so ``model_calls``
      (forwards) also counts one forward per committed segment to extend the accepted prefix's cache.
    * Greedy decoding is refused (every resampled segment would be the same).

    Example:
        >>> from hf_decoding_ext import encode_prompts, load_model
        >>> from hf_decoding_ext.search.cards import CascadeRewardSampling, load_calibration
        >>> model, tokenizer = load_model()  # doctest: +SKIP
        >>> cal = load_calibration()  # doctest: +SKIP
        >>> loop = CascadeRewardSampling(tokenizer=tokenizer, reward_threshold=cal["reward_threshold"],
        ...                              entropy_threshold=cal["entropy_threshold"], beta=cal["beta"], seed=0)
        ...                              # doctest: +SKIP
        >>> inputs = encode_prompts(tokenizer, "Describe the weather today.")  # doctest: +SKIP
        >>> out = model.generate(**inputs, do_sample=True, temperature=0.7, top_k=40, max_new_tokens=32,
        ...                      custom_generate=loop, return_dict_in_generate=True)  # doctest: +SKIP
        >>> out.rewards, out.search_stats[0]["scorer_calls"]  # doctest: +SKIP
    """

    supports_greedy = False
    supports_output_scores = False  # the committed segments are chosen after sampling: no per-step score record

    def __init__(self, reward: Callable[..., float] | str = "vader", tokenizer=None, *, reward_threshold: float,
                 entropy_threshold: float = 3.0, alpha: float = 0.5, beta: float = 0.7, option: str = "soft",
                 max_rejections: int = 20, min_segment_tokens: int = 4, max_segment_tokens: int = 64,
                 horizon: int | None = None, reward_uses_prompt: bool = False, seed: int | None = None):
        reward = resolve_reward(reward, tokenizer)
        if not isinstance(reward_threshold, (int, float)) or isinstance(reward_threshold, bool) \
                or not math.isfinite(reward_threshold):
            raise ValueError(f"reward_threshold must be a finite number, got {reward_threshold!r}")
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
        if option not in OPTIONS:
            raise ValueError(f"option must be one of {OPTIONS}, got {option!r}")
        if not isinstance(reward_uses_prompt, bool):
            raise ValueError(f"reward_uses_prompt must be a bool, got {reward_uses_prompt!r}")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError(f"seed must be None or an integer, got {seed!r}")
        self.reward = reward
        self.tokenizer = tokenizer
        self.reward_threshold = float(reward_threshold)
        self.beta = _positive_number(beta, "beta")
        self.alpha = float(alpha)
        self.option = option
        self.max_rejections = _positive_int(max_rejections, "max_rejections", allow_zero=True)
        self.horizon = None if horizon is None else _positive_int(horizon, "horizon")
        self.reward_uses_prompt = reward_uses_prompt
        self.seed = seed
        # validates entropy_threshold (>= 0) and the segment bounds
        self.segmenter = EntropySegmenter(entropy_threshold, min_tokens=min_segment_tokens,
                                          max_tokens=max_segment_tokens)
        self.entropy_threshold = self.segmenter.threshold

    # ------------------------------------------------------------------------------------------ pieces
    def _score(self, search: StepSearch, tokens: list[int], prompt) -> float:
        """The reward of the response ``tokens`` (one reward call, counted)."""
        search.stats.scorer_calls += 1
        response = search.text(tokens) if self.tokenizer is not None else list(tokens)
        value = self.reward(response, prompt) if self.reward_uses_prompt else self.reward(response)
        value = float(value)
        if math.isnan(value):
            raise ValueError(f"the reward returned NaN for the response {response!r}")
        return value

    def _accept(self, reward: float, threshold: float, generator) -> bool:
        if self.option == "hard":
            return reward >= threshold
        u = float(torch.rand((), generator=generator, device=generator.device if generator is not None else "cpu"))
        return u < acceptance_probability(reward, threshold, self.beta, "soft")

    def horizon_of(self, state: GenerationState) -> int:
        """:math:`H` of the threshold schedule for a run: ``horizon``, else the generation's ``max_new_tokens``."""
        if self.horizon is not None:
            return self.horizon
        cfg = state.generation_config
        if getattr(cfg, "max_new_tokens", None):
            return int(cfg.max_new_tokens)
        if getattr(cfg, "max_length", None):
            return max(1, int(cfg.max_length) - state.prompt_length)
        raise ValueError("CARDS needs a horizon for its threshold schedule: pass max_new_tokens to generate() or "
                         "horizon= to the loop")

    # ------------------------------------------------------------------------------------------ one row
    def search_row(self, state: GenerationState, row: int, horizon: int,
                   generator: torch.Generator | None) -> tuple[list[int], SearchStats, dict[str, Any], list[dict],
                                                                float]:
        """CARDS on one prompt row: returns the response tokens, the search counters, the official-style counters,
        the committed segments and the final reward."""
        stats = SearchStats()
        search = StepSearch(state, row, self.segmenter, tokenizer=self.tokenizer, stats=stats)
        if self.reward_uses_prompt:
            prompt = search.prompt_text() if self.tokenizer is not None else \
                search.prompt_ids[0][search.prompt_mask[0].bool()].tolist()
        else:
            prompt = None
        counts = {"segments": 0, "candidates": 0, "rejections": 0, "fallbacks": 0, "llm_calls": 0, "rm_calls": 0}
        r_star = self.reward_threshold
        reward0 = (1 - self.alpha) * self._score(search, [], prompt) + self.alpha * r_star
        node, segments = search.root, []
        final_reward = reward0
        while not node.complete:
            rejected = 0
            best: tuple[float, SearchNode, float] | None = None
            while True:
                child = search.expand(node, 1, do_sample=True, generator=generator)[0]
                counts["candidates"] += 1
                # official count: one LLM call per sampled token, plus the forward whose entropy ended the segment
                counts["llm_calls"] += len(child.step) + (1 if child.end == "stop" else 0)
                counts["rm_calls"] += 1
                reward = self._score(search, child.tokens, prompt)
                threshold = threshold_schedule(reward0, r_star, len(child.tokens), horizon)
                child.value = reward
                if best is None or reward > best[0]:
                    best = (reward, child, threshold)
                if rejected >= self.max_rejections:
                    reward, child, threshold = best
                    how = "fallback"
                    counts["fallbacks"] += 1
                    break
                if self._accept(reward, threshold, generator):
                    how = "accepted"
                    break
                rejected += 1
                counts["rejections"] += 1
            segments.append({"length": len(child.step), "reward": reward, "threshold": threshold, "how": how,
                             "candidates": rejected + 1, "end": child.end})
            counts["segments"] += 1
            final_reward = reward
            previous, node = node, child
            if not node.complete:
                search.materialize(node)  # the accepted prefix's cache, from a copy of the previous one
            search.release(previous)
        search.release(node)
        stats.stop()
        return node.tokens, stats, counts, segments, final_reward

    # ------------------------------------------------------------------------------------------ the loop
    def run(self, state: GenerationState):
        horizon = self.horizon_of(state)
        traces, all_stats, all_counts, all_segments, rewards = [], [], [], [], []
        for row in range(state.batch_size):
            generator = None
            if self.seed is not None:
                generator = torch.Generator(device=state.device).manual_seed(self.seed)
            tokens, stats, counts, segments, reward = self.search_row(state, row, horizon, generator)
            traces.append(tokens)
            all_stats.append(stats.as_dict())
            all_counts.append(counts)
            all_segments.append(segments)
            rewards.append(reward)
        append_trace(state, traces)
        return {"search_stats": all_stats, "cards_stats": all_counts, "cards_segments": all_segments,
                "rewards": rewards}
