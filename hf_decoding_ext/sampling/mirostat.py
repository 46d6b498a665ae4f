"""Mirostat sampling (v1 and v2) as a transformers ``LogitsProcessor``.

Paper: "Mirostat: A Neural Text Decoding Algorithm that Directly Controls Perplexity", Basu, Ramachandran, Keskar,
Varshney, arXiv:2007.14966.

Mirostat keeps the *observed surprise* ``-log2 p(x_t)`` of the sampled tokens close to a target ``tau`` (in bits)
with a feedback loop on a truncation threshold ``mu`` (the "maximum surprise"), initialised to ``2 * tau``:

* **v1** (Algorithm 1 of the paper) estimates the Zipf exponent ``s_hat`` of the next-token distribution from its
  ``m`` largest probabilities, ``s_hat = sum_i t_i b_i / sum_i t_i^2`` with ``t_i = log((i+1)/i)``,
  ``b_i = log(p_(i)/p_(i+1))``, ``i = 1..m-1``, and keeps the top ``k`` tokens with
  ``k = ((eps_hat 2^mu) / (1 - N^(-eps_hat)))^(1/s_hat)``, ``eps_hat = s_hat - 1``, ``N`` = vocabulary size.
* **v2** (the simplified variant of the authors' code release, also in llama.cpp) keeps the tokens whose surprise
  ``-log2 p`` is at most ``mu`` (always at least the most probable token).

After each sampled token ``x``: ``mu <- mu - eta * (S(x) - tau)``.
"""

from __future__ import annotations

import math

import torch
from transformers import LogitsProcessor

from hf_decoding_ext.core.lifecycle import StatefulLogitsProcessor

_LN2 = math.log(2.0)
FEEDBACKS = ("original", "truncated")


