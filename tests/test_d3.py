"""D^3 (Position-Aware Depth Decay Decoding, arXiv 2503.08524): the schedule, its nesting, the executed layers and
their keys/values (observed with hooks on the decoder layers), equality with an independent identity-skip reference,
alpha = 1 equals generate(), and a quality-versus-alpha measurement on SmolLM2-135M."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from transformers import DynamicCache

from hf_decoding_ext.core.anatomy import decoder_layers
from hf_decoding_ext.speculative.d3 import (
    D3Decoding,
    d3_cost,
    d3_layer_count,
    d3_layer_set,
)

N_LAYERS = 8


def _deep_llama(layers: int = N_LAYERS):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def _deep_gpt2(layers: int = N_LAYERS):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=layers, n_head=4, n_positions=512,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def deep_llama():
    return _deep_llama()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def deep_model(request):
    return _deep_llama() if request.param == "llama" else _deep_gpt2()


def _prompt(seed: int, length: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (1, length), generator=g)


def _generate(model, ids, loop=None, **kw):
    kw.setdefault("max_new_tokens", 12)
    kw.setdefault("do_sample", False)
    if loop is not None:
        kw["custom_generate"] = loop
    return model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=0, **kw)


@torch.no_grad()
def _identity_skip_reference(model, ids, layer_sets):
    """Independent reference: the *full* model, one token at a time on a plain DynamicCache, with forward hooks that
    turn the decoder layers outside the step's layer set into the identity (their output is replaced by their input;
    the keys/values they write are never read by a kept layer under a nested schedule)."""
    layers = decoder_layers(model)
    skipped: set[int] = set()

    def hook(module, args, kwargs, output):
        if id(module) not in skipped:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    handles = [layer.register_forward_hook(hook, with_kwargs=True) for layer in layers]
    cache, seq = DynamicCache(config=model.config), ids
    try:
        for keep in layer_sets:
            skipped.clear()
            skipped.update(id(layer) for j, layer in enumerate(layers) if j not in keep)
            cached = cache.get_seq_length()
            out = model(input_ids=seq[:, cached:], cache=cache, use_cache=True)
            seq = torch.cat([seq, out.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    finally:
        for h in handles:
            h.remove()
    return seq


# ------------------------------------------------------------------------------------------------- schedule
def test_layer_count_is_the_power_law_with_a_floor():
    assert [d3_layer_count(30, 0.9, i) for i in range(5)] == [30, 27, 24, 21, 19]
    assert [d3_layer_count(32, 0.95, i) for i in (0, 1, 10, 40)] == [32, 30, 19, 4]
    assert d3_layer_count(30, 0.5, 50, floor=16) == 16  # floor(30 * 0.5**50) = 0: the core layers remain
    assert all(d3_layer_count(30, 1.0, i) == 30 for i in range(0, 500, 37))
    for total, alpha in [(30, 0.97), (8, 0.8), (12, 0.99)]:
        for i in range(60):
            assert d3_layer_count(total, alpha, i, floor=2) == max(2, math.floor(total * alpha ** i + 1e-9))


@pytest.mark.parametrize("drop_order", ["deep_first", "shallow_first"])
@pytest.mark.parametrize("total,start,tail", [(30, 15, 1), (30, 4, 2), (8, 2, 1), (10, 1, 3)])
def test_layer_sets_are_nested_and_keep_the_core(total, start, tail, drop_order):
    sets = [d3_layer_set(total, kept, start, tail, drop_order) for kept in range(total, start + tail - 1, -1)]
    core = set(range(start)) | set(range(total - tail, total))
    assert sets[0] == tuple(range(total))
    for kept, (bigger, smaller) in zip(range(total - 1, 0, -1), itertools.pairwise(sets)):
        assert len(smaller) == kept and list(smaller) == sorted(smaller)
        assert set(smaller) < set(bigger)  # nested: one flex layer dropped per step
        assert core <= set(smaller)
    assert set(sets[-1]) == core
    dropped = [(set(a) - set(b)).pop() for a, b in itertools.pairwise(sets)]
    flex = list(range(start, total - tail))
    assert dropped == (flex[::-1] if drop_order == "deep_first" else flex)


def test_schedule_of_the_loop_and_the_fraction_flex_start():
    loop = D3Decoding(alpha=0.9, flex_start=0.5, tail_layers=1)
    assert loop.core(30) == (15, 1)
    sets = loop.schedule(30, 40)
    assert [len(s) for s in sets[:5]] == [30, 27, 24, 21, 19]
    assert sets[-1] == tuple(range(15)) + (29,)  # floor(30 * 0.9**39) = 0: the 16 core layers
    assert D3Decoding(alpha=0.9, flex_start=0.01).core(30) == (1, 1)  # at least layer 0 is the head core


@pytest.mark.parametrize("kwargs", [{"alpha": 0.0}, {"alpha": 1.5}, {"alpha": True}, {"alpha": "0.9"},
                                    {"flex_start": 0}, {"flex_start": 1.0}, {"flex_start": -0.2},
                                    {"flex_start": True}, {"tail_layers": 0}, {"tail_layers": 1.0},
                                    {"drop_order": "random"}])
def test_bad_arguments_are_refused_with_the_value_quoted(kwargs):
    with pytest.raises(ValueError, match=repr(next(iter(kwargs.values()))).replace("(", r"\(")):
        D3Decoding(**kwargs)


def test_core_larger_than_the_model_is_refused(deep_llama):
    with pytest.raises(ValueError, match="leave no room"):
        _generate(deep_llama, _prompt(0), D3Decoding(flex_start=8, tail_layers=1))


# ------------------------------------------------------------------------------------------------- mechanics
def test_executed_layers_follow_the_schedule_and_hold_kv_for_every_earlier_position(deep_llama):
    """Hooks on the decoder layers record, for every call, the layer, its query positions and the length of its own
    cache entry before the call: the prompt runs all layers; the forward that predicts token i runs exactly the
    schedule's layers; every executed layer holds keys/values for every earlier position; and no layer runs again
    after a step that skipped it."""
    model = deep_llama
    layers = decoder_layers(model)
    calls: list[tuple[int, list[int], int]] = []

    def pre_hook(j):
        def hook(module, args, kwargs):
            cache = kwargs["cache"]
            calls.append((j, kwargs["position_ids"][0].tolist(), cache.layers[j].get_seq_length()))
        return hook

    handles = [layer.register_forward_pre_hook(pre_hook(j), with_kwargs=True) for j, layer in enumerate(layers)]
    loop = D3Decoding(alpha=0.8, flex_start=2, tail_layers=1)
    ids = _prompt(3)
    try:
        out = _generate(model, ids, loop, max_new_tokens=14)
    finally:
        for h in handles:
            h.remove()
    n_new = out.shape[1] - ids.shape[1]
    assert n_new == 14
    expected = loop.schedule(N_LAYERS, n_new)
    assert loop.layer_sets == expected
    assert [len(s) for s in expected[:5]] == [8, 6, 5, 4, 3] and expected[-1] == (0, 1, 7)
    by_step: dict[int, list[int]] = {}
    for j, positions, cached in calls:
        assert cached == positions[0], f"layer {j} holds {cached} positions but its query starts at {positions[0]}"
        by_step.setdefault(positions[-1], []).append(j)
    prompt_len = ids.shape[1]
    assert by_step[prompt_len - 1] == list(range(N_LAYERS))  # the prefill: the full model
    for i in range(1, n_new):  # the forward on token i-1 (position prompt_len + i - 1) predicts token i
        assert tuple(by_step[prompt_len + i - 1]) == expected[i]
    ran_after_skip = [j for i in range(1, n_new) for j in by_step[prompt_len + i - 1]
                      if any(j not in expected[k] for k in range(i))]
    assert ran_after_skip == []


@pytest.mark.parametrize("drop_order", ["deep_first", "shallow_first"])
@pytest.mark.parametrize("seed", [0, 1])
def test_equals_the_identity_skip_reference(deep_model, drop_order, seed):
    """The loop (a layer-skip view on the full model's cache) gives the same tokens as the full model with the
    skipped layers turned into the identity by hooks, and it does change the output (the mechanism is live)."""
    loop = D3Decoding(alpha=0.85, flex_start=2, tail_layers=1, drop_order=drop_order)
    ids = _prompt(seed)
    out = _generate(deep_model, ids, loop, max_new_tokens=12)
    ref = _identity_skip_reference(deep_model, ids, loop.layer_sets)
    assert torch.equal(out, ref)
    assert min(loop.layer_counts) == 3 < N_LAYERS


def test_sliding_window_model_equals_the_identity_skip_reference():
    """Mistral with a 6-token sliding window, past the window: the same tokens as the identity-skip reference; the
    returned cache stays ragged there (a full sliding window cannot be cropped; documented)."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1,
                        eos_token_id=2, pad_token_id=0, sliding_window=6)
    model = MistralForCausalLM(cfg).eval()
    loop = D3Decoding(alpha=0.8, flex_start=1)
    ids = _prompt(4, 9)
    out = _generate(model, ids, loop, max_new_tokens=12, eos_token_id=None)
    assert out.shape[1] == 21 and min(loop.layer_counts) == 2
    assert torch.equal(out, _identity_skip_reference(model, ids, loop.layer_sets))


