"""Grammar-constrained decoding over llguidance: JSON schema, regex, Lark; batch, sampling, beam search, speculative
rollback, bad input; JSON extraction on the real model."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from hf_decoding_ext.structured import GrammarConstrainedLogitsProcessor, JsonSchemaLogitsProcessor
from hf_decoding_ext.structured import grammar as G

SCHEMA = {"type": "object",
          "properties": {"colour": {"enum": ["red", "green", "blue"]},
                         "count": {"type": "integer", "minimum": 0, "maximum": 99},
                         "ok": {"type": "boolean"}},
          "required": ["colour", "count", "ok"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from hf_decoding_ext.core.models import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path())


def _tiny(arch: str, vocab: int):
    torch.manual_seed(0)
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, bos_token_id=1, eos_token_id=2,
                          pad_token_id=2)
        return LlamaForCausalLM(cfg).eval()
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab, n_embd=16, n_layer=1, n_head=2, bos_token_id=1, eos_token_id=2,
                     pad_token_id=2)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny(request, tok):
    """A tiny random model of each architecture over the default model's tokenizer (vocab 49152)."""
    return _tiny(request.param, len(tok))


def _batch(tok, texts):
    tok.padding_side = "left"
    return tok(texts, return_tensors="pt", padding=True)


def _new_texts(tok, out, inputs):
    return [tok.decode(row[inputs.input_ids.shape[1]:], skip_special_tokens=True) for row in out]


@pytest.mark.parametrize("do_sample", [False, True])
def test_json_schema_batch_outputs_validate(tiny, tok, do_sample):
    inputs = _batch(tok, ["Hello", "A much longer prompt with padding", "x"])
    proc = JsonSchemaLogitsProcessor.for_model(tiny, tok, schema=SCHEMA)
    torch.manual_seed(1)
    out = tiny.generate(**inputs, logits_processor=[proc], max_new_tokens=40, do_sample=do_sample,
                        pad_token_id=tok.pad_token_id)
    for r, text in enumerate(_new_texts(tok, out, inputs)):
        jsonschema.validate(json.loads(text), SCHEMA)
        assert proc.is_complete(r)
        gen = out[r, inputs.input_ids.shape[1]:].tolist()
        assert 2 in gen  # ended with eos, within the budget, only once the object was complete


def test_eos_only_when_the_grammar_accepts(tok):
    proc = GrammarConstrainedLogitsProcessor(tok, regex=r"[0-9]{2,3}")
    prompt = torch.tensor([[1, 5, 7]])
    vocab = len(tok)
    scores = torch.zeros(1, vocab)
    digits = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    steps = [[], digits("4"), digits("42"), digits("421")]
    expect_eos = [False, False, True, True]
    for gen, eos_ok in zip(steps, expect_eos):
        ids = torch.cat([prompt, torch.tensor([gen], dtype=torch.long)], dim=1) if gen else prompt
        out = proc(ids, scores.clone())
        assert torch.isfinite(out[0, 2]).item() == eos_ok
        allowed = torch.isfinite(out[0]).nonzero().flatten().tolist()
        assert all(re.fullmatch(r"[0-9]*", tok.decode([t])) for t in allowed if t != 2)
    # after three digits only eos remains
    out = proc(torch.cat([prompt, torch.tensor([digits("421")])], dim=1), scores.clone())
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [2]


def test_regex_and_lark_constraints_hold(tiny, tok):
    inputs = _batch(tok, ["Code:", "Sum:"])
    proc = GrammarConstrainedLogitsProcessor.for_model(tiny, tok, regex=r"[A-Z]{2}-[0-9]{3}")
    torch.manual_seed(0)
    out = tiny.generate(**inputs, logits_processor=[proc], max_new_tokens=12, do_sample=True,
                        pad_token_id=tok.pad_token_id)
    assert all(re.fullmatch(r"[A-Z]{2}-[0-9]{3}", t) for t in _new_texts(tok, out, inputs))
    arith = 'start: expr\nexpr: NUM (OP NUM)*\nNUM: /[1-9][0-9]?/\nOP: "+" | "*"\n'
    proc = GrammarConstrainedLogitsProcessor.for_model(tiny, tok, lark=arith)
    out = tiny.generate(**inputs, logits_processor=[proc], max_new_tokens=10, do_sample=True,
                        pad_token_id=tok.pad_token_id)
    for r, t in enumerate(_new_texts(tok, out, inputs)):
        full = re.fullmatch(r"[1-9][0-9]?([+*][1-9][0-9]?)*", t)
        prefix = re.fullmatch(r"[1-9][0-9]?([+*][1-9][0-9]?)*[+*]?", t)
        assert full if proc.is_complete(r) else prefix  # truncated by max_new_tokens: a valid prefix


def test_gbnf_grammar_is_converted(tok):
    g = G.lark('root ::= "yes" | "no"')
    proc = GrammarConstrainedLogitsProcessor(tok, g)
    out = proc(torch.tensor([[1]]), torch.zeros(1, len(tok)))
    allowed = {tok.decode([t]) for t in torch.isfinite(out[0]).nonzero().flatten().tolist()}
    assert allowed and all("yes".startswith(a) or "no".startswith(a) for a in allowed)


