"""Entropy Adaptive Decoding (hf_decoding_ext.collaboration.entropy_adaptive): endpoints, the switching rule,
exact per-model accounting, cache consistency, monotonicity in tau, validation. Tiny random models only."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from test_router import PROMPT, assert_cache_equal, fresh_cache, small_twin

from hf_decoding_ext.collaboration.entropy_adaptive import EntropyAdaptiveDecoding
from hf_decoding_ext.core.entropy import entropy

INF = float("inf")
N = 30


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pair(request, tiny_llama, tiny_gpt2):
    large = tiny_llama if request.param == "llama" else tiny_gpt2
    return large, small_twin(request.param)


def ead(large, small, threshold, window=3, **kw):
    loop = EntropyAdaptiveDecoding(small, threshold=threshold, window=window)
    kw = {"max_new_tokens": N, "do_sample": False, "pad_token_id": 0, **kw}
    out = large.generate(PROMPT, custom_generate=loop, return_dict_in_generate=True, **kw)
    return loop, out


def median_threshold(large, small, window=3):
    """A threshold in the middle of the rolling entropies of the small model's own trajectory."""
    _, out = ead(large, small, INF, window)
    values = sorted(r["rolling_entropy"] for r in out.router_steps)
    return values[len(values) // 2]


def test_endpoints_equal_each_models_greedy(pair):
    """tau=+inf: the small model's greedy generate() output, large model never run; tau=-inf: the large model's."""
    large, small = pair
    want_small = small.generate(PROMPT, max_new_tokens=N, do_sample=False, pad_token_id=0)
    want_large = large.generate(PROMPT, max_new_tokens=N, do_sample=False, pad_token_id=0)
    assert not torch.equal(want_small, want_large)
    _, out = ead(large, small, INF)
    assert torch.equal(out.sequences, want_small)
    assert out.router["large"] == {"forwards": 0, "tokens_fed": 0, "tokens_produced": 0}
    assert out.router["large_fraction"] == 0.0
    _, out = ead(large, small, -INF)
    assert torch.equal(out.sequences, want_large)
    assert out.router["small"]["tokens_produced"] == 0 and out.router["large_fraction"] == 1.0
    assert out.router["large"]["forwards"] == N


def test_switching_rule_and_entropies(pair):
    """Each token comes from the large model iff the mean of the last w small-model entropies exceeds tau; the
    recorded entropy is the small model's next-token entropy recomputed from scratch on the prefix."""
    large, small = pair
    window = 3
    tau = median_threshold(large, small, window)
    _, out = ead(large, small, tau, window)
    steps = out.router_steps
    p = PROMPT.shape[1]
    hs = []
    for r in steps:
        with torch.no_grad():
            logits = small(out.sequences[:, : p + r["step"]]).logits[0, -1]
        assert r["entropy"] == pytest.approx(float(entropy(logits)), abs=1e-4)
        hs.append(r["entropy"])
        mean = sum(hs[-window:]) / len(hs[-window:])
        assert r["rolling_entropy"] == pytest.approx(mean, abs=1e-9)
        assert r["model"] == ("large" if mean > tau else "small")
    assert out.router["spans"]["large"] >= 2 and out.router["spans"]["small"] >= 2


def test_accounting_exact(pair):
    """Per-model counts add up: tokens produced sum to the generated length; the small model runs once per token and
    is fed the whole sequence but the last token once; the large model runs once per token it writes, and exactly
    once per hand-over span feeds more than one token (its catch-up); the large model's tokens fed equal its cache
    length."""
    large, small = pair
    tau = median_threshold(large, small)
    loop, out = ead(large, small, tau)
    s, steps = out.router, out.router_steps
    p, gen = PROMPT.shape[1], out.sequences.shape[1] - PROMPT.shape[1]
    assert 0 < gen <= N and gen == s["generated"] == len(steps)  # eos may end it early
    assert s["small"]["tokens_produced"] + s["large"]["tokens_produced"] == gen
    assert s["large"]["tokens_produced"] == sum(r["model"] == "large" for r in steps)
    assert s["small"]["forwards"] == gen and s["small"]["tokens_fed"] == p + gen - 1
    assert s["large"]["forwards"] == s["large"]["tokens_produced"]
    assert s["large"]["tokens_fed"] == out.past_key_values.get_seq_length()
    catch_ups = sum(r["fed"]["large"] > 1 for r in steps)
    assert catch_ups == s["spans"]["large"] >= 2
    spans = sum(1 for i, r in enumerate(steps) if i == 0 or steps[i - 1]["model"] != r["model"])
    assert spans == s["spans"]["small"] + s["spans"]["large"] == s["handovers"] + 1
    assert s["large_fraction"] == s["large"]["tokens_produced"] / gen
    assert loop.summary() == s


def test_caches_consistent_with_recomputation(pair):
    """After a run with several hand-overs, both models' caches equal a from-scratch forward on the final sequence
    (the prefix each covers), and continuing from them gives the recomputed next-token logits."""
    large, small = pair
    tau = median_threshold(large, small)
    loop, out = ead(large, small, tau)
    assert out.router["handovers"] >= 3
    seq = out.sequences
    large_len = out.past_key_values.get_seq_length()
    last_large = max(r["step"] for r in out.router_steps if r["model"] == "large")
    assert large_len == PROMPT.shape[1] + last_large
    assert_cache_equal(out.past_key_values, fresh_cache(large, seq[:, :large_len]), large_len)
    assert_cache_equal(loop.last_run.small_cache, fresh_cache(small, seq[:, :-1]), seq.shape[1] - 1)
    with torch.no_grad():
        n = large_len
        got = large(seq[:, n:], past_key_values=out.past_key_values,
                    position_ids=torch.arange(n, seq.shape[1])[None]).logits[:, -1]
        torch.testing.assert_close(got, large(seq).logits[:, -1], atol=1e-4, rtol=1e-4)


def test_large_fraction_non_increasing_in_tau_on_a_fixed_trajectory(tiny_llama):
    """With a large model that agrees with the small one on every greedy token (the small model with a sharper LM
    head: same argmax, other entropies) the sequence does not depend on tau, and the large model's share of tokens
    is non-increasing in tau, equal to the share of rolling entropies above tau, from 1 to 0."""
    small = small_twin("llama")
    large = copy.deepcopy(small)
    with torch.no_grad():
        large.lm_head.weight.mul_(2.0)
    _, ref = ead(large, small, INF)
    means = sorted(r["rolling_entropy"] for r in ref.router_steps)
    taus = [-INF] + [(a + b) / 2 for a, b in itertools.pairwise(means) if a != b] + [INF]
    fractions = []
    for tau in taus:
        _, out = ead(large, small, tau)
        assert torch.equal(out.sequences, ref.sequences)
        fractions.append(out.router["large_fraction"])
        assert fractions[-1] == sum(m > tau for m in means) / N
    assert fractions[0] == 1.0 and fractions[-1] == 0.0
    assert all(a >= b for a, b in itertools.pairwise(fractions))
    assert len(set(fractions)) > 5


def test_large_fraction_falls_with_tau_on_a_real_pair(pair):
    """On two different models the trajectory depends on tau (lossy), so only the trend is asserted: a threshold at
    the low quartile of the small model's rolling entropies hands more tokens to the large model than one at the
    high quartile, and both lie strictly between the endpoints."""
    large, small = pair
    _, ref = ead(large, small, INF)
    means = sorted(r["rolling_entropy"] for r in ref.router_steps)
    n = len(means)
    low = ead(large, small, means[n // 4])[1].router["large_fraction"]
    high = ead(large, small, means[3 * n // 4])[1].router["large_fraction"]
    assert 1.0 > low > high > 0.0


def test_generate_flags_honoured(tiny_llama):
    """max_new_tokens is exact; eos_token_id stops at the first eos whichever model wrote it; sampling with
    temperature at tau=-inf equals the large model's own sampling."""
    small = small_twin("llama")
    tau = median_threshold(tiny_llama, small)
    _, out = ead(tiny_llama, small, tau, max_new_tokens=7)
    assert out.sequences.shape[1] == PROMPT.shape[1] + 7 and out.router["generated"] == 7
    _, full = ead(tiny_llama, small, tau)
    new = full.sequences[0, PROMPT.shape[1]:].tolist()
    k = next(i for i in range(3, N) if new[i] not in new[:i])
    eos = new[k]
    _, stopped = ead(tiny_llama, small, tau, eos_token_id=eos)
    assert stopped.sequences[0, PROMPT.shape[1]:].tolist() == new[: k + 1]
    assert stopped.router["generated"] == k + 1
    kw = {"max_new_tokens": 10, "do_sample": True, "temperature": 0.8, "pad_token_id": 0}
    torch.manual_seed(5)
    want = tiny_llama.generate(PROMPT, **kw)
    torch.manual_seed(5)
    got = tiny_llama.generate(PROMPT, custom_generate=EntropyAdaptiveDecoding(small, threshold=-INF), **kw)
    assert torch.equal(got, want)


@pytest.mark.parametrize("kwargs, message", [
    ({"threshold": float("nan")}, "threshold must be a real number .*got nan"),
    ({"threshold": "high"}, "threshold must be a real number .*got 'high'"),
    ({"threshold": True}, "threshold must be a real number .*got True"),
    ({"window": 0}, "window must be an integer >= 1, got 0"),
    ({"window": 2.5}, "window must be an integer >= 1, got 2.5"),
    ({"window": True}, "window must be an integer >= 1, got True"),
])
def test_argument_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EntropyAdaptiveDecoding(small_twin("llama"), **kwargs)


def test_refusals_and_factory(tiny_llama):
    small = small_twin("llama")
    with pytest.raises(ValueError, match="batch size 1 only; got a batch of 2"):
        tiny_llama.generate(PROMPT.repeat(2, 1), max_new_tokens=3, pad_token_id=0,
                            custom_generate=EntropyAdaptiveDecoding(small))
    loop = EntropyAdaptiveDecoding.for_model(tiny_llama, small="self:1", threshold=1.5, window=4)
    assert loop.small.config.num_hidden_layers == 1 and (loop.threshold, loop.window) == (1.5, 4)
    assert EntropyAdaptiveDecoding.for_model(tiny_llama, small=small).small is small
    with pytest.raises(ValueError, match="threshold must be a real number"):
        EntropyAdaptiveDecoding.for_model(tiny_llama, small=small, threshold=math.nan)
