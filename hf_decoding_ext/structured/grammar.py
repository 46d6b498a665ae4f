"""Shared grammar machinery over llguidance: grammar sources, compilation cache, per-row matchers, token masks.

Every structured-generation component of the library goes through this module, so the grammar engine is written
once and is a maintained one (`llguidance <https://github.com/guidance-ai/llguidance>`_, MIT), never a hand-written
JSON-schema or grammar engine.

* :class:`Grammar` names a constraint: a JSON schema, a regular expression, a Lark grammar (GBNF accepted and
  converted), or a list of choices. Build one with :func:`json_schema`, :func:`regex`, :func:`lark` or
  :func:`choices`.
* :func:`compile_grammar` validates and compiles a grammar for a tokenizer, raising a ``ValueError`` that names the
  engine's complaint (for example ``Unimplemented keys: ["if", "then"]``) before any generation starts. Results are
  cached per (tokenizer, eos ids, grammar) in a small LRU cache (:func:`clear_grammar_cache`).
* :class:`RowMatchers` keeps one llguidance matcher per batch row, synchronised with the rows' generated tokens by
  content: each call rolls a matcher back to the longest common prefix with its row and consumes the rest. That makes
  the state a pure function of ``input_ids``: speculative verification (any tree node's path), beam search (rows
  reordered between steps) and a rejected draft (rolled back) all work without the caller telling the matcher.
  Explicit hooks (:meth:`RowMatchers.rollback`, :meth:`RowMatchers.consume`) are there for loops that track tokens
  themselves.
* :func:`bitmask_to_bool` unpacks the engine's 32-bit token bitmask into a ``(batch, vocab)`` boolean mask.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

KINDS = ("json_schema", "regex", "lark", "choices")


def _llg():
    try:
        import llguidance
    except ImportError as err:  # pragma: no cover - llguidance is a core dependency
        raise ImportError("structured generation needs llguidance: pip install llguidance") from err
    return llguidance


@dataclass(frozen=True)
class Grammar:
    """A constraint for the grammar engine.

    Attributes:
        kind: ``"json_schema"``, ``"regex"``, ``"lark"`` or ``"choices"``.
        source: the user's text (the schema as canonical JSON, the pattern, the grammar, the JSON list of choices).
        llg: the llguidance grammar definition compiled from ``source``.
    """

    kind: str
    source: str
    llg: str = field(repr=False)
    notes: tuple[str, ...] = field(default=(), compare=False)
    deferred: Any = field(default=None, compare=False, repr=False)
    """The JSON schema whose unmaskable keywords are checked on completed values (``unmaskable="validate"``; see
    :mod:`hf_decoding_ext.structured.deferred`), else ``None``."""

    @property
    def key(self) -> str:
        return hashlib.sha1(self.llg.encode()).hexdigest()


def json_schema(schema: dict | str | bool, *, whitespace_flexible: bool = False,
                item_separator: str = ", ", key_separator: str = ": ", lenient: bool = False,
                unknown_formats: str = "error", one_of: str = "disjoint", unmaskable: str = "error") -> Grammar:
    """A JSON-schema constraint (JSON Schema Draft 2020-12 as supported by llguidance).

    Args:
        schema: the schema, as a dict, a JSON string or ``True`` (any JSON value).
        whitespace_flexible: allow any JSON whitespace between tokens (default: the compact separators below only,
            which keeps the model from padding output with whitespace).
        item_separator, key_separator: the separators written between items and after keys.
        lenient: ignore keywords the engine does not implement instead of refusing the schema (the output is then
            not guaranteed to validate); default ``False``: unsupported keywords are a ``ValueError``.
        unknown_formats: ``"error"`` (default): refuse a ``format`` the engine does not know; ``"string"``: compile
            it as a plain string (an annotation under Draft 2020-12, but validators that assert formats, as
            JSONSchemaBench's does, may then reject the output: 3 MaskBench instances are admitted that way).
        one_of: ``"disjoint"`` (default) compiles a ``oneOf`` whose branches provably cannot both match as
            ``anyOf``; ``"error"``: leave it to the engine. See :mod:`hf_decoding_ext.structured.schema_coverage`;
            the rewrites made are in ``Grammar.notes`` and issued as a ``UserWarning``. Two exact rewrites of
            ``not`` are always made (``{"not": {}}``, ``{"not": {"required": [k]}}``).
        unmaskable: ``"error"`` (default): the engine refuses keywords it cannot mask (``not``, ``dependencies``,
            ``if``/``then``, ``uniqueItems``, ``contains``, ``propertyNames``, an overlapping ``oneOf``);
            ``"validate"``: mask the schema without them and check them on every value as it completes
            (:mod:`hf_decoding_ext.structured.deferred`: no valid document blocked, no invalid one completed, but a
            row can reach a dead end, which the processor reports as a ``ValueError``).
    """
    if unmaskable not in ("error", "validate"):
        raise ValueError(f"unmaskable must be 'error' or 'validate', got {unmaskable!r}")
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as err:
            raise ValueError(f"schema is not valid JSON: {err}") from err
        except RecursionError:
            raise ValueError("the JSON schema text is nested too deeply to be parsed") from None
    if schema is True:
        schema = {}
    if not isinstance(schema, dict):
        raise ValueError(f"a JSON schema must be an object (dict) or True, got {type(schema).__name__}")
    options: dict[str, Any] = {"whitespace_flexible": bool(whitespace_flexible), "lenient": bool(lenient)}
    if not whitespace_flexible:
        options.update(item_separator=item_separator, key_separator=key_separator)
    _check_depth(schema)
    source = json.dumps(schema, sort_keys=True)
    from hf_decoding_ext.structured.schema_coverage import relax_schema

    compiled_schema, notes = relax_schema(schema, unknown_formats=unknown_formats, one_of=one_of)
    deferred = None
    if unmaskable == "validate" and isinstance(compiled_schema, dict):
        from hf_decoding_ext.structured.deferred import defer_unmaskable

        compiled_schema, more = defer_unmaskable(compiled_schema)
        if more:
            notes, deferred = notes + more, schema
    if compiled_schema is False:
        raise ValueError("the JSON schema matches no document")
    if notes:
        import warnings

        warnings.warn("JSON schema rewritten for the grammar engine: " + "; ".join(notes), UserWarning, stacklevel=2)
    try:
        llg = _llg().LLMatcher.grammar_from_json_schema(compiled_schema, overrides=options)
    except (ValueError, TypeError) as err:
        raise ValueError(f"invalid JSON schema: {err}") from err
    except RecursionError:
        raise ValueError("the JSON schema is nested too deeply for the grammar engine") from None
    return Grammar("json_schema", source, llg, tuple(notes), deferred)


MAX_SCHEMA_DEPTH = 256
"""Deepest nesting of objects and lists accepted in a JSON schema (deeper schemas are refused with a
``ValueError`` before Python's recursion limit or the engine's is reached)."""


def _check_depth(value, limit: int = MAX_SCHEMA_DEPTH) -> None:
    stack = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            raise ValueError(f"the JSON schema is nested more than {limit} levels deep")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


def regex(pattern: str) -> Grammar:
    """A regular-expression constraint (Rust ``regex`` syntax; the whole output must match)."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError("regex pattern must be a non-empty string")
    return Grammar("regex", pattern, _llg().LLMatcher.grammar_from_regex(pattern))


def lark(grammar: str) -> Grammar:
    """A context-free grammar in llguidance's Lark dialect (``start:`` rule), or in GBNF (converted to Lark)."""
    if not isinstance(grammar, str) or not grammar.strip():
        raise ValueError("grammar must be a non-empty string")
    text = grammar
    if "::=" in grammar:  # GBNF / EBNF (llama.cpp style)
        from llguidance.gbnf_to_lark import any_to_lark

        try:
            text = any_to_lark(grammar)
        except Exception as err:  # the converter raises plain exceptions
            raise ValueError(f"could not convert the GBNF grammar to Lark: {err}") from err
    return Grammar("lark", grammar, _llg().LLMatcher.grammar_from_lark(text))


def choices(options: Sequence[str]) -> Grammar:
    """The output is exactly one of ``options``."""
    options = list(options)
    if not options or not all(isinstance(o, str) and o for o in options):
        raise ValueError("choices must be a non-empty list of non-empty strings")
    lark_text = "start: " + " | ".join(json.dumps(o) for o in options)
    return Grammar("choices", json.dumps(options), _llg().LLMatcher.grammar_from_lark(lark_text))


def as_grammar(grammar: Grammar | dict | str | None = None, *, json_schema_: dict | str | None = None,
               regex_: str | None = None, lark_: str | None = None) -> Grammar:
    """Normalise the user's constraint: a :class:`Grammar`, a dict (a JSON schema) or exactly one keyword."""
    given = [g for g in (grammar, json_schema_, regex_, lark_) if g is not None]
    if len(given) != 1:
        raise ValueError("give exactly one constraint: grammar=, json_schema=, regex= or lark=")
    if isinstance(grammar, Grammar):
        return grammar
    if isinstance(grammar, dict) or json_schema_ is not None:
        return json_schema(grammar if grammar is not None else json_schema_)
    if regex_ is not None:
        return regex(regex_)
    if lark_ is not None:
        return lark(lark_)
    raise ValueError(f"grammar must be a Grammar or a JSON-schema dict, got {type(grammar).__name__}; use "
                     "json_schema=, regex= or lark= for text")


# ------------------------------------------------------------------------------------------------ tokenizers
_TOKENIZER_CACHE: OrderedDict = OrderedDict()
_GRAMMAR_CACHE: OrderedDict = OrderedDict()
_LOCK = threading.Lock()
CACHE_SIZE = 64


_KEYS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tokenizer_key(tokenizer) -> str:
    """A content key of the tokenizer (its serialised vocabulary and rules), memoised per tokenizer object."""
    try:
        return _KEYS[tokenizer]
    except (KeyError, TypeError):
        pass
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"the grammar engine needs a fast (Rust-backed) Hugging Face tokenizer; "
                         f"{type(tokenizer).__name__} has no backend_tokenizer")
    key = f"{len(tokenizer)}:{hashlib.sha1(backend.to_str().encode()).hexdigest()}"
    try:
        _KEYS[tokenizer] = key
    except TypeError:  # not weak-referenceable: recomputed next time
        pass
    return key


