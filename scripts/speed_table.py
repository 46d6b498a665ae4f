"""Print the Markdown speed table of a ``scripts/bench_speed.py`` result (README and model cards quote it).

    python scripts/speed_table.py results/speed.json
"""

from __future__ import annotations

import json
import sys

LABELS = {
    "greedy": "stock greedy `generate()`",
    "greedy/fast-kernels": "greedy with the fast kernels (same-kernel baseline)",
    "prompt-lookup (transformers)": "transformers' prompt lookup (10)",
    "prompt-lookup (transformers)/fast-kernels": "transformers' prompt lookup (10), fast kernels",
    "repeat-last-token (reference)": "repeat-last-token (reference: no useful drafts)",
    "assisted (transformers)": "transformers' assisted generation (same assistant)",
    "assisted (transformers)/fast-kernels": "transformers' assisted generation (same assistant), fast kernels",
}
SHORT = {"multi_turn_chat": "chat", "translation": "transl.", "summarization": "summ.", "qa": "QA",
         "math_reasoning": "math", "rag_qa": "RAG"}


def table(data: dict) -> str:
    methods = data["methods"]
    cats = list(next(iter(methods.values()))["per_category"])
    head = ("| configuration | own speed-up (same-kernel greedy) [min-max of passes] | over stock greedy | tokens per "
            "forward | outside forwards | " + " | ".join(SHORT.get(c, c) for c in cats) + " |")
    lines = [head, "|" + "---|" * (5 + len(cats))]
    for name, m in methods.items():
        o = m["overall"]
        own = o.get("speed_ratio_same_kernel")
        own_txt = "-" if own is None or own != own else (
            f"{own:.2f}x [{o.get('speed_ratio_same_kernel_min', own):.2f}-{o.get('speed_ratio_same_kernel_max', own):.2f}]")
        per = [m["per_category"][c].get("speed_ratio_same_kernel") for c in cats]
        per_txt = ["-" if v is None or v != v else f"{v:.2f}x" for v in per]
        lines.append(f"| {LABELS.get(name, name)} | {own_txt} | {o['speed_ratio']:.2f}x | {o['tokens_per_forward']:.2f} | "
                     f"{100 * o['overhead_frac']:.1f}% | " + " | ".join(per_txt) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(json.loads(open(sys.argv[1] if len(sys.argv) > 1 else "results/speed.json").read())))
