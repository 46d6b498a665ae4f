"""core.step_search: step segmenters, nodes sharing prefix caches, budgets and counters (tiny models)."""

from __future__ import annotations

import pytest
import torch

from hf_decoding_ext.core.loop import DecodingLoop
from hf_decoding_ext.core.rollout import rollout
from hf_decoding_ext.core.step_search import (
    DelimiterSegmenter,
    EntropySegmenter,
    FixedLengthSegmenter,
    SearchBudget,
    SearchStats,
    StepSearch,
    append_trace,
    delimiter_token_ids,
)

GREEDY = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
PROMPT = torch.tensor([[0, 0, 5, 6, 7], [9, 10, 11, 12, 13]])
MASK = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])


class _Probe(DecodingLoop):
    def __init__(self, fn):
        self.fn, self.result = fn, None

    def run(self, state):
        self.result = self.fn(state)


def _run(model, fn, max_new_tokens=20, ids=PROMPT, mask=MASK, **kw):
    loop = _Probe(fn)
    args = dict(max_new_tokens=max_new_tokens, pad_token_id=0, eos_token_id=None, **GREEDY)
    args.update(kw)
    out = model.generate(ids, attention_mask=mask, custom_generate=loop, **args)
    return loop.result, out


@torch.no_grad()
def _logits_of(model, prompt, mask, tokens):
    ids = torch.cat([prompt[mask.bool()], torch.tensor(tokens, dtype=torch.long)])[None]
    return model(ids).logits[0, -1].float()


def test_children_caches_equal_recomputation(tiny_model, char_tokenizer):
    seg = DelimiterSegmenter("e", max_tokens=5)

    def fn(state):
        search = StepSearch(state, 1, seg, tokenizer=char_tokenizer)
        gen = torch.Generator().manual_seed(0)
        kids = search.expand(search.root, 3, generator=gen)
        grand = search.expand(kids[0], 2, generator=gen)
        return search, kids, grand

    (search, kids, grand), _ = _run(tiny_model, fn)
    stop_ids = delimiter_token_ids(char_tokenizer, "e")
    for node in kids + grand:
        assert node.end in ("stop", "cap")
        assert (node.step[-1] in stop_ids) == (node.end == "stop")
        assert len(node.step) <= 5 and not any(t in stop_ids for t in node.step[:-1])
        assert node.tokens == node.parent.tokens + node.step
    for node in grand:
        logits = search.materialize(node)
        torch.testing.assert_close(logits[0], _logits_of(tiny_model, PROMPT[1], MASK[1], node.tokens),
                                   atol=1e-4, rtol=1e-4)
    assert search.stats.generated_tokens == sum(len(n.step) for n in kids + grand)
    assert search.stats.rollouts == 5 and search.stats.model_calls > 0


def test_padded_row_and_greedy_completion_match_generate(tiny_model, char_tokenizer):
    def fn(state):
        search = StepSearch(state, 0, FixedLengthSegmenter(4), tokenizer=char_tokenizer)
        (child,) = search.expand(search.root, 1, do_sample=False)
        r = search.complete(child, 1)
        return child.tokens + r.token_lists()[0], r.ends[0]

    (tokens, end), _ = _run(tiny_model, fn, max_new_tokens=12)
    ref = tiny_model.generate(PROMPT[:1], attention_mask=MASK[:1], max_new_tokens=12, pad_token_id=0,
                              eos_token_id=None, **GREEDY)[0, PROMPT.shape[1]:]
    assert tokens == ref.tolist() and end == "criteria"


def test_end_before_hook_ends_steps_before_the_firing_token(tiny_model):
    def fires(logits, length):  # a scripted rule on the next-token distribution
        return (logits.argmax(-1) % 3 == 0) & (length >= 2)

    def fn(state):
        return rollout(state, 4, do_sample=True, generator=torch.Generator().manual_seed(1), return_steps=True,
                       use_stopping_criteria=True, max_tokens=8, end_before=fires)

    r, _ = _run(tiny_model, fn, max_new_tokens=30)
    assert set(r.ends) <= {"stop", "cap"}
    for i, toks in enumerate(r.token_lists()):
        assert 1 <= len(toks) <= 8
        for j in range(2, len(toks)):  # the rule did not fire before any earlier token
            assert int(r.step_logits[i][j].argmax()) % 3 != 0
        row = int(r.rows[i])
        after = _logits_of(tiny_model, PROMPT[row], MASK[row], toks)
        if len(toks) < 8:  # ended by the rule (the cap takes precedence at 8)
            assert r.ends[i] == "stop" and len(toks) >= 2 and int(after.argmax()) % 3 == 0
        else:
            assert r.ends[i] == "cap"
    assert "stop" in r.ends


def test_entropy_segmenter_rule():
    seg = EntropySegmenter(threshold=1.0, min_tokens=3, max_tokens=6)
    flat, peaked = torch.zeros(1, 16), torch.tensor([[20.0] + [0.0] * 15])  # entropies log(16) and ~0
    logits = torch.cat([flat, peaked])
    assert seg.fires(logits, 2).tolist() == [False, False]
    assert seg.fires(logits, 3).tolist() == [True, False]
    kwargs = seg.rollout_kwargs(None)
    assert kwargs["max_tokens"] == 6 and kwargs["end_before"](logits, 5).tolist() == [True, False]


def test_budget_and_stats():
    with pytest.raises(ValueError, match="max_rollouts"):
        SearchBudget(max_rollouts=0)
    budget = SearchBudget(max_generated_tokens=10, max_scorer_calls=3)
    stats = SearchStats(generated_tokens=9, scorer_calls=1)
    assert not budget.exhausted(stats)
    stats.generated_tokens += 1
    assert budget.exhausted(stats) and budget.remaining(stats)["scorer_calls"] == 2
    total = SearchStats(rollouts=2).add(SearchStats(rollouts=3, cache_hits=1))
    assert total.as_dict()["rollouts"] == 5 and total.as_dict()["cache_hits"] == 1


def test_segmenter_arguments_and_split():
    with pytest.raises(ValueError, match="''"):
        DelimiterSegmenter("")
    with pytest.raises(ValueError, match="-1"):
        EntropySegmenter(-1.0)
    with pytest.raises(ValueError, match="min_tokens"):
        EntropySegmenter(1.0, min_tokens=9, max_tokens=4)
    assert DelimiterSegmenter("\n\n").split("a\n\nb") == ["a\n\n", "b"]


def test_append_trace_pads_rows(tiny_model):
    def fn(state):
        return append_trace(state, [[5, 6, 7], [8]])

    n, out = _run(tiny_model, fn, max_new_tokens=5)
    assert n == 3 and out[:, PROMPT.shape[1]:].tolist() == [[5, 6, 7], [8, 0, 0]]
