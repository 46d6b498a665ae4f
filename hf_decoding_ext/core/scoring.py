"""Scoring candidate continuations of a prompt: one protocol for rerankers and step-level searches.

A :class:`Scorer` maps ``n`` candidate token sequences for one context (usually the prompt's token ids) to a ``(n,)``
float32 tensor, higher is better. Rerankers (best-of-N, minimum Bayes risk, quality-aware decoding) keep the best
candidate; step-level searches score partial continuations the same way.

* :class:`LogProbScorer`: ``log p(candidate | prompt)``, the sum of the candidate's token log-probabilities (optionally
  with an end term ``log p(eos | prompt, candidate)``); batched, the prompt is run once and its cache shared by every
  chunk of candidates. It also scores under any next-token log-probability function (:data:`LogProbFn`, e.g. DoLa's
  or LOL's contrast as a scorer), one call per candidate.
* :class:`LengthNormalizedLogProbScorer`: the same divided by ``length ** alpha`` (the mean per token at
  ``alpha = 1``, transformers' beam-search ``length_penalty`` form otherwise).
* :class:`UtilityMatrixScorer` and :class:`MBRScorer`: a pairwise utility between candidates, as an ``n x n`` matrix
  computed once per candidate set; MBR's expected utility against the other candidates taken as pseudo-references.
  :func:`token_f1` and :func:`rouge_l` are utilities over token ids, so MBR runs offline; pseudo-reference
  subsampling (``num_pseudo_references``) computes only ``n x k`` utilities. :func:`utility_matrix` is the matrix
  helper (distinct pairs once, symmetry exploited, only the requested columns, batched/context-aware utilities).
* Text utilities (decoded with a tokenizer; all offline): :func:`chrf` and :func:`sentence_bleu` (sacrebleu,
  sentence level), :func:`rouge_l_text` and :func:`rouge_1_text` (rouge-score), and :class:`JudgeUtility`, a
  reference-based model-as-judge (Prometheus-style rubric prompt, probability-weighted 1-5 score; with SmolLM2 a weak
  stand-in for Prometheus-2-7B).
* :class:`CallableScorer`: any user callable (a reward model, a verifier, a regular expression), on token ids or on
  text decoded with a tokenizer.

Candidates are a list of 1-D token-id sequences (``LongTensor`` or lists of ints), or a right-padded ``(n, L)``
tensor with ``lengths=``.

Example:
    >>> from hf_decoding_ext.core.scoring import MBRScorer
    >>> candidates = [[5, 6, 7], [5, 6, 8], [5, 6, 7, 9], [1, 2]]
    >>> MBRScorer("token_f1").best(candidates)  # the medoid: closest on average to the others
    0
"""

from __future__ import annotations

import abc
import math
import numbers
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch

from hf_decoding_ext.core.loop import repeat_cache

LogProbFn = Callable[..., torch.Tensor]
"""``fn(input_ids (1, T)) -> (T, vocab)``: next-token log-probabilities at every position of one sequence (row ``t``
is the distribution of token ``t + 1``). A function with the attribute ``supports_first = True`` is called as
``fn(input_ids, first=k)`` and returns only the rows of positions ``k..T-1`` (``(T - k, vocab)``), which saves work
when only a continuation is scored."""

Utility = Callable[[Sequence[int], Sequence[int]], float]
"""``utility(hypothesis, reference) -> float``: how good ``hypothesis`` is if ``reference`` were the truth."""


# ------------------------------------------------------------------------------------------------- arguments
def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _as_ids(seq, what: str) -> torch.Tensor:
    """A 1-D sequence of non-negative token ids as a 1-D long CPU tensor."""
    if isinstance(seq, torch.Tensor):
        if seq.dim() != 1 or seq.dtype.is_floating_point or seq.dtype == torch.bool:
            raise ValueError(f"{what} must be a 1-D integer tensor of token ids, got dtype {seq.dtype} and shape "
                             f"{tuple(seq.shape)}")
        ids = seq.detach().to("cpu", torch.long)
    else:
        if isinstance(seq, (str, bytes)) or not isinstance(seq, Sequence):
            raise ValueError(f"{what} must be a sequence of token ids, got {type(seq).__name__}")
        seq = [int(t) if isinstance(t, torch.Tensor) and t.dim() == 0 and not t.dtype.is_floating_point else t
               for t in seq]
        bad = [t for t in seq if not isinstance(t, numbers.Integral) or isinstance(t, bool)]
        if bad:
            raise ValueError(f"{what} must hold integer token ids, got {bad[0]!r}")
        ids = torch.tensor([int(t) for t in seq], dtype=torch.long)
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError(f"{what} must hold non-negative token ids, got {int(ids.min())}")
    return ids


def as_candidates(candidates, lengths=None) -> list[torch.Tensor]:
    """Candidates as a list of 1-D long CPU tensors.

    Args:
        candidates: a non-empty list of 1-D token-id sequences (``LongTensor`` or lists of ints, possibly empty), or
            a right-padded ``(n, L)`` integer tensor.
        lengths: with a padded tensor, ``(n,)`` lengths (row ``i`` holds its candidate in its first ``lengths[i]``
            entries); ``None``: every row is a whole candidate.

    Example:
        >>> import torch
        >>> as_candidates(torch.tensor([[4, 5, 0], [6, 7, 8]]), lengths=[2, 3])
        [tensor([4, 5]), tensor([6, 7, 8])]
    """
    if isinstance(candidates, torch.Tensor):
        if candidates.dim() != 2:
            raise ValueError(f"a tensor of candidates must be 2-D (n, L) and right-padded, got shape "
                             f"{tuple(candidates.shape)}")
        n, width = candidates.shape
        if lengths is None:
            lengths = [width] * n
        lengths = lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths
        if isinstance(lengths, (str, bytes)) or not isinstance(lengths, Sequence) or len(lengths) != n:
            raise ValueError(f"lengths must hold one length per candidate row ({n}), got {lengths!r}")
        if not all(_is_int(k) and 0 <= k <= width for k in lengths):
            raise ValueError(f"lengths must be integers in [0, {width}], got {lengths!r}")
        rows = [_as_ids(candidates[i, :k], f"candidate {i}") for i, k in enumerate(lengths)]
    else:
        if lengths is not None:
            raise ValueError("lengths= goes with a padded 2-D tensor of candidates, not with a list")
        if isinstance(candidates, (str, bytes)) or not isinstance(candidates, Sequence):
            raise ValueError(f"candidates must be a list of token-id sequences or a padded 2-D tensor, got "
                             f"{candidates!r:.80}")
        rows = [_as_ids(c, f"candidate {i}") for i, c in enumerate(candidates)]
    if not rows:
        raise ValueError("no candidates to score")
    return rows


def _as_prompt(context, who: str) -> torch.Tensor:
    if context is None:
        raise ValueError(f"{who} needs the prompt's token ids as the context")
    if isinstance(context, torch.Tensor) and context.dim() == 2 and context.shape[0] == 1:
        context = context[0]
    prompt = _as_ids(context, f"{who}'s context (the prompt)")
    if prompt.numel() == 0:
        raise ValueError(f"{who} needs a non-empty prompt (the first candidate token is predicted from it)")
    return prompt


def _end_ids(end_token_ids) -> list[int] | None:
    if end_token_ids is None:
        return None
    if isinstance(end_token_ids, torch.Tensor):
        end_token_ids = end_token_ids.flatten().tolist()
    ids = [end_token_ids] if _is_int(end_token_ids) else end_token_ids
    if (isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence) or not ids
            or not all(_is_int(e) and e >= 0 for e in ids)):
        raise ValueError(f"end_token_ids must be None, a non-negative int or a non-empty list of them, got "
                         f"{end_token_ids!r}")
    return [int(e) for e in ids]


