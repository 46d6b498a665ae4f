"""Loaders and scoring helpers for the contrastive-decoding evaluation data (``hf_decoding_ext/data/contrastive``).

* ``knowledge_conflict.jsonl``: counterfactual contexts; :func:`follows_context` / :func:`conflict_outcome` tell
  whether a generated answer follows the context or the model's memory;
* ``instructions.jsonl``: instructions with a checkable property; :func:`check_instruction` verifies a response;
* ``factual_mc.jsonl``: multiple-choice questions; :func:`score_multiple_choice` picks the choice with the highest
  summed log-likelihood (TruthfulQA-MC protocol; length-normalised as an option) under a scoring function (the plain
  model, or a contrastive scorer).

Example:
    >>> from hf_decoding_ext.bench.tasks.contrastive import load_knowledge_conflict, follows_context
    >>> item = load_knowledge_conflict()[0]
    >>> follows_context("It is in Rome.", item), follows_context("Paris, of course.", item)
    (True, False)
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from hf_decoding_ext.core.resources import read_jsonl
from hf_decoding_ext.core.scoring import LogProbFn, model_log_prob_fn, sequence_token_log_probs

DATA_FILES = ("knowledge_conflict.jsonl", "instructions.jsonl", "factual_mc.jsonl")


# ------------------------------------------------------------------------------------------------------ loading
def load_jsonl(name: str) -> list[dict[str, Any]]:
    """Read one of :data:`DATA_FILES` from the installed package."""
    if name not in DATA_FILES:
        raise ValueError(f"unknown data file {name!r}; available: {', '.join(DATA_FILES)}")
    return read_jsonl("contrastive", name)


def load_knowledge_conflict() -> list[dict[str, Any]]:
    """Items ``{"id", "context", "question", "context_answer", "memory_answer"}``."""
    return load_jsonl("knowledge_conflict.jsonl")


def load_instructions() -> list[dict[str, Any]]:
    """Items ``{"id", "instruction", "task", "prompt", "check"}``."""
    return load_jsonl("instructions.jsonl")


def load_factual_mc() -> list[dict[str, Any]]:
    """Items ``{"id", "question", "choices", "answer"}`` (``answer`` is the index of the correct choice)."""
    return load_jsonl("factual_mc.jsonl")


# ------------------------------------------------------------------------------------------------------ text matching
def normalize_text(text: str) -> str:
    """Lower-case, strip accents, replace punctuation by spaces and collapse whitespace."""
    text = unicodedata.normalize("NFKD", str(text))
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text).split())


def mentions(text: str, phrase: str) -> bool:
    """Whether ``phrase`` occurs in ``text`` as whole words (after :func:`normalize_text`)."""
    needle = normalize_text(phrase)
    return bool(needle) and f" {needle} " in f" {normalize_text(text)} "


# ---------------------------------------------------------------------------------------------- knowledge conflict
KC_INSTRUCTION = "Answer with one word or a short phrase."


def knowledge_conflict_prompts(item: dict, instruction: str = KC_INSTRUCTION) -> tuple[str, str]:
    """``(prompt with the context, prompt without it)`` for an item: the main and the second view of context-aware
    decoding."""
    question = f"Question: {item['question']}\n{instruction}".strip()
    return f"Context: {item['context']}\n{question}", question


def conflict_outcome(answer_text: str, item: dict) -> str:
    """``"context"``, ``"memory"``, ``"both"`` or ``"neither"``: which answer(s) the text mentions (whole words)."""
    ctx, mem = mentions(answer_text, item["context_answer"]), mentions(answer_text, item["memory_answer"])
    return "both" if ctx and mem else "context" if ctx else "memory" if mem else "neither"


def follows_context(answer_text: str, item: dict) -> bool:
    """True when the answer gives the context's answer and not the real-world (memory) one."""
    return conflict_outcome(answer_text, item) == "context"


# ------------------------------------------------------------------------------------------------------ instructions
def _words(text: str) -> list[str]:
    return re.findall(r"[^\W_]+(?:['’-][^\W_]+)*", text)


def _list_items(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if re.match(r"^\s*(?:[-*•]|\d+[.)])\s+\S", ln)]


def _json_object(text: str):
    text = text.strip()
    fence = re.match(r"^```(?:json)?\s*(.*?)\s*```$", text, flags=re.S)
    if fence:
        text = fence.group(1)
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _strip_end(text: str) -> str:
    return text.strip().rstrip(".!?").strip().strip("\"'").strip()


CHECKS: dict[str, Callable[[str, dict], bool]] = {
    "single_word": lambda r, c: len(_words(r)) == 1,
    "uppercase": lambda r, c: any(ch.isalpha() for ch in r) and r == r.upper(),
    "lowercase": lambda r, c: any(ch.isalpha() for ch in r) and r == r.lower(),
    "starts_with": lambda r, c: r.strip().lower().startswith(str(c["value"]).lower()),
    "ends_with": lambda r, c: r.strip().lower().endswith(str(c["value"]).lower()),
    "list_items": lambda r, c: len(_list_items(r)) == int(c["count"]),
    "max_words": lambda r, c: 0 < len(_words(r)) <= int(c["value"]),
    "min_words": lambda r, c: len(_words(r)) >= int(c["value"]),
    "number_only": lambda r, c: re.fullmatch(r"-?\d+(?:[.,]\d+)?", _strip_end(r)) is not None,
    "one_of": lambda r, c: _strip_end(r).lower() in {str(v).lower() for v in c["values"]},
    "contains": lambda r, c: mentions(r, str(c["value"])),
    "not_contains": lambda r, c: str(c["value"]) not in r,
    "json_object": lambda r, c: (o := _json_object(r)) is not None and sorted(o) == sorted(c["keys"]),
}


