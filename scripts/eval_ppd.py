"""Parallel Prompt Decoding (arXiv 2405.18628) on SmolLM2-135M-Instruct: the paper's properties, measured.

1. Trained prompt tokens against untrained ones (the same initialisation: the mean input embedding) in tokens per
   target forward, on interleaved benchmark prompts (measurement only, nothing tuned on them), with the same pinned
   tree for both arms (``choices_from_accuracies`` of the trained tokens' held-out accuracies, every node carrying
   all prompt tokens) and with each arm's own hardware-aware tree on this machine's measured curve; the shipped
   Medusa heads at the same pinned size as a reference.
2. Lossless greedy: every run is compared token by token with plain greedy ``generate()``.
3. The hardware-aware tree of this machine's measured verify-cost curve (``tuning.device_curve``) against the tree
   of an accelerator-like flat curve and the paper's GPU tree (105 tokens).

Writes ``results/ppd_eval.json``. Run through the training queue (about 5 minutes on the 2-core CPU):
``python scripts/eval_ppd.py --heads /work/distill/runs/ppd``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parents[1] / "results" / "ppd_eval.json"


def _stats(values):
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return round(mean, 4), round(sd / math.sqrt(n), 4)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", default="shipped", help="trained prompt tokens: 'shipped' or a folder")
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--pinned-nodes", type=int, default=10)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()

    from hf_decoding_ext.bench.parity import greedy_references
    from hf_decoding_ext.bench.prompts import interleaved_prompts
    from hf_decoding_ext.core.models import load_model
    from hf_decoding_ext.core.tree import choices_from_accuracies
    from hf_decoding_ext.speculative import SpeculativeDecoding
    from hf_decoding_ext.speculative.drafters.medusa import MedusaDrafter
    from hf_decoding_ext.speculative.drafters.ppd import FLAT_CURVE, PAPER_GPU_TREE_LENGTH, PPDDrafter, \
        hardware_aware_tree
    from hf_decoding_ext.speculative.heads.ppd import PPDConfig, PromptTokens
    from hf_decoding_ext.speculative.policies.tuning import device_curve

    t0 = time.time()
    model, tok = load_model(None)
    model.eval()
    trained = PPDDrafter.for_model(model, tok, heads=args.heads).head
    untrained = PromptTokens(PPDConfig(**{k: getattr(trained.config, k) for k in (
        "hidden_size", "vocab_size", "num_prompt_tokens", "num_virtual_tokens")})).attach(model)
    acc = trained.config.head_accuracies
    m = trained.config.num_prompt_tokens
    curve = device_curve(model)
    pinned = [list(c) for c in choices_from_accuracies(acc, args.pinned_nodes, max_depth=m)]
    trees = {}
    for name, c in (("this_cpu", curve), ("flat", FLAT_CURVE)):
        choices, counts, info = hardware_aware_tree(acc, c, m)
        trees[name] = {"nodes": len(choices), "prompt_tokens": sum(counts), "verify_size": info["size"],
                       "expected_tokens_per_step": round(info["tokens"], 4), "expected_rate": round(info["rate"], 4),
                       "choices": [list(p) for p in choices], "counts": counts}
    trees["paper_gpu_tree_length"] = PAPER_GPU_TREE_LENGTH
    trees["this_cpu_curve"] = {"tokens": list(curve.tokens), "cost": [round(x, 4) for x in curve.cost],
                               "source": curve.source}

    rows = interleaved_prompts(args.prompts)
    refs = greedy_references(model, tok, rows, args.max_new_tokens)
    arms = {
        "trained_pinned": lambda: PPDDrafter(trained, tree_choices=pinned),
        "untrained_pinned": lambda: PPDDrafter(untrained, tree_choices=pinned),
        "trained_auto": lambda: PPDDrafter(trained, curve=curve),
        "untrained_auto": lambda: PPDDrafter(untrained, curve=curve),
        "medusa_pinned": lambda: MedusaDrafter("shipped", max_nodes=args.pinned_nodes),
    }
    items, results = [], {}
    for arm, make in arms.items():
        per = []
        for row, enc, ref in refs:
            engine = SpeculativeDecoding(make())
            with torch.inference_mode():
                out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False,
                                     custom_generate=engine)
            s = engine.summary()
            per.append({"arm": arm, "id": row["id"], "category": row["category"], "identical": bool(torch.equal(out, ref)),
                        "tokens": s["tokens"], "forwards": s["steps"], "tokens_per_forward": round(s["tokens_per_forward"], 4),
                        "mean_draft_size": round(s["mean_draft_size"], 2)})
        items += per
        tpf = [p["tokens"] / p["forwards"] for p in per]
        mean, se = _stats(tpf)
        results[arm] = {"tokens_per_forward": mean, "se": se,
                        "pooled_tokens_per_forward": round(sum(p["tokens"] for p in per) / sum(p["forwards"] for p in per), 4),
                        "identical": sum(p["identical"] for p in per), "prompts": len(per)}
        print(arm, results[arm], flush=True)
    diffs = [a["tokens"] / a["forwards"] - b["tokens"] / b["forwards"]
             for a, b in zip([i for i in items if i["arm"] == "trained_pinned"],
                             [i for i in items if i["arm"] == "untrained_pinned"])]
    d_mean, d_se = _stats(diffs)
    summary = {
        "prompts": len(rows) * 4,
        "identical": sum(results[a]["identical"] for a in ("trained_pinned", "untrained_pinned", "trained_auto",
                                                            "untrained_auto")),
        "trained_tokens_per_forward": results["trained_pinned"]["tokens_per_forward"],
        "untrained_tokens_per_forward": results["untrained_pinned"]["tokens_per_forward"],
        "paired_difference": d_mean, "paired_difference_se": d_se,
        "trained_beats_untrained_on": sum(d > 0 for d in diffs),
        "medusa_tokens_per_forward": results["medusa_pinned"]["tokens_per_forward"],
        "cpu_tree_smaller_than_flat": trees["this_cpu"]["verify_size"] < trees["flat"]["verify_size"],
        "cpu_tree_smaller_than_paper_gpu_tree": trees["this_cpu"]["verify_size"] < PAPER_GPU_TREE_LENGTH,
    }
    res = {"settings": {"model": "SmolLM2-135M-Instruct", "prompts": args.prompts, "source": "interleaved_prompts",
                        "max_new_tokens": args.max_new_tokens, "pinned_tree": pinned, "heads": str(args.heads),
                        "dtype": "float32", "kernels": "auto", "acceptance": "greedy"},
           "trained": {"head_accuracies": acc, "training": trained.config.training,
                       "parameters": trained.num_own_parameters()},
           "trees": trees, "arms": results, "summary": summary, "items": items,
           "seconds": round(time.time() - t0, 1)}
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
