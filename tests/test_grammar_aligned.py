"""ASAp (grammar-aligned decoding): the sampling distribution converges to the model's distribution conditioned on the
grammar, enumerated exactly on tiny grammars; plain grammar-constrained decoding stays biased."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from scipy import stats

from hf_decoding_ext.structured import grammar as G
from hf_decoding_ext.structured.grammar_aligned import GrammarAlignedSampling, enumerate_constrained


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from hf_decoding_ext.core.models import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path())


@pytest.fixture(scope="module")
def peaky_llama(tok):
    """A tiny random Llama over the real tokenizer, with a sharpened head so conditionals differ a lot."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    return model


def _target(model, compiled, prompt, max_tokens):
    seqs = enumerate_constrained(model, compiled, prompt, max_tokens=max_tokens)
    z = sum(math.exp(lp) for _, lp in seqs)
    return {s: math.exp(lp) / z for s, lp in seqs}


def _kl(target, logq):
    return sum(p * (math.log(p) - logq(s)) for s, p in target.items())


def _gcd_logprob(model, compiled, prompt, seq):
    """Plain grammar-constrained sampling: the model's distribution masked and renormalised at every step."""
    fresh = GrammarAlignedSampling.__new__(GrammarAlignedSampling)
    fresh.compiled, fresh.eos_token_ids, fresh.nodes, fresh.efg = compiled, compiled.eos_token_ids, {}, {}
    return fresh.proposal_logprob(model, prompt, seq)


def test_kl_to_the_exact_constrained_distribution_falls_below_gcd(peaky_llama, tok):
    asap = GrammarAlignedSampling.for_model(peaky_llama, tok, G.regex("(cat|car|dog|do)"))
    prompt = torch.tensor([[1, 100, 200]])
    target = _target(peaky_llama, asap.compiled, prompt, max_tokens=5)
    assert len(target) >= 8  # several tokenisations of four strings
    kl_gcd = _kl(target, lambda s: _gcd_logprob(peaky_llama, asap.compiled, prompt, s))
    assert kl_gcd > 0.05  # GCD is measurably biased here
    assert abs(_kl(target, lambda s: asap.proposal_logprob(peaky_llama, prompt, s)) - kl_gcd) < 1e-9  # no samples
    kls = []
    torch.manual_seed(0)
    for n in (1, 5, 40):
        while asap.num_samples < n:
            peaky_llama.generate(input_ids=prompt, custom_generate=asap, do_sample=True, top_k=0, max_new_tokens=6,
                                 pad_token_id=2)
        kls.append(_kl(target, lambda s: asap.proposal_logprob(peaky_llama, prompt, s)))
    assert kls[0] >= kls[1] >= kls[2]
    assert kls[-1] < kl_gcd / 100
    # the approximations are upper bounds of the exact EFG: EFG(empty prefix) = Z / mass is never undershot
    seqs = enumerate_constrained(peaky_llama, asap.compiled, prompt, max_tokens=5)
    exact_root = sum(math.exp(lp) for _, lp in seqs)
    assert asap.expected_future_grammaticality(prompt[0], []) >= exact_root - 1e-6
    assert asap.expected_future_grammaticality(prompt[0], []) == pytest.approx(exact_root, rel=1e-3)

    # the sampler really draws from that distribution: chi-square of 400 samples (in batches) against the target
    rows = 400
    out = peaky_llama.generate(input_ids=prompt.repeat(rows, 1), custom_generate=asap, do_sample=True, top_k=0,
                               max_new_tokens=6, pad_token_id=2)
    counts = Counter()
    for row in out[:, prompt.shape[1]:].tolist():
        end = row.index(2) + 1
        counts[tuple(row[:end])] += 1
    assert set(counts) <= set(target)
    keys = [s for s in target if target[s] * rows >= 5]
    other = rows - sum(counts[s] for s in keys)
    observed = [counts[s] for s in keys] + ([other] if other or len(keys) < len(target) else [])
    expected = [target[s] * rows for s in keys]
    if len(observed) > len(expected):
        expected.append(rows - sum(expected))
    assert stats.chisquare(observed, expected).pvalue > 1e-3


def test_batch_rows_and_padding(peaky_llama, tok):
    asap = GrammarAlignedSampling.for_model(peaky_llama, tok, G.choices(["alpha", "beta", "gamma"]))
    prompts = torch.tensor([[2, 2, 5, 6], [7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    out = peaky_llama.generate(input_ids=prompts, attention_mask=mask, custom_generate=asap, do_sample=True,
                               max_new_tokens=8, pad_token_id=2)
    for row in out[:, prompts.shape[1]:]:
        assert tok.decode(row, skip_special_tokens=True) in {"alpha", "beta", "gamma"}
    assert asap.num_samples == 2
    # each prompt has its own trie root
    assert {k[0] for k in asap.efg} == {(5, 6), (7, 8, 9, 10)}
    asap.reset()
    assert not asap.efg and asap.num_samples == 0


def test_bad_arguments(peaky_llama, tok):
    asap = GrammarAlignedSampling.for_model(peaky_llama, tok, G.regex("a|b"))
    with pytest.raises(ValueError, match="samples"):
        peaky_llama.generate(input_ids=torch.tensor([[5]]), custom_generate=asap, do_sample=False, max_new_tokens=2)
    with pytest.raises(ValueError, match="exactly one"):
        GrammarAlignedSampling(tok)
    with pytest.raises(ValueError, match="regular expression"):
        GrammarAlignedSampling(tok, regex="(a")
    with pytest.raises(ValueError, match="tokenizer"):
        GrammarAlignedSampling.for_model(peaky_llama, None, G.regex("a"))


@pytest.mark.real_model
def test_asap_converges_on_the_real_model(smollm):
    """SmolLM2 answering a yes/no question under a one-word grammar: GCD's KL to the exact conditional distribution
    is large (it ignores how unlikely eos is after some tokenisations); ASAp's falls with samples and ends far
    below it."""
    from hf_decoding_ext.core.models import encode_prompts

    model, tok = smollm
    asap = GrammarAlignedSampling.for_model(model, tok, G.regex("(yes|no|maybe|Yes|No|Maybe)"))
    inputs = encode_prompts(tok, "Is the sky green? Answer with one word.")
    prompt = inputs.input_ids
    target = _target(model, asap.compiled, prompt, max_tokens=4)
    kl = lambda: _kl(target, lambda s: asap.proposal_logprob(model, prompt, s))  # noqa: E731
    kl_gcd = kl()
    torch.manual_seed(0)
    kls = []
    for n in (3, 30):
        while asap.num_samples < n:
            model.generate(**inputs, custom_generate=asap, do_sample=True, top_k=0, max_new_tokens=4)
        kls.append(kl())
    assert kls[1] < kls[0]
    assert kls[1] < kl_gcd / 3
