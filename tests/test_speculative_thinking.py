"""Speculative Thinking (hf_decoding_ext.collaboration.speculative_thinking): endpoints (no trigger / no keyword ->
the small model's output, the large model never runs), the keyword classifier, the full rule (trigger, look-ahead,
reflective hand-over, verify span, negative counter and recap insertion) against a cache-free re-implementation,
exact accounting, cache consistency, validation. Tiny random models only; a stub decoder maps token ids to text."""

from __future__ import annotations

import pytest
import torch
from test_router import PROMPT, assert_cache_equal, fresh_cache, small_twin

from hf_decoding_ext.collaboration.speculative_thinking import (
    KEYWORDS,
    RECAP_PROMPT,
    SpeculativeThinking,
    classify_snippet,
    contains_keyword,
)

N = 80
RECAP = (3, 4, 5)
SMALL_BUDGETS = {"snippet_tokens": 4, "verify_tokens": 5, "recap_tokens": 6, "recap_after": 2, "recap_step": 2,
                 "max_recap_tokens": 9, "negative_step": 1, "max_negative": 4}
"""Budgets scaled down from the official 20/125/125/15/25/200/5/30 so that a tiny run exercises every branch."""


def stub_decoder(trigger=7, wait=5, check=11, yes=13):
    """Token id -> text: multiples of ``trigger`` are "\\n\\n", then of ``wait`` " wait", of ``check`` " check", of
    ``yes`` " yes", the rest " w" (0 disables a class)."""
    def word(i):
        for mod, text in ((trigger, "\n\n"), (wait, " wait"), (check, " check"), (yes, " yes")):
            if mod and i % mod == 0:
                return text
        return " w"
    return lambda ids: "".join(word(i) for i in ids)


def st(large, small, decode, n=N, **kw):
    params = {**SMALL_BUDGETS, **kw}
    loop = SpeculativeThinking(small, decode=decode, recap_ids=RECAP, **params)
    out = large.generate(PROMPT, custom_generate=loop, return_dict_in_generate=True, max_new_tokens=n,
                         do_sample=False, pad_token_id=0)
    return loop, out


def reference(large, small, decode, n=N, snippet_tokens=4, verify_tokens=5, recap_tokens=6, recap_after=2,
              recap_step=2, max_recap_tokens=9, negative_step=1, max_negative=4, eos=2):
    """The official algorithm (speculative_hf.py, choose_large=True) re-implemented with from-scratch forwards:
    returns (sequence, per-token model list)."""
    ids, route = PROMPT.clone(), []
    neg, budget, after = 0, recap_tokens, recap_after

    def nxt(model, seq):
        with torch.no_grad():
            return int(model(seq).logits[0, -1].argmax())

    def done():
        return len(route) >= n or (route and int(ids[0, -1]) == eos)

    def write(name, k):
        nonlocal ids
        for _ in range(k):
            if done():
                return
            t = nxt(large if name == "large" else small, ids)
            ids = torch.cat([ids, torch.tensor([[t]])], dim=1)
            route.append(name)

    while not done():
        write("small", 1)
        if done() or "\n\n" not in decode([int(ids[0, -1])]):
            continue
        if neg >= after:
            for t in RECAP[: n - len(route)]:
                ids = torch.cat([ids, torch.tensor([[t]])], dim=1)
                route.append("inserted")
            write("large", budget)
            neg, budget, after = 0, min(budget + recap_step, max_recap_tokens), min(after + negative_step, max_negative)
            continue
        draft, seq = [], ids
        for _ in range(min(snippet_tokens, n - len(route))):
            t = nxt(small, seq)
            draft.append(t)
            seq = torch.cat([seq, torch.tensor([[t]])], dim=1)
            if t == eos:
                break
        if classify_snippet(decode(draft)) == 0:
            continue
        start = ids.shape[1]
        write("large", snippet_tokens)
        text = decode(ids[0, start:].tolist())
        if classify_snippet(text) < 0:
            neg += 1
        if contains_keyword(text, KEYWORDS["verify"]):
            write("large", verify_tokens)
    return ids, route


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pair(request, tiny_llama, tiny_gpt2):
    large = tiny_llama if request.param == "llama" else tiny_gpt2
    return large, small_twin(request.param)


def test_classifier_and_keywords():
    """The official scoring: positive vs negative + verify counts (substrings, case-insensitive); ties above zero
    are negative; the official lists and recap prompt."""
    assert classify_snippet("So x = 4.") == 0
    assert classify_snippet("Wait, that is wrong") == -1
    assert classify_snippet("Let me CHECK") == -1
    assert classify_snippet("Yes, that is the final answer") == 1
    assert classify_snippet("yes, but wait") == -1  # tie
    assert classify_snippet("yes yes wait") == 1
    assert classify_snippet("Alternatively, another way; yes") == -1
    assert classify_snippet("awaiting") == -1  # substring match, as in the official code
    assert not contains_keyword("wait", KEYWORDS["verify"]) and contains_keyword("Think again", KEYWORDS["verify"])
    assert KEYWORDS == {"verify": ("verify", "think again", "recap", "check"),
                        "negative": ("wait", "alternatively", "hold on", "another"),
                        "positive": ("yeah", "yes", "final answer", "confident")}
    assert RECAP_PROMPT == "Let me check whether there are some wrong steps:"


