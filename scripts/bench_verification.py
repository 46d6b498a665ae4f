"""Verification schemes with the distilled draft (issue 18): greedy and T=1 sampling in one interleaved run.

    nohup python scripts/bench_verification.py --per-category 1 --repeats 2 --max-new-tokens 256 \\
        > /tmp/bench_verification.log 2>&1 &

Entries (each prompt runs every entry, in an order rotated per prompt and pass; warm-up on distillation prompts
outside the measured set):

- ``greedy`` (stock greedy ``generate()``, the baseline) and ``greedy/fast-kernels`` (greedy under the CPU kernels
  the engine uses: the baseline that isolates a method's own effect);
- ``assisted (transformers)`` with the same distilled draft, under both kernels: the nearest built-in;
- ``sampling`` (stock ancestral sampling at T=1) and ``sampling/fast-kernels``, and transformers' assisted
  generation at T=1 under the fast kernels;
- every registered method of ``--methods`` (their CLI defaults: the distilled draft), greedy and at T=1 (lossy
  methods are marked; their T=1 output is compared in distribution only by the tests).

Per entry: tokens/s and its ratio to stock greedy (or stock sampling for T=1 entries) and to the same-kernel
baseline, tokens per target forward, draft-model forwards per token, spread over the passes. Writes
``<out>/verification_speed.json`` and ``.png``.

``--t1-only`` runs the T=1 entries alone (stock sampling, sampling under the fast kernels, transformers' assisted
generation at T=1 under both kernels, every method at T=1; stock and same-kernel greedy stay as the kernel-effect
reference) and writes ``<out>/verification_speed_t1.json`` and ``.png``: one interleaved run of its own.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hf_decoding_ext.bench.plot import plot_same_kernel_ratios
from hf_decoding_ext.bench.prompts import load_distill_prompts, load_prompts
from hf_decoding_ext.bench.speed import ANCESTRAL_KWARGS, GREEDY_KWARGS, benchmark_speed, summarise
from hf_decoding_ext.core.models import load_model
from hf_decoding_ext.plug import generate_kwargs
from hf_decoding_ext.registry import get_method

# ``direct-alignment`` is the ``draft-model`` drafter with the same default assistant (the distilled draft): one entry
# measures both. ``specdec-pp`` (experimental: its property fails) is left to its tests.
METHODS = ("draft-model", "spectr", "mcsd", "rsd", "dyspec", "staged-speculative", "pearl")


def entries(model, tokenizer, names, t1_only: bool = False) -> tuple[dict, object]:
    from hf_decoding_ext.speculative.drafters.draft_model import DraftModelDrafter

    draft = DraftModelDrafter.load_assistant(model, "distilled")
    out = {
        "greedy/fast-kernels": {"kernels": "auto", **GREEDY_KWARGS},
        "assisted (transformers)": {"assistant_model": draft, "count_forwards_of": draft, **GREEDY_KWARGS},
        "assisted (transformers)/fast-kernels": {"assistant_model": draft, "count_forwards_of": draft,
                                                 "kernels": "auto", **GREEDY_KWARGS},
        "sampling": dict(ANCESTRAL_KWARGS),
        "sampling/fast-kernels": {"kernels": "auto", **ANCESTRAL_KWARGS},
        "assisted (transformers) T=1/fast-kernels": {"assistant_model": draft, "count_forwards_of": draft,
                                                     "kernels": "auto", **ANCESTRAL_KWARGS},
    }
    temps = (False, True)
    if t1_only:  # stock greedy (always run) and greedy/fast-kernels stay: they show this machine's kernel effect
        out = {k: v for k, v in out.items() if k == "greedy/fast-kernels" or "T=1" in k or k.startswith("sampling")}
        out["assisted (transformers) T=1"] = {"assistant_model": draft, "count_forwards_of": draft,
                                              **ANCESTRAL_KWARGS}
        temps = (True,)
    for name in names:
        spec = get_method(name)
        for t1 in temps:
            def build(spec=spec, t1=t1):
                kw = generate_kwargs(spec, model=model, tokenizer=tokenizer)
                drafter = getattr(kw.get("custom_generate"), "drafter", None)
                assistant = getattr(drafter, "assistant_model", None)
                if assistant is not None:
                    kw["count_forwards_of"] = assistant
                kw.update(ANCESTRAL_KWARGS if t1 else GREEDY_KWARGS)
                return kw
            out[f"{name}{' T=1' if t1 else ''}"] = build
    return out, draft


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-category", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--warmup-prompts", type=int, default=2, help="distillation prompts run once per entry first")
    ap.add_argument("--out", default="results")
    ap.add_argument("--t1-only", action="store_true",
                    help="only the T=1 entries (with stock and same-kernel greedy): writes verification_speed_t1.*")
    args = ap.parse_args(argv)
    model, tokenizer = load_model()
    methods, _ = entries(model, tokenizer, args.methods, t1_only=args.t1_only)
    prompts = load_prompts(per_category=args.per_category)
    warm = load_distill_prompts(limit=1)[: args.warmup_prompts]
    result = benchmark_speed(model, tokenizer, methods, prompts, max_new_tokens=args.max_new_tokens,
                             repeats=args.repeats, warmup_prompts=warm, same_kernel="greedy/fast-kernels",
                             tag="verification_speed")
    # the T=1 entries against stock sampling and same-kernel sampling (the same rows, another pairing)
    t1_rows = [r for r in result["rows"] if r["method"].endswith("T=1") or r["method"].startswith("sampling")
               or "T=1" in r["method"]]
    t1 = summarise(t1_rows, baseline="sampling", same_kernel="sampling/fast-kernels")
    for name, figs in t1.items():
        result["methods"][name] = {**result["methods"][name], **figs}
    result["settings"]["draft_model_sampling_confidence_stop"] = True  # the drafter stops on low confidence at T=1
    result["settings"]["draft-model"] = ("the draft-model entries measure direct-alignment too (the same drafter "
                                         "with the same default assistant, the shipped distilled draft)")
    result["settings"]["t1_entries"] = ("entries named 'T=1' and 'sampling*' are paired with stock sampling "
                                        "(speed_ratio) and sampling/fast-kernels (speed_ratio_same_kernel)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "verification_speed_t1" if args.t1_only else "verification_speed"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str))
    plot_same_kernel_ratios(result, out / f"{stem}.png")
    for name, m in result["methods"].items():
        o = m["overall"]
        print(f"{name:45s} {o['tokens_per_s']:7.1f} tok/s  x{o.get('speed_ratio_same_kernel', float('nan')):.2f} "
              f"same-kernel  {o['tokens_per_forward']:.2f} tok/fwd  draft fwd/tok "
              f"{o.get('draft_forwards_per_token', float('nan'))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
