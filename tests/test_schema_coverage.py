"""Coverage the engine can reach (issue 17, part 2): unknown formats as annotations, provably disjoint oneOf as anyOf;
never admitting a document the schema rejects."""

from __future__ import annotations

import json

import jsonschema
import pytest

from hf_decoding_ext.structured import grammar as G
from hf_decoding_ext.structured.schema_coverage import branches_disjoint, engine_knows_format, relax_schema


def test_unknown_formats_become_annotations_and_known_ones_stay():
    assert engine_knows_format("date") and not engine_knows_format("uri-reference")
    schema = {"type": "object", "properties": {"a": {"type": "string", "format": "uri-reference"},
                                               "b": {"type": "string", "format": "date"}}}
    out, notes = relax_schema(schema, unknown_formats="string")
    assert "format" not in out["properties"]["a"] and out["properties"]["b"]["format"] == "date"
    assert len(notes) == 1 and "uri-reference" in notes[0]
    assert schema["properties"]["a"]["format"] == "uri-reference"  # the caller's schema is not modified
    with pytest.raises(ValueError, match="format"):
        G.validate(G.json_schema(schema))  # the default refuses (validators that assert formats would disagree)
    with pytest.warns(UserWarning, match="uri-reference"):
        relaxed = G.json_schema(schema, unknown_formats="string")
    assert relaxed.notes and G.validate(relaxed) == []


@pytest.mark.parametrize("a, b, disjoint", [
    ({"enum": [1, 2]}, {"enum": [3]}, True),
    ({"enum": [1, 2]}, {"enum": [2.0, 3]}, False),  # 2 == 2.0 in JSON Schema
    ({"const": "x"}, {"type": "integer"}, True),
    ({"type": "integer"}, {"type": "number"}, False),  # every integer is a number
    ({"type": ["string", "null"]}, {"type": "boolean"}, True),
    ({"type": "string"}, {"type": "string", "maxLength": 3}, False),
    ({"$ref": "#/$defs/x"}, {"type": "integer"}, False),  # unknown: not proven
])
def test_disjointness_is_only_claimed_when_proven(a, b, disjoint):
    assert branches_disjoint(a, b) is disjoint


def test_disjoint_one_of_compiles_and_admits_exactly_the_valid_documents(tokenizer_small):
    schema = {"type": "object", "properties": {"v": {"oneOf": [{"enum": [1, 2]}, {"enum": [3]}, {"type": "string"}]}},
              "required": ["v"], "additionalProperties": False}
    with pytest.raises(ValueError, match="oneOf"):
        G.validate(G.json_schema(schema, one_of="error"))
    with pytest.warns(UserWarning, match="anyOf"):
        grammar = G.json_schema(schema, whitespace_flexible=True)
    compiled = G.compile_grammar(tokenizer_small, grammar, (tokenizer_small.eos_token_id,), len(tokenizer_small))
    validator = jsonschema.Draft202012Validator(schema)
    for value in (1, 2, 3, 4, "x", 2.5, None, True):
        doc = json.dumps({"v": value})
        ids = tokenizer_small(doc, add_special_tokens=False).input_ids
        m = compiled.matcher()
        admitted = m.try_consume_tokens(ids) == len(ids) and m.is_accepting()
        assert admitted == validator.is_valid({"v": value}), doc
    # overlapping branches keep oneOf: the engine still refuses them
    with pytest.raises(ValueError, match="oneOf"):
        G.validate(G.json_schema({"oneOf": [{"type": "string"}, {"type": "string", "maxLength": 3}]}))


@pytest.fixture(scope="module")
def tokenizer_small():
    from transformers import AutoTokenizer

    from hf_decoding_ext.core.models import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path())
