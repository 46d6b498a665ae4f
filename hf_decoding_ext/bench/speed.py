"""Speed benchmark: decoding methods against plain greedy ``generate()`` in the same process.

Protocol (see :func:`benchmark_speed`):

* every prompt is run once with the **baseline** (plain greedy ``generate()``) and once with every method, at batch
  size 1 and the same ``max_new_tokens``; the order is *interleaved prompt by prompt* and *rotated* (prompt ``i``
  starts with entry ``i mod (n_methods + 1)`` of ``[baseline, *methods]``), so slow drifts of the machine (thermal
  throttling, other processes) hit every method alike;
* ``warmup`` prompts are first run with every method and excluded from the figures;
* the random seed is reset to ``seed + prompt_index`` before every run, so sampling methods see fixed seeds and
  every method gets the same seed on a given prompt;
* per run the runner measures wall time (``time.perf_counter`` around ``generate()``, CUDA synchronised), the new
  tokens (up to and including the first eos; nothing after it is counted, and at batch size 1 ``generate()``
  adds no padding), tokens/s, the number of **target-model forwards** (a forward hook on the model passed in, so
  forwards of a separate ``assistant_model`` are not counted; a method's kwargs may name a draft model as
  ``count_forwards_of``, whose forwards are then counted as ``draft_forwards``) and the peak memory (on CUDA
  ``torch.cuda.max_memory_allocated`` reset before the run; on CPU the peak process RSS sampled by a background
  thread every 5 ms with ``psutil``, or the process-lifetime peak ``ru_maxrss`` when psutil is missing).

Figures per method, per category and overall (:func:`summarise`):

* ``tokens_per_s``: total new tokens / total wall time;
* ``speed_ratio`` (**the headline**): the method's ``tokens_per_s`` divided by the baseline's over the same prompts,
  i.e. the ratio of totals, which weights prompts by their cost and is robust to very short outputs;
* ``speed_ratio_mean_per_prompt``: the mean of per-prompt ratios ``(tok/s method) / (tok/s baseline)``;
* ``tokens_per_forward``: total new tokens / total target forwards (mean accepted tokens per target forward;
  1.0 for greedy, > 1 for speculative methods that verify several tokens per forward);
* ``draft_forwards_per_token``: draft-model forwards per new token (methods with ``count_forwards_of``);
* ``peak_mem_mb``: maximum of the per-run peaks;
* ``match_baseline_rate``: the fraction of prompts whose new tokens equal the baseline's (1.0 for lossless greedy
  accelerators).

A *method* is a ``generate()`` kwargs dict (e.g. ``{"prompt_lookup_num_tokens": 10}``, ``{"assistant_model": m}``,
or the output of :func:`hf_decoding_ext.plug.generate_kwargs`), a zero-argument callable returning such a
dict (called afresh before each run, outside the timed region: use it for components with per-run state), or the
name of a registered method (built with its default parameters before each run).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import os
import platform
from pathlib import Path
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

BASELINE = "greedy"
"""Name of the baseline entry in speed results (plain greedy ``generate()``)."""

GREEDY_KWARGS: dict[str, Any] = {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}
"""``generate()`` kwargs of plain greedy decoding (neutralising sampling defaults a generation config may carry)."""

ANCESTRAL_KWARGS: dict[str, Any] = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
"""``generate()`` kwargs of pure ancestral sampling from the model's distribution (no truncation, T = 1)."""

MethodLike = Mapping[str, Any] | Callable[[], Mapping[str, Any]] | str


# ------------------------------------------------------------------------------------------------------ helpers
def resolve_method(method: MethodLike, model=None, tokenizer=None) -> dict[str, Any]:
    """Turn a method description (kwargs dict, zero-argument factory or registered name) into ``generate()`` kwargs."""
    if isinstance(method, str):
        from hf_decoding_ext.plug import generate_kwargs

        return dict(generate_kwargs(method, model, tokenizer))
    if callable(method):
        kwargs = method()
        if not isinstance(kwargs, Mapping):
            raise ValueError(f"a method factory must return a dict of generate() kwargs, got {type(kwargs).__name__}")
        return dict(kwargs)
    if isinstance(method, Mapping):
        return dict(method)
    raise ValueError(f"a method must be a dict of generate() kwargs, a callable returning one, or a registered "
                     f"method name; got {type(method).__name__}")


