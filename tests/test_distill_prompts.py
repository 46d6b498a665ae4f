"""Tests of the self-distillation prompt set (``data/prompts/distill.jsonl``): size, format, disjointness from the
benchmark prompts and from the benchmark's docstring pool. No model is loaded."""

from __future__ import annotations

import json
from collections import Counter
from importlib.resources import files

import pytest

from hf_decoding_ext.bench.prompts import CATEGORIES, load_distill_prompts, load_prompts

STDLIB_PREFIX = "python-stdlib:"


def _norm(s: str) -> str:
    return " ".join(str(s).split())


def _user_turns(prompt) -> list[str]:
    if isinstance(prompt, str):
        return [_norm(prompt)]
    return [_norm(m["content"]) for m in prompt if m["role"] == "user"]


@pytest.fixture(scope="module")
def distill():
    return load_distill_prompts()


@pytest.fixture(scope="module")
def stdlib_docs():
    with (files("hf_decoding_ext") / "data" / "stdlib_docs.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_size_and_categories(distill):
    assert len(distill) >= 1000
    counts = Counter(p["category"] for p in distill)
    assert set(counts) == set(CATEGORIES)
    assert all(counts[c] >= 150 for c in CATEGORIES), counts


def test_ids_unique(distill):
    ids = [p["id"] for p in distill]
    assert len(set(ids)) == len(ids)
    assert all(p["id"].startswith(f"distill-{p['category']}-") for p in distill)


def test_row_format(distill):
    for p in distill:
        assert {"id", "category", "prompt", "source"} <= set(p) <= {"id", "category", "prompt", "answer", "source"}
        assert isinstance(p["source"], str) and p["source"]
        if p["category"] == "multi_turn_chat":
            msgs = p["prompt"]
            assert isinstance(msgs, list) and len(msgs) >= 3, p["id"]
            assert all(set(m) == {"role", "content"} and m["content"].strip() for m in msgs), p["id"]
            assert all(m["role"] in ("system", "user", "assistant") for m in msgs), p["id"]
            assert msgs[-1]["role"] == "user", p["id"]
        else:
            assert isinstance(p["prompt"], str) and p["prompt"].strip(), p["id"]
        if p["category"] == "math_reasoning":
            assert isinstance(p["answer"], int) and not isinstance(p["answer"], bool), p["id"]
        if p["category"] in ("summarization", "rag_qa"):
            assert p["source"].startswith(STDLIB_PREFIX), p["id"]


def test_no_duplicate_prompts(distill):
    keys = [json.dumps(p["prompt"], sort_keys=True) for p in distill]
    assert len(set(keys)) == len(keys)
    normalised = [" || ".join(_user_turns(p["prompt"])) for p in distill]
    assert len(set(normalised)) == len(normalised)


def test_disjoint_from_benchmark_prompts(distill):
    bench_turns = {t for p in load_prompts() for t in _user_turns(p["prompt"])}
    clashes = [(p["id"], t) for p in distill for t in _user_turns(p["prompt"]) if t in bench_turns]
    assert not clashes, clashes[:5]


def test_no_docstring_shared_with_benchmark(distill, stdlib_docs):
    used = {p["source"].removeprefix(STDLIB_PREFIX) for p in distill if p["source"].startswith(STDLIB_PREFIX)}
    assert len(used) >= 300  # distinct docstrings across summarization and rag_qa
    bench_sources = {p["source"].removeprefix("stdlib_docs.jsonl:") for p in load_prompts()
                     if p["source"].startswith("stdlib_docs.jsonl:")}
    assert bench_sources  # the benchmark does use the docstring pool
    assert not used & bench_sources
    assert not used & {d["source"] for d in stdlib_docs}  # nor any other docstring of the pool
    # nor the same text under another name
    pool_texts = [_norm(d["text"]) for d in stdlib_docs]
    for p in distill:
        if p["category"] in ("summarization", "rag_qa"):
            text = _norm(p["prompt"])
            assert not any(t in text for t in pool_texts), p["id"]


def test_summarization_and_rag_documents_disjoint(distill):
    by_cat = {c: {p["source"] for p in distill if p["category"] == c} for c in ("summarization", "rag_qa")}
    assert not by_cat["summarization"] & by_cat["rag_qa"]


def test_loader_filters():
    rows = load_distill_prompts(categories=["rag_qa", "qa"], limit=3)
    assert [p["category"] for p in rows] == ["qa"] * 3 + ["rag_qa"] * 3  # CATEGORIES order
    assert [p["id"] for p in load_distill_prompts("translation", limit=2)] == ["distill-translation-0001",
                                                                               "distill-translation-0002"]
    with pytest.raises(ValueError):
        load_distill_prompts(categories=["poetry"])
    with pytest.raises(ValueError):
        load_distill_prompts(limit=0)
