"""CARDS, Cascade Reward Sampling (arXiv:2406.16306): segment-level rejection sampling with an entropy-triggered
segment boundary, a rising acceptance threshold, soft/hard acceptance and a rejection cap (tiny models with scripted
rewards; one real-model property test)."""

from __future__ import annotations

import math

import pytest
import torch

from hf_decoding_ext.core.entropy import entropy
from hf_decoding_ext.search.cards import (
    CascadeRewardSampling,
    acceptance_probability,
    load_calibration,
    threshold_schedule,
)

SAMPLE = dict(do_sample=True, top_k=0, pad_token_id=0, eos_token_id=2, return_dict_in_generate=True)


class Spy:
    """A scripted reward on token ids that records every call: the fraction of even token ids (0 when empty)."""

    def __init__(self, fn=None):
        self.calls: list[tuple[list[int], float]] = []
        self.fn = fn or (lambda ids: sum(t % 2 == 0 for t in ids) / len(ids) if ids else 0.0)

    def __call__(self, ids):
        value = float(self.fn(list(ids)))
        self.calls.append((list(ids), value))
        return value


def _prompts(rows=1, length=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (rows, length), generator=gen)


def _run(model, loop, ids, new=24, seed=0, **kw):
    torch.manual_seed(seed)
    return model.generate(ids, custom_generate=loop, max_new_tokens=new, **{**SAMPLE, **kw})


def _response(out, ids, row=0):
    toks = out.sequences[row, ids.shape[1]:].tolist()
    return toks[:toks.index(2) + 1] if 2 in toks else toks


def _replay(calls, loop, horizon, r_star, alpha):
    """Replay CARDS' hard rule on the recorded reward calls: returns the committed response and the number of
    fallbacks, asserting that every candidate extends the current committed prefix."""
    (first, r_empty), rest = calls[0], calls[1:]
    assert first == []
    reward0 = (1 - alpha) * r_empty + alpha * r_star
    prefix, seen, fallbacks = [], [], 0
    for ids, r in rest:
        assert ids[:len(prefix)] == prefix and len(ids) > len(prefix), "a candidate must extend the committed prefix"
        seen.append((r, ids))
        tau = threshold_schedule(reward0, r_star, len(ids), horizon)
        if len(seen) == loop.max_rejections + 1:
            best = max(seen, key=lambda x: x[0])[0]
            prefix = next(c for v, c in seen if v == best)  # the first candidate with the best reward
            seen, fallbacks = [], fallbacks + 1
        elif r >= tau:
            prefix, seen = ids, []
    return prefix, fallbacks


# ------------------------------------------------------------------------------------------------- pieces
def test_threshold_schedule_and_acceptance_probability():
    assert threshold_schedule(0.2, 1.0, 0, 40) == 0.2
    assert threshold_schedule(0.2, 1.0, 20, 40) == pytest.approx(0.6)
    assert threshold_schedule(0.2, 1.0, 60, 40) == 1.0  # capped at r*
    assert threshold_schedule(2.0, 1.0, 5, 40) == 1.0  # r0 above r*: min(., r*) as in the official code
    assert acceptance_probability(0.3, 0.3, 0.5) == 1.0
    assert acceptance_probability(0.0, 0.5, 0.5) == pytest.approx(math.exp(-1))
    assert acceptance_probability(0.49, 0.5, 0.5, "hard") == 0.0
    assert acceptance_probability(0.5, 0.5, 0.5, "hard") == 1.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(reward_threshold=float("nan")), "reward_threshold"),
    (dict(reward_threshold=1.0, beta=0.0), "beta must be a positive number, got 0.0"),
    (dict(reward_threshold=1.0, alpha=1.5), "alpha must be a number in \\[0, 1\\], got 1.5"),
    (dict(reward_threshold=1.0, option="medium"), "'medium'"),
    (dict(reward_threshold=1.0, max_rejections=-1), "max_rejections must be an integer >= 0, got -1"),
    (dict(reward_threshold=1.0, entropy_threshold=-1.0), "threshold must be a non-negative number, got -1.0"),
    (dict(reward_threshold=1.0, min_segment_tokens=8, max_segment_tokens=4), "min_tokens \\(8\\)"),
    (dict(reward_threshold=1.0, horizon=0), "horizon must be an integer >= 1, got 0"),
    (dict(reward_threshold=1.0, seed=1.5), "seed must be None or an integer, got 1.5"),
])
def test_invalid_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CascadeRewardSampling(Spy(), **kwargs)


