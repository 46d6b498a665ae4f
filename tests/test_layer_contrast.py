"""Layer-contrast decoding: DoLa (arXiv 2309.03883) and LOL (arXiv 2408.08769).

The tiny-model tests recompute every step by hand from a cache-free forward with ``output_hidden_states=True``.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from hf_decoding_ext.contrastive.dola import DoLa, dola_candidate_layers
from hf_decoding_ext.core.anatomy import final_norm
from hf_decoding_ext.contrastive.lol import LOL

PROMPTS = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])  # row 0 left-padded (pad = 0)
MASK = (PROMPTS != 0).long()


def _llama(layers: int, seed: int = 0, tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0, initializer_range=0.5, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def _gpt2(layers: int, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=layers, n_head=4, n_positions=512, bos_token_id=1,
                     eos_token_id=2, pad_token_id=0, initializer_range=0.5)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def deep_model(request):
    """A 5-layer tiny model (Llama untied, GPT-2 tied embeddings) with large weights, so layers disagree clearly."""
    return _llama(5) if request.param == "llama" else _gpt2(5)


def _norm_head(model):
    if hasattr(model, "transformer"):
        return model.transformer.ln_f, model.lm_head
    return model.model.norm, model.lm_head


@torch.no_grad()
def _full_forward(model, ids, mask):
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True, use_cache=False)


def _jsd(p_logits, q_logits):
    p, q = torch.softmax(p_logits.double(), -1), torch.softmax(q_logits.double(), -1)
    m = (p + q) / 2
    return 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)


@torch.no_grad()
def _hand_dola(model, seqs, mask, pos, layers, alpha):
    """(chosen layer per row, contrast scores) at sequence position ``pos``, computed from scratch."""
    out = _full_forward(model, seqs, mask)
    norm, head = _norm_head(model)
    final = out.logits[:, pos].float()
    exits = {j: head(norm(out.hidden_states[j][:, pos])).float() for j in layers}
    chosen, scores = [], []
    for r in range(seqs.shape[0]):
        divs = [float(_jsd(final[r], exits[j][r])) for j in layers]
        j = layers[max(range(len(layers)), key=divs.__getitem__)]
        chosen.append(j)
        lp = torch.log_softmax(final[r], -1)
        keep = lp >= lp.max() + math.log(alpha)
        scores.append(torch.where(keep, lp - torch.log_softmax(exits[j][r], -1), torch.tensor(float("-inf"))))
    return chosen, torch.stack(scores)


def _alive(seqs, pos, eos=2):
    """Rows not finished (no eos generated) before sequence position ``pos + 1``: their token is the argmax."""
    return ~(seqs[:, PROMPTS.shape[1]:pos + 1] == eos).any(dim=1)


def _assert_scores_equal(got, want):
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    fin = ~torch.isinf(want)
    torch.testing.assert_close(got[fin], want[fin], atol=2e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------- DoLa: buckets
def test_dola_buckets_follow_transformers():
    # SmolLM2-135M: 30 layers, tied embeddings -> start at layer 2
    assert dola_candidate_layers("low", 30, True) == [2, 4, 6, 8, 10, 12, 14]
    assert dola_candidate_layers("high", 30, True) == list(range(15, 30, 2))
    # untied embeddings start at the 0th (embedding) layer
    assert dola_candidate_layers("low", 32, False) == list(range(0, 16, 2))
    assert dola_candidate_layers("high", 32, False) == list(range(16, 32, 2))
    # deep models: the 20 lowest / highest layers
    assert dola_candidate_layers("low", 48, False) == list(range(0, 20, 2))
    assert dola_candidate_layers("high", 48, True) == list(range(28, 48, 2))
    # shallow models
    assert dola_candidate_layers("low", 2, True) == [1] and dola_candidate_layers("high", 2, True) == [1]
    assert dola_candidate_layers("low", 2, False) == [0] and dola_candidate_layers("high", 2, False) == [1]
    assert dola_candidate_layers([3, 1, 3], 5, False) == [3, 1]


# --------------------------------------------------------------------------------------------- DoLa: exactness
def test_dola_steps_match_hand_computation(deep_model):
    layers = [0, 1, 2, 3, 4]
    loop = DoLa(dola_layers=layers, alpha=0.1)
    out = deep_model.generate(input_ids=PROMPTS, attention_mask=MASK, custom_generate=loop, do_sample=False,
                              max_new_tokens=6, return_dict_in_generate=True, output_scores=True, output_logits=True)
    seqs = out.sequences
    assert len(loop.last_premature_layers) == len(out.scores) == seqs.shape[1] - PROMPTS.shape[1]
    assert out.premature_layers == loop.last_premature_layers
    mask = torch.cat([MASK, MASK.new_ones((2, seqs.shape[1] - PROMPTS.shape[1]))], dim=1)
    chosen_all = set()
    for t in range(len(out.scores)):
        pos = PROMPTS.shape[1] - 1 + t
        chosen, scores = _hand_dola(deep_model, seqs, mask, pos, layers, 0.1)
        assert loop.last_premature_layers[t] == chosen, f"step {t}"
        _assert_scores_equal(out.scores[t], scores)
        torch.testing.assert_close(out.logits[t], _full_forward(deep_model, seqs, mask).logits[:, pos].float(),
                                   atol=2e-4, rtol=1e-4)
        alive = _alive(seqs, pos)
        assert torch.equal(seqs[alive, pos + 1], scores.argmax(-1)[alive])
        chosen_all.update(chosen)
    assert len(chosen_all) > 1  # the dynamic choice really varies on this model ...
    assert any(len(set(step)) > 1 for step in loop.last_premature_layers)  # ... and between rows of one step


def test_dola_buckets_resolved_per_model(tiny_llama, tiny_gpt2):
    # 2-layer tiny models: Llama (untied) low=[0], high=[1]; GPT-2 (tied) low=high=[1]
    assert DoLa("low").candidate_layers(tiny_llama) == [0] and DoLa("high").candidate_layers(tiny_llama) == [1]
    assert DoLa("low").candidate_layers(tiny_gpt2) == [1] == DoLa("high").candidate_layers(tiny_gpt2)


def test_dola_alpha_one_is_greedy(tiny_model):
    """alpha = 1 makes V_head the final layer's argmax token only, so greedy DoLa equals greedy decoding."""
    greedy = tiny_model.generate(input_ids=PROMPTS, attention_mask=MASK, do_sample=False, max_new_tokens=8)
    for layers in ("low", "high"):
        loop = DoLa(dola_layers=layers, alpha=1.0)
        got = tiny_model.generate(input_ids=PROMPTS, attention_mask=MASK, custom_generate=loop, do_sample=False,
                                  max_new_tokens=8)
        assert torch.equal(got, greedy)


