"""CARDS (Cascade Reward Sampling, arXiv 2406.16306) on the default model with the VADER toy reward.

Two stages:

* ``--calibrate`` (dev prompts only, written into the calibration file itself, none of them a test prompt): for each
  dev prompt, ``--pool`` plain samples (temperature 0.7, top-k 40, the official sampling setting) of ``--max-new-tokens``
  tokens; the entropy threshold is the 90th percentile of SmolLM2's raw next-token entropy over the sampled tokens,
  ``r*`` the 90th percentile of the full responses' VADER rewards and ``beta`` 0.7 times their standard deviation.
  Writes ``hf_decoding_ext/data/search/cards_calibration_smollm2.json``.
* evaluation (test split: ``hf_decoding_ext/data/search/reward_prompts.jsonl``, every prompt there is a test prompt):
  per prompt, a pool of ``--pool`` plain samples gives plain sampling (mean reward) and item-level best-of-N for
  N = 1..pool (exact expected maximum over random size-N subsets of the pool, without replacement); CARDS (soft
  acceptance, calibrated thresholds) runs ``--cards-runs`` times. Compute per method: generated tokens, LLM calls
  and reward calls counted as the official code counts them (one LLM call per sampled token per sequence, plus one
  per entropy-triggered boundary test for CARDS; one reward call per scored text), and model forwards for CARDS.

The effect counts as reproduced when CARDS' mean reward is above plain sampling's (paired 95% interval above 0) and
at least best-of-N's at the N whose LLM+reward calls are closest to CARDS' (not fewer calls than CARDS').

Writes ``results/cards_eval.json`` (settings, per-item figures, summary with spread) and prints the summary.
CPU, one thread: about 8 minutes alone.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from hf_decoding_ext import encode_prompts, load_model
from hf_decoding_ext.core.entropy import entropy
from hf_decoding_ext.core.resources import data_path, read_jsonl
from hf_decoding_ext.core.scoring import vader_reward
from hf_decoding_ext.search.cards import CALIBRATION_FILE, CascadeRewardSampling

DEV_PROMPTS = [
    "Tell me about your morning commute.",
    "Describe the last book you read.",
    "What do you think about rainy Sundays?",
    "Write a short note to your landlord about the heating.",
    "Describe a visit to the dentist.",
    "How was your last birthday?",
    "Write two sentences about an old bicycle.",
    "What is it like to cook dinner after a long day?",
]
"""Dev prompts for the calibration, written for this repository (none is a test prompt of reward_prompts.jsonl)."""

SAMPLING = dict(do_sample=True, temperature=0.7, top_k=40, top_p=1.0)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def percentile(values, q):
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@torch.no_grad()
def sample_pool(model, tok, prompt, k, max_new_tokens, seed, with_entropy=False):
    """``k`` plain samples of one prompt in one batch: texts, lengths (tokens up to and including eos) and, with
    ``with_entropy``, the raw next-token entropy at every sampled position."""
    enc = encode_prompts(tok, prompt)
    torch.manual_seed(seed)
    out = model.generate(**enc, **SAMPLING, num_return_sequences=k, max_new_tokens=max_new_tokens,
                         return_dict_in_generate=True, output_logits=with_entropy, pad_token_id=tok.pad_token_id)
    new = out.sequences[:, enc["input_ids"].shape[1]:]
    eos = set([tok.eos_token_id] if isinstance(tok.eos_token_id, int) else tok.eos_token_id)
    eos |= set(model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list)
               else [model.generation_config.eos_token_id])
    texts, lengths, ents = [], [], []
    for i in range(k):
        row = new[i].tolist()
        n = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
        lengths.append(n)
        texts.append(tok.decode(row[:n], skip_special_tokens=True))
        if with_entropy:
            ents.extend(float(entropy(out.logits[j][i:i + 1])[0]) for j in range(n))
    return texts, lengths, ents


def calibrate(model, tok, args):
    rewards, ents, per_prompt = [], [], []
    for i, prompt in enumerate(DEV_PROMPTS):
        texts, lengths, e = sample_pool(model, tok, prompt, args.pool, args.max_new_tokens, 1000 + i, True)
        r = [vader_reward(t) for t in texts]
        rewards += r
        ents += e
        per_prompt.append({"prompt": prompt, "rewards": r, "lengths": lengths})
        log(f"dev {i}: mean reward {statistics.mean(r):.3f}")
    cal = {
        "model": "SmolLM2-135M-Instruct (embedded default, fp32, chat template)",
        "reward": "vader_reward on the response text without the prompt",
        "sampling": {**SAMPLING, "max_new_tokens": args.max_new_tokens, "pool": args.pool},
        "rule": ("entropy_threshold = 90th percentile of the raw next-token entropy (nats) over the sampled tokens; "
                 "reward_threshold (r*) = 90th percentile of full-response rewards; beta = 0.7 x their standard "
                 "deviation (the official beta 0.7 taken as relative to a unit-scale reward); dev prompts only"),
        "entropy_threshold": round(percentile(ents, 0.9), 3),
        "reward_threshold": round(percentile(rewards, 0.9), 4),
        "beta": round(0.7 * statistics.pstdev(rewards), 4),
        "entropy_percentiles": {str(q): round(percentile(ents, q / 100), 3) for q in (50, 75, 90, 95)},
        "reward_mean": round(statistics.mean(rewards), 4),
        "reward_std": round(statistics.pstdev(rewards), 4),
        "num_tokens": len(ents),
        "dev_prompts": DEV_PROMPTS,
        "per_prompt": per_prompt,
        "written_by": "scripts/eval_cards.py --calibrate (CARDS helper, issue 22)",
    }
    path = data_path("search", CALIBRATION_FILE)
    path.write_text(json.dumps(cal, indent=1) + "\n")
    log(f"calibration: entropy_threshold {cal['entropy_threshold']}, r* {cal['reward_threshold']}, "
        f"beta {cal['beta']} -> {path}")
    return cal


def expected_best_of(rewards, n):
    """Exact expected maximum of a uniformly random size-``n`` subset (without replacement) of ``rewards``."""
    s = sorted(rewards)
    m = len(s)
    total = math.comb(m, n)
    return sum(s[i] * math.comb(i, n - 1) for i in range(n - 1, m)) / total


def mean_ci(values):
    m = statistics.mean(values)
    if len(values) < 2:
        return m, 0.0
    return m, 1.96 * statistics.stdev(values) / math.sqrt(len(values))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calibrate", action="store_true", help="(re)compute the dev calibration first")
    ap.add_argument("--pool", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--prompts", type=int, default=16, help="number of test prompts")
    ap.add_argument("--cards-runs", type=int, default=2)
    ap.add_argument("--options", default="soft,hard", help="acceptance modes to run (the first one decides)")
    ap.add_argument("--out", default="results/cards_eval.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, tok = load_model()
    if args.calibrate or not data_path("search", CALIBRATION_FILE).exists():
        cal = calibrate(model, tok, args)
    else:
        cal = json.loads(data_path("search", CALIBRATION_FILE).read_text())
    prompts = read_jsonl("search", "reward_prompts.jsonl")[:args.prompts]
    loop_kw = dict(reward_threshold=cal["reward_threshold"], entropy_threshold=cal["entropy_threshold"],
                   beta=cal["beta"])
    options = args.options.split(",")
    items = []
    t0 = time.time()
    for i, p in enumerate(prompts):
        texts, lengths, _ = sample_pool(model, tok, p["prompt"], args.pool, args.max_new_tokens, 2000 + i)
        rewards = [vader_reward(t) for t in texts]
        item = {"id": p["id"], "prompt": p["prompt"], "pool_rewards": rewards, "pool_lengths": lengths,
                "pool_texts": texts, "cards": {o: [] for o in options}}
        enc = encode_prompts(tok, p["prompt"])
        for option in options:
            for run in range(args.cards_runs):
                loop = CascadeRewardSampling(tokenizer=tok, seed=3000 + 17 * i + run, option=option, **loop_kw)
                out = model.generate(**enc, **SAMPLING, max_new_tokens=args.max_new_tokens, custom_generate=loop,
                                     return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
                text = tok.decode(out.sequences[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                final = vader_reward(text)
                item["cards"][option].append({"text": text, "reward": final, "search_stats": out.search_stats[0],
                                              "cards_stats": out.cards_stats[0], "segments": out.cards_segments[0]})
        items.append(item)
        msg = ", ".join(f"CARDS-{o} {statistics.mean(c['reward'] for c in item['cards'][o]):.3f} "
                        f"({statistics.mean(c['search_stats']['generated_tokens'] for c in item['cards'][o]):.0f} tok)"
                        for o in options)
        log(f"{p['id']}: plain {statistics.mean(rewards):.3f}, best-of-{args.pool} {max(rewards):.3f}, {msg} "
            f"[{time.time() - t0:.0f}s]")
        write(args, cal, loop_kw, items, options, partial=True)
    summary = write(args, cal, loop_kw, items, options, partial=False)
    print(json.dumps(summary, indent=1))


def cards_summary(items, option, plain, bon, curve):
    runs = [it["cards"][option] for it in items]
    cards_r = [statistics.mean(c["reward"] for c in rs) for rs in runs]
    cards_tok = [statistics.mean(c["search_stats"]["generated_tokens"] for c in rs) for rs in runs]
    cards_llm = [statistics.mean(c["cards_stats"]["llm_calls"] for c in rs) for rs in runs]
    cards_rm = [statistics.mean(c["cards_stats"]["rm_calls"] + 1 for c in rs) for rs in runs]
    cards_fw = [statistics.mean(c["search_stats"]["model_calls"] for c in rs) for rs in runs]
    flat = [c for rs in runs for c in rs]
    cm, cci = mean_ci(cards_r)
    cards_calls = statistics.mean(cards_llm) + statistics.mean(cards_rm)
    # best-of-N at the smallest N with at least CARDS' calls (the largest pool if none)
    match = next((c for c in curve if c["llm_plus_rm_calls"] >= cards_calls), curve[-1])
    d_plain = [a - b for a, b in zip(cards_r, plain)]
    d_bon = [a - b for a, b in zip(cards_r, bon[match["n"]])]
    dpm, dpci = mean_ci(d_plain)
    dbm, dbci = mean_ci(d_bon)
    reproduced = (dpm - dpci > 0) and dbm >= 0 and match["llm_plus_rm_calls"] >= cards_calls
    segs = sum(c["cards_stats"]["segments"] for c in flat)
    return {
        "reward": round(cm, 4), "ci95": round(cci, 4), "generated_tokens": round(statistics.mean(cards_tok), 1),
        "llm_calls": round(statistics.mean(cards_llm), 1), "rm_calls": round(statistics.mean(cards_rm), 1),
        "llm_plus_rm_calls": round(cards_calls, 1), "model_forwards": round(statistics.mean(cards_fw), 1),
        "segments": segs, "fallback_segments": sum(c["cards_stats"]["fallbacks"] for c in flat),
        "candidates_per_segment": round(sum(c["cards_stats"]["candidates"] for c in flat) / max(1, segs), 2),
        "mean_segment_length": round(statistics.mean(s["length"] for c in flat for s in c["segments"]), 2),
        "minus_plain": {"mean": round(dpm, 4), "ci95": round(dpci, 4)},
        "matched_best_of_n": match["n"],
        "minus_matched_best_of_n": {"mean": round(dbm, 4), "ci95": round(dbci, 4)},
        "reproduced": bool(reproduced),
    }


def write(args, cal, loop_kw, items, options, partial):
    pool = args.pool
    plain = [statistics.mean(it["pool_rewards"]) for it in items]
    mean_len = [statistics.mean(it["pool_lengths"]) for it in items]
    bon = {n: [expected_best_of(it["pool_rewards"], n) for it in items] for n in range(1, pool + 1)}
    per_len = statistics.mean(mean_len)
    curve = []
    for n in range(1, pool + 1):
        m, ci = mean_ci(bon[n])
        curve.append({"n": n, "reward": round(m, 4), "ci95": round(ci, 4), "generated_tokens": round(n * per_len, 1),
                      "llm_calls": round(n * per_len, 1), "rm_calls": n,
                      "llm_plus_rm_calls": round(n * per_len + n, 1)})
    cards = {o: cards_summary(items, o, plain, bon, curve) for o in options}
    summary = {
        "prompts": len(items), "partial": partial,
        "plain_sampling": {"reward": round(statistics.mean(plain), 4), "ci95": round(mean_ci(plain)[1], 4),
                           "generated_tokens": round(per_len, 1), "llm_plus_rm_calls": round(per_len + 1, 1)},
        "best_of_n": curve,
        "cards": cards,
        "reproduced": cards[options[0]]["reproduced"],
        "rule": ("reproduced (judged on the first acceptance mode, the official default 'soft') = CARDS mean reward "
                 "above plain sampling (paired 95% interval above 0) and at least best-of-N's at the smallest N with "
                 "at least CARDS' LLM+reward calls"),
    }
    out = {"settings": {"model": "SmolLM2-135M-Instruct", "reward": "vader_reward (response text, no prompt)",
                        "sampling": SAMPLING, "max_new_tokens": args.max_new_tokens, "pool": pool,
                        "cards_runs": args.cards_runs, "cards": loop_kw, "options": options,
                        "calibration": CALIBRATION_FILE,
                        "test_prompts": "hf_decoding_ext/data/search/reward_prompts.jsonl"},
           "summary": summary, "items": items}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    sys.exit(main())