def test_vader_needs_a_tokenizer_and_greedy_is_refused(tiny_llama):
    with pytest.raises(ValueError, match="tokenizer"):
        CascadeRewardSampling("vader", reward_threshold=0.5)
    with pytest.raises(ValueError, match="'sentiment'"):
        CascadeRewardSampling("sentiment", reward_threshold=0.5)
    loop = CascadeRewardSampling(Spy(), reward_threshold=0.5)
    with pytest.raises(ValueError, match="do_sample=True"):
        tiny_llama.generate(_prompts(), custom_generate=loop, max_new_tokens=4, do_sample=False, pad_token_id=0)


# ------------------------------------------------------------------------------------------------- the rule
@pytest.mark.parametrize("seed", [0, 1])
def test_hard_mode_commits_exactly_what_the_rule_accepts(tiny_model, seed):
    spy = Spy()
    loop = CascadeRewardSampling(spy, reward_threshold=0.7, alpha=0.5, option="hard", max_rejections=3,
                                 entropy_threshold=4.7, seed=seed)
    ids = _prompts()
    out = _run(tiny_model, loop, ids, new=24)
    prefix, fallbacks = _replay(spy.calls, loop, 24, 0.7, 0.5)
    assert prefix == _response(out, ids)
    stats, counts, segs = out.cards_stats[0], out.search_stats[0], out.cards_segments[0]
    assert stats["fallbacks"] == fallbacks
    assert stats["rejections"] > 0 and stats["candidates"] == len(spy.calls) - 1  # not vacuous
    for s in segs:  # what the loop reports agrees with the rule
        if s["how"] == "accepted":
            assert s["reward"] >= s["threshold"]
        else:
            assert s["candidates"] == loop.max_rejections + 1
    assert sum(s["length"] for s in segs) == len(prefix)
    # counters: one reward call per candidate plus r0; one rollout per candidate; every sampled token counted
    assert counts["scorer_calls"] == len(spy.calls) == stats["rm_calls"] + 1
    assert counts["rollouts"] == stats["candidates"]
    assert out.rewards[0] == pytest.approx(spy.fn(prefix))


def test_generated_tokens_count_every_candidate_segment(tiny_llama):
    spy = Spy()
    loop = CascadeRewardSampling(spy, reward_threshold=0.8, option="hard", max_rejections=2, entropy_threshold=4.7,
                                 seed=0)
    ids = _prompts()
    out = _run(tiny_llama, loop, ids, new=20)
    # replay: each candidate's new tokens are its length minus the committed prefix it extends
    prefix, total, seen = [], 0, []
    reward0 = 0.5 * 0.0 + 0.5 * 0.8
    for cand, r in spy.calls[1:]:
        total += len(cand) - len(prefix)
        seen.append((r, cand))
        if len(seen) == 3:
            prefix, seen = max(seen, key=lambda x: x[0])[1], []
        elif r >= threshold_schedule(reward0, 0.8, len(cand), 20):
            prefix, seen = cand, []
    assert out.search_stats[0]["generated_tokens"] == total
    stops = sum(1 for s in out.cards_segments[0] if s["end"] == "stop")
    assert out.cards_stats[0]["llm_calls"] >= total + stops


