"""The consensus game / Equilibrium-Ranking (arXiv 2310.09139): the no-regret dynamics with scripted initial
policies, the initial policies from the LM on the tiny model, the custom_generate loop, and one real-model check."""

import math

import pytest
import torch

from hf_decoding_ext.search.consensus_game import (
    EquilibriumRanking,
    agreement,
    consensus_game,
    continuation_logprobs,
    format_mc_question,
    initial_policies,
    lm_scores,
    mc_questions,
    rank_candidates,
)


def _random_policies(n, seed, batch=()):
    gen = torch.Generator().manual_seed(seed)
    g = torch.softmax(2 * torch.randn(*batch, 2, n, generator=gen, dtype=torch.float64), -1)
    d = torch.softmax(2 * torch.randn(*batch, n, 2, generator=gen, dtype=torch.float64), -1)
    return g, d


def _reference_game(g1, d1, lam_g, lam_d, eta_g, eta_d, iterations, prior=0.5):
    """Eq. 1-2 of the paper written with plain Python loops over information sets and actions."""
    n = len(g1[0])
    pv = [prior, 1 - prior]
    g = [list(r) for r in g1]
    d = [list(r) for r in d1]
    hist_g, hist_d = [], []
    for t in range(1, iterations + 1):
        hist_g.append([list(r) for r in g])
        hist_d.append([list(r) for r in d])
        new_g = []
        for v in range(2):
            q = [pv[v] * sum(h[y][v] for h in hist_d) / t for y in range(n)]
            z = [math.exp((q[y] + lam_g * math.log(g1[v][y])) / (1 / (eta_g * t) + lam_g)) for y in range(n)]
            new_g.append([x / sum(z) for x in z])
        new_d = []
        for y in range(n):
            q = [pv[v] * sum(h[v][y] for h in hist_g) / t for v in range(2)]
            z = [math.exp((q[v] + lam_d * math.log(d1[y][v])) / (1 / (eta_d * t) + lam_d)) for v in range(2)]
            new_d.append([x / sum(z) for x in z])
        g, d = new_g, new_d
    avg_g = [[sum(h[v][y] for h in hist_g) / iterations for y in range(n)] for v in range(2)]
    return g, d, avg_g


