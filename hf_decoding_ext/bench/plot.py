"""Plots of benchmark results (matplotlib, Agg backend; nothing is shown on screen).

* :func:`plot_speed`: grouped bars of the headline speed ratio vs greedy, per category and overall, one bar per
  method, with the parity line at 1.
* :func:`plot_same_kernel_ratios`: horizontal bars of every entry's speed over its same-kernel baseline (greedy,
  or T=1 sampling for the sampled entries) with the min-max spread over passes.
* :func:`plot_quality`: surprise vs repetition scatter (one point per method overall, small points per category),
  and grouped bars of distinct-2 and perplexity per category.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _num(x) -> float:
    return float("nan") if x is None else float(x)


def _grouped_bars(ax, groups: list[str], series: dict[str, list[float]], ylabel: str):
    n = max(1, len(series))
    width = 0.8 / n
    for k, (name, values) in enumerate(series.items()):
        xs = [i - 0.4 + width * (k + 0.5) for i in range(len(groups))]
        bars = ax.bar(xs, [0 if math.isnan(v) else v for v in values], width, label=name)
        for b, v in zip(bars, values):
            if not math.isnan(v):
                ax.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                            fontsize=6, rotation=90 if n > 3 else 0)
    finite = [v for vals in series.values() for v in vals if not math.isnan(v)]
    if finite and max(finite) > 0:
        ax.set_ylim(0, max(finite) * 1.18)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)


def plot_speed(results: dict[str, Any], path: str | Path, metric: str = "speed_ratio") -> Path:
    """Bar chart of ``metric`` (default: the headline speed ratio) per category and overall for every method.

    The baseline is left out unless it is the only entry. Returns the written path.
    """
    plt = _plt()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    methods = results["methods"]
    names = [m for m in methods if m != results.get("baseline")] or list(methods)
    cats = list(results["settings"]["categories"])
    groups = cats + ["overall"]
    series = {}
    for m in names:
        vals = [_num(methods[m]["per_category"].get(c, {}).get(metric)) for c in cats]
        vals.append(_num(methods[m]["overall"].get(metric)))
        series[m] = vals
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) + 0.3 * len(names)), 4.2))
    _grouped_bars(ax, groups, series, f"{metric} vs {results.get('baseline', 'greedy')}")
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    s = results["settings"]
    ax.set_title(f"{results.get('model', '')}: speed vs greedy ({s['n_prompts']} prompts, "
                 f"{s['max_new_tokens']} new tokens, {results['machine'].get('device', '')})", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_same_kernel_ratios(results: dict[str, Any], path: str | Path, title: str | None = None) -> Path:
    """Horizontal bars of ``speed_ratio_same_kernel`` (min-max over passes as error bars) for every entry but the
    stock baselines (``greedy``, ``sampling``); T=1 entries (named ``T=1`` or ``sampling*``) in orange. Returns the
    written path."""
    plt = _plt()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [n for n in results["methods"] if n not in ("greedy", "sampling")]
    overall = [results["methods"][n]["overall"] for n in names]
    ratios = [o.get("speed_ratio_same_kernel", float("nan")) for o in overall]
    lo = [o.get("speed_ratio_same_kernel_min", r) for o, r in zip(overall, ratios)]
    hi = [o.get("speed_ratio_same_kernel_max", r) for o, r in zip(overall, ratios)]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(names) + 1.5))
    y = list(range(len(names)))
    ax.barh(y, ratios, xerr=[[r - a for r, a in zip(ratios, lo)], [b - r for r, b in zip(ratios, hi)]],
            color=["tab:orange" if "T=1" in n or n.startswith("sampling") else "tab:blue" for n in names])
    ax.set_yticks(y, names, fontsize=8)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel("tokens/s over the same-kernel baseline (greedy or T=1 sampling), min-max over passes")
    if title:
        ax.set_title(title, fontsize=9)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_quality(results: dict[str, Any], path: str | Path) -> Path:
    """Three panels: surprise vs rep-3 scatter, distinct-2 per category, perplexity per category. Returns the path."""
    plt = _plt()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    methods = results["methods"]
    cats = list(results["settings"]["categories"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    ax = axes[0]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (m, r) in enumerate(methods.items()):
        c = colors[k % len(colors)]
        pts = [(_num(v.get("surprise_mean")), _num(v.get("rep_3"))) for v in r["per_category"].values()]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=12, color=c, alpha=0.4)
        ax.scatter([_num(r["overall"].get("surprise_mean"))], [_num(r["overall"].get("rep_3"))], s=70, color=c,
                   edgecolor="black", label=m)
    ax.set_xlabel("mean surprise (bits/token, base model)")
    ax.set_ylabel("rep-3")
    ax.set_title("surprise vs repetition (large: overall, small: per category)", fontsize=9)
    ax.legend(fontsize=7)
    groups = cats + ["overall"]
    for ax, metric in ((axes[1], "distinct_2"), (axes[2], "perplexity")):
        series = {m: [_num(r["per_category"].get(c, {}).get(metric)) for c in cats] + [_num(r["overall"].get(metric))]
                  for m, r in methods.items()}
        _grouped_bars(ax, groups, series, metric)
        ax.set_title(metric, fontsize=9)
    axes[2].legend(fontsize=7)
    fig.suptitle(f"{results.get('model', '')}: quality ({results['settings']['n_prompts']} prompts, "
                 f"{results['settings']['max_new_tokens']} new tokens)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
