"""The scoring protocol (``hf_decoding_ext.core.scoring``) on tiny random models and hand-made candidate sets.

Properties: the batched log-probability scorer equals one unbatched full forward per candidate (candidates of
different lengths in one right-padded batch, several chunks, the end term); padded and list inputs agree; length
normalisation is the sum divided by ``len ** alpha`` and flips a ranking the sum gets the other way; MBR picks the
known medoid, probability weights move it, and the utility matrix is computed once; a user callable scores decoded
text; bad arguments raise ``ValueError``.
"""

from __future__ import annotations

import pytest
import torch

from hf_decoding_ext.core.scoring import (
    CallableScorer,
    LengthNormalizedLogProbScorer,
    LogProbScorer,
    MBRScorer,
    Scorer,
    as_candidates,
    expected_utility,
    model_log_prob_fn,
    rouge_l,
    token_f1,
)

PROMPT = [1, 17, 42, 9]
CANDIDATES = [[5], [7, 8, 9], [10, 11, 12, 13, 14], [20, 21], [3, 3, 3, 3, 3, 3, 3]]


def _reference(model, prompt, candidate, end=None) -> list[float]:
    """Per-token log-probabilities from one unbatched full forward on ``prompt + candidate`` (no cache, no padding)."""
    ids = torch.tensor([prompt + candidate])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    out = [float(logp[len(prompt) - 1 + k, t]) for k, t in enumerate(candidate)]
    if end is not None:
        out.append(float(torch.logsumexp(logp[-1, end], dim=0)))
    return out


# ------------------------------------------------------------------------------------------------ log-probability
@pytest.mark.parametrize("batch_size", [32, 2])
def test_log_prob_scorer_equals_unbatched_forwards(tiny_model, batch_size):
    scorer = LogProbScorer(tiny_model, batch_size=batch_size)
    per_token = scorer.token_log_probs(CANDIDATES, PROMPT)
    scores = scorer.score(CANDIDATES, PROMPT)
    assert scores.shape == (len(CANDIDATES),) and scores.dtype == torch.float32
    for c, lp, s in zip(CANDIDATES, per_token, scores.tolist()):
        ref = _reference(tiny_model, PROMPT, c)
        assert lp.shape == (len(c),)
        assert lp.tolist() == pytest.approx(ref, abs=1e-5)
        assert s == pytest.approx(sum(ref), abs=1e-4)
    # the scores differ between candidates (a constant scorer would pass the checks above only by accident)
    assert len({round(s, 3) for s in scores.tolist()}) == len(CANDIDATES)


def test_end_term_and_input_formats(tiny_model):
    end = [2, 6]
    scorer = LogProbScorer(tiny_model, end_token_ids=end)
    scores = scorer.score([torch.tensor(c) for c in CANDIDATES], torch.tensor([PROMPT]))  # (1, T) prompt
    for c, s in zip(CANDIDATES, scores.tolist()):
        assert s == pytest.approx(sum(_reference(tiny_model, PROMPT, c, end)), abs=1e-4)
    # a right-padded tensor with lengths gives the same scores as the list
    width = max(map(len, CANDIDATES))
    padded = torch.full((len(CANDIDATES), width), 99)
    for i, c in enumerate(CANDIDATES):
        padded[i, :len(c)] = torch.tensor(c)
    assert torch.allclose(scorer.score(padded, PROMPT, lengths=[len(c) for c in CANDIDATES]), scores, atol=1e-5)
    # an empty candidate scores the end term alone (log p(end | prompt)), 0 without one
    empty = scorer.score([[], [5]], PROMPT)
    with torch.no_grad():
        first = torch.log_softmax(tiny_model(input_ids=torch.tensor([PROMPT])).logits[0, -1], -1)
    assert float(empty[0]) == pytest.approx(float(torch.logsumexp(first[end], 0)), abs=1e-5)
    assert float(LogProbScorer(tiny_model).score([[]], PROMPT)[0]) == 0.0


def test_log_prob_function_path_matches_the_model(tiny_model):
    """A LogProbFn (here the plain model's, with and without ``supports_first``) scores like the batched model."""
    fn = model_log_prob_fn(tiny_model)

    def fn_first(input_ids, first=0):
        return fn(input_ids)[first:]

    fn_first.supports_first = True
    batched = LogProbScorer(tiny_model, end_token_ids=2).score(CANDIDATES, PROMPT)
    for source in (fn, fn_first):
        assert torch.allclose(LogProbScorer(source, end_token_ids=2).score(CANDIDATES, PROMPT), batched, atol=1e-4)


