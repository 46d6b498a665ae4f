"""Quality benchmark for sampling-family methods: surprise, repetition, diversity, perplexity, length.

For every method and prompt one continuation is generated (batch size 1, seed ``seed + prompt_index``), cut before
the first eos (the eos itself is not part of the continuation), and scored under the **base model's raw
distribution** (teacher-forced, no logits processors, temperature 1):

* ``surprise``: ``-log2 p(token | prefix)`` of each generated token (bits); per method/category the mean and the
  standard deviation over all generated tokens pooled (``surprise_mean``, ``surprise_std``);
* ``perplexity``: ``2 ** surprise_mean`` over the pooled tokens (the perplexity of the generated text under the
  base model); ``perplexity_mean_per_seq`` averages the per-continuation perplexities;
* ``rep_n`` (n = 2, 3, 4): the repetition rate ``1 - unique/total`` n-grams within a continuation
  (:func:`hf_decoding_ext.core.ngram.rep_n`), averaged over continuations;
* ``distinct_n`` (n = 1, 2, 3): unique over total n-grams pooled over the continuations of the group
  (:func:`hf_decoding_ext.core.ngram.distinct_n`);
* ``length``: mean continuation length in tokens; ``eos_rate``: fraction of continuations that ended with eos;
* ``answer_accuracy`` for prompts with a stored answer (``math_reasoning``: the last number in the output equals the
  answer; ``rag_qa``: the answer string occurs in the output, case- and whitespace-insensitively).
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from hf_decoding_ext.core.scoring import model_log_prob_fn, sequence_token_log_probs
from hf_decoding_ext.core.ngram import distinct_n, rep_n
from hf_decoding_ext.bench.speed import (
    ANCESTRAL_KWARGS,
    GREEDY_KWARGS,
    MethodLike,
    cut_at_eos,
    describe_kwargs,
    encode_prompt,
    eos_token_ids,
    model_device,
    pad_token_id,
    result_header,
    resolve_method,
)

REP_NS = (2, 3, 4)
DISTINCT_NS = (1, 2, 3)
REFERENCES: dict[str, dict[str, Any]] = {"greedy": GREEDY_KWARGS, "ancestral": ANCESTRAL_KWARGS}
"""Reference decoders added to quality runs: greedy and pure ancestral sampling."""


@torch.inference_mode()
def continuation_surprise(model, prompt_ids, continuation: Sequence[int]) -> torch.Tensor:
    """Per-token surprise in bits of ``continuation`` after ``prompt_ids`` under the model's raw distribution.

    Args:
        model: a causal LM returning ``.logits`` of shape ``(batch, seq, vocab)``.
        prompt_ids: 1-D tensor (or list) of prompt token ids (no padding).
        continuation: the generated token ids.

    Returns:
        a float tensor ``(len(continuation),)`` of ``-log2 p(token_t | prompt, token_<t)``.
    """
    device = model_device(model)
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long, device=device).reshape(-1)
    cont = torch.as_tensor(list(continuation), dtype=torch.long, device=device)
    if cont.numel() == 0:
        return torch.zeros(0)
    if prompt.numel() == 0:
        raise ValueError("the prompt must hold at least one token")
    log_probs = sequence_token_log_probs(model_log_prob_fn(model), prompt, cont)
    return (-log_probs / math.log(2.0)).float().cpu()


def sequence_metrics(tokens: Sequence[int], surprises: Sequence[float] | torch.Tensor | None = None) -> dict:
    """Metrics of one continuation: ``length``, ``rep_2..4`` and, given per-token surprises (bits),
    ``surprise_mean``, ``surprise_std`` (population std) and ``perplexity = 2 ** surprise_mean``."""
    tokens = list(tokens)
    out: dict[str, Any] = {"length": len(tokens)}
    for n in REP_NS:
        out[f"rep_{n}"] = rep_n(tokens, n)
    if surprises is not None:
        s = [float(x) for x in (surprises.tolist() if isinstance(surprises, torch.Tensor) else surprises)]
        if s:
            mean = sum(s) / len(s)
            out["surprise_mean"] = mean
            out["surprise_std"] = math.sqrt(sum((x - mean) ** 2 for x in s) / len(s))
            out["perplexity"] = 2.0 ** mean
        else:
            out["surprise_mean"] = out["surprise_std"] = out["perplexity"] = None
    return out


def aggregate(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Group figures from per-continuation rows holding ``token_ids`` and ``surprises`` (see module docstring)."""
    if not rows:
        return {}
    seqs = [list(r["token_ids"]) for r in rows]
    pooled = [float(x) for r in rows for x in r["surprises"]]
    out: dict[str, Any] = {"n": len(rows), "tokens": len(pooled)}
    if pooled:
        mean = sum(pooled) / len(pooled)
        out["surprise_mean"] = mean
        out["surprise_std"] = math.sqrt(sum((x - mean) ** 2 for x in pooled) / len(pooled))
        out["perplexity"] = 2.0 ** mean
    else:
        out["surprise_mean"] = out["surprise_std"] = out["perplexity"] = None
    ppl = [r["perplexity"] for r in rows if r.get("perplexity") is not None]
    out["perplexity_mean_per_seq"] = sum(ppl) / len(ppl) if ppl else None
    for n in REP_NS:
        out[f"rep_{n}"] = sum(rep_n(s, n) for s in seqs) / len(seqs)
    for n in DISTINCT_NS:
        out[f"distinct_{n}"] = distinct_n(seqs, n)
    out["length"] = sum(len(s) for s in seqs) / len(seqs)
    out["eos_rate"] = sum(bool(r.get("ended_with_eos")) for r in rows) / len(rows)
    scored = [r["answer_correct"] for r in rows if r.get("answer_correct") is not None]
    out["answer_accuracy"] = sum(scored) / len(scored) if scored else None
    return out


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def answer_correct(category: str, answer: Any, text: str | None) -> bool | None:
    """Whether ``text`` contains the stored answer (``None`` when the prompt has no answer or no text)."""
    if answer is None or text is None:
        return None
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        nums = _NUMBER.findall(text)
        if not nums:
            return False
        try:
            return math.isclose(float(nums[-1].replace(",", "")), float(answer), abs_tol=1e-6)
        except ValueError:
            return False
    norm = lambda s: " ".join(str(s).lower().split())  # noqa: E731
    return norm(answer) in norm(text)


