"""Fast Chain-of-Thought (arXiv 2311.08263) as a ``custom_generate`` loop.

- without a budget, or with the glance disabled, the output equals greedy decoding (Jacobi iteration);
- with a budget: greedy tokens for ``budget`` forwards, then exactly the Jacobi window (the glance) and the answer
  prompt, then decoding resumes; arguments validated, sampling refused;
- the real default model on the repository's arithmetic set: the answer is reached in fewer target forwards than
  greedy chain-of-thought, at a measured accuracy change (bounded here by 0.25 absolute).
"""

from __future__ import annotations

import re

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from hf_decoding_ext.speculative.fast_cot import FastCoTDecoding


def test_without_glance_it_is_greedy(tiny_model):
    ids = torch.tensor([[1, 5, 9, 3]])
    ref = tiny_model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0)
    for loop in (FastCoTDecoding(), FastCoTDecoding(budget=3, glance=False, answer_prompt=[7, 7])):
        out = tiny_model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0, custom_generate=loop)
        assert torch.equal(out, ref)
        assert loop.glance_tokens == []


def test_glance_then_answer_prompt(tiny_model):
    ids = torch.tensor([[1, 5, 9, 3]])
    ref = tiny_model.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=0)
    loop = FastCoTDecoding(budget=4, window=5, answer_prompt=[7, 8])
    out = tiny_model.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=0, custom_generate=loop)
    reasoning = sum(s.appended for s in loop.last_stats[:4])
    assert loop.reasoning_forwards == 4 and 4 <= reasoning
    start = ids.shape[1]
    assert torch.equal(out[0, : start + reasoning], ref[0, : start + reasoning])  # exact tokens first
    g = loop.glance_tokens
    assert 1 <= len(g) <= 5
    assert out[0, start + reasoning: start + reasoning + len(g) + 2].tolist() == g + [7, 8]
    assert out.shape[1] == start + 40  # decoding resumed up to max_new_tokens
    with pytest.raises(ValueError, match="greedy"):
        tiny_model.generate(ids, max_new_tokens=8, do_sample=True, pad_token_id=0, custom_generate=loop)
    for bad in ({"budget": 0}, {"window": 0}, {"glance": "yes"}, {"budget": 3}):  # text prompt without tokenizer
        with pytest.raises(ValueError):
            FastCoTDecoding(**bad)


class _StopAfterTheAnswer(StoppingCriteria):
    """A stopping criterion for a Fast CoT run: once the glance and the answer prompt are inserted, stop after
    ``n`` answer tokens (the test reads only those; decoding on to ``max_new_tokens`` changes none of them, nor
    the forwards counted up to them)."""

    def __init__(self, loop, answer_len: int, n: int = 8):
        self.loop, self.answer_len, self.n, self.start = loop, answer_len, n, None

    def __call__(self, input_ids, scores, **kwargs):
        if self.loop.glance_tokens and self.start is None:
            self.start = input_ids.shape[1] - 1  # called right after the first inserted glance token
        done = (self.start is not None
                and input_ids.shape[1] >= self.start + len(self.loop.glance_tokens) + self.answer_len + self.n)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def _last_number(text: str):
    nums = re.findall(r"-?\d+", text.replace(",", ""))
    return int(nums[-1]) if nums else None


@pytest.mark.real_model
@pytest.mark.parametrize("n_problems", [6, pytest.param(12, marks=pytest.mark.slow)])
def test_fewer_forwards_to_the_answer_at_a_measured_accuracy_change_real_model(smollm, n_problems):
    """6 arithmetic problems (12 in the slow run, the registry's figures), "Let's think step by step.": greedy chain-of-thought (one forward per token) up to 96
    tokens then the answer prompt and 8 answer tokens, against Fast CoT with a budget of 24 forwards and an 8-token
    window. The answer (the number in the first line after the answer prompt) costs Fast CoT fewer target
    forwards; accuracy is reported and may drop by at most 0.25 absolute."""
    from hf_decoding_ext.core.models import encode_prompts
    from hf_decoding_ext.core.resources import read_jsonl
    from hf_decoding_ext.speculative.fast_cot import DEFAULT_ANSWER_PROMPT

    model, tokenizer = smollm
    rows = read_jsonl("fast_cot", "arithmetic.jsonl")[:n_problems]
    answer_ids = tokenizer.encode(DEFAULT_ANSWER_PROMPT, add_special_tokens=False)

    def answer_after(ids):  # the answer prompt, then 8 greedy tokens: the first number is the answer
        ids = torch.cat([ids, torch.tensor([answer_ids])], dim=1)
        ans = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        return _last_number(tokenizer.decode(ans[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0])

    figures = {"greedy": [0, 0], "fast-cot": [0, 0]}
    for row in rows:
        enc = encode_prompts(tokenizer, row["question"] + " Let's think step by step.")
        n = enc["input_ids"].shape[1]
        out = model.generate(**enc, max_new_tokens=96, do_sample=False)  # one forward per token
        figures["greedy"][0] += int(answer_after(out) == row["answer"])
        figures["greedy"][1] += out.shape[1] - n + 8
        loop = FastCoTDecoding(budget=24, window=8, answer_prompt=answer_ids)
        stop = StoppingCriteriaList([_StopAfterTheAnswer(loop, len(answer_ids))])  # nothing later is read
        out = model.generate(**enc, max_new_tokens=96 + 8 + 8 + len(answer_ids), do_sample=False,
                             custom_generate=loop, stopping_criteria=stop)
        if loop.glance_tokens:  # the budget ran out: the answer follows the inserted prompt
            k = n + sum(s.appended for s in loop.last_stats[:loop.reasoning_forwards]) + len(loop.glance_tokens)
            k += len(answer_ids)
            pred = _last_number(tokenizer.decode(out[0, k:k + 8], skip_special_tokens=True).split("\n")[0])
            forwards, produced = loop.reasoning_forwards, 0
            for s in loop.last_stats[loop.reasoning_forwards:]:
                forwards, produced = forwards + 1, produced + s.appended
                if produced >= 8:
                    break
        else:  # finished within the budget: answered like the greedy run
            pred, forwards = answer_after(out), len(loop.last_stats) + 8
        figures["fast-cot"][0] += int(pred == row["answer"])
        figures["fast-cot"][1] += forwards
    acc = {k: v[0] / len(rows) for k, v in figures.items()}
    fwd = {k: v[1] / len(rows) for k, v in figures.items()}
    print(f"accuracy {acc}, target forwards to the answer {fwd}")
    assert fwd["fast-cot"] < fwd["greedy"], fwd
    assert acc["fast-cot"] >= acc["greedy"] - 0.25, acc
