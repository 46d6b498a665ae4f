"""Sketch-guided constrained decoding (Geng et al., arXiv 2401.09967): a local model refines a blackbox "sketch" under
a grammar.

Core properties tested on the real model with the shipped closed-IE toy set (``data/sketch_cie.jsonl``):
(1) every refined output is a complete sentence of the triplet grammar (entities and relations of the inventory);
(2) the sketch helps: triplet F1 of SGCD (sketch + constraint) is clearly above constrained decoding of the same model
    with the same constraint, demonstrations and decoding but no sketch, and above the sketch's own F1 read naively.
Unit tests on tiny random models over the real tokenizer: prompt building, task input recovery, the returned
sequences, batch (shared-prefix layout equals one row at a time), sampling, caller's processors, streamer,
max_new_tokens, the sketcher callable and bad arguments.
"""

from __future__ import annotations

import re

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.streamers import BaseStreamer

from hf_decoding_ext.bench.tasks.sketch_cie import (
    format_triplets,
    load_sketch_cie,
    parse_sketch_triplets,
    parse_triplets,
    triplet_f1,
    triplet_grammar,
)
from hf_decoding_ext.core.models import encode_prompts
from hf_decoding_ext.structured.sketch_guided import (SketchGuidedDecoding, build_refinement_prompt,
                                                      task_input_from_prompt)

FRUITS = ["apple", "banana", "cherry"]



@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from hf_decoding_ext.core.models import default_model_path

    t = AutoTokenizer.from_pretrained(default_model_path())
    t.padding_side = "left"
    return t


def _tiny(arch: str, vocab: int):
    """A tiny random model over the real tokenizer's vocabulary (eos = pad = 2, as SmolLM2's <|im_end|>)."""
    torch.manual_seed(0)
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                          bos_token_id=1, eos_token_id=2, pad_token_id=2)
        return LlamaForCausalLM(cfg).eval()
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab, n_embd=16, n_layer=1, n_head=2, n_positions=2048, bos_token_id=1,
                     eos_token_id=2, pad_token_id=2)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def tiny(tok):
    return _tiny("llama", len(tok))


DEMOS = [{"input": "Name a vegetable.", "sketch": "Carrots are vegetables.", "output": "carrot"},
         {"input": "Name a colour.", "sketch": "The sky is blue.", "output": "blue"}]


def _gen(model, tok, loop, prompts, **kw):
    enc = encode_prompts(tok, prompts)
    kw.setdefault("do_sample", False)
    kw.setdefault("max_new_tokens", 8)
    out = model.generate(**enc, custom_generate=loop, pad_token_id=2, **kw)
    return enc, out


def _texts(tok, enc, sequences) -> list[str]:
    return tok.batch_decode(sequences[:, enc.input_ids.shape[1]:], skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------------- prompts
def test_refinement_prompt_chat_and_plain(tok):
    chat = build_refinement_prompt(tok, "Name a fruit.", "Apples are a fruit.", DEMOS, "Fix the draft.")
    assert chat.startswith("<|im_start|>") and chat.endswith("<|im_start|>assistant\n")
    # instruction opens the first user turn; each demonstration is a user turn answered by its output
    assert "Fix the draft.\n\nInput: Name a vegetable.\nSketch: Carrots are vegetables.<|im_end|>" in chat
    assert "<|im_start|>assistant\ncarrot<|im_end|>" in chat and "<|im_start|>assistant\nblue<|im_end|>" in chat
    assert chat.index("blue") < chat.index("Input: Name a fruit.\nSketch: Apples are a fruit.")
    plain = build_refinement_prompt(tok, "Name a fruit.", "Apples are a fruit.", DEMOS, "Fix the draft.", chat=False)
    assert plain == ("Fix the draft.\n\nInput: Name a vegetable.\nSketch: Carrots are vegetables.\nOutput:\ncarrot\n\n"
                     "Input: Name a colour.\nSketch: The sky is blue.\nOutput:\nblue\n\n"
                     "Input: Name a fruit.\nSketch: Apples are a fruit.\nOutput:\n")
    no_sketch = build_refinement_prompt(tok, "Name a fruit.", None, DEMOS, None, chat=False)
    assert "Sketch" not in no_sketch and no_sketch.endswith("Input: Name a fruit.\nOutput:\n")


def test_task_input_is_read_from_the_prompt(tok):
    enc = encode_prompts(tok, "Name a fruit.")
    assert task_input_from_prompt(tok, enc.input_ids[0]) == "Name a fruit."
    multi = encode_prompts(tok, [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                                  {"role": "user", "content": "Name a fruit.\nJust one."}]])
    assert task_input_from_prompt(tok, multi.input_ids[0]) == "Name a fruit.\nJust one."
    plain = tok("Name a fruit.", return_tensors="pt").input_ids[0]
    assert task_input_from_prompt(tok, plain) == "Name a fruit."


