"""JSON-schema keywords the grammar engine cannot mask, enforced by validating values as they complete (issue 17).

llguidance refuses ``not``, ``dependencies`` / ``dependentRequired`` / ``dependentSchemas``, ``if`` / ``then`` /
``else``, ``uniqueItems``, ``contains`` (with ``minContains`` / ``maxContains``), ``propertyNames`` and a ``oneOf``
whose branches may overlap. With ``json_schema(..., unmaskable="validate")`` such a schema is compiled in two parts:

1. :func:`defer_unmaskable` removes those keywords (a non-disjoint ``oneOf`` becomes ``anyOf``). Removing a keyword
   from a schema only widens the set of valid documents, so the engine's mask of the *relaxed* schema never blocks
   a valid document.
2. :class:`DeferredChecker` follows the output with an incremental JSON scanner and, whenever a value completes (a
   string's closing quote, a container's closing bracket, the delimiter after a number or literal, eos after a
   top-level scalar), validates it with ``jsonschema`` against the removed keywords of every subschema that applies
   to that location *unconditionally* (reached through ``properties``, ``patternProperties``,
   ``additionalProperties``, ``items`` / ``prefixItems``, ``allOf`` and local ``$ref`` s). Keys are checked against
   ``propertyNames`` as soon as they complete, array items against ``uniqueItems`` as soon as they complete. When the
   top-level value completes, the whole document is validated against the original schema, which also covers
   keywords under ``anyOf`` / ``oneOf`` / ``if`` branches that have no unconditional location. A token that
   completes an invalid value is not allowed.

So no output the processor lets complete is invalid, and no valid document is ever blocked (every check is of a
keyword the document must satisfy at that location). The price is that the mask is *lazy*: a document can reach a
prefix from which every completion violates a deferred keyword (for example an object holding a key that its ``not``
forbids, found only when the object closes). Such a row then has no allowed token, and the processor raises a
``ValueError`` naming the keyword check rather than emitting an invalid document. Two rewrites of ``not`` are exact
and maskable and are applied by :func:`~hf_decoding_ext.structured.schema_coverage.relax_schema` (always, before
deferral): ``{"not": {}}`` (matches nothing) becomes ``false``, and ``{"not": {"required": [k]}}`` becomes "an object
without ``k``".
"""

from __future__ import annotations

import json
import re
from typing import Any, Sequence

from hf_decoding_ext.structured.schema_coverage import branches_disjoint, transform_schema

DEFERRED_KEYWORDS = ("not", "dependencies", "dependentRequired", "dependentSchemas", "if", "then", "else",
                     "uniqueItems", "contains", "minContains", "maxContains", "propertyNames")
"""Keywords :func:`defer_unmaskable` removes from the compiled schema and :class:`DeferredChecker` validates (plus a
``oneOf`` whose branches may overlap)."""

_REF_OVERRIDES_SIBLINGS = ("Draft3Validator", "Draft4Validator", "Draft6Validator", "Draft7Validator")


def defer_unmaskable(schema) -> tuple[Any, list[str]]:
    """A copy of ``schema`` without the keywords of :data:`DEFERRED_KEYWORDS` (a ``oneOf`` whose branches may
    overlap becomes ``anyOf``): a schema the engine can mask whose valid documents include every valid document of
    ``schema``. Returns ``(relaxed, notes)``; the notes name what was removed where (empty: nothing deferred).

    Raises:
        ValueError: the schema uses ``unevaluatedProperties`` / ``unevaluatedItems``, whose meaning depends on the
            keywords removed.
    """
    notes: list[str] = []

    def visit(out: dict, path: str):
        removed = [k for k in DEFERRED_KEYWORDS if k in out]
        for k in removed:
            del out[k]
        branches = out.get("oneOf")
        if isinstance(branches, list) and len(branches) > 1 and not all(
                branches_disjoint(branches[i], branches[j])
                for i in range(len(branches)) for j in range(i + 1, len(branches))):
            del out["oneOf"]
            if "anyOf" in out:
                out["allOf"] = list(out.get("allOf", [])) + [{"anyOf": branches}]
            else:
                out["anyOf"] = branches
            removed.append("oneOf")
        if removed:
            notes.append(f"{path or '/'}: {', '.join(removed)} checked on completed values")
        return out

    relaxed = transform_schema(schema, visit)
    if notes and "unevaluated" in json.dumps(schema):
        found = [k for k in ("unevaluatedProperties", "unevaluatedItems") if f'"{k}"' in json.dumps(schema)]
        if found:
            raise ValueError(f"cannot defer {notes[0]!r}: the schema uses {found}, whose meaning depends on the "
                             "deferred keywords")
    return relaxed, notes


