"""The speed table of every accelerator under one methodology (issue 16), default model, greedy, batch 1.

    nohup python scripts/bench_speed.py --per-category 6 --repeats 3 --max-new-tokens 128 > /tmp/speed.log 2>&1 &

One interleaved run (rotated order per prompt and pass) of: stock greedy ``generate()`` (the ``greedy`` baseline),
greedy under the CPU kernels the accelerators use (``greedy/fast-kernels``: the baseline that isolates a method's own
effect), transformers' prompt lookup under both kernels, the engine's repeat-last-token reference drafter (about
one token per forward: what the engine and its kernels give without useful drafts), and every registered lossless
accelerator of the speculative and trained-heads families exactly as the CLI builds it (one instance reused across
prompts). Warm-up on distillation prompts (outside the measured set), persistent drafters reset afterwards;
``--repeats`` passes; every category with ``--per-category`` prompts. Writes ``<out>/speed.json`` and ``.png``:
``--dtype bfloat16`` runs the model (and every head and drafter, which follow it) in bfloat16. Per method
``speed_ratio_same_kernel`` (the headline: the method's own speed-up), ``speed_ratio`` (over stock
greedy), the per-pass ratios, tokens per target forward and the share of prompts identical to greedy.
"""

from __future__ import annotations

import argparse
import json

import torch

from hf_decoding_ext.bench.prompts import load_distill_prompts
from hf_decoding_ext.bench.references import RepeatLastTokenDrafter
from hf_decoding_ext.bench.run import run_speed
from hf_decoding_ext.bench.speed import GREEDY_KWARGS
from hf_decoding_ext.core.models import load_model
from hf_decoding_ext.plug import generate_kwargs
from hf_decoding_ext.registry import METHODS, get_method
from hf_decoding_ext.speculative import SpeculativeDecoding

FAMILIES = ("speculative", "trained-heads")


def reference_arms() -> dict:
    """Greedy with the methods' kernels (the same-kernel baseline) and transformers' prompt lookup under both kernels."""
    return {
        "greedy/fast-kernels": {"kernels": "auto", **GREEDY_KWARGS},
        "prompt-lookup (transformers)": {"prompt_lookup_num_tokens": 10, **GREEDY_KWARGS},
        "prompt-lookup (transformers)/fast-kernels": {"prompt_lookup_num_tokens": 10, "kernels": "auto",
                                                      **GREEDY_KWARGS},
    }


def draft_model_methods(model, tokenizer) -> dict:
    """``--draft-model``: the engine's draft-model drafter with its registry assistant, against transformers'
    assisted generation with the same assistant under both kernels (separate table: the assistant's forwards)."""
    from hf_decoding_ext.speculative.drafters.draft_model import DraftModelDrafter

    drafter = DraftModelDrafter.for_model(model, tokenizer, **get_method("draft-model").defaults)
    assistant = drafter.assistant_model
    return {
        "greedy/fast-kernels": {"kernels": "auto", **GREEDY_KWARGS},
        "assisted (transformers)": {"assistant_model": assistant, **GREEDY_KWARGS},
        "assisted (transformers)/fast-kernels": {"assistant_model": assistant, "kernels": "auto", **GREEDY_KWARGS},
        "draft-model": {"custom_generate": SpeculativeDecoding(drafter), "do_sample": False},
    }


def s2d_methods(model, tokenizer) -> dict:
    """``--s2d``: S2D (the shipped sorted draft, adaptive exit) against transformers' assisted generation with the same
    sorted draft as its assistant (all 12 layers: the nearest built-in, fixed depth) and prompt lookup, both under
    both kernels, and the engine driving the sorted draft at a fixed depth of 12 (the adaptive exit's own effect)."""
    from hf_decoding_ext.speculative.s2d import S2DDrafter, load_s2d_draft

    draft = load_s2d_draft(model).to(model.dtype)
    kw = get_method("s2d").defaults
    adaptive = {k: v for k, v in kw.items() if k != "draft"}
    return {
        **reference_arms(),
        "assisted, sorted draft (transformers)": {"assistant_model": draft, **GREEDY_KWARGS},
        "assisted, sorted draft (transformers)/fast-kernels": {"assistant_model": draft, "kernels": "auto",
                                                               **GREEDY_KWARGS},
        "s2d, fixed depth 12": {"custom_generate": SpeculativeDecoding(S2DDrafter(draft, depths=(12,))),
                                "do_sample": False},
        "s2d": {"custom_generate": SpeculativeDecoding(S2DDrafter(draft, **adaptive)), "do_sample": False},
    }