def test_rejection_cap_falls_back_to_the_best_candidate(tiny_llama):
    spy = Spy()
    loop = CascadeRewardSampling(spy, reward_threshold=10.0, option="hard", max_rejections=2, entropy_threshold=4.7,
                                 seed=0)  # nothing ever passes: every segment is a fallback
    ids = _prompts()
    out = _run(tiny_llama, loop, ids, new=16)
    segs, calls = out.cards_segments[0], spy.calls[1:]
    assert segs and all(s["how"] == "fallback" and s["candidates"] == 3 for s in segs)
    assert len(calls) == 3 * len(segs)
    prefix = []
    for k in range(len(segs)):
        group = calls[3 * k:3 * k + 3]
        assert all(c[:len(prefix)] == prefix for c, _ in group)
        best = max(r for _, r in group)
        assert segs[k]["reward"] == best
        prefix = next(c for c, r in group if r == best)
    assert prefix == _response(out, ids)
    assert out.cards_stats[0]["fallbacks"] == len(segs) and out.cards_stats[0]["rejections"] == 2 * len(segs)


def test_soft_acceptance_rate_matches_the_probability(tiny_llama):
    # constant reward 0 and alpha = 1 (threshold r* throughout): every candidate is accepted with probability
    # p = exp(-r*/beta); segments of exactly 4 tokens (min = max = 4) give many segments per run
    rates = {}
    for p in (0.3, 0.7):
        beta = 0.5
        r_star = -beta * math.log(p)
        segments = candidates = 0
        for seed in range(4):
            loop = CascadeRewardSampling(Spy(lambda ids: 0.0), reward_threshold=r_star, alpha=1.0, beta=beta,
                                         option="soft", max_rejections=1000, min_segment_tokens=4,
                                         max_segment_tokens=4, entropy_threshold=0.0, seed=seed)
            out = _run(tiny_llama, loop, _prompts(), new=40, seed=seed)
            segments += out.cards_stats[0]["segments"]
            candidates += out.cards_stats[0]["candidates"]
            assert all(s["how"] == "accepted" for s in out.cards_segments[0])
        rates[p] = segments / candidates
        assert segments >= 32
        assert abs(rates[p] - p) < 4 * math.sqrt(p * (1 - p) / candidates) + 0.02, (p, rates[p], candidates)
    assert rates[0.3] < rates[0.7]


def test_seeded_runs_are_reproducible_and_rows_independent(tiny_llama):
    loop = CascadeRewardSampling(Spy(), reward_threshold=0.7, entropy_threshold=4.7, seed=5)
    ids = _prompts(rows=2, length=6, seed=3)
    both = _run(tiny_llama, loop, ids, new=16, seed=0)
    again = _run(tiny_llama, loop, ids, new=16, seed=99)  # the global seed does not matter with seed=
    assert torch.equal(both.sequences, again.sequences)
    for row in range(2):
        alone = _run(tiny_llama, loop, ids[row:row + 1], new=16)
        assert _response(alone, ids[row:row + 1]) == _response(both, ids, row)
        assert alone.cards_segments[0] == both.cards_segments[row]
    assert len(both.search_stats) == len(both.cards_stats) == len(both.rewards) == 2


# ------------------------------------------------------------------------------------------------- segmentation
def test_segments_end_at_high_entropy_or_the_length_cap(tiny_model):
    ids = _prompts()
    # a threshold inside the tiny model's entropy range, so both boundaries and caps occur
    torch.manual_seed(0)
    plain = tiny_model.generate(ids, do_sample=True, top_k=0, max_new_tokens=40, pad_token_id=0)
    with torch.no_grad():
        ent = entropy(tiny_model(plain).logits[0, ids.shape[1] - 1:])
    tau = float(ent.quantile(0.9))
    loop = CascadeRewardSampling(Spy(), reward_threshold=0.6, option="hard", max_rejections=2, entropy_threshold=tau,
                                 max_segment_tokens=7, seed=1)
    out = _run(tiny_model, loop, ids, new=48)
    with torch.no_grad():
        logits = tiny_model(out.sequences).logits[0]
    segs = out.cards_segments[0]
    start, ends = 0, set()
    tol = 1e-4
    for s in segs:
        end = start + s["length"]
        ends.add(s["end"])
        after = float(entropy(logits[ids.shape[1] + end - 1]))  # the next-token distribution after the segment
        if s["end"] == "stop":
            assert s["length"] >= 4 and after >= tau - tol
        elif s["end"] == "cap":
            assert s["length"] == 7
        else:
            assert s["end"] in ("eos", "criteria") and s is segs[-1]
        for k in range(start + 4, end):  # the boundary did not fire earlier (after >= 4 tokens of the segment)
            assert float(entropy(logits[ids.shape[1] + k - 1])) < tau + tol
        start = end
    assert start == len(_response(out, ids))
    assert "stop" in ends and "cap" in ends


