"""Thompson-sampling control of the draft length (EESD's Beta-TS and a calibrated variant), for any chain drafter.

EESD (Liu, Wang, Wang, Cai, "Speculative Decoding via Early-exiting for Faster LLM Inference with Thompson Sampling
Control Mechanism", Findings of ACL 2024, arXiv 2406.03853) decides after every draft token whether to draft one more,
by Thompson sampling: the acceptance of a draft token is modelled as a Bernoulli trial of unknown rate ``theta`` with a
conjugate ``Beta(alpha, beta)`` prior; before each further token a rate is *sampled* from the posterior and drafting
continues with that probability; after each verification the posterior is updated with the observed acceptances.
The sampled rate explores while the posterior is wide and settles on the measured acceptance as evidence grows, so the
expected draft length follows the acceptance of the text being generated.

:class:`ThompsonLength` is a :class:`~hf_decoding_ext.speculative.policies.draft_length.DraftLengthPolicy`: a drafter
calls :meth:`~ThompsonLength.length` (the cap), :meth:`~ThompsonLength.stop` after each drafted token with the
drafter's probability of it, and :meth:`~ThompsonLength.update` after verification, like transformers' schedules.

Example:
    >>> from hf_decoding_ext.speculative.policies.thompson import ThompsonLength
    >>> policy = ThompsonLength(num_tokens=8, seed=0)
    >>> policy.begin()
    >>> for _ in range(200):  # 90% of the verified tokens accepted
    ...     policy.update(num_drafted=10, num_accepted=9)
    >>> round(policy.posterior_mean(), 2)
    0.9
"""

from __future__ import annotations

import math

import torch

from hf_decoding_ext.speculative.policies.draft_length import DraftLengthPolicy

__all__ = ["ThompsonLength", "expected_draft_length"]


def expected_draft_length(theta: float, num_tokens: int) -> float:
    """Expected length of a draft that always drafts one token, continues after each with probability ``theta`` and
    stops at ``num_tokens``: ``(1 - theta ** num_tokens) / (1 - theta)`` (``num_tokens`` at ``theta = 1``).

    Example:
        >>> expected_draft_length(0.5, 4)
        1.875
    """
    if not 0 <= theta <= 1:
        raise ValueError(f"theta must be in [0, 1], got {theta!r}")
    if theta == 1:
        return float(num_tokens)
    return (1 - theta ** num_tokens) / (1 - theta)


