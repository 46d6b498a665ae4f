r"""The consensus game and Equilibrium-Ranking (Jacob, Shen, Farina and Andreas, ICLR 2024, arXiv 2310.09139).

One language model is queried two ways about a question :math:`x` and a set of candidate answers :math:`Y`:
*generatively* (which answer would it give if asked for a correct / an incorrect one?) and *discriminatively*
(is this answer correct?). The paper makes the two queries players of a signalling game, the consensus game:
nature draws a correctness value :math:`v \in \{\text{correct}, \text{incorrect}\}` (uniformly), the generator sees
:math:`v` and picks an answer :math:`y \in Y`, the discriminator sees :math:`y` (not :math:`v`) and guesses
:math:`v`; both score 1 when the guess is right. Each player is also penalised by the KL divergence of its policy
from its initial, LM-derived policy (weights :math:`\lambda_G, \lambda_D`). The regularised equilibrium is found
with piKL no-regret dynamics (regularised Hedge):

.. math::
    Q_G^{(t)}(y \mid v) = \frac{p(v)}{t}\sum_{\tau \le t} \pi_D^{(\tau)}(v \mid y), \qquad
    \pi_G^{(t+1)}(y \mid v) \propto \exp\Big\{\frac{Q_G^{(t)}(y \mid v) + \lambda_G \log \pi_G^{(1)}(y \mid v)}
    {1/(\eta_G t) + \lambda_G}\Big\}

and symmetrically for the discriminator with :math:`Q_D^{(t)}(v \mid y) = \frac{p(v)}{t}\sum_{\tau\le t}
\pi_G^{(\tau)}(y \mid v)`. Candidates are ranked by the equilibrium generator :math:`\pi_G(y \mid x,
\text{correct})` (ER-G) or discriminator :math:`\pi_D(\text{correct} \mid x, y)` (ER-D).

This module holds

* the game itself, pure tensor maths on a few small matrices (:func:`consensus_game`, batched over leading
  dimensions, with a convergence trace: policy change, average regularised regret of each player, and the
  generator-discriminator agreement);
* the initial policies from the LM (:func:`lm_scores`, :func:`initial_policies`; two prompt templates on the
  same model) and the one-call ranking API :func:`rank_candidates` (question + candidate answers -> ER-G / ER-D);
* :class:`EquilibriumRanking`, the ``custom_generate`` loop: sample ``n`` answers, play the game on them, return
  the one ranked first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from hf_decoding_ext.core.candidates import CandidatePool, RerankingLoop, Selection
from hf_decoding_ext.core.loop import GenerationState
from hf_decoding_ext.core.scoring import continuation_token_log_probs

CORRECT, INCORRECT = 0, 1
"""Index of the correctness values ``v`` in every policy tensor (generator rows, discriminator columns)."""

_TINY = 1e-300  # log(0) guard: a zero initial probability stays (numerically) zero under the dynamics

CHAT_GENERATOR_TEMPLATES = ("{question}\nGive a correct answer.", "{question}\nGive an incorrect answer.")
"""User turns asking for a correct / an incorrect answer (chat models); the candidate is the assistant's reply."""
CHAT_DISCRIMINATOR_TEMPLATE = ("Question: {question}\nProposed answer: {answer}\n"
                               "Is the proposed answer correct? Reply Yes or No.")
"""User turn asking whether an answer is correct (chat models); the verdict is the assistant's reply."""
PLAIN_GENERATOR_TEMPLATES = ("Question: {question}\nCorrect answer:", "Question: {question}\nIncorrect answer:")
"""Completion prompts for models without a chat template; the candidate follows after a space."""
PLAIN_DISCRIMINATOR_TEMPLATE = ("Question: {question}\nProposed answer: {answer}\n"
                                "Is the proposed answer correct (Yes or No)?\nAnswer:")
"""Completion prompt of the discriminator for models without a chat template; the verdict follows after a space."""


