"""Profile STAND's draft tree as the paper does (issue 19): run the drafter with a large template on sampled
trajectories of distillation prompts, count per node the steps on which it was on the accepted path, keep the most
accepted nodes under the node budget, and ship the result as ``hf_decoding_ext/data/stand/tree.json``.

    nohup python scripts/profile_stand_tree.py > /tmp/profile_stand.log 2>&1 &

Setting (the paper's: ~30 sampled reasoning trajectories, stores shared by the trajectories of a prompt): 8
``math_reasoning`` distillation prompts (never the benchmark prompts) x 4 trajectories at T=0.6, 128 new tokens, the
template :data:`~hf_decoding_ext.speculative.drafters.stand.PROFILE_TEMPLATE` (130 nodes), a budget of 17 nodes (the
hand-set tree's size, what a CPU verification affords). Counts from every trajectory are kept (the first trajectory
of a prompt drafts from its own output only; later ones from the shared store), as is the hand-set tree's acceptance
on the same run for comparison (the nodes of the template that the hand-set tree contains).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hf_decoding_ext.bench.prompts import load_distill_prompts
from hf_decoding_ext.bench.speed import encode_prompt
from hf_decoding_ext.core.models import load_model
from hf_decoding_ext.speculative import SpeculativeDecoding
from hf_decoding_ext.speculative.drafters.stand import (HAND_SET_TREE, PROFILE_TEMPLATE, PROFILED_TREE_FILE,
                                                        STANDDrafter, compact_tree)
from hf_decoding_ext.speculative.drafters.token_recycling import expand_template


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--trajectories", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--num-nodes", type=int, default=17)
    ap.add_argument("--out", default=str(PROFILED_TREE_FILE))
    args = ap.parse_args(argv)
    model, tokenizer = load_model()
    rows = load_distill_prompts(categories=["math_reasoning"], limit=args.prompts)
    template = expand_template(PROFILE_TEMPLATE)
    hits = {p: 0 for p in template}
    steps = tokens = 0
    bar = tqdm(total=len(rows) * args.trajectories, desc="STAND tree profiling")
    for i, row in enumerate(rows):
        enc = encode_prompt(row, tokenizer)
        drafter = STANDDrafter(tree=template, record_hits=True)  # one store per prompt, shared by its trajectories
        loop = SpeculativeDecoding(drafter)
        for t in range(args.trajectories):
            torch.manual_seed(1000 + 100 * i + t)
            model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=True, top_k=0, top_p=1.0,
                           temperature=args.temperature, custom_generate=loop)
            s = loop.summary()
            steps, tokens = steps + s["steps"], tokens + s["tokens"]
            bar.update(1)
            bar.set_postfix(tokens_per_forward=round(tokens / max(steps, 1), 3))
        for p, n in drafter.node_hits.items():
            hits[p] += n
    paths = compact_tree(hits, args.num_nodes)
    hand = set(expand_template(HAND_SET_TREE))
    record = {
        "paths": [list(p) for p in paths],
        "hits": [hits[p] for p in paths],
        "steps": steps, "tokens": tokens,
        "expected_accepted_per_step": {
            "profiled": sum(hits[p] for p in paths) / steps,
            "hand_set": sum(hits[p] for p in hand if p in hits) / steps,
            "template": sum(hits.values()) / steps,
        },
        "settings": {"prompts": [r["id"] for r in rows], "trajectories": args.trajectories,
                     "temperature": args.temperature, "max_new_tokens": args.max_new_tokens,
                     "template_nodes": len(template), "num_nodes": args.num_nodes,
                     "note": ("hits[p]: steps on which node p (a path of Gumbel-Top-K ranks) was on the accepted "
                              "path with the template as the draft tree; expected_accepted_per_step: the accepted "
                              "draft tokens per step the kept nodes account for on this run")},
        "script": "scripts/profile_stand_tree.py",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps(record["expected_accepted_per_step"]), "->", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