def _check_batch_size(batch_size) -> int:
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return batch_size


# ------------------------------------------------------------------------------------------------- protocol
class Scorer(abc.ABC):
    """Scores ``n`` candidate token sequences for one context; higher is better.

    Subclasses implement :meth:`score_candidates` on candidates already normalised by :func:`as_candidates` (a list
    of 1-D long CPU tensors); :meth:`score` (also ``scorer(...)``) accepts every candidate format.
    """

    def score(self, candidates, context=None, *, lengths=None) -> torch.Tensor:
        """``(n,)`` float32 CPU scores of ``candidates`` (a list of 1-D token-id sequences, or a right-padded
        ``(n, L)`` tensor with ``lengths``) given ``context`` (for the model scorers: the prompt's token ids)."""
        rows = as_candidates(candidates, lengths)
        scores = torch.as_tensor(self.score_candidates(rows, context), dtype=torch.float32).cpu()
        if scores.shape != (len(rows),):
            raise ValueError(f"{type(self).__name__} returned scores of shape {tuple(scores.shape)} for "
                             f"{len(rows)} candidates")
        return scores

    __call__ = score

    def best(self, candidates, context=None, *, lengths=None) -> int:
        """Index of the best-scoring candidate (the first one on ties)."""
        return int(torch.argmax(self.score(candidates, context, lengths=lengths)))

    @abc.abstractmethod
    def score_candidates(self, candidates: list[torch.Tensor], context) -> torch.Tensor | Sequence[float]:
        """Scores of normalised candidates (one value each)."""


# ------------------------------------------------------------------------------------------------- log-probability
def model_log_prob_fn(model) -> LogProbFn:
    """The plain model as a :data:`LogProbFn`: the log-softmax of its logits, one forward without cache.

    Example:
        >>> fn = model_log_prob_fn(model)  # doctest: +SKIP
        >>> fn(torch.tensor([[1, 5, 7]])).shape  # doctest: +SKIP
        torch.Size([3, 128])
    """

    @torch.no_grad()
    def score(input_ids: torch.Tensor) -> torch.Tensor:
        device = next(model.parameters()).device
        out = model(input_ids=input_ids.to(device), use_cache=False)
        return torch.log_softmax(out.logits[0].float(), dim=-1)

    return score


def sequence_token_log_probs(log_prob_fn: LogProbFn, prompt_ids, continuation_ids,
                             end_token_ids=None) -> torch.Tensor:
    """Per-token ``log p(continuation_t | prompt, continuation_<t)`` under a :data:`LogProbFn`, one call on
    ``prompt + continuation`` (with ``first=`` when the function ``supports_first``).

    Args:
        log_prob_fn: the next-token log-probability function.
        prompt_ids: the prompt's token ids (non-empty).
        continuation_ids: the continuation's token ids (may be empty).
        end_token_ids: optional end token id(s): one more entry, the log of their total probability after the
            continuation.

    Returns:
        ``(len(continuation) [+ 1],)`` tensor, in the dtype and on the device of ``log_prob_fn``'s output.

    Example:
        >>> import torch
        >>> uniform = lambda ids: torch.log_softmax(torch.zeros(ids.shape[1], 4), dim=-1)
        >>> sequence_token_log_probs(uniform, [1, 2], [3, 0]).exp().tolist()
        [0.25, 0.25]
    """
    prompt = _as_prompt(prompt_ids, "sequence_token_log_probs").tolist()
    cont = _as_ids(continuation_ids, "the continuation").tolist()
    end = _end_ids(end_token_ids)
    ids = torch.tensor([prompt + cont], dtype=torch.long)
    start = len(prompt)
    first = start - 1 if getattr(log_prob_fn, "supports_first", False) else 0
    log_probs = log_prob_fn(ids, first=first) if first else log_prob_fn(ids)
    rows = ids.shape[1] - first
    if not isinstance(log_probs, torch.Tensor) or log_probs.dim() != 2 or log_probs.shape[0] != rows:
        shape = tuple(log_probs.shape) if isinstance(log_probs, torch.Tensor) else type(log_probs).__name__
        raise ValueError(f"the log-probability function must return ({rows}, vocab) log-probabilities, got {shape}")
    targets = ids[0, start:].to(log_probs.device)
    picked = log_probs[start - 1 - first:-1].gather(-1, targets[:, None])[:, 0]
    if end is None:
        return picked
    end_t = torch.tensor(end, dtype=torch.long, device=log_probs.device)
    return torch.cat([picked, torch.logsumexp(log_probs[-1, end_t], dim=0)[None]])


@torch.no_grad()
def model_token_log_probs(model, prompt_ids, candidates: list[torch.Tensor], batch_size: int = 32,
                          end_token_ids=None) -> list[torch.Tensor]:
    """Per-token log-probabilities of each candidate continuation of one prompt under ``model``, batched.

    The prompt is run once; each chunk of ``batch_size`` candidates is fed right-padded (explicit positions, padding
    masked) on a copy of the prompt's KV cache, so a chunk costs one forward whatever its candidates' lengths.

    Args:
        model: a causal LM.
        prompt_ids: ``(prompt_len,)`` token ids of the prompt, without padding (non-empty).
        candidates: 1-D long tensors (see :func:`as_candidates`).
        batch_size: candidates per forward.
        end_token_ids: optional end token id(s): one more entry per candidate, the log of their total probability
            after it.

    Returns:
        one float32 CPU tensor per candidate, ``(len(candidate) [+ 1],)``.
    """
    prompt = _as_prompt(prompt_ids, "model_token_log_probs")
    batch_size = _check_batch_size(batch_size)
    end = _end_ids(end_token_ids)
    device = next(model.parameters()).device
    first = model(input_ids=prompt[None].to(device), use_cache=True)
    root = first.logits[0, -1].float()
    vocab = root.shape[-1]
    top = max([int(c.max()) for c in candidates if c.numel()] + (end or []) + [-1])
    if top >= vocab:
        raise ValueError(f"token id {top} is outside the model's vocabulary ({vocab})")
    root = root - torch.logsumexp(root, dim=-1)
    end_t = None if end is None else torch.tensor(end, dtype=torch.long, device=device)
    n_prompt = prompt.numel()
    out: list[torch.Tensor] = []
    for start in range(0, len(candidates), batch_size):
        chunk = candidates[start:start + batch_size]
        width = max(c.numel() for c in chunk)
        rows = len(chunk)
        ids = torch.zeros(rows, width, dtype=torch.long)
        mask = torch.zeros(rows, n_prompt + width, dtype=torch.long)
        mask[:, :n_prompt] = 1
        for i, c in enumerate(chunk):
            ids[i, :c.numel()] = c
            mask[i, n_prompt:n_prompt + c.numel()] = 1
        ids = ids.to(device)
        if width > 0:
            positions = (n_prompt + torch.arange(width))[None].expand(rows, -1)
            logits = model(input_ids=ids, attention_mask=mask.to(device), position_ids=positions.to(device),
                           past_key_values=repeat_cache(first.past_key_values, rows), use_cache=True).logits.float()
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # log-softmax without a second (rows, L, V) copy
            rest = (logits[:, :-1].gather(-1, ids[:, 1:, None]) - lse[:, :-1])[..., 0]  # (rows, width - 1)
            picked = torch.cat([root[ids[:, :1]], rest], dim=1)  # token k given the prompt and tokens < k
        for i, c in enumerate(chunk):
            k = c.numel()
            lp = picked[i, :k] if k else root.new_zeros(0)
            if end_t is not None:
                dist = root if k == 0 else logits[i, k - 1] - lse[i, k - 1]
                lp = torch.cat([lp, torch.logsumexp(dist[end_t], dim=0)[None]])
            out.append(lp.cpu())
    return out