# ------------------------------------------------------------------------------------------------ the game
@pytest.mark.parametrize("lam_g, lam_d, prior", [(0.1, 0.1, 0.5), (0.5, 0.02, 0.3), (0.0, 0.1, 0.5)])
def test_dynamics_match_the_update_rule_written_out(lam_g, lam_d, prior):
    g1, d1 = _random_policies(3, seed=1)
    res = consensus_game(g1, d1, lambda_g=lam_g, lambda_d=lam_d, eta_g=0.1, eta_d=0.3, iterations=40,
                         prior_correct=prior)
    ref_g, ref_d, ref_avg_g = _reference_game(g1.tolist(), d1.tolist(), lam_g, lam_d, 0.1, 0.3, 40, prior)
    assert torch.allclose(res.generator, torch.tensor(ref_g, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(res.discriminator, torch.tensor(ref_d, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(res.average_generator, torch.tensor(ref_avg_g, dtype=torch.float64), atol=1e-12)


def test_first_update_by_hand():
    g1 = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    d1 = torch.tensor([[0.8, 0.2], [0.4, 0.6]])
    res = consensus_game(g1, d1, lambda_g=0.1, lambda_d=0.1, eta_g=0.1, eta_d=0.1, iterations=1, trace=False)
    # Q_G(y | correct) = 0.5 * pi_D(correct | y) = (0.4, 0.2); divisor 1/(0.1*1) + 0.1 = 10.1; log 0.5 terms cancel
    expected = torch.softmax(torch.tensor([0.4, 0.2], dtype=torch.float64) / 10.1, -1)
    assert torch.allclose(res.er_g, expected, atol=1e-12)
    # Q_D(v | y0) = 0.5 * pi_G(y0 | v) = (0.25, 0.25): the discriminator's update keeps its prior's shape, tempered
    expected_d0 = torch.softmax(0.1 * torch.log(torch.tensor([0.8, 0.2], dtype=torch.float64)) / 10.1, -1)
    assert torch.allclose(res.discriminator[0], expected_d0, atol=1e-12)


def test_infinite_regularisation_returns_the_initial_rankings():
    g1, d1 = _random_policies(5, seed=2, batch=(3,))
    exact = consensus_game(g1, d1, lambda_g=math.inf, lambda_d=math.inf, iterations=50)
    assert torch.allclose(exact.generator, g1, atol=1e-12) and torch.allclose(exact.discriminator, d1, atol=1e-12)
    for lam in (1e4, 1e7):
        res = consensus_game(g1, d1, lambda_g=lam, lambda_d=lam, iterations=300)
        assert torch.equal(res.er_g.argsort(-1), g1[..., 0, :].argsort(-1))
        assert torch.equal(res.er_d.argsort(-1), d1[..., :, 0].argsort(-1))
        assert torch.allclose(res.generator, g1, atol=10 / lam)
    # at the paper's lambda the rankings do move on this instance (the limit above is not a no-op)
    moved = consensus_game(g1, d1, iterations=300)
    assert not torch.allclose(moved.generator, g1, atol=1e-2)


def test_dynamics_converge():
    g1 = torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.3, 0.5]])  # the generator favours y0 when asked for a correct one
    d1 = torch.tensor([[0.3, 0.7], [0.8, 0.2], [0.5, 0.5]])  # the discriminator believes y1
    res = consensus_game(g1, d1, iterations=5000)
    change = res.trace["policy_change"]
    assert change.shape == (5000,)
    assert change[-1] < 1e-4 and change[-1] < 1e-3 * change[0]  # the step shrinks with the 1/(eta t) schedule
    for player in ("regret_generator", "regret_discriminator"):
        regret = res.trace[player]
        assert abs(regret[-1]) < 5e-3 and abs(regret[-1]) < 0.5 * abs(regret[999])  # average regularised regret -> 0
    # the average policy and the last iterate approach each other
    assert (res.average_generator - res.generator).abs().max() < 0.1


def test_agreement_increases_from_initialisation():
    g1 = torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.3, 0.5]])
    d1 = torch.tensor([[0.3, 0.7], [0.8, 0.2], [0.5, 0.5]])
    res = consensus_game(g1, d1, iterations=2000)
    js = res.trace["agreement"]
    assert js.shape == (2001,)
    assert torch.isclose(js[0], agreement(g1.double(), d1.double()))
    assert js[-1] < 0.5 * js[0]
    # batched games equal the games one by one
    g2, d2 = _random_policies(3, seed=4)
    both = consensus_game(torch.stack([g1.double(), g2]), torch.stack([d1.double(), d2]), iterations=300)
    alone = consensus_game(g2, d2, iterations=300)
    assert torch.allclose(both.generator[1], alone.generator, atol=1e-12)
    assert torch.allclose(both.trace["agreement"][:, 1], alone.trace["agreement"], atol=1e-12)


def test_initial_policy_normalisations():
    lg = torch.log(torch.tensor([[0.2, 0.1, 0.05], [0.1, 0.2, 0.01]], dtype=torch.float64))
    ld = torch.log(torch.tensor([[0.6, 0.3], [0.2, 0.1], [0.5, 0.5]], dtype=torch.float64))
    g, d = initial_policies(lg, ld, "plain")
    assert torch.allclose(g, lg.exp() / lg.exp().sum(-1, keepdim=True))
    assert torch.allclose(d, ld.exp() / ld.exp().sum(-1, keepdim=True))
    g, d = initial_policies(lg, ld, "paper")
    p = lg.exp()
    ratio = p / p.sum(0, keepdim=True)  # P(y | v) / sum_v' P(y | v')
    assert torch.allclose(g, ratio / ratio.sum(-1, keepdim=True))
    q = ld.exp()
    ratio = q / q.sum(0, keepdim=True)  # P(v | y) / sum_y' P(v | y')
    assert torch.allclose(d, ratio / ratio.sum(-1, keepdim=True))
    # the v-normalisation removes a per-answer factor common to both prompts (e.g. the answer's length)
    g_scaled, _ = initial_policies(lg + torch.tensor([0.0, -3.0, 5.0]), ld, "paper")
    assert torch.allclose(g_scaled, g)


