"""Every custom loop honours what ``generate()`` hands it, or refuses it with a clear ``ValueError`` (issue 15).

Parametrised over every registered decoding loop and candidate generator (through the speculative engine), each
built on the tiny Llama / GPT-2 with the tiny byte-level tokenizer (``tests/conftest.py``):

* a user cache, passed under ``past_key_values`` (deprecated name) or ``cache``: used (it holds the sequence
  afterwards and is the output's ``past_key_values``) without changing the output;
* a cache that already holds part of the prompt: used from where it stops (same output; a cache longer than the
  prompt, a non-dynamic cache or ``input_ids`` holding only the uncached tokens are refused);
* extra model inputs (``token_type_ids``, custom ``position_ids``): refused; the default position ids pass;
* ``output_hidden_states`` / ``output_attentions`` with ``return_dict_in_generate``: refused;
* ``output_scores`` / ``output_logits``: one entry per generated step, or refused;
* ``return_dict_in_generate``: the same sequences as the plain tensor output.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from hf_decoding_ext.core.loop import DecodingLoop
from hf_decoding_ext.registry import METHODS

LOOPS = sorted(m.name for m in METHODS if m.kind in ("decoding_loop", "candidate_generator"))
PROMPT = "hello world, this"
NEW = 4


def _prompt(tok):
    return torch.tensor([tok(PROMPT)["input_ids"]])


def _run(model, spec, loop, ids, seed=0, **kw):
    """generate() with the method's mode, a fixed seed and no default truncation."""
    torch.manual_seed(seed)
    mode = dict(do_sample=True, top_k=0) if spec.do_sample else dict(do_sample=False)
    return model.generate(ids, custom_generate=loop, max_new_tokens=NEW, pad_token_id=0, **mode, **kw)


def _prefilled(model, ids, n):
    cache = DynamicCache(config=model.config)
    if n:
        with torch.no_grad():
            model(input_ids=ids[:, :n], cache=cache, use_cache=True)
    return cache


def test_every_registered_loop_has_a_tiny_build():
    from conftest import TINY_COMPONENT_PARAMS

    assert sorted(TINY_COMPONENT_PARAMS) == LOOPS


