"""One figure of the search-and-reranking evaluations (issue 21): reads the committed ``results/<method>_eval.json``
files written by ``scripts/eval_<method>.py`` and draws ``results/search_eval.png``. Quality figures, not timing.

Usage: ``python scripts/plot_search.py [--results results]``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _load(results: Path, name: str) -> dict:
    return json.loads((results / f"{name}_eval.json").read_text())


def _bars(ax, labels, values, errors=None, title="", ylabel="", highlight=()):
    colors = ["tab:orange" if lab in highlight else "tab:blue" for lab in labels]
    ax.bar(range(len(values)), values, yerr=errors, color=colors, capsize=3)
    ax.set_xticks(range(len(values)), labels, rotation=35, ha="right", fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", default="results")
    args = ap.parse_args()
    results = Path(args.results)
    fig, axes = plt.subplots(2, 4, figsize=(17, 8))
    axes = axes.ravel()

    d = _load(results, "diverse_beam_search")["summary"]
    keys = ["beam"] + [k for k in d if k.startswith("dbs-G4-hamming")]
    labels = ["beam"] + [k.split("lambda")[1].join(["λ=", ""]) for k in keys[1:]]
    _bars(axes[0], labels, [d[k]["all"]["distinct_2"]["mean"] for k in keys],
          [d[k]["all"]["distinct_2"]["se"] for k in keys], "diverse-beam-search: distinct-2 of 4 hypotheses",
          "distinct-2 (± SE)", highlight=("λ=0.5",))

    d = _load(results, "lattice")["summary"]
    labels = ["beam", "lattice-none", "lattice-zip"]
    ax = axes[1]
    _bars(ax, [f"{k}\npaths" for k in labels], [d[k]["complete_paths"]["mean"] for k in labels],
          title="lattice: complete paths at 384 model calls", ylabel="paths (log)")
    ax.set_yscale("log")

    d = _load(results, "mbr")["summary"]["instructions"]
    labels = list(d)
    _bars(axes[2], labels, [d[k]["chrf"]["mean"] for k in labels], [d[k]["chrf"]["sem"] for k in labels],
          "mbr: chrF vs reference, 6 instructions", "chrF (± SEM)", highlight=("mbr (judge)",))

    d = _load(results, "quality_aware")["summary"]["test"]
    labels = list(d)
    _bars(axes[3], labels, [d[k]["chrf"]["mean"] for k in labels], [d[k]["chrf"]["sem"] for k in labels],
          "quality-aware: chrF, 6 EN-FR test pairs", "chrF (± SEM)")

    d = _load(results, "infalign")["summary"]["selection"]
    ax = axes[4]
    ns = [1, 2, 4, 8]
    for mode, marker in (("best", "o"), ("worst", "s")):
        ax.plot(ns, [d[f"{mode}-of-{n}"]["win_rate_raw"]["mean"] for n in ns], marker, ls="-", label=f"{mode}, raw")
        ax.plot(ns, [d[f"{mode}-of-{n}"]["win_rate_calibrated"]["mean"] for n in ns], "x", ls="--",
                label=f"{mode}, calibrated")
        ax.plot(ns, [d[f"{mode}-of-{n}"]["continuous_theory"] for n in ns], ":", color="grey")
    ax.set_xscale("log", base=2)
    ax.set_title("infalign: win rate vs a reference sample (dotted: theory)", fontsize=9)
    ax.set_xlabel("N", fontsize=8)
    ax.legend(fontsize=7)

    d = _load(results, "daemon")["summary"]
    metrics = [m for m in ("rep", "div", "coh", "info", "len") if m in d]
    ax = axes[5]
    x = range(len(metrics))
    ax.bar([i - 0.2 for i in x], [1.0 for _ in metrics], width=0.4, label="proposal")
    ax.bar([i + 0.2 for i in x], [d[m]["sir_gap"] / d[m]["proposal_gap"] for m in metrics], width=0.4,
           label="DAEMON (SIR)")
    ax.set_xticks(list(x), metrics, fontsize=8)
    ax.set_title("daemon: gap to human text, relative to the proposal's", fontsize=9)
    ax.legend(fontsize=7)

    d = _load(results, "consensus_game")["multiple_choice"]
    ax = axes[6]
    rankers = ["generator", "discriminator", "ER-G", "ER-D"]
    width = 0.35
    for j, fmt in enumerate(k for k in d if isinstance(d[k], dict) and "paper" in d[k]):
        test = d[fmt]["paper"]["summary"]["test"]
        ax.bar([i + (j - 0.5) * width for i in range(len(rankers))], [test[r]["accuracy"] for r in rankers],
               width=width, label=fmt)
    ax.set_xticks(range(len(rankers)), rankers, fontsize=8)
    ax.set_title("consensus-game: MC accuracy, 22 test questions", fontsize=9)
    ax.legend(fontsize=7)
    axes[7].axis("off")
    axes[7].text(0, 0.5, "SmolLM2-135M-Instruct, fp32, CPU\nsmall runs: 4-24 prompts, pools of 6-8\n"
                 "settings and spread in results/<method>_eval.json", fontsize=9)
    fig.suptitle("Search and reranking I (issue 21): each paper's property on the default model")
    fig.tight_layout()
    out = results / "search_eval.png"
    fig.savefig(out, dpi=110)
    print("wrote", out)


if __name__ == "__main__":
    main()