def eos_ids_of(model=None, tokenizer=None, eos_token_id=None) -> tuple[int, ...]:
    """The eos ids to allow when the grammar accepts: explicit, else the model's generation config, else the
    tokenizer's."""
    ids = eos_token_id
    if ids is None and model is not None:
        gc = getattr(model, "generation_config", None)
        ids = getattr(gc, "eos_token_id", None) if gc is not None else None
    if ids is None and tokenizer is not None:
        ids = tokenizer.eos_token_id
    if ids is None:
        raise ValueError("no eos token id: pass eos_token_id=")
    if isinstance(ids, int):
        ids = [ids]
    return tuple(sorted({int(i) for i in ids}))


def llg_tokenizer(tokenizer, eos_token_ids: Sequence[int], vocab_size: int | None = None):
    """The llguidance tokenizer for a Hugging Face fast tokenizer (cached: building one takes about a second)."""
    llguidance = _llg()
    from llguidance.hf import from_tokenizer

    n_vocab = vocab_size or len(tokenizer)
    key = (_tokenizer_key(tokenizer), tuple(eos_token_ids), n_vocab)
    with _LOCK:
        if key in _TOKENIZER_CACHE:
            _TOKENIZER_CACHE.move_to_end(key)
            return _TOKENIZER_CACHE[key]
    try:
        llt = from_tokenizer(tokenizer, n_vocab=n_vocab, eos_token=list(eos_token_ids))
    except Exception as err:  # llguidance raises ValueError/RuntimeError for tokenizers it cannot handle
        raise ValueError(f"the grammar engine (llguidance {llguidance.__version__}) cannot use tokenizer "
                         f"{type(tokenizer).__name__} ({getattr(tokenizer, 'name_or_path', '?')}): {err}") from err
    with _LOCK:
        _TOKENIZER_CACHE[key] = llt
        while len(_TOKENIZER_CACHE) > 8:
            _TOKENIZER_CACHE.popitem(last=False)
    return llt


