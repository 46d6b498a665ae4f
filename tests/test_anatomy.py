"""Model anatomy (core/anatomy.py): accessors, early-exit logits and the layer-skip / early-exit view, on the tiny
Llama and GPT-2 models (2 decoder layers each)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

from hf_decoding_ext.core.anatomy import (LayerSubsetCache, crop_layers, decoder, decoder_layers, early_exit,
                                          embeddings, exit_logits, final_norm, layer_subset_model, lm_head,
                                          num_layers, skip_layers)
from hf_decoding_ext.core.models import truncated_model

PROMPTS = torch.tensor([[0, 0, 5, 6, 7, 8, 9], [9, 10, 11, 12, 13, 14, 15]])  # row 0 left-padded (pad = 0)
MASK = (PROMPTS != 0).long()
REAL = MASK.bool()  # positions whose logits are compared (padded queries are meaningless)


def _pos(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _cache(out):
    return out["cache"] if "cache" in out else out["past_key_values"]


@torch.no_grad()
def _full(model, ids=PROMPTS, mask=MASK, **kw):
    return model(input_ids=ids, attention_mask=mask, position_ids=_pos(mask), use_cache=False, **kw)


@torch.no_grad()
def _incremental(model, ids=PROMPTS, mask=MASK, prefill=3, cache=None):
    """Logits of every position: a prefill of ``prefill`` tokens, then one token at a time with the cache."""
    pos = _pos(mask)
    kw = {} if cache is None else {"past_key_values": cache}
    out = model(input_ids=ids[:, :prefill], attention_mask=mask[:, :prefill], position_ids=pos[:, :prefill], **kw)
    cache, logits = _cache(out), [out.logits]
    for t in range(prefill, ids.shape[1]):
        out = model(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=pos[:, t:t + 1],
                    past_key_values=cache)
        cache = _cache(out)
        logits.append(out.logits)
    return torch.cat(logits, dim=1), cache


def _close(got, want, atol=1e-5):
    torch.testing.assert_close(got[REAL], want[REAL], rtol=0, atol=atol)


# --------------------------------------------------------------------------------------------- accessors
def test_accessors_find_the_modules(tiny_model):
    if hasattr(tiny_model, "transformer"):  # GPT-2
        base = tiny_model.transformer
        want = (base, base.h, base.ln_f, base.wte)
    else:  # Llama
        base = tiny_model.model
        want = (base, base.layers, base.norm, base.embed_tokens)
    got = (decoder(tiny_model), decoder_layers(tiny_model), final_norm(tiny_model), embeddings(tiny_model))
    assert all(g is w for g, w in zip(got, want))
    assert lm_head(tiny_model) is tiny_model.lm_head
    assert num_layers(tiny_model) == tiny_model.config.num_hidden_layers == 2


@torch.no_grad()
def test_exit_logits_at_the_last_layer_is_the_models_logits(tiny_model):
    seen = {}
    last = decoder_layers(tiny_model)[-1]
    handle = last.register_forward_hook(lambda m, a, out: seen.update(h=out[0] if isinstance(out, tuple) else out))
    try:
        out = _full(tiny_model, output_hidden_states=True)
    finally:
        handle.remove()
    _close(exit_logits(seen["h"], tiny_model), out.logits.float())
    head_only = exit_logits(seen["h"], tiny_model, norm=False)
    assert torch.equal(head_only, tiny_model.lm_head(seen["h"]).float())
    assert (head_only - out.logits).abs().max() > 1e-2  # the norm matters: the head alone is not the model
    # an intermediate layer exits through the same norm and head
    manual = tiny_model.lm_head(final_norm(tiny_model)(out.hidden_states[1])).float()
    assert torch.equal(exit_logits(out.hidden_states[1], tiny_model), manual)


# --------------------------------------------------------------------------------------------- the view
@torch.no_grad()
def test_every_layer_kept_equals_the_full_model(tiny_model):
    view = skip_layers(tiny_model, keep=[0, 1])
    full = _full(tiny_model, output_hidden_states=True)
    got = view(input_ids=PROMPTS, attention_mask=MASK, position_ids=_pos(MASK), use_cache=False,
               output_hidden_states=True)
    _close(got.logits, full.logits, atol=1e-6)
    assert len(got.hidden_states) == len(full.hidden_states) == 3
    for g, w in zip(got.hidden_states, full.hidden_states):
        torch.testing.assert_close(g[REAL], w[REAL], rtol=0, atol=1e-6)
    # incremental decoding with the view's own cache, with left padding
    inc, cache = _incremental(view)
    ref, _ = _incremental(tiny_model)
    _close(inc, ref, atol=1e-6)
    _close(inc, full.logits)
    assert isinstance(cache, LayerSubsetCache) and cache.get_seq_length() == PROMPTS.shape[1]
    # weights shared, never copied; the full model's hidden states are not doubled by the view's capture
    model_params = {id(p) for p in tiny_model.parameters()}
    assert {id(p) for p in view.parameters()} <= model_params
    assert len(_full(tiny_model, output_hidden_states=True).hidden_states) == 3


@torch.no_grad()
def test_early_exit_view_equals_the_truncated_model(tiny_model):
    view, small = early_exit(tiny_model, 1), truncated_model(tiny_model, 1)
    assert view.keep == (0,) and view.config.num_hidden_layers == small.config.num_hidden_layers == 1
    got, want = view(input_ids=PROMPTS, attention_mask=MASK, position_ids=_pos(MASK), use_cache=False), _full(small)
    _close(got.logits, want.logits, atol=1e-6)
    _close(got.logits, exit_logits(_full(tiny_model, output_hidden_states=True).hidden_states[1], tiny_model))
    inc, cache = _incremental(view)
    inc_small, _ = _incremental(small)
    _close(inc, inc_small)
    _close(inc, want.logits)
    # the view's own cache holds the kept layer only
    assert [layer.get_seq_length() for layer in cache.layers] == [PROMPTS.shape[1], 0]
    assert embeddings(small).weight.data_ptr() == embeddings(tiny_model).weight.data_ptr()  # truncated: shared too


def _surgery(model, keep):
    """An independent reference: a deep copy of ``model`` with the other decoder layers deleted and the kept ones
    renumbered (attention ``layer_idx``) as a model of ``len(keep)`` layers."""
    ref = copy.deepcopy(model)
    layers = decoder_layers(ref)
    name = next(n for n, child in decoder(ref).named_children() if child is layers)
    kept = torch.nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    setattr(decoder(ref), name, kept)
    ref.config.num_hidden_layers = len(keep)
    return ref


@torch.no_grad()
def test_a_skipped_layer_changes_the_output_and_equals_surgery(tiny_model):
    view = skip_layers(tiny_model, keep=[1])  # skip layer 0
    got = view(input_ids=PROMPTS, attention_mask=MASK, position_ids=_pos(MASK), use_cache=False).logits
    full = _full(tiny_model).logits
    exit1 = early_exit(tiny_model, 1)(input_ids=PROMPTS, attention_mask=MASK, position_ids=_pos(MASK),
                                       use_cache=False).logits
    assert (got - full)[REAL].abs().max() > 1e-2 and (got - exit1)[REAL].abs().max() > 1e-2
    ref = _surgery(tiny_model, [1])
    _close(got, _full(ref).logits)
    # incremental decoding with the view's cache equals a full forward of the view (layer 1 writes slot 1 only)
    inc, cache = _incremental(view)
    _close(inc, got)
    _close(inc, _incremental(ref)[0])
    assert [layer.get_seq_length() for layer in cache.layers] == [0, PROMPTS.shape[1]]
    assert cache.get_seq_length() == PROMPTS.shape[1]
    cache.crop(-2)  # relative crop: from the kept layers' length
    assert [layer.get_seq_length() for layer in cache.layers] == [0, PROMPTS.shape[1] - 2]
    cache.crop(3)  # positive: an absolute length
    assert [layer.get_seq_length() for layer in cache.layers] == [0, 3]
    # the model itself is unchanged
    torch.testing.assert_close(_full(tiny_model).logits, full, rtol=0, atol=0)


@torch.no_grad()
def test_shared_cache_mode_leaves_the_full_cache_usable_after_cropping(tiny_model):
    prompt, mask = PROMPTS[:, :5], MASK[:, :5]
    drafts = PROMPTS[:, 5:]  # two tokens drafted with the early exit on the full model's cache
    out = tiny_model(input_ids=prompt, attention_mask=mask, position_ids=_pos(mask))
    cache, length = _cache(out), prompt.shape[1]
    skipped = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers[1:]]
    view = early_exit(tiny_model, 1, share_cache=True)
    pos = _pos(MASK)
    draft_logits = []
    for t in range(drafts.shape[1]):
        got = view(input_ids=drafts[:, t:t + 1], attention_mask=MASK[:, :length + t + 1],
                   position_ids=pos[:, length + t:length + t + 1], past_key_values=cache)
        assert _cache(got) is cache  # the caller's cache object comes back
        draft_logits.append(got.logits)
    # the kept layer's entries were computed by the full model for the prefix: the same as the view's own
    own = early_exit(tiny_model, 1)(input_ids=PROMPTS, attention_mask=MASK, position_ids=pos, use_cache=False)
    torch.testing.assert_close(torch.cat(draft_logits, 1), own.logits[:, length:], rtol=0, atol=1e-5)
    # the skipped layer's entries are untouched; the kept layer grew
    assert cache.layers[0].get_seq_length() == length + drafts.shape[1]
    for layer, (k, v) in zip(cache.layers[1:], skipped):
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)
    # crop back (absolute length), then the full model continues on its cache as if nothing happened
    crop_layers(cache, length)
    assert all(layer.get_seq_length() == length for layer in cache.layers)
    nxt = tiny_model(input_ids=drafts, attention_mask=MASK, position_ids=pos[:, length:], past_key_values=cache)
    torch.testing.assert_close(nxt.logits, _full(tiny_model).logits[:, length:], rtol=0, atol=1e-5)


@torch.no_grad()
def test_shared_cache_mode_skipping_the_first_layer(tiny_model):
    """Layer 0 skipped: sequence lengths and mask sizes come from the kept layer, slot 0 is never written."""
    prompt, mask = PROMPTS[:, :5], MASK[:, :5]
    cache = _cache(tiny_model(input_ids=prompt, attention_mask=mask, position_ids=_pos(mask)))
    k0 = cache.layers[0].keys.clone()
    view = skip_layers(tiny_model, keep=[1], share_cache=True)
    pos = _pos(MASK)
    for t in range(2):
        out = view(input_ids=PROMPTS[:, 5 + t:6 + t], attention_mask=MASK[:, :6 + t],
                   position_ids=pos[:, 5 + t:6 + t], past_key_values=cache)
        assert out.logits.shape == (2, 1, 128)
    assert torch.equal(cache.layers[0].keys, k0) and cache.layers[1].get_seq_length() == 7
    crop_layers(cache, 5)
    assert [layer.get_seq_length() for layer in cache.layers] == [5, 5]
    with pytest.raises(ValueError, match="length"):
        crop_layers(cache, -1)


@torch.no_grad()
def test_hidden_states_of_view_and_model_do_not_mix(tiny_model):
    """transformers' hidden-state hooks live on the (shared) layer modules: whoever runs first, each layer carries one
    set, so the model keeps N + 1 hidden states and the view gets len(keep) + 1."""
    fresh = type(tiny_model)(tiny_model.config).eval()  # never run with output_hidden_states yet
    view = skip_layers(fresh, keep=[1])
    for _ in range(2):
        got = view(input_ids=PROMPTS, attention_mask=MASK, position_ids=_pos(MASK), use_cache=False,
                   output_hidden_states=True)
        assert len(got.hidden_states) == 2
        assert len(_full(fresh, output_hidden_states=True).hidden_states) == 3
    ref = _full(fresh, output_hidden_states=True).hidden_states
    torch.testing.assert_close(got.hidden_states[0], ref[0], rtol=0, atol=0)  # the input of the first kept layer


@torch.no_grad()
def test_layer_subset_model_is_a_plain_model_without_cache(tiny_model):
    shell = layer_subset_model(tiny_model, [0, 1])
    assert type(shell) is type(tiny_model) and decoder_layers(shell)[1] is decoder_layers(tiny_model)[1]
    assert decoder(shell) is not decoder(tiny_model)  # only the containers are new
    _close(_full(shell).logits, _full(tiny_model).logits, atol=1e-6)


# --------------------------------------------------------------------------------------------- errors
class Weird(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks_of_something = torch.nn.ModuleList([torch.nn.Linear(2, 2)])


def test_unknown_architecture_and_bad_arguments(tiny_model):
    for fn in (decoder_layers, final_norm, lm_head, embeddings, num_layers, lambda m: skip_layers(m, [0])):
        with pytest.raises(ValueError, match="Weird"):
            fn(Weird())
    for keep in ([], [2], [-1], [1, 0], [0, 0], [0.5]):
        with pytest.raises(ValueError, match=r"keep|out of range"):
            skip_layers(tiny_model, keep)
    with pytest.raises(ValueError, match=r"\[1, 0\]"):  # the bad value is quoted
        skip_layers(tiny_model, [1, 0])
    for n in (0, 3, True):
        with pytest.raises(ValueError):
            early_exit(tiny_model, n)
    ids = PROMPTS[:, :2]
    with pytest.raises(ValueError, match="own cache"):  # the own-cache view refuses the full model's cache
        early_exit(tiny_model, 1)(input_ids=ids, past_key_values=DynamicCache(config=tiny_model.config))
    with pytest.raises(ValueError, match="full model's cache"):
        early_exit(tiny_model, 1, share_cache=True)(input_ids=ids)
    with pytest.raises(ValueError, match="num_layers"):
        truncated_model(tiny_model, 2)
