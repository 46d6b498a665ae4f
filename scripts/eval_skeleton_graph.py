"""Real-model evaluation of Adaptive Skeleton Graph Decoding (arXiv 2402.12280) on SmolLM2-135M-Instruct.

For each test question of ``hf_decoding_ext/data/search/skeleton_questions.jsonl`` (multi-point questions written for
the repository; the dev split was only used to look at skeleton prompts) it runs:

* ``greedy``: plain greedy decoding of the answer (the autoregressive baseline), ``--max-answer`` tokens;
* ``sgd``: skeleton graph decoding (JSON-schema skeleton, dependency waves, information forwarding);
* on the *same* skeleton (fixed, no second skeleton): ``sequential`` (the same node prompts decoded one node at a
  time: the sequential baseline of the forward counts, whose answers should equal ``sgd``'s), ``sot``
  (Skeleton-of-Thought: every node in one wave, no parents' answers) and ``sgd_routed`` (easy nodes, difficulty 1,
  on ``truncated_model(model, --small-layers)``, a layer-truncated view of the same model, not a genuine small model).

Latency is measured as counts of model forwards (sequential steps), not wall-clock (``scripts/bench_skeleton_graph.py``
times it). Quality: key-point recall (the fraction of a question's reference points whose words occur in the answer)
and ROUGE-L F1 against a one-sentence reference. Writes ``results/skeleton_graph_eval.json``.

Usage: ``python scripts/eval_skeleton_graph.py [--limit 8]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def load_questions(split: str):
    from hf_decoding_ext.core.resources import read_jsonl

    return [r for r in read_jsonl("search", "skeleton_questions.jsonl") if r["split"] == split]


def key_point_recall(text: str, points) -> float:
    low = text.lower()
    return sum(any(w in low for w in alts) for alts in points) / len(points)


def rouge_l(text: str, reference: str) -> float:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"]).score(reference, text)["rougeL"].fmeasure


def spread(values):
    values = list(values)
    return {"mean": round(statistics.mean(values), 4), "std": round(statistics.pstdev(values), 4),
            "min": round(min(values), 4), "max": round(max(values), 4)}


def end_to_end_forwards(record, method):
    """Forwards of a method with the skeleton counted: the variants run on the sgd run's skeleton, so they get its
    skeleton forwards (less the prompt prefill, which both count)."""
    calls = record[method]["model_calls"]
    return calls + record["sgd"]["skeleton_forwards"] - 1 if method in ("sequential", "sot", "sgd_routed") else calls


def plot_series(items, methods):
    """x: mean forwards (sequential model calls, skeleton included), y: mean key-point recall, per method."""
    return {m: {"x_model_calls": round(statistics.mean(end_to_end_forwards(r, m) for r in items), 3),
                "y_key_point_recall": round(statistics.mean(r[m]["key_point_recall"] for r in items), 4),
                "y_rougeL": round(statistics.mean(r[m]["rougeL"] for r in items), 4)} for m in methods}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--max-nodes", type=int, default=3)
    parser.add_argument("--max-node-tokens", type=int, default=24)
    parser.add_argument("--max-skeleton-tokens", type=int, default=120)
    parser.add_argument("--max-answer", type=int, default=72, help="greedy baseline's max_new_tokens")
    parser.add_argument("--small-layers", type=int, default=20)
    parser.add_argument("--out", default="results/skeleton_graph_eval.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from hf_decoding_ext.core.models import encode_prompts, load_model, truncated_model
    from hf_decoding_ext.search.skeleton_graph import SkeletonGraphDecoding

    model, tok = load_model()
    small = truncated_model(model, args.small_layers)
    questions = load_questions(args.split)[: args.limit]
    common = {"max_nodes": args.max_nodes, "max_node_tokens": args.max_node_tokens,
              "max_skeleton_tokens": args.max_skeleton_tokens}
    items = []
    start = time.time()
    for q in questions:
        inputs = encode_prompts(tok, q["question"])
        n_prompt = inputs.input_ids.shape[1]
        record = {"id": q["id"], "question": q["question"]}

        def finish(name, out, stats, q=q, record=record, n_prompt=n_prompt):
            text = tok.decode(out[0, n_prompt:], skip_special_tokens=True)
            record[name] = {"text": text, "key_point_recall": key_point_recall(text, q["key_points"]),
                            "rougeL": round(rouge_l(text, q["reference"]), 4), **stats}

        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=args.max_answer)
        n_new = out.shape[1] - n_prompt
        finish("greedy", out, {"model_calls": n_new, "sequential_forwards": n_new, "generated_tokens": n_new})

        sgd = model.generate(**inputs, custom_generate=SkeletonGraphDecoding(tok, **common), do_sample=False,
                             max_new_tokens=400, return_dict_in_generate=True)
        s = sgd.search_stats
        finish("sgd", sgd.sequences, {**{k: s[k] for k in ("model_calls", "generated_tokens", "skeleton_tokens",
                                                             "skeleton_forwards", "node_forwards",
                                                             "sequential_node_forwards", "waves", "width",
                                                             "nodes", "skeleton_valid")}})
        record["skeleton"] = sgd.skeleton_text
        fixed = [{"summary": n["summary"], "dependency": [d + 1 for d in n["dependency"]],
                  "difficulty": n["difficulty"]} for n in sgd.skeleton]
        variants = {"sequential": {"schedule": "sequential"}, "sot": {"ignore_dependencies": True},
                    "sgd_routed": {"small_model": small, "difficulty_threshold": 1}}
        for name, extra in variants.items():
            loop = SkeletonGraphDecoding(tok, skeleton=fixed, **common, **extra)
            o = model.generate(**inputs, custom_generate=loop, do_sample=False, max_new_tokens=400,
                               return_dict_in_generate=True)
            st = o.search_stats
            finish(name, o.sequences, {k: st[k] for k in ("model_calls", "node_forwards", "sequential_node_forwards",
                                                         "forwards_large", "forwards_small", "tokens_large",
                                                         "tokens_small", "waves", "width")})
            # the node phase alone (the skeleton is shared), plus the skeleton forwards of the sgd run
            record[name]["node_forwards_plus_skeleton"] = st["node_forwards"] + s["skeleton_forwards"]
        record["sequential_equals_sgd"] = record["sequential"]["text"] == record["sgd"]["text"]
        items.append(record)
        print(f"[{time.time() - start:6.0f}s] {q['id']} nodes={s['nodes']} waves={s['waves']} "
              f"node_fw={s['node_forwards']} seq_fw={s['sequential_node_forwards']} skel={s['skeleton_tokens']} "
              f"greedy_fw={record['greedy']['model_calls']} kp sgd={record['sgd']['key_point_recall']:.2f} "
              f"greedy={record['greedy']['key_point_recall']:.2f} sot={record['sot']['key_point_recall']:.2f}",
              flush=True)

    methods = ("greedy", "sgd", "sequential", "sot", "sgd_routed")
    summary = {m: {"key_point_recall": spread(r[m]["key_point_recall"] for r in items),
                   "rougeL": spread(r[m]["rougeL"] for r in items),
                   "model_calls": spread(r[m]["model_calls"] for r in items)} for m in methods}
    node_speedup = [r["sgd"]["sequential_node_forwards"] / r["sgd"]["node_forwards"] for r in items]
    e2e = [r["greedy"]["model_calls"] / r["sgd"]["model_calls"] for r in items]
    summary["node_phase_forward_speedup_vs_sequential_nodes"] = spread(node_speedup)
    summary["end_to_end_forward_ratio_greedy_over_sgd"] = spread(e2e)
    summary["skeleton_tokens"] = spread(r["sgd"]["skeleton_tokens"] for r in items)
    summary["waves"] = spread(r["sgd"]["waves"] for r in items)
    summary["width"] = spread(r["sgd"]["width"] for r in items)
    summary["sequential_equals_sgd"] = sum(r["sequential_equals_sgd"] for r in items)
    summary["small_forward_fraction_routed"] = spread(
        r["sgd_routed"]["forwards_small"] / max(1, r["sgd_routed"]["forwards_small"] + r["sgd_routed"]["forwards_large"])
        for r in items)
    summary["skeleton_valid"] = f"{sum(r['sgd']['skeleton_valid'] for r in items)}/{len(items)}"
    result = {"method": "skeleton-graph-decoding", "model": "SmolLM2-135M-Instruct", "split": args.split,
              "settings": vars(args), "n": len(items), "seconds": round(time.time() - start, 1),
              "summary": summary, "items": items,
              "plot_series": plot_series(items, methods)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
