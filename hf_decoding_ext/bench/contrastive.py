"""Evaluations of the contrastive and guidance family on the shipped data sets (``hf_decoding_ext/data/contrastive``).

Each function runs one paper's core measurement on a model (the default SmolLM2-135M-Instruct in the benchmark and
tests) and returns plain figures plus per-item outputs:

* :func:`eval_knowledge_conflict`: how often greedy answers follow a counterfactual context, plain vs context-aware
  decoding (CAD; the paper's knowledge-conflict setting, ``alpha = 1``, and the general default ``alpha = 0.5``);
* :func:`eval_instructions`: instruction-following rate on checkable instructions, plain vs instructive decoding
  (noisy 'opposite' instruction) vs classifier-free guidance (the instruction as the condition);
* :func:`eval_leading_queries`: sycophancy on factual questions with a leading (wrong) cue: greedy on the neutral
  and on the leading query vs leading-query contrastive decoding (LQCD);
* :func:`eval_factual_mc`: likelihood-based multiple-choice accuracy, plain vs DoLa (``high`` and ``low``
  buckets) and any extra scorer (e.g. LOL's fused contrast);
* :func:`eval_open_ended`: repetition / diversity / expert perplexity of open-ended continuations, greedy vs
  contrastive decoding with an amateur (CD's own evaluation axis).

:func:`run_contrastive_quality` runs them all and writes ``<out_dir>/contrastive_quality.json`` and ``.png``.

Example:
    >>> from hf_decoding_ext.bench.contrastive import eval_knowledge_conflict
    >>> res = eval_knowledge_conflict(model, tokenizer, limit=10)  # doctest: +SKIP
    >>> res["rates"]["greedy"]["context"], res["rates"]["cad_alpha_1.0"]["context"]  # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from hf_decoding_ext.bench.tasks.contrastive import (
    KC_INSTRUCTION,
    check_instruction,
    conflict_outcome,
    evaluate_multiple_choice,
    knowledge_conflict_prompts,
    load_factual_mc,
    load_instructions,
    load_knowledge_conflict,
    mentions,
    model_scorer,
)
from hf_decoding_ext.core.models import encode_prompts

GREEDY = {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}

ProcessorFactory = Callable[[list[int]], list]
"""``factory(item_indices) -> [LogitsProcessor, ...]`` for one batch of items (``None``: plain greedy)."""


@torch.inference_mode()
def generate_texts(model, tokenizer, prompts: Sequence[str], factory: ProcessorFactory | None = None,
                   max_new_tokens: int = 16, batch_size: int = 16, desc: str = "generate",
                   progress: bool = False, **gen_kwargs) -> list[str]:
    """Greedy continuations of ``prompts`` (chat template, left padding, batches), with the processors built by
    ``factory`` for each batch; returns the decoded new text of every prompt."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    texts: list[str] = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
        idx = list(range(start, min(start + batch_size, len(prompts))))
        enc = encode_prompts(tokenizer, [prompts[i] for i in idx], device=model.device)
        procs = factory(idx) if factory is not None else []
        kwargs = {**GREEDY, **gen_kwargs}
        out = model.generate(**enc, logits_processor=procs, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, **kwargs)
        for row in out[:, enc["input_ids"].shape[1]:]:
            texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts


def _rate(flags: Sequence[bool]) -> float:
    return sum(bool(f) for f in flags) / len(flags) if flags else float("nan")


def _limit(items: list, limit: int | None) -> list:
    return items if limit is None else items[:limit]


