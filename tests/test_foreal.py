"""FoReaL-Decoding (hf_decoding_ext.collaboration.foreal): endpoints, the seeded gate, the leader's share of tokens,
the sentence-boundary detector, exact accounting, cache consistency, validation. Tiny random models only; a stub
decoder maps the tiny token ids to text."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_router import PROMPT, assert_cache_equal, fresh_cache, small_twin

from hf_decoding_ext.collaboration.foreal import (
    FoReaLDecoding,
    decode_tail,
    make_decoder,
    sentence_ends,
)

N = 40
DOTS = {56, 127, 17, 38, 102}
"""Token ids the stub decoder writes as "." (sentence ends) on the tiny models' trajectories."""


def stub_decode(ids):
    return "".join("." if i in DOTS else " w" for i in ids)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pair(request, tiny_llama, tiny_gpt2):
    large = tiny_llama if request.param == "llama" else tiny_gpt2
    return large, small_twin(request.param)


@pytest.fixture(scope="module")
def agreeing_pair():
    """A large model with the small model's greedy choices (sharper LM head): the text does not depend on routing."""
    small = small_twin("llama")
    large = copy.deepcopy(small)
    with torch.no_grad():
        large.lm_head.weight.mul_(2.0)
    return large, small


def dense_decode(ids):
    """A stub decoder with many sentence ends (every third token id is ".")."""
    return "".join("." if i % 3 == 0 else " w" for i in ids)


def foreal(large, small, n=2, p=0.5, seed=0, decode=stub_decode, **kw):
    loop = FoReaLDecoding(small, n=n, p=p, seed=seed, decode=decode)
    kw = {"max_new_tokens": N, "do_sample": False, "pad_token_id": 0, **kw}
    return loop, large.generate(PROMPT, custom_generate=loop, return_dict_in_generate=True, **kw)


def sentence_lengths(tokens):
    lengths, cur = [], 0
    for t in tokens:
        cur += 1
        if t in DOTS:
            lengths.append(cur)
            cur = 0
    return lengths + ([cur] if cur else [])


def test_sentence_ends():
    for text in ["It is blue.", "Why?", "Stop!", "done.\"", "(see above.)", "end. ", "line\n", "a\n\n", "x.\n"]:
        assert sentence_ends(text), text
    for text in ["", "It is", "a, b", "x;", "e.g", " w", "3 + 4", "the end\t"]:
        assert not sentence_ends(text), text
    assert sentence_ends("is 3.")  # documented false positive: a decimal point ending a token


def test_decode_helpers():
    ids = torch.tensor([[9, 9, 56, 1, 2]])
    assert decode_tail(stub_decode, ids, start=2, k=4) == ". w w"
    assert decode_tail(stub_decode, ids, start=0, k=2) == " w w"
    assert decode_tail(stub_decode, ids, start=5, k=4) == ""

    class Tok:
        def decode(self, ids, skip_special_tokens=False):
            return f"{ids}{skip_special_tokens}"

    assert make_decoder(Tok())([1, 2]) == "[1, 2]True"
    assert make_decoder(None, str)([1]) == "[1]"
    with pytest.raises(ValueError, match="a tokenizer .* or a decode callable is needed.*got tokenizer=None"):
        make_decoder(None, None)
    with pytest.raises(ValueError, match="decode must be a callable .*got 3"):
        make_decoder(None, 3)


def test_endpoints_equal_each_models_greedy(pair):
    """p=0: the small model's greedy generate() output, the large model never runs; p=1 with n=inf: the large
    model's, the small model never runs."""
    large, small = pair
    want_small = small.generate(PROMPT, max_new_tokens=N, do_sample=False, pad_token_id=0)
    want_large = large.generate(PROMPT, max_new_tokens=N, do_sample=False, pad_token_id=0)
    assert not torch.equal(want_small, want_large)
    _, out = foreal(large, small, n=3, p=0.0)
    assert torch.equal(out.sequences, want_small)
    assert out.router["large"] == {"forwards": 0, "tokens_fed": 0, "tokens_produced": 0}
    _, out = foreal(large, small, n=math.inf, p=1.0)
    assert torch.equal(out.sequences, want_large)
    assert out.router["small"] == {"forwards": 0, "tokens_fed": 0, "tokens_produced": 0}
    _, out = foreal(large, small, n=0, p=1.0)
    assert torch.equal(out.sequences, want_small)


def test_gate_rule_and_seeded_determinism(agreeing_pair):
    """Each sentence's gate is the next draw of torch.Generator(seed); a token comes from the leader iff its
    sentence's draw is < p and it is among the sentence's first n tokens; sentences split where the stub decodes "."
    ; the same seed gives the same routing, other seeds other routings."""
    large, small = agreeing_pair
    n, p = 2, 0.5
    routes = {}
    for seed in (0, 0, 1, 2):
        _, out = foreal(large, small, n=n, p=p, seed=seed)
        tokens = out.sequences[0, PROMPT.shape[1]:].tolist()
        lengths = sentence_lengths(tokens)
        assert len(lengths) >= 8
        gen = torch.Generator().manual_seed(seed)
        draws = [torch.rand((), generator=gen).item() < p for _ in lengths]
        want, sentence_of = [], []
        for i, (length, lead) in enumerate(zip(lengths, draws)):
            want += ["large" if lead and j < n else "small" for j in range(length)]
            sentence_of += [i] * length
        steps = out.router_steps
        assert [r["model"] for r in steps] == want
        assert [r["sentence"] for r in steps] == sentence_of
        assert [r["lead"] for r in steps] == [draws[i] for i in sentence_of]
        route = tuple(want)
        if seed in routes:
            assert routes[seed] == route
        routes[seed] = route
    assert len(set(routes.values())) == 3


