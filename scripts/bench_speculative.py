"""Speed benchmark of a drafter family: default model, greedy, interleaved with plain greedy ``generate()`` and
transformers' prompt lookup / assisted generation in one run.

    python scripts/bench_speculative.py --per-category 3 --max-new-tokens 256 --out results            # issue 3
    python scripts/bench_speculative.py --family trained-heads --per-category 2 --max-new-tokens 256   # issue 6

Writes ``<out>/<family>_speed.json`` and ``.png``. Besides every registered drafter of the family it times the best
training-free drafter, ``prompt-lookup+token-recycling`` (:class:`MergedDrafter`, at most 20 nodes), reused across
prompts like the others.
"""

from __future__ import annotations

import argparse

from hf_decoding_ext.bench.run import run_family
from hf_decoding_ext.speculative import SpeculativeDecoding
from hf_decoding_ext.speculative.drafters.merged import MergedDrafter
from hf_decoding_ext.speculative.drafters.prompt_lookup import PromptLookupDrafter
from hf_decoding_ext.speculative.drafters.token_recycling import TokenRecyclingDrafter


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", default="speculative", choices=["speculative", "trained-heads"])
    ap.add_argument("--per-category", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--out", default="results")
    ap.add_argument("--methods", nargs="*", default=None)
    args = ap.parse_args(argv)
    merged = SpeculativeDecoding(MergedDrafter([PromptLookupDrafter(), TokenRecyclingDrafter(max_nodes=12)],
                                               max_nodes=20))

    def merged_kwargs():
        return {"custom_generate": merged, "do_sample": False}

    merged_kwargs.__name__ = "MergedDrafter([PromptLookupDrafter(), TokenRecyclingDrafter(max_nodes=12)], max_nodes=20)"
    res = run_family(args.family, methods=args.methods, per_category=args.per_category,
                     max_new_tokens=args.max_new_tokens, out_dir=args.out,
                     extra_methods={"prompt-lookup+token-recycling": merged_kwargs})
    for name, m in res["speed"]["methods"].items():
        o = m["overall"]
        print(f"{name:32s} speed x{o['speed_ratio']:.3f}  tokens/forward {o['tokens_per_forward']:.2f}  "
              f"overhead {o['overhead_frac']:.3f}  = greedy {o['match_baseline_rate']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