# ----------------------------------------------------------------------------------------------------- decoding
def test_output_follows_the_users_prompt_and_the_grammar(tiny, tok):
    loop = SketchGuidedDecoding.for_model(tiny, tok, sketch="Apples are a fruit.", choices=FRUITS,
                                          demonstrations=DEMOS)
    enc, out = _gen(tiny, tok, loop, "Name a fruit.", return_dict_in_generate=True)
    n = enc.input_ids.shape[1]
    assert torch.equal(out.sequences[:, :n], enc.input_ids)  # the caller's prompt, then the refined output
    assert _texts(tok, enc, out.sequences)[0] in FRUITS
    assert out.grammar_complete.tolist() == [True]
    assert out.sketches == ["Apples are a fruit."]
    prompt = out.refinement_prompts[0]
    assert prompt.endswith("Input: Name a fruit.\nSketch: Apples are a fruit.<|im_end|>\n<|im_start|>assistant\n")
    assert loop.last_result["refinement_prompts"] == out.refinement_prompts


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batch_with_shared_prefix_equals_one_row_at_a_time(arch, tok):
    model = _tiny(arch, len(tok))
    prompts = ["Name a fruit.", "Which fruit is yellow and long? Answer in one word."]
    sketches = ["Apples are a fruit.", "That would be a banana, I think."]
    regex = "(apple|banana|cherry)( pie| juice)?"
    loop = SketchGuidedDecoding.for_model(model, tok, sketch=sketches, regex=regex, demonstrations=DEMOS)
    enc, batched = _gen(model, tok, loop, prompts, max_new_tokens=6)
    ids, mask, shared = loop._encode(loop.last_result["refinement_prompts"], 2)
    assert shared > 20 and mask[:, :shared].all() and not mask.all()  # instruction + demos shared, padding after
    texts = _texts(tok, enc, batched)
    for i, (p, s) in enumerate(zip(prompts, sketches)):
        single = SketchGuidedDecoding.for_model(model, tok, sketch=s, regex=regex, demonstrations=DEMOS)
        enc1, out1 = _gen(model, tok, single, p, max_new_tokens=6)
        assert _texts(tok, enc1, out1)[0] == texts[i]
    for t in texts:
        assert re.fullmatch(regex, t), t


def test_sampling_processors_streamer_and_max_new_tokens(tiny, tok):
    class BanApple(LogitsProcessor):
        """Bans every first token starting with "a": "apple" cannot be written."""

        def __init__(self):
            self.ids = [i for t, i in tok.get_vocab().items() if t.lstrip("\u0120").startswith("a")]
            self.first = None

        def __call__(self, input_ids, scores):
            if self.first is None or input_ids.shape[1] < self.first:
                self.first = input_ids.shape[1]
            if input_ids.shape[1] == self.first:
                scores[:, self.ids] = float("-inf")
            return scores

    class Streamer(BaseStreamer):
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value)

        def end(self):
            self.ended = True

    loop = SketchGuidedDecoding.for_model(tiny, tok, sketch="Apples are a fruit.", choices=FRUITS)
    torch.manual_seed(0)
    for _ in range(4):
        streamer = Streamer()
        enc, out = _gen(tiny, tok, loop, ["Name a fruit."] * 2, do_sample=True, top_k=0,
                        logits_processor=LogitsProcessorList([BanApple()]), streamer=streamer)
        texts = _texts(tok, enc, out)
        assert all(t in ("banana", "cherry") for t in texts), texts  # the caller's processor is applied
        assert streamer.ended and len(streamer.chunks) >= out.shape[1] - enc.input_ids.shape[1]
    # a long grammar cut by max_new_tokens: exactly max_new_tokens tokens, a valid prefix, reported incomplete
    long = SketchGuidedDecoding.for_model(tiny, tok, sketch="x", regex="(apple ){20}")
    enc, out = _gen(tiny, tok, long, "Name a fruit.", max_new_tokens=5, return_dict_in_generate=True)
    assert out.sequences.shape[1] == enc.input_ids.shape[1] + 5
    text = _texts(tok, enc, out.sequences)[0]
    assert text and ("apple " * 20).startswith(text), text
    assert out.grammar_complete.tolist() == [False]