def test_no_trigger_or_no_keyword_is_the_small_model(pair):
    """Without triggers: the small model's greedy output, the large model never runs and no look-ahead is made.
    With triggers but no keyword: the same output, look-aheads counted, the large model never runs."""
    large, small = pair
    want = small.generate(PROMPT, max_new_tokens=N, do_sample=False, pad_token_id=0)
    assert not torch.equal(want, large.generate(PROMPT, max_new_tokens=N, do_sample=False, pad_token_id=0))
    idle = {"forwards": 0, "tokens_fed": 0, "tokens_produced": 0}
    _, out = st(large, small, stub_decoder(trigger=0))
    assert torch.equal(out.sequences, want)
    assert out.router["large"] == idle and out.router["speculative_thinking"]["triggers"] == 0
    assert out.router["small"]["forwards"] == out.router["generated"]
    _, out = st(large, small, stub_decoder(trigger=3, wait=0, check=0, yes=0))
    assert torch.equal(out.sequences, want)
    assert out.router["large"] == idle
    x = out.router["speculative_thinking"]
    assert x["triggers"] >= 2 and x["reflective"] == 0 and x["lookahead_forwards"] >= 2 * 4 - 1


def test_trigger_split_over_tokens(tiny_llama):
    """A decoder writing even ids as "\\n": with the official one-token check no trigger fires; with
    trigger_window=2 one fires exactly at each token completing "\\n\\n" (an even token after an even token); without
    keywords the output stays the small model's."""
    small = small_twin("llama")
    decode = lambda ids: "".join("\n" if i % 2 == 0 else "x" for i in ids)
    want = small.generate(PROMPT, max_new_tokens=N, do_sample=False, pad_token_id=0)
    toks = want[0, PROMPT.shape[1]:].tolist()
    expected = [i for i in range(1, len(toks)) if toks[i] % 2 == 0 and toks[i - 1] % 2 == 0]
    assert len(expected) >= 2
    _, out = st(tiny_llama, small, decode)
    assert torch.equal(out.sequences, want) and out.router["speculative_thinking"]["triggers"] == 0
    _, out = st(tiny_llama, small, decode, trigger_window=2)
    assert torch.equal(out.sequences, want) and out.router["large"]["forwards"] == 0
    fired = [i + 1 for i in expected if i + 1 < len(toks)]  # noted on the record of the token after the trigger
    assert [r["step"] for r in out.router_steps if r.get("trigger")] == fired
    assert out.router["speculative_thinking"]["triggers"] == len(fired)


@pytest.mark.parametrize("decoder", [{"trigger": 7, "wait": 5, "check": 11, "yes": 13}, {"trigger": 4, "wait": 9, "check": 5,
                                                                                    "yes": 0}])
def test_rule_matches_cache_free_reference(tiny_llama, decoder):
    """Sequence and per-token routing equal a from-scratch re-implementation of the official algorithm; the run
    exercises reflective hand-overs, verify spans and a recap (inserted prompt tokens)."""
    small, decode = small_twin("llama"), stub_decoder(**decoder)
    _, out = st(tiny_llama, small, decode)
    want, route = reference(tiny_llama, small, decode)
    assert torch.equal(out.sequences, want)
    assert [r["model"] for r in out.router_steps] == route
    assert [r["step"] for r in out.router_steps] == list(range(len(route)))
    x = out.router["speculative_thinking"]
    assert x["reflective"] >= 1 and x["recaps"] >= 1 and x["inserted_tokens"] == 3 * x["recaps"]
    actions = [r.get("action") for r in out.router_steps]
    assert actions.count("reflect") == x["reflective"] and actions.count("recap") == x["recaps"]
    assert actions.count("verify") == x["verify_spans"]
    for i, r in enumerate(out.router_steps):
        if r.get("action") == "recap":
            assert [s["token"] for s in out.router_steps[i - 3:i]] == list(RECAP)
            assert [s["model"] for s in out.router_steps[i - 3:i]] == ["inserted"] * 3 and r["model"] == "large"
        if "snippet" in r:  # the look-ahead is the small model's greedy continuation
            prefix = out.sequences[:, : PROMPT.shape[1] + r["step"]]
            cont = small.generate(prefix, max_new_tokens=r["snippet_len"], do_sample=False, pad_token_id=0)
            assert r["snippet"] == decode(cont[0, prefix.shape[1]:].tolist())


