"""Budget-aware grammar completion: a known way to finish the document, and the tokens that keep one in reach.

A grammar mask alone guarantees a valid *prefix*. When generation stops at ``max_new_tokens`` first (the default
model loops inside a string or an array), the user gets invalid output. This module adds what is needed to finish
within a token budget:

* :class:`CompletionFinder` finds, from a matcher state, a sequence of tokens that brings the grammar to an
  accepting state: llguidance's forced (fast-forward) tokens where the grammar forces them, otherwise the first
  allowed token of a fixed list of closing and minimal-value tokens (``"}``, ``]``, ``"``, ``,``, ``0``, ``null``,
  ...), otherwise the allowed token with the smallest id. For JSON schemas a completion built from the schema
  (:class:`JsonCompleter`) is tried first. Both work on a copy of the matcher, so a completion's length is an upper
  bound of the shortest one (llguidance has no shortest-completion facility); that bound is what the guarantee
  needs. The token search is greedy: for a regular expression or a Lark grammar whose way out is not among those
  tokens (a closing keyword, say) it can find none, and the budget is then not guaranteed (counted in
  :attr:`BudgetGuard.unreachable`).
* :class:`BudgetGuard` keeps, per generated prefix, a known completion and restricts the next token so one always
  fits in what is left of the budget. While the budget is ample it only removes, among the ``verify_top_k``
  highest-scored tokens, those after which no completion fits. When the budget gets within ``slack`` tokens of the
  known completion, it allows only the verified tokens and the completion's next token. A greedy row (the top token
  is verified) and any row inside the tight zone therefore always finish. A sampled token outside the top-k, drawn in
  the ample zone, is unverified, and the bound is re-computed after it.

The processors use it through ``max_new_tokens=`` (see
:class:`~hf_decoding_ext.structured.json_schema.GrammarConstrainedLogitsProcessor`).
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Sequence

import torch

CLOSING_TEXTS = (
    # closers first: one token that closes several levels is the shortest way out
    '"}}', '"]}', '}}}', '}}', ']}', '}]', ']]', '"}', '"]', '}', ']', '"', ')', '>', "'", '.', ';',
    # separators, then the shortest values of each JSON type, then openers
    ',', '":', ':', '0', '1', '""', 'null', 'true', 'false', '{}', '[]', '{"', '{', '[', '"a', 'a', '-', '.', 'e',
    'A', 'x', 'T', 'Z', '+', '/', '@', '_',
)
"""Texts tried in order by :class:`CompletionFinder` (those that are one token of the tokenizer)."""


_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


def closing_token_ids(tokenizer, texts: Sequence[str] = CLOSING_TEXTS) -> list[int]:
    """The ids of ``texts`` that the tokenizer encodes as one token, in the order given."""
    ids: list[int] = []
    for text in texts:
        enc = tokenizer(text, add_special_tokens=False).input_ids
        if len(enc) == 1 and enc[0] not in ids:
            ids.append(int(enc[0]))
    return ids


# ------------------------------------------------------------------------------------------------ JSON documents
class _Frame:
    __slots__ = ("kind", "schema", "keys", "key", "count", "phase")

    def __init__(self, kind: str, schema: dict):
        self.kind, self.schema = kind, schema
        self.keys: list[str] = []
        self.key: str | None = None
        self.count = 0
        self.phase = "first" if kind == "object" else "first"


class JsonCompleter:
    """The text that closes a partial JSON document under a schema, with the fewest characters it can build.

    It scans the document so far (containers open, keys written, items counted, the scalar being written), walks the
    schema to the open containers (local ``$ref``, ``allOf`` merged, the first branch of ``anyOf``/``oneOf``), and
    writes the rest: the scalar closed, the missing required keys with the smallest value of their schema, the
    missing ``minItems``, the closers, with the grammar's separators. Patterns, formats it does not know and
    conditional keywords are not solved: the caller verifies the text on a matcher copy and falls back to the
    token search when it is refused.

    Args:
        schema: the JSON schema (a dict; ``True``/``{}`` for any value).
        item_separator, key_separator: the separators the grammar writes (those of
            :func:`~hf_decoding_ext.structured.grammar.json_schema`).
    """

    FORMATS = {"date": "2000-01-01", "date-time": "2000-01-01T00:00:00Z", "time": "00:00:00Z",
               "email": "a@b.co", "uri": "http://a.co", "uri-reference": "a", "hostname": "a.co",
               "ipv4": "0.0.0.0", "ipv6": "::1", "uuid": "00000000-0000-0000-0000-000000000000",
               "duration": "P1D"}

    def __init__(self, schema, item_separator: str = ", ", key_separator: str = ": "):
        self.root = schema if isinstance(schema, dict) else {}
        self.item_sep, self.key_sep = item_separator, key_separator

    # -------------------------------------------------------------------------------------------- schema walk
    def resolve(self, schema, depth: int = 0) -> dict:
        if not isinstance(schema, dict) or depth > 32:
            return {}
        if "$ref" in schema and isinstance(schema["$ref"], str) and schema["$ref"].startswith("#"):
            target = self.root
            for part in schema["$ref"][1:].split("/"):
                if not part:
                    continue
                part = part.replace("~1", "/").replace("~0", "~")
                target = target.get(part, {}) if isinstance(target, dict) else {}
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            schema = {**self.resolve(target, depth + 1), **rest}
        if "allOf" in schema and isinstance(schema["allOf"], list):
            merged = {k: v for k, v in schema.items() if k != "allOf"}
            for part in schema["allOf"]:
                part = self.resolve(part, depth + 1)
                for k, v in part.items():
                    if k == "properties" and isinstance(v, dict):
                        merged["properties"] = {**merged.get("properties", {}), **v}
                    elif k == "required" and isinstance(v, list):
                        merged["required"] = list(dict.fromkeys(merged.get("required", []) + v))
                    else:
                        merged.setdefault(k, v)
            schema = merged
        for key in ("anyOf", "oneOf"):
            if isinstance(schema.get(key), list) and schema[key]:
                rest = {k: v for k, v in schema.items() if k not in ("anyOf", "oneOf")}
                return {**rest, **self.resolve(schema[key][0], depth + 1)}
        return schema

    def child(self, frame: _Frame, key: str | None = None) -> dict:
        s = frame.schema
        if frame.kind == "object":
            props = s.get("properties", {}) if isinstance(s.get("properties"), dict) else {}
            if key in props:
                return self.resolve(props[key])
            add = s.get("additionalProperties")
            return self.resolve(add) if isinstance(add, dict) else {}
        prefix = s.get("prefixItems") if isinstance(s.get("prefixItems"), list) else []
        if frame.count < len(prefix):
            return self.resolve(prefix[frame.count])
        return self.resolve(s.get("items")) if isinstance(s.get("items"), dict) else {}

    def minimal(self, schema: dict, depth: int = 0) -> str:
        """The shortest value this builds for ``schema`` (resolved)."""
        schema = self.resolve(schema)
        if depth > 16:
            return "null"
        if "const" in schema:
            return json.dumps(schema["const"], ensure_ascii=False)
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return min((json.dumps(v, ensure_ascii=False) for v in schema["enum"]), key=len)
        types = schema.get("type")
        if isinstance(types, list):
            types = next((t for t in ("integer", "number", "boolean", "null", "string", "array", "object")
                          if t in types), None)
        if types is None:
            types = ("object" if "properties" in schema or "required" in schema
                     else "array" if "items" in schema or "prefixItems" in schema
                     else "string" if any(k in schema for k in ("minLength", "pattern", "format"))
                     else "integer")
        if types in ("integer", "number"):
            return self._number(schema, types)
        if types == "boolean":
            return "true"
        if types == "null":
            return "null"
        if types == "string":
            fmt = self.FORMATS.get(schema.get("format"))
            if fmt is not None:
                return json.dumps(fmt)
            return '"' + "a" * int(schema.get("minLength", 0) or 0) + '"'
        if types == "array":
            frame = _Frame("array", schema)
            return "[" + self._close_array(frame, depth + 1)
        frame = _Frame("object", schema)
        return "{" + self._close_object(frame, depth + 1)

    @staticmethod
    def _number(schema: dict, kind: str) -> str:
        lo, hi = schema.get("minimum"), schema.get("maximum")
        xlo, xhi = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
        value = 0
        if isinstance(lo, (int, float)) and value < lo:
            value = lo
        if isinstance(xlo, (int, float)) and not isinstance(xlo, bool) and value <= xlo:
            value = xlo + 1
        if isinstance(hi, (int, float)) and value > hi:
            value = hi
        if isinstance(xhi, (int, float)) and not isinstance(xhi, bool) and value >= xhi:
            value = xhi - 1
        step = schema.get("multipleOf")
        if isinstance(step, (int, float)) and step > 0 and value % step:
            import math

            value = math.ceil(value / step) * step
        if kind == "integer" or float(value).is_integer():
            return str(int(value))
        return repr(float(value))

    @staticmethod
    def _missing_required(frame: _Frame) -> list[str]:
        """The required keys not written yet, in the order the grammar takes them (llguidance enforces the order of
        ``properties``, then other keys)."""
        props = frame.schema.get("properties") if isinstance(frame.schema.get("properties"), dict) else {}
        required = [k for k in frame.schema.get("required", []) if isinstance(k, str)]
        ordered = [k for k in props if k in required] + [k for k in required if k not in props]
        return [k for k in ordered if k not in frame.keys]

    def _close_object(self, frame: _Frame, depth: int = 0) -> str:
        """Missing required keys and ``}`` for an object after a complete member (or ``{``)."""
        required = self._missing_required(frame)
        out = []
        n = len(frame.keys)
        for key in required:
            out.append((self.item_sep if n else "") + json.dumps(key, ensure_ascii=False) + self.key_sep
                       + self.minimal(self.child(frame, key), depth + 1))
            n += 1
        return "".join(out) + "}"

    def _close_array(self, frame: _Frame, depth: int = 0) -> str:
        """Missing ``minItems`` and ``]`` for an array after a complete item (or ``[``)."""
        prefix = frame.schema.get("prefixItems") if isinstance(frame.schema.get("prefixItems"), list) else []
        need = max(int(frame.schema.get("minItems", 0) or 0), len(prefix) if frame.schema.get("items") is False
                   else 0)
        out = []
        probe = _Frame("array", frame.schema)
        probe.count = frame.count
        while probe.count < need:
            out.append((self.item_sep if probe.count else "") + self.minimal(self.child(probe), depth + 1))
            probe.count += 1
        return "".join(out) + "]"

    # -------------------------------------------------------------------------------------------- the document
    def complete(self, text: str) -> str | None:
        """The text to append to the partial document ``text``; ``None`` when it cannot be scanned."""
        stack: list[_Frame] = []
        top_done = False
        scalar: list | None = None  # [kind, chars, is_key, escaped]
        sep_tail = ""  # separator characters written since the last ',' or ':'
        root = self.resolve(self.root)

        def value_done():
            nonlocal top_done
            if not stack:
                top_done = True
                return
            f = stack[-1]
            if f.kind == "object":
                f.keys.append(f.key)
                f.key = None
            else:
                f.count += 1
            f.phase = "after"

        def current_schema():
            if not stack:
                return root
            f = stack[-1]
            return self.child(f, f.key) if f.kind == "object" else self.child(f)

        i = 0
        while i < len(text):
            c = text[i]
            if scalar is not None:
                kind = scalar[0]
                if kind == "string":
                    if scalar[3]:
                        scalar[3] = False
                        scalar[1] += c
                    elif c == "\\":
                        scalar[3] = True
                    elif c == '"':
                        if scalar[2]:
                            stack[-1].key = scalar[1]
                            stack[-1].phase = "colon"
                        else:
                            value_done()
                        scalar = None
                    else:
                        scalar[1] += c
                    i += 1
                    continue
                if (kind == "number" and c in "0123456789+-.eE") or (kind == "literal" and c.isalpha()):
                    scalar[1] += c
                    i += 1
                    continue
                scalar = None
                value_done()
                continue  # the character is structural: read it again
            if c in " \t\n\r":
                sep_tail += c
                i += 1
                continue
            if top_done:
                return None
            f = stack[-1] if stack else None
            expecting_value = f is None or f.phase == "value" or (f.kind == "array" and f.phase == "first")
            if f is not None and f.kind == "array" and f.phase == "first" and c == "]":
                stack.pop()
                value_done()
            elif f is not None and f.kind == "object" and f.phase in ("first", "after") and c == "}":
                stack.pop()
                value_done()
            elif f is not None and f.kind == "array" and f.phase == "after" and c == "]":
                stack.pop()
                value_done()
            elif f is not None and f.phase == "after" and c == ",":
                f.phase = "key" if f.kind == "object" else "value"
                sep_tail = ""
            elif f is not None and f.kind == "object" and f.phase == "colon" and c == ":":
                f.phase = "value"
                sep_tail = ""
            elif f is not None and f.kind == "object" and f.phase in ("first", "key") and c == '"':
                scalar = ["string", "", True, False]
            elif expecting_value:
                schema = current_schema()
                if c == "{":
                    stack.append(_Frame("object", schema))
                elif c == "[":
                    stack.append(_Frame("array", schema))
                elif c == '"':
                    scalar = ["string", "", False, False]
                elif c in "-0123456789":
                    scalar = ["number", c, False, False]
                elif c.isalpha():
                    scalar = ["literal", c, False, False]
                else:
                    return None
                if c in "{[":
                    sep_tail = ""
            else:
                return None
            i += 1
        return self._finish(stack, scalar, top_done, sep_tail, root)

    @staticmethod
    def _finish_number(schema: dict, chars: str) -> str:
        """The shortest digits that end the number begun with ``chars`` within the schema's bounds (else ``0``)."""
        lo, hi = schema.get("minimum"), schema.get("maximum")
        xlo, xhi = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
        step = schema.get("multipleOf")

        def ok(text: str) -> bool:
            if not _JSON_NUMBER.fullmatch(text):
                return False
            value = float(text)
            if schema.get("type") == "integer" and any(c in text for c in ".eE"):
                return False
            num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
            return ((not num(lo) or value >= lo) and (not num(hi) or value <= hi)
                    and (not num(xlo) or value > xlo) and (not num(xhi) or value < xhi)
                    and (not num(step) or step <= 0 or abs(value / step - round(value / step)) < 1e-9))

        suffixes = ["", "0", "1", "2", "5", "9", "00", "0.5", "000", "0000"] + [str(d) * n for n in (2, 3, 4)
                                                                                 for d in range(1, 10)]
        return next((x for x in suffixes if ok(chars + x)), "0" if chars[-1] in "+-.eE" else "")

    def _finish_string(self, schema: dict, chars: str) -> str:
        """The rest of a string value begun with ``chars``: an ``enum``/``const``/known ``format`` value it starts,
        else padding to ``minLength``, then the closing quote."""
        options = []
        if "const" in schema:
            options = [schema["const"]]
        elif isinstance(schema.get("enum"), list):
            options = schema["enum"]
        elif schema.get("format") in self.FORMATS:
            options = [self.FORMATS[schema["format"]]]
        for value in options:
            if isinstance(value, str) and value.startswith(chars):
                return json.dumps(value, ensure_ascii=False)[1 + len(chars):]
        short = int(schema.get("minLength", 0) or 0) - len(chars)
        return "a" * max(0, short) + '"'

    def _finish(self, stack, scalar, top_done, sep_tail, root) -> str | None:
        if top_done and scalar is None:
            return ""
        out = []

        def sep_rest(sep: str) -> str:
            stripped = sep.lstrip(",:")
            return stripped[len(sep_tail):] if stripped.startswith(sep_tail) else ""

        f = stack[-1] if stack else None
        if scalar is not None:
            kind, chars, is_key = scalar[0], scalar[1], scalar[2]
            if kind == "string":
                if is_key:
                    props = f.schema.get("properties") if isinstance(f.schema.get("properties"), dict) else {}
                    names = self._missing_required(f) + [k for k in props if k not in f.keys]
                    key = next((k for k in names if k.startswith(chars)), chars)
                    out.append(json.dumps(key, ensure_ascii=False)[1 + len(chars):]
                               + self.key_sep + self.minimal(self.child(f, key)))
                    f.keys.append(key)
                    f.phase = "after"
                else:
                    schema = (self.child(f, f.key) if f is not None and f.kind == "object"
                              else self.child(f) if f is not None else root)
                    out.append(self._finish_string(schema, chars))
            elif kind == "number":
                schema = (self.child(f, f.key) if f is not None and f.kind == "object"
                          else self.child(f) if f is not None else root)
                out.append(self._finish_number(schema, chars))
            else:
                word = next((w for w in ("true", "false", "null") if w.startswith(chars)), None)
                if word is None:
                    return None
                out.append(word[len(chars):])
            if kind != "string" or not is_key:
                if f is None:
                    return "".join(out)
                if f.kind == "object":
                    f.keys.append(f.key)
                else:
                    f.count += 1
                f.phase = "after"
        elif f is None:
            return self.minimal(root)
        elif f.phase == "colon":
            out.append(self.key_sep + self.minimal(self.child(f, f.key)))
            f.keys.append(f.key)
            f.phase = "after"
        elif f.phase == "value":
            out.append(sep_rest(self.key_sep if f.kind == "object" else self.item_sep)
                       + self.minimal(self.child(f, f.key) if f.kind == "object" else self.child(f)))
            if f.kind == "object":
                f.keys.append(f.key)
            else:
                f.count += 1
            f.phase = "after"
        elif f.phase == "key":
            props = f.schema.get("properties") if isinstance(f.schema.get("properties"), dict) else {}
            key = (self._missing_required(f) + [k for k in props if k not in f.keys] + ["a"])[0]
            out.append(sep_rest(self.item_sep) + json.dumps(key, ensure_ascii=False) + self.key_sep
                       + self.minimal(self.child(f, key)))
            f.keys.append(key)
            f.phase = "after"
        while stack:
            f = stack.pop()
            out.append(self._close_object(f) if f.kind == "object" else self._close_array(f))
            if stack:
                g = stack[-1]
                if g.kind == "object":
                    g.keys.append(g.key)
                else:
                    g.count += 1
                g.phase = "after"
        return "".join(out)




def json_completer_for(grammar) -> JsonCompleter | None:
    """The :class:`JsonCompleter` of a JSON-schema :class:`~hf_decoding_ext.structured.grammar.Grammar` (its schema
    and separators, read from the compiled definition), ``None`` for other grammars."""
    if getattr(grammar, "kind", None) != "json_schema":
        return None
    try:
        schema = json.loads(grammar.llg)["grammars"][0]["json_schema"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    options = schema.get("x-guidance", {}) if isinstance(schema, dict) else {}
    return JsonCompleter(schema, options.get("item_separator", ", "), options.get("key_separator", ": "))


class CompletionFinder:
    """Find a token sequence that completes the grammar from a matcher state.

    Args:
        compiled: the :class:`~hf_decoding_ext.structured.grammar.CompiledGrammar`.
        tokenizer: its tokenizer (for the closing-token list).
        max_length: the longest completion searched for.
        json: a :class:`JsonCompleter` for JSON-schema grammars: its text, tokenised and checked on a matcher copy,
            is tried first (it knows required keys and ``minItems``, which the token search does not).

    ``find(matcher, limit, prefix)`` works on a copy; it returns the completion's tokens (without eos; ``[]`` when
    the state already accepts), or ``None`` when none of at most ``limit`` tokens was found. ``prefix``: the tokens
    generated so far (the matcher's state), for the JSON completer.
    """

    def __init__(self, compiled, tokenizer, max_length: int = 512, json: JsonCompleter | None = None):
        self.compiled = compiled
        self.tokenizer = tokenizer
        self.json = json
        self.json_hits = 0
        self.eos = set(compiled.eos_token_ids)
        self.candidates = [t for t in closing_token_ids(tokenizer) if t not in self.eos]
        self.max_length = int(max_length)
        self.searches = 0
        self.deferred = None  # DeferredRows of a grammar with keywords checked on completion (set by the processor)

    def _fallback(self, m, st=None) -> int | None:
        from hf_decoding_ext.structured.grammar import bitmask_to_bool

        bits = torch.frombuffer(bytearray(m.compute_bitmask()), dtype=torch.int32)[None]
        allowed = bitmask_to_bool(bits, self.compiled.vocab_size)[0]
        for e in self.eos:
            if e < allowed.numel():
                allowed[e] = False
        for t in allowed.nonzero().flatten().tolist():
            if st is None or self._passes(st, t):
                return int(t)
        return None

    def _passes(self, st, token: int) -> bool:
        return self.deferred.allows(st, int(token))

    def _feed(self, st, tokens):
        if st is None:
            return None
        return self.deferred.checker.feed(st, b"".join(self.deferred.token_bytes(int(t)) for t in tokens))

    def _finishes(self, st) -> bool:
        return st is None or self.deferred.checker.finish(st).failed is None

    def _from_json(self, matcher, limit: int, prefix) -> list[int] | None:
        if matcher.is_accepting() or matcher.is_stopped():
            return []
        text = self.json.complete(self.tokenizer.decode(list(prefix)))
        if text is None:
            return None
        ids = self.tokenizer(text, add_special_tokens=False).input_ids if text else []
        if len(ids) > limit:
            return None
        m = matcher.deep_copy()
        if m.try_consume_tokens(ids) != len(ids) or not (m.is_accepting() or m.is_stopped()):
            return None
        if self.deferred is not None:  # the completion must also pass the keywords checked on completion
            st = self._feed(self.deferred.state_for(prefix), ids)
            if st.failed is not None or not self._finishes(st):
                return None
        return [int(t) for t in ids]

    def find(self, matcher, limit: int | None = None, prefix=None) -> list[int] | None:
        self.searches += 1
        limit = self.max_length if limit is None else min(int(limit), self.max_length)
        if limit < 0:
            return None
        if self.json is not None and prefix is not None:
            path = self._from_json(matcher, limit, prefix)
            if path is not None:
                self.json_hits += 1
                return path
        m = matcher.deep_copy()
        path: list[int] = []
        st = self.deferred.state_for(prefix) if self.deferred is not None and prefix is not None else None
        while True:
            if m.is_error() or (st is not None and st.failed is not None):
                return None
            if (m.is_accepting() or m.is_stopped()) and self._finishes(st):
                return path
            if len(path) >= limit or m.is_stopped():
                return None
            forced = [t for t in m.compute_ff_tokens() if t not in self.eos]
            if forced:
                step = forced[: limit - len(path)]
                if m.try_consume_tokens(step) != len(step):
                    return None
                path += step
                st = self._feed(st, step)
                continue
            allowed = [t for t in self.candidates if m.validate_tokens([t]) == 1
                       and (st is None or self._passes(st, t))]
            token = None
            for t in allowed:  # one token that completes the grammar, if any
                if m.consume_token(t):
                    done = (m.is_accepting() or m.is_stopped()) and self._finishes(self._feed(st, [t]))
                    m.rollback(1)
                    if done:
                        token = t
                        break
            if token is None and allowed:
                token = allowed[0]
            if token is None:
                token = self._fallback(m, st)
                if token is None:
                    return None
            if not m.consume_token(token):
                return None
            path.append(token)
            st = self._feed(st, [token])


class BudgetGuard:
    """Per-prefix completion bookkeeping and the budget mask (see the module docstring).

    Args:
        finder: a :class:`CompletionFinder`.
        max_new_tokens: the token budget of the output (the ``max_new_tokens`` of ``generate()``).
        verify_top_k: how many of the highest-scored allowed tokens are checked at each step.
        slack: the tight zone starts when the known completion plus ``slack`` no longer fits in what is left.
        cache_size: completions remembered per generated prefix.
    """

    def __init__(self, finder: CompletionFinder, max_new_tokens: int, verify_top_k: int = 4, slack: int = 4,
                 cache_size: int = 4096):
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if isinstance(verify_top_k, bool) or not isinstance(verify_top_k, int) or verify_top_k < 0:
            raise ValueError(f"verify_top_k must be an integer >= 0, got {verify_top_k!r}")
        if isinstance(slack, bool) or not isinstance(slack, int) or slack < 0:
            raise ValueError(f"slack must be an integer >= 0, got {slack!r}")
        self.finder = finder
        self.max_new_tokens = max_new_tokens
        self.verify_top_k = verify_top_k
        self.slack = slack
        self.cache_size = cache_size
        self._paths: OrderedDict[tuple, list[int] | None] = OrderedDict()
        self.tight_steps = 0
        self.steps = 0
        self.unreachable = 0

    def reset(self) -> None:
        self._paths.clear()
        self.tight_steps = self.steps = self.unreachable = 0

    def _store(self, key: tuple, path: list[int] | None) -> None:
        self._paths[key] = path
        self._paths.move_to_end(key)
        while len(self._paths) > self.cache_size:
            self._paths.popitem(last=False)

    def completion(self, matcher, generated: Sequence[int]) -> list[int] | None:
        """A known completion after ``generated`` (the matcher is in that state)."""
        key = tuple(generated)
        if key in self._paths:
            return self._paths[key]
        parent = self._paths.get(key[:-1]) if key else None
        if parent and parent[0] == key[-1]:
            path = parent[1:]
        else:
            path = self.finder.find(matcher, self.max_new_tokens, key)
        self._store(key, path)
        return path

    def restrict(self, matcher, generated: Sequence[int], allowed: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """The row's ``allowed`` mask ``(vocab,)`` restricted so that a completion keeps fitting in the budget."""
        left = self.max_new_tokens - len(generated)  # tokens still to be generated, this one included
        if left <= 0 or matcher.is_stopped():
            return allowed
        self.steps += 1
        eos = [e for e in self.finder.eos if e < allowed.numel()]
        known = self.completion(matcher, generated)
        tight = known is None or len(known) + self.slack >= left
        order = torch.where(allowed, scores, torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device))
        k = min(self.verify_top_k, int(allowed.sum()))
        top = torch.topk(order, k).indices.tolist() if k else []
        verified, refused = [], []
        key = tuple(generated)
        for t in top:
            if t in self.finder.eos:
                verified.append(t)
                continue
            child = key + (t,)
            if child in self._paths:
                path = self._paths[child]
            else:
                probe = matcher.deep_copy()
                path = self.finder.find(probe, None, child) if probe.consume_token(t) else None
                self._store(child, path)
            if path is not None and 1 + len(path) <= left:
                verified.append(t)
            elif path is not None:  # a completion exists but no longer fits
                refused.append(t)
        if not tight:  # tokens whose completion no longer fits are removed; unknown ones stay
            out = allowed.clone()
            out[refused] = False
            return out if out.any() else allowed
        self.tight_steps += 1
        out = torch.zeros_like(allowed)
        out[verified] = True
        if known is not None and len(known) <= left and known:
            out[known[0]] = True
        if (matcher.is_accepting() or known == []) and eos:
            out[eos] = allowed[eos]
        out &= allowed
        if not out.any():  # no completion fits any more (an unverified token earlier): keep the grammar mask
            self.unreachable += 1
            return allowed
        return out


__all__ = ["CLOSING_TEXTS", "closing_token_ids", "JsonCompleter", "json_completer_for", "CompletionFinder", "BudgetGuard"]
