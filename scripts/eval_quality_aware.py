"""Quality-aware decoding (arXiv 2205.00978) on the default model: English->French translation of the hand-written
pairs of ``hf_decoding_ext/data/search/translation_pairs.jsonl``.

For every pair, SmolLM2-135M-Instruct (chat template, "Translate this English sentence into French.") draws a pool
of ``--n`` candidates (nucleus sampling, p = ``--top-p``, one of the paper's pool settings) per seed, and decodes
greedily once. Each rule of :class:`QualityAwareDecoding` picks one candidate of the *same* pool (paired
comparison): F-RR by the length-normalised log-prob, F-RR by the round-trip (back-translation) log-prob, T-RR with
weights tuned on the dev split (:func:`tune_reranker_weights`, objective = chrF of the pick against the reference),
MBR with chrF and with BLEU (full and with 4 subsampled pseudo-references), and T-RR shortlist -> chrF-MBR. The
figures are sentence chrF (and BLEU) of the pick against the reference, on the test split; "sample" is the mean over
the pool (the expected score of one random sample), "oracle" the best candidate of the pool.

Writes ``results/quality_aware_eval.json`` and prints the summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from hf_decoding_ext import encode_prompts, load_model
from hf_decoding_ext.core.candidates import RerankingLoop, Selection
from hf_decoding_ext.core.resources import read_jsonl
from hf_decoding_ext.core.scoring import chrf, sentence_bleu
from hf_decoding_ext.search.quality_aware import (
    QualityAwareDecoding,
    RoundTripLogProb,
    reranker_objective,
    tune_reranker_weights,
)

INSTRUCTION = "Translate this English sentence into French.\nEnglish: {source}"


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class PoolCapture(RerankingLoop):
    """Samples the pool with the library's rollout and keeps it (returns its first candidate)."""

    def select(self, pool, state, row):
        self.pool = pool
        return Selection(0, torch.zeros(len(pool)))


