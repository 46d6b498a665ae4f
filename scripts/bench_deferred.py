"""Keywords the grammar engine cannot mask, checked on completed values (``unmaskable="validate"``, issue 17).

    python scripts/bench_deferred.py --generate 30 --max-new-tokens 256 --out results

* masks: every MaskBench case with ``unmaskable="validate"`` (flexible whitespace, instances serialised by
  ``json.dumps``): declared coverage, valid instances blocked (split into blocked by the engine's mask of the relaxed
  schema and blocked by a deferred check), invalid instances admitted;
* generation: ``--generate`` MaskBench schemas that only the deferral makes usable (refused with the default
  ``unmaskable="error"``), spread evenly, one greedy generation each with the budget-aware processor and
  ``unmaskable="validate"``, and one unconstrained with the same budget: validity (the benchmark's validator), dead
  ends of the deferred checks, engine errors.

Progress goes to ``<out>/jsonschemabench_deferred.log``; results to ``<out>/jsonschemabench_deferred.json``.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

from hf_decoding_ext.bench.jsonschemabench import (generate_for_schema, load_maskbench, run_mask_tests,
                                                   summarise_masks, validate_output)
from hf_decoding_ext.bench.run import write_json
from hf_decoding_ext.bench.speed import result_header
from hf_decoding_ext.core.models import load_model
from hf_decoding_ext.structured.grammar import compile_grammar, eos_ids_of, json_schema


def deferred_only(entries: list[dict], tokenizer) -> list[dict]:
    """The entries whose schema the default options refuse and ``unmaskable="validate"`` declares."""
    eos = eos_ids_of(None, tokenizer)
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for e in entries:
            try:
                compile_grammar(tokenizer, json_schema(e["schema"]), eos, warn=False)
                continue
            except ValueError:
                pass
            try:
                grammar = json_schema(e["schema"], unmaskable="validate")
                compile_grammar(tokenizer, grammar, eos, warn=False)
                if grammar.deferred is not None:
                    out.append(e)
            except ValueError:
                pass
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--generate", type=int, default=30)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--skip-masks", action="store_true")
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model()
    result = {**result_header("jsonschemabench_deferred", "jsonschemabench", model, "smollm2-135m-instruct"),
              "settings": {"unmaskable": "validate", "generate": args.generate, "max_new_tokens": args.max_new_tokens,
                           "decoding": "greedy, batch 1, budget-aware processor (told max_new_tokens)",
                           "schemas": "MaskBench schemas refused by default and declared with unmaskable='validate'",
                           "validator": "the JSONSchemaBench harness's (Draft 2020-12, formats asserted)"}}
    all_cases = load_maskbench()
    with open(out / "jsonschemabench_deferred.log", "w") as log:
        if not args.skip_masks:
            t0 = time.perf_counter()
            masks = run_mask_tests(tokenizer, all_cases, progress=False, unmaskable="validate")
            result["masks"] = summarise_masks(masks)
            log.write(f"mask tests done in {time.perf_counter() - t0:.0f} s: "
                      f"{json.dumps({k: v for k, v in result['masks'].items() if k != 'failures'})}\n")
            log.flush()
        chosen = deferred_only(all_cases, tokenizer)
        step = max(1, len(chosen) // max(1, args.generate))
        chosen = chosen[::step][: args.generate]
        rows = []
        for i, e in enumerate(chosen):
            row = {"subset": e["subset"], "id": e["id"],
                   "notes": list(json_schema(e["schema"], unmaskable="validate").notes)}
            for kind in ("validate", "unconstrained") if i % 2 == 0 else ("unconstrained", "validate"):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    r = generate_for_schema(model, tokenizer, e["schema"], args.max_new_tokens,
                                            constrained=kind == "validate", budget=kind == "validate",
                                            **({"unmaskable": "validate"} if kind == "validate" else {}))
                ok, reason = validate_output(r["text"], e["schema"])
                row[kind] = {"valid": ok, "reason": reason, "complete": r["complete"], "error": r["error"],
                             "tokens": r["tokens"], "seconds": r["seconds"], "mask_seconds": r["mask_seconds"],
                             "text": r["text"][:1500]}
            rows.append(row)
            log.write(f"[{i + 1}/{len(chosen)}] {e['subset']}/{e['id']} validate_valid={row['validate']['valid']} "
                      f"error={row['validate']['error']!r:.80} unconstrained_valid={row['unconstrained']['valid']}\n")
            log.flush()
        n = len(rows)
        v = [r["validate"] for r in rows]
        result["generation"] = {
            "rows": rows,
            "metrics": {
                "schemas": n,
                "valid": sum(x["valid"] for x in v) / n if n else None,
                "valid_of_completed": (sum(x["valid"] for x in v if x["complete"])
                                       / max(1, sum(1 for x in v if x["complete"]))),
                "dead_ends": sum(1 for x in v if x["error"] and x["error"].startswith("DeferredDeadEnd")),
                "engine_errors": sum(1 for x in v if x["error"] and x["error"].startswith("GrammarEngineError")),
                "cut_by_budget": sum(1 for x in v if not x["complete"] and not x["error"]),
                "unconstrained_valid": sum(r["unconstrained"]["valid"] for r in rows) / n if n else None,
                "mask_ms_per_token": 1e3 * sum(x["mask_seconds"] for x in v) / max(1, sum(x["tokens"] for x in v)),
            }}
        log.write(json.dumps(result["generation"]["metrics"]) + "\n")
    write_json(result, out / "jsonschemabench_deferred.json")
    print(json.dumps({"masks": {k: v for k, v in result.get("masks", {}).items() if k not in ("failures",)},
                      "generation": result["generation"]["metrics"]}, indent=1)[:3000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