class MirostatLogitsProcessor(StatefulLogitsProcessor, LogitsProcessor):
    r"""
    [`LogitsProcessor`] for Mirostat sampling (v1 or v2) from "Mirostat: A Neural Text Decoding Algorithm that
    Directly Controls Perplexity" (Basu et al., arXiv:2007.14966). It truncates the next-token distribution so that
    the average surprise (in bits) of the sampled text converges to ``tau``; use it with ``do_sample=True``.

    **How the feedback works inside ``generate()``.** A logits processor only sees ``(input_ids, scores)`` and never
    the sampled token, so the ``mu`` update is done lazily: each call first reads the token that was actually appended
    (``input_ids[:, -1]``), computes its surprise under the distribution stored at the previous call, updates ``mu``
    per row, and then truncates the current ``scores``. State is per row (batch > 1 supported, each row has its own
    ``mu``). The state is reset automatically when a new generation starts (the sequence length is not the previous
    length + 1, or the batch size or vocabulary size changes) and by :meth:`reset`. Rows must keep their identity
    across steps (no beam search, whose beam reordering the processor cannot see). Rows that already finished and
    receive the pad token, which has zero probability under the stored distribution, keep their ``mu`` unchanged.
    ``mu_history`` holds ``mu`` after each call (``(batch,)`` tensors).

    **Inside this library's loops and engine** the processor follows the lifecycle of
    :class:`~hf_decoding_ext.core.lifecycle.StatefulLogitsProcessor`: trials and lookahead rollouts run on a
    :meth:`fork` of the rows they extend, and the speculative engine scores each draft-tree node with a fork that
    followed that node's path and then adopts the fork of the last accepted node, so drafted and rejected tokens
    never update ``mu``: the ``mu`` sequence is the one plain sampling of the same tokens gives.

    **Feedback distribution** (``feedback``): the paper controls the surprise of the generated text under the
    model's distribution, and the authors' code computes the observed surprise under the *pre-truncation*
    distribution: ``feedback="original"`` (default, faithful to the paper and to what it measures). llama.cpp instead
    uses the truncated, renormalised distribution: ``feedback="truncated"``; its surprise is smaller (by
    ``-log2`` of the kept mass), so ``mu`` settles higher and the surprise under the original distribution ends up
    above ``tau``. "Original" means the scores this processor receives (after any processor placed before it).

    **Ordering in ``generate()`` and the model's defaults.** transformers (``GenerationMixin._get_logits_processor``)
    puts user-supplied ``logits_processor`` entries *after* its own processors (repetition penalty, bad words,
    ...) but *before* the sampling warpers built from the generation config (temperature, top-k, top-p, min-p,
    typical, epsilon, eta). Hence:

    * pass ``top_k=0`` (and leave ``top_p=1.0``) to ``generate()``: transformers fills in ``top_k=50`` when neither
      the model's generation config nor the call sets it, and that extra top-k cut after Mirostat would change the
      sampling distribution (and bias the controlled surprise downwards when Mirostat keeps more than 50 tokens);
    * ``generate(temperature=T)`` is applied *after* Mirostat: Mirostat truncates the untempered distribution and the
      sampling then happens from the tempered, truncated one, while the feedback still uses the untempered
      distribution. To get llama.cpp's order (temperature, then Mirostat, with the feedback on the tempered
      distribution) put a ``TemperatureLogitsWarper`` *before* this processor in the list:
      ``logits_processor=[TemperatureLogitsWarper(T), MirostatLogitsProcessor(...)]`` and leave ``temperature``
      unset.

    Deviations / choices: v1 rounds ``k`` to the nearest integer and clamps it to ``[1, N]`` (the paper does not
    specify the rounding; the authors' code rounds and adds 1, llama.cpp truncates); ``s_hat = 1`` uses the limit
    ``eps_hat / (1 - N^-eps_hat) -> 1 / ln N``; terms ``b_i`` involving zero-probability tokens are skipped in the
    ``s_hat`` estimate. ``N`` is the full vocabulary size (``scores.shape[-1]``), as in the paper.

    Args:
        tau (`float`, *optional*, defaults to 3.0):
            Target surprise in bits (the paper's ``tau``; target cross-entropy). Must be > 0.
        eta (`float`, *optional*, defaults to 0.1):
            Learning rate of the ``mu`` update. Must be > 0.
        version (`int`, *optional*, defaults to 2):
            1 for Mirostat (Zipf-based top-k), 2 for Mirostat 2.0 (surprise threshold).
        m (`int`, *optional*, defaults to 100):
            Number of top probabilities used to estimate the Zipf exponent (v1 only). Must be >= 2.
        feedback (`str`, *optional*, defaults to `"original"`):
            ``"original"`` or ``"truncated"``: the distribution under which the observed surprise is computed.
        filter_value (`float`, *optional*, defaults to -inf):
            Value given to removed tokens.

    Examples:

    ```python
    >>> import torch
    >>> from hf_decoding_ext.sampling.mirostat import MirostatLogitsProcessor
    >>> proc = MirostatLogitsProcessor(tau=1.0, version=2)
    >>> scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    >>> out = proc(torch.tensor([[7]]), scores)  # mu = 2 bits: keeps tokens with -log2 p <= 2
    >>> torch.isfinite(out).tolist()
    [[True, True, False, False]]
    >>> _ = proc(torch.tensor([[7, 1]]), scores)  # token 1 (surprise 1.74 bits) was sampled: mu -= 0.1 * 0.74
    >>> round(proc.mu.item(), 3)
    1.926

    >>> from hf_decoding_ext.core.models import load_model, encode_prompts
    >>> model, tok = load_model()  # doctest: +SKIP
    >>> enc = encode_prompts(tok, ["Tell me a story."])  # doctest: +SKIP
    >>> out = model.generate(**enc, do_sample=True, top_k=0, max_new_tokens=50,
    ...                      logits_processor=[MirostatLogitsProcessor(tau=3.0)])  # doctest: +SKIP
    ```
    """

    def __init__(self, tau: float = 3.0, eta: float = 0.1, version: int = 2, m: int = 100,
                 feedback: str = "original", filter_value: float = -float("inf")):
        if not isinstance(tau, (int, float)) or isinstance(tau, bool) or not math.isfinite(tau) or tau <= 0:
            raise ValueError(f"`tau` has to be a finite float > 0 (target surprise in bits), but is {tau!r}")
        if not isinstance(eta, (int, float)) or isinstance(eta, bool) or not math.isfinite(eta) or eta <= 0:
            raise ValueError(f"`eta` has to be a finite float > 0 (learning rate), but is {eta!r}")
        if version not in (1, 2) or isinstance(version, bool):
            raise ValueError(f"`version` has to be 1 or 2, but is {version!r}")
        if not isinstance(m, int) or isinstance(m, bool) or m < 2:
            raise ValueError(f"`m` has to be an integer >= 2, but is {m!r}")
        if feedback not in FEEDBACKS:
            raise ValueError(f"`feedback` has to be one of {FEEDBACKS}, but is {feedback!r}")
        self.tau = float(tau)
        self.eta = float(eta)
        self.version = int(version)
        self.m = m
        self.feedback = feedback
        self.filter_value = filter_value
        self.reset()

    state_attributes = ("mu", "last_k", "last_surprise", "_prev_logp", "_prev_len", "mu_history")

    def copy_state(self, value):
        # state tensors are replaced, never modified in place: forks share them; the history list is copied
        return list(value) if isinstance(value, list) else value

    def select_rows(self, indices: torch.LongTensor) -> None:
        """Keep the rows ``indices`` (rows may repeat) of ``mu`` and of the stored distribution."""
        if self.mu is None:
            return
        idx = torch.as_tensor(indices, dtype=torch.long)

        def pick(t):
            return None if t is None else t[idx.to(t.device)]

        self.mu, self.last_k, self.last_surprise = pick(self.mu), pick(self.last_k), pick(self.last_surprise)
        self._prev_logp = pick(self._prev_logp)
        self.mu_history = [pick(m) for m in self.mu_history]

    def reset(self) -> None:
        """Forget all per-row state; the next call starts a new generation with ``mu = 2 * tau``."""
        self.mu: torch.Tensor | None = None
        self.last_k: torch.Tensor | None = None  # number of kept tokens per row at the last call (diagnostics)
        self.last_surprise: torch.Tensor | None = None  # observed surprise (bits) used in the last mu update
        self._prev_logp: torch.Tensor | None = None
        self._prev_len: int | None = None
        self.mu_history: list[torch.Tensor] = []  # mu after each call

    def _update_mu(self, input_ids: torch.LongTensor, vocab: int) -> None:
        batch, length = input_ids.shape
        fresh = (
            self.mu is None
            or self._prev_logp is None
            or self.mu.shape[0] != batch
            or self._prev_logp.shape[-1] != vocab
            or length != self._prev_len + 1
        )
        if fresh:
            device = input_ids.device
            self.mu = torch.full((batch,), 2.0 * self.tau, dtype=torch.float32, device=device)
            self.last_surprise = None
            self.mu_history = []
            return
        token = input_ids[:, -1].to(self._prev_logp.device).long().clamp(0, vocab - 1)
        surprise = -self._prev_logp.gather(-1, token[:, None]).squeeze(-1) / _LN2
        ok = torch.isfinite(surprise)
        self.mu = torch.where(ok, self.mu - self.eta * (surprise - self.tau), self.mu).to(torch.float32)
        self.last_surprise = surprise

    def _keep_v2(self, logp: torch.Tensor) -> torch.Tensor:
        keep = (-logp / _LN2) <= self.mu[:, None]
        return keep | (logp == logp.max(dim=-1, keepdim=True).values)

    def _keep_v1(self, logp: torch.Tensor) -> torch.Tensor:
        vocab = logp.shape[-1]
        m = min(self.m, vocab)
        top = logp.topk(m, dim=-1).values.double()  # (batch, m), descending
        i = torch.arange(1, m, device=logp.device, dtype=torch.float64)  # 1..m-1
        t = torch.log((i + 1) / i)
        b = top[:, :-1] - top[:, 1:]  # log(p_i / p_{i+1})
        valid = torch.isfinite(b)
        b = torch.where(valid, b, torch.zeros_like(b))
        tv = torch.where(valid, t.expand_as(b), torch.zeros_like(b))
        den = (tv * tv).sum(-1)
        s_hat = torch.where(den > 0, (tv * b).sum(-1) / den.clamp_min(1e-300), torch.zeros_like(den))
        eps = s_hat - 1.0
        log_n = math.log(vocab) if vocab > 1 else 1.0
        small = eps.abs() < 1e-8
        safe_eps = torch.where(small, torch.ones_like(eps), eps)
        # eps / (1 - N^-eps) > 0 for any eps != 0 (numerator and denominator share the sign)
        ratio = torch.where(small, torch.full_like(eps, 1.0 / log_n), safe_eps / (-torch.expm1(-safe_eps * log_n)))
        log_k = (torch.log(ratio) + self.mu.double() * _LN2) / s_hat.clamp_min(1e-12)
        log_k = torch.where(s_hat > 0, log_k, torch.full_like(log_k, math.inf))
        k = torch.exp(log_k.clamp(max=log_n + 1.0)).round().clamp(1, vocab).long()
        kth = logp.sort(dim=-1, descending=True).values.gather(-1, (k - 1)[:, None])
        return logp >= kth

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        vocab = scores.shape[-1]
        self._update_mu(input_ids, vocab)
        if self.mu.device != scores.device:
            self.mu = self.mu.to(scores.device)
        logp = torch.log_softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)
        keep = self._keep_v1(logp) if self.version == 1 else self._keep_v2(logp)
        keep = keep & torch.isfinite(logp) | (logp == logp.max(dim=-1, keepdim=True).values)
        self.last_k = keep.sum(-1)
        if self.feedback == "original":
            self._prev_logp = logp
        else:
            self._prev_logp = torch.log_softmax(logp.masked_fill(~keep, -float("inf")), dim=-1)
        self._prev_len = input_ids.shape[1]
        self.mu_history = self.mu_history + [self.mu]
        return scores.masked_fill(~keep, self.filter_value)