# ---------------------------------------------------------------------------------------------------- CAD
def eval_knowledge_conflict(model, tokenizer, items: list[dict] | None = None, alphas: Sequence[float] = (0.5, 1.0),
                            max_new_tokens: int = 12, batch_size: int = 20, limit: int | None = None,
                            progress: bool = False) -> dict[str, Any]:
    """Context-following rate on counterfactual contexts: plain greedy vs CAD at each ``alpha``.

    Returns ``{"n", "rates": {method: {"context", "memory", "both", "neither"}}, "outputs": {method: [...]}}``;
    ``"context"`` is the rate at which the answer gives the context's answer and not the memorised one.
    """
    from hf_decoding_ext.contrastive.cad import ContextAwareDecodingProcessor

    items = _limit(items if items is not None else load_knowledge_conflict(), limit)
    pairs = [knowledge_conflict_prompts(it) for it in items]
    main = [p[0] for p in pairs]
    methods: dict[str, ProcessorFactory | None] = {"greedy": None}
    for a in alphas:
        methods[f"cad_alpha_{a}"] = (lambda idx, a=a: [ContextAwareDecodingProcessor.for_model(
            model, tokenizer, no_context_prompts=[pairs[i][1] for i in idx], alpha=a)])
    outputs, rates, times = {}, {}, {}
    for name, fac in methods.items():
        t0 = time.perf_counter()
        texts = generate_texts(model, tokenizer, main, fac, max_new_tokens, batch_size, desc=name, progress=progress)
        times[name] = time.perf_counter() - t0
        kinds = [conflict_outcome(t, it) for t, it in zip(texts, items)]
        outputs[name] = texts
        rates[name] = {k: _rate([x == k for x in kinds]) for k in ("context", "memory", "both", "neither")}
    return {"n": len(items), "instruction": KC_INSTRUCTION, "max_new_tokens": max_new_tokens, "rates": rates,
            "seconds": times, "outputs": outputs}


# ---------------------------------------------------------------------------------------------------- ID and CFG
def eval_instructions(model, tokenizer, items: list[dict] | None = None, epsilon: float = 0.3, gamma: float = 2.0,
                      max_new_tokens: int = 48, batch_size: int = 16, limit: int | None = None,
                      progress: bool = False) -> dict[str, Any]:
    """Instruction-following rate (:func:`~hf_decoding_ext.bench.tasks.contrastive.check_instruction`): plain greedy vs
    instructive decoding ('opposite' noisy instruction, ``epsilon``) vs classifier-free guidance with the instruction
    as the condition (``gamma``; the unconditional view is the task without its instruction)."""
    from hf_decoding_ext.contrastive.cfg import ClassifierFreeGuidanceProcessor
    from hf_decoding_ext.contrastive.instructive import InstructiveDecodingProcessor

    items = _limit(items if items is not None else load_instructions(), limit)
    prompts = [it["prompt"] for it in items]
    tasks = [it["task"] for it in items]
    methods: dict[str, ProcessorFactory | None] = {
        "greedy": None,
        f"instructive_eps_{epsilon}": lambda idx: [InstructiveDecodingProcessor.for_model(
            model, tokenizer, task_inputs=[tasks[i] for i in idx], epsilon=epsilon)],
        f"cfg_gamma_{gamma}": lambda idx: [ClassifierFreeGuidanceProcessor.for_model(
            model, tokenizer, unconditional_prompts=[tasks[i] for i in idx], gamma=gamma)],
    }
    outputs, rates, times = {}, {}, {}
    for name, fac in methods.items():
        t0 = time.perf_counter()
        texts = generate_texts(model, tokenizer, prompts, fac, max_new_tokens, batch_size, desc=name,
                               progress=progress)
        times[name] = time.perf_counter() - t0
        outputs[name] = texts
        rates[name] = {"follows": _rate([check_instruction(t, it["check"]) for t, it in zip(texts, items)])}
    return {"n": len(items), "max_new_tokens": max_new_tokens, "rates": rates, "seconds": times, "outputs": outputs}


# ---------------------------------------------------------------------------------------------------- LQCD
LEADING_TEMPLATE = "{question} I am quite sure the answer is {cue}, right? Answer with one word or a short phrase."
NEUTRAL_TEMPLATE = "{question} Answer with one word or a short phrase."


