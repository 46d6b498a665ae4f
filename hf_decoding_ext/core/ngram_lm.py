"""A small interpolated n-gram language model over token ids (used by Superposed Decoding).

:class:`NGramLM` counts n-grams of token ids for every order ``1..order`` and estimates next-token probabilities
with interpolated Witten-Bell smoothing, backing off from the longest context to shorter ones and finally to a
uniform distribution over the vocabulary, so every estimate is a proper distribution (it sums to 1 over the
vocabulary and is never zero). Tables are stored as sorted 64-bit hashes of the n-grams and of their contexts
(numpy arrays, saved with safetensors) and looked up with binary search, so a lookup costs a few ``searchsorted``
calls whatever the size of the corpus.

:meth:`NGramLM.for_tokenizer` builds (once, then loads from :func:`hf_decoding_ext.core.models.cache_dir`) a model from
text the project ships: the docstrings in ``hf_decoding_ext/data/stdlib_docs.jsonl`` plus, by default, docstrings
collected with :mod:`ast` (nothing is imported or executed) from the installed Python standard library's sources.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from hf_decoding_ext.core.resources import data_file, read_jsonl

_FNV_OFFSET = np.uint64(14695981039346656037)
_FNV_PRIME = np.uint64(1099511628211)
_FORMAT_VERSION = 1


def _hash_columns(windows: np.ndarray) -> np.ndarray:
    """64-bit FNV-1a-style hash of each row of ``windows`` (``(n, width)`` token ids); wraps modulo 2**64."""
    h = np.full(windows.shape[0], _FNV_OFFSET, dtype=np.uint64)
    for j in range(windows.shape[1]):
        h = (h ^ (windows[:, j].astype(np.uint64) + np.uint64(1))) * _FNV_PRIME
    return h


def _hash_extend(h: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Hash of ``context + (token,)`` from the hash ``h`` of ``context``, for every token in ``tokens``."""
    return (h ^ (tokens.astype(np.uint64) + np.uint64(1))) * _FNV_PRIME