def served_methods(method: str, model, tokenizer, params: dict) -> dict:
    """``--served METHOD``: a fine-tuned method's decoding loop on the model it serves (``model``: the registry's
    ``served_model``), against that model's greedy ``generate()`` and transformers' prompt lookup under both kernels
    (the method's own effect is its ratio over that model's greedy with the same kernels)."""
    return {
        **reference_arms(),
        method: generate_kwargs(method, model=model, tokenizer=tokenizer, **params),
    }


def methods_to_time(model, tokenizer, only=None) -> dict:
    entries = {
        **reference_arms(),
        "repeat-last-token (reference)": {"custom_generate": SpeculativeDecoding(RepeatLastTokenDrafter()),
                                          "do_sample": False},
    }
    for spec in METHODS:
        if spec.family not in FAMILIES or not spec.lossless or (only and spec.name not in only):
            continue
        if spec.name == "draft-model":
            continue  # needs an assistant model: timed in its own table
        entries[spec.name] = generate_kwargs(spec, model=model, tokenizer=tokenizer)
    return entries


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-category", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--warmup-prompts", type=int, default=1, help="distillation prompts per category for warm-up")
    ap.add_argument("--methods", nargs="*", default=None, help="only these registered methods")
    ap.add_argument("--draft-model", action="store_true",
                    help="time the draft-model method against transformers' assisted generation instead")
    ap.add_argument("--s2d", action="store_true",
                    help="time S2D against transformers' assisted generation with its sorted draft instead")
    ap.add_argument("--served", default=None, metavar="METHOD",
                    help="time a fine-tuned method on the model it serves (its registry served_model) instead")
    ap.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                    help="a parameter of the --served method (JSON value), repeatable")
    ap.add_argument("--out", default="results")
    ap.add_argument("--tag", default="speed")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the model's dtype (heads and drafters follow it); the results JSON records it")
    args = ap.parse_args(argv)
    if args.served:
        model, tokenizer = get_method(args.served).load_served_model()
        model = model.to(getattr(torch, args.dtype))
    else:
        model, tokenizer = load_model(dtype=getattr(torch, args.dtype))
    warm = load_distill_prompts(limit=args.warmup_prompts)[:: 3]
    if args.served:
        params = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.param)}
        methods = served_methods(args.served, model, tokenizer, params)
    elif args.s2d:
        methods = s2d_methods(model, tokenizer)
    elif args.draft_model:
        methods = draft_model_methods(model, tokenizer)
    else:
        methods = methods_to_time(model, tokenizer, args.methods)
    res = run_speed(methods, model, tokenizer,
                    per_category=args.per_category, max_new_tokens=args.max_new_tokens, out_dir=args.out,
                    tag=args.tag, repeats=args.repeats, warmup_prompts=warm, same_kernel="greedy/fast-kernels")
    for name, m in res["methods"].items():
        o = m["overall"]
        print(f"{name:42s} own x{o.get('speed_ratio_same_kernel', float('nan')):.3f} "
              f"[{o.get('speed_ratio_same_kernel_min', float('nan')):.2f}-"
              f"{o.get('speed_ratio_same_kernel_max', float('nan')):.2f}]  stock x{o['speed_ratio']:.3f}  "
              f"tokens/forward {o['tokens_per_forward']:.2f}  overhead {o['overhead_frac']:.3f}  "
              f"= greedy {o['match_baseline_rate']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