# ------------------------------------------------------------------------------------------------ length normalisation
def test_length_normalisation(tiny_model):
    per_token = LogProbScorer(tiny_model, end_token_ids=2).token_log_probs(CANDIDATES, PROMPT)
    sums = torch.tensor([float(lp.double().sum()) for lp in per_token])
    lengths = torch.tensor([len(c) + 1.0 for c in CANDIDATES])  # the end token counts, as beam search counts eos
    for alpha in (1.0, 0.0, 0.6, 2.0):
        got = LengthNormalizedLogProbScorer(tiny_model, alpha=alpha, end_token_ids=2).score(CANDIDATES, PROMPT)
        assert torch.allclose(got, (sums / lengths ** alpha).float(), atol=1e-5), alpha
    mean = LengthNormalizedLogProbScorer(tiny_model).score(CANDIDATES, PROMPT)
    assert torch.allclose(mean, torch.tensor([float(lp.mean()) for lp in
                                              LogProbScorer(tiny_model).token_log_probs(CANDIDATES, PROMPT)]),
                          atol=1e-5)


def test_length_normalisation_flips_a_known_ranking():
    """Token 5 is likely (about -1 nat), any other token unlikely (about -5): the sum prefers one unlikely token over
    six likely ones, the mean the other way."""

    def fn(input_ids):
        logits = torch.zeros(input_ids.shape[1], 100)
        logits[:, 5] = 4.0
        return torch.log_softmax(logits, dim=-1)

    candidates = [[5] * 6, [7]]
    assert LogProbScorer(fn).best(candidates, [1]) == 1
    assert LengthNormalizedLogProbScorer(fn).best(candidates, [1]) == 0
    assert LengthNormalizedLogProbScorer(fn, alpha=0.0).best(candidates, [1]) == 1


# ------------------------------------------------------------------------------------------------ MBR
def test_utilities_by_hand():
    assert token_f1([1, 1, 2], [1, 2, 2]) == pytest.approx(2 / 3)  # multiset overlap 2
    assert token_f1([1, 2], [3]) == 0.0 and token_f1([], []) == 1.0 and token_f1([1], []) == 0.0
    assert rouge_l([1, 2, 3, 4], [1, 3, 4, 5]) == pytest.approx(0.75)  # LCS [1, 3, 4]
    assert rouge_l([1, 2, 3], [3, 2, 1]) == pytest.approx(1 / 3)  # order matters, unlike token F1
    assert token_f1([1, 2, 3], [3, 2, 1]) == 1.0


def test_mbr_picks_the_medoid():
    # a cluster around [1, 2, 3, 4] and one outlier; [1, 2, 3, 4] shares 3 tokens with each neighbour
    candidates = [[1, 2, 3, 5], [9, 9, 9], [1, 2, 3, 4], [1, 2, 4, 6], [2, 3, 4, 7]]
    scorer = MBRScorer("token_f1")
    scores = scorer.score(candidates)
    assert int(scores.argmax()) == 2
    assert float(scores[2]) == pytest.approx((0.75 + 0 + 0.75 + 0.75) / 4)  # mean over the 4 others, not itself
    assert float(scores[1]) == 0.0  # the outlier shares nothing
    matrix = scorer.utility_matrix(candidates)
    assert matrix.shape == (5, 5) and torch.all(matrix.diagonal() == 0)
    assert float(matrix[0, 2]) == pytest.approx(token_f1(candidates[0], candidates[2]))


def test_mbr_probability_weights_move_the_choice():
    cluster_a = [[1, 2, 3], [1, 2, 4]]
    cluster_b = [[7, 8, 9], [7, 8, 10], [7, 8, 11]]
    candidates = cluster_a + cluster_b
    assert MBRScorer().best(candidates) in (2, 3, 4)  # uniform: the larger cluster wins

    class Probable(Scorer):  # cluster A is far more probable
        def score_candidates(self, candidates, context):
            return [0.0 if int(c[0]) == 1 else -20.0 for c in candidates]

    weighted = MBRScorer(log_prob_scorer=Probable())
    assert weighted.best(candidates) in (0, 1)
    u = MBRScorer().utility_matrix(candidates)
    log_probs = Probable().score(candidates)
    assert torch.allclose(weighted.score(candidates), expected_utility(u, log_probs).float())
    # weights only over the others, renormalised: candidate 0's only probable reference is candidate 1
    assert float(expected_utility(u, log_probs)[0]) == pytest.approx(float(u[0, 1]), abs=1e-6)