class DeferredDeadEnd(ValueError):
    """A row reached a prefix after which every token the grammar allows completes a value that fails a deferred
    keyword (``unmaskable="validate"``)."""


# --------------------------------------------------------------------------------------------------- scanner state
class _Frame:
    """An open container: kind ``"o"``/``"a"``, start offset, instance path, the current key (objects), the number of
    completed items (arrays), the canonical forms of the completed items (arrays with ``uniqueItems``)."""

    __slots__ = ("kind", "start", "path", "key", "count", "seen", "expect_key")

    def __init__(self, kind, start, path, key=None, count=0, seen=frozenset(), expect_key=True):
        self.kind, self.start, self.path, self.key = kind, start, path, key
        self.count, self.seen, self.expect_key = count, seen, expect_key

    def copy(self) -> "_Frame":
        return _Frame(self.kind, self.start, self.path, self.key, self.count, self.seen, self.expect_key)


class ScanState:
    """The scanner's state after some bytes of output: ``text`` (the bytes), the open containers, the open scalar
    (``("s", start, is_key)`` for a string, ``("b", start)`` for a number or literal) and whether a check failed
    (``failed``: the message) or the top-level value is complete."""

    __slots__ = ("text", "stack", "scalar", "escape", "failed", "done")

    def __init__(self):
        self.text = b""
        self.stack: list[_Frame] = []
        self.scalar: tuple | None = None
        self.escape = False
        self.failed: str | None = None
        self.done = False

    def copy(self) -> "ScanState":
        s = ScanState.__new__(ScanState)
        s.text, s.scalar, s.escape, s.failed, s.done = self.text, self.scalar, self.escape, self.failed, self.done
        s.stack = [f.copy() for f in self.stack]
        return s


_INCOMPLETE = object()
_BARE_END = frozenset(b",}] \t\r\n")
_WS = frozenset(b" \t\r\n")


def _canonical(value) -> str:
    def norm(v):
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if isinstance(v, list):
            return [norm(x) for x in v]
        if isinstance(v, dict):
            return {k: norm(x) for k, x in v.items()}
        return v
    return json.dumps(norm(value), sort_keys=True)


