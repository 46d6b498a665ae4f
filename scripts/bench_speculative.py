"""Speed benchmark of a drafter family: default model, greedy, interleaved with plain greedy ``generate()`` and
transformers' prompt lookup / assisted generation in one run.

    python scripts/bench_speculative.py --per-category 3 --max-new-tokens 256 --out results            # issue 3
    python scripts/bench_speculative.py --family trained-heads --per-category 2 --max-new-tokens 256   # issue 6

Writes ``<out>/<family>_speed.json`` and ``.png``. Besides every registered drafter of the family it times the best
training-free drafter, ``prompt-lookup+token-recycling`` (:class:`MergedDrafter`, at most ``--merged-nodes`` nodes),
reused across prompts like the others. For the trained-heads family it also times ``eagle+prompt-lookup`` (the
EAGLE drafter's tree merged with prompt lookup's chain, the same node cap), ``eagle-fspad/pytorch-linear`` (the EAGLE
drafter with the engine's small-batch linear layout switched off) and ``repeat-last-token (reference)`` (a one-node
near-null draft: the engine's own speed with about one token per forward), so the kernel layout's share of the
speed-up is measured in the same run.
"""

from __future__ import annotations

import argparse

from hf_decoding_ext.bench.references import RepeatLastTokenDrafter
from hf_decoding_ext.bench.run import run_family
from hf_decoding_ext.speculative import SpeculativeDecoding
from hf_decoding_ext.speculative.drafters.merged import MergedDrafter
from hf_decoding_ext.speculative.drafters.prompt_lookup import PromptLookupDrafter
from hf_decoding_ext.speculative.drafters.token_recycling import TokenRecyclingDrafter


def _loop(loop, description: str):
    def kwargs():
        return {"custom_generate": loop, "do_sample": False}

    kwargs.__name__ = description
    return kwargs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", default="speculative", choices=["speculative", "trained-heads"])
    ap.add_argument("--per-category", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--out", default="results")
    ap.add_argument("--methods", nargs="*", default=None)
    ap.add_argument("--merged-nodes", type=int, default=20, help="tree cap of prompt-lookup+token-recycling")
    args = ap.parse_args(argv)
    n = args.merged_nodes
    extra = {"prompt-lookup+token-recycling": _loop(
        SpeculativeDecoding(MergedDrafter([PromptLookupDrafter(), TokenRecyclingDrafter(max_nodes=max(1, n - 8))],
                                          max_nodes=n)),
        f"MergedDrafter([PromptLookupDrafter(), TokenRecyclingDrafter(max_nodes={max(1, n - 8)})], max_nodes={n})")}
    if args.family == "trained-heads":
        from hf_decoding_ext.speculative.drafters.eagle import EagleDrafter

        extra["eagle+prompt-lookup"] = _loop(
            SpeculativeDecoding(MergedDrafter([EagleDrafter("shipped"), PromptLookupDrafter()], max_nodes=n)),
            f"MergedDrafter([EagleDrafter('shipped'), PromptLookupDrafter()], max_nodes={n})")
        extra["repeat-last-token (reference)"] = _loop(
            SpeculativeDecoding(RepeatLastTokenDrafter()), "SpeculativeDecoding(RepeatLastTokenDrafter())")
        extra["eagle-fspad/pytorch-linear"] = _loop(
            SpeculativeDecoding(EagleDrafter("shipped"), small_batch_linear=False),
            "SpeculativeDecoding(EagleDrafter('shipped'), small_batch_linear=False)")
    res = run_family(args.family, methods=args.methods, per_category=args.per_category,
                     max_new_tokens=args.max_new_tokens, out_dir=args.out, extra_methods=extra)
    for name, m in res["speed"]["methods"].items():
        o = m["overall"]
        print(f"{name:32s} speed x{o['speed_ratio']:.3f}  tokens/forward {o['tokens_per_forward']:.2f}  "
              f"overhead {o['overhead_frac']:.3f}  = greedy {o['match_baseline_rate']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
