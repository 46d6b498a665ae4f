"""Evaluation data for contrastive decoding (shipped JSONL files) and its scoring helpers."""

from __future__ import annotations

import pytest
import torch

from hf_decoding_ext.bench.tasks.contrastive import (
    CHECKS,
    check_instruction,
    conflict_outcome,
    continuation_logprob,
    evaluate_multiple_choice,
    follows_context,
    knowledge_conflict_prompts,
    load_factual_mc,
    load_instructions,
    load_knowledge_conflict,
    mentions,
    model_scorer,
    score_multiple_choice,
)


def test_knowledge_conflict_data():
    items = load_knowledge_conflict()
    assert len(items) >= 50
    assert len({it["id"] for it in items}) == len(items)
    for it in items:
        assert set(it) == {"id", "context", "question", "context_answer", "memory_answer"}
        assert mentions(it["context"], it["context_answer"]) and not mentions(it["context"], it["memory_answer"])
        # the two answers never match each other, so substring scoring is unambiguous
        assert conflict_outcome(it["context_answer"], it) == "context"
        assert conflict_outcome(it["memory_answer"], it) == "memory"
        with_ctx, without = knowledge_conflict_prompts(it)
        assert it["context"] in with_ctx and it["context"] not in without and it["question"] in without


def test_follows_context():
    item = load_knowledge_conflict()[0]  # Eiffel Tower: Rome (context) vs Paris (memory)
    assert follows_context("The Eiffel Tower is in Rome.", item)
    assert not follows_context("Paris", item)
    assert not follows_context("Rome or Paris", item)
    assert conflict_outcome("I don't know.", item) == "neither"
    assert not mentions("Romeo", "Rome")  # whole words only


def test_instruction_data_and_checks():
    items = load_instructions()
    assert 25 <= len(items) <= 40
    for it in items:
        assert it["prompt"] == f"{it['instruction']}\n{it['task']}"
        check_instruction("some response", it["check"])  # every rule is known
    cases = [
        ({"type": "single_word"}, "Cold.", "Very cold"),
        ({"type": "uppercase"}, "HELLO THERE!", "Hello there"),
        ({"type": "lowercase"}, "a quiet place.", "A quiet place."),
        ({"type": "starts_with", "value": "Yes"}, "yes, it is.", "Well, yes."),
        ({"type": "ends_with", "value": "Goodbye."}, "See you soon. Goodbye.", "Goodbye. See you."),
        ({"type": "list_items", "count": 3}, "Here:\n- a\n- b\n- c", "- a\n- b"),
        ({"type": "list_items", "count": 2}, "1. a\n2) b", "1. a\n2. b\n3. c"),
        ({"type": "max_words", "value": 3}, "Blue light scatters.", "Because blue light scatters more."),
        ({"type": "number_only"}, " 12.", "twelve"),
        ({"type": "one_of", "values": ["positive", "negative"]}, "Positive.", "It is positive."),
        ({"type": "contains", "value": "ocean"}, "The Ocean was calm.", "Oceanic views."),
        ({"type": "not_contains", "value": ","}, "No commas here.", "One, two."),
        ({"type": "json_object", "keys": ["name", "age"]}, '```json\n{"name": "Ann", "age": 30}\n```',
         '{"name": "Ann"}'),
        ({"type": "all", "checks": [{"type": "single_word"}, {"type": "uppercase"}]}, "JUPITER", "Jupiter"),
    ]
    for check, good, bad in cases:
        assert check_instruction(good, check), (check, good)
        assert not check_instruction(bad, check), (check, bad)
    assert {c[0]["type"] for c in cases} >= set(CHECKS) - {"min_words"}
    with pytest.raises(ValueError, match="unknown check"):
        check_instruction("x", {"type": "rhymes"})


def test_factual_mc_data():
    items = load_factual_mc()
    assert len(items) >= 50
    for it in items:
        assert len(it["choices"]) == 4 and len(set(it["choices"])) == 4
        assert 0 <= it["answer"] < 4
    counts = [sum(it["answer"] == k for it in items) for k in range(4)]
    assert min(counts) >= 10  # correct answers spread over the positions


