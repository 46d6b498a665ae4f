"""Cost of a verification forward over n new tokens relative to a 1-token forward, with PyTorch's linear kernel
layout, the older weight-left layout and the automatic kernel plan the engine uses (``fast_kernels``,
:mod:`hf_decoding_ext.core.kernels`), interleaved.

    python scripts/verify_cost.py --out results

Writes ``<out>/<tag>.json`` and ``.png`` (default ``verify_cost_plan``): per n, the median forward time (cached prefix of ``--context``
tokens) for each layout, the ratio to the 1-token forward with PyTorch's kernels (plain greedy decoding) and, for the
automatic plan, the ratio to its own 1-token forward (``auto_own_ratio``: the curve ``max_nodes="auto"`` sizes trees
with, as :func:`~hf_decoding_ext.speculative.policies.tuning.device_curve` measures it at first use).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from hf_decoding_ext.core.models import DEFAULT_MODEL, load_model
from hf_decoding_ext.core.kernels import fast_kernels, small_batch_linear


LAYOUTS = ("pytorch", "weight_left", "auto")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1,2,3,4,5,6,8,10,12,16,20,24,32")
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--out", default="results")
    ap.add_argument("--tag", default="verify_cost_plan",
                    help="output name (results/verify_cost.json, the older two-layout run, is the packaged fallback "
                         "curve's source)")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    model, _ = load_model()
    model.eval()
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randint(100, 20000, (1, args.context), generator=gen)
    times: dict[str, dict[int, list[float]]] = {layout: {n: [] for n in sizes} for layout in LAYOUTS}
    with torch.inference_mode():
        cache = model(input_ids=prefix, use_cache=True).past_key_values
        for rep in tqdm(range(args.reps + 1), desc="rounds"):  # round 0 warms up, not recorded
            for n in sizes:
                ids = torch.randint(100, 20000, (1, n), generator=gen)
                pos = torch.arange(args.context, args.context + n)[None]
                mask = torch.zeros(1, 1, n, args.context + n)
                mask[0, 0, :, args.context:] = torch.triu(torch.full((n, n), torch.finfo(torch.float32).min), 1)
                for layout in LAYOUTS:
                    ctx = (fast_kernels(model) if layout == "auto"
                           else small_batch_linear(model, enabled=layout == "weight_left"))
                    with ctx:
                        t = time.perf_counter()
                        model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                              use_cache=True, logits_to_keep=n)
                        if rep:
                            times[layout][n].append(time.perf_counter() - t)
                    cache.crop(-n)
    base = statistics.median(times["pytorch"][1])
    rows = []
    for n in sizes:
        row = {"tokens": n}
        for layout in times:
            med = statistics.median(times[layout][n])
            row[f"{layout}_ms"] = round(1000 * med, 2)
            row[f"{layout}_ratio"] = round(med / base, 3)
        row["auto_own_ratio"] = round(statistics.median(times["auto"][n]) / statistics.median(times["auto"][1]), 3)
        rows.append(row)
        print(f"n={n:3d}  pytorch {row['pytorch_ms']:7.1f} ms (x{row['pytorch_ratio']:.2f})  "
              f"weight-left {row['weight_left_ms']:7.1f} ms (x{row['weight_left_ratio']:.2f})  "
              f"auto {row['auto_ms']:7.1f} ms (x{row['auto_ratio']:.2f}, own x{row['auto_own_ratio']:.2f})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"model": DEFAULT_MODEL, "dtype": "float32", "context": args.context, "reps": args.reps,
              "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
              "processor": platform.processor(), "cost": rows}
    (out / f"{args.tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for layout, label in (("pytorch", "PyTorch linear (x @ W.T)"), ("weight_left", "weight-left (W @ x.T)"),
                          ("auto", "automatic kernel plan (fast_kernels)")):
        ax.plot(sizes, [r[f"{layout}_ratio"] for r in rows], marker="o", label=label)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("tokens in the forward")
    ax.set_ylabel("time / 1-token forward")
    ax.set_title(f"{DEFAULT_MODEL}, fp32 CPU, {torch.get_num_threads()} threads")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"{args.tag}.png", dpi=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
