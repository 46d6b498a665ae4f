"""VocabTrim (Goel, Gagrani, Jeon, Park, Lee, Lott; Qualcomm; "VOCABTRIM: Vocabulary Pruning for Efficient
Speculative Decoding in LLMs", arXiv 2506.22694) as one shared transform for every drafter with an LM head.

A drafter that scores the target's whole vocabulary pays for it at every draft step: SmolLM2's tied lm_head is a
49152 x 576 matrix (28 M multiply-accumulates per drafted token), more than the distilled 4-layer draft's own
layers. VocabTrim counts how often each token appears in calibration text produced by the target itself, keeps the
``K`` most frequent, and lets the drafter score only those rows of the shared lm_head; draft ids map back to the
target's ids and the target still verifies over the full vocabulary, so decoding stays lossless (a token outside
the kept set simply cannot be drafted).

The pieces:

* :func:`token_counts`, :func:`target_token_counts`: calibration counts (the default calibration text is the
  target's own greedy responses committed with the Direct-Alignment draft,
  ``results/direct_alignment/responses-greedy.jsonl.gz``, or a :class:`~hf_decoding_ext.training.data.DistillData`);
* :func:`select_vocab`: the ``K`` most frequent ids and their coverage of the calibration tokens;
* :class:`TrimmedLMHead`: rows of a shared ``nn.Linear`` lm_head; returns full-vocabulary logits with ``-inf``
  outside the kept ids (a draft language model keeps its full-vocabulary interface);
* :class:`VocabTrim`: the transform, ``apply(obj, token_ids)``: a
  :class:`~hf_decoding_ext.speculative.heads.base.DraftHeadModel` is restricted in place with its
  ``set_draft_vocab`` (the EAGLE-3 ``d2t`` map the trained heads already use); a draft causal LM gets a shallow
  view whose lm_head is a :class:`TrimmedLMHead` (the draft and the target it shares its head with are untouched);
* :data:`TRANSFORMS` / :func:`register_transform` / :func:`get_transform`: a small registry of drafter transforms.

Example:
    >>> import torch
    >>> from hf_decoding_ext.speculative.vocab_trim import select_vocab
    >>> ids, coverage = select_vocab(torch.tensor([0, 5, 3, 2]), 2)
    >>> ids.tolist(), round(coverage, 2)
    ([1, 2], 0.8)
"""

from __future__ import annotations

import copy
import gzip
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

DEFAULT_CALIBRATION = Path(__file__).resolve().parents[2] / "results" / "direct_alignment" / "responses-greedy.jsonl.gz"
"""The target's own greedy responses (360 distillation prompts x up to 192 tokens), committed with the
Direct-Alignment draft: VocabTrim's best calibration source (target-generated text)."""


