"""Schema rewrites that widen what the grammar engine accepts without admitting an invalid document (issue 17).

llguidance refuses some JSON schemas that the JSON Schema specification lets us compile exactly:

* ``format`` values it does not know: under Draft 2020-12 ``format`` is an annotation unless a vocabulary asserts it,
  so an unknown format constrains nothing. :func:`relax_schema` drops the unknown ones (``unknown_formats="string"``)
  and reports them; the output is then any string of the other constraints.
* ``not`` in two forms with an exact equivalent: ``{"not": {}}`` matches nothing (``false``), and
  ``{"not": {"required": [k]}}`` is "an object without ``k``" (``exact_not=True``, the default).
* ``oneOf`` whose branches cannot both match: then ``oneOf`` is ``anyOf``. llguidance proves disjointness by type and
  by object discriminators; this adds branches whose ``const``/``enum`` value sets are disjoint and branches whose
  sets of allowed JSON types are disjoint (``one_of="disjoint"``). Branches that may overlap keep ``oneOf`` (the engine
  then refuses the schema, or approximates it only with its own ``coerce_one_of`` option, which this library does not
  set).

The ``oneOf`` rewrite never admits a document the schema rejects and is on by default in
:func:`~hf_decoding_ext.structured.grammar.json_schema` (``one_of="error"`` keeps the engine's refusal). The format
rewrite is exact under Draft 2020-12 but not for validators that assert formats (JSONSchemaBench's does: 3 MaskBench
instances with an invalid ``regex`` or ``iri`` value are then admitted), so it is opt-in:
``json_schema(..., unknown_formats="string")``.
"""

from __future__ import annotations

import json
from functools import lru_cache

_CHILD_KEYS = ("items", "additionalProperties", "not", "contains", "propertyNames", "unevaluatedItems",
               "unevaluatedProperties", "if", "then", "else")
_CHILD_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_CHILD_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
_JSON_TYPES = {"null", "boolean", "object", "array", "number", "string", "integer"}


def transform_schema(schema, visit):
    """A copy of ``schema`` rebuilt bottom-up: every subschema (under ``items``, ``properties``, ``$defs``,
    ``anyOf``, ...) is copied and its children transformed first, then ``visit(node, path)`` returns the node to keep
    (``path`` is its JSON pointer, ``""`` for the root). The caller's schema is not modified. Schemas nested deeper
    than :data:`~hf_decoding_ext.structured.grammar.MAX_SCHEMA_DEPTH` are a ``ValueError``."""
    from hf_decoding_ext.structured.grammar import _check_depth

    _check_depth(schema)

    def walk(node, path: str):
        if isinstance(node, list):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(node)]
        if not isinstance(node, dict):
            return node
        out = dict(node)
        for key in _CHILD_KEYS:
            if isinstance(out.get(key), (dict, list)):
                out[key] = walk(out[key], f"{path}/{key}")
        for key in _CHILD_MAPS:
            if isinstance(out.get(key), dict):
                out[key] = {k: walk(v, f"{path}/{key}/{k}") for k, v in out[key].items()}
        for key in _CHILD_LISTS:
            if isinstance(out.get(key), list):
                out[key] = [walk(v, f"{path}/{key}/{i}") for i, v in enumerate(out[key])]
        return visit(out, path)

    return walk(schema, "")


@lru_cache(maxsize=256)
def engine_knows_format(name: str) -> bool:
    """Whether llguidance compiles ``{"type": "string", "format": name}`` (probed once per name)."""
    import llguidance

    grammar = llguidance.LLMatcher.grammar_from_json_schema({"type": "string", "format": name})
    is_error, _ = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    return not is_error


def _types_of(schema) -> set[str] | None:
    """The JSON types a (local, reference-free) schema can match, or ``None`` when unknown."""
    if not isinstance(schema, dict) or "$ref" in schema or any(k in schema for k in ("anyOf", "oneOf", "allOf", "not")):
        return None
    if "const" in schema:
        return {_type_of_value(schema["const"])}
    if isinstance(schema.get("enum"), list):
        return {_type_of_value(v) for v in schema["enum"]}
    t = schema.get("type")
    if isinstance(t, str):
        types = {t}
    elif isinstance(t, list) and all(isinstance(x, str) for x in t):
        types = set(t)
    else:
        return None
    if "number" in types:
        types.add("integer")
    return types & _JSON_TYPES