def answers_correct(rows: Sequence[Mapping[str, Any]], outputs: Sequence[Sequence[int]], tokenizer) -> dict:
    """``{"correct", "graded"}`` over the rows :func:`answer_correct` can grade (the small task metric of the
    fine-tuned methods' evaluations): ``outputs`` are the new token ids of each row's continuation."""
    graded = [answer_correct(r["category"], r.get("answer"), tokenizer.decode(o, skip_special_tokens=True))
              for r, o in zip(rows, outputs)]
    graded = [g for g in graded if g is not None]
    return {"correct": sum(graded), "graded": len(graded)}


def benchmark_quality(model, tokenizer, methods: Mapping[str, MethodLike], prompts: list[dict], *,
                      max_new_tokens: int = 128, seed: int = 0, progress: bool = True,
                      model_name: str | None = None, tag: str = "quality", keep_text: bool = True) -> dict[str, Any]:
    """Generate with every method on every prompt and score the continuations (nothing is written to disk).

    Args:
        model, tokenizer: the base model (also the scoring model) and its tokenizer (``None`` allowed when every
            prompt row carries ``input_ids``; then no text is decoded and answers are not scored).
        methods: ``{name: method}`` as in :mod:`hf_decoding_ext.bench.speed` (kwargs dict, factory or registered
            name).
        prompts: prompt rows, e.g. from :func:`hf_decoding_ext.bench.prompts.load_prompts`.
        max_new_tokens: generation budget per prompt.
        seed: base seed; prompt ``i`` uses ``seed + i`` for every method.
        progress: show a tqdm bar on stderr.
        model_name: name recorded in the results.
        keep_text: store the decoded continuation in each row.

    Returns:
        ``{"kind": "quality", "tag", "created", "model", "machine", "settings", "methods": {name: {"kwargs",
        "overall": {...}, "per_category": {cat: {...}}}}, "rows": [...]}`` with the figures of :func:`aggregate`;
        each row holds ``prompt_id, category, method, length, rep_2..4, surprise_mean, surprise_std, perplexity,
        ended_with_eos, answer_correct`` (and ``text``).
    """
    from tqdm.auto import tqdm

    if not methods:
        raise ValueError("no methods to evaluate")
    if not prompts:
        raise ValueError("no prompts to evaluate")
    device = model_device(model)
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = pad_token_id(model, tokenizer)
    work = [(name, m, i, p) for i, p in enumerate(prompts) for name, m in methods.items()]
    full_rows: list[dict] = []
    encoded = [encode_prompt(p, tokenizer, device) for p in prompts]
    for name, method, i, p in tqdm(work, desc=f"{tag}: generations", file=sys.stderr, disable=not progress):
        kwargs = resolve_method(method, model, tokenizer)
        if "max_new_tokens" in kwargs or "max_length" in kwargs:
            raise ValueError("max_new_tokens/max_length are set by the benchmark runner; remove them from the method")
        if pad_id is not None:
            kwargs.setdefault("pad_token_id", pad_id)
        enc = encoded[i]
        torch.manual_seed(seed + i)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, **kwargs)
        seq = out if isinstance(out, torch.Tensor) else out.sequences
        new = seq[0, enc["input_ids"].shape[1]:].tolist()
        cont = cut_at_eos(new, eos_ids, include_eos=False)
        ended = len(cont) < len(new)  # an eos was generated
        s = continuation_surprise(model, enc["input_ids"][0], cont)
        text = tokenizer.decode(cont, skip_special_tokens=True) if tokenizer is not None else None
        row = {"prompt_id": p["id"], "category": p["category"], "method": name, **sequence_metrics(cont, s),
               "ended_with_eos": bool(ended), "answer_correct": answer_correct(p["category"], p.get("answer"), text),
               "token_ids": cont, "surprises": s.tolist()}
        if keep_text and text is not None:
            row["text"] = text
        full_rows.append(row)

    cats = list(dict.fromkeys(p["category"] for p in prompts))
    result_methods = {}
    for name, method in methods.items():
        sel = [r for r in full_rows if r["method"] == name]
        result_methods[name] = {
            "kwargs": describe_kwargs(method),
            "overall": aggregate(sel),
            "per_category": {c: aggregate([r for r in sel if r["category"] == c]) for c in cats},
        }
    rows = [{k: v for k, v in r.items() if k not in ("token_ids", "surprises")} for r in full_rows]
    return {
        **result_header("quality", tag, model, model_name, device),
        "settings": {
            "max_new_tokens": max_new_tokens,
            "seed": seed,
            "batch_size": 1,
            "n_prompts": len(prompts),
            "categories": cats,
            "continuation": "generated tokens before the first eos (eos excluded)",
            "surprise": "-log2 p(token) under the base model's raw distribution, teacher-forced; mean/std pooled "
                        "over tokens; perplexity = 2 ** surprise_mean",
            "rep_n": "1 - unique/total n-grams per continuation, averaged",
            "distinct_n": "unique/total n-grams pooled over the group's continuations",
        },
        "methods": result_methods,
        "rows": rows,
    }