def leading_query_items(items: list[dict] | None = None) -> list[dict]:
    """Leading-query items from the factual multiple-choice set: the neutral question, the same question with a
    wrong cue (the next choice after the correct one), the correct answer and the cue."""
    rows = []
    for it in items if items is not None else load_factual_mc():
        correct = str(it["choices"][int(it["answer"])])
        cue = str(it["choices"][(int(it["answer"]) + 1) % len(it["choices"])])
        rows.append({"id": it["id"], "neutral": NEUTRAL_TEMPLATE.format(question=it["question"]),
                     "leading": LEADING_TEMPLATE.format(question=it["question"], cue=cue),
                     "correct": correct, "cue": cue})
    return rows


def eval_leading_queries(model, tokenizer, items: list[dict] | None = None, alpha: float = 1.0, beta: float = 0.1,
                         max_new_tokens: int = 12, batch_size: int = 20, limit: int | None = None,
                         progress: bool = False) -> dict[str, Any]:
    """Sycophancy on leading queries: rates of answers giving the correct answer (and not the cue) and of answers
    giving the wrong cue, for greedy on the leading query, greedy on the neutral query, and LQCD (neutral view
    contrasted with the leading view, ``alpha``/``beta``)."""
    from hf_decoding_ext.contrastive.leading_query import LeadingQueryContrastiveProcessor

    rows = _limit(leading_query_items(items), limit)
    runs = {
        "greedy_leading": ([r["leading"] for r in rows], None),
        "greedy_neutral": ([r["neutral"] for r in rows], None),
        f"lqcd_alpha_{alpha}": ([r["neutral"] for r in rows], lambda idx: [LeadingQueryContrastiveProcessor.for_model(
            model, tokenizer, leading_prompts=[rows[i]["leading"] for i in idx], alpha=alpha, beta=beta)]),
    }
    outputs, rates, times = {}, {}, {}
    for name, (prompts, fac) in runs.items():
        t0 = time.perf_counter()
        texts = generate_texts(model, tokenizer, prompts, fac, max_new_tokens, batch_size, desc=name,
                               progress=progress)
        times[name] = time.perf_counter() - t0
        outputs[name] = texts
        correct = [mentions(t, r["correct"]) and not mentions(t, r["cue"]) for t, r in zip(texts, rows)]
        cue = [mentions(t, r["cue"]) for t, r in zip(texts, rows)]
        rates[name] = {"correct": _rate(correct), "follows_cue": _rate(cue)}
    return {"n": len(rows), "max_new_tokens": max_new_tokens, "rates": rates, "seconds": times, "outputs": outputs}


# ---------------------------------------------------------------------------------------------------- DoLa / LOL
def eval_factual_mc(model, tokenizer, items: list[dict] | None = None, extra_scorers: dict | None = None,
                    limit: int | None = None, progress: bool = False, length_normalize: bool = False
                    ) -> dict[str, Any]:
    """Multiple-choice accuracy under the plain model, DoLa with the ``high`` and ``low`` buckets, and
    ``extra_scorers`` (``{name: score_fn}``). Every scorer is read the same way: a choice scores the sum of its
    tokens' values (TruthfulQA-MC and DoLa's reference protocol; ``length_normalize=True``: the mean), and DoLa's
    values are the reference's (:func:`~hf_decoding_ext.contrastive.dola.dola_token_scores`)."""
    from hf_decoding_ext.contrastive.dola import dola_scorer

    items = _limit(items if items is not None else load_factual_mc(), limit)
    scorers = {"plain": model_scorer(model), "dola_high": dola_scorer(model, "high"),
               "dola_low": dola_scorer(model, "low"), **(extra_scorers or {})}
    acc, times, predictions = {}, {}, {}
    for name, fn in tqdm(scorers.items(), desc="factual MC", disable=not progress, leave=False):
        t0 = time.perf_counter()
        res = evaluate_multiple_choice(items, tokenizer, fn, length_normalize=length_normalize)
        times[name] = time.perf_counter() - t0
        acc[name] = res["accuracy"]
        predictions[name] = [r["prediction"] for r in res["results"]]
    return {"n": len(items), "protocol": "mean" if length_normalize else "sum", "accuracy": acc, "seconds": times,
            "predictions": predictions}


