"""The sketch-guided task's parsers stay linear on long model text (issue 17) and agree with the regular expressions
they replace on ordinary text."""

from __future__ import annotations

import random
import re
import time

from hf_decoding_ext.bench.tasks.sketch_cie import parse_sketch_triplets, parse_triplets

TRIPLET = re.compile(r"\[s\] (.+?) \[r\] (.+?) \[o\] (.+?) \[e\]")
SKETCH = re.compile(r"\(\s*([^,()\n]+?)\s*,\s*([^,()\n]+?)\s*,\s*([^()\n]+?)\s*\)")


def _random_text(rng, pieces, n):
    return "".join(rng.choice(pieces) for _ in range(n))


def test_parsers_agree_with_the_regular_expressions():
    rng = random.Random(0)
    markers = ["[s] ", " [r] ", " [o] ", " [e]", "ab", " ", "x", "\n", "[s]", "[e] "]
    for _ in range(3000):
        text = _random_text(rng, markers, rng.randint(0, 14))
        assert parse_triplets(text) == [tuple(m) for m in TRIPLET.findall(text)], repr(text)
    pieces = ["(", ")", ",", " ", "a", "bc", "\n", ", ", "(x, y, z)", "\t"]
    for _ in range(3000):
        text = _random_text(rng, pieces, rng.randint(0, 14))
        want = [tuple(m) for m in SKETCH.findall(text) if all(g.strip() for g in m)]
        assert parse_sketch_triplets(text) == want, repr(text)


def test_parsers_are_linear_on_adversarial_text():
    texts = ["[s] " + "a [r] " * 20000, "[s] a [r] b [o] " + "c [o] " * 20000,
             "(" + " " * 60000 + ",", "(a," + " " * 60000 + ", b" + " " * 60000]
    for text in texts:
        t0 = time.perf_counter()
        parse_triplets(text)
        parse_sketch_triplets(text)
        assert time.perf_counter() - t0 < 0.5, text[:20]
    t0 = time.perf_counter()
    TRIPLET.findall(texts[0][:24000])  # the replaced expression: quadratic
    assert time.perf_counter() - t0 > 0.05
