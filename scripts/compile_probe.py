"""Does ``torch.compile`` of the verification forward pay on this machine? (issue 16, measured both ways)

    python scripts/compile_probe.py --blocks 1 4 8 --dtypes float32 bfloat16 --out results

The engine's verification forward is one target forward of a block of ``k`` tokens (the last accepted token plus the
draft tree) over the KV cache. With static shapes (a ``StaticCache``, a fixed block size per compiled graph: the
bucketing a compiled engine would need) inductor can compile it once per block size. This script times, on the
default model, a ``k``-token forward at a fixed position after a 200-token prompt, for:

* ``eager/pytorch``: PyTorch's kernels, the ``StaticCache`` (stock transformers);
* ``eager/auto``: this library's kernel plan (``core.kernels.fast_kernels``), the same cache;
* ``compiled``: ``torch.compile(model.forward, dynamic=False)`` with inductor's weight freezing on (so its CPU
  linear layers use oneDNN's prepacked weights, as the ``"auto"`` plan does), the same cache, one graph per ``k``.

Each timing is the median of ``--reps`` forwards, the three variants interleaved rep by rep, after a warm-up (and,
for the compiled one, after its compilation, whose seconds are reported separately). Logits of each variant are
compared with the eager PyTorch ones (max abs difference). Writes ``<out>/compile_probe.json``.
The engine does not compile: see the README's "Speed" notes for the verdict drawn from this file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from hf_decoding_ext.bench.speed import machine_info
from hf_decoding_ext.core.kernels import fast_kernels
from hf_decoding_ext.core.models import load_model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, nargs="*", default=[1, 4, 8])
    ap.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", default="results")
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot from <out>/compile_probe.json")
    args = ap.parse_args(argv)
    if args.plot_only:
        plot(Path(args.out) / "compile_probe.json")
        return 0
    from transformers import StaticCache
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    runs = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        model, _ = load_model(dtype=dtype)
        model.eval()
        torch.manual_seed(0)
        prompt = torch.randint(100, 20000, (1, args.context))
        max_len = args.context + max(args.blocks) + 8
        for k in args.blocks:
            cache = StaticCache(config=model.config, max_cache_len=max_len)
            with torch.inference_mode():
                model(prompt, past_key_values=cache, cache_position=torch.arange(args.context), use_cache=True)
            block = torch.randint(100, 20000, (1, k))
            pos = torch.arange(args.context, args.context + k)

            def rewind():  # the static cache counts its own length: every timed forward writes the same slots
                for layer in cache.layers:
                    layer.cumulative_length.fill_(args.context)

            def eager():
                rewind()
                return model(block, past_key_values=cache, cache_position=pos, use_cache=True).logits

            compiled_forward = torch.compile(model.forward, dynamic=False)

            def compiled():
                rewind()
                return compiled_forward(block, past_key_values=cache, cache_position=pos, use_cache=True).logits

            with torch.inference_mode():
                ref = eager().float()
                t0 = time.perf_counter()
                out_c = compiled().float()
                compiled().float()
                compile_s = time.perf_counter() - t0
                with fast_kernels(model, plan="auto"):
                    out_a = eager().float()
                times = {"eager/pytorch": [], "eager/auto": [], "compiled": []}
                for _ in range(args.reps):
                    for name in times:
                        if name == "eager/auto":
                            with fast_kernels(model, plan="auto"):
                                t = time.perf_counter()
                                eager()
                                times[name].append(time.perf_counter() - t)
                        else:
                            fn = eager if name == "eager/pytorch" else compiled
                            t = time.perf_counter()
                            fn()
                            times[name].append(time.perf_counter() - t)
            ms = {n: round(1000 * statistics.median(v), 2) for n, v in times.items()}
            spread = {n: [round(1000 * min(v), 2), round(1000 * max(v), 2)] for n, v in times.items()}
            row = {"dtype": dtype_name, "block": k, "median_ms": ms, "min_max_ms": spread,
                   "compile_s": round(compile_s, 1),
                   "compiled_over_auto": round(ms["eager/auto"] / ms["compiled"], 3),
                   "compiled_over_pytorch": round(ms["eager/pytorch"] / ms["compiled"], 3),
                   "max_abs_logit_diff": {"eager/auto": float((out_a - ref).abs().max()),
                                          "compiled": float((out_c - ref).abs().max())},
                   "same_argmax": {"eager/auto": bool(torch.equal(out_a.argmax(-1), ref.argmax(-1))),
                                   "compiled": bool(torch.equal(out_c.argmax(-1), ref.argmax(-1)))}}
            runs.append(row)
            print(json.dumps(row), flush=True)
            torch._dynamo.reset()
    out = Path(args.out) / "compile_probe.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": vars(args), "machine": machine_info(), "runs": runs,
                               "torch": torch.__version__, "threads": torch.get_num_threads()}, indent=1) + "\n")
    plot(out)
    return 0


def plot(path: Path) -> None:
    """Bar chart of the median forward time per block size, one panel per dtype (``compile_probe.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = json.loads(path.read_text())["runs"]
    dtypes = list(dict.fromkeys(r["dtype"] for r in runs))
    names = ("eager/pytorch", "eager/auto", "compiled")
    fig, axes = plt.subplots(1, len(dtypes), figsize=(5 * len(dtypes), 3.6), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        rows = [r for r in runs if r["dtype"] == dtype]
        for i, name in enumerate(names):
            xs = [j + (i - 1) * 0.27 for j in range(len(rows))]
            ax.bar(xs, [r["median_ms"][name] for r in rows], width=0.27, label=name)
        ax.set_xticks(range(len(rows)), [f"{r['block']} tokens" for r in rows])
        ax.set_ylabel("median ms per forward")
        ax.set_title(f"{dtype}: verification forward, static cache")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
