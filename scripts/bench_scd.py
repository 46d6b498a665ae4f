"""Speed of speculative contrastive decoding (SCD) against plain contrastive decoding on the default model.

    python scripts/bench_scd.py --prompts 6 --max-new-tokens 64 --amateur self:4 --out results

Methods, run at batch size 1, interleaved prompt by prompt (order rotated by prompt index, one warm-up round on the
first prompt excluded from the figures, seed ``seed + prompt_index`` before every run):

* ``cd``: plain contrastive decoding, greedy ``generate()`` with the equivalent
  :class:`~hf_decoding_ext.contrastive.context.ContrastiveContextProcessor` (``scd_scores``, same amateur object)
  -- the baseline;
* ``scd_greedy``: :class:`SpeculativeContrastiveDecoding`, ``do_sample=False`` (should be token-identical to ``cd``);
* ``cd_sample``: the ``cd`` processor with ancestral sampling (T = 1, no truncation), the baseline of
* ``scd_sample``: SCD with ``do_sample=True`` (same settings).

Writes ``<out>/scd_speed.json`` (results header with machine info, settings, per-method figures of
:func:`hf_decoding_ext.bench.speed.summarise` against ``cd``, SCD's expert forwards, mean accepted tokens per step,
acceptance rate, per-run rows) and ``<out>/scd_speed.png``, and prints a summary.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from hf_decoding_ext.bench.plot import _grouped_bars, _plt
from hf_decoding_ext.bench.prompts import load_prompts
from hf_decoding_ext.bench.run import write_json
from hf_decoding_ext.bench.speed import (ANCESTRAL_KWARGS, GREEDY_KWARGS, ForwardCounter, encode_prompt,
                                         eos_token_ids, generate_once, model_device, pad_token_id, result_header,
                                         summarise)
from hf_decoding_ext.contrastive import ContrastiveContextProcessor, SpeculativeContrastiveDecoding, scd_scores
from hf_decoding_ext.core.models import load_model

BASELINE = "cd"
PAIRS = {"scd_greedy": "cd", "scd_sample": "cd_sample"}  # SCD method -> its plain-CD counterpart


def pick_prompts(n: int) -> list[dict]:
    """``n`` packaged prompts, round-robin over the categories (6 = one per category)."""
    rows = load_prompts(per_category=max(1, math.ceil(n / 6)))
    by_cat: dict[str, list[dict]] = {}
    for r in rows:
        by_cat.setdefault(r["category"], []).append(r)
    out = []
    for i in range(max(len(v) for v in by_cat.values())):
        out.extend(v[i] for v in by_cat.values() if i < len(v))
    return out[:n]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=6, help="number of prompts (6 = one per category)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--amateur", default="self:4", help="amateur: 'self:N' or a model name/path")
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--num-tokens", type=int, default=4, help="draft length gamma")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results")
    ap.add_argument("--tag", default="scd_speed")
    args = ap.parse_args(argv)

    model, tokenizer = load_model()
    device = model_device(model)
    # the O'Brien & Lewis form (beta), as the cd baseline below; the SCD default is form="li" (registered CD)
    scd_args = dict(form="obrien", beta=args.beta, alpha=args.alpha, num_tokens=args.num_tokens)
    scd = SpeculativeContrastiveDecoding.for_model(model, tokenizer, amateur=args.amateur, **scd_args)
    amateur = scd.amateur

    def cd_processor():
        return ContrastiveContextProcessor(amateur, share_prompt=True, space="logits",
                                           combine=lambda m, s: scd_scores(m, s, args.beta, args.alpha))

    methods = {
        "cd": lambda: {**GREEDY_KWARGS, "logits_processor": [cd_processor()]},
        "scd_greedy": lambda: {**GREEDY_KWARGS, "custom_generate": scd},
        "cd_sample": lambda: {**ANCESTRAL_KWARGS, "logits_processor": [cd_processor()]},
        "scd_sample": lambda: {**ANCESTRAL_KWARGS, "custom_generate": scd},
    }
    names = list(methods)
    prompts = pick_prompts(args.prompts)
    eos_ids, pad_id = eos_token_ids(model, tokenizer), pad_token_id(model, tokenizer)
    encoded = [encode_prompt(p, tokenizer, device) for p in prompts]

    def run(name: str, enc, seed: int, max_new_tokens: int) -> dict:
        with ForwardCounter(amateur) as am:
            r = generate_once(model, enc, methods[name](), max_new_tokens, seed, eos_ids, pad_id)
        r["amateur_forwards"] = am.count
        if name.startswith("scd"):
            st = scd.last_stats
            r.update(steps=len(st), accepted=sum(s.accepted for s in st), drafted=sum(s.draft_size for s in st))
        return r

    for name in names:  # warm-up, excluded
        run(name, encoded[0], args.seed, min(16, args.max_new_tokens))
    rows = []
    for i, p in enumerate(prompts):
        k = i % len(names)
        results = {}
        for pos, name in enumerate(names[k:] + names[:k]):
            r = run(name, encoded[i], args.seed + i, args.max_new_tokens)
            r.update(prompt_id=p["id"], category=p["category"], method=name, order=pos,
                     prompt_tokens=int(encoded[i]["input_ids"].shape[1]))
            results[name] = r
        for name in names:
            r = results[name]
            r["matches_baseline"] = r["token_ids"] == results[BASELINE]["token_ids"]
            r["matches_counterpart"] = r["token_ids"] == results[PAIRS.get(name, BASELINE)]["token_ids"]
            rows.append(r)
        print(f"[{i + 1}/{len(prompts)}] {p['id']}: " + "  ".join(
            f"{n} {results[n]['tokens_per_s']:.1f} tok/s" for n in names), flush=True)
    for r in rows:
        r.pop("token_ids")

    summary = summarise(rows, BASELINE)
    cats = list(dict.fromkeys(p["category"] for p in prompts))
    for name in names:
        for sel_name, sel in [("overall", rows)] + [(c, [r for r in rows if r["category"] == c]) for c in cats]:
            figs = summary[name]["overall" if sel_name == "overall" else "per_category"]
            figs = figs if sel_name == "overall" else figs.get(sel_name, {})
            mine = [r for r in sel if r["method"] == name]
            figs["amateur_forwards"] = sum(r["amateur_forwards"] for r in mine)
            if name in PAIRS:
                base = {r["prompt_id"]: r for r in sel if r["method"] == PAIRS[name]}
                tok, wall = sum(r["new_tokens"] for r in mine), sum(r["wall_s"] for r in mine)
                btok = sum(base[r["prompt_id"]]["new_tokens"] for r in mine)
                bwall = sum(base[r["prompt_id"]]["wall_s"] for r in mine)
                figs["speed_ratio_vs_counterpart"] = (tok / wall) / (btok / bwall) if wall and btok else None
                steps, acc, drafted = (sum(r[k] for r in mine) for k in ("steps", "accepted", "drafted"))
                figs["expert_forwards"] = figs["forwards"]
                figs["mean_accepted"] = acc / steps if steps else None
                figs["acceptance_rate"] = acc / drafted if drafted else None
                figs["token_identical_to_counterpart"] = (sum(r["matches_counterpart"] for r in mine) / len(mine)
                                                          if mine else None)

    res = {
        **result_header("scd_speed", args.tag, model, None, device),
        "settings": {
            "n_prompts": len(prompts),
            "categories": cats,
            "max_new_tokens": args.max_new_tokens,
            "amateur": args.amateur,
            "form": scd.form,
            "beta": args.beta,
            "alpha": args.alpha,
            "num_tokens": args.num_tokens,
            "bonus": scd.bonus,
            "amateur_temperature": scd.amateur_temperature,
            "seed": args.seed,
            "batch_size": 1,
            "warmup": "one round of every method on the first prompt (16 tokens), excluded",
            "order": "interleaved per prompt, rotated by prompt index",
            "sampling": ANCESTRAL_KWARGS,
            "baseline": "cd = greedy generate() with ContrastiveContextProcessor(amateur, combine=scd_scores)",
            "speed_ratio": "vs cd (greedy); speed_ratio_vs_counterpart: scd_greedy vs cd, scd_sample vs cd_sample",
            "forwards": "expert forwards (forward hook on the expert); amateur_forwards likewise on the amateur",
            "mean_accepted": "accepted draft tokens per SCD step (= per expert forward)",
            "acceptance_rate": "accepted / drafted tokens",
            "token_identical_to_counterpart": "share of prompts whose tokens equal the counterpart's (meaningful "
                                              "for scd_greedy only; sampling runs share the seed, not the draws)",
        },
        "baseline": BASELINE,
        "methods": summary,
        "rows": rows,
    }
    out = Path(args.out)
    write_json(res, out / f"{args.tag}.json")
    plot(res, out / f"{args.tag}.png")

    print(f"{res['model']}, amateur {args.amateur}, {len(prompts)} prompts x {args.max_new_tokens} tokens")
    for name in names:
        o = summary[name]["overall"]
        line = f"{name:11s} {o['tokens_per_s']:7.2f} tok/s  expert fwd {o['forwards']:4d}  " \
               f"tok/fwd {o['tokens_per_forward']:.2f}"
        if name in PAIRS:
            line += (f"  x{o['speed_ratio_vs_counterpart']:.3f} vs {PAIRS[name]}  mean accepted "
                     f"{o['mean_accepted']:.2f}  acceptance {o['acceptance_rate']:.3f}")
            if name == "scd_greedy":
                line += f"  token-identical to cd {o['token_identical_to_counterpart']:.2f}"
        print(line)
    print(f"wrote {out / (args.tag + '.json')} and {out / (args.tag + '.png')}")
    return 0


def plot(res: dict, path: Path) -> Path:
    """Two panels: tokens/s of every method, and SCD's speed ratio vs its plain-CD counterpart."""
    plt = _plt()
    cats = res["settings"]["categories"]
    groups = cats + ["overall"]
    methods = res["methods"]

    def num(x):
        return math.nan if x is None else float(x)

    def series(names, metric):
        return {n: [num(methods[n]["per_category"].get(c, {}).get(metric)) for c in cats]
                + [num(methods[n]["overall"].get(metric))] for n in names}

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.4))
    _grouped_bars(axes[0], groups, series(list(methods), "tokens_per_s"), "tokens/s")
    axes[0].set_title("tokens/s", fontsize=9)
    axes[0].legend(fontsize=7)
    ratio = series(list(PAIRS), "speed_ratio_vs_counterpart")
    _grouped_bars(axes[1], groups, {f"{k} / {v}": ratio[k] for k, v in PAIRS.items()}, "speed ratio")
    axes[1].axhline(1.0, color="black", lw=0.8, ls="--")
    acc = {k: methods[k]["overall"].get("acceptance_rate") for k in PAIRS}
    axes[1].set_title("SCD vs plain CD (overall acceptance: " +
                      ", ".join(f"{k} {v:.2f}" for k, v in acc.items() if v is not None) + ")", fontsize=9)
    axes[1].legend(fontsize=7)
    s = res["settings"]
    fig.suptitle(f"{res['model']}: speculative contrastive decoding, amateur {s['amateur']} "
                 f"({s['n_prompts']} prompts x {s['max_new_tokens']} tokens, {res['machine'].get('device', '')})",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
