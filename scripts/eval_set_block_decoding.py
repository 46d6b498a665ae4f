"""Set Block Decoding (arXiv 2509.04185) on SmolLM2-135M-Instruct: the paper's property, measured.

Arms (greedy, the same prompts and token budget):

* ``original``: the default model's plain greedy ``generate()`` (the reference);
* ``ntp``: the NTP-only fine-tune of equal steps (the paper's control), plain greedy;
* ``sbd_ar``: the SBD fine-tune decoded autoregressively (plain greedy);
* ``sbd_gamma_<g>``: the SBD fine-tune with :class:`SetBlockDecoding` at each EB-sampler threshold ``gamma`` of the
  sweep: forwards per token (NFE), tokens per forward, agreement with the original model's greedy output and with the
  SBD model's own AR greedy output, the task metric, wall seconds per token (this CPU, same kernels as greedy).

Agreement: the share of the reference's tokens reproduced position by position (each prompt compared up to the longer
of the two outputs, as ``training.finetune.agreement_with``). Task metric: on the benchmark's ``math_reasoning`` and
``rag_qa`` prompts (written for the repo), the share of outputs containing the expected answer (case-insensitive).

Writes ``results/set_block_decoding_eval.json``. Run after the two fine-tunes (training queue):
``python scripts/eval_set_block_decoding.py --sbd /work/distill/finetune/set-block-decoding
--ntp /work/distill/finetune/set-block-decoding-ntp``. Check run (seconds, untrained mask token, nothing written to
results/): ``python scripts/eval_set_block_decoding.py --sbd untrained --ntp none --prompts 2 --task-prompts 2
--max-new-tokens 8 --gammas 0,2 --out /tmp/sbd_eval.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parents[1] / "results" / "set_block_decoding_eval.json"


def _agreement(refs: list[list[int]], outs: list[list[int]]) -> float:
    from hf_decoding_ext.training.finetune import token_agreement

    return round(token_agreement(refs, outs)["agreement"], 4)


def _task(tokenizer, rows, outs) -> float:
    hits = [str(r["answer"]).strip().lower() in tokenizer.decode(o, skip_special_tokens=True).lower()
            for r, o in zip(rows, outs)]
    return round(sum(hits) / len(hits), 4) if hits else float("nan")


@torch.inference_mode()
def _run(model, tokenizer, rows, max_new_tokens, loop=None):
    """New tokens per prompt, summed loop stats and wall seconds."""
    from hf_decoding_ext.core.models import encode_prompts

    outs, forwards, tokens, t0 = [], 0, 0, time.time()
    for row in rows:
        enc = encode_prompts(tokenizer, row["prompt"], device=model.device)
        kw = {"custom_generate": loop} if loop is not None else {}
        y = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, **kw)
        outs.append(y[0, enc["input_ids"].shape[1]:].tolist())
        if loop is not None:
            forwards += loop.last_stats["forwards"]
            tokens += loop.last_stats["tokens"]
    return outs, forwards, tokens, time.time() - t0


def _arm(name, model, tokenizer, rows, task_rows, refs, args, loop=None, own=None):
    outs, fw, tk, secs = _run(model, tokenizer, rows, args.max_new_tokens, loop)
    touts, tfw, ttk, tsecs = _run(model, tokenizer, task_rows, args.max_new_tokens, loop)
    n_tokens = sum(len(o) for o in outs) + sum(len(o) for o in touts)
    res = {"agreement_with_original": _agreement(refs, outs),
           "task_answer_rate": _task(tokenizer, task_rows, touts),
           "seconds_per_token": round((secs + tsecs) / max(1, n_tokens), 5), "tokens": n_tokens}
    if loop is not None:
        res.update(nfe_per_token=round((fw + tfw) / max(1, tk + ttk), 4),
                   tokens_per_forward=round((tk + ttk) / max(1, fw + tfw), 4))
    if own is not None:
        res["agreement_with_own_ar"] = _agreement(own, outs)
    print(name, json.dumps(res), flush=True)
    return res, outs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sbd", required=True, help="SBD fine-tune folder (LoRA adapter or full), 'shipped' or "
                                                  "'untrained' (the base with a fresh mask token: a script check)")
    ap.add_argument("--ntp", default="none", help="NTP-control fine-tune folder (LoRA or full), or 'none'")
    ap.add_argument("--prompts", type=int, default=12, help="interleaved benchmark prompts for the agreement")
    ap.add_argument("--task-prompts", type=int, default=12, help="math_reasoning + rag_qa prompts (half each)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--gammas", default="0,0.1,0.35,0.6,1,1.5,3",
                    help="EB thresholds (the paper: 0.1/0.35 reasoning, 0.35/0.6 chat; its sweep 0..1.5)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()

    from hf_decoding_ext.bench.prompts import interleaved_prompts, load_prompts
    from hf_decoding_ext.core.models import load_model
    from hf_decoding_ext.speculative.set_block_decoding import (
        MASK_TOKEN,
        PAPER_FIDELITY,
        SHIPPED_DIR,
        SetBlockDecoding,
        load_sbd_model,
    )
    from hf_decoding_ext.training.finetune import (
        ADAPTER_FILE,
        add_special_tokens,
        load_lora,
    )

    t0 = time.time()
    gammas = [float(g) for g in args.gammas.split(",") if g.strip()]
    rows = interleaved_prompts(args.prompts)
    half = max(1, args.task_prompts // 2)
    task_rows = [r for c in ("math_reasoning", "rag_qa") for r in load_prompts(categories=[c])[:half]]

    original, tok = load_model(None)
    original.eval()
    refs, _, _, _ = _run(original, tok, rows, args.max_new_tokens)
    result = {"model": "smollm2-135m-instruct", "prompts": len(rows), "task_prompts": len(task_rows),
              "max_new_tokens": args.max_new_tokens, "block_size": args.block_size, "gammas": gammas,
              "sbd": args.sbd, "ntp": args.ntp, "arms": {}}
    result["arms"]["original"], _ = _arm("original", original, tok, rows, task_rows, refs, args)
    del original

    if args.ntp != "none":
        path = Path(args.ntp)
        if (path / ADAPTER_FILE).exists():
            ntp, ntok = load_model(None)
            load_lora(ntp, path, merge=True)
        else:
            ntp, ntok = load_model(str(path))
        ntp.eval()
        result["arms"]["ntp"], _ = _arm("ntp", ntp, ntok, rows, task_rows, refs, args)
        del ntp

    if args.sbd == "untrained":
        sbd, stok = load_model(None)
        add_special_tokens(sbd, stok, [MASK_TOKEN])
        sbd.eval()
    else:
        sbd, stok = load_sbd_model(SHIPPED_DIR if args.sbd == "shipped" else args.sbd)
    result["arms"]["sbd_ar"], own = _arm("sbd_ar", sbd, stok, rows, task_rows, refs, args)
    for g in gammas:
        loop = SetBlockDecoding(block_size=args.block_size, gamma=g, tokenizer=stok)
        result["arms"][f"sbd_gamma_{g:g}"], _ = _arm(f"sbd_gamma_{g:g}", sbd, stok, rows, task_rows, refs, args,
                                                     loop=loop, own=own)
    result["paper_fidelity"] = [list(p) for p in PAPER_FIDELITY]
    result["seconds"] = round(time.time() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} in {result['seconds']} s")


if __name__ == "__main__":
    main()