@torch.no_grad()
def continuation_token_log_probs(model, prefixes: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
                                 batch_size: int = 8) -> list[torch.Tensor]:
    """Per-token log-probabilities ``log p_model(c_t | prefix, c_<t)`` of each continuation after its *own* prefix
    (unlike :func:`model_token_log_probs`, whose candidates share one prompt): one float32 CPU tensor per pair, empty
    for an empty continuation. Pairs run in batches of ``batch_size`` with left padding and explicit positions; only
    the continuation positions' logits are computed.

    Example:
        >>> lp = continuation_token_log_probs(model, [[5, 6], [7]], [[8, 9], [10]])  # doctest: +SKIP
        >>> [t.shape for t in lp]  # doctest: +SKIP
        [torch.Size([2]), torch.Size([1])]
    """
    if len(prefixes) != len(continuations):
        raise ValueError(f"{len(prefixes)} prefixes for {len(continuations)} continuations")
    batch_size = _check_batch_size(batch_size)
    device = next(model.parameters()).device
    out: list[torch.Tensor] = [torch.zeros(0) for _ in continuations]
    todo = [i for i, c in enumerate(continuations) if len(c)]
    if any(len(prefixes[i]) == 0 for i in todo):
        raise ValueError("every prefix needs at least one token")
    for start in range(0, len(todo), batch_size):
        idx = todo[start:start + batch_size]
        seqs = [list(prefixes[i]) + list(continuations[i]) for i in idx]
        width = max(len(q) for q in seqs)
        keep = max(len(continuations[i]) for i in idx) + 1
        ids = torch.zeros((len(idx), width), dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, q in enumerate(seqs):
            ids[r, width - len(q):] = torch.tensor(q, dtype=torch.long)
            mask[r, width - len(q):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                       use_cache=False, logits_to_keep=keep).logits.float()
        logp = torch.log_softmax(logits, dim=-1).cpu()  # (rows, keep, vocab): positions width-keep .. width-1
        for r, i in enumerate(idx):
            n = len(continuations[i])
            target = ids[r, width - n:]
            out[i] = logp[r, keep - 1 - n:keep - 1].gather(-1, target[:, None]).squeeze(-1)
    return out


class LogProbScorer(Scorer):
    r"""Scores a candidate by its log-probability given the prompt:
    :math:`\sum_t \log p(y_t \mid x, y_{<t})` (plus :math:`\log p(\mathrm{eos} \mid x, y)` with ``end_token_ids``).

    With a model, the candidates are scored in chunks of ``batch_size``, one forward per chunk on the prompt's cache
    (:func:`model_token_log_probs`); with a :data:`LogProbFn` (e.g.
    :func:`~hf_decoding_ext.contrastive.dola.dola_scorer`), one call per candidate (:func:`sequence_token_log_probs`).
    The context is the prompt's token ids (1-D, or ``(1, T)``, no padding). An empty candidate scores 0 (plus the
    end term).

    Args:
        model: a causal LM (``torch.nn.Module``) or a :data:`LogProbFn`.
        batch_size (`int`, *optional*, defaults to 32): candidates per forward (model only).
        end_token_ids (`int` or `list[int]`, *optional*): add the log of the total probability of these tokens after
            the candidate (score complete hypotheses, as beam search does with eos).

    Example:
        >>> from hf_decoding_ext.core.scoring import LogProbScorer
        >>> scorer = LogProbScorer(model)  # doctest: +SKIP
        >>> scorer.score([torch.tensor([5, 6]), torch.tensor([7])], context=prompt_ids)  # doctest: +SKIP
        tensor([-9.6, -4.8])
    """

    def __init__(self, model, batch_size: int = 32, end_token_ids=None):
        if not isinstance(model, torch.nn.Module) and not callable(model):
            raise ValueError(f"model must be a causal LM or a log-probability function, got {type(model).__name__}")
        self.model = model
        self.batch_size = _check_batch_size(batch_size)
        self.end_token_ids = _end_ids(end_token_ids)

    def token_log_probs(self, candidates, context, *, lengths=None) -> list[torch.Tensor]:
        """Per-token float32 log-probabilities of each candidate (one more entry with ``end_token_ids``)."""
        rows = as_candidates(candidates, lengths)
        prompt = _as_prompt(context, type(self).__name__)
        if isinstance(self.model, torch.nn.Module):
            return model_token_log_probs(self.model, prompt, rows, self.batch_size, self.end_token_ids)
        with torch.no_grad():
            return [sequence_token_log_probs(self.model, prompt, c, self.end_token_ids).float().cpu() for c in rows]

    def score_candidates(self, candidates, context) -> torch.Tensor:
        return torch.stack([self.combine(lp) for lp in self.token_log_probs(candidates, context)])

    def combine(self, token_log_probs: torch.Tensor) -> torch.Tensor:
        """One candidate's score from its per-token log-probabilities: their sum (accumulated in float64)."""
        return token_log_probs.double().sum()


class LengthNormalizedLogProbScorer(LogProbScorer):
    r"""Log-probability divided by a power of the length: :math:`\log p(y \mid x) / |y|^{\alpha}`.

    ``alpha = 1`` (default) is the mean log-probability per token; other values are the ``length_penalty`` form of
    transformers' beam search (``alpha > 1`` favours longer candidates, ``alpha = 0`` is the plain sum). ``|y|``
    counts the scored tokens, the end token included when ``end_token_ids`` is set (as beam search counts eos); an
    empty candidate without end term scores 0.

    Args:
        model: a causal LM or a :data:`LogProbFn` (see :class:`LogProbScorer`).
        alpha (`float`, *optional*, defaults to 1.0): the length exponent.
        batch_size, end_token_ids: as in :class:`LogProbScorer`.

    Example:
        >>> import torch
        >>> from hf_decoding_ext.core.scoring import LengthNormalizedLogProbScorer
        >>> def fn(ids):  # token 5 costs about 1 nat, any other token about 5
        ...     logits = torch.zeros(ids.shape[1], 100)
        ...     logits[:, 5] = 4.0
        ...     return torch.log_softmax(logits, dim=-1)
        >>> candidates, prompt = [[5, 5, 5, 5, 5, 5], [7]], [1]
        >>> LengthNormalizedLogProbScorer(fn, alpha=0.0).best(candidates, prompt)  # plain sum: the short one
        1
        >>> LengthNormalizedLogProbScorer(fn).best(candidates, prompt)  # mean per token: the likely tokens
        0
    """

    def __init__(self, model, alpha: float = 1.0, batch_size: int = 32, end_token_ids=None):
        super().__init__(model, batch_size=batch_size, end_token_ids=end_token_ids)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number, got {alpha!r}")
        self.alpha = float(alpha)

    def combine(self, token_log_probs: torch.Tensor) -> torch.Tensor:
        return token_log_probs.double().sum() / max(token_log_probs.numel(), 1) ** self.alpha


# ------------------------------------------------------------------------------------------------- utilities
def token_f1(hypothesis: Sequence[int], reference: Sequence[int]) -> float:
    """Bag-of-tokens F1 between two token-id sequences (multiset overlap, as SQuAD's F1 over words); 1.0 when both
    are empty.

    Example:
        >>> token_f1([1, 1, 2], [1, 2, 2])
        0.6666666666666666
    """
    hyp, ref = list(hypothesis), list(reference)
    if not hyp or not ref:
        return float(not hyp and not ref)
    overlap = sum((Counter(hyp) & Counter(ref)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(hyp), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l(hypothesis: Sequence[int], reference: Sequence[int]) -> float:
    """ROUGE-L F-measure (longest common subsequence, ``beta = 1``) between two token-id sequences; 1.0 when both are
    empty.

    Example:
        >>> rouge_l([1, 2, 3, 4], [1, 3, 4, 5])  # LCS [1, 3, 4]
        0.75
    """
    hyp, ref = list(hypothesis), list(reference)
    if not hyp or not ref:
        return float(not hyp and not ref)
    prev = [0] * (len(ref) + 1)
    for h in hyp:
        cur = [0]
        for j, r in enumerate(ref):
            cur.append(prev[j] + 1 if h == r else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(hyp), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


UTILITIES: dict[str, Utility] = {"token_f1": token_f1, "rouge_l": rouge_l}
"""Built-in utilities over token ids, by name."""


# ------------------------------------------------------------------------------------------------- text utilities
TextUtility = Callable[[str, str], float]
"""``utility(hypothesis_text, reference_text) -> float``: a utility on decoded text."""

_METRICS: dict[str, Any] = {}
_WORDS = None


def _metric(name: str):
    """The sacrebleu / rouge-score metric objects, built once (pure code, no download)."""
    if name not in _METRICS:
        if name == "chrf":
            from sacrebleu.metrics import CHRF

            _METRICS[name] = CHRF()  # chrF2: character 6-grams, beta 2 (sacrebleu's defaults)
        elif name == "bleu":
            from sacrebleu.metrics import BLEU

            _METRICS[name] = BLEU(effective_order=True)  # sentence BLEU, as sacrebleu.sentence_bleu
        else:
            from rouge_score import rouge_scorer

            _METRICS[name] = rouge_scorer.RougeScorer([name], tokenizer=_UnicodeWordTokenizer())
    return _METRICS[name]


class _UnicodeWordTokenizer:
    """Lower-cased ``\\w+`` words (rouge-score's default tokeniser keeps only ``[a-z0-9]``, which splits words with
    accents: "très" would become "tr s")."""

    def tokenize(self, text: str) -> list[str]:
        import re

        global _WORDS
        if _WORDS is None:
            _WORDS = re.compile(r"\w+", re.UNICODE)
        return _WORDS.findall(text.lower())


def chrf(hypothesis: str, reference: str) -> float:
    """Sentence-level chrF (sacrebleu's ``CHRF()``: character 6-grams, ``beta = 2``), on a 0-100 scale.

    Example:
        >>> round(chrf("le chat est noir", "le chat est noir"), 1)
        100.0
    """
    return float(_metric("chrf").sentence_score(hypothesis, [reference]).score)


def sentence_bleu(hypothesis: str, reference: str) -> float:
    """Sentence-level BLEU (sacrebleu, exponential smoothing, effective n-gram order), on a 0-100 scale.

    Example:
        >>> round(sentence_bleu("the cat sat on the mat", "the cat sat on the mat"), 1)
        100.0
    """
    return float(_metric("bleu").sentence_score(hypothesis, [reference]).score)


def rouge_l_text(hypothesis: str, reference: str) -> float:
    """ROUGE-L F-measure on text (rouge-score, lower-cased unicode words), in [0, 1].

    Example:
        >>> rouge_l_text("the cat sat", "the cat sat down")
        0.8571428571428571
    """
    return float(_metric("rougeL").score(reference, hypothesis)["rougeL"].fmeasure)


def rouge_1_text(hypothesis: str, reference: str) -> float:
    """ROUGE-1 F-measure on text (rouge-score, lower-cased unicode words), in [0, 1]; MBR-IF's lexical baseline."""
    return float(_metric("rouge1").score(reference, hypothesis)["rouge1"].fmeasure)


for _fn, _sym in ((chrf, False), (sentence_bleu, False), (rouge_l_text, True), (rouge_1_text, True)):
    _fn.on_text = True
    _fn.symmetric = _sym
del _fn, _sym

TEXT_UTILITIES: dict[str, TextUtility] = {"chrf": chrf, "bleu": sentence_bleu, "rougeL": rouge_l_text,
                                          "rouge1": rouge_1_text}
"""Built-in utilities over decoded text, by name (attribute ``symmetric``: ROUGE F-measures are, chrF and BLEU are
not)."""


JUDGE_RUBRIC = (
    "[Is the response a correct, complete and helpful answer to the instruction, as good as the reference answer?]\n"
    "Score 1: The response is wrong, off-topic or unhelpful.\n"
    "Score 2: The response is mostly wrong or misses most of what the reference answer says.\n"
    "Score 3: The response is partly correct but misses or gets wrong important points of the reference answer.\n"
    "Score 4: The response is correct and helpful, with minor differences from the reference answer.\n"
    "Score 5: The response is as correct and helpful as the reference answer.")
"""The default rubric of :class:`JudgeUtility` (a Prometheus-style 1-5 score rubric)."""

JUDGE_TEMPLATE = (
    "###Task Description:\n"
    "An instruction, a response to evaluate, a reference answer that gets a score of 5, and a score rubric "
    "representing an evaluation criterion are given.\n"
    "Write a score that is an integer between 1 and 5, referring to the score rubric.\n\n"
    "###Score Rubrics:\n{rubric}\n\n"
    "###The instruction to evaluate:\n{instruction}\n\n"
    "###Response to evaluate:\n{response}\n\n"
    "###Reference Answer (Score 5):\n{reference}\n\n"
    "###Score:")
"""Prometheus-2's absolute-grading prompt, shortened (no feedback is generated before the score) and reordered (the
rubric before the instruction, so that everything before the response is one prefix shared by all pairs)."""


class JudgeUtility:
    r"""Model-as-judge utility, reference-based: ``u(h, r)`` = the expected 1-5 score a causal LM gives response
    ``h`` when ``r`` is shown as the reference answer (score 5) in a Prometheus-style rubric prompt.

    .. math:: u(h, r) = \sum_{k=1}^{5} k \, p(k \mid \mathrm{prompt}(x, h, r)) \Big/ \sum_{k=1}^{5} p(k \mid \ldots)

    where ``p(k | ...)`` is the judge's next-token probability of the digit ``k`` (with and without a leading space)
    after the prompt. This is the utility of "Better Instruction-Following Through Minimum Bayes Risk" (Wu et al.,
    arXiv 2410.02902), which uses Prometheus-2-7B; here any causal LM judges, e.g. SmolLM2-135M-Instruct judging
    its own samples. **A 135M model is a weak stand-in for Prometheus-2-7B**: its scores are noisy and only loosely
    track quality. Deviations from Prometheus-2: the score is read from the next-token distribution right after the
    prompt (probability-weighted, as in "G-Eval") instead of being parsed from generated feedback, and the prompt is
    shortened (no feedback step) and reordered (rubric before the instruction: the part before the response is then
    one prefix, run once per instruction and shared through its KV cache by every pair).

    The utility works on text. Its ``context`` is the instruction: a string, or the prompt's token ids (as
    :class:`UtilityMatrixScorer` passes them), from which :meth:`instruction` takes the last user turn of a ChatML
    prompt. Pairs are scored in batches of ``batch_size`` (left-padded, last position only).

    Args:
        model (*optional*): the judge, a causal LM; ``None``: bind one later with :meth:`bind` (MBR decoding binds
            the generating model: a self-judge).
        tokenizer: the judge's tokenizer (its chat template is used when it has one).
        rubric (`str`, *optional*): the score rubric, defaults to :data:`JUDGE_RUBRIC`.
        template (`str`, *optional*): the prompt with ``{instruction}``, ``{response}``, ``{reference}`` and
            ``{rubric}`` fields, defaults to :data:`JUDGE_TEMPLATE`.
        batch_size (`int`, *optional*, defaults to 8): prompts per forward.
        max_chars (`int`, *optional*, defaults to 1500): instruction, response and reference are cut to this many
            characters each.
        use_chat_template (`bool`, *optional*): wrap the prompt as a user turn; defaults to whether the tokenizer has a
            chat template.

    Example:
        >>> from hf_decoding_ext.core.scoring import JudgeUtility
        >>> judge = JudgeUtility(model, tokenizer)  # doctest: +SKIP
        >>> judge("Paris.", "The capital of France is Paris.", context="What is the capital of France?")  # doctest: +SKIP
        3.9
    """

    on_text = True
    needs_context = True
    context_as_ids = True  # receives the prompt as token ids and extracts the instruction itself
    symmetric = False

    def __init__(self, model=None, tokenizer=None, rubric: str | None = None, template: str | None = None,
                 batch_size: int = 8, max_chars: int = 1500, use_chat_template: bool | None = None):
        if model is not None and not isinstance(model, torch.nn.Module):
            raise ValueError(f"model must be a causal LM (torch.nn.Module) or None, got {type(model).__name__}")
        if tokenizer is None or not callable(getattr(tokenizer, "encode", None)):
            raise ValueError(f"JudgeUtility needs a tokenizer with an encode method, got {type(tokenizer).__name__}")
        rubric = JUDGE_RUBRIC if rubric is None else rubric
        template = JUDGE_TEMPLATE if template is None else template
        if not isinstance(rubric, str) or not rubric.strip():
            raise ValueError(f"rubric must be a non-empty string, got {rubric!r}")
        if not isinstance(template, str) or any(f"{{{f}}}" not in template for f in ("instruction", "response",
                                                                                        "reference")):
            raise ValueError(f"template must be a string with {{instruction}}, {{response}} and {{reference}} fields, "
                             f"got {template!r:.120}")
        self.batch_size = _check_batch_size(batch_size)
        if not _is_int(max_chars) or max_chars < 1:
            raise ValueError(f"max_chars must be an integer >= 1, got {max_chars!r}")
        if use_chat_template is None:
            use_chat_template = bool(getattr(tokenizer, "chat_template", None))
        if not isinstance(use_chat_template, bool):
            raise ValueError(f"use_chat_template must be a bool or None, got {use_chat_template!r}")
        self.model, self.tokenizer, self.rubric, self.template = model, tokenizer, rubric, template
        self.max_chars, self.use_chat_template = max_chars, use_chat_template
        self.score_ids = self._score_token_ids()
        self.calls = 0  # judged (hypothesis, reference) pairs so far

    def _score_token_ids(self) -> list[list[int]]:
        ids = []
        for k in range(1, 6):
            variants = []
            for text in (str(k), f" {k}"):
                enc = self.tokenizer.encode(text, add_special_tokens=False)
                if len(enc) == 1 and enc[0] not in variants:
                    variants.append(int(enc[0]))
            if not variants:
                raise ValueError(f"the judge's tokenizer has no single token for the score {k}")
            ids.append(variants)
        flat = [i for v in ids for i in v]
        if len(set(flat)) != len(flat):
            raise ValueError(f"the judge's score tokens overlap: {ids}")
        return ids

    def bind(self, model) -> JudgeUtility:
        """Set the judge model if none was given (the self-judge of MBR decoding); returns ``self``."""
        if self.model is None:
            if not isinstance(model, torch.nn.Module):
                raise ValueError(f"model must be a causal LM, got {type(model).__name__}")
            self.model = model
        return self

    def instruction(self, context) -> str:
        """The instruction to show the judge: ``context`` as is when it is text; from prompt token ids, the last user
        turn of a chat-formatted prompt (cut out with the tokenizer's chat template,
        :func:`~hf_decoding_ext.core.models.task_input_from_prompt`), else the prompt decoded without special
        tokens."""
        if context is None:
            return ""
        if isinstance(context, str):
            return context
        from hf_decoding_ext.core.models import task_input_from_prompt

        ids = _as_ids(list(context) if isinstance(context, tuple) else context, "the judge's context").tolist()
        return task_input_from_prompt(self.tokenizer, ids).strip()

    def prompt(self, instruction: str, response: str, reference: str) -> str:
        """The judge's prompt text (chat-templated when ``use_chat_template``)."""
        cut = self.max_chars
        text = self.template.format(instruction=(instruction or "").strip()[:cut], response=response.strip()[:cut],
                                    reference=reference.strip()[:cut], rubric=self.rubric)
        if self.use_chat_template:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True) + "Score:"
        return text

    _RESPONSE = "\x00response\x00"
    _REFERENCE = "\x00reference\x00"

    def prompt_ids(self, instruction: str, pairs: Sequence[tuple[str, str]]) -> tuple[list[int], list[list[int]]]:
        """Token ids of the judge prompts of ``pairs``: the shared prefix (everything before the response) and one
        suffix per pair (response, reference and the score cue); the prompt is ``prefix + suffix``."""
        frame = self.prompt(instruction, self._RESPONSE, self._REFERENCE)
        if frame.count(self._RESPONSE) != 1 or frame.count(self._REFERENCE) != 1:
            raise ValueError("the judge template must hold {response} and {reference} exactly once")
        head, tail = frame.split(self._RESPONSE)
        prefix = self.tokenizer.encode(head, add_special_tokens=not self.use_chat_template)
        cut = self.max_chars
        suffixes = [self.tokenizer.encode(h.strip()[:cut] + tail.replace(self._REFERENCE, r.strip()[:cut]),
                                          add_special_tokens=False) for h, r in pairs]
        return prefix, suffixes

    @torch.no_grad()
    def batch(self, pairs: Sequence[tuple[str, str]], context=None) -> list[float]:
        """Judge scores of ``(hypothesis, reference)`` text pairs for the instruction ``context`` (text, or prompt
        token ids: see :meth:`instruction`).

        The shared prefix (task, rubric, instruction) runs once; each chunk of ``batch_size`` suffixes runs on a copy
        of its cache, padded between prefix and suffix (masked, explicit positions) so every row ends at the last
        position, where the score distribution is read.
        """
        if self.model is None:
            raise ValueError("JudgeUtility has no model: pass one or bind() it first")
        if not pairs:
            return []
        prefix, suffixes = self.prompt_ids(self.instruction(context), pairs)
        device = next(self.model.parameters()).device
        n_prefix = len(prefix)
        first = self.model(input_ids=torch.tensor([prefix], device=device), use_cache=True)
        pad = self.tokenizer.pad_token_id if getattr(self.tokenizer, "pad_token_id", None) is not None else 0
        grades = torch.arange(1, 6, dtype=torch.float32, device=device)
        out: list[float] = []
        for start in range(0, len(suffixes), self.batch_size):
            chunk = suffixes[start:start + self.batch_size]
            rows, width = len(chunk), max(max(len(r) for r in chunk), 1)
            ids = torch.full((rows, width), int(pad), dtype=torch.long)
            mask = torch.zeros(rows, n_prefix + width, dtype=torch.long)
            mask[:, :n_prefix] = 1
            for i, r in enumerate(chunk):  # padding sits between prefix and suffix: all rows end at the last position
                if r:
                    ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
                mask[i, n_prefix + width - len(r):] = 1
            positions = (mask.cumsum(-1) - 1).clamp_min(0)[:, n_prefix:]
            kwargs = dict(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                          past_key_values=repeat_cache(first.past_key_values, rows), use_cache=True)
            try:
                logits = self.model(**kwargs, logits_to_keep=1).logits[:, -1].float()
            except TypeError:
                logits = self.model(**kwargs).logits[:, -1].float()
            for i, r in enumerate(chunk):  # an empty suffix (never with the default template): the prefix's last logits
                if not r:
                    logits[i] = first.logits[0, -1].float()
            probs = torch.softmax(logits, dim=-1)
            p = torch.stack([probs[:, v].sum(-1) for v in self.score_ids], dim=-1)  # (rows, 5)
            out.extend(((p * grades).sum(-1) / p.sum(-1).clamp_min(1e-30)).tolist())
        self.calls += len(pairs)
        return out

    def __call__(self, hypothesis: str, reference: str, context=None) -> float:
        return self.batch([(hypothesis, reference)], context)[0]


# ------------------------------------------------------------------------------------------------- utility matrix
def utility_matrix(items: Sequence, utility: Callable[..., Any], *, symmetric: bool = False,
                   columns: Sequence[int] | None = None, context=None) -> tuple[torch.Tensor, int]:
    """The ``n x n`` matrix ``U[i, j] = utility(items[i], items[j])`` of a pairwise utility, computed economically.

    Each distinct ordered pair of distinct items is computed once (identical items share their values; with
    ``symmetric`` each unordered pair once); an item against itself is never computed unless it occurs twice (then
    its self-utility fills the entries between its copies). The diagonal is 0: a candidate is never its own
    pseudo-reference. With ``columns`` only those columns (pseudo-references) are computed, the others stay 0.

    Utilities may declare ``needs_context = True`` (called as ``utility(h, r, context=context)``) and a
    ``batch(pairs, context) -> list[float]`` method (called once with every needed pair, e.g. a model judge).

    Args:
        items: hashable items (tuples of token ids, which the utility receives as lists, or strings).
        utility: ``utility(hypothesis, reference) -> float``.
        symmetric: compute each unordered pair once.
        columns: indices of the reference columns to compute (``None``: all).
        context: passed to a context-aware utility.

    Returns:
        ``(matrix, calls)``: the ``(n, n)`` float64 matrix and the number of utility evaluations.

    Example:
        >>> m, calls = utility_matrix(["ab", "ab", "cd"], lambda h, r: float(h == r), symmetric=True)
        >>> m.tolist(), calls
        ([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], 2)
    """
    n = len(items)
    cols = list(range(n)) if columns is None else [int(c) for c in columns]
    if any(not 0 <= c < n for c in cols):
        raise ValueError(f"columns must be indices in [0, {n}), got {cols}")
    distinct = list(dict.fromkeys(items))
    where = {item: k for k, item in enumerate(distinct)}
    idx = [where[item] for item in items]
    needed: dict[tuple[int, int], None] = {}
    for i in range(n):
        for j in cols:
            if i == j:
                continue
            a, b = idx[i], idx[j]
            needed[(min(a, b), max(a, b)) if symmetric else (a, b)] = None
    def arg(item):
        return list(item) if isinstance(item, tuple) else item

    pairs = list(needed)
    if hasattr(utility, "batch") and callable(utility.batch):
        values = list(utility.batch([(arg(distinct[a]), arg(distinct[b])) for a, b in pairs], context))
    elif getattr(utility, "needs_context", False):
        values = [utility(arg(distinct[a]), arg(distinct[b]), context=context) for a, b in pairs]
    else:
        values = [utility(arg(distinct[a]), arg(distinct[b])) for a, b in pairs]
    if len(values) != len(pairs):
        raise ValueError(f"the utility returned {len(values)} values for {len(pairs)} pairs")
    small = torch.zeros(len(distinct), len(distinct), dtype=torch.float64)
    for (a, b), value in zip(pairs, values):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise ValueError(f"utility must return a number, got {value!r} for {arg(distinct[a])!r:.60} vs "
                             f"{arg(distinct[b])!r:.60}")
        small[a, b] = value
        if symmetric:
            small[b, a] = value
    index = torch.tensor(idx, dtype=torch.long)
    matrix = small[index][:, index]
    keep = torch.zeros(n, dtype=torch.bool)
    keep[cols] = True
    matrix[:, ~keep] = 0.0
    matrix.fill_diagonal_(0.0)
    return matrix, len(pairs)


class UtilityMatrixScorer(Scorer):
    """Base of scorers comparing candidates pairwise: ``U[i, j] = utility(hypothesis=c_i, reference=c_j)``.

    :meth:`utility_matrix` computes the ``n x n`` matrix once per candidate set (:func:`utility_matrix`: each
    distinct pair of distinct sequences once, identical candidates share their rows), and the last set's matrix is
    kept, so scoring it again (or reading the matrix after scoring) calls the utility no more. The diagonal (a
    candidate against itself) is never a pseudo-reference and is left at 0; the utility of a sequence with itself is
    computed only when the sequence occurs twice. Subclasses turn the matrix into scores (:meth:`score_matrix`).

    Text utilities (:data:`TEXT_UTILITIES`: chrF, BLEU, ROUGE-L, ROUGE-1; :class:`JudgeUtility`; any callable with
    ``on_text=True``) receive the candidates decoded with ``tokenizer``, and context-aware ones (the judge) the
    prompt decoded as text.

    Args:
        utility (`str` or callable, *optional*, defaults to ``"token_f1"``): a name of :data:`UTILITIES` (token ids)
            or :data:`TEXT_UTILITIES` (text), or a callable ``utility(hypothesis, reference) -> float``.
        symmetric (`bool`, *optional*): the utility is symmetric: compute each unordered pair once. Defaults to the
            utility's ``symmetric`` attribute when it has one, else `False`.
        tokenizer (*optional*): decodes candidates (and the context) for text utilities.
        on_text (`bool`, *optional*): whether a callable utility takes text; defaults to its ``on_text`` attribute,
            else to whether a ``tokenizer`` is given.
        skip_special_tokens (`bool`, *optional*, defaults to `True`): passed to ``tokenizer.decode``.
    """

    def __init__(self, utility: str | Utility = "token_f1", symmetric: bool | None = None, *, tokenizer=None,
                 on_text: bool | None = None, skip_special_tokens: bool = True):
        name = utility if isinstance(utility, str) else getattr(utility, "__name__", type(utility).__name__)
        if isinstance(utility, str):
            if utility in UTILITIES:
                utility = UTILITIES[utility]
            elif utility in TEXT_UTILITIES:
                utility = TEXT_UTILITIES[utility]
            else:
                raise ValueError(f"unknown utility {utility!r}; built-in: {', '.join([*UTILITIES, *TEXT_UTILITIES])}")
        if not callable(utility):
            raise ValueError(f"utility must be a name of {sorted([*UTILITIES, *TEXT_UTILITIES])} or a callable, got "
                             f"{utility!r}")
        if symmetric is None:
            symmetric = bool(getattr(utility, "symmetric", False))
        if not isinstance(symmetric, bool):
            raise ValueError(f"symmetric must be a bool, got {symmetric!r}")
        if on_text is None:
            on_text = getattr(utility, "on_text", None)
            on_text = tokenizer is not None if on_text is None else bool(on_text)
        if not isinstance(on_text, bool):
            raise ValueError(f"on_text must be a bool or None, got {on_text!r}")
        if on_text and (tokenizer is None or not callable(getattr(tokenizer, "decode", None))):
            raise ValueError(f"the text utility {name!r} needs a tokenizer with a decode method to decode the "
                             f"candidates, got {type(tokenizer).__name__}")
        self.utility = utility
        self.symmetric = symmetric
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.skip_special_tokens = skip_special_tokens
        self.utility_calls = 0  # utility evaluations so far (a cached matrix costs none)
        self._cached: tuple[Any, torch.Tensor] | None = None

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=self.skip_special_tokens)

    def _context(self, context):
        if not getattr(self.utility, "needs_context", False) or context is None:
            return None
        if isinstance(context, str) or not self.on_text:
            return context
        if isinstance(context, torch.Tensor) and context.dim() == 2 and context.shape[0] == 1:
            context = context[0]
        ids = _as_ids(context, "the context").tolist()
        return tuple(ids) if getattr(self.utility, "context_as_ids", False) else self._decode(ids)

    def utility_matrix(self, candidates, *, lengths=None, context=None, columns=None) -> torch.Tensor:
        """``(n, n)`` float64 utilities ``U[i, j] = utility(c_i, c_j)``, zero diagonal, only the ``columns``
        (pseudo-references) when given (cached for the last set)."""
        key = tuple(tuple(c.tolist()) for c in as_candidates(candidates, lengths))
        ctx = self._context(context)
        cache_key = (key, None if columns is None else tuple(int(c) for c in columns),
                     ctx if isinstance(ctx, (str, type(None))) else repr(ctx))
        if self._cached is not None and self._cached[0] == cache_key:
            return self._cached[1].clone()
        items = [self._decode(k) for k in key] if self.on_text else list(key)
        matrix, calls = utility_matrix(items, self.utility, symmetric=self.symmetric, columns=columns, context=ctx)
        self.utility_calls += calls
        self._cached = (cache_key, matrix)
        return matrix.clone()

    def score_candidates(self, candidates, context) -> torch.Tensor:
        return self.score_matrix(self.utility_matrix(candidates, context=context), candidates, context)

    @abc.abstractmethod
    def score_matrix(self, matrix: torch.Tensor, candidates: list[torch.Tensor], context) -> torch.Tensor:
        """Scores from the utility matrix of ``candidates``."""


def expected_utility(matrix: torch.Tensor, log_probs: torch.Tensor | None = None,
                     references: Sequence[int] | None = None) -> torch.Tensor:
    r"""Expected utility of each candidate against the others as pseudo-references:
    :math:`\mathrm{EU}_i = \sum_{j \ne i} w_j U_{ij} / \sum_{j \ne i} w_j`.

    ``w`` is uniform (``log_probs=None``: the Monte-Carlo estimate from samples, duplicates counting as often as they
    were drawn) or ``softmax(log_probs)`` (candidates weighted by their model probability); with ``references``
    (a subsample of pseudo-reference indices) ``w`` is zero outside them. A single candidate, or a row whose other
    candidates all have weight 0, scores 0.

    Example:
        >>> import torch
        >>> u = torch.tensor([[0.0, 0.9, 0.8], [0.9, 0.0, 0.1], [0.8, 0.1, 0.0]], dtype=torch.float64)
        >>> [round(x, 6) for x in expected_utility(u).tolist()]
        [0.85, 0.5, 0.45]
        >>> [round(x, 6) for x in expected_utility(u, references=[0]).tolist()]  # only candidate 0 as reference
        [0.0, 0.9, 0.8]
    """
    if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"the utility matrix must be a square 2-D tensor, got "
                         f"{tuple(matrix.shape) if isinstance(matrix, torch.Tensor) else type(matrix).__name__}")
    n = matrix.shape[0]
    matrix = matrix.double()
    if log_probs is None:
        weights = torch.ones(n, dtype=torch.float64)
    else:
        log_probs = torch.as_tensor(log_probs, dtype=torch.float64).cpu()
        if log_probs.shape != (n,) or torch.isnan(log_probs).any() or bool((log_probs == math.inf).any()):
            raise ValueError(f"log_probs must be ({n},) numbers below +inf without NaN, got {log_probs.tolist()}")
        if not bool(torch.isfinite(log_probs).any()):
            raise ValueError("log_probs are all -inf: no candidate has probability")
        weights = torch.softmax(log_probs, dim=0)
    if references is not None:
        refs = [int(r) for r in references]
        if not refs or any(not 0 <= r < n for r in refs):
            raise ValueError(f"references must be a non-empty list of indices in [0, {n}), got {refs}")
        keep = torch.zeros(n, dtype=torch.bool)
        keep[refs] = True
        weights = torch.where(keep, weights, torch.zeros_like(weights))
    others = weights[None, :].expand(n, n).clone()
    others.fill_diagonal_(0.0)
    total = others.sum(dim=1)
    gain = (others * matrix).sum(dim=1)
    return torch.where(total > 0, gain / total.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(gain))


class MBRScorer(UtilityMatrixScorer):
    r"""Minimum Bayes risk (MBR) scoring: each candidate's expected utility against the other candidates taken as
    pseudo-references (Kumar and Byrne, 2004; sampling-based MBR for neural generation: Eikema and Aziz, COLING 2020,
    arXiv 2005.10283). The best candidate is the *medoid* of the set under the utility.

    .. math:: \mathrm{score}(c_i) = \sum_{j \ne i} w_j \, u(c_i, c_j) \Big/ \sum_{j \ne i} w_j

    A candidate is not its own pseudo-reference: with a similarity utility it would vote for itself with the maximal
    utility; with uniform weights and a utility whose self-value is constant (F1, ROUGE-L: 1) the ranking is the
    same either way, and with probability weights excluding self keeps a probable candidate from counting its own
    probability twice. The weights ``w`` are uniform (the candidates are samples) or, with ``log_prob_scorer``,
    ``softmax`` of its scores on the same candidates and context (e.g. :class:`LogProbScorer`, for distinct
    candidates such as beam outputs). The utility matrix is computed once per candidate set (see
    :class:`UtilityMatrixScorer`).

    Pseudo-reference subsampling (as ``mbr_corpus(num_subsamples=...)`` in deep-spin/qaware-decode): with
    ``num_pseudo_references = k < n``, each scoring draws ``k`` distinct candidates uniformly (without replacement)
    as the pseudo-references and computes only those ``n x k`` utilities; ``k >= n`` is full MBR. Deviation from
    qaware-decode: a candidate drawn as a pseudo-reference is not compared with itself (its mean runs over the other
    ``k - 1``), as in full MBR here. The last draw is kept in :attr:`last_references`.

    Args:
        utility (`str` or callable, *optional*, defaults to ``"token_f1"``): a name of :data:`UTILITIES`
            (``"token_f1"``, ``"rouge_l"``: token ids) or :data:`TEXT_UTILITIES` (``"chrf"``, ``"bleu"``,
            ``"rougeL"``, ``"rouge1"``: text, needs ``tokenizer``), a :class:`JudgeUtility`, or a callable
            ``utility(hypothesis, reference) -> float``.
        symmetric (`bool`, *optional*): compute each unordered pair once (default: the utility's declaration).
        log_prob_scorer (:class:`Scorer`, *optional*): log-probabilities of the candidates, for probability weights.
        tokenizer, on_text, skip_special_tokens: see :class:`UtilityMatrixScorer`.
        num_pseudo_references (`int`, *optional*): pseudo-reference subsample size (``None``: all candidates).
        seed (`int`, *optional*): seed of the subsampling generator.

    Example:
        >>> from hf_decoding_ext.core.scoring import MBRScorer
        >>> scorer = MBRScorer("rouge_l", symmetric=True)
        >>> [round(x, 3) for x in scorer.score([[1, 2, 3], [1, 2, 4], [1, 2, 3, 4], [7, 8]]).tolist()]
        [0.508, 0.508, 0.571, 0.0]
    """

    def __init__(self, utility: str | Utility = "token_f1", symmetric: bool | None = None,
                 log_prob_scorer: Scorer | None = None, *, tokenizer=None, on_text: bool | None = None,
                 skip_special_tokens: bool = True, num_pseudo_references: int | None = None, seed: int | None = None):
        super().__init__(utility, symmetric=symmetric, tokenizer=tokenizer, on_text=on_text,
                         skip_special_tokens=skip_special_tokens)
        if log_prob_scorer is not None and not isinstance(log_prob_scorer, Scorer):
            raise ValueError(f"log_prob_scorer must be a Scorer, got {type(log_prob_scorer).__name__}")
        if num_pseudo_references is not None and (not _is_int(num_pseudo_references) or num_pseudo_references < 1):
            raise ValueError(f"num_pseudo_references must be None or an integer >= 1, got {num_pseudo_references!r}")
        if seed is not None and not _is_int(seed):
            raise ValueError(f"seed must be an integer or None, got {seed!r}")
        self.log_prob_scorer = log_prob_scorer
        self.num_pseudo_references = num_pseudo_references
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.last_references: list[int] | None = None

    def pseudo_references(self, n: int) -> list[int] | None:
        """Indices of the pseudo-references for ``n`` candidates: a fresh uniform subsample of
        ``num_pseudo_references`` (sorted), or ``None`` (all) when it is unset or ``>= n``."""
        k = self.num_pseudo_references
        if k is None or k >= n:
            return None
        return sorted(torch.randperm(n, generator=self._generator)[:k].tolist())

    def score_candidates(self, candidates, context) -> torch.Tensor:
        refs = self.pseudo_references(len(candidates))
        self.last_references = list(range(len(candidates))) if refs is None else refs
        matrix = self.utility_matrix(candidates, context=context, columns=refs)
        return self.score_matrix(matrix, candidates, context, references=refs)

    def score_matrix(self, matrix, candidates, context, references=None) -> torch.Tensor:
        log_probs = None if self.log_prob_scorer is None else self.log_prob_scorer.score(candidates, context)
        return expected_utility(matrix, log_probs, references)


# ------------------------------------------------------------------------------------------------- user callables
class CallableScorer(Scorer):
    """Scores candidates with any user callable, e.g. a reward model or a verifier.

    The callable receives each candidate and the context: ``fn(candidate, context) -> float``, or with
    ``batched=True`` all candidates at once, ``fn(candidates, context) -> n floats``. With a ``tokenizer`` the
    candidates are decoded text (and so is a context given as token ids; a string context is passed as is);
    without, they are lists of token ids and the context is passed unchanged.

    Args:
        fn (callable): the scoring function.
        tokenizer (*optional*): decode candidates (and a token-id context) before calling ``fn``.
        batched (`bool`, *optional*, defaults to `False`): call ``fn`` once with every candidate.
        skip_special_tokens (`bool`, *optional*, defaults to `True`): passed to ``tokenizer.decode``.

    Example:
        >>> from hf_decoding_ext.core.scoring import CallableScorer
        >>> longest = CallableScorer(lambda ids, context: len(ids))
        >>> longest.score([[4, 5], [6, 7, 8], [9]]).tolist()
        [2.0, 3.0, 1.0]
        >>> reward = CallableScorer(lambda text, prompt: float("Paris" in text), tokenizer=tokenizer)  # doctest: +SKIP
    """

    def __init__(self, fn: Callable[..., Any], tokenizer=None, batched: bool = False, skip_special_tokens: bool = True):
        if not callable(fn):
            raise ValueError(f"fn must be callable, got {type(fn).__name__}")
        if tokenizer is not None and not callable(getattr(tokenizer, "decode", None)):
            raise ValueError(f"tokenizer must have a decode method, got {type(tokenizer).__name__}")
        if not isinstance(batched, bool):
            raise ValueError(f"batched must be a bool, got {batched!r}")
        self.fn = fn
        self.tokenizer = tokenizer
        self.batched = batched
        self.skip_special_tokens = skip_special_tokens

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def score_candidates(self, candidates, context) -> torch.Tensor:
        items: list = [c.tolist() for c in candidates]
        if self.tokenizer is not None:
            items = [self._decode(c) for c in items]
            if context is not None and not isinstance(context, str):
                context = self._decode(_as_ids(context[0] if isinstance(context, torch.Tensor) and context.dim() == 2
                                               else context, "the context").tolist())
        values = self.fn(items, context) if self.batched else [self.fn(item, context) for item in items]
        if isinstance(values, torch.Tensor):
            values = values.flatten().tolist()
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) != len(items):
            raise ValueError(f"the scoring function must give one number per candidate ({len(items)}), got {values!r}")
        out = []
        for i, v in enumerate(values):
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                v = v.item()
            if isinstance(v, bool):
                v = float(v)
            if not isinstance(v, (int, float)) or math.isnan(v):
                raise ValueError(f"the scoring function returned {v!r} for candidate {i}; expected a number")
            out.append(float(v))
        return torch.tensor(out, dtype=torch.float32)


