"""MBR decoding (arXiv 2410.02902) on the default model, with the lexical utilities and the SmolLM2 self-judge.

Two sets, both hand-written for the repo: the English->French pairs of
``hf_decoding_ext/data/search/translation_pairs.jsonl`` (test split) and the instructions with short reference
answers of ``hf_decoding_ext/data/search/instructions.jsonl``. For every prompt, SmolLM2-135M-Instruct draws a pool
of ``--n`` candidates (nucleus sampling, p = ``--top-p``) per seed and decodes greedily once; every utility's MBR
rule picks from the *same* pool (paired comparison): chrF, BLEU, ROUGE-L, ROUGE-1 and the reference-based self-judge
(:class:`~hf_decoding_ext.core.scoring.JudgeUtility` on SmolLM2 itself, a weak stand-in for Prometheus-2-7B).
Figures: chrF and ROUGE-L of the pick against the human reference; "sample" is the pool mean (the expected score of
one random sample), "oracle" the best candidate.

Writes ``results/mbr_eval.json`` and prints the summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_quality_aware import INSTRUCTION, greedy, log, sample_pool, spread

from hf_decoding_ext import load_model
from hf_decoding_ext.core.resources import read_jsonl
from hf_decoding_ext.core.scoring import chrf, rouge_l_text
from hf_decoding_ext.search.mbr import MBRDecoding

UTILITIES = ("chrf", "bleu", "rougeL", "rouge1", "judge")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--top-p", type=float, default=0.8)
    ap.add_argument("--utilities", default=",".join(UTILITIES))
    ap.add_argument("--limit", type=int, default=None, help="prompts per set (default: all)")
    ap.add_argument("--sets", default="translation,instructions", help="comma-separated: translation, instructions")
    ap.add_argument("--out", default="results/mbr_eval.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, tok = load_model()
    utilities = [u for u in args.utilities.split(",") if u]
    sets = {
        "translation": [(p["id"], INSTRUCTION.format(source=p["source"]), p["reference"])
                        for p in read_jsonl("search", "translation_pairs.jsonl") if p["split"] == "test"],
        "instructions": [(p["id"], p["instruction"], p["reference"])
                         for p in read_jsonl("search", "instructions.jsonl")],
    }
    wanted = [x for x in args.sets.split(",") if x]
    if set(wanted) - set(sets):
        raise SystemExit(f"unknown set(s) {sorted(set(wanted) - set(sets))}; expected {sorted(sets)}")
    sets = {k: v for k, v in sets.items() if k in wanted}
    if args.limit:
        sets = {k: v[:args.limit] for k, v in sets.items()}
    loops = {u: MBRDecoding(n=args.n, utility=u, tokenizer=tok) for u in utilities}
    per_item = []
    t0 = time.time()

    def write():
        summary = {}
        for set_name in sets:
            items = [i for i in per_item if i["set"] == set_name]
            if not items:
                continue
            methods = list(items[0]["chrf"])
            table = {}
            for m in methods:
                row = {}
                for metric in ("chrf", "rougeL"):
                    vals = [i[metric][m] for i in items]
                    row[metric] = spread(vals)
                    row[f"{metric}_minus_sample"] = spread([v - i[metric]["sample (pool mean)"] for v, i in zip(vals, items)])
                    row[f"{metric}_minus_greedy"] = spread([v - i[metric]["greedy"] for v, i in zip(vals, items)])
                table[m] = row
            summary[set_name] = table
        result = {
            "method": "mbr", "paper": "arXiv 2410.02902",
            "settings": {"model": "SmolLM2-135M-Instruct", "sets": wanted, "limit": args.limit, "n": args.n, "seeds": args.seeds, "top_p": args.top_p,
                         "temperature": 1.0, "max_new_tokens": args.max_new_tokens, "utilities": utilities,
                         "judge": "SmolLM2-135M-Instruct self-judge, Prometheus-style rubric, probability-weighted 1-5 "
                                  "(weak stand-in for Prometheus-2-7B)",
                         "metrics": "sentence chrF (sacrebleu) and ROUGE-L F (rouge-score, unicode words) of the pick "
                                    "against the human reference"},
            "summary": summary, "per_item": per_item, "seconds": time.time() - t0,
        }
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, ensure_ascii=False))
        return result, summary, out

    for set_name, items in sets.items():
        for pid, prompt, reference in items:
            g = greedy(model, tok, prompt, args.max_new_tokens)
            for seed in range(args.seeds):
                pool = sample_pool(model, tok, prompt, args.n, 1000 * seed + int(pid[1:]), args.max_new_tokens,
                                   args.top_p)
                texts = pool.texts(tok)
                gold_c = [chrf(t, reference) for t in texts]
                gold_r = [rouge_l_text(t, reference) for t in texts]
                item = {"set": set_name, "id": pid, "seed": seed, "reference": reference, "greedy": g,
                        "candidates": texts, "candidate_chrf": gold_c, "candidate_rougeL": gold_r,
                        "chrf": {"sample (pool mean)": sum(gold_c) / len(gold_c), "greedy": chrf(g, reference),
                                 "oracle": max(gold_c)},
                        "rougeL": {"sample (pool mean)": sum(gold_r) / len(gold_r),
                                   "greedy": rouge_l_text(g, reference), "oracle": max(gold_r)},
                        "picks": {}, "utility_calls": {}}
                for u, loop in loops.items():
                    sel = loop.rerank(pool, model)
                    item["picks"][u] = sel.index
                    item["utility_calls"][u] = sel.extra["utility_calls"]
                    item["chrf"][f"mbr ({u})"] = gold_c[sel.index]
                    item["rougeL"][f"mbr ({u})"] = gold_r[sel.index]
                per_item.append(item)
            write()  # partial results after every prompt
            log(f"{set_name} {pid}: greedy chrF {item['chrf']['greedy']:.1f}, pool mean "
                f"{item['chrf']['sample (pool mean)']:.1f}, " + ", ".join(
                    f"{u} {item['chrf'][f'mbr ({u})']:.1f}" for u in utilities) + f" ({time.time() - t0:.0f}s)")
    result, summary, out = write()
    for set_name, table in summary.items():
        first = next(iter(table.values()))
        print(f"\n{set_name}: chrF / ROUGE-L of the pick (mean +- sem over {first['chrf']['n']} pools)")
        for m, v in table.items():
            print(f"  {m:20s} chrF {v['chrf']['mean']:6.2f} +- {v['chrf']['sem']:4.2f}  ROUGE-L "
                  f"{v['rougeL']['mean']:.3f}   chrF vs sample {v['chrf_minus_sample']['mean']:+6.2f} "
                  f"+- {v['chrf_minus_sample']['sem']:4.2f}   vs greedy {v['chrf_minus_greedy']['mean']:+6.2f}")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
