"""Transfer Q* (TQ*, arXiv:2405.20495): exact mechanics on tiny models with scripted rewards (alpha 0 = greedy, argmax
of logit + alpha * Q-hat with Q-hat recomputed independently, sampling, indirect transfer, a separate baseline model,
exact budget counters) and one real-model property test."""

from __future__ import annotations

import math

import pytest
import torch

from hf_decoding_ext.search.transfer_q_star import TransferQStarDecoding, indirect_q

GREEDY = dict(do_sample=False, pad_token_id=0, eos_token_id=2)


def scripted_reward(ids) -> float:
    """A continuous reward on token ids (no ties between different sequences in practice)."""
    return sum(math.sin(1.3 * t + 0.7 * j) for j, t in enumerate(ids)) / (1 + len(ids)) ** 0.5


def other_reward(ids) -> float:
    return sum(math.cos(0.9 * t) for t in ids) / (1 + len(ids))


def _prompts(rows=1, length=6, seed=0):
    return torch.randint(3, 128, (rows, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def reference_tq(model, prompt, new, k, horizon, alpha, reward, baseline=None, baseline_reward=None, scale=0.5):
    """TQ* recomputed from scratch for one row: full forwards (no cache) for the logits, plain greedy generate() of
    the baseline for each candidate's rollout, the reward of (response so far + candidate + rollout).

    Returns the chosen tokens and the exact counters: rollout tokens, rollout forwards and reward calls."""
    baseline = model if baseline is None else baseline
    seq = prompt.clone()
    chosen, tokens, forwards, calls = [], 0, 0, 0
    for _ in range(new):
        logits = model(seq).logits[0, -1].float()
        top = logits.topk(k)
        qs, longest = [], 1
        for z in top.indices.tolist():
            ext = torch.cat([seq, torch.tensor([[z]])], dim=1)
            cont = [] if (z == 2 or horizon == 0) else baseline.generate(  # explicit mask: token 0 is the pad
                ext, attention_mask=torch.ones_like(ext), max_new_tokens=horizon, **GREEDY)[0, ext.shape[1]:].tolist()
            text = chosen + [z] + cont
            r = reward(text)
            calls += 1
            if baseline_reward is not None:
                r = math.exp(scale * (r - baseline_reward(text))) * r
                calls += 1
            qs.append(r)
            tokens += 1 + len(cont)
            longest = max(longest, 1 + len(cont))
        forwards += 1 + (longest - 1)  # the model's forward + the batched rollout's forwards
        score = top.values.double() + alpha * torch.tensor(qs, dtype=torch.float64)
        z = int(top.indices[int(score.argmax())])
        chosen.append(z)
        seq = torch.cat([seq, torch.tensor([[z]])], dim=1)
        if z == 2:
            break
    return chosen, {"generated_tokens": tokens, "model_calls": forwards, "scorer_calls": calls}


def _run(model, loop, ids, new, **kw):
    return model.generate(ids, custom_generate=loop, max_new_tokens=new, return_dict_in_generate=True,
                          **{**GREEDY, **kw})


# ------------------------------------------------------------------------------------------------- mechanics
def test_alpha_zero_is_greedy_token_for_token(tiny_model):
    ids = _prompts(2, seed=1)
    loop = TransferQStarDecoding(alpha=0.0, num_candidates=3, horizon=3, reward=scripted_reward)
    out = _run(tiny_model, loop, ids, 8)
    greedy = tiny_model.generate(ids, max_new_tokens=8, **GREEDY)
    assert torch.equal(out.sequences, greedy)
    # the rollouts did run: alpha 0 is not a shortcut
    assert out.search_stats["rollouts"] == 2 * 3 * 8 and out.search_stats["scorer_calls"] == 2 * 3 * 8


@pytest.mark.parametrize("alpha,k,horizon", [(2.0, 3, 3), (50.0, 4, 2), (1.0, 2, 0)])
def test_each_step_is_the_argmax_of_the_shifted_score(tiny_model, alpha, k, horizon):
    ids = _prompts(1, seed=2)
    new = 7
    loop = TransferQStarDecoding(alpha=alpha, num_candidates=k, horizon=horizon, reward=scripted_reward)
    out = _run(tiny_model, loop, ids, new)
    chosen, counts = reference_tq(tiny_model, ids, new, k, horizon, alpha, scripted_reward)
    assert out.sequences[0, ids.shape[1]:].tolist() == chosen
    greedy = tiny_model.generate(ids, max_new_tokens=new, **GREEDY)
    if alpha >= 50:
        assert not torch.equal(out.sequences, greedy)  # the reward steers the output
    stats = out.search_stats
    assert stats["generated_tokens"] == counts["generated_tokens"]
    assert stats["model_calls"] == counts["model_calls"]
    assert stats["scorer_calls"] == counts["scorer_calls"]
    assert stats["rollouts"] == k * len(chosen)
    # the recorded per-step values are the rewards of the rollouts, and the scores logit + alpha * Q
    for cand, q, scores in zip(out.tq_candidates, out.tq_q_values, out.tq_scores):
        assert torch.isfinite(q[0]).all() and (cand[0] >= 0).all()
        assert torch.isfinite(scores[0, cand[0]]).all() and torch.isinf(scores[0]).sum() == 128 - k


def test_batch_rows_match_single_rows(tiny_llama):
    ids = _prompts(2, seed=3)
    loop = TransferQStarDecoding(alpha=3.0, num_candidates=3, horizon=2, reward=scripted_reward)
    both = _run(tiny_llama, loop, ids, 6)
    total = 0
    for row in range(2):
        one = _run(tiny_llama, loop, ids[row:row + 1], 6)
        assert torch.equal(both.sequences[row], one.sequences[0])
        total += one.search_stats["generated_tokens"]
    assert both.search_stats["generated_tokens"] == total


def test_finished_rows_stop_rolling_out(tiny_llama):
    # eos = row 0's first greedy token: row 0 ends after one step and leaves the rollout batch, row 1 goes on
    ids = _prompts(2, seed=4)
    greedy = tiny_llama.generate(ids, max_new_tokens=5, **GREEDY)
    eos = int(greedy[0, ids.shape[1]])
    assert eos not in greedy[1, ids.shape[1]:].tolist()
    loop = TransferQStarDecoding(alpha=0.0, num_candidates=3, horizon=2, reward=scripted_reward)
    out = _run(tiny_llama, loop, ids, 5, eos_token_id=eos)
    assert torch.equal(out.sequences, tiny_llama.generate(ids, max_new_tokens=5, **{**GREEDY, "eos_token_id": eos}))
    assert out.sequences[0, ids.shape[1] + 1:].eq(0).all()
    assert out.search_stats["rollouts"] == 3 * (1 + 5)
    for t, cand in enumerate(out.tq_candidates):
        assert (cand[0] == -1).all() == (t > 0) and (cand[1] >= 0).all()
        assert torch.isnan(out.tq_q_values[t][0]).all() == (t > 0)


def test_indirect_transfer_weights_the_target_reward(tiny_llama):
    ids = _prompts(1, seed=5)
    loop = TransferQStarDecoding(alpha=5.0, num_candidates=3, horizon=2, reward=scripted_reward,
                                 baseline_reward=other_reward)
    out = _run(tiny_llama, loop, ids, 5)
    chosen, counts = reference_tq(tiny_llama, ids, 5, 3, 2, 5.0, scripted_reward, baseline_reward=other_reward)
    assert out.sequences[0, ids.shape[1]:].tolist() == chosen
    assert out.search_stats["scorer_calls"] == counts["scorer_calls"] == 2 * 3 * len(chosen)
    r, r_bl = torch.tensor([0.5, -1.0]), torch.tensor([0.1, 0.3])
    assert torch.allclose(indirect_q(r, r_bl), torch.exp(0.5 * (r - r_bl)) * r)


def test_separate_baseline_model_rolls_out(tiny_llama, tiny_gpt2):
    ids = _prompts(1, seed=6)
    loop = TransferQStarDecoding(alpha=4.0, num_candidates=3, horizon=3, reward=scripted_reward,
                                 baseline_model=tiny_gpt2)
    out = _run(tiny_llama, loop, ids, 5)
    chosen, counts = reference_tq(tiny_llama, ids, 5, 3, 3, 4.0, scripted_reward, baseline=tiny_gpt2)
    assert out.sequences[0, ids.shape[1]:].tolist() == chosen
    # one more forward per step: the baseline extends its own prefix cache
    assert out.search_stats["model_calls"] == counts["model_calls"] + len(chosen)
    # the model as an explicit baseline gives what the default (the model itself) gives
    same = TransferQStarDecoding(alpha=4.0, num_candidates=3, horizon=3, reward=scripted_reward,
                                 baseline_model=tiny_llama)
    default = TransferQStarDecoding(alpha=4.0, num_candidates=3, horizon=3, reward=scripted_reward)
    assert torch.equal(_run(tiny_llama, same, ids, 5).sequences, _run(tiny_llama, default, ids, 5).sequences)


def test_sampling_draws_from_the_softmax_of_the_shifted_scores(tiny_llama):
    ids = _prompts(1, seed=7)
    loop = TransferQStarDecoding(alpha=2.0, num_candidates=4, horizon=2, reward=scripted_reward, seed=11)
    out = _run(tiny_llama, loop, ids, 6, do_sample=True, top_k=0)
    gen = torch.Generator().manual_seed(11)
    for t, scores in enumerate(out.tq_scores):
        expect = torch.multinomial(torch.softmax(scores[0:1], dim=-1), 1, generator=gen).item()
        assert out.sequences[0, ids.shape[1] + t].item() == expect
        assert expect in out.tq_candidates[t][0].tolist()
    again = _run(tiny_llama, loop, ids, 6, do_sample=True, top_k=0)
    assert torch.equal(again.sequences, out.sequences)  # seeded
    # with a huge alpha the softmax is one-hot on the best value: the sampled choice is the argmax of Q
    loop = TransferQStarDecoding(alpha=1e4, num_candidates=4, horizon=2, reward=scripted_reward, seed=3)
    out = _run(tiny_llama, loop, ids, 4, do_sample=True, top_k=0)
    for t, (cand, q) in enumerate(zip(out.tq_candidates, out.tq_q_values)):
        assert out.sequences[0, ids.shape[1] + t].item() == cand[0, int(q[0].argmax())].item()


def test_truncated_candidates_are_not_scored(tiny_llama):
    # generate(top_k=2) leaves two finite scores: the spare slots of k=4 re-run the best one and are not scored
    ids = _prompts(1, seed=8)
    loop = TransferQStarDecoding(alpha=1.0, num_candidates=4, horizon=1, reward=scripted_reward, seed=0)
    out = _run(tiny_llama, loop, ids, 3, do_sample=True, top_k=2)
    assert out.search_stats["rollouts"] == 4 * 3 and out.search_stats["scorer_calls"] == 2 * 3
    for cand in out.tq_candidates:
        assert (cand[0, :2] >= 0).all() and (cand[0, 2:] == -1).all()


def test_text_reward_sees_the_response(tiny_llama, char_tokenizer):
    seen = []

    def reward(text):
        seen.append(text)
        return float(len(text))

    ids = torch.tensor([char_tokenizer("hello there")["input_ids"]])
    loop = TransferQStarDecoding(alpha=1.0, num_candidates=2, horizon=2, reward=reward, tokenizer=char_tokenizer)
    _run(tiny_llama, loop, ids, 2)
    assert seen and not any(s.startswith("hello there") for s in seen)
    seen.clear()
    loop = TransferQStarDecoding(alpha=1.0, num_candidates=2, horizon=2, reward=reward, tokenizer=char_tokenizer,
                                 reward_input="full")
    _run(tiny_llama, loop, ids, 2)
    assert seen and all(s.startswith("hello there") for s in seen)


@pytest.mark.parametrize("kwargs,match", [
    (dict(alpha=float("nan")), "alpha"), (dict(alpha=True), "alpha"), (dict(num_candidates=0), "num_candidates"),
    (dict(horizon=-1), "horizon"), (dict(horizon=2.5), "horizon"), (dict(reward="rm"), "reward"),
    (dict(reward="vader"), "tokenizer"), (dict(reward=3), "reward"), (dict(reward_input="prompt"), "reward_input"),
    (dict(reward=scripted_reward, reward_input="full"), "tokenizer"), (dict(indirect_scale=math.inf), "indirect"),
    (dict(seed=1.5), "seed"), (dict(baseline_model="gpt2"), "baseline_model"),
])
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TransferQStarDecoding(**kwargs)


def test_baseline_with_another_vocabulary_is_refused(tiny_llama):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    loop = TransferQStarDecoding(reward=scripted_reward, baseline_model=other)
    with pytest.raises(ValueError, match="vocabulary"):
        _run(tiny_llama, loop, _prompts(), 2)


# ------------------------------------------------------------------------------------------------- real model
@pytest.mark.real_model
def test_real_model_reward_rises_with_alpha_and_base_likelihood_falls(smollm):
    # alpha 0 (= greedy, checked on the tiny models and, token for token, on SmolLM2 by the eval script) against
    # alpha 8: higher VADER reward, lower log-likelihood under the base model
    from hf_decoding_ext import encode_prompts
    from hf_decoding_ext.core.scoring import continuation_token_log_probs, vader_reward

    model, tok = smollm
    enc = encode_prompts(tok, "Describe the weather today.")
    n = enc.input_ids.shape[1]
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
    greedy = model.generate(**enc, **kw)
    loop = TransferQStarDecoding(alpha=8.0, num_candidates=3, horizon=3, tokenizer=tok)
    out = model.generate(**enc, custom_generate=loop, return_dict_in_generate=True, **kw)
    assert out.search_stats["rollouts"] == 3 * 10 and out.search_stats["scorer_calls"] == 3 * 10
    figures = []
    for seq in (greedy[0], out.sequences[0]):
        toks = seq[n:].tolist()
        ll = float(continuation_token_log_probs(model, [enc.input_ids[0].tolist()], [toks])[0].sum())
        figures.append((vader_reward(tok.decode(toks, skip_special_tokens=True)), ll))
    (r0, ll0), (r1, ll1) = figures
    assert r1 > r0 + 0.2 and ll1 < ll0
