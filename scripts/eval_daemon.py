"""DAEMON's core claim on the default model: after fitting mu, the metric gaps to human text shrink.

On the held-out test split of the committed human text (raw-text continuation), ``--pools`` pools of ``--m``
candidates are drawn per prompt from the proposal the shipped weights were fitted with (nucleus sampling, top_p from
the weights file); for every pool the expected metrics of the proposal (the plain mean), of DAEMON's SIR output (the
resampling probabilities w_i ~ p/q * exp(-mu.f) times the features: the exact expectation of the resampled
candidate given the pool) and of SIR towards the model with mu = 0 are compared with the human continuations' mean
(cut to the same budget). Also records the candidate DAEMONDecoding actually resampled (seeded). Writes
``results/daemon_eval.json`` (settings, per-prompt figures, per-metric gaps with a bootstrap interval over prompts)
and prints the summary.

    python scripts/eval_daemon.py [--m 8] [--pools 2] [--seed 1] [--threads 1] [--out results/daemon_eval.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from hf_decoding_ext.core.models import load_model
from hf_decoding_ext.search.daemon import (
    daemon_features,
    draw_pools,
    encode_passage,
    human_passages,
    load_weights,
    sir_expectations,
)


def evaluate(model, tokenizer, passages, mu_map, *, m=8, pools=4, seed=1, max_new_tokens=48, proposal=None,
             bootstrap=1000):
    """Per-prompt and summary metric gaps to human text for the proposal, SIR(mu) and SIR(mu=0)."""
    proposal = proposal or {"top_p": 0.95, "temperature": 1.0}
    metrics = list(mu_map)
    mu = torch.tensor([mu_map[k] for k in metrics], dtype=torch.float64)
    enc = [encode_passage(tokenizer, p, max_new_tokens) for p in passages]
    prefixes = [e[0] for e in enc]
    human = daemon_features(model, prefixes, [e[1] for e in enc], metrics)
    per_prompt = []
    rows = {"proposal": [], "sir": [], "model": [], "sampled": []}
    gen = torch.Generator().manual_seed(seed)
    for k in range(pools):
        print(f"pool {k + 1}/{pools} ({time.strftime('%H:%M:%S')})", flush=True)
        drawn = draw_pools(model, tokenizer, prefixes, m, seed=seed * 1000 + k * 100, max_new_tokens=max_new_tokens,
                           **proposal)
        for i, pool in enumerate(drawn):
            lr = pool.logprobs - pool.proposal_logprobs
            f = daemon_features(model, [prefixes[i]] * len(pool), pool.tokens, metrics, logprobs=pool.logprobs)
            e = sir_expectations(f, lr, mu)
            pick = int(torch.multinomial(torch.softmax(lr - f @ mu, 0).float(), 1, generator=gen))
            e["sampled"] = f[pick]
            for key in rows:
                rows[key].append((i, e[key]))
            per_prompt.append({"prompt": i, "pool": k, "work": passages[i]["work"],
                               **{key: dict(zip(metrics, e[key].tolist())) for key in rows},
                               "max_weight": float(torch.softmax(lr - f @ mu, 0).max())})
    n = len(passages)

    def per_prompt_mean(key):  # (n, k): each prompt's mean over its pools
        out = torch.zeros(n, len(metrics), dtype=torch.float64)
        cnt = torch.zeros(n, 1, dtype=torch.float64)
        for i, v in rows[key]:
            out[i] += v
            cnt[i] += 1
        return out / cnt

    means = {key: per_prompt_mean(key) for key in rows}
    h_mean = human.mean(0)
    bg = torch.Generator().manual_seed(seed + 7)
    boots = torch.randint(0, n, (bootstrap, n), generator=bg)
    summary = {}
    for j, metric in enumerate(metrics):
        entry = {"human": float(h_mean[j])}
        for key in rows:
            entry[key] = float(means[key][:, j].mean())
            entry[f"{key}_gap"] = abs(entry[key] - entry["human"])
        # bootstrap over prompts of the gap reduction |proposal - human| - |sir - human| (human resampled too)
        hb = human[:, j][boots].mean(1)
        red = (means["proposal"][:, j][boots].mean(1) - hb).abs() - (means["sir"][:, j][boots].mean(1) - hb).abs()
        entry["gap_reduction"] = entry["proposal_gap"] - entry["sir_gap"]
        entry["gap_reduction_ci95"] = [float(red.quantile(0.025)), float(red.quantile(0.975))]
        entry["shrinks"] = entry["sir_gap"] < entry["proposal_gap"]
        summary[metric] = entry
    return {"summary": summary, "per_prompt": per_prompt,
            "human_per_prompt": [dict(zip(metrics, h.tolist())) for h in human]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=8)
    ap.add_argument("--pools", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--weights", default="shipped")
    ap.add_argument("--out", default="results/daemon_eval.json")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model()
    mu_map, record = load_weights(args.weights, model)
    settings = record.get("settings", {})
    max_new = int(settings.get("max_new_tokens", 48))
    prop = settings.get("proposal", {"top_p": 0.95, "temperature": 1.0})
    proposal = {"top_p": prop.get("top_p", 1.0), "temperature": prop.get("temperature", 1.0)}
    passages = human_passages("test")
    t0 = time.time()
    res = evaluate(model, tokenizer, passages, mu_map, m=args.m, pools=args.pools, seed=args.seed,
                   max_new_tokens=max_new, proposal=proposal)
    out = {"method": "daemon", "model": "SmolLM2-135M-Instruct",
           "settings": {"split": "test", "prompts": len(passages), "m": args.m, "pools_per_prompt": args.pools,
                        "max_new_tokens": max_new, "proposal": proposal, "seed": args.seed,
                        "weights": record.get("source"), "mu": mu_map,
                        "expectation": "exact expectation of the resampled candidate given each pool; 'sampled' "
                                       "is one seeded resample per pool"},
           "seconds": round(time.time() - t0, 1), **res}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"{'metric':6s} {'human':>8s} {'proposal':>9s} {'SIR':>8s} {'SIR mu=0':>9s} {'sampled':>8s}  reduction [95% CI]")
    for metric, e in res["summary"].items():
        lo, hi = e["gap_reduction_ci95"]
        print(f"{metric:6s} {e['human']:8.3f} {e['proposal']:9.3f} {e['sir']:8.3f} {e['model']:9.3f} "
              f"{e['sampled']:8.3f}  {e['gap_reduction']:+.3f} [{lo:+.3f}, {hi:+.3f}] "
              f"{'shrinks' if e['shrinks'] else 'does not shrink'}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
