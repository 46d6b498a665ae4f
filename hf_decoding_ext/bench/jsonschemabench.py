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

import json
import statistics
import time
from collections.abc import Iterable

import torch

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
def check_instance(compiled, tokenizer, instance) -> tuple[bool, int, list[float]]:
    """Feed ``json.dumps(instance)`` token by token. Returns ``(accepted, tokens, mask_seconds_per_step)``:
    accepted = every token allowed by the mask and the end state accepting (eos allowed)."""
    ids = tokenizer.encode(json.dumps(instance, ensure_ascii=False), add_special_tokens=False)
    rows = RowMatchers(compiled, 1)
    m = rows.matchers[0]
    times = []
    for tok in ids:
        t0 = time.perf_counter()
        allowed = rows.allowed(compiled.vocab_size)[0]  # GrammarEngineError on an engine limit
        times.append(time.perf_counter() - t0)
        if not bool(allowed[tok]) or not m.consume_token(tok):
            return False, len(ids), times
    allowed = rows.allowed(compiled.vocab_size)[0]
    return bool(any(bool(allowed[e]) for e in compiled.eos_token_ids)), len(ids), times


def run_mask_tests(tokenizer, entries: list[dict], progress: bool = True, whitespace_flexible: bool = True) -> dict:
    """MaskBench over ``entries``: declared coverage, valid instances blocked, invalid instances admitted, compile
    and per-mask times. Instances are serialised with ``json.dumps(..., ensure_ascii=False)`` (separators ``", "``,
    ``": "``, raw UTF-8 rather than ``\\u`` escapes, which the engine admits only for control characters). An engine
    error (an internal limit such as ``LexerTooComplex``) counts as not accepting and is listed in
    ``engine_errors``."""
    from tqdm.auto import tqdm

    eos = eos_ids_of(None, tokenizer)
    res = {"schemas": 0, "declared": 0, "valid": 0, "valid_blocked": 0, "invalid": 0, "invalid_admitted": 0,
           "failures": [], "unsupported": {}, "compile_seconds": [], "mask_seconds": [], "engine_errors": []}
    for e in tqdm(entries, desc="mask tests", disable=not progress):
        res["schemas"] += 1
        try:
            t0 = time.perf_counter()
            compiled = compile_grammar(tokenizer, json_schema(e["schema"], whitespace_flexible=whitespace_flexible),
                                       eos)
            res["compile_seconds"].append(time.perf_counter() - t0)
        except ValueError as err:
            key = str(err).split(":", 1)[-1].strip()[:80]
            res["unsupported"][key] = res["unsupported"].get(key, 0) + 1
            continue
        res["declared"] += 1
        for t in e["tests"]:
            try:
                ok, _, times = check_instance(compiled, tokenizer, t["data"])
            except GrammarEngineError as err:  # the engine gave up (a resource limit): the instance is not accepted
                ok, times = False, []
                res["engine_errors"].append({"id": f"{e['subset']}---{e['id']}", "valid": t["valid"],
                                             "error": str(err)})
            res["mask_seconds"].extend(times)
            if t["valid"]:
                res["valid"] += 1
                if not ok:
                    res["valid_blocked"] += 1
                    res["failures"].append({"id": f"{e['subset']}---{e['id']}", "valid": True,
                                            "description": t.get("description")})
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


def validate_output(text: str, schema: dict) -> tuple[bool, str]:
    """``(valid, reason)``: ``text`` parses as JSON and validates under Draft 2020-12."""
    import jsonschema

    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        return False, f"not JSON: {err}"
    try:
        jsonschema.Draft202012Validator(schema).validate(value)
    except jsonschema.ValidationError as err:
        return False, f"invalid: {err.message[:200]}"
    except jsonschema.SchemaError as err:
        return False, f"schema error: {err.message[:200]}"
    return True, ""


def generate_for_schema(model, tokenizer, schema: dict, max_new_tokens: int = 384, constrained: bool = True,
                        shots: int = 0) -> dict:
    """One greedy generation for ``schema`` (``shots`` demonstrations in the prompt); with ``constrained`` the
    JSON-schema processor is used.

    Returns ``{"text", "tokens", "seconds", "mask_seconds", "compile_seconds", "complete"}``.
    """
    from hf_decoding_ext.structured.json_schema import JsonSchemaLogitsProcessor

    inputs = schema_prompt(tokenizer, schema, device=model.device, shots=shots)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    proc = None
    compile_seconds = 0.0
    if constrained:
        t0 = time.perf_counter()
        proc = JsonSchemaLogitsProcessor.for_model(model, tokenizer, schema=schema)
        compile_seconds = time.perf_counter() - t0
        kwargs["logits_processor"] = [proc]
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, **kwargs)
    seconds = time.perf_counter() - t0
    new = out[0, inputs["input_ids"].shape[1]:]
    eos = set(eos_ids_of(model, tokenizer))
    n = len(new)
    while n and int(new[n - 1]) in eos | {tokenizer.pad_token_id}:
        n -= 1
    return {"text": tokenizer.decode(new[:n], skip_special_tokens=True), "tokens": int(new.shape[0]),
            "seconds": seconds, "mask_seconds": proc.mask_seconds if proc is not None else 0.0,
            "compile_seconds": compile_seconds, "complete": proc.is_complete(0) if proc is not None else None}


