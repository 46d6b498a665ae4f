"""Direct Alignment of Draft Model (arXiv 2403.00858) for the default model: data, distillation, shipping.

    python scripts/train_direct_alignment.py --prompts 60 --layers 4 --loss tvd++ --steps 400 \\
        --work ~/.cache/hf_decoding_ext/direct_alignment --ship

Stages, each resumable (rerun the same command after an interruption):

1. the target's responses to the first ``--prompts`` distillation prompts of each category, greedy and sampled
   (T = 1), ``--max-new-tokens`` each (``<work>/responses-greedy.jsonl``, ``responses-sampled.jsonl``);
2. distillation of a ``--layers``-layer draft with ``--loss`` (``<work>/<loss>-L<layers>/``, checkpoints every
   ``--checkpoint-every`` steps), held-out expected acceptance every ``--eval-every`` steps;
3. with ``--ship``: the draft copied to ``hf_decoding_ext/data/draft_model/`` (float16 tensors and config.json).

``--stop-after N`` ends stage 2 after N steps of this call (for time-limited pieces). Progress goes to
``<work>/train.log``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    from hf_decoding_ext.bench.prompts import load_distill_prompts
    from hf_decoding_ext.core.models import cache_dir, load_model
    from hf_decoding_ext.speculative.drafters import direct_alignment as DA
    from hf_decoding_ext.training.data import generate_responses, read_responses

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=60, help="distillation prompts per category")
    ap.add_argument("--max-new-tokens", type=int, default=192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--loss", default="tvd++", choices=DA.LOSSES)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--checkpoint-every", type=int, default=20)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--stop-after", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--work", default=None)
    ap.add_argument("--ship", action="store_true")
    ap.add_argument("--responses-from", default=None,
                    help="a folder with committed responses-{greedy,sampled}.jsonl.gz (e.g. results/direct_alignment) "
                         "to start stage 1 from")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work) if args.work else cache_dir() / "direct_alignment"
    work.mkdir(parents=True, exist_ok=True)
    logf = open(work / "train.log", "a")

    def log(msg: str) -> None:
        logf.write(f"{time.strftime('%H:%M:%S')} {msg}\n")
        logf.flush()

    if args.responses_from:
        import gzip

        for kind in ("greedy", "sampled"):
            src, dst = Path(args.responses_from) / f"responses-{kind}.jsonl.gz", work / f"responses-{kind}.jsonl"
            if src.exists() and not dst.exists():
                dst.write_bytes(gzip.decompress(src.read_bytes()))
    model, tokenizer = load_model()
    prompts = load_distill_prompts(limit=args.prompts)
    log(f"stage 1: responses to {len(prompts)} prompts, greedy and sampled, {args.max_new_tokens} tokens")
    generate_responses(model, tokenizer, prompts, work / "responses-greedy.jsonl",
                       max_new_tokens=args.max_new_tokens, log=log)
    generate_responses(model, tokenizer, prompts, work / "responses-sampled.jsonl",
                       max_new_tokens=args.max_new_tokens, log=log, do_sample=True, temperature=1.0, seed=1)
    rows = []
    for kind in ("greedy", "sampled"):
        for r in read_responses(work / f"responses-{kind}.jsonl"):
            rows.append({**r, "id": f"{r['id']}#{kind}"})
    rows = [r for r in rows if r["response_ids"]]
    ordered = sorted({r["id"].split("#")[0] for r in rows})
    held_ids = set(ordered[9::10])  # every 10th prompt (both of its responses) is held out
    train = [r for r in rows if r["id"].split("#")[0] not in held_ids]
    heldout = [r for r in rows if r["id"].split("#")[0] in held_ids and r["id"].endswith("#greedy")]
    log(f"stage 2: {len(train)} training sequences, {len(heldout)} held-out; loss {args.loss}, "
        f"{args.layers} layers, {args.steps} steps")
    out = work / f"{args.loss}-L{args.layers}"
    draft = DA.train_direct_alignment(
        model, train, out, num_layers=args.layers, loss=args.loss, steps=args.steps, batch_size=args.batch_size,
        lr=args.lr, max_length=args.max_length, checkpoint_every=args.checkpoint_every, heldout=heldout,
        eval_every=args.eval_every, log=log, stop_after=args.stop_after)
    if not (out / "model.safetensors").exists():
        log("stopped before the last step (rerun to continue)")
        return 0
    if args.ship:
        cfg = json.loads((out / "config.json").read_text())
        cfg["data"] = {"prompts_per_category": args.prompts, "max_new_tokens": args.max_new_tokens,
                       "responses": "greedy and sampled (T=1) responses of the target to the distillation prompts",
                       "train_sequences": len(train), "heldout_sequences": len(heldout)}
        dest = Path(__file__).resolve().parents[1] / "hf_decoding_ext" / "data" / "draft_model"
        if dest.exists():
            shutil.rmtree(dest)
        DA.save_draft(draft, dest, {k: v for k, v in cfg.items() if k not in (
            "format_version", "method", "arxiv", "num_layers", "architecture", "hidden_size", "vocab_size",
            "shared_with_target")}, dtype=torch.float16)
        log(f"shipped to {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
