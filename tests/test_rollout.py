"""core.rollout: branched, batched rollouts with per-continuation ends (tiny models, both architectures)."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper

from hf_decoding_ext.core.loop import DecodingLoop
from hf_decoding_ext.core.rollout import Branch, Rollout, punctuation_token_ids, rollout

GREEDY = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
PROMPTS = torch.tensor([[0, 0, 0, 5, 6, 7], [3, 4, 9, 5, 6, 7], [0, 11, 12, 13, 14, 15]])
MASK = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])


class _Probe(DecodingLoop):
    """Runs ``fn(state, logits)`` inside ``generate()`` after ``warmup`` greedy steps, then decodes greedily to the
    end (so the output equals greedy ``generate()`` only if ``fn`` left the state intact).

    ``cache``: ``"lazy"`` (the cache misses the last token, as after ``append``) or ``"full"`` (the cache covers every
    token; ``logits`` are then the next-token logits, else ``None``).
    """

    def __init__(self, fn, warmup: int = 0, cache: str = "lazy"):
        self.fn, self.warmup, self.full = fn, warmup, cache == "full"
        self.result = None

    def run(self, state):
        logits = None
        for _ in range(self.warmup):
            logits, _ = state.next_token_logits()
            state.append(logits.argmax(-1))
        logits = state.forward().logits[:, -1, :] if self.full else None
        self.result = self.fn(state, logits)
        while not state.done:
            if state.cache.get_seq_length() < state.input_ids.shape[1]:
                logits, _ = state.next_token_logits()
            state.append(logits.argmax(-1))


def _probe(model, fn, warmup=0, cache="lazy", ids=PROMPTS, mask=MASK, max_new_tokens=12, **kwargs):
    loop = _Probe(fn, warmup, cache)
    kw = dict(max_new_tokens=max_new_tokens, pad_token_id=0, eos_token_id=None, **GREEDY)
    kw.update(kwargs)
    out = model.generate(ids, attention_mask=mask, custom_generate=loop, **kw)
    return loop.result, out


def _greedy(model, ids, mask, n, **kwargs):
    kw = dict(max_new_tokens=n, pad_token_id=0, eos_token_id=None, **GREEDY)
    kw.update(kwargs)
    return model.generate(ids, attention_mask=mask, **kw)[:, ids.shape[1]:]


@torch.no_grad()
def _full_forward_logits(model, prompt_ids, prompt_mask, tokens):
    """Float logits predicting each of ``tokens`` from one uncached forward of the unpadded prompt + tokens."""
    ids = torch.cat([prompt_ids[prompt_mask.bool()], tokens])[None]
    p = int(prompt_mask.sum())
    return model(input_ids=ids).logits[0].float()[p - 1:-1]


class _LetterTokenizer:
    """Decodes token ``i`` as two letters (enough for stop strings spanning token boundaries)."""

    @staticmethod
    def batch_decode(seqs, **kwargs):
        return ["".join(chr(97 + int(i) // 26) + chr(97 + int(i) % 26) for i in s) for s in seqs]


# ----------------------------------------------------------------------------------------------- greedy == generate
@pytest.mark.parametrize("warmup,cache", [(0, "lazy"), (2, "lazy"), (3, "full")])
def test_greedy_rollout_equals_generate_with_left_padding(tiny_model, warmup, cache):
    def fn(state, logits):
        return rollout(state, 2, logits=logits, max_tokens=7, stop_on_eos=False)

    r, out = _probe(tiny_model, fn, warmup, cache)
    ref = _greedy(tiny_model, PROMPTS, MASK, warmup + 7)[:, warmup:]
    assert r.tokens.shape == (6, 7) and r.lengths.tolist() == [7] * 6 and r.ends == ["cap"] * 6
    assert r.rows.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(r.tokens, ref.repeat_interleave(2, dim=0))  # greedy: both copies equal generate()
    # the state was not touched: the probe's own greedy decoding after the rollout equals generate()
    assert torch.equal(out, tiny_model.generate(PROMPTS, attention_mask=MASK, max_new_tokens=12, pad_token_id=0,
                                                eos_token_id=None, **GREEDY))


def test_forced_first_tokens_continue_like_generate_on_each_branch(tiny_model):
    first = torch.tensor([[20, 21], [22, 23]])
    rows = [2, 0]

    def fn(state, logits):
        return rollout(state, 2, rows=rows, first_tokens=first, max_tokens=6, stop_on_eos=False)

    r, _ = _probe(tiny_model, fn, warmup=1)
    assert r.rows.tolist() == [2, 2, 0, 0]
    assert r.tokens[:, 0].tolist() == [20, 21, 22, 23]
    w = _greedy(tiny_model, PROMPTS, MASK, 1)  # the warm-up token
    for i, (row, tok) in enumerate([(2, 20), (2, 21), (0, 22), (0, 23)]):
        ids = torch.cat([PROMPTS[row], w[row], torch.tensor([tok])])[None]
        mask = torch.cat([MASK[row], torch.ones(2, dtype=torch.long)])[None]
        assert torch.equal(r.tokens[i, 1:], _greedy(tiny_model, ids, mask, 5)[0]), (row, tok)


# ----------------------------------------------------------------------------------------------- log-probabilities
def test_summed_logprobs_equal_a_full_forward(tiny_model):
    procs = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopKLogitsWarper(20)])
    gen = torch.Generator().manual_seed(3)

    def fn(state, logits):
        return rollout(state, 3, process=procs, do_sample=True, generator=gen, max_tokens=5,
                       stop_token_ids=range(40, 60), return_steps=True)

    r, _ = _probe(tiny_model, fn)
    assert len(set(r.lengths.tolist())) > 1  # the stop tokens cut some samples short
    for i, row in enumerate(r.rows.tolist()):
        toks = r.tokens[i, :int(r.lengths[i])]
        logits = _full_forward_logits(tiny_model, PROMPTS[row], MASK[row], toks)
        raw_lp = torch.log_softmax(logits, -1).gather(1, toks[:, None]).sum()
        assert float(r.logprobs[i]) == pytest.approx(float(raw_lp), abs=1e-4)
        # processed: the same processors applied position by position with the row's tokens as input_ids
        prefix = PROMPTS[row][MASK[row].bool()]
        proc = torch.stack([procs(torch.cat([prefix, toks[:t]])[None], logits[t:t + 1])[0] for t in range(len(toks))])
        proc_lp = torch.log_softmax(proc, -1).gather(1, toks[:, None]).sum()
        assert float(r.scores[i]) == pytest.approx(float(proc_lp), abs=1e-4)
        assert float(r.scores[i]) != pytest.approx(float(r.logprobs[i]), abs=1e-3)  # temperature 0.7 matters
        torch.testing.assert_close(r.step_logits[i], logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(r.step_scores[i], proc, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------- ends
def _expected_end(path, eos, stops, stop_text, cap):
    """Where and why a greedy path ends, by the rollout's precedence, written out independently."""
    text = ""
    for t, tok in enumerate(path[:cap], start=1):
        text += _LetterTokenizer.batch_decode([[tok]])[0]
        if tok == eos:
            return t, "eos"
        if tok in stops or (stop_text and stop_text in text):
            return t, "stop"
    return cap, "cap"


