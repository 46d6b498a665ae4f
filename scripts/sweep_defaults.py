"""Check the registry defaults against other sizes of the same drafters, on the distillation prompts (issue 16).

    nohup python scripts/sweep_defaults.py --per-category 2 --repeats 2 --max-new-tokens 96 > /tmp/sweep.log 2>&1 &

The defaults (``max_nodes="auto"``, prompt lookup's ``num_tokens="auto"``) are sized from the verify-cost curve
measured on this machine and the acceptance counted on the first 3 distillation prompts of each category; this run
times them against fixed sizes on *other* distillation prompts (from the 4th of each category on; never the benchmark
prompts), one interleaved run with greedy under the same kernels as the same-kernel baseline, and writes
``<out>/defaults_sweep.json`` and ``.png`` (the ``speed_ratio_same_kernel`` of each configuration).
"""

from __future__ import annotations

import argparse

from hf_decoding_ext.bench.prompts import load_distill_prompts
from hf_decoding_ext.bench.run import run_speed
from hf_decoding_ext.bench.speed import GREEDY_KWARGS
from hf_decoding_ext.core.models import load_model
from hf_decoding_ext.speculative import SpeculativeDecoding
from hf_decoding_ext.speculative.drafters.auto_speculative import AutoSpeculativeDrafter
from hf_decoding_ext.speculative.drafters.prompt_lookup import PromptLookupDrafter
from hf_decoding_ext.speculative.drafters.token_recycling import TokenRecyclingDrafter


def configurations() -> dict:
    loop = lambda drafter: {"custom_generate": SpeculativeDecoding(drafter), "do_sample": False}  # noqa: E731
    out = {"greedy/fast-kernels": {"kernels": "auto", **GREEDY_KWARGS}}
    out["token-recycling (auto)"] = loop(TokenRecyclingDrafter())
    for n in (4, 8, 16, 24, 40):
        out[f"token-recycling ({n} nodes)"] = loop(TokenRecyclingDrafter(max_nodes=n))
    out["prompt-lookup (auto)"] = loop(PromptLookupDrafter(num_tokens="auto"))
    for n in (3, 6, 10, 16):
        out[f"prompt-lookup ({n} tokens)"] = loop(PromptLookupDrafter(num_tokens=n))
    out["auto-speculative (auto)"] = loop(AutoSpeculativeDrafter())
    for n in (6, 16, 24, 40):
        out[f"auto-speculative ({n} nodes)"] = loop(AutoSpeculativeDrafter(max_nodes=n))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-category", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--only", default=None, help="only the configurations whose name starts with this drafter name")
    ap.add_argument("--tag", default="defaults_sweep")
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    model, tokenizer = load_model()
    rows = load_distill_prompts(limit=3 + args.per_category + 1)
    by_cat: dict[str, list] = {}
    for row in rows:
        by_cat.setdefault(row["category"], []).append(row)
    measured = [r for rs in by_cat.values() for r in rs[3:3 + args.per_category]]  # not the tuning prompts
    warm = [rs[-1] for rs in by_cat.values()][::3]
    configs = {k: v for k, v in configurations().items()
               if args.only is None or k.startswith(args.only) or k == "greedy/fast-kernels"}
    res = run_speed(configs, model, tokenizer, prompts=measured, max_new_tokens=args.max_new_tokens,
                    out_dir=args.out, tag=args.tag, repeats=args.repeats, warmup_prompts=warm,
                    same_kernel="greedy/fast-kernels")
    for name, m in res["methods"].items():
        o = m["overall"]
        print(f"{name:32s} own x{o.get('speed_ratio_same_kernel', float('nan')):.3f}  "
              f"tokens/forward {o['tokens_per_forward']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