class DeferredChecker:
    """Validate the deferred keywords of ``schema`` on completed values of a JSON output (see the module docstring).

    Args:
        schema: the user's (original, full) JSON schema.

    ``feed(state, data)`` returns the state after the bytes ``data`` (the input state is not modified); its
    ``failed`` is the violation found, if any. ``finish(state)`` is the check at eos. The checker is stateless
    otherwise (states can be shared between rows and branches).
    """

    def __init__(self, schema):
        from jsonschema import validators

        self.schema = {} if schema is True else schema
        cls = validators.validator_for(self.schema, default=validators.Draft202012Validator)
        self.validator = cls(self.schema)
        self.ref_overrides_siblings = cls.__name__ in _REF_OVERRIDES_SIBLINGS
        self._nodes: dict[tuple, list | None] = {}
        self._partial: dict[int, Any] = {}
        self._memo: dict[tuple, tuple] = {}
        self.checks = 0

    # ------------------------------------------------------------------------------------------- locations
    def _expand(self, node) -> list | None:
        """The schema objects that apply to an instance through ``node`` unconditionally (``allOf`` and local
        ``$ref`` expanded); ``None`` when unknown (a non-local reference or an embedded ``$id``)."""
        out, stack, seen = [], [node], set()
        while stack:
            n = stack.pop()
            if n is True or n is None:
                continue
            if n is False or not isinstance(n, dict):
                out.append(n)
                continue
            if id(n) in seen:
                continue
            seen.add(id(n))
            if "$id" in n and n is not self.schema:
                return None
            ref = n.get("$ref")
            if isinstance(ref, str):
                if not ref.startswith("#"):
                    return None
                try:
                    stack.append(self.validator._resolver.lookup(ref).contents)
                except Exception:  # noqa: BLE001 - unresolvable here: the document check still runs
                    return None
                if self.ref_overrides_siblings:
                    continue
            out.append(n)
            if isinstance(n.get("allOf"), list):
                stack.extend(n["allOf"])
        return out

    def nodes_at(self, path: tuple) -> list | None:
        """The schema objects that apply unconditionally at instance ``path`` (keys and indices)."""
        hit = self._nodes.get(path, 0)
        if hit != 0:
            return hit
        if not path:
            nodes = self._expand(self.schema)
        else:
            parent = self.nodes_at(path[:-1])
            nodes = None if parent is None else []
            step = path[-1]
            for n in parent or ():
                if not isinstance(n, dict):
                    continue
                children = []
                if isinstance(step, str):
                    props = n.get("properties") if isinstance(n.get("properties"), dict) else {}
                    matched = step in props
                    if matched:
                        children.append(props[step])
                    for pattern, sub in (n.get("patternProperties") or {}).items():
                        try:
                            if re.search(pattern, step):
                                children.append(sub)
                                matched = True
                        except re.error:
                            return self._store(path, None)
                    if not matched and "additionalProperties" in n:
                        children.append(n["additionalProperties"])
                else:
                    prefix = n.get("prefixItems")
                    items = n.get("items")
                    if isinstance(prefix, list):
                        children.append(prefix[step] if step < len(prefix) else items)
                    elif isinstance(items, list):
                        children.append(items[step] if step < len(items) else n.get("additionalItems"))
                    else:
                        children.append(items)
                for c in children:
                    ex = self._expand(c)
                    if ex is None:
                        return self._store(path, None)
                    nodes.extend(ex)
        return self._store(path, nodes)

    def _store(self, path, nodes):
        self._nodes[path] = nodes
        return nodes

    def _partial_validator(self, node: dict):
        v = self._partial.get(id(node), 0)
        if v == 0:
            sub = {k: node[k] for k in DEFERRED_KEYWORDS + ("oneOf",) if k in node}
            if "oneOf" in sub and len(sub["oneOf"]) < 2:
                del sub["oneOf"]
            v = self.validator.evolve(schema=sub) if sub else None
            self._partial[id(node)] = v
        return v

    # ------------------------------------------------------------------------------------------- checks
    def _check_value(self, state: ScanState, path: tuple, start: int, end: int) -> None:
        if state.failed is not None:
            return
        if not path:
            state.done = True
        raw = state.text[start:end]
        key = (path, raw)
        if key in self._memo:  # the candidate tokens of one step complete the same values again and again
            verdict, value = self._memo[key]
        else:
            verdict, value = self._validate(path, raw)
            if len(self._memo) > 4096:
                self._memo.clear()
            self._memo[key] = (verdict, value)
        if verdict is not None:
            state.failed = verdict
            return
        if value is _INCOMPLETE or not path:
            return
        parent = state.stack[-1] if state.stack else None
        if parent is not None and parent.kind == "a":
            if any(isinstance(n, dict) and n.get("uniqueItems") is True for n in self.nodes_at(parent.path) or ()):
                c = _canonical(value)
                if c in parent.seen:
                    state.failed = f"the array at {_show(parent.path)} fails 'uniqueItems'"
                    return
                parent.seen = parent.seen | {c}

    def _validate(self, path: tuple, raw: bytes):
        """``(failure message or None, parsed value)`` of the value ``raw`` completed at ``path``."""
        try:
            value = json.loads(raw)
        except ValueError:
            return None, _INCOMPLETE  # not a complete JSON value (the grammar decides what is well-formed)
        self.checks += 1
        if not path:
            if not self.validator.is_valid(value):
                err = next(self.validator.iter_errors(value))
                return f"the document fails {err.validator!r} at {_show(err.absolute_path)}", value
            return None, value
        for n in self.nodes_at(path) or ():
            if n is False:
                return f"no value is allowed at {_show(path)}", value
            if isinstance(n, dict):
                v = self._partial_validator(n)
                if v is not None and not v.is_valid(value):
                    err = next(v.iter_errors(value))
                    return f"the value at {_show(path)} fails {err.validator!r}", value
        return None, value

    def _check_key(self, state: ScanState, frame: _Frame, key: str) -> None:
        for n in self.nodes_at(frame.path) or ():
            if isinstance(n, dict) and "propertyNames" in n:
                if not self.validator.evolve(schema={"propertyNames": n["propertyNames"]}).is_valid({key: None}):
                    state.failed = f"the key {key!r} at {_show(frame.path)} fails 'propertyNames'"
                    return

    def _value_path(self, state: ScanState) -> tuple:
        if not state.stack:
            return ()
        f = state.stack[-1]
        return f.path + ((f.key,) if f.kind == "o" else (f.count,))

    def _end_bare(self, state: ScanState, end: int) -> None:
        _, start = state.scalar
        state.scalar = None
        self._complete(state, start, end)

    def _complete(self, state: ScanState, start: int, end: int) -> None:
        path = self._value_path(state)
        self._check_value(state, path, start, end)
        if state.stack:
            f = state.stack[-1]
            if f.kind == "a":
                f.count += 1

    def feed(self, state: ScanState, data: bytes) -> ScanState:
        """The state after ``data`` (a copy; ``state`` is unchanged)."""
        s = state.copy()
        if s.failed is not None or not data:
            s.text = s.text + data
            return s
        base = len(s.text)
        s.text = s.text + data
        for i, b in enumerate(data):
            pos = base + i
            sc = s.scalar
            if sc is not None and sc[0] == "s":
                if s.escape:
                    s.escape = False
                elif b == 0x5C:  # backslash
                    s.escape = True
                elif b == 0x22:  # closing quote
                    s.scalar = None
                    if sc[2]:  # a key
                        f = s.stack[-1]
                        try:
                            f.key = json.loads(s.text[sc[1]:pos + 1])
                        except ValueError:
                            f.key = None
                        f.expect_key = False
                        if isinstance(f.key, str):
                            self._check_key(s, f, f.key)
                    else:
                        self._complete(s, sc[1], pos + 1)
                continue
            if sc is not None:  # a number or literal: ends at a delimiter
                if b not in _BARE_END:
                    continue
                self._end_bare(s, pos)
            if s.failed is not None:
                break
            if b in _WS or b == 0x3A:  # whitespace, ':'
                continue
            if b == 0x2C:  # ','
                if s.stack and s.stack[-1].kind == "o":
                    s.stack[-1].expect_key = True
                continue
            if b in (0x7D, 0x5D):  # '}' ']'
                if not s.stack:
                    continue
                f = s.stack.pop()
                self._complete(s, f.start, pos + 1)
            elif b == 0x7B:  # '{'
                s.stack.append(_Frame("o", pos, self._value_path(s)))
            elif b == 0x5B:  # '['
                s.stack.append(_Frame("a", pos, self._value_path(s)))
            elif b == 0x22:  # opening quote
                is_key = bool(s.stack) and s.stack[-1].kind == "o" and s.stack[-1].expect_key
                s.scalar = ("s", pos, is_key)
            else:
                s.scalar = ("b", pos)
            if s.failed is not None:
                break
        return s

    def finish(self, state: ScanState) -> ScanState:
        """The state at eos: a pending top-level number or literal completes (and is checked)."""
        s = state.copy()
        if s.failed is None and s.scalar is not None and s.scalar[0] == "b" and not s.stack:
            self._end_bare(s, len(s.text))
        return s


