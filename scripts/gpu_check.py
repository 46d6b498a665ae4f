"""The prepared GPU check (issue 16): one command, under 10 minutes on one GPU.

    python scripts/gpu_check.py                      # on the device machine: writes results/gpu_check_<device>.json
    python scripts/gpu_check.py --device cpu --quick # smoke test of the script itself (minutes, any machine)

1. Losslessness of every registered lossless accelerator (speculative and trained-heads families, built as the CLI
   builds them) against plain greedy ``generate()`` on the GPU, in float32 and in bfloat16: ``--prompts`` benchmark
   prompts x ``--tokens`` new tokens; every divergence must be a floating-point near-tie (the target's top-2 at the
   first differing position, relative gap < 1e-3; in bfloat16, where several tokens can tie within one rounding step,
   both tokens within two rounding steps of the maximum logit). Real divergences in float32 fail the check.
2. The speed table of ``scripts/bench_speed.py`` on the GPU (float32; fewer prompts, passes and tokens than on CPU
   to fit the budget): stock greedy, greedy with the same kernels (on GPU the CPU kernels are a no-op, so the two
   coincide), transformers' prompt lookup, the repeat-last-token reference and every accelerator.

The results name the device (``torch.cuda.get_device_name``) and go to ``<out>/gpu_check_<device>.json`` (+ the
speed table's ``.png``). Commit them.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_speed import methods_to_time  # noqa: E402

from hf_decoding_ext.bench.parity import divergences, greedy_parity, greedy_references  # noqa: E402
from hf_decoding_ext.bench.prompts import interleaved_prompts, load_distill_prompts  # noqa: E402
from hf_decoding_ext.bench.run import run_speed  # noqa: E402
from hf_decoding_ext.core.models import load_model  # noqa: E402
from hf_decoding_ext.plug import generate_kwargs  # noqa: E402
from hf_decoding_ext.registry import METHODS  # noqa: E402

BF16_TIE = 2 * 2.0 ** -7
"""Relative logit gap under which two bfloat16 logits are a tie (two rounding steps of an 8-bit significand)."""

ACCELERATORS = [m for m in METHODS if m.family in ("speculative", "trained-heads", "self") and m.lossless
                and m.name != "draft-model"]


def losslessness(device: str, dtype: torch.dtype, n_prompts: int, tokens: int) -> dict:
    model, tokenizer = load_model(dtype=dtype, device=device)
    refs = greedy_references(model, tokenizer, interleaved_prompts(n_prompts), tokens)
    out = {}
    for spec in ACCELERATORS:
        started = time.time()
        kwargs = generate_kwargs(spec, model=model, tokenizer=tokenizer)
        report = greedy_parity(model, kwargs, refs, tokens)
        found = divergences(model, refs, report.diverged)
        if dtype == torch.float32:
            ties = [d for d in found if d["top2"] and d["gap"] < 1e-3]
        else:  # bfloat16 has 8 significant bits: a tie is both tokens within two rounding steps of the maximum
            ties = [d for d in found if d["tokens"] and d["pair_top"] and d["pair_gap"] < BF16_TIE]
        out[spec.name] = {"prompts": n_prompts, "identical": n_prompts - len(found), "near_ties": len(ties),
                          "real_divergences": [d for d in found if d not in ties],
                          "tokens_per_forward": round(report.tokens_per_forward, 3),
                          "seconds": round(time.time() - started, 1)}
        print(f"[{dtype}] {spec.name}: {out[spec.name]['identical']}/{n_prompts} identical, "
              f"{len(ties)} near-ties, {len(found) - len(ties)} real divergences", flush=True)
    del model
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prompts", type=int, default=12, help="prompts of the losslessness check")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--per-category", type=int, default=3, help="prompts per category of the speed table")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test of the script)")
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    if args.quick:
        args.prompts, args.tokens, args.per_category, args.repeats = 2, 8, 1, 1
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run this on the device machine (or --device cpu --quick for a smoke test)")
    name = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else "cpu"
    started = time.time()
    result = {"device": name, "torch": torch.__version__, "settings": vars(args), "lossless": {}}
    for dtype in (torch.float32, torch.bfloat16):
        result["lossless"][str(dtype).removeprefix("torch.")] = losslessness(args.device, dtype, args.prompts,
                                                                              args.tokens)
    model, tokenizer = load_model(device=args.device)
    tag = "gpu_check_" + re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()
    speed = run_speed(methods_to_time(model, tokenizer), model, tokenizer, per_category=args.per_category,
                      max_new_tokens=args.tokens, out_dir=args.out, tag=f"{tag}_speed", repeats=args.repeats,
                      warmup_prompts=load_distill_prompts(limit=1)[::3], same_kernel="greedy/fast-kernels")
    result["speed"] = {n: {k: m["overall"].get(k) for k in ("speed_ratio", "speed_ratio_same_kernel",
                                                            "tokens_per_forward", "match_baseline_rate")}
                       for n, m in speed["methods"].items()}
    result["seconds"] = round(time.time() - started, 1)
    out = Path(args.out) / f"{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"wrote {out} ({result['seconds']} s)")
    real = [(d, n) for d, per in result["lossless"].items() for n, r in per.items()
            if r["real_divergences"] and d == "float32"]
    return 1 if real else 0


if __name__ == "__main__":
    raise SystemExit(main())
