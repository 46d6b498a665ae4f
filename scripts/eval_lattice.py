"""Lattice decoding (arXiv 2112.07660) on the default model: what one lattice encodes at beam search's budget.

For the test prompts of ``hf_decoding_ext/data/search/translation_pairs.jsonl`` (English -> French) and
``instructions.jsonl``, with up to ``--max-new-tokens`` new tokens (greedy mode):

* ``beam``: transformers' beam search, ``num_beams=16, num_return_sequences=16`` (the paper's beam size); its model
  calls are counted exactly with a forward hook (rows of every forward, the prompt forward of the 16 beams included);
* ``lattice-zip``: :class:`~hf_decoding_ext.search.lattice.LatticeDecoding` with the README defaults (``ngram_suffix
  4, avg_score 0.75, merge zip``, top-5 alternatives, greedy completion) and a budget of exactly beam search's model
  calls for that prompt;
* ``lattice-none``: the same best-first search without recombination (the README's ``astar_baseline``), same budget.

Figures per prompt and setting: model calls; complete hypotheses (the number of distinct complete paths of the
lattice, counted exactly, within ``max_new_tokens`` tokens and in all; for beam search the distinct returned
sequences); unique 4-grams over all complete paths (beam: over the 16 returned sequences, up to eos); lattice size
(nodes, edges, recombinations); quality of the 16 best paths (the lattice's k-best by length-normalised
log-probability, rescored exactly by the model because recombined edges carry the log-probability of another prefix)
against beam search's 16: mean per-token log-probability, and sentence chrF against the reference (sacrebleu; oracle
and mean over the list). Summary: mean, standard error, min and max over prompts, and ratios lattice / beam.

Writes ``results/lattice_eval.json`` (after every prompt) and prints the summary. Defaults: 2 prompts per task, 24
new tokens; CPU: about 5-8 minutes per prompt on a busy 2-core machine (the lattice's model calls are sequential).
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
from sacrebleu.metrics import CHRF

from hf_decoding_ext import encode_prompts, load_model
from hf_decoding_ext.core.resources import read_jsonl
from hf_decoding_ext.search.lattice import LatticeDecoding

BEAMS = 16


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def tasks(limit):
    items = []
    rows = [r for r in read_jsonl("search", "translation_pairs.jsonl") if r["split"] == "test"][:limit]
    for r in rows:
        items.append({"id": r["id"], "task": "translation", "reference": r["reference"],
                          "prompt": f"Translate into French: {r['source']}"})
    rows = [r for r in read_jsonl("search", "instructions.jsonl") if r["split"] == "test"][:limit]
    for r in rows:
        items.append({"id": r["id"], "task": "instruction", "reference": r["reference"], "prompt": r["instruction"]})
    return items


def stats(values):
    values = [float(v) for v in values]
    m = statistics.fmean(values)
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0
    return {"mean": round(m, 4), "se": round(se, 4), "min": round(min(values), 4), "max": round(max(values), 4),
            "n": len(values)}


def cut_at_eos(tokens, eos):
    for j, t in enumerate(tokens):
        if t in eos:
            return tuple(tokens[:j + 1])
    return tuple(tokens)


def ngrams(seqs, n=4):
    return {s[i:i + n] for s in seqs for i in range(len(s) - n + 1)}


@torch.no_grad()
def per_token_logprob(model, prompt_ids, seqs):
    """Exact mean per-token log-probability of each continuation under the model (one batched forward)."""
    out = []
    for s in seqs:
        ids = torch.cat([prompt_ids, torch.tensor([list(s)], dtype=torch.long)], dim=1)
        logp = torch.log_softmax(model(ids).logits[0, prompt_ids.shape[1] - 1:-1].float(), dim=-1)
        out.append(float(logp.gather(1, torch.tensor(list(s))[:, None]).mean()))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--limit", type=int, default=2, help="prompts per task (default 2: 4 prompts)")
    parser.add_argument("--merges", default="zip,none", help="lattice settings to run (zip, imp, none)")
    parser.add_argument("--out", default="results/lattice_eval.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model, tok = load_model()
    chrf = CHRF()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    merges = [m.strip() for m in args.merges.split(",") if m.strip()]
    items = tasks(args.limit)
    per_prompt = []
    for item in items:
        inputs = encode_prompts(tok, item["prompt"])
        plen = inputs.input_ids.shape[1]
        rows = []
        handle = model.register_forward_pre_hook(lambda mod, a, kw, rows=rows: rows.append(kw["input_ids"].shape[0]),
                                                 with_kwargs=True)
        try:
            beam = model.generate(**inputs, num_beams=BEAMS, num_return_sequences=BEAMS,
                                  max_new_tokens=args.max_new_tokens, do_sample=False, early_stopping=False)
        finally:
            handle.remove()
        calls = sum(rows)
        beam_seqs = [cut_at_eos(s, eos) for s in beam[:, plen:].tolist()]
        record = {"id": item["id"], "task": item["task"], "prompt": item["prompt"], "reference": item["reference"]}

        def quality(seqs, inputs=inputs, item=item):
            texts = [tok.decode(list(s), skip_special_tokens=True).strip() for s in seqs]
            lp = per_token_logprob(model, inputs.input_ids, seqs)
            scores = [chrf.sentence_score(t, [item["reference"]]).score for t in texts]
            return {"mean_token_logprob": statistics.fmean(lp), "best_token_logprob": max(lp),
                    "chrf_oracle": max(scores), "chrf_mean": statistics.fmean(scores), "top1": texts[0]}

        record["beam"] = {"model_calls": calls, "forwards": len(rows), "complete_paths": len(set(beam_seqs)),
                          "unique_4grams": len(ngrams(set(beam_seqs))), **quality(beam_seqs)}
        log(f"{item['id']}: beam calls={calls} distinct={len(set(beam_seqs))} "
            f"4grams={record['beam']['unique_4grams']}")
        for merge in merges:
            loop = LatticeDecoding(budget=calls, merge=merge, tokenizer=tok, num_hypotheses=BEAMS)
            start = time.time()
            out = model.generate(**inputs, custom_generate=loop, max_new_tokens=args.max_new_tokens,
                                 do_sample=False, return_dict_in_generate=True)
            lat = out.lattices[0]
            hyps = [h.tokens for h in out.hypotheses[0]]
            record[f"lattice-{merge}"] = {
                "model_calls": out.model_calls[0], "forwards": out.forwards,
                "complete_paths": lat.count_paths(max_length=args.max_new_tokens),
                "complete_paths_any_length": lat.count_paths(),
                "unique_4grams": len(lat.ngrams(4)), "nodes": lat.num_nodes, "edges": lat.num_edges,
                "ends": len(lat.ends), "recombinations": len(lat.merges),
                "completed_hypotheses": len(out.completed[0]), **quality(hyps),
                "seconds": round(time.time() - start, 1)}
            r = record[f"lattice-{merge}"]
            log(f"{item['id']}: lattice-{merge} calls={r['model_calls']} paths={r['complete_paths']} "
                f"4grams={r['unique_4grams']} merges={r['recombinations']} ({r['seconds']} s)")
        per_prompt.append(record)
        write(args, items, merges, per_prompt)
    print(json.dumps(write(args, items, merges, per_prompt), indent=1))
    return 0


def write(args, items, merges, per_prompt):
    """Write the results so far (after every prompt) and return the summary."""
    summary = {}
    settings = ["beam"] + [f"lattice-{m}" for m in merges]
    keys = ["model_calls", "complete_paths", "unique_4grams", "mean_token_logprob", "best_token_logprob",
            "chrf_oracle", "chrf_mean"]
    for s in settings:
        summary[s] = {k: stats(r[s][k] for r in per_prompt) for k in keys}
    for s in settings[1:]:
        summary[f"{s} / beam"] = {
            "complete_paths_ratio": stats(r[s]["complete_paths"] / r["beam"]["complete_paths"] for r in per_prompt),
            "unique_4grams_ratio": stats(r[s]["unique_4grams"] / r["beam"]["unique_4grams"] for r in per_prompt),
            "log10_complete_paths": stats(math.log10(max(1, r[s]["complete_paths"]))
                                          for r in per_prompt)}
    result = {
        "method": "lattice", "paper": "Massive-scale Decoding for Text Generation using Lattices (arXiv 2112.07660)",
        "settings": {"model": "SmolLM2-135M-Instruct", "beams": BEAMS, "max_new_tokens": args.max_new_tokens,
                     "lattice": {"ngram_suffix": 4, "avg_score": 0.75, "k_best": 5, "len_diff": 5,
                                 "budget": "beam search's model calls for the prompt (rows of every forward)"},
                     "prompts": [i["id"] for i in items], "merges": merges,
                     "completed_prompts": len(per_prompt)},
        "per_prompt": per_prompt, "summary": summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, ensure_ascii=False))
    return summary


if __name__ == "__main__":
    sys.exit(main())
