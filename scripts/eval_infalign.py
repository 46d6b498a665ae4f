"""InfAlign (inference-time half, arXiv 2412.19792) on the default model with the VADER toy reward.

For each prompt of ``hf_decoding_ext/data/search/reward_prompts.jsonl`` the reference policy (SmolLM2-135M-Instruct,
ancestral sampling at T=1, no truncation) draws ``--pool`` candidates, ``--calibration`` reference samples (the
calibration set, M) and ``--heldout`` further reference samples (the opponents of the win rate). Figures:

* calibration: the calibrated reward (against the M calibration samples, ties one half) of the held-out reference
  samples: its mean (1/2 by construction) and a Kolmogorov-Smirnov test against Uniform(0, 1), which holds only when
  the reward has no ties;
* best-of-N / worst-of-N (N in 1, 2, 4, 8; ``--trials`` random size-N subsets of the pool per prompt): the standard
  win rate of the chosen output against the held-out reference samples (ties one half), against N/(N+1)
  (1/(N+1)), for three selection rules: the raw reward (argmax), the calibrated reward with ties broken by the raw
  reward (the library's rule, the same choice by construction) and the calibrated reward alone (argmax of the
  step-function C, first index on ties, as exp(t C) would give); plus how often each rule agrees with the raw one;
* the plug-in order-statistic estimates: best-of-N of the reference policy against one reference sample, and the
  inference-time win rate (both sides best-of-N), 1/2 for the reference policy against itself;
* an end-to-end run of :class:`InfAlignDecoding` (calibrated and raw) on a few prompts.

Writes ``results/infalign_eval.json`` and prints the summary. CPU, about 10-20 minutes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from scipy import stats

from hf_decoding_ext import encode_prompts, load_model
from hf_decoding_ext.core.resources import read_jsonl
from hf_decoding_ext.search.infalign import (
    InfAlignDecoding,
    calibrate,
    expected_win_rate,
    order_statistic_win_rate,
    select_index,
    vader_reward,
    win_rate,
)

NS = (1, 2, 4, 8)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@torch.no_grad()
def sample_texts(model, tok, prompt, k, max_new_tokens, chunk, seed):
    enc = encode_prompts(tok, prompt)
    texts = []
    for start in range(0, k, chunk):
        torch.manual_seed(seed + start)
        rows = min(chunk, k - start)
        out = model.generate(**enc, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                             max_new_tokens=max_new_tokens, num_return_sequences=rows,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        texts += tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    return texts


def spread(values):
    values = [float(v) for v in values]
    return {"mean": statistics.fmean(values), "std_across_prompts": statistics.pstdev(values),
            "min": min(values), "max": max(values)}


def selection_figures(pool, cal, heldout, n, mode, trials, gen):
    """Win rates of the three selection rules over random size-n subsets of the pool."""
    c_pool = calibrate(pool, cal)
    sign = 1.0 if mode == "best" else -1.0
    wins = {"raw": [], "calibrated": [], "calibrated_no_tiebreak": []}
    agree = {"calibrated": 0, "calibrated_no_tiebreak": 0}
    for _ in range(trials):
        idx = torch.randperm(pool.numel(), generator=gen)[:n]
        r, c = pool[idx], c_pool[idx]
        raw = int(torch.argmax(sign * r))
        lib = select_index(c, r, mode)
        naive = int(torch.argmax(sign * c))  # first index among the tied calibrated values
        for name, i in (("raw", raw), ("calibrated", lib), ("calibrated_no_tiebreak", naive)):
            wins[name].append(win_rate(r[i:i + 1], heldout))
        agree["calibrated"] += float(r[lib]) == float(r[raw])
        agree["calibrated_no_tiebreak"] += float(r[naive]) == float(r[raw])
    return ({k: statistics.fmean(v) for k, v in wins.items()},
            {k: v / trials for k, v in agree.items()})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool", type=int, default=32)
    ap.add_argument("--calibration", type=int, default=16)
    ap.add_argument("--heldout", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=12, help="first k prompts only (0: all)")
    ap.add_argument("--loop-prompts", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/infalign_eval.json")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    model, tok = load_model()
    rows = read_jsonl("search", "reward_prompts.jsonl")
    if args.prompts:
        rows = rows[:args.prompts]
    total = args.pool + args.calibration + args.heldout
    per_prompt = []
    gen = torch.Generator().manual_seed(args.seed)
    for p_i, row in enumerate(rows):
        t0 = time.time()
        texts = sample_texts(model, tok, row["prompt"], total, args.max_new_tokens, args.chunk,
                             seed=args.seed + 1000 * p_i)
        rewards = torch.tensor([vader_reward(t) for t in texts], dtype=torch.float64)
        pool, cal = rewards[:args.pool], rewards[args.pool:args.pool + args.calibration]
        heldout = rewards[args.pool + args.calibration:]
        c_held = calibrate(heldout, cal)
        ks = stats.kstest(c_held.tolist(), "uniform")
        rec = {"id": row["id"], "prompt": row["prompt"],
               "reward": {"mean": float(rewards.mean()), "std": float(rewards.std()),
                          "fraction_exactly_zero": float((rewards == 0).double().mean()),
                          "distinct_values": int(torch.unique(rewards).numel())},
               "calibration": {"heldout_mean_calibrated": float(c_held.mean()), "ks_statistic": float(ks.statistic),
                               "ks_pvalue": float(ks.pvalue)},
               "selection": {}, "plug_in": {},
               "examples": {"highest_reward": texts[int(torch.argmax(rewards))][:200],
                            "lowest_reward": texts[int(torch.argmin(rewards))][:200]},
               "rewards_pool_calibration_heldout": [round(float(v), 4) for v in rewards]}
        for mode in ("best", "worst"):
            for n in NS:
                wins, agree = selection_figures(pool, cal, heldout, n, mode, args.trials, gen)
                rec["selection"][f"{mode}-of-{n}"] = {"win_rate": wins, "agreement_with_raw": agree,
                                                     "continuous_theory": expected_win_rate(n, mode)}
                rec["plug_in"][f"{mode}-of-{n}"] = {
                    "vs_one_reference_sample": order_statistic_win_rate(pool, heldout, n, 1, mode),
                    "inference_time_vs_reference_same_procedure": order_statistic_win_rate(pool, heldout, n, n, mode)}
        per_prompt.append(rec)
        b4 = rec["selection"]["best-of-4"]["win_rate"]
        log(f"prompt {p_i + 1}/{len(rows)} {row['id']}: {time.time() - t0:.0f}s, zero-reward fraction "
            f"{rec['reward']['fraction_exactly_zero']:.2f}, KS p {ks.pvalue:.3f}, BoN-4 win raw {b4['raw']:.3f} "
            f"calibrated {b4['calibrated']:.3f} C-only {b4['calibrated_no_tiebreak']:.3f}")

    # end-to-end: the loop itself, calibrated vs raw, same seed
    loop_runs = []
    for row in rows[:args.loop_prompts]:
        enc = encode_prompts(tok, row["prompt"])
        res = {}
        for name, kw in (("calibrated_exp", dict()), ("raw", dict(transform="none"))):
            loop = InfAlignDecoding(n=4, num_reference=16, tokenizer=tok, seed=args.seed, **kw)
            out = model.generate(**enc, custom_generate=loop, do_sample=True, top_k=0,
                                 max_new_tokens=args.max_new_tokens, return_dict_in_generate=True)
            i = out.selected_index[0]
            res[name] = {"selected_index": i, "reward": float(out.rewards[0][i]),
                         "calibrated_reward": float(out.calibrated_rewards[0][i]),
                         "text": tok.decode(out.candidates[0][i], skip_special_tokens=True)[:200]}
        res["same_choice"] = res["calibrated_exp"]["selected_index"] == res["raw"]["selected_index"]
        loop_runs.append({"id": row["id"], **res})
        log(f"loop on {row['id']}: same choice {res['same_choice']}")

    summary = {"calibration": {
        "heldout_mean_calibrated": spread(r["calibration"]["heldout_mean_calibrated"] for r in per_prompt),
        "ks_pvalue_below_0.05": sum(r["calibration"]["ks_pvalue"] < 0.05 for r in per_prompt),
        "prompts": len(per_prompt),
        "fraction_exactly_zero_reward": spread(r["reward"]["fraction_exactly_zero"] for r in per_prompt)},
        "selection": {}, "plug_in": {},
        "loop_same_choice_calibrated_vs_raw": f"{sum(r['same_choice'] for r in loop_runs)}/{len(loop_runs)}"}
    for mode in ("best", "worst"):
        for n in NS:
            key = f"{mode}-of-{n}"
            summary["selection"][key] = {
                "continuous_theory": expected_win_rate(n, mode),
                **{f"win_rate_{name}": spread(r["selection"][key]["win_rate"][name] for r in per_prompt)
                   for name in ("raw", "calibrated", "calibrated_no_tiebreak")},
                "agreement_calibrated_vs_raw": spread(r["selection"][key]["agreement_with_raw"]["calibrated"]
                                                      for r in per_prompt),
                "agreement_calibrated_no_tiebreak_vs_raw": spread(
                    r["selection"][key]["agreement_with_raw"]["calibrated_no_tiebreak"] for r in per_prompt)}
            summary["plug_in"][key] = {k: spread(r["plug_in"][key][k] for r in per_prompt)
                                       for k in ("vs_one_reference_sample",
                                                 "inference_time_vs_reference_same_procedure")}
    result = {"method": "infalign", "paper": "arXiv 2412.19792",
              "settings": {"model": "SmolLM2-135M-Instruct (embedded default)", "reward": "VADER compound (stand-in)",
                           "reference_policy": "ancestral sampling, T=1, top_k=0, top_p=1",
                           "pool": args.pool, "calibration_samples_M": args.calibration,
                           "heldout_reference_samples": args.heldout, "max_new_tokens": args.max_new_tokens,
                           "subset_trials_per_prompt": args.trials, "N": list(NS), "seed": args.seed,
                           "ties": "one half (calibration and win rate)",
                           "prompts": "hf_decoding_ext/data/search/reward_prompts.jsonl"},
              "summary": summary, "loop_runs": loop_runs, "per_prompt": per_prompt}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
