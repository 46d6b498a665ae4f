"""DAEMON: decoding as direct metrics optimization (arXiv:2310.01041)."""

import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from scipy.stats import chisquare

from hf_decoding_ext.core.candidates import CandidatePool
from hf_decoding_ext.search.daemon import (
    METRICS,
    DAEMONDecoding,
    daemon_features,
    diversity,
    draw_pools,
    encode_passage,
    fit_weights,
    human_passages,
    load_weights,
    repetition_rate,
    shipped_weights_path,
    sir_expectations,
)

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------- helpers
def _pit(probs: torch.Tensor, tokens: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Randomised probability integral transform: uniform on [0, 1] iff ``tokens`` ~ ``probs`` (rows)."""
    cdf = probs.double().cumsum(-1)
    p = probs.double().gather(1, tokens[:, None]).squeeze(1)
    below = cdf.gather(1, tokens[:, None]).squeeze(1) - p
    return below + v * p


def _uniformity_pvalue(u: torch.Tensor, bins: int = 10) -> float:
    counts = torch.histc(u.float(), bins=bins, min=0.0, max=1.0)
    return float(chisquare(counts.numpy()).pvalue)


def _sir_outputs(model, top_k, rows=1500, n=3, seed=0):
    prompt = torch.tensor([[5, 6, 7]]).repeat(rows, 1)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=top_k,
                         max_new_tokens=2, custom_generate=DAEMONDecoding(n=n, weights="zero", seed=seed),
                         return_dict_in_generate=True, pad_token_id=0)
    return prompt, out


def _pits(model, prompt, gen_tokens, seed=0):
    """PITs of the first tokens and of the second tokens (rows whose first token is not eos) under the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        p1 = torch.softmax(model(prompt[:1]).logits[0, -1].double(), -1)
        x1 = gen_tokens[:, 0]
        u1 = _pit(p1.expand(len(x1), -1), x1, torch.rand(len(x1), generator=g, dtype=torch.float64))
        keep = x1 != 2
        seqs = torch.cat([prompt[keep], x1[keep, None]], 1)
        uniq, inv = torch.unique(seqs, dim=0, return_inverse=True)
        p2 = torch.softmax(model(uniq).logits[:, -1].double(), -1)[inv]
        x2 = gen_tokens[keep, 1]
        u2 = _pit(p2, x2, torch.rand(len(x2), generator=g, dtype=torch.float64))
    return u1, u2


# ----------------------------------------------------------------------------------------------- tiny models
def test_zero_weights_untruncated_proposal_samples_from_the_model(tiny_model):
    """mu = 0, untruncated proposal: every importance weight is exactly equal, so the resampled candidate is a draw
    from the model: the randomised PITs of both generated tokens under the exact model probabilities are uniform."""
    prompt, out = _sir_outputs(tiny_model, top_k=0)
    assert all(bool((s == 0).all()) for s in out.selection_scores)  # log p - log q = 0 for every candidate
    u1, u2 = _pits(tiny_model, prompt, out.sequences[:, prompt.shape[1]:])
    assert _uniformity_pvalue(u1) > 1e-3
    assert _uniformity_pvalue(u2) > 1e-3
    assert _uniformity_pvalue(torch.cat([u1, u2]), bins=20) > 1e-3


def test_truncated_proposal_is_not_the_model_distribution(tiny_llama):
    """The same check has power: with a top-k proposal (mu = 0, M = 3) the output cannot follow the model."""
    prompt, out = _sir_outputs(tiny_llama, top_k=3)
    u1, _ = _pits(tiny_llama, prompt, out.sequences[:, prompt.shape[1]:])
    assert _uniformity_pvalue(u1) < 1e-6


def test_truncated_proposal_weights_use_the_proposal_probabilities(tiny_llama):
    """With temperature 0.7 and top-k 5, each log-weight is log p_model(x) - log q(x) where q is the processed
    (tempered, truncated, renormalised) distribution, recomputed here token by token."""
    prompt = torch.tensor([[3, 9, 4, 11]])
    out = tiny_llama.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=5,
                              temperature=0.7, max_new_tokens=5, return_dict_in_generate=True, pad_token_id=0,
                              custom_generate=DAEMONDecoding(n=4, weights="zero", seed=3))
    cands, scores = out.candidates[0], out.selection_scores[0]
    assert len(cands) == 4
    for cand, score in zip(cands, scores.tolist()):
        raw = proc = 0.0
        seq = prompt[0].tolist()
        with torch.no_grad():
            for tok in cand:
                logits = tiny_llama(torch.tensor([seq])).logits[0, -1].double()
                raw += float(torch.log_softmax(logits, -1)[tok])
                scaled = logits / 0.7
                kth = scaled.topk(5).values[-1]
                scaled[scaled < kth] = -math.inf
                proc += float(torch.log_softmax(scaled, -1)[tok])
                seq.append(tok)
        assert score == pytest.approx(raw - proc, abs=1e-4)
        assert raw - proc < -1e-3  # truncation and temperature matter: q != p