class ThompsonLength(DraftLengthPolicy):
    """Thompson-sampling draft-length controller (EESD's Beta-TS; ``mode="calibration"``: a calibrated variant).

    ``mode="beta"`` (Beta-TS): one ``Beta(alpha, beta)`` posterior of the per-token acceptance rate. After each drafted
    token, :meth:`stop` samples ``theta ~ Beta(alpha, beta)`` and continues with probability ``theta`` (a Bernoulli
    draw). :meth:`update` adds the accepted tokens to ``alpha`` and the first rejected token (if any) to ``beta``; the
    tokens after the first rejection are never compared with the target, so they are not counted (the posterior of an
    i.i.d. acceptance rate under that censoring).

    ``mode="calibration"``: one Beta posterior per bin of the drafter's own probability of its token (``bins`` equal
    bins of ``[0, 1]``), i.e. a Bayesian calibration of the drafter's confidence into an acceptance rate; :meth:`stop`
    samples from the posterior of the current token's bin. The bins are updated from the probabilities :meth:`stop`
    saw, token by token (accepted tokens succeed, the first rejected one fails).

    Args:
        num_tokens: the cap on a draft's length (``>= 1``; EESD drafts until the controller stops).
        alpha, beta: the Beta prior (default ``Beta(1, 1)``, uniform).
        mode: ``"beta"`` or ``"calibration"``.
        bins: confidence bins of ``mode="calibration"``.
        transient: reset the posterior at every :meth:`begin` (each ``generate()`` call: per instance, as EESD
            adapts per instance); ``False`` keeps it across calls.
        seed: seed of the policy's own random generator (``None``: torch's global generator).

    Deviations from the paper: the paper's exact Calibration-TS rule (how the draft token's calibrated confidence
    enters the sampled rate) was not available offline; the calibrated mode here is a per-confidence-bin Beta
    posterior. The Beta-TS rule above (sample the rate, continue by a Bernoulli draw, update with accepted/rejected
    counts) follows the paper's description; its defaults (prior, cap) could not be confirmed (``Beta(1, 1)``,
    ``num_tokens=10`` here).

    Example:
        >>> policy = ThompsonLength(num_tokens=6, alpha=1.0, beta=1.0, seed=0)
        >>> policy.update(num_drafted=4, num_accepted=2)  # two accepted, the third rejected
        >>> policy.alpha, policy.beta
        (3.0, 2.0)
    """

    name = "thompson"

    def __init__(self, num_tokens: int = 10, alpha: float = 1.0, beta: float = 1.0, mode: str = "beta",
                 bins: int = 10, transient: bool = True, seed: int | None = None):
        super().__init__(num_tokens, 0.0)
        for label, value in (("alpha", alpha), ("beta", beta)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
                raise ValueError(f"{label} must be a finite number > 0, got {value!r}")
        if mode not in ("beta", "calibration"):
            raise ValueError(f"mode must be 'beta' or 'calibration', got {mode!r}")
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
            raise ValueError(f"bins must be an int >= 1, got {bins!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        self.prior = (float(alpha), float(beta))
        self.mode = mode
        self.bins = bins
        self.transient = bool(transient)
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.reset()

    # ------------------------------------------------------------------------------------------------ state
    def reset(self) -> None:
        """Back to the prior (and the seeded generator to its start)."""
        self.alpha, self.beta = self.prior
        self.bin_alpha = [self.prior[0]] * self.bins
        self.bin_beta = [self.prior[1]] * self.bins
        self._pending: list[float] = []
        self.history: list[tuple[int, int]] = []  # (drafted, accepted) per update
        if self.seed is not None:
            self._generator = torch.Generator().manual_seed(self.seed)

    def begin(self) -> None:
        if self.transient:
            self.reset()
        self._pending = []

    def _bin(self, probability: float) -> int:
        return min(self.bins - 1, max(0, int(probability * self.bins)))

    def posterior(self, probability: float | None = None) -> tuple[float, float]:
        """``(alpha, beta)`` of the posterior the next decision samples from (``mode="calibration"``: the bin of
        ``probability``)."""
        if self.mode == "calibration" and probability is not None:
            b = self._bin(float(probability))
            return self.bin_alpha[b], self.bin_beta[b]
        return self.alpha, self.beta

    def posterior_mean(self, probability: float | None = None) -> float:
        """The posterior mean acceptance rate ``alpha / (alpha + beta)``."""
        a, b = self.posterior(probability)
        return a / (a + b)

    def sample_rate(self, probability: float | None = None) -> float:
        """One Thompson sample of the acceptance rate from :meth:`posterior`."""
        a, b = self.posterior(probability)
        x = torch._standard_gamma(torch.tensor([a, b], dtype=torch.float64), generator=self._generator) \
            if self._generator is not None else torch._standard_gamma(torch.tensor([a, b], dtype=torch.float64))
        return float(x[0] / (x[0] + x[1]))

    def _uniform(self) -> float:
        return float(torch.rand((), generator=self._generator, dtype=torch.float64))

    # ------------------------------------------------------------------------------------------------ policy
    def continue_probability(self, probability: float | None = None) -> float:
        """Expected probability of drafting one more token (the posterior mean of the sampled rate)."""
        return self.posterior_mean(probability)

    def expected_length(self) -> float:
        """Expected draft length under Beta-TS with the current posterior mean (see :func:`expected_draft_length`)."""
        return expected_draft_length(self.posterior_mean(), self.num_tokens)

    def stop(self, probability: float) -> bool:
        """Thompson decision after a drafted token the drafter gave ``probability``: sample a rate from the posterior
        and stop unless a Bernoulli draw of that rate says continue."""
        probability = float(probability)
        if not 0 <= probability <= 1 or math.isnan(probability):
            raise ValueError(f"probability must be in [0, 1], got {probability!r}")
        self._pending.append(probability)
        rate = self.sample_rate(probability if self.mode == "calibration" else None)
        return self._uniform() >= rate

    def _update(self, num_drafted: int, num_accepted: int) -> None:
        self.history.append((num_drafted, num_accepted))
        rejected = 1 if num_accepted < num_drafted else 0
        self.alpha += num_accepted
        self.beta += rejected
        seen = self._pending[:num_drafted] if len(self._pending) >= num_drafted else self._pending
        for i, p in enumerate(seen[: num_accepted + rejected]):
            b = self._bin(p)
            if i < num_accepted:
                self.bin_alpha[b] += 1
            else:
                self.bin_beta[b] += 1
        self._pending = []

    def __repr__(self) -> str:
        return (f"ThompsonLength(num_tokens={self.num_tokens}, mode={self.mode!r}, alpha={self.alpha:g}, "
                f"beta={self.beta:g})")
