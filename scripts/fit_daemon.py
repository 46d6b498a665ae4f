"""Fit DAEMON's metric weights mu for the default model on the dev split of the committed human text.

For every dev passage, ``--n`` continuations of its prefix are sampled from the proposal (raw-text continuation, no
chat template; ``top_p`` nucleus sampling at temperature 1 by default) with their log-ratios log p_model - log q;
their metric features and the human continuations' (cut to ``--max-new-tokens`` tokens) give the weighted-importance-
sampling dual, minimised by :func:`hf_decoding_ext.search.daemon.fit_weights`. Writes
``hf_decoding_ext/data/search/daemon_weights_smollm2.json`` (the weights DAEMONDecoding loads by default for
SmolLM2-135M-Instruct) and prints the fit (gradient norm, per-metric means).

    python scripts/fit_daemon.py [--n 8] [--max-new-tokens 32] [--top-p 0.95] [--seed 0] [--threads 1] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from hf_decoding_ext.core.models import load_model
from hf_decoding_ext.search.daemon import (
    METRICS,
    daemon_features,
    draw_pools,
    encode_passage,
    fit_weights,
    human_passages,
    model_signature,
    shipped_weights_path,
)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8, help="proposal samples per dev prompt")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--l2", type=float, default=1e-4)
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default=str(shipped_weights_path()))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model)
    passages = human_passages("dev")
    enc = [encode_passage(tokenizer, p, args.max_new_tokens) for p in passages]
    prefixes = [e[0] for e in enc]
    t0 = time.time()
    pools = draw_pools(model, tokenizer, prefixes, args.n, seed=args.seed, max_new_tokens=args.max_new_tokens,
                       top_p=args.top_p, temperature=args.temperature)
    t_sample = time.time() - t0
    print(f"sampled {len(pools)} pools in {t_sample:.0f} s", flush=True)
    feats = [daemon_features(model, [p] * len(pool), pool.tokens, logprobs=pool.logprobs)
             for p, pool in zip(prefixes, pools)]
    human = daemon_features(model, prefixes, [e[1] for e in enc])
    ratios = [pool.logprobs - pool.proposal_logprobs for pool in pools]
    fit = fit_weights(feats, ratios, human.mean(0), METRICS, l2=args.l2)
    rec = fit.as_dict()
    record = {
        "method": "daemon",
        "paper": "Language Model Decoding as Direct Metrics Optimization (arXiv:2310.01041)",
        "model": {**model_signature(model), "name": "SmolLM2-135M-Instruct" if args.model is None else args.model},
        "metrics": list(METRICS),
        "mu": rec["mu"],
        "settings": {"data": "hf_decoding_ext/data/search/human_text.jsonl (dev split)", "prompts": len(passages),
                     "samples_per_prompt": args.n, "max_new_tokens": args.max_new_tokens,
                     "proposal": {"top_p": args.top_p, "top_k": 0, "temperature": args.temperature},
                     "prompt_format": "raw text (no chat template)", "seed": args.seed, "l2": args.l2},
        "fit": {k: rec[k] for k in ("grad_norm", "iterations", "converged", "constraint_gap", "fixed")},
        "means": {k: rec[k] for k in ("human_mean", "proposal_mean", "model_mean", "fitted_mean")},
        "sampling_seconds": round(t_sample, 1),
    }
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: record[k] for k in ("mu", "fit", "means")}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
