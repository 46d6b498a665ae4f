"""Small/large collaboration and draft-based approximate inference on the default model pair (issue 25): small = the
shipped distilled 4-layer draft, large = SmolLM2-135M-Instruct. Short budgets (one prompt, 20 tokens; a ~700-token
passkey prompt); the trade-off sweeps and needle accuracies are in results/collaboration_eval.json
(scripts/eval_collaboration.py, checked by tests/test_collaboration_eval.py)."""

from __future__ import annotations

import math

import pytest
import torch

from hf_decoding_ext.collaboration.draft_approx import SpecKV, SpecPC
from hf_decoding_ext.collaboration.entropy_adaptive import EntropyAdaptiveDecoding
from hf_decoding_ext.collaboration.foreal import FoReaLDecoding
from hf_decoding_ext.collaboration.speculative_thinking import KEYWORDS, SpeculativeThinking

NEW = 20
INF = math.inf


@pytest.fixture(scope="module")
def pair(smollm):
    from hf_decoding_ext.core.models import encode_prompts
    from hf_decoding_ext.speculative.drafters.draft_model import DraftModelDrafter

    model, tok = smollm
    small = DraftModelDrafter.load_assistant(model, "distilled")
    ids = encode_prompts(tok, "Tom has 3 apples and buys 4 more. How many apples does he have? Explain.")["input_ids"]
    return model, tok, small, ids


def _greedy(model, ids, loop=None, new=NEW, **kw):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                              custom_generate=loop, **kw)


@pytest.fixture(scope="module")
def references(pair):
    model, _, small, ids = pair
    return _greedy(small, ids), _greedy(model, ids)


def test_endpoints_equal_each_models_greedy_real_model(pair, references):
    """Never handing over is the small model's greedy output, always handing over the large model's, for EAD
    (tau = +-inf), FoReaL (p = 0; p = 1 with n = inf) and Speculative Thinking (a trigger that never fires)."""
    model, tok, small, ids = pair
    small_ref, large_ref = references
    assert not torch.equal(small_ref, large_ref)  # the endpoints differ, so the equalities below say something
    never = [EntropyAdaptiveDecoding(small, threshold=INF), FoReaLDecoding(small, tok, p=0.0),
             SpeculativeThinking(small, tok, triggers=("\x00never\x00",))]
    always = [EntropyAdaptiveDecoding(small, threshold=-INF), FoReaLDecoding(small, tok, p=1.0, n=INF)]
    for loop in never:
        out = _greedy(model, ids, loop, return_dict_in_generate=True)
        assert torch.equal(out.sequences, small_ref), type(loop).__name__
        assert out.router["large_fraction"] == 0.0 and out.router["large"]["forwards"] == 0
    for loop in always:
        out = _greedy(model, ids, loop, return_dict_in_generate=True)
        assert torch.equal(out.sequences, large_ref), type(loop).__name__
        assert out.router["large_fraction"] == 1.0