# ------------------------------------------------------------------------------------------------ the game
@dataclass
class ConsensusGameResult:
    """Policies and convergence trace of one (batch of) consensus game(s).

    Shapes: generator policies ``(..., 2, n)`` (row ``CORRECT`` = :math:`\\pi_G(\\cdot \\mid \\text{correct})`,
    each row a distribution over the ``n`` candidates); discriminator policies ``(..., n, 2)`` (each row a
    distribution over {correct, incorrect}). All float64.

    Attributes:
        generator, discriminator: the last iterate :math:`\\pi^{(T+1)}` (what ER-G / ER-D rank by).
        average_generator, average_discriminator: the average of :math:`\\pi^{(1)} .. \\pi^{(T)}`.
        initial_generator, initial_discriminator: :math:`\\pi^{(1)}`.
        trace: ``"policy_change"`` ``(T, ...)``: max absolute change of either player's policy at each update;
            ``"regret_generator"`` / ``"regret_discriminator"`` ``(T, ...)``: each player's average regret after
            ``t`` iterations for its *regularised* utility (expected payoff minus :math:`\\lambda` KL to the
            initial policy, summed over its information sets; what piKL has no regret for); ``"agreement"``
            ``(T+1, ...)``: Jensen-Shannon divergence (nats) between :math:`\\pi_G(\\cdot \\mid \\text{correct})` and
            :math:`\\pi_D(\\text{correct} \\mid \\cdot)` normalised over the candidates, index 0 for the initial
            policies. Empty when the game ran with ``trace=False``.
        settings: the hyper-parameters the game ran with.
    """

    generator: torch.Tensor
    discriminator: torch.Tensor
    average_generator: torch.Tensor
    average_discriminator: torch.Tensor
    initial_generator: torch.Tensor
    initial_discriminator: torch.Tensor
    trace: dict[str, torch.Tensor] = field(default_factory=dict)
    settings: dict[str, float] = field(default_factory=dict)

    @property
    def er_g(self) -> torch.Tensor:
        """ER-G scores :math:`\\pi_G(y \\mid x, \\text{correct})`, ``(..., n)``."""
        return self.generator[..., CORRECT, :]

    @property
    def er_d(self) -> torch.Tensor:
        """ER-D scores :math:`\\pi_D(\\text{correct} \\mid x, y)`, ``(..., n)``."""
        return self.discriminator[..., :, CORRECT]

    def ranking(self, which: str = "ER-G") -> torch.Tensor:
        """The ``"ER-G"`` or ``"ER-D"`` scores (:func:`_check_ranking` names)."""
        return self.er_g if _check_ranking(which) == "ER-G" else self.er_d


def _check_ranking(which) -> str:
    key = str(which).upper().replace("_", "-")
    if key not in ("ER-G", "ER-D"):
        raise ValueError(f"ranking must be 'ER-G' (equilibrium generator) or 'ER-D' (equilibrium discriminator), "
                         f"got {which!r}")
    return key


