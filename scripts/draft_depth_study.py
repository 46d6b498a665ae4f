"""Direct Alignment draft: the depth study (cost against acceptance) behind the shipped draft's number of layers.

    python scripts/draft_depth_study.py --layers 2 4 6 8 --steps 40 --out results/direct_alignment/depth_study.json

For each depth ``L`` (the target's first ``L`` layers, :func:`init_draft`):

- cost: the draft's decode-step time relative to the target's (one token with a KV cache of a 128-token context,
  float32, interleaved, median of ``--repeats``), and the draft's parameter share;
- acceptance: held-out expected acceptance ``sum min(p, q)`` at initialisation and after ``--steps`` TVD++ steps
  (the same data, batch, learning rate and warm-up as the shipped run, cosine schedule over ``--steps``);
- the modelled speed-up of chain speculative sampling (Leviathan et al., arXiv 2211.17192, Eq. 1):
  ``(1 - a^(g+1)) / ((1 - a) (g c + 1))`` at the best draft length ``g`` in 1..8, with ``a`` the acceptance and
  ``c`` the cost ratio (an i.i.d.-acceptance model).

Progress goes to ``<work>/depth_study.log``; results to ``--out`` (JSON) and a plot next to it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def step_costs(models: dict, context: torch.Tensor, repeats: int) -> dict:
    """Median seconds of one cached decode step per model, measured interleaved."""
    from transformers import DynamicCache

    caches = {}
    for name, m in models.items():
        cache = DynamicCache(config=m.config)
        with torch.no_grad():
            m(input_ids=context, past_key_values=cache, use_cache=True)
        caches[name] = cache
    n = context.shape[1]
    times = {name: [] for name in models}
    nxt = context[:, -1:]
    for r in range(repeats + 2):
        for name, m in models.items():
            cache = caches[name]
            t0 = time.perf_counter()
            with torch.no_grad():
                m(input_ids=nxt, past_key_values=cache, use_cache=True,
                  position_ids=torch.tensor([[n]]))
            dt = time.perf_counter() - t0
            cache.crop(n - cache.get_seq_length())  # a negative count: drop the step just timed
            if r >= 2:
                times[name].append(dt)
    return {name: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v)} for name, v in times.items()}


def modelled_speedup(a: float, c: float, max_gamma: int = 8) -> tuple[float, int]:
    best = (1.0, 0)
    for g in range(1, max_gamma + 1):
        s = (1 - a ** (g + 1)) / ((1 - a) * (g * c + 1))
        if s > best[0]:
            best = (s, g)
    return best


def verdict(result: dict, steps: int) -> dict:
    """Fill ``best_layers`` and ``verdict`` from the measured depths (also re-applied by ``--verdict-only``)."""
    depths = result["depths"]
    best = max(depths, key=lambda e: (e["modelled_speedup_trained"], -e["layers"]))
    result["best_layers"] = best["layers"]
    shipped = next((e for e in depths if e["layers"] == 4), None)
    figures = ", ".join(f"L={e['layers']}: acceptance {e['trained_acceptance']:.3f}, cost {e['cost_ratio']:.2f}, "
                        f"modelled x{e['modelled_speedup_trained']:.2f}" for e in depths)
    head = f"Depth study ({steps} TVD++ steps per depth; {figures}): "
    if best["modelled_speedup_trained"] <= 1.0 + 1e-9:
        ratio = max(depths, key=lambda e: e["trained_acceptance"] / e["cost_ratio"])
        result["best_layers"] = None
        result["verdict"] = head + (
            "no depth reaches a modelled speed-up above 1 at this training budget (the best draft length is 0 "
            "for every depth), so the study does not pick a depth; acceptance rises with depth more slowly than "
            f"cost (acceptance per unit cost is highest at {ratio['layers']} layers). The shipped draft's 4 layers "
            "were chosen before this study and are not backed by it.")
        return result
    result["verdict"] = head + f"the best modelled trade-off is {best['layers']} layers. " + (
        "The shipped draft's 4 layers are that choice." if best["layers"] == 4 else
        f"The shipped draft uses 4 layers (modelled x{shipped['modelled_speedup_trained']:.2f} against "
        f"x{best['modelled_speedup_trained']:.2f}); it was trained before this study." if shipped else
        "The shipped draft's depth (4) was not in this study.")
    return result


def main(argv=None) -> int:
    from hf_decoding_ext.core.models import cache_dir, load_model
    from hf_decoding_ext.speculative.drafters import direct_alignment as DA
    from hf_decoding_ext.training.data import read_responses

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4, 6, 8])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--responses-from", default="results/direct_alignment")
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", default="results/direct_alignment/depth_study.json")
    ap.add_argument("--verdict-only", action="store_true", help="re-derive the verdict of an existing --out")
    args = ap.parse_args(argv)
    if args.verdict_only:
        result = json.loads(Path(args.out).read_text())
        Path(args.out).write_text(json.dumps(verdict(result, result.get("steps", args.steps)), indent=1))
        print(result["verdict"])
        return 0
    work = Path(args.work) if args.work else cache_dir() / "direct_alignment" / "depth_study"
    work.mkdir(parents=True, exist_ok=True)
    logf = open(work / "depth_study.log", "a")

    def log(msg: str) -> None:
        logf.write(f"{time.strftime('%H:%M:%S')} {msg}\n")
        logf.flush()

    import gzip

    rows = []
    for kind in ("greedy", "sampled"):
        path = work / f"responses-{kind}.jsonl"
        if not path.exists():
            path.write_bytes(gzip.decompress((Path(args.responses_from) / f"responses-{kind}.jsonl.gz").read_bytes()))
        rows += [{**r, "id": f"{r['id']}#{kind}"} for r in read_responses(path) if r["response_ids"]]
    ordered = sorted({r["id"].split("#")[0] for r in rows})
    held_ids = set(ordered[9::10])  # the same split as scripts/train_direct_alignment.py
    train = [r for r in rows if r["id"].split("#")[0] not in held_ids]
    heldout = [r for r in rows if r["id"].split("#")[0] in held_ids and r["id"].endswith("#greedy")]

    model, tok = load_model()
    total = sum(p.numel() for p in model.parameters())
    drafts = {L: DA.init_draft(model, L) for L in args.layers}
    context = torch.tensor([(train[0]["prompt_ids"] + train[0]["response_ids"])[:128]])
    log(f"timing {len(drafts)} drafts and the target, {args.repeats} interleaved repeats")
    costs = step_costs({"target": model, **{f"L{L}": d for L, d in drafts.items()}}, context, args.repeats)
    result = {"target_layers": model.config.num_hidden_layers, "steps": args.steps, "repeats": args.repeats,
              "context_tokens": int(context.shape[1]), "target_step": costs["target"], "depths": []}
    for L, d in drafts.items():
        own = sum(p.numel() for n, p in d.named_parameters() if "layers." in n or n.endswith("norm.weight"))
        shared = sum(p.numel() for p in d.get_output_embeddings().parameters())
        init = DA.evaluate_alignment(d, model, heldout, max_length=args.max_length)
        log(f"L={L}: init held-out acceptance {init['expected_acceptance']:.4f}; training {args.steps} steps")
        trained = DA.train_direct_alignment(
            model, train, work / f"L{L}", num_layers=L, loss="tvd++", steps=args.steps,
            batch_size=args.batch_size, lr=args.lr, max_length=args.max_length, checkpoint_every=args.steps,
            heldout=None, log=log, progress=False)
        ev = DA.evaluate_alignment(trained, model, heldout, max_length=args.max_length)
        c = costs[f"L{L}"]["median_s"] / costs["target"]["median_s"]
        s_init, g_init = modelled_speedup(init["expected_acceptance"], c)
        s, g = modelled_speedup(ev["expected_acceptance"], c)
        entry = {"layers": L, "cost_ratio": c, "step": costs[f"L{L}"], "own_parameters": own,
                 "parameter_share_with_shared_head": (own + shared) / total,
                 "init_acceptance": init["expected_acceptance"], "trained_acceptance": ev["expected_acceptance"],
                 "trained_forward_kl": ev["forward_kl"], "modelled_speedup_init": s_init, "best_gamma_init": g_init,
                 "modelled_speedup_trained": s, "best_gamma_trained": g}
        result["depths"].append(entry)
        log(json.dumps(entry))
        Path(args.out).write_text(json.dumps(result, indent=1))
    verdict(result, args.steps)
    Path(args.out).write_text(json.dumps(result, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
        Ls = [e["layers"] for e in result["depths"]]
        ax[0].plot(Ls, [e["init_acceptance"] for e in result["depths"]], "o-", label="init")
        ax[0].plot(Ls, [e["trained_acceptance"] for e in result["depths"]], "s-", label=f"{args.steps} TVD++ steps")
        ax[0].set_xlabel("draft layers")
        ax[0].set_ylabel("held-out expected acceptance")
        ax[0].legend()
        ax2 = ax[0].twinx()
        ax2.plot(Ls, [e["cost_ratio"] for e in result["depths"]], "k--", label="cost ratio")
        ax2.set_ylabel("draft/target step cost")
        ax[1].plot(Ls, [e["modelled_speedup_trained"] for e in result["depths"]], "s-")
        ax[1].set_xlabel("draft layers")
        ax[1].set_ylabel("modelled speed-up (best draft length)")
        fig.tight_layout()
        fig.savefig(Path(args.out).with_suffix(".png"), dpi=100)
    except ImportError:
        pass
    log(f"done: {result['verdict']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
