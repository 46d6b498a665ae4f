"""A*-decoding (Chatziveroglou, arXiv 2505.13672): best-first search over steps with a process reward.

Mechanics on the tiny models with scripted process rewards (expansion order, budgets, goal choice, backtracking,
batch rows), one short real-model check in the default run, and the accuracy-against-tokens comparison with
best-of-N as a ``slow`` test (the committed figures come from ``scripts/eval_a_star.py``).
"""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch

from hf_decoding_ext.search.a_star import AStarDecoding

PROMPT = torch.tensor([[5, 17, 33, 9, 41, 12]])


def _hash_prm(text: str) -> float:
    """A scripted process reward: a fixed pseudo-random value in [0, 1] per text."""
    return (zlib.crc32(text.encode("utf-8")) % 1001) / 1000.0


class _RecordingPRM:
    """Wraps a reward; records every (text, reward)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, text):
        value = self.fn(text)
        self.calls.append((text, value))
        return value


def _run(model, loop, ids=PROMPT, new=12, seed=0, **kw):
    torch.manual_seed(seed)
    return model.generate(ids, custom_generate=loop, max_new_tokens=new, do_sample=True, top_k=0, pad_token_id=0,
                          return_dict_in_generate=True, **kw)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_expansions_in_non_decreasing_f_and_first_goal_popped_is_minimal(tiny_model, char_tokenizer, seed):
    prm = _RecordingPRM(_hash_prm)
    loop = AStarDecoding(char_tokenizer, prm=prm, k=3, max_step_tokens=3, max_generated_tokens=None, seed=seed)
    out = _run(tiny_model, loop, new=9, seed=seed)
    info = out.a_star[0]
    fs = [e["f"] for e in info["expansions"]]
    assert len(fs) >= 3
    assert all(a <= b + 1e-12 for a, b in itertools.pairwise(fs)), fs
    assert info["stop_reason"] == "goal"
    ret = info["returned"]
    assert ret["complete"] and ret["f"] == pytest.approx(min(info["goals"]))
    assert ret["f"] >= fs[-1] - 1e-12  # popped after every expansion
    # f of the returned trace is the summed 1 - r of the prefixes on its path, recomputed from the recorded rewards
    new = out.sequences[0, PROMPT.shape[1]:].tolist()
    rewards = dict(prm.calls)
    steps = [new[i:i + 3] for i in range(0, len(new), 3)]
    prefix, total = [], 0.0
    for step in steps:
        prefix = prefix + step
        total += 1.0 - rewards[char_tokenizer.decode(prefix, skip_special_tokens=True)]
    assert ret["f"] == pytest.approx(total)
    # the counters: every sampled step scored once, tokens are the steps' tokens
    stats = out.search_stats[0]
    assert stats["scorer_calls"] == len(prm.calls) == 3 * len(fs)
    assert stats["rollouts"] == 3 * len(fs)


def test_open_set_returns_to_an_earlier_branch(tiny_llama, char_tokenizer):
    """The root's children score 0.9 and every later prefix 0: after one child is expanded (its children reach
    f = 0.1 + 1), its siblings (f = 0.1) are popped next, not its children: A* backtracks where step-level greedy
    search would commit."""
    k = 3
    calls = []

    def prm(text):
        calls.append(text)
        return 0.9 if len(calls) <= k else 0.0

    loop = AStarDecoding(char_tokenizer, prm=prm, k=k, max_step_tokens=2, max_expansions=k + 2, seed=0,
                         on_exhausted="partial")
    out = _run(tiny_llama, loop, new=40)
    info = out.a_star[0]
    depths = [e["depth"] for e in info["expansions"]]
    assert depths[:k + 1] == [0, 1, 1, 1]
    assert [e["f"] for e in info["expansions"]][1:k + 1] == pytest.approx([0.1] * k)
    assert depths[k + 1] == 2 and info["expansions"][k + 1]["f"] == pytest.approx(1.1)
    assert info["stop_reason"].startswith("max_expansions")


@pytest.mark.parametrize("tokens,calls,new", [(5, None, 40), (11, None, 40), (None, 4, 40), (23, 7, 40), (14, None, 5)])
def test_budget_never_exceeded(tiny_model, char_tokenizer, tokens, calls, new):
    prm = _RecordingPRM(_hash_prm)
    loop = AStarDecoding(char_tokenizer, prm=prm, k=3, max_step_tokens=4, max_generated_tokens=tokens,
                         max_prm_calls=calls, on_exhausted="partial", seed=0)
    out = _run(tiny_model, loop, new=new)
    stats, info = out.search_stats[0], out.a_star[0]
    if tokens is not None:
        assert stats["generated_tokens"] <= tokens
    if calls is not None:
        assert stats["scorer_calls"] <= calls
    assert stats["scorer_calls"] == len(prm.calls)
    assert info["stop_reason"].startswith("budget")
    assert info["finish_tokens"] == 0
    # the returned trace is the best complete one generated, else the lowest-f open trace (possibly incomplete)
    if new == 5:  # complete traces were generated (5 tokens reach max_new_tokens) but none was popped
        assert info["goals"]
    if info["goals"]:
        assert info["returned"]["complete"] and info["returned"]["f"] == pytest.approx(min(info["goals"]))
    else:
        assert not info["returned"]["complete"]


def test_exhausted_budget_completes_the_best_open_trace(tiny_llama, char_tokenizer):
    loop = AStarDecoding(char_tokenizer, prm=_hash_prm, k=2, max_step_tokens=3, max_generated_tokens=6,
                         on_exhausted="complete", seed=0)
    out = _run(tiny_llama, loop, new=30)
    stats, info = out.search_stats[0], out.a_star[0]
    assert info["search_tokens"] <= 6
    assert not info["goals"] and info["returned"]["complete"] and info["finish_tokens"] > 0
    assert info["returned"]["completed_greedily"] and info["returned"]["reward"] is None
    assert stats["generated_tokens"] == info["search_tokens"] + info["finish_tokens"]
    assert out.sequences.shape[1] == PROMPT.shape[1] + 30  # completed to max_new_tokens (no eos drawn)


def test_batch_rows_are_searched_independently(tiny_llama, char_tokenizer):
    ids = torch.tensor([[0, 0, 5, 6, 7], [9, 10, 11, 12, 13]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    loop = AStarDecoding(char_tokenizer, prm=_hash_prm, k=2, max_step_tokens=3, seed=0)
    out = _run(tiny_llama, loop, ids=ids, new=6, attention_mask=mask)
    assert len(out.search_stats) == 2 and len(out.a_star) == 2
    alone = _run(tiny_llama, loop, ids=ids[:1, 2:], new=6)  # row 0 is searched first: same generator draws
    assert out.sequences[0, 5:].tolist() == alone.sequences[0, 3:].tolist()
    assert out.a_star[0]["expansions"] == alone.a_star[0]["expansions"]


def test_default_prm_is_the_arithmetic_verifier(char_tokenizer):
    from hf_decoding_ext.core.arithmetic import ArithmeticStepVerifier

    loop = AStarDecoding(char_tokenizer)
    assert isinstance(loop.prm, ArithmeticStepVerifier) and loop.prm.answer is None


def test_bad_reward_and_arguments_raise(tiny_llama, char_tokenizer):
    with pytest.raises(ValueError, match="1.5"):
        _run(tiny_llama, AStarDecoding(char_tokenizer, prm=lambda t: 1.5, k=2, max_step_tokens=2), new=4)
    with pytest.raises(ValueError, match="do_sample=True"):
        tiny_llama.generate(PROMPT, custom_generate=AStarDecoding(char_tokenizer), max_new_tokens=4,
                            do_sample=False, pad_token_id=0)
    for kwargs, bad in [({"k": 0}, "0"), ({"max_generated_tokens": -3}, "-3"), ({"max_prm_calls": 1.5}, "1.5"),
                        ({"cost_weight": -1.0}, "-1.0"), ({"on_exhausted": "drop"}, "drop"),
                        ({"prm": "vader"}, "vader"), ({"max_step_tokens": 0}, "0"), ({"delimiter": ""}, "''")]:
        with pytest.raises(ValueError, match=bad):
            AStarDecoding(char_tokenizer, **kwargs)
    with pytest.raises(ValueError, match="tokenizer"):
        AStarDecoding(None)


# ---------------------------------------------------------------------------------------------- real model
def _arith_inputs(tokenizer, problems):
    from hf_decoding_ext.core.arithmetic import problem_prompt
    from hf_decoding_ext.core.models import encode_prompts

    return [encode_prompts(tokenizer, problem_prompt(p)) for p in problems]


@pytest.mark.real_model
def test_real_model_search_order_budget_and_goal(smollm):
    """SmolLM2 on one dev problem with the default process reward and a 64-token budget: expansions in
    non-decreasing f, the budget respected, every sampled step scored once, and the returned trace the best complete
    one found (or, with none, the lowest-f open trace)."""
    from hf_decoding_ext.core.arithmetic import ArithmeticStepVerifier, load_problems

    model, tok = smollm
    (inputs,) = _arith_inputs(tok, load_problems("dev")[3:4])
    prm = _RecordingPRM(ArithmeticStepVerifier())
    loop = AStarDecoding(tok, prm=prm, k=2, max_generated_tokens=64, on_exhausted="partial", seed=0)
    torch.manual_seed(0)
    out = model.generate(**inputs, do_sample=True, temperature=0.3, top_k=0, max_new_tokens=32,
                         custom_generate=loop, return_dict_in_generate=True)
    stats, info = out.search_stats[0], out.a_star[0]
    fs = [e["f"] for e in info["expansions"]]
    assert len(fs) >= 2 and all(a <= b + 1e-12 for a, b in itertools.pairwise(fs)), fs
    assert stats["generated_tokens"] <= 64 and stats["scorer_calls"] == len(prm.calls) == 2 * len(fs)
    ret = info["returned"]
    if info["goals"]:
        assert ret["complete"] and ret["f"] == pytest.approx(min(info["goals"]))
    text = tok.decode(out.sequences[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)
    if ret["depth"]:
        assert ret["reward"] == pytest.approx(prm.fn(text))  # the reward stored is the PRM of the returned text


@pytest.mark.slow
@pytest.mark.real_model
def test_real_model_accuracy_against_tokens_vs_best_of_n():
    """The committed comparison (scripts/eval_a_star.py) at a reduced size: runs and reports both methods' counts."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "eval_a_star.py"
    spec = importlib.util.spec_from_file_location("eval_a_star", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.evaluate(num_problems=3, budgets=(128,), best_of=(1, 2), write=False)
    rows = {(r["method"], tuple(r["setting"].values())): r for r in result["summary"]}
    assert rows[("greedy", ())]["mean_prm_calls"] == 0
    assert [rows[("best-of-N", (n,))]["mean_prm_calls"] for n in (1, 2)] == [1, 2]
    a_star = rows[("a-star", (128, 4))]
    assert 0 < a_star["mean_generated_tokens"] and a_star["mean_prm_calls"] >= 4  # one expansion at least
    assert len(result["verdict"]["per_budget"]) == 1 and len(result["verdict"]["process_reward_of_output"]) == 1