def describe_kwargs(method: MethodLike) -> Any:
    """A JSON-safe description of a method's kwargs (objects become their class name / model name)."""
    if isinstance(method, str):
        return {"registered_method": method}
    if callable(method) and not isinstance(method, Mapping):
        return {"factory": getattr(method, "__name__", type(method).__name__)}

    def safe(v):
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, (list, tuple)):
            return [safe(x) for x in v]
        if isinstance(v, Mapping):
            return {str(k): safe(x) for k, x in v.items()}
        name = getattr(getattr(v, "config", None), "_name_or_path", None)
        return f"<{type(v).__name__}{' ' + name if name else ''}>"

    return {str(k): safe(v) for k, v in method.items()}


def eos_token_ids(model, tokenizer=None) -> set[int]:
    """The set of eos ids from the model's generation config (or the tokenizer)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def pad_token_id(model, tokenizer=None) -> int | None:
    pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    if pad is None and tokenizer is not None:
        pad = tokenizer.pad_token_id
    if pad is None:
        eos = sorted(eos_token_ids(model, tokenizer))
        pad = eos[0] if eos else None
    if isinstance(pad, (list, tuple)):
        pad = pad[0]
    return pad


def cut_at_eos(new_ids: list[int], eos_ids: set[int], include_eos: bool = True) -> list[int]:
    """New tokens up to the first eos (included when ``include_eos``); everything after it is dropped."""
    for i, t in enumerate(new_ids):
        if t in eos_ids:
            return new_ids[: i + 1] if include_eos else new_ids[:i]
    return list(new_ids)


def encode_prompt(row: Mapping[str, Any], tokenizer=None, device=None) -> dict[str, torch.Tensor]:
    """``input_ids``/``attention_mask`` (batch 1) of one prompt row.

    A row may carry pre-tokenised ``input_ids`` (a list of ints, used as is: handy for tiny test models without a
    tokenizer); otherwise its ``prompt`` (string or message list) goes through
    :func:`hf_decoding_ext.core.models.encode_prompts` (chat template when the tokenizer has one).
    """
    if row.get("input_ids") is not None:
        ids = torch.as_tensor(row["input_ids"], dtype=torch.long).reshape(1, -1)
        enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    else:
        if tokenizer is None:
            raise ValueError(f"prompt {row.get('id')!r} has no 'input_ids' and no tokenizer was given to encode it")
        from hf_decoding_ext.core.models import encode_prompts

        e = encode_prompts(tokenizer, row["prompt"])
        enc = {"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]}
    if device is not None:
        enc = {k: v.to(device) for k, v in enc.items()}
    return enc


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


def model_display_name(model, model_name: str | None = None) -> str:
    if model_name:
        return model_name
    path = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    if "SmolLM2-135M-Instruct" in path:
        from hf_decoding_ext.core.models import DEFAULT_MODEL

        return DEFAULT_MODEL
    return path or type(model).__name__


def result_header(kind: str, tag: str, model, model_name: str | None, device=None) -> dict[str, Any]:
    """Common head of every results JSON: kind, tag, time, model, dtype and machine."""
    return {
        "kind": kind,
        "tag": tag,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model_display_name(model, model_name),
        "dtype": str(next(model.parameters()).dtype),
        "machine": machine_info(device),
    }


def machine_info(device=None) -> dict[str, Any]:
    """Machine and library versions recorded with every result file."""
    import transformers

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device) if device is not None else "cpu",
    }
    try:
        from importlib.metadata import version

        info["hf_decoding_ext"] = version("hf-decoding-ext")
    except Exception:  # pragma: no cover - not installed as a distribution
        info["hf_decoding_ext"] = None
    try:
        import psutil

        info["ram_gb"] = round(psutil.virtual_memory().total / 2**30, 2)
    except ImportError:  # pragma: no cover
        info["ram_gb"] = None
    info.update(cpu_model())
    if device is not None and torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def cpu_model() -> dict[str, Any]:
    """The CPU's model name and whether it has AVX-512 (and its BF16 extension), from ``/proc/cpuinfo`` (empty
    where it cannot be read): speed figures of the fast kernels depend on them."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), None)
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return {"cpu_model": name, "avx512": "avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags}


class ForwardCounter:
    """Counts and times calls of ``model.forward`` with forward hooks (use as a context manager).

    ``count`` is the number of calls and ``seconds`` the wall time spent inside them (synchronised on CUDA), so
    ``1 - seconds / wall`` of a run is the share of time spent outside the model's forwards (decoding-loop overhead).
    """

    def __init__(self, model):
        self.model = model
        self.device = model_device(model)
        self.count = 0
        self.seconds = 0.0
        self._start = None
        self._handles = []

    def _pre_hook(self, module, args):
        _sync(self.device)
        self._start = time.perf_counter()

    def _hook(self, module, args, output):
        self.count += 1
        if self._start is not None:
            _sync(self.device)
            self.seconds += time.perf_counter() - self._start
            self._start = None

    def __enter__(self):
        self._handles = [self.model.register_forward_pre_hook(self._pre_hook),
                         self.model.register_forward_hook(self._hook)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []


class PeakMemory:
    """Peak memory during a block: CUDA max allocated, or the sampled process RSS on CPU (MiB)."""

    def __init__(self, device, interval: float = 0.005):
        self.device = torch.device(device)
        self.interval = interval
        self.peak_mb: float | None = None
        self.kind = ""
        self._stop = threading.Event()
        self._thread = None
        self._proc = None

    def _poll(self):
        peak = 0
        while not self._stop.is_set():
            peak = max(peak, self._proc.memory_info().rss)
            self._stop.wait(self.interval)
        self._rss_peak = max(peak, self._proc.memory_info().rss)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda_max_memory_allocated"
            return self
        try:
            import psutil

            self._proc = psutil.Process()
            self.kind = "rss_peak_sampled"
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        except ImportError:  # pragma: no cover - psutil missing
            self.kind = "rss_process_lifetime_peak"
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak_mb = self._rss_peak / 2**20
        else:  # pragma: no cover
            import resource

            kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.peak_mb = kb / 1024 if sys.platform != "darwin" else kb / 2**20


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate_once(model, enc, gen_kwargs: Mapping[str, Any], max_new_tokens: int, seed: int, eos_ids: set[int],
                  pad_id: int | None = None, track_memory: bool = True) -> dict[str, Any]:
    """One timed ``generate()`` call at batch size 1; returns the run's measurements and its new token ids."""
    if "max_new_tokens" in gen_kwargs or "max_length" in gen_kwargs:
        raise ValueError("max_new_tokens/max_length are set by the benchmark runner; remove them from the method")
    kwargs = dict(gen_kwargs)
    kernels = kwargs.pop("kernels", None)
    draft = kwargs.pop("count_forwards_of", None)  # a draft model whose forwards are counted too
    if pad_id is not None:
        kwargs.setdefault("pad_token_id", pad_id)
    device = enc["input_ids"].device
    torch.manual_seed(seed)
    mem = PeakMemory(device) if track_memory else contextlib.nullcontext()
    if kernels is None:
        kernel_context = contextlib.nullcontext()
    else:
        from hf_decoding_ext.core.kernels import fast_kernels

        kernel_context = fast_kernels(model, kwargs.get("assistant_model"), plan=kernels)
    draft_counter = ForwardCounter(draft) if draft is not None else contextlib.nullcontext()
    with ForwardCounter(model) as counter, draft_counter, mem, torch.inference_mode(), kernel_context:
        _sync(device)
        t0 = time.perf_counter()
        out = model.generate(**enc, max_new_tokens=max_new_tokens, **kwargs)
        _sync(device)
        wall = time.perf_counter() - t0
    seq = out if isinstance(out, torch.Tensor) else out.sequences
    new = seq[0, enc["input_ids"].shape[1]:].tolist()
    new = cut_at_eos(new, eos_ids, include_eos=True)
    n = len(new)
    return {
        "wall_s": wall,
        "new_tokens": n,
        "tokens_per_s": n / wall if wall > 0 else float("nan"),
        "forwards": counter.count,
        "tokens_per_forward": n / counter.count if counter.count else float("nan"),
        "forward_s": counter.seconds,
        "overhead_frac": 1.0 - counter.seconds / wall if wall > 0 else float("nan"),
        "peak_mem_mb": mem.peak_mb if track_memory else None,
        "peak_mem_kind": mem.kind if track_memory else None,
        "draft_forwards": draft_counter.count if draft is not None else None,
        "token_ids": new,
    }


def reset_persistent(methods) -> int:
    """Reset the drafters of the ``custom_generate`` loops among ``methods`` (``generate()`` kwargs dicts); returns
    how many were reset. Callables and registered names are built afresh per run and need no reset."""
    count = 0
    for method in methods:
        if callable(method) and not isinstance(method, Mapping):
            method = method()  # a factory (maybe returning a persistent loop): resolve it to its kwargs
        loop = method.get("custom_generate") if isinstance(method, Mapping) else None
        drafter = getattr(loop, "drafter", None)
        if drafter is not None and hasattr(drafter, "reset"):
            drafter.reset()
            count += 1
    return count


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) and b > 0 else float("nan")


def summarise(rows: list[dict], baseline: str = BASELINE, same_kernel: str | None = None) -> dict[str, dict]:
    """Per-method overall and per-category figures from per-run rows (see the module docstring). Runs are paired
    with the baseline's run of the same prompt and repetition; with ``same_kernel`` (the name of greedy decoding
    under the methods' kernels) the figures also hold ``speed_ratio_same_kernel``, and ``overall`` holds the
    per-repetition ratios and their spread."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    key = lambda r: (r["prompt_id"], r.get("rep", 0))  # noqa: E731
    base_by_run = {key(r): r for r in rows if r["method"] == baseline}
    same_by_run = {key(r): r for r in rows if same_kernel is not None and r["method"] == same_kernel}
    cats = list(dict.fromkeys(r["category"] for r in rows))

    def against(sel, ref):
        paired = [ref[key(r)] for r in sel if key(r) in ref]
        return _ratio(_ratio(sum(r["new_tokens"] for r in sel), sum(r["wall_s"] for r in sel)),
                      _ratio(sum(r["new_tokens"] for r in paired), sum(r["wall_s"] for r in paired))) \
            if paired else float("nan")

    def figures(sel: list[dict]) -> dict[str, Any]:
        if not sel:
            return {}
        tok = sum(r["new_tokens"] for r in sel)
        wall = sum(r["wall_s"] for r in sel)
        fwd = sum(r["forwards"] for r in sel)
        fwd_s = sum(r.get("forward_s", float("nan")) for r in sel)
        base = [base_by_run[key(r)] for r in sel if key(r) in base_by_run]
        per_prompt = [_ratio(r["tokens_per_s"], base_by_run[key(r)]["tokens_per_s"])
                      for r in sel if key(r) in base_by_run]
        per_prompt = [x for x in per_prompt if not math.isnan(x)]
        mems = [r["peak_mem_mb"] for r in sel if r.get("peak_mem_mb") is not None]
        tps = _ratio(tok, wall)
        out = {
            "n_prompts": len({r["prompt_id"] for r in sel}),
            "n_runs": len(sel),
            "new_tokens": tok,
            "wall_s": wall,
            "tokens_per_s": tps,
            "speed_ratio": against(sel, base_by_run) if base else float("nan"),
            "speed_ratio_mean_per_prompt": sum(per_prompt) / len(per_prompt) if per_prompt else float("nan"),
            "forwards": fwd,
            "tokens_per_forward": _ratio(tok, fwd),
            "overhead_frac": 1.0 - _ratio(fwd_s, wall),
            "peak_mem_mb": max(mems) if mems else None,
            "match_baseline_rate": (sum(bool(r.get("matches_baseline")) for r in sel) / len(sel)) if base else None,
        }
        if all(r.get("draft_forwards") is not None for r in sel):
            out["draft_forwards_per_token"] = _ratio(sum(r["draft_forwards"] for r in sel), tok)
        if same_kernel is not None:
            out["speed_ratio_same_kernel"] = against(sel, same_by_run)
        return out

    out = {}
    reps = sorted({r.get("rep", 0) for r in rows})
    for m in methods:
        sel = [r for r in rows if r["method"] == m]
        overall = figures(sel)
        if len(reps) > 1:
            for name, ref in (("speed_ratio", base_by_run), ("speed_ratio_same_kernel", same_by_run)):
                if name == "speed_ratio_same_kernel" and same_kernel is None:
                    continue
                per_rep = [against([r for r in sel if r.get("rep", 0) == k], ref) for k in reps]
                per_rep = [x for x in per_rep if not math.isnan(x)]
                if per_rep:
                    overall[f"{name}_per_rep"] = per_rep
                    overall[f"{name}_min"], overall[f"{name}_max"] = min(per_rep), max(per_rep)
        out[m] = {
            "overall": overall,
            "per_category": {c: figures([r for r in sel if r["category"] == c]) for c in cats
                             if any(r["category"] == c for r in sel)},
        }
    return out


def benchmark_speed(model, tokenizer, methods: Mapping[str, MethodLike], prompts: list[dict], *,
                    max_new_tokens: int = 128, warmup: int = 1, seed: int = 0, track_memory: bool = True,
                    progress: bool = True, model_name: str | None = None, tag: str = "speed",
                    repeats: int = 1, warmup_prompts: list[dict] | None = None,
                    same_kernel: str | None = None) -> dict[str, Any]:
    """Run the speed protocol of this module and return the result dict (nothing is written to disk).

    Args:
        model: a causal LM (its device is used for the prompts).
        tokenizer: its tokenizer, or ``None`` when every prompt row carries pre-tokenised ``input_ids``.
        methods: ``{name: method}``; see the module docstring for what a method may be. The baseline
            ``"greedy"`` is always run and may not be used as a method name.
        prompts: prompt rows (``id``, ``category`` and ``prompt`` or ``input_ids``), e.g. from
            :func:`hf_decoding_ext.bench.prompts.load_prompts`.
        max_new_tokens: the same budget for every run.
        warmup: number of leading prompts also run once per method beforehand, excluded from the figures (ignored
            when ``warmup_prompts`` is given).
        warmup_prompts: prompts outside the measured set, run once per method before the measurement; afterwards
            every persistent drafter (a ``custom_generate`` loop with a ``drafter``) is reset, so no method starts
            the measured runs with state learnt on them.
        repeats: passes over the prompts (each pass interleaved and rotated; the figures pool every pass, and
            ``overall`` gives the per-pass ratios and their spread).
        same_kernel: name of the method that is greedy decoding under the accelerators' CPU kernels
            (e.g. ``{"kernels": "auto", **GREEDY_KWARGS}``): every method then also reports
            ``speed_ratio_same_kernel``, its own speed-up apart from the kernel choice.
        seed: base seed; run on prompt ``i`` uses ``seed + i``.
        track_memory: measure the peak memory of each run.
        progress: show a tqdm bar (on stderr).
        model_name: name recorded in the results (default: from the model config).

    Returns:
        ``{"kind": "speed", "tag", "created", "model", "machine", "settings", "baseline", "methods": {name:
        {"kwargs", "overall": {...}, "per_category": {cat: {...}}}}, "rows": [...]}`` where the per-method
        figures are those of :func:`summarise` and each row holds ``prompt_id, category, method, order, wall_s,
        new_tokens, tokens_per_s, forwards, tokens_per_forward, peak_mem_mb, matches_baseline``.
    """
    from tqdm.auto import tqdm

    if BASELINE in methods:
        raise ValueError(f"{BASELINE!r} is the baseline and is always run; give a repeated greedy run another name "
                         f"(e.g. 'greedy-repeat')")
    if not prompts:
        raise ValueError("no prompts to benchmark")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    if same_kernel is not None and same_kernel not in methods:
        raise ValueError(f"same_kernel must name one of the methods, got {same_kernel!r}")
    ids = [p["id"] for p in prompts]
    if len(set(ids)) != len(ids):
        raise ValueError("prompt ids must be unique")

    device = model_device(model)
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = pad_token_id(model, tokenizer)
    entries: list[tuple[str, MethodLike]] = [(BASELINE, GREEDY_KWARGS), *methods.items()]

    def run(name, method, enc, s):
        kwargs = resolve_method(method, model, tokenizer)
        return generate_once(model, enc, kwargs, max_new_tokens, s, eos_ids, pad_id, track_memory)

    encoded = [encode_prompt(p, tokenizer, device) for p in prompts]
    warm = ([encode_prompt(p, tokenizer, device) for p in warmup_prompts] if warmup_prompts is not None
            else encoded[: min(warmup, len(prompts))])
    for i, enc in enumerate(warm):
        for name, method in tqdm(entries, desc=f"{tag}: warm-up", file=sys.stderr, disable=not progress,
                                 leave=False):
            run(name, method, enc, seed + i)
    if warmup_prompts is not None:
        reset_persistent(method for _, method in entries)

    rows: list[dict] = []
    passes = [(rep, i, p) for rep in range(repeats) for i, p in enumerate(prompts)]
    bar = tqdm(passes, desc=f"{tag}: runs", file=sys.stderr, disable=not progress)
    for rep, i, p in bar:
        k = (i + rep) % len(entries)
        order = entries[k:] + entries[:k]
        results = {}
        for pos, (name, method) in enumerate(order):
            r = run(name, method, encoded[i], seed + i)
            r.update(prompt_id=p["id"], category=p["category"], method=name, order=pos, rep=rep)
            results[name] = r
        base_ids = results[BASELINE]["token_ids"]
        for name, _ in entries:
            r = results[name]
            r["matches_baseline"] = r["token_ids"] == base_ids
            r["prompt_tokens"] = int(encoded[i]["input_ids"].shape[1])
            r.pop("token_ids")
            rows.append(r)
        if progress:
            bar.set_postfix({n: f"{results[n]['tokens_per_s']:.1f}t/s" for n, _ in entries[:4]})

    summary = summarise(rows, BASELINE, same_kernel)
    return {
        **result_header("speed", tag, model, model_name, device),
        "settings": {
            "max_new_tokens": max_new_tokens,
            "warmup_prompts": (f"{len(warm)} prompts outside the measured set, persistent drafters reset after"
                               if warmup_prompts is not None else min(warmup, len(prompts))),
            "repeats": repeats,
            "same_kernel_baseline": same_kernel,
            "seed": seed,
            "batch_size": 1,
            "n_prompts": len(prompts),
            "categories": list(dict.fromkeys(p["category"] for p in prompts)),
            "order": "interleaved per prompt, rotated by prompt index",
            "headline": "speed_ratio = method tokens/s over baseline tokens/s on the same prompts "
                        "(ratio of totals); speed_ratio_mean_per_prompt is the mean of per-prompt ratios",
            "new_tokens": "generated tokens up to and including the first eos",
            "forwards": "calls of the target model's forward (forward hook); tokens_per_forward = new_tokens / "
                        "forwards",
            "overhead_frac": "share of wall time spent outside the target model's forwards (decoding loop, "
                             "drafting, acceptance; a draft model's forwards count here too)",
            "peak_mem": rows[0].get("peak_mem_kind"),
        },
        "baseline": BASELINE,
        "methods": {name: {"kwargs": describe_kwargs(method), **summary[name]} for name, method in entries},
        "rows": rows,
    }
