"""JSONSchemaBench on the default model: coverage, compliance, efficiency, and the mask tests.

From "Generating Structured Outputs from Language Models: Benchmark and Studies" (Geng et al., arXiv 2501.10868).
The shipped sample (``hf_decoding_ext/data/jsonschemabench/``, MIT-licensed benchmark data, provenance in that folder)
holds two subsets (Glaiveai2K, Github_easy) and the MaskBench test cases (valid and invalid instances per schema).

Metrics (the paper's):

* declared coverage: share of schemas the engine accepts (compiles without error);
* empirical coverage: share of schemas whose constrained output parses as JSON and validates under Draft 2020-12;
* compliance: empirical coverage / declared coverage (on the declared-covered schemas);
* efficiency: grammar compile time, time per output token constrained vs unconstrained, and the mask cost per token
  against an unconstrained decoding step.

MaskBench (no model): for every schema the engine declares covered, every valid instance must be accepted token by
token and end in an accepting state, and every invalid instance must be rejected (a token refused or a non-accepting
end state).
"""

from __future__ import annotations

import functools
import json
import statistics
import time
from collections.abc import Iterable

import torch

from hf_decoding_ext.structured.deferred import DeferredDeadEnd, deferred_rows_for
from hf_decoding_ext.structured.grammar import GrammarEngineError, RowMatchers, compile_grammar, eos_ids_of, json_schema
from hf_decoding_ext.core.resources import read_jsonl

SYSTEM_PROMPT = "You need to generate a JSON object that matches the schema below."


def _read(name: str) -> list[dict]:
    return read_jsonl("jsonschemabench", name)


def load_schemas(subsets: Iterable[str] | None = None, limit: int | None = None) -> list[dict]:
    """Generation schemas ``{"subset", "id", "schema"}``; ``limit`` per subset, spread evenly over the subset."""
    rows = _read("schemas.jsonl.gz")
    return _select(rows, subsets, limit)


def load_maskbench(subsets: Iterable[str] | None = None, limit: int | None = None) -> list[dict]:
    """MaskBench cases ``{"subset", "id", "schema", "tests": [{"valid", "data", "description"}, ...]}``."""
    return _select(_read("maskbench.jsonl.gz"), subsets, limit)


def declared_schemas(model, tokenizer, rows: list[dict] | None = None, limit: int | None = None) -> list[dict]:
    """The rows (default: every shipped schema) whose schema the engine compiles for ``model``'s tokenizer, in
    order, at most ``limit``."""
    eos = eos_ids_of(model, tokenizer)
    vocab = max(model.config.vocab_size, len(tokenizer))
    out = []
    for row in load_schemas() if rows is None else rows:
        try:
            compile_grammar(tokenizer, json_schema(row["schema"]), eos, vocab)
        except ValueError:
            continue
        out.append(row)
        if limit is not None and len(out) == limit:
            break
    return out


