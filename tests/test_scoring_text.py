"""core.scoring text utilities (chrF, BLEU, ROUGE on text), the model judge, the utility-matrix helper and MBR's
pseudo-reference subsampling."""

from __future__ import annotations

import pytest
import sacrebleu
import torch

from hf_decoding_ext.core.scoring import (
    JudgeUtility,
    MBRScorer,
    chrf,
    expected_utility,
    rouge_1_text,
    rouge_l_text,
    sentence_bleu,
    utility_matrix,
)


class _WordTokenizer:
    """Token ids are indices into a fixed word list; decode joins words with spaces (id 0 is special)."""

    words = ["<eos>", "le", "chat", "dort", "sur", "canapé", "un", "chien", "mange", "très", "bien", "rouge"]

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(self.words[i] for i in ids if not (skip_special_tokens and i == 0))

    def ids(self, text):
        return [self.words.index(w) for w in text.split()]


def test_text_utilities_match_the_packages():
    hyp, ref = "le chat dort sur le canapé", "le chat dort sur un canapé"
    assert chrf(hyp, ref) == pytest.approx(sacrebleu.sentence_chrf(hyp, [ref]).score)
    assert sentence_bleu(hyp, ref) == pytest.approx(sacrebleu.sentence_bleu(hyp, [ref]).score)
    assert chrf(ref, ref) == pytest.approx(100.0) and sentence_bleu(ref, ref) == pytest.approx(100.0)
    assert chrf("xyz", ref) < chrf(hyp, ref)
    # ROUGE-L on unicode words: "très" stays one word (rouge-score's default tokeniser would split it)
    assert rouge_l_text("très bien", "très bien") == pytest.approx(1.0)
    assert rouge_l_text("très bien", "très mal") == pytest.approx(0.5)
    assert rouge_l_text("a b c d", "a c d e") == pytest.approx(0.75)  # LCS a c d
    assert rouge_1_text("b a", "a b") == pytest.approx(1.0) and rouge_l_text("b a", "a b") == pytest.approx(0.5)


def test_text_mbr_scorer_decodes_with_the_tokenizer():
    tok = _WordTokenizer()
    texts = ["le chat dort sur le canapé", "le chat dort", "un chien mange", "le chat dort sur un canapé"]
    cands = [tok.ids(t) + [0] for t in texts]  # a trailing special token, removed by decoding
    scorer = MBRScorer("chrf", tokenizer=tok)
    scores = scorer.score(cands)
    expected = [sum(chrf(texts[i], texts[j]) for j in range(4) if j != i) / 3 for i in range(4)]
    assert scores.tolist() == pytest.approx(expected, rel=1e-5)
    assert scorer.utility_calls == 12  # chrF is not symmetric: every ordered pair
    sym = MBRScorer("rougeL", tokenizer=tok)
    sym.score(cands)
    assert sym.symmetric and sym.utility_calls == 6  # ROUGE-L F is: each unordered pair once
    with pytest.raises(ValueError, match="tokenizer"):
        MBRScorer("chrf")
    with pytest.raises(ValueError, match="unknown utility"):
        MBRScorer("comet")


def test_utility_matrix_helper_columns_symmetry_batch_and_context():
    calls = []

    def u(h, r):
        calls.append((h, r))
        return float(len(set(h) & set(r)))

    items = ["abc", "abd", "xyz", "abc"]
    full, n_calls = utility_matrix(items, u)
    assert n_calls == len(calls) == 3 * 2 + 1  # distinct ordered pairs + the repeated "abc" with itself
    assert full[0, 3] == 3.0 and full[3, 0] == 3.0 and torch.all(full.diagonal() == 0)
    calls.clear()
    part, n_calls = utility_matrix(items, u, columns=[1])
    assert n_calls == 2 and torch.equal(part[:, 1], full[:, 1]) and torch.all(part[:, [0, 2, 3]] == 0)
    calls.clear()
    _, n_calls = utility_matrix(items, u, symmetric=True)
    assert n_calls == 3 + 1

    class Batched:
        needs_context = True

        def __init__(self):
            self.batches = []

        def batch(self, pairs, context):
            self.batches.append((list(pairs), context))
            return [float(h == r) + len(context) for h, r in pairs]

    b = Batched()
    m, n_calls = utility_matrix(["a", "b", "a"], b, context="ctx")
    assert len(b.batches) == 1 and b.batches[0][1] == "ctx" and n_calls == 3
    assert m[0, 2] == 4.0 and m[0, 1] == 3.0
    with pytest.raises(ValueError, match="columns"):
        utility_matrix(items, u, columns=[4])
    with pytest.raises(ValueError, match="number"):
        utility_matrix(["a", "b"], lambda h, r: "high")