def test_decay_changes_the_scores(deep_model):
    """The skipped layers matter: the processed scores of the decayed steps differ from the full model's."""
    ids = _prompt(0)
    kw = {"max_new_tokens": 8, "return_dict_in_generate": True, "output_scores": True}
    full = _generate(deep_model, ids, **kw)
    loop = D3Decoding(alpha=0.7, flex_start=1)
    d3 = _generate(deep_model, ids, loop, **kw)
    assert torch.equal(d3.scores[0], full.scores[0])  # the first token: the prefill, full depth
    assert not torch.allclose(d3.scores[1], full.scores[1])  # the second: 5 of 8 layers


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_decay_is_token_identical_to_greedy_generate(deep_model, seed):
    ids = _prompt(seed, length=4 + seed)
    loop = D3Decoding(alpha=1.0)
    out = _generate(deep_model, ids, loop, max_new_tokens=16)
    assert torch.equal(out, _generate(deep_model, ids, max_new_tokens=16))
    assert loop.layer_counts == [N_LAYERS] * 16


def test_no_decay_sampling_equals_generate_sampling(deep_llama):
    ids = _prompt(5)
    kw = {"max_new_tokens": 12, "do_sample": True, "temperature": 0.8, "top_k": 20}
    torch.manual_seed(11)
    ref = _generate(deep_llama, ids, **kw)
    torch.manual_seed(11)
    out = _generate(deep_llama, ids, D3Decoding(alpha=1.0), **kw)
    assert torch.equal(out, ref)


