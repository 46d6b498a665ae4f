"""Issue 24's summary: the four methods that fine-tune the model, side by side, from their committed results.

    python scripts/summarize_finetuned.py

Reads ``results/space_eval.json``, ``s2d_eval.json`` + ``s2d_speed.json``, ``lud_eval.json`` + ``lud_speed.json`` and
``set_block_decoding_eval.json`` + ``sbd_speed.json`` (each written by its own evaluation / ``scripts/bench_speed.py``
run; nothing is measured here) and writes ``results/finetuned_methods.json`` and ``.png``: per method at its default
setting, forwards per token, wall-clock speed against greedy with the same kernels (mean and min-max over passes),
and quality against the original model (greedy agreement and the task answers; S2D is lossless, so its output is the
target's).
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"


def _load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def _bench_speed(name: str, arm: str) -> dict:
    o = _load(name)["methods"][arm]["overall"]
    return {"same_kernel": round(o["speed_ratio_same_kernel"], 4),
            "same_kernel_min_max": [round(o["speed_ratio_same_kernel_min"], 4),
                                    round(o["speed_ratio_same_kernel_max"], 4)],
            "source": f"results/{name}.json"}


def summary() -> dict:
    from hf_decoding_ext.registry import get_method

    rows = {}
    sp = _load("space_eval")
    t = sp["timing"]["space/fast-kernels"]
    rows["space"] = {
        "setting": f"k={sp['settings']['k']}", "forwards_per_token": sp["space"]["forwards_per_token"],
        "speed": {"same_kernel": t["speed_ratio_vs_greedy/fast-kernels"],
                  "same_kernel_min_max": t["speed_ratio_vs_greedy/fast-kernels_min_max"],
                  "source": "results/space_eval.json"},
        "agreement_with_original": sp["finetuned_greedy"]["agreement_with_original"]["agreement"],
        "task": [sp["finetuned_greedy"]["task"]["correct"], sp["finetuned_greedy"]["task"]["graded"]],
        "task_original": [sp["original"]["task"]["correct"], sp["original"]["task"]["graded"]],
        "note": "lossless against the fine-tune; the fine-tune differs from the original"}
    s2 = _load("s2d_eval")
    d = s2["summary"][f"s2d:{s2['default_threshold']:g}"]
    rows["s2d"] = {
        "setting": f"threshold {s2['default_threshold']:g}", "forwards_per_token": round(1 / d["tokens_per_forward"], 4),
        "speed": _bench_speed("s2d_speed", "s2d"), "agreement_with_original": 1.0 if d["identical_all"] else None,
        "task": None, "task_original": None,
        "note": "a draft: lossless, the output is the target's (the original model)"}
    lu = _load("lud_eval")
    dflt = get_method("lexical-unit-decoding").defaults["threshold"]
    r = next(r for r in lu["sweep"] if r["threshold"] == dflt)
    rows["lexical-unit-decoding"] = {
        "setting": f"threshold {dflt:g}", "forwards_per_token": r["forwards_per_token"],
        "speed": _bench_speed("lud_speed", "lexical-unit-decoding"),
        "agreement_with_original": r["agreement_with_original"]["agreement"],
        "task": [r["task"]["correct"], r["task"]["graded"]],
        "task_original": [lu["original"]["task"]["correct"], lu["original"]["task"]["graded"]],
        "note": "lossy against the original model"}
    sb = _load("set_block_decoding_eval")
    gamma = get_method("set-block-decoding").defaults["gamma"]
    a, n = sb["arms"][f"sbd_gamma_{gamma:g}"], sb["task_prompts"]
    rows["set-block-decoding"] = {
        "setting": f"gamma {gamma:g}, blocks of {sb['block_size']}", "forwards_per_token": a["nfe_per_token"],
        "speed": _bench_speed("sbd_speed", "set-block-decoding"),
        "agreement_with_original": a["agreement_with_original"],
        "task": [round(a["task_answer_rate"] * n), n],
        "task_original": [round(sb["arms"]["original"]["task_answer_rate"] * n), n],
        "note": "lossy against the original model"}
    for name, row in rows.items():
        spec = get_method(name)
        row.update(status=spec.status, effect=spec.effect)
    return {"what": __doc__.split("\n")[0], "methods": rows}


def plot(s: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(s["methods"])
    rows = [s["methods"][n] for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].bar(names, [r["forwards_per_token"] for r in rows], color="tab:blue")
    axes[0].axhline(1.0, color="gray", lw=0.8, ls="--")
    axes[0].set_title("forwards per token (default setting)")
    sp = [r["speed"]["same_kernel"] for r in rows]
    err = [[v - r["speed"]["same_kernel_min_max"][0] for v, r in zip(sp, rows)],
           [r["speed"]["same_kernel_min_max"][1] - v for v, r in zip(sp, rows)]]
    axes[1].bar(names, sp, yerr=err, color="tab:orange", capsize=3)
    axes[1].axhline(1.0, color="gray", lw=0.8, ls="--")
    axes[1].set_title("speed / greedy with the same kernels")
    axes[2].bar(names, [r["agreement_with_original"] for r in rows], color="tab:green")
    axes[2].set_ylim(0, 1.05)
    axes[2].set_title("greedy agreement with the original model")
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.suptitle("Methods that fine-tune the model (issue 24), SmolLM2-135M-Instruct, CPU fp32", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    s = summary()
    out = RESULTS / "finetuned_methods.json"
    out.write_text(json.dumps(s, indent=1) + "\n")
    plot(s, out.with_suffix(".png"))
    for name, r in s["methods"].items():
        print(f"{name:24s} fwd/token {r['forwards_per_token']:.3f}  speed {r['speed']['same_kernel']:.2f}  "
              f"agreement {r['agreement_with_original']}  task {r['task']} (original {r['task_original']})  "
              f"{r['status']}, {r['effect']}")
    print(f"wrote {out} and {out.with_suffix('.png').name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
