"""Evaluate Blockwise Parallel Decoding (arXiv 1811.03115) and blockwise draft refinement (arXiv 2404.09221) on
SmolLM2-135M-Instruct -> ``results/blockwise_eval.json``.

1. Per-head held-out accuracy of the blockwise heads against the Medusa baseline trained at the same budget on the
   same data (both from the checkpoints' ``config.json``, measured by the trainer on the same held-out split).
2. BPD: token identity with greedy decoding and block efficiency (tokens per target forward) on interleaved
   benchmark prompts (measurement only).
3. Refinement: interpolation weights tuned on DISTILLATION prompts only (never benchmark prompts); then raw vs
   rescored drafts on the same heads and the same node count, measured on the interleaved benchmark prompts:
   a chain (p = 1, ``block_size - 1`` nodes) and a trie of the p best paths cut to ``--trie-nodes`` nodes.

Run through the training queue (about 8 minutes on 2 cores, estimated):
    python scripts/eval_blockwise.py --heads /work/distill/runs/blockwise \
        --medusa /work/distill/baselines/medusa-600k
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hf_decoding_ext.bench.parity import greedy_references, near_tie_tally
from hf_decoding_ext.bench.prompts import interleaved_prompts, load_distill_prompts
from hf_decoding_ext.core.models import load_model
from hf_decoding_ext.speculative import SpeculativeDecoding
from hf_decoding_ext.speculative.drafters.blockwise import BlockwiseDrafter
from hf_decoding_ext.speculative.drafters.blockwise_refinement import BlockwiseRefinementDrafter, shipped_ngram
from hf_decoding_ext.speculative.drafters.draft_model import DraftModelDrafter
from hf_decoding_ext.speculative.drafters.feature_head import load_head
from hf_decoding_ext.speculative.heads.blockwise import BlockwiseHeads

ROOT = Path(__file__).resolve().parents[1]


def run(model, drafter, refs, max_new_tokens):
    """Per-prompt tokens per target forward and identity with the greedy reference."""
    rows, diverged = [], {}
    loop = SpeculativeDecoding(drafter)
    for row, enc, ref in refs:
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, custom_generate=loop)
        s = loop.summary()
        same = bool(torch.equal(out, ref))
        if not same:
            diverged[row["id"]] = out
        rows.append({"id": row["id"], "category": row["category"], "tokens": s["tokens"], "forwards": s["steps"],
                     "tokens_per_forward": s["tokens"] / s["steps"], "mean_draft_size": s["mean_draft_size"],
                     "identical": same})
    return rows, diverged


def summarise(rows):
    tpf = [r["tokens_per_forward"] for r in rows]
    tokens, forwards = sum(r["tokens"] for r in rows), sum(r["forwards"] for r in rows)
    return {"block_efficiency": tokens / forwards, "per_prompt_mean": statistics.mean(tpf),
            "per_prompt_sd": statistics.stdev(tpf) if len(tpf) > 1 else 0.0,
            "mean_draft_size": statistics.mean(r["mean_draft_size"] for r in rows),
            "identical": sum(r["identical"] for r in rows), "prompts": len(rows)}


def paired(a_rows, b_rows):
    """Paired per-prompt difference b - a of tokens per forward: mean, sd, wins/ties/losses."""
    d = [b["tokens_per_forward"] - a["tokens_per_forward"] for a, b in zip(a_rows, b_rows)]
    sd = statistics.stdev(d) if len(d) > 1 else 0.0
    return {"mean_diff": statistics.mean(d), "sd": sd, "se": sd / math.sqrt(len(d)),
            "wins": sum(x > 0 for x in d), "ties": sum(x == 0 for x in d), "losses": sum(x < 0 for x in d)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", default="shipped")
    ap.add_argument("--medusa", default="/work/distill/baselines/medusa-600k")
    ap.add_argument("--n-measure", type=int, default=12)
    ap.add_argument("--n-tune", type=int, default=6, help="distillation prompts for tuning (x 6 categories / 6)")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--num-paths", type=int, default=3)
    ap.add_argument("--trie-nodes", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "results" / "blockwise_eval.json"))
    ap.add_argument("--smoke", action="store_true", help="one weight per rescorer (a check that the script runs)")
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    model, tok = load_model()
    heads = load_head(args.heads, BlockwiseHeads, "blockwise").attach(model)
    result = {"settings": {**vars(args), "model": model.name_or_path, "block_size": heads.config.block_size,
                           "note": "tuning on distillation prompts only; measurement on interleaved benchmark prompts"}}

    # 1. per-head accuracy against the Medusa baseline at the same budget
    acc = {"blockwise": {"top1": [a[0] for a in heads.config.head_accuracies],
                         "top3": [sum(a[:3]) for a in heads.config.head_accuracies],
                         "positions": heads.config.training.get("positions"),
                         "params": heads.num_own_parameters()}}
    medusa_cfg = Path(args.medusa) / "config.json"
    if medusa_cfg.exists():
        cfg = json.loads(medusa_cfg.read_text())
        acc["medusa"] = {"top1": [a[0] for a in cfg["head_accuracies"]],
                         "top3": [sum(a[:3]) for a in cfg["head_accuracies"]],
                         "positions": cfg.get("training", {}).get("positions"), "path": args.medusa}
    result["head_accuracy"] = acc
    print(json.dumps(acc, indent=1), flush=True)

    # 2-3. references
    measure_rows = interleaved_prompts(args.n_measure)
    # tuning prompts: distillation prompts whose responses are NOT in the n-gram's corpus (no memorised answers)
    with gzip.open(ROOT / "results" / "direct_alignment" / "responses-greedy.jsonl.gz", "rt") as f:
        in_ngram = {json.loads(line)["id"] for line in f}
    by_cat: dict = {}
    for r in load_distill_prompts():
        if r["id"] not in in_ngram:
            by_cat.setdefault(r["category"], []).append(r)
    tune_rows = [r for group in zip(*by_cat.values()) for r in group][: args.n_tune]
    result["settings"]["tune_ids"] = [r["id"] for r in tune_rows]
    refs_m = greedy_references(model, tok, measure_rows, args.max_new_tokens)
    refs_t = greedy_references(model, tok, tune_rows, args.max_new_tokens)
    ngram = shipped_ngram()
    neural = DraftModelDrafter.load_assistant(model, "distilled").eval()
    depth = heads.depth

    def refinement(rescorer, num_paths, nodes, **w):
        return BlockwiseRefinementDrafter(heads, rescorer=rescorer, top_k=args.top_k, num_paths=num_paths,
                                          ngram=ngram, neural_lm=neural, max_nodes=nodes, **w)

    # tuning (distillation prompts only)
    weights = (0.3, 1.0) if not args.smoke else (0.5,)
    grid = {"ngram": [{"ngram_weight": w} for w in weights],
            "neural": [{"neural_weight": w} for w in weights]}
    tuning, best = [], {}
    for rescorer, options in grid.items():  # tuned on the chain; the trie reuses the weights
        scored = []
        for w in options:
            rows, _ = run(model, refinement(rescorer, 1, depth, **w), refs_t, args.max_new_tokens)
            s = summarise(rows)
            scored.append((s["block_efficiency"], w))
            tuning.append({"shape": "chain", "rescorer": rescorer, **w, **s})
            print("tune", rescorer, w, round(s["block_efficiency"], 3), flush=True)
        for shape in ("chain", "trie"):
            best[(shape, rescorer)] = max(scored, key=lambda x: x[0])[1]
    for shape in ("chain", "trie"):
        best[(shape, "both")] = {**best[(shape, "ngram")], **best[(shape, "neural")]}
    result["tuning"] = tuning
    result["chosen_weights"] = {f"{s}/{r}": w for (s, r), w in best.items()}

    # measurement (benchmark prompts)
    arms = {"bpd": BlockwiseDrafter(heads)}  # = the raw chain (the heads' argmax path, tests/test_blockwise_refinement.py)
    arms["trie/raw"] = refinement(None, args.num_paths, args.trie_nodes)
    for shape, (p, nodes) in {"chain": (1, depth), "trie": (args.num_paths, args.trie_nodes)}.items():
        for rescorer in ("ngram", "neural", "both"):
            arms[f"{shape}/{rescorer}"] = refinement(rescorer, p, nodes, **best[(shape, rescorer)])
    per_item, summary, ties = {}, {}, {}
    for name, drafter in arms.items():
        rows, diverged = run(model, drafter, refs_m, args.max_new_tokens)
        per_item[name] = rows
        summary[name] = summarise(rows)
        if diverged:
            ties[name] = near_tie_tally(model, refs_m, diverged)
        summary[name]["near_tie_divergences"] = ties.get(name, 0)
        print("measure", name, json.dumps(summary[name]), flush=True)
    comparisons = {}
    for shape in ("chain", "trie"):
        for rescorer in ("ngram", "neural", "both"):
            raw = "bpd" if shape == "chain" else "trie/raw"
            comparisons[f"{shape}/{rescorer} - {raw}"] = paired(per_item[raw], per_item[f"{shape}/{rescorer}"])
    by_cat = {}
    for name in ("bpd", "chain/ngram", "trie/raw", "trie/ngram"):
        for r in per_item[name]:
            by_cat.setdefault(r["category"], {}).setdefault(name, []).append(r["tokens_per_forward"])
    result["per_category"] = {c: {k: statistics.mean(v) for k, v in d.items()} for c, d in by_cat.items()}
    result["comparisons"] = comparisons
    result["per_item"] = per_item
    result["arms"] = summary
    result["summary"] = {
        "bpd_block_efficiency": round(summary["bpd"]["block_efficiency"], 4),
        "bpd_identical_to_greedy": f"{summary['bpd']['identical']}/{summary['bpd']['prompts']}",
        "bpd_top1_per_head": [round(a, 4) for a in acc["blockwise"]["top1"]],
        "medusa_600k_top1_per_head": [round(a, 4) for a in acc.get("medusa", {}).get("top1", [])],
        **{f"block_efficiency_{k.replace('/', '_')}": round(v["block_efficiency"], 4) for k, v in summary.items()},
        **{f"gain_{k.split(' ')[0].replace('/', '_')}": round(v["mean_diff"], 4) for k, v in comparisons.items()},
        "seconds": round(time.time() - t0, 1),
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
