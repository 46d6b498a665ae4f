"""S2D (arXiv 2407.01955) measured on the default model: the sorted draft's nested sub-models against the same-depth
untrained truncations, the adaptive exit's threshold sweep, and a second target served by the same draft.

Per configuration (all lossless on the speculative engine; identity with plain greedy decoding is checked): acceptance
(accepted / drafted draft tokens), tokens per target forward, draft cost per drafted token (decoder-layer applications,
sub-model heads evaluated, and their sum in layer equivalents: one LM-head evaluation counts as ``head_params /
layer_params`` layers), and draft milliseconds per drafted token. Configurations:

* ``sorted:l``: the sorted draft's sub-model of depth ``l`` alone (fixed depth);
* ``self:l``: the target's own first ``l`` layers, untrained (the same-depth baseline of the brief);
* ``s2d:t``: the adaptive exit over all depths at threshold ``t`` (``t`` above 1: always the deepest);
* ``second/...``: the default S2D configuration and the fixed depths against ``--second-target`` (a fine-tuned
  variant sharing the tokenizer: a LoRA adapter folder of ``hf-decoding-ext finetune`` or a model folder).

Properties written to ``properties``: each sorted sub-model's acceptance above its untrained truncation's; for each
fixed sorted depth, the cheapest adaptive configuration reaching at least its acceptance and the cost ratio; tokens per
target forward above 1. Prompts: the benchmark's interleaved prompts (measurement only, nothing is tuned on them).

Usage (the queue, after the SoFT fine-tune): ``python scripts/eval_s2d.py --adapter /work/distill/finetune/s2d
[--second-target /work/distill/finetune/space]`` -> ``results/s2d_eval.json``. Check with a tiny budget:
``python scripts/eval_s2d.py --allow-untrained --prompts 1 --max-new-tokens 8 --thresholds 0.8,2``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load_variant(path: str, base_loader):
    """A fine-tuned variant of the default model: a LoRA adapter folder written by the fine-tuning entry point (added
    tokens restored first, merged) or a model folder."""
    from hf_decoding_ext.core.models import load_model
    from hf_decoding_ext.training.finetune import (
        ADAPTER_CONFIG,
        add_special_tokens,
        load_lora,
    )

    p = Path(path)
    if (p / ADAPTER_CONFIG).exists():
        model, tok = base_loader()
        added = json.loads((p / ADAPTER_CONFIG).read_text()).get("added_tokens") or {}
        if added:
            add_special_tokens(model, tok, sorted(added, key=added.get))
        return load_lora(model, p, merge=True).eval()
    model, _ = load_model(str(p))
    return model.eval()


def _layer_equivalent(model) -> float:
    from hf_decoding_ext.core.anatomy import decoder_layers, lm_head

    layer = sum(p.numel() for p in decoder_layers(model)[0].parameters())
    return sum(p.numel() for p in lm_head(model).parameters()) / layer


def run_config(model, enc, loop, drafter, ref) -> dict:
    out = model.generate(**enc, max_new_tokens=ref.shape[1] - enc["input_ids"].shape[1], do_sample=False,
                         custom_generate=loop)
    st, ds = loop.last_stats, drafter.last_stats
    return {"identical": bool(torch.equal(out, ref)), "drafted": sum(s.draft_size for s in st),
            "accepted": sum(s.accepted for s in st), "forwards": len(st), "tokens": sum(s.appended for s in st),
            "draft_s": sum(s.draft_time for s in st), "layer_runs": ds["layer_runs"], "exits": ds["exits"],
            "depth_counts": {str(k): v for k, v in ds["depth_counts"].items()}}


def summarise(items: list[dict], head_equiv: float) -> dict:
    tot = {k: sum(r[k] for r in items) for k in ("drafted", "accepted", "forwards", "tokens", "draft_s", "layer_runs",
                                                "exits")}
    d = max(1, tot["drafted"])
    depth_counts: dict = {}
    for r in items:
        for k, v in r["depth_counts"].items():
            depth_counts[k] = depth_counts.get(k, 0) + v
    return {"identical_all": all(r["identical"] for r in items), "acceptance": round(tot["accepted"] / d, 4),
            "tokens_per_forward": round(tot["tokens"] / max(1, tot["forwards"]), 4),
            "layers_per_draft_token": round(tot["layer_runs"] / d, 3),
            "exits_per_draft_token": round(tot["exits"] / d, 3),
            "cost_layer_equiv_per_draft_token": round((tot["layer_runs"] + head_equiv * tot["exits"]) / d, 3),
            "draft_ms_per_draft_token": round(1000 * tot["draft_s"] / d, 3), "depth_counts": depth_counts, **tot}


def plot(result: dict, path: Path) -> None:
    """Acceptance and draft cost (layer equivalents per drafted token) of every configuration against the default
    target: sorted fixed depths next to their untrained truncations, then the adaptive exit's threshold sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = {k: v for k, v in result["summary"].items() if not k.startswith("second/")}
    names = sorted((k for k in summ if not k.startswith("s2d:")), key=lambda k: (int(k.split(":")[1]), k))
    names += [k for k in summ if k.startswith("s2d:")]
    colours = ["grey" if k.startswith("self:") else "tab:blue" if k.startswith("sorted:") else "tab:orange"
               for k in names]
    fig, ax = plt.subplots(1, 2, figsize=(12, 3.8))
    ax[0].bar(names, [summ[k]["acceptance"] for k in names], color=colours)
    ax[0].set_title("acceptance (accepted / drafted)")
    ax[1].bar(names, [summ[k]["cost_layer_equiv_per_draft_token"] for k in names], color=colours)
    ax[1].set_title("draft cost per drafted token (layer equivalents)")
    for a in ax:
        a.tick_params(axis="x", rotation=60, labelsize=8)
    fig.suptitle(f"S2D on SmolLM2-135M: {result['prompts']} prompts x {result['max_new_tokens']} tokens "
                 "(grey: untrained truncation, blue: sorted sub-model, orange: adaptive exit at threshold)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapter", default=None, help="SoFT adapter folder (default: the shipped one)")
    ap.add_argument("--allow-untrained", action="store_true",
                    help="without an adapter, use the untrained truncation as the 'sorted' draft (script check)")
    ap.add_argument("--depths", default="6,9,12")
    ap.add_argument("--thresholds", default="0,0.5,0.7,0.8,0.9,0.95,2")
    ap.add_argument("--num-tokens", type=int, default=5)
    ap.add_argument("--default-threshold", type=float, default=0.8)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--second-target", default=None)
    ap.add_argument("--out", default=str(ROOT / "results" / "s2d_eval.json"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    from hf_decoding_ext.bench.prompts import interleaved_prompts
    from hf_decoding_ext.core.models import encode_prompts, load_model
    from hf_decoding_ext.speculative import SpeculativeDecoding
    from hf_decoding_ext.speculative.s2d import (
        S2DDrafter,
        build_sorted_draft,
        shipped_s2d_path,
    )

    depths = tuple(int(x) for x in args.depths.split(","))
    thresholds = [float(x) for x in args.thresholds.split(",")]
    model, tok = load_model()
    model.eval()
    adapter = args.adapter
    if adapter is None and (shipped_s2d_path() / "adapter.safetensors").exists():
        adapter = str(shipped_s2d_path())
    if adapter is None and not args.allow_untrained:
        raise SystemExit("no SoFT adapter: pass --adapter (or --allow-untrained to check the script)")
    draft = build_sorted_draft(model, depths, adapter)
    head_equiv = _layer_equivalent(model)
    configs = {}
    for d in depths:
        configs[f"sorted:{d}"] = S2DDrafter(draft, depths=(d,), num_tokens=args.num_tokens)
        configs[f"self:{d}"] = S2DDrafter("self", depths=(d,), num_tokens=args.num_tokens)
    for t in thresholds:
        configs[f"s2d:{t:g}"] = S2DDrafter(draft, depths=depths, threshold=t, num_tokens=args.num_tokens)
    targets = {"default": model}
    if args.second_target:
        targets["second"] = load_variant(args.second_target, load_model)
    second_keys = [f"s2d:{args.default_threshold:g}"] + [f"sorted:{d}" for d in depths]
    for key in second_keys:
        if key not in configs:
            configs[key] = S2DDrafter(draft, depths=depths, threshold=args.default_threshold,
                                      num_tokens=args.num_tokens)
    loops = {k: SpeculativeDecoding(d) for k, d in configs.items()}
    rows = interleaved_prompts(args.prompts)
    per: dict = {}
    t_start = time.time()
    with torch.inference_mode():
        for row in rows:
            enc = encode_prompts(tok, row["prompt"])
            for tname, tmodel in targets.items():
                ref = tmodel.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False)
                keys = list(configs) if tname == "default" else second_keys
                for key in keys:
                    name = key if tname == "default" else f"second/{key}"
                    per.setdefault(name, []).append({"prompt": row["id"], **run_config(
                        tmodel, enc, loops[key], configs[key], ref)})
            print(f"{row['id']}: " + ", ".join(f"{k} {v[-1]['accepted']}/{v[-1]['drafted']}" for k, v in per.items()),
                  flush=True)
    summary = {k: summarise(v, head_equiv) for k, v in per.items()}
    props: dict = {"sorted_above_untrained": {}, "adaptive_cost_at_equal_acceptance": {}}
    for d in depths:
        s, u = summary[f"sorted:{d}"], summary[f"self:{d}"]
        props["sorted_above_untrained"][str(d)] = {"sorted": s["acceptance"], "untrained": u["acceptance"],
                                                   "holds": s["acceptance"] > u["acceptance"]}
        fixed = summary[f"sorted:{d}"]
        reach = [(v["cost_layer_equiv_per_draft_token"], k) for k, v in summary.items()
                 if k.startswith("s2d:") and v["acceptance"] >= fixed["acceptance"]]
        best = min(reach) if reach else None
        props["adaptive_cost_at_equal_acceptance"][str(d)] = {
            "fixed_acceptance": fixed["acceptance"], "fixed_cost": fixed["cost_layer_equiv_per_draft_token"],
            "adaptive": best[1] if best else None, "adaptive_cost": best[0] if best else None,
            "adaptive_acceptance": summary[best[1]]["acceptance"] if best else None,
            "cost_ratio": round(best[0] / fixed["cost_layer_equiv_per_draft_token"], 4) if best else None}
    default_key = f"s2d:{args.default_threshold:g}"
    props["tokens_per_forward_above_1"] = {k: summary[k]["tokens_per_forward"] > 1
                                           for k in summary if k.endswith(default_key)}
    props["lossless"] = all(v["identical_all"] for v in summary.values())
    result = {"method": "s2d", "arxiv": "2407.01955", "adapter": adapter, "depths": list(depths),
              "num_tokens": args.num_tokens, "thresholds": thresholds, "default_threshold": args.default_threshold,
              "second_target": args.second_target, "prompts": len(rows), "max_new_tokens": args.max_new_tokens,
              "head_layer_equivalent": round(head_equiv, 3), "threads": torch.get_num_threads(),
              "seconds": round(time.time() - t_start, 1), "properties": props, "summary": summary, "per_prompt": per}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out.with_suffix(".png"))
    print(json.dumps(props, indent=1))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