def _select(rows: list[dict], subsets, limit) -> list[dict]:
    if subsets is not None:
        subsets = set(subsets)
        rows = [r for r in rows if r["subset"] in subsets]
    if limit is None:
        return rows
    out = []
    for s in sorted({r["subset"] for r in rows}):
        sub = [r for r in rows if r["subset"] == s]
        step = max(1, len(sub) // limit)
        out.extend(sub[::step][:limit])
    return out


# ------------------------------------------------------------------------------------------------ mask tests
def check_instance(compiled, tokenizer, instance, deferred=None) -> tuple[bool, int, list[float]]:
    """Feed ``json.dumps(instance)`` token by token. Returns ``(accepted, tokens, mask_seconds_per_step)``:
    accepted = every token allowed by the mask and the end state accepting (eos allowed). ``deferred``: the
    :class:`~hf_decoding_ext.structured.deferred.DeferredRows` of a grammar built with ``unmaskable="validate"``
    (each token is then also checked as the processor's mask checks it)."""
    ids = tokenizer.encode(json.dumps(instance, ensure_ascii=False), add_special_tokens=False)
    rows = RowMatchers(compiled, 1)
    m = rows.matchers[0]
    times = []
    for i, tok in enumerate(ids):
        t0 = time.perf_counter()
        allowed = rows.allowed(compiled.vocab_size)[0]  # GrammarEngineError on an engine limit
        if deferred is not None:
            allowed = deferred.filter([ids[:i]], allowed[None])[0]
        times.append(time.perf_counter() - t0)
        if not bool(allowed[tok]) or not m.consume_token(tok):
            return False, len(ids), times
    allowed = rows.allowed(compiled.vocab_size)[0]
    if deferred is not None:
        allowed = deferred.filter([ids], allowed[None])[0]
    return bool(any(bool(allowed[e]) for e in compiled.eos_token_ids)), len(ids), times


def run_mask_tests(tokenizer, entries: list[dict], progress: bool = True, whitespace_flexible: bool = True,
                   **schema_options) -> dict:
    """MaskBench over ``entries``: declared coverage, valid instances blocked, invalid instances admitted, compile
    and per-mask times. Instances are serialised with ``json.dumps(..., ensure_ascii=False)`` (separators ``", "``,
    ``": "``, raw UTF-8 rather than ``\\u`` escapes, which the engine admits only for control characters). An engine
    error (an internal limit such as ``LexerTooComplex``) counts as not accepting and is listed in
    ``engine_errors``. ``schema_options``: arguments of :func:`~hf_decoding_ext.structured.grammar.json_schema`
    (``unknown_formats``, ``one_of``)."""
    import warnings

    from tqdm.auto import tqdm

    eos = eos_ids_of(None, tokenizer)
    res = {"schemas": 0, "declared": 0, "valid": 0, "valid_blocked": 0, "invalid": 0, "invalid_admitted": 0,
           "failures": [], "unsupported": {}, "compile_seconds": [], "mask_seconds": [], "engine_errors": [],
           "deferred_schemas": 0, "valid_blocked_by_deferred_check": 0}
    for e in tqdm(entries, desc="mask tests", disable=not progress):
        res["schemas"] += 1
        try:
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the schema rewrites are reported by the widening's own test
                grammar = json_schema(e["schema"], whitespace_flexible=whitespace_flexible, **schema_options)
            compiled = compile_grammar(tokenizer, grammar, eos, warn=False)
            deferred = deferred_rows_for(grammar, compiled)
            res["deferred_schemas"] += deferred is not None
            res["compile_seconds"].append(time.perf_counter() - t0)
        except ValueError as err:
            key = str(err).split(":", 1)[-1].strip()[:80]
            res["unsupported"][key] = res["unsupported"].get(key, 0) + 1
            continue
        res["declared"] += 1
        for t in e["tests"]:
            try:
                ok, _, times = check_instance(compiled, tokenizer, t["data"], deferred)
            except GrammarEngineError as err:  # the engine gave up (a resource limit): the instance is not accepted
                ok, times = False, []
                res["engine_errors"].append({"id": f"{e['subset']}---{e['id']}", "valid": t["valid"],
                                             "error": str(err)})
            res["mask_seconds"].extend(times)
            if t["valid"]:
                res["valid"] += 1
                if not ok:
                    res["valid_blocked"] += 1
                    failure = {"id": f"{e['subset']}---{e['id']}", "valid": True, "description": t.get("description")}
                    if deferred is not None:  # blocked by the engine's mask of the relaxed schema, or by a check?
                        try:
                            by_grammar = not check_instance(compiled, tokenizer, t["data"])[0]
                        except GrammarEngineError:
                            by_grammar = True
                        failure["blocked_by"] = "engine" if by_grammar else "deferred check"
                        res["valid_blocked_by_deferred_check"] += int(not by_grammar)
                    res["failures"].append(failure)
            else:
                res["invalid"] += 1
                if ok:
                    res["invalid_admitted"] += 1
                    res["failures"].append({"id": f"{e['subset']}---{e['id']}", "valid": False,
                                            "description": t.get("description"),
                                            "error": t.get("python_error", "")[:200]})
    return res


def summarise_masks(res: dict) -> dict:
    """Rates and percentiles of a :func:`run_mask_tests` result (times in microseconds)."""
    ms = sorted(res["mask_seconds"])
    cs = sorted(res["compile_seconds"])

    def pct(xs, q):
        return 1e6 * xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None

    return {
        "schemas": res["schemas"], "declared": res["declared"],
        "declared_coverage": res["declared"] / max(1, res["schemas"]),
        "valid_instances": res["valid"], "valid_blocked": res["valid_blocked"],
        "invalid_instances": res["invalid"], "invalid_admitted": res["invalid_admitted"],
        "deferred_schemas": res.get("deferred_schemas", 0),
        "valid_blocked_by_deferred_check": res.get("valid_blocked_by_deferred_check", 0),
        "valid_blocked_by_engine_with_deferral": sum(1 for f in res["failures"] if f.get("blocked_by") == "engine"),
        "mask_us": {"p50": pct(ms, 0.5), "p90": pct(ms, 0.9), "p99": pct(ms, 0.99), "max": pct(ms, 1.0),
                    "mean": 1e6 * statistics.fmean(ms) if ms else None, "n": len(ms)},
        "compile_us": {"p50": pct(cs, 0.5), "p90": pct(cs, 0.9), "p99": pct(cs, 0.99), "max": pct(cs, 1.0)},
        "unsupported_top": dict(sorted(res["unsupported"].items(), key=lambda kv: -kv[1])[:15]),
        "failures": res["failures"][:50],
        "engine_errors": res["engine_errors"][:50],
        "instances_serialised_as": "json.dumps(instance, ensure_ascii=False)",
    }


# ------------------------------------------------------------------------------------------------ generation
DEMONSTRATIONS = [
    ({"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
      "required": ["city", "population"]},
     {"city": "Lyon", "population": 522000}),
    ({"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}},
                                       "active": {"type": "boolean"}}, "required": ["tags"]},
     {"tags": ["red", "blue"], "active": True}),
]
"""Two short schema -> instance demonstrations (written for this library) used by the few-shot prompt."""