# --------------------------------------------------------------------------------------------- toy rewards
_VADER = None


def vader_reward(text: str) -> float:
    """VADER compound sentiment of ``text`` in ``[-1, 1]`` (Hutto and Gilbert, ICWSM 2014; ``vaderSentiment``,
    lexicon bundled, nothing downloaded): the offline toy reward standing in for the papers' learned reward
    models (InfAlign, CARDS, TQ*). Empty text scores 0.

    Example:
        >>> vader_reward("What a wonderful, happy day!") > 0.5
        True
        >>> vader_reward("")
        0.0
    """
    global _VADER
    if not isinstance(text, str):
        raise ValueError(f"vader_reward scores text, got {type(text).__name__}")
    if _VADER is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        _VADER = SentimentIntensityAnalyzer()
    return float(_VADER.polarity_scores(text)["compound"]) if text.strip() else 0.0


def resolve_reward(reward, tokenizer=None, name: str = "reward"):
    """A reward argument as a callable: ``"vader"`` is :func:`vader_reward` (it scores text, so ``tokenizer`` must be
    given to decode the candidates), any callable is returned as it is; anything else is refused with a
    ``ValueError`` naming the argument ``name``.

    Example:
        >>> resolve_reward(len) is len
        True
        >>> resolve_reward("vader", tokenizer=object()) is vader_reward
        True
    """
    if isinstance(reward, str):
        if reward != "vader":
            raise ValueError(f"{name} must be a callable or 'vader', got {reward!r}")
        if tokenizer is None:
            raise ValueError(f"the 'vader' {name} scores text: pass the model's tokenizer")
        return vader_reward
    if not callable(reward):
        raise ValueError(f"{name} must be a callable or 'vader', got {type(reward).__name__}")
    return reward
