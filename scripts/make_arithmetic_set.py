"""Write ``hf_decoding_ext/data/fast_cot/arithmetic.jsonl``: 24 one- and two-step word problems written for this
repository (Fast CoT's property test, issue 19), generated from fixed templates with ``random.seed(7)``.

    python scripts/make_arithmetic_set.py
"""

from __future__ import annotations

import json
import random

from hf_decoding_ext.core.resources import data_path

NAMES = ["Tom", "Anna", "Ben", "Lucy", "Sam", "Mia", "Leo", "Emma", "Jack", "Nora"]
ITEMS = ["apples", "pencils", "books", "marbles", "stickers", "cookies", "coins", "cards"]


def problems(n: int = 24, seed: int = 7) -> list[dict]:
    random.seed(seed)
    rows = []
    while len(rows) < n:
        name, item = random.choice(NAMES), random.choice(ITEMS)
        a, b, c = random.randint(2, 12), random.randint(2, 9), random.randint(1, 5)
        kind = len(rows) % 3
        if kind == 0:
            q = f"{name} has {a} {item}. {name} buys {b} more and then gives away {c}. How many {item} does {name} have now?"
            ans = a + b - c
        elif kind == 1:
            q = f"{name} has {a} boxes with {b} {item} in each box. How many {item} does {name} have in total?"
            ans = a * b
        else:
            q = f"{name} had {a + b + c} {item}, lost {b} of them and then found {c} more. How many {item} does {name} have?"
            ans = a + 2 * c
        rows.append({"id": f"arith-{len(rows):02d}", "question": q, "answer": ans})
    return rows


if __name__ == "__main__":
    path = data_path("fast_cot", "arithmetic.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in problems()))
    print(f"wrote {path}")
