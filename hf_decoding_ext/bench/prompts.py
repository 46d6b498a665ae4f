"""The packaged benchmark prompt set (``hf_decoding_ext/data/prompts/benchmark.jsonl``).

Six categories, chosen so that speed methods meet both outputs that copy from the input (summarisation and RAG
questions over Python standard-library docstrings, where prompt lookup and other copy-based drafters shine) and
outputs that do not (open questions, chat, arithmetic word problems, translation). Every line is a JSON object::

    {"id": "rag_qa-001", "category": "rag_qa", "prompt": "...", "answer": "the first mapping",
     "source": "stdlib_docs.jsonl:collections.ChainMap"}

``prompt`` is a string (one user turn) or, for ``multi_turn_chat``, a list of ``{"role", "content"}`` messages
ending with a user turn; ``answer`` is present for ``math_reasoning`` (a number) and ``rag_qa`` (a string found in
the context). See ``data/prompts/SOURCES.md`` for provenance.

Example:
    >>> from hf_decoding_ext.bench.prompts import load_prompts
    >>> prompts = load_prompts(categories=["qa", "rag_qa"], per_category=2)
    >>> [p["id"] for p in prompts]
    ['qa-001', 'qa-002', 'rag_qa-001', 'rag_qa-002']
"""

from __future__ import annotations

import json
from hf_decoding_ext.core.resources import data_file

CATEGORIES: tuple[str, ...] = (
    "multi_turn_chat",
    "translation",
    "summarization",
    "qa",
    "math_reasoning",
    "rag_qa",
)
"""The prompt categories, in the order results and plots list them."""

_FILE = ("prompts", "benchmark.jsonl")
_DISTILL_FILE = ("prompts", "distill.jsonl")


def _wanted_categories(categories) -> list[str]:
    """A category name or names (default: all six), validated."""
    if categories is None:
        return list(CATEGORIES)
    wanted = [categories] if isinstance(categories, str) else list(categories)
    unknown = [c for c in wanted if c not in CATEGORIES]
    if unknown:
        raise ValueError(f"Unknown categories {unknown}; valid categories: {', '.join(CATEGORIES)}")
    return wanted


def _read_all(file: tuple[str, ...] = _FILE) -> list[dict]:
    path = data_file(*file)
    rows = []
    with path.open("r", encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


def load_prompts(categories=None, per_category: int | None = None) -> list[dict]:
    """Load the benchmark prompts, grouped by category in :data:`CATEGORIES` order.

    Args:
        categories: a category name or an iterable of names (default: all six). Unknown names raise ``ValueError``.
        per_category: keep only the first ``per_category`` prompts of each category (default: all).

    Returns:
        a list of dicts with keys ``id``, ``category``, ``prompt``, ``source`` and, where defined, ``answer``.
    """
    wanted = _wanted_categories(categories)
    if per_category is not None and (not isinstance(per_category, int) or per_category < 1):
        raise ValueError(f"per_category must be a positive integer or None, got {per_category!r}")
    rows = _read_all()
    out = []
    for cat in CATEGORIES:
        if cat not in wanted:
            continue
        items = [r for r in rows if r["category"] == cat]
        out.extend(items if per_category is None else items[:per_category])
    return out


def load_distill_prompts(categories=None, limit: int | None = None) -> list[dict]:
    """Load the self-distillation prompt set (``hf_decoding_ext/data/prompts/distill.jsonl``), grouped by category.

    About 1200 prompts (200 per category, the same six categories and row format as the benchmark set) on which the
    base model's own responses are generated to train draft heads (Medusa, EAGLE, ...). The set is disjoint from the
    benchmark prompts: no user turn and no standard-library docstring is shared with ``benchmark.jsonl`` /
    ``stdlib_docs.jsonl``. It is built by ``scripts/build_distill_prompts.py``; see ``data/prompts/SOURCES.md``.

    Args:
        categories: a category name or an iterable of names (default: all six, in :data:`CATEGORIES` order).
            Unknown names raise ``ValueError``.
        limit: keep only the first ``limit`` prompts *of each category* (default: all).

    Returns:
        a list of dicts with keys ``id`` (e.g. ``"distill-qa-0001"``), ``category``, ``prompt`` (a string, or for
        ``multi_turn_chat`` a list of ``{"role", "content"}`` messages ending with a user turn), ``source`` and, for
        ``math_reasoning``, ``answer``.

    Example:
        >>> from hf_decoding_ext.bench.prompts import load_distill_prompts
        >>> prompts = load_distill_prompts(categories=["qa", "math_reasoning"], limit=2)
        >>> [p["id"] for p in prompts]
        ['distill-qa-0001', 'distill-qa-0002', 'distill-math_reasoning-0001', 'distill-math_reasoning-0002']
    """
    wanted = _wanted_categories(categories)
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    rows = _read_all(_DISTILL_FILE)
    out = []
    for cat in CATEGORIES:
        if cat not in wanted:
            continue
        items = [r for r in rows if r["category"] == cat]
        out.extend(items if limit is None else items[:limit])
    return out


def interleaved_prompts(n: int, per_category: int | None = None) -> list[dict]:
    """The first ``n`` benchmark prompts taken round-robin over the categories (one of each category in turn), so
    that any prefix spans every category; used by the lossless tests of the drafters.

    Example:
        >>> [p["category"] for p in interleaved_prompts(3)]
        ['multi_turn_chat', 'translation', 'summarization']
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rows = load_prompts(per_category=per_category or -(-n // len(CATEGORIES)))
    by_cat: dict[str, list] = {}
    for r in rows:
        by_cat.setdefault(r["category"], []).append(r)
    order = [r for group in zip(*by_cat.values()) for r in group]
    if len(order) < n:
        raise ValueError(f"only {len(order)} interleaved prompts available, {n} asked")
    return order[:n]


def long_input_prompts(tokenizer, sizes) -> list[dict]:
    """Long-input rows (category ``long_input``): a public-domain document of about ``n`` tokens for each ``n`` of
    ``sizes`` (the shipped docutils text, :func:`~hf_decoding_ext.speculative.drafters.specextend.long_document`),
    followed by a summarisation instruction. Used by the long-input speed runs (SpecExtend, Sparse-to-Dense)."""
    from hf_decoding_ext.speculative.drafters.specextend import long_document

    return [{"id": f"long-{n}", "category": "long_input",
             "prompt": f"{long_document(tokenizer, n)}\n\nSummarize the documentation above in a few sentences."}
            for n in sizes]
