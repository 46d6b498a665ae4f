"""Acceptance statistics of the training-free drafters on the self-distillation prompts (never the benchmark ones).

    nohup python scripts/tune_drafters.py --per-category 4 --max-new-tokens 128 > /tmp/tune.log 2>&1 &

Each configuration runs greedy speculative decoding with its whole tree verified on ``--per-category`` prompts of
each category of ``hf_decoding_ext/data/prompts/distill.jsonl`` (one drafter instance across the prompts, as in the
benchmark), and records, for every node index of the drafter's tree order, the share of steps in which that node
was accepted (:func:`hf_decoding_ext.speculative.policies.tuning.acceptance_gains`). The result is written to
``hf_decoding_ext/data/acceptance/gains.json``, which the drafters' ``max_nodes="auto"`` reads together with the
verify-cost curve measured on the running device. Acceptance counts do not depend on timing, so this can run while
the machine is busy.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from hf_decoding_ext.bench.prompts import load_distill_prompts
from hf_decoding_ext.core.models import encode_prompts, load_model
from hf_decoding_ext.speculative import SpeculativeDecoding
from hf_decoding_ext.speculative.drafters.merged import MergedDrafter
from hf_decoding_ext.speculative.drafters.prompt_lookup import PromptLookupDrafter
from hf_decoding_ext.speculative.drafters.token_recycling import TokenRecyclingDrafter
from hf_decoding_ext.speculative.policies.tuning import acceptance_gains

OUT = Path(__file__).resolve().parents[1] / "hf_decoding_ext" / "data" / "acceptance" / "gains.json"

CONFIGS = {
    "token-recycling": lambda: TokenRecyclingDrafter(max_nodes=None),
    "prompt-lookup": lambda: PromptLookupDrafter(num_tokens=16),
    "auto-speculative": lambda: MergedDrafter([PromptLookupDrafter(num_tokens=16),
                                               TokenRecyclingDrafter(max_nodes=None)]),
}
DESCRIPTION = {
    "token-recycling": "TokenRecyclingDrafter(max_nodes=None): the whole 80-node template; gains per node path "
                       "(paths: the drafter's layout, nodes it dropped counted by id)",
    "prompt-lookup": "PromptLookupDrafter(num_tokens=16): chain positions",
    "auto-speculative": "MergedDrafter([PromptLookupDrafter(num_tokens=16), TokenRecyclingDrafter(max_nodes=None)]): "
                        "merged order (the drafters' nodes in turn)",
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-category", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS))
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    model, tokenizer = load_model()
    rows = load_distill_prompts(limit=args.per_category)
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {}
    data.setdefault("drafters", {})
    for name in args.configs:
        drafter = CONFIGS[name]()
        loop = SpeculativeDecoding(drafter)  # acceptance does not depend on the kernels (up to near-ties)
        stats, tokens, started = [], 0, time.time()
        for row in tqdm(rows, desc=name):
            enc = encode_prompts(tokenizer, row["prompt"])
            with torch.inference_mode():
                out_ids = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False,
                                         custom_generate=loop)
            stats.extend(loop.last_stats)
            tokens += out_ids.shape[1] - enc["input_ids"].shape[1]
        gains = acceptance_gains(stats)
        data["drafters"][name] = {
            "configuration": DESCRIPTION[name], "gains": [round(g, 5) for g in gains], "steps": len(stats),
            "tokens": tokens, "tokens_per_forward": round(tokens / max(len(stats), 1), 4),
            "prompts": f"distill.jsonl, first {args.per_category} per category ({len(rows)})",
            "max_new_tokens": args.max_new_tokens, "seconds": round(time.time() - started, 1),
        }
        if hasattr(drafter, "paths"):  # token recycling: the node each gain belongs to
            data["drafters"][name]["paths"] = [list(p) for p in drafter.paths]
        print(f"{name}: {len(stats)} steps, {tokens / max(len(stats), 1):.3f} tokens/forward, "
              f"gains[:8] {[round(g, 3) for g in gains[:8]]}", flush=True)
        data["source"] = ("scripts/tune_drafters.py on SmolLM2-135M-Instruct (greedy, float32, whole trees "
                          "verified); per node index: accepted steps / steps with that node")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