@dataclass
class CompiledGrammar:
    """A grammar compiled for one tokenizer: a template matcher copied for every row, and the compile time."""

    grammar: Grammar
    llg_tokenizer: Any
    template: Any
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    compile_seconds: float
    warnings: list[str]
    limits: Any = None

    def matcher(self):
        """A fresh matcher at the start of the grammar."""
        return self.template.deep_copy()


_WHAT = {"json_schema": "JSON schema", "regex": "regular expression", "lark": "grammar", "choices": "choices"}


def validate(grammar: Grammar, llt=None) -> list[str]:
    """Raise a ``ValueError`` naming the engine's error if ``grammar`` is invalid or unsupported; return warnings."""
    llguidance = _llg()
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar.llg, llt)
    if is_error:
        raise ValueError(f"unsupported or invalid {_WHAT[grammar.kind]}: {'; '.join(messages)}")
    return list(messages)


def parser_limits(**limits):
    """llguidance's parser limits (``LLParserLimits``) from keyword arguments: ``max_items_in_row``,
    ``initial_lexer_fuel``, ``step_lexer_fuel``, ``step_max_items``, ``max_lexer_states``, ``max_grammar_size``,
    ``precompute_large_lexemes``, ``verbose_errors``; unknown names are a ``ValueError``."""
    names = ("max_items_in_row", "initial_lexer_fuel", "step_lexer_fuel", "step_max_items", "max_lexer_states",
             "max_grammar_size", "precompute_large_lexemes", "verbose_errors")
    unknown = sorted(set(limits) - set(names))
    if unknown:
        raise ValueError(f"unknown parser limits {unknown}; known: {list(names)}")
    return _llg().LLParserLimits(**limits)


