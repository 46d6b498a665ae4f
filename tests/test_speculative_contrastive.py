"""Speculative contrastive decoding: the contrastive scores, greedy identity with contrastive decoding, the sampled
distribution, errors, and the real model."""

from __future__ import annotations

import copy
import inspect
import itertools
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, RepetitionPenaltyLogitsProcessor

from hf_decoding_ext.contrastive import (ContrastiveContextProcessor, ContrastiveDecodingProcessor,
                                         SpeculativeContrastiveDecoding, contrastive_decoding_scores, scd_scores)
from hf_decoding_ext.core.anatomy import final_norm
from hf_decoding_ext.core.models import truncated_model
from hf_decoding_ext.speculative import SpeculativeDecoding, SpeculativeSamplingAcceptance
from hf_decoding_ext.speculative.drafters.base import Drafter
from hf_decoding_ext.speculative.drafters.draft_model import DraftModelDrafter
from conftest import perturbed_copy


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request):
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine OpenMP's waiting between the
    many small ops makes them up to 20x slower; the real-model test keeps the session's setting."""
    if request.node.get_closest_marker("real_model") is not None:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _tiny_llama(seed, vocab=128, layers=2):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def _noisy_copy(model, scale, seed=1):
    """The model with Gaussian noise on every weight: an amateur that agrees with it some of the time."""
    return perturbed_copy(model, scale, seed=seed)


def _cd_processor(amateur, **kw):
    """The O'Brien & Lewis form (``form="obrien"``) as a contrastive processor; the default form's reference is the
    registered ContrastiveDecodingProcessor."""
    # space="logits" (the default): the combination gets the raw expert scores and the amateur's raw logits
    return ContrastiveContextProcessor(amateur, share_prompt=True, space="logits",
                                       combine=lambda main, second: scd_scores(main, second, **kw))


def _reference_greedy(expert, amateur, ids, n, scores=scd_scores, **kw):
    """Argmax of ``scores`` (scd_scores by default) from full, cache-free forwards of both models."""
    seq = ids
    with torch.no_grad():
        for _ in range(n):
            s = scores(expert(seq).logits[0, -1], amateur(seq).logits[0, -1], **kw)
            seq = torch.cat([seq, s.argmax().view(1, 1)], dim=1)
    return seq


def test_scd_scores_formula():
    g = torch.Generator().manual_seed(0)
    e, a = 3 * torch.randn(2, 3, 50, generator=g), 3 * torch.randn(2, 3, 50, generator=g)
    for beta, alpha, tau in ((0.5, 0.1, 1.0), (1.0, 0.3, 0.5), (0.0, 0.0, 2.0)):
        s = scd_scores(e, a, beta=beta, alpha=alpha, amateur_temperature=tau)
        assert s.shape == e.shape and s.dtype == torch.float32
        pe, qa = torch.softmax(e, -1), torch.softmax(a / tau, -1)
        inside = pe >= alpha * pe.max(-1, keepdim=True).values
        expected = (1 + beta) * torch.log(pe) - beta * torch.log(qa)
        torch.testing.assert_close(s[inside], expected[inside], atol=1e-5, rtol=1e-5)
        assert bool(torch.isneginf(s[~inside]).all()) and bool(torch.isfinite(s[inside]).all())
        assert bool(inside.sum(-1).ge(1).all())
    # a hand-computed case: p_e = softmax([2, 1, -5]), alpha 0.1 drops the third token
    s = scd_scores(torch.tensor([2.0, 1.0, -5.0]), torch.tensor([4.0, 0.0, 0.0]), beta=0.5, alpha=0.1)
    le = torch.log_softmax(torch.tensor([2.0, 1.0, -5.0]), -1)
    la = torch.log_softmax(torch.tensor([4.0, 0.0, 0.0]), -1)
    assert math.isclose(float(s[0]), float(1.5 * le[0] - 0.5 * la[0]), abs_tol=1e-6)
    assert math.isclose(float(s[1]), float(1.5 * le[1] - 0.5 * la[1]), abs_tol=1e-6)
    assert math.isinf(float(s[2])) and float(s[1]) > float(s[0])  # the amateur's favourite is demoted


