"""Issue 3's lossless property on the real model: every registered speculative drafter, greedy acceptance, over 20
benchmark prompts x 32 new tokens, is token-identical to plain greedy ``generate()`` (fp32, CPU).

The drafters run exactly as the registry/CLI builds them (``generate_kwargs``), one instance reused across the
prompts (so Token Recycling's adjacency matrix and Lookahead's pool persist, as in the benchmark). Parity with
transformers' prompt lookup and assisted generation is tested in ``test_prompt_lookup.py`` and
``test_draft_model.py``.
"""

from __future__ import annotations

import pytest

from hf_decoding_ext.plug import generate_kwargs
from hf_decoding_ext.bench.parity import greedy_parity, greedy_references
from hf_decoding_ext.bench.prompts import interleaved_prompts
from hf_decoding_ext.registry import METHODS

N_PROMPTS = 20
MAX_NEW_TOKENS = 32
DRAFTERS = [m for m in METHODS if m.family == "speculative" and m.kind == "candidate_generator"]
# the class each registered drafter must build (a new drafter must be added here, and so to this test)
EXPECTED_CLASS = {"prompt-lookup": "PromptLookupDrafter", "token-recycling": "TokenRecyclingDrafter",
                  "lookahead": "LookaheadDrafter", "jacobi": "JacobiDrafter", "draft-model": "DraftModelDrafter"}


def _prompts():
    return interleaved_prompts(N_PROMPTS)  # 6 categories x 4, interleaved by category, first 20


@pytest.fixture(scope="module")
def greedy_refs(smollm):
    model, tokenizer = smollm
    return greedy_references(model, tokenizer, _prompts(), MAX_NEW_TOKENS)


def test_prompt_selection_spans_every_category():
    rows = _prompts()
    assert len(rows) == N_PROMPTS and len({r["id"] for r in rows}) == N_PROMPTS
    assert len({r["category"] for r in rows}) == 6


@pytest.mark.real_model
@pytest.mark.parametrize("spec", DRAFTERS, ids=lambda m: m.name)
def test_greedy_token_identical_over_benchmark_prompts(spec, smollm, greedy_refs):
    model, tokenizer = smollm
    kwargs = generate_kwargs(spec, model=model, tokenizer=tokenizer)
    loop = kwargs["custom_generate"]
    assert type(loop.drafter).__name__ == EXPECTED_CLASS[spec.name]
    assert kwargs["do_sample"] is False
    r = greedy_parity(model, kwargs, greedy_refs, MAX_NEW_TOKENS)
    mismatches, tokens, forwards, accepted = r.mismatches, r.tokens, r.forwards, r.accepted
    assert not mismatches, f"{spec.name}: output differs from greedy generate() on {mismatches}"
    assert tokens == sum(r.shape[1] - e["input_ids"].shape[1] for _, e, r in greedy_refs)
    # the drafts are used: some draft tokens are accepted, so fewer target forwards than tokens
    assert accepted > 0 and tokens / forwards > 1.0, (spec.name, tokens, forwards)
