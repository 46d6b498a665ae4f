"""Synthetic multi-step arithmetic with ground truth, and the rule-based process reward that checks it.

The step-search papers (A*-decoding, phi-decoding) score reasoning prefixes with a learned process reward model and
measure accuracy on math benchmarks. Neither is available offline at this scale, so the library ships a stand-in
that is exact on its own task: problems ``((a op b) op c) ...`` whose reference solution writes one ``x op y = z``
statement per line, and :class:`ArithmeticStepVerifier`, which checks every statement of a (partial) solution with
Python arithmetic. :func:`make_problems` is deterministic in its seed; the committed set
``data/search/arithmetic.jsonl`` (dev and test splits) was made with it.

Example:
    >>> from hf_decoding_ext.core.arithmetic import ArithmeticStepVerifier, make_problems, extract_answer
    >>> p = make_problems(1, seed=0, num_ops=2)[0]
    >>> prm = ArithmeticStepVerifier()
    >>> prm(p.solution), extract_answer(p.solution) == p.answer
    (1.0, True)
    >>> prm("3 + 4 = 8\\n"), prm("3 + 4 = 7\\n7 * 2 = 14\\nThe answer is 15.")
    (0.0, 0.0)
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass

from hf_decoding_ext.core.resources import read_jsonl

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
STATEMENT = re.compile(r"(-?\d+)\s*([+\-*x×])\s*(-?\d+)\s*=\s*(-?\d+)")
ANSWER = re.compile(r"[Aa]nswer\s*(?:is)?\s*[:=]?\s*(-?\d+)")

FEW_SHOT = ("Solve the problem step by step, one calculation per line, then write the answer.\n"
            "Problem: (2 + 5) * 3\n2 + 5 = 7\n7 * 3 = 21\nAnswer: 21\n")
"""The one-shot instruction and example put before every problem by :func:`problem_prompt`."""


@dataclass
class ArithmeticProblem:
    """One problem: ``question`` (e.g. ``"(4 + 3) * 2 - 5"``), the integer ``answer`` and the reference
    ``solution`` (one ``x op y = z`` line per operation, then ``"Answer: N"``)."""

    question: str
    answer: int
    solution: str
    split: str = "test"

    def to_dict(self) -> dict:
        return asdict(self)


def make_problems(n: int, seed: int = 0, num_ops: int | tuple[int, int] = (2, 3), max_operand: int = 9,
                  split: str = "test") -> list[ArithmeticProblem]:
    """``n`` random problems of ``num_ops`` operations (an int or an inclusive range) on operands ``1..max_operand``,
    evaluated left to right (written with the parentheses that make it so); intermediate results stay in
    ``0..99``."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    lo, hi = (num_ops, num_ops) if isinstance(num_ops, int) else num_ops
    if lo < 1 or hi < lo:
        raise ValueError(f"num_ops must be a positive int or an increasing (lo, hi) range, got {num_ops!r}")
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        ops = rng.randint(lo, hi)
        value = rng.randint(1, max_operand)
        lines = []
        ok = True
        for _ in range(ops):
            op = rng.choice("+-*")
            b = rng.randint(1, max_operand)
            new = OPS[op](value, b)
            if not 0 <= new <= 99:
                ok = False
                break
            lines.append(f"{value} {op} {b} = {new}")
            value = new
        if not ok:
            continue
        expr = _left_to_right(lines)
        out.append(ArithmeticProblem(question=expr, answer=value, solution="\n".join(lines) + f"\nAnswer: {value}",
                                     split=split))
    return out


def _left_to_right(lines: list[str]) -> str:
    """The expression whose left-to-right evaluation the statement lines perform, parenthesised so that ordinary
    precedence gives the same value."""
    first = STATEMENT.match(lines[0])
    expr = f"{first.group(1)} {first.group(2)} {first.group(3)}"
    for line in lines[1:]:
        m = STATEMENT.match(line)
        expr = f"({expr}) {m.group(2)} {m.group(3)}"
    return expr


def problem_prompt(problem: ArithmeticProblem | str) -> str:
    """The user message for a problem: :data:`FEW_SHOT` then ``"Problem: <question>"``."""
    question = problem.question if isinstance(problem, ArithmeticProblem) else str(problem)
    return f"{FEW_SHOT}Problem: {question}\n"


def statements(text: str) -> list[tuple[int, str, int, int]]:
    """Every ``x op y = z`` statement of ``text``, as ``(x, op, y, z)`` (``x``/``×`` read as ``*``)."""
    out = []
    for m in STATEMENT.finditer(text):
        op = "*" if m.group(2) in "x×" else m.group(2)
        out.append((int(m.group(1)), op, int(m.group(3)), int(m.group(4))))
    return out


def extract_answer(text: str) -> int | None:
    """The integer after ``"Answer:"`` (the first one), else ``None``."""
    m = ANSWER.search(text)
    return int(m.group(1)) if m else None


def is_correct(text: str, answer: int) -> bool:
    """Whether ``text`` states ``answer`` after ``"Answer:"``."""
    return extract_answer(text) == int(answer)


class ArithmeticStepVerifier:
    """Rule-based process reward for the synthetic arithmetic: the fraction of the ``x op y = z`` statements of a
    (partial) solution that are true, in ``[0, 1]``; ``empty`` (default 1.0) when the text has none yet. When the
    text states an answer (``"Answer: N"``, ``"The answer is N"``), it scores 0 unless the answer equals the result of
    its last statement (a self-consistency check that needs no ground truth), or, if ``answer`` is given (an
    *oracle* verifier: use it only to measure, never to compare a search with a baseline that lacks it), unless it
    equals ``answer``.

    It stands in for the learned process reward models of A*-decoding and similar step searches: it checks the
    arithmetic of the steps, not whether they solve the problem. ``mode="product"`` gives 1 only if every statement
    is true (0 otherwise).

    Args:
        answer (`int`, *optional*): the ground-truth answer (oracle final-answer check).
        mode (`str`, *optional*, defaults to ``"fraction"``): ``"fraction"`` or ``"product"``.
        empty (`float`, *optional*, defaults to 1.0): the reward of a text without statements.
    """

    def __init__(self, answer: int | None = None, mode: str = "fraction", empty: float = 1.0):
        if mode not in ("fraction", "product"):
            raise ValueError(f"mode must be 'fraction' or 'product', got {mode!r}")
        if not 0.0 <= float(empty) <= 1.0:
            raise ValueError(f"empty must be in [0, 1], got {empty!r}")
        self.answer, self.mode, self.empty = answer, mode, float(empty)
        self.calls = 0

    def __call__(self, text: str) -> float:
        self.calls += 1
        found = statements(text)
        given = extract_answer(text)
        if given is not None:
            expected = int(self.answer) if self.answer is not None else (found[-1][3] if found else None)
            if given != expected:
                return 0.0
        if not found:
            return self.empty
        good = sum(OPS[op](x, y) == z for x, op, y, z in found)
        if self.mode == "product":
            return float(good == len(found))
        return good / len(found)


def load_problems(split: str | None = None) -> list[ArithmeticProblem]:
    """The committed problem set (``data/search/arithmetic.jsonl``), optionally one split (``"dev"``/``"test"``)."""
    if split not in (None, "dev", "test"):
        raise ValueError(f"split must be None, 'dev' or 'test', got {split!r}")
    return [p for p in (ArithmeticProblem(**r) for r in read_jsonl("search", "arithmetic.jsonl"))
            if split is None or p.split == split]