def _type_of_value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "integer" if value.is_integer() else "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _values_of(schema) -> list | None:
    """The values a schema allows when it lists them (``const`` / ``enum``), else ``None``."""
    if not isinstance(schema, dict) or "$ref" in schema:
        return None
    if "const" in schema:
        return [schema["const"]]
    if isinstance(schema.get("enum"), list):
        return list(schema["enum"])
    return None


def _canonical(value) -> str:
    # JSON Schema equality: 1 and 1.0 are equal, key order does not matter
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return json.dumps(value, sort_keys=True)


def branches_disjoint(a, b) -> bool:
    """``True`` only when no JSON value can match both branches (by types, or by listed values)."""
    ta, tb = _types_of(a), _types_of(b)
    if ta is not None and tb is not None and not (ta & tb):
        return True
    va, vb = _values_of(a), _values_of(b)
    if va is not None and vb is not None:
        return not ({_canonical(v) for v in va} & {_canonical(v) for v in vb})
    return False


_ANNOTATIONS = {"title", "description", "$comment", "examples", "default", "deprecated", "readOnly", "writeOnly"}


def _only(node: dict, keys: set[str]) -> bool:
    return set(node) - _ANNOTATIONS <= keys


def _exact_not(out: dict, notes: list[str], path: str):
    """Rewrite the ``not`` forms that have an exact maskable equivalent; return the node (``False`` for a node that
    matches nothing)."""
    sub = out.get("not")
    if sub is True or (isinstance(sub, dict) and _only(sub, set())):
        notes.append(f"{path or '/'}: not {{}} (matches nothing) compiled as false")
        return False
    if (isinstance(sub, dict) and _only(sub, {"required"}) and isinstance(sub.get("required"), list)
            and len(sub["required"]) == 1 and isinstance(sub["required"][0], str)):
        key = sub["required"][0]
        del out["not"]
        out["allOf"] = list(out.get("allOf", [])) + [{"type": "object", "properties": {key: False}}]
        notes.append(f"{path or '/'}: not {{required: [{key!r}]}} compiled as an object without {key!r}")
    return out


def relax_schema(schema, unknown_formats: str = "error", one_of: str = "disjoint",
                 exact_not: bool = True) -> tuple[dict, list[str]]:
    """A copy of ``schema`` with the rewrites of this module; returns ``(schema, notes)``, one note per rewrite.

    Args:
        unknown_formats: ``"string"`` drops ``format`` values the engine does not know (annotations under Draft
            2020-12); ``"error"`` keeps them (the engine refuses the schema).
        one_of: ``"disjoint"`` turns a ``oneOf`` whose branches are pairwise disjoint into ``anyOf``; ``"error"``
            leaves every ``oneOf`` to the engine.
        exact_not: rewrite the forms of ``not`` that have an exact maskable equivalent: ``{"not": {}}`` (matches
            nothing) becomes ``false``; ``{"not": {"required": [k]}}`` becomes ``{"type": "object", "properties":
            {k: false}}`` (added to ``allOf``).
    """
    if unknown_formats not in ("string", "error"):
        raise ValueError(f"unknown_formats must be 'string' or 'error', got {unknown_formats!r}")
    if one_of not in ("disjoint", "error"):
        raise ValueError(f"one_of must be 'disjoint' or 'error', got {one_of!r}")
    notes: list[str] = []

    def visit(out: dict, path: str):
        if exact_not and "not" in out:
            out = _exact_not(out, notes, path)
            if out is False:
                return out
        fmt = out.get("format")
        if unknown_formats == "string" and isinstance(fmt, str) and not engine_knows_format(fmt):
            del out["format"]
            notes.append(f"{path or '/'}: format {fmt!r} is not known to the engine; treated as an annotation "
                         "(any string)")
        branches = out.get("oneOf")
        if (one_of == "disjoint" and isinstance(branches, list) and "anyOf" not in out and len(branches) > 1
                and all(branches_disjoint(branches[i], branches[j])
                        for i in range(len(branches)) for j in range(i + 1, len(branches)))):
            out["anyOf"] = out.pop("oneOf")
            notes.append(f"{path or '/'}: oneOf with disjoint branches compiled as anyOf")
        return out

    return transform_schema(schema, visit), notes


__all__ = ["transform_schema", "relax_schema", "branches_disjoint", "engine_knows_format"]
