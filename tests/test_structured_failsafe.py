"""Masks that never fail silently (issue 17, part 3): conflicts with other processors, rejected rows, deep schemas,
parser limits and warnings, batch masks from the engine's parallel executor."""

from __future__ import annotations

import warnings

import pytest
import torch

from hf_decoding_ext.structured import GrammarConstrainedLogitsProcessor, JsonSchemaLogitsProcessor
from hf_decoding_ext.structured import grammar as G


def test_a_row_left_without_tokens_raises_naming_the_conflict(tiny_llama, char_tokenizer):
    """The grammar forces a repetition that no_repeat_ngram_size forbids: before the check, greedy decoding emitted
    token 0 (a token the grammar forbids) without a word."""
    proc = GrammarConstrainedLogitsProcessor(char_tokenizer, regex="(ab){6}", vocab_size=128)
    prompt = torch.tensor([[1, 40, 41]])
    with pytest.raises(ValueError, match="no token is left.*no_repeat_ngram_size"):
        tiny_llama.generate(prompt, attention_mask=torch.ones_like(prompt), logits_processor=[proc],
                            no_repeat_ngram_size=2, max_new_tokens=14, do_sample=False, pad_token_id=0)
    # min_new_tokens forbids eos where the grammar allows only eos
    proc = GrammarConstrainedLogitsProcessor(char_tokenizer, regex="ab", vocab_size=128)
    with pytest.raises(ValueError, match="no token is left"):
        tiny_llama.generate(prompt, attention_mask=torch.ones_like(prompt), logits_processor=[proc],
                            min_new_tokens=5, max_new_tokens=8, do_sample=False, pad_token_id=0)
    # with sampling too (it crashed in torch.multinomial on an all -inf row)
    proc = GrammarConstrainedLogitsProcessor(char_tokenizer, regex="ab", vocab_size=128)
    with pytest.raises(ValueError, match="no token is left"):
        tiny_llama.generate(prompt, attention_mask=torch.ones_like(prompt), logits_processor=[proc],
                            min_new_tokens=5, max_new_tokens=8, do_sample=True, pad_token_id=0)


