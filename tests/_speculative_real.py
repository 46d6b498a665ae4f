"""Shared helpers of the real-model tests of the training-free drafters (greedy references computed once)."""

from __future__ import annotations

import torch

from hf_decoding_ext.bench.prompts import load_prompts
from hf_decoding_ext.models import encode_prompts

CATEGORIES = ["summarization", "rag_qa", "qa", "translation"]
MAX_NEW_TOKENS = 64
_REFS: dict = {}


def benchmark_inputs(tokenizer):
    """Four benchmark prompts (one per category), encoded."""
    prompts = load_prompts(categories=CATEGORIES, per_category=1)
    return [(p["id"], encode_prompts(tokenizer, p["prompt"])) for p in prompts]


def greedy_reference(model, tokenizer):
    """``{prompt_id: (inputs, greedy output)}`` with 64 new tokens, cached per model."""
    key = id(model)
    if key not in _REFS:
        refs = {}
        for pid, enc in benchmark_inputs(tokenizer):
            with torch.no_grad():
                refs[pid] = (enc, model.generate(**enc, max_new_tokens=MAX_NEW_TOKENS, do_sample=False))
        _REFS[key] = refs
    return _REFS[key]


def run_speculative(model, tokenizer, make_loop):
    """Token-identity to greedy and tokens per target forward for each benchmark prompt."""
    results = {}
    for pid, (enc, ref) in greedy_reference(model, tokenizer).items():
        loop = make_loop()
        out = model.generate(**enc, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, custom_generate=loop)
        results[pid] = (torch.equal(out, ref), loop.summary()["tokens_per_forward"])
    return results