def schema_prompt(tokenizer, schema: dict, device=None, shots: int = 0):
    """The benchmark's prompt, chat-formatted for the default model: the system instruction, ``shots`` (0-2)
    demonstrations as user/assistant turns (:data:`DEMONSTRATIONS`, short instances), then the schema."""
    from hf_decoding_ext.core.models import encode_prompts

    if not 0 <= shots <= len(DEMONSTRATIONS):
        raise ValueError(f"shots must be in [0, {len(DEMONSTRATIONS)}]")
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    for demo_schema, demo_instance in DEMONSTRATIONS[:shots]:
        messages += [{"role": "user", "content": json.dumps(demo_schema)},
                     {"role": "assistant", "content": json.dumps(demo_instance)}]
    messages.append({"role": "user", "content": json.dumps(schema)})
    return encode_prompts(tokenizer, [messages], device=device)


@functools.lru_cache(maxsize=1)
def _format_checker():
    """The benchmark's format checker: jsonschema's, plus ``ipv4``, ``ipv6`` and ``uuid`` as the benchmark's
    validator adds them (its formats are asserted, unlike plain Draft 2020-12)."""
    import ipaddress
    import uuid

    import jsonschema

    checker = jsonschema.FormatChecker()

    def _string_check(parse):
        def check(value) -> bool:
            if isinstance(value, str):
                parse(value)  # raises ValueError when malformed
            return True
        return check

    checker.checks("ipv4", raises=ValueError)(_string_check(ipaddress.IPv4Address))
    checker.checks("ipv6", raises=ValueError)(_string_check(ipaddress.IPv6Address))
    checker.checks("uuid", raises=ValueError)(_string_check(uuid.UUID))
    return checker


def _refuse_remote(uri: str):
    from referencing.exceptions import NoSuchResource

    raise NoSuchResource(ref=uri)


