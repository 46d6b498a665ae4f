"""Training-free drafters II (issue 19): the project's prompt set plus long inputs, greedy and T=1, one interleaved
run.

    nohup python scripts/bench_drafters_ii.py --per-category 1 --repeats 2 --max-new-tokens 128 \\
        > /tmp/bench_drafters_ii.log 2>&1 &

Entries (each prompt runs every entry, in an order rotated per prompt and pass; warm-up on a distillation prompt
outside the measured set, persistent drafters reset after it):

- ``greedy`` (stock greedy ``generate()``, the baseline) and ``greedy/fast-kernels`` (the same-kernel baseline);
- transformers' prompt lookup (``prompt_lookup_num_tokens=10``), the nearest training-free built-in, under both
  kernels;
- every method of ``--methods`` greedy (registry defaults);
- ``sampling`` and ``sampling/fast-kernels`` at T=1 and the sampling-aware drafters (``--sampling-methods``) at T=1.

Prompts: ``--per-category`` benchmark prompts per category and ``--long`` public-domain documents (the shipped
docutils text, :func:`~hf_decoding_ext.speculative.drafters.specextend.long_document`) of the given token counts to
summarise (category ``long_input``). Per entry: tokens/s against stock greedy (stock sampling for T=1 entries) and
against the same-kernel baseline, tokens per target forward, the share of wall time outside the target's forwards
(drafting and the loop: ``overhead_frac``). Writes ``<out>/drafters_ii_speed.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hf_decoding_ext.bench.plot import plot_same_kernel_ratios
from hf_decoding_ext.bench.prompts import load_distill_prompts, load_prompts, long_input_prompts
from hf_decoding_ext.bench.speed import ANCESTRAL_KWARGS, GREEDY_KWARGS, benchmark_speed, summarise
from hf_decoding_ext.core.models import load_model
from hf_decoding_ext.plug import generate_kwargs
from hf_decoding_ext.registry import get_method

METHODS = ("speculative-jacobi", "stand", "dresd", "aded", "rasd", "specextend")
SAMPLING_METHODS = ("speculative-jacobi", "stand")


def entries(model, tokenizer, names, sampling_names) -> dict:
    out = {
        "greedy/fast-kernels": {"kernels": "auto", **GREEDY_KWARGS},
        "prompt lookup (transformers)": {"prompt_lookup_num_tokens": 10, **GREEDY_KWARGS},
        "prompt lookup (transformers)/fast-kernels": {"prompt_lookup_num_tokens": 10, "kernels": "auto",
                                                      **GREEDY_KWARGS},
        "sampling": dict(ANCESTRAL_KWARGS),
        "sampling/fast-kernels": {"kernels": "auto", **ANCESTRAL_KWARGS},
    }
    for name in names:
        for t1 in (False, True) if name in sampling_names else (False,):
            def build(spec=get_method(name), t1=t1):
                kw = generate_kwargs(spec, model=model, tokenizer=tokenizer)
                drafter = getattr(kw.get("custom_generate"), "drafter", None)
                assistant = getattr(drafter, "assistant_model", None)
                if assistant is not None:
                    kw["count_forwards_of"] = assistant
                kw.pop("top_k", None)
                kw.update(ANCESTRAL_KWARGS if t1 else GREEDY_KWARGS)
                return kw
            out[f"{name}{' T=1' if t1 else ''}"] = build
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-category", type=int, default=1)
    ap.add_argument("--long", type=int, nargs="*", default=[2048, 4096], help="token counts of the long inputs")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--sampling-methods", nargs="*", default=list(SAMPLING_METHODS))
    ap.add_argument("--warmup-prompts", type=int, default=1)
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    model, tokenizer = load_model()
    methods = entries(model, tokenizer, args.methods, set(args.sampling_methods))
    prompts = load_prompts(per_category=args.per_category) + long_input_prompts(tokenizer, args.long)
    warm = load_distill_prompts(limit=args.warmup_prompts)
    result = benchmark_speed(model, tokenizer, methods, prompts, max_new_tokens=args.max_new_tokens,
                             repeats=args.repeats, warmup_prompts=warm, same_kernel="greedy/fast-kernels",
                             tag="drafters_ii_speed")
    t1_rows = [r for r in result["rows"] if "T=1" in r["method"] or r["method"].startswith("sampling")]
    for name, figs in summarise(t1_rows, baseline="sampling", same_kernel="sampling/fast-kernels").items():
        result["methods"][name] = {**result["methods"][name], **figs}
    result["settings"]["long_inputs"] = {"tokens": list(args.long), "source": "hf_decoding_ext/data/specextend "
                                         "(public-domain docutils docstrings), summarisation instruction"}
    result["settings"]["t1_entries"] = ("entries named 'T=1' and 'sampling*' are paired with stock sampling "
                                        "(speed_ratio) and sampling/fast-kernels (speed_ratio_same_kernel)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "drafters_ii_speed.json").write_text(json.dumps(result, indent=1, default=str))
    plot_same_kernel_ratios(result, out / "drafters_ii_speed.png",
                            title="Training-free drafters II, SmolLM2-135M-Instruct, fp32, 2-core CPU")
    for name, m in result["methods"].items():
        o = m["overall"]
        print(f"{name:45s} {o['tokens_per_s']:7.1f} tok/s  x{o.get('speed_ratio_same_kernel', float('nan')):.2f} "
              f"same-kernel  {o['tokens_per_forward']:.2f} tok/fwd  outside target {o.get('overhead_frac')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