def test_ead_caches_match_recomputation_and_share_falls_with_tau_real_model(pair):
    """A threshold inside the small model's rolling entropies hands over several times; the large model's cache then
    equals a from-scratch forward over the prefix it covers, and the accounting adds up. A lower threshold hands more
    tokens to the large model than a higher one (the paper's knob)."""
    model, _, small, ids = pair
    ref = _greedy(model, ids, EntropyAdaptiveDecoding(small, threshold=INF), return_dict_in_generate=True)
    means = sorted(r["rolling_entropy"] for r in ref.router_steps)
    shares = []
    for tau in (means[len(means) // 4], means[3 * len(means) // 4]):
        loop = EntropyAdaptiveDecoding(small, threshold=tau)
        out = _greedy(model, ids, loop, return_dict_in_generate=True)
        r = out.router
        assert r["small"]["tokens_produced"] + r["large"]["tokens_produced"] == out.sequences.shape[1] - ids.shape[1]
        shares.append(r["large_fraction"])
        if r["handovers"] >= 2:
            seq = out.sequences
            n = out.past_key_values.get_seq_length()
            with torch.no_grad():
                fresh = model(seq[:, :n], use_cache=True).past_key_values
            for got, want in zip(out.past_key_values.layers, fresh.layers):
                torch.testing.assert_close(got.keys, want.keys, atol=2e-4, rtol=1e-3)
                torch.testing.assert_close(got.values, want.values, atol=2e-4, rtol=1e-3)
            small_cache = loop.last_run.small_cache
            with torch.no_grad():
                fresh = small(seq[:, : small_cache.get_seq_length()], use_cache=True).past_key_values
            for got, want in zip(small_cache.layers, fresh.layers):
                torch.testing.assert_close(got.keys, want.keys, atol=2e-4, rtol=1e-3)
    assert 1.0 > shares[0] > shares[1] >= 0.0


def test_foreal_leader_writes_each_sentence_start_real_model(pair):
    """With p = 1 and n = 3 the large model writes exactly the first min(3, L) tokens of every sentence (24 tokens:
    the small model ends the first sentence after 22)."""
    model, tok, small, ids = pair
    out = _greedy(model, ids, FoReaLDecoding(small, tok, p=1.0, n=3), new=24, return_dict_in_generate=True)
    steps = out.router_steps
    assert max(r["sentence"] for r in steps) >= 1  # at least two sentences
    for r in steps:
        assert r["model"] == ("large" if r["in_sentence"] < 3 else "small"), r
    assert 0.0 < out.router["large_fraction"] < 1.0


def test_speculative_thinking_large_model_only_after_triggers_real_model(pair):
    """With newline / full-stop triggers and a keyword set that makes every snippet reflective, the large model
    writes, and only in the spans a trigger opened (the reflective snippet's tokens, then a verify span)."""
    model, tok, small, ids = pair
    every = {**KEYWORDS, "positive": (*KEYWORDS["positive"], " ", "\n")}
    loop = SpeculativeThinking(small, tok, triggers=("\n", "."), keywords=every, snippet_tokens=4, verify_tokens=4)
    out = _greedy(model, ids, loop, return_dict_in_generate=True)
    assert out.router["large"]["tokens_produced"] > 0 and out.router["speculative_thinking"]["reflective"] >= 1
    left = 0
    for r in out.router_steps:
        if r["model"] == "inserted":
            continue
        if r.get("action") == "reflect":
            assert r.get("trigger")
            left = 4
        elif r.get("action") == "verify":
            left = 4
        assert (r["model"] == "large") == (left > 0), r
        left = max(left - 1, 0)


def _passkey(tok, n_tokens=700):
    from hf_decoding_ext.bench.needle import passkey_prompt

    return passkey_prompt(tok, n_tokens, "52804", 0.4)


@pytest.mark.parametrize("cls", [SpecKV, SpecPC])
def test_draft_approx_on_a_passkey_prompt_real_model(pair, cls):
    """A capacity covering the prompt is dense greedy; a capacity of 256 of ~700 prompt tokens keeps 256 KV entries per
    layer (SpecKV) or 256 prompt tokens (SpecPC), shrinks the target's KV memory by the compression ratio, and hands
    the caller's cache back unchanged (the compressed cache is not the sequence's)."""
    from transformers import DynamicCache

    model, tok, small, _ = pair
    ids = _passkey(tok)
    n = ids.shape[1]
    assert 600 < n <= 700
    dense = cls(small, max_capacity_prompt=n)
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             custom_generate=dense)
    assert torch.equal(out, ref) and not dense.stats["compressed"]
    full_bytes = dense.stats["target_kv_bytes"]
    loop = cls(small, max_capacity_prompt=256)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             custom_generate=loop, cache=cache, return_dict_in_generate=True)
    st = loop.stats
    assert st["compressed"] and out.past_key_values is cache and cache.get_seq_length() == 0
    if cls is SpecKV:
        assert st["kept_kv_per_layer"] == [256] * model.config.num_hidden_layers
        assert st["lookahead_tokens"] >= 1
    else:
        assert st["kept_prompt_tokens"] == 256 and n - 1 in st["kept_indices"]
    assert st["target_kv_bytes"] == pytest.approx(full_bytes * 256 / n, rel=0.01)
    assert out.sequences.shape[1] == n + 6 and torch.equal(out.sequences[:, :n], ids)
