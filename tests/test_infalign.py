"""InfAlign, inference-time half (arXiv:2412.19792): reward calibration, best-/worst-of-N under the calibrated
reward, win-rate estimators (tiny models with scripted rewards; one real-model property test)."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from hf_decoding_ext.search.infalign import (
    InfAlignDecoding,
    RewardCalibrator,
    RewardScorer,
    calibrate,
    expected_win_rate,
    order_statistic_win_rate,
    select_index,
    transform_calibrated,
    vader_reward,
    win_rate,
)

SAMPLE = dict(do_sample=True, top_k=0, pad_token_id=0, eos_token_id=2, return_dict_in_generate=True)


def scripted_reward(ids) -> float:
    """A continuous reward on token ids (ties only between identical sequences)."""
    return sum(math.sin(1.7 * t + 0.31 * j) for j, t in enumerate(ids)) + 0.013 * len(ids)


def coarse_reward(ids) -> float:
    """A reward with few levels: many ties, so the empirical calibrated reward has many ties too."""
    return float(round(scripted_reward(ids)))


def _prompts(rows, length=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (rows, length), generator=gen)


def _run(model, loop, ids, new=6, seed=0, **kw):
    torch.manual_seed(seed)
    return model.generate(ids, custom_generate=loop, max_new_tokens=new, **{**SAMPLE, **kw})


def _chosen(out, row):
    """The calibrated reward and the index of the row's chosen candidate."""
    i = out.selected_index[row]
    return float(out.calibrated_rewards[row][i]), i


# ------------------------------------------------------------------------------------------------- calibration
def test_calibration_is_the_empirical_win_rate_against_the_reference():
    ref = [0.0, 1.0, 1.0, 3.0]
    r = [-1.0, 0.0, 0.5, 1.0, 2.0, 3.0, 4.0]
    half = calibrate(r, ref)
    assert half.tolist() == [0.0, 0.125, 0.25, 0.5, 0.75, 0.875, 1.0]
    assert calibrate(r, ref, ties="le").tolist() == [0.0, 0.25, 0.25, 0.75, 0.75, 1.0, 1.0]
    assert calibrate(r, ref, ties="lt").tolist() == [0.0, 0.0, 0.25, 0.25, 0.75, 0.75, 1.0]
    # an independent count, pair by pair
    for value, c in zip(r, half.tolist()):
        assert c == sum((z < value) + 0.5 * (z == value) for z in ref) / len(ref)
    assert RewardCalibrator(ref)(r).tolist() == half.tolist()
    assert len(RewardCalibrator(ref)) == 4
    gen = torch.Generator().manual_seed(1)
    x, refs = torch.randn(200, generator=gen), torch.randn(17, generator=gen)
    c = calibrate(x, refs)
    assert float(c.min()) >= 0 and float(c.max()) <= 1
    order = torch.argsort(x)
    assert bool((c[order].diff() >= 0).all())  # non-decreasing in the reward
    # ties counted one half: the calibrated reward of the reference samples themselves has mean exactly 1/2
    lumpy = torch.tensor([0.0, 0.0, 0.0, 0.5, 1.0, 1.0])
    assert float(calibrate(lumpy, lumpy).mean()) == pytest.approx(0.5, abs=1e-12)


def test_calibrator_from_texts_and_vader():
    cal = RewardCalibrator.from_texts(vader_reward, ["I hate this awful day.", "It is a day.",
                                                     "What a lovely, wonderful day!"])
    assert cal([vader_reward("This is a great and happy day!")]).tolist() == [1.0]
    assert cal([vader_reward("Terrible, horrible, sad and painful.")]).tolist() == [0.0]
    assert cal([0.0]).tolist() == [0.5]  # the neutral reference text ties: one half of a win
    assert vader_reward("") == 0.0 and vader_reward("I love it, wonderful!") > 0.5


@pytest.mark.parametrize("bad", [dict(ties="tie"), dict(rewards=[float("nan")]), dict(reference=[])])
def test_calibration_refuses_bad_inputs(bad):
    with pytest.raises(ValueError):
        calibrate(bad.get("rewards", [0.0]), bad.get("reference", [1.0]), ties=bad.get("ties", "half"))


