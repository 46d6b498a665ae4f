"""SWIFT (arXiv 2410.06916): sub-layer skipping in core/anatomy.py and the on-the-fly self-speculative drafter."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch

from hf_decoding_ext.core.anatomy import (
    PartialDecoderLayer,
    crop_layers,
    decoder_layers,
    skip_layers,
    skip_sublayers,
    sublayer_parameters,
)
from hf_decoding_ext.speculative import SpeculativeDecoding
from hf_decoding_ext.speculative.drafters.swift import (
    SWIFTDrafter,
    _GaussianProcessUCB,
    confidence_fanout,
    swift_tree,
)


@pytest.fixture(scope="module")
def llama6():
    """A tiny random 6-layer Llama (SWIFT's candidates are the sub-layers of layers 1..4)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def _ids(seed, n=10, vocab=64):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (1, n), generator=g)


# ------------------------------------------------------------------------------------------------ sub-layer view
def test_nothing_skipped_is_the_full_model_bit_for_bit(llama6):
    ids = _ids(0)
    with torch.no_grad():
        full = llama6(ids, use_cache=True)
        view = skip_sublayers(llama6)
        out = view(input_ids=ids)
        assert torch.equal(out.logits, full.logits)
        nxt = torch.tensor([[5]])
        step_full = llama6(nxt, past_key_values=full.past_key_values).logits
        step_view = view(input_ids=nxt, past_key_values=out.past_key_values).logits
    assert torch.equal(step_full, step_view)
    # every sub-layer run by the partial wrapper is the layer itself
    layer = decoder_layers(llama6)[2]
    h = torch.randn(1, 4, 32)
    pos = torch.arange(4)[None]
    emb = llama6.model.rotary_emb(h, pos)
    with torch.no_grad():
        assert torch.equal(PartialDecoderLayer(layer, True, True)(h, position_embeddings=emb, position_ids=pos,
                                                                   attention_mask=None),
                           layer(h, position_embeddings=emb, position_ids=pos, attention_mask=None))


def test_whole_layer_skip_equals_skip_layers(llama6):
    ids = _ids(1)
    with torch.no_grad():
        a = skip_sublayers(llama6, attention=[2, 4], mlp=[2, 4])
        b = skip_layers(llama6, [0, 1, 3, 5])
        oa, ob = a(input_ids=ids), b(input_ids=ids)
        assert torch.equal(oa.logits, ob.logits)
        nxt = torch.tensor([[7]])
        assert torch.equal(a(input_ids=nxt, past_key_values=oa.past_key_values).logits,
                           b(input_ids=nxt, past_key_values=ob.past_key_values).logits)
    assert a.keep == b.keep == (0, 1, 3, 5)


class _Zero(torch.nn.Module):
    """Computes nothing useful: returns zeros shaped like the input (the compute-then-zero reference)."""

    def __init__(self, tuple_out):
        super().__init__()
        self.tuple_out = tuple_out

    def forward(self, hidden_states=None, *args, **kwargs):
        z = torch.zeros_like(hidden_states)
        return (z, None) if self.tuple_out else z


def test_skipped_sublayers_add_nothing_and_are_never_run(llama6):
    ids = _ids(2)
    attention, mlp = [1, 3], [2, 3, 4]
    reference = copy.deepcopy(llama6)  # the full model with those sub-layers replaced by zeros
    for i in attention:
        decoder_layers(reference)[i].self_attn = _Zero(True)
    for i in mlp:
        decoder_layers(reference)[i].mlp = _Zero(False)
    calls = []
    hooks = [decoder_layers(llama6)[i].self_attn.register_forward_hook(lambda *a, i=i: calls.append(("attn", i)))
             for i in range(6)]
    hooks += [decoder_layers(llama6)[i].mlp.register_forward_hook(lambda *a, i=i: calls.append(("mlp", i)))
              for i in range(6)]
    try:
        with torch.no_grad():
            out = skip_sublayers(llama6, attention=attention, mlp=mlp)(input_ids=ids, use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        ref = reference(ids, use_cache=False).logits
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert sorted(i for k, i in calls if k == "attn") == [0, 2, 4, 5]  # skipped ones never called
    assert sorted(i for k, i in calls if k == "mlp") == [0, 1, 5]
    with torch.no_grad():
        assert not torch.allclose(out, llama6(ids).logits, atol=1e-4)


def test_shared_cache_is_ragged_and_cropped_back(llama6):
    ids = _ids(3, 12)
    with torch.no_grad():
        ref = llama6(torch.cat([ids, torch.tensor([[9]])], 1)).logits[:, -1]
        out = llama6(ids[:, :-1], use_cache=True)
        cache = out.past_key_values
        view = skip_sublayers(llama6, attention=[1, 3], mlp=[2], share_cache=True)
        assert view.attention_layers == (0, 2, 4, 5)
        step = view(input_ids=ids[:, -1:], past_key_values=cache)
        step = view(input_ids=torch.tensor([[9]]), past_key_values=cache)
        assert step.past_key_values is cache
        lengths = [cache.layers[i].get_seq_length() for i in range(6)]
        assert lengths == [13, 11, 13, 11, 13, 13]  # skipped attention neither reads nor writes its KV
        crop_layers(cache, 11)
        full = llama6(torch.cat([ids[:, -1:], torch.tensor([[9]])], 1), past_key_values=cache).logits[:, -1]
    torch.testing.assert_close(full, ref, rtol=1e-5, atol=1e-5)


def test_hidden_states_and_parameter_counts(llama6):
    ids = _ids(4)
    view = skip_sublayers(llama6, attention=[1], mlp=[2, 3], share_cache=False)
    with torch.no_grad():
        out = view(input_ids=ids, output_hidden_states=True)
        full = llama6(ids, output_hidden_states=True)
    assert len(out.hidden_states) == 7 and len(full.hidden_states) == 7  # the view hooks its partial layers
    assert torch.equal(out.hidden_states[0], full.hidden_states[0])
    assert torch.equal(out.hidden_states[1], full.hidden_states[1])  # layer 0 runs in full
    assert not torch.allclose(out.hidden_states[2], full.hidden_states[2])
    sizes = sublayer_parameters(llama6)
    assert sizes["total"] == sum(p.numel() for p in llama6.parameters())  # tied weights counted once


def test_unsupported_architectures_and_bad_sets(llama6, tiny_gpt2):
    with pytest.raises(ValueError, match="sub-layer skipping"):
        skip_sublayers(tiny_gpt2, attention=[0])
    with pytest.raises(ValueError, match="out of range"):
        skip_sublayers(llama6, attention=[6])
    with pytest.raises(ValueError, match="repeats"):
        skip_sublayers(llama6, mlp=[1, 1])
    with pytest.raises(ValueError, match="at least one must run"):
        skip_sublayers(llama6, attention=range(6), mlp=range(6))
    with pytest.raises(ValueError, match="sub-layer skipping"):
        SWIFTDrafter()._setup(tiny_gpt2)


# ------------------------------------------------------------------------------------------------ drafter pieces
def test_confidence_fanout_and_tree_follow_the_official_bins():
    assert confidence_fanout([0.99, 0.9, 0.6, 0.3]) == [3, 5, 8, 10]
    assert confidence_fanout([0.99, 0.9, 0.6, 0.3], sampling=True) == [1, 3, 5, 10]
    tops = [torch.arange(10) + 10 * d for d in range(3)]
    tree = swift_tree(tops, [3, 5, 1])
    assert tree.tokens.tolist() == [0, 1, 2, 10, 11, 12, 13, 14, 20]
    assert tree.parents.tolist() == [-1, -1, -1, 0, 0, 0, 0, 0, 3]  # alternatives hang off the top-1 chain
    assert tree.depth.tolist() == [1, 1, 1, 2, 2, 2, 2, 2, 3]


def test_arguments_are_validated():
    for kwargs in ({"skip_ratio": 1.0}, {"skip_ratio": 0}, {"opt_interval": 0}, {"context_window": 1.5},
                   {"max_score": 1.5}, {"stop_threshold": -0.1}, {"tree": 1}, {"top_k": 5},
                   {"initial": [1, 2, 3]}, {"kappa": -1.0}, {"seed": None}):
        with pytest.raises(ValueError, match=re.escape(repr(next(iter(kwargs.values()))))):
            SWIFTDrafter(**kwargs)


def test_gaussian_process_prefers_the_better_region():
    gp = _GaussianProcessUCB(kappa=0.0, n_warmup=512)
    rng = np.random.default_rng(0)
    for _ in range(30):
        x = rng.random(4)
        gp.register(x, float(-((x - 0.8) ** 2).sum()))
    point = gp.suggest(4, np.random.default_rng(1))
    assert point.shape == (4,) and (point >= 0).all() and (point <= 1).all()
    assert -((point - 0.8) ** 2).sum() > max(gp.y) - 0.05  # exploits the fitted optimum


# ------------------------------------------------------------------------------------------------ matchness
def test_matchness_in_one_forward_equals_token_by_token(llama6):
    ids = _ids(5, 8)
    out = llama6.generate(ids, max_new_tokens=20, do_sample=False)
    d = SWIFTDrafter(context_window=6)
    d._setup(llama6)
    start = ids.shape[1]
    attention, mlp = (1, 3), (2, 4)
    with torch.no_grad():
        cache = llama6(out[:, :-1], use_cache=True).past_key_values
        score = d.matchness(llama6, cache, out, torch.ones_like(out), start, attention, mlp)
        assert all(cache.layers[i].get_seq_length() == out.shape[1] - 1 for i in range(6))  # cropped back
        # token by token: the prompt's KV from the full model, then the draft one token at a time
        prompt_cache = llama6(out[:, :start], use_cache=True).past_key_values
        view = skip_sublayers(llama6, attention=attention, mlp=mlp, share_cache=True)
        hits = 0
        for i in range(6):
            logits = view(input_ids=out[:, start + i: start + i + 1], past_key_values=prompt_cache).logits
            hits += int(logits[0, -1].argmax() == out[0, start + i + 1])
    assert score == hits / 6
    assert d.stats["opt_forwards"] == 1 and d.stats["opt_tokens"] == 7


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_token_identical_to_greedy_with_the_optimiser_running(llama6, seed):
    ids = _ids(10 + seed, 6 + seed)
    ref = llama6.generate(ids, max_new_tokens=30, do_sample=False)
    d = SWIFTDrafter(context_window=4, bayes_interval=4, tree=seed != 1, seed=seed, max_score=1.0)
    loop = SpeculativeDecoding(d)
    out = llama6.generate(ids, max_new_tokens=30, do_sample=False, custom_generate=loop)
    assert torch.equal(out, ref)
    assert d.stats["opt_iter"] >= 8 and d.stats["bayes_iter"] >= 2  # random and Bayesian proposals both ran
    assert d.stats["draft_forwards"] > 0 and d.stats["opt_forwards"] == d.stats["opt_iter"] + 1
    # a second prompt continues the same optimisation (the task stream) and stays exact
    ids2 = _ids(20 + seed, 7)
    out2 = llama6.generate(ids2, max_new_tokens=16, do_sample=False, custom_generate=loop)
    assert torch.equal(out2, llama6.generate(ids2, max_new_tokens=16, do_sample=False))
    if seed != 1:
        assert max(st.draft_size for st in loop.last_stats) > 1  # a tree, not only a chain


def test_optimiser_never_keeps_a_worse_set(llama6):
    ids = _ids(30, 6)
    d = SWIFTDrafter(context_window=6, bayes_interval=3, max_score=1.0)
    llama6.generate(ids, max_new_tokens=40, do_sample=False, custom_generate=SpeculativeDecoding(d))
    steps = [h for h in d.history if h["kind"] != "incumbent"]
    assert len(steps) >= 8
    best = d.history[0]["score"]
    for h in steps:
        assert h["incumbent"] == best
        assert h["kept"] == (h["score"] > best)
        best = max(best, h["score"])
    assert d.score == best
    # the kept set really scores what was recorded (recomputed on the final sequence's window)
    out = llama6.generate(ids, max_new_tokens=40, do_sample=False)
    with torch.no_grad():
        cache = llama6(out[:, :-1], use_cache=True).past_key_values
        again = d.matchness(llama6, cache, out, torch.ones_like(out), ids.shape[1], d.attention, d.mlp)
    assert again == d.score


def test_stop_criteria(llama6):
    ids = _ids(31, 6)
    d = SWIFTDrafter(context_window=6, max_score=0.0)  # any positive score stops the search
    llama6.generate(ids, max_new_tokens=30, do_sample=False, custom_generate=SpeculativeDecoding(d))
    assert not d.optimizing and (d.score > 0.0)
    d = SWIFTDrafter(context_window=6, max_score=1.0, max_opt_iter=3)
    llama6.generate(ids, max_new_tokens=40, do_sample=False, custom_generate=SpeculativeDecoding(d))
    assert not d.optimizing and d.stats["opt_iter"] == 4  # stops once opt_iter > max_opt_iter, as the code does
    d = SWIFTDrafter(context_window=6, max_score=1.0, max_tolerance_iter=0, initial=((1, 2, 3, 4), (1, 2, 3, 4)))
    llama6.generate(ids, max_new_tokens=40, do_sample=False, custom_generate=SpeculativeDecoding(d))
    assert not d.optimizing and d.tolerance_iter == 1  # one iteration without improvement is over the tolerance
    d = SWIFTDrafter(optimization=False)
    llama6.generate(ids, max_new_tokens=40, do_sample=False, custom_generate=SpeculativeDecoding(d))
    assert d.stats["opt_forwards"] == 0 and d.skip_sets() == ((1, 3), (1, 3))  # the every-other-layer set


def test_sampling_runs_and_batches_are_refused(llama6):
    ids = _ids(40, 6)
    torch.manual_seed(0)
    d = SWIFTDrafter(context_window=6)
    out = llama6.generate(ids, max_new_tokens=20, do_sample=True, custom_generate=SpeculativeDecoding(d, seed=0))
    assert 6 < out.shape[1] <= 26 and (out[0, 6:] < 64).all()
    with pytest.raises(ValueError):
        llama6.generate(torch.cat([ids, ids]), max_new_tokens=4, do_sample=False,
                        custom_generate=SpeculativeDecoding(SWIFTDrafter()))


# ------------------------------------------------------------------------------------------------ real model
@pytest.mark.real_model
def test_real_model_token_identical_with_optimisation(smollm):
    from hf_decoding_ext.bench.parity import greedy_parity, greedy_references
    from hf_decoding_ext.bench.prompts import interleaved_prompts

    model, tokenizer = smollm
    refs = greedy_references(model, tokenizer, interleaved_prompts(3), 32)
    d = SWIFTDrafter(context_window=8)  # the optimiser runs within 32 tokens
    report = greedy_parity(model, {"do_sample": False, "custom_generate": SpeculativeDecoding(d)}, refs, 32)
    assert report.mismatches == []
    assert d.stats["opt_iter"] > 0 and d.stats["draft_forwards"] > 0
    assert report.tokens / report.forwards >= 1.0
    assert 0.6 < d.cost_fraction() < 0.8  # the shared embedding/LM head keeps a 45-50% skip at ~0.65-0.7


def test_bayesian_proposal_works_under_inference_mode():
    gp = _GaussianProcessUCB(n_warmup=64, refine_steps=3)
    rng = np.random.default_rng(0)
    for _ in range(5):
        gp.register(rng.random(6), float(rng.random()))
    with torch.inference_mode():  # the parity helpers and generate() callers may run under it
        point = gp.suggest(6, rng)
    assert point.shape == (6,) and (point >= 0).all() and (point <= 1).all()


@pytest.mark.real_model
@pytest.mark.slow
def test_real_model_optimised_set_accepts_more_than_the_initial_set(smollm):
    """The procedure behind results/swift_acceptance.json (about 15 minutes on a busy 2-core CPU): on-the-fly
    optimisation over one distillation prompt per category (up to 112 tokens each), then the optimised and the initial
    every-other-layer sets, both frozen, on 4 benchmark prompts x 64 greedy tokens."""
    from hf_decoding_ext.bench.prompts import interleaved_prompts, load_distill_prompts
    from hf_decoding_ext.core.models import encode_prompts

    model, tokenizer = smollm
    opt = SWIFTDrafter()
    loop = SpeculativeDecoding(opt)
    for row in load_distill_prompts(limit=1):
        enc = encode_prompts(tokenizer, row["prompt"], device=model.device)
        model.generate(**enc, max_new_tokens=112, do_sample=False, custom_generate=loop)
    assert opt.stats["opt_iter"] > 50 and opt.stats["bayes_iter"] >= 2
    rates = {}
    for name, d in (("initial", SWIFTDrafter(optimization=False)),
                    ("optimised", SWIFTDrafter(optimization=False, initial=(opt.attention, opt.mlp)))):
        loop = SpeculativeDecoding(d)
        tokens = forwards = 0
        for row in interleaved_prompts(4):
            enc = encode_prompts(tokenizer, row["prompt"], device=model.device)
            out = model.generate(**enc, max_new_tokens=64, do_sample=False, custom_generate=loop)
            assert torch.equal(out, model.generate(**enc, max_new_tokens=64, do_sample=False))
            tokens += loop.summary()["tokens"]
            forwards += loop.summary()["steps"]
        rates[name] = tokens / forwards
    assert rates["optimised"] >= rates["initial"], rates
