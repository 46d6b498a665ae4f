"""Adaptive Weighted Rejection Sampling (Lipkin et al., arXiv 2504.05410).

Core properties: (1) the AWRS step's weight is an unbiased estimate of the local normaliser ``Z = sum_{allowed} p``
and its token has the constrained distribution ``p 1[allowed] / Z``; (2) on the real model every generated token
satisfies the constraint with far fewer constraint evaluations per step than the vocabulary size (full masking).
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from scipy import stats

from hf_decoding_ext.core.models import encode_prompts
from hf_decoding_ext.structured.awrs import (CONSTRAINTS, AdaptiveWeightedRejectionSampling, TokenTextPredicate,
                                             awrs_step, named_predicate)


def _odd(prefix, token):
    return token % 2 == 1


class _Timed:
    """Wraps a predicate, counting its calls and the time spent in it."""

    def __init__(self, predicate):
        self.predicate, self.calls, self.seconds = predicate, 0, 0.0

    def __call__(self, prefix, token):
        t0 = time.perf_counter()
        result = self.predicate(prefix, token)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return result


def _chi2_pvalue(counts: np.ndarray, expected: np.ndarray) -> float:
    """Pearson chi-square p-value, pooling the cells whose expected count is below 5."""
    big = expected >= 5
    obs = list(counts[big]) + ([counts[~big].sum()] if (~big).any() else [])
    exp = list(expected[big]) + ([expected[~big].sum()] if (~big).any() else [])
    obs, exp = np.asarray(obs, float), np.asarray(exp, float)
    if len(obs) < 2:
        return 1.0
    return float(stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue)


def _mc_awrs(probs: torch.Tensor, allowed: torch.Tensor, n: int, gen: torch.Generator):
    """``n`` AWRS steps: the Z estimates, the token counts and the predicate calls."""
    zs = np.empty(n)
    counts = np.zeros(probs.numel())
    calls = 0
    for i in range(n):
        tok, log_w, k = awrs_step(probs, lambda t: bool(allowed[t]), gen)
        zs[i] = math.exp(log_w)
        counts[tok] += 1
        calls += k
    return zs, counts, calls


# ----------------------------------------------------------------------------------------------- AWRS step
def test_weight_unbiased_and_token_distribution_exact():
    """20 random (probs, allowed set) cases, vocab 8..50: mean Z_hat matches the exact Z (z-scores), the tokens follow
    p 1[allowed] / Z (chi-square), combined over all cases."""
    rng = np.random.default_rng(1234)
    gen = torch.Generator().manual_seed(1234)
    n_draws = 1000
    zscores, chi2_p = [], []
    for case in range(20):
        vocab = int(rng.integers(8, 51))
        probs = torch.tensor(rng.dirichlet(np.full(vocab, 0.3)))
        allowed = torch.tensor(rng.random(vocab) < rng.uniform(0.1, 0.6))
        allowed[int(rng.integers(vocab))] = True
        exact_z = float(probs[allowed].sum())
        zs, counts, _ = _mc_awrs(probs, allowed, n_draws, gen)
        se = zs.std(ddof=1) / math.sqrt(n_draws)
        zscores.append((zs.mean() - exact_z) / max(se, 1e-12))
        assert counts[~allowed.numpy()].sum() == 0  # never a disallowed token
        target = (probs * allowed).numpy() / exact_z
        chi2_p.append(_chi2_pvalue(counts[allowed.numpy()], n_draws * target[allowed.numpy()]))
        assert (zs <= 1.0 + 1e-12).all() and (zs > 0).all()
    zscores = np.asarray(zscores)
    print(f"\nAWRS Z_hat z-scores over 20 cases: max |z| = {np.abs(zscores).max():.2f}, "
          f"sum z^2 = {np.sum(zscores ** 2):.1f} (chi2(20)); min chi-square p = {min(chi2_p):.3g}")
    assert np.abs(zscores).max() < 4.0
    assert stats.chi2.sf(np.sum(zscores ** 2), df=len(zscores)) > 1e-3  # no systematic bias across cases
    # per-case token-distribution tests combined (Fisher): uniform p-values under the null
    assert stats.combine_pvalues(chi2_p).pvalue > 1e-3
    assert min(chi2_p) > 1e-4


def test_step_edge_cases():
    gen = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.1, 0.0, 0.4, 0.0, 0.5])
    calls = []

    def everything(t):
        calls.append(t)
        return True

    tok, log_w, n = awrs_step(probs, everything, gen)
    assert log_w == 0.0 and n == 1 and calls == [tok] and tok in (0, 2, 4)  # all allowed: Z_hat = 1 exactly
    calls.clear()

    def nothing(t):
        calls.append(t)
        return False

    tok, log_w, n = awrs_step(probs, nothing, gen)
    assert tok is None and log_w == -math.inf
    assert sorted(calls) == [0, 2, 4] and n == 3  # each positive-probability token once, zero-probability never
    calls.clear()
    for _ in range(50):  # one allowed token: always it; each token evaluated at most once per step
        tok, log_w, n = awrs_step(probs, lambda t: calls.append(t) or t == 2, gen)
        assert tok == 2 and len(calls) == len(set(calls)) == n and math.isfinite(log_w)
        calls.clear()
    # unnormalised probabilities are normalised
    tok, log_w, n = awrs_step(probs * 7, lambda t: True, gen)
    assert log_w == pytest.approx(0.0)


def test_step_bad_arguments():
    with pytest.raises(ValueError):
        awrs_step(torch.ones(2, 3), lambda t: True)
    with pytest.raises(ValueError):
        awrs_step(torch.tensor([0.5, -0.1]), lambda t: True)
    with pytest.raises(ValueError):
        awrs_step(torch.zeros(3), lambda t: True)
    with pytest.raises(ValueError):
        awrs_step(torch.tensor([0.5, float("nan")]), lambda t: True)
    with pytest.raises(ValueError):
        awrs_step(torch.tensor([0.5, 0.5]), "not callable")


# ----------------------------------------------------------------------------------------------- loop, tiny models
def _batch(vocab_low=3, vocab_high=128, lengths=(5, 3, 4)):
    """Left-padded batch (pad 0) of random prompts."""
    g = torch.Generator().manual_seed(7)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(vocab_low, vocab_high, (n,), generator=g)
        mask[i, width - n:] = 1
    return ids, mask


def test_loop_batch_constraint_and_outputs(tiny_model):
    ids, mask = _batch()
    prefixes = []

    def odd(prefix, token):
        prefixes.append(tuple(prefix))
        return token % 2 == 1

    awrs = AdaptiveWeightedRejectionSampling(predicate=odd, seed=0)
    out = tiny_model.generate(input_ids=ids, attention_mask=mask, custom_generate=awrs, do_sample=True,
                              max_new_tokens=6, top_k=0, return_dict_in_generate=True, output_scores=True)
    new = out.sequences[:, ids.shape[1]:]
    assert new.shape == (3, 6)
    assert bool((new % 2 == 1).all())  # eos (2) and pad (0) are even: every token satisfies the predicate
    rows = [tuple(r) for r in new.tolist()]
    assert all(any(r[:len(p)] == p for r in rows) for p in prefixes)  # the predicate sees the generated tokens
    assert {len(p) for p in prefixes} == set(range(6))
    for field in ("awrs_log_weights", "awrs_num_evals", "awrs_num_steps", "awrs_failed"):
        assert out[field].shape == (3,)
    assert bool(torch.isfinite(out.awrs_log_weights).all()) and bool((out.awrs_log_weights <= 0).all())
    assert out.awrs_num_steps.tolist() == [6, 6, 6] and not bool(out.awrs_failed.any())
    assert bool((out.awrs_num_evals >= 6).all()) and int(out.awrs_num_evals.sum()) == len(prefixes)
    assert torch.equal(awrs.last_log_weights, out.awrs_log_weights)
    assert len(out.scores) == 6 and out.scores[0].shape == (3, 128)
    # same seed, same run; plain tensor output without return_dict_in_generate
    again = tiny_model.generate(input_ids=ids, attention_mask=mask, custom_generate=awrs, do_sample=True,
                                max_new_tokens=6, top_k=0)
    assert torch.equal(again, out.sequences)


def test_mask_fn_replaces_predicate(tiny_llama):
    ids, mask = _batch()

    def full_mask(input_ids):
        m = torch.zeros(input_ids.shape[0], 128, dtype=torch.bool)
        m[:, 1::2] = True
        return m

    def boom(prefix, token):
        raise AssertionError("the predicate must not be called when a mask is given")

    kw = dict(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=5, top_k=0,
              return_dict_in_generate=True)
    by_mask = tiny_llama.generate(custom_generate=AdaptiveWeightedRejectionSampling(boom, mask_fn=full_mask, seed=3),
                                  **kw)
    by_pred = tiny_llama.generate(custom_generate=AdaptiveWeightedRejectionSampling(_odd, seed=3), **kw)
    assert torch.equal(by_mask.sequences, by_pred.sequences)
    assert torch.allclose(by_mask.awrs_log_weights, by_pred.awrs_log_weights)
    assert torch.equal(by_mask.awrs_num_evals, by_pred.awrs_num_evals)

    # a narrower mask leaves the remaining ids disallowed; a wrong shape is refused
    narrow = AdaptiveWeightedRejectionSampling(mask_fn=lambda x: full_mask(x)[:, :64], seed=0)
    out = tiny_llama.generate(custom_generate=narrow, **kw)
    assert bool((out.sequences[:, ids.shape[1]:] < 64).all())
    with pytest.raises(ValueError, match="mask_fn"):
        tiny_llama.generate(custom_generate=AdaptiveWeightedRejectionSampling(
            mask_fn=lambda x: torch.ones(x.shape[0], 200, dtype=torch.bool)), **kw)
    with pytest.raises(ValueError, match="mask_fn"):
        tiny_llama.generate(custom_generate=AdaptiveWeightedRejectionSampling(
            mask_fn=lambda x: torch.ones(128, dtype=torch.bool)), **kw)


def test_loop_weights_unbiased_one_and_two_steps(tiny_llama):
    """The loop applies the caller's processors (temperature) and its weights are unbiased: one step, E[Z_hat] = Z;
    two steps, E[Z_hat_1 Z_hat_2] = P(two allowed tokens) under the processed distribution."""
    temperature = 0.7
    prompt = torch.tensor([[5, 17, 33, 8]])
    with torch.no_grad():
        logits1 = tiny_llama(prompt).logits[0, -1]
    p1 = torch.softmax(logits1.double() / temperature, -1)
    odd = torch.arange(128) % 2 == 1
    z1 = float(p1[odd].sum())
    ys = torch.nonzero(odd).squeeze(1)
    with torch.no_grad():
        logits2 = tiny_llama(torch.cat([prompt.expand(len(ys), -1), ys[:, None]], 1)).logits[:, -1]
    z2 = torch.softmax(logits2.double() / temperature, -1)[:, odd].sum(-1)
    both = float((p1[ys] * z2).sum())

    n = 192
    batch = prompt.expand(n, -1)
    torch.manual_seed(11)
    w1, w2 = [], []
    for _ in range(3):
        out = tiny_llama.generate(input_ids=batch, attention_mask=torch.ones_like(batch),
                                  custom_generate=AdaptiveWeightedRejectionSampling(_odd), do_sample=True,
                                  temperature=temperature, top_k=0, max_new_tokens=1, return_dict_in_generate=True)
        w1.append(out.awrs_log_weights.exp())
        out = tiny_llama.generate(input_ids=batch, attention_mask=torch.ones_like(batch),
                                  custom_generate=AdaptiveWeightedRejectionSampling(_odd), do_sample=True,
                                  temperature=temperature, top_k=0, max_new_tokens=2, return_dict_in_generate=True)
        assert out.awrs_num_steps.tolist() == [2] * n
        w2.append(out.awrs_log_weights.exp())
    for w, exact in ((torch.cat(w1), z1), (torch.cat(w2), both)):
        se = float(w.std()) / math.sqrt(len(w))
        assert abs(float(w.mean()) - exact) < 4 * se, (float(w.mean()), exact, se)


def test_dead_rows_finish(tiny_llama):
    ids, mask = _batch(lengths=(4, 4))

    def row0_blocked(input_ids):
        m = torch.zeros(input_ids.shape[0], 128, dtype=torch.bool)
        m[1:, 1::2] = True
        return m

    awrs = AdaptiveWeightedRejectionSampling(mask_fn=row0_blocked, seed=0)
    out = tiny_llama.generate(input_ids=ids, attention_mask=mask, custom_generate=awrs, do_sample=True, top_k=0,
                              max_new_tokens=4, return_dict_in_generate=True)
    assert out.awrs_failed.tolist() == [True, False]
    assert out.awrs_log_weights[0] == -math.inf and math.isfinite(float(out.awrs_log_weights[1]))
    assert out.sequences[0, 4:].tolist() == [0, 0, 0, 0]  # the dead row gets padding
    assert bool((out.sequences[1, 4:] % 2 == 1).all())
    nothing = AdaptiveWeightedRejectionSampling(predicate=lambda p, t: False)
    out = tiny_llama.generate(input_ids=ids, attention_mask=mask, custom_generate=nothing, do_sample=True, top_k=0,
                              max_new_tokens=4, return_dict_in_generate=True)
    assert out.awrs_failed.tolist() == [True, True] and out.sequences.shape[1] == ids.shape[1]


def test_bad_arguments(tiny_llama):
    with pytest.raises(ValueError, match="needs a constraint"):
        AdaptiveWeightedRejectionSampling()
    with pytest.raises(ValueError):
        AdaptiveWeightedRejectionSampling(predicate="no-letter-e")
    with pytest.raises(ValueError):
        AdaptiveWeightedRejectionSampling(mask_fn=3)
    with pytest.raises(ValueError, match="tokenizer"):
        AdaptiveWeightedRejectionSampling(constraint="no-letter-e")
    with pytest.raises(ValueError, match="either"):
        AdaptiveWeightedRejectionSampling(predicate=_odd, constraint="no-letter-e")
    with pytest.raises(ValueError):
        AdaptiveWeightedRejectionSampling(predicate=_odd, seed=1.5)
    with pytest.raises(ValueError, match="tokenizer"):
        AdaptiveWeightedRejectionSampling.for_model(tiny_llama, None)
    ids, mask = _batch(lengths=(3, 3))
    with pytest.raises(ValueError, match="do_sample=True"):
        tiny_llama.generate(input_ids=ids, attention_mask=mask, custom_generate=AdaptiveWeightedRejectionSampling(_odd),
                            do_sample=False, max_new_tokens=2)


def test_named_constraints(smollm):
    model, tok = smollm
    with pytest.raises(ValueError, match="unknown constraint"):
        named_predicate("no-letter-z", tok)
    with pytest.raises(ValueError, match="unknown constraint"):
        AdaptiveWeightedRejectionSampling.for_model(model, tok, constraint="nope")
    pred = named_predicate("no-letter-e", tok)
    assert isinstance(pred, TokenTextPredicate)
    ids = {w: tok.convert_tokens_to_ids(w) for w in ("the", "and", "cat", "Ġthe", "Ġcat")}
    assert not pred([], ids["the"]) and pred([], ids["and"]) and pred([], ids["cat"])
    assert not pred([], ids["Ġthe"]) and pred([], ids["Ġcat"])
    assert pred([], tok.eos_token_id)  # eos is allowed by the named constraints; other special tokens are not
    assert not pred([], tok.convert_tokens_to_ids("<|im_start|>")) and not pred([], 10 ** 6)
    low = named_predicate("lowercase", tok)
    assert low([], ids["Ġcat"]) and not low([], tok.convert_tokens_to_ids("The"))
    assert set(CONSTRAINTS) >= {"no-letter-e", "lowercase", "no-digits", "ascii"}
    loop = AdaptiveWeightedRejectionSampling.for_model(model, tok)
    assert loop.constraint == "no-letter-e" and isinstance(loop.predicate, TokenTextPredicate)
    assert AdaptiveWeightedRejectionSampling.for_model(model, tok, predicate=_odd).predicate is _odd


# ----------------------------------------------------------------------------------------------- real model
@pytest.mark.real_model
def test_real_constraint_holds_with_few_evaluations(smollm):
    """Every generated token satisfies the constraint; AWRS evaluates it on a handful of tokens per step, full
    masking on all 49152."""
    model, tok = smollm
    vocab = model.config.vocab_size
    enc = encode_prompts(tok, ["Name a fruit.", "Describe the sea in one sentence."])
    plen = enc["input_ids"].shape[1]
    report = []
    for name in ("no-letter-e", "lowercase"):
        pred = _Timed(named_predicate(name, tok))
        awrs = AdaptiveWeightedRejectionSampling(predicate=pred, seed=0)
        out = model.generate(**enc, custom_generate=awrs, do_sample=True, top_k=0, max_new_tokens=16,
                             return_dict_in_generate=True)
        check = named_predicate(name, tok)
        for row in out.sequences[:, plen:].tolist():
            for i, t in enumerate(row):
                assert check(row[:i], t), (name, tok.decode(row), tok.decode([t]))
                if t == tok.eos_token_id:
                    break
            text = tok.decode(row, skip_special_tokens=True)
            if name == "no-letter-e":
                assert "e" not in text.lower()
            else:
                assert text == text.lower() and text.isascii()
        steps = int(out.awrs_num_steps.sum())
        assert pred.calls == int(out.awrs_num_evals.sum())
        report.append((name, pred.calls / steps, pred.seconds / steps))
        assert not bool(out.awrs_failed.any()) and bool(torch.isfinite(out.awrs_log_weights).all())
        assert pred.calls / steps < 0.01 * vocab  # far below token masking's `vocab` evaluations per step

    # the same constraint by full-vocabulary masking (a fresh predicate: no cached token texts)
    full = _Timed(named_predicate("no-letter-e", tok))

    def mask_fn(input_ids):
        allowed = torch.tensor([full([], t) for t in range(vocab)])
        return allowed.expand(input_ids.shape[0], -1)

    out = model.generate(**enc, custom_generate=AdaptiveWeightedRejectionSampling(mask_fn=mask_fn, seed=0),
                         do_sample=True, top_k=0, max_new_tokens=2, return_dict_in_generate=True)
    mask_steps = 2  # one mask per step for the whole batch
    assert full.calls == mask_steps * vocab
    for name, evals, seconds in report:
        print(f"\n{name}: AWRS {evals:.2f} constraint evaluations per token ({100 * evals / vocab:.3f}% of the "
              f"vocabulary), {1e3 * seconds:.2f} ms of constraint time per token")
    print(f"full masking (no-letter-e): {vocab} evaluations per step, {1e3 * full.seconds / mask_steps:.0f} ms of "
          "constraint time per step")


@pytest.mark.real_model
def test_real_weights_unbiased(smollm):
    """On the real model's next-token distribution, Z_hat is unbiased for the exact Z (from the full mask) and the
    tokens follow the constrained distribution, with few evaluations per draw."""
    model, tok = smollm
    enc = encode_prompts(tok, "Describe the sea in one sentence.")
    with torch.no_grad():
        probs = torch.softmax(model(**enc).logits[0, -1].double(), -1)
    pred = named_predicate("lowercase", tok)
    allowed = torch.tensor([pred([], t) for t in range(probs.numel())])
    exact_z = float(probs[allowed].sum())
    n = 1000
    zs, counts, calls = _mc_awrs(probs, allowed, n, torch.Generator().manual_seed(5))
    se = zs.std(ddof=1) / math.sqrt(n)
    target = (probs * allowed).numpy() / exact_z
    pval = _chi2_pvalue(counts[allowed.numpy()], n * target[allowed.numpy()])
    print(f"\nreal model, 'lowercase' first step: exact Z = {exact_z:.4f}, mean Z_hat = {zs.mean():.4f} "
          f"(se {se:.4f}), {calls / n:.1f} evaluations/draw, token chi-square p = {pval:.3f}")
    assert abs(zs.mean() - exact_z) < 4 * se
    assert pval > 1e-3
    assert calls / n < 0.01 * probs.numel()


@pytest.mark.real_model
def test_grammar_constraint_by_token_checks_equals_the_mask_fast_path(smollm):
    """A regular expression as the constraint: AWRS checks only the drawn tokens with the grammar matcher; the
    engine's full mask (fast path) gives the same samples and weights under the same seed."""
    import re

    from hf_decoding_ext.core.models import encode_prompts

    model, tok = smollm
    inputs = encode_prompts(tok, ["Give a date.", "When were you born?"])
    pattern = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
    runs = []
    for grammar_mask in (False, True):
        awrs = AdaptiveWeightedRejectionSampling.for_model(model, tok, regex=pattern, grammar_mask=grammar_mask)
        torch.manual_seed(0)
        out = model.generate(**inputs, custom_generate=awrs, do_sample=True, top_k=0, max_new_tokens=12,
                             return_dict_in_generate=True)
        texts = [tok.decode(r[inputs.input_ids.shape[1]:], skip_special_tokens=True) for r in out.sequences]
        assert all(re.fullmatch(pattern, t) for t in texts), texts
        runs.append((texts, out.awrs_log_weights))
    assert runs[0][0] == runs[1][0]
    assert torch.allclose(runs[0][1], runs[1][1])
