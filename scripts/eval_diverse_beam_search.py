"""Diverse Beam Search (arXiv 1610.02424) on the default model: list diversity and quality against beam search.

For the test prompts of ``hf_decoding_ext/data/search/translation_pairs.jsonl`` (English -> French, with references)
and ``instructions.jsonl`` (short instructions with a reference answer), every setting returns a list of B = 4
hypotheses (``num_return_sequences=4``, greedy mode, up to ``--max-new-tokens`` tokens):

* ``beam``: transformers' beam search with 4 beams (run as one DBS group, token-identical, to get the unpenalised
  log-probabilities);
* ``dbs-G4-hamming-lambda{0, 0.2, 0.5, 0.8, 1.5}``: G = B = 4 groups of one beam (the paper's G = B), Hamming diversity;
  lambda = 0 is four copies of greedy;
* ``dbs-G2-hamming-lambda0.5``: 2 groups of 2 beams;
* ``dbs-G4-{cumulative, ngram, embedding}-lambda0.5``: the paper's other diversity terms.

Figures per prompt and setting: distinct-1 / distinct-2 over the 4 generated continuations (up to eos), the
number of distinct continuations, the summed and per-token log-probability of the list (mean, oracle = best, top-1 =
the first returned), and sentence chrF against the reference (sacrebleu; oracle, top-1, mean). The summary gives the
mean over prompts with its standard error, and paired differences against beam search.

Writes ``results/diverse_beam_search_eval.json`` and prints the summary. CPU, about 5-15 minutes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from sacrebleu.metrics import CHRF

from hf_decoding_ext import encode_prompts, load_model
from hf_decoding_ext.core.ngram import distinct_n
from hf_decoding_ext.core.resources import read_jsonl
from hf_decoding_ext.search.diverse_beam_search import DiverseBeamSearch

BEAMS = 4


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def settings():
    out = {"beam": dict(num_beams=BEAMS, num_beam_groups=1, diversity_penalty=0.0)}
    for lam in (0.0, 0.2, 0.5, 0.8, 1.5):
        out[f"dbs-G4-hamming-lambda{lam}"] = dict(num_beams=BEAMS, num_beam_groups=4, diversity_penalty=lam)
    out["dbs-G2-hamming-lambda0.5"] = dict(num_beams=BEAMS, num_beam_groups=2, diversity_penalty=0.5)
    for div in ("cumulative", "ngram", "embedding"):
        out[f"dbs-G4-{div}-lambda0.5"] = dict(num_beams=BEAMS, num_beam_groups=4, diversity_penalty=0.5,
                                              diversity=div)
    return out


def tasks():
    items = []
    for r in read_jsonl("search", "translation_pairs.jsonl"):
        if r["split"] == "test":
            items.append(dict(id=r["id"], task="translation", reference=r["reference"],
                              prompt=f"Translate into French: {r['source']}"))
    for r in read_jsonl("search", "instructions.jsonl"):
        if r["split"] == "test":
            items.append(dict(id=r["id"], task="instruction", reference=r["reference"], prompt=r["instruction"]))
    return items


def mean_se(values):
    values = list(values)
    m = statistics.fmean(values)
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0
    return {"mean": round(m, 4), "se": round(se, 4), "n": len(values)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=6)
    parser.add_argument("--limit", type=int, default=None, help="prompts per task (default: all test prompts)")
    parser.add_argument("--out", default="results/diverse_beam_search_eval.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    model, tok = load_model()
    items = tasks()
    if args.limit:
        items = [x for t in ("translation", "instruction") for x in [i for i in items if i["task"] == t][:args.limit]]
    stop = {tok.eos_token_id, tok.pad_token_id}
    chrf = CHRF()
    per_prompt = {x["id"]: dict(task=x["task"], prompt=x["prompt"], reference=x["reference"], settings={})
                  for x in items}
    conf = settings()
    for name, params in conf.items():
        log(f"{name}")
        loop = DiverseBeamSearch(**params)
        for start in range(0, len(items), args.batch):
            chunk = items[start:start + args.batch]
            inputs = encode_prompts(tok, [x["prompt"] for x in chunk])
            plen = inputs.input_ids.shape[1]
            with torch.no_grad():
                out = model.generate(**inputs, custom_generate=loop, do_sample=False,
                                     max_new_tokens=args.max_new_tokens, num_beams=BEAMS,
                                     num_return_sequences=BEAMS,
                                     pad_token_id=tok.pad_token_id, return_dict_in_generate=True)
            for i, x in enumerate(chunk):
                gens, lps = [], []
                for j in range(BEAMS):
                    seq = out.sequences[i * BEAMS + j, plen:].tolist()
                    cut = next((k for k, t in enumerate(seq) if t in stop), len(seq))
                    gens.append(seq[:cut])
                    lps.append(float(out.sequences_logprobs[i * BEAMS + j]))
                texts = [tok.decode(g, skip_special_tokens=True).strip() for g in gens]
                per_tok = [lp / max(len(g) + (1 if len(g) < args.max_new_tokens else 0), 1)
                           for lp, g in zip(lps, gens)]
                chrfs = [chrf.sentence_score(t, [x["reference"]]).score for t in texts]
                per_prompt[x["id"]]["settings"][name] = dict(
                    texts=texts, groups=out.sequence_groups[i * BEAMS:(i + 1) * BEAMS].tolist(),
                    distinct_1=distinct_n(gens, 1), distinct_2=distinct_n(gens, 2),
                    unique_outputs=len({tuple(g) for g in gens}),
                    logprob_mean=statistics.fmean(lps), logprob_oracle=max(lps), logprob_top1=lps[0],
                    logprob_per_token_mean=statistics.fmean(per_tok), logprob_per_token_top1=per_tok[0],
                    chrf_oracle=max(chrfs), chrf_top1=chrfs[0], chrf_mean=statistics.fmean(chrfs))

    metrics = ("distinct_1", "distinct_2", "unique_outputs", "logprob_mean", "logprob_oracle", "logprob_top1",
               "logprob_per_token_mean", "logprob_per_token_top1", "chrf_oracle", "chrf_top1", "chrf_mean")
    summary = {}
    for name in conf:
        entry = {}
        for task in ("all", "translation", "instruction"):
            rows = [p["settings"][name] for p in per_prompt.values() if task == "all" or p["task"] == task]
            entry[task] = {m: mean_se(r[m] for r in rows) for m in metrics}
            base = [p["settings"]["beam"] for p in per_prompt.values() if task == "all" or p["task"] == task]
            if name != "beam":
                entry[task]["vs_beam"] = {m: mean_se(r[m] - b[m] for r, b in zip(rows, base))
                                          for m in ("distinct_2", "logprob_oracle", "logprob_top1", "chrf_oracle",
                                                    "chrf_top1")}
        summary[name] = entry
    result = dict(
        method="diverse-beam-search", paper="arXiv 1610.02424",
        settings=dict(model="SmolLM2-135M-Instruct (embedded default)", beams=BEAMS,
                      max_new_tokens=args.max_new_tokens, num_return_sequences=BEAMS, do_sample=False,
                      prompts=dict(translation="data/search/translation_pairs.jsonl test split (EN->FR)",
                                   instruction="data/search/instructions.jsonl test split"),
                      configurations=conf, chrf="sacrebleu sentence chrF against the one reference",
                      logprob="summed log-probability of the generated tokens (eos included) without the "
                              "diversity penalty"),
        summary=summary, per_prompt=per_prompt)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(f"{'setting':32s} {'distinct-2':>12s} {'uniq':>5s} {'lp oracle':>10s} {'lp top1':>9s} {'lp mean':>9s} "
          f"{'chrF orc':>9s} {'chrF top1':>9s}")
    for name, entry in summary.items():
        a = entry["all"]
        print(f"{name:32s} {a['distinct_2']['mean']:6.3f}±{a['distinct_2']['se']:.3f} "
              f"{a['unique_outputs']['mean']:5.2f} {a['logprob_oracle']['mean']:10.2f} "
              f"{a['logprob_top1']['mean']:9.2f} {a['logprob_mean']['mean']:9.2f} {a['chrf_oracle']['mean']:9.1f} "
              f"{a['chrf_top1']['mean']:9.1f}")
    log(f"wrote {path}")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