def _limits_key(limits) -> tuple:
    if limits is None:
        return ()
    return tuple(getattr(limits, n) for n in ("max_items_in_row", "initial_lexer_fuel", "step_lexer_fuel",
                                              "step_max_items", "max_lexer_states", "max_grammar_size"))


def compile_grammar(tokenizer, grammar: Grammar, eos_token_ids: Sequence[int], vocab_size: int | None = None,
                    limits=None, warn: bool = True) -> CompiledGrammar:
    """Validate and compile ``grammar`` for ``tokenizer`` (cached per tokenizer, eos ids, grammar and limits).

    ``limits``: llguidance's parser limits (:func:`parser_limits`, or a dict of them); ``None``: the engine's
    defaults. The engine's warnings about the grammar (for example keywords a lenient JSON schema ignores) are kept
    in :attr:`CompiledGrammar.warnings` and, with ``warn``, issued as a Python ``UserWarning`` the first time the
    grammar is compiled.

    Raises:
        ValueError: the grammar is invalid or uses a feature the engine does not support (the message names it), or
            the tokenizer cannot be used by the engine.
    """
    llguidance = _llg()
    if isinstance(limits, dict):
        limits = parser_limits(**limits)
    llt = llg_tokenizer(tokenizer, eos_token_ids, vocab_size)
    key = (id(llt), grammar.key, _limits_key(limits))
    with _LOCK:
        hit = _GRAMMAR_CACHE.get(key)
        if hit is not None and hit.llg_tokenizer is llt:
            _GRAMMAR_CACHE.move_to_end(key)
            return hit
    t0 = time.perf_counter()
    template = llguidance.LLMatcher(llt, grammar.llg, log_level=0, limits=limits)
    if template.is_error():
        raise ValueError(f"unsupported or invalid {_WHAT[grammar.kind]}: {template.get_error()}")
    warnings = list(template.get_grammar_warnings())
    if warnings and warn:
        import warnings as _warnings

        _warnings.warn(f"grammar engine warnings for this {_WHAT[grammar.kind]}: {'; '.join(warnings)}",
                       UserWarning, stacklevel=2)
    compiled = CompiledGrammar(grammar, llt, template, llt.vocab_size, tuple(eos_token_ids),
                               time.perf_counter() - t0, warnings, limits)
    with _LOCK:
        _GRAMMAR_CACHE[key] = compiled
        while len(_GRAMMAR_CACHE) > CACHE_SIZE:
            _GRAMMAR_CACHE.popitem(last=False)
    return compiled


def clear_grammar_cache() -> None:
    """Empty the tokenizer and grammar caches."""
    with _LOCK:
        _TOKENIZER_CACHE.clear()
        _GRAMMAR_CACHE.clear()


# ------------------------------------------------------------------------------------------------ masks
_SHIFTS = torch.arange(32, dtype=torch.int32)


