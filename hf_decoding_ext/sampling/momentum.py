"""Momentum decoding (Lan et al., 2022) as a ``LogitsProcessor`` for greedy ``generate()``."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence

import torch
from transformers import LogitsProcessor


def _table(values: dict[int, float]) -> Callable[[int], float]:
    return lambda d: values.get(d, math.inf)


RESISTANCE_FUNCTIONS: dict[str, Callable[[int], float]] = {
    # R(d) = d: the table the authors' code lists for GPT2-XL (their English open-ended experiments).
    "linear": lambda d: float(d),
    # the authors' "N-gram blocking" table: only 4-gram revisits are resisted, longer ones are blocked.
    "blocking": _table({1: 0.0, 2: 0.0, 3: 0.0, 4: 5.0}),
    # the ablation resistance functions of the paper (written so that alpha=0.2 gives the intended scale)
    "constant": lambda d: 2.0,
    "log": lambda d: math.log(1 + d, 6) / 0.2,
    "exp": lambda d: 1.5**d / 2,
}
"""Named resistance functions ``R(d)`` of the circle depth ``d >= 1`` (``R(0) = 0`` always)."""


def _token_id_tuple(value, name: str) -> tuple[int, ...]:
    """``value`` (an iterable of token ids) as a sorted tuple of distinct ids; ``ValueError`` quoting it otherwise."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError(f"`{name}` must be an iterable of token ids, got {value!r}")
    ids = list(value)
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"`{name}` must hold non-negative integer token ids, got {value!r}")
    return tuple(sorted(set(ids)))


def special_token_ids(tokenizer=None, model=None) -> tuple[int, ...]:
    """The tokenizer's special tokens (``all_special_ids``: bos, eos, pad, the chat markers such as ``<|im_start|>``
    and ``<|im_end|>``...) and every eos id of the tokenizer and of the model's generation config.

    Example:
        >>> class Tok:
        ...     all_special_ids, eos_token_id = [0, 1, 2], 2
        >>> special_token_ids(Tok())
        (0, 1, 2)
    """
    ids = set(getattr(tokenizer, "all_special_ids", None) or [])
    eos = [getattr(tokenizer, "eos_token_id", None),
           getattr(getattr(model, "generation_config", None), "eos_token_id", None)]
    for e in eos:
        ids.update([e] if isinstance(e, int) else (e or []))
    return tuple(sorted(i for i in ids if isinstance(i, int)))


