"""Prompt-lookup drafter: the lookup rule, and parity with transformers' ``prompt_lookup_num_tokens``."""

from __future__ import annotations

import pytest
import torch

from hf_decoding_ext.bench.speed import ForwardCounter
from hf_decoding_ext.core.models import encode_prompts
from hf_decoding_ext.speculative import SpeculativeDecoding
from hf_decoding_ext.speculative.drafters.prompt_lookup import PromptLookupDrafter


def test_lookup_rule():
    ids = torch.tensor([5, 6, 7, 8, 5, 6, 9, 9, 5, 6])
    assert PromptLookupDrafter(num_tokens=3).lookup(ids).tolist() == [9, 9, 5]  # most recent "5 6"
    assert PromptLookupDrafter(num_tokens=3, match="first").lookup(ids).tolist() == [7, 8, 5]
    # no bigram match: falls back to the last unigram
    assert PromptLookupDrafter(num_tokens=2).lookup(torch.tensor([4, 1, 2, 3, 9, 4])).tolist() == [1, 2]
    assert PromptLookupDrafter(num_tokens=2, min_ngram=2).lookup(torch.tensor([4, 1, 2, 3, 9, 4])).numel() == 0
    assert PromptLookupDrafter().lookup(torch.tensor([1, 2, 3])).numel() == 0
    for bad in ({"num_tokens": 0}, {"min_ngram": 3, "max_ngram": 2}, {"match": "longest"}):
        with pytest.raises(ValueError):
            PromptLookupDrafter(**bad)


def test_drafts_stop_before_eos(tiny_llama):
    drafter = PromptLookupDrafter(num_tokens=5)
    loop = SpeculativeDecoding(drafter)
    ids = torch.tensor([[7, 8, 2, 9, 9, 7, 8]])  # "7 8" was followed by eos (2)
    tiny_llama.generate(ids, max_new_tokens=1, do_sample=False, custom_generate=loop, eos_token_id=2)
    assert loop.last_stats[0].draft_size == 0


@pytest.mark.real_model
def test_parity_with_transformers_prompt_lookup(smollm):
    """match="first" drafts exactly what transformers' prompt lookup drafts: same output, same target forwards."""
    from hf_decoding_ext.bench.prompts import load_prompts

    model, tokenizer = smollm
    for row in load_prompts(categories=["summarization", "rag_qa", "math_reasoning"], per_category=1):
        enc = encode_prompts(tokenizer, row["prompt"])
        greedy = model.generate(**enc, max_new_tokens=64, do_sample=False)
        with ForwardCounter(model) as c_hf:
            hf = model.generate(**enc, max_new_tokens=64, do_sample=False, prompt_lookup_num_tokens=10)
        loop = SpeculativeDecoding(PromptLookupDrafter(num_tokens=10, max_ngram=2, match="first"))
        with ForwardCounter(model) as c_ours:
            ours = model.generate(**enc, max_new_tokens=64, do_sample=False, custom_generate=loop)
        assert torch.equal(hf, greedy) and torch.equal(ours, greedy), row["id"]
        assert c_ours.count == c_hf.count, (row["id"], c_ours.count, c_hf.count)
        assert c_ours.count < greedy.shape[1] - enc["input_ids"].shape[1]