def test_calibrated_reward_is_uniform_under_the_reference_policy(tiny_llama):
    """n=1 without selection: the candidate is itself a reference-policy sample, so its calibrated reward against
    M fresh reference samples is uniform on {0, 1/M, ..., 1}, about Uniform(0, 1); the best-of-8 choice's is not."""
    values = {1: [], 8: []}
    for n in (1, 8):
        loop = InfAlignDecoding(n=n, num_reference=31, reward=scripted_reward)
        for call in range(4):
            ids = _prompts(32, seed=call)
            out = _run(tiny_llama, loop, ids, seed=call)
            for row in range(ids.shape[0]):
                c = out.calibrated_rewards[row]
                assert float(c.min()) >= 0 and float(c.max()) <= 1
                values[n].append(_chosen(out, row)[0])
    uniform = stats.kstest(values[1], "uniform")
    assert uniform.pvalue > 0.01, uniform
    assert abs(sum(values[1]) / len(values[1]) - 0.5) < 0.08
    best = stats.kstest(values[8], "uniform")
    assert best.pvalue < 1e-6, best  # the selection shifts the calibrated reward towards 1 ...
    mean8 = sum(values[8]) / len(values[8])  # ... to 8/9 on average (the calibrated max of 8 uniforms)
    assert abs(mean8 - 8 / 9) < 4 * torch.tensor(values[8]).std().item() / math.sqrt(len(values[8]))


# ------------------------------------------------------------------------------------------------- selection
def test_select_index_is_invariant_to_monotone_transforms():
    gen = torch.Generator().manual_seed(0)
    tie_broken = 0
    for trial in range(300):
        n = 1 + trial % 8
        r = torch.randint(0, 5, (n,), generator=gen).double() + 0.1 * torch.rand(n, generator=gen)
        ref = torch.randint(0, 5, (3,), generator=gen).double()  # few reference samples: many ties in C
        c = calibrate(r, ref)
        best, worst = select_index(c, r, "best"), select_index(c, r, "worst")
        assert best == int(torch.argmax(r)) and worst == int(torch.argmin(r))
        for phi in (transform_calibrated(c, "exp", t=3.0), transform_calibrated(c, "identity")):
            assert select_index(phi, r, "best") == best and select_index(phi, r, "worst") == worst
            assert float(phi[best]) == float(phi.max())  # the choice is in the calibrated argmax set
        phi_neg = transform_calibrated(c, "exp", t=-2.0)
        assert float(phi_neg[worst]) == float(phi_neg.max())  # e^{tC}, t < 0: worst-of-N maximises it
        tie_broken += int(torch.argmax(c)) != best  # C alone (first index) would have chosen another candidate
    assert tie_broken > 20  # the step-function ties were exercised


def test_best_of_n_same_choice_raw_calibrated_and_exp(tiny_model):
    """Best-of-N with a monotone transform of the reward picks the same candidate (issue 21)."""
    ids = _prompts(3)
    for reward in (scripted_reward, coarse_reward):
        outs = {}
        for name, kw in {"raw": dict(transform="none"), "calibrated": dict(transform="identity"),
                         "exp t=0.5": dict(transform="exp", t=0.5), "exp t=8": dict(transform="exp", t=8.0)}.items():
            loop = InfAlignDecoding(n=6, num_reference=8, reward=reward, seed=11, **kw)
            outs[name] = _run(tiny_model, loop, ids)
        raw = outs["raw"]
        for name, out in outs.items():
            assert torch.equal(out.sequences, raw.sequences), name
            assert out.candidates == raw.candidates
        for row in range(ids.shape[0]):
            rewards = torch.tensor([reward(c) for c in raw.candidates[row]], dtype=torch.float64)
            torch.testing.assert_close(raw.rewards[row], rewards)
            chosen = raw.selected_index[row]
            assert all(o.selected_index[row] == chosen for o in outs.values())
            assert float(rewards[chosen]) == float(rewards.max())
            c = outs["calibrated"].calibrated_rewards[row]
            assert float(c[chosen]) == float(c.max())
            refs = torch.tensor([reward(z) for z in raw.reference_candidates[row]], dtype=torch.float64)
            torch.testing.assert_close(c, calibrate(rewards, refs))
            torch.testing.assert_close(outs["exp t=8"].selection_scores[row].double(), torch.exp(8.0 * c),
                                       rtol=1e-6, atol=0)
            torch.testing.assert_close(raw.selection_scores[row].double(), rewards, rtol=1e-6, atol=1e-6)