def test_beam_search_returns_only_valid_sequences(tiny, tok):
    inputs = _batch(tok, ["Hi"])
    proc = JsonSchemaLogitsProcessor.for_model(tiny, tok, schema={"type": "array", "items": {"enum": ["a", "bb"]},
                                                                  "minItems": 1, "maxItems": 3})
    out = tiny.generate(**inputs, logits_processor=[proc], max_new_tokens=30, num_beams=4, num_return_sequences=4,
                        do_sample=False, pad_token_id=tok.pad_token_id)
    texts = _new_texts(tok, out, inputs)
    assert len(set(texts)) > 1
    for t in texts:
        value = json.loads(t)
        assert 1 <= len(value) <= 3 and set(value) <= {"a", "bb"}


def test_rows_resync_after_rollback_and_reorder(tok):
    compiled = G.compile_grammar(tok, G.regex("(ab|cd)+"), (2,))
    rows = G.RowMatchers(compiled, 2)
    ab, cd = tok.encode("ab", add_special_tokens=False), tok.encode("cd", add_special_tokens=False)
    rows.sync([ab, cd])
    rows.sync([cd + ab, ab + ab])  # rows swapped and extended: each reuses the other's matcher
    assert rows.consumed == [cd + ab, ab + ab] and not rows.dead
    rows.sync([cd, ab])  # rolled back (a rejected draft)
    assert rows.consumed == [cd, ab]
    rows.sync([cd, tok.encode("zz", add_special_tokens=False)])
    assert rows.dead == {1}
    mask = rows.allowed(len(tok))
    assert mask[1].nonzero().flatten().tolist() == [2]  # a dead row may only end
    rows.rollback(5, row=1)
    assert not rows.dead and rows.consumed[1] == []


def test_compile_cache_and_bad_input(tok):
    g = G.json_schema(SCHEMA)
    a = G.compile_grammar(tok, g, (2,))
    assert G.compile_grammar(tok, G.json_schema(dict(SCHEMA)), (2,)) is a
    with pytest.raises(ValueError, match=r'"if"'):
        JsonSchemaLogitsProcessor(tok, {"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}})
    with pytest.raises(ValueError, match="Invalid type"):
        JsonSchemaLogitsProcessor(tok, {"type": "strin"})
    with pytest.raises(ValueError, match="not valid JSON"):
        JsonSchemaLogitsProcessor(tok, "{not json")
    with pytest.raises(ValueError, match="regular expression"):
        GrammarConstrainedLogitsProcessor(tok, regex="[a-z")
    with pytest.raises(ValueError, match="exactly one"):
        GrammarConstrainedLogitsProcessor(tok, regex="a", lark="start: \"a\"")
    with pytest.raises(ValueError, match="exactly one"):
        GrammarConstrainedLogitsProcessor(tok)
    with pytest.raises(ValueError, match="vocab_size"):
        GrammarConstrainedLogitsProcessor(tok, regex="a", vocab_size=10)

    class SlowTokenizer:
        eos_token_id = 2

        def __len__(self):
            return 10

    with pytest.raises(ValueError, match="fast"):
        GrammarConstrainedLogitsProcessor(SlowTokenizer(), regex="a")
    # lenient: the unsupported keyword is ignored instead of refused
    JsonSchemaLogitsProcessor(tok, {"type": "object", "not": {"required": ["a"]}}, lenient=True)


@pytest.mark.real_model
def test_speculative_engine_rolls_the_matcher_back(smollm):
    """Prompt lookup drafts copy the prompt, which the schema mostly rejects: verification must roll the matcher
    back, and the output equals plain constrained greedy decoding."""
    from hf_decoding_ext.core.models import encode_prompts
    from hf_decoding_ext.speculative import SpeculativeDecoding
    from hf_decoding_ext.speculative.drafters.prompt_lookup import PromptLookupDrafter

    model, tok = smollm
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
              "required": ["city", "country"], "additionalProperties": False}
    inputs = encode_prompts(tok, 'The city is "Lyon" and the country is "France". Reply with JSON '
                                 '{"city": ..., "country": ...}.')
    plain = model.generate(**inputs, logits_processor=[JsonSchemaLogitsProcessor.for_model(model, tok, schema=schema)],
                           max_new_tokens=24, do_sample=False)
    loop = SpeculativeDecoding(PromptLookupDrafter())
    spec = model.generate(**inputs, logits_processor=[JsonSchemaLogitsProcessor.for_model(model, tok, schema=schema)],
                          max_new_tokens=24, do_sample=False, custom_generate=loop)
    assert torch.equal(plain, spec)
    stats = loop.summary()
    assert stats["mean_draft_size"] > stats["mean_accepted"]  # some drafts were rejected (and rolled back)
    text = tok.decode(spec[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.real_model
def test_json_extraction_on_the_real_model(smollm):
    from hf_decoding_ext.core.models import encode_prompts

    model, tok = smollm
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    prompts = ["Alice is 31 years old. Give her name and age as JSON.",
               "Extract name and age as JSON: Bob, a 45-year-old plumber.",
               "Carol turned 7 last week. JSON with name and age."]
    inputs = encode_prompts(tok, prompts)
    proc = JsonSchemaLogitsProcessor.for_model(model, tok, schema=schema)
    out = model.generate(**inputs, logits_processor=[proc], max_new_tokens=32, do_sample=False)
    values = [json.loads(t) for t in _new_texts(tok, out, inputs)]
    for v in values:
        jsonschema.validate(v, schema)
    assert [v["name"] for v in values] == ["Alice", "Bob", "Carol"]
    assert [v["age"] for v in values] == [31, 45, 7]
