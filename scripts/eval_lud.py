"""Lexical Unit Decoding (arXiv 2405.15208) on the LUD fine-tune of the default model: the sweep over the decoding
confidence threshold (the paper's beta).

For each threshold, LUDDecoding runs on the fine-tuned model (greedy, batch 1) over benchmark prompts written for
this repository (``hf_decoding_ext/data/prompts/benchmark.jsonl``; ``--per-category`` of each category) and
reports:

* forwards per token and tokens per forward (the speed knob; 1.0 at threshold >= 1, the fine-tuned model's own
  greedy decoding), the span-length histogram and why spans ended;
* agreement with the ORIGINAL model's greedy output (position-wise share of its tokens reproduced, and the share
  before the first mismatch; :func:`hf_decoding_ext.training.finetune.agreement_with`'s rule) and with the
  fine-tuned model's own greedy output;
* a small task metric: ``math_reasoning`` and ``rag_qa`` answers correct
  (:func:`hf_decoding_ext.bench.quality.answer_correct`), for the original model, the fine-tuned model's greedy
  output and each threshold.

Writes ``results/lud_eval.json`` (``--out``) and prints a table. The tolerance this repository states for the
lossy fine-tuned methods (issue 24): agreement with the original within the fine-tuned model's own greedy agreement
minus 0.05, and the task metric within 1 answer of the original's on the prompts used.

Example (after the queue fine-tune; CPU, one thread: about 30 minutes at the defaults, 18 prompts x 64 tokens x 9
runs)::

    python scripts/eval_lud.py --finetuned /work/distill/finetune/lexical-unit-decoding

A tiny-budget check: ``--per-category 1 --max-new-tokens 8 --thresholds 0.5,1.0 --out /tmp/lud_eval.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from hf_decoding_ext.bench.prompts import load_prompts
from hf_decoding_ext.bench.quality import answers_correct
from hf_decoding_ext.training.finetune import token_agreement
from hf_decoding_ext.core.models import encode_prompts, load_model
from hf_decoding_ext.speculative.lud import DEFAULT_K, LUDDecoding, load_lud_model

ROOT = Path(__file__).resolve().parents[1]
THRESHOLDS = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@torch.no_grad()
def decode(model, tokenizer, ids, max_new_tokens, loop=None):
    """New tokens of one greedy run (with ``loop`` as ``custom_generate`` when given) and the loop's stats."""
    x = ids[None]
    out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new_tokens,
                         pad_token_id=tokenizer.pad_token_id, num_beams=1, temperature=None, top_p=None, top_k=None,
                         **({"custom_generate": loop} if loop is not None else {}))
    return out[0, x.shape[1]:].tolist(), (dict(loop.last_stats) if loop is not None else None)


def agreement(ref: list[list[int]], hyp: list[list[int]]) -> dict:
    """:func:`hf_decoding_ext.training.finetune.token_agreement`, rounded, without the per-prompt list."""
    d = token_agreement(ref, hyp)
    return {"agreement": round(d["agreement"], 4), "prefix_agreement": round(d["prefix_agreement"], 4)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--finetuned", default="/work/distill/finetune/lexical-unit-decoding",
                    help="the LUD fine-tune: LoRA adapter folder or full checkpoint (load_lud_model)")
    ap.add_argument("--base", default=None, help="the original model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--thresholds", default=",".join(str(t) for t in THRESHOLDS))
    ap.add_argument("--k", type=int, default=DEFAULT_K)
    ap.add_argument("--per-category", type=int, default=3, help="benchmark prompts per category")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "results" / "lud_eval.json"))
    args = ap.parse_args(argv)
    thresholds = [float(t) for t in args.thresholds.split(",") if t.strip()]
    torch.manual_seed(0)

    rows = load_prompts(per_category=args.per_category)
    original, tokenizer = load_model(args.base)
    original.eval()
    prompts = [encode_prompts(tokenizer, r["prompt"])["input_ids"][0] for r in rows]
    t0 = time.time()
    orig_out = [decode(original, tokenizer, p, args.max_new_tokens)[0] for p in prompts]
    log(f"original greedy: {len(prompts)} prompts in {time.time() - t0:.1f}s")
    del original
    tuned, tok2 = load_lud_model(args.finetuned, base=args.base)
    if len(tok2) != len(tokenizer) + 1:
        raise ValueError(f"the fine-tuned tokenizer ({len(tok2)} tokens) is not the original's ({len(tokenizer)}) "
                         "plus the placeholder")
    t0 = time.time()
    tuned_out = [decode(tuned, tokenizer, p, args.max_new_tokens)[0] for p in prompts]
    tuned_s = time.time() - t0
    log(f"fine-tuned greedy: {tuned_s:.1f}s")
    result = {
        "method": "lexical-unit-decoding", "arxiv": "2405.15208", "finetuned": str(args.finetuned),
        "settings": {"k": args.k, "per_category": args.per_category, "prompts": len(prompts),
                     "max_new_tokens": args.max_new_tokens, "thresholds": thresholds,
                     "threads": torch.get_num_threads(),
                     "prompt_set": "hf_decoding_ext/data/prompts/benchmark.jsonl"},
        "original": {"task": answers_correct(rows, orig_out, tokenizer)},
        "finetuned_greedy": {"agreement_with_original": agreement(orig_out, tuned_out),
                             "task": answers_correct(rows, tuned_out, tokenizer), "seconds": round(tuned_s, 2)},
        "sweep": [],
    }
    for th in thresholds:
        loop = LUDDecoding(k=args.k, threshold=th, tokenizer=tok2)
        outs, forwards, tokens, spans, stops = [], 0, 0, Counter(), Counter()
        t0 = time.time()
        for p in prompts:
            o, st = decode(tuned, tokenizer, p, args.max_new_tokens, loop)
            outs.append(o)
            forwards += st["forwards"]
            tokens += st["tokens"]
            spans.update(st["accepted_per_step"])
            stops.update(st["stops"])
        secs = time.time() - t0
        row = {"threshold": th, "forwards": forwards, "tokens": tokens,
               "forwards_per_token": round(forwards / max(1, tokens), 4),
               "tokens_per_forward": round(tokens / max(1, forwards), 4),
               "agreement_with_original": agreement(orig_out, outs),
               "agreement_with_finetuned_greedy": agreement(tuned_out, outs),
               "task": answers_correct(rows, outs, tokenizer), "seconds": round(secs, 2),
               "span_histogram": {str(k): v for k, v in sorted(spans.items())}, "stops": dict(stops)}
        result["sweep"].append(row)
        log(f"threshold {th}: {row['forwards_per_token']} forwards/token, agreement with original "
            f"{row['agreement_with_original']['agreement']}, task {row['task']['correct']}/{row['task']['graded']}, "
            f"{secs:.1f}s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'threshold':>9} {'fwd/tok':>8} {'agree-orig':>10} {'agree-ft':>9} {'task':>7}")
    for r in result["sweep"]:
        print(f"{r['threshold']:>9} {r['forwards_per_token']:>8} {r['agreement_with_original']['agreement']:>10} "
              f"{r['agreement_with_finetuned_greedy']['agreement']:>9} "
              f"{r['task']['correct']:>3}/{r['task']['graded']:<3}")
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
