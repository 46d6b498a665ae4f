"""Budget-aware structured generation (issue 17, part 1): completions that close a partial document, and the
processor's guarantee that a greedy row ends with a complete document within ``max_new_tokens``."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from hf_decoding_ext.structured.completion import BudgetGuard, CompletionFinder, JsonCompleter, json_completer_for
from hf_decoding_ext.structured.grammar import compile_grammar, json_schema, regex
from hf_decoding_ext.structured.json_schema import (GrammarConstrainedLogitsProcessor, JsonSchemaLogitsProcessor,
                                                    cap_open_lengths)

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 3},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2},
        "address": {"$ref": "#/$defs/address"},
        "kind": {"enum": ["alpha", "beta"]},
        "n": {"type": "integer", "minimum": 10},
        "score": {"type": "number", "exclusiveMaximum": -1},
        "ok": {"type": "boolean"},
        "when": {"type": "string", "format": "date"},
    },
    "required": ["name", "tags", "address", "kind", "n", "score", "ok", "when"],
    "$defs": {"address": {"type": "object", "properties": {"city": {"type": "string"},
                                                           "lines": {"type": "array", "items": {"type": "string"}}},
                          "required": ["city", "lines"]}},
}
INSTANCE = {"name": "Bob \u00e9 the builder", "tags": ["x", "y z", "w"], "address": {"city": "Paris", "lines": []},
            "kind": "alpha", "n": 12, "score": -2.5, "ok": False, "when": "2024-05-06"}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from hf_decoding_ext.core.models import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path())


def test_json_completer_closes_every_prefix_of_a_document_validly():
    text = json.dumps(INSTANCE, ensure_ascii=False)
    completer = JsonCompleter(SCHEMA)
    validator = jsonschema.Draft202012Validator(SCHEMA)
    for cut in range(len(text) + 1):
        rest = completer.complete(text[:cut])
        assert rest is not None, text[:cut]
        doc = json.loads(text[:cut] + rest)
        assert not list(validator.iter_errors(doc)), (text[:cut], rest)
    assert completer.complete(text) == ""
    assert completer.complete(text + "}") is None  # not a prefix of a document


def test_json_completer_minimal_values_follow_the_schema():
    c = JsonCompleter(SCHEMA)
    doc = json.loads(c.complete(""))
    jsonschema.validate(doc, SCHEMA)
    assert doc["name"] == "aaa" and doc["tags"] == ["", ""] and doc["n"] == 10 and doc["score"] == -2
    assert c.minimal({"type": "array", "prefixItems": [{"const": 1}], "items": False}) == "[1]"
    assert c.minimal({"anyOf": [{"type": "null"}, {"type": "string"}]}) == "null"
    assert c.minimal({"type": "number", "multipleOf": 7, "minimum": 8}) == "14"


def test_finder_completion_brings_the_matcher_to_accepting(tokenizer):
    compiled = compile_grammar(tokenizer, json_schema(SCHEMA), (tokenizer.eos_token_id,), len(tokenizer))
    finder = CompletionFinder(compiled, tokenizer, json=json_completer_for(compiled.grammar))
    text = json.dumps(INSTANCE, ensure_ascii=False)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    for cut in range(0, len(ids), 3):
        m = compiled.matcher()
        assert m.try_consume_tokens(ids[:cut]) == cut
        path = finder.find(m, None, ids[:cut])
        assert path is not None and m.try_consume_tokens(path) == len(path) and m.is_accepting()
        jsonschema.validate(json.loads(tokenizer.decode(ids[:cut] + path)), SCHEMA)
    # the generic token search (no JSON completer) on a regular expression
    date = compile_grammar(tokenizer, regex(r"[0-9]{4}-[0-9]{2}-[0-9]{2}"), (tokenizer.eos_token_id,), len(tokenizer))
    m = date.matcher()
    path = CompletionFinder(date, tokenizer).find(m)
    assert path is not None and m.try_consume_tokens(path) == len(path) and m.is_accepting()
    assert CompletionFinder(date, tokenizer).find(date.matcher(), limit=1) is None  # needs more than one token


def _greedy(proc, tokenizer, scores, budget, prompt=(1, 2, 3), sequences=None):
    """Plain greedy decoding driven by ``scores``: a ``(vocab,)`` tensor (a model that always prefers the same
    tokens) or a function of the generated ids returning one."""
    ids = torch.tensor([list(prompt)])
    for _ in range(budget):
        row = scores(ids[0, len(prompt):].tolist()) if callable(scores) else scores
        s = proc(ids, row.clone()[None])
        t = int(s.argmax(-1))
        ids = torch.cat([ids, torch.tensor([[t]])], dim=1)
        if t == tokenizer.eos_token_id:
            break
    if sequences is not None:
        sequences.append(ids)
    out = ids[0, len(prompt):].tolist()
    return tokenizer.decode([t for t in out if t != tokenizer.eos_token_id])


def _scripted(tokenizer, text, then=" the"):
    """A model that writes ``text`` token by token, then ``then`` forever (where the grammar allows them)."""
    script = tokenizer(text, add_special_tokens=False).input_ids
    loop = tokenizer(then, add_special_tokens=False).input_ids[0]

    def scores(generated):
        out = torch.zeros(len(tokenizer))
        out[loop] = 5.0
        if len(generated) < len(script) and generated == script[:len(generated)]:
            out[script[len(generated)]] = 10.0
        return out
    return scores


@pytest.mark.parametrize("budget", [80, 120, 200])
def test_budget_makes_a_looping_model_finish_with_a_valid_document(tokenizer, budget):
    """The model writes a name and then ' the' forever inside the string (the failure of the default model)."""
    scores = _scripted(tokenizer, '{"name": "Bob')
    cut = _greedy(JsonSchemaLogitsProcessor(tokenizer, SCHEMA), tokenizer, scores, budget)
    with pytest.raises(json.JSONDecodeError):
        json.loads(cut)  # without the budget the string never ends: a prefix cut by max_new_tokens
    proc = JsonSchemaLogitsProcessor(tokenizer, SCHEMA, max_new_tokens=budget)
    seqs = []
    text = _greedy(proc, tokenizer, scores, budget, sequences=seqs)
    doc = json.loads(text)
    jsonschema.validate(doc, SCHEMA)
    assert doc["name"].startswith("Bob the the")  # the model's own text up to where the budget had to act
    assert proc.is_complete(0, seqs[0]) and proc.budget.tight_steps > 0 and proc.budget.unreachable == 0
    assert len(tokenizer(text, add_special_tokens=False).input_ids) <= budget


def test_budget_changes_nothing_when_the_document_fits(tokenizer):
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"],
              "additionalProperties": False}
    scores = _scripted(tokenizer, '{"name": "Bob the builder"}', then="<|endoftext|>")
    plain = _greedy(JsonSchemaLogitsProcessor(tokenizer, schema), tokenizer, scores, 64)
    assert json.loads(plain) == {"name": "Bob the builder"}
    proc = JsonSchemaLogitsProcessor(tokenizer, schema, max_new_tokens=64)
    assert _greedy(proc, tokenizer, scores, 64) == plain and proc.budget.tight_steps == 0


def test_an_impossible_budget_is_reported_not_hidden(tokenizer):
    proc = JsonSchemaLogitsProcessor(tokenizer, SCHEMA, max_new_tokens=20)  # the shortest document is longer
    seqs = []
    text = _greedy(proc, tokenizer, _scripted(tokenizer, '{"name": "Bob'), 20, sequences=seqs)
    assert not proc.is_complete(0, seqs[0]) and proc.budget.unreachable > 0
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_budget_works_for_other_grammars(tokenizer):
    scores = torch.zeros(len(tokenizer))
    scores[tokenizer("7", add_special_tokens=False).input_ids[0]] = 5.0
    scores[tokenizer(",", add_special_tokens=False).input_ids[0]] = 4.0
    grammar = r"\((7,)*7\)"
    cut = _greedy(GrammarConstrainedLogitsProcessor(tokenizer, regex=grammar), tokenizer, scores, 12)
    assert not cut.endswith(")")  # the model loops on "7," until the budget ends
    proc = GrammarConstrainedLogitsProcessor(tokenizer, regex=grammar, max_new_tokens=12)
    seqs = []
    text = _greedy(proc, tokenizer, scores, 12, sequences=seqs)
    assert text.startswith("(7,7") and text.endswith("7)") and proc.is_complete(0, seqs[0])


def test_budget_guard_arguments_are_validated(tokenizer):
    compiled = compile_grammar(tokenizer, json_schema(SCHEMA), (tokenizer.eos_token_id,), len(tokenizer))
    finder = CompletionFinder(compiled, tokenizer)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="max_new_tokens"):
            BudgetGuard(finder, bad)
    with pytest.raises(ValueError, match="verify_top_k"):
        BudgetGuard(finder, 10, verify_top_k=-1)
    with pytest.raises(ValueError, match="max_string_length"):
        JsonSchemaLogitsProcessor(tokenizer, SCHEMA, max_string_length=0)


def test_caps_on_open_strings_and_arrays(tokenizer):
    capped = cap_open_lengths(SCHEMA, max_string_length=5, max_items=2)
    assert capped["properties"]["name"]["maxLength"] == 5 and capped["properties"]["tags"]["maxItems"] == 2
    assert "maxLength" not in capped["properties"]["when"]  # a format keeps its own length
    assert capped["$defs"]["address"]["properties"]["lines"]["maxItems"] == 2
    assert "maxLength" not in SCHEMA["properties"]["name"]  # the user's schema is not modified
    closed = {"type": "object", "additionalProperties": False, "required": ["name", "tags"],
              "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}}}
    plain = _greedy(JsonSchemaLogitsProcessor(tokenizer, closed), tokenizer, _scripted(tokenizer, '{"name": "Bob'), 200)
    with pytest.raises(json.JSONDecodeError):
        json.loads(plain)  # " the" forever inside the name
    proc = JsonSchemaLogitsProcessor(tokenizer, closed, max_string_length=6, max_items=3)
    text = _greedy(proc, tokenizer, _scripted(tokenizer, '{"name": "Bob'), 200)
    doc = json.loads(text)
    jsonschema.validate(doc, closed)
    assert doc["name"].startswith("Bob") and len(doc["name"]) <= 6 and len(doc["tags"]) <= 3