def bitmask_to_bool(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Unpack an int32 ``(batch, ceil(V/32))`` bitmask into a ``(batch, vocab_size)`` boolean mask (True = allowed);
    ids beyond the bitmask are not allowed."""
    bits = ((bitmask.unsqueeze(-1) >> _SHIFTS) & 1).bool().view(bitmask.shape[0], -1)
    if bits.shape[1] >= vocab_size:
        return bits[:, :vocab_size]
    pad = torch.zeros(bitmask.shape[0], vocab_size - bits.shape[1], dtype=torch.bool)
    return torch.cat([bits, pad], dim=1)


_EXECUTOR = None


def _executor():
    """llguidance's parallel mask executor (one per process)."""
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = _llg().LLExecutor()
    return _EXECUTOR


class GrammarEngineError(RuntimeError):
    """The grammar engine stopped on an internal limit (for example ``LexerTooComplex``) while matching: the grammar
    compiled, but this input exceeds what the engine can track. Raised instead of silently masking every token."""


def _raise_engine_error(m) -> None:
    if m.is_error():
        err = m.get_error()
        first = next((ln for ln in err.splitlines() if ln.startswith(("Error", "Stop"))), err[:200])
        raise GrammarEngineError(f"grammar engine error: {first}")


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class RowMatchers:
    """One llguidance matcher per batch row, kept in sync with each row's generated tokens.

    Args:
        compiled: the :class:`CompiledGrammar`.
        batch_size: number of rows.

    :meth:`sync` takes each row's generated tokens (everything after the prompt) and brings the row's matcher to
    that state: it reuses the matcher (of any row) with the longest common prefix, rolls it back to the prefix and
    consumes the rest. Tokens after the grammar has stopped (after eos: padding) are ignored. A row whose tokens the
    grammar rejects is *dead* (its mask allows only eos) and listed in :attr:`dead`.
    """

    def __init__(self, compiled: CompiledGrammar, batch_size: int):
        self.compiled = compiled
        self.matchers = [compiled.matcher() for _ in range(batch_size)]
        self.consumed: list[list[int]] = [[] for _ in range(batch_size)]
        self.dead: set[int] = set()
        self.bitmask = torch.full((batch_size, (compiled.vocab_size + 31) // 32), -1, dtype=torch.int32)
        self.mask_seconds = 0.0
        self.sync_seconds = 0.0

    def __len__(self) -> int:
        return len(self.matchers)

    # -------------------------------------------------------------------------------------------- state
    def _advance(self, m, have: list[int], want: list[int]) -> tuple[list[int], bool]:
        """Roll ``m`` (in state ``have``) back and forward to ``want``; return the consumed list and liveness."""
        k = _common_prefix(have, want)
        if k == len(have) and (m.is_stopped() or m.is_error()):
            return have, not m.is_error()  # nothing to undo; tokens after a stop are padding
        if len(have) > k:
            if not m.rollback(len(have) - k):
                raise RuntimeError(f"grammar matcher could not roll back {len(have) - k} tokens: {m.get_error()}")
            have = have[:k]
        rest = want[k:]
        if not rest or m.is_stopped():
            return have, not m.is_error()
        n = m.try_consume_tokens(rest)  # stops before a refused token, without entering the error state
        _raise_engine_error(m)
        have = have + rest[:n]
        return have, n == len(rest) or m.is_stopped()

    def sync(self, generated: list[list[int]]) -> None:
        """Bring every row's matcher to the state after ``generated[row]`` (the row's tokens after the prompt)."""
        t0 = time.perf_counter()
        if len(generated) != len(self.matchers):
            raise ValueError(f"batch of {len(generated)} rows for {len(self.matchers)} matchers")
        wants = [[int(t) for t in row] for row in generated]
        old_m, old_c = self.matchers, self.consumed
        sources = []
        for r, want in enumerate(wants):
            k = _common_prefix(old_c[r], want)
            best, best_cost = r, (len(old_c[r]) - k) + (len(want) - k)
            if k < len(old_c[r]):  # the row diverged from its matcher (beam search reorders rows): reuse the closest
                for s, have in enumerate(old_c):
                    ks = _common_prefix(have, want)
                    cost = (len(have) - ks) + (len(want) - ks)
                    if cost < best_cost:
                        best, best_cost = s, cost
            sources.append(best)
        # copies of a matcher shared by several rows are taken before any of them advances
        spare = {s: [old_m[s].deep_copy() for _ in range(sources.count(s) - 1)] for s in set(sources)}
        used: set[int] = set()
        new_m, new_c = [], []
        for r, want in enumerate(wants):
            s = sources[r]
            m = old_m[s] if s not in used else spare[s].pop()
            used.add(s)
            have, alive = self._advance(m, list(old_c[s]), want)
            new_m.append(m)
            new_c.append(have)
            (self.dead.discard if alive else self.dead.add)(r)
        self.matchers, self.consumed = new_m, new_c
        self.sync_seconds += time.perf_counter() - t0

    def select(self, indices: Sequence[int], copy: bool = False) -> RowMatchers:
        """Matchers for the rows ``indices`` of these (rows may repeat, in the new order): the first use of each
        matcher is the matcher itself (this object should then be dropped), further uses, or all with ``copy``,
        are deep copies."""
        indices = [int(i) for i in indices]
        new = RowMatchers.__new__(RowMatchers)
        new.compiled = self.compiled
        used: set[int] = set()
        new.matchers, new.consumed = [], []
        for i in indices:
            m = self.matchers[i]
            new.matchers.append(m.deep_copy() if copy or i in used else m)
            new.consumed.append(list(self.consumed[i]))
            used.add(i)
        new.dead = {r for r, i in enumerate(indices) if i in self.dead}
        new.bitmask = torch.full((len(indices), self.bitmask.shape[1]), -1, dtype=torch.int32)
        new.mask_seconds, new.sync_seconds = self.mask_seconds, self.sync_seconds
        return new

    def rollback(self, num_tokens: int, row: int | None = None) -> None:
        """Undo the last ``num_tokens`` tokens of ``row`` (all rows when ``None``): the hook for rejected drafts."""
        rows = range(len(self.matchers)) if row is None else [row]
        for r in rows:
            n = min(num_tokens, len(self.consumed[r]))
            if n and not self.matchers[r].rollback(n):
                raise RuntimeError(f"grammar matcher could not roll back {n} tokens")
            self.consumed[r] = self.consumed[r][: len(self.consumed[r]) - n]
            if not self.matchers[r].is_error():
                self.dead.discard(r)

    def consume(self, tokens: Sequence[int], row: int = 0) -> bool:
        """Consume ``tokens`` on ``row``; ``False`` (and the row is dead) if the grammar rejects one."""
        have, alive = self._advance(self.matchers[row], self.consumed[row], self.consumed[row] + list(tokens))
        self.consumed[row] = have
        (self.dead.discard if alive else self.dead.add)(row)
        return alive

    def accepting(self, row: int = 0) -> bool:
        """Whether ``row``'s output so far is a complete sentence of the grammar (never for a row whose tokens the
        grammar rejected, even if the tokens before the rejected one were complete)."""
        if row in self.dead:
            return False
        m = self.matchers[row]
        return not m.is_error() and (m.is_accepting() or m.is_stopped())

    # -------------------------------------------------------------------------------------------- masks
    def allowed(self, vocab_size: int, device=None) -> torch.Tensor:
        """``(batch, vocab_size)`` boolean mask of the next tokens each row's grammar allows (eos only where it
        accepts; a dead row allows only eos)."""
        import llguidance.torch as lt

        t0 = time.perf_counter()
        live = [(m, r) for r, m in enumerate(self.matchers) if r not in self.dead]
        if len(live) > 1:  # the engine's thread pool computes the rows' masks in parallel
            lt.fill_next_token_bitmask_par(_executor(), live, self.bitmask)
        elif live:
            lt.fill_next_token_bitmask(live[0][0], self.bitmask, live[0][1])
        for m, _ in live:
            _raise_engine_error(m)
        mask = bitmask_to_bool(self.bitmask, vocab_size)
        for r in self.dead:
            mask[r] = False
            mask[r, [e for e in self.compiled.eos_token_ids if e < vocab_size]] = True
        self.mask_seconds += time.perf_counter() - t0
        return mask if device is None else mask.to(device, non_blocking=True)


class GrammarTokenPredicate:
    """``predicate(prefix, token) -> bool``: whether the grammar allows ``token`` after the generated ``prefix``.

    For samplers that test only the tokens they draw instead of computing the full mask (adaptive weighted rejection
    sampling, :mod:`hf_decoding_ext.structured.awrs`): one check costs well under a microsecond once the matcher is at
    the prefix. A few matcher slots follow the prefixes asked about (one per batch row), each brought to a new prefix
    by rollback / consumption from the closest slot.

    Args:
        compiled: the :class:`CompiledGrammar`.
        slots: number of matchers kept (use at least the batch size).
    """

    def __init__(self, compiled: CompiledGrammar, slots: int = 8):
        if slots < 1:
            raise ValueError("slots must be >= 1")
        self.compiled = compiled
        self.rows = RowMatchers(compiled, slots)
        self.eos = set(compiled.eos_token_ids)
        self.calls = 0

    def __call__(self, prefix: Sequence[int], token: int) -> bool:
        self.calls += 1
        want = [int(t) for t in prefix]
        costs = []
        for have in self.rows.consumed:
            k = _common_prefix(have, want)
            costs.append((len(have) - k) + (len(want) - k))
        r = min(range(len(costs)), key=costs.__getitem__)
        m = self.rows.matchers[r]
        have, alive = self.rows._advance(m, self.rows.consumed[r], want)
        self.rows.consumed[r] = have
        if not alive:
            return False
        if int(token) in self.eos:
            return m.is_accepting() or m.is_stopped()
        return not m.is_stopped() and m.validate_tokens([int(token)]) == 1