def test_dola_processors_applied_after_contrast(deep_model):
    layers = [1, 3]
    loop = DoLa(dola_layers=layers)
    out = deep_model.generate(input_ids=PROMPTS, attention_mask=MASK, custom_generate=loop, do_sample=False,
                              max_new_tokens=4, repetition_penalty=1.2, return_dict_in_generate=True,
                              output_scores=True)
    seqs = out.sequences
    mask = torch.cat([MASK, MASK.new_ones((2, seqs.shape[1] - PROMPTS.shape[1]))], dim=1)
    proc = RepetitionPenaltyLogitsProcessor(1.2, prompt_ignore_length=torch.tensor([2, 0]))  # left padding ignored
    for t in range(len(out.scores)):
        pos = PROMPTS.shape[1] - 1 + t
        _, contrast = _hand_dola(deep_model, seqs, mask, pos, layers, 0.1)
        _assert_scores_equal(out.scores[t], proc(seqs[:, :pos + 1], contrast.clone()))
    # the constructor's repetition_penalty gives the same result (for the CLI)
    again = deep_model.generate(input_ids=PROMPTS, attention_mask=MASK, do_sample=False, max_new_tokens=4,
                                custom_generate=DoLa(dola_layers=layers, repetition_penalty=1.2))
    assert torch.equal(again, seqs)
    with pytest.raises(ValueError, match="both"):
        deep_model.generate(input_ids=PROMPTS, attention_mask=MASK, do_sample=False, max_new_tokens=2,
                            repetition_penalty=1.2, custom_generate=DoLa(dola_layers=layers, repetition_penalty=1.2))