def test_sampling_with_decay_runs_the_schedule(deep_llama):
    loop = D3Decoding(alpha=0.8, flex_start=2)
    torch.manual_seed(0)
    out = _generate(deep_llama, _prompt(1), loop, max_new_tokens=10, do_sample=True, temperature=1.2)
    assert out.shape[1] == 16 and loop.layer_sets == loop.schedule(N_LAYERS, 10)


def test_batch_with_left_padding_equals_row_by_row(deep_model):
    loop = D3Decoding(alpha=0.85, flex_start=2)
    a, b = _prompt(17, 7), _prompt(18, 4)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], dim=1)])
    mask = torch.cat([torch.ones(1, 7, dtype=torch.long), torch.tensor([[0, 0, 0, 1, 1, 1, 1]])])
    out = deep_model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                              eos_token_id=None, custom_generate=loop)
    assert out.shape[1] == 17
    assert loop.layer_counts == [len(s) for s in loop.schedule(N_LAYERS, 10)]
    for row, single in ((0, a), (1, b)):
        alone = _generate(deep_model, single, D3Decoding(alpha=0.85, flex_start=2), max_new_tokens=10,
                          eos_token_id=None)
        assert torch.equal(out[row, 7:], alone[0, single.shape[1]:])


def test_eos_scores_and_a_consistent_final_cache(deep_llama):
    ids = _prompt(2)
    loop = D3Decoding(alpha=0.8, flex_start=2)
    free = _generate(deep_llama, ids, loop, max_new_tokens=12)
    eos = int(free[0, ids.shape[1] + 5])  # the 6th generated token becomes eos: generation stops there
    out = _generate(deep_llama, ids, D3Decoding(alpha=0.8, flex_start=2), max_new_tokens=12, eos_token_id=eos)
    first = (out[0, ids.shape[1]:] == eos).nonzero()[0, 0].item()
    assert out.shape[1] == ids.shape[1] + first + 1 and torch.equal(out[0], free[0, :out.shape[1]])
    res = _generate(deep_llama, ids, loop, max_new_tokens=9, return_dict_in_generate=True, output_scores=True,
                    output_logits=True)
    assert len(res.scores) == len(res.logits) == 9 == len(res.d3_layer_counts)
    assert torch.equal(res.sequences[0, ids.shape[1]:], torch.stack(res.scores).argmax(-1)[:, 0])
    lengths = {layer.get_seq_length() for layer in res.past_key_values.layers}
    assert len(lengths) == 1  # cropped to the prefix every layer holds: a consistent cache
    assert lengths.pop() == ids.shape[1]  # the first step after the prefill already skipped a layer