def _scripted_features(model, prompts, cands):
    """Scripted metric: the candidate's length and its count of token 7."""
    return torch.tensor([[float(len(c)), float(sum(t == 7 for t in c))] for c in cands], dtype=torch.float64)


def test_sir_weights_formula_and_seeded_resampling(tiny_llama):
    """log w_i = log p - log q - mu.f_i with scripted features; the draw follows softmax(log w) and is seeded."""
    prompt = torch.tensor([[3, 9, 4, 11]])
    mu = {"len": 0.3, "sevens": -0.5}
    kwargs = dict(attention_mask=torch.ones_like(prompt), do_sample=True, top_k=8, max_new_tokens=6,
                  return_dict_in_generate=True, pad_token_id=0)
    loop = DAEMONDecoding(n=6, weights=mu, feature_fn=_scripted_features, seed=11)
    out = tiny_llama.generate(prompt, custom_generate=loop, **kwargs)
    zero = tiny_llama.generate(prompt, custom_generate=DAEMONDecoding(n=6, weights="zero", seed=11), **kwargs)
    assert zero.candidates == out.candidates  # same seeded pool
    f = _scripted_features(None, None, out.candidates[0])
    expected = zero.selection_scores[0] - f @ torch.tensor([0.3, -0.5], dtype=torch.float64)
    assert torch.allclose(out.selection_scores[0], expected, atol=1e-9)
    again = tiny_llama.generate(prompt, custom_generate=loop, **kwargs)
    assert torch.equal(again.sequences, out.sequences)
    # the resampling follows softmax(log w): over many draws the chosen index frequencies match the weights
    pool = CandidatePool(tokens=out.candidates[0], logprobs=zero.selection_scores[0].clone(),
                         proposal_logprobs=torch.zeros(6, dtype=torch.float64), ends=["criteria"] * 6,
                         prompt=prompt[0])
    state = SimpleNamespace(model=tiny_llama)
    loop._resample_generator = torch.Generator().manual_seed(1000)
    picks = [loop.select(pool, state, 0).index for _ in range(2000)]
    freq = torch.bincount(torch.tensor(picks), minlength=6).double() / len(picks)
    assert float((freq - torch.softmax(expected, 0)).abs().max()) < 0.04


def _lengths_only(model, prompts, cands):
    return torch.tensor([[float(len(c))] for c in cands], dtype=torch.float64)


def test_large_weight_on_a_metric_picks_its_minimiser(tiny_llama):
    prompt = torch.tensor([[3, 9, 4, 11]])
    loop = DAEMONDecoding(n=8, weights={"len": 50.0}, feature_fn=_lengths_only, metrics=("len",), seed=2)
    out = tiny_llama.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=0,
                              max_new_tokens=12, return_dict_in_generate=True, pad_token_id=0, custom_generate=loop,
                              eos_token_id=[2, 5, 6, 8])
    shortest = min(len(c) for c in out.candidates[0])
    assert out.sequences.shape[1] - prompt.shape[1] == shortest


# ----------------------------------------------------------------------------------------------- the dual
def test_wis_dual_converges_and_matches_the_human_means():
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(40, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 5.0, 0.2],
             dtype=torch.float64) for _ in range(6)]
    ratios = [torch.randn(40, generator=g, dtype=torch.float64) * 0.5 for _ in range(6)]
    human = torch.tensor([0.4, -2.0, 0.05], dtype=torch.float64)
    fit = fit_weights(feats, ratios, human, metrics=("a", "b", "c"), l2=0.0, tol=1e-10)
    assert fit.converged and fit.grad_norm < 1e-10
    assert torch.allclose(fit.fitted_mean, human, atol=1e-8)
    norms = [h[2] for h in fit.history]
    assert norms[0] > 1e-2 and norms[-1] < 1e-10
    # the fitted weights are the root of the WIS moment condition: recompute it directly
    check = torch.stack([torch.softmax(r - f @ fit.mu, 0) @ f for f, r in zip(feats, ratios)]).mean(0)
    assert torch.allclose(check, human, atol=1e-8)
    # no importance ratios: model mean = proposal mean
    fit0 = fit_weights(feats, None, human, metrics=("a", "b", "c"), l2=0.0)
    assert torch.allclose(fit0.model_mean, fit0.proposal_mean)


