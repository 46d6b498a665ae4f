"""Draft-model trees with a branching factor per depth (MCSD with and without replacement, RSD-C): the target's
exact distribution over two tokens through the engine, distinct siblings without replacement, greedy identity."""

from __future__ import annotations

import pytest
import torch
from test_speculative_engine import (_chi_square_pvalue, _exact_sequence_distribution, _peaky_tiny_llama,
                                     _sample_counts)

from hf_decoding_ext.speculative import SpeculativeDecoding
from hf_decoding_ext.speculative.drafters.base import Drafter
from hf_decoding_ext.speculative.drafters.mcsd import MCSDDrafter
from hf_decoding_ext.speculative.drafters.rsd import RSDDrafter


def _record(drafter):
    trees = []
    propose = drafter.propose

    def spy(state):
        d = propose(state)
        trees.append(d.tree)
        return d
    drafter.propose = spy
    return trees


@pytest.mark.parametrize("make", [lambda d: MCSDDrafter(d, branching=(3, 2)),
                                  lambda d: MCSDDrafter(d, branching=(3, 2), sibling_scheme="without_replacement"),
                                  lambda d: RSDDrafter(d, branching=(2, 2)),
                                  lambda d: RSDDrafter(d, variant="S", beam_width=3, depth=2)],
                         ids=["mcsd-iid", "mcsd-wor", "rsd-c", "rsd-s"])
def test_tree_drafts_keep_the_target_distribution(make):
    vocab, length, n = 6, 2, 2500
    target, draft = _peaky_tiny_llama(1, vocab), _peaky_tiny_llama(2, vocab)
    prompt = [1, 2, 3]
    probs = _exact_sequence_distribution(target, prompt, length, vocab)
    drafter = make(draft)
    trees = _record(drafter)
    loop = SpeculativeDecoding(drafter, acceptance="speculative")
    counts = _sample_counts(target, prompt, length, n, loop)
    ids = torch.tensor([prompt])
    assert _chi_square_pvalue(counts, probs, n) > 1e-3
    trees.clear()
    target.generate(ids, max_new_tokens=8, do_sample=True, top_k=0, pad_token_id=0, custom_generate=loop)
    if isinstance(drafter, RSDDrafter) and drafter.variant == "S":
        expected = 3 + 3  # beam width 3 at each of the 2 depths
        assert trees[0].depth.tolist() == [1, 1, 1, 2, 2, 2]
    else:
        expected = 3 + 3 * 2 if isinstance(drafter, MCSDDrafter) else 2 + 2 * 2
    assert len(trees[0]) == expected  # the first draft has room for the full tree
    for tree in (t for t in trees if len(t)):
        assert tree.sibling_scheme == drafter.sibling_scheme
        if tree.sibling_scheme == "without_replacement":  # siblings are distinct tokens
            for node in [-1] + list(range(len(tree))):
                kids = [int(tree.tokens[c]) for c in tree.children(node)]
                assert len(kids) == len(set(kids))
    greedy = target.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(target.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0,
                                       custom_generate=SpeculativeDecoding(drafter)), greedy)  # top-k tree, greedy


def test_argument_checks():
    assert isinstance(MCSDDrafter(), Drafter)
    with pytest.raises(ValueError, match="branching"):
        MCSDDrafter(branching=())
    with pytest.raises(ValueError, match="sibling_scheme"):
        MCSDDrafter(sibling_scheme="deterministic")


def test_dyspec_grows_a_budgeted_tree_and_keeps_the_target_distribution():
    from hf_decoding_ext.speculative.drafters.dyspec import DySpecDrafter

    vocab, length, n = 6, 2, 2500
    target, draft = _peaky_tiny_llama(1, vocab), _peaky_tiny_llama(2, vocab)
    prompt = [1, 2, 3]
    probs = _exact_sequence_distribution(target, prompt, length, vocab)
    drafter = DySpecDrafter(draft, num_nodes=5, max_depth=2)
    trees = _record(drafter)
    loop = SpeculativeDecoding(drafter, acceptance="speculative")
    counts = _sample_counts(target, prompt, length, n, loop)
    assert _chi_square_pvalue(counts, probs, n) > 1e-3
    trees.clear()
    ids = torch.tensor([prompt])
    target.generate(ids, max_new_tokens=8, do_sample=True, top_k=0, pad_token_id=0, custom_generate=loop)
    assert len(trees[0]) == 5 and int(trees[0].depth.max()) <= 2  # depth of a node: 1 for the root's children
    greedy = target.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    trees.clear()
    assert torch.equal(target.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0,
                                       custom_generate=SpeculativeDecoding(drafter)), greedy)
    tree = trees[0]  # greedy: children in decreasing draft probability, grown where the path probability is highest
    assert tree.sibling_scheme == "deterministic" and len(tree) == 5
    with pytest.raises(ValueError, match="num_nodes"):
        DySpecDrafter(draft, num_nodes=0)


def test_conditioned_gumbels_keep_order_and_take_the_parent_maximum():
    from hf_decoding_ext.speculative.drafters.rsd import conditioned_gumbels

    scores = torch.tensor([0.3, -1.2, 2.5, 0.0])
    out = conditioned_gumbels(-0.7, scores)
    assert torch.allclose(out.max(), torch.tensor(-0.7))
    assert torch.equal(torch.argsort(out), torch.argsort(scores))
    direct = -torch.log(torch.exp(torch.tensor(0.7)) - torch.exp(-scores.max()) + torch.exp(-scores))
    assert torch.allclose(out, direct, atol=1e-5)  # Kool et al.'s Eq. 4 (the unstable form)


def test_rsd_s_with_wrong_draft_rows_is_biased():
    """Negative control of the harness: RSD-S verified against sharpened draft rows (not the distributions the
    siblings were drawn from) no longer follows the target."""
    vocab, length, n = 6, 2, 2500
    target, draft = _peaky_tiny_llama(1, vocab), _peaky_tiny_llama(2, vocab)
    prompt = [1, 2, 3]
    probs = _exact_sequence_distribution(target, prompt, length, vocab)
    drafter = RSDDrafter(draft, variant="S", beam_width=3, depth=2)
    propose = drafter.propose

    def mutant(state):
        d = propose(state)
        if d.tree.draft_probs is not None:
            sharp = d.tree.draft_probs ** 3
            d.tree.draft_probs = sharp / sharp.sum(-1, keepdim=True)
        return d
    drafter.propose = mutant
    counts = _sample_counts(target, prompt, length, n, SpeculativeDecoding(drafter, acceptance="speculative"))
    assert _chi_square_pvalue(counts, probs, n) < 1e-3


def test_rsd_arguments():
    with pytest.raises(ValueError, match="variant"):
        RSDDrafter(variant="X")
    with pytest.raises(ValueError, match="beam_width"):
        RSDDrafter(variant="S", beam_width=0)