def test_each_continuation_stops_on_its_own_predicate(tiny_model):
    cap = 6
    first = torch.tensor([[2, 30, 31, 32, 33]])  # 2 is the eos token of the tiny models

    def free(state, logits):
        return rollout(state, 5, rows=[1], first_tokens=first, max_tokens=cap, stop_on_eos=False)

    paths = _probe(tiny_model, free)[0].token_lists()
    # a stop token from the middle of path 1 and a two-token stop string from path 2; path 3/4 run to the cap
    # unless they meet one of them too
    stop_tok = paths[1][3]
    stop_text = _LetterTokenizer.batch_decode([paths[2][1:3]])[0]
    expected = [_expected_end(p, 2, {stop_tok}, stop_text, cap) for p in paths]
    assert expected[0] == (1, "eos") and expected[1][1] == "stop" and expected[2][1] == "stop"

    def fn(state, logits):
        return rollout(state, 5, rows=[1], first_tokens=first, max_tokens=cap, stop_token_ids=[stop_tok],
                       stop_strings=[stop_text], tokenizer=_LetterTokenizer())

    r, _ = _probe(tiny_model, fn, eos_token_id=2)
    assert [(int(n), e) for n, e in zip(r.lengths, r.ends)] == expected
    assert r.token_lists() == [p[:n] for p, (n, _) in zip(paths, expected)]
    assert (r.tokens[0, 1:] == 0).all()  # padded after the end
    assert len(set(r.lengths.tolist())) >= 2