def test_dola_sampling_stays_in_plausible_set(deep_model):
    torch.manual_seed(0)
    loop = DoLa(dola_layers="low")
    out = deep_model.generate(input_ids=PROMPTS, attention_mask=MASK, custom_generate=loop, do_sample=True,
                              max_new_tokens=6, return_dict_in_generate=True, output_scores=True)
    for t, s in enumerate(out.scores):
        tok = out.sequences[:, PROMPTS.shape[1] + t]
        assert torch.isfinite(s.gather(1, tok[:, None])).all()


@torch.no_grad()
def test_dola_reference_variant(deep_model):
    """final_norm=False + divergence='transformers' is the reference code's rule: lm_head(h_j) and the kl_div form."""
    import torch.nn.functional as F

    layers = [0, 2, 4]
    loop = DoLa(dola_layers=layers, final_norm=False, divergence="transformers")
    out = deep_model.generate(input_ids=PROMPTS[1:], attention_mask=MASK[1:], custom_generate=loop, do_sample=False,
                              max_new_tokens=4, return_dict_in_generate=True, output_scores=True)
    seqs = out.sequences
    full = _full_forward(deep_model, seqs, torch.ones_like(seqs))
    for t in range(len(out.scores)):
        pos = PROMPTS.shape[1] - 1 + t
        final = full.logits[:, pos].float()
        prem = torch.stack([deep_model.lm_head(full.hidden_states[j][:, pos]).float() for j in layers])
        m = 0.5 * (F.softmax(final, -1)[None] + F.softmax(prem, -1))
        js = 0.5 * (F.kl_div(F.log_softmax(final, -1)[None], m, reduction="none").mean(-1)
                    + F.kl_div(F.log_softmax(prem, -1), m, reduction="none").mean(-1))
        assert loop.last_premature_layers[t] == [layers[int(js.mean(-1).argmax())]]


# --------------------------------------------------------------------------------------------- DoLa: MC scoring
@torch.no_grad()
@pytest.mark.parametrize("post_softmax", [False, True])
def test_dola_scorer_matches_reference_lm_score(deep_model, post_softmax):
    """Per-token values of ``dola_scorer`` = the reference ``lm_score`` (voidism/DoLa, mode 'dola') from scratch:
    log-softmax of the final and of the chosen premature layer over the full vocabulary, their difference (then a
    log-softmax with ``post_softmax``), then tokens outside the head set to -1000; no renormalisation after the mask."""
    from hf_decoding_ext.bench.tasks.contrastive import continuation_logprob
    from hf_decoding_ext.contrastive.dola import dola_scorer

    layers, alpha = [0, 1, 2, 3, 4], 0.1
    ids = torch.tensor([[3, 17, 40, 5, 99, 23, 8, 61, 12]])
    full = _full_forward(deep_model, ids, torch.ones_like(ids))
    norm, head = _norm_head(deep_model)
    want = []
    for pos in range(ids.shape[1]):
        final = full.logits[0, pos].float()
        exits = [head(norm(full.hidden_states[j][0, pos])).float() for j in layers]
        j = max(range(len(layers)), key=lambda i: float(_jsd(final, exits[i])))
        lp = torch.log_softmax(final, -1)
        diff = lp - torch.log_softmax(exits[j], -1)
        if post_softmax:
            diff = torch.log_softmax(diff, -1)
        want.append(torch.where(lp < lp.max() + math.log(alpha), torch.tensor(-1000.0), diff))
    want = torch.stack(want)
    score = dola_scorer(deep_model, layers, alpha=alpha, post_softmax=post_softmax)
    got = score(ids)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(score(ids, first=4), want[4:], atol=2e-4, rtol=1e-4)
    if not post_softmax:  # the values are not renormalised: rows are not log-probabilities
        assert not torch.allclose(got.logsumexp(-1), torch.zeros(ids.shape[1]), atol=1e-3)
    assert (got == -1000.0).any() and (got > -1000.0).any()  # the mask is active on this model
    # an answer's score is the sum of its tokens' values (reference: diff_logits[range, continue_ids].sum())
    total, n = continuation_logprob(score, ids[0, :4].tolist(), ids[0, 4:].tolist())
    assert n == 5
    assert total == pytest.approx(float(want[3:-1].gather(1, ids[0, 4:, None]).sum()), rel=1e-4, abs=1e-3)