def _check_lambda(name: str, value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a non-negative number (math.inf allowed), got {value!r}") from None
    if math.isnan(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative number (math.inf allowed), got {value!r}")
    return value


def _check_eta(name: str, value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value


def _check_iterations(value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"iterations must be a positive integer, got {value!r}")
    return value


def _check_prior(value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"prior_correct must be a probability in (0, 1), got {value!r}") from None
    if not 0.0 < value < 1.0:
        raise ValueError(f"prior_correct must be a probability in (0, 1), got {value!r}")
    return value


def _check_policy(name: str, policy) -> torch.Tensor:
    p = torch.as_tensor(policy, dtype=torch.float64)
    if p.dim() < 2:
        raise ValueError(f"{name} must have at least 2 dimensions, got shape {tuple(p.shape)}")
    if not torch.isfinite(p).all() or (p < 0).any():
        raise ValueError(f"{name} must hold finite non-negative probabilities")
    if not torch.allclose(p.sum(-1), torch.ones((), dtype=torch.float64), atol=1e-6):
        raise ValueError(f"every row of {name} (last dimension) must sum to 1, got sums {p.sum(-1).flatten()[:4]}")
    return p


def _kl(p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    return (torch.special.xlogy(p, p) - p * log_q).sum(-1)


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (nats) between distributions on the last dimension."""
    m = 0.5 * (p + q)
    log_m = torch.log(m.clamp_min(_TINY))
    return 0.5 * _kl(p, log_m) + 0.5 * _kl(q, log_m)


def agreement(generator: torch.Tensor, discriminator: torch.Tensor) -> torch.Tensor:
    """JS divergence between :math:`\\pi_G(\\cdot \\mid \\text{correct})` and :math:`\\pi_D(\\text{correct} \\mid
    \\cdot)` normalised over the candidates (0 = the two players rank and weigh the candidates alike)."""
    g = generator[..., CORRECT, :]
    d = discriminator[..., :, CORRECT]
    return js_divergence(g, d / d.sum(-1, keepdim=True).clamp_min(_TINY))


def consensus_game(initial_generator, initial_discriminator, *, lambda_g: float = 0.1, lambda_d: float = 0.1,
                   eta_g: float = 0.1, eta_d: float = 0.1, iterations: int = 5000, prior_correct: float = 0.5,
                   trace: bool = True) -> ConsensusGameResult:
    r"""Run the piKL no-regret dynamics of the regularised consensus game (Eq. 1-2 of the paper).

    Both players update simultaneously: at iteration :math:`t = 1..T` the generator's average utility is
    :math:`Q_G^{(t)}(y \mid v) = p(v)\,\frac1t\sum_{\tau\le t}\pi_D^{(\tau)}(v \mid y)` (the payoff of answering
    :math:`y` to :math:`v` against the discriminator's past policies, weighted by nature's prior of :math:`v`) and
    its next policy is :math:`\pi_G^{(t+1)} \propto \exp\{(Q_G^{(t)} + \lambda_G \log\pi_G^{(1)}) / (1/(\eta_G t) +
    \lambda_G)\}`; the discriminator likewise with :math:`Q_D^{(t)}(v \mid y) = p(v)\,\frac1t\sum_{\tau\le t}
    \pi_G^{(\tau)}(y \mid v)`. ``lambda = math.inf`` keeps a player at its initial policy (the limit of the
    update); ``lambda = 0`` is plain Hedge.

    Args:
        initial_generator: :math:`\pi_G^{(1)}(y \mid x, v)`, ``(..., 2, n)``; row 0 conditioned on "correct", row 1
            on "incorrect"; each row sums to 1.
        initial_discriminator: :math:`\pi_D^{(1)}(v \mid x, y)`, ``(..., n, 2)``; each row sums to 1.
        lambda_g, lambda_d: KL-regularisation weights towards the initial policies (paper: 0.1).
        eta_g, eta_d: learning rates (paper: 0.1).
        iterations: number of updates :math:`T` (paper: 5000); the result is :math:`\pi^{(T+1)}`.
        prior_correct: nature's probability of "correct" (paper: uniform, 0.5).
        trace: record the convergence trace (about twice the cost of the dynamics alone).

    Returns:
        a :class:`ConsensusGameResult`.

    Example:
        >>> import torch
        >>> g = torch.tensor([[0.6, 0.4], [0.5, 0.5]])  # the generator slightly prefers candidate 0 when asked for a correct one
        >>> d = torch.tensor([[0.3, 0.7], [0.6, 0.4]])  # the discriminator finds candidate 1 more likely correct
        >>> res = consensus_game(g, d, iterations=200)
        >>> res.er_g.shape, bool(res.trace["agreement"][-1] < res.trace["agreement"][0])
        (torch.Size([2]), True)
    """
    g1 = _check_policy("initial_generator", initial_generator)
    d1 = _check_policy("initial_discriminator", initial_discriminator)
    if g1.shape[-2] != 2 or d1.shape[-1] != 2:
        raise ValueError(f"initial_generator must be (..., 2, n) and initial_discriminator (..., n, 2); got "
                         f"{tuple(g1.shape)} and {tuple(d1.shape)}")
    if g1.shape[-1] != d1.shape[-2] or g1.shape[:-2] != d1.shape[:-2]:
        raise ValueError(f"the players' policies disagree on the candidates or batch: {tuple(g1.shape)} vs "
                         f"{tuple(d1.shape)}")
    lambda_g, lambda_d = _check_lambda("lambda_g", lambda_g), _check_lambda("lambda_d", lambda_d)
    eta_g, eta_d = _check_eta("eta_g", eta_g), _check_eta("eta_d", eta_d)
    iterations = _check_iterations(iterations)
    prior_correct = _check_prior(prior_correct)

    # The dynamics run in NumPy float64: a few tiny matrices per iteration, where NumPy's per-call overhead is a
    # fraction of torch's (5000 iterations in well under a second).
    device = g1.device
    g1n, d1n = g1.detach().cpu().numpy(), d1.detach().cpu().numpy()
    prior = np.array([prior_correct, 1.0 - prior_correct])[:, None]  # (2, 1): p(v) on the generator's rows
    log_g1, log_d1 = np.log(np.maximum(g1n, _TINY)), np.log(np.maximum(d1n, _TINY))
    g, d = g1n.copy(), d1n.copy()
    cum_u_g, cum_u_d = np.zeros_like(g1n), np.zeros_like(d1n)
    sum_g, sum_d = np.zeros_like(g1n), np.zeros_like(d1n)
    realised_g = np.zeros(g1n.shape[:-2])
    realised_d = np.zeros(g1n.shape[:-2])
    n_batch = realised_g.shape
    changes = np.zeros((iterations, *n_batch)) if trace else None
    regrets_g = np.zeros((iterations, *n_batch)) if trace else None
    regrets_d = np.zeros((iterations, *n_batch)) if trace else None
    agreements = np.zeros((iterations + 1, *n_batch)) if trace else None
    if trace:
        agreements[0] = _np_agreement(g, d)
    for t in range(1, iterations + 1):
        u_g = prior * np.swapaxes(d, -1, -2)  # (..., 2, n): p(v) * pi_D^(t)(v | y)
        u_d = np.swapaxes(prior * g, -1, -2)  # (..., n, 2): p(v) * pi_G^(t)(y | v)
        cum_u_g += u_g
        cum_u_d += u_d
        sum_g += g
        sum_d += d
        new_g = _np_pikl(cum_u_g, t, log_g1, lambda_g, eta_g)
        new_d = _np_pikl(cum_u_d, t, log_d1, lambda_d, eta_d)
        if trace:
            i = t - 1
            for player, pol, u, log1, lam, cum, realised, regrets in (
                    ("g", g, u_g, log_g1, lambda_g, cum_u_g, realised_g, regrets_g),
                    ("d", d, u_d, log_d1, lambda_d, cum_u_d, realised_d, regrets_d)):
                if math.isinf(lam):
                    continue  # the player never leaves its initial policy: no regret
                realised += ((pol * u).sum(-1) - lam * _np_kl(pol, log1)).sum(-1)
                regrets[i] = _np_best_value(cum / t, log1, lam).sum(-1) - realised / t
            changes[i] = np.maximum(np.abs(new_g - g).max((-1, -2)), np.abs(new_d - d).max((-1, -2)))
            agreements[t] = _np_agreement(new_g, new_d)
        g, d = new_g, new_d

    def back(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    traces = {}
    if trace:
        traces = {"policy_change": back(changes), "regret_generator": back(regrets_g),
                  "regret_discriminator": back(regrets_d), "agreement": back(agreements)}
    return ConsensusGameResult(
        generator=back(g), discriminator=back(d), average_generator=back(sum_g / iterations),
        average_discriminator=back(sum_d / iterations), initial_generator=g1, initial_discriminator=d1,
        trace=traces, settings={"lambda_g": lambda_g, "lambda_d": lambda_d, "eta_g": eta_g, "eta_d": eta_d,
                                    "iterations": iterations, "prior_correct": prior_correct})


def _np_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(-1, keepdims=True)
    return x


def _np_pikl(cum_u: np.ndarray, t: int, log_init: np.ndarray, lam: float, eta: float) -> np.ndarray:
    """piKL-Hedge's policy after ``t`` iterations: softmax((Q + lam log init) / (1/(eta t) + lam)), Q = cum_u / t."""
    if math.isinf(lam):
        return _np_softmax(log_init.copy())
    den = 1.0 / (eta * t) + lam
    return _np_softmax(cum_u * (1.0 / (t * den)) + log_init * (lam / den))


def _np_kl(p: np.ndarray, log_q: np.ndarray) -> np.ndarray:
    return (p * (np.log(np.maximum(p, _TINY)) - log_q)).sum(-1)  # 0 log 0 = 0


def _np_best_value(q: np.ndarray, log_init: np.ndarray, lam: float) -> np.ndarray:
    """``max_pi <pi, q> - lam KL(pi || init)`` per row: ``lam * logsumexp(log init + q / lam)`` (``max q`` at
    ``lam = 0``)."""
    if lam == 0:
        return q.max(-1)
    z = log_init + q / lam
    m = z.max(-1, keepdims=True)
    return lam * (m[..., 0] + np.log(np.exp(z - m).sum(-1)))


def _np_agreement(g: np.ndarray, d: np.ndarray) -> np.ndarray:
    p = g[..., CORRECT, :]
    q = d[..., :, CORRECT]
    q = q / np.maximum(q.sum(-1, keepdims=True), _TINY)
    log_m = np.log(np.maximum(0.5 * (p + q), _TINY))
    return 0.5 * _np_kl(p, log_m) + 0.5 * _np_kl(q, log_m)


# ------------------------------------------------------------------------------------------------ initial policies
INITIAL_NORMALISATIONS = ("paper", "plain")


def initial_policies(generator_logprobs, discriminator_logprobs, normalisation: str = "paper"):
    r"""The players' initial policies from the LM's scores.

    Args:
        generator_logprobs: :math:`\log P_{LM}(y \mid x, v)`, ``(..., 2, n)`` (row 0: the "correct" prompt).
        discriminator_logprobs: :math:`\log P_{LM}(v \mid x, y)` (the verdict's log-probability, any
            normalisation), ``(..., n, 2)``.
        normalisation: ``"paper"``: :math:`\pi_G^{(1)}(y \mid x, v) \propto P_{LM}(y \mid x, v) / \sum_{v'}
            P_{LM}(y \mid x, v')` and :math:`\pi_D^{(1)}(v \mid x, y) \propto P_{LM}(v \mid x, y) / \sum_{y'}
            P_{LM}(v \mid x, y')` (each then normalised over :math:`Y`, resp. over :math:`v`), as we read the
            paper's Section 3 (not confirmed against its text here, see :class:`EquilibriumRanking`); ``"plain"``:
            :math:`P_{LM}(y \mid x, v)` normalised over :math:`Y` and :math:`P_{LM}(v \mid x, y)` over
            :math:`v` only.

    Returns:
        ``(initial_generator (..., 2, n), initial_discriminator (..., n, 2))``, float64.
    """
    if normalisation not in INITIAL_NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {INITIAL_NORMALISATIONS}, got {normalisation!r}")
    lg = torch.as_tensor(generator_logprobs, dtype=torch.float64)
    ld = torch.as_tensor(discriminator_logprobs, dtype=torch.float64)
    if lg.dim() < 2 or lg.shape[-2] != 2 or ld.dim() < 2 or ld.shape[-1] != 2 or lg.shape[-1] != ld.shape[-2]:
        raise ValueError(f"generator_logprobs must be (..., 2, n) and discriminator_logprobs (..., n, 2); got "
                         f"{tuple(lg.shape)} and {tuple(ld.shape)}")
    if normalisation == "paper":
        lg = lg - torch.logsumexp(lg, dim=-2, keepdim=True)  # divide by sum over v'
        ld = ld - torch.logsumexp(ld, dim=-2, keepdim=True)  # divide by sum over y'
    return torch.softmax(lg, dim=-1), torch.softmax(ld, dim=-1)


# ------------------------------------------------------------------------------------------------ LM scores
def _uses_chat(tokenizer, chat: bool | None) -> bool:
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if chat is None:
        return has_template
    if chat and not has_template:
        raise ValueError("chat=True but the tokenizer has no chat template; pass chat=False")
    return bool(chat)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _prompt_ids(tokenizer, text: str, chat: bool) -> list[int]:
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
        return _encode(tokenizer, text)
    ids = list(tokenizer(text)["input_ids"])  # the tokenizer's own special tokens (bos), as for a plain prompt
    return ids


def continuation_logprobs(model, prefixes: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
                          batch_size: int = 8) -> torch.Tensor:
    """``log p_model(continuation | prefix)`` (summed over the continuation's tokens) for each pair, ``(m,)``
    float64. Batched with left padding (:func:`~hf_decoding_ext.core.scoring.continuation_token_log_probs`); an empty
    continuation scores 0."""
    per_token = continuation_token_log_probs(model, prefixes, continuations, batch_size)
    return torch.tensor([float(t.sum().double()) if t.numel() else 0.0 for t in per_token], dtype=torch.float64)


def lm_scores(model, tokenizer, question: str, answers: Sequence[str] | None = None, *,
              answer_ids: Sequence[Sequence[int]] | None = None, chat: bool | None = None,
              generator_templates: Sequence[str] | None = None, discriminator_template: str | None = None,
              verdicts: Sequence[str] = ("Yes", "No"), end_of_answer: bool = True, batch_size: int = 8):
    r"""The LM's raw scores for the consensus game on one question: :math:`\log P_{LM}(y \mid x, v)` under the two
    generator prompts and :math:`\log P_{LM}(v \mid x, y)` (the verdict word's log-probability) under the
    discriminator prompt.

    Args:
        model, tokenizer: the LM (both players are this one model).
        question: the question text :math:`x` (for multiple choice, it may list the options).
        answers: the candidate answers' texts; their tokens (plus the tokenizer's eos token when
            ``end_of_answer``) are the generator's continuation.
        answer_ids: instead of ``answers``' tokens, the candidates' token ids as the generator's continuation (the
            sampled tokens in :class:`EquilibriumRanking`); ``answers`` (the decoded texts) still fill the
            discriminator prompt.
        chat: render the prompts as a user turn of the tokenizer's chat template (``None``: when it has one).
        generator_templates: ``(correct, incorrect)`` prompt templates with a ``{question}`` field (defaults:
            :data:`CHAT_GENERATOR_TEMPLATES` / :data:`PLAIN_GENERATOR_TEMPLATES`).
        discriminator_template: template with ``{question}`` and ``{answer}`` fields (defaults:
            :data:`CHAT_DISCRIMINATOR_TEMPLATE` / :data:`PLAIN_DISCRIMINATOR_TEMPLATE`).
        verdicts: the words that mean ``(correct, incorrect)``; without a chat template they follow a space.
        end_of_answer: end each text answer with the eos token (the generator then scores "the answer is exactly
            y", not a prefix of a longer one).
        batch_size: sequences per forward.

    Returns:
        ``(generator_logprobs (2, n), discriminator_logprobs (n, 2))``, float64.
    """
    if answers is None and answer_ids is None:
        raise ValueError("pass the candidate answers (answers= texts and/or answer_ids= token ids)")
    if answers is None:
        answers = [tokenizer.decode(list(a), skip_special_tokens=True) for a in answer_ids]
    answers = [str(a) for a in answers]
    if not answers:
        raise ValueError("need at least one candidate answer")
    if answer_ids is not None and len(answer_ids) != len(answers):
        raise ValueError(f"{len(answer_ids)} answer_ids for {len(answers)} answers")
    if len(verdicts) != 2 or not all(isinstance(v, str) and v.strip() for v in verdicts):
        raise ValueError(f"verdicts must be two non-empty words (correct, incorrect), got {verdicts!r}")
    use_chat = _uses_chat(tokenizer, chat)
    gen_t = tuple(generator_templates) if generator_templates is not None else (
        CHAT_GENERATOR_TEMPLATES if use_chat else PLAIN_GENERATOR_TEMPLATES)
    disc_t = discriminator_template if discriminator_template is not None else (
        CHAT_DISCRIMINATOR_TEMPLATE if use_chat else PLAIN_DISCRIMINATOR_TEMPLATE)
    if len(gen_t) != 2 or not all("{question}" in t for t in gen_t):
        raise ValueError(f"generator_templates must be two templates with a {{question}} field, got {gen_t!r}")
    if "{question}" not in disc_t or "{answer}" not in disc_t:
        raise ValueError(f"discriminator_template needs {{question}} and {{answer}} fields, got {disc_t!r}")
    sep = "" if use_chat else " "
    if answer_ids is not None:
        conts = [[int(t) for t in a] for a in answer_ids]
    else:
        eos = [tokenizer.eos_token_id] if end_of_answer and tokenizer.eos_token_id is not None else []
        conts = [_encode(tokenizer, sep + a) + eos for a in answers]
    prefixes, continuations = [], []
    for template in gen_t:
        p = _prompt_ids(tokenizer, template.format(question=question), use_chat)
        prefixes += [p] * len(answers)
        continuations += conts
    verdict_ids = [_encode(tokenizer, sep + v) for v in verdicts]
    for a in answers:
        p = _prompt_ids(tokenizer, disc_t.format(question=question, answer=a), use_chat)
        prefixes += [p, p]
        continuations += verdict_ids
    scores = continuation_logprobs(model, prefixes, continuations, batch_size=batch_size)
    n = len(answers)
    return scores[:2 * n].view(2, n), scores[2 * n:].view(n, 2)


@dataclass
class EquilibriumRankingOutput:
    """What :func:`rank_candidates` returns: the LM scores, the game and the two rankings."""

    generator_logprobs: torch.Tensor
    discriminator_logprobs: torch.Tensor
    game: ConsensusGameResult

    @property
    def er_g(self) -> torch.Tensor:
        return self.game.er_g

    @property
    def er_d(self) -> torch.Tensor:
        return self.game.er_d


def rank_candidates(model, tokenizer, question: str, answers: Sequence[str], *, normalisation: str = "paper",
                    lambda_g: float = 0.1, lambda_d: float = 0.1, eta_g: float = 0.1, eta_d: float = 0.1,
                    iterations: int = 5000, prior_correct: float = 0.5, trace: bool = True,
                    **score_kwargs) -> EquilibriumRankingOutput:
    """Equilibrium-Ranking of candidate answers to one question: LM scores (:func:`lm_scores`, keyword arguments
    ``score_kwargs``), initial policies (:func:`initial_policies`), the game (:func:`consensus_game`).

    Example:
        >>> from hf_decoding_ext.core.models import load_model
        >>> model, tokenizer = load_model()  # doctest: +SKIP
        >>> out = rank_candidates(model, tokenizer, "What is the capital of France?",
        ...                       ["Paris", "Lyon", "Marseille", "Nice"])  # doctest: +SKIP
        >>> out.er_g.argmax(), out.er_d.argmax(), out.game.trace["policy_change"][-1]  # doctest: +SKIP
    """
    lg, ld = lm_scores(model, tokenizer, question, answers, **score_kwargs)
    g1, d1 = initial_policies(lg, ld, normalisation)
    game = consensus_game(g1, d1, lambda_g=lambda_g, lambda_d=lambda_d, eta_g=eta_g, eta_d=eta_d,
                          iterations=iterations, prior_correct=prior_correct, trace=trace)
    return EquilibriumRankingOutput(lg, ld, game)


# ------------------------------------------------------------------------------------------------ the loop
class EquilibriumRanking(RerankingLoop):
    r"""Equilibrium-Ranking, from "The Consensus Game: Language Model Generation via Equilibrium Search" (Athul Paul
    Jacob, Yikang Shen, Gabriele Farina, Jacob Andreas; ICLR 2024, https://arxiv.org/abs/2310.09139).

    A ``custom_generate`` loop (:class:`~hf_decoding_ext.core.candidates.RerankingLoop`): ``n`` answers are sampled
    for each prompt (with the caller's sampling settings, ``do_sample=True``), the consensus game is played on them
    by the same model as generator and discriminator, and the answer ranked first by the equilibrium generator
    :math:`\pi_G(y \mid x, \text{correct})` (``ranking="ER-G"``) or discriminator :math:`\pi_D(\text{correct} \mid x,
    y)` (``ranking="ER-D"``) is returned. The question :math:`x` is the prompt's last user message (cut out of a
    chat-formatted prompt with the chat template; the whole decoded prompt otherwise).

    Per candidate set: the generator's initial policy comes from :math:`\log P_{LM}(y \mid x, v)`, the candidate's
    sampled tokens scored after a "give a correct answer" and a "give an incorrect answer" prompt; the
    discriminator's from :math:`P_{LM}(v \mid x, y)`, the probability of the verdict "Yes" / "No" after an "is this
    answer correct?" prompt (:func:`lm_scores`). Both are normalised as in the paper (``initial="paper"``, see
    :func:`initial_policies`), then the regularised no-regret dynamics of :func:`consensus_game` run for
    ``iterations`` steps. For multiple-choice questions (no generation), use :func:`rank_candidates`.

    With ``return_dict_in_generate=True`` the output holds ``selection_scores`` (each row's ER scores over its
    candidates) and ``candidates`` (the sampled token ids).

    Confirmed for this implementation (public unofficial reproductions of the paper found with the search tool; the
    paper text itself was not retrievable here): the update
    :math:`\pi^{(t+1)} \propto \exp\{(Q^{(t)} + \lambda\log\pi^{(1)})/(1/(\eta t)+\lambda)\}` with the average
    utility :math:`Q^{(t)} = \frac{1}{2t}\sum_{\tau \le t}\pi_{\text{other}}^{(\tau)}` (uniform prior over
    correct / incorrect, the :math:`\tfrac12`), :math:`\lambda_G = \lambda_D = 0.1`, :math:`\eta_G = \eta_D = 0.1`,
    :math:`T = 5000`. Not confirmed (our reading of the paper): the initial policies' normalisation over
    :math:`v` (generator) and over :math:`Y` (discriminator) (``initial="plain"`` drops it); ranking by the last
    iterate rather than the average policy.

    Deviations from the paper: the prompt templates are ours (written for small chat models, see
    :data:`CHAT_GENERATOR_TEMPLATES`, :data:`CHAT_DISCRIMINATOR_TEMPLATE`); the paper used task-specific
    zero/few-shot prompts on LLaMA. The candidate set is ``n`` samples from the model under the caller's prompt, as
    the paper did for generative tasks (GSM8K), without its answer extraction / de-duplication (duplicates are
    separate actions with equal scores). No offline stand-in is needed: both players are the model itself.

    Args:
        tokenizer: the model's tokenizer (to build the two prompts; passed by the registry/CLI).
        n: candidates sampled per prompt.
        ranking: ``"ER-G"`` or ``"ER-D"``.
        lambda_g, lambda_d: KL weights towards the initial policies (paper: 0.1; ``math.inf``: the initial
            ranking).
        eta_g, eta_d: learning rates (paper: 0.1).
        iterations: no-regret iterations (paper: 5000).
        initial: ``"paper"`` or ``"plain"`` normalisation of the initial policies (:func:`initial_policies`).
        chat: use the tokenizer's chat template for the game's prompts (``None``: when it has one).
        generator_templates, discriminator_template, verdicts: the prompts (see :func:`lm_scores`).
        seed: seed of the candidates' sampling (``None``: torch's global generator).

    Example:
        >>> from hf_decoding_ext.core.models import load_model, encode_prompts
        >>> from hf_decoding_ext.search.consensus_game import EquilibriumRanking
        >>> model, tokenizer = load_model()  # doctest: +SKIP
        >>> inputs = encode_prompts(tokenizer, "What is the capital of France? Answer in one word.")  # doctest: +SKIP
        >>> out = model.generate(**inputs, do_sample=True, max_new_tokens=8,
        ...                      custom_generate=EquilibriumRanking(tokenizer, n=6, ranking="ER-D"))  # doctest: +SKIP
    """

    def __init__(self, tokenizer=None, n: int = 8, ranking: str = "ER-G", lambda_g: float = 0.1,
                 lambda_d: float = 0.1, eta_g: float = 0.1, eta_d: float = 0.1, iterations: int = 5000,
                 initial: str = "paper", chat: bool | None = None, generator_templates: Sequence[str] | None = None,
                 discriminator_template: str | None = None, verdicts: Sequence[str] = ("Yes", "No"),
                 seed: int | None = None):
        super().__init__(n=n, seed=seed)
        if tokenizer is None:
            raise ValueError("EquilibriumRanking needs the model's tokenizer (to build the generator and "
                             "discriminator prompts): EquilibriumRanking(tokenizer, ...)")
        self.tokenizer = tokenizer
        self.ranking = _check_ranking(ranking)
        self.lambda_g, self.lambda_d = _check_lambda("lambda_g", lambda_g), _check_lambda("lambda_d", lambda_d)
        self.eta_g, self.eta_d = _check_eta("eta_g", eta_g), _check_eta("eta_d", eta_d)
        self.iterations = _check_iterations(iterations)
        if initial not in INITIAL_NORMALISATIONS:
            raise ValueError(f"initial must be one of {INITIAL_NORMALISATIONS}, got {initial!r}")
        self.initial = initial
        self.chat = _uses_chat(tokenizer, chat)
        self.generator_templates = generator_templates
        self.discriminator_template = discriminator_template
        if len(verdicts) != 2 or not all(isinstance(v, str) and v.strip() for v in verdicts):
            raise ValueError(f"verdicts must be two non-empty words (correct, incorrect), got {verdicts!r}")
        self.verdicts = tuple(verdicts)

    def question(self, pool: CandidatePool) -> str:
        """The question of a pool's prompt row (its last user message)."""
        from hf_decoding_ext.core.models import task_input_from_prompt

        return task_input_from_prompt(self.tokenizer, pool.prompt.tolist())

    def play(self, pool: CandidatePool, model) -> EquilibriumRankingOutput:
        """The LM scores and the game for one pool (its sampled tokens, eos included, are the answers)."""
        lg, ld = lm_scores(model, self.tokenizer, self.question(pool), pool.texts(self.tokenizer),
                           answer_ids=pool.tokens, chat=self.chat, generator_templates=self.generator_templates,
                           discriminator_template=self.discriminator_template, verdicts=self.verdicts)
        g1, d1 = initial_policies(lg, ld, self.initial)
        game = consensus_game(g1, d1, lambda_g=self.lambda_g, lambda_d=self.lambda_d, eta_g=self.eta_g,
                              eta_d=self.eta_d, iterations=self.iterations, trace=False)
        return EquilibriumRankingOutput(lg, ld, game)

    def select(self, pool: CandidatePool, state: GenerationState, row: int) -> Selection:
        out = self.play(pool, state.model)
        scores = out.game.ranking(self.ranking).float()
        return Selection(int(scores.argmax()), scores, extra={"er_g": out.er_g, "er_d": out.er_d})


# ------------------------------------------------------------------------------------------------ data
def mc_questions(split: str | None = None) -> list[dict]:
    """The shipped multiple-choice set ``data/search/mc_questions.jsonl`` (``question``, ``options``, ``answer``
    index, ``split`` ``"dev"`` / ``"test"``); ``split=None``: all of it."""
    from hf_decoding_ext.core.resources import read_jsonl

    if split not in (None, "dev", "test"):
        raise ValueError(f"split must be None, 'dev' or 'test', got {split!r}")
    rows = read_jsonl("search", "mc_questions.jsonl")
    return [r for r in rows if split is None or r["split"] == split]


def format_mc_question(record: dict, list_options: bool = True) -> str:
    """The question text :math:`x` of a multiple-choice record, with its options listed after it (or not)."""
    if not list_options:
        return record["question"]
    return f"{record['question']}\nOptions: " + ", ".join(record["options"])