@torch.no_grad()
def sample_pool(model, tok, prompt, n, seed, max_new_tokens, top_p, temperature=1.0):
    cap = PoolCapture(n=n, seed=seed)
    enc = encode_prompts(tok, prompt)
    model.generate(**enc, custom_generate=cap, do_sample=True, top_p=top_p, top_k=0, temperature=temperature,
                   max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
    return cap.pool


@torch.no_grad()
def greedy(model, tok, prompt, max_new_tokens):
    enc = encode_prompts(tok, prompt)
    out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def spread(values):
    return {"mean": statistics.fmean(values), "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
            "sem": statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0, "n": len(values)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--top-p", type=float, default=0.8)
    ap.add_argument("--shortlist", type=int, default=4)
    ap.add_argument("--limit", type=int, default=None, help="pairs per split (default: all)")
    ap.add_argument("--out", default="results/quality_aware_eval.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, tok = load_model()
    pairs = read_jsonl("search", "translation_pairs.jsonl")
    if args.limit:
        pairs = [p for p in pairs if p["split"] == "dev"][:args.limit] + [p for p in pairs if p["split"] == "test"][
            :args.limit]
    current = {}
    back_translation = RoundTripLogProb(model, tok, source_fn=lambda prompt_text: current["source"])
    memo = {}

    def round_trip(text, prompt_text):  # the same candidate is scored by several rules: compute it once
        key = (text, current["source"])
        if key not in memo:
            memo[key] = back_translation(text, prompt_text)
        return memo[key]

    featurizer = QualityAwareDecoding(n=args.n, strategy="t-rr", features=("logprob_norm", "logprob"),
                                      qe_metrics={"round_trip": round_trip}, tokenizer=tok)
    names = featurizer.feature_names
    records = []
    t0 = time.time()
    for pair in pairs:
        prompt = INSTRUCTION.format(source=pair["source"])
        current["source"] = pair["source"]
        g = greedy(model, tok, prompt, args.max_new_tokens)
        for seed in range(args.seeds):
            pool = sample_pool(model, tok, prompt, args.n, 1000 * seed + int(pair["id"][1:]), args.max_new_tokens,
                               args.top_p)
            texts = pool.texts(tok)
            records.append({"id": pair["id"], "split": pair["split"], "seed": seed, "pool": pool, "texts": texts,
                            "features": featurizer.pool_features(pool),
                            "chrf": torch.tensor([chrf(t, pair["reference"]) for t in texts], dtype=torch.float64),
                            "bleu": torch.tensor([sentence_bleu(t, pair["reference"]) for t in texts],
                                                 dtype=torch.float64),
                            "greedy": g, "greedy_chrf": chrf(g, pair["reference"]),
                            "greedy_bleu": sentence_bleu(g, pair["reference"]), "reference": pair["reference"],
                            "source": pair["source"]})
        log(f"{pair['id']} ({pair['split']}): greedy chrF {records[-1]['greedy_chrf']:.1f}, pool mean "
            f"{float(records[-1]['chrf'].mean()):.1f} ({time.time() - t0:.0f}s)")
    dev = [r for r in records if r["split"] == "dev"]
    frr_w = [1.0 if n == "logprob_norm" else 0.0 for n in names]
    weights, dev_obj = tune_reranker_weights([r["features"] for r in dev], [r["chrf"] for r in dev], names,
                                             restarts=30, seed=0)
    dev_frr = reranker_objective([r["features"] for r in dev], [r["chrf"] for r in dev], frr_w)
    dev_frr_rt = reranker_objective([r["features"] for r in dev], [r["chrf"] for r in dev],
                                    [1.0 if n == "round_trip" else 0.0 for n in names])
    log(f"T-RR weights {weights}: dev chrF {dev_obj:.2f} vs F-RR(logprob_norm) {dev_frr:.2f}, "
        f"F-RR(round_trip) {dev_frr_rt:.2f}")
    qe = {"round_trip": round_trip}
    rules = {
        "f-rr (logprob_norm)": QualityAwareDecoding(n=args.n, strategy="f-rr", tokenizer=tok),
        "f-rr (round_trip)": QualityAwareDecoding(n=args.n, strategy="f-rr", features=(), qe_metrics=qe,
                                                  tokenizer=tok),
        "t-rr (tuned)": QualityAwareDecoding(n=args.n, strategy="t-rr", features=("logprob_norm", "logprob"),
                                             qe_metrics=qe, weights=weights, tokenizer=tok),
        "mbr (chrf)": QualityAwareDecoding(n=args.n, strategy="mbr", utility="chrf", tokenizer=tok),
        "mbr (bleu)": QualityAwareDecoding(n=args.n, strategy="mbr", utility="bleu", tokenizer=tok),
        "mbr (chrf, 4 pseudo-refs)": QualityAwareDecoding(n=args.n, strategy="mbr", utility="chrf", tokenizer=tok,
                                                          num_pseudo_references=4, seed=0),
        "t-rr + mbr (chrf)": QualityAwareDecoding(n=args.n, strategy="t-rr+mbr", utility="chrf", tokenizer=tok,
                                                  features=("logprob_norm", "logprob"), qe_metrics=qe,
                                                  weights=weights, shortlist=args.shortlist),
    }
    per_item = []
    for r in records:
        current["source"] = r["source"]
        item = {"id": r["id"], "split": r["split"], "seed": r["seed"], "reference": r["reference"],
                "greedy": r["greedy"], "candidates": r["texts"], "candidate_chrf": r["chrf"].tolist(),
                "features": dict(zip(names, r["features"].T.tolist())),
                "chrf": {"sample (pool mean)": float(r["chrf"].mean()), "greedy": r["greedy_chrf"],
                         "oracle": float(r["chrf"].max())},
                "bleu": {"sample (pool mean)": float(r["bleu"].mean()), "greedy": r["greedy_bleu"],
                         "oracle": float(r["bleu"].max())},
                "picks": {}}
        for name, rule in rules.items():
            idx = rule.rerank(r["pool"]).index
            item["picks"][name] = idx
            item["chrf"][name] = float(r["chrf"][idx])
            item["bleu"][name] = float(r["bleu"][idx])
        per_item.append(item)
    methods = list(per_item[0]["chrf"])
    summary = {}
    for split in ("dev", "test"):
        items = [i for i in per_item if i["split"] == split]
        if not items:
            continue
        summary[split] = {m: {"chrf": spread([i["chrf"][m] for i in items]),
                              "bleu": spread([i["bleu"][m] for i in items])} for m in methods}
        base = [i["chrf"]["sample (pool mean)"] for i in items]
        greedy_c = [i["chrf"]["greedy"] for i in items]
        for m in methods:
            vals = [i["chrf"][m] for i in items]
            summary[split][m]["chrf_minus_sample"] = spread([a - b for a, b in zip(vals, base)])
            summary[split][m]["chrf_minus_greedy"] = spread([a - b for a, b in zip(vals, greedy_c)])
    result = {
        "method": "quality-aware", "paper": "arXiv 2205.00978",
        "settings": {"model": "SmolLM2-135M-Instruct", "limit_per_split": args.limit, "n": args.n, "seeds": args.seeds, "top_p": args.top_p,
                     "temperature": 1.0, "max_new_tokens": args.max_new_tokens, "shortlist": args.shortlist,
                     "prompt": INSTRUCTION, "data": "hf_decoding_ext/data/search/translation_pairs.jsonl",
                     "metric": "sentence chrF (sacrebleu CHRF()) and BLEU of the pick against the reference",
                     "qe_stand_ins": ["logprob_norm", "round_trip back-translation log-prob"],
                     "neural_metrics": "none (COMET, COMET-QE, BLEURT need downloaded checkpoints)"},
        "t_rr": {"weights": weights, "feature_names": names, "dev_objective": dev_obj,
                 "dev_objective_f_rr_logprob_norm": dev_frr, "dev_objective_f_rr_round_trip": dev_frr_rt},
        "summary": summary, "per_item": per_item, "seconds": time.time() - t0,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, ensure_ascii=False))
    print(f"\nT-RR dev objective (chrF): tuned {dev_obj:.2f}, F-RR logprob_norm {dev_frr:.2f}, F-RR round-trip "
          f"{dev_frr_rt:.2f}")
    for split, table in summary.items():
        print(f"\n{split}: chrF / BLEU of the pick (mean +- sem over {table[methods[0]]['chrf']['n']} pools)")
        for m, v in table.items():
            print(f"  {m:28s} chrF {v['chrf']['mean']:6.2f} +- {v['chrf']['sem']:4.2f}   BLEU "
                  f"{v['bleu']['mean']:6.2f}   vs sample {v['chrf_minus_sample']['mean']:+6.2f}   vs greedy "
                  f"{v['chrf_minus_greedy']['mean']:+6.2f}")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
