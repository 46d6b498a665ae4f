"""Wall-clock latency of Adaptive Skeleton Graph Decoding (arXiv 2402.12280) against autoregressive decoding.

Run alone on an idle machine (the lead runs it; it finishes in well under 3 minutes with the defaults). For each of
``--prompts`` test questions of ``hf_decoding_ext/data/search/skeleton_questions.jsonl`` it times, after one warm-up
call, on SmolLM2-135M-Instruct with one CPU thread:

* ``greedy``: plain greedy ``generate()`` of ``--max-answer`` tokens (autoregressive baseline);
* ``sgd``: the whole skeleton graph decoding (skeleton under the JSON schema + dependency waves);
* ``sgd_nodes`` and ``sequential_nodes``: the node phase alone on the skeleton ``sgd`` wrote (fixed), decoded in
  batched waves versus one node at a time (the same prompts): the latency gain of the parallel waves.

Writes ``results/skeleton_graph_speed.json`` (per prompt and mean seconds, forwards, tokens, speed-ups).

Usage: ``python scripts/bench_skeleton_graph.py [--prompts 3] [--threads 1]``
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--max-nodes", type=int, default=3)
    parser.add_argument("--max-node-tokens", type=int, default=24)
    parser.add_argument("--max-answer", type=int, default=72)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="results/skeleton_graph_speed.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from eval_skeleton_graph import load_questions

    from hf_decoding_ext.core.models import encode_prompts, load_model
    from hf_decoding_ext.search.skeleton_graph import SkeletonGraphDecoding

    model, tok = load_model()
    questions = load_questions("test")[: args.prompts]
    common = {"max_nodes": args.max_nodes, "max_node_tokens": args.max_node_tokens}

    def timed(fn):
        start = time.perf_counter()
        with torch.no_grad():
            out = fn()
        return out, time.perf_counter() - start

    warm = encode_prompts(tok, "Name a fruit.")
    timed(lambda: model.generate(**warm, custom_generate=SkeletonGraphDecoding(tok, **common), do_sample=False,
                                 max_new_tokens=8))
    items = []
    for q in questions:
        inputs = encode_prompts(tok, q["question"])
        n_prompt = inputs.input_ids.shape[1]
        greedy, t_greedy = timed(lambda inputs=inputs: model.generate(**inputs, do_sample=False,
                                                                      max_new_tokens=args.max_answer))
        sgd, t_sgd = timed(lambda inputs=inputs: model.generate(
            **inputs, custom_generate=SkeletonGraphDecoding(tok, **common), do_sample=False, max_new_tokens=400,
            return_dict_in_generate=True))
        fixed = [{"summary": n["summary"], "dependency": [d + 1 for d in n["dependency"]],
                  "difficulty": n["difficulty"]} for n in sgd.skeleton]
        runs = {}
        for name, schedule in (("sgd_nodes", "waves"), ("sequential_nodes", "sequential")):
            loop = SkeletonGraphDecoding(tok, skeleton=fixed, schedule=schedule, **common)
            out, t = timed(lambda inputs=inputs, loop=loop: model.generate(
                **inputs, custom_generate=loop, do_sample=False, max_new_tokens=400, return_dict_in_generate=True))
            runs[name] = {"seconds": round(t, 3), "forwards": out.search_stats["model_calls"],
                          "node_forwards": out.search_stats["node_forwards"],
                          "tokens": out.search_stats["generated_tokens"]}
        s = sgd.search_stats
        items.append({"id": q["id"], "greedy": {"seconds": round(t_greedy, 3), "forwards": greedy.shape[1] - n_prompt,
                                                "tokens": greedy.shape[1] - n_prompt},
                      "sgd": {"seconds": round(t_sgd, 3), "forwards": s["model_calls"], "tokens": s["generated_tokens"],
                              "skeleton_tokens": s["skeleton_tokens"], "waves": s["waves"], "width": s["width"]},
                      **runs})
        print(json.dumps(items[-1]), flush=True)

    def mean(key, field="seconds"):
        return round(statistics.mean(r[key][field] for r in items), 3)

    summary = {k: {"seconds": mean(k), "forwards": mean(k, "forwards")}
               for k in ("greedy", "sgd", "sgd_nodes", "sequential_nodes")}
    summary["speedup_sgd_vs_greedy"] = round(summary["greedy"]["seconds"] / summary["sgd"]["seconds"], 3)
    summary["speedup_waves_vs_sequential_nodes"] = round(
        summary["sequential_nodes"]["seconds"] / summary["sgd_nodes"]["seconds"], 3)
    # the speed protocol: one interleaved run, stock greedy and greedy under the fast CPU kernels, the method under
    # both kernels, warm-up on a dev question (not measured), 2 passes with spread; transformers has no built-in
    # skeleton decoding, so plain greedy generate() is the nearest built-in
    from hf_decoding_ext.bench.speed import GREEDY_KWARGS, benchmark_speed

    rows = [{"id": q["id"], "category": "skeleton", "prompt": q["question"]} for q in questions]
    warm_rows = [{"id": q["id"], "category": "skeleton", "prompt": q["question"]} for q in load_questions("dev")[:1]]

    def sgd_kwargs(kernels=None):
        def build():
            kw = {"custom_generate": SkeletonGraphDecoding(tok, **common), **GREEDY_KWARGS}
            if kernels:
                kw["kernels"] = kernels
            return kw
        return build

    methods = {"greedy/fast-kernels": {"kernels": "auto", **GREEDY_KWARGS},
               "skeleton-graph-decoding": sgd_kwargs(), "skeleton-graph-decoding/fast-kernels": sgd_kwargs("auto")}
    protocol = benchmark_speed(model, tok, methods, rows, max_new_tokens=args.max_answer, repeats=2,
                               warmup_prompts=warm_rows, same_kernel="greedy/fast-kernels",
                               tag="skeleton_graph_speed", progress=False)
    for name, m in protocol["methods"].items():
        o = m["overall"]
        print(f"{name:40s} {o['tokens_per_s']:6.1f} tok/s  x{o.get('speed_ratio_same_kernel', float('nan')):.2f} "
              f"same-kernel  x{o.get('speed_ratio', float('nan')):.2f} stock")
    result = {"method": "skeleton-graph-decoding", "model": "SmolLM2-135M-Instruct", "settings": vars(args),
              "protocol": protocol,
              "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads()},
              "summary": summary, "items": items}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