def test_utility_matrix_computed_once():
    calls = []

    def counting(hyp, ref):
        calls.append((tuple(hyp), tuple(ref)))
        return rouge_l(hyp, ref)

    candidates = [[1, 2, 3], [1, 2], [4, 2, 3], [3]]
    n = len(candidates)
    scorer = MBRScorer(counting)
    first = scorer.score(candidates)
    assert len(calls) == n * (n - 1)  # every ordered pair once, never a candidate against itself
    second = scorer.score([torch.tensor(c) for c in candidates])
    scorer.utility_matrix(candidates)
    assert len(calls) == n * (n - 1) and torch.equal(first, second)  # the cached matrix is reused
    scorer.score(candidates[:3])  # a new set is computed afresh
    assert len(calls) == n * (n - 1) + 3 * 2
    calls.clear()
    symmetric = MBRScorer(counting, symmetric=True)
    assert torch.allclose(symmetric.score(candidates), first)  # ROUGE-L F is symmetric
    assert len(calls) == n * (n - 1) // 2
    calls.clear()
    # identical candidates share their row: one utility of the repeated sequence with itself
    repeated = MBRScorer(counting).score([[1, 2], [5, 6], [1, 2]])
    assert len(calls) == 2 * 1 + 1
    assert repeated.tolist() == pytest.approx([0.5, 0.0, 0.5])


# ------------------------------------------------------------------------------------------------ callables
class _CharTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i) for i in ids if not (skip_special_tokens and i == 0))


def test_callable_scorer():
    tok = _CharTokenizer()
    seen = []

    def reward(text, prompt):
        seen.append((text, prompt))
        return float(text.startswith("c")) + 0.1 * len(text)

    scorer = CallableScorer(reward, tokenizer=tok)
    scores = scorer.score([[2, 0, 1], [1, 1], [0, 3]], context=[7, 8])
    assert scores.tolist() == pytest.approx([1.2, 0.2, 0.1])  # decoded without the special token 0
    assert seen == [("cb", "hi"), ("bb", "hi"), ("d", "hi")]
    keep = CallableScorer(reward, tokenizer=tok, skip_special_tokens=False).score([[2, 0, 1]], context="a prompt")
    assert keep.tolist() == pytest.approx([1.3]) and seen[-1] == ("cab", "a prompt")
    batched = CallableScorer(lambda items, ctx: [len(i) for i in items], batched=True)
    assert batched.score([[1], [1, 2, 3]], "any").tolist() == [1.0, 3.0]
    assert CallableScorer(lambda ids, ctx: ids[0] == 4).score([[4], [5]]).tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="one number per candidate"):
        CallableScorer(lambda items, ctx: [1.0], batched=True).score([[1], [2]])
    with pytest.raises(ValueError, match="expected a number"):
        CallableScorer(lambda ids, ctx: "good").score([[1]])
    with pytest.raises(ValueError, match="nan"):
        CallableScorer(lambda ids, ctx: float("nan")).score([[1]])


# ------------------------------------------------------------------------------------------------ bad arguments
def test_bad_arguments(tiny_llama):
    scorer = LogProbScorer(tiny_llama)
    with pytest.raises(ValueError, match="context"):
        scorer.score([[5]], None)
    with pytest.raises(ValueError, match="non-empty prompt"):
        scorer.score([[5]], [])
    with pytest.raises(ValueError, match="no candidates"):
        scorer.score([], PROMPT)
    with pytest.raises(ValueError, match="non-negative"):
        scorer.score([[5, -1]], PROMPT)
    with pytest.raises(ValueError, match="integer token ids"):
        scorer.score([[5, 1.5]], PROMPT)
    with pytest.raises(ValueError, match="vocabulary"):
        scorer.score([[5, 500]], PROMPT)
    with pytest.raises(ValueError, match="lengths"):
        as_candidates(torch.zeros(2, 3, dtype=torch.long), lengths=[1, 4])
    with pytest.raises(ValueError, match="lengths"):
        as_candidates([[1, 2]], lengths=[2])
    with pytest.raises(ValueError, match="2-D"):
        as_candidates(torch.zeros(2, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="'abc'"):
        as_candidates("abc")
    with pytest.raises(ValueError, match="batch_size"):
        LogProbScorer(tiny_llama, batch_size=0)
    with pytest.raises(ValueError, match="end_token_ids"):
        LogProbScorer(tiny_llama, end_token_ids=[])
    with pytest.raises(ValueError, match="end_token_ids"):
        LogProbScorer(tiny_llama, end_token_ids=-2)
    with pytest.raises(ValueError, match="model"):
        LogProbScorer("gpt2")
    with pytest.raises(ValueError, match="alpha"):
        LengthNormalizedLogProbScorer(tiny_llama, alpha=float("nan"))
    with pytest.raises(ValueError, match="bleu"):
        MBRScorer("bleu")
    with pytest.raises(ValueError, match="log_prob_scorer"):
        MBRScorer(log_prob_scorer=lambda c, x: c)
    with pytest.raises(ValueError, match="utility must return a number"):
        MBRScorer(lambda h, r: None).score([[1], [2]])
    with pytest.raises(ValueError, match="square"):
        expected_utility(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="log_probs"):
        expected_utility(torch.zeros(2, 2), torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="fn must be callable"):
        CallableScorer(3)
    with pytest.raises(ValueError, match="decode"):
        CallableScorer(len, tokenizer=object())