def validate_output(text: str, schema: dict) -> tuple[bool, str]:
    """``(valid, reason)``: ``text`` parses as JSON and validates under Draft 2020-12 with the benchmark's format
    checks (``format`` asserted, as the benchmark's validator does). The schema is checked first; remote ``$ref``s
    are never fetched (they fail validation); every exception of the validator is caught and reported."""
    import jsonschema
    from referencing import Registry

    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as err:
        return False, f"not JSON: {str(err)[:200]}"
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as err:
        return False, f"schema error: {err.message[:200]}"
    except Exception as err:  # noqa: BLE001 - a broken schema must not stop the run
        return False, f"schema error: {type(err).__name__}: {str(err)[:200]}"
    try:
        validator = jsonschema.Draft202012Validator(schema, format_checker=_format_checker(),
                                                    registry=Registry(retrieve=_refuse_remote))
        validator.validate(value)
    except jsonschema.ValidationError as err:
        return False, f"invalid: {err.message[:200]}"
    except Exception as err:  # noqa: BLE001 - unresolvable $ref, recursion, a format checker's own error, ...
        return False, f"validator error: {type(err).__name__}: {str(err)[:200]}"
    return True, ""


class _TokenClock:
    """A streamer that records when each generated token arrives (the first ``put`` is the prompt)."""

    def __init__(self):
        self.times: list[float] = []
        self.calls = 0

    def put(self, value):
        self.calls += 1
        if self.calls > 1:
            self.times.append(time.perf_counter())

    def end(self):
        pass


def generate_for_schema(model, tokenizer, schema: dict, max_new_tokens: int = 384, constrained: bool = True,
                        shots: int = 0, budget: bool = False, **options) -> dict:
    """One greedy generation for ``schema`` (``shots`` demonstrations in the prompt); with ``constrained`` the
    JSON-schema processor is used, with ``budget`` it is told ``max_new_tokens`` (budget-aware completion);
    ``options``: other arguments of the processor (``max_string_length``, ...).

    Returns ``{"text", "tokens", "seconds", "decode_seconds", "mask_seconds", "compile_seconds", "complete",
    "error"}``: ``decode_seconds`` runs from the first generated token to the last (no prefill), over
    ``tokens - 1`` steps; ``error`` is the grammar engine's error if it stopped mid-generation (the text is then
    what was generated before).
    """
    from hf_decoding_ext.structured.json_schema import JsonSchemaLogitsProcessor

    inputs = schema_prompt(tokenizer, schema, device=model.device, shots=shots)
    clock = _TokenClock()
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                  streamer=clock)
    proc = None
    compile_seconds = 0.0
    if constrained:
        t0 = time.perf_counter()
        proc = JsonSchemaLogitsProcessor.for_model(model, tokenizer, schema=schema,
                                                   max_new_tokens=max_new_tokens if budget else None, **options)
        compile_seconds = time.perf_counter() - t0
        kwargs["logits_processor"] = [proc]
    error = None
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            out = model.generate(**inputs, **kwargs)
        new = out[0, inputs["input_ids"].shape[1]:]
    except (GrammarEngineError, DeferredDeadEnd) as err:  # an engine limit, or a dead end of the deferred checks
        error = f"{type(err).__name__}: {str(err)[:300]}"
        new = torch.tensor(proc.rows.consumed[0] if proc is not None and proc.rows is not None else [])
    seconds = time.perf_counter() - t0
    eos = set(eos_ids_of(model, tokenizer))
    n = len(new)
    while n and int(new[n - 1]) in eos | {tokenizer.pad_token_id}:
        n -= 1
    decode_seconds = clock.times[-1] - clock.times[0] if len(clock.times) > 1 else 0.0
    return {"text": tokenizer.decode(new[:n], skip_special_tokens=True), "tokens": int(new.shape[0]),
            "seconds": seconds, "decode_seconds": decode_seconds,
            "mask_seconds": proc.mask_seconds if proc is not None else 0.0,
            "compile_seconds": compile_seconds,
            "complete": (error is None and proc.is_complete(0, out)) if proc is not None else None, "error": error,
            "tight_steps": proc.budget.tight_steps if proc is not None and proc.budget is not None else None}