def token_counts(sequences: Iterable[Sequence[int]], vocab_size: int) -> torch.Tensor:
    """``(vocab_size,)`` long counts of every token id over ``sequences`` (lists or tensors of ids)."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for seq in sequences:
        ids = torch.as_tensor(seq, dtype=torch.long).reshape(-1)
        if ids.numel() == 0:
            continue
        if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
            raise ValueError(f"token ids must lie in [0, {vocab_size}), got {int(ids.min())}..{int(ids.max())}")
        counts.index_add_(0, ids, torch.ones_like(ids))
    return counts


def _read_rows(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def target_token_counts(vocab_size: int, source=None, split: str = "train") -> torch.Tensor:
    """Counts of the tokens the target produced, from ``source``:

    - ``None``: :data:`DEFAULT_CALIBRATION` (the target's committed greedy responses);
    - a path to a ``.jsonl`` / ``.jsonl.gz`` of rows with ``response_ids`` (this library's response files);
    - a :class:`~hf_decoding_ext.training.data.DistillData` (its ``response_token_counts`` on ``split``, the
      counts the training pipeline uses).
    """
    if source is None:
        source = DEFAULT_CALIBRATION
    if hasattr(source, "response_token_counts"):
        return source.response_token_counts(vocab_size, split)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise ValueError(f"no calibration file at {path}")
        rows = _read_rows(path)
        if rows and "response_ids" not in rows[0]:
            raise ValueError(f"{path} has no 'response_ids' rows (keys {sorted(rows[0])[:6]})")
        return token_counts((r["response_ids"] for r in rows), vocab_size)
    raise ValueError(f"source must be None, a response-file path or a DistillData, got {type(source).__name__}")


def select_vocab(counts: torch.Tensor, size: int) -> tuple[torch.Tensor, float]:
    """The ``size`` most frequent ids of ``counts`` (most frequent first; ``counts.argsort(descending=True)``, the
    selection the training pipeline always made) and the fraction of counted tokens they cover."""
    counts = torch.as_tensor(counts)
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(f"counts must be a non-empty 1-D tensor, got shape {tuple(counts.shape)}")
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= counts.numel():
        raise ValueError(f"size must be an integer in [1, {counts.numel()}], got {size!r}")
    top = counts.argsort(descending=True)[:size]
    covered = float(counts[top].sum()) / max(1, float(counts.sum()))
    return top, covered


class TrimmedLMHead(nn.Module):
    """The rows ``token_ids`` of a shared ``nn.Linear`` lm_head: ``forward(h)`` computes ``K`` logits instead of
    ``V`` and scatters them into full-vocabulary logits with ``-inf`` outside the kept ids, so a draft language
    model keeps its interface (argmax, softmax and sampling never pick a trimmed token). The full head is held by
    reference (not a submodule: it is the target's, never modified); its kept rows are gathered once per device,
    dtype and weight version.

    Args:
        lm_head: the shared ``nn.Linear`` (``(V, hidden)`` weight).
        token_ids: kept target ids, ``(K,)`` long, distinct.
    """

    def __init__(self, lm_head: nn.Linear, token_ids: torch.Tensor):
        super().__init__()
        weight = getattr(lm_head, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"lm_head must be a linear layer with a 2-D weight, got {type(lm_head).__name__}")
        token_ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
        vocab = weight.shape[0]
        if token_ids.numel() == 0 or token_ids.unique().numel() != token_ids.numel():
            raise ValueError("token_ids must be non-empty and without repeats")
        if int(token_ids.min()) < 0 or int(token_ids.max()) >= vocab:
            raise ValueError(f"token_ids must lie in [0, {vocab}), got {int(token_ids.min())}..{int(token_ids.max())}")
        self._full = {"head": lm_head}
        self.register_buffer("token_ids", token_ids.to(weight.device), persistent=False)
        self.in_features, self.out_features = weight.shape[1], vocab
        self._rows: tuple | None = None

    @property
    def weight(self) -> torch.Tensor:
        """The full head's weight (the vocabulary the logits are indexed by)."""
        return self._full["head"].weight

    @property
    def num_rows(self) -> int:
        return int(self.token_ids.numel())

    def rows(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(K, hidden)`` kept weight rows and ``(K,)`` bias (or ``None``), cached."""
        head = self._full["head"]
        w, b = head.weight, getattr(head, "bias", None)
        key = (w.device, w.dtype, w._version, w.data_ptr())
        if self._rows is None or self._rows[0] != key:
            ids = self.token_ids.to(w.device)
            with torch.no_grad():
                self._rows = (key, w[ids].contiguous(), None if b is None else b[ids].contiguous())
        return self._rows[1], self._rows[2]

    def macs_per_token(self) -> int:
        """Multiply-accumulates of one row of logits: ``K x hidden`` (the full head: ``V x hidden``)."""
        return self.num_rows * self.in_features

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        w, b = self.rows()
        small = nn.functional.linear(hidden, w, b)
        out = small.new_full((*small.shape[:-1], self.out_features), float("-inf"))
        out[..., self.token_ids.to(out.device)] = small
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, kept={self.num_rows} of {self.out_features}"


def trimmed_view(draft_lm, token_ids: torch.Tensor):
    """A shallow view of the causal LM ``draft_lm`` whose lm_head is a :class:`TrimmedLMHead` over its own head's
    rows ``token_ids``. Every other module, parameter and config is shared with ``draft_lm`` (so training the
    draft's layers shows in the view); ``draft_lm`` itself and the model it shares its head with are untouched."""
    head = draft_lm.get_output_embeddings()
    if isinstance(head, TrimmedLMHead):
        head = head._full["head"]
    if head is None:
        raise ValueError(f"{type(draft_lm).__name__} has no output embeddings (lm_head) to trim")
    name = next((n for n, m in draft_lm.named_children() if m is head), None)
    if name is None:
        raise ValueError(f"{type(draft_lm).__name__}'s lm_head is not a direct child module; cannot build a view")
    view = copy.copy(draft_lm)
    view._modules = dict(draft_lm._modules)  # a new module table: the original keeps its head
    view._modules[name] = TrimmedLMHead(head, token_ids)
    view.vocab_trim = {"kept": int(torch.as_tensor(token_ids).numel()), "of": int(head.weight.shape[0])}
    return view


class VocabTrim:
    """The VocabTrim transform (arXiv 2506.22694): restrict a drafter's output layer to ``token_ids`` (or to the
    ``size`` most frequent ids of ``counts``).

    ``apply(obj)``:

    - a :class:`~hf_decoding_ext.speculative.heads.base.DraftHeadModel` (Medusa, Hydra, EAGLE, ... heads): in place,
      with its ``set_draft_vocab`` (the ``d2t`` map; the head's own tensors are unchanged); returns ``obj``;
    - a causal LM with an lm_head (a draft model): :func:`trimmed_view` (a new object; ``obj`` untouched);
    - anything else: ``ValueError`` naming its type.

    Args:
        token_ids: kept target ids (most frequent first), or ``None`` with ``counts`` and ``size``.
        size: ``K``, with ``counts``.
        counts: calibration counts (:func:`target_token_counts`).

    Example:
        >>> import torch
        >>> from hf_decoding_ext.speculative.vocab_trim import VocabTrim
        >>> trim = VocabTrim(size=2, counts=torch.tensor([4, 0, 9, 1]))
        >>> trim.token_ids.tolist(), trim.coverage
        ([2, 0], 0.9285714285714286)
        >>> draft_view = trim.apply(draft_model)  # doctest: +SKIP
    """

    def __init__(self, token_ids: torch.Tensor | None = None, size: int | None = None,
                 counts: torch.Tensor | None = None):
        self.coverage: float | None = None
        if token_ids is None:
            if counts is None or size is None:
                raise ValueError("VocabTrim needs token_ids, or counts and size")
            token_ids, self.coverage = select_vocab(counts, size)
        token_ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
        if token_ids.numel() == 0 or token_ids.unique().numel() != token_ids.numel():
            raise ValueError(f"token_ids must be non-empty and without repeats, got {token_ids.numel()} ids")
        self.token_ids = token_ids

    def apply(self, obj, token_ids: torch.Tensor | None = None):
        ids = self.token_ids if token_ids is None else torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
        from hf_decoding_ext.speculative.heads.base import DraftHeadModel

        if isinstance(obj, DraftHeadModel):
            obj.set_draft_vocab(ids)
            return obj
        if hasattr(obj, "get_output_embeddings") and obj.get_output_embeddings() is not None:
            return trimmed_view(obj, ids)
        raise ValueError(f"VocabTrim applies to a DraftHeadModel or a causal LM with an lm_head, got "
                         f"{type(obj).__name__}")

    __call__ = apply


TRANSFORMS: dict[str, type] = {"vocab-trim": VocabTrim}
"""Drafter transforms by name (a transform class has ``apply(obj) -> obj``)."""


def register_transform(name: str, cls: type, overwrite: bool = False) -> None:
    """Add a drafter transform under ``name`` (``ValueError`` if taken and not ``overwrite``)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if not callable(getattr(cls, "apply", None)):
        raise ValueError(f"a transform needs an apply(obj) method, got {cls!r}")
    if name in TRANSFORMS and not overwrite:
        raise ValueError(f"transform {name!r} is already registered (overwrite=True to replace it)")
    TRANSFORMS[name] = cls


def get_transform(name: str) -> type:
    if name not in TRANSFORMS:
        raise ValueError(f"unknown transform {name!r}; known: {sorted(TRANSFORMS)}")
    return TRANSFORMS[name]


__all__ = ["DEFAULT_CALIBRATION", "token_counts", "target_token_counts", "select_vocab", "TrimmedLMHead",
           "trimmed_view", "VocabTrim", "TRANSFORMS", "register_transform", "get_transform"]
