"""InfAlign, inference-time half (Balashankar, Sun, Berant, Eisenstein, Collins, Hutter, Lee, Nagpal, Prost, Sinha,
Suresh, Beirami; ICML 2025, arXiv:2412.19792): per-prompt reward calibration against reference-policy samples,
best-of-N / worst-of-N selection under the calibrated (and transformed) reward, and win-rate estimators.

* :class:`RewardScorer`: any ``text -> float`` callable as a :class:`~hf_decoding_ext.core.scoring.Scorer`;
  :func:`vader_reward` is the bundled offline toy reward (VADER compound sentiment).
* :func:`calibrate` / :class:`RewardCalibrator`: the empirical calibrated reward
  :math:`C(x, y) = P_{z \\sim \\pi_{ref}(\\cdot|x)}[r(x, z) < r(x, y)] + \\tfrac12 P[r(x, z) = r(x, y)]` from ``M``
  reference samples of the prompt.
* :func:`transform_calibrated`: :math:`\\Phi(C)`, the paper's exponential transformation :math:`e^{tC}` or the
  identity.
* :func:`select_index`: best-of-N (argmax) / worst-of-N (argmin) under the calibrated reward.
* :class:`InfAlignDecoding`: the ``custom_generate`` loop (``n`` candidates and ``num_reference`` reference samples
  per prompt in one batched rollout, one candidate selected).
* :func:`win_rate`, :func:`order_statistic_win_rate`, :func:`expected_win_rate`: win-rate estimators (standard and
  inference-time win rate, the ``N/(N+1)`` identity).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from hf_decoding_ext.core.candidates import (
    CandidatePool,
    RerankingLoop,
    Selection,
    sample_pool,
)
from hf_decoding_ext.core.loop import GenerationState
from hf_decoding_ext.core.scoring import CallableScorer, Scorer, resolve_reward, vader_reward  # noqa: F401 (vader_reward re-exported)

MODES = ("best", "worst")
TIES = ("half", "le", "lt")
TRANSFORMS = ("exp", "identity", "none")


# ------------------------------------------------------------------------------------------------- rewards
class RewardScorer(CallableScorer):
    """A reward model as a :class:`~hf_decoding_ext.core.scoring.Scorer`: any callable ``reward(text) -> float``
    (``reward(text, prompt) -> float`` with ``uses_prompt=True``), applied to each candidate decoded with
    ``tokenizer``. Without a tokenizer the callable receives the candidate's token ids (a list of ints) and, with
    ``uses_prompt``, the prompt's token ids.

    Args:
        reward (callable or ``"vader"``, *optional*, defaults to ``"vader"``): the reward; ``"vader"`` is
            :func:`vader_reward` (needs a tokenizer).
        tokenizer (*optional*): decodes candidates (and the prompt) to text.
        uses_prompt (`bool`, *optional*, defaults to `False`): pass the prompt as a second argument.
        skip_special_tokens (`bool`, *optional*, defaults to `True`): passed to ``tokenizer.decode``.

    Example:
        >>> from hf_decoding_ext.search.infalign import RewardScorer
        >>> RewardScorer(lambda ids: float(sum(ids))).score([[1, 2], [5]]).tolist()
        [3.0, 5.0]
    """

    def __init__(self, reward: Callable[..., float] | str = "vader", tokenizer=None, uses_prompt: bool = False,
                 skip_special_tokens: bool = True):
        reward = resolve_reward(reward, tokenizer)
        if not isinstance(uses_prompt, bool):
            raise ValueError(f"uses_prompt must be a bool, got {uses_prompt!r}")
        self.reward = reward
        self.uses_prompt = uses_prompt
        fn = (lambda item, context: reward(item, context)) if uses_prompt else (lambda item, context: reward(item))
        super().__init__(fn, tokenizer=tokenizer, batched=False, skip_special_tokens=skip_special_tokens)


# ------------------------------------------------------------------------------------------------- calibration
def _as_rewards(values, what: str) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float64).detach().cpu().flatten()
    if t.numel() == 0:
        raise ValueError(f"{what} is empty")
    if torch.isnan(t).any():
        raise ValueError(f"{what} holds NaN: {t.tolist()}")
    return t


def _check_ties(ties: str) -> str:
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    return ties


def calibrate(rewards, reference_rewards, ties: str = "half") -> torch.Tensor:
    r"""The empirical calibrated reward of each reward value against reference-policy rewards of the same prompt.

    .. math:: \hat C(y) = \frac1M \sum_{j=1}^M \Big(\mathbb 1\{r(z_j) < r(y)\} + \tfrac12 \mathbb 1\{r(z_j) = r(y)\}\Big)

    the win rate of ``y`` against a reference sample with ties counted one half (``ties="half"``, the paper's win-rate
    convention, so that the calibrated reward of a reference sample has mean 1/2 even with ties); ``ties="le"``
    counts ties as wins (:math:`P[r(z) \le r(y)]`, the empirical CDF), ``ties="lt"`` as losses. With continuous
    rewards the three coincide almost surely.

    Args:
        rewards: ``(n,)`` rewards to calibrate.
        reference_rewards: ``(M,)`` rewards of ``M`` samples of the reference policy for the same prompt.
        ties: ``"half"``, ``"le"`` or ``"lt"``.

    Returns:
        ``(n,)`` float64 values in ``[0, 1]``, a non-decreasing function of the reward.

    Example:
        >>> calibrate([0.0, 0.5, 2.0], [0.0, 1.0, 1.0, 3.0]).tolist()
        [0.125, 0.25, 0.75]
    """
    r = _as_rewards(rewards, "rewards")
    ref, _ = torch.sort(_as_rewards(reference_rewards, "reference_rewards"))
    ties = _check_ties(ties)
    below = torch.searchsorted(ref, r, right=False).double()  # reference rewards < r
    at_most = torch.searchsorted(ref, r, right=True).double()  # reference rewards <= r
    wins = {"half": (below + at_most) / 2, "le": at_most, "lt": below}[ties]
    return wins / ref.numel()


class RewardCalibrator:
    """The calibrated reward of one prompt, from the rewards of ``M`` reference-policy samples (see :func:`calibrate`).

    Args:
        reference_rewards: ``(M,)`` rewards of reference samples of the prompt.
        ties (`str`, *optional*, defaults to ``"half"``): tie convention (:func:`calibrate`).

    Example:
        >>> from hf_decoding_ext.search.infalign import RewardCalibrator
        >>> cal = RewardCalibrator([0.1, 0.4, 0.7, 0.9])
        >>> cal([0.5, 1.0]).tolist()
        [0.5, 1.0]
    """

    def __init__(self, reference_rewards, ties: str = "half"):
        self.reference_rewards = torch.sort(_as_rewards(reference_rewards, "reference_rewards"))[0]
        self.ties = _check_ties(ties)

    @classmethod
    def from_texts(cls, reward: Callable[[str], float], reference_texts: Sequence[str], ties: str = "half"):
        """Calibrator from reference-policy texts scored by ``reward``."""
        if isinstance(reference_texts, str) or not len(reference_texts):
            raise ValueError("reference_texts must be a non-empty list of texts")
        return cls([reward(t) for t in reference_texts], ties=ties)

    def __len__(self) -> int:
        return self.reference_rewards.numel()

    def __call__(self, rewards) -> torch.Tensor:
        return calibrate(rewards, self.reference_rewards, self.ties)


def transform_calibrated(calibrated, transform: str = "exp", t: float = 1.0) -> torch.Tensor:
    r"""The transformed calibrated reward :math:`\Phi(C)`: ``"exp"`` is the paper's exponential transformation
    :math:`e^{tC}` (``t > 0`` for best-of-N, ``t < 0`` for worst-of-N jailbreaking), ``"identity"`` the calibrated
    reward itself. Both are monotone, so they never change a best-of-N / worst-of-N choice; they are the reward a
    KL-regularised RL step (the paper's CTRL, not implemented here) would maximise.

    Example:
        >>> [round(v, 4) for v in transform_calibrated([0.0, 0.5, 1.0], "exp", t=2.0).tolist()]
        [1.0, 2.7183, 7.3891]
    """
    c = _as_rewards(calibrated, "calibrated rewards")
    if transform == "identity":
        return c
    if transform != "exp":
        raise ValueError(f"transform must be 'exp' or 'identity' for a calibrated reward, got {transform!r}")
    return torch.exp(float(t) * c)


def select_index(calibrated, rewards, mode: str = "best") -> int:
    """Best-of-N (``mode="best"``: the highest calibrated reward) or worst-of-N (``"worst"``: the lowest) index.

    The empirical calibrated reward is a non-decreasing step function of the reward, so candidates between the same
    two reference rewards tie on it; ties are broken by the raw reward (then the first index). The choice is
    therefore exactly the raw reward's argmax (argmin), the invariance of best-of-N under any monotone transform of
    the reward, and it always lies in the calibrated reward's argmax (argmin) set.

    Example:
        >>> select_index([0.5, 0.5, 0.25], [0.3, 0.4, 0.1])
        1
        >>> select_index([0.5, 0.5, 0.25], [0.3, 0.4, 0.1], mode="worst")
        2
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    c = _as_rewards(calibrated, "calibrated rewards")
    r = _as_rewards(rewards, "rewards")
    if c.shape != r.shape:
        raise ValueError(f"calibrated rewards {tuple(c.shape)} and rewards {tuple(r.shape)} must have the same shape")
    sign = 1.0 if mode == "best" else -1.0
    key_c, key_r = sign * c, sign * r
    tied = torch.nonzero(key_c == key_c.max())[:, 0]
    return int(tied[torch.argmax(key_r[tied])])


# ------------------------------------------------------------------------------------------------- win rates
def win_rate(rewards, reference_rewards) -> float:
    r"""Standard win rate of outputs against reference outputs of the same prompt under a reward:
    :math:`\frac{1}{nM}\sum_{i,j} \mathbb 1\{r_i > r'_j\} + \tfrac12 \mathbb 1\{r_i = r'_j\}` (every pair compared).
    The same under any per-prompt monotone transform of the reward, so also under the calibrated reward; for one
    output it equals its calibrated reward against the reference rewards.

    Example:
        >>> win_rate([1.0, 3.0], [0.0, 2.0, 3.0])
        0.5833333333333334
    """
    return float(calibrate(rewards, reference_rewards, "half").mean())


def _order_statistic_pmf(sample: torch.Tensor, support: torch.Tensor, n: int, mode: str) -> torch.Tensor:
    """Distribution on ``support`` (sorted, containing every value of ``sample``) of the max (``"best"``) or min
    (``"worst"``) of ``n`` draws with replacement from the empirical distribution of ``sample``."""
    s = torch.sort(sample)[0]
    m = s.numel()
    at_most = torch.searchsorted(s, support, right=True).double() / m  # P(X <= v)
    below = torch.searchsorted(s, support, right=False).double() / m  # P(X < v)
    if mode == "best":
        return at_most ** n - below ** n
    return (1 - below) ** n - (1 - at_most) ** n


def order_statistic_win_rate(policy_rewards, reference_rewards, n: int, reference_n: int = 1,
                             mode: str = "best") -> float:
    r"""Plug-in (exact on the empirical distributions) win rate of the ``mode``-of-``n`` output of a policy against
    the ``mode``-of-``reference_n`` output of the reference policy, for one prompt:
    :math:`P[r(T_n(y)) > r(T_{n'}(z))] + \tfrac12 P[=]` with :math:`y_1..y_n` drawn from the policy's sample rewards
    and :math:`z_1..z_{n'}` from the reference's, with replacement, :math:`T` the max (best-of-N) or min
    (worst-of-N).

    ``reference_n = n`` is the paper's *inference-time win rate* (both policies decoded with the same procedure; it is
    1/2 when the policy is the reference policy); ``reference_n = 1`` the standard win rate of the best-of-N output
    against one reference sample, :math:`N/(N+1)` for the reference policy itself with continuous rewards
    (:math:`1/(N+1)` for worst-of-N). With a finite sample the plug-in includes draws of the same sample (ties),
    so it approaches these values as the sample grows.

    Example:
        >>> import torch
        >>> x = torch.linspace(0, 1, 2001)
        >>> round(order_statistic_win_rate(x, x, 4), 3)
        0.8
    """
    for name, k in (("n", n), ("reference_n", reference_n)):
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"{name} must be a positive integer, got {k!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    a = _as_rewards(policy_rewards, "policy_rewards")
    b = _as_rewards(reference_rewards, "reference_rewards")
    support = torch.unique(torch.cat([a, b]))  # sorted
    pa = _order_statistic_pmf(a, support, n, mode)
    pb = _order_statistic_pmf(b, support, reference_n, mode)
    cdf_b_below = torch.cumsum(pb, 0) - pb
    return float((pa * (cdf_b_below + 0.5 * pb)).sum())


def expected_win_rate(n: int, mode: str = "best") -> float:
    """Win rate of the best-of-``n`` (worst-of-``n``) of reference samples against one reference sample with
    continuous rewards: ``n / (n + 1)`` (``1 / (n + 1)``)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return n / (n + 1) if mode == "best" else 1 / (n + 1)


# ------------------------------------------------------------------------------------------------- the loop
class InfAlignDecoding(RerankingLoop):
    r"""Best-of-N / worst-of-N under the calibrated reward: the inference-time half of "InfAlign: Inference-aware
    language model alignment" (Balashankar et al., ICML 2025, https://arxiv.org/abs/2412.19792).

    For each prompt row, ``n`` candidates and ``num_reference`` reference samples are drawn in one batched rollout
    (:func:`~hf_decoding_ext.core.candidates.sample_pool`, all from the same proposal: the model with the caller's
    ``generate()`` sampling settings, which plays the reference policy :math:`\pi_{ref}`). Each candidate's reward
    :math:`r(x, y)` is calibrated against the reference samples' rewards,

    .. math:: C(x, y) = P_{z \sim \pi_{ref}(\cdot|x)}[r(x, z) < r(x, y)] + \tfrac12 P[r(x, z) = r(x, y)]

    (the empirical win rate of ``y`` against the reference policy, :func:`calibrate`), transformed by
    :math:`\Phi(C) = e^{tC}` (the paper's exponential transformation; ``t > 0`` for best-of-N, ``t < 0`` for
    worst-of-N jailbreaking) and the best (``mode="best"``) or worst (``mode="worst"``) candidate is returned.

    The paper's method is InfAlign-CTRL: calibrate, transform, then *train* the policy by KL-regularised RL on
    :math:`\Phi(C)` so that its best-of-N (worst-of-N) output wins more often against the reference policy's
    best-of-N (worst-of-N) output (the inference-time win rate). That RL step is out of scope here (no training);
    this loop is the inference-time procedure with the calibrated reward, and :func:`win_rate` /
    :func:`order_statistic_win_rate` measure the standard and inference-time win rates. Because :math:`C` is a
    non-decreasing function of the reward within a prompt and :math:`\Phi` is monotone, the selection is the same
    as best-of-N (worst-of-N) under the raw reward (ties of the step-function :math:`C` are broken by the raw reward:
    :func:`select_index`); calibration changes the *scores* (comparable across prompts, in ``[0, 1]``), not the
    choice. The paper's gains come from the trained policy.

    With ``return_dict_in_generate=True`` the output holds ``selection_scores`` (:math:`\Phi(C)` of each row's
    candidates, or the raw rewards with ``transform="none"``), ``candidates``, ``selected_index`` (the chosen
    candidate of each row), ``rewards`` (raw, ``(n,)`` per row),
    ``calibrated_rewards`` (``(n,)``), ``reference_rewards`` (``(num_reference,)``) and ``reference_candidates``
    (token ids).

    Args:
        n (`int`, *optional*, defaults to 4): candidates per prompt (``N``).
        num_reference (`int`, *optional*, defaults to 16): reference samples per prompt (``M``) for the calibration.
        mode (`str`, *optional*, defaults to ``"best"``): ``"best"`` (best-of-N) or ``"worst"`` (worst-of-N, the
            paper's best-of-N jailbreaking model of an adversary).
        reward (callable, :class:`~hf_decoding_ext.core.scoring.Scorer` or ``"vader"``, *optional*, defaults to
            ``"vader"``): the reward model. A callable receives the decoded text (token ids without a tokenizer);
            a ``Scorer`` receives the token ids and the prompt's token ids; ``"vader"`` is :func:`vader_reward`.
        tokenizer (*optional*): decodes candidates for a text reward.
        transform (`str`, *optional*, defaults to ``"exp"``): ``"exp"`` (:math:`e^{tC}`), ``"identity"`` (:math:`C`)
            or ``"none"`` (no calibration: plain best-of-N under the raw reward, the baseline).
        t (`float`, *optional*): the exponential transformation's parameter (only with ``transform="exp"``);
            defaults to 1 for ``mode="best"`` and -1 for ``"worst"``. The paper tunes ``t`` per ``N``; no value of it
            was confirmed here.
        ties (`str`, *optional*, defaults to ``"half"``): tie convention of the calibration (:func:`calibrate`).
        seed (`int`, *optional*): seed of the generator drawing candidates and references (``None``: torch's global
            generator).

    Example:
        >>> from hf_decoding_ext import encode_prompts, load_model
        >>> from hf_decoding_ext.search.infalign import InfAlignDecoding
        >>> model, tokenizer = load_model()  # doctest: +SKIP
        >>> inputs = encode_prompts(tokenizer, "Tell me about your weekend.")  # doctest: +SKIP
        >>> loop = InfAlignDecoding(n=4, num_reference=16, tokenizer=tokenizer, seed=0)  # doctest: +SKIP
        >>> out = model.generate(**inputs, do_sample=True, top_k=0, max_new_tokens=32, custom_generate=loop,
        ...                      return_dict_in_generate=True)  # doctest: +SKIP
        >>> out.calibrated_rewards[0], out.reference_rewards[0]  # doctest: +SKIP

    Deviations and stand-ins:
        * Inference half only: the InfAlign-CTRL policy training (KL-regularised RL on the transformed calibrated
          reward) is not implemented; at inference the calibrated selection equals raw best-of-N (see above).
        * Reward: VADER compound sentiment (``vaderSentiment``, lexicon bundled) stands in for the paper's learned
          helpfulness / harmlessness reward models; any callable can replace it.
        * Reference policy: the model under the caller's sampling settings (temperature, top-k/top-p apply to the
          reference samples too); the paper's reference policy is the SFT model sampled at temperature 1.
        * Calibration uses ``num_reference`` fresh samples per prompt drawn in the same rollout as the candidates
          (the paper computes the calibrated reward from reference samples per prompt; its sample count was not
          confirmed here). Ties count one half (the paper's win-rate convention; see ``ties``).
        * ``t`` of the exponential transformation defaults to +-1 (not the paper's tuned values); it changes the
          reported scores, never the choice.
        * No official code exists. Confirmed from the paper's abstract (v5): the calibrate-then-transform structure,
          best-of-N and best-of-N jailbreaking as the inference-time procedures, the inference-time win rate against
          the base model as the objective. From the implementation brief, not re-checked against the full text: the
          form of the calibrated reward, the exponential transformation and the one-half tie convention.
    """

    def __init__(self, n: int = 4, num_reference: int = 16, mode: str = "best",
                 reward: Callable[..., float] | Scorer | str = "vader", tokenizer=None, transform: str = "exp",
                 t: float | None = None, ties: str = "half", seed: int | None = None):
        super().__init__(n=n, seed=seed)
        if not isinstance(num_reference, int) or isinstance(num_reference, bool) or num_reference < 1:
            raise ValueError(f"num_reference must be a positive integer, got {num_reference!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if transform not in TRANSFORMS:
            raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")
        if t is not None:
            if transform != "exp":
                raise ValueError(f"t={t!r} applies to transform='exp' only, got transform={transform!r}")
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t == 0:
                raise ValueError(f"t must be a finite non-zero number, got {t!r}")
        self.num_reference = num_reference
        self.mode = mode
        self.transform = transform
        self.t = float(t) if t is not None else (1.0 if mode == "best" else -1.0)
        self.ties = _check_ties(ties)
        if isinstance(reward, Scorer):
            self.scorer = reward
        else:
            self.scorer = RewardScorer(reward, tokenizer=tokenizer)

    def pools(self, state: GenerationState) -> list[CandidatePool]:
        """Draw ``n + num_reference`` samples per row in one rollout; keep the first ``n`` as the candidates and the
        rest as the row's reference samples (stored on the state for :meth:`select`)."""
        generator = None
        if self.seed is not None:
            generator = torch.Generator(device=state.device).manual_seed(self.seed)
        steps = state.scores is not None or state.logits is not None
        total = self.n + self.num_reference
        both = sample_pool(state, total, generator=generator, return_steps=steps)
        candidates, references = [], []
        for pool in both:
            parts = []
            for sl in (slice(0, self.n), slice(self.n, total)):
                parts.append(CandidatePool(
                    tokens=pool.tokens[sl], logprobs=pool.logprobs[sl], proposal_logprobs=pool.proposal_logprobs[sl],
                    ends=pool.ends[sl], prompt=pool.prompt,
                    step_scores=pool.step_scores[sl] if steps else None,
                    step_logits=pool.step_logits[sl] if steps else None))
            candidates.append(parts[0])
            references.append(parts[1])
        state.infalign_references = references
        state.infalign_trace = [None] * len(candidates)
        return candidates

    def rewards(self, tokens: list[list[int]], prompt: torch.Tensor) -> torch.Tensor:
        """Raw rewards of candidate token lists of one prompt, ``(k,)`` float64."""
        return self.scorer.score(tokens, prompt).double()

    def select(self, pool: CandidatePool, state: GenerationState, row: int) -> Selection:
        reference = state.infalign_references[row]
        rewards = self.rewards(pool.tokens, pool.prompt)
        ref_rewards = self.rewards(reference.tokens, pool.prompt)
        calibrated = calibrate(rewards, ref_rewards, self.ties)
        index = select_index(calibrated, rewards, self.mode)
        if self.transform == "none":
            scores = rewards
        else:
            scores = transform_calibrated(calibrated, self.transform, self.t)
        extra = {"selected_index": index, "rewards": rewards, "calibrated_rewards": calibrated,
                 "reference_rewards": ref_rewards, "reference_candidates": reference.tokens}
        state.infalign_trace[row] = extra
        return Selection(index, scores.float(), extra)

    def run(self, state: GenerationState) -> dict[str, Any]:
        out = super().run(state)
        for key in ("selected_index", "rewards", "calibrated_rewards", "reference_rewards", "reference_candidates"):
            out[key] = [trace[key] for trace in state.infalign_trace]
        return out
