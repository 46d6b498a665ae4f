"""Ablation of FSPAD's components on the EAGLE-style drafter: plain EAGLE vs EAGLE + FSPAD, same data and budget.

Both arms are trained by the library's pipeline (:func:`hf_decoding_ext.training.pipeline.run_training`) on the
same self-distilled responses (one shared ``--work-dir``, so the base model answers the prompts and its features are
extracted once), with the same steps, batch, learning rate, seed and loss weight. They differ only in FSPAD's two
components (``EagleDrafterConfig.feature_sampling`` and ``partial_alignment``); see
:data:`hf_decoding_ext.speculative.heads.eagle.ABLATION_ARMS`. The figure of merit is the pipeline's held-out
acceptance per depth: top-1 / top-3 share of positions where the drafter's rank-1 (rank <= 3) candidate at depth
``d`` is the base model's greedy token, the drafter rolled on its own features along a correct prefix. No timing is
measured.

The shipped head (``smollm2-135m-instruct-eagle-fspad``) is not touched: the ablation heads go under the work dir.

Usage (the committed figures; about 50 min on 2 CPU cores shared with three other jobs)::

    python scripts/ablate_eagle_fspad.py --prompts 16 --max-new-tokens 64 --gen-batch-size 32 --steps 150 \
        --work-dir /tmp/eagle_ablation --out results/eagle_fspad_ablation.json

The budget is far below the shipped head's (1200 responses of up to 256 tokens, 900 steps): the comparison is
between the two arms at the same small budget, not a reproduction of either paper's figures.

Writes ``results/eagle_fspad_ablation.json`` (after each arm, so a partial run keeps what finished) and a PNG next to
it.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def topk_from_accuracies(accuracies, k: int) -> list[float]:
    """Per-depth top-``k`` acceptance from the pipeline's per-rank accuracies (``accuracies[d][i]``: share of positions
    where the rank-``i`` candidate at depth ``d + 1`` is the base model's token; ranks are disjoint, so they add)."""
    return [round(sum(row[:k]), 4) for row in accuracies]


def expected_accepted(top1: list[float]) -> float:
    """Expected accepted draft length of a single chain under greedy verification, from teacher-forced per-depth
    top-1 (an approximation: depth ``d`` is measured on a correct prefix): sum_d prod_{j<=d} top1_j."""
    total, run = 0.0, 1.0
    for a in top1:
        run *= a
        total += run
    return round(total, 4)


