"""VocabTrim (arXiv 2506.22694) measured alone: the same drafter with its full vocabulary and with its LM head
trimmed to the K tokens the target produces most often (calibration: the target's committed greedy responses to
distillation prompts), for the distilled draft model and the shipped EAGLE (FSPAD) and Medusa heads.

Per drafter and K: multiply-accumulates of the output layer per draft token (analytic), milliseconds per draft call
and per drafted token (median over the engine's steps, measured in this job), acceptance (accepted / drafted draft
tokens), tokens per target forward, and token identity with plain greedy decoding. Configurations are interleaved
per prompt. Benchmark prompts are used for measurement only (nothing is tuned on them).

Usage (through the training queue): ``python scripts/eval_vocab_trim.py`` -> ``results/vocab_trim_eval.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--sizes", default="1024,4096,16384,full")
    ap.add_argument("--drafters", default="distilled,eagle-fspad,medusa")
    ap.add_argument("--max-nodes", type=int, default=5, help="pinned tree size of the head drafters")
    ap.add_argument("--out", default=str(ROOT / "results" / "vocab_trim_eval.json"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    from hf_decoding_ext.bench.prompts import interleaved_prompts
    from hf_decoding_ext.core.models import encode_prompts, load_model
    from hf_decoding_ext.speculative import SpeculativeDecoding
    from hf_decoding_ext.speculative.drafters.vocab_trim import VocabTrimDrafter
    from hf_decoding_ext.speculative.vocab_trim import select_vocab, target_token_counts

    model, tok = load_model()
    model.eval()
    vocab = int(model.get_output_embeddings().weight.shape[0])
    counts = target_token_counts(vocab)
    sizes = [None if s == "full" else int(s) for s in args.sizes.split(",")]
    coverage = {str(s or vocab): round(select_vocab(counts, s or vocab)[1], 4) for s in sizes}
    loops, macs = {}, {}
    for name in args.drafters.split(","):
        opts = {} if name == "distilled" else {"max_nodes": args.max_nodes}
        for s in sizes:
            key = f"{name}/K={s or vocab}"
            d = VocabTrimDrafter.for_model(model, tok, drafter=name, size=s, calibration=counts, **opts)
            loops[key] = SpeculativeDecoding(d)
            macs[key] = d.draft_macs_per_token(model)
    rows = interleaved_prompts(args.prompts)
    per = {k: [] for k in loops}
    generated: list[int] = []
    t_start = time.time()
    with torch.inference_mode():
        for row in rows:
            enc = encode_prompts(tok, row["prompt"])
            ref = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False)
            generated.extend(ref[0, enc["input_ids"].shape[1]:].tolist())
            for key, loop in loops.items():
                out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False,
                                     custom_generate=loop)
                st = loop.last_stats
                per[key].append({
                    "prompt": row["id"], "identical": bool(torch.equal(out, ref)),
                    "drafted": sum(s.draft_size for s in st), "accepted": sum(s.accepted for s in st),
                    "forwards": len(st), "tokens": sum(s.appended for s in st),
                    "draft_ms_per_call": [round(1000 * s.draft_time, 3) for s in st],
                    "draft_ms_per_token": [round(1000 * s.draft_time / s.draft_size, 3) for s in st if s.draft_size],
                })
            print(f"{row['id']}: " + ", ".join(f"{k} {per[k][-1]['accepted']}/{per[k][-1]['drafted']}"
                                              for k in loops), flush=True)
    summary = {}
    for key, items in per.items():
        calls = [x for r in items for x in r["draft_ms_per_call"]]
        toks = [x for r in items for x in r["draft_ms_per_token"]]
        drafted = sum(r["drafted"] for r in items)
        summary[key] = {
            "macs_per_draft_token": macs[key],
            "draft_ms_per_call_median": round(statistics.median(calls), 3) if calls else None,
            "draft_ms_per_drafted_token_median": round(statistics.median(toks), 3) if toks else None,
            "acceptance": round(sum(r["accepted"] for r in items) / max(1, drafted), 4),
            "acceptance_per_prompt_sd": round(statistics.pstdev(
                [r["accepted"] / max(1, r["drafted"]) for r in items]), 4),
            "tokens_per_forward": round(sum(r["tokens"] for r in items) / max(1, sum(r["forwards"] for r in items)), 4),
            "identical_to_greedy": f"{sum(r['identical'] for r in items)}/{len(items)}",
        }
    for name in args.drafters.split(","):
        full = summary[f"{name}/K={vocab}"]
        for s in sizes:
            cur = summary[f"{name}/K={s or vocab}"]
            cur["vs_full"] = {
                "head_macs_ratio": round(cur["macs_per_draft_token"]["head"] / full["macs_per_draft_token"]["head"], 4),
                "draft_ms_per_drafted_token_ratio": (round(cur["draft_ms_per_drafted_token_median"]
                                                           / full["draft_ms_per_drafted_token_median"], 4)
                                                     if full["draft_ms_per_drafted_token_median"] else None),
                "acceptance_change": round(cur["acceptance"] - full["acceptance"], 4),
                "tokens_per_forward_change": round(cur["tokens_per_forward"] - full["tokens_per_forward"], 4),
            }
    result = {
        "method": "vocab-trim", "arxiv": "2506.22694",
        "settings": {"model": "SmolLM2-135M-Instruct (fp32, CPU, shared 2-core machine)", "vocab": vocab,
                     "calibration": "results/direct_alignment/responses-greedy.jsonl.gz (target greedy outputs)",
                     "coverage_of_calibration_tokens": coverage,
                     "coverage_of_the_eval_greedy_outputs": {
                         str(s or vocab): round(sum(t in kept for t in generated) / max(1, len(generated)), 4)
                         for s in sizes for kept in [set(select_vocab(counts, s or vocab)[0].tolist())]},
                     "prompts": len(rows),
                     "max_new_tokens": args.max_new_tokens, "head_max_nodes": args.max_nodes,
                     "note": "wall-clock figures from a shared machine; MACs are exact",
                     "seconds": round(time.time() - t_start, 1)},
        "summary": summary,
        "per_prompt": per,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return result


if __name__ == "__main__":
    main()
