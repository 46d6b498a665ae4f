"""The library on four architectures: Llama, GPT-2 (learned absolute positions), Qwen2 (attention biases) and Mistral
with a sliding window of 6 tokens (a sliding-window cache; every prompt here runs past it). Issue 15.

* the speculative engine is lossless against plain greedy ``generate()`` with a prompt-lookup and a draft-model
  drafter (Mistral: refused with a message naming the architecture: its tree masks and KV compaction assume full
  attention);
* the contrastive second-view processor (CAD) equals its from-scratch recomputation at every step;
* the grammar processor (JSON schema) constrains greedy decoding to valid JSON with the tiny byte-level tokenizer;
* every registered decoding loop and candidate generator runs (or is refused naming the architecture), and the loops
  with a degenerate setting equal to a transformers search reproduce it exactly, with left padding and with a user
  cache that already holds part of the prompt.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import DynamicCache

from hf_decoding_ext.registry import METHODS, get_method

SLIDING = {"mistral"}  # architectures with a sliding-window cache
ENGINE_LOOPS = {m.name for m in METHODS if m.kind == "candidate_generator"} | {"speculative-contrastive", "fast-cot"}
REFUSED_ON_SLIDING = ENGINE_LOOPS | {"exact-extractive", "free", "space", "lexical-unit-decoding", "set-block-decoding",
                                     "speckv", "specpc"}  # tree masks / cache compaction assume full attention
REFUSED_ARCHITECTURES = {"swift": {"gpt2"}, "eesd": {"gpt2"}, "hidden-transfer": {"gpt2"},
                         "longspec": {"gpt2"}, "speckv": {"gpt2"}, "specpc": {"gpt2"}}
# sub-layer skipping / the exit head's extra layer / upper layers re-entered need Llama-style decoder layers; SpecKV
# and SpecPC rescore rotary attention from captured queries
LOOPS = sorted(m.name for m in METHODS if m.kind in ("decoding_loop", "candidate_generator"))
REPEAT = [[5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 9, 10, 5, 6]]  # prompt-lookup finds matches


def _greedy(model, ids, **kw):
    return model.generate(ids, do_sample=False, pad_token_id=0, **kw)


def _batch():
    ids = torch.tensor([[0, 0, 0, 5, 6, 7, 8, 9, 10, 11], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])
    return ids, (ids != 0).long()


# ------------------------------------------------------------------------------------------ speculative engine
@pytest.mark.parametrize("drafter", ["prompt-lookup", "draft-model"])
def test_speculative_engine_is_lossless_or_refused(tiny_arch, drafter):
    from hf_decoding_ext.speculative import SpeculativeDecoding

    arch, model = tiny_arch
    spec = get_method(drafter)
    loop = SpeculativeDecoding(spec.build(model=model, assistant="self:1") if drafter == "draft-model"
                               else spec.build(num_tokens=4))
    ids = torch.tensor(REPEAT)
    if arch in SLIDING:
        with pytest.raises(ValueError, match=f"{type(model).__name__}.*sliding_window 6"):
            _greedy(model, ids, max_new_tokens=12, custom_generate=loop)
        return
    out = _greedy(model, ids, max_new_tokens=12, custom_generate=loop)
    assert torch.equal(out, _greedy(model, ids, max_new_tokens=12))
    assert sum(s.draft_size for s in loop.last_stats) > 0  # drafts were verified, not only bonus tokens


# ------------------------------------------------------------------------------------------ contrastive processor
def test_contrastive_processor_equals_recomputation(tiny_arch):
    from hf_decoding_ext.contrastive.cad import ContextAwareDecodingProcessor

    _, model = tiny_arch
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]])
    second = torch.tensor([[20, 21, 22]])
    alpha = 0.5
    proc = ContextAwareDecodingProcessor(model, second, alpha=alpha)
    out = _greedy(model, ids, max_new_tokens=6, logits_processor=[proc], return_dict_in_generate=True,
                  output_scores=True)
    new = out.sequences[:, ids.shape[1]:]
    changed = False
    with torch.no_grad():
        for t, scores in enumerate(out.scores):
            main = model(torch.cat([ids, new[:, :t]], 1)).logits[:, -1].float()
            other = model(torch.cat([second, new[:, :t]], 1)).logits[:, -1].float()
            expected = (1 + alpha) * main - alpha * other  # CAD (Shi et al., 2023), from scratch
            torch.testing.assert_close(scores.log_softmax(-1), expected.log_softmax(-1), atol=1e-4, rtol=1e-4)
            changed |= not torch.allclose(scores.log_softmax(-1), main.log_softmax(-1), atol=1e-3)
    assert changed  # the second view does change the scores
    assert out.sequences.shape[1] > ids.shape[1] + 3  # decoded past the sliding window of Mistral (6)


# ------------------------------------------------------------------------------------------ grammar processor
def test_json_schema_processor(tiny_arch, char_tokenizer):
    from hf_decoding_ext.structured.json_schema import JsonSchemaLogitsProcessor

    _, model = tiny_arch
    schema = {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"],
              "additionalProperties": False}
    proc = JsonSchemaLogitsProcessor.for_model(model, char_tokenizer, schema)
    ids = torch.tensor([char_tokenizer("answer in json:")["input_ids"]])
    free = _greedy(model, ids, max_new_tokens=24, eos_token_id=2)
    out = _greedy(model, ids, max_new_tokens=24, eos_token_id=2, logits_processor=[proc])
    text = char_tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert isinstance(json.loads(text)["a"], bool) and set(json.loads(text)) == {"a"}
    assert int(out[0, -1]) == 2  # ended with eos once the object closed
    assert not torch.equal(free, out)


# ------------------------------------------------------------------------------------------ every custom loop
@pytest.mark.parametrize("name", LOOPS)
def test_every_loop_runs_or_refuses_naming_the_architecture(tiny_arch, tiny_custom_generate, char_tokenizer, name):
    arch, model = tiny_arch
    spec, loop = tiny_custom_generate(name, model)
    ids = torch.tensor([char_tokenizer("hello world, this")["input_ids"]])  # 17 tokens: past Mistral's window
    mode = dict(do_sample=True, top_k=0) if spec.do_sample else dict(do_sample=False)
    torch.manual_seed(0)
    if arch in SLIDING and name in REFUSED_ON_SLIDING:
        with pytest.raises(ValueError, match=f"sliding-window attention of {type(model).__name__}"):
            model.generate(ids, custom_generate=loop, max_new_tokens=6, pad_token_id=0, **mode)
        return
    if arch in REFUSED_ARCHITECTURES.get(name, ()):
        with pytest.raises(ValueError, match=f"unsupported architecture {type(model).__name__}"):
            model.generate(ids, custom_generate=loop, max_new_tokens=6, pad_token_id=0, **mode)
        return
    out = model.generate(ids, custom_generate=loop, max_new_tokens=6, pad_token_id=0, **mode)
    assert out.shape[1] <= ids.shape[1] + 6 and torch.equal(out[:, : ids.shape[1]], ids.expand(out.shape[0], -1))
    assert int(out.min()) >= 0 and int(out.max()) < 128
    if name in ENGINE_LOOPS and name != "speculative-contrastive" and spec.lossless:  # lossless drafters, greedy
        if spec.do_sample:  # a sampling default (multi-draft schemes): check the greedy mode too
            out = model.generate(ids, custom_generate=loop, max_new_tokens=6, pad_token_id=0, do_sample=False)
        assert torch.equal(out, _greedy(model, ids, max_new_tokens=6))


def _degenerate(name):
    from hf_decoding_ext.sampling.adadec import AdaDec
    from hf_decoding_ext.sampling.ips import IsotropicProximalSearch
    from hf_decoding_ext.structured.lexical_dba import DynamicBeamAllocation

    return {"adadec": (AdaDec(math.inf), {}), "ips": (IsotropicProximalSearch(alpha=1.0), {}),
            "lexical-dba": (DynamicBeamAllocation([]), {"num_beams": 3})}[name]


@pytest.mark.parametrize("name", ["adadec", "ips", "lexical-dba"])
def test_degenerate_loops_equal_transformers_with_left_padding(tiny_arch, name):
    # AdaDec with an infinite threshold is greedy, IPS with alpha=1 is greedy, DBA without constraints is beam search
    _, model = tiny_arch
    loop, kw = _degenerate(name)
    ids, mask = _batch()
    ref = _greedy(model, ids, attention_mask=mask, max_new_tokens=8, **kw)
    assert torch.equal(_greedy(model, ids, attention_mask=mask, max_new_tokens=8, custom_generate=loop, **kw), ref)


@pytest.mark.parametrize("name", ["adadec", "lexical-dba"])
def test_prefilled_user_cache_on_every_architecture(tiny_arch, name):
    _, model = tiny_arch
    loop, kw = _degenerate(name)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]])
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids[:, :7], cache=cache, use_cache=True)
    ref = _greedy(model, ids, max_new_tokens=6, **kw)
    if name == "lexical-dba":  # beam search: generate() expands input_ids to the beams, the cache must match
        with pytest.raises(ValueError, match="cache holds a batch of 1 rows but input_ids has 3"):
            _greedy(model, ids, max_new_tokens=6, custom_generate=loop, cache=cache, **kw)
        cache.batch_repeat_interleave(kw["num_beams"])
    out = _greedy(model, ids, max_new_tokens=6, custom_generate=loop, cache=cache, **kw)
    assert torch.equal(out, ref)
    assert cache.get_seq_length() > 7
