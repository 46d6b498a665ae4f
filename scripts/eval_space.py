"""SPACE (arXiv 2402.11809) on the SAR fine-tune of the default model: tokens per forward, losslessness and quality.

Runs, greedy and batch 1, on benchmark prompts written for this repository
(``hf_decoding_ext/data/prompts/benchmark.jsonl``; ``--per-category`` of each category):

* the ORIGINAL model's greedy output, the SAR fine-tune's greedy output (agreement with the original: what the
  fine-tune costs, the paper's "quality maintained" claim) and a small task metric (``math_reasoning`` and ``rag_qa``
  answers correct, :func:`hf_decoding_ext.bench.quality.answer_correct`);
* :class:`~hf_decoding_ext.speculative.space.SPACEDecoding` on the fine-tune: tokens per forward (the paper's
  speed-up mechanism: 1..k+1 tokens per forward), the accepted-length histogram, the share of prompts identical to
  the fine-tune's own greedy output (it must be 1.0: SPACE is lossless with respect to the model it runs on) and the
  wall time against the fine-tune's greedy ``generate()`` in the same process (fp32, this CPU: each SPACE forward
  carries k + (k + 1) k = 35 tokens at k = 5);
* the control: the same loop on the ORIGINAL model with the mask token added but not trained (mean-initialised
  embedding, as before the fine-tune): the tokens per forward that come without the SAR fine-tune.

Writes ``results/space_eval.json`` (``--out``) and prints a summary.

Example (after the queue fine-tune; CPU: about 10 minutes at the defaults)::

    python scripts/eval_space.py --finetuned hf_decoding_ext/data/finetuned/space

A tiny-budget check: ``--per-category 1 --max-new-tokens 8 --out /tmp/space_eval.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from hf_decoding_ext.bench.prompts import load_prompts
from hf_decoding_ext.bench.quality import answer_correct
from hf_decoding_ext.core.models import encode_prompts, load_model
from hf_decoding_ext.speculative.space import DEFAULT_K, MASK_TOKEN, SPACEDecoding
from hf_decoding_ext.training.finetune import add_special_tokens, load_finetuned

ROOT = Path(__file__).resolve().parents[1]


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@torch.no_grad()
def decode(model, tokenizer, ids, max_new_tokens, loop=None):
    """New tokens of one greedy run (with ``loop`` as ``custom_generate`` when given), its loop stats and seconds."""
    x = ids[None]
    t0 = time.perf_counter()
    out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new_tokens,
                         pad_token_id=tokenizer.pad_token_id, num_beams=1, temperature=None, top_p=None, top_k=None,
                         **({"custom_generate": loop} if loop is not None else {}))
    secs = time.perf_counter() - t0
    return out[0, x.shape[1]:].tolist(), (dict(loop.last_stats) if loop is not None else None), secs


def agreement(ref: list[list[int]], hyp: list[list[int]]) -> dict:
    """Position-wise share of ``ref``'s tokens that ``hyp`` reproduces (up to the longer of the two) and the mean
    share of ``ref`` before the first mismatch (the rule of ``finetune.agreement_with``)."""
    same = total = 0
    prefix = []
    for x, y in zip(ref, hyp):
        n = max(len(x), len(y))
        same += sum(1 for i in range(min(len(x), len(y))) if x[i] == y[i])
        total += n
        first = next((i for i in range(min(len(x), len(y))) if x[i] != y[i]), min(len(x), len(y)))
        prefix.append(first / len(x) if x else 1.0)
    return {"agreement": round(same / max(1, total), 4),
            "prefix_agreement": round(sum(prefix) / max(1, len(prefix)), 4)}


def task_score(rows, outputs, tokenizer) -> dict:
    graded = [answer_correct(r["category"], r.get("answer"), tokenizer.decode(o, skip_special_tokens=True))
              for r, o in zip(rows, outputs)]
    graded = [g for g in graded if g is not None]
    return {"correct": sum(graded), "graded": len(graded)}


def run_space(model, tokenizer, prompts, max_new_tokens, k, reference):
    """SPACE over ``prompts``: tokens/forward, accepted-length histogram, identity with ``reference``, seconds."""
    loop = SPACEDecoding(k=k, tokenizer=tokenizer)
    outs, forwards, tokens, accepted, secs = [], 0, 0, Counter(), 0.0
    for p in prompts:
        o, st, s = decode(model, tokenizer, p, max_new_tokens, loop)
        outs.append(o)
        forwards += st["forwards"]
        tokens += st["tokens"]
        accepted.update(st["accepted_per_step"])
        secs += s
    per_prompt = [round(a == b, 0) for a, b in zip(outs, reference)]
    return outs, {"forwards": forwards, "tokens": tokens, "tokens_per_forward": round(tokens / max(1, forwards), 4),
                  "identical_to_greedy": round(sum(per_prompt) / max(1, len(per_prompt)), 4),
                  "accepted_histogram": {str(a): n for a, n in sorted(accepted.items())},
                  "seconds": round(secs, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--finetuned", default=str(ROOT / "hf_decoding_ext" / "data" / "finetuned" / "space"),
                    help="the SPACE fine-tune: LoRA adapter folder or full checkpoint")
    ap.add_argument("--base", default=None, help="the original model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--k", type=int, default=DEFAULT_K)
    ap.add_argument("--per-category", type=int, default=3, help="benchmark prompts per category")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "results" / "space_eval.json"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)

    rows = load_prompts(per_category=args.per_category)
    original, tokenizer = load_model(args.base)
    original.eval()
    prompts = [encode_prompts(tokenizer, r["prompt"])["input_ids"][0] for r in rows]
    decode(original, tokenizer, prompts[0], 4)  # warm-up (not measured)
    orig = [decode(original, tokenizer, p, args.max_new_tokens) for p in prompts]
    orig_out = [o for o, _, _ in orig]
    log(f"original greedy: {len(prompts)} prompts in {sum(s for _, _, s in orig):.1f}s")
    # control: the loop on the original model with an untrained (mean-initialised) mask token
    add_special_tokens(original, tokenizer, [MASK_TOKEN])
    _, control = run_space(original, tokenizer, prompts, args.max_new_tokens, args.k, orig_out)
    log(f"control (untrained mask token): {control['tokens_per_forward']} tokens/forward, identical "
        f"{control['identical_to_greedy']}")
    del original

    tuned, tok2 = load_finetuned(args.finetuned, tokens=(MASK_TOKEN,), base=args.base, what="SPACE fine-tune")
    decode(tuned, tokenizer, prompts[0], 4)
    tuned_runs = [decode(tuned, tokenizer, p, args.max_new_tokens) for p in prompts]
    tuned_out = [o for o, _, _ in tuned_runs]
    tuned_s = sum(s for _, _, s in tuned_runs)
    log(f"fine-tuned greedy: {tuned_s:.1f}s")
    space_out, space = run_space(tuned, tok2, prompts, args.max_new_tokens, args.k, tuned_out)
    space["speed_ratio_vs_finetuned_greedy"] = round(tuned_s / max(1e-9, space["seconds"]), 4)
    log(f"SPACE: {space['tokens_per_forward']} tokens/forward, identical {space['identical_to_greedy']}, "
        f"{space['seconds']}s vs greedy {tuned_s:.1f}s")
    finetune_json = Path(args.finetuned) / "finetune.json"
    result = {
        "method": "space", "arxiv": "2402.11809", "finetuned": str(args.finetuned),
        "finetune": json.loads(finetune_json.read_text()) if finetune_json.exists() else None,
        "settings": {"k": args.k, "per_category": args.per_category, "prompts": len(prompts),
                     "max_new_tokens": args.max_new_tokens, "threads": torch.get_num_threads(),
                     "dtype": "float32", "batch_size": 1,
                     "prompt_set": "hf_decoding_ext/data/prompts/benchmark.jsonl"},
        "original": {"task": task_score(rows, orig_out, tokenizer),
                     "seconds": round(sum(s for _, _, s in orig), 2)},
        "finetuned_greedy": {"agreement_with_original": agreement(orig_out, tuned_out),
                             "task": task_score(rows, tuned_out, tokenizer), "seconds": round(tuned_s, 2)},
        "space": {**space, "agreement_with_original": agreement(orig_out, space_out),
                  "task": task_score(rows, space_out, tokenizer)},
        "control_untrained_mask": control,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("original", "finetuned_greedy", "space", "control_untrained_mask")},
                     indent=1))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
