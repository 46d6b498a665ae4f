"""core.arithmetic: the synthetic problems and the rule-based process reward."""

from __future__ import annotations

import pytest

from hf_decoding_ext.core.arithmetic import (
    ArithmeticStepVerifier,
    extract_answer,
    load_problems,
    make_problems,
    problem_prompt,
    statements,
)


def test_problems_are_deterministic_and_correct():
    a, b = make_problems(30, seed=5), make_problems(30, seed=5)
    assert [p.question for p in a] == [p.question for p in b]
    assert make_problems(30, seed=6)[0].question != a[0].question or make_problems(30, seed=6)[1] != a[1]
    for p in a:
        assert eval(p.question) == p.answer  # parenthesised so that precedence gives the left-to-right value
        assert 2 <= len(statements(p.solution)) <= 3
        assert ArithmeticStepVerifier(p.answer)(p.solution) == 1.0
    with pytest.raises(ValueError, match="0"):
        make_problems(0)


def test_verifier_rules():
    prm = ArithmeticStepVerifier()
    assert prm("Let me think.") == 1.0 and ArithmeticStepVerifier(empty=0.5)("hm") == 0.5
    assert prm("2 + 3 = 5\n5 * 2 = 11\n") == 0.5
    assert ArithmeticStepVerifier(mode="product")("2 + 3 = 5\n5 * 2 = 11\n") == 0.0
    assert prm("2 + 3 = 5\n5 x 2 = 10\nThe answer is 10.") == 1.0
    assert prm("2 + 3 = 5\n5 x 2 = 10\nAnswer: 11") == 0.0  # inconsistent with the last statement
    assert ArithmeticStepVerifier(answer=9)("2 + 3 = 5\n5 x 2 = 10\nAnswer: 10") == 0.0  # oracle check
    assert prm.calls == 4
    assert extract_answer("so the answer is -4") == -4 and extract_answer("no answer") is None
    with pytest.raises(ValueError, match="'max'"):
        ArithmeticStepVerifier(mode="max")


def test_committed_splits():
    dev, test = load_problems("dev"), load_problems("test")
    assert len(dev) == 20 and len(test) == 40
    assert not {p.question for p in dev} & {p.question for p in test}
    assert problem_prompt(test[0]).endswith(f"Problem: {test[0].question}\n")
