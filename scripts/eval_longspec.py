"""LongSpec (arXiv 2502.17421) on SmolLM2-135M-Instruct: the paper's properties on long inputs.

- Draft memory is flat from 1k to 8k input tokens: the bytes the drafter holds (window cache + tree entries,
  ``LongSpecDrafter.state_bytes``) and the peak process RSS above its level before each draft step
  (``bench.speed.PeakMemory``, sampled), at 1k / 2k / 4k / 8k-token documents (``bench.prompts.long_input_prompts``);
  for contrast, the bytes of the EAGLE drafter's own KV cache (which covers the whole sequence) at the same inputs.
- Lossless: greedy output token-identical to plain greedy ``generate()`` on every long input (2k+ included) and on
  6 interleaved benchmark prompts.
- Tokens per target forward (> 1 on long inputs) at a pinned 5-node tree.
- Held-out per-depth top-1 of the LongSpec layer next to the Medusa baseline trained at the same budget.

Run through the training queue (about 8-10 minutes on 2 CPU cores: each 8k prefill takes a minute or more):
    python scripts/eval_longspec.py [--head DIR] [--out results/longspec_eval.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SIZES = (1024, 2048, 4096, 8192)
NODES = 5


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--head", default=None, help="LongSpec checkpoint folder (default: shipped, else the queue run)")
    ap.add_argument("--baseline", default="/work/distill/baselines/medusa-150k")
    ap.add_argument("--out", default=str(ROOT / "results" / "longspec_eval.json"))
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--short", type=int, default=6, help="interleaved benchmark prompts for the short parity check")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)

    from hf_decoding_ext.bench.prompts import interleaved_prompts, long_input_prompts
    from hf_decoding_ext.bench.speed import PeakMemory
    from hf_decoding_ext.core.models import encode_prompts, load_model
    from hf_decoding_ext.speculative import SpeculativeDecoding
    from hf_decoding_ext.speculative.drafters.eagle import EagleDrafter
    from hf_decoding_ext.speculative.drafters.feature_head import (
        SHIPPED,
        shipped_head_path,
    )
    from hf_decoding_ext.speculative.drafters.longspec import LongSpecDrafter
    from hf_decoding_ext.speculative.heads.longspec import LongSpecDrafterModel

    model, tok = load_model()
    head_path = args.head or (str(shipped_head_path("longspec")) if "longspec" in SHIPPED
                              else "/work/distill/runs/longspec")
    head = LongSpecDrafterModel.from_pretrained(head_path).attach(model)
    sizes = [int(s) for s in args.sizes.split(",")]

    def run(drafter, enc, n):
        loop = SpeculativeDecoding(drafter)
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, custom_generate=loop)
        return out, loop.summary()

    def spy_memory(drafter, cache_bytes):
        """Wrap ``drafter.propose``: per step, the drafter's own bytes and the peak RSS above the level before."""
        rec = {"state_bytes": [], "rss_delta_mb": [], "target_cache_bytes": []}
        propose = drafter.propose

        def wrapped(state):
            import psutil

            before = psutil.Process().memory_info().rss / 2**20
            with PeakMemory("cpu", interval=0.001) as pm:
                d = propose(state)
            if len(d.tree):
                rec["state_bytes"].append(cache_bytes(drafter))
                rec["rss_delta_mb"].append(max(0.0, pm.peak_mb - before))
                rec["target_cache_bytes"].append(sum(
                    layer.keys.numel() * layer.keys.element_size() * 2 for layer in state.cache.layers))
            return d

        drafter.propose = wrapped
        return rec

    def eagle_bytes(drafter):
        c = drafter.cache
        return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in c.layers
                   if getattr(layer, "keys", None) is not None)

    items = []
    rows = long_input_prompts(tok, sizes)
    eagle_sizes = {1024, 2048}  # the EAGLE contrast (its cache grows with the input) at two sizes: time
    for size, row in zip(sizes, rows):
        enc = encode_prompts(tok, row["prompt"])
        n_in = int(enc["input_ids"].shape[1])
        with torch.inference_mode():
            ref = model.generate(**enc, max_new_tokens=args.new_tokens, do_sample=False)
        drafter = LongSpecDrafter(head, max_nodes=NODES)
        rec = spy_memory(drafter, lambda d: d.peak_state_bytes)
        out, summ = run(drafter, enc, args.new_tokens)
        item = {"size": size, "input_tokens": n_in, "identical": bool(torch.equal(out, ref)),
                "tokens_per_forward": summ["tokens_per_forward"], "steps": summ["steps"],
                "draft_state_bytes_max": max(rec["state_bytes"]), "draft_state_bytes_min": min(rec["state_bytes"]),
                "draft_peak_rss_delta_mb_median": statistics.median(rec["rss_delta_mb"]),
                "draft_peak_rss_delta_mb_max": max(rec["rss_delta_mb"]),
                "target_cache_bytes_last": rec["target_cache_bytes"][-1]}
        if "eagle" in SHIPPED and size in eagle_sizes:
            ed = EagleDrafter("shipped", max_nodes=NODES)
            erec = spy_memory(ed, eagle_bytes)
            eout, esumm = run(ed, enc, args.new_tokens)
            item["eagle_cache_bytes_max"] = max(erec["state_bytes"])
            item["eagle_tokens_per_forward"] = esumm["tokens_per_forward"]
            item["eagle_identical"] = bool(torch.equal(eout, ref))
        items.append(item)
        print(json.dumps(item), flush=True)

    # short prompts: parity and tokens per forward
    short = []
    for row in interleaved_prompts(args.short):
        enc = encode_prompts(tok, row["prompt"])
        with torch.inference_mode():
            ref = model.generate(**enc, max_new_tokens=32, do_sample=False)
        out, summ = run(LongSpecDrafter(head, max_nodes=NODES), enc, 32)
        short.append({"id": row["id"], "identical": bool(torch.equal(out, ref)),
                      "tokens_per_forward": summ["tokens_per_forward"]})
    print(json.dumps(short), flush=True)

    base_cfg = Path(args.baseline) / "config.json"
    baseline = json.loads(base_cfg.read_text()) if base_cfg.exists() else {}
    states = [i["draft_state_bytes_max"] for i in items]
    tpf = [i["tokens_per_forward"] for i in items]
    summary = {
        "draft_state_bytes_by_size": {str(i["size"]): i["draft_state_bytes_max"] for i in items},
        "draft_state_flat": len(set(states)) == 1,
        "draft_peak_rss_delta_mb_by_size": {str(i["size"]): i["draft_peak_rss_delta_mb_median"] for i in items},
        "target_cache_bytes_by_size": {str(i["size"]): i["target_cache_bytes_last"] for i in items},
        "eagle_cache_bytes_by_size": {str(i["size"]): i.get("eagle_cache_bytes_max") for i in items},
        "all_identical_long": all(i["identical"] for i in items),
        "all_identical_short": all(s["identical"] for s in short),
        "tokens_per_forward_long": {"mean": statistics.mean(tpf), "min": min(tpf), "max": max(tpf)},
        "tokens_per_forward_short": {"mean": statistics.mean(s["tokens_per_forward"] for s in short),
                                     "min": min(s["tokens_per_forward"] for s in short),
                                     "max": max(s["tokens_per_forward"] for s in short)},
        "heldout_top1_longspec": head.config.training.get("heldout_top1"),
        "positions_longspec": head.config.training.get("positions"),
        "heldout_top1_baseline": (baseline.get("training") or {}).get("heldout_top1"),
        "positions_baseline": (baseline.get("training") or {}).get("positions"),
        "baseline": args.baseline,
    }
    result = {"settings": {"model": "SmolLM2-135M-Instruct", "head": head_path, "sizes": sizes, "nodes": NODES,
                           "new_tokens": args.new_tokens, "window": head.config.window,
                           "memory": "state bytes exact; RSS deltas sampled every 1 ms (PeakMemory), noisy",
                           "threads": 2},
              "items": items, "short_prompts": short, "summary": summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
