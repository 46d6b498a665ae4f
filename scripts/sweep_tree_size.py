"""Tree-size sweep of the trained-head drafters (and the best training-free drafter) on the default model: speed
over greedy and tokens per target forward for several ``max_nodes``, one interleaved run.

    python scripts/sweep_tree_size.py --per-category 1 --max-new-tokens 128 --out results

Writes ``<out>/trained-heads_tree_size.json`` (the run's full speed result plus a ``sweep`` table). This is how the
CPU default ``max_nodes="auto"`` of the feature-head drafters
(:data:`hf_decoding_ext.speculative.drafters.feature_head.CPU_MAX_NODES`) was chosen.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hf_decoding_ext.bench.prompts import load_prompts
from hf_decoding_ext.bench.references import RepeatLastTokenDrafter
from hf_decoding_ext.bench.speed import GREEDY_KWARGS, benchmark_speed
from hf_decoding_ext.core.models import load_model
from hf_decoding_ext.speculative import SpeculativeDecoding
from hf_decoding_ext.speculative.heads import head_classes
from hf_decoding_ext.speculative.drafters.merged import MergedDrafter
from hf_decoding_ext.speculative.drafters.prompt_lookup import PromptLookupDrafter
from hf_decoding_ext.speculative.drafters.token_recycling import TokenRecyclingDrafter

HEADS = {kind: cls.load_drafter_class() for kind, cls in head_classes().items()}  # read from the head classes


def _method(loop):
    def kwargs():
        return {**GREEDY_KWARGS, "custom_generate": loop}
    return kwargs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="2,3,4,6,8,16")
    ap.add_argument("--heads", nargs="*", default=sorted(HEADS))
    ap.add_argument("--per-category", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    model, tok = load_model()
    model.eval()
    methods = {}
    for kind in args.heads:
        drafter_cls = HEADS[kind]
        for n in sizes:
            methods[f"{kind}@{n}"] = _method(SpeculativeDecoding(drafter_cls(max_nodes=n)))
    for n in sizes:
        tr = max(1, n - 2)
        methods[f"prompt-lookup+token-recycling@{n}"] = _method(SpeculativeDecoding(
            MergedDrafter([PromptLookupDrafter(), TokenRecyclingDrafter(max_nodes=tr)], max_nodes=n)))
    methods["repeat-last-token@1"] = _method(SpeculativeDecoding(RepeatLastTokenDrafter()))
    prompts = load_prompts(per_category=args.per_category)
    res = benchmark_speed(model, tok, methods, prompts, max_new_tokens=args.max_new_tokens,
                          tag="trained-heads-tree-size")
    table = {}
    for name, m in res["methods"].items():
        if "@" not in name:
            continue
        kind, n = name.rsplit("@", 1)
        o = m["overall"]
        table.setdefault(kind, {})[int(n)] = {"speed_ratio": round(o["speed_ratio"], 3),
                                              "tokens_per_forward": round(o["tokens_per_forward"], 3),
                                              "match_baseline_rate": o["match_baseline_rate"]}
        print(f"{name:36s} x{o['speed_ratio']:.3f}  tokens/forward {o['tokens_per_forward']:.2f}  "
              f"= greedy {o['match_baseline_rate']}")
    res["sweep"] = table
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "trained-heads_tree_size.json").write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