def test_bad_arguments():
    g1, d1 = _random_policies(3, seed=0)
    for kw in ({"lambda_g": -1}, {"eta_d": 0}, {"eta_g": math.inf}, {"iterations": 0}, {"iterations": 2.5},
               {"prior_correct": 1.0}, {"lambda_d": "x"}):
        with pytest.raises(ValueError):
            consensus_game(g1, d1, **kw)
    with pytest.raises(ValueError, match="disagree"):
        consensus_game(g1, d1[:2])
    with pytest.raises(ValueError, match="sum to 1"):
        consensus_game(g1 * 2, d1)
    with pytest.raises(ValueError, match="normalisation"):
        initial_policies(torch.zeros(2, 3), torch.zeros(3, 2), "other")


# ------------------------------------------------------------------------------------------------ LM scores (tiny)
def test_continuation_logprobs_equal_single_forwards(tiny_model):
    prefixes = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    conts = [[20, 21], [22, 23, 24], []]
    got = continuation_logprobs(tiny_model, prefixes, conts, batch_size=2)
    for i, (p, c) in enumerate(zip(prefixes, conts)):
        if not c:
            assert got[i] == 0
            continue
        ids = torch.tensor([p + c])
        with torch.no_grad():
            logp = torch.log_softmax(tiny_model(ids).logits.double(), -1)[0]
        want = sum(float(logp[len(p) - 1 + j, c[j]]) for j in range(len(c)))
        assert abs(float(got[i]) - want) < 1e-4


def test_lm_scores_use_the_two_prompts(tiny_llama, char_tokenizer):
    lg, ld = lm_scores(tiny_llama, char_tokenizer, "Sky?", ["blue", "red"], verdicts=("Y", "N"))
    assert lg.shape == (2, 2) and ld.shape == (2, 2)
    enc = lambda s: char_tokenizer(s, add_special_tokens=False)["input_ids"]
    eos = [char_tokenizer.eos_token_id]
    want = continuation_logprobs(tiny_llama, [enc("Question: Sky?\nIncorrect answer:")], [enc(" red") + eos])
    assert torch.isclose(lg[1, 1], want[0])
    want = continuation_logprobs(
        tiny_llama, [enc("Question: Sky?\nProposed answer: blue\nIs the proposed answer correct (Yes or No)?\nAnswer:")],
        [enc(" N")])
    assert torch.isclose(ld[0, 1], want[0])
    with pytest.raises(ValueError, match="chat template"):
        lm_scores(tiny_llama, char_tokenizer, "Sky?", ["blue"], chat=True)


def test_rank_candidates_with_infinite_lambda_is_the_initial_ranking(tiny_llama, char_tokenizer):
    out = rank_candidates(tiny_llama, char_tokenizer, "Sky?", ["blue", "red", "green"], lambda_g=math.inf,
                          lambda_d=math.inf, iterations=5)
    g1, d1 = initial_policies(out.generator_logprobs, out.discriminator_logprobs)
    assert torch.allclose(out.er_g, g1[0]) and torch.allclose(out.er_d, d1[:, 0])