def test_sketcher_is_the_blackbox(tiny, tok):
    calls = []

    def blackbox(text: str) -> str:  # stands for an API call to a larger model
        calls.append(text)
        return f"A sketch for: {text}"

    loop = SketchGuidedDecoding.for_model(tiny, tok, sketcher=blackbox, choices=FRUITS)
    enc, out = _gen(tiny, tok, loop, ["Name a fruit.", "Name a red fruit."], return_dict_in_generate=True)
    assert calls == ["Name a fruit.", "Name a red fruit."]
    assert out.sketches == ["A sketch for: Name a fruit.", "A sketch for: Name a red fruit."]
    assert "Sketch: A sketch for: Name a red fruit." in out.refinement_prompts[1]
    assert all(t in FRUITS for t in _texts(tok, enc, out.sequences))
    # an explicit task input replaces the one read from the prompt
    loop = SketchGuidedDecoding.for_model(tiny, tok, sketcher=blackbox, choices=FRUITS, task_input="Pick one.")
    _gen(tiny, tok, loop, "Name a fruit.")
    assert calls[-1] == "Pick one."


def test_bad_arguments(tiny, tok):
    ok = dict(sketch="s", choices=FRUITS)
    with pytest.raises(ValueError, match="exactly one of sketch"):
        SketchGuidedDecoding.for_model(tiny, tok, choices=FRUITS)
    with pytest.raises(ValueError, match="exactly one of sketch"):
        SketchGuidedDecoding.for_model(tiny, tok, sketch="s", sketcher=str.upper, choices=FRUITS)
    with pytest.raises(ValueError, match="callable"):
        SketchGuidedDecoding.for_model(tiny, tok, sketcher="not a function", choices=FRUITS)
    with pytest.raises(ValueError, match="exactly one constraint"):
        SketchGuidedDecoding.for_model(tiny, tok, sketch="s")
    with pytest.raises(ValueError, match="exactly one constraint"):
        SketchGuidedDecoding.for_model(tiny, tok, sketch="s", choices=FRUITS, regex="a")
    with pytest.raises(ValueError, match="list of strings"):
        SketchGuidedDecoding.for_model(tiny, tok, sketch="s", choices="apple")
    with pytest.raises(ValueError, match="regular expression|regex"):
        SketchGuidedDecoding.for_model(tiny, tok, sketch="s", regex="(unclosed")
    with pytest.raises(ValueError, match="Grammar or a JSON-schema dict"):
        SketchGuidedDecoding.for_model(tiny, tok, sketch="s", grammar="start: 'a'")
    with pytest.raises(ValueError, match="sketch must be"):
        SketchGuidedDecoding.for_model(tiny, tok, sketch=["a", 3], choices=FRUITS)
    with pytest.raises(ValueError, match="demonstration 0"):
        SketchGuidedDecoding.for_model(tiny, tok, demonstrations=[{"input": "x"}], **ok)
    with pytest.raises(ValueError, match="tokenizer"):
        SketchGuidedDecoding.for_model(tiny, None, **ok)
    # per-call checks: one sketch per row, a string from the sketcher, no beam search
    loop = SketchGuidedDecoding.for_model(tiny, tok, sketch=["a", "b", "c"], choices=FRUITS)
    with pytest.raises(ValueError, match="3 entries for a batch of 2"):
        _gen(tiny, tok, loop, ["Name a fruit.", "Name another."])
    loop = SketchGuidedDecoding.for_model(tiny, tok, sketcher=lambda text: None, choices=FRUITS)
    with pytest.raises(ValueError, match="must return a string"):
        _gen(tiny, tok, loop, "Name a fruit.")
    with pytest.raises(ValueError, match="num_beams"):
        _gen(tiny, tok, SketchGuidedDecoding.for_model(tiny, tok, **ok), "Name a fruit.", num_beams=2)


# ----------------------------------------------------------------------------------------------------- closed IE
def test_triplet_helpers(tok):
    triplets = [["Ottawa", "capital of", "Canada"], ["Marie Curie", "place of birth", "Warsaw"]]
    text = format_triplets(triplets)
    assert text == "[s] Ottawa [r] capital of [o] Canada [e] [s] Marie Curie [r] place of birth [o] Warsaw [e]"
    assert parse_triplets(text) == [tuple(t) for t in triplets]
    assert parse_sketch_triplets("Sure!\n1. (Ottawa, capital city of, Canada)\n(Messi, born in, Rosario, Argentina)"
                                 ) == [("Ottawa", "capital city of", "Canada"),
                                       ("Messi", "born in", "Rosario, Argentina")]
    f1 = triplet_f1([[("a", "r", "b"), ("a", "r", "c")]], [[("a", "r", "b")]])
    assert f1 == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3)}
    g = triplet_grammar(["Ottawa", "Canada"], ["capital of"], max_triplets=2)
    from hf_decoding_ext.structured.grammar import compile_grammar

    m = compile_grammar(tok, g, (2,)).matcher()
    assert m.consume_tokens(tok.encode("[s] Ottawa [r] capital of [o] Canada [e]", add_special_tokens=False))
    assert m.is_accepting()
    with pytest.raises(ValueError):
        triplet_grammar([], ["r"])
    with pytest.raises(ValueError):
        triplet_grammar(["a [b]"], ["r"])
    data = load_sketch_cie()
    assert len(data["tests"]) >= 12 and data["demos"] and data["relations"] and data["entities"]
    for row in data["demos"] + data["tests"]:
        for s, r, o in row["triplets"]:
            assert s in data["entities"] and o in data["entities"] and r in data["relations"]


