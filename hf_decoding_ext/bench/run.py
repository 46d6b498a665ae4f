"""Entry points of the benchmark harness: speed and quality runs that write JSON results and PNG plots.

* :func:`run_speed`: methods vs plain greedy ``generate()`` (protocol in :mod:`hf_decoding_ext.bench.speed`);
  writes ``<out_dir>/<tag>.json`` and ``<out_dir>/<tag>.png``.
* :func:`run_quality`: surprise / repetition / diversity / perplexity / length of each method's continuations
  (:mod:`hf_decoding_ext.bench.quality`), with greedy and ancestral sampling as references; writes
  ``<out_dir>/<tag>.json`` and ``<out_dir>/<tag>.png``.
* :func:`run_family`: the registered methods of one family with their default parameters: speed vs greedy
  (``<family>_speed.json/.png``) and, for the sampling family, quality (``<family>_quality.json/.png``);
  :func:`run_sampling_family` is ``run_family("sampling", ...)`` (``sampling_quality`` and ``sampling_speed``).

A *method* is a dict of ``generate()`` kwargs, a zero-argument callable returning one (called before every run;
use it for components with per-run state), or the name of a registered method.

Example:
    >>> from hf_decoding_ext.bench.run import run_speed
    >>> res = run_speed({"pld": {"prompt_lookup_num_tokens": 10}}, per_category=2,
    ...                 max_new_tokens=64)  # doctest: +SKIP
    >>> res["methods"]["pld"]["overall"]["speed_ratio"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hf_decoding_ext.bench.prompts import load_prompts
from hf_decoding_ext.bench.quality import REFERENCES, benchmark_quality
from hf_decoding_ext.bench.speed import ANCESTRAL_KWARGS, MethodLike, benchmark_speed

DEFAULT_OUT_DIR = "results"


def _clean(obj):
    """Make results strict JSON (NaN/inf become null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json(results: Mapping[str, Any], path: str | Path) -> Path:
    """Write a result dict as indented strict JSON, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_clean(results), f, indent=1, ensure_ascii=False)
        f.write("\n")
    return path


def _model_and_tokenizer(model, tokenizer):
    """``None`` loads the default model; a string loads that model; a model object is used as is."""
    if model is None or isinstance(model, str):
        from hf_decoding_ext.core.models import load_model

        loaded, tok = load_model(model)
        return loaded, tokenizer if tokenizer is not None else tok, model
    return model, tokenizer, None


def select_prompts(prompts: Sequence[dict] | None = None, categories=None, per_category: int | None = None) -> list:
    """The packaged prompts (``prompts=None``) or the given rows, filtered by category and truncated per category."""
    if prompts is None:
        return load_prompts(categories=categories, per_category=per_category)
    wanted = None if categories is None else ({categories} if isinstance(categories, str) else set(categories))
    out, seen = [], {}
    for p in prompts:
        c = p["category"]
        if wanted is not None and c not in wanted:
            continue
        if per_category is not None and seen.get(c, 0) >= per_category:
            continue
        seen[c] = seen.get(c, 0) + 1
        out.append(p)
    return out


def run_speed(
    methods: Mapping[str, MethodLike],
    model=None,
    tokenizer=None,
    prompts: Sequence[dict] | None = None,
    *,
    categories=None,
    per_category: int | None = None,
    max_new_tokens: int = 128,
    warmup: int = 1,
    seed: int = 0,
    out_dir: str | Path | None = DEFAULT_OUT_DIR,
    tag: str = "speed",
    plot: bool = True,
    progress: bool = True,
    model_name: str | None = None,
    track_memory: bool = True,
    **protocol,
) -> dict[str, Any]:
    """Benchmark ``methods`` against plain greedy ``generate()`` and write ``<out_dir>/<tag>.json`` (+ ``.png``).

    Args:
        methods: ``{name: method}``; a method is a ``generate()`` kwargs dict (e.g.
            ``{"prompt_lookup_num_tokens": 10}`` or ``{"assistant_model": draft}``), a zero-argument callable
            returning one, or a registered method name. ``"greedy"`` is reserved for the baseline (always run).
        model: a loaded model, a model name/path, or ``None`` for the embedded default model.
        tokenizer: the tokenizer (loaded with the model when ``model`` is ``None``/a name); may be ``None`` when
            every prompt carries pre-tokenised ``input_ids``.
        prompts: prompt rows (``id``, ``category``, ``prompt`` or ``input_ids``); ``None`` = the packaged set.
        categories: restrict to these categories.
        per_category: keep the first ``per_category`` prompts of each category.
        max_new_tokens: the generation budget of every run.
        warmup: leading prompts run once per method beforehand and excluded.
        seed: base seed (prompt ``i`` uses ``seed + i`` for every method).
        out_dir: results folder (``None``: write nothing).
        tag: file stem of the outputs.
        plot: also write the bar chart of speed ratios.
        progress: tqdm progress bars on stderr.
        model_name: name recorded in the results.
        track_memory: record the peak memory of each run.
        **protocol: ``repeats``, ``warmup_prompts`` and ``same_kernel`` of
            :func:`~hf_decoding_ext.bench.speed.benchmark_speed`.

    Returns:
        the result dict (see :func:`hf_decoding_ext.bench.speed.benchmark_speed`), with ``"files"`` listing what
        was written.
    """
    model, tokenizer, name = _model_and_tokenizer(model, tokenizer)
    rows = select_prompts(prompts, categories, per_category)
    res = benchmark_speed(model, tokenizer, methods, rows, max_new_tokens=max_new_tokens, warmup=warmup, seed=seed,
                          track_memory=track_memory, progress=progress, model_name=model_name or name, tag=tag,
                          **protocol)
    return _write(res, out_dir, tag, plot, "speed")


def run_quality(
    methods: Mapping[str, MethodLike],
    model=None,
    tokenizer=None,
    prompts: Sequence[dict] | None = None,
    *,
    categories=None,
    per_category: int | None = None,
    max_new_tokens: int = 128,
    seed: int = 0,
    references: Sequence[str] = ("greedy", "ancestral"),
    out_dir: str | Path | None = DEFAULT_OUT_DIR,
    tag: str = "quality",
    plot: bool = True,
    progress: bool = True,
    model_name: str | None = None,
    keep_text: bool = True,
) -> dict[str, Any]:
    """Score the continuations of ``methods`` (and reference decoders) and write ``<out_dir>/<tag>.json`` (+ ``.png``).

    Args:
        methods: ``{name: method}`` as for :func:`run_speed`.
        references: reference decoders added first, from ``"greedy"`` and ``"ancestral"`` (pure sampling, T = 1,
            no truncation); a method of the same name replaces the reference.
        keep_text: store the decoded continuations in the per-prompt rows.
        (other arguments as for :func:`run_speed`)

    Returns:
        the result dict (see :func:`hf_decoding_ext.bench.quality.benchmark_quality`), with ``"files"``.
    """
    unknown = [r for r in references if r not in REFERENCES]
    if unknown:
        raise ValueError(f"Unknown references {unknown}; valid references: {', '.join(REFERENCES)}")
    model, tokenizer, name = _model_and_tokenizer(model, tokenizer)
    rows = select_prompts(prompts, categories, per_category)
    all_methods = {r: REFERENCES[r] for r in references if r not in methods}
    all_methods.update(methods)
    res = benchmark_quality(model, tokenizer, all_methods, rows, max_new_tokens=max_new_tokens, seed=seed,
                            progress=progress, model_name=model_name or name, tag=tag, keep_text=keep_text)
    return _write(res, out_dir, tag, plot, "quality")


def _write(res: dict, out_dir, tag: str, plot: bool, kind: str) -> dict:
    res["files"] = {}
    if out_dir is None:
        return res
    out = Path(out_dir)
    if plot:
        from hf_decoding_ext.bench.plot import plot_quality, plot_speed

        png = (plot_speed if kind == "speed" else plot_quality)(res, out / f"{tag}.png")
        res["files"]["plot"] = str(png)
    res["files"]["json"] = str(out / f"{tag}.json")
    write_json(res, out / f"{tag}.json")
    return res


def family_methods(family: str, model=None, tokenizer=None, params: Mapping[str, Mapping[str, Any]] | None = None,
                   status: str | None = None, names: Sequence[str] | None = None,
                   reuse: bool = False) -> dict[str, MethodLike]:
    """``{name: factory}`` for the registered methods of ``family`` (default params, overridable).

    Args:
        family: registry family, e.g. ``"sampling"``.
        params: optional ``{method_name: {param: value}}`` overriding the registered defaults.
        status: only methods of this status (default: all).
        names: only these methods (unknown names raise ``ValueError``).

    Each factory builds a fresh component with :func:`hf_decoding_ext.plug.generate_kwargs` before every
    run (components may keep per-run state), or, with ``reuse=True``, builds it once and returns the same kwargs
    every time (drafters whose state is meant to persist across prompts, e.g. Token Recycling's hot start).
    """
    from hf_decoding_ext.plug import generate_kwargs
    from hf_decoding_ext.registry import list_methods

    params = dict(params or {})
    specs = list_methods(family=family, status=status)
    valid = [s.name for s in specs]
    if names is not None:
        unknown = sorted(set(names) - set(valid))
        if unknown:
            raise ValueError(f"Unknown {family} methods {unknown}; registered {family} methods: {valid or 'none'}")
        specs = [s for s in specs if s.name in set(names)]
    unknown = sorted(set(params) - {s.name for s in specs})
    if unknown:
        raise ValueError(f"params given for methods {unknown} that are not benchmarked; {family} methods: {valid}")
    out: dict[str, MethodLike] = {}
    for spec in specs:
        p = dict(params.get(spec.name, {}))
        bad = sorted(set(p) - set(spec.parameters()))
        if bad:
            raise ValueError(f"Unknown parameter(s) {bad} for method {spec.name!r}; valid parameters: "
                             f"{spec.parameters() or 'none'}")

        built: dict[str, Any] = {}

        def factory(spec=spec, p=p, built=built):
            if not reuse:
                return generate_kwargs(spec, model, tokenizer, **p)
            if "kwargs" not in built:
                built["kwargs"] = generate_kwargs(spec, model, tokenizer, **p)
            return built["kwargs"]

        factory.__name__ = f"generate_kwargs({spec.name!r}{''.join(f', {k}={v!r}' for k, v in p.items())})"
        out[spec.name] = factory
    return out


TRANSFORMERS_PROMPT_LOOKUP = {"prompt_lookup_num_tokens": 10, "do_sample": False}


def speculative_baselines(chosen: Mapping[str, MethodLike]) -> dict[str, MethodLike]:
    """transformers' built-ins nearest to the benchmarked drafters: prompt lookup (always) and assisted generation
    with the very assistant of ``draft-model`` (when it is benchmarked)."""
    out: dict[str, MethodLike] = {"transformers-prompt-lookup": dict(TRANSFORMERS_PROMPT_LOOKUP)}
    if "draft-model" in chosen:
        ours = chosen["draft-model"]

        def assisted():
            kwargs = ours() if callable(ours) else ours
            drafter = kwargs["custom_generate"].drafter
            return {"assistant_model": drafter.assistant_model, "do_sample": False}

        assisted.__name__ = "assistant_model=<draft-model's assistant>"
        out["transformers-assisted"] = assisted
    return out


DRAFTER_FAMILIES = ("speculative", "trained-heads", "self")
"""Families of drafters: built once and reused across prompts, timed against transformers' built-ins."""


def run_family(
    family: str,
    model=None,
    tokenizer=None,
    prompts: Sequence[dict] | None = None,
    *,
    methods: Sequence[str] | None = None,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    model_name: str | None = None,
    categories=None,
    per_category: int | None = None,
    max_new_tokens: int = 128,
    seed: int = 0,
    warmup: int = 1,
    out_dir: str | Path | None = DEFAULT_OUT_DIR,
    quality: bool | None = None,
    speed: bool = True,
    status: str | None = None,
    progress: bool = True,
    extra_methods: Mapping[str, MethodLike] | None = None,
) -> dict[str, Any]:
    """Benchmark the registered methods of ``family``: speed vs greedy, and quality for the sampling family.

    For the drafter families (``"speculative"``, ``"trained-heads"``) each drafter is built once and reused across prompts (state such as Token
    Recycling's matrix persists, as in the papers), and transformers' nearest built-ins are timed in the same
    interleaved run: ``transformers-prompt-lookup`` (``prompt_lookup_num_tokens=10``) and, when ``draft-model`` is
    benchmarked, ``transformers-assisted`` (``assistant_model=`` the same assistant).

    Writes ``<family>_speed.json``/``.png`` and, when ``quality`` (default: only for ``family == "sampling"``),
    ``<family>_quality.json``/``.png`` under ``out_dir``. For the sampling family, greedy and ancestral sampling are
    the quality references and ancestral sampling is also timed as a reference method.

    Args:
        family: registry family (``"sampling"``, ``"speculative"``, ...).
        model: a loaded model, a name/path, or ``None`` (the embedded default model).
        tokenizer: its tokenizer (loaded with the model when ``model`` is ``None``/a name).
        prompts: prompt rows (default: the packaged set), filtered by ``categories``/``per_category``.
        methods: only these registered methods of the family (default: all of them).
        params: optional ``{method_name: {param: value}}`` overriding the registered defaults.
        model_name: the model to load when ``model`` is ``None`` (Hub id, local path or the default alias; this is
            what the CLI's ``--model`` passes).
        status: only methods of this status (``"done"``/``"experimental"``; default: all).
        quality, speed: which benchmarks to run.
        extra_methods: further ``{name: method}`` entries timed in the same speed run (e.g. a composition of
            drafters), after the registered ones.
        (other arguments as for :func:`run_speed`)

    Returns:
        ``{"family", "methods": [names], "quality": result or None, "speed": result or None}``.
    """
    if model is None and model_name is not None:
        model = model_name
    model, tokenizer, name = _model_and_tokenizer(model, tokenizer)
    drafting = family in DRAFTER_FAMILIES
    chosen = family_methods(family, model, tokenizer, params, status, methods, reuse=drafting)
    rows = select_prompts(prompts, categories, per_category)
    if quality is None:
        quality = family == "sampling"
    out: dict[str, Any] = {"family": family, "methods": list(chosen), "quality": None, "speed": None}
    if quality:
        out["quality"] = run_quality(chosen, model, tokenizer, rows, max_new_tokens=max_new_tokens, seed=seed,
                                     out_dir=out_dir, tag=f"{family}_quality", progress=progress, model_name=name,
                                     references=("greedy", "ancestral") if family == "sampling" else ("greedy",))
    if speed:
        speed_methods: dict[str, MethodLike] = {"ancestral": ANCESTRAL_KWARGS} if family == "sampling" else {}
        if drafting:
            speed_methods.update(speculative_baselines(chosen))
        speed_methods.update(chosen)
        speed_methods.update(extra_methods or {})
        out["speed"] = run_speed(speed_methods, model, tokenizer, rows, max_new_tokens=max_new_tokens,
                                 warmup=warmup, seed=seed, out_dir=out_dir, tag=f"{family}_speed", progress=progress,
                                 model_name=name)
    return out


def run_sampling_family(
    model=None,
    tokenizer=None,
    prompts: Sequence[dict] | None = None,
    *,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    methods: Sequence[str] | None = None,
    model_name: str | None = None,
    categories=None,
    per_category: int | None = None,
    max_new_tokens: int = 128,
    seed: int = 0,
    warmup: int = 1,
    out_dir: str | Path | None = DEFAULT_OUT_DIR,
    quality: bool = True,
    speed: bool = True,
    status: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Benchmark every registered ``"sampling"`` method for quality and for speed vs greedy.

    Same as ``run_family("sampling", ...)``: writes ``sampling_quality.json``/``.png`` (references: greedy and
    ancestral sampling) and ``sampling_speed.json``/``.png`` (baseline: greedy; ancestral sampling timed as a
    reference) under ``out_dir``, with each method's registered default parameters unless ``params`` overrides
    them. See :func:`run_family` for the arguments.
    """
    return run_family("sampling", model, tokenizer, prompts, methods=methods, params=params, model_name=model_name,
                      categories=categories, per_category=per_category, max_new_tokens=max_new_tokens, seed=seed,
                      warmup=warmup, out_dir=out_dir, quality=quality, speed=speed, status=status,
                      progress=progress)