RUN_KINDS = ("budgeted", "constrained", "unconstrained")
"""The generations per schema: constrained with the budget-aware processor, constrained without a budget, and
unconstrained; all with the same ``max_new_tokens``."""


def run_generation(model, tokenizer, entries: list[dict], max_new_tokens: int = 384, unconstrained: bool = True,
                   progress: bool = True, log=None, shots: int = 0, kinds: Iterable[str] = RUN_KINDS,
                   **options) -> dict:
    """Greedy generation over ``entries`` for each of ``kinds`` (interleaved, the order rotated per schema) with the
    same token budget; per-schema rows and per-subset metrics. ``log``: optional file-like object receiving one line
    per schema. ``options``: processor arguments of the budgeted run (``max_string_length``, ...)."""
    from tqdm.auto import tqdm

    eos = eos_ids_of(model, tokenizer)
    kinds = [k for k in kinds if unconstrained or k != "unconstrained"]
    rows = []
    for i, e in enumerate(tqdm(entries, desc="JSONSchemaBench", disable=not progress)):
        row = {"subset": e["subset"], "id": e["id"]}
        try:
            t0 = time.perf_counter()
            compile_grammar(tokenizer, json_schema(e["schema"]), eos, max(model.config.vocab_size, len(tokenizer)))
            row["compile_seconds"] = time.perf_counter() - t0
            row["declared"] = True
        except ValueError as err:
            row["declared"] = False
            row["unsupported"] = str(err)[:200]
        runs = [k for k in kinds if row["declared"] or k == "unconstrained"]
        shift = i % max(1, len(runs))
        for kind in runs[shift:] + runs[:shift]:
            r = generate_for_schema(model, tokenizer, e["schema"], max_new_tokens, constrained=kind != "unconstrained",
                                    shots=shots, budget=kind == "budgeted", **(options if kind == "budgeted" else {}))
            ok, reason = validate_output(r["text"], e["schema"])
            row[kind] = {**{k: r[k] for k in ("tokens", "seconds", "decode_seconds", "mask_seconds", "complete",
                                              "error", "tight_steps")},
                         "valid": ok, "reason": reason, "text": r["text"][:2000]}
        rows.append(row)
        if log is not None:
            log.write(f"[{i + 1}/{len(entries)}] {e['subset']}/{e['id']} declared={row['declared']} "
                      + " ".join(f"{k}_valid={row[k]['valid']}" for k in runs if k in row) + "\n")
            log.flush()
    return {"rows": rows, "metrics": metrics(rows)}


def _tpot(runs: list[dict]) -> float | None:
    """Seconds per output token without the prefill: decoding time over the steps after the first token."""
    steps = sum(max(0, r["tokens"] - 1) for r in runs)
    return sum(r["decode_seconds"] for r in runs) / steps if steps else None


