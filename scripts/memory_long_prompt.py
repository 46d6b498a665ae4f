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
    args = ap.parse_args(argv)
    results = {}
    for name in args.configs:
        code = CHILD.format(n=args.prompt_tokens, m=args.max_new_tokens, config=CONFIGS[name])
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
        if proc.returncode:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(name, results[name], flush=True)
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
