"""Tree sizes tuned by measurement: the verify-cost curve of the running device and acceptance statistics.

A drafter's ``max_nodes="auto"`` resolves, at the start of each ``generate()`` call, to the node count ``k`` that
maximises the expected tokens per unit of verification cost, ``(1 + sum(gains[:k])) / cost(k + 1)``
(:func:`~hf_decoding_ext.speculative.policies.tree_policy.node_budget`), from two measurements:

* ``cost``: :func:`device_curve`, the cost of a verification forward over ``n`` tokens relative to a 1-token forward,
  measured on the model and device in use, with the engine's kernels, the first time a model of that shape and dtype
  runs on this machine (a few seconds), then cached in ``$HF_DECODING_EXT_CACHE/verify_cost/``;
* ``gains``: :func:`shipped_gains`, for each node of the drafter's tree in its own order, the share of steps in
  which it was accepted, counted by ``scripts/tune_drafters.py`` over the self-distillation prompts
  (``hf_decoding_ext/data/prompts/distill.jsonl``, never the benchmark prompts) with the whole tree verified, and
  shipped in ``hf_decoding_ext/data/acceptance/gains.json`` (:func:`acceptance_gains` counts them from the engine's
  :class:`~hf_decoding_ext.speculative.engine.StepStats`).

Because a drafter's nodes come parents first in priority order, cutting the tree to its first ``k`` nodes keeps a
valid tree whose nodes are accepted exactly when they were in the whole tree, so ``sum(gains[:k])`` is the expected
number of accepted draft tokens with ``k`` nodes. Drafting time is not in the rule (it is small next to a verification
forward for the training-free drafters and one head forward per depth for the trained heads).

Example:
    >>> from hf_decoding_ext.speculative.policies.tuning import acceptance_gains
    >>> from hf_decoding_ext.speculative.engine import StepStats
    >>> stats = [StepStats(3, 2, 3, 0, 0, 0, (0, 1)), StepStats(3, 1, 2, 0, 0, 0, (2,)), StepStats(1, 0, 1, 0, 0, 0)]
    >>> acceptance_gains(stats)
    [0.3333333333333333, 0.5, 0.5]
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from pathlib import Path

import torch

from hf_decoding_ext.core.kernels import _PLAN_VERSION, _machine_fingerprint, fast_kernels
from hf_decoding_ext.core.resources import data_file
from hf_decoding_ext.speculative.policies.tree_policy import VerifyCostCurve

__all__ = ["COST_SIZES", "acceptance_gains", "device_curve", "measure_verify_cost", "shipped_entry",
           "shipped_gains"]

COST_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96)
"""Forward sizes (new tokens) :func:`device_curve` measures."""

GAINS_FILE = ("acceptance", "gains.json")

_CURVES: dict[str, VerifyCostCurve] = {}
_BY_MODEL: dict[tuple, VerifyCostCurve] = {}
"""Curves by (model id, dtype, kernels, threads) within the process: ``generate()`` calls skip the model key."""


def acceptance_gains(stats, max_nodes: int | None = None) -> list[float]:
    """Per node index ``i`` (the drafter's order): accepted count / number of steps whose tree had a node ``i``
    (the drafter's node ids when a step's tree dropped some, :attr:`StepStats.drafted_nodes`).

    Args:
        stats: :class:`~hf_decoding_ext.speculative.engine.StepStats` of one or more calls (``accepted_nodes`` set).
        max_nodes: length of the result (``None``: the largest tree seen). Nodes never drafted get gain 0.
    """
    stats = list(stats)

    def drafted(s):
        return range(s.draft_size) if s.drafted_nodes is None else s.drafted_nodes

    size = max((max(drafted(s), default=-1) + 1 for s in stats), default=0) if max_nodes is None else max_nodes
    seen, accepted = [0] * size, [0] * size
    for s in stats:
        for i in drafted(s):
            if i < size:
                seen[i] += 1
        for i in s.accepted_nodes:
            if i < size:
                accepted[i] += 1
    return [a / n if n else 0.0 for a, n in zip(accepted, seen)]


def shipped_entry(name: str) -> dict | None:
    """The whole entry shipped for the drafter configuration ``name`` in ``data/acceptance/gains.json`` (``gains``,
    and for token recycling the node ``paths`` they belong to), or ``None``."""
    try:
        data = json.loads(data_file(*GAINS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get("drafters", {}).get(name)


def shipped_gains(name: str) -> list[float] | None:
    """The acceptance gains shipped for the registered drafter configuration ``name`` (``None`` if there are none).
    They were counted on the default model: for another target they are a prior, not a measurement."""
    entry = shipped_entry(name)
    return None if entry is None else [float(g) for g in entry["gains"]]


def _model_key(model, kernels) -> str:
    cfg = model.config.to_json_string(use_diff=False) if hasattr(model.config, "to_json_string") else str(model.config)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    name = device.type if device.type == "cpu" else torch.cuda.get_device_name(device) if device.type == "cuda" \
        else device.type
    text = f"{_machine_fingerprint()}|{name}|{dtype}|{kernels}|plan-v{_PLAN_VERSION}|{cfg}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@torch.inference_mode()
def measure_verify_cost(model, kernels="auto", sizes=COST_SIZES, context: int = 128, reps: int = 5,
                        budget_s: float = 8.0) -> VerifyCostCurve:
    """Measure the median time of a forward over ``n`` new tokens (a cached prefix of ``context`` random tokens, a
    causal block as the engine verifies a chain) for each ``n`` of ``sizes``, interleaved over ``reps`` rounds after
    a warm-up round, relative to the 1-token forward, with the engine's ``kernels``. ``budget_s`` lowers the rounds
    (at least 2) for slow models."""
    sizes = tuple(sorted(set(int(n) for n in sizes) | {1}))
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prefix = torch.randint(0, vocab, (1, context), generator=gen).to(device)
    times: dict[int, list[float]] = {n: [] for n in sizes}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with fast_kernels(model, plan=kernels):
        cache = model(input_ids=prefix, use_cache=True).past_key_values
        rounds, started = reps + 1, time.perf_counter()
        r = 0
        while r < rounds:
            for n in sizes:
                ids = torch.randint(0, vocab, (1, n), generator=gen).to(device)
                sync()
                t0 = time.perf_counter()
                model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=n)
                sync()
                if r:
                    times[n].append(time.perf_counter() - t0)
                cache.crop(-n)
            if r == 0:  # after the warm-up round: fit the rounds into the budget
                spent = time.perf_counter() - started
                rounds = 1 + max(2, min(reps, int(budget_s / max(spent, 1e-6))))
            r += 1
    base = statistics.median(times[1])
    return VerifyCostCurve(sizes, tuple(max(statistics.median(times[n]) / base, 1e-3) for n in sizes),
                           f"measured on {device} ({next(model.parameters()).dtype}, kernels={kernels})")


def device_curve(model, kernels="auto") -> VerifyCostCurve:
    """The verify-cost curve of ``model`` on its device with ``kernels``: measured once per machine, model shape,
    dtype and kernels (:func:`measure_verify_cost`), then read from ``$HF_DECODING_EXT_CACHE/verify_cost/``."""
    from hf_decoding_ext.core.models import cache_dir

    param = next(model.parameters())
    fast = (id(model), id(model.config), param.dtype, param.device, str(kernels), torch.get_num_threads())  # no config serialisation per generate() call
    if fast in _BY_MODEL:
        return _BY_MODEL[fast]
    key = _model_key(model, kernels if isinstance(kernels, str) else repr(kernels))
    if key in _CURVES:
        _BY_MODEL[fast] = _CURVES[key]
        return _CURVES[key]
    path = cache_dir() / "verify_cost" / f"{key}.json"
    curve = None
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        curve = VerifyCostCurve(tuple(data["tokens"]), tuple(data["cost"]), data.get("source", str(path)))
    except (OSError, ValueError, KeyError):
        curve = measure_verify_cost(model, kernels=kernels)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"tokens": curve.tokens, "cost": curve.cost, "source": curve.source}),
                           encoding="utf-8")
            os.replace(tmp, path)
        except OSError:
            pass
    _CURVES[key] = _BY_MODEL[fast] = curve
    return curve
