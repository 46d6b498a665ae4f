"""SpecTr's K-SEQ acceptance (arXiv 2310.15141): rho against its definition, k = 1 draw for draw equal to speculative
sampling, the exact target distribution over two tokens for k in {2, 4} (with a mutant as negative control), and
more acceptance than single-draft speculative sampling."""

from __future__ import annotations

import itertools

import pytest
import torch

from hf_decoding_ext.core.tree import DraftTree
from hf_decoding_ext.speculative.acceptance import SpeculativeSamplingAcceptance, get_acceptance_rule
from hf_decoding_ext.speculative.acceptance.spectr import SpecTrAcceptance, kseq_rho

V = 4


def _tables(seed):
    """Peaky random next-token distributions p (target) and q (draft) for every prefix of up to 2 tokens."""
    g = torch.Generator().manual_seed(seed)
    p, q = {}, {}
    for n in range(3):
        for prefix in itertools.product(range(V), repeat=n):
            p[prefix] = torch.softmax(2.5 * torch.randn(V, generator=g), -1)
            q[prefix] = torch.softmax(2.5 * torch.randn(V, generator=g), -1)
    return p, q


def _draft(q, prefix, k, depth, g):
    """k i.i.d. draft sequences of ``depth`` tokens after ``prefix``, as k separate branches."""
    tokens, parents, probs = [], [], []
    for _ in range(k):
        parent, pre = -1, tuple(prefix)
        for _ in range(depth):
            row = q[pre]
            x = int(torch.multinomial(row, 1, generator=g))
            tokens.append(x)
            parents.append(parent)
            probs.append(row)
            parent, pre = len(tokens) - 1, pre + (x,)
    return DraftTree(torch.tensor(tokens), torch.tensor(parents), torch.stack(probs), "iid")


def _run(rule, p, q, k, n, seed, depth=2):
    """Empirical distribution of the first two emitted tokens, and accepted tokens per step."""
    g = torch.Generator().manual_seed(seed)
    counts, accepted, steps = {}, 0, 0
    for _ in range(n):
        out = []
        while len(out) < 2:
            prefix = tuple(out)
            tree = _draft(q, prefix, k, min(depth, 2 - len(prefix)), g)

            def scores_at(node, prefix=prefix, tree=tree):
                toks = [] if node < 0 else [int(tree.tokens[i]) for i in SpecTrAcceptance._path(tree, node)]
                return torch.log(p[prefix + tuple(toks)])
            path, bonus = rule.accept(tree, scores_at, g)
            accepted += len(path)
            steps += 1
            out += [int(tree.tokens[i]) for i in path] + [bonus]
        key = tuple(out[:2])
        counts[key] = counts.get(key, 0) + 1
    return counts, accepted / steps


def _exact(p):
    return {(a, b): float(p[()][a] * p[(a,)][b]) for a in range(V) for b in range(V)}


def _chi2_pvalue(counts, probs, n):
    from scipy.stats import chi2

    stat = sum((counts.get(s, 0) - n * pr) ** 2 / (n * pr) for s, pr in probs.items() if n * pr > 1e-9)
    return float(chi2.sf(stat, len(probs) - 1))


def test_rho_is_the_smallest_feasible_division_factor():
    g = torch.Generator().manual_seed(0)
    for k in (1, 2, 4, 8):
        p, q = torch.softmax(3 * torch.randn(6, generator=g), -1), torch.softmax(3 * torch.randn(6, generator=g), -1)
        rho, beta = kseq_rho(p, q, k)
        assert 1.0 <= rho <= k
        assert beta == pytest.approx(float(torch.minimum(q, p / rho).sum()))
        def f(r):
            b = float(torch.minimum(q, p / r).sum())
            return (1 - (1 - b) ** k) / b
        assert f(rho) <= rho + 1e-9  # feasible: the residual is non-negative
        if k == 1:
            assert rho == 1.0
        elif rho > 1.0:
            assert f(rho - 1e-6) > rho - 1e-6  # and (to bisection precision) the smallest feasible
        residual = SpecTrAcceptance.kseq_residual(p, q, rho, beta, k)
        assert float(residual.min()) >= 0 and float(residual.sum()) == pytest.approx(1.0)
        # the emitted token's marginal: accepted mass + all-rejected mass x residual = p
        scale = (1 - (1 - beta) ** k) / beta
        marginal = torch.minimum(q.double(), p.double() / rho) * scale + (1 - beta) ** k * residual.double()
        torch.testing.assert_close(marginal, p.double(), atol=1e-6, rtol=1e-5)


