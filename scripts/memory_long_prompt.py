"""Peak memory at a long prompt (issue 16): plain greedy against the accelerators, default model, float32, CPU.

    python scripts/memory_long_prompt.py --prompt-tokens 4096 --max-new-tokens 32 --out results

Each configuration runs in a fresh subprocess (so one run's allocations cannot hide another's peak) on the same
prompt: standard-library docstrings concatenated up to ``--prompt-tokens`` tokens, then a summarisation request.
The peak is the process's resident set size sampled every 5 ms during ``generate()`` (``bench.speed.PeakMemory``),
minus the resident size just before it (the model, the prepacked kernels and the drafter's own weights are loaded
before), and the absolute peak against plain greedy's (``absolute_peak_over_greedy``: this counts the prepacked
copy of the weights, which the ``lean`` kernel plan does not hold). Writes ``<out>/memory_long_prompt.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CONFIGS = {
    "greedy": "{}",
    "greedy/fast-kernels": "{'kernels': 'auto'}",
    "prompt-lookup": "generate_kwargs('prompt-lookup', model=model, tokenizer=tokenizer)",
    "token-recycling": "generate_kwargs('token-recycling', model=model, tokenizer=tokenizer)",
    "medusa": "generate_kwargs('medusa', model=model, tokenizer=tokenizer)",
    "greedy/fast-kernels-lean": "{'kernels': 'lean'}",
    "prompt-lookup/lean": "generate_kwargs('prompt-lookup', model=model, tokenizer=tokenizer, engine={'kernels': 'lean'})",
    "token-recycling/lean": "generate_kwargs('token-recycling', model=model, tokenizer=tokenizer, "
                            "engine={'kernels': 'lean'})",
}

CHILD = r'''
import json, sys, time
import psutil, torch
from hf_decoding_ext.bench.speed import PeakMemory
from hf_decoding_ext.core.models import load_model
from hf_decoding_ext.core.resources import read_jsonl
from hf_decoding_ext.plug import fast_generate, generate_kwargs
model, tokenizer = load_model()
docs = " ".join(r["text"] if "text" in r else r.get("doc", "") for r in read_jsonl("stdlib_docs.jsonl"))
ids = tokenizer(docs, add_special_tokens=False).input_ids[:{n}]
text = tokenizer.decode(ids) + "\n\nSummarise the documentation above in three sentences."
enc = tokenizer.apply_chat_template([{{"role": "user", "content": text}}], add_generation_prompt=True,
                                    return_tensors="pt", return_dict=True)
kwargs = {config}
kernels = kwargs.pop("kernels", None)
kwargs.setdefault("do_sample", False)
warm = tokenizer("Hello there.", return_tensors="pt")
fast_generate(model, **warm, max_new_tokens=4, kernels=kernels or "pytorch", **kwargs)
base = psutil.Process().memory_info().rss / 2**20
with PeakMemory(torch.device("cpu")) as mem, torch.inference_mode():
    t = time.perf_counter()
    out = fast_generate(model, **enc, max_new_tokens={m}, kernels=kernels or "pytorch", **kwargs)
    wall = time.perf_counter() - t
print(json.dumps({{"prompt_tokens": int(enc["input_ids"].shape[1]), "rss_before_mb": round(base, 1),
                  "peak_rss_mb": round(mem.peak_mb, 1), "peak_above_before_mb": round(mem.peak_mb - base, 1),
                  "new_tokens": int(out.shape[1] - enc["input_ids"].shape[1]), "seconds": round(wall, 2)}}))
'''


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt-tokens", type=int, default=4096)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS))
    ap.add_argument("--out", default="results")
    ap.add_argument("--repeats", type=int, default=1, help="fresh processes per configuration, interleaved; the "
                    "run with the median absolute peak is reported, with every run's peak beside it")
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot from <out>/memory_long_prompt.json")
    args = ap.parse_args(argv)
    if args.plot_only:
        plot(Path(args.out) / "memory_long_prompt.json")
        return 0
    runs: dict[str, list] = {name: [] for name in args.configs}
    for rep in range(args.repeats):
        for name in args.configs:
            code = CHILD.format(n=args.prompt_tokens, m=args.max_new_tokens, config=CONFIGS[name])
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
            if proc.returncode:
                raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
            runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(rep, name, runs[name][-1], flush=True)
    results = {}
    for name, rs in runs.items():
        ordered = sorted(rs, key=lambda r: r["peak_rss_mb"])
        results[name] = dict(ordered[(len(ordered) - 1) // 2], peak_rss_mb_runs=[r["peak_rss_mb"] for r in rs],
                             rss_before_mb_runs=[r["rss_before_mb"] for r in rs])
    base = results.get("greedy", {}).get("peak_above_before_mb")
    base_abs = results.get("greedy", {}).get("peak_rss_mb")
    for r in results.values():
        r["over_greedy"] = round(r["peak_above_before_mb"] / base, 3) if base else None
        r["absolute_peak_over_greedy"] = round(r["peak_rss_mb"] / base_abs, 3) if base_abs else None
    out = Path(args.out) / "memory_long_prompt.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": vars(args), "measure": "peak RSS during generate() minus RSS before "
                               "it (psutil, 5 ms sampling), fresh process per configuration", "runs": results},
                              indent=1) + "\n")
    plot(out)
    return 0


def plot(path: Path) -> None:
    """Resident memory before ``generate()`` and its peak during it, per configuration
    (``memory_long_prompt.png``); the dashed line is plain greedy's peak + 10%."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = json.loads(path.read_text())["runs"]
    names = list(runs)
    fig, ax = plt.subplots(figsize=(9, 3.8))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [runs[n]["rss_before_mb"] for n in names], width=0.4, label="resident before")
    ax.bar([x + 0.2 for x in xs], [runs[n]["peak_rss_mb"] for n in names], width=0.4, label="peak during generate()")
    for x, n in zip(xs, names):
        peaks = runs[n].get("peak_rss_mb_runs", [])
        if peaks:
            ax.plot([x + 0.2] * len(peaks), peaks, "k.", markersize=4)
    if "greedy" in runs:
        ax.axhline(1.1 * runs["greedy"]["peak_rss_mb"], color="gray", ls="--", lw=1, label="greedy peak + 10%")
    ax.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("MB (RSS)")
    ax.set_title(f"{runs[names[0]]['prompt_tokens']}-token prompt, float32, CPU")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