class _CharTokenizer:
    """Minimal tokenizer: one id per character (mod 120) + 4, no chat template."""

    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        ids = [4 + (ord(c) % 120) for c in text]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def test_multiple_choice_scoring():
    tok = _CharTokenizer()
    item = {"id": "x", "question": "Pick", "choices": ["aa", "bbbb", "c"], "answer": 1}
    target = tok(" b", add_special_tokens=False)["input_ids"][1]

    def favour_b(input_ids):  # log-probs favouring the token of 'b' everywhere
        logits = torch.zeros(input_ids.shape[1], 128)
        logits[:, target] = 5.0
        return torch.log_softmax(logits, -1)

    res = score_multiple_choice(item, tok, favour_b, length_normalize=True)
    assert res["prediction"] == 1 and res["correct"]
    res_sum = score_multiple_choice(item, tok, favour_b, length_normalize=False)
    assert res_sum["scores"][1] == pytest.approx(res["scores"][1] * 5)
    total, n = continuation_logprob(favour_b, [1, 2], [target, target])
    assert n == 2 and total == pytest.approx(2 * float(favour_b(torch.zeros(1, 4, dtype=torch.long))[0, target]))


def test_multiple_choice_sums_by_default():
    """TruthfulQA-MC protocol: a choice scores the SUM of its tokens' log-probabilities (not the mean)."""
    tok = _CharTokenizer()
    b = tok(" b", add_special_tokens=False)["input_ids"][1]

    def favour_b(input_ids):
        logits = torch.zeros(input_ids.shape[1], 128)
        logits[:, b] = 5.0
        return torch.log_softmax(logits, -1)

    # " x" (2 unlikely tokens) vs " xbbbb" (the same 2 then 4 likely ones): the sum prefers the first, the mean the
    # second
    item = {"id": "y", "question": "Pick", "choices": ["x", "xbbbb"], "answer": 0}
    prompt = tok("Question: Pick\nAnswer:")["input_ids"]
    want = [continuation_logprob(favour_b, prompt, tok(" " + c, add_special_tokens=False)["input_ids"])[0]
            for c in item["choices"]]
    res = score_multiple_choice(item, tok, favour_b)
    assert res["scores"] == pytest.approx(want) and res["prediction"] == 0
    assert evaluate_multiple_choice([item], tok, favour_b)["accuracy"] == 1.0
    assert evaluate_multiple_choice([item], tok, favour_b, length_normalize=True)["accuracy"] == 0.0


def test_eval_factual_mc_sums_every_scorer(tiny_gpt2):
    """The harness reads the plain model and DoLa the same way (summed), as DoLa's reference tfqa_mc_eval.py."""
    from hf_decoding_ext.bench.contrastive import eval_factual_mc
    from hf_decoding_ext.contrastive.dola import dola_scorer

    tok = _CharTokenizer()
    items = load_factual_mc()[:4]
    res = eval_factual_mc(tiny_gpt2, tok, items=items)
    assert res["protocol"] == "sum"
    for name, fn in (("plain", model_scorer(tiny_gpt2)), ("dola_high", dola_scorer(tiny_gpt2, "high"))):
        want = evaluate_multiple_choice(items, tok, fn, length_normalize=False)
        assert res["predictions"][name] == [r["prediction"] for r in want["results"]], name
    mean = eval_factual_mc(tiny_gpt2, tok, items=items, length_normalize=True)
    assert mean["protocol"] == "mean"
    assert mean["predictions"]["plain"] != res["predictions"]["plain"]  # the two readings differ on these items
    assert mean["predictions"]["plain"] == [r["prediction"] for r in evaluate_multiple_choice(
        items, tok, model_scorer(tiny_gpt2), length_normalize=True)["results"]]


def test_multiple_choice_with_tiny_model(tiny_gpt2):
    tok = _CharTokenizer()
    items = load_factual_mc()[:3]
    out = evaluate_multiple_choice(items, tok, model_scorer(tiny_gpt2))
    assert out["n"] == 3 and 0.0 <= out["accuracy"] <= 1.0
    assert all(len(r["scores"]) == 4 for r in out["results"])