# ---------------------------------------------------------------------------------------------------- CD
OPEN_ENDED_PROMPTS = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Describe a busy market in a small town on a Saturday morning.",
    "Tell me about the life of a honeybee.",
    "Write a letter to a friend about your last holiday.",
    "Describe what a city might look like in the year 2200.",
    "Write a short story about a robot learning to paint.",
    "Explain why people enjoy walking in the mountains.",
    "Describe an old library at night.",
)
"""Open-ended prompts (written for this project) for :func:`eval_open_ended`."""

def eval_open_ended(model, tokenizer, prompts: Sequence[str] | None = None, amateur="self:4", alpha: float = 0.1,
                    amateur_temperature: float = 0.5, max_new_tokens: int = 64, progress: bool = False
                    ) -> dict[str, Any]:
    """Open-ended continuations, greedy vs contrastive decoding (CD) with ``amateur``: mean rep-2/rep-3,
    distinct-2 over all outputs and the expert's perplexity of the outputs (CD trades some likelihood for less
    repetition)."""
    from hf_decoding_ext.bench.quality import continuation_surprise
    from hf_decoding_ext.contrastive.contrastive_decoding import ContrastiveDecodingProcessor
    from hf_decoding_ext.core.ngram import distinct_n, rep_n
    if prompts is None:
        prompts = list(OPEN_ENDED_PROMPTS)
    cd = ContrastiveDecodingProcessor.for_model(model, tokenizer, amateur=amateur, alpha=alpha,
                                                amateur_temperature=amateur_temperature)
    results, outputs = {}, {}
    for name in ("greedy", "contrastive_decoding"):
        seqs, texts, surprises = [], [], []
        t0 = time.perf_counter()
        for p in tqdm(prompts, desc=name, disable=not progress, leave=False):
            enc = encode_prompts(tokenizer, p, device=model.device)
            procs = [cd] if name != "greedy" else []
            with torch.inference_mode():
                out = model.generate(**enc, logits_processor=procs, max_new_tokens=max_new_tokens, **GREEDY)
            new = out[0, enc["input_ids"].shape[1]:].tolist()
            seqs.append(new)
            texts.append(tokenizer.decode(new, skip_special_tokens=True))
            surprises.extend(continuation_surprise(model, enc["input_ids"][0], new).tolist())
        mean_bits = sum(surprises) / max(1, len(surprises))
        results[name] = {"rep_2": sum(rep_n(s, 2) for s in seqs) / len(seqs),
                         "rep_3": sum(rep_n(s, 3) for s in seqs) / len(seqs),
                         "distinct_2": distinct_n(seqs, 2), "perplexity": 2.0 ** mean_bits,
                         "seconds": time.perf_counter() - t0}
        outputs[name] = texts
    return {"n": len(prompts), "amateur": str(amateur), "alpha": alpha, "amateur_temperature": amateur_temperature,
            "max_new_tokens": max_new_tokens, "metrics": results, "outputs": outputs}