def run_generation(model, tokenizer, entries: list[dict], max_new_tokens: int = 384, unconstrained: bool = True,
                   progress: bool = True, log=None, unconstrained_max_new_tokens: int = 128,
                   shots: int = 0) -> dict:
    """Constrained (and, interleaved, unconstrained) greedy generation over ``entries``; per-schema rows and
    per-subset metrics. ``log``: optional file-like object receiving one line per schema. The unconstrained runs
    (validity of free generation and the time per token baseline) stop at ``unconstrained_max_new_tokens``."""
    from tqdm.auto import tqdm

    eos = eos_ids_of(model, tokenizer)
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
        runs = []
        if row["declared"]:
            runs.append("constrained")
        if unconstrained:
            runs.append("unconstrained")
        if i % 2:
            runs.reverse()  # interleave the order
        for kind in runs:
            budget = max_new_tokens if kind == "constrained" else unconstrained_max_new_tokens
            r = generate_for_schema(model, tokenizer, e["schema"], budget, constrained=kind == "constrained",
                                    shots=shots)
            ok, reason = validate_output(r["text"], e["schema"])
            row[kind] = {**{k: r[k] for k in ("tokens", "seconds", "mask_seconds", "complete")}, "valid": ok,
                         "reason": reason, "text": r["text"][:2000]}
        rows.append(row)
        if log is not None:
            c = row.get("constrained", {})
            u = row.get("unconstrained", {})
            log.write(f"[{i + 1}/{len(entries)}] {e['subset']}/{e['id']} declared={row['declared']} "
                      f"constrained_valid={c.get('valid')} unconstrained_valid={u.get('valid')}\n")
            log.flush()
    return {"rows": rows, "metrics": metrics(rows)}


def metrics(rows: list[dict]) -> dict:
    """Per-subset and overall coverage, compliance and efficiency from :func:`run_generation` rows."""
    out = {}
    for subset in sorted({r["subset"] for r in rows}) + ["all"]:
        rs = [r for r in rows if subset in ("all", r["subset"])]
        n = len(rs)
        dec = [r for r in rs if r["declared"]]
        emp = [r for r in dec if r["constrained"]["valid"]]
        unc = [r for r in rs if "unconstrained" in r]
        c_tok = sum(r["constrained"]["tokens"] for r in dec)
        c_sec = sum(r["constrained"]["seconds"] for r in dec)
        c_mask = sum(r["constrained"]["mask_seconds"] for r in dec)
        u_tok = sum(r["unconstrained"]["tokens"] for r in unc)
        u_sec = sum(r["unconstrained"]["seconds"] for r in unc)
        tpot_c = c_sec / c_tok if c_tok else None
        tpot_u = u_sec / u_tok if u_tok else None
        out[subset] = {
            "schemas": n,
            "declared_coverage": len(dec) / n if n else None,
            "empirical_coverage": len(emp) / n if n else None,
            "compliance": len(emp) / len(dec) if dec else None,
            "compliance_of_completed": (len(emp) / sum(1 for r in dec if r["constrained"]["complete"])
                                        if any(r["constrained"]["complete"] for r in dec) else None),
            "unconstrained_valid": (sum(r["unconstrained"]["valid"] for r in unc) / len(unc)) if unc else None,
            "incomplete_at_max_tokens": sum(1 for r in dec if not r["constrained"]["complete"]),
            "compile_ms_median": 1e3 * statistics.median([r["compile_seconds"] for r in dec]) if dec else None,
            "compile_ms_max": 1e3 * max(r["compile_seconds"] for r in dec) if dec else None,
            "tpot_constrained_ms": 1e3 * tpot_c if tpot_c else None,
            "tpot_unconstrained_ms": 1e3 * tpot_u if tpot_u else None,
            "tpot_ratio": tpot_c / tpot_u if tpot_c and tpot_u else None,
            "mask_ms_per_token": 1e3 * c_mask / c_tok if c_tok else None,
            "mask_share_of_unconstrained_step": (c_mask / c_tok) / tpot_u if c_tok and tpot_u else None,
        }
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
    for j, (key, label) in enumerate([("declared_coverage", "declared coverage"),
                                      ("empirical_coverage", "empirical coverage"), ("compliance", "compliance")]):
        axes[0].bar([x + (j - 1) * width for x in xs], [m[s][key] or 0 for s in subsets], width, label=label)
    axes[0].set_xticks(list(xs), subsets)
    axes[0].set_ylim(0, 1.05)
    axes[0].set_title("JSONSchemaBench (llguidance, SmolLM2-135M-Instruct, greedy)")
    axes[0].legend(fontsize=8, loc="lower right")
    for j, (key, label) in enumerate([("tpot_unconstrained_ms", "unconstrained"),
                                      ("tpot_constrained_ms", "constrained"), ("mask_ms_per_token", "mask only")]):
        axes[1].bar([x + (j - 1) * width for x in xs], [m[s][key] or 0 for s in subsets], width, label=label)
    axes[1].set_xticks(list(xs), subsets)
    axes[1].set_ylabel("ms per output token")
    axes[1].set_title("time per output token")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
