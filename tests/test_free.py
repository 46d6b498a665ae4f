"""FREE (arXiv 2310.05424): shallow-deep early exit with synchronised parallel decoding and the Beta-mixture
threshold."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_cache_equals_recompute
from transformers import (
    DynamicCache,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from hf_decoding_ext.core.anatomy import exit_logits
from hf_decoding_ext.core.scoring import rouge_l
from hf_decoding_ext.speculative.free import (
    BetaMixture1D,
    FREEDecoding,
    softmax_confidence,
)


def _llama(layers=4, seed=0, peaky=20.0):
    """A tiny random Llama whose LM head is scaled up, so that confidences spread over [0, 1]."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(peaky)
    return model


def _gpt2(layers=4, seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=layers, n_head=4, n_positions=256, bos_token_id=1,
                     eos_token_id=2, pad_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # tied: also scales the input embeddings, harmless here
    return model


@pytest.fixture(scope="module")
def llama():
    return _llama()


def _prompt(seed, length=6):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (1, length), generator=gen)


def _greedy(model, ids, n=16):
    return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)


def _free(model, ids, loop, n=16, **kw):
    return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0, custom_generate=loop, **kw)


# ------------------------------------------------------------------------------------------------ threshold 1
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("seed", [0, 1])
def test_threshold_one_equals_full_model_greedy(arch, seed):
    model = _llama(seed=seed) if arch == "llama" else _gpt2(seed=seed)
    ids = _prompt(seed)
    for layer in (1, 3) if seed else (2,):
        loop = FREEDecoding(exit_layer=layer, threshold=1.0, exit_head="plain")
        assert torch.equal(_free(model, ids, loop), _greedy(model, ids))
        assert loop.stats["shallow_tokens"] == 0 and loop.stats["deep_tokens"] == 16
        assert loop.stats["sync_passes"] == 16 and loop.stats["pass_sizes"][1:] == [1] * 15


def test_threshold_one_sampling_equals_generate_sampling(llama):
    ids = _prompt(5)
    torch.manual_seed(11)
    ref = llama.generate(ids, max_new_tokens=12, do_sample=True, top_k=0, pad_token_id=0)
    torch.manual_seed(11)
    out = llama.generate(ids, max_new_tokens=12, do_sample=True, top_k=0, pad_token_id=0,
                         custom_generate=FREEDecoding(exit_layer=2, threshold=1.0, exit_head="plain"))
    assert torch.equal(out, ref)


# ------------------------------------------------------------------------------------------------ the mechanism
class _Checked(FREEDecoding):
    """Checks, after every synchronised pass, that every layer holds KV for every position fed so far and that the
    cache and the deep logits equal a full forward over the same tokens."""

    def __init__(self, model, each_pass=True, tol=1e-5, **kw):
        super().__init__(**kw)
        self.model, self.each_pass, self.tol = model, each_pass, tol
        self.checked_passes = 0
        self.deep = {}  # position -> deep logits
        self.pass_ends = []  # the position whose deep logits gave the emitted token

    def _after_sync(self, state, deep_logits, first_position):
        cur = state.input_ids.shape[1]
        lengths = [layer.get_seq_length() for layer in state.cache.layers]
        assert lengths == [cur] * len(lengths), lengths
        if self.each_pass:
            assert_cache_equals_recompute(self.model, state.cache, state.input_ids, atol=self.tol)
        for k in range(deep_logits.shape[1]):
            self.deep[first_position + k] = deep_logits[0, k]
        self.pass_ends.append(cur - 1)
        self.checked_passes += 1


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sync_pass_fills_every_layer_and_equals_full_forward(arch):
    model = _llama() if arch == "llama" else _gpt2()
    ids = _prompt(3)
    # find a threshold that makes a mix of early exits and deep tokens
    probe = FREEDecoding(exit_layer=2, threshold=1.0, adaptive=False, exit_head="plain")
    _free(model, ids, probe, n=24)
    threshold = float(np.median(probe.stats["confidences"]))
    loop = _Checked(model, exit_layer=2, threshold=threshold, adaptive=True, exit_head="plain", max_updates=0)
    with torch.no_grad():
        out = _free(model, ids, loop, n=24)
    stats = loop.stats
    assert stats["shallow_tokens"] > 0 and stats["deep_tokens"] > 0, stats
    assert max(stats["pass_sizes"][1:]) > 1  # some passes carried stacked early-exited tokens
    assert loop.checked_passes == stats["sync_passes"]
    with torch.no_grad():
        full = model(out).logits[0].float()
    assert loop.deep
    for position, logits in loop.deep.items():
        torch.testing.assert_close(logits, full[position], atol=1e-4, rtol=1e-4)
    # every token emitted after a synchronised pass is the full model's argmax at that position
    for p in loop.pass_ends:
        if p + 1 < out.shape[1]:
            assert int(out[0, p + 1]) == int(full[p].argmax())


