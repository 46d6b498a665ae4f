"""Tests for adaptive top-k / sparse Bregman decoding ("Foundations of Top-k Decoding For Language Models",
arXiv:2505.19371)."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper

from hf_decoding_ext.sampling.adaptive_topk import (
    AdaptiveTopKLogitsProcessor,
    adaptive_k,
    alpha_renormalize,
    bregman_decode,
    bregman_objective,
)

GENERATORS = [("kl", None), ("alpha", 0.5), ("alpha", 1.5), ("alpha", 2.0), ("alpha", 3.0)]


def _random_sorted_p(gen, vocab, temp):
    return torch.softmax(torch.randn(vocab, generator=gen, dtype=torch.float64) * temp, -1).sort(descending=True).values


# -------------------------------------------------------------------------------------- search vs exhaustive
@pytest.mark.parametrize("divergence,alpha", GENERATORS)
def test_binary_search_equals_exhaustive_argmin(divergence, alpha):
    gen = torch.Generator().manual_seed(0)
    n = 0
    lams = (1e-4, 1e-3, 1e-2, 0.1, 1.0) if divergence == "kl" else (1e-3, 1e-2, 0.1)
    vocabs = (2, 3, 17, 128, 1000) if divergence == "kl" else (2, 3, 17, 64, 128)  # alpha exhaustive is O(V^2)
    for vocab in vocabs:
        for temp in (0.3, 1.0, 3.0, 8.0):  # flat ... very peaky
            for lam in lams:
                p = _random_sorted_p(gen, vocab, temp)
                f = bregman_objective(p, torch.arange(1, vocab + 1), lam, divergence, alpha)
                k_exhaustive = int(f.argmin()) + 1
                assert adaptive_k(p, lam, divergence, alpha) == k_exhaustive, (vocab, temp, lam)
                n += 1
    assert n == 20 * len(lams)


@pytest.mark.parametrize("divergence,alpha", GENERATORS)
def test_objective_is_discretely_convex(divergence, alpha):
    gen = torch.Generator().manual_seed(1)
    for vocab, temp in [(50, 0.5), (120, 2.0), (120, 6.0)]:
        p = _random_sorted_p(gen, vocab, temp)
        f = bregman_objective(p, torch.arange(1, vocab + 1), 0.01, divergence, alpha)
        second = f[2:] - 2 * f[1:-1] + f[:-2]
        assert (second >= -1e-10).all()


@pytest.mark.parametrize("alpha", [0.5, 1.5, 2.0, 3.0])
def test_optimal_support_is_top_k(alpha):
    """Exhaustive search over *all* supports (small vocabulary): the optimal support is a top-k set."""
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        p = torch.softmax(torch.randn(6, generator=gen, dtype=torch.float64) * 2, -1)
        best = None
        for r in range(1, 7):
            for support in itertools.combinations(range(6), r):
                rest = [i for i in range(6) if i not in support]
                ps = torch.cat([p[list(support)].sort(descending=True).values, p[rest]])
                f = float(bregman_objective(ps, torch.tensor([r]), 0.02, "alpha", alpha))
                if best is None or f < best[0] - 1e-12:
                    best = (f, set(support))
        assert best[1] == set(p.argsort(descending=True)[: len(best[1])].tolist())


# --------------------------------------------------------------------------------------- renormalisations
def test_kl_objective_closed_form_and_rule():
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.float64)
    f = bregman_objective(p, torch.arange(1, 6), 0.1, "kl")
    assert torch.allclose(f, -torch.log(p.cumsum(0)) + 0.1 * torch.arange(1, 6))
    # KL rule: add token k+1 while log(1 + p_(k+1) / P_k) > lam
    assert adaptive_k(p, 0.1, "kl") == 4  # 0.2/.5, .15/.7, .1/.85 = 0.118 > e^0.1 - 1 = 0.105; .05/.95 < 0.105


def test_alpha_renormalization_kkt():
    gen = torch.Generator().manual_seed(3)
    p = _random_sorted_p(gen, 200, 2.0)
    ks = torch.tensor([1, 5, 50, 200])
    for alpha in (0.5, 1.5, 2.0, 3.0):
        q = alpha_renormalize(p, ks, alpha)
        assert torch.allclose(q.sum(-1), torch.ones(4, dtype=torch.float64))
        for j, k in enumerate(ks.tolist()):
            assert (q[j, k:] == 0).all() and (q[j, :k] >= p[:k] - 1e-12).all()
            shift = q[j, :k].pow(alpha - 1) - p[:k].pow(alpha - 1)  # phi'(q) - phi'(p) is constant on the support
            assert torch.allclose(shift, shift[0].expand_as(shift), rtol=1e-6, atol=1e-9)
    q2 = alpha_renormalize(p, torch.tensor([10]), 2.0)[0, :10]
    assert torch.allclose(q2, p[:10] + (1 - p[:10].sum()) / 10)
    # alpha < 1 up-weights the larger probabilities more than proportional renormalisation, alpha > 1 less
    k = torch.tensor([20])
    prop = p[:20] / p[:20].sum()
    assert alpha_renormalize(p, k, 0.5)[0, 0] > prop[0] > alpha_renormalize(p, k, 2.0)[0, 0]


def test_kl_output_is_topk_renormalisation():
    gen = torch.Generator().manual_seed(4)
    scores = torch.randn(4, 300, generator=gen) * torch.tensor([[0.5], [1.0], [3.0], [6.0]])
    proc = AdaptiveTopKLogitsProcessor(lam=0.01)
    out = proc(torch.zeros(4, 1, dtype=torch.long), scores)
    q = torch.softmax(out.double(), -1)
    p = torch.softmax(scores.double(), -1)
    for r in range(4):
        k = int(proc.last_k[r])
        top = p[r].topk(k).indices
        expected = torch.zeros_like(p[r])
        expected[top] = p[r, top] / p[r, top].sum()
        assert torch.allclose(q[r], expected, atol=1e-7)
        assert k == adaptive_k(p[r].sort(descending=True).values, 0.01, "kl")
    assert len(set(proc.last_k.tolist())) > 1  # adaptive: different rows, different k


@pytest.mark.parametrize("k", [1, 5, 40])
def test_fixed_k_kl_equals_transformers_topk(k):
    gen = torch.Generator().manual_seed(5)
    scores = torch.randn(3, 128, generator=gen) * 2
    ids = torch.zeros(3, 1, dtype=torch.long)
    ours = AdaptiveTopKLogitsProcessor(k=k)(ids, scores)
    theirs = TopKLogitsWarper(top_k=k)(ids, scores)
    assert torch.equal(ours, theirs)


def test_alpha_processor_returns_log_q():
    gen = torch.Generator().manual_seed(6)
    scores = torch.randn(2, 100, generator=gen) * 2
    proc = AdaptiveTopKLogitsProcessor(lam=0.005, divergence="alpha", alpha=1.5)
    out = proc(torch.zeros(2, 1, dtype=torch.long), scores)
    q_ref, ks = bregman_decode(torch.softmax(scores.double(), -1), 0.005, "alpha", 1.5)
    assert torch.equal(ks, proc.last_k)
    assert torch.allclose(torch.softmax(out.double(), -1), q_ref, atol=1e-6)
    assert out.dtype == scores.dtype


def test_batch_equals_rows_and_masked_tokens_stay_out():
    gen = torch.Generator().manual_seed(7)
    scores = torch.randn(3, 200, generator=gen) * torch.tensor([[0.3], [2.0], [5.0]])
    scores[0, 100:] = -float("inf")  # tokens removed by an earlier processor
    ids = torch.zeros(3, 1, dtype=torch.long)
    for kwargs in (dict(lam=0.001), dict(lam=0.001, divergence="alpha", alpha=0.5)):
        batched = AdaptiveTopKLogitsProcessor(**kwargs)(ids, scores)
        for r in range(3):
            assert torch.equal(batched[r:r + 1], AdaptiveTopKLogitsProcessor(**kwargs)(ids[r:r + 1], scores[r:r + 1]))
        assert not torch.isfinite(batched[0, 100:]).any()


def test_composition_with_temperature_and_dtype():
    scores = torch.randn(2, 64) * 2
    ids = torch.zeros(2, 1, dtype=torch.long)
    chained = LogitsProcessorList([TemperatureLogitsWarper(2.0), AdaptiveTopKLogitsProcessor(lam=0.01)])(ids, scores)
    direct = AdaptiveTopKLogitsProcessor(lam=0.01)(ids, scores / 2.0)
    assert torch.equal(chained, direct)
    half = AdaptiveTopKLogitsProcessor(lam=0.01, divergence="alpha", alpha=2.0)(ids, scores.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kwargs",
    [dict(lam=-0.1), dict(lam=float("inf")), dict(lam="0.1"), dict(divergence="js"), dict(divergence="alpha"),
     dict(divergence="alpha", alpha=1.0), dict(divergence="alpha", alpha=0.0), dict(divergence="alpha", alpha=-2.0),
     dict(divergence="kl", alpha=0.5), dict(k=0), dict(k=2.5)],
)
def test_argument_errors(kwargs):
    with pytest.raises(ValueError):
        AdaptiveTopKLogitsProcessor(**kwargs)


def test_generate_tiny_model(tiny_model):
    proc = AdaptiveTopKLogitsProcessor(lam=0.01, divergence="alpha", alpha=1.5)
    torch.manual_seed(0)
    ids = torch.randint(3, 128, (2, 4))
    out = tiny_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, max_new_tokens=6,
                              logits_processor=[proc], return_dict_in_generate=True, output_scores=True,
                              pad_token_id=0)
    new = out.sequences[:, 4:]
    for t, s in enumerate(out.scores):
        assert torch.isfinite(s[torch.arange(2), new[:, t]]).all()


# -------------------------------------------------------------------------------------------- real model
@pytest.mark.real_model
def test_adaptive_k_follows_entropy_real_model(smollm):
    """On SmolLM2-135M-Instruct, the chosen k grows with the entropy of the next-token distribution (teacher-forced
    over shipped stdlib docstrings), and generation runs through ``generate(do_sample=True, logits_processor=...)``."""
    import importlib.resources
    import json

    from hf_decoding_ext.core.models import encode_prompts
    from hf_decoding_ext.core.entropy import entropy

    model, tok = smollm
    path = importlib.resources.files("hf_decoding_ext") / "data" / "stdlib_docs.jsonl"
    docs = [json.loads(line)["text"] for line in path.read_text().splitlines()[:6]]
    enc = tok(docs, return_tensors="pt", padding=True, truncation=True, max_length=96)
    with torch.no_grad():
        logits = model(**enc).logits
    scores = logits[enc.attention_mask.bool()]  # (positions, vocab)
    proc = AdaptiveTopKLogitsProcessor(lam=0.01)
    proc(torch.zeros(len(scores), 1, dtype=torch.long), scores)
    ks = proc.last_k.double()
    ent = entropy(scores)
    low = ent <= ent.median()
    rank = lambda x: x.argsort().argsort().double()  # noqa: E731
    spearman = torch.corrcoef(torch.stack([rank(ent), rank(ks)]))[0, 1].item()
    print(f"\n{len(ks)} positions; mean k low-entropy half {ks[low].mean():.2f}, high-entropy half "
          f"{ks[~low].mean():.2f}; Spearman(entropy, k) = {spearman:.3f}")
    assert ks[low].mean() < ks[~low].mean()
    assert spearman > 0.5
    assert ks.min() >= 1 and ks.max() > ks.min()

    for kwargs in (dict(lam=0.01), dict(lam=0.001, divergence="alpha", alpha=1.5)):
        proc = AdaptiveTopKLogitsProcessor(**kwargs)
        enc = encode_prompts(tok, ["Write a short poem about the sea.", "What is the capital of France?"])
        torch.manual_seed(0)
        with torch.no_grad():
            out = model.generate(**enc, do_sample=True, top_k=0, max_new_tokens=12, logits_processor=[proc],
                                 return_dict_in_generate=True, output_scores=True, pad_token_id=tok.pad_token_id)
        new = out.sequences[:, enc.input_ids.shape[1]:]
        assert new.shape[1] >= 1
        for t, s in enumerate(out.scores):
            live = new[:, t] != tok.pad_token_id
            assert torch.isfinite(s[torch.arange(2), new[:, t]])[live].all()  # sampled from the kept support
            assert (torch.isfinite(s).sum(-1) >= 1).all()
