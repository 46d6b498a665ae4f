"""One mechanism for contrastive and guidance decoding: a second view of the next-token distribution.

Context-aware decoding, classifier-free guidance, instructive decoding, leading-query contrastive decoding and
contrastive decoding with an amateur model all run a *second view* at every step (the same model under an altered
prompt, or another, weaker model) and combine its next-token logits with the main ones. They differ only in the
second view's prompt and in a small combination formula. :class:`ContrastiveContextProcessor` does the shared work:

* it keeps its own KV cache for the second view: on the first call it records the main prompt and runs the
  second-view prompt once; later calls feed only the tokens generated since (``input_ids[:, main_prompt_len:]``);
* it copes with the generated part being rolled back or replaced (the speculative engine calls processors at draft
  tree nodes): it keeps the tokens already fed, crops its cache back to the longest common prefix with the incoming
  ones and feeds the rest; rows permuted between calls (beam search) are matched and the cache reordered;
* a fresh ``generate()`` call (other batch size, other main prompt, input shorter than the recorded prompt) resets
  it; :meth:`ContrastiveContextProcessor.reset` does so explicitly;
* it handles batches with left padding in both views (per-row second-view prompts of different lengths) and a
  second-view model on its own device and dtype (results come back on the main scores' device and dtype).

The subclasses in this package (one module per paper) only set the combination function and its parameters.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
from transformers import DynamicCache, LogitsProcessor

from hf_decoding_ext.core.lifecycle import StatefulLogitsProcessor
from hf_decoding_ext.core.loop import select_cache
from hf_decoding_ext.core.rows import is_new_prompt

SPACES = ("logits", "log_probs")


def model_vocab_size(model) -> int:
    """Width of the model's next-token logits (its LM head's output size, else ``config.vocab_size``)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor):
        return int(weight.shape[0])
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None:
        raise ValueError(f"cannot determine the vocabulary size of {type(model).__name__}")
    return int(vocab)


def _model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    try:
        p = next(model.parameters())
        return p.device, p.dtype
    except (StopIteration, AttributeError):  # pragma: no cover - exotic wrappers
        return torch.device("cpu"), torch.float32