def test_pseudo_reference_subsampling():
    cands = [[1, 2, 3], [1, 2], [4, 2, 3], [3], [1, 3, 5], [2, 2, 4]]
    n = len(cands)
    full = MBRScorer("rouge_l").score(cands)
    for k in (n, n + 3):  # the whole pool: full MBR
        scorer = MBRScorer("rouge_l", num_pseudo_references=k, seed=0)
        assert torch.equal(scorer.score(cands), full) and scorer.last_references == list(range(n))
    calls = []

    def counting(h, r):
        calls.append(1)
        from hf_decoding_ext.core.scoring import rouge_l

        return rouge_l(h, r)

    sub = MBRScorer(counting, num_pseudo_references=2, seed=3)
    scores = sub.score(cands)
    refs = sub.last_references
    assert len(refs) == 2 and len(set(refs)) == 2
    assert len(calls) == n * 2 - 2  # n x k utilities, none of a reference against itself
    matrix = MBRScorer("rouge_l").utility_matrix(cands)
    manual = expected_utility(matrix, references=refs)
    torch.testing.assert_close(scores, manual.float())
    for i in range(n):  # a mean over the subsample (without the candidate itself)
        others = [j for j in refs if j != i]
        assert scores[i].item() == pytest.approx(float(matrix[i, others].mean()), abs=1e-6)
    again = MBRScorer("rouge_l", num_pseudo_references=2, seed=3)
    again.score(cands)
    assert again.last_references == refs  # reproducible from the seed
    draws = {tuple(sub.pseudo_references(n)) for _ in range(20)}
    assert len(draws) > 1  # a fresh subsample at each scoring
    with pytest.raises(ValueError, match="num_pseudo_references"):
        MBRScorer("rouge_l", num_pseudo_references=0)


SHORT_TEMPLATE = "I:{instruction}\nR:{response}\nA:{reference}\n{rubric}\nS:"


def test_judge_is_the_probability_weighted_grade(tiny_llama, char_tokenizer):
    judge = JudgeUtility(tiny_llama, char_tokenizer, rubric="1-5", template=SHORT_TEMPLATE, batch_size=2)
    pairs = [("ab", "abc"), ("a longer answer", "x"), ("q", "q")]
    values = judge.batch(pairs, context="say ab")
    assert judge.calls == 3 and all(1.0 <= v <= 5.0 for v in values)
    digits = [char_tokenizer.encode(str(k), add_special_tokens=False)[0] for k in range(1, 6)]
    prefix, suffixes = judge.prompt_ids("say ab", pairs)
    for (h, r), suffix, v in zip(pairs, suffixes, values):  # unpadded single forward of the whole prompt, by hand
        ids = prefix + suffix
        assert char_tokenizer.decode(ids) == judge.prompt("say ab", h, r)
        with torch.no_grad():
            probs = torch.softmax(tiny_llama(torch.tensor([ids])).logits[0, -1], -1)[digits]
        assert v == pytest.approx(float((probs * torch.arange(1, 6)).sum() / probs.sum()), abs=1e-4)
    assert judge("ab", "abc", context="say ab") == pytest.approx(values[0], abs=1e-5)
    # inside an MBR scorer: the prompt (token ids) is decoded as the instruction, one batch per matrix
    scorer = MBRScorer(judge, tokenizer=char_tokenizer)
    prompt = char_tokenizer.encode("say ab", add_special_tokens=False)
    cands = [char_tokenizer.encode(t, add_special_tokens=False) for t in ("ab", "abc", "zz")]
    scores = scorer.score(cands, context=prompt)
    m = torch.tensor([[judge(cands_t, ref_t, context="say ab") if i != j else 0.0
                       for j, ref_t in enumerate(("ab", "abc", "zz"))] for i, cands_t in enumerate(("ab", "abc", "zz"))])
    torch.testing.assert_close(scores, (m.sum(1) / 2).float(), atol=1e-4, rtol=0)
    unbound = JudgeUtility(None, char_tokenizer, template=SHORT_TEMPLATE)
    with pytest.raises(ValueError, match="no model"):
        unbound.batch([("a", "b")], "x")
    assert unbound.bind(tiny_llama).model is tiny_llama
    with pytest.raises(ValueError, match="template"):
        JudgeUtility(tiny_llama, char_tokenizer, template="no fields")