def test_threshold_follows_the_generation_horizon(tiny_llama):
    spy = Spy()
    loop = CascadeRewardSampling(spy, reward_threshold=0.9, alpha=0.0, option="hard", max_rejections=0,
                                 entropy_threshold=4.7, seed=0)  # every segment taken at once: thresholds visible
    out = _run(tiny_llama, loop, _prompts(), new=30)
    start = 0
    for s in out.cards_segments[0]:
        start += s["length"]
        assert s["threshold"] == pytest.approx(threshold_schedule(0.0, 0.9, start, 30))
    fixed = CascadeRewardSampling(spy, reward_threshold=0.9, alpha=0.0, option="hard", max_rejections=0,
                                  entropy_threshold=4.7, seed=0, horizon=10)
    out = _run(tiny_llama, fixed, _prompts(), new=30)
    assert out.cards_segments[0][-1]["threshold"] == pytest.approx(0.9)


def test_reward_with_prompt_receives_the_prompt(tiny_llama, char_tokenizer):
    seen = []

    def reward(text, prompt):
        seen.append((text, prompt))
        return float(len(text) % 3)

    loop = CascadeRewardSampling(reward, char_tokenizer, reward_threshold=1.0, reward_uses_prompt=True,
                                 entropy_threshold=4.7, seed=0)
    ids = torch.tensor([char_tokenizer("hello world, this")["input_ids"]])
    out = _run(tiny_llama, loop, ids, new=12)
    assert seen[0] == ("", "hello world, this")
    assert all(p == "hello world, this" for _, p in seen)
    final = char_tokenizer.decode(_response(out, ids), skip_special_tokens=True)
    assert final in [t for t, _ in seen]


# ------------------------------------------------------------------------------------------------- real model
@pytest.mark.real_model
def test_cards_raises_the_reward_on_the_default_model(smollm):
    """Hard mode with the committed dev calibration on two test prompts (20 tokens): every committed segment
    passes its threshold unless it is a fallback, and the responses' VADER reward beats plain samples'."""
    from hf_decoding_ext import encode_prompts
    from hf_decoding_ext.core.resources import read_jsonl
    from hf_decoding_ext.core.scoring import vader_reward

    model, tok = smollm
    cal = load_calibration()
    prompts = [p["prompt"] for p in read_jsonl("search", "reward_prompts.jsonl")][4:6]
    sampling = dict(do_sample=True, temperature=0.7, top_k=40, max_new_tokens=20, pad_token_id=tok.pad_token_id)
    cards, plain = [], []
    for i, prompt in enumerate(prompts):
        enc = encode_prompts(tok, prompt)
        loop = CascadeRewardSampling(tokenizer=tok, reward_threshold=cal["reward_threshold"],
                                     entropy_threshold=cal["entropy_threshold"], beta=cal["beta"], option="hard",
                                     max_rejections=4, seed=i)
        out = model.generate(**enc, custom_generate=loop, return_dict_in_generate=True, **sampling)
        text = tok.decode(out.sequences[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        cards.append(vader_reward(text))
        assert out.rewards[0] == pytest.approx(cards[-1], abs=1e-6)
        for s in out.cards_segments[0]:
            assert s["how"] == "fallback" or s["reward"] >= s["threshold"]
        assert out.search_stats[0]["scorer_calls"] == out.cards_stats[0]["candidates"] + 1
        torch.manual_seed(i)
        pool = model.generate(**enc, num_return_sequences=4, **sampling)
        plain += [vader_reward(tok.decode(r[enc["input_ids"].shape[1]:], skip_special_tokens=True)) for r in pool]
    assert sum(cards) / len(cards) > sum(plain) / len(plain)