def test_cost_accounting(deep_llama):
    sets = D3Decoding(alpha=0.8, flex_start=2).schedule(N_LAYERS, 10)
    cost = d3_cost(deep_llama, sets)
    per_layer = sum(p.numel() for p in decoder_layers(deep_llama)[0].parameters())
    total = sum(p.numel() for p in deep_llama.parameters())
    units = sum(len(s) for s in sets) / 10
    assert cost["layer_units"] == pytest.approx(units)
    assert cost["depth_fraction"] == pytest.approx(units / N_LAYERS)
    assert cost["param_fraction"] == pytest.approx(1 - (N_LAYERS - units) * per_layer / total)
    assert d3_cost(deep_llama, [tuple(range(N_LAYERS))])["param_fraction"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="empty"):
        d3_cost(deep_llama, [])


# ------------------------------------------------------------------------------------------------- real model
@torch.no_grad()
def _continuation_logprob(model, sequences, prompt_len: int, eos: int | None) -> float:
    """Mean log-probability, under the full model, of the generated tokens up to and including the first eos
    (batch 1; the pads after it are not counted)."""
    gen = sequences[0, prompt_len:]
    hit = (gen == eos).nonzero() if eos is not None else gen.new_zeros((0, 1))
    if len(hit):
        sequences = sequences[:, :prompt_len + int(hit[0, 0]) + 1]
    logits = model(sequences).logits[0, prompt_len - 1:-1].float()
    target = sequences[0, prompt_len:]
    return torch.log_softmax(logits, -1).gather(-1, target[:, None]).mean().item()


