"""The closed information extraction task of sketch-guided constrained decoding (``data/sketch_cie.jsonl``).

A toy set written for this library (Geng et al., arXiv 2401.09967, evaluate SGCD on closed IE): sentences with gold
``(subject, relation, object)`` triplets over a fixed inventory of entities and relations, and hand-written sketches
imitating a larger LLM's loose answer. Here: the loader (:func:`load_sketch_cie`), the grammar of valid outputs in the
paper's markup (:func:`triplet_grammar`), formatting and parsing (:func:`format_triplets`, :func:`parse_triplets`,
:func:`parse_sketch_triplets`) and micro F1 (:func:`triplet_f1`); the method is
:class:`hf_decoding_ext.structured.sketch_guided.SketchGuidedDecoding`.

Example:
    >>> from hf_decoding_ext.bench.tasks.sketch_cie import format_triplets, parse_triplets, triplet_f1
    >>> text = format_triplets([["Ottawa", "capital of", "Canada"]])
    >>> text
    '[s] Ottawa [r] capital of [o] Canada [e]'
    >>> triplet_f1([parse_triplets(text)], [[("Ottawa", "capital of", "Canada")]])["f1"]
    1.0
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from hf_decoding_ext.core.resources import read_jsonl
from hf_decoding_ext.structured.grammar import Grammar, lark

_TRIPLET = re.compile(r"\[s\] (.+?) \[r\] (.+?) \[o\] (.+?) \[e\]")
_SKETCH_TRIPLET = re.compile(r"\(\s*([^,()\n]+?)\s*,\s*([^,()\n]+?)\s*,\s*([^()\n]+?)\s*\)")


def _lark_literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def triplet_grammar(entities: Sequence[str], relations: Sequence[str], max_triplets: int = 4) -> Grammar:
    """Lark grammar of closed information extraction outputs over a fixed inventory, in the paper's markup:
    ``[s] subject [r] relation [o] object [e]``, one to ``max_triplets`` triplets separated by spaces, subjects and
    objects from ``entities``, relations from ``relations``."""
    if not entities or not relations:
        raise ValueError("triplet_grammar needs non-empty entity and relation inventories")
    if not isinstance(max_triplets, int) or max_triplets < 1:
        raise ValueError(f"max_triplets must be an integer >= 1, got {max_triplets!r}")
    for name in (*entities, *relations):
        if not isinstance(name, str) or not name.strip() or "[" in name or "\n" in name:
            raise ValueError(f"inventory names must be non-empty one-line strings without '[': {name!r}")
    ent = " | ".join(_lark_literal(e) for e in dict.fromkeys(entities))
    rel = " | ".join(_lark_literal(r) for r in dict.fromkeys(relations))
    more = f'(" " triplet){{0,{max_triplets - 1}}}' if max_triplets > 1 else ""
    return lark(f"start: triplet {more}\n"
                'triplet: "[s] " entity " [r] " relation " [o] " entity " [e]"\n'
                f"entity: {ent}\nrelation: {rel}\n")


def format_triplets(triplets: Sequence[Sequence[str]]) -> str:
    """``[s] s [r] r [o] o [e] [s] ...``: the output format of :func:`triplet_grammar`."""
    return " ".join(f"[s] {s} [r] {r} [o] {o} [e]" for s, r, o in triplets)


def parse_triplets(text: str) -> list[tuple[str, str, str]]:
    """The triplets of a ``[s] .. [r] .. [o] .. [e]`` string."""
    return [tuple(m) for m in _TRIPLET.findall(text)]


def parse_sketch_triplets(text: str) -> list[tuple[str, str, str]]:
    """Naive reading of a free-text sketch: every ``(subject, relation, object)`` in it, names taken as written
    (the sketch does not know the inventory, so most names do not match it)."""
    return [tuple(m) for m in _SKETCH_TRIPLET.findall(text)]


def triplet_f1(predicted: Sequence[Sequence[Sequence[str]]], gold: Sequence[Sequence[Sequence[str]]]
               ) -> dict[str, float]:
    """Micro precision / recall / F1 of exact-match triplet sets (one list of triplets per example)."""
    if len(predicted) != len(gold):
        raise ValueError(f"{len(predicted)} predictions for {len(gold)} gold examples")
    tp = n_pred = n_gold = 0
    for p, g in zip(predicted, gold):
        ps, gs = {tuple(t) for t in p}, {tuple(t) for t in g}
        tp += len(ps & gs)
        n_pred += len(ps)
        n_gold += len(gs)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def load_sketch_cie() -> dict[str, Any]:
    """The shipped closed-IE toy set (``data/sketch_cie.jsonl``, written for this library, sketches hand-written to
    imitate a larger LLM's loose answer): ``{"relations", "entities", "demos", "tests"}``; demos and tests are dicts
    with ``text``, ``sketch`` and ``triplets`` (gold ``[subject, relation, object]`` lists)."""
    out: dict[str, Any] = {"relations": [], "entities": [], "demos": [], "tests": []}
    for row in read_jsonl("sketch_cie.jsonl"):
        if row["kind"] == "inventory":
            out["relations"], out["entities"] = row["relations"], row["entities"]
        else:
            out[row["kind"] + "s"].append(row)
    return out
