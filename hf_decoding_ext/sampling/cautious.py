"""Cautious Next Token Prediction (CNTP): entropy-triggered multi-trial sampling up to punctuation.

Paper: "Cautious Next Token Prediction" (Wang et al., Findings of ACL 2025, arXiv 2507.03038).
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Iterable

import torch

from hf_decoding_ext.core.loop import DecodingLoop, GenerationState, select_cache
from hf_decoding_ext.core.entropy import entropy

DEFAULT_PUNCTUATION = ".,;:!?\n)]}"
"""Characters that end a trial: the paper's punctuation set (``. , \\n ? ! : ; ) ] }``)."""

_PUNCT_CACHE: "weakref.WeakKeyDictionary[Any, dict[str, frozenset[int]]]" = weakref.WeakKeyDictionary()


def punctuation_token_ids(tokenizer, punctuation: str = DEFAULT_PUNCTUATION) -> frozenset[int]:
    """Ids of the tokens whose decoded text ends in one of ``punctuation`` (trailing spaces/tabs ignored; a
    trailing newline counts when ``"\\n"`` is in ``punctuation``). Computed once per tokenizer instance and cached
    (weakly, so the cache dies with the tokenizer)."""
    if not punctuation:
        raise ValueError("punctuation must contain at least one character")
    try:
        per_tok = _PUNCT_CACHE.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: compute without caching
        per_tok = {}
    if punctuation in per_tok:
        return per_tok[punctuation]
    chars = set(punctuation)
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    ids = set()
    for i, text in enumerate(texts):
        if "\n" in chars and text.endswith("\n"):
            ids.add(i)
            continue
        stripped = text.rstrip(" \t")
        if stripped and stripped[-1] in chars:
            ids.add(i)
    result = frozenset(ids)
    per_tok[punctuation] = result
    return result