def test_wis_dual_one_dimension_against_bisection():
    g = torch.Generator().manual_seed(1)
    feats = [torch.rand(30, 1, generator=g, dtype=torch.float64) for _ in range(3)]
    ratios = [torch.randn(30, generator=g, dtype=torch.float64) for _ in range(3)]
    target = 0.3

    def mean(m):
        return float(torch.stack([torch.softmax(r - f[:, 0] * m, 0) @ f[:, 0] for f, r in zip(feats, ratios)]).mean())

    lo, hi = -200.0, 200.0  # the weighted mean decreases in mu
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean(mid) > target else (lo, mid)
    fit = fit_weights(feats, ratios, [target], metrics=("x",), l2=0.0, tol=1e-12)
    assert float(fit.mu[0]) == pytest.approx((lo + hi) / 2, abs=1e-6)


def test_constant_feature_stays_at_zero_and_ridge_keeps_infeasible_targets_finite():
    g = torch.Generator().manual_seed(2)
    feats = [torch.cat([torch.rand(20, 1, generator=g, dtype=torch.float64),
                        torch.full((20, 1), 48.0, dtype=torch.float64)], 1) for _ in range(3)]
    fit = fit_weights(feats, None, [2.0, 48.0], metrics=("x", "len"), l2=1e-3)  # x = 2 lies outside [0, 1]
    assert fit.fixed == ("len",) and float(fit.mu[1]) == 0.0
    assert fit.converged and math.isfinite(float(fit.mu[0])) and float(fit.mu[0]) < 0  # pushes x up
    with pytest.raises(ValueError, match="columns"):
        fit_weights(feats, None, [2.0, 48.0], metrics=("x",))


# ----------------------------------------------------------------------------------------------- metrics
def test_metric_functions(tiny_llama):
    assert repetition_rate([1, 2, 1, 2, 1, 2], 2) == pytest.approx(1 - 2 / 5)
    assert repetition_rate([1, 2], 3) == 0.0
    assert diversity([1, 2, 3, 4, 5]) == 1.0
    toks = [1, 2, 1, 2, 1, 2]
    assert diversity(toks) == pytest.approx(
        (1 - repetition_rate(toks, 2)) * (1 - repetition_rate(toks, 3)) * (1 - repetition_rate(toks, 4)))
    prefix, cont = [3, 9, 4, 11], [12, 13, 12, 14]
    f = daemon_features(tiny_llama, [prefix, prefix, [5, 6]], [cont + [2], cont, []])
    assert f.shape == (3, len(METRICS))
    col = {m: i for i, m in enumerate(METRICS)}
    others = [col[m] for m in METRICS if m != "info"]
    assert torch.allclose(f[0, others], f[1, others])  # a final eos is not measured, except by its likelihood
    assert f[0, col["len"]] == 4 and f[2, col["len"]] == 0
    with torch.no_grad():
        logits = tiny_llama(torch.tensor([prefix + cont])).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        nll = -sum(float(logp[len(prefix) - 1 + j, t]) for j, t in enumerate(cont)) / len(cont)
        hp = tiny_llama(torch.tensor([prefix]), output_hidden_states=True).hidden_states[-1][0].double().mean(0)
        hc = tiny_llama(torch.tensor([cont]), output_hidden_states=True).hidden_states[-1][0].double().mean(0)
    assert float(f[1, col["info"]]) == pytest.approx(nll, abs=1e-5)
    with torch.no_grad():
        full = torch.log_softmax(tiny_llama(torch.tensor([prefix + cont + [2]])).logits[0].double(), -1)
        lp_eos = sum(float(full[len(prefix) - 1 + j, t]) for j, t in enumerate(cont + [2]))
    assert float(f[0, col["info"]]) == pytest.approx(-lp_eos / 5, abs=1e-5)
    # the pool's summed log-probabilities give the same information without a forward
    f_lp = daemon_features(tiny_llama, [prefix, prefix], [cont + [2], cont], logprobs=[lp_eos, -nll * 4])
    assert torch.allclose(f_lp, f[:2], atol=1e-6)
    assert float(f[0, col["coh"]]) == pytest.approx(float(torch.nn.functional.cosine_similarity(hp, hc, 0)),
                                                    abs=1e-5)
    rep = sum(repetition_rate(cont, n) for n in (2, 3, 4)) / 3
    assert float(f[0, col["rep"]]) == pytest.approx(rep)


