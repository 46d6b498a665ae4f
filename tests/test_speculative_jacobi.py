"""Speculative Jacobi Decoding (arXiv 2410.01699) on the engine.

- the window update: after ``k`` accepted tokens the drafts are samples from the target rows after the bonus
  position, recorded with those rows; new positions are random ids with one-hot recorded distributions;
- greedy mode: the Jacobi argmax update, token-identical to greedy ``generate()`` on tiny models;
- the exact target distribution over 4 tokens at T=1 and under top-k/temperature (processors applied to both
  distributions), with a mutant drafter (argmax drafts recorded as if sampled) as negative control;
- the real default model at T=1: more tokens per target forward than greedy-only Jacobi iteration under sampling
  (the paper's point: exact-match Jacobi rarely accepts under sampling).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from test_speculative_contrastive import _pooled_chi_square_pvalue
from test_speculative_engine import _peaky_tiny_llama

from hf_decoding_ext.speculative import SpeculativeDecoding
from hf_decoding_ext.speculative.drafters.base import VerifyResult
from hf_decoding_ext.speculative.drafters.jacobi import JacobiDrafter
from hf_decoding_ext.speculative.drafters.speculative_jacobi import SpeculativeJacobiDrafter


class _State:
    def __init__(self, ids, do_sample=True, vocab=10):
        self.input_ids = torch.tensor([ids])
        self.do_sample = do_sample
        self.device = torch.device("cpu")
        self.logits_processor = []
        self.model = type("M", (), {"get_output_embeddings": lambda s: type("E", (), {
            "weight": torch.zeros(vocab, 2)})()})()


def test_window_update_keeps_the_sampling_distributions():
    d = SpeculativeJacobiDrafter(window=3)
    state = _State([1, 2])
    d.begin(state)
    draft = d.propose(state)  # all random: one-hot recorded distributions
    assert len(draft.tree) == 3 and draft.tree.sibling_scheme == "iid"
    assert torch.equal(draft.tree.draft_probs, torch.nn.functional.one_hot(draft.tree.tokens, 10).float())
    logits = torch.randn(4, 10)
    torch.manual_seed(0)
    d.observe(state, VerifyResult(draft, logits, None, [0], []))  # token 1 accepted, bonus at position 2
    # rows 2 and 3 (after window tokens 2 and 3) give the next drafts for positions 3 and 4
    assert len(d.tokens) == 2 and all(p is not None for p in d.probs)
    assert torch.allclose(d.probs[0], torch.softmax(logits[2], -1)) and torch.allclose(d.probs[1],
                                                                                      torch.softmax(logits[3], -1))
    nxt = d.propose(_State([1, 2, 5, 6]))
    assert nxt.tree.tokens[:2].tolist() == d.tokens[:2] and len(nxt.tree) == 3  # refilled with one random token
    assert torch.allclose(nxt.tree.draft_probs[0], torch.softmax(logits[2], -1))
    assert float(nxt.tree.draft_probs[2].max()) == 1.0
    # everything accepted: the whole window is refilled
    d.observe(state, VerifyResult(nxt, torch.randn(4, 10), None, [0, 1, 2], []))
    assert d.tokens == []
    # greedy mode: the argmax update, no distributions
    g = SpeculativeJacobiDrafter(window=3)
    gs = _State([1, 2], do_sample=False)
    g.begin(gs)
    draft = g.propose(gs)
    assert draft.tree.draft_probs is None and draft.tree.sibling_scheme == "deterministic"
    g.observe(gs, VerifyResult(draft, logits, None, [], []))
    assert g.tokens == logits[1:].argmax(-1).tolist()
    for bad in ({"window": 0}, {"window": 2.5}, {"init": "pad"}):
        with pytest.raises(ValueError):
            SpeculativeJacobiDrafter(**bad)


@pytest.mark.parametrize("window", [1, 4])
def test_greedy_is_token_identical_on_tiny_models(tiny_model, window):
    ids = torch.tensor([[1, 5, 9, 3]])
    ref = tiny_model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0)
    loop = SpeculativeDecoding(SpeculativeJacobiDrafter(window=window))
    out = tiny_model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0, custom_generate=loop)
    assert torch.equal(out, ref)


class _ArgmaxRecordedAsSampled(SpeculativeJacobiDrafter):
    """Mutant: drafts the argmax of each row but records the row as if the token had been sampled from it."""

    def observe(self, state, result):
        super().observe(state, result)
        self.tokens = [int(p.argmax()) if p is not None else t for t, p in zip(self.tokens, self.probs)]


@pytest.mark.parametrize("case,n", [("sjd", 1200), ("sjd-warped", 1200), ("mutant", 600)])
def test_sampling_keeps_the_target_distribution(case, n):
    vocab, length = 4, 4
    target = _peaky_tiny_llama(1, vocab)
    prompt = [1, 2, 3]
    gen = {"temperature": 0.7, "top_k": 3} if case == "sjd-warped" else {"top_k": 0}
    probs = {}
    with torch.no_grad():
        logits = None
        for seq in itertools.product(range(vocab), repeat=length):
            logits = target(torch.tensor([prompt + list(seq)])).logits[0].float()
            logp = 0.0
            for i, t in enumerate(seq):
                row = logits[len(prompt) - 1 + i]
                if case == "sjd-warped":  # the caller's warpers: temperature then top-3
                    row = row / 0.7
                    row = row.masked_fill(row < row.topk(3).values[-1], -math.inf)
                logp += float(torch.log_softmax(row, -1)[t])
            probs[seq] = math.exp(logp)
    drafter = _ArgmaxRecordedAsSampled(window=3) if case == "mutant" else SpeculativeJacobiDrafter(window=3)
    loop = SpeculativeDecoding(drafter)
    torch.manual_seed(0)
    counts, multi = {}, 0
    for _ in range(n):
        out = target.generate(torch.tensor([prompt]), max_new_tokens=length, do_sample=True, pad_token_id=0,
                              custom_generate=loop, **gen)
        seq = tuple(out[0, len(prompt):].tolist())
        counts[seq] = counts.get(seq, 0) + 1
        multi += sum(s.accepted >= 2 for s in loop.last_stats)
    pvalue = _pooled_chi_square_pvalue(counts, probs, n)
    if case == "mutant":
        assert pvalue < 1e-6, pvalue
    else:
        assert pvalue > 1e-3, pvalue
        assert multi > n // 20  # the Jacobi-sampled drafts are accepted (not only the first token)


@pytest.mark.real_model
def test_more_tokens_per_forward_than_greedy_jacobi_under_sampling_real_model(smollm):
    """At T=1 SJD's probabilistic acceptance keeps window tokens that exact-match Jacobi iteration rejects: more
    tokens per target forward than the greedy-only Jacobi window of the same size under sampling (4 prompts x 32
    tokens: measured 1.11 against 1.02; 1.12 against 1.01 at 64 tokens)."""
    from hf_decoding_ext.bench.prompts import interleaved_prompts
    from hf_decoding_ext.bench.speed import encode_prompt

    model, tokenizer = smollm
    figures = {}
    for name, make in (("sjd", lambda: SpeculativeJacobiDrafter(window=16)),
                       ("jacobi", lambda: JacobiDrafter(block_size=17, mode="jacobi"))):
        tokens = steps = 0
        for i, row in enumerate(interleaved_prompts(4)):
            loop = SpeculativeDecoding(make())
            torch.manual_seed(i)
            model.generate(**encode_prompt(row, tokenizer), max_new_tokens=32, do_sample=True, top_k=0,
                           top_p=1.0, temperature=1.0, custom_generate=loop)
            s = loop.summary()
            tokens, steps = tokens + s["tokens"], steps + s["steps"]
        figures[name] = tokens / steps
    print("tokens per target forward at T=1:", {k: round(v, 3) for k, v in figures.items()})
    assert figures["sjd"] > figures["jacobi"] and figures["sjd"] > 1.0, figures