def chat_template_token_ids(tokenizer) -> tuple[int, ...]:
    """The tokens the tokenizer's chat template writes around the messages (role headers and turn markers:
    ``<|im_start|>``, ``system``, ``user``, ``assistant``, ``<|im_end|>`` for ChatML), without whitespace-only tokens
    (the newline after a role name is ordinary text too). Empty when the tokenizer has no chat template.

    Found by rendering a system / user / assistant conversation (user / assistant when the template refuses a system
    turn) whose contents are unique markers and tokenising what lies between them.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        return ()
    markers = [f"QZXMARK{i}QZX" for i in range(3)]
    text = None
    for roles in (("system", "user", "assistant"), ("user", "assistant")):
        try:
            text = tokenizer.apply_chat_template([{"role": r, "content": m} for r, m in zip(roles, markers)],
                                                 tokenize=False, add_generation_prompt=True)
            break
        except Exception:  # a template that refuses a system turn (or any other role mix) raises its own error
            continue
    if not isinstance(text, str):
        return ()
    ids = set()
    for piece in re.split("|".join(markers), text):
        if piece:
            ids.update(i for i in tokenizer(piece, add_special_tokens=False)["input_ids"]
                       if tokenizer.decode([i]).strip())
    return tuple(sorted(ids))


class MomentumLogitsProcessor(LogitsProcessor):
    r"""
    [`LogitsProcessor`] implementing *momentum decoding* from "Momentum Decoding: Open-ended Text Generation As Graph
    Exploration" (Lan, Su, Liu, Huang and Mao, 2022, arXiv:2212.02175). Use it with greedy decoding
    (``do_sample=False``).

    Generation is viewed as the exploration of a directed graph whose nodes are the tokens already in the sequence
    (prompt included) and whose edges join consecutive tokens. Degeneration (repetition) is a walk round a circular
    loop of this graph. At each step the ``top_k`` candidates (by model score) are rescored as

    .. math::

        x_t = \arg\max_{v \in V^{(k)}} \; p_\theta(v \mid x_{<t}) - \alpha \, R(d(v)),

    where ``d(v)`` is the *depth of the circle* that emitting ``v`` would close: ``0`` when ``v`` is a new node, else
    the length (capped at ``ngram_size``) of the longest n-gram ending with ``v`` (i.e. the last ``d - 1`` tokens
    followed by ``v``) that already occurs in the sequence. ``R`` is the resistance function (``R(0) = 0``). New nodes
    are thus explored greedily, while the model may return to existing nodes with a momentum downgraded by ``R``.

    Excluded tokens (a deviation: the paper continues plain text with GPT2-XL and says nothing about special
    tokens): the tokens of ``excluded_token_ids`` are not nodes of the graph. As candidates their depth is 0 (never
    resisted) and n-grams do not run through them. :meth:`for_model` excludes the tokenizer's special tokens and
    every eos id by default (:func:`special_token_ids`), so that in a chat the end of turn, which follows a "." in
    every earlier turn, is not resisted as a revisit (the answer would run on), nor are the template's markers
    (``<|im_start|>``, ``<|im_end|>``); ``chat_template_tokens=True`` also excludes the role names of the template's
    headers (:func:`chat_template_token_ids`). The constructor excludes nothing unless given the ids.

    The processor returns ``p - alpha * R(d)`` on the ``top_k`` candidates and ``-inf`` elsewhere, so the argmax of its
    output is the momentum-decoding choice. The output is a score, not a log-probability: put this processor last and
    do not sample from it. An infinite resistance (blocking) is capped at a large finite value so that, when every
    candidate is blocked, the most probable one is still chosen (as in the authors' code, which takes the first
    maximum).

    The graph is implicit in ``input_ids`` and recomputed at every step by a few vectorised tensor operations costing
    ``O(batch * length * (ngram_size + top_k))`` (no Python loop over the history, no state kept between calls), so
    batch rows are independent and beams, reordered rows and new generations need no reset. The authors' code keeps
    the graph as a dictionary updated token by token; the depth computed here is the same (tested against a direct
    transcription of their definition). Left padding is ignored: when ``pad_token_id`` is set, the leading run of
    pad tokens of each row is not part of the graph (a genuine prompt that starts with the pad token would lose those
    leading tokens too).

    Defaults follow the paper and the authors' code: ``top_k=5``, ``alpha=0.2``, circle depth up to 5 (their
    ``max_length``), and the resistance ``R(d) = d``, the table given in the authors' code for GPT2-XL. The code also
    contains other tables (an "n-gram blocking" one, and the ``constant``/``log``/``exp`` functions of the paper's
    ablation); they are available by name in :data:`RESISTANCE_FUNCTIONS`, and any callable ``R(d)`` or sequence
    ``[R(1), ..., R(ngram_size)]`` is accepted.

    Args:
        top_k (`int`, *optional*, defaults to 5):
            Number of candidates (by score) considered at each step.
        alpha (`float`, *optional*, defaults to 0.2):
            Weight of the resistance term (in probability units).
        resistance (`str`, callable or sequence, *optional*, defaults to `"linear"`):
            The resistance function ``R(d)`` for ``d = 1 .. ngram_size``.
        ngram_size (`int`, *optional*, defaults to 5):
            Maximum circle depth (longest repeated n-gram looked for).
        pad_token_id (`int`, *optional*):
            Id of the left-padding token, whose leading run in each row is ignored.
        excluded_token_ids (iterable of `int`, *optional*):
            Tokens that are not graph nodes: never resisted as candidates, and n-grams do not run through them
            (e.g. ``tokenizer.all_special_ids``: eos and the chat markers).

    Examples:

    ```python
    >>> from hf_decoding_ext.core.models import load_model, encode_prompts
    >>> from hf_decoding_ext.sampling.momentum import MomentumLogitsProcessor
    >>> model, tokenizer = load_model()  # doctest: +SKIP
    >>> inputs = encode_prompts(tokenizer, ["Write a story about a lighthouse keeper."])  # doctest: +SKIP
    >>> processor = MomentumLogitsProcessor(top_k=5, alpha=0.2, pad_token_id=2, excluded_token_ids=[0, 1, 2])
    >>> processor.excluded_token_ids
    (0, 1, 2)
    >>> out = model.generate(**inputs, logits_processor=[processor], do_sample=False)  # doctest: +SKIP
    ```
    """

    _BLOCKED = 1.0e4  # stands for an infinite resistance

    def __init__(
        self,
        top_k: int = 5,
        alpha: float = 0.2,
        resistance: str | Callable[[int], float] | Sequence[float] = "linear",
        ngram_size: int = 5,
        pad_token_id: int | None = None,
        excluded_token_ids: Iterable[int] | None = None,
    ):
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"`top_k` must be a positive integer, got {top_k!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
            raise ValueError(f"`alpha` must be a finite non-negative number, got {alpha!r}")
        if isinstance(ngram_size, bool) or not isinstance(ngram_size, int) or ngram_size < 1:
            raise ValueError(f"`ngram_size` must be a positive integer, got {ngram_size!r}")
        if pad_token_id is not None and (isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int)):
            raise ValueError(f"`pad_token_id` must be an integer or None, got {pad_token_id!r}")
        if isinstance(resistance, str):
            if resistance not in RESISTANCE_FUNCTIONS:
                raise ValueError(
                    f"Unknown resistance {resistance!r}; choose one of {sorted(RESISTANCE_FUNCTIONS)}, a callable "
                    "R(depth) or a sequence [R(1), ..., R(ngram_size)]"
                )
            fn = RESISTANCE_FUNCTIONS[resistance]
            values = [fn(d) for d in range(1, ngram_size + 1)]
        elif callable(resistance):
            values = [float(resistance(d)) for d in range(1, ngram_size + 1)]
        elif isinstance(resistance, Sequence):
            if len(resistance) != ngram_size:
                raise ValueError(
                    f"a resistance table needs one value per depth 1..ngram_size ({ngram_size}), got {len(resistance)}"
                )
            values = [float(v) for v in resistance]
        else:
            raise ValueError(f"`resistance` must be a name, a callable or a sequence, got {type(resistance).__name__}")
        if any(math.isnan(v) or v < 0 for v in values):
            raise ValueError(f"resistance values must be non-negative, got {values}")
        self.top_k = top_k
        self.alpha = float(alpha)
        self.ngram_size = ngram_size
        self.pad_token_id = pad_token_id
        self.excluded_token_ids = _token_id_tuple(excluded_token_ids or (), "excluded_token_ids")
        self._excluded = torch.tensor(self.excluded_token_ids, dtype=torch.long)
        # table indexed by depth 0..ngram_size; infinite resistance becomes a large finite penalty
        self._resistance = torch.tensor([0.0] + [min(v, self._BLOCKED) for v in values], dtype=torch.float32)

    @classmethod
    def for_model(
        cls,
        model=None,
        tokenizer=None,
        top_k: int = 5,
        alpha: float = 0.2,
        resistance: str = "linear",
        ngram_size: int = 5,
        excluded_token_ids: Iterable[int] | None = None,
        chat_template_tokens: bool = False,
    ) -> MomentumLogitsProcessor:
        """Build the processor with the padding token taken from the tokenizer (or the model's generation config).

        ``excluded_token_ids=None`` (default) excludes :func:`special_token_ids` (the tokenizer's special tokens and
        every eos id); ``chat_template_tokens=True`` adds :func:`chat_template_token_ids` (role names of the chat
        template's headers)."""
        excluded = special_token_ids(tokenizer, model) if excluded_token_ids is None else \
            _token_id_tuple(excluded_token_ids, "excluded_token_ids")
        if chat_template_tokens:
            excluded = (*excluded, *chat_template_token_ids(tokenizer))
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None and model is not None:
            gen_cfg = getattr(model, "generation_config", None)
            pad = getattr(gen_cfg, "pad_token_id", None)
            if isinstance(pad, (list, tuple)):
                pad = pad[0] if pad else None
        return cls(top_k=top_k, alpha=alpha, resistance=resistance, ngram_size=ngram_size, pad_token_id=pad,
                   excluded_token_ids=excluded)

    def circle_depth(self, input_ids: torch.LongTensor, candidates: torch.LongTensor) -> torch.LongTensor:
        """Depth ``d`` of the circle each candidate would close, ``(batch, n_candidates)``; 0 for a new node."""
        batch, length = input_ids.shape
        if length == 0:
            return torch.zeros_like(candidates)
        # not nodes (-1): the leading run of pad tokens (left padding) and the excluded tokens
        outside = torch.isin(input_ids, self._excluded.to(input_ids.device))
        if self.pad_token_id is not None:
            outside |= ~(input_ids != self.pad_token_id).cummax(dim=1).values
        ids = input_ids.masked_fill(outside, -1)
        m = self.ngram_size - 1
        if m > 0:
            # suffix[:, j] = length (<= n - 1) of the common suffix of ids[:, :j] and ids (the current end): how many
            # tokens just before position j repeat the last tokens of the sequence. A non-node (-1) never matches
            # (-2 at the end), so n-grams do not run through it.
            end = torch.nn.functional.pad(ids[:, -m:], (m - min(m, length), 0), value=-2)
            end = end.masked_fill(end < 0, -2)
            windows = torch.nn.functional.pad(ids, (m, 0), value=-3)[:, :length + m - 1].unfold(1, m, 1)
            match = (windows == end.unsqueeze(1)).flip(-1).cumprod(-1)  # (batch, length, m), from position j-1 back
            suffix = match.sum(-1)
        else:
            suffix = torch.zeros_like(ids)
        hits = ids.unsqueeze(1) == candidates.unsqueeze(2)  # (batch, k, length); -1 never equals a token, so an
        # excluded candidate has depth 0
        return torch.where(hits, (suffix + 1).unsqueeze(1), 0).amax(dim=-1)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        k = min(self.top_k, scores.shape[-1])
        top_scores, top_ids = torch.topk(scores, k, dim=-1)
        probs = torch.exp(top_scores.float() - torch.logsumexp(scores.float(), dim=-1, keepdim=True))
        depth = self.circle_depth(input_ids.to(scores.device), top_ids)
        resistance = self._resistance.to(scores.device)[depth]
        momentum = probs - self.alpha * resistance
        # candidates already excluded by an earlier processor stay excluded
        momentum = momentum.masked_fill(torch.isneginf(top_scores), -math.inf)
        out = torch.full_like(scores, -math.inf)
        return out.scatter(-1, top_ids, momentum.to(scores.dtype))