@pytest.mark.parametrize("amateur_kind", ["other_seed", "noisy_copy"])
def test_greedy_equals_contrastive_decoding_obrien_form_tiny(tiny_model, amateur_kind):
    """The option form="obrien": greedy SCD equals greedy generate() with the O'Brien & Lewis combination."""
    expert = tiny_model
    if amateur_kind == "other_seed":
        amateur = _tiny_llama(7)
    else:  # agrees with the expert part of the time: exercises accepted and rejected drafts
        amateur = _noisy_copy(expert, 0.3 if isinstance(expert, LlamaForCausalLM) else 1.0)
    loop = SpeculativeContrastiveDecoding(amateur, num_tokens=3, form="obrien")
    rates = []
    for prompt in ([3, 4, 5, 6, 7, 8], [9, 30, 31, 9, 30]):
        ids = torch.tensor([prompt])
        out = expert.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0, custom_generate=loop)
        ref = expert.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0,
                              logits_processor=[_cd_processor(amateur)])
        assert torch.equal(out, ref)
        assert torch.equal(out, _reference_greedy(expert, amateur, ids, 24))
        s = loop.summary()
        assert s["tokens"] == 24 and s["steps"] == sum(1 for _ in loop.last_stats)
        rates.append(s["acceptance_rate"])
    if amateur_kind == "noisy_copy":
        assert 0 < sum(rates) / len(rates) < 1, rates


