"""SpecDec++: a draft-model chain whose length follows a trained acceptance prediction head."""

from __future__ import annotations

import os

import torch

from hf_decoding_ext.core import lifecycle
from hf_decoding_ext.core.tree import DraftTree
from hf_decoding_ext.speculative.drafters.base import Draft
from hf_decoding_ext.speculative.drafters.draft_model import DraftModelDrafter
from hf_decoding_ext.speculative.policies.draft_length import DraftLengthPolicy

__all__ = ["AcceptanceThresholdLength", "SpecDecPPDrafter"]


class AcceptanceThresholdLength(DraftLengthPolicy):
    """SpecDec++'s stopping rule (arXiv 2405.19715, Theorem: stop once the probability that at least one drafted
    token is rejected exceeds a threshold). With ``a_i`` the predicted acceptance probability of draft token ``i``,
    a draft of ``k`` tokens stops when

    ``k >= max_tokens``, or ``k >= min_tokens`` and ``1 - prod_{i <= k} a_i > threshold``.

    :meth:`start` begins a draft; :meth:`observe` records the next ``a_i``; :meth:`should_stop` applies the rule to
    a draft of ``k`` tokens; :meth:`stop` does both for the next token (``a`` of token ``k + 1``, then the rule at
    ``k + 1``). :meth:`length` is ``max_tokens``.

    Args:
        threshold: ``h`` in ``[0, 1]`` (official default 0.3; larger: longer drafts).
        min_tokens: ``K_min >= 1`` (official default 2).
        max_tokens: ``K_max >= min_tokens`` (official default 20).

    Example:
        >>> from hf_decoding_ext.speculative.drafters.specdec_pp import AcceptanceThresholdLength
        >>> rule = AcceptanceThresholdLength(threshold=0.3, min_tokens=2, max_tokens=20)
        >>> rule.start()
        >>> [rule.stop(a) for a in (0.6, 0.9, 0.8)]  # 1 - 0.6 > 0.3, but K_min = 2; 1 - 0.54 > 0.3: stop
        [False, True, True]
    """

    name = "specdec++"

    def __init__(self, threshold: float = 0.3, min_tokens: int = 2, max_tokens: int = 20):
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
        if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or not 1 <= min_tokens <= max_tokens:
            raise ValueError(f"min_tokens must be an int in [1, max_tokens={max_tokens}], got {min_tokens!r}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
        super().__init__(max_tokens, 0.0)
        self.threshold = float(threshold)
        self.min_tokens = min_tokens
        self.max_tokens = max_tokens
        self.start()

    def start(self) -> None:
        """Start a new draft: no token, product 1."""
        self.accept_all = 1.0
        self.count = 0

    @property
    def rejection_probability(self) -> float:
        """``1 - prod a_i`` over the tokens observed in this draft."""
        return 1.0 - self.accept_all

    def observe(self, acceptance: float) -> None:
        """Record the predicted acceptance probability of the next draft token."""
        acceptance = float(acceptance)
        if not 0.0 <= acceptance <= 1.0:
            raise ValueError(f"acceptance must be a probability, got {acceptance!r}")
        self.accept_all *= acceptance
        self.count += 1

    def should_stop(self, num_tokens: int) -> bool:
        """Whether a draft of ``num_tokens`` tokens ends here (on the acceptances observed so far)."""
        if num_tokens >= self.max_tokens:
            return True
        return num_tokens >= self.min_tokens and self.rejection_probability > self.threshold

    def stop(self, acceptance: float) -> bool:
        """:meth:`observe` ``acceptance`` (of the next token), then :meth:`should_stop` with that many tokens."""
        self.observe(acceptance)
        return self.should_stop(self.count)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(threshold={self.threshold}, min_tokens={self.min_tokens}, "
                f"max_tokens={self.max_tokens})")


class SpecDecPPDrafter(DraftModelDrafter):
    """SpecDec++ (Huang, Guo, Wang, "SpecDec++: Boosting Speculative Decoding via Adaptive Candidate Lengths",
    COLM 2025, arXiv 2405.19715): a draft-model chain whose length is chosen token by token by a trained acceptance
    prediction head (:class:`~hf_decoding_ext.speculative.heads.specdec_pp.AcceptancePredictionHead`) on the draft
    model's last hidden state. After each drafted token ``y_k`` the draft model runs on it (the forward that also
    gives the next token's distribution), the head predicts its acceptance probability ``a_k`` from the hidden
    state there, and the draft stops when :class:`AcceptanceThresholdLength` says so: ``k >= max_tokens``, or
    ``k >= min_tokens`` and ``1 - prod_{i<=k} a_i > threshold``. Verification is unchanged (speculative sampling or
    greedy), so the output keeps the target's distribution (greedy: token-identical): the stopping decision depends
    only on tokens already drafted, never on the token it would drop.

    With ``do_sample=True`` the tokens are sampled from the draft's distribution after the caller's processors (on a
    fork, as :class:`~hf_decoding_ext.speculative.drafters.draft_model.DraftModelDrafter`), greedy otherwise.
    ``Draft.info`` holds the predicted acceptances (``"acceptance"``) and the stop reason (``"stop"``: ``"threshold"``,
    ``"max_tokens"`` or ``"room"``).

    Args:
        assistant_model: the draft model (``None``: ``generate(..., assistant_model=...)``).
        head: the acceptance head: an :class:`AcceptancePredictionHead`, a folder or Hub id, or ``"shipped"`` (the
            head shipped for the default model with the distilled draft, ``hf_decoding_ext/data/specdec_pp_head``);
            loaded at the first ``generate()`` call (``ValueError`` when its width is not the draft's).
        threshold: ``h`` (official default 0.3).
        min_tokens: ``K_min`` (official default 2).
        max_tokens: ``K_max`` (official default 20).
        count_last: ``True`` (default, the paper's rule): the product includes the last drafted token's ``a_k``,
            which costs one draft forward over the last token of each draft (it also puts that token in the draft
            cache). ``False``: the official code's loop, where the head runs on the hidden state of the forward that
            produced the current token's distribution, so the decision after drafting ``y_k`` uses ``a_1 .. a_{k-1}``
            (one more token drafted past the threshold, no forward over it).

    Deviations: (1) the paper's rule by default (see ``count_last``); (2) the draft does not stop at an eos token (as
    :class:`~hf_decoding_ext.speculative.drafters.draft_model.DraftModelDrafter`; the engine ends the generation
    inside an accepted run).

    At this scale (the 135M default model, the distilled 4-layer draft accepting about a quarter of its tokens) the
    shipped head predicts acceptances far below the acceptance rate (the loss weighs rejections 6 times), so the
    official defaults (0.3, [2, 20]) draft ``min_tokens`` tokens almost always; longer drafts need thresholds near
    0.9. The paper's effect (fewer rejected draft tokens than the best fixed length) is not reproduced here: see
    ``model_cards/specdec_pp_head.md`` for the fixed-length and threshold sweeps.

    Example:
        >>> from hf_decoding_ext.speculative import SpeculativeDecoding
        >>> from hf_decoding_ext.speculative.drafters.specdec_pp import SpecDecPPDrafter
        >>> drafter = SpecDecPPDrafter.for_model(model)  # the distilled draft and the shipped head  # doctest: +SKIP
        >>> out = model.generate(**inputs, do_sample=True, max_new_tokens=64,
        ...                      custom_generate=SpeculativeDecoding(drafter))  # doctest: +SKIP
    """

    def __init__(self, assistant_model=None, head="shipped", threshold: float = 0.3, min_tokens: int = 2,
                 max_tokens: int = 20, count_last: bool = True):
        from hf_decoding_ext.speculative.heads.specdec_pp import AcceptancePredictionHead

        if not isinstance(head, (AcceptancePredictionHead, str, os.PathLike)):
            raise ValueError(f"head must be an AcceptancePredictionHead, a path or 'shipped', got {head!r}")
        if not isinstance(count_last, bool):
            raise ValueError(f"count_last must be a bool, got {count_last!r}")
        self.rule = AcceptanceThresholdLength(threshold, min_tokens, max_tokens)  # validates
        super().__init__(assistant_model, num_tokens=max_tokens, confidence_threshold=0.0, schedule="constant")
        self.head = head
        self.threshold = float(threshold)
        self.min_tokens = min_tokens
        self.max_tokens = max_tokens
        self.count_last = count_last
        self._norm = None

    @classmethod
    def for_model(cls, model=None, tokenizer=None, assistant: str = "distilled", head: str = "shipped",
                  threshold: float = 0.3, min_tokens: int = 2, max_tokens: int = 20,
                  count_last: bool = True) -> SpecDecPPDrafter:
        """Registry/CLI factory (``assistant`` as in :meth:`DraftModelDrafter.load_assistant`; the shipped head was
        trained for the shipped distilled draft)."""
        return cls(cls.load_assistant(model, assistant), head=head, threshold=threshold, min_tokens=min_tokens,
                   max_tokens=max_tokens, count_last=count_last)

    def _load_head(self):
        from hf_decoding_ext.speculative.heads.specdec_pp import AcceptancePredictionHead, load_shipped_head

        head = self.head
        if head == "shipped":
            head = load_shipped_head()
        elif not isinstance(head, AcceptancePredictionHead):
            local = os.path.isdir(head)
            head = load_shipped_head(head) if local else AcceptancePredictionHead.from_pretrained(str(head)).float()
        hidden = int(self.assistant.config.hidden_size)
        if int(head.config.hidden_size) != hidden:
            raise ValueError(f"the acceptance head reads hidden size {head.config.hidden_size}, the draft model has "
                             f"{hidden}")
        p = next(self.assistant.parameters())
        self.head = head.to(device=p.device).eval()

    def begin(self, state) -> None:
        from hf_decoding_ext.core.anatomy import final_norm

        super().begin(state)
        self._load_head()
        self._norm = final_norm(self.assistant)
        self.rule = AcceptanceThresholdLength(self.threshold, self.min_tokens, self.max_tokens)

    def _step_hidden(self, cur_ids: torch.Tensor, cur_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One draft forward (as :meth:`_step`) that also returns the draft's last hidden state at the last
        position ``(hidden,)``."""
        from hf_decoding_ext.core.anatomy import OutputCapture

        with OutputCapture(self._norm) as hook:
            logits = self._step(cur_ids, cur_mask)
        return logits, hook.output[0, -1]

    def _acceptance(self, hidden: torch.Tensor) -> float:
        return float(self.head.acceptance_probability(hidden[None])[0])

    def propose(self, state) -> Draft:
        ids, mask = state.input_ids, state.attention_mask
        self._sync(ids)
        room = state.generation_config.max_length - ids.shape[1] - 1
        limit = max(0, min(self.max_tokens, room))
        rule = self.rule
        rule.start()
        tokens, probs, acceptances = [], [], []
        reason = "room"
        if limit > 0:
            processors = lifecycle.fork(state.logits_processor, caller=type(self).__name__)
            cur_ids, cur_mask = ids, mask
            logits = self._step(cur_ids, cur_mask)
            while True:
                scores = processors(cur_ids, logits)
                if state.do_sample:
                    p = torch.softmax(scores, dim=-1)
                    tok = torch.multinomial(p, 1)[:, 0]
                    probs.append(p[0])
                else:
                    tok = scores.argmax(-1)
                tokens.append(int(tok))
                k = len(tokens)
                cur_ids = torch.cat([cur_ids, tok[:, None]], dim=1)
                cur_mask = torch.cat([cur_mask, cur_mask.new_ones((1, 1))], dim=1)
                if not self.count_last and rule.should_stop(k):  # official loop: a_1 .. a_{k-1}
                    reason = "max_tokens" if k >= self.max_tokens else "threshold"
                    break
                if k >= limit:
                    reason = "max_tokens" if k >= self.max_tokens else "room"
                    break
                logits, hidden = self._step_hidden(cur_ids, cur_mask)
                a = self._acceptance(hidden)
                acceptances.append(a)
                rule.observe(a)
                if self.count_last and rule.should_stop(k):  # the paper's rule: a_1 .. a_k
                    reason = "threshold"
                    break
            self._cached_ids = cur_ids[:, : self._cache.get_seq_length()]
        draft_probs = torch.stack(probs) if probs else None
        draft = Draft(DraftTree.chain(torch.tensor(tokens, dtype=torch.long), draft_probs,
                                      "deterministic" if draft_probs is None else "iid"))
        draft.info["acceptance"] = acceptances
        draft.info["stop"] = reason
        return draft

    def observe(self, state, result) -> None:
        pass