def pad_left(sequences: Sequence[Sequence[int]], pad_token_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into ``(input_ids, attention_mask)``, both ``(batch, max_len)`` int64.

    Example:
        >>> ids, mask = pad_left([[5, 6, 7], [8]], pad_token_id=0)
        >>> ids.tolist(), mask.tolist()
        ([[5, 6, 7], [0, 0, 8]], [[1, 1, 1], [0, 0, 1]])
    """
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("pad_left needs at least one sequence and no empty sequence")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), int(pad_token_id), dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, width - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


def _as_left_padded(ids: torch.Tensor, mask: torch.Tensor, pad_token_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-pack any padding layout (right padding, holes) into left padding; rows must keep >= 1 real token."""
    real = mask.bool()
    if bool((real.sum(-1) == 0).any()):
        raise ValueError("every second-view prompt needs at least one real (unmasked) token")
    if bool((real.long().diff(dim=-1) >= 0).all()):  # already 0...01...1 in every row
        return ids, mask
    rows = [ids[i][real[i]].tolist() for i in range(ids.shape[0])]
    return pad_left(rows, pad_token_id)


def encode_second_view(tokenizer, prompts, chat: bool | None = None, device=None) -> dict[str, torch.Tensor]:
    """Tokenise second-view prompts like :func:`~hf_decoding_ext.core.models.encode_prompts` (chat template, left padding).

    ``prompts`` is a string or a list (strings or chat message lists). Returns ``{"input_ids", "attention_mask"}``;
    pass them as ``second_input_ids=`` / ``second_attention_mask=`` to a contrastive processor.

    Example:
        >>> from hf_decoding_ext.contrastive.context import encode_second_view
        >>> enc = encode_second_view(tokenizer, ["Question only: who wrote Hamlet?"])  # doctest: +SKIP
    """
    from hf_decoding_ext.core.models import encode_prompts

    if prompts is None or (isinstance(prompts, (list, tuple)) and len(prompts) == 0):
        raise ValueError("a second-view prompt is required (a string or a non-empty list of prompts)")
    side = getattr(tokenizer, "padding_side", "left")
    try:
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        enc = encode_prompts(tokenizer, prompts, chat=chat, device=device)
    finally:
        tokenizer.padding_side = side
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def check_strength(name: str, value, minimum: float = 0.0, maximum: float | None = None,
                   inclusive_max: bool = True) -> float:
    """Validate a finite number in ``[minimum, maximum]`` and return it as a float (clear ``ValueError``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}")
    if value < minimum or (maximum is not None and (value > maximum if inclusive_max else value >= maximum)):
        upper = "" if maximum is None else (f", {maximum}]" if inclusive_max else f", {maximum})")
        rng = f"[{minimum}{upper or ', inf)'}"
        raise ValueError(f"`{name}` must be in {rng}, got {value!r}")
    return float(value)


class ContrastiveContextProcessor(StatefulLogitsProcessor, LogitsProcessor):
    r"""
    [`LogitsProcessor`] combining the main next-token scores with those of a *second view*: ``model`` (the main model
    or another "amateur" model sharing the vocabulary) run on a second-view prompt followed by the tokens generated
    so far. The combination is :meth:`combine` (override it in a subclass, or pass ``combine=``), applied to the
    main scores and the second view's raw logits, both first turned into log-probabilities when ``space="log_probs"``.

    The second view has its own KV cache and handles rollbacks (see the module docstring), so the processor works in
    plain ``generate()`` (greedy, sampling, beam search), in this library's decoding loops and in the speculative
    engine, which calls processors at draft-tree nodes. It implements the lifecycle of
    :class:`~hf_decoding_ext.core.lifecycle.StatefulLogitsProcessor`: :meth:`begin` starts a generation,
    :meth:`select_rows` / :meth:`fork` carry the second view (cache, prompt rows, tokens fed) over to selected or
    repeated rows, so lookahead rollouts and trials on a branch of some rows keep every generated token in the
    second view and leave the main rows' state untouched.

    Args:
        model: the model of the second view (``forward`` with ``past_key_values``); runs on its own device/dtype.
        second_input_ids (`torch.LongTensor`, *optional*): second-view prompts ``(n, len)`` (or ``(len,)``), one per
            batch row, or one (or ``batch / k`` rows, repeated ``k`` times each like ``generate()`` expands rows for
            ``num_return_sequences`` / ``num_beams``) for the whole batch. Required unless ``share_prompt=True``.
        second_attention_mask (`torch.LongTensor`, *optional*): its mask (any padding side; re-packed to left
            padding). Defaults to all ones.
        combine (`Callable`, *optional*): ``combine(main, second) -> scores`` on ``(batch, vocab)`` float32 tensors,
            replacing :meth:`combine`.
        space (`str`, *optional*): ``"logits"`` (the raw values) or ``"log_probs"`` (log-softmax of both) as the
            inputs of the combination; defaults to the class attribute.
        share_prompt (`bool`, *optional*, defaults to `False`): the second view reads the main prompt itself (for an
            amateur model); its padding comes from ``prompt_attention_mask`` or, when absent, from the leading run of
            ``pad_token_id`` in each row (no padding assumed when both are absent).
        prompt_attention_mask (`torch.LongTensor`, *optional*): the main prompt's attention mask (``share_prompt``).
        pad_token_id (`int`, *optional*): pad id, used to infer the main prompt's left padding (``share_prompt``) and
            to re-pack second-view prompts.
        vocab_size (`int`, *optional*): the main model's vocabulary size; a different second-view vocabulary raises a
            ``ValueError`` at construction (it is always checked against the scores' width at call time).

    Examples:

    ```python
    >>> from hf_decoding_ext.core.models import load_model, encode_prompts
    >>> from hf_decoding_ext.contrastive.context import ContrastiveContextProcessor, encode_second_view
    >>> model, tokenizer = load_model()  # doctest: +SKIP
    >>> inputs = encode_prompts(tokenizer, ["Context: the sky is green.\nQ: what colour is the sky?"])  # doctest: +SKIP
    >>> second = encode_second_view(tokenizer, ["Q: what colour is the sky?"])  # doctest: +SKIP
    >>> proc = ContrastiveContextProcessor(model, second["input_ids"], second["attention_mask"],
    ...                                    combine=lambda main, other: 1.5 * main - 0.5 * other)  # doctest: +SKIP
    >>> out = model.generate(**inputs, logits_processor=[proc], do_sample=False, max_new_tokens=10)  # doctest: +SKIP
    ```
    """

    space: str = "logits"
    tracks_prefix = True  # re-synchronises to the common prefix of the tokens of each call
    state_attributes = ("_prompt", "_cache", "_ids2", "_mask2", "_n_real", "_gen", "_prompt_logits", "_last_logits")

    def __init__(
        self,
        model,
        second_input_ids: torch.Tensor | None = None,
        second_attention_mask: torch.Tensor | None = None,
        *,
        combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        space: str | None = None,
        share_prompt: bool = False,
        prompt_attention_mask: torch.Tensor | None = None,
        pad_token_id: int | None = None,
        vocab_size: int | None = None,
    ):
        if model is None or not callable(model):
            raise ValueError("a contrastive processor needs the second view's model (the main model or an amateur)")
        if space is not None:
            if space not in SPACES:
                raise ValueError(f"`space` must be one of {SPACES}, got {space!r}")
            self.space = space
        if combine is not None and not callable(combine):
            raise ValueError("`combine` must be a callable combine(main, second) -> scores")
        if combine is None and type(self).combine is ContrastiveContextProcessor.combine:
            raise ValueError(f"{type(self).__name__} needs a combination: pass combine=... or subclass it and "
                             "override combine()")
        self._combine_fn = combine
        self.model = model
        self.pad_token_id = 0 if pad_token_id is None else int(pad_token_id)
        self._pad_given = pad_token_id is not None
        self.share_prompt = bool(share_prompt)
        self.second_vocab_size = model_vocab_size(model)
        if vocab_size is not None and int(vocab_size) != self.second_vocab_size:
            raise ValueError(
                f"the second view's model has a vocabulary of {self.second_vocab_size} tokens but the main model has "
                f"{int(vocab_size)}; the second view (amateur) must share the main model's tokenizer and vocabulary"
            )
        if second_input_ids is None:
            if not self.share_prompt:
                raise ValueError(
                    f"{type(self).__name__} needs a second-view prompt: pass second_input_ids (token ids) or build the "
                    "processor from text with for_model(model, tokenizer, ...) / encode_second_view()"
                )
            self.second_input_ids = self.second_attention_mask = None
        else:
            ids = torch.as_tensor(second_input_ids)
            if ids.dim() == 1:
                ids = ids[None]
            if ids.dim() != 2 or ids.shape[0] == 0 or ids.shape[1] == 0 or ids.dtype.is_floating_point:
                raise ValueError(f"second_input_ids must be integer token ids (n, len) with n, len >= 1, "
                                 f"got shape {tuple(ids.shape)} and dtype {ids.dtype}")
            mask = torch.ones_like(ids) if second_attention_mask is None else torch.as_tensor(second_attention_mask)
            if mask.dim() == 1:
                mask = mask[None]
            if mask.shape != ids.shape:
                raise ValueError(f"second_attention_mask {tuple(mask.shape)} must match second_input_ids "
                                 f"{tuple(ids.shape)}")
            ids, mask = _as_left_padded(ids.long(), mask.long(), self.pad_token_id)
            self.second_input_ids, self.second_attention_mask = ids, mask
        if prompt_attention_mask is not None:
            prompt_attention_mask = torch.as_tensor(prompt_attention_mask).long()
            if prompt_attention_mask.dim() == 1:
                prompt_attention_mask = prompt_attention_mask[None]
        self.prompt_attention_mask = prompt_attention_mask
        self.reset()

    # ------------------------------------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget the second view's cache and the recorded main prompt (the next call starts afresh)."""
        self._prompt: torch.Tensor | None = None  # main prompt tokens (batch, L), on the main device
        self._cache = None
        self._ids2: torch.Tensor | None = None  # second-view prompt of this run (batch, L2), second device
        self._mask2: torch.Tensor | None = None
        self._n_real: torch.Tensor | None = None  # real tokens per row in the second-view prompt (batch,)
        self._gen: torch.Tensor | None = None  # generated tokens already fed (batch, m), second device
        self._prompt_logits: torch.Tensor | None = None  # second view's next-token logits after its prompt
        self._last_logits: torch.Tensor | None = None  # ... after the prompt and _gen
        self.stats = {"second_view_forwards": 0, "second_view_tokens": 0}

    def begin(self, input_ids: torch.LongTensor) -> None:
        """Start a generation on the main prompts ``input_ids`` (runs the second-view prompts once)."""
        self._start(input_ids)

    def select_rows(self, indices: torch.LongTensor) -> None:
        """Keep the rows ``indices`` (rows may repeat) of the second view: prompts, cache, tokens already fed."""
        if self._prompt is None:
            return
        there = torch.as_tensor(indices, dtype=torch.long).to(self._ids2.device)
        self._cache.batch_select_indices(there)
        self._select_tensors(indices)

    def _select_tensors(self, indices: torch.LongTensor) -> None:
        indices = torch.as_tensor(indices, dtype=torch.long)
        here, there = indices.to(self._prompt.device), indices.to(self._ids2.device)
        self._prompt = self._prompt[here]
        self._ids2, self._mask2, self._n_real = self._ids2[there], self._mask2[there], self._n_real[there]
        self._gen = self._gen[there]
        self._prompt_logits, self._last_logits = self._prompt_logits[there], self._last_logits[there]

    def fork(self, indices: torch.LongTensor | None = None):
        """The processor itself for the same rows (it tracks the tokens of each call); for ``indices``, a copy whose
        second view holds those rows (its cache copied once, like a :class:`~hf_decoding_ext.core.rollout.Branch`)."""
        if indices is None or self._prompt is None:
            return super().fork(indices)
        new = copy.copy(self)  # the state tensors are replaced by indexed copies below, never shared
        new._cache = select_cache(self._cache, torch.as_tensor(indices, dtype=torch.long).to(self._ids2.device))
        new._select_tensors(indices)
        return new

    @property
    def main_prompt_length(self) -> int | None:
        return None if self._prompt is None else int(self._prompt.shape[1])

    def _needs_reset(self, input_ids: torch.Tensor) -> bool:
        return is_new_prompt(self._prompt, input_ids)

    def _second_prompt_for(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = input_ids.shape[0]
        if self.share_prompt and self.second_input_ids is None:
            ids = input_ids
            if self.prompt_attention_mask is not None:
                mask = self.prompt_attention_mask.to(ids.device)
                if mask.shape != ids.shape:
                    raise ValueError(f"prompt_attention_mask {tuple(mask.shape)} does not match the prompt "
                                     f"{tuple(ids.shape)} of this generate() call")
            elif self._pad_given:
                # left padding = the leading run of pad tokens (a row made only of pads keeps its last token)
                mask = (ids != self.pad_token_id).long().cummax(dim=-1).values
                mask[:, -1] = 1
            else:
                mask = torch.ones_like(ids)
            return _as_left_padded(ids.long(), mask.long(), self.pad_token_id)
        ids, mask = self.second_input_ids, self.second_attention_mask
        n = ids.shape[0]
        if n != batch:
            if batch % n != 0:
                raise ValueError(
                    f"{type(self).__name__} got {n} second-view prompt(s) for a batch of {batch} rows; pass one "
                    f"second-view prompt per batch row (or one for the whole batch)"
                )
            ids, mask = ids.repeat_interleave(batch // n, dim=0), mask.repeat_interleave(batch // n, dim=0)
        return ids, mask

    @torch.no_grad()
    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=self._cache,
                         use_cache=True, logits_to_keep=1, return_dict=True)
        self.stats["second_view_forwards"] += 1
        self.stats["second_view_tokens"] += int(ids.numel())
        return out.logits[:, -1, :].float()

    def _start(self, input_ids: torch.Tensor) -> None:
        self.reset()
        device, _ = _model_device_dtype(self.model)
        ids2, mask2 = self._second_prompt_for(input_ids)
        self._prompt = input_ids.detach().clone()
        self._ids2, self._mask2 = ids2.to(device), mask2.to(device)
        self._n_real = self._mask2.sum(-1)
        self._cache = DynamicCache(config=getattr(self.model, "config", None))
        positions = (self._mask2.cumsum(-1) - 1).clamp(min=0)
        self._prompt_logits = self._forward(self._ids2, self._mask2, positions)
        self._gen = self._ids2.new_zeros((self._ids2.shape[0], 0))
        self._last_logits = self._prompt_logits

    def _crop_to(self, length: int) -> None:
        extra = self._cache.get_seq_length() - length
        if extra > 0:
            self._cache.crop(-extra)  # transformers 5: a negative count removes that many positions

    def _match_rows(self, gen: torch.Tensor) -> None:
        """Reorder the cache when the incoming rows are a permutation of the cached ones (beam search)."""
        m = min(self._gen.shape[1], gen.shape[1])
        if m == 0 or self._gen.shape[0] < 2:
            return
        if torch.equal(gen[:, :m], self._gen[:, :m]):
            return
        same_gen = (gen[:, None, :m] == self._gen[None, :, :m]).all(-1)  # (incoming, cached)
        same_prompt = ((self._ids2[:, None] == self._ids2[None]) & (self._mask2[:, None] == self._mask2[None])).all(-1)
        ok = same_gen & same_prompt
        if not bool(ok.any(-1).all()):
            return  # no full mapping: fall back to the common prefix
        idx = ok.float().argmax(-1)
        self._cache.reorder_cache(idx)
        self._gen = self._gen[idx]
        self._last_logits = self._last_logits[idx]

    def second_view_logits(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """The second view's raw next-token logits ``(batch, vocab)`` (float32, on the second model's device)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, len), got shape {tuple(input_ids.shape)}")
        if self._needs_reset(input_ids):
            self._start(input_ids)
        gen = input_ids[:, self._prompt.shape[1]:].to(self._ids2.device)
        self._match_rows(gen)
        n, m = gen.shape[1], self._gen.shape[1]
        lo = min(n, m)
        agree = (gen[:, :lo] == self._gen[:, :lo]).all(0)
        k = int(agree.long().cumprod(0).sum()) if lo else 0
        if k == n == m:
            return self._last_logits
        width = self._ids2.shape[1]
        if n == 0:
            self._crop_to(width)
            self._gen, self._last_logits = gen, self._prompt_logits
            return self._last_logits
        keep = min(k, n - 1)  # refeed at least the last token: its logits were not kept
        self._crop_to(width + keep)
        mask = torch.cat([self._mask2, self._mask2.new_ones((gen.shape[0], n))], dim=1)
        positions = self._n_real[:, None] + torch.arange(keep, n, device=gen.device)[None]
        self._last_logits = self._forward(gen[:, keep:], mask, positions)
        self._gen = gen.clone()
        return self._last_logits

    # ------------------------------------------------------------------------------------------------ combination
    def combine(self, main: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """The paper's formula on ``(batch, vocab)`` float32 tensors (in :attr:`space`); override in subclasses."""
        return self._combine_fn(main, second)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[0] != scores.shape[0]:
            raise ValueError(f"input_ids has {input_ids.shape[0]} rows but scores {scores.shape[0]}")
        second = self.second_view_logits(input_ids)
        if second.shape[-1] != scores.shape[-1]:
            raise ValueError(
                f"the second view's logits have {second.shape[-1]} entries but the main scores {scores.shape[-1]}: "
                "the second view (amateur) must share the main model's vocabulary"
            )
        second = second.to(device=scores.device, dtype=torch.float32)
        main = scores.float()
        if self.space == "log_probs":
            main, second = torch.log_softmax(main, dim=-1), torch.log_softmax(second, dim=-1)
        return self.combine(main, second).to(scores.dtype)


def second_view_from_texts(tokenizer, prompts, chat: bool | None = None) -> dict[str, torch.Tensor | int]:
    """Keyword arguments (``second_input_ids``, ``second_attention_mask``, ``pad_token_id``) built from text."""
    enc = encode_second_view(tokenizer, prompts, chat=chat)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return {"second_input_ids": enc["input_ids"], "second_attention_mask": enc["attention_mask"],
            "pad_token_id": int(pad)}