class CautiousNTP(DecodingLoop):
    r"""Cautious Next Token Prediction (CNTP) decoding loop.

    From "Cautious Next Token Prediction" (Wang et al., Findings of ACL 2025, arXiv 2507.03038). At every step the
    entropy ``H`` of the (processed) next-token distribution sets the number of trials

    .. math:: N = \left\lfloor N_{min} + (N_{max} - N_{min})\,
              \mathrm{clip}\!\left(\frac{H - H_{low}}{H_{high} - H_{low}}, 0, 1\right) \right\rfloor .

    With ``N = 1`` one token is decoded as usual (sampled, or argmax when ``do_sample=False``). With ``N > 1``, ``N``
    trials are sampled independently from that step, each until it emits a punctuation token (or the caller's
    stopping criteria fire: eos, ``max_new_tokens``; or the optional ``max_trial_tokens`` cap); the trial with the
    lowest perplexity ``exp(-mean log p)`` under the sampling distribution is appended whole. The ``N`` trials run as
    one batch on a copy of the KV cache repeated ``N`` times (finished trials are dropped from the batch).

    Defaults are the paper's: ``N_min = 1``, ``N_max = 10``, ``H_low = 0.01``, ``H_high = 1.5`` (entropy in nats of the
    distribution after temperature/top-p). Perplexity uses the same processed distribution the trials are sampled
    from, as in the authors' code. Only batch size 1 is supported (trials make rows grow by different lengths).

    Per-step trace: with ``return_dict_in_generate=True`` the output has a ``cntp_trace`` field, one dict per step:
    ``entropy``, ``n_trials``, ``trials`` (token lists), ``perplexities``, ``chosen``, ``appended`` (tokens actually
    appended, after eos/``max_new_tokens`` truncation) and ``ends`` (why each trial ended: ``"punct"``, ``"stop"``
    or ``"cap"``). With ``output_scores=True`` the scores of each appended token are recorded.

    Args:
        tokenizer: tokenizer used to derive the punctuation tokens (:func:`punctuation_token_ids`).
        min_trials, max_trials: ``N_min`` and ``N_max``.
        entropy_low, entropy_high: ``H_low`` and ``H_high`` (nats).
        max_trial_tokens: optional cap on a trial's length (``None``: no cap, as in the paper).
        punctuation: characters ending a trial (used with ``tokenizer``).
        punctuation_ids: explicit punctuation token ids instead of deriving them from a tokenizer.

    Example:
        >>> from hf_decoding_ext.core.models import load_model, encode_prompts
        >>> from hf_decoding_ext.sampling.cautious import CautiousNTP
        >>> model, tokenizer = load_model()  # doctest: +SKIP
        >>> inputs = encode_prompts(tokenizer, "Why is the sky blue?")  # doctest: +SKIP
        >>> out = model.generate(**inputs, custom_generate=CautiousNTP(tokenizer), do_sample=True,
        ...                      temperature=1.0, max_new_tokens=64)  # doctest: +SKIP
    """

    supports_batch = False

    def __init__(self, tokenizer=None, min_trials: int = 1, max_trials: int = 10, entropy_low: float = 0.01,
                 entropy_high: float = 1.5, max_trial_tokens: int | None = None,
                 punctuation: str = DEFAULT_PUNCTUATION, punctuation_ids: Iterable[int] | None = None):
        if not isinstance(min_trials, int) or min_trials < 1:
            raise ValueError(f"min_trials must be an integer >= 1, got {min_trials!r}")
        if not isinstance(max_trials, int) or max_trials < min_trials:
            raise ValueError(f"max_trials must be an integer >= min_trials ({min_trials}), got {max_trials!r}")
        if not (math.isfinite(entropy_low) and math.isfinite(entropy_high)) or entropy_high <= entropy_low:
            raise ValueError(f"need finite entropy_low < entropy_high, got {entropy_low} and {entropy_high}")
        if max_trial_tokens is not None and (not isinstance(max_trial_tokens, int) or max_trial_tokens < 1):
            raise ValueError(f"max_trial_tokens must be None or a positive integer, got {max_trial_tokens!r}")
        if punctuation_ids is not None:
            ids = frozenset(int(i) for i in punctuation_ids)
        elif tokenizer is not None:
            ids = punctuation_token_ids(tokenizer, punctuation)
        else:
            raise ValueError("CautiousNTP needs a tokenizer (or explicit punctuation_ids) to find punctuation tokens")
        if not ids:
            raise ValueError("the punctuation token set is empty")
        self.punctuation_ids = ids
        self.min_trials = min_trials
        self.max_trials = max_trials
        self.entropy_low = float(entropy_low)
        self.entropy_high = float(entropy_high)
        self.max_trial_tokens = max_trial_tokens

    def num_trials(self, ent: float) -> int:
        """Number of trials for entropy ``ent`` (the paper's linear map, floored)."""
        x = min(max((float(ent) - self.entropy_low) / (self.entropy_high - self.entropy_low), 0.0), 1.0)
        return int(self.min_trials + (self.max_trials - self.min_trials) * x)

    def _punct_mask(self, vocab: int, device) -> torch.Tensor:
        mask = torch.zeros(vocab, dtype=torch.bool, device=device)
        ids = torch.tensor(sorted(i for i in self.punctuation_ids if i < vocab), dtype=torch.long, device=device)
        mask[ids] = True
        return mask

    @torch.no_grad()
    def _trials(self, state: GenerationState, scores: torch.Tensor, logits: torch.Tensor, n: int,
                is_punct: torch.Tensor):
        """Sample ``n`` independent trials from the current step (batched on a copy of the cache repeated ``n``
        times). Returns per trial: token list, summed log-probability, end reason, and (when the caller records
        them) the processed scores and raw logits of every token."""
        keep_scores, keep_logits = state.scores is not None, state.logits is not None
        first = torch.multinomial(torch.softmax(scores, dim=-1).expand(n, -1), num_samples=1).squeeze(1)
        logp0 = torch.log_softmax(scores, dim=-1)[0]
        tokens: list[list[int]] = [[t] for t in first.tolist()]
        lp_sum = [float(logp0[t[0]]) for t in tokens]
        step_scores = [[scores[0]] for _ in range(n)] if keep_scores else None
        step_logits = [[logits[0]] for _ in range(n)] if keep_logits else None
        ids = torch.cat([state.input_ids.expand(n, -1), first[:, None]], dim=1)
        mask = torch.cat([state.attention_mask.expand(n, -1), state.attention_mask.new_ones((n, 1))], dim=1)
        ends: list[str | None] = [self._end(tokens[i], bool(stop), is_punct)
                                  for i, stop in enumerate(state.stopping_criteria(ids, None).tolist())]
        active = [i for i in range(n) if ends[i] is None]
        if not active:
            return tokens, lp_sum, ends, step_scores, step_logits
        rows = torch.tensor(active, dtype=torch.long, device=ids.device)
        ids, mask = ids[rows], mask[rows]
        cache = select_cache(state.cache, torch.zeros_like(rows))  # the cache covers input_ids: repeat it
        while active:
            out = state.forward(cache=cache, input_ids=ids, attention_mask=mask)
            raw = out.logits[:, -1, :]
            s = state.process(raw, input_ids=ids)
            nxt = torch.multinomial(torch.softmax(s, dim=-1), num_samples=1).squeeze(1)
            lp = torch.log_softmax(s, dim=-1).gather(1, nxt[:, None]).squeeze(1).tolist()
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            stops = state.stopping_criteria(ids, None).tolist()
            still = []
            for j, i in enumerate(active):
                tokens[i].append(int(nxt[j]))
                lp_sum[i] += lp[j]
                if keep_scores:
                    step_scores[i].append(s[j])
                if keep_logits:
                    step_logits[i].append(raw[j])
                ends[i] = self._end(tokens[i], bool(stops[j]), is_punct)
                if ends[i] is None:
                    still.append(j)
            if len(still) < len(active):  # drop finished trials from the batch
                active = [active[j] for j in still]
                if not active:
                    break
                keep = torch.tensor(still, dtype=torch.long, device=ids.device)
                cache.batch_select_indices(keep)
                ids, mask = ids[keep], mask[keep]
        return tokens, lp_sum, ends, step_scores, step_logits

    def _end(self, trial: list[int], stopped: bool, is_punct: torch.Tensor) -> str | None:
        if stopped:
            return "stop"
        if bool(is_punct[trial[-1]]):
            return "punct"
        if self.max_trial_tokens is not None and len(trial) >= self.max_trial_tokens:
            return "cap"
        return None

    @torch.no_grad()
    def run(self, state: GenerationState):
        trace: list[dict[str, Any]] = []
        state.stats["multi_trial_steps"] = 0
        is_punct = None
        while not state.done:
            logits, _ = state.next_token_logits()
            scores = state.process(logits)
            if is_punct is None:
                is_punct = self._punct_mask(scores.shape[-1], scores.device)
            ent = float(entropy(scores)[0])
            n = self.num_trials(ent)
            if n <= 1:
                state.record(scores, logits)
                tok = state.select(scores)
                state.append(tok)
                trace.append({"entropy": ent, "n_trials": n, "trials": [[int(tok[0])]], "perplexities": None,
                              "chosen": 0, "appended": state.new_tokens[0, -1:].tolist(), "ends": [None]})
                continue
            tokens, lp_sum, ends, step_scores, step_logits = self._trials(state, scores, logits, n, is_punct)
            ppl = [math.exp(-lp_sum[i] / len(tokens[i])) for i in range(n)]
            best = min(range(n), key=lambda i: ppl[i])
            chosen = torch.tensor([tokens[best]], dtype=state.input_ids.dtype, device=state.device)
            # record before appending (stopping criteria see the scores, as in generate()), then drop the scores
            # of tokens that append() cut off (eos / max_new_tokens)
            before = len(state.scores) if state.scores is not None else 0
            before_logits = len(state.logits) if state.logits is not None else 0
            if state.scores is not None:
                state.scores.extend(x[None] for x in step_scores[best])
            if state.logits is not None:
                state.logits.extend(x[None] for x in step_logits[best])
            appended = state.append(chosen)
            if state.scores is not None:
                del state.scores[before + appended:]
            if state.logits is not None:
                del state.logits[before_logits + appended:]
            state.stats["multi_trial_steps"] += 1
            trace.append({"entropy": ent, "n_trials": n, "trials": tokens, "perplexities": ppl, "chosen": best,
                          "appended": state.new_tokens[0, state.new_tokens.shape[1] - appended:].tolist(),
                          "ends": ends})
        return {"cntp_trace": trace}
