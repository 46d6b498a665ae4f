"""The structured family's mask overhead under the speed methodology of issue 16 (default model, greedy, batch 1).

    python scripts/bench_structured_overhead.py --schemas 6 --repeats 3 --max-new-tokens 96 --out results

For ``--schemas`` declared schemas of the shipped JSONSchemaBench sample (spread over both subsets; the first declared
schema of the sample that is not measured is the warm-up), one interleaved run (the order rotated per schema and
pass) of: unconstrained greedy with stock ``generate()`` and with the fast CPU kernels, and JSON-schema-constrained
greedy under both kernels, each with the same token budget. The headline is the time per output token of constrained
decoding over unconstrained decoding *under the same kernels* (the processor's own cost: the mask, the matcher and
the processor call), beside the ratio against stock unconstrained greedy, and the mask's share of a step measured
inside the processor. ``--repeats`` passes give the spread. Writes ``<out>/structured_overhead.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hf_decoding_ext.bench.jsonschemabench import declared_schemas, schema_prompt
from hf_decoding_ext.bench.run import write_json
from hf_decoding_ext.bench.speed import result_header
from hf_decoding_ext.core.kernels import fast_kernels
from hf_decoding_ext.core.models import load_model

CONFIGS = ("unconstrained", "unconstrained/fast-kernels", "constrained", "constrained/fast-kernels")


def run_one(model, tokenizer, schema, config: str, max_new_tokens: int) -> dict:
    from hf_decoding_ext.structured.json_schema import JsonSchemaLogitsProcessor

    inputs = schema_prompt(tokenizer, schema, device=model.device)
    kwargs = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                  pad_token_id=tokenizer.pad_token_id)
    proc = None
    if config.startswith("constrained"):
        proc = JsonSchemaLogitsProcessor.for_model(model, tokenizer, schema=schema)
        kwargs["logits_processor"] = [proc]
        kwargs.pop("min_new_tokens")  # the grammar ends the document; its tokens are what is timed
    with fast_kernels(model, enabled=config.endswith("fast-kernels")), torch.no_grad():
        t0 = time.perf_counter()
        out = model.generate(**inputs, **kwargs)
        seconds = time.perf_counter() - t0
    tokens = int(out.shape[1] - inputs["input_ids"].shape[1])
    return {"tokens": tokens, "seconds": seconds, "ms_per_token": 1e3 * seconds / max(tokens, 1),
            "mask_seconds": proc.mask_seconds if proc is not None else 0.0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--schemas", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    model, tokenizer = load_model()
    pool = declared_schemas(model, tokenizer)
    warm, pool = pool[0], pool[1:]
    step = max(1, len(pool) // args.schemas)
    chosen = pool[::step][:args.schemas]
    for config in CONFIGS:  # warm-up (kernel plan, grammar compile paths) on a schema that is not measured
        run_one(model, tokenizer, warm["schema"], config, 16)
    runs = {c: [] for c in CONFIGS}
    jobs = [(p, i, row) for p in range(args.repeats) for i, row in enumerate(chosen)]
    for p, i, row in tqdm(jobs, desc="structured overhead"):
        shift = (p + i) % len(CONFIGS)
        for config in CONFIGS[shift:] + CONFIGS[:shift]:
            r = run_one(model, tokenizer, row["schema"], config, args.max_new_tokens)
            runs[config].append({"pass": p, "schema": f"{row['subset']}/{row['id']}", **r})

    def per_pass(config, p):
        rs = [r for r in runs[config] if r["pass"] == p]
        return sum(r["seconds"] for r in rs) / sum(r["tokens"] for r in rs)

    summary = {}
    for config in CONFIGS:
        same = "unconstrained/fast-kernels" if config.endswith("fast-kernels") else "unconstrained"
        own = [per_pass(config, p) / per_pass(same, p) for p in range(args.repeats)]
        stock = [per_pass(config, p) / per_pass("unconstrained", p) for p in range(args.repeats)]
        toks = sum(r["tokens"] for r in runs[config])
        summary[config] = {
            "ms_per_token": 1e3 * statistics.median(per_pass(config, p) for p in range(args.repeats)),
            "time_per_token_over_same_kernel_unconstrained": statistics.median(own),
            "same_kernel_min": min(own), "same_kernel_max": max(own),
            "time_per_token_over_stock_unconstrained": statistics.median(stock),
            "mask_share": sum(r["mask_seconds"] for r in runs[config]) / sum(r["seconds"] for r in runs[config]),
            "mean_tokens": toks / len(runs[config]),
        }
        print(f"{config:28s} {summary[config]['ms_per_token']:.1f} ms/token  same-kernel x"
              f"{summary[config]['time_per_token_over_same_kernel_unconstrained']:.3f} "
              f"[{min(own):.3f}-{max(own):.3f}]  stock x{summary[config]['time_per_token_over_stock_unconstrained']:.3f}"
              f"  mask {100 * summary[config]['mask_share']:.2f}%")
    out = Path(args.out)
    result = {**result_header("structured_overhead", "structured", model, "smollm2-135m-instruct"),
              "settings": {**vars(args), "decoding": "greedy, batch 1, float32",
                           "schemas": [f"{r['subset']}/{r['id']}" for r in chosen],
                           "warmup_schema": f"{warm['subset']}/{warm['id']}",
                           "note": "unconstrained runs are forced to the full budget (min_new_tokens); constrained "
                                   "runs stop where the grammar ends the document or at the budget"},
              "summary": summary, "runs": runs}
    write_json(result, out / "structured_overhead.json")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(CONFIGS)
    ax.bar(names, [summary[c]["ms_per_token"] for c in names], color=["#999", "#555", "#f90", "#c60"])
    ax.set_ylabel("ms per output token (median of passes)")
    ax.set_title(f"JSON-schema masks, {len(chosen)} schemas x {args.repeats} passes, default model, CPU fp32")
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(out / "structured_overhead.png", dpi=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