def test_processors_apply_after_the_contrast_and_options(tiny_llama):
    amateur = _noisy_copy(tiny_llama, 0.3)
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    kw = dict(alpha=0.05, amateur_temperature=0.7)
    for form, proc in (("li", ContrastiveDecodingProcessor(amateur, **kw)),
                       ("obrien", _cd_processor(amateur, beta=1.0, **kw))):
        extra = {} if form == "li" else {"beta": 1.0}
        loop = SpeculativeContrastiveDecoding(amateur, num_tokens=4, form=form, **extra, **kw)
        out = tiny_llama.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0, repetition_penalty=1.5,
                                  custom_generate=loop)
        ref = tiny_llama.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0,
                                  logits_processor=[proc, RepetitionPenaltyLogitsProcessor(1.5)])
        assert torch.equal(out, ref), form
    # form="obrien" with the amateur equal to the expert: p_c = p_e on V_alpha, so every greedy draft token is
    # accepted (Li's form has no such identity: log p_e - log q_a at T = 0.5 ranks V_alpha in reverse)
    loop = SpeculativeContrastiveDecoding(tiny_llama, num_tokens=3, form="obrien")
    out = tiny_llama.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0, custom_generate=loop)
    assert torch.equal(out, tiny_llama.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0))
    assert loop.summary()["acceptance_rate"] == 1.0 and loop.summary()["tokens_per_forward"] > 3
    # bonus="expert": the bonus after a full acceptance comes from the expert alone (runs; one amateur step less)
    loop = SpeculativeContrastiveDecoding(amateur, num_tokens=3, bonus="expert")
    out = tiny_llama.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0, custom_generate=loop)
    assert out.shape == (1, 26) and loop.summary()["tokens"] == 20
    # the drafter keeps the amateur's logits at the root and the nodes (one more row with the extra step)
    for extra in (False, True):
        drafter = DraftModelDrafter(amateur, num_tokens=3, confidence_threshold=0.0, keep_logits=True,
                                    extra_step=extra)
        captured = []

        class Spy(Drafter):
            def begin(self, state):
                drafter.begin(state)

            def propose(self, state):
                captured.append(drafter.propose(state))
                return captured[-1]

        tiny_llama.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0,
                            custom_generate=SpeculativeDecoding(Spy()))
        first = captured[0]
        assert first.info["assistant_logits"].shape == (len(first.tree) + int(extra), 128)
        seq = torch.cat([ids, first.tree.tokens[None]], dim=1)
        with torch.no_grad():
            full = amateur(seq).logits[0, ids.shape[1] - 1:].float()
        torch.testing.assert_close(first.info["assistant_logits"], full[: len(first.tree) + int(extra)],
                                   atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ distribution
def _peaky_tiny_llama(seed, vocab=6):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, bos_token_id=0, eos_token_id=None,
                      pad_token_id=0, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # peaky, model-specific distributions so that wrong rules are detectable
    return model


def _exact_contrastive_distribution(expert, amateur, prompt, length, vocab, scores=contrastive_decoding_scores):
    probs = {}
    with torch.no_grad():
        for seq in itertools.product(range(vocab), repeat=length):
            ids = torch.tensor([prompt + list(seq)])
            logp = torch.log_softmax(scores(expert(ids).logits[0], amateur(ids).logits[0]), -1)
            probs[seq] = float(sum(logp[len(prompt) - 1 + i, t] for i, t in enumerate(seq)).exp())
    return probs


def _pooled_chi_square_pvalue(counts, probs, n, min_expected=5.0):
    """Chi-square goodness of fit; cells expected below ``min_expected`` are pooled into one."""
    from scipy.stats import chi2

    stat, dof, pooled_obs, pooled_exp = 0.0, -1, 0, 0.0
    for seq, p in probs.items():
        if n * p < min_expected:
            pooled_obs += counts.get(seq, 0)
            pooled_exp += n * p
            continue
        stat += (counts.get(seq, 0) - n * p) ** 2 / (n * p)
        dof += 1
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        dof += 1
    return float(chi2.sf(stat, dof))


class _AcceptEverything(SpeculativeSamplingAcceptance):
    """A wrong rule (accepts every draft token): the test below must reject it."""

    def accept(self, tree, scores_at, generator=None):
        node, accepted = -1, []
        while tree.children(node):
            node = tree.children(node)[0]
            accepted.append(node)
        p = torch.softmax(scores_at(node), -1)
        return accepted, int(torch.multinomial(p, 1, generator=generator))


@pytest.mark.parametrize("rule", ["scd", "accept_all", "expert_target"])
def test_sampling_follows_the_contrastive_distribution(rule):
    """3 new tokens with 2-token drafts (draft, acceptance, residual resampling, contrastive bonus): with its defaults
    the sequences follow the exact distribution of softmax(contrastive_decoding_scores) (the registered contrastive
    decoding, its defaults) computed by enumeration. Two wrong samplers fail the same check: accepting every draft,
    and speculative sampling of the expert alone (form="obrien" with beta = alpha = 0)."""
    vocab, length, n = 6, 3, 1500
    expert, amateur = _peaky_tiny_llama(1, vocab), _peaky_tiny_llama(2, vocab)
    prompt = [1, 2, 3]
    probs = _exact_contrastive_distribution(expert, amateur, prompt, length, vocab)
    if rule == "expert_target":
        loop = SpeculativeContrastiveDecoding(amateur, beta=0.0, alpha=0.0, num_tokens=2, form="obrien")
    else:
        loop = SpeculativeContrastiveDecoding(amateur, num_tokens=2,
                                              acceptance="auto" if rule == "scd" else _AcceptEverything())
    torch.manual_seed(0)
    ids = torch.tensor([prompt])
    counts, accepted, drafted = {}, 0, 0
    for _ in range(n):
        out = expert.generate(ids, max_new_tokens=length, do_sample=True, top_k=0, temperature=1.0, pad_token_id=0,
                              custom_generate=loop)
        seq = tuple(out[0, len(prompt):].tolist())
        counts[seq] = counts.get(seq, 0) + 1
        accepted += sum(s.accepted for s in loop.last_stats)
        drafted += sum(s.draft_size for s in loop.last_stats)
    pvalue = _pooled_chi_square_pvalue(counts, probs, n)
    tv = 0.5 * sum(abs(counts.get(s, 0) / n - p) for s, p in probs.items())
    if rule == "scd":
        assert pvalue > 1e-3, (pvalue, tv)
        assert 0.1 < accepted / drafted < 0.9, (accepted, drafted)  # both acceptance and rejection were exercised
    else:
        assert pvalue < 1e-6, (pvalue, tv)


# ------------------------------------------------------------------------------------------------ errors
def test_bad_inputs(tiny_llama):
    amateur = _tiny_llama(7)
    for bad in ({"beta": -0.1, "form": "obrien"}, {"alpha": 1.5}, {"alpha": -0.1}, {"bonus": "draft"},
                {"amateur_temperature": 0}, {"num_tokens": 0}, {"acceptance": "typical"}):
        with pytest.raises(ValueError):
            SpeculativeContrastiveDecoding(amateur, **bad)
    with pytest.raises(ValueError, match="'cd'"):
        SpeculativeContrastiveDecoding(amateur, form="cd")
    with pytest.raises(ValueError, match="form='obrien'"):  # Li's formula has no beta: refused, not ignored
        SpeculativeContrastiveDecoding(amateur, beta=0.5)
    with pytest.raises(ValueError, match="amateur"):
        SpeculativeContrastiveDecoding(None)
    for bad in ({"beta": -1.0}, {"alpha": 2.0}):
        with pytest.raises(ValueError):
            scd_scores(torch.zeros(4), torch.zeros(4), **bad)
    small_vocab = _tiny_llama(3, vocab=64, layers=1)
    ids = torch.tensor([[3, 4, 5]])
    with pytest.raises(ValueError, match="vocabulary"):
        tiny_llama.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0,
                            custom_generate=SpeculativeContrastiveDecoding(small_vocab))
    with pytest.raises(ValueError, match="vocabulary"):
        SpeculativeContrastiveDecoding.for_model(tiny_llama, amateur=small_vocab)
    with pytest.raises(ValueError, match="batch size 1"):
        tiny_llama.generate(torch.tensor([[3, 4], [5, 6]]), max_new_tokens=3, do_sample=False, pad_token_id=0,
                            custom_generate=SpeculativeContrastiveDecoding(amateur))
    with pytest.raises(ValueError, match="assistant model"):
        tiny_llama.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0, assistant_model=amateur,
                            custom_generate=SpeculativeContrastiveDecoding(amateur))
    with pytest.raises(ValueError, match="self:N"):
        SpeculativeContrastiveDecoding.for_model(None, amateur="self:1")
    loop = SpeculativeContrastiveDecoding.for_model(tiny_llama, amateur="self:1", form="obrien", beta=1.0,
                                                    num_tokens=2)
    assert loop.beta == 1.0 and loop.drafter.num_tokens == 2 and loop.amateur.config.num_hidden_layers == 1
    assert loop.form == "obrien" and loop.amateur_temperature == 1.0  # the O'Brien & Lewis defaults
    assert SpeculativeContrastiveDecoding(amateur, form="obrien").beta == 0.5