def test_worst_of_n_picks_the_minimum(tiny_llama):
    ids = _prompts(4, seed=3)
    best = _run(tiny_llama, InfAlignDecoding(n=6, num_reference=8, reward=scripted_reward, seed=5), ids)
    worst = _run(tiny_llama, InfAlignDecoding(n=6, num_reference=8, mode="worst", reward=scripted_reward, seed=5), ids)
    assert worst.candidates == best.candidates  # same pool, other end of it
    differs = 0
    for row in range(ids.shape[0]):
        rewards = [scripted_reward(c) for c in worst.candidates[row]]
        w = rewards[worst.selected_index[row]]
        b = rewards[best.selected_index[row]]
        assert w == min(rewards) and b == max(rewards)
        differs += w < b
        phi = worst.selection_scores[row]  # e^{-C}: the worst candidate scores highest
        assert float(phi[worst.selected_index[row]]) == pytest.approx(float(phi.max()))
        # the output is the chosen candidate, followed by padding only
        new = worst.sequences[row, ids.shape[1]:].tolist()
        chosen = worst.candidates[row][worst.selected_index[row]]
        assert new[:len(chosen)] == chosen and set(new[len(chosen):]) <= {0}
    assert differs == ids.shape[0]


def test_batch_with_left_padding_and_outputs(tiny_gpt2, char_tokenizer):
    ids = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 9, 5, 6]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    loop = InfAlignDecoding(n=3, num_reference=5, tokenizer=char_tokenizer, seed=2)  # VADER on decoded text
    out = _run(tiny_gpt2, loop, ids, attention_mask=mask)
    assert len(out.candidates) == 2 and all(len(c) == 3 for c in out.candidates)
    assert all(len(z) == 5 for z in out.reference_candidates)
    for row in range(2):
        assert out.rewards[row].shape == (3,) and out.reference_rewards[row].shape == (5,)
        texts = [char_tokenizer.decode(c, skip_special_tokens=True) for c in out.candidates[row]]
        rewards = torch.tensor([vader_reward(t) for t in texts], dtype=torch.float64)
        torch.testing.assert_close(out.rewards[row], rewards)
        assert float(rewards[out.selected_index[row]]) == float(rewards.max())
        new = out.sequences[row, ids.shape[1]:].tolist()
        chosen = out.candidates[row][out.selected_index[row]]
        assert new[:len(chosen)] == chosen and set(new[len(chosen):]) <= {0}
    assert out.candidates[0] != out.candidates[1]


@pytest.mark.parametrize("kw", [dict(n=0), dict(num_reference=0), dict(mode="median"), dict(transform="log"),
                                dict(t=0.0), dict(t=float("inf")), dict(transform="identity", t=2.0),
                                dict(ties="mid"), dict(reward="rouge"), dict(reward=3)])
def test_arguments_are_validated(kw, char_tokenizer):
    with pytest.raises(ValueError):
        InfAlignDecoding(tokenizer=char_tokenizer, **kw)


def test_vader_needs_a_tokenizer():
    with pytest.raises(ValueError, match="tokenizer"):
        InfAlignDecoding()
    assert RewardScorer(lambda text, prompt: len(prompt), uses_prompt=True).score([[1], [2, 3]], [4, 5]).tolist() \
        == [2.0, 2.0]


def test_greedy_is_refused(tiny_llama):
    with pytest.raises(ValueError, match="do_sample=True"):
        tiny_llama.generate(_prompts(1), custom_generate=InfAlignDecoding(n=2, num_reference=2,
                                                                          reward=scripted_reward),
                            do_sample=False, max_new_tokens=3, pad_token_id=0)


# ------------------------------------------------------------------------------------------------- win rates
def test_win_rate_estimators():
    assert win_rate([1.0, 3.0], [0.0, 2.0, 3.0]) == pytest.approx(3.5 / 6)
    assert expected_win_rate(4) == 0.8 and expected_win_rate(4, "worst") == 0.2
    x = torch.linspace(0, 1, 4001, dtype=torch.float64)
    for n in (1, 2, 4, 8):
        assert order_statistic_win_rate(x, x, n) == pytest.approx(n / (n + 1), abs=2e-3)
        assert order_statistic_win_rate(x, x, n, mode="worst") == pytest.approx(1 / (n + 1), abs=2e-3)
        # inference-time win rate of the reference policy against itself, both through best-of-n: exactly 1/2
        assert order_statistic_win_rate(x, x, n, reference_n=n) == pytest.approx(0.5, abs=1e-12)
    # a point mass: every comparison a tie, whatever n
    assert order_statistic_win_rate([1.0] * 5, [1.0] * 7, 8) == 0.5
    # a better policy (shifted rewards) wins more, and more so through best-of-4 against one reference sample
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(3000, generator=gen, dtype=torch.float64)
    pol = torch.randn(3000, generator=gen, dtype=torch.float64) + 0.3
    w1, w4 = order_statistic_win_rate(pol, ref, 1), order_statistic_win_rate(pol, ref, 4)
    assert 0.55 < w1 < w4 < 1.0
    assert w1 == pytest.approx(win_rate(pol, ref), abs=1e-9)