def test_leader_fraction_matches_expectation(agreeing_pair):
    """Over 40 seeds (about 450 sentences) the mean leader share equals p * sum(min(n, L)) / sum(L) within 4
    standard deviations of the gate's binomial noise (and within 0.05 absolute)."""
    large, small = agreeing_pair
    n, p, runs = 2, 0.3, 40
    fractions = []
    for seed in range(runs):
        _, out = foreal(large, small, n=n, p=p, seed=seed)
        fractions.append(out.router["large_fraction"])
    lengths = sentence_lengths(out.sequences[0, PROMPT.shape[1]:].tolist())
    total = sum(lengths)
    expected = p * sum(min(n, L) for L in lengths) / total
    sd = math.sqrt(p * (1 - p) * sum(min(n, L) ** 2 for L in lengths)) / total / math.sqrt(runs)
    mean = sum(fractions) / runs
    assert abs(mean - expected) <= min(4 * sd, 0.05), (mean, expected, sd)
    assert len(set(fractions)) > 5 and max(fractions) < 1


def mixed_run(large, small):
    """The first seed whose routing has at least 4 hand-overs."""
    for seed in range(20):
        loop, out = foreal(large, small, n=2, p=0.5, seed=seed, decode=dense_decode)
        if out.router["handovers"] >= 4:
            return loop, out
    raise AssertionError("no seed gave 4 hand-overs")


def test_accounting_exact(pair):
    """Tokens produced per model match the records; each model runs once per token it writes and is fed exactly
    its cache length (every committed token once); a catch-up (> 1 token fed) happens once per span after the first."""
    large, small = pair
    loop, out = mixed_run(large, small)
    s, steps = out.router, out.router_steps
    gen = out.sequences.shape[1] - PROMPT.shape[1]
    assert 0 < gen == s["generated"] == len(steps) <= N  # eos may end it early
    for m in ("small", "large"):
        assert s[m]["tokens_produced"] == sum(r["model"] == m for r in steps)
        assert s[m]["forwards"] == s[m]["tokens_produced"]
        assert s[m]["tokens_fed"] == sum(r["fed"][m] for r in steps)
        assert all(r["fed"][m] == 0 for r in steps if r["model"] != m)
    assert s["large"]["tokens_fed"] == out.past_key_values.get_seq_length()
    assert s["small"]["tokens_fed"] == loop.last_run.small_cache.get_seq_length()
    spans = sum(1 for i, r in enumerate(steps) if i == 0 or steps[i - 1]["model"] != r["model"])
    assert spans == s["spans"]["small"] + s["spans"]["large"] == s["handovers"] + 1
    assert sum(r["fed"][r["model"]] > 1 for r in steps) == spans
    assert loop.summary() == s


def test_caches_consistent_with_recomputation(pair):
    large, small = pair
    loop, out = mixed_run(large, small)
    seq, steps = out.sequences, out.router_steps
    p = PROMPT.shape[1]
    for m, cache, model in (("large", out.past_key_values, large), ("small", loop.last_run.small_cache, small)):
        last = max(r["step"] for r in steps if r["model"] == m)
        assert_cache_equal(cache, fresh_cache(model, seq[:, : p + last]), p + last)
    with torch.no_grad():
        n = out.past_key_values.get_seq_length()
        got = large(seq[:, n:], past_key_values=out.past_key_values,
                    position_ids=torch.arange(n, seq.shape[1])[None]).logits[:, -1]
        torch.testing.assert_close(got, large(seq).logits[:, -1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kwargs, message", [
    ({"p": 1.5}, r"p must be a probability in \[0, 1\], got 1.5"),
    ({"p": -0.1}, r"p must be a probability in \[0, 1\], got -0.1"),
    ({"p": float("nan")}, r"p must be a probability in \[0, 1\], got nan"),
    ({"p": True}, r"p must be a probability in \[0, 1\], got True"),
    ({"n": -1}, "n must be an integer >= 0 or math.inf, got -1"),
    ({"n": 2.5}, "n must be an integer >= 0 or math.inf, got 2.5"),
    ({"n": True}, "n must be an integer >= 0 or math.inf, got True"),
    ({"seed": "a"}, "seed must be an integer, got 'a'"),
    ({"decode": None}, "a tokenizer .* or a decode callable is needed"),
])
def test_argument_validation(kwargs, message):
    kwargs = {"decode": stub_decode, **kwargs}
    with pytest.raises(ValueError, match=message):
        FoReaLDecoding(small_twin("llama"), **kwargs)


def test_refusals_and_factory(tiny_llama, char_tokenizer):
    small = small_twin("llama")
    with pytest.raises(ValueError, match="batch size 1 only; got a batch of 2"):
        tiny_llama.generate(PROMPT.repeat(2, 1), max_new_tokens=3, pad_token_id=0,
                            custom_generate=FoReaLDecoding(small, decode=stub_decode))
    loop = FoReaLDecoding.for_model(tiny_llama, char_tokenizer, small="self:1", n=3, p=0.25, seed=7)
    assert loop.small.config.num_hidden_layers == 1 and (loop.n, loop.p, loop.seed) == (3, 0.25, 7)
    assert loop.decode([70, 71]) == char_tokenizer.decode([70, 71], skip_special_tokens=True)
    assert FoReaLDecoding.for_model(tiny_llama, char_tokenizer, small=small).small is small
    with pytest.raises(ValueError, match="p must be a probability"):
        FoReaLDecoding.for_model(tiny_llama, char_tokenizer, small=small, p=2)