# ------------------------------------------------------------------------------------------------ real model
@pytest.mark.real_model
def test_greedy_equals_contrastive_decoding_real_model(smollm):
    """SmolLM2-135M-Instruct with its first 24 layers as the amateur (2-token drafts), default form: token-identical
    to greedy generate() with the registered ContrastiveDecodingProcessor (its defaults), and some drafts are
    accepted (the untrained early exits are weak amateurs: the contrast demotes their own favourites, so few are)."""
    from hf_decoding_ext.bench.prompts import load_prompts
    from hf_decoding_ext.core.models import encode_prompts

    model, tokenizer = smollm
    loop = SpeculativeContrastiveDecoding.for_model(model, tokenizer, amateur="self:24", num_tokens=2)
    steps = tokens = accepted = 0
    for row in load_prompts(categories=["multi_turn_chat", "qa"], per_category=1):
        enc = encode_prompts(tokenizer, row["prompt"])
        out = model.generate(**enc, max_new_tokens=32, do_sample=False, custom_generate=loop)
        ref = model.generate(**enc, max_new_tokens=32, do_sample=False,
                             logits_processor=[ContrastiveDecodingProcessor(loop.amateur)])
        assert torch.equal(out, ref), row["id"]
        s = loop.summary()
        steps, tokens, accepted = steps + s["steps"], tokens + s["tokens"], accepted + s["mean_accepted"] * s["steps"]
    assert accepted > 0 and steps < tokens, (steps, tokens, accepted)


# ------------------------------------------------------------------------------------------------ default form = CD
def _registered_cd_defaults():
    """alpha and amateur_temperature defaults of the registered contrastive-decoding processor."""
    sig = inspect.signature(ContrastiveDecodingProcessor.__init__).parameters
    return {k: sig[k].default for k in ("alpha", "amateur_temperature")}


def _tempered_copy(model, factor):
    """The model with its final norm (weights and bias) scaled by ``factor``: logits ``factor * logits``."""
    tempered = copy.deepcopy(model)
    with torch.no_grad():
        for p in final_norm(tempered).parameters():
            p.mul_(factor)
    return tempered