@pytest.mark.parametrize("mode", ["best", "worst"])
def test_monte_carlo_best_of_n_wins_n_over_n_plus_1(mode):
    """The selection under the calibrated reward (calibrated against M=16 reference samples) of N reference
    samples beats one fresh reference sample with probability N/(N+1) (1/(N+1) for worst-of-N)."""
    gen = torch.Generator().manual_seed(7)
    trials = 1500
    for n in (1, 2, 4, 8):
        wins = []
        for _ in range(trials):
            cand, ref, z = torch.rand(n, generator=gen), torch.rand(16, generator=gen), torch.rand(1, generator=gen)
            i = select_index(calibrate(cand, ref), cand, mode)
            wins.append(win_rate(cand[i:i + 1], z))
        mean = sum(wins) / trials
        p = expected_win_rate(n, mode)
        assert abs(mean - p) < 4 * math.sqrt(p * (1 - p) / trials) + 1e-9, (n, mean, p)


def test_tiny_model_best_of_n_calibrated_win_rate(tiny_llama):
    """On tiny-model samples with a continuous scripted reward, the best-of-4 (worst-of-4) choice's calibrated reward
    against the rollout's reference samples, averaged over rows, estimates 4/5 (1/5)."""
    for mode, target in (("best", 0.8), ("worst", 0.2)):
        values = []
        for call in range(3):
            ids = _prompts(32, seed=10 + call)
            out = _run(tiny_llama, InfAlignDecoding(n=4, num_reference=15, mode=mode, reward=scripted_reward), ids,
                       seed=call)
            values += [_chosen(out, row)[0] for row in range(ids.shape[0])]
        mean = sum(values) / len(values)
        se = torch.tensor(values).std().item() / math.sqrt(len(values))
        assert abs(mean - target) < 4 * se, (mode, mean, se)


# ------------------------------------------------------------------------------------------------- real model
@pytest.mark.real_model
def test_real_model_calibrated_best_of_n_is_raw_best_of_n(smollm):
    """SmolLM2 with the VADER reward: calibrated best-of-4 (e^{C}) chooses exactly what raw best-of-4 chooses (so
    the two have equal win rates: the paper's gain needs the CTRL-trained policy), the choice has the highest VADER
    reward of the pool, and it beats the rollout's reference samples more often than the worst-of-4 choice does."""
    from hf_decoding_ext import encode_prompts
    from hf_decoding_ext.core.resources import read_jsonl

    model, tok = smollm
    prompts = [r["prompt"] for r in read_jsonl("search", "reward_prompts.jsonl")[:3]]
    enc = encode_prompts(tok, prompts)
    kw = dict(attention_mask=enc.attention_mask, do_sample=True, top_k=0, max_new_tokens=20,
              return_dict_in_generate=True)
    outs = {}
    for name, loop_kw in {"calibrated": dict(), "raw": dict(transform="none")}.items():
        loop = InfAlignDecoding(n=4, num_reference=8, tokenizer=tok, seed=0, **loop_kw)
        outs[name] = model.generate(enc.input_ids, custom_generate=loop, **kw)
    cal, raw = outs["calibrated"], outs["raw"]
    assert torch.equal(cal.sequences, raw.sequences)
    best_c, worst_c = [], []
    for row in range(len(prompts)):
        assert cal.selected_index[row] == raw.selected_index[row]
        texts = [tok.decode(c, skip_special_tokens=True) for c in cal.candidates[row]]
        rewards = torch.tensor([vader_reward(t) for t in texts], dtype=torch.float64)
        torch.testing.assert_close(cal.rewards[row], rewards)
        assert float(rewards[cal.selected_index[row]]) == float(rewards.max())
        refs = [tok.decode(z, skip_special_tokens=True) for z in cal.reference_candidates[row]]
        c = calibrate(rewards, [vader_reward(z) for z in refs])
        torch.testing.assert_close(cal.calibrated_rewards[row], c)
        best_c.append(float(c[cal.selected_index[row]]))
        worst_c.append(float(c[select_index(c, rewards, "worst")]))
        assert 0 <= worst_c[-1] <= best_c[-1] <= 1
    assert sum(best_c) > sum(worst_c)
