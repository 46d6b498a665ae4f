"""JSONSchemaBench on the default model (generation metrics) and MaskBench (mask correctness), with llguidance.

    python scripts/bench_jsonschemabench.py --per-subset 40 --max-new-tokens 384 --mask-limit 0 --out results

* generation: ``--per-subset`` schemas from each shipped subset (Glaiveai2K, Github_easy), spread evenly; for each
  schema, three greedy generations with the same token budget, interleaved (order rotated per schema): constrained
  with the budget-aware processor (told ``max_new_tokens``), constrained without it, and unconstrained; declared
  coverage, empirical coverage and compliance (Draft 2020-12 with the benchmark's format checks), the share cut by
  the budget, the budgeted runs against the unbudgeted ones (validity, identical outputs), compile time, time per
  output token without the prefill and the mask's share of an unconstrained step;
* masks: every MaskBench case (``--mask-limit 0``) or the first N per subset: valid instances blocked, invalid
  instances admitted, mask time percentiles.

Progress goes to ``<out>/jsonschemabench.log``; results to ``<out>/jsonschemabench.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from hf_decoding_ext.bench.jsonschemabench import (load_maskbench, load_schemas, plot_jsonschemabench,
                                                   run_generation, run_mask_tests, summarise_masks)
from hf_decoding_ext.bench.run import write_json
from hf_decoding_ext.bench.speed import result_header
from hf_decoding_ext.core.models import load_model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-subset", type=int, default=40)
    ap.add_argument("--max-new-tokens", type=int, default=384)
    ap.add_argument("--max-string-length", type=int, default=None,
                    help="cap open strings in the budgeted runs (a deviation from the schema; default: no cap)")
    ap.add_argument("--max-items", type=int, default=None, help="cap open arrays in the budgeted runs")
    ap.add_argument("--shots", type=int, default=0, help="demonstrations in the prompt (0-2)")
    ap.add_argument("--mask-limit", type=int, default=0, help="MaskBench cases per subset (0: all)")
    ap.add_argument("--skip-generation", action="store_true")
    ap.add_argument("--update-masks", action="store_true",
                    help="re-run only the mask tests (defaults, and unknown_formats='string') and replace them in the "
                         "existing <out>/jsonschemabench.json, keeping its generation results")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model()
    if args.update_masks:
        path = out / "jsonschemabench.json"
        result = json.loads(path.read_text())
        cases = load_maskbench(limit=args.mask_limit or None)
        result["masks"] = summarise_masks(run_mask_tests(tokenizer, cases, progress=False))
        result["masks_unknown_formats_string"] = summarise_masks(
            run_mask_tests(tokenizer, cases, progress=False, unknown_formats="string"))
        result["settings"]["masks_updated"] = time.strftime("%Y-%m-%d") + ": mask tests re-run (--update-masks)"
        write_json(result, path)
        print(json.dumps({k: {kk: vv for kk, vv in result[k].items() if kk not in ("failures", "engine_errors")}
                          for k in ("masks", "masks_unknown_formats_string")}, indent=1))
        return 0
    result = {**result_header("jsonschemabench", "jsonschemabench", model, "smollm2-135m-instruct"),
              "settings": {"per_subset": args.per_subset, "max_new_tokens": args.max_new_tokens,
                           "max_string_length": args.max_string_length, "max_items": args.max_items,
                           "runs": "budgeted (max_new_tokens given to the processor), constrained (no budget), "
                                   "unconstrained; same max_new_tokens for all",
                           "mask_limit": args.mask_limit or None, "decoding": "greedy, batch 1",
                           "engine": "llguidance", "json_options": "compact separators ', ' and ': ' for generation; "
                           "flexible whitespace for the mask tests (instances serialised by json.dumps)",
                           "validator": "jsonschema Draft202012Validator after check_schema, formats asserted "
                                        "(jsonschema's FormatChecker plus ipv4/ipv6/uuid, as the benchmark's "
                                        "validation.py), remote $refs never fetched",
                           "prompt": "system: 'You need to generate a JSON object that matches the schema below.'; "
                                     "then `shots` demonstrations (user: schema, assistant: instance); "
                                     "user: the schema as JSON", "shots": args.shots}}
    with open(out / "jsonschemabench.log", "w") as log:
        t0 = time.perf_counter()
        masks = run_mask_tests(tokenizer, load_maskbench(limit=args.mask_limit or None), progress=False)
        result["masks"] = summarise_masks(masks)
        log.write(f"mask tests done in {time.perf_counter() - t0:.0f} s: "
                  f"{json.dumps({k: v for k, v in result['masks'].items() if k != 'failures'})}\n")
        log.flush()
        if not args.skip_generation:
            entries = load_schemas(limit=args.per_subset)
            result["generation"] = run_generation(model, tokenizer, entries, args.max_new_tokens, progress=False,
                                                  log=log,
                                                  shots=args.shots, **{k: v for k, v in (
                                                      ("max_string_length", args.max_string_length),
                                                      ("max_items", args.max_items)) if v is not None})
            log.write(json.dumps(result["generation"]["metrics"], indent=1) + "\n")
    write_json(result, out / "jsonschemabench.json")
    if "generation" in result:
        plot_jsonschemabench(result, out / "jsonschemabench.png")
    print(json.dumps({"masks": {k: v for k, v in result["masks"].items() if k != "failures"},
                      "generation": result.get("generation", {}).get("metrics")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