def test_stopping_criteria_end_continuations(tiny_model):
    # max_new_tokens=5 and two tokens already generated: the criteria fire after 3 rollout tokens
    def fn(state, logits):
        return rollout(state, 2, use_stopping_criteria=True, stop_on_eos=False)

    r, _ = _probe(tiny_model, fn, warmup=2, max_new_tokens=5)
    assert r.lengths.tolist() == [3] * 6 and r.ends == ["criteria"] * 6
    assert torch.equal(r.tokens, _greedy(tiny_model, PROMPTS, MASK, 5)[:, 2:].repeat_interleave(2, 0))


# ----------------------------------------------------------------------------------------------- state untouched
def test_state_cache_and_ids_untouched(tiny_model):
    def fn(state, logits):
        before = (state.input_ids.clone(), state.attention_mask.clone(), state.cache.get_seq_length(),
                  [(layer.keys.clone(), layer.values.clone()) for layer in state.cache.layers])
        cache = state.cache
        r = rollout(state, 4, logits=logits, do_sample=True, generator=torch.Generator().manual_seed(0),
                    max_tokens=6)
        after = (state.input_ids, state.attention_mask, state.cache.get_seq_length(),
                 [(layer.keys, layer.values) for layer in state.cache.layers])
        return before, after, cache is state.cache, r

    for cache in ("lazy", "full"):
        (before, after, same, r), out = _probe(tiny_model, fn, warmup=2, cache=cache)
        assert same and r.tokens.shape[0] == 12
        assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1]) and before[2] == after[2]
        for (k0, v0), (k1, v1) in zip(before[3], after[3]):
            assert torch.equal(k0, k1) and torch.equal(v0, v1)
        assert torch.equal(out, tiny_model.generate(PROMPTS, attention_mask=MASK, max_new_tokens=12, pad_token_id=0,
                                                    eos_token_id=None, **GREEDY))


# ----------------------------------------------------------------------------------------------- sampling
def test_sampled_rollouts_reproducible_with_a_seeded_generator(tiny_model):
    def fn(state, logits):
        rng_before = torch.get_rng_state()
        runs = [rollout(state, 4, do_sample=True, generator=torch.Generator().manual_seed(s), max_tokens=8,
                        stop_on_eos=False) for s in (11, 11, 12)]
        return runs, torch.equal(rng_before, torch.get_rng_state())

    (runs, rng_untouched), _ = _probe(tiny_model, fn)
    a, b, c = runs
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.tokens, c.tokens)
    assert len({tuple(t) for t in a.tokens[:4].tolist()}) > 1  # the 4 samples of one row differ
    assert rng_untouched  # the global generator is not consumed


def test_sampling_from_top1_is_greedy(tiny_model):
    def fn(state, logits):
        return rollout(state, 2, process=LogitsProcessorList([TopKLogitsWarper(1)]), do_sample=True, max_tokens=6,
                       stop_on_eos=False)

    r, _ = _probe(tiny_model, fn)
    assert torch.equal(r.tokens, _greedy(tiny_model, PROMPTS, MASK, 6).repeat_interleave(2, 0))
    assert torch.allclose(r.scores, torch.zeros_like(r.scores))  # top-1: every processed log-prob is 0


