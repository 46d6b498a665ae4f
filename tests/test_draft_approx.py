"""SpecKV / SpecPC (draft-based approximate inference, arXiv 2506.08373) on tiny models: dense equivalence when the
budget covers the prompt, window kept, budget respected, selection following the scores, SpecPC's spans, argument
validation, batch refusal, and the recomputed attention matching an eager pass."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import perturbed_copy

from hf_decoding_ext.collaboration.draft_approx import (
    QueryCapture,
    SpecKV,
    SpecPC,
    window_attention,
)

N = 60  # prompt tokens


@pytest.fixture(scope="module")
def pair(tiny_llama):
    return tiny_llama, perturbed_copy(tiny_llama, 0.3)  # same vocabulary, a draft that mostly agrees


def _prompt(n=N, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (1, n), generator=gen)


@pytest.mark.parametrize("cls", [SpecKV, SpecPC])
def test_capacity_covering_the_prompt_is_dense_greedy(pair, cls):
    model, draft = pair
    ids = _prompt()
    ref = model.generate(ids, max_new_tokens=10, do_sample=False)
    loop = cls(draft, max_capacity_prompt=N, window_size=8)
    out = model.generate(ids, max_new_tokens=10, do_sample=False, custom_generate=loop)
    assert torch.equal(out, ref)
    assert loop.stats["compressed"] is False and loop.stats["lookahead_tokens"] == 0


def test_speckv_keeps_budget_and_window_per_layer_and_head(pair):
    model, draft = pair
    ids = _prompt()
    loop = SpecKV(draft, max_capacity_prompt=24, window_size=8, lookahead_tokens=5)
    out = model.generate(ids, max_new_tokens=6, do_sample=False, custom_generate=loop, return_dict_in_generate=True)
    assert out.sequences.shape[1] == N + 6
    assert loop.stats["lookahead_tokens"] == 5 and loop.stats["compressed"]
    assert loop.stats["kept_kv_per_layer"] == [24] * model.config.num_hidden_layers
    assert out.draft_approx["kept_kv"] == 24
    window = set(range(N - 9, N - 1))  # the last prompt token is re-run over the compressed cache
    for keep in loop.kept_indices:
        assert keep.shape == (model.config.num_key_value_heads, 24)
        for head in keep.tolist():
            assert window <= set(head) and len(set(head)) == 24 and max(head) < N - 1
    # the compressed cache: 24 kept entries + the re-run last prompt token + the generated tokens but the last; it is
    # not the sequence's, so generate()'s own cache is handed back as it was (empty)
    assert loop.stats["compressed_cache_length"] == 24 + 1 + 5
    assert out.past_key_values.get_seq_length() == 0


def test_speckv_selection_follows_the_scores(pair, monkeypatch):
    model, draft = pair
    ids = _prompt()
    loop = SpecKV(draft, max_capacity_prompt=12, window_size=4, kernel_size=1, lookahead_tokens=3)
    wanted = {0: [3, 10, 20, 30, 40, 50, 11, 12], 1: [1, 2, 5, 7, 9, 44, 45, 46]}

    def fake(self, model_, layer, queries, positions, keys):
        total = keys.shape[2] - queries.shape[1]
        scores = torch.zeros(keys.shape[1], total)
        for rank, pos in enumerate(wanted[layer]):
            scores[:, pos] = 10.0 - rank
        scores[1] = scores[1].flip(0)  # the second KV head prefers mirrored positions
        return scores

    monkeypatch.setattr(SpecKV, "score_keys", fake)
    model.generate(ids, max_new_tokens=3, do_sample=False, custom_generate=loop)
    window = list(range(N - 5, N - 1))
    for layer, keep in enumerate(loop.kept_indices):
        total = N + 3 - (4 + 3 + 1)
        assert keep[0].tolist() == sorted(wanted[layer]) + window
        assert keep[1].tolist() == sorted(total - 1 - p for p in wanted[layer]) + window


def test_speckv_pooling_spreads_the_scores(pair):
    loop = SpecKV(pair[1], max_capacity_prompt=10, window_size=2, kernel_size=3)
    scores = torch.zeros(1, 40)
    scores[0, 10], scores[0, 30] = 5.0, 4.0
    assert loop.select(scores, 6).tolist() == [[9, 10, 11, 29, 30, 31]]


def test_specpc_keeps_top_tokens_neighbours_and_window(pair, monkeypatch):
    model, draft = pair
    ids = _prompt()
    loop = SpecPC(draft, max_capacity_prompt=20, window_size=6, kernel_size=1, neighbor_tokens=3)
    scores = torch.zeros(N)
    scores[10], scores[30], scores[45], scores[20] = 4.0, 3.0, 2.0, 1.0

    monkeypatch.setattr(SpecPC, "score_tokens", lambda self, ids_, eos=None: (scores, 1))
    out = model.generate(ids, max_new_tokens=4, do_sample=False, custom_generate=loop)
    window = list(range(N - 6, N))
    kept = loop.kept_indices.tolist()
    assert len(kept) == 20 and set(window) <= set(kept)
    assert {9, 10, 11, 29, 30, 31, 44, 45, 46, 19, 20, 21} <= set(kept)  # 18, then 2 from a tied (zero-score) span
    assert loop.stats["kept_prompt_tokens"] == 20
    # the target generated from the compressed prompt, at contiguous positions
    ref = model.generate(ids[:, kept], max_new_tokens=4, do_sample=False)
    assert torch.equal(out[0, N:], ref[0, 20:])


def test_specpc_cut_keeps_the_best_spans_first(pair):
    loop = SpecPC(pair[1], max_capacity_prompt=8, window_size=2, kernel_size=1, neighbor_tokens=3)
    scores = torch.zeros(40)
    scores[10], scores[20], scores[30] = 3.0, 2.0, 1.0
    # window (38, 39), then 10 with its neighbours (10, 9, 11), then 20 (20, 19, 21): cut at 8
    assert loop.select(scores).tolist() == [9, 10, 11, 19, 20, 21, 38, 39]


def test_specpc_real_scores_select_capacity_and_window(pair):
    model, draft = pair
    ids = _prompt()
    loop = SpecPC(draft, max_capacity_prompt=24, window_size=8, kernel_size=4, lookahead_tokens=3)
    out = model.generate(ids, max_new_tokens=5, do_sample=False, custom_generate=loop)
    kept = loop.kept_indices.tolist()
    assert out.shape[1] == N + 5 and len(kept) == 24 and set(range(N - 8, N)) <= set(kept)
    assert loop.stats["lookahead_tokens"] == 3


def test_specpc_skips_the_first_draft_layer_by_default(pair, monkeypatch):
    """Issue 25: the paper's SpecPC configurations skip the early draft layers (starting_layer_index 8); with layer 0
    counted, its broad attention outranked the needle of a 2K-token passkey prompt for the 4-layer draft."""
    import hf_decoding_ext.collaboration.draft_approx as da

    draft = pair[1]
    ids = _prompt()

    def fake(model_, layer, queries, positions, keys):
        probs = torch.zeros(model_.config.num_attention_heads, queries.shape[1], keys.shape[2])
        probs[:, :, 5 if layer == 0 else 40] = 1.0  # layer 0 looks at token 5, layer 1 at token 40
        return probs

    monkeypatch.setattr(da, "window_attention", fake)
    default = SpecPC(draft, max_capacity_prompt=24, window_size=8)
    assert default.starting_layer_index == 1
    scores, _ = default.score_tokens(ids)
    assert int(scores.argmax()) == 40 and float(scores[5]) == 0.0
    every = SpecPC(draft, max_capacity_prompt=24, window_size=8, starting_layer_index=0)
    scores, _ = every.score_tokens(ids)
    assert float(scores[5]) > 0.0 and float(scores[40]) > 0.0
    one_layer = copy.deepcopy(draft)
    one_layer.model.layers = one_layer.model.layers[:1]
    one_layer.config.num_hidden_layers = 1
    assert SpecPC(one_layer, max_capacity_prompt=24, window_size=8).starting_layer_index == 0


def test_window_attention_matches_eager(tiny_llama):
    from transformers import LlamaForCausalLM

    eager = LlamaForCausalLM._from_config(tiny_llama.config, attn_implementation="eager").eval()
    eager.load_state_dict(tiny_llama.state_dict())
    ids = _prompt(30)
    w = 7
    with torch.no_grad(), QueryCapture(eager, w) as cap:
        out = eager(ids, output_attentions=True, use_cache=True)
    for layer in range(2):
        got = window_attention(eager, layer, cap.queries(layer), torch.arange(30 - w, 30),
                               out.past_key_values.layers[layer].keys)
        torch.testing.assert_close(got, out.attentions[layer][0, :, -w:, :].float(), atol=1e-5, rtol=1e-4)


def test_arguments_are_validated(pair):
    draft = pair[1]
    with pytest.raises(ValueError, match="0"):
        SpecKV(draft, max_capacity_prompt=0)
    with pytest.raises(ValueError, match="odd"):
        SpecKV(draft, kernel_size=4)
    with pytest.raises(ValueError, match="64"):
        SpecKV(draft, max_capacity_prompt=32, window_size=64)
    with pytest.raises(ValueError, match="-1"):
        SpecKV(draft, lookahead_tokens=-1)
    with pytest.raises(ValueError, match="None"):
        SpecKV(None)
    with pytest.raises(ValueError, match="True"):
        SpecPC(draft, window_size=True)
    with pytest.raises(ValueError, match="-2"):
        SpecPC(draft, neighbor_tokens=-2)
    with pytest.raises(ValueError, match="5"):
        SpecPC(draft, starting_layer_index=5)
    with pytest.raises(ValueError, match="'yes'"):
        SpecPC(draft, weighted_query="yes")


@pytest.mark.parametrize("cls", [SpecKV, SpecPC])
def test_batch_and_padding_refused(pair, cls):
    model, draft = pair
    ids = torch.cat([_prompt(), _prompt(seed=2)])
    with pytest.raises(ValueError, match="batch size 1"):
        model.generate(ids, max_new_tokens=2, do_sample=False, custom_generate=cls(draft, max_capacity_prompt=24,
                                                                                   window_size=8))
    mask = torch.ones(1, N, dtype=torch.long)
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="unpadded"):
        model.generate(_prompt(), attention_mask=mask, max_new_tokens=2, do_sample=False,
                       custom_generate=cls(draft, max_capacity_prompt=24, window_size=8))


def test_gpt2_refused(tiny_gpt2):
    loop = SpecKV(perturbed_copy(tiny_gpt2, 0.3), max_capacity_prompt=24, window_size=8)
    with pytest.raises(ValueError, match="Llama-style"):
        tiny_gpt2.generate(_prompt(), max_new_tokens=2, do_sample=False, custom_generate=loop)