def run_arm(name: str, head_options: dict, args) -> dict:
    from hf_decoding_ext.training.pipeline import run_training

    out = Path(args.work_dir) / "heads" / name
    t0 = time.time()
    head = run_training("eagle", out=str(out), prompts=args.prompts, max_new_tokens=args.max_new_tokens,
                        gen_batch_size=args.gen_batch_size, work_dir=args.work_dir,
                        log_file=str(Path(args.work_dir) / f"{name}.log"), progress=False, recipe="shipped",
                        head_options=head_options, steps=args.steps, batch_size=args.batch_size,
                        checkpoint_every=args.steps + 1)
    acc = head.config.head_accuracies
    training = head.config.training or {}
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line.strip()]
    return {
        "head_options": {k: getattr(head.config, k) for k in
                         ("feature_sampling", "partial_alignment", "fs_expansion", "cls_weight", "feature_noise",
                          "num_draft_tokens")},
        "parameters": sum(p.numel() for n, p in head.named_parameters() if not n.startswith("_")),
        "heldout_top1": topk_from_accuracies(acc, 1),
        "heldout_top3": topk_from_accuracies(acc, 3),
        "expected_accepted_chain": expected_accepted(topk_from_accuracies(acc, 1)),
        "heldout_positions": training.get("heldout_positions"),
        "final_train_loss": log[-1] if log else None,
        "wall_s_not_a_benchmark": round(time.time() - t0, 1),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    styles = {"eagle": ("tab:blue", "plain EAGLE"), "fspad": ("tab:orange", "EAGLE + FSPAD")}
    for name, arm in result["arms"].items():
        color, label = styles.get(name, (None, name))
        depths = range(1, len(arm["heldout_top1"]) + 1)
        ax.plot(depths, arm["heldout_top1"], "-o", color=color, label=f"{label} top-1")
        ax.plot(depths, arm["heldout_top3"], "--s", color=color, label=f"{label} top-3")
    ax.set_xticks(list(depths))
    ax.set_xlabel("draft depth")
    ax.set_ylabel("held-out acceptance (teacher-forced prefix)")
    s = result["setup"]
    ax.set_title(f"FSPAD ablation: {s['steps']} steps, batch {s['batch_size']}, {s['prompts_per_category']} prompts/cat,"
                 f" {s['max_new_tokens']} new tokens", fontsize=9)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    from hf_decoding_ext.speculative.heads.eagle import ABLATION_ARMS
    from hf_decoding_ext.training.pipeline import recipe_options

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=16, help="distillation prompts per category")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--gen-batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--arms", default="fspad,eagle", help=f"comma-separated, of {sorted(ABLATION_ARMS)}")
    p.add_argument("--work-dir", default="/tmp/eagle_ablation")
    p.add_argument("--out", default=str(ROOT / "results" / "eagle_fspad_ablation.json"))
    args = p.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ABLATION_ARMS]
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown}; valid: {sorted(ABLATION_ARMS)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shipped = recipe_options("eagle", "shipped")
    result = {
        "what": "held-out per-depth acceptance of the EAGLE-style drafter with and without FSPAD's components",
        "script": "scripts/ablate_eagle_fspad.py",
        "metric": "share of held-out response positions where the drafter's rank-1 (top-1) / rank<=3 (top-3) "
                  "candidate at depth d equals the base model's greedy token; depth d>1 rolls the drafter on its own "
                  "predicted features along the true prefix (teacher-forced), as the training pipeline evaluates",
        "setup": {"base": "SmolLM2-135M-Instruct", "prompts_per_category": args.prompts,
                  "max_new_tokens": args.max_new_tokens, "steps": args.steps, "batch_size": args.batch_size,
                  "lr": shipped["train"]["lr"], "weight_decay": shipped["train"]["weight_decay"],
                  "draft_vocab_size": 8192, "seed": 0,
                  "shipped_head_budget": {"steps": shipped["train"]["steps"], "batch_size": shipped["train"]["batch_size"],
                                          "sequences": 1200, "max_new_tokens": 256}},
        "arms": {},
    }
    if out.exists():  # keep arms of an earlier partial run with the same setup
        old = json.loads(out.read_text())
        if old.get("setup") == result["setup"]:
            result["arms"] = old.get("arms", {})
    for name in arms:
        if name in result["arms"]:
            continue
        print(f"arm {name}: {ABLATION_ARMS[name]}", flush=True)
        result["arms"][name] = run_arm(name, dict(ABLATION_ARMS[name]), args)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["arms"][name]), flush=True)
    for arm in result["arms"].values():  # derived figures (recomputed on a rerun that skips trained arms)
        n = arm["heldout_positions"]
        arm["heldout_top1_binomial_se"] = [round(math.sqrt(p * (1 - p) / max(1.0, k)), 4)
                                           for p, k in zip(arm["heldout_top1"], n)]
    if {"fspad", "eagle"} <= set(result["arms"]):
        f, e = result["arms"]["fspad"], result["arms"]["eagle"]
        result["fspad_minus_eagle"] = {
            "top1": [round(a - b, 4) for a, b in zip(f["heldout_top1"], e["heldout_top1"])],
            "top3": [round(a - b, 4) for a, b in zip(f["heldout_top3"], e["heldout_top3"])],
            "expected_accepted_chain": round(f["expected_accepted_chain"] - e["expected_accepted_chain"], 4),
            "note": "positive: FSPAD's components raised the figure; heldout_top1_binomial_se treats positions as "
                    "independent (they are not: an underestimate of the noise)",
        }
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