def _lookup(keys: np.ndarray, values: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """``values`` at the positions of ``queries`` in the sorted ``keys`` (0 where absent)."""
    if keys.size == 0:
        return np.zeros(queries.shape, dtype=values.dtype)
    pos = np.searchsorted(keys, queries)
    pos_c = np.minimum(pos, keys.size - 1)
    found = keys[pos_c] == queries
    return np.where(found, values[pos_c], 0)


class NGramLM:
    r"""Interpolated Witten-Bell n-gram LM over token ids.

    For a context :math:`c` of length :math:`n-1` (and :math:`c'` the context without its oldest token)::

        P_1(x)     = (count(x) + T_0 / V) / (N + T_0)
        P_n(x | c) = (count(c x) + T(c) * P_{n-1}(x | c')) / (count(c) + T(c))     if count(c) > 0
                   = P_{n-1}(x | c')                                                 otherwise

    where ``count(c)`` is the number of occurrences of ``c`` followed by a token, ``T(c)`` the number of distinct
    tokens seen after ``c``, ``N`` the number of tokens, ``T_0`` the number of distinct tokens and ``V`` the
    vocabulary size. Every :math:`P_n(\cdot | c)` sums to 1 over the vocabulary.

    Args:
        tables: the count tables (see :meth:`train`); normally built by :meth:`train` or read by :meth:`load`.
        order: highest n-gram order.
        vocab_size: size of the token vocabulary.
        meta: free-form description (corpus, tokenizer) kept in the saved file.

    Example:
        >>> from hf_decoding_ext.core.ngram_lm import NGramLM
        >>> lm = NGramLM.train([[5, 6, 7, 5, 6, 8]], order=3, vocab_size=10)
        >>> round(float(lm.probs([5, 6]).sum()), 6)
        1.0
        >>> bool(lm.prob([5, 6], 7) > lm.prob([5, 6], 9))
        True
    """

    def __init__(self, tables: dict[str, np.ndarray], order: int, vocab_size: int, meta: dict | None = None):
        if order < 1:
            raise ValueError(f"order must be >= 1, got {order}")
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.order = int(order)
        self.vocab_size = int(vocab_size)
        self.meta = dict(meta or {})
        self.unigram = np.asarray(tables["unigram"], dtype=np.int64)
        if self.unigram.shape[0] != self.vocab_size:
            raise ValueError("unigram table size does not match vocab_size")
        self.num_tokens = int(self.unigram.sum())
        self.num_types = int((self.unigram > 0).sum())
        self.ngram_keys, self.ngram_counts, self.ctx_keys, self.ctx_totals, self.ctx_types = {}, {}, {}, {}, {}
        for n in range(2, self.order + 1):
            self.ngram_keys[n] = np.asarray(tables[f"ngram_keys_{n}"]).view(np.uint64)
            self.ngram_counts[n] = np.asarray(tables[f"ngram_counts_{n}"], dtype=np.int64)
            self.ctx_keys[n] = np.asarray(tables[f"ctx_keys_{n}"]).view(np.uint64)
            self.ctx_totals[n] = np.asarray(tables[f"ctx_totals_{n}"], dtype=np.int64)
            self.ctx_types[n] = np.asarray(tables[f"ctx_types_{n}"], dtype=np.int64)

    # ------------------------------------------------------------------------------------------------ building
    @classmethod
    def train(cls, sequences: Iterable[Sequence[int]], order: int = 6, vocab_size: int | None = None,
              meta: dict | None = None) -> NGramLM:
        """Count the n-grams (orders ``1..order``) of token-id sequences; n-grams never cross sequence borders."""
        if order < 1:
            raise ValueError(f"order must be >= 1, got {order}")
        seqs = [np.asarray(list(s), dtype=np.int64) for s in sequences]
        seqs = [s for s in seqs if s.size > 0]
        if not seqs:
            raise ValueError("cannot train an n-gram LM on an empty corpus")
        tokens = np.concatenate(seqs)
        if tokens.min() < 0:
            raise ValueError("token ids must be non-negative")
        max_id = int(tokens.max())
        vocab_size = max_id + 1 if vocab_size is None else int(vocab_size)
        if max_id >= vocab_size:
            raise ValueError(f"token id {max_id} is outside the vocabulary of size {vocab_size}")
        doc = np.repeat(np.arange(len(seqs)), [s.size for s in seqs])
        tables: dict[str, np.ndarray] = {"unigram": np.bincount(tokens, minlength=vocab_size).astype(np.int64)}
        for n in range(2, order + 1):
            if tokens.size >= n:
                win = np.lib.stride_tricks.sliding_window_view(tokens, n)
                same_doc = doc[: tokens.size - n + 1] == doc[n - 1:]
                win = win[same_doc]
            else:
                win = np.zeros((0, n), dtype=np.int64)
            keys, first, counts = np.unique(_hash_columns(win), return_index=True, return_counts=True)
            ctx_of_key = _hash_columns(win[first, : n - 1])
            ctx_keys, inverse, types = np.unique(ctx_of_key, return_inverse=True, return_counts=True)
            totals = np.bincount(inverse, weights=counts, minlength=ctx_keys.size).astype(np.int64)
            tables[f"ngram_keys_{n}"] = keys.view(np.int64)
            tables[f"ngram_counts_{n}"] = counts.astype(np.int64)
            tables[f"ctx_keys_{n}"] = ctx_keys.view(np.int64)
            tables[f"ctx_totals_{n}"] = totals
            tables[f"ctx_types_{n}"] = types.astype(np.int64)
        return cls(tables, order=order, vocab_size=vocab_size, meta=meta)

    def save(self, path: str | os.PathLike) -> None:
        """Write the tables to a safetensors file."""
        from safetensors.numpy import save_file

        tables = {"unigram": self.unigram}
        for n in range(2, self.order + 1):
            tables[f"ngram_keys_{n}"] = self.ngram_keys[n].view(np.int64)
            tables[f"ngram_counts_{n}"] = self.ngram_counts[n]
            tables[f"ctx_keys_{n}"] = self.ctx_keys[n].view(np.int64)
            tables[f"ctx_totals_{n}"] = self.ctx_totals[n]
            tables[f"ctx_types_{n}"] = self.ctx_types[n]
        metadata = {"format_version": str(_FORMAT_VERSION), "order": str(self.order),
                    "vocab_size": str(self.vocab_size), "meta": json.dumps(self.meta)}
        save_file({k: np.ascontiguousarray(v) for k, v in tables.items()}, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> NGramLM:
        """Read a model written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            md = f.metadata() or {}
            if md.get("format_version") != str(_FORMAT_VERSION):
                raise ValueError(f"{path} is not an NGramLM file of format version {_FORMAT_VERSION}")
            tables = {k: f.get_tensor(k) for k in f.keys()}
        return cls(tables, order=int(md["order"]), vocab_size=int(md["vocab_size"]),
                   meta=json.loads(md.get("meta", "{}")))

    @classmethod
    def for_tokenizer(cls, tokenizer, order: int = 6, corpus: str = "stdlib", cache: bool = True,
                      max_chars: int = 1_200_000) -> NGramLM:
        """Build (or load from the cache) an n-gram LM over ``tokenizer``'s ids from the project's text.

        Args:
            tokenizer: a Hugging Face tokenizer; the tables are over its token ids.
            order: highest n-gram order (the Superposed Decoding paper interpolates bigrams to 6-grams).
            corpus: ``"shipped"``: the docstrings in ``hf_decoding_ext/data/stdlib_docs.jsonl``; ``"stdlib"``: those
                plus docstrings parsed (with :mod:`ast`, nothing is imported) from the installed standard library.
            cache: read/write the tables under ``cache_dir()/ngram``.
            max_chars: cap on the characters of text used.
        """
        if corpus not in ("shipped", "stdlib"):
            raise ValueError(f"corpus must be 'shipped' or 'stdlib', got {corpus!r}")
        vocab_size = len(tokenizer)
        digest = hashlib.sha256()
        digest.update(f"v{_FORMAT_VERSION}|order={order}|vocab={vocab_size}|max_chars={max_chars}|".encode())
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        digest.update(_corpus_fingerprint(corpus).encode())
        key = digest.hexdigest()[:20]
        path = None
        if cache:
            from hf_decoding_ext.core.models import cache_dir

            folder = cache_dir() / "ngram"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"ngram-o{order}-{corpus}-{key}.safetensors"
            if path.exists():
                return cls.load(path)
        texts = corpus_texts(corpus, max_chars=max_chars)
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        meta = {"corpus": corpus, "documents": len(texts), "chars": sum(map(len, texts)),
                "tokenizer": getattr(tokenizer, "name_or_path", ""), "key": key}
        lm = cls.train(ids, order=order, vocab_size=vocab_size, meta=meta)
        if path is not None:
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            lm.save(tmp)
            os.replace(tmp, path)
        return lm

    # ------------------------------------------------------------------------------------------------ queries
    def _context_hashes(self, context: np.ndarray) -> dict[int, np.uint64]:
        """Hash of the last ``n-1`` context tokens for every order ``n`` whose context fits."""
        out = {}
        for n in range(2, self.order + 1):
            if context.size >= n - 1:
                out[n] = _hash_columns(context[context.size - (n - 1):][None, :])[0]
        return out

    def order_probs(self, context: Sequence[int] | torch.Tensor, tokens: Sequence[int] | torch.Tensor | None = None
                    ) -> torch.Tensor:
        """Smoothed estimates of every order: ``(order, len(tokens))`` (all tokens of the vocabulary by default).

        Row ``n-1`` is :math:`P_n(x | \\text{last } n-1 \\text{ tokens of context})`; orders whose context is longer
        than ``context`` back off to the longest one available.
        """
        ctx = np.asarray(context.tolist() if isinstance(context, torch.Tensor) else list(context), dtype=np.int64)
        if tokens is None:
            toks = np.arange(self.vocab_size, dtype=np.int64)
        else:
            toks = np.asarray(tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens), dtype=np.int64)
        if toks.size and (toks.min() < 0 or toks.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size})")
        uni = np.zeros(toks.shape, dtype=np.float64)
        inside = toks < self.unigram.size
        uni[inside] = self.unigram[toks[inside]]
        t0 = max(self.num_types, 1)
        p = (uni + t0 / self.vocab_size) / (self.num_tokens + t0)
        rows = [p]
        hashes = self._context_hashes(ctx)
        for n in range(2, self.order + 1):
            if n in hashes:
                h = np.asarray([hashes[n]], dtype=np.uint64)
                total = int(_lookup(self.ctx_keys[n], self.ctx_totals[n], h)[0])
                if total > 0:
                    types = int(_lookup(self.ctx_keys[n], self.ctx_types[n], h)[0])
                    counts = _lookup(self.ngram_keys[n], self.ngram_counts[n], _hash_extend(h, toks))
                    p = (counts + types * p) / (total + types)
            rows.append(p)
        return torch.from_numpy(np.stack(rows)).float()

    def probs(self, context: Sequence[int] | torch.Tensor, tokens: Sequence[int] | torch.Tensor | None = None
              ) -> torch.Tensor:
        """Interpolated probability of the highest order for ``tokens`` (default: the whole vocabulary)."""
        return self.order_probs(context, tokens)[-1]

    def prob(self, context: Sequence[int] | torch.Tensor, token: int) -> float:
        """Probability of one next token."""
        return float(self.probs(context, [int(token)])[0])

    def count(self, ngram: Sequence[int]) -> int:
        """Number of occurrences of an n-gram (``1 <= len(ngram) <= order``) in the training corpus."""
        arr = np.asarray(list(ngram), dtype=np.int64)
        n = arr.size
        if n < 1 or n > self.order:
            raise ValueError(f"n-gram length must be in [1, {self.order}]")
        if n == 1:
            return int(self.unigram[arr[0]]) if 0 <= arr[0] < self.unigram.size else 0
        return int(_lookup(self.ngram_keys[n], self.ngram_counts[n], _hash_columns(arr[None, :]))[0])

    def __repr__(self) -> str:
        return f"NGramLM(order={self.order}, vocab_size={self.vocab_size}, tokens={self.num_tokens})"


# ---------------------------------------------------------------------------------------------------- corpus
def shipped_docstrings() -> list[str]:
    """The docstrings of ``hf_decoding_ext/data/stdlib_docs.jsonl``."""
    return [row["text"] for row in read_jsonl("stdlib_docs.jsonl")]


def stdlib_source_docstrings(max_chars: int | None = None, min_chars: int = 40) -> list[str]:
    """Docstrings of the top-level modules of the installed standard library, read with :mod:`ast` (no import).

    Files are read in sorted order so the result is deterministic for a given Python installation; an installation
    without sources gives an empty list.
    """
    out, total = [], 0
    for path in _stdlib_files():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                        ast.ClassDef))]
        for node in nodes:
            doc = ast.get_docstring(node)
            if doc and len(doc) >= min_chars:
                out.append(doc)
                total += len(doc)
                if max_chars is not None and total >= max_chars:
                    return out
    return out


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    try:
        return sorted(p for p in root.iterdir() if p.suffix == ".py")
    except OSError:
        return []


def _corpus_fingerprint(corpus: str) -> str:
    """Cheap identity of a corpus (content hash of the shipped file, names and sizes of the stdlib sources)."""
    path = data_file("stdlib_docs.jsonl")
    parts = [hashlib.sha256(path.read_bytes()).hexdigest()]
    if corpus == "stdlib":
        import sys

        parts.append(sys.version)
        for p in _stdlib_files():
            try:
                parts.append(f"{p.name}:{p.stat().st_size}")
            except OSError:
                continue
    return "|".join(parts)


def corpus_texts(corpus: str = "stdlib", max_chars: int | None = 1_200_000) -> list[str]:
    """Texts of a named corpus: ``"shipped"`` or ``"stdlib"`` (shipped docstrings + standard-library sources)."""
    if corpus not in ("shipped", "stdlib"):
        raise ValueError(f"corpus must be 'shipped' or 'stdlib', got {corpus!r}")
    texts = shipped_docstrings()
    if corpus == "stdlib":
        budget = None if max_chars is None else max(0, max_chars - sum(map(len, texts)))
        if budget is None or budget > 0:
            texts = texts + stdlib_source_docstrings(max_chars=budget)
    return texts
