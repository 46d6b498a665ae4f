"""Entropy Adaptive Decoding (Toby Simonds, "Entropy Adaptive Decoding: Dynamic Model Switching for Efficient
Inference", arXiv 2502.06833, 2025; no official code)."""

from __future__ import annotations

import math
from collections import deque
from numbers import Real

import torch

from hf_decoding_ext.core.entropy import entropy
from hf_decoding_ext.core.router import RouterLoop, RouterRun

DEFAULT_THRESHOLD = 1.5
"""Default rolling-entropy threshold tau, in nats (this library's choice, not the paper's; see
:data:`PAPER_FIDELITY`). Not calibrated: on one chat prompt with the distilled draft (small) and SmolLM2-135M-Instruct
(large), the small model's 5-token rolling entropy ran 1.5-2.4 nats along the large model's greedy text and 0.4-1.9
along its own, which falls into a loop of newlines (the draft is trained to propose tokens for verification, not to
write alone): tau = 1.0 gave 100% large-model tokens, tau = 2.0 / 2.5 / 3.5 gave 0% and 24 newlines."""

DEFAULT_WINDOW = 5
"""Default rolling window w, in generated tokens (this library's choice, see :class:`EntropyAdaptiveDecoding`)."""

PAPER_FIDELITY = (
    ("switching rule", ("faithful: the small model writes while the rolling mean of next-token entropy over the last "
                       "w tokens is at most tau, the large model while it exceeds tau; the rule is re-evaluated at "
                       "every token, so generation returns to the small model as soon as the mean falls back")),
    ("whose entropy", ("the small model's raw (unprocessed, temperature-1) next-token entropy, in nats, at every "
                      "step, also while the large model writes (the brief's reading; the paper monitors 'model "
                      "logit distributions'); so the small model runs at every step")),
    ("window start", "choice: before w tokens are generated the mean is over the tokens so far"),
    ("window and threshold", ("choice: w = 5 tokens and tau = 1.5 nats by default (the paper's values are not "
                             "given in the brief or the catalogue, and were not read from the paper); tau trades "
                             "quality for the large model's share of tokens and must be calibrated per model pair "
                             "(see DEFAULT_THRESHOLD)")),
    ("KV catch-up", ("faithful: both models ingest every token; a model feeds all tokens it missed in one forward "
                    "the next time it runs (hf_decoding_ext.core.router)")),
    ("models", ("deviation: small = the library's distilled 4-layer draft of SmolLM2-135M-Instruct, large = the "
               "full model (paper: LLaMA 1B/3B/8B/11B and Qwen 0.5B-14B pairs); any pair sharing a tokenizer "
               "can be passed")),
    ("batch", "deviation: batch size 1 only"),
)


def fidelity_markdown() -> str:
    return "\n".join(f"- **{k}**: {v}" for k, v in PAPER_FIDELITY)


class EntropyAdaptiveDecoding(RouterLoop):
    """Entropy Adaptive Decoding (EAD; Simonds, arXiv 2502.06833): generate with a small model, hand generation to
    the large model while the rolling mean of the small model's next-token entropy exceeds a threshold, and back when
    it falls to the threshold or below. Lossy by design (no verification); both models ingest every token.

    At step t the small model (always run, on the committed sequence) gives entropy ``H_t`` (nats, raw logits); with
    ``Hbar_t`` the mean of the last ``window`` entropies (fewer at the start), the token comes from the large model
    if ``Hbar_t > threshold`` and from the small model otherwise, after the caller's logits processors (greedy or
    sampling as ``generate()`` asks). Hence ``threshold=-inf`` reproduces the large model's own output (greedy: token
    for token) and ``threshold=+inf`` the small model's. The large model runs only on the steps it writes,
    catching up on the small model's tokens in one forward. The large model's share of tokens falls as tau rises, but
not necessarily monotonically: routing changes the text and so the later entropies (it is monotone when the text does
not depend on the routing, e.g. two models with the same greedy choices). Per-model accounting: :meth:`summary` and, with
    ``return_dict_in_generate=True``, the output's ``router`` (forwards, tokens fed, tokens produced per model, the
    large model's share) and ``router_steps`` (per token: model, token, entropy, rolling entropy).

    Deviations from the paper (:data:`PAPER_FIDELITY`): window ``w = 5`` and threshold ``tau = 1.5`` nats are this
    library's uncalibrated defaults (not taken from the paper, :data:`DEFAULT_THRESHOLD`); the entropy is the small model's, computed on raw logits; batch 1
    only; the default pair is the library's distilled draft (small) and SmolLM2-135M-Instruct (large).

    Args:
        small: the small model; it must share the large model's tokenizer (vocabulary size checked).
        threshold: tau, in nats; ``float("inf")`` never hands over, ``float("-inf")`` always does.
        window: w >= 1, the number of most recent steps averaged.

    Example:
        >>> from hf_decoding_ext.core.models import load_model
        >>> from hf_decoding_ext.collaboration.entropy_adaptive import EntropyAdaptiveDecoding
        >>> model, tok = load_model()  # doctest: +SKIP
        >>> loop = EntropyAdaptiveDecoding.for_model(model, threshold=1.5, window=5)  # doctest: +SKIP
        >>> inputs = tok("The capital of France is", return_tensors="pt")  # doctest: +SKIP
        >>> out = model.generate(**inputs, max_new_tokens=32, do_sample=False, custom_generate=loop,
        ...                      return_dict_in_generate=True)  # doctest: +SKIP
        >>> share = out.router["large_fraction"]  # doctest: +SKIP
        >>> EntropyAdaptiveDecoding(None, threshold=float("nan"))
        Traceback (most recent call last):
        ValueError: threshold must be a real number (+-inf allowed), got nan
    """

    small_logits_every_step = True

    def __init__(self, small, threshold: float = DEFAULT_THRESHOLD, window: int = DEFAULT_WINDOW):
        if isinstance(threshold, bool) or not isinstance(threshold, Real) or math.isnan(float(threshold)):
            raise ValueError(f"threshold must be a real number (+-inf allowed), got {threshold!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an integer >= 1, got {window!r}")
        super().__init__(small)
        self.threshold = float(threshold)
        self.window = window

    @classmethod
    def for_model(cls, model=None, tokenizer=None, small="distilled", threshold: float = DEFAULT_THRESHOLD,
                  window: int = DEFAULT_WINDOW) -> EntropyAdaptiveDecoding:
        """Registry/CLI factory. ``small``: a model, or a name as in
        :meth:`~hf_decoding_ext.speculative.drafters.draft_model.DraftModelDrafter.load_assistant` (``"distilled"``:
        the library's distilled draft of the default model; ``"self:N"``: the large model's first N layers; a model
        name or path)."""
        if isinstance(small, str):
            from hf_decoding_ext.speculative.drafters.draft_model import (
                DraftModelDrafter,
            )

            small = DraftModelDrafter.load_assistant(model, small)
        return cls(small, threshold=threshold, window=window)

    def begin(self, state, run: RouterRun) -> None:
        run.extra["entropies"] = deque(maxlen=self.window)

    def choose(self, state, run: RouterRun, small_logits: torch.Tensor):
        h = float(entropy(small_logits[0]))
        window = run.extra["entropies"]
        window.append(h)
        mean = sum(window) / len(window)
        run.note(entropy=h, rolling_entropy=mean)
        return "large" if mean > self.threshold else "small"
