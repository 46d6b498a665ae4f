"""SPACE (arXiv 2402.11809) on the SAR fine-tune of the default model: tokens per forward, losslessness and quality.

Runs, greedy and batch 1, on benchmark prompts written for this repository
(``hf_decoding_ext/data/prompts/benchmark.jsonl``; ``--per-category`` of each category):

* the ORIGINAL model's greedy output, the SAR fine-tune's greedy output (agreement with the original: what the
  fine-tune costs, the paper's "quality maintained" claim) and a small task metric (``math_reasoning`` and ``rag_qa``
  answers correct, :func:`hf_decoding_ext.bench.quality.answer_correct`);
* :class:`~hf_decoding_ext.speculative.space.SPACEDecoding` on the fine-tune: tokens per forward (the paper's
  speed-up mechanism: 1..k+1 tokens per forward), the accepted-length histogram, the share of prompts identical to
  the fine-tune's own greedy output (it must be 1.0: SPACE is lossless with respect to the model it runs on);
* wall-clock, one interleaved run of ``--repeats`` passes: the fine-tune's greedy ``generate()`` under stock and
  under the fast CPU kernels (the same-kernel baseline) and SPACE under both (fp32, this CPU; each SPACE forward
  carries up to k + (k + 1) k = 35 tokens at k = 5);
* the control: the same loop on the ORIGINAL model with the mask token added but not trained (mean-initialised
  embedding, as before the fine-tune): the tokens per forward that come without the SAR fine-tune.

Writes ``results/space_eval.json`` (``--out``) and its plot (``.png``) and prints a summary.

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

from hf_decoding_ext.bench.prompts import load_distill_prompts, load_prompts
from hf_decoding_ext.bench.quality import answers_correct
from hf_decoding_ext.core.models import encode_prompts, load_model
from hf_decoding_ext.plug import fast_generate
from hf_decoding_ext.speculative.space import DEFAULT_K, MASK_TOKEN, SPACEDecoding
from hf_decoding_ext.training.finetune import token_agreement, add_special_tokens, load_finetuned

ROOT = Path(__file__).resolve().parents[1]


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@torch.no_grad()
def decode(model, tokenizer, ids, max_new_tokens, loop=None, kernels=None):
    """New tokens of one greedy run (with ``loop`` as ``custom_generate`` when given; with ``kernels``, under
    :func:`~hf_decoding_ext.plug.fast_generate`'s CPU kernels), the loop's stats and the seconds."""
    x = ids[None]
    kw = dict(attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new_tokens,
              pad_token_id=tokenizer.pad_token_id, num_beams=1, temperature=None, top_p=None, top_k=None,
              **({"custom_generate": loop} if loop is not None else {}))
    t0 = time.perf_counter()
    out = fast_generate(model, x, kernels=kernels, **kw) if kernels else model.generate(x, **kw)
    secs = time.perf_counter() - t0
    return out[0, x.shape[1]:].tolist(), (dict(loop.last_stats) if loop is not None else None), secs


def agreement(ref: list[list[int]], hyp: list[list[int]]) -> dict:
    """:func:`hf_decoding_ext.training.finetune.token_agreement`, rounded, without the per-prompt list."""
    d = token_agreement(ref, hyp)
    return {"agreement": round(d["agreement"], 4), "prefix_agreement": round(d["prefix_agreement"], 4)}


def run_space(model, tokenizer, prompts, max_new_tokens, k, reference):
    """SPACE over ``prompts`` (stock kernels): tokens/forward, accepted-length histogram, identity with
    ``reference``."""
    loop = SPACEDecoding(k=k, tokenizer=tokenizer)
    outs, forwards, tokens, accepted, per_prompt = [], 0, 0, Counter(), []
    for p in prompts:
        o, st, _ = decode(model, tokenizer, p, max_new_tokens, loop)
        outs.append(o)
        per_prompt.append(round(st["tokens"] / max(1, st["forwards"]), 4))
        forwards += st["forwards"]
        tokens += st["tokens"]
        accepted.update(st["accepted_per_step"])
    same = [a == b for a, b in zip(outs, reference)]
    return outs, {"forwards": forwards, "tokens": tokens, "tokens_per_forward": round(tokens / max(1, forwards), 4),
                  "forwards_per_token": round(forwards / max(1, tokens), 4),
                  "identical_to_greedy": round(sum(same) / max(1, len(same)), 4),
                  "accepted_histogram": {str(a): n for a, n in sorted(accepted.items())},
                  "per_prompt_tokens_per_forward": per_prompt}


def timed(model, tokenizer, prompts, max_new_tokens, k, repeats):
    """Interleaved wall-clock (rotated order per prompt and pass) of the fine-tune's greedy ``generate()`` under
    stock and fast kernels and SPACE under both: total seconds and tokens per arm and pass."""
    arms = {"greedy": (None, None), "greedy/fast-kernels": (None, "auto"), "space": ("loop", None),
            "space/fast-kernels": ("loop", "auto")}
    names = list(arms)
    res = {n: {"seconds": [0.0] * repeats, "tokens": [0] * repeats} for n in names}
    for r in range(repeats):
        for i, p in enumerate(prompts):
            order = names[(i + r) % len(names):] + names[:(i + r) % len(names)]
            for n in order:
                loop = SPACEDecoding(k=k, tokenizer=tokenizer) if arms[n][0] else None
                o, _, s = decode(model, tokenizer, p, max_new_tokens, loop, kernels=arms[n][1])
                res[n]["seconds"][r] += s
                res[n]["tokens"][r] += len(o)
    out = {}
    for n in names:
        tps = [t / s for t, s in zip(res[n]["tokens"], res[n]["seconds"])]
        out[n] = {"tokens_per_second": [round(x, 3) for x in tps], "seconds": [round(x, 2) for x in res[n]["seconds"]]}
    for n in names:
        for base in ("greedy", "greedy/fast-kernels"):
            ratios = [a / b for a, b in zip(out[n]["tokens_per_second"], out[base]["tokens_per_second"])]
            out[n][f"speed_ratio_vs_{base}"] = round(sum(ratios) / len(ratios), 4)
            out[n][f"speed_ratio_vs_{base}_min_max"] = [round(min(ratios), 4), round(max(ratios), 4)]
    return out


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(12, 3.6))
    tpf = {"control (untrained mask)": result["control_untrained_mask"]["tokens_per_forward"],
           "SPACE fine-tune": result["space"]["tokens_per_forward"]}
    ax[0].bar(list(tpf), list(tpf.values()), color=["grey", "tab:blue"])
    ax[0].axhline(1.0, color="k", lw=0.8)
    ax[0].set_title("tokens per forward")
    t = result["timing"]
    names = list(t)
    ax[1].bar(names, [t[n]["speed_ratio_vs_greedy/fast-kernels"] for n in names], color="tab:orange")
    ax[1].axhline(1.0, color="k", lw=0.8)
    ax[1].set_title("speed vs same-kernel greedy")
    ax[1].tick_params(axis="x", rotation=30)
    q = {"fine-tune greedy": result["finetuned_greedy"]["agreement_with_original"]["agreement"],
         "SPACE": result["space"]["agreement_with_original"]["agreement"]}
    ax[2].bar(list(q), list(q.values()), color="tab:green")
    ax[2].set_ylim(0, 1)
    ax[2].set_title("agreement with the original's greedy")
    fig.suptitle(f"SPACE on the SAR fine-tune of SmolLM2-135M ({result['settings']['prompts']} prompts x "
                 f"{result['settings']['max_new_tokens']} tokens, fp32, CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--finetuned", default=str(ROOT / "hf_decoding_ext" / "data" / "finetuned" / "space"),
                    help="the SPACE fine-tune: LoRA adapter folder or full checkpoint")
    ap.add_argument("--base", default=None, help="the original model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--k", type=int, default=DEFAULT_K)
    ap.add_argument("--per-category", type=int, default=3, help="benchmark prompts per category")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="timing passes")
    ap.add_argument("--out", default=str(ROOT / "results" / "space_eval.json"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)

    rows = load_prompts(per_category=args.per_category)
    original, tokenizer = load_model(args.base)
    original.eval()
    prompts = [encode_prompts(tokenizer, r["prompt"])["input_ids"][0] for r in rows]
    warm = encode_prompts(tokenizer, load_distill_prompts(limit=1)[0]["prompt"])["input_ids"][0]
    orig_out = [decode(original, tokenizer, p, args.max_new_tokens)[0] for p in prompts]
    log(f"original greedy: {len(prompts)} prompts")
    # control: the loop on the original model with an untrained (mean-initialised) mask token
    add_special_tokens(original, tokenizer, [MASK_TOKEN])
    _, control = run_space(original, tokenizer, prompts, args.max_new_tokens, args.k, orig_out)
    log(f"control (untrained mask token): {control['tokens_per_forward']} tokens/forward, identical "
        f"{control['identical_to_greedy']}")
    del original

    tuned, tok2 = load_finetuned(args.finetuned, tokens=(MASK_TOKEN,), base=args.base, what="SPACE fine-tune")
    for kernels in (None, "auto"):  # warm-up (not measured): a distillation prompt outside the benchmark set
        decode(tuned, tokenizer, warm, 8, SPACEDecoding(k=args.k, tokenizer=tok2), kernels=kernels)
        decode(tuned, tokenizer, warm, 8, kernels=kernels)
    tuned_out = [decode(tuned, tokenizer, p, args.max_new_tokens)[0] for p in prompts]
    space_out, space = run_space(tuned, tok2, prompts, args.max_new_tokens, args.k, tuned_out)
    log(f"SPACE: {space['tokens_per_forward']} tokens/forward, identical {space['identical_to_greedy']}")
    timing = timed(tuned, tok2, prompts, args.max_new_tokens, args.k, args.repeats)
    log("timing: " + ", ".join(f"{n} {v['speed_ratio_vs_greedy/fast-kernels']}" for n, v in timing.items()))
    finetune_json = Path(args.finetuned) / "finetune.json"
    result = {
        "method": "space", "arxiv": "2402.11809", "finetuned": str(args.finetuned),
        "finetune": json.loads(finetune_json.read_text()) if finetune_json.exists() else None,
        "settings": {"k": args.k, "per_category": args.per_category, "prompts": len(prompts),
                     "max_new_tokens": args.max_new_tokens, "threads": torch.get_num_threads(),
                     "dtype": "float32", "batch_size": 1, "repeats": args.repeats,
                     "timing": "interleaved per prompt, order rotated by prompt and pass; warm-up on a distillation "
                               "prompt outside the measured set; speed ratios = mean over passes of the tokens/s "
                               "ratio",
                     "prompt_set": "hf_decoding_ext/data/prompts/benchmark.jsonl"},
        "original": {"task": answers_correct(rows, orig_out, tokenizer)},
        "finetuned_greedy": {"agreement_with_original": agreement(orig_out, tuned_out),
                             "task": answers_correct(rows, tuned_out, tokenizer)},
        "space": {**space, "agreement_with_original": agreement(orig_out, space_out),
                  "task": answers_correct(rows, space_out, tokenizer)},
        "control_untrained_mask": control,
        "timing": timing,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    plot(result, Path(args.out).with_suffix(".png"))
    print(json.dumps({k: result[k] for k in ("original", "finetuned_greedy", "space", "control_untrained_mask",
                                             "timing")}, indent=1))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