def _show(path: Sequence) -> str:
    return "/" + "/".join(map(str, path))


class DeferredRows:
    """Per-row :class:`ScanState` s of a batch, synchronised with the rows' generated tokens by content (like
    :class:`~hf_decoding_ext.structured.grammar.RowMatchers`), and the lazy filter of a grammar mask.

    Args:
        checker: the :class:`DeferredChecker`.
        token_bytes: ``token_bytes(id) -> bytes`` of the tokenizer.
        eos_token_ids: the eos ids (checked with :meth:`DeferredChecker.finish`).
        trigger: ``(vocab,)`` bool tensor of the tokens whose bytes can complete a value (a quote, a bracket, a
            comma or whitespace); only these (and eos) are checked.
    """

    def __init__(self, checker: DeferredChecker, token_bytes, eos_token_ids, trigger):
        self.checker = checker
        self.token_bytes = token_bytes
        self.eos = set(int(e) for e in eos_token_ids)
        self.trigger = trigger
        self.entries: list[tuple[list[int], ScanState]] = []
        self.removed = 0

    def state_for(self, ids: Sequence[int]) -> ScanState:
        """The state after the tokens ``ids`` (from the stored state with the longest prefix of ``ids``)."""
        ids = [int(t) for t in ids]
        best, best_len = None, -1
        for have, st in self.entries:
            n = len(have)
            if n > best_len and n <= len(ids) and have == ids[:n]:
                best, best_len = st, n
        st = best if best is not None else ScanState()
        rest = ids[max(best_len, 0):]
        if rest:
            data = b"".join(self.token_bytes(t) for t in rest if t not in self.eos)
            st = self.checker.feed(st, data)
        return st

    def sync(self, generated: Sequence[Sequence[int]]) -> list[ScanState]:
        states = [self.state_for(g) for g in generated]
        self.entries = [([int(t) for t in g], s) for g, s in zip(generated, states)]
        return states

    def allows(self, state: ScanState, token: int) -> bool:
        """Whether ``token`` may follow ``state`` as far as the deferred keywords are concerned."""
        if state.failed is not None:
            return False
        if token in self.eos:
            return self.checker.finish(state).failed is None
        return self.checker.feed(state, self.token_bytes(token)).failed is None

    def filter(self, generated: Sequence[Sequence[int]], allowed):
        """Remove from the ``(batch, vocab)`` mask ``allowed`` the tokens that complete a value violating a deferred
        keyword (in place; returns it)."""
        import torch

        states = self.sync(generated)
        trig = self.trigger.to(allowed.device)
        for r, st in enumerate(states):
            cand = allowed[r] & trig[: allowed.shape[1]] if trig.numel() >= allowed.shape[1] else allowed[r]
            ids = cand.nonzero().flatten().tolist()
            ids += [e for e in self.eos if e < allowed.shape[1] and bool(allowed[r, e]) and e not in ids]
            bad = [t for t in ids if not self.allows(st, t)]
            if bad:
                allowed[r, torch.tensor(bad, dtype=torch.long, device=allowed.device)] = False
                self.removed += len(bad)
        return allowed

    def failure(self, generated: Sequence[int], allowed_row) -> str:
        """Why a row has no token left: the deferred check that every allowed token failed."""
        st = self.state_for(generated)
        if st.failed is not None:
            return st.failed
        for t in allowed_row.nonzero().flatten().tolist()[:64]:
            nxt = self.checker.finish(st) if t in self.eos else self.checker.feed(st, self.token_bytes(t))
            if nxt.failed is not None:
                return nxt.failed
        return "a deferred keyword check"