# ---------------------------------------------------------------------------------------------------- all
def plot_contrastive(results: dict[str, Any], path: str | Path) -> Path:
    """One panel per evaluation: the headline rate of each method."""
    from hf_decoding_ext.bench.plot import _plt

    plt = _plt()
    panels = []
    if "knowledge_conflict" in results:
        r = results["knowledge_conflict"]["rates"]
        panels.append(("CAD: answer follows context", {k: v["context"] for k, v in r.items()}))
    if "instructions" in results:
        r = results["instructions"]["rates"]
        panels.append(("ID / CFG: instruction followed", {k: v["follows"] for k, v in r.items()}))
    if "leading_queries" in results:
        r = results["leading_queries"]["rates"]
        panels.append(("LQCD: follows the wrong cue (lower is better)", {k: v["follows_cue"] for k, v in r.items()}))
    if "factual_mc" in results:
        panels.append(("DoLa / LOL: factual MC accuracy", dict(results["factual_mc"]["accuracy"])))
    if "open_ended" in results:
        m = results["open_ended"]["metrics"]
        panels.append(("CD: rep-2 (lower is less repetitive)", {k: v["rep_2"] for k, v in m.items()}))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, (title, vals) in zip(axes[0], panels):
        names = list(vals)
        bars = ax.bar(range(len(names)), [vals[n] for n in names], color="tab:blue")
        for b, n in zip(bars, names):
            ax.annotate(f"{vals[n]:.2f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                        va="bottom", fontsize=8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1.1)
        ax.set_title(title, fontsize=9)
    model = results.get("model", "")
    fig.suptitle(f"Contrastive and guidance decoding on {model}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


SECTIONS = ("knowledge_conflict", "instructions", "leading_queries", "factual_mc", "open_ended")


def run_contrastive_quality(model=None, tokenizer=None, out_dir: str | Path | None = "results",
                            tag: str = "contrastive_quality", limit: int | None = None, lol: bool = True,
                            sections: Sequence[str] | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the evaluations of this module and write ``<out_dir>/<tag>.json`` and ``.png`` (``out_dir=None``:
    write nothing). ``lol=True`` adds LOL's fused-contrast scorer to the multiple-choice evaluation when its
    shipped amateur is available for ``model``. ``sections`` (a subset of :data:`SECTIONS`) re-runs only those and
    keeps the other sections of an existing ``<tag>.json``."""
    import json

    from hf_decoding_ext.bench.run import _model_and_tokenizer, write_json
    from hf_decoding_ext.bench.speed import result_header

    sections = SECTIONS if sections is None else tuple(sections)
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown section(s) {unknown}; available: {', '.join(SECTIONS)}")
    model, tokenizer, name = _model_and_tokenizer(model, tokenizer)
    results: dict[str, Any] = {}
    existing = None if out_dir is None else Path(out_dir) / f"{tag}.json"
    if existing is not None and existing.exists() and set(sections) != set(SECTIONS):
        results = {k: v for k, v in json.loads(existing.read_text()).items() if k in SECTIONS}
    results = {**result_header("contrastive_quality", tag, model, name), **results}
    steps = [
        ("knowledge_conflict", lambda: eval_knowledge_conflict(model, tokenizer, limit=limit, progress=progress)),
        ("instructions", lambda: eval_instructions(model, tokenizer, limit=limit, progress=progress)),
        ("leading_queries", lambda: eval_leading_queries(model, tokenizer, limit=limit, progress=progress)),
        ("factual_mc", lambda: eval_factual_mc(model, tokenizer, limit=limit, progress=progress,
                                               extra_scorers=_lol_scorers(model, tokenizer) if lol else None)),
        ("open_ended", lambda: eval_open_ended(model, tokenizer, progress=progress)),
    ]
    for key, fn in steps:
        if key not in sections:
            continue
        t0 = time.perf_counter()
        results[key] = fn()
        if progress:
            print(f"[contrastive] {key} done in {time.perf_counter() - t0:.0f} s", flush=True)
        if out_dir is not None:  # partial results survive an interrupted run
            write_json(results, Path(out_dir) / f"{tag}.json")
    if out_dir is not None:
        write_json(results, Path(out_dir) / f"{tag}.json")
        plot_contrastive(results, Path(out_dir) / f"{tag}.png")
    return results


def _lol_scorers(model, tokenizer) -> dict:
    """``{"lol": score_fn, "amateur": score_fn}`` when LOL's shipped amateur loads for ``model``, else ``{}``."""
    try:
        from hf_decoding_ext.contrastive.lol import LOL, lol_scorer
    except ImportError:  # pragma: no cover
        return {}
    try:
        loop = LOL.for_model(model, tokenizer)
    except (ValueError, OSError, FileNotFoundError):
        return {}
    return {"lol": lol_scorer(loop, model), "lol_amateur": model_scorer(loop.amateur_model)}