def metrics(rows: list[dict]) -> dict:
    """Per-subset and overall coverage, compliance, budget and efficiency figures from :func:`run_generation`
    rows. ``compliance`` is that of the budgeted runs when they exist (the processor as users should run it), else
    of the unbudgeted constrained runs; both are reported."""
    out = {}
    for subset in sorted({r["subset"] for r in rows}) + ["all"]:
        rs = [r for r in rows if subset in ("all", r["subset"])]
        n = len(rs)
        dec = [r for r in rs if r["declared"]]
        m = {"schemas": n, "declared_coverage": len(dec) / n if n else None}
        for kind in ("budgeted", "constrained"):
            runs = [r[kind] for r in dec if kind in r]
            if not runs:
                continue
            valid = sum(x["valid"] for x in runs)
            complete = [x for x in runs if x["complete"]]
            m[kind] = {
                "empirical_coverage": valid / n if n else None,
                "compliance": valid / len(runs),
                "compliance_of_completed": (sum(x["valid"] for x in complete) / len(complete)) if complete else None,
                "cut_by_budget": sum(1 for x in runs if not x["complete"] and not x["error"]) / len(runs),
                "engine_errors": sum(1 for x in runs if x["error"]),
                "tpot_ms": 1e3 * (_tpot(runs) or 0),
                "mask_ms_per_token": 1e3 * sum(x["mask_seconds"] for x in runs) / max(1, sum(x["tokens"] for x in runs)),
                "mean_tokens": sum(x["tokens"] for x in runs) / len(runs),
            }
        pref = m.get("budgeted") or m.get("constrained") or {}
        m["empirical_coverage"] = pref.get("empirical_coverage")
        m["compliance"] = pref.get("compliance")
        unc = [r["unconstrained"] for r in rs if "unconstrained" in r]
        m["unconstrained_valid"] = sum(x["valid"] for x in unc) / len(unc) if unc else None
        tpot_u = _tpot(unc) if unc else None
        m["tpot_unconstrained_ms"] = 1e3 * tpot_u if tpot_u else None
        for kind in ("budgeted", "constrained"):
            if kind in m and tpot_u:
                m[kind]["tpot_ratio"] = m[kind]["tpot_ms"] / (1e3 * tpot_u)
                m[kind]["mask_share_of_unconstrained_step"] = m[kind]["mask_ms_per_token"] / (1e3 * tpot_u)
        both = [r for r in dec if "budgeted" in r and "constrained" in r]
        if both:
            m["budget_vs_unbudgeted"] = {
                "schemas": len(both),
                "identical_output": sum(r["budgeted"]["text"] == r["constrained"]["text"] for r in both) / len(both),
                "valid_unbudgeted_only": sum(r["constrained"]["valid"] and not r["budgeted"]["valid"] for r in both),
                "valid_budgeted_only": sum(r["budgeted"]["valid"] and not r["constrained"]["valid"] for r in both),
                "identical_where_unbudgeted_completed": (
                    sum(r["budgeted"]["text"] == r["constrained"]["text"] for r in both if r["constrained"]["complete"])
                    / max(1, sum(1 for r in both if r["constrained"]["complete"]))),
                "tight_steps_mean": sum(r["budgeted"]["tight_steps"] or 0 for r in both) / len(both),
            }
        m["compile_ms_median"] = 1e3 * statistics.median([r["compile_seconds"] for r in dec]) if dec else None
        m["compile_ms_max"] = 1e3 * max(r["compile_seconds"] for r in dec) if dec else None
        out[subset] = m
    return out


def plot_jsonschemabench(result: dict, path) -> None:
    """Bar plot: coverage and compliance per subset, and time per output token constrained vs unconstrained."""
    from hf_decoding_ext.bench.plot import _plt

    plt = _plt()
    m = result["generation"]["metrics"]
    subsets = [s for s in m if s != "all"] + ["all"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.25
    xs = range(len(subsets))
    bars = [("declared coverage", lambda d: d["declared_coverage"]),
            ("compliance, budgeted", lambda d: (d.get("budgeted") or {}).get("compliance")),
            ("compliance, no budget", lambda d: (d.get("constrained") or {}).get("compliance"))]
    for j, (label, get) in enumerate(bars):
        axes[0].bar([x + (j - 1) * width for x in xs], [get(m[s]) or 0 for s in subsets], width, label=label)
    axes[0].set_xticks(list(xs), subsets)
    axes[0].set_ylim(0, 1.05)
    axes[0].set_title("JSONSchemaBench (llguidance, SmolLM2-135M-Instruct, greedy)")
    axes[0].legend(fontsize=8, loc="lower right")
    bars = [("unconstrained", lambda d: d["tpot_unconstrained_ms"]),
            ("budgeted", lambda d: (d.get("budgeted") or {}).get("tpot_ms")),
            ("mask + budget only", lambda d: (d.get("budgeted") or {}).get("mask_ms_per_token"))]
    for j, (label, get) in enumerate(bars):
        axes[1].bar([x + (j - 1) * width for x in xs], [get(m[s]) or 0 for s in subsets], width, label=label)
    axes[1].set_xticks(list(xs), subsets)
    axes[1].set_ylabel("ms per output token (no prefill)")
    axes[1].set_title("time per output token")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
