"""Cautious Next Token Prediction (CNTP): entropy-triggered multi-trial sampling up to punctuation.

Paper: "Cautious Next Token Prediction" (Wang et al., Findings of ACL 2025, arXiv 2507.03038).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from hf_decoding_ext.core.entropy import entropy
from hf_decoding_ext.core.lifecycle import adopt, has_stateful, require_lifecycle
from hf_decoding_ext.core.loop import DecodingLoop, GenerationState
from hf_decoding_ext.core.rollout import (
    DEFAULT_PUNCTUATION,
    END_CAP,
    END_CRITERIA,
    END_EOS,
    END_STOP,
    Rollout,
    punctuation_token_ids,
    rollout,
)

_TRACE_ENDS = {END_EOS: "stop", END_CRITERIA: "stop", END_STOP: "punct", END_CAP: "cap"}
"""How a trial ended, as named in the ``cntp_trace``, from the end of its :func:`rollout`."""

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
    one batch on a copy of the KV cache repeated ``N`` times (:func:`~hf_decoding_ext.core.rollout.rollout`;
    finished trials are dropped from the batch).

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

    def _trials(self, state: GenerationState, scores: torch.Tensor, logits: torch.Tensor, n: int) -> Rollout:
        """Sample ``n`` independent trials from the current step (one batched :func:`rollout` on a branch of the
        cache), each until punctuation, the caller's stopping criteria or ``max_trial_tokens``."""
        return rollout(state, n, logits=logits, scores=scores, process=state.logits_processor, do_sample=True,
                       max_tokens=self.max_trial_tokens, stop_token_ids=self.punctuation_ids, stop_on_eos=False,
                       use_stopping_criteria=True, keep_processor_states=has_stateful(state.logits_processor),
                       return_steps=state.scores is not None or state.logits is not None)

    @torch.no_grad()
    def run(self, state: GenerationState):
        trace: list[dict[str, Any]] = []
        state.stats["multi_trial_steps"] = 0
        require_lifecycle(state.logits_processor, type(self).__name__)  # trials run them on branched rows
        while not state.done:
            logits, _ = state.next_token_logits()
            scores = state.process(logits)
            ent = float(entropy(scores)[0])
            n = self.num_trials(ent)
            if n <= 1:
                state.record(scores, logits)
                tok = state.select(scores)
                state.append(tok)
                trace.append({"entropy": ent, "n_trials": n, "trials": [[int(tok[0])]], "perplexities": None,
                              "chosen": 0, "appended": state.new_tokens[0, -1:].tolist(), "ends": [None]})
                continue
            trials = self._trials(state, scores, logits, n)
            tokens, lp_sum = trials.token_lists(), trials.scores.tolist()
            ends = [_TRACE_ENDS[e] for e in trials.ends]
            ppl = [math.exp(-lp_sum[i] / len(tokens[i])) for i in range(n)]
            best = min(range(n), key=lambda i: ppl[i])
            chosen = torch.tensor([tokens[best]], dtype=state.input_ids.dtype, device=state.device)
            # record before appending (stopping criteria see the scores, as in generate()), then drop the scores
            # of tokens that append() cut off (eos / max_new_tokens)
            before = len(state.scores) if state.scores is not None else 0
            before_logits = len(state.logits) if state.logits is not None else 0
            if state.scores is not None:
                state.scores.extend(x[None] for x in trials.step_scores[best])
            if state.logits is not None:
                state.logits.extend(x[None] for x in trials.step_logits[best])
            if trials.processor_states is not None:  # stateful processors continue from the chosen trial
                adopt(state.logits_processor, trials.processor_states[best])
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