# --------------------------------------------------------------------------------------------- DoLa: bad inputs
def test_dola_bad_inputs(tiny_llama):
    with pytest.raises(ValueError, match="bucket"):
        DoLa(dola_layers="middle")
    with pytest.raises(ValueError, match="out of range"):
        DoLa(dola_layers=[-1])
    with pytest.raises(ValueError, match="empty"):
        DoLa(dola_layers=[])
    with pytest.raises(ValueError, match="integers"):
        DoLa(dola_layers=[1.5])
    for alpha in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="alpha"):
            DoLa(alpha=alpha)
    with pytest.raises(ValueError, match="divergence"):
        DoLa(divergence="kl")
    for layers in ([0, 7], [2]):  # 7 does not exist; 2 is the final (mature) layer of this 2-layer model
        with pytest.raises(ValueError, match="out of range"):
            tiny_llama.generate(input_ids=PROMPTS, attention_mask=MASK, custom_generate=DoLa(dola_layers=layers),
                                do_sample=False, max_new_tokens=2)
    with pytest.raises(ValueError, match="final norm"):
        final_norm(torch.nn.Linear(2, 2))


# --------------------------------------------------------------------------------------------- LOL
@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lol_pair(request):
    if request.param == "llama":
        return _llama(4, seed=0), _llama(4, seed=1)
    return _gpt2(4, seed=0), _gpt2(4, seed=1)


@torch.no_grad()
def test_lol_matches_hand_formula(lol_pair):
    model, amateur = lol_pair
    instr = [3, 4, 5]
    lam, lam_lower, omega, alpha, lower = 0.7, 0.5, 0.8, 0.1, 2
    loop = LOL(amateur, lower_layer=lower, lam=lam, lam_lower=lam_lower, omega=omega, alpha=alpha,
               instruction_ids=instr)
    out = model.generate(input_ids=PROMPTS, attention_mask=MASK, custom_generate=loop, do_sample=False,
                         max_new_tokens=5, return_dict_in_generate=True, output_scores=True)
    seqs = out.sequences
    mask = torch.cat([MASK, MASK.new_ones((2, seqs.shape[1] - PROMPTS.shape[1]))], dim=1)
    k = len(instr)
    ids_o = torch.cat([torch.tensor(instr).expand(2, -1), seqs], dim=1)  # instruction before the padding
    mask_o = torch.cat([torch.ones(2, k, dtype=torch.long), mask], dim=1)
    full_o, full_a = _full_forward(model, ids_o, mask_o), _full_forward(amateur, seqs, mask)
    (norm_o, head_o), (norm_a, head_a) = _norm_head(model), _norm_head(amateur)
    for t in range(len(out.scores)):
        pos = PROMPTS.shape[1] - 1 + t
        lp = lambda x: torch.log_softmax(x.float(), -1)  # noqa: E731
        p_o, p_a = lp(full_o.logits[:, k + pos]), lp(full_a.logits[:, pos])
        q_o = lp(head_o(norm_o(full_o.hidden_states[lower][:, k + pos])))
        q_a = lp(head_a(norm_a(full_a.hidden_states[lower][:, pos])))
        want = (p_o - lam * p_a) + omega * (q_o - lam_lower * q_a)
        keep = p_o >= p_o.max(-1, keepdim=True).values + math.log(alpha)
        want = torch.where(keep, want, torch.tensor(float("-inf")))
        _assert_scores_equal(out.scores[t], want)
        alive = _alive(seqs, pos)
        assert torch.equal(seqs[alive, pos + 1], want.argmax(-1)[alive])


