"""Train EESD's early-exit head (hf_decoding_ext.speculative.heads.exit_head.ExitHead) on SmolLM2-135M-Instruct by
self-distillation, within a wall-time budget (CPU, one thread by default).

1. the base model answers distillation prompts (hf_decoding_ext/data/prompts/distill.jsonl, never benchmark prompts),
   greedily, batched, resumable (<work>/responses.jsonl), until the generation budget is spent;
2. one base-model forward per (prompt + response) stores the layer-N hidden states and the final-norm features;
3. the head (extra layer initialised from base layer N, own norm, base LM head shared and frozen) is trained to
   minimise KL(p_full || p_exit) at every position; every 10th sequence is held out;
4. held-out KL / top-1 agreement are measured for the plain early exit at N, the untrained head and the trained head,
   and the head is saved (config.json + model.safetensors) with the record in config.training.

Usage (background, as shipped):
    nohup python scripts/train_exit_head.py --exit-layer 6 --out hf_decoding_ext/data/heads/exit_head_smollm2_l6 \
        > /work/notes/helpers/exit_head_train.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--exit-layer", type=int, default=6)
    p.add_argument("--base", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", required=True)
    p.add_argument("--work", default="/tmp/exit_head_work")
    p.add_argument("--prompts-per-category", type=int, default=200)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--gen-minutes", type=float, default=9.0, help="wall-time budget of response generation")
    p.add_argument("--train-minutes", type=float, default=11.0, help="wall-time budget of training")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-len", type=int, default=384)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--own-lm-head", action="store_true")
    p.add_argument("--gen-batch", type=int, default=16)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from hf_decoding_ext.bench.prompts import CATEGORIES, load_distill_prompts
    from hf_decoding_ext.core.models import load_model
    from hf_decoding_ext.speculative.heads.exit_head import (ExitHead, distill_features, distill_kl,
                                                            plain_exit_kl, train_exit_head)
    from hf_decoding_ext.training.data import generate_responses, read_responses

    t_start = time.time()

    def log(msg):
        print(f"[{time.time() - t_start:7.1f}s] {msg}", flush=True)

    model, tokenizer = load_model(args.base, device=args.device)
    for q in model.parameters():
        q.requires_grad_(False)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    responses = work / "responses.jsonl"

    # 1. responses, round-robin over categories so that a cut budget keeps every category
    by_cat = {c: load_distill_prompts(categories=[c], limit=args.prompts_per_category) for c in CATEGORIES}
    order = [rows[i] for i in range(args.prompts_per_category) for rows in by_cat.values() if i < len(rows)]
    chunk = args.gen_batch
    for start in range(0, len(order), chunk):
        if time.time() - t_start > args.gen_minutes * 60:
            log(f"generation budget spent after {start} prompts")
            break
        generate_responses(model, tokenizer, order[start:start + chunk], responses, batch_size=chunk,
                           max_new_tokens=args.max_new_tokens, max_prompt_tokens=384, progress=False)
        log(f"responses {min(start + chunk, len(order))}/{len(order)}")
    rows = [r for r in read_responses(responses) if r["response_ids"]]
    seqs = [r["prompt_ids"] + r["response_ids"] for r in rows]
    n_resp = sum(len(r["response_ids"]) for r in rows)
    log(f"{len(seqs)} sequences, {sum(map(len, seqs))} tokens ({n_resp} generated)")

    # 2. features; every 10th sequence held out
    feats = distill_features(model, seqs, args.exit_layer, batch_size=4, progress=False)
    off = feats["offsets"].tolist()

    def subset(keep):
        idx = [i for i in range(len(seqs)) if keep(i)]
        parts = {k: [] for k in ("input_ids", "hidden_in", "hidden_out")}
        lengths = []
        for i in idx:
            for k in parts:
                parts[k].append(feats[k][off[i]:off[i + 1]])
            lengths.append(off[i + 1] - off[i])
        out = {k: torch.cat(v) for k, v in parts.items()}
        out["offsets"] = torch.tensor([0] + lengths).cumsum(0)
        return out

    train = subset(lambda i: i % 10 != 9)
    heldout = subset(lambda i: i % 10 == 9)
    log(f"features done: train {int(train['offsets'][-1])} positions, held-out {int(heldout['offsets'][-1])}")

    # 3. baselines on the held-out set
    head = ExitHead.from_base(model, exit_layer=args.exit_layer, own_lm_head=args.own_lm_head)
    plain = plain_exit_kl(model, heldout, args.exit_layer)
    untrained = distill_kl(head, heldout)
    log(f"held-out plain exit at {args.exit_layer}: {plain}; untrained head: {untrained}")

    # 4. train
    budget = args.train_minutes * 60
    stats = train_exit_head(head, train, steps=args.steps, batch_size=args.batch_size, max_len=args.max_len, lr=args.lr,
                            max_seconds=budget, log=log, progress=False)
    trained = distill_kl(head, heldout)
    log(f"trained: {stats}; held-out: {trained}")

    head.config.training = {
        "data": "SmolLM2-135M-Instruct's own greedy responses to the distillation prompts "
                "(hf_decoding_ext/data/prompts/distill.jsonl, round-robin over the 6 categories; never benchmark "
                "prompts); loss at every position (prompt and response)",
        "sequences": len(seqs), "train_positions": int(train["offsets"][-1]),
        "heldout_positions": int(heldout["offsets"][-1]), "generated_tokens": n_resp,
        "max_new_tokens": args.max_new_tokens, "objective": "KL(p_full || p_exit), temperature 1",
        "optimizer": f"AdamW lr {args.lr}, warmup 30, cosine, batch {args.batch_size} sequences x <= {args.max_len}",
        "steps": stats["steps"], "seconds": stats["seconds"], "first_loss": stats["first_loss"],
        "last_loss": stats["last_loss"], "threads": args.threads, "device": args.device,
        "heldout_plain_exit": plain, "heldout_untrained": untrained, "heldout_trained": trained,
    }
    head.config.base_model_name_or_path = args.base or "smollm2-135m-instruct"
    head.save_pretrained(args.out)
    (Path(args.out) / "train_record.json").write_text(json.dumps(head.config.training, indent=1))
    log(f"saved to {args.out}; total {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