def test_k1_is_speculative_sampling_draw_for_draw():
    p, q = _tables(1)
    for seed in range(50):
        g1, g2, gd = (torch.Generator().manual_seed(seed) for _ in range(3))
        tree = _draft(q, (), 1, 2, gd)

        def scores_at(node, tree=tree):
            toks = [] if node < 0 else [int(tree.tokens[i]) for i in SpecTrAcceptance._path(tree, node)]
            return torch.log(p[tuple(toks)])
        assert SpecTrAcceptance().accept(tree, scores_at, g1) == SpeculativeSamplingAcceptance().accept(
            tree, scores_at, g2)


@pytest.mark.parametrize("k", [2, 4])
def test_kseq_keeps_the_target_distribution_and_a_mutant_does_not(k):
    p, q = _tables(3)
    n = 6000
    counts, _ = _run(SpecTrAcceptance(), p, q, k, n, seed=k)
    assert _chi2_pvalue(counts, _exact(p), n) > 1e-3

    class NoDivision(SpecTrAcceptance):  # mutant: rho = 1 with k draws (each tested as in speculative sampling)
        def accept(self, tree, scores_at, generator=None):
            import hf_decoding_ext.speculative.acceptance.spectr as S

            real = S.kseq_rho
            S.kseq_rho = lambda p_, q_, m, iters=50: (1.0, float(torch.minimum(q_, p_).sum()))
            try:
                return super().accept(tree, scores_at, generator)
            finally:
                S.kseq_rho = real
    counts, _ = _run(NoDivision(), p, q, k, n, seed=k)
    assert _chi2_pvalue(counts, _exact(p), n) < 1e-6


def test_more_drafts_accept_more_than_single_draft_speculative_sampling():
    p, q = _tables(5)
    _, one = _run(SpeculativeSamplingAcceptance(), p, q, 1, 3000, seed=7)
    _, four = _run(SpecTrAcceptance(), p, q, 4, 3000, seed=7)
    assert four > one + 0.1, (one, four)


def test_registered_and_greedy_without_sampling():
    from hf_decoding_ext.speculative.acceptance import GreedyAcceptance

    assert isinstance(get_acceptance_rule("spectr", do_sample=True), SpecTrAcceptance)
    assert isinstance(get_acceptance_rule("spectr", do_sample=False), GreedyAcceptance)
    with pytest.raises(ValueError, match="iid"):
        SpecTrAcceptance().check_tree(DraftTree.chain([1, 2]))


def test_spectr_drafter_on_the_engine_keeps_the_target_distribution():
    """k = 3 i.i.d. draft sequences from a tiny draft model, verified with K-SEQ by the speculative engine: the
    distribution of two generated tokens is the target's."""
    from test_speculative_engine import (_chi_square_pvalue, _exact_sequence_distribution, _peaky_tiny_llama,
                                         _sample_counts)

    from hf_decoding_ext.speculative import SpeculativeDecoding
    from hf_decoding_ext.speculative.drafters.spectr import SpecTrDrafter

    vocab, length, n = 6, 2, 2500
    target, draft = _peaky_tiny_llama(1, vocab), _peaky_tiny_llama(2, vocab)
    prompt = [1, 2, 3]
    probs = _exact_sequence_distribution(target, prompt, length, vocab)
    drafter = SpecTrDrafter(draft, num_drafts=3, num_tokens=2)
    loop = SpeculativeDecoding(drafter, acceptance="spectr")
    counts = _sample_counts(target, prompt, length, n, loop)
    ids = torch.tensor([prompt])
    assert _chi_square_pvalue(counts, probs, n) > 1e-3
    greedy = target.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(target.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0,
                                       custom_generate=loop), greedy)
    with pytest.raises(ValueError, match="num_drafts"):
        SpecTrDrafter(draft, num_drafts=0)