def test_arguments_are_validated_and_auto_weights_need_smollm(tiny_llama):
    for bad in (dict(n=0), dict(weights="nope"), dict(weights={"bogus": 1.0}), dict(weights={"rep": float("nan")}),
                dict(metrics=("rep", "zzz")), dict(batch_size=0), dict(feature_fn=3),
                dict(feature_fn=_scripted_features)):
        with pytest.raises(ValueError):
            DAEMONDecoding(**bad)
    prompt = torch.tensor([[3, 9, 4]])
    with pytest.raises(ValueError, match="SmolLM2"):
        tiny_llama.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, max_new_tokens=3,
                            custom_generate=DAEMONDecoding(n=2))
    with pytest.raises(ValueError, match="fitted for a model"):
        load_weights("shipped", tiny_llama)
    with pytest.raises(ValueError, match="do_sample=True"):
        tiny_llama.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=3,
                            custom_generate=DAEMONDecoding(n=2, weights="zero"))


def test_human_text_data_and_shipped_weights():
    rows = human_passages()
    assert 40 <= len(rows) <= 60
    assert {r["split"] for r in rows} == {"dev", "test"}
    for r in rows:
        assert r["author"] and r["work"] and int(r["year"]) < 1902
        assert len(r["continuation"].split()) >= 35
    rec = json.loads(shipped_weights_path().read_text())
    assert set(rec["mu"]) == set(METRICS)
    assert rec["fit"]["converged"] and rec["fit"]["grad_norm"] < 1e-6


# ----------------------------------------------------------------------------------------------- real model
def _gaps(model, tokenizer, passages, m, pools, max_new_tokens, seed):
    mu_map, rec = load_weights("shipped", model)
    mu = torch.tensor([mu_map[k] for k in METRICS], dtype=torch.float64)
    prop = rec["settings"]["proposal"]
    enc = [encode_passage(tokenizer, p, max_new_tokens) for p in passages]
    prefixes = [e[0] for e in enc]
    human = daemon_features(model, prefixes, [e[1] for e in enc]).mean(0)
    means = {"proposal": [], "sir": [], "model": []}
    for k in range(pools):
        for i, pool in enumerate(draw_pools(model, tokenizer, prefixes, m, seed=seed + 100 * k,
                                            max_new_tokens=max_new_tokens, top_p=prop["top_p"],
                                            temperature=prop["temperature"])):
            f = daemon_features(model, [prefixes[i]] * len(pool), pool.tokens, logprobs=pool.logprobs)
            for key, v in sir_expectations(f, pool.logprobs - pool.proposal_logprobs, mu).items():
                means[key].append(v)
    return human, {key: torch.stack(v).mean(0) for key, v in means.items()}


REPRODUCED = ("info", "len")
"""The metrics whose gap to human text shrinks in the full evaluation (results/daemon_eval.json: 23 held-out
prompts, 2 pools of M = 8 each, 32 tokens): information and length. Repetition and diversity narrow only within noise
(bootstrap intervals include 0) and coherence overshoots the human mean slightly (not reproduced; in the registry)."""


@pytest.mark.real_model
def test_daemon_metric_gaps_to_human_text_shrink(smollm):
    """DAEMON's core claim, small: on held-out prompts (M = 8, 32 tokens) the information gap of the SIR output to
    human text is smaller than the proposal's and than SIR with mu = 0 (the p/q correction alone), and the length gap
    does not grow."""
    model, tokenizer = smollm
    rec = json.loads(shipped_weights_path().read_text())
    passages = human_passages("test")[:4]
    human, e = _gaps(model, tokenizer, passages, m=8, pools=1, max_new_tokens=rec["settings"]["max_new_tokens"],
                     seed=5)
    gap = {key: (v - human).abs() for key, v in e.items()}
    info, length = METRICS.index("info"), METRICS.index("len")
    assert gap["sir"][info] < gap["proposal"][info] and gap["sir"][info] < gap["model"][info], (human, e)
    assert gap["sir"][length] <= gap["proposal"][length], (human, e)


@pytest.mark.real_model
@pytest.mark.slow
def test_daemon_eval_script_full_run(smollm, tmp_path):
    """The full evaluation (all test prompts, M = 8, 2 pools each): scripts/eval_daemon.py."""
    spec = importlib.util.spec_from_file_location("eval_daemon", ROOT / "scripts" / "eval_daemon.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "daemon_eval.json"
    mod.main(["--out", str(out)])
    summary = json.loads(out.read_text())["summary"]
    assert all(summary[m]["shrinks"] for m in REPRODUCED), summary