class MirostatV1LogitsProcessor(MirostatLogitsProcessor):
    r"""Mirostat (v1, Algorithm 1 of arXiv:2007.14966): Zipf-estimated top-k with surprise feedback.

    Same as [`MirostatLogitsProcessor`] with ``version=1``; see there for arguments, the lazy ``mu`` update and
    how to combine it with ``generate()`` (pass ``top_k=0``).

    Examples:

    ```python
    >>> from hf_decoding_ext.sampling.mirostat import MirostatV1LogitsProcessor
    >>> MirostatV1LogitsProcessor(tau=3.0).version
    1

    ```
    """

    def __init__(self, tau: float = 3.0, eta: float = 0.1, m: int = 100, feedback: str = "original",
                 filter_value: float = -float("inf")):
        super().__init__(tau=tau, eta=eta, version=1, m=m, feedback=feedback, filter_value=filter_value)


class MirostatV2LogitsProcessor(MirostatLogitsProcessor):
    r"""Mirostat 2.0 (arXiv:2007.14966, authors' simplified variant): keep tokens with surprise ``<= mu``.

    Same as [`MirostatLogitsProcessor`] with ``version=2``; see there for arguments, the lazy ``mu`` update and
    how to combine it with ``generate()`` (pass ``top_k=0``).

    Examples:

    ```python
    >>> from hf_decoding_ext.sampling.mirostat import MirostatV2LogitsProcessor
    >>> MirostatV2LogitsProcessor(tau=3.0).version
    2

    ```
    """

    def __init__(self, tau: float = 3.0, eta: float = 0.1, feedback: str = "original",
                 filter_value: float = -float("inf")):
        super().__init__(tau=tau, eta=eta, version=2, feedback=feedback, filter_value=filter_value)