def test_the_check_leaves_ordinary_decoding_alone(tiny_llama, char_tokenizer):
    proc = GrammarConstrainedLogitsProcessor(char_tokenizer, regex="(ab){3}", vocab_size=128)
    prompt = torch.tensor([[1, 40, 41]])
    out = tiny_llama.generate(prompt, attention_mask=torch.ones_like(prompt), logits_processor=[proc],
                              max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert char_tokenizer.decode(out[0, 3:], skip_special_tokens=True) == "ababab"


def test_a_rejected_row_is_never_reported_as_accepting(char_tokenizer):
    compiled = G.compile_grammar(char_tokenizer, G.json_schema({"type": "integer"}), (2,), 128)
    rows = G.RowMatchers(compiled, 1)
    digits = char_tokenizer("12", add_special_tokens=False).input_ids
    rows.sync([digits])
    assert rows.accepting(0)  # "12" is a complete integer
    rows.sync([digits + char_tokenizer("x", add_special_tokens=False).input_ids])
    assert 0 in rows.dead and not rows.accepting(0)  # was True: the matcher still sat on the valid "12"
    proc = JsonSchemaLogitsProcessor(char_tokenizer, {"type": "integer"}, vocab_size=128)
    proc(torch.tensor([[1] + digits + [88]]), torch.zeros(1, 128))
    assert not proc.is_complete(0)


def test_deeply_nested_schemas_give_a_clear_error():
    text = '{"items": ' * 5000 + "{}" + "}" * 5000
    with pytest.raises(ValueError, match="nested too deeply"):
        G.json_schema(text)  # was a RecursionError from json.loads
    schema: dict = {}
    node = schema
    for _ in range(400):
        node["items"] = {}
        node = node["items"]
    with pytest.raises(ValueError, match="nested more than"):
        G.json_schema(schema)


def test_parser_limits_are_exposed(char_tokenizer):
    with pytest.raises(ValueError, match="unknown parser limits"):
        G.parser_limits(lexer_fuel=3)
    schema = {"type": "object", "properties": {f"k{i}": {"type": "string", "pattern": "^[a-z]{2,40}$"}
                                               for i in range(30)}}
    default = JsonSchemaLogitsProcessor(char_tokenizer, schema, vocab_size=128)
    assert default.compiled.limits is None
    with pytest.raises(ValueError, match="(?i)grammar|size|limit"):
        JsonSchemaLogitsProcessor(char_tokenizer, schema, vocab_size=128, limits={"max_grammar_size": 50})


def test_engine_warnings_are_surfaced(char_tokenizer):
    G.clear_grammar_cache()
    # lenient mode ignores a keyword the engine cannot enforce: never silently
    with pytest.warns(UserWarning, match="grammar engine warnings.*uniqueItems"):
        proc = JsonSchemaLogitsProcessor(char_tokenizer, {"type": "array", "uniqueItems": True}, vocab_size=128,
                                         lenient=True)
    assert any("uniqueItems" in w for w in proc.compiled.warnings)
    with pytest.raises(ValueError, match="uniqueItems"):  # refused without lenient
        JsonSchemaLogitsProcessor(char_tokenizer, {"type": "array", "uniqueItems": True}, vocab_size=128)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        JsonSchemaLogitsProcessor(char_tokenizer, {"type": "integer"}, vocab_size=128)  # no warning


def test_batch_masks_from_the_parallel_executor_equal_row_by_row(char_tokenizer):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
              "required": ["a"]}
    compiled = G.compile_grammar(char_tokenizer, G.json_schema(schema), (2,), 128)
    prefixes = ['{"a": 1', '{"a": 12, "b": "x', '{"', '{"a": 3}']
    ids = [char_tokenizer(p, add_special_tokens=False).input_ids for p in prefixes]
    rows = G.RowMatchers(compiled, len(ids))
    rows.sync(ids)
    batch = rows.allowed(128)
    for r, row in enumerate(ids):
        one = G.RowMatchers(compiled, 1)
        one.sync([row])
        assert torch.equal(batch[r], one.allowed(128)[0]), prefixes[r]


@pytest.mark.parametrize("num_beams", [2, 4, 6])
def test_transformers_beam_search_returns_only_spans_and_grammar_sentences(tiny_llama, char_tokenizer, num_beams):
    """With more beams than valid continuations, transformers' beam search keeps -inf candidates; every returned
    sequence must still be a span of the context (extractive) or a sentence of the grammar."""
    from hf_decoding_ext.structured.exact_extractive import ExtractiveSpanLogitsProcessor

    context = char_tokenizer("abc", add_special_tokens=False).input_ids
    spans = {tuple(context[i:j]) for i in range(len(context)) for j in range(i + 1, len(context) + 1)}
    prompt = torch.tensor([[1, 40, 41, 42]])
    common = dict(attention_mask=torch.ones_like(prompt), num_beams=num_beams, num_return_sequences=num_beams,
                  do_sample=False, max_new_tokens=6, pad_token_id=0, eos_token_id=2)
    out = tiny_llama.generate(prompt, logits_processor=[ExtractiveSpanLogitsProcessor(context, eos_token_id=2)],
                              **common)
    for row in out[:, prompt.shape[1]:].tolist():
        assert tuple(t for t in row if t not in (0, 2)) in spans and row[len([t for t in row if t not in (0, 2)])] == 2
    proc = GrammarConstrainedLogitsProcessor(char_tokenizer, regex="ab", vocab_size=128)
    out = tiny_llama.generate(prompt, logits_processor=[proc], **common)
    for row in out[:, prompt.shape[1]:]:
        assert char_tokenizer.decode(row, skip_special_tokens=True) == "ab"