@pytest.mark.parametrize("name", LOOPS)
@pytest.mark.parametrize("cache_name", ["past_key_values", "cache"])
@pytest.mark.parametrize("prefilled", [0, 5])
def test_user_cache_is_used_and_output_unchanged(tiny_llama, char_tokenizer, tiny_custom_generate, name, cache_name,
                                                 prefilled):
    spec, loop = tiny_custom_generate(name, tiny_llama)
    ids = _prompt(char_tokenizer)
    ref = _run(tiny_llama, spec, loop, ids)
    cache = _prefilled(tiny_llama, ids, prefilled)
    out = _run(tiny_llama, spec, loop, ids, return_dict_in_generate=True, **{cache_name: cache})
    assert torch.equal(out.sequences, ref)
    assert out.past_key_values is cache
    # the user's cache holds a prefix of the output (loops keep it lazily: at least what it held), and nothing else:
    # plain greedy generate() resumed from it continues exactly as from scratch
    seq = torch.cat([out.sequences, out.sequences[:, -1:]], dim=1)  # a next turn of one token
    assert prefilled <= cache.get_seq_length() <= out.sequences.shape[1]
    rows = cache.layers[0].keys.shape[0] if cache.get_seq_length() else seq.shape[0]
    if name in ("lexical-dba", "diverse-beam-search"):  # beam searches: the cache holds the beams, as generate()'s does
        assert rows == seq.shape[0] * loop.num_beams
        return
    seq = seq[:rows]  # superposed returns several drafts of one prompt row; the cache follows the first
    resumed = tiny_llama.generate(seq, cache=cache, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(resumed, tiny_llama.generate(seq, max_new_tokens=3, do_sample=False, pad_token_id=0))


@pytest.mark.parametrize("name", ["adadec", "prompt-lookup", "jacobi"])
def test_prefilled_cache_is_read_not_recomputed(tiny_llama, char_tokenizer, name):
    # keys/values of another prefix in the cache change the output: the loop reads the cache instead of re-running
    # the prompt (the caller vouches for what a cache holds, as with generate()); loops whose degenerate setting is
    # plain greedy (AdaDec with an infinite threshold, lossless greedy speculative decoding) give exactly what plain
    # greedy generate() gives from the same cache
    import math

    from hf_decoding_ext.registry import get_method
    from hf_decoding_ext.sampling.adadec import AdaDec
    from hf_decoding_ext.speculative import SpeculativeDecoding

    loop = AdaDec(math.inf) if name == "adadec" else SpeculativeDecoding(get_method(name).build())
    ids = _prompt(char_tokenizer)
    other = ids.clone()
    other[:, :16] = 100
    kw = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    plain = tiny_llama.generate(ids, **kw)
    plain_other = tiny_llama.generate(ids, cache=_prefilled(tiny_llama, other, 16), **kw)
    assert not torch.equal(plain_other, plain)
    assert torch.equal(tiny_llama.generate(ids, custom_generate=loop, cache=_prefilled(tiny_llama, other, 16), **kw),
                       plain_other)


@pytest.mark.parametrize("name", LOOPS)
def test_unusable_caches_are_refused(tiny_llama, char_tokenizer, tiny_custom_generate, name):
    spec, loop = tiny_custom_generate(name, tiny_llama)
    ids = _prompt(char_tokenizer)
    with pytest.raises(ValueError, match="cache already holds 17 positions"):
        _run(tiny_llama, spec, loop, ids, cache=_prefilled(tiny_llama, ids, ids.shape[1]))
    with pytest.raises(ValueError, match="StaticCache"):
        _run(tiny_llama, spec, loop, ids, cache_implementation="static")
    # input_ids holding only the uncached tokens (the attention mask covers the whole sequence)
    with pytest.raises(ValueError, match="whole sequence"):
        _run(tiny_llama, spec, loop, ids[:, 5:], attention_mask=torch.ones_like(ids),
             cache=_prefilled(tiny_llama, ids, 5))


LLAMA_STYLE_ONLY = {"swift", "eesd", "hidden-transfer", "longspec", "speckv", "specpc"}
"""Methods that refuse GPT-2 (sub-layer skipping, the exit head's extra layer, recomputed rotary attention scores;
tested in test_architectures.py):
their extra-input check runs on the tiny Llama."""


@pytest.mark.parametrize("name", LOOPS)
def test_extra_model_inputs_are_refused(tiny_gpt2, tiny_llama, char_tokenizer, tiny_custom_generate, name):
    model = tiny_llama if name in LLAMA_STYLE_ONLY else tiny_gpt2
    spec, loop = tiny_custom_generate(name, model)
    ids = _prompt(char_tokenizer)
    with pytest.raises(ValueError, match="token_type_ids"):
        _run(model, spec, loop, ids, token_type_ids=torch.ones_like(ids))
    with pytest.raises(ValueError, match="position_ids"):
        _run(model, spec, loop, ids, position_ids=torch.arange(ids.shape[1])[None] + 3)
    # the position ids generate() would use are accepted
    ref = _run(model, spec, loop, ids)
    assert torch.equal(_run(model, spec, loop, ids, position_ids=torch.arange(ids.shape[1])[None]), ref)


@pytest.mark.parametrize("name", LOOPS)
def test_output_flags(tiny_llama, char_tokenizer, tiny_custom_generate, name):
    spec, loop = tiny_custom_generate(name, tiny_llama)
    ids = _prompt(char_tokenizer)
    ref = _run(tiny_llama, spec, loop, ids)
    for flag in ("output_hidden_states", "output_attentions"):
        with pytest.raises(ValueError, match=flag):
            _run(tiny_llama, spec, loop, ids, return_dict_in_generate=True, **{flag: True})
    out = _run(tiny_llama, spec, loop, ids, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    if not loop.supports_output_scores:
        with pytest.raises(ValueError, match="output_scores"):
            _run(tiny_llama, spec, loop, ids, return_dict_in_generate=True, output_scores=True)
        return
    out = _run(tiny_llama, spec, loop, ids, return_dict_in_generate=True, output_scores=True, output_logits=True)
    assert torch.equal(out.sequences, ref)
    steps = ref.shape[1] - ids.shape[1]
    assert len(out.scores) == len(out.logits) == steps
    for scores, logits in zip(out.scores, out.logits):
        assert scores.shape == logits.shape and scores.shape[-1] == 128
        assert torch.isfinite(logits).all()


def test_refusals_name_the_loop_and_declared_support_passes(tiny_llama):
    class Plain(DecodingLoop):
        def run(self, state):
            while not state.done:
                logits, _ = state.next_token_logits()
                scores = state.process(logits)
                state.record(scores, logits)
                state.append(state.select(scores))

    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="Plain does not return output_hidden_states"):
        tiny_llama.generate(ids, max_new_tokens=2, custom_generate=Plain(), return_dict_in_generate=True,
                            output_hidden_states=True)
    class WithHidden(Plain):  # a loop declaring support receives the flag in its state's generation config
        supports_output_hidden_states = True

        def run(self, state):
            super().run(state)
            return {"hidden_states": (state.model(state.input_ids, output_hidden_states=True).hidden_states,)}

    out = tiny_llama.generate(ids, max_new_tokens=2, custom_generate=WithHidden(), return_dict_in_generate=True,
                              output_hidden_states=True)
    assert len(out.hidden_states[0]) == tiny_llama.config.num_hidden_layers + 1
    # use_cache=False only changes speed: the loops keep a cache
    assert torch.equal(tiny_llama.generate(ids, max_new_tokens=3, custom_generate=Plain(), use_cache=False),
                       tiny_llama.generate(ids, max_new_tokens=3, do_sample=False))
    # without return_dict_in_generate the flags have no effect, as in generate()
    assert torch.equal(tiny_llama.generate(ids, max_new_tokens=2, custom_generate=Plain(), output_attentions=True),
                       tiny_llama.generate(ids, max_new_tokens=2, do_sample=False))
    # direct call (no generate() frame): position ids are checked against the attention mask
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList
    from transformers.generation.stopping_criteria import MaxLengthCriteria

    cfg = GenerationConfig(max_new_tokens=2, do_sample=False)
    cfg._pad_token_tensor = None  # what generate() prepares
    crit = StoppingCriteriaList([MaxLengthCriteria(5)])
    out = Plain()(tiny_llama, ids, LogitsProcessorList(), crit, cfg, position_ids=torch.tensor([[0, 1, 2]]))
    assert out.shape == (1, 5)
    with pytest.raises(ValueError, match="position_ids"):
        Plain()(tiny_llama, ids, LogitsProcessorList(), crit, cfg, position_ids=torch.tensor([[2, 3, 4]]))