def trigger_tokens(token_bytes, vocab_size: int):
    """``(vocab_size,)`` bool tensor: tokens whose bytes contain a quote, a closing bracket, a comma or whitespace."""
    import torch

    out = torch.zeros(vocab_size, dtype=torch.bool)
    marks = set(b'"}],') | set(_WS)
    for t in range(vocab_size):
        bs = token_bytes(t)
        if bs and any(c in marks for c in bs):
            out[t] = True
    return out


_TRIGGERS: dict = {}


def deferred_rows_for(grammar, compiled) -> DeferredRows | None:
    """The :class:`DeferredRows` of a compiled JSON-schema grammar built with ``unmaskable="validate"``, or ``None``
    when the grammar defers nothing."""
    if getattr(grammar, "deferred", None) is None:
        return None
    llt = compiled.llg_tokenizer
    key = id(llt)
    hit = _TRIGGERS.get(key)
    if hit is None or hit[0] is not llt:
        table = [llt.decode_bytes([t]) for t in range(llt.vocab_size)]
        hit = (llt, table, trigger_tokens(table.__getitem__, len(table)))
        _TRIGGERS.clear()  # one tokenizer at a time (the table holds every token's bytes)
        _TRIGGERS[key] = hit
    _, table, trig = hit
    n = len(table)

    def token_bytes(t: int) -> bytes:
        return table[t] if 0 <= t < n else b""

    return DeferredRows(DeferredChecker(grammar.deferred), token_bytes, compiled.eos_token_ids, trig)


__all__ = ["DEFERRED_KEYWORDS", "DeferredDeadEnd", "defer_unmaskable", "deferred_rows_for", "DeferredChecker",
           "DeferredRows",
           "ScanState", "trigger_tokens"]