@pytest.mark.parametrize("amateur_kind", ["truncated", "tempered", "tempered_noisy"])
def test_default_is_the_registered_contrastive_decoding(tiny_model, amateur_kind):
    """Greedy SCD with its defaults is token-identical to greedy generate() with the registered
    ContrastiveDecodingProcessor built with its own defaults and the same amateur (Li et al.'s formula and amateur
    temperature), and to the argmax of contrastive_decoding_scores from cache-free forwards. With the expert's
    logits times tau / 2 as the amateur, log p_e - log q_a = (1/2) log p_e + const: every greedy draft is accepted
    and the output is plain greedy (a sharp check of the default temperature); a noisy such amateur exercises both
    accepted and rejected drafts."""
    expert = tiny_model
    tau = _registered_cd_defaults()["amateur_temperature"]
    if amateur_kind == "truncated":
        amateur = truncated_model(expert, 1)
    elif amateur_kind == "tempered":
        amateur = _tempered_copy(expert, tau / 2)
    else:
        amateur = _noisy_copy(_tempered_copy(expert, tau / 2), 0.3 if isinstance(expert, LlamaForCausalLM) else 1.0)
    loop = SpeculativeContrastiveDecoding(amateur, num_tokens=3)
    rates = []
    for prompt in ([3, 4, 5, 6, 7, 8], [9, 30, 31, 9, 30]):
        ids = torch.tensor([prompt])
        out = expert.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0, custom_generate=loop)
        rates.append(loop.summary()["acceptance_rate"])
        ref = expert.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0,
                              logits_processor=[ContrastiveDecodingProcessor(amateur)])
        assert torch.equal(out, ref), (amateur_kind, prompt)
        assert torch.equal(out, _reference_greedy(expert, amateur, ids, 24, scores=contrastive_decoding_scores))
        if amateur_kind == "tempered":
            assert torch.equal(out, expert.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0))
    assert loop.form == "li" and loop.beta is None
    assert {"alpha": loop.alpha, "amateur_temperature": loop.amateur_temperature} == _registered_cd_defaults()
    if amateur_kind == "tempered":
        assert rates == [1.0, 1.0]
    elif amateur_kind == "tempered_noisy":
        assert 0 < sum(rates) / len(rates) < 1, rates


class _CapturingSCD(SpeculativeContrastiveDecoding):
    """Records (committed ids, draft tokens, verification scores) of every step."""

    def verification_scores(self, state, draft, tree_logits):
        scores = super().verification_scores(state, draft, tree_logits)
        self.captured.append((state.input_ids.clone(), draft.tree.tokens.clone(), draft.tree.parents.clone(),
                              scores.clone()))
        return scores


@pytest.mark.parametrize("form", ["li", "obrien"])
def test_sampling_target_is_the_processor_distribution(tiny_llama, form):
    """In sampling mode the target at every verified position (root, draft nodes, contrastive bonus) is softmax of
    the matching processor's scores on the same prefix: the registered ContrastiveDecodingProcessor for the default
    form, the O'Brien & Lewis combination (scd_scores) for form="obrien"."""
    amateur = _noisy_copy(tiny_llama, 0.3)
    loop = _CapturingSCD(amateur, num_tokens=3) if form == "li" else _CapturingSCD(amateur, num_tokens=3, form=form)
    loop.captured = []
    torch.manual_seed(0)
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    tiny_llama.generate(ids, max_new_tokens=12, do_sample=True, top_k=0, temperature=1.0, pad_token_id=0,
                        custom_generate=loop)
    assert len(loop.captured) >= 3
    checked = 0
    for committed, tokens, parents, scores in loop.captured:
        assert torch.equal(parents, torch.arange(len(tokens)) - 1)  # the amateur drafts a chain
        assert scores.shape[0] == len(tokens) + 1  # root + nodes, all contrasted (bonus="contrastive")
        for j in range(len(tokens) + 1):
            prefix = torch.cat([committed, tokens[None, :j]], dim=1)
            with torch.no_grad():
                logits = tiny_llama(prefix).logits[:, -1].float()
            proc = ContrastiveDecodingProcessor(amateur) if form == "li" else _cd_processor(amateur)
            ref = proc(prefix, logits)[0]
            assert torch.equal(torch.isneginf(scores[j]), torch.isneginf(ref))
            torch.testing.assert_close(torch.softmax(scores[j], -1), torch.softmax(ref, -1), atol=1e-6, rtol=1e-4)
            checked += 1
    assert checked >= 8


def test_registry_entry_builds_the_default_form(tiny_llama):
    """The registry's speculative-contrastive entry builds the registered contrastive decoding's form and
    temperature (no beta among its defaults, which form='li' would refuse); form='obrien' takes beta."""
    from hf_decoding_ext.registry import get_method

    spec = get_method("speculative-contrastive")
    assert spec.defaults["form"] == "li" and "beta" not in spec.defaults and "amateur_temperature" not in spec.defaults
    loop = spec.build(tiny_llama, amateur="self:1")
    assert (loop.form, loop.beta) == ("li", None)
    assert {"alpha": loop.alpha, "amateur_temperature": loop.amateur_temperature} == _registered_cd_defaults()
    loop = spec.build(tiny_llama, amateur="self:1", form="obrien", beta=1.0)
    assert (loop.form, loop.beta, loop.amateur_temperature) == ("obrien", 1.0, 1.0)