@pytest.mark.real_model
def test_real_model_no_decay_identity_and_decay_accounting(smollm):
    """SmolLM2-135M, 2 prompts x 24 tokens: alpha = 1 is token-identical to greedy generate(); the default decay
    (alpha 0.99, flex layers from layer 10, shallowest dropped first) runs the schedule (30, 29, 29, 29, 28, ...),
    touches a measured fraction of the parameters and still writes text the full model finds plausible (mean
    log-probability of the continuation under the full model far above the uniform -log(49152) = -10.8)."""
    from hf_decoding_ext.bench.prompts import interleaved_prompts
    from hf_decoding_ext.core.models import encode_prompts

    model, tokenizer = smollm
    eos = tokenizer.eos_token_id
    for row in interleaved_prompts(2):
        enc = encode_prompts(tokenizer, row["prompt"])
        n = enc["input_ids"].shape[1]
        ref = model.generate(**enc, max_new_tokens=24, do_sample=False)
        assert torch.equal(model.generate(**enc, max_new_tokens=24, do_sample=False,
                                          custom_generate=D3Decoding(alpha=1.0)), ref)
        loop = D3Decoding()
        out = model.generate(**enc, max_new_tokens=24, do_sample=False, custom_generate=loop)
        gen = out.shape[1] - n
        assert loop.layer_sets == loop.schedule(30, gen)
        assert [len(s) for s in loop.layer_sets[:5]] == [30, 29, 29, 29, 28][:gen]
        cost = d3_cost(model, loop.layer_sets)
        m = min(gen, ref.shape[1] - n)
        agree = (out[0, n:n + m] == ref[0, n:n + m]).float().mean().item()
        lp_d3, lp_greedy = _continuation_logprob(model, out, n, eos), _continuation_logprob(model, ref, n, eos)
        print(f"{row['id']}: layer units {cost['layer_units']:.2f}/30, param fraction {cost['param_fraction']:.3f}, "
              f"agreement with greedy {agree:.2f}, mean log-prob D3 {lp_d3:.2f} vs greedy {lp_greedy:.2f}")
        if gen > 4:
            assert cost["param_fraction"] < 0.98
        assert lp_d3 > -5.0


ALPHAS = (1.0, 0.995, 0.99, 0.98, 0.95)


@pytest.mark.slow
@pytest.mark.real_model
def test_real_model_quality_versus_alpha_on_arithmetic(smollm):
    """The quality-versus-alpha curve (registry figures): 8 synthetic arithmetic word problems, 48 new tokens,
    greedy, default flex layers: exact match (the last number of the continuation), token agreement with greedy,
    mean full-model log-probability of the continuation, layer units per token and parameter fraction."""
    import re

    from hf_decoding_ext.core.models import encode_prompts
    from hf_decoding_ext.core.resources import read_jsonl

    model, tokenizer = smollm
    rows = read_jsonl("fast_cot", "arithmetic.jsonl")[:8]
    encs = [encode_prompts(tokenizer, r["question"] + " Answer with the number only.") for r in rows]
    refs = [model.generate(**e, max_new_tokens=48, do_sample=False) for e in encs]

    def last_number(text):
        nums = re.findall(r"-?\d+", text.replace(",", ""))
        return int(nums[-1]) if nums else None

    curve = {}
    for alpha in ALPHAS:
        correct, agree, lps, sets = 0, [], [], []
        for row, enc, ref in zip(rows, encs, refs):
            n = enc["input_ids"].shape[1]
            loop = D3Decoding(alpha=alpha)
            out = model.generate(**enc, max_new_tokens=48, do_sample=False, custom_generate=loop)
            correct += last_number(tokenizer.decode(out[0, n:], skip_special_tokens=True)) == row["answer"]
            m = min(out.shape[1], ref.shape[1]) - n
            agree.append((out[0, n:n + m] == ref[0, n:n + m]).float().mean().item())
            lps.append(_continuation_logprob(model, out, n, tokenizer.eos_token_id))
            sets += loop.layer_sets
        cost = d3_cost(model, sets)
        curve[alpha] = (correct / len(rows), sum(agree) / len(agree), sum(lps) / len(lps), cost["layer_units"],
                        cost["param_fraction"])
        print(f"alpha {alpha}: exact match {curve[alpha][0]:.2f}, agreement {curve[alpha][1]:.2f}, mean log-prob "
              f"{curve[alpha][2]:.2f}, layer units {curve[alpha][3]:.2f}/30, param fraction {curve[alpha][4]:.3f}")
    assert curve[1.0][1] == 1.0
    assert curve[0.95][3] < curve[0.99][3] < 30