def test_verify_span_taken(tiny_llama):
    """A decoder under which the large model's snippets contain a verify keyword: the large model writes the
    snippet and then verify_tokens more, as the reference does."""
    small = small_twin("llama")
    for decoder in ({"trigger": 7, "wait": 0, "check": 3, "yes": 0}, {"trigger": 4, "wait": 9, "check": 5, "yes": 0},
                    {"trigger": 5, "wait": 0, "check": 2, "yes": 0}):
        decode = stub_decoder(**decoder)
        _, out = st(tiny_llama, small, decode, recap_after=100)
        if out.router["speculative_thinking"]["verify_spans"]:
            break
    else:
        raise AssertionError("no decoder gave a verify span")
    want, route = reference(tiny_llama, small, decode, recap_after=100)
    assert torch.equal(out.sequences, want) and [r["model"] for r in out.router_steps] == route
    steps = out.router_steps
    i = next(i for i, r in enumerate(steps) if r.get("action") == "verify")
    assert [r["model"] for r in steps[i - 4:i + 5]] == ["large"] * 9


def test_accounting_exact(tiny_llama):
    """Tokens produced per model equal the records; the large model runs once per token it writes and is fed its
    cache length; the small model is fed its cache length plus every discarded look-ahead token, and its forwards
    are its tokens plus the look-ahead forwards; inserted tokens belong to neither model."""
    small, decode = small_twin("llama"), stub_decoder()
    loop, out = st(tiny_llama, small, decode)
    s, steps, x = out.router, out.router_steps, out.router["speculative_thinking"]
    gen = out.sequences.shape[1] - PROMPT.shape[1]
    assert gen == len(steps) == s["generated"] + x["inserted_tokens"]
    for m in ("small", "large"):
        assert s[m]["tokens_produced"] == sum(r["model"] == m for r in steps)
        assert s[m]["tokens_fed"] == sum(r["fed"][m] for r in steps)
    assert s["large"]["forwards"] == s["large"]["tokens_produced"]
    assert s["large"]["tokens_fed"] == out.past_key_values.get_seq_length()
    discarded = sum(r["snippet_len"] for r in steps if "snippet_len" in r)
    assert s["small"]["tokens_fed"] == loop.last_run.small_cache.get_seq_length() + discarded
    assert s["small"]["forwards"] == s["small"]["tokens_produced"] + x["lookahead_forwards"]
    assert x["triggers"] == sum(bool(r.get("trigger")) for r in steps)
    assert loop.summary() == s


def test_caches_consistent_with_recomputation(tiny_llama):
    small = small_twin("llama")
    loop, out = st(tiny_llama, small, stub_decoder())
    assert out.router["handovers"] >= 4
    seq, steps, p = out.sequences, out.router_steps, PROMPT.shape[1]
    for m, cache, model in (("large", out.past_key_values, tiny_llama), ("small", loop.last_run.small_cache, small)):
        last = max(r["step"] for r in steps if r["model"] == m)
        assert_cache_equal(cache, fresh_cache(model, seq[:, : p + last]), p + last)


@pytest.mark.parametrize("kwargs, message", [
    ({"snippet_tokens": 0}, "snippet_tokens must be an integer >= 1, got 0"),
    ({"verify_tokens": 2.5}, "verify_tokens must be an integer >= 1, got 2.5"),
    ({"recap_tokens": True}, "recap_tokens must be an integer >= 1, got True"),
    ({"recap_after": -1}, "recap_after must be an integer >= 1, got -1"),
    ({"recap_step": -1}, "recap_step must be an integer >= 0, got -1"),
    ({"max_negative": 0}, "max_negative must be an integer >= 1, got 0"),
    ({"trigger_window": 0}, "trigger_window must be an integer >= 1, got 0"),
    ({"triggers": "\n\n"}, "triggers must be a non-empty sequence of non-empty strings, got '\\\\n\\\\n'"),
    ({"triggers": ()}, "triggers must be a non-empty sequence"),
    ({"keywords": {"verify": ("x",)}}, "keywords must map exactly"),
    ({"recap_ids": (1, -2)}, r"recap_ids must be token ids \(integers >= 0\), got \(1, -2\)"),
    ({"decode": None}, "a tokenizer .* or a decode callable is needed"),
])
def test_argument_validation(kwargs, message):
    kwargs = {"decode": stub_decoder(), **kwargs}
    with pytest.raises(ValueError, match=message):
        SpeculativeThinking(small_twin("llama"), **kwargs)


def test_refusals_and_factory(tiny_llama, char_tokenizer):
    small = small_twin("llama")
    with pytest.raises(ValueError, match="batch size 1 only; got a batch of 2"):
        tiny_llama.generate(PROMPT.repeat(2, 1), max_new_tokens=3, pad_token_id=0,
                            custom_generate=SpeculativeThinking(small, decode=stub_decoder()))
    loop = SpeculativeThinking.for_model(tiny_llama, char_tokenizer, small="self:1", snippet_tokens=7)
    assert loop.small.config.num_hidden_layers == 1 and loop.snippet_tokens == 7
    assert loop.recap_ids == tuple(char_tokenizer(RECAP_PROMPT, add_special_tokens=False)["input_ids"])
    assert SpeculativeThinking.for_model(tiny_llama, char_tokenizer, small=small).small is small
    assert SpeculativeThinking(small, decode=str).recap_ids == ()