def test_lol_without_contrast_is_greedy(lol_pair):
    model, amateur = lol_pair
    greedy = model.generate(input_ids=PROMPTS, attention_mask=MASK, do_sample=False, max_new_tokens=6)
    loop = LOL(amateur, lam=0.0, lam_lower=0.0, omega=0.0, alpha=0.0)
    got = model.generate(input_ids=PROMPTS, attention_mask=MASK, custom_generate=loop, do_sample=False,
                         max_new_tokens=6)
    assert torch.equal(got, greedy)


def test_lol_bad_inputs(tiny_llama):
    amateur = _llama(4, seed=1)
    with pytest.raises(ValueError, match="amateur"):
        LOL(None)
    with pytest.raises(ValueError, match="amateur"):
        LOL.for_model(tiny_llama, None, amateur=None)
    for alpha in (-0.5, 1.01):
        with pytest.raises(ValueError, match="alpha"):
            LOL(amateur, alpha=alpha)
    with pytest.raises(ValueError, match="lam"):
        LOL(amateur, lam=-1.0)
    with pytest.raises(ValueError, match="lower_layer"):
        LOL(amateur, lower_layer=-1)
    with pytest.raises(ValueError, match="out of range"):
        LOL(amateur, lower_layer=4)  # the amateur has 4 layers: 4 is its final layer
    with pytest.raises(ValueError, match="out of range"):  # the 2-layer model is shallower than the amateur
        tiny_llama.generate(input_ids=PROMPTS, attention_mask=MASK, do_sample=False, max_new_tokens=2,
                            custom_generate=LOL(amateur, lower_layer=3))
    with pytest.raises(ValueError, match="empty"):
        LOL(amateur, instruction_ids=[])
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    with pytest.raises(ValueError, match="vocabulary"):
        tiny_llama.generate(input_ids=PROMPTS, attention_mask=MASK, do_sample=False, max_new_tokens=2,
                            custom_generate=LOL(other, lower_layer=1))


# ----------------------------------------------------------------------------------- real model (not run by the author)
@pytest.mark.real_model
def test_dola_real_model_buckets_and_alpha_one(smollm):
    from hf_decoding_ext.core.models import encode_prompts

    model, tokenizer = smollm
    assert DoLa("high").candidate_layers(model) == list(range(15, 30, 2))
    assert DoLa("low").candidate_layers(model) == list(range(2, 15, 2))
    inputs = encode_prompts(tokenizer, ["What is the capital of Australia?", "Name a prime number."])
    greedy = model.generate(**inputs, do_sample=False, max_new_tokens=12)
    got = model.generate(**inputs, custom_generate=DoLa("high", alpha=1.0), do_sample=False, max_new_tokens=12)
    assert torch.equal(got, greedy)
    loop = DoLa("high")
    model.generate(**inputs, custom_generate=loop, do_sample=False, max_new_tokens=12, repetition_penalty=1.2)
    assert all(j in range(15, 30, 2) for step in loop.last_premature_layers for j in step)


@pytest.mark.real_model
def test_lol_real_model_runs_with_truncated_amateur(smollm):
    from hf_decoding_ext.core.models import encode_prompts, truncated_model

    model, tokenizer = smollm
    amateur = truncated_model(model, 12)  # an untrained stand-in for LOL's hallucination-induced amateur
    loop = LOL.for_model(model, tokenizer, amateur=amateur, lower_layer=6)
    inputs = encode_prompts(tokenizer, ["What is the capital of Australia?"])
    out = model.generate(**inputs, custom_generate=loop, do_sample=False, max_new_tokens=12)
    assert out.shape[1] > inputs["input_ids"].shape[1]