# ------------------------------------------------------------------------------------------------ the loop (tiny)
@pytest.mark.parametrize("ranking", ["ER-G", "ER-D"])
def test_loop_returns_the_candidate_ranked_first(tiny_llama, char_tokenizer, ranking):
    ids = torch.tensor([[0, 0, 40, 41, 42], [43, 44, 45, 46, 47]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    loop = EquilibriumRanking(char_tokenizer, n=4, ranking=ranking, iterations=200, seed=3)
    out = tiny_llama.generate(ids, attention_mask=mask, do_sample=True, top_k=0, max_new_tokens=6, pad_token_id=0,
                              custom_generate=loop, return_dict_in_generate=True)
    for row in range(2):
        cands = out.candidates[row]
        scores = out.selection_scores[row]
        assert len(cands) == 4 and scores.shape == (4,)
        chosen = int(scores.argmax())
        new = out.sequences[row, 5:5 + len(cands[chosen])].tolist()
        assert new == cands[chosen]
        # the scores are the game's on this pool, recomputed through the public API
        prompt = ids[row][mask[row].bool()].tolist()
        question = char_tokenizer.decode(prompt, skip_special_tokens=True).strip()
        texts = [char_tokenizer.decode(c, skip_special_tokens=True) for c in cands]
        lg, ld = lm_scores(tiny_llama, char_tokenizer, question, texts, answer_ids=cands)
        game = consensus_game(*initial_policies(lg, ld), iterations=200, trace=False)
        assert torch.allclose(scores, game.ranking(ranking).float(), atol=1e-5)


def test_loop_arguments(char_tokenizer, tiny_llama):
    with pytest.raises(ValueError, match="tokenizer"):
        EquilibriumRanking(None)
    for kw in ({"ranking": "ER-X"}, {"n": 0}, {"lambda_g": -0.1}, {"iterations": 0}, {"initial": "other"},
               {"verdicts": ("Yes",)}, {"chat": True}):
        with pytest.raises(ValueError):
            EquilibriumRanking(char_tokenizer, **kw)
    with pytest.raises(ValueError, match="do_sample=True"):
        tiny_llama.generate(torch.tensor([[5, 6]]), do_sample=False, max_new_tokens=2,
                            custom_generate=EquilibriumRanking(char_tokenizer, n=2, iterations=5))


def test_shipped_mc_questions():
    rows = mc_questions()
    assert len(rows) >= 20 and len(mc_questions("dev")) + len(mc_questions("test")) == len(rows)
    for r in rows:
        assert 0 <= r["answer"] < len(r["options"]) and len(set(r["options"])) == len(r["options"])
    assert format_mc_question(rows[0]).startswith(rows[0]["question"] + "\nOptions: ")


# ------------------------------------------------------------------------------------------------ real model
@pytest.mark.real_model
def test_real_model_equilibrium_converges_and_agrees(smollm):
    """On SmolLM2 and a few shipped test questions: the dynamics converge, the players agree more than at
    initialisation, and the loop runs through generate(). (Accuracy against the generator-only ranking is measured
    by scripts/eval_consensus_game.py and reported, not asserted here.)"""
    model, tokenizer = smollm
    rows = mc_questions("test")[:4]
    gens, discs = [], []
    for r in rows:
        lg, ld = lm_scores(model, tokenizer, format_mc_question(r), r["options"])
        g1, d1 = initial_policies(lg, ld)
        gens.append(g1)
        discs.append(d1)
    res = consensus_game(torch.stack(gens), torch.stack(discs), iterations=5000)
    assert (res.trace["policy_change"][-1] < 1e-4).all()
    for player in ("regret_generator", "regret_discriminator"):  # average regularised regret -> 0 (~ log T / T)
        regret = res.trace[player].abs()
        assert (regret[-1] < 5e-3).all() and (regret[-1] < 0.5 * regret[:100].amax(0)).all()
    # the players come to agree on the top answer (JS divergence is not asserted: with the paper's normalisation
    # both initial policies are nearly flat, so their JS divergence starts small and grows as both sharpen)
    agree_initial = int((torch.stack(gens)[:, 0].argmax(-1) == torch.stack(discs)[:, :, 0].argmax(-1)).sum())
    agree_equilibrium = int((res.er_g.argmax(-1) == res.er_d.argmax(-1)).sum())
    assert agree_equilibrium >= agree_initial and agree_equilibrium >= len(rows) - 1

    from hf_decoding_ext.core.models import encode_prompts

    enc = encode_prompts(tokenizer, "What is the capital of France? Answer in one word.")
    out = model.generate(**enc, do_sample=True, top_k=0, max_new_tokens=6,
                         custom_generate=EquilibriumRanking(tokenizer, n=3, iterations=500, seed=0),
                         return_dict_in_generate=True)
    assert out.selection_scores[0].shape == (3,)
    assert tokenizer.decode(out.sequences[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
