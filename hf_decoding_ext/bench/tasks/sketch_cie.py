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
from collections.abc import Sequence
from typing import Any

from hf_decoding_ext.core.resources import read_jsonl
from hf_decoding_ext.structured.grammar import Grammar, lark



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
    """The triplets of a ``[s] .. [r] .. [o] .. [e]`` string: what ``re.findall(r"\\[s\\] (.+?) \\[r\\] (.+?)
    \\[o\\] (.+?) \\[e\\]", text)`` returns, found by a linear scan (that expression backtracks quadratically on long
    model text with markers but no end)."""
    out = []
    for line in text.split("\n"):  # "." never crosses a newline
        pos = 0
        while True:
            i = line.find("[s] ", pos)
            j = line.find(" [r] ", i + 5) if i >= 0 else -1
            k = line.find(" [o] ", j + 6) if j >= 0 else -1
            e = line.find(" [e]", k + 6) if k >= 0 else -1
            if e < 0:  # a later start on this line would need the same markers further on
                break
            out.append((line[i + 4:j], line[j + 5:k], line[k + 5:e]))
            pos = e + 4
    return out


_SPACE = " \t\n\r\f\v"


def parse_sketch_triplets(text: str) -> list[tuple[str, str, str]]:
    """Naive reading of a free-text sketch: every ``(subject, relation, object)`` in it, names taken as written
    (the sketch does not know the inventory, so most names do not match it). Subject and relation hold no comma;
    nothing holds a parenthesis or a newline; names are stripped of white space. A linear scan (the regular
    expression it replaces backtracked polynomially on long runs of spaces)."""
    out = []
    pos = 0
    while True:
        a = text.find("(", pos)
        if a < 0:
            return out
        pos = a + 1
        ends = [x for x in (text.find(")", a + 1), text.find("(", a + 1), text.find("\n", a + 1)) if x >= 0]
        b = min(ends) if ends else -1
        if b < 0 or text[b] != ")":
            continue
        parts = text[a + 1:b].split(",", 2)
        if len(parts) != 3:
            continue
        names = tuple(p.strip(_SPACE) for p in parts)
        if all(names):
            out.append(names)
            pos = b + 1


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
