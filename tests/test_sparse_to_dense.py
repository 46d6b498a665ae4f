"""Sparse-to-Dense (arXiv 2505.19155), text-only: the attention probe, the top-K selection, the positions of the
sparse draft, losslessness and the paper's long-input property.

- the probe ``window_importance`` equals the model's own attention weights (eager attention) summed over a window of
  queries and over each key/value head's query heads;
- the selection keeps, per layer, the ``top_k`` positions of highest accumulated attention of the last ``recent``
  queries plus the recent tail, and the draft cache is exactly that (plus the tokens committed since);
- the sparse draft is the dense model restricted to those positions: its tokens equal a dense forward masked (4D) to
  the same positions at the true positions (RoPE keys gathered out of place stay right);
- ``top_k`` >= the context: the draft is the dense greedy continuation, every draft token is accepted;
- greedy output is token-identical to greedy ``generate()`` (several prompts, budgets, per-head / per-layer
  selection, refreshed selection) and sampling is exact in distribution;
- the real default model (default run): a ~2k-token public-domain document, identical to greedy with a 64-position
  budget; ``slow``: 4 prompts x 32 tokens identical to greedy (sparse and dense budgets, the dense one accepting
  every draft token) and the 2-8k-token acceptance-versus-K curve.
"""

from __future__ import annotations

import copy

import pytest
import torch

from hf_decoding_ext.speculative import SpeculativeDecoding
from hf_decoding_ext.speculative.drafters.sparse_to_dense import (
    SparseToDenseDrafter,
    window_importance,
)


def _run(model, ids, drafter, **kw):
    """``(output, drafts, loop)``: the drafts proposed at each step are recorded."""
    seen = []
    orig = drafter.propose

    def spy(state):
        draft = orig(state)
        seen.append(draft.tree.tokens.tolist())
        return draft

    drafter.propose = spy
    loop = SpeculativeDecoding(drafter)
    try:
        out = model.generate(ids, pad_token_id=0, custom_generate=loop, **kw)
    finally:
        drafter.propose = orig
    return out, seen, loop


def _prompt(seed, n, vocab=128):
    torch.manual_seed(seed)
    return torch.randint(3, vocab, (1, n))


def test_window_importance_matches_the_models_own_attention(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    model.set_attn_implementation("eager")  # attention weights are returned by the eager kernel only
    ids = _prompt(0, 17)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True, output_attentions=True, use_cache=True)
        pos = torch.arange(17)[None]
        cos, sin = model.model.rotary_emb(out.hidden_states[0], pos)
        for layer in (0, 1):
            block = model.model.layers[layer]
            h = block.input_layernorm(out.hidden_states[layer])[0, -5:]
            imp = window_importance(block.self_attn, h, cos[0, -5:], sin[0, -5:],
                                    out.past_key_values.layers[layer].keys, torch.arange(12, 17))
            own = out.attentions[layer][0, :, -5:]  # (heads, 5, 17): 4 query heads over 2 key/value heads
            expected = own.reshape(2, 2, 5, 17).sum(dim=(1, 2))
            assert torch.allclose(imp, expected, atol=1e-5), (layer, imp, expected)
            # causal: the first query of the window (index 12) gives nothing to the keys after it
            first = window_importance(block.self_attn, h[:1], cos[0, -5:-4], sin[0, -5:-4],
                                      out.past_key_values.layers[layer].keys, torch.tensor([12]))
            assert torch.all(first[:, 13:] == 0) and torch.allclose(first.sum(-1), torch.full((2,), 2.0))