def test_early_exits_emit_the_shallow_argmax_and_cache_is_consistent_afterwards(llama):
    ids = _prompt(4)
    loop = FREEDecoding(exit_layer=1, threshold=0.0, adaptive=False, exit_head="plain")
    cache = DynamicCache(config=llama.config)
    out = _free(llama, ids, loop, n=10, cache=cache, return_dict_in_generate=True)
    assert loop.stats["shallow_tokens"] == 10 and loop.stats["sync_passes"] == 0
    # the tokens are the early-exit model's greedy tokens (the first layer + final norm + LM head)
    seq = ids
    for _ in range(10):
        with torch.no_grad():
            hidden = llama(seq, output_hidden_states=True).hidden_states[1][:, -1]
        seq = torch.cat([seq, exit_logits(hidden, llama).argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out.sequences, seq)
    # the shallow layers ran ahead; at the end one deep pass over the stacked tail completes the cache: every layer
    # holds the full model's keys/values of every fed position
    assert loop.stats["final_pass_positions"] == out.sequences.shape[1] - 1
    assert_cache_equals_recompute(llama, cache, out.sequences[:, :-1], atol=1e-5)
    # after a mixed run, greedy generate() resumed from the returned cache continues exactly as from scratch
    loop = FREEDecoding(exit_layer=2, threshold=0.3, adaptive=False, exit_head="plain")
    cache = DynamicCache(config=llama.config)
    out = _free(llama, ids, loop, n=12, cache=cache)
    assert {layer.get_seq_length() for layer in cache.layers} == {out.shape[1] - 1}
    resumed = llama.generate(out, cache=cache, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(resumed, llama.generate(out, max_new_tokens=4, do_sample=False, pad_token_id=0))


def test_custom_exit_head_is_used(llama):
    ids = _prompt(6)

    class Plain(torch.nn.Module):  # the plain exit as a head: same output as exit_head="plain"
        exit_layer = 2

        def forward(self, hidden):
            return exit_logits(hidden, llama)

    a = FREEDecoding(threshold=0.3, adaptive=False, exit_head=Plain())
    b = FREEDecoding(exit_layer=2, threshold=0.3, adaptive=False, exit_head="plain")
    assert torch.equal(_free(llama, ids, a), _free(llama, ids, b))
    assert a.exit_kind == "head" and a.stats["exit_layer"] == 2 and b.exit_kind == "plain"

    class Constant(torch.nn.Module):  # a fully confident head predicting token 7
        exit_layer = 1

        def forward(self, hidden):
            logits = torch.full((*hidden.shape[:-1], 128), -1e4)
            logits[..., 7] = 1e4
            return logits

    loop = FREEDecoding(threshold=0.9, exit_head=Constant())
    out = _free(llama, ids, loop, n=5)
    assert out[0, -5:].tolist() == [7] * 5 and loop.stats["shallow_fraction"] == 1.0
    with pytest.raises(ValueError, match="exit head reads layer 1"):
        _free(llama, ids, FREEDecoding(exit_layer=2, exit_head=Constant()))


def test_exit_head_module_is_run_on_every_position(llama):
    from hf_decoding_ext.speculative.heads.exit_head import ExitHead

    torch.manual_seed(0)
    head = ExitHead.from_base(llama, exit_layer=2)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.05 * torch.randn_like(p))  # not the base layer's copy
    ids = _prompt(11)
    loop = FREEDecoding(threshold=0.0, adaptive=False, exit_head=head)
    out = _free(llama, ids, loop, n=8)
    assert loop.exit_kind == "head" and loop.stats["exit_layer"] == 2 and loop.stats["shallow_fraction"] == 1.0
    seq = ids  # reference: the head over the full model's layer-2 states of the whole sequence, greedily
    for _ in range(8):
        with torch.no_grad():
            hidden = llama(seq, output_hidden_states=True).hidden_states[2]
            seq = torch.cat([seq, head(hidden, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out.shape[1] > ids.shape[1] + 2 and torch.equal(out, seq[:, :out.shape[1]])  # (may stop at eos)
    # threshold 1 is still the full model; a prefilled cache gives the same output (the prompt is recomputed)
    assert torch.equal(_free(llama, ids, FREEDecoding(threshold=1.0, exit_head=head)), _greedy(llama, ids))
    mixed = FREEDecoding(threshold=0.3, adaptive=False, exit_head=head)
    ref = _free(llama, ids, mixed)
    cache = DynamicCache(config=llama.config)
    with torch.no_grad():
        llama(input_ids=ids[:, :4], cache=cache, use_cache=True)
    assert torch.equal(_free(llama, ids, mixed, cache=cache), ref)
    plain = FREEDecoding(exit_layer=2, threshold=1.0, exit_head="plain")
    _free(llama, ids, plain, n=2)
    # the head's own extra layer is paid on every shallow pass
    assert mixed.stats["shallow_pass_params"] == plain.stats["shallow_pass_params"] + head.num_own_parameters()


def test_default_exit_is_the_shipped_head_when_it_fits(llama, tmp_path, monkeypatch):
    from hf_decoding_ext.speculative.heads import exit_head as module

    torch.manual_seed(0)
    module.ExitHead.from_base(llama, exit_layer=3).save_pretrained(tmp_path)
    monkeypatch.setattr(module, "shipped_exit_head_path", lambda *a: tmp_path)
    loop = FREEDecoding(threshold=0.3)
    _free(llama, _prompt(2), loop, n=4)
    assert loop.exit_kind == "head" and loop.stats["exit_layer"] == 3
    elsewhere = FREEDecoding(exit_layer=2, threshold=0.3)  # the shipped head reads layer 3: plain exit at 2
    _free(llama, _prompt(2), elsewhere, n=4)
    assert elsewhere.exit_kind == "plain" and elsewhere.stats["exit_layer"] == 2
    other = FREEDecoding(threshold=0.3)  # a model of another shape: the plain exit after L/4 layers
    _free(_llama(layers=8), _prompt(2), other, n=4)
    assert other.exit_kind == "plain" and other.stats["exit_layer"] == 2
    monkeypatch.setattr(module, "shipped_exit_head_path", lambda *a: tmp_path / "missing")
    absent = FREEDecoding(threshold=0.3)
    _free(llama, _prompt(2), absent, n=4)
    assert absent.exit_kind == "plain" and absent.stats["exit_layer"] == 1


# ------------------------------------------------------------------------------------------------ the threshold
def test_softmax_confidence_is_top1_minus_top2():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    torch.testing.assert_close(softmax_confidence(logits), torch.tensor([0.3]))


def test_bmm_threshold_moves_with_the_calibration_data():
    rng = np.random.default_rng(0)
    agree = rng.beta(8, 2, 400)

    def fitted(disagree):
        x = np.r_[disagree, agree]
        y = np.r_[np.zeros(disagree.size), np.ones(agree.size)]
        return BetaMixture1D().fit(x, y).threshold()

    low = fitted(rng.beta(2, 8, 400))  # disagreements only at low confidence: a low threshold suffices
    high = fitted(rng.beta(6, 3, 400))  # disagreements at fairly high confidence: a stricter threshold
    assert 0.3 <= low < high <= 0.9
    # identical components: the posterior is 0.5 > zeta everywhere -> the lowest grid point; agreement confined to
    # confidences above the grid's top -> the highest grid point
    bmm = BetaMixture1D(alphas=(3, 3), betas=(3, 3))
    assert bmm.threshold() == pytest.approx(0.3)
    assert BetaMixture1D().fit(np.r_[rng.beta(5, 5, 200), rng.beta(200, 10, 200)],
                               np.r_[np.zeros(200), np.ones(200)]).threshold() == pytest.approx(0.9)
    # the official grid: 10 points on [0.3, 0.9]
    assert BetaMixture1D().grid().tolist() == pytest.approx(np.linspace(0.3, 0.9, 10).tolist())


def test_adaptive_threshold_is_refit_between_calls(llama):
    loop = FREEDecoding(exit_layer=2, threshold=0.3, exit_head="plain")
    _free(llama, _prompt(7), loop, n=24)
    assert loop.stats["thresholds"][0] == 0.3 and loop.updates == 0  # warm-up: the initial threshold
    n = len(loop.calibration["confidence"])
    assert n > 0 and set(loop.calibration["agree"]) <= {0, 1}
    _free(llama, _prompt(8), loop, n=24)
    assert loop.updates == 1 and loop.stats["thresholds"][0] == loop.fitted_threshold
    assert np.isclose(np.linspace(0.3, 0.9, 10), loop.fitted_threshold).any()
    frozen = FREEDecoding(exit_layer=2, threshold=0.3, exit_head="plain", max_updates=0)
    _free(llama, _prompt(7), frozen, n=24)
    _free(llama, _prompt(8), frozen, n=24)
    assert frozen.fitted_threshold is None and set(frozen.stats["thresholds"]) == {0.3}
    loop.reset()
    assert loop.updates == 0 and not loop.calibration["confidence"] and loop.current_threshold() == 0.3
    per_pass = FREEDecoding(exit_layer=2, threshold=0.3, exit_head="plain", refit_every_pass=True)
    _free(llama, _prompt(7), per_pass, n=24)
    assert per_pass.updates > 0 and per_pass.stats["thresholds"][-1] == per_pass.fitted_threshold


def test_cost_accounting(llama):
    loop = FREEDecoding(exit_layer=2, threshold=0.0, adaptive=False, exit_head="plain")
    _free(llama, _prompt(9), loop, n=8)
    s = loop.stats
    assert s["shallow_fraction"] == 1.0
    assert s["weight_fraction"] == pytest.approx(s["shallow_pass_params"] / s["full_forward_params"])
    assert s["layers_per_token"] == pytest.approx(2.0)
    loop = FREEDecoding(exit_layer=2, threshold=1.0, exit_head="plain")
    _free(llama, _prompt(9), loop, n=8)
    s = loop.stats  # every token: a shallow pass and a deep pass (the exit's LM head is paid twice)
    assert s["weight_fraction"] == pytest.approx((s["shallow_pass_params"] + s["deep_pass_params"])
                                                 / s["full_forward_params"])
    assert s["layers_per_token"] == pytest.approx(4.0)


# ------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("kwargs, match", [
    ({"exit_layer": 0}, "exit_layer"), ({"threshold": 1.5}, "threshold"), ({"adaptive": "yes"}, "adaptive"),
    ({"exit_head": "deep"}, "exit_head"), ({"confidence": "meta"}, "confidence"), ({"zeta": 1.0}, "zeta"),
    ({"grid": (0.9, 0.3)}, "grid"), ({"resolution": 1}, "resolution"), ({"max_updates": -1}, "max_updates"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FREEDecoding(**kwargs)


def test_refuses_batches_and_out_of_range_layers(llama):
    with pytest.raises(ValueError, match="batch size 1"):
        llama.generate(torch.randint(3, 128, (2, 5)), max_new_tokens=2, do_sample=False, pad_token_id=0,
                       custom_generate=FREEDecoding(exit_layer=1))
    with pytest.raises(ValueError, match="exit_layer must be in"):
        _free(llama, _prompt(1), FREEDecoding(exit_layer=4, exit_head="plain"))


# ------------------------------------------------------------------------------------------------ real model
@pytest.mark.real_model
def test_real_model_threshold_one_is_greedy_and_sync_is_exact(smollm):
    from hf_decoding_ext.bench.parity import greedy_references
    from hf_decoding_ext.bench.prompts import interleaved_prompts

    model, tokenizer = smollm
    refs = greedy_references(model, tokenizer, interleaved_prompts(2), 16)
    loop = FREEDecoding(exit_layer=8, threshold=1.0, exit_head="plain")
    for _, enc, ref in refs:
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=16, do_sample=False, custom_generate=loop)
        assert torch.equal(out, ref)
    # the default exit on SmolLM2 is the shipped self-distilled ExitHead (after 6 layers) when it is present
    from hf_decoding_ext.speculative.heads.exit_head import shipped_exit_head_path

    if (shipped_exit_head_path() / "model.safetensors").is_file():
        default = FREEDecoding(threshold=1.0)
        with torch.no_grad():
            out = model.generate(**refs[1][1], max_new_tokens=8, do_sample=False, custom_generate=default)
        assert default.exit_kind == "head" and default.stats["exit_layer"] == 6
        assert torch.equal(out, refs[1][2][:, :out.shape[1]])
    # an early-exiting run: every synchronised pass leaves all 30 layers holding every position; the cache and the
    # deep logits equal the full model's forward over the same tokens
    _, enc, _ = refs[0]
    loop = _Checked(model, each_pass=False, exit_layer=8, threshold=0.3, exit_head="plain", max_updates=0)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=16, do_sample=False, custom_generate=loop, cache=cache)
    assert loop.checked_passes == loop.stats["sync_passes"] > 0 and loop.stats["shallow_tokens"] > 0
    assert max(loop.stats["pass_sizes"][1:]) > 1
    deep_len = cache.get_seq_length()
    assert deep_len >= max(loop.deep) + 1
    assert_cache_equals_recompute(model, cache, out[:, :deep_len], atol=2e-4)
    with torch.no_grad():
        full = model(out).logits[0].float()
    for position, logits in loop.deep.items():
        torch.testing.assert_close(logits, full[position], atol=2e-3, rtol=1e-3)


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.parametrize("exit_head", ["plain", None])
def test_real_model_shallow_fraction_quality_and_cost(smollm, exit_head):
    """Reported figures (printed): fraction of tokens from the shallow exit, ROUGE-L and positional token agreement
    against full greedy, weight reads per token, for the paper's defaults (adaptive threshold starting at 0.9), with
    the plain early exit after L/4 = 8 layers or the default exit (the shipped ExitHead when present), over 6 prompts
    x 32 tokens. Helper's run: plain exit, shallow fraction 0.357, ROUGE-L 0.426, weight reads 0.929 of a full
    forward; shipped ExitHead (layer 6), shallow fraction 0.016, ROUGE-L 1.000, weight reads 1.224."""
    from hf_decoding_ext.bench.prompts import interleaved_prompts
    from hf_decoding_ext.core.models import encode_prompts

    model, tokenizer = smollm
    loop = FREEDecoding(exit_layer=8 if exit_head == "plain" else None, exit_head=exit_head)
    shallow = tokens = 0
    weight = rouge = agree = 0.0
    rows = interleaved_prompts(6)
    for row in rows:
        enc = encode_prompts(tokenizer, row["prompt"], device=model.device)
        n = enc["input_ids"].shape[1]
        with torch.no_grad():
            ref = model.generate(**enc, max_new_tokens=32, do_sample=False)[0, n:].tolist()
            out = model.generate(**enc, max_new_tokens=32, do_sample=False, custom_generate=loop)[0, n:].tolist()
        s = loop.stats
        shallow += s["shallow_tokens"]
        tokens += s["tokens"]
        weight += s["weight_fraction"] * s["tokens"]
        rouge += rouge_l(out, ref) / len(rows)
        agree += sum(a == b for a, b in zip(out, ref)) / len(ref) / len(rows)
    print(f"FREE {loop.exit_kind} exit @{loop.stats['exit_layer']}: shallow fraction {shallow / tokens:.3f}, ROUGE-L "
          f"vs greedy {rouge:.3f}, positional agreement {agree:.3f}, weight reads/token {weight / tokens:.3f} of a "
          f"full forward, fitted threshold {loop.fitted_threshold}, calibration {len(loop.calibration['agree'])} "
          "samples")
    assert 0.0 <= shallow / tokens <= 1.0 and 0.0 < rouge <= 1.0
