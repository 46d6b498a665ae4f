"""Plot the step-search evaluations of issue 22 (quality against compute) into ``results/step_search_eval.png``.

Reads ``results/{a_star,phi_decoding,cards,transfer_q_star,pg_td,skeleton_graph}_eval.json`` (written by
``scripts/eval_<method>.py``); one panel per method, each against its baseline at matched compute.

Usage: ``python scripts/plot_step_search.py``
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "results"


def _load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}_eval.json").read_text())


def _a_star(ax):
    ps = _load("a_star")["plot_series"]
    for label, marker in (("a-star", "o-"), ("best-of-N", "s--")):
        ax.plot(ps[label]["x_generated_tokens"], ps[label]["y_accuracy"], marker, label=label)
    ax.set(title="A*-decoding (12 arithmetic problems)", xlabel="generated tokens per problem", ylabel="accuracy")


def _phi(ax):
    ps = _load("phi_decoding")["plot_series"]
    for key, marker in (("phi", "o"), ("best_of_n", "s"), ("majority", "^"), ("greedy", "x")):
        ax.plot(ps["x_generated_tokens"][key], ps["y_accuracy"][key], marker, label=key, markersize=8)
    ax.set(title="phi-decoding (12 arithmetic problems)", xlabel="generated tokens per problem", ylabel="accuracy")


def _cards(ax):
    s = _load("cards")["summary"]
    bon = s["best_of_n"]
    ax.plot([b["llm_plus_rm_calls"] for b in bon], [b["reward"] for b in bon], "s--", label="best-of-N (N=1..8)")
    for mode, marker in (("soft", "o"), ("hard", "D")):
        c = s["cards"][mode]
        ax.errorbar(c["llm_plus_rm_calls"], c["reward"], yerr=c["ci95"], fmt=marker, label=f"CARDS {mode}")
    ax.set(title="CARDS (16 prompts, VADER reward)", xlabel="LLM + reward calls per prompt", ylabel="mean reward")


def _tq(ax):
    ps = _load("transfer_q_star")["plot_series"]
    for label, v in ps.items():
        marker = "s" if label.startswith("best") else "x" if label.startswith("greedy") else "o"
        ax.plot(v["tokens"], v["reward"], marker, label=label, markersize=8)
    ax.set(title="Transfer Q* (10 prompts, VADER reward)", xlabel="generated tokens (incl. rollouts) per prompt",
           ylabel="mean reward")


def _pg_td(ax):
    s = _load("pg_td")["summary"]
    ax.plot([1], [s["greedy"]["hidden_pass_rate"]], "x", label="greedy", markersize=8)
    sf = [s["sample_filter@4"], s["sample_filter@8"]]
    ax.errorbar([v["mean_program_runs"] for v in sf], [v["hidden_pass_rate_mean"] for v in sf],
                yerr=[v["hidden_pass_rate_std"] for v in sf], fmt="s--", label="sampling + filtering (3 seeds)")
    pg = [s["pg_td@4"], s["pg_td@8"]]
    ax.plot([v["mean_program_runs"] for v in pg], [v["hidden_pass_rate"] for v in pg], "o-", label="PG-TD")
    ax.set(title=f"PG-TD ({s['tasks']} toy code tasks)", xlabel="programs run per task",
           ylabel="hidden-test pass rate")


def _sgd(ax):
    ps = _load("skeleton_graph")["plot_series"]
    for label, v in ps.items():
        ax.plot(v["x_model_calls"], v["y_key_point_recall"], "o", label=label, markersize=8)
    ax.set(title="Skeleton graph decoding (8 questions)", xlabel="sequential forwards per answer",
           ylabel="key-point recall")


def main():
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    for fn, ax in zip((_a_star, _phi, _cards, _tq, _pg_td, _sgd), axes.flat):
        fn(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Step-level search on SmolLM2-135M-Instruct: quality against compute (results/*_eval.json)")
    fig.tight_layout()
    out = RESULTS / "step_search_eval.png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