def test_the_selection_is_the_top_k_by_attention_plus_the_recent_tail(tiny_llama):
    ids = _prompt(1, 50)
    drafter = SparseToDenseDrafter(top_k=6, num_tokens=3, recent=8)
    _, drafts, _ = _run(tiny_llama, ids, drafter, max_new_tokens=12, do_sample=False)
    assert drafts[0] == [] and all(len(d) > 0 for d in drafts[1:-1])  # the first step only prefills
    (sel,) = drafter.selections  # selected once, after the prefill
    assert sel["context"] == 50 and sel["tail_start"] == 42 and sel["kept"] == 6 and sel["candidates"] == 42
    # the draft cache: 6 selected positions + the tail from position 42 to the target's cache length
    assert drafter.draft_cache_sizes == [6 + c - 42 for c in drafter.context_sizes]
    # an independent reference: eager attention of the last 8 prompt tokens, per key/value head
    model = copy.deepcopy(tiny_llama)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        att = model(ids, output_attentions=True).attentions[0][0, :, -8:]  # (4 heads, 8, 50)
    scores = att.reshape(2, 2, 8, 50).sum(dim=(1, 2))[:, :42]
    expected = scores.topk(6, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(sel["layer0"], expected)
    # one position set per layer when per_head=False: the summed scores of all heads
    flat = SparseToDenseDrafter(top_k=6, num_tokens=3, recent=8, per_head=False)
    _run(tiny_llama, ids, flat, max_new_tokens=4, do_sample=False)
    pooled = scores.sum(0).topk(6).indices.sort().values
    assert torch.equal(flat.selections[0]["layer0"], pooled[None].expand(2, -1))


def test_the_sparse_draft_is_the_model_masked_to_the_selected_positions():
    """A one-layer model, one position set per layer: each draft token equals the argmax of a dense forward over the
    whole sequence whose 4D mask lets the query see only the selected positions, the recent tail and the tokens
    after it (true positions, RoPE from the dense path)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_decoding_ext.core.tree import additive_mask

    torch.manual_seed(4)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)  # sharper logits: fewer argmax near-ties on a random model
    ids = _prompt(5, 60)
    drafter = SparseToDenseDrafter(top_k=5, num_tokens=4, recent=6, per_head=False)
    out, drafts, _ = _run(model, ids, drafter, max_new_tokens=6, do_sample=False)
    sel = drafter.selections[0]
    keep = set(sel["layer0"][0].tolist())
    seq = out[0, :61].tolist()  # the prompt and the first (prefill) token: the second step drafts after it
    sparse_draft = drafts[1]
    dense_differs = False
    with torch.no_grad():
        for tok in sparse_draft:
            n = len(seq)
            allowed = torch.tril(torch.ones(n, n, dtype=torch.bool))
            allowed[-1, :] = False
            allowed[-1, sorted(keep)] = True
            allowed[-1, sel["tail_start"]:] = True
            logits = model(torch.tensor([seq]), attention_mask=additive_mask(allowed, model.dtype),
                           position_ids=torch.arange(n)[None]).logits[0, -1]
            dense = model(torch.tensor([seq])).logits[0, -1]
            dense_differs |= int(dense.argmax()) != int(logits.argmax())
            assert int(logits.argmax()) == tok
            seq.append(tok)
    assert len(sparse_draft) == 4
    assert torch.equal(out, model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0))


def test_a_budget_covering_the_context_drafts_the_dense_greedy_continuation(tiny_llama):
    ids = _prompt(2, 40)
    ref = tiny_llama.generate(ids, max_new_tokens=25, do_sample=False, pad_token_id=0)
    drafter = SparseToDenseDrafter(top_k=40, num_tokens=4, recent=8)
    out, drafts, loop = _run(tiny_llama, ids, drafter, max_new_tokens=25, do_sample=False)
    assert torch.equal(out, ref)
    assert drafter.draft_cache_sizes == drafter.context_sizes  # the whole cache: sparse = dense
    committed = 40
    for draft, stats in zip(drafts, loop.last_stats):
        assert draft == ref[0, committed: committed + len(draft)].tolist()  # the dense continuation
        assert stats.accepted == stats.draft_size  # 100% acceptance
        committed += stats.appended
    assert sum(s.draft_size for s in loop.last_stats) >= 18


@pytest.mark.parametrize("kw", [{"top_k": 3, "recent": 4}, {"top_k": 10, "recent": 2, "per_head": False},
                                {"top_k": 5, "recent": 4, "refresh_every": 2}, {"top_k": 1, "recent": 1}])
def test_greedy_is_token_identical(tiny_llama, kw):
    for seed, n in ((3, 30), (4, 64), (5, 9)):
        ids = _prompt(seed, n)
        ref = tiny_llama.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0)
        drafter = SparseToDenseDrafter(num_tokens=3, **kw)
        out, _, loop = _run(tiny_llama, ids, drafter, max_new_tokens=20, do_sample=False)
        assert torch.equal(out, ref), (kw, seed)
        if "refresh_every" in kw:  # re-selected every 2 verifications, from the latest queries
            assert len(drafter.selections) == 1 + (len(loop.last_stats) - 1) // 2
            assert [s["context"] for s in drafter.selections] == sorted(s["context"] for s in drafter.selections)


def test_sampling_is_exact_in_distribution():
    from tests.test_speculative_engine import (
        _chi_square_pvalue,
        _exact_sequence_distribution,
        _peaky_tiny_llama,
        _sample_counts,
    )

    target = _peaky_tiny_llama(seed=2, vocab=4)
    prompt = [1, 2, 3, 0, 1, 2, 3, 1, 2]
    exact = _exact_sequence_distribution(target, prompt, length=3, vocab=4)
    drafter = SparseToDenseDrafter(top_k=2, num_tokens=2, recent=2)  # sparse: 2 of 6 kept (token 0 is masked as pad)
    loop = SpeculativeDecoding(drafter)
    n = 300
    counts = _sample_counts(target, prompt, 3, n, loop)
    assert drafter.selections[0]["kept"] == 2 and drafter.selections[0]["candidates"] == 6
    assert _chi_square_pvalue(counts, exact, n) > 1e-3


def test_arguments_and_architectures_are_validated(tiny_gpt2):
    from hf_decoding_ext.speculative.drafters.sparse_to_dense import _attention_module

    for bad in ({"top_k": 0}, {"num_tokens": 1.5}, {"recent": True}, {"per_head": 1}, {"refresh_every": 0}):
        with pytest.raises(ValueError, match=repr(next(iter(bad.values())))):
            SparseToDenseDrafter(**bad)

    class Odd(torch.nn.Module):  # decoder layers without a recognised attention module
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Module()
            self.model.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2)])

    with pytest.raises(ValueError, match="not Odd"):
        _attention_module(Odd(), 0)
    # GPT-2 (absolute positions, no rotation, no grouped heads) is supported: sparse and lossless
    for seed, n in ((6, 40), (7, 25)):
        ids = _prompt(seed, n)
        ref = tiny_gpt2.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0)
        drafter = SparseToDenseDrafter(top_k=4, num_tokens=3, recent=4)
        out, _, _ = _run(tiny_gpt2, ids, drafter, max_new_tokens=16, do_sample=False)
        assert torch.equal(out, ref) and drafter.selections[0]["kept"] == 4


def test_the_registry_builds_it():
    from hf_decoding_ext.registry import get_method

    spec = get_method("StD")
    drafter = spec.build()
    assert isinstance(drafter, SparseToDenseDrafter) and spec.lossless
    assert (drafter.top_k, drafter.num_tokens, drafter.recent) == (spec.defaults["top_k"], spec.defaults[
        "num_tokens"], spec.defaults["recent"])


# ---------------------------------------------------------------------------------------------------- real model
@pytest.mark.slow
@pytest.mark.real_model
def test_real_model_is_token_identical_and_accepts_every_dense_draft(smollm):
    """4 benchmark prompts x 32 tokens: with a 16-position budget (8 recent) the output equals greedy; with the
    default budget (1,024 positions: these prompts fit it, so the draft is the dense model) every draft token is
    accepted. Disagreements are allowed only at floating-point near-ties."""
    from hf_decoding_ext.bench.parity import (
        greedy_parity,
        greedy_references,
        near_tie_tally,
    )
    from hf_decoding_ext.bench.prompts import interleaved_prompts

    model, tokenizer = smollm
    refs = greedy_references(model, tokenizer, interleaved_prompts(4), 32)
    sparse = SpeculativeDecoding(SparseToDenseDrafter(top_k=16, recent=8))
    report = greedy_parity(model, {"custom_generate": sparse, "do_sample": False}, refs, 32)
    assert near_tie_tally(model, refs, report.diverged) <= 1
    dense_drafter = SparseToDenseDrafter()
    dense = SpeculativeDecoding(dense_drafter)
    report = greedy_parity(model, {"custom_generate": dense, "do_sample": False}, refs, 32)
    assert near_tie_tally(model, refs, report.diverged) <= 1
    if not report.mismatches:
        stats = dense.last_stats
        assert all(s.accepted == s.draft_size for s in stats), [(s.accepted, s.draft_size) for s in stats]
    print("StD short prompts: tokens per target forward (dense budget)", report.tokens / report.forwards)


def _long_run(model, tokenizer, n_tokens, budgets, new_tokens=32, num_tokens=4):
    from hf_decoding_ext.core.models import encode_prompts
    from hf_decoding_ext.speculative.drafters.specextend import long_document

    doc = long_document(tokenizer, n_tokens)
    enc = encode_prompts(tokenizer, f"{doc}\n\nSummarize the documentation above in a few sentences.")
    ref = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False)
    figures = {}
    for k in budgets:
        drafter = SparseToDenseDrafter(top_k=k, num_tokens=num_tokens)
        loop = SpeculativeDecoding(drafter)
        out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, custom_generate=loop)
        stats = loop.last_stats[1:]  # after the prefill step
        drafted = sum(s.draft_size for s in stats)
        figures[k] = {"identical": bool(torch.equal(out, ref)),
                      "tokens_per_forward": sum(s.appended for s in stats) / len(stats),
                      "acceptance": sum(s.accepted for s in stats) / max(1, drafted),
                      "kv_fraction": sum(drafter.draft_cache_sizes) / sum(drafter.context_sizes),
                      "all_accepted": all(s.accepted == s.draft_size for s in stats)}
    return enc["input_ids"].shape[1], figures


@pytest.mark.real_model
def test_real_model_long_input_is_token_identical(smollm):
    """A ~2k-token public-domain document to summarise, 24 new tokens: the draft reading 64 selected positions + the
    recent tail (about 4% of the KV) gives greedy's output and accepts a part of its drafts."""
    model, tokenizer = smollm
    n, figures = _long_run(model, tokenizer, 2048, (64,), new_tokens=24)
    print("StD", n, "tokens", figures)
    assert figures[64]["identical"]
    assert figures[64]["kv_fraction"] < 0.06
    assert figures[64]["tokens_per_forward"] > 1.5


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.parametrize("n_tokens", [2048, 4096, 7680])
def test_real_model_acceptance_grows_with_the_budget(smollm, n_tokens):
    """Acceptance versus K on 2-8k-token documents: identical outputs for every K, tokens per target forward
    non-decreasing (up to one step's noise) from K=64 to a K covering the context, where every draft is accepted."""
    model, tokenizer = smollm
    budgets = (64, 256, 1024, 8192)
    n, figures = _long_run(model, tokenizer, n_tokens, budgets)
    print("StD acceptance vs K", n, "tokens", figures)
    assert all(f["identical"] for f in figures.values()), figures
    assert figures[8192]["all_accepted"], figures  # K covers the context: the dense model drafts
    tpf = [figures[k]["tokens_per_forward"] for k in budgets]
    assert tpf[-1] >= max(tpf) - 0.25, figures
