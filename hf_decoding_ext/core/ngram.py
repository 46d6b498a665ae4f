"""n-gram utilities: extraction and the repetition/diversity metrics (rep-n, distinct-n)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence


def ngrams(tokens: Sequence, n: int) -> list[tuple]:
    """All contiguous n-grams of ``tokens``."""
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def rep_n(tokens: Sequence, n: int) -> float:
    """Repetition rate ``1 - |unique n-grams| / |n-grams|`` of one sequence (SimCTG/contrastive-search metric)."""
    grams = ngrams(tokens, n)
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def distinct_n(sequences: Iterable[Sequence], n: int) -> float:
    """Distinct-n: unique n-grams over total n-grams, pooled over sequences (Li et al. 2016)."""
    total, unique = 0, set()
    for seq in sequences:
        grams = ngrams(seq, n)
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0


def ngram_counts(tokens: Sequence, n: int) -> Counter:
    return Counter(ngrams(tokens, n))
