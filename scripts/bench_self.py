"""Self-speculation and early exit (issue 20): one interleaved speed run of the layer-skip drafters and the lossy
early-exit loops against greedy.

    nohup python scripts/bench_self.py --per-category 1 --repeats 2 --max-new-tokens 64 \\
        > /tmp/bench_self.log 2>&1 &
    nohup python scripts/bench_self.py --per-category 0 --long 2048 4096 8192 --methods sparse-to-dense \\
        --tag self_long_speed > /tmp/bench_self_long.log 2>&1 &

Entries (each prompt runs every entry, in an order rotated per prompt and pass; warm-up on a distillation prompt
outside the measured set, persistent drafters reset after it):

- ``greedy`` (stock greedy ``generate()``, the baseline) and ``greedy/fast-kernels`` (the same-kernel baseline:
  greedy with the CPU kernel plan the engine uses);
- transformers' nearest built-in, LayerSkip self-speculation (``assistant_early_exit=N``, draft = the first ``N``
  layers and the shared head), under both kernels;
- every method of ``--methods`` with its registry defaults (greedy for the lossless drafters; the lossy loops FREE
  and D^3 as registered).

Per entry: tokens/s against stock greedy and against the same-kernel baseline, tokens per target forward, the share
of wall time outside the target's forwards. Writes ``<out>/<tag>.json`` and ``.png``. ``--dtype bfloat16`` measures
the bfloat16 model (the brief asks for both dtypes: the lm_head's few-row product costs the same as one row there).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from hf_decoding_ext.bench.plot import plot_same_kernel_ratios
from hf_decoding_ext.bench.prompts import load_distill_prompts, load_prompts, long_input_prompts
from hf_decoding_ext.bench.speed import GREEDY_KWARGS, benchmark_speed
from hf_decoding_ext.core.models import load_model
from hf_decoding_ext.plug import generate_kwargs
from hf_decoding_ext.registry import get_method

METHODS = ("swift", "clasp", "del", "eesd", "sparse-to-dense", "free", "d3")


def entries(model, tokenizer, names, early_exit: int) -> dict:
    out = {
        "greedy/fast-kernels": {"kernels": "auto", **GREEDY_KWARGS},
        f"LayerSkip early exit {early_exit} (transformers)": {"assistant_early_exit": early_exit, **GREEDY_KWARGS},
        f"LayerSkip early exit {early_exit} (transformers)/fast-kernels": {
            "assistant_early_exit": early_exit, "kernels": "auto", **GREEDY_KWARGS},
    }
    for name in names:
        def build(spec=get_method(name)):
            kw = generate_kwargs(spec, model=model, tokenizer=tokenizer)
            kw.pop("top_k", None)
            kw.update(GREEDY_KWARGS)
            return kw
        out[name] = build
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-category", type=int, default=1)
    ap.add_argument("--long", type=int, nargs="*", default=[], help="token counts of long inputs to add")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--early-exit", type=int, default=16,
                    help="layers of transformers' LayerSkip draft (16 of 30: about the layer-skip drafters' cost)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--warmup-prompts", type=int, default=1)
    ap.add_argument("--tag", default=None)
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    tag = args.tag or ("self_speed" + ("" if args.dtype == "float32" else f"_{args.dtype}"))
    model, tokenizer = load_model(dtype=getattr(torch, args.dtype))
    methods = entries(model, tokenizer, args.methods, args.early_exit)
    prompts = (load_prompts(per_category=args.per_category) if args.per_category else []) + \
        long_input_prompts(tokenizer, args.long)
    warm = load_distill_prompts(limit=args.warmup_prompts)
    result = benchmark_speed(model, tokenizer, methods, prompts, max_new_tokens=args.max_new_tokens,
                             repeats=args.repeats, warmup_prompts=warm, same_kernel="greedy/fast-kernels", tag=tag)
    result["settings"]["dtype"] = args.dtype
    if args.long:
        result["settings"]["long_inputs"] = {"tokens": list(args.long), "source": "hf_decoding_ext/data/specextend "
                                             "(public-domain docutils docstrings), summarisation instruction"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{tag}.json").write_text(json.dumps(result, indent=1, default=str))
    plot_same_kernel_ratios(result, out / f"{tag}.png",
                            title=f"Self-speculation and early exit, SmolLM2-135M-Instruct, {args.dtype}, 2-core CPU")
    for name, m in result["methods"].items():
        o = m["overall"]
        print(f"{name:55s} {o['tokens_per_s']:7.1f} tok/s  x{o.get('speed_ratio_same_kernel', float('nan')):.2f} "
              f"same-kernel  {o['tokens_per_forward']:.2f} tok/fwd  outside target {o.get('overhead_frac')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