def check_instruction(response: str, check: dict) -> bool:
    """Whether ``response`` satisfies the rule ``check`` (an item's ``"check"`` field).

    Rules (``{"type": ..., ...}``): ``single_word``, ``uppercase``, ``lowercase``, ``starts_with`` (``value``),
    ``ends_with`` (``value``), ``list_items`` (``count`` lines starting with ``-``, ``*``, ``•`` or ``1.``),
    ``max_words`` / ``min_words`` (``value``), ``number_only``, ``one_of`` (``values``, case-insensitive, trailing
    punctuation ignored), ``contains`` (``value`` as whole words, case-insensitive), ``not_contains`` (``value``,
    literal), ``json_object`` (exactly the ``keys``; a ```json fence is allowed) and ``all`` (every rule in
    ``checks``). Surrounding whitespace is ignored.

    Example:
        >>> check_instruction("- Mars\\n- Venus\\n- Earth", {"type": "list_items", "count": 3})
        True
    """
    if not isinstance(check, dict) or "type" not in check:
        raise ValueError(f"a check is a dict with a 'type', got {check!r}")
    kind = check["type"]
    if kind == "all":
        return all(check_instruction(response, c) for c in check["checks"])
    if kind not in CHECKS:
        raise ValueError(f"unknown check type {kind!r}; known: {', '.join(sorted(CHECKS))}, all")
    return bool(CHECKS[kind](response.strip(), check))


# ------------------------------------------------------------------------------------------------------ multiple choice
ScoreFn = LogProbFn
"""``score_fn(input_ids (1, T)) -> (T, vocab)`` next-token log-probabilities at every position: a
:data:`~hf_decoding_ext.core.scoring.LogProbFn`. A scoring function with the attribute ``supports_first = True`` is
called as ``score_fn(input_ids, first=k)`` and returns only the rows of positions ``k..T-1`` (``(T - k, vocab)``),
which saves work when only a continuation is scored."""

model_scorer = model_log_prob_fn
"""``model_scorer(model)``: the plain model as a scoring function (log-softmax of its logits, one forward, no cache);
:func:`hf_decoding_ext.core.scoring.model_log_prob_fn`."""


def continuation_logprob(score_fn: ScoreFn, prompt_ids: Sequence[int], continuation_ids: Sequence[int]):
    """``(sum of log p(continuation tokens | prompt, previous tokens), number of tokens)`` under ``score_fn``
    (:func:`hf_decoding_ext.core.scoring.sequence_token_log_probs`)."""
    if len(prompt_ids) == 0 or len(continuation_ids) == 0:
        raise ValueError("prompt and continuation must both be non-empty")
    picked = sequence_token_log_probs(score_fn, prompt_ids, continuation_ids)
    return float(picked.sum()), int(picked.numel())


def mc_prompt(item: dict) -> str:
    """The question as a prompt (the choices are scored as its continuation)."""
    return f"Question: {item['question']}\nAnswer:"


def score_multiple_choice(item: dict, tokenizer, score_fn: ScoreFn, chat: bool | None = None,
                          length_normalize: bool = False) -> dict[str, Any]:
    """Score each choice as a continuation of :func:`mc_prompt` and return ``{"prediction", "scores", "correct"}``.

    With the chat template (instruct tokenizers, ``chat=None``) the prompt is a user turn and the choice the start of
    the assistant's reply; otherwise the choice follows the prompt after a space. Each choice scores the sum of its
    tokens' values under ``score_fn``, as in TruthfulQA-MC (Lin et al., 2022) and DoLa's reference
    ``tfqa_mc_eval.py``; ``length_normalize=True`` divides it by the number of tokens instead (mean per token).
    """
    use_chat = (getattr(tokenizer, "chat_template", None) is not None) if chat is None else chat
    prompt = mc_prompt(item)
    if use_chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        prefix = ""
    else:
        prompt_ids = tokenizer(prompt)["input_ids"]
        prefix = " "
    scores = []
    for choice in item["choices"]:
        cont = tokenizer(prefix + str(choice), add_special_tokens=False)["input_ids"]
        total, n = continuation_logprob(score_fn, prompt_ids, cont)
        scores.append(total / n if length_normalize else total)
    pred = max(range(len(scores)), key=scores.__getitem__)
    return {"prediction": pred, "scores": scores, "correct": pred == int(item["answer"])}


def evaluate_multiple_choice(items: Iterable[dict], tokenizer, score_fn: ScoreFn, chat: bool | None = None,
                             length_normalize: bool = False) -> dict[str, Any]:
    """Accuracy of :func:`score_multiple_choice` over ``items`` (``{"accuracy", "n", "results"}``)."""
    results = [dict(id=it.get("id"), **score_multiple_choice(it, tokenizer, score_fn, chat=chat,
                                                              length_normalize=length_normalize)) for it in items]
    if not results:
        raise ValueError("no items to evaluate")
    return {"accuracy": sum(r["correct"] for r in results) / len(results), "n": len(results), "results": results}