class _NoSketch(SketchGuidedDecoding):
    """The baseline: the same loop, constraint and demonstrations, prompted with the task input only."""

    def refinement_prompt(self, task_input: str, sketch: str) -> str:
        return build_refinement_prompt(self.tokenizer, task_input, None, self.demonstrations, self.instruction,
                                       self.chat)


@pytest.mark.real_model
def test_sketch_guided_closed_ie_on_real_model(smollm):
    model, tokenizer = smollm
    data = load_sketch_cie()
    entities, relations = data["entities"], data["relations"]
    grammar = triplet_grammar(entities, relations, max_triplets=2)
    demos = [{"input": d["text"], "sketch": d["sketch"], "output": format_triplets(d["triplets"])}
             for d in data["demos"]]
    task = ("Extract facts from the input as triplets [s] subject [r] relation [o] object [e]. Relations: "
            + ", ".join(relations) + ".")
    with_sketch = task + " A draft (sketch) from another model is given; it may use other names. Rewrite it with " \
                         "the allowed names."
    tests = data["tests"]
    texts = [t["text"] for t in tests]
    gold = [t["triplets"] for t in tests]
    enc = encode_prompts(tokenizer, texts)
    n = enc.input_ids.shape[1]
    results = {}
    for name, cls, instruction in [("sgcd", SketchGuidedDecoding, with_sketch), ("no_sketch", _NoSketch, task)]:
        loop = cls.for_model(model, tokenizer, sketch=[t["sketch"] for t in tests], grammar=grammar,
                             demonstrations=demos, instruction=instruction)
        out = model.generate(**enc, custom_generate=loop, do_sample=False, max_new_tokens=56,
                             return_dict_in_generate=True)
        assert torch.equal(out.sequences[:, :n], enc.input_ids)
        outputs = tokenizer.batch_decode(out.sequences[:, n:], skip_special_tokens=True)
        # (1) the constraint holds for every output: complete, in the markup, names from the inventory only
        assert out.grammar_complete.all(), (name, outputs)
        for text in outputs:
            assert re.fullmatch(r"\[s\] .+? \[r\] .+? \[o\] .+? \[e\]( \[s\] .+? \[r\] .+? \[o\] .+? \[e\])?", text)
            for s, r, o in parse_triplets(text):
                assert s in entities and o in entities and r in relations, text
        results[name] = triplet_f1([parse_triplets(t) for t in outputs], gold)
    sketch = triplet_f1([parse_sketch_triplets(t["sketch"]) for t in tests], gold)
    print(f"\ntriplet F1 on {len(tests)} sentences: SGCD {results['sgcd']['f1']:.3f}, constrained without sketch "
          f"{results['no_sketch']['f1']:.3f}, sketch read naively {sketch['f1']:.3f}")
    # (2) the sketch helps the constrained decoder, and refinement beats the raw sketch
    assert results["sgcd"]["f1"] >= results["no_sketch"]["f1"] + 0.2
    assert results["sgcd"]["f1"] >= sketch["f1"] + 0.2
    assert sketch["f1"] < 0.5  # the sketch mostly does not use the inventory's names


@pytest.mark.real_model
def test_cli_demo_parameters_on_real_model(smollm):
    from hf_decoding_ext.plug import generate_kwargs
    from hf_decoding_ext.cli import parse_params
    from hf_decoding_ext.registry import MethodSpec

    model, tokenizer = smollm
    example = {"sketch": "Apples are a fruit.", "regex": "(apple|banana|cherry)"}
    spec = MethodSpec(name="sketch-guided", title="Sketch-Guided Constrained Decoding", arxiv="2401.09967",
                      family="structured", kind="decoding_loop", lossless=False, needs_training=False,
                      target="hf_decoding_ext.structured.sketch_guided:SketchGuidedDecoding", status="done",
                      example=example)
    params = parse_params([f"{k}={v}" for k, v in example.items()])  # as the CLI reads --param k=v
    assert params == example and set(params) <= set(spec.parameters())
    kwargs = generate_kwargs(spec, model=model, tokenizer=tokenizer, **params)
    enc = encode_prompts(tokenizer, "Name a fruit.")
    out = model.generate(**enc, max_new_tokens=8, tokenizer=tokenizer, **kwargs)
    assert tokenizer.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True) == "apple"
