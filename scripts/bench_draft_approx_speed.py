"""End-to-end speed of SpecKV and SpecPC against full-attention greedy ``generate()`` on 2K and 4K-token inputs.

    python scripts/bench_draft_approx_speed.py [--out results] [--repeats 2] [--max-new-tokens 32]

Prompts (batch 1, fp32, greedy): the shipped public-domain text (:func:`~hf_decoding_ext.speculative.drafters.
specextend.long_document`, the committed long inputs of issue 19) cut to 2,048 and 4,096 tokens with a summarisation
request, and plain-text passkey prompts (:mod:`hf_decoding_ext.bench.needle`) of about 2K and 4K tokens; a 1K
document outside the measured set warms every method up. The interleaved protocol of
:func:`hf_decoding_ext.bench.speed.benchmark_speed` (order rotated per prompt, repeats pooled, per-pass spread):

* ``greedy``: stock greedy ``generate()`` with the full cache (the baseline);
* ``greedy/fast-kernels``: the same with the library's weight-left CPU kernels. SpecKV and SpecPC run with the stock
  kernels, so stock greedy *is* greedy with the same kernels; this row shows what the kernel choice alone changes;
* ``speckv@C`` / ``specpc@C``: the methods with the shipped distilled draft at capacity ``C`` (512 and 1024);
  their time includes the draft's work (SpecKV: the lookahead, ``max_new_tokens`` greedy draft tokens; SpecPC: the
  draft's prefill) and ``matches_baseline`` says how often their tokens equal full attention's.

There is no transformers built-in that drops KV entries or compresses the prompt (transformers 5 ships no SnapKV-like
cache), so no built-in row. Writes ``<out>/draft_approx_speed.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from hf_decoding_ext.bench.plot import plot_speed
from hf_decoding_ext.bench.run import write_json
from hf_decoding_ext.bench.speed import GREEDY_KWARGS, benchmark_speed


def prompts(tok) -> tuple[list[dict], list[dict]]:
    from hf_decoding_ext.bench.needle import passkey_prompt
    from hf_decoding_ext.core.models import encode_prompts
    from hf_decoding_ext.speculative.drafters.specextend import long_document

    def doc(n):
        text = long_document(tok, n) + "\n\nSummarize the documentation above in a few sentences."
        return encode_prompts(tok, text)["input_ids"][0].tolist()

    rows = []
    for n in (2048, 4096):
        rows.append({"id": f"document-{n}", "category": "long_document", "input_ids": doc(n)})
        rows.append({"id": f"passkey-{n}", "category": "passkey",
                     "input_ids": passkey_prompt(tok, n, "38117", 0.6)[0].tolist()})
    warm = [{"id": "document-1024", "category": "warm-up", "input_ids": doc(1024)}]
    return rows, warm


def wall_time_ratios(res: dict) -> dict:
    """Per method and category: stock greedy's total wall time over the method's on the same runs, and both token
    counts. The passkey answers end at eos after a few tokens under full attention while a compressed prompt may
    write all ``max_new_tokens``, so tokens/s (``speed_ratio``) flatters such runs; this is the time-to-finish."""
    wall, toks = {}, {}
    for row in res["rows"]:
        for cat in (row["category"], "all"):
            k = (row["method"], cat)
            wall[k] = wall.get(k, 0.0) + row["wall_s"]
            toks[k] = toks.get(k, 0) + row["new_tokens"]
    out = {}
    for m in res["methods"]:
        out[m] = {c: {"greedy_time_over_method_time": wall[("greedy", c)] / wall[(m, c)],
                      "new_tokens": toks[(m, c)], "greedy_new_tokens": toks[("greedy", c)]}
                  for c in dict.fromkeys(c for (mm, c) in wall if mm == m)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--capacities", default="512,1024")
    args = ap.parse_args(argv)

    from hf_decoding_ext.collaboration.draft_approx import SpecKV, SpecPC
    from hf_decoding_ext.core.models import load_model
    from hf_decoding_ext.speculative.drafters.draft_model import DraftModelDrafter

    torch.manual_seed(0)
    model, tok = load_model()
    small = DraftModelDrafter.load_assistant(model, "distilled")
    rows, warm = prompts(tok)
    methods = {"greedy/fast-kernels": {"kernels": "auto", **GREEDY_KWARGS}}
    for cap in (int(c) for c in args.capacities.split(",")):
        methods[f"speckv@{cap}"] = {"custom_generate": SpecKV(small, max_capacity_prompt=cap), **GREEDY_KWARGS}
        methods[f"specpc@{cap}"] = {"custom_generate": SpecPC(small, max_capacity_prompt=cap), **GREEDY_KWARGS}
    with torch.no_grad():
        res = benchmark_speed(model, tok, methods, rows, max_new_tokens=args.max_new_tokens, repeats=args.repeats,
                              warmup_prompts=warm, tag="draft_approx_speed", same_kernel=None)
    res["notes"] = ("SpecKV/SpecPC use the stock PyTorch kernels: stock greedy is also their same-kernel baseline; "
                    "no transformers built-in drops KV entries or compresses prompts")
    res["wall_time_ratios"] = wall_time_ratios(res)
    out = Path(args.out)
    write_json(res, out / "draft_approx_speed.json")
    plot_speed(res, out / "draft_approx_speed.png")
    for name, m in res["methods"].items():
        o = m["overall"]
        print(f"{name:24s} speed x{o['speed_ratio']:.2f} ({o.get('speed_ratio_min', float('nan')):.2f}-"
              f"{o.get('speed_ratio_max', float('nan')):.2f}), "
              f"match {o['match_baseline_rate']:.2f}, peak {o.get('peak_mem_mb', 0):.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
