"""The grammar mask's share of a decoding step at batch 1 and batch 8 (issue 17), default model, CPU, float32.

    python scripts/bench_mask_batch.py --schemas 4 --max-new-tokens 64 --repeats 2 --out results

For ``--schemas`` declared schemas of the shipped JSONSchemaBench sample, JSON-schema-constrained sampling
(temperature 1, so the rows of a batch differ) with the benchmark's prompt repeated over the batch, under the fast
CPU kernels; batch sizes 1 and 8 alternate, after a warm-up on another schema. The processor's own time (matcher sync, the masks of all rows from
llguidance's parallel executor, the mask applied) is measured inside it, the step time around ``generate()``.
Writes ``<out>/mask_batch.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from hf_decoding_ext.bench.jsonschemabench import declared_schemas, schema_prompt
from hf_decoding_ext.bench.speed import result_header
from hf_decoding_ext.core.kernels import fast_kernels
from hf_decoding_ext.core.models import load_model
from hf_decoding_ext.structured.json_schema import JsonSchemaLogitsProcessor


class _Timed:
    """Wraps a processor and adds up the time spent in its calls."""

    def __init__(self, proc):
        self.proc, self.seconds, self.calls = proc, 0.0, 0

    def __call__(self, input_ids, scores):
        t0 = time.perf_counter()
        out = self.proc(input_ids, scores)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--schemas", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    model, tokenizer = load_model()
    chosen = declared_schemas(model, tokenizer, limit=args.schemas)
    runs = {1: [], 8: []}
    warm = declared_schemas(model, tokenizer, limit=args.schemas + 1)[-1]  # a schema that is not measured
    with fast_kernels(model):
        for batch in (1, 8):  # warm-up: the engine's first masks and thread pool, the kernel plan
            inputs = {k: v.repeat(batch, 1) for k, v in schema_prompt(tokenizer, warm["schema"]).items()}
            model.generate(**inputs, logits_processor=[JsonSchemaLogitsProcessor.for_model(
                model, tokenizer, schema=warm["schema"])], do_sample=True, max_new_tokens=8,
                pad_token_id=tokenizer.pad_token_id)
        for rep in range(args.repeats):
            for i, row in enumerate(chosen):
                for batch in ((1, 8) if (rep + i) % 2 == 0 else (8, 1)):
                    inputs = schema_prompt(tokenizer, row["schema"], device=model.device)
                    inputs = {k: v.repeat(batch, 1) for k, v in inputs.items()}
                    proc = _Timed(JsonSchemaLogitsProcessor.for_model(model, tokenizer, schema=row["schema"]))
                    torch.manual_seed(rep)
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        out = model.generate(**inputs, logits_processor=[proc], do_sample=True, temperature=1.0,
                                             top_k=0, max_new_tokens=args.max_new_tokens,
                                             pad_token_id=tokenizer.pad_token_id)
                    seconds = time.perf_counter() - t0
                    runs[batch].append({"schema": f"{row['subset']}/{row['id']}", "seconds": seconds,
                                        "processor_seconds": proc.seconds, "steps": proc.calls,
                                        "mask_seconds": proc.proc.mask_seconds,
                                        "new_tokens": int(out.shape[1] - inputs["input_ids"].shape[1])})
                    print(f"batch {batch} {row['id']}: processor {1e3 * proc.seconds / max(1, proc.calls):.2f} ms "
                          f"per step, {100 * proc.seconds / seconds:.1f}% of the run", flush=True)
    summary = {}
    for batch, rs in runs.items():
        steps = sum(r["steps"] for r in rs)
        summary[f"batch_{batch}"] = {
            "processor_ms_per_step": 1e3 * sum(r["processor_seconds"] for r in rs) / steps,
            "mask_ms_per_step": 1e3 * sum(r["mask_seconds"] for r in rs) / steps,
            "step_ms": 1e3 * sum(r["seconds"] for r in rs) / steps,
            "processor_share_of_step": sum(r["processor_seconds"] for r in rs) / sum(r["seconds"] for r in rs),
        }
    print(json.dumps(summary, indent=1))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {**result_header("mask_batch", "structured", model, "smollm2-135m-instruct"),
              "settings": {**vars(args), "decoding": "sampling, temperature 1, top_k 0, fast CPU kernels, float32",
                           "schemas": [f"{r['subset']}/{r['id']}" for r in chosen],
                           "step_ms": "generate() wall time / processor calls (includes the prefill)"},
              "summary": summary, "runs": {str(k): v for k, v in runs.items()}}
    (out_dir / "mask_batch.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