class _TextTokenizer:
    VOCAB = ("a", ".", "b,", " x\n", "y  ", "?\t", "(", "q)", "\n    ", "", "c")

    def __len__(self):
        return len(self.VOCAB)

    def batch_decode(self, seqs, **kwargs):
        return ["".join(self.VOCAB[i] for i in s) for s in seqs]


def test_punctuation_token_ids():
    tok = _TextTokenizer()
    ids = punctuation_token_ids(tok)
    assert ids == {1, 2, 3, 5, 7, 8}  # trailing spaces/tabs ignored, a trailing newline counts
    assert punctuation_token_ids(tok) is ids  # cached per tokenizer instance
    assert punctuation_token_ids(tok, ".?") == {1, 5}
    assert punctuation_token_ids(tok, ",") == {2}
    with pytest.raises(ValueError, match="punctuation"):
        punctuation_token_ids(tok, "")


# ----------------------------------------------------------------------------------------------- Branch
class _CommitThenGreedy(DecodingLoop):
    """Feeds 3 candidates per row on a branch, commits a chosen one per row, then decodes greedily on the state's
    (now the branch's) cache."""

    def run(self, state):
        branch = Branch(state, k=3)
        branch.extend(torch.tensor([40, 41, 42] * 3))
        out = branch.forward()
        chosen = torch.tensor([1, 5, 6])  # row 0 takes 41, row 1 takes 42, row 2 takes 40
        branch.keep(chosen)
        with pytest.raises(ValueError, match="one branch row per state row"):
            Branch(state, rows=[1, 0]).commit()
        assert branch.commit() == 1
        with pytest.raises(RuntimeError, match="committed"):
            branch.extend(torch.tensor([1, 1, 1]))
        self.covered = state.cache.get_seq_length() == state.input_ids.shape[1]
        logits = out.logits[chosen, -1, :]
        while not state.done:
            state.append(logits.argmax(-1))
            if not state.done:
                logits, _ = state.next_token_logits()


def test_branch_commit_continues_the_state(tiny_model):
    loop = _CommitThenGreedy()
    out = tiny_model.generate(PROMPTS, attention_mask=MASK, custom_generate=loop, max_new_tokens=6, pad_token_id=0,
                              eos_token_id=None, **GREEDY)
    assert loop.covered  # the state took the branch's cache (it covers the committed token)
    assert out[:, 6].tolist() == [41, 42, 40]
    ids = torch.cat([PROMPTS, torch.tensor([[41], [42], [40]])], 1)
    mask = torch.cat([MASK, torch.ones(3, 1, dtype=torch.long)], 1)
    assert torch.equal(out[:, 7:], _greedy(tiny_model, ids, mask, 5))


def test_argument_errors(tiny_llama):
    def fn(state, logits):
        checks = [
            ({"k": 0, "max_tokens": 2}, "k must be"),
            ({"rows": [3], "max_tokens": 2}, "rows must index"),
            ({}, "needs a bound"),
            ({"max_tokens": 0}, "max_tokens"),
            ({"max_tokens": 2, "stop_strings": ["x"]}, "tokenizer"),
            ({"max_tokens": 2, "scores": torch.zeros(3, 128)}, "raw logits"),
            ({"max_tokens": 2, "first_tokens": torch.tensor([1, 2])}, "first_tokens"),
            ({"max_tokens": 2, "logits": torch.zeros(2, 128)}, "logits must have shape"),
        ]
        for kwargs, match in checks:
            with pytest.raises(ValueError, match=match):
                rollout(state, **kwargs)
        return isinstance(rollout(state, max_tokens=1), Rollout)

    assert _probe(tiny_llama, fn, max_new_tokens=1)[0]
