"""STAND (arXiv 2506.04708): the logit n-gram store, stochastic tree drafting, losslessness and the paper's
properties on the real model.

- the store: running-average merge truncated to the top k, longest-context back-off;
- drafting: children in Gumbel-Top-K order from the longest stored context, their distribution recorded with
  ``sibling_scheme="without_replacement"``; deterministic (ranked) drafts in greedy mode; pruned where nothing is
  stored;
- greedy token identity on tiny models; the exact target distribution over 3 tokens at T=1 with a store that
  differs from the target (so later siblings are tried), with a mutant (the store's ranked tokens declared sampled)
  as negative control;
- the real default model at T=0.6: a store shared by 4 trajectories of a prompt accepts more than one per trajectory
  (reproduced), the profiled tree more than the hand-set one (reproduced); stochastic drafting against
  deterministic drafting from the same kind of store is a strict xfail (not reproduced at T=0.6, figures in the
  marker).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from test_speculative_contrastive import _pooled_chi_square_pvalue
from test_speculative_engine import _exact_sequence_distribution, _peaky_tiny_llama
from test_speculative_jacobi import _State

from hf_decoding_ext.core.ngram_store import TopKNGramStore
from hf_decoding_ext.core.tree import DraftTree
from hf_decoding_ext.speculative import SpeculativeDecoding
from hf_decoding_ext.speculative.drafters.base import VerifyResult
from hf_decoding_ext.speculative.drafters.stand import (HAND_SET_TREE, PROFILE_TEMPLATE, STANDDrafter,
                                                        check_tree_paths, compact_tree, load_profiled_tree)
from hf_decoding_ext.speculative.drafters.token_recycling import expand_template


def test_store_merges_by_running_average_and_backs_off():
    s = TopKNGramStore(order=3, k=2)
    s.update([1, 2, 3], [4, 5, 6], [0.5, 0.3, 0.2])  # truncated to the top 2 before merging
    assert s.lookup([1, 2, 3]) == ([4, 5], [0.5, 0.3])
    s.update([9, 2, 3], [6], [1.0])  # contexts (9,2,3), (2,3), (3,)
    tokens, probs = s.lookup([7, 2, 3])  # backs off to (2, 3): average of two updates
    assert tokens == [6, 4] and probs == pytest.approx([0.5, 0.25])  # 5 (0.15) dropped by the top-2 cut
    assert s.count((2, 3)) == 2 and s.count((1, 2, 3)) == 1 and s.lookup([8]) is None
    s.update_from_probs([8], torch.tensor([0.1, 0.6, 0.3]))
    assert s.lookup([8]) == ([1, 2], pytest.approx([0.6, 0.3]))
    for bad in ({"order": 0}, {"k": 0}, {"order": 2, "min_order": 3}):
        with pytest.raises(ValueError):
            TopKNGramStore(**bad)


def test_drafting_from_the_store():
    d = STANDDrafter(order=2, k=3, tree={(): 3, (0,): 2})
    state = _State([1, 2], vocab=12)
    d.begin(state)
    assert len(d.propose(state).tree) == 0  # nothing stored yet
    d.store.update([1, 2], [7, 8, 9], [0.5, 0.3, 0.2])
    d.store.update([2, 7], [3], [1.0])
    torch.manual_seed(0)
    seen = set()
    for _ in range(40):
        tree = d.propose(state).tree
        assert tree.sibling_scheme == "without_replacement"
        roots = [int(tree.tokens[i]) for i in tree.children(-1)]
        assert sorted(roots) == [7, 8, 9]
        seen.add(tuple(roots))
        q = tree.draft_probs[tree.children(-1)[0]]
        assert q[[7, 8, 9]].tolist() == pytest.approx([0.5, 0.3, 0.2]) and float(q.sum()) == pytest.approx(1.0)
        first = tree.children(-1)[0]
        kids = [int(tree.tokens[i]) for i in tree.children(first)]
        assert kids == ([3] if roots[0] == 7 else [])  # "2 7" is stored; "2 8", "8", "2 9", "9" are not
    assert len(seen) > 2  # Gumbel-Top-K order varies
    greedy = d.propose(_State([1, 2], do_sample=False, vocab=12)).tree
    assert greedy.draft_probs is None and greedy.tokens.tolist() == [7, 8, 9, 3] and greedy.parents.tolist() == [
        -1, -1, -1, 0]
    # observe: the processed distributions at the root and accepted nodes enter the store
    d2 = STANDDrafter(order=2, k=2, tree={(): 2})
    d2.begin(state)
    tree = DraftTree(torch.tensor([4, 5]), torch.tensor([-1, 0]))
    logits = torch.full((3, 12), -10.0)
    logits[0, 4], logits[1, 5], logits[2, 6] = 5.0, 5.0, 5.0
    d2.observe(state, VerifyResult(type("D", (), {"tree": tree})(), logits, None, [0, 1], [4, 5, 6]))
    assert d2.store.lookup([1, 2])[0][0] == 4 and d2.store.lookup([2, 4])[0][0] == 5
    assert d2.store.lookup([4, 5])[0][0] == 6
    # persist=False empties the store at every generate() call
    fresh = STANDDrafter(persist=False)
    fresh.store.update([1, 2], [3], [1.0])
    fresh.begin(state)
    assert len(fresh.store) == 0
    for bad in ({"tree": {(): 3}, "k": 2}, {"tree": {}}, {"stochastic": 1}, {"persist": None}):
        with pytest.raises(ValueError):
            STANDDrafter(**bad)


def test_tree_paths_must_be_closed_under_parents_and_elder_siblings():
    assert check_tree_paths([(1,), (0,), (0, 0)]) == [(0,), (1,), (0, 0)]
    for bad in ([], [()], [(0,), (0,)], [(0, 0)], [(1,)], [(0,), (0, 1)], [(-1,)]):
        with pytest.raises(ValueError):
            check_tree_paths(bad)
    with pytest.raises(ValueError, match="elder sibling"):
        STANDDrafter(tree=[(0,), (2,)])


def test_compact_tree_keeps_the_most_accepted_nodes_with_what_they_need():
    hits = {(0,): 50, (1,): 20, (2,): 1, (0, 0): 30, (0, 1): 12, (0, 0, 0): 18, (1, 0): 15, (1, 1): 14}
    assert compact_tree(hits, 1) == [(0,)]
    assert compact_tree(hits, 3) == [(0,), (1,), (0, 0)]
    assert compact_tree(hits, 5) == [(0,), (1,), (0, 0), (1, 0), (0, 0, 0)]
    # (1, 1) needs its elder sibling (1, 0), already in; (0, 1) its elder (0, 0)
    assert compact_tree(hits, 7) == [(0,), (1,), (0, 0), (0, 1), (1, 0), (1, 1), (0, 0, 0)]
    # a popular node whose elder sibling is rare still enters with it when there is room
    assert compact_tree({(0,): 1, (1,): 9}, 2) == [(0,), (1,)]
    assert compact_tree({(0,): 1, (1,): 9}, 1) == [(0,)]
    with pytest.raises(ValueError, match="num_nodes"):
        compact_tree(hits, 0)


def test_the_default_tree_is_the_shipped_profiled_tree():
    # scripts/profile_stand_tree.py wrote hf_decoding_ext/data/stand/tree.json from PROFILE_TEMPLATE (130 nodes)
    profiled = load_profiled_tree()
    assert profiled is not None and len(profiled) == 17
    assert set(profiled) <= set(expand_template(PROFILE_TEMPLATE))
    assert profiled == check_tree_paths(profiled)  # closed under parents and elder siblings
    assert STANDDrafter().paths == profiled
    assert len(expand_template(PROFILE_TEMPLATE)) == 130 and len(expand_template(HAND_SET_TREE)) == 17


def test_record_hits_counts_the_accepted_path_per_rank_path(tiny_model):
    ids = torch.tensor([[1, 5, 9, 3, 1, 5, 9, 3]])
    drafter = STANDDrafter(tree=HAND_SET_TREE, record_hits=True)
    loop = SpeculativeDecoding(drafter)
    for _ in range(2):
        tiny_model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0, custom_generate=loop)
        accepted = sum(len(s.accepted_nodes) for s in loop.last_stats)
    hits = drafter.node_hits
    assert set(hits) == set(expand_template(HAND_SET_TREE))
    assert accepted > 0 and sum(hits[p] for p in hits if len(p) == 1) > 0
    assert all(hits[p] <= hits[p[:-1]] for p in hits if len(p) > 1)  # an accepted node's parent was accepted
    assert STANDDrafter().node_hits is None


def test_greedy_is_token_identical_on_tiny_models(tiny_model):
    ids = torch.tensor([[1, 5, 9, 3, 1, 5]])
    ref = tiny_model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0)
    loop = SpeculativeDecoding(STANDDrafter())
    for _ in range(2):  # the second call drafts from a store filled by the first
        out = tiny_model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0, custom_generate=loop)
        assert torch.equal(out, ref)
    assert loop.summary()["mean_accepted"] > 0


class _Frozen(STANDDrafter):
    """STAND with a store fixed in advance (filled from another model, so that drafts differ from the target and
    later siblings are tried): the distribution test below exercises the without-replacement rule."""

    def observe(self, state, result):
        pass


class _RankedClaimedSampled(_Frozen):
    """Mutant: children in the store's ranked order (no Gumbel-Top-K draw) but declared sampled from the store's
    distribution without replacement."""

    def _children(self, context, sample):
        hit = super()._children(context, sample)
        if hit is None or hit[1] is None:
            return hit
        ranked = sorted(hit[0], key=lambda t: -float(hit[1][t]))
        return ranked, hit[1]


@pytest.mark.parametrize("case,n", [("stand", 1500), ("mutant", 1500)])
def test_sampling_keeps_the_target_distribution(case, n):
    vocab, length = 4, 3
    target, other = _peaky_tiny_llama(3, vocab), _peaky_tiny_llama(4, vocab)
    prompt = [1, 2, 3]
    with torch.no_grad():
        probs = _exact_sequence_distribution(target, prompt, length, vocab)
    drafter = (_RankedClaimedSampled if case == "mutant" else _Frozen)(order=2, k=4, tree={(): 3, (0,): 2, (1,): 1})
    with torch.no_grad():  # the other model's next-token distributions after every 2-token context
        for ctx in itertools.product(range(vocab), repeat=2):
            p = torch.softmax(other(torch.tensor([list(ctx)])).logits[0, -1].float(), -1)
            drafter.store.update_from_probs(list(ctx), p)
    loop = SpeculativeDecoding(drafter)
    torch.manual_seed(0)
    counts, later_sibling = {}, 0
    for _ in range(n):
        out = target.generate(torch.tensor([prompt]), max_new_tokens=length, do_sample=True, top_k=0,
                              pad_token_id=0, custom_generate=loop)
        seq = tuple(out[0, len(prompt):].tolist())
        counts[seq] = counts.get(seq, 0) + 1
        later_sibling += sum(1 for s in loop.last_stats if s.accepted_nodes and s.accepted_nodes[0] in (1, 2))
    pvalue = _pooled_chi_square_pvalue(counts, probs, n)
    if case == "mutant":
        assert pvalue < 1e-6, pvalue
    else:
        assert pvalue > 1e-3, pvalue
        assert later_sibling > n // 20  # a later root sibling is accepted (the without-replacement path runs)


def _stand_tokens_per_forward(smollm, stochastic: bool, share: bool, trajectories=4, prompts=2, n_tokens=64,
                              tree=None):
    from hf_decoding_ext.bench.prompts import load_prompts
    from hf_decoding_ext.bench.speed import encode_prompt

    model, tokenizer = smollm
    tokens = steps = 0
    rows = load_prompts(categories=["math_reasoning"], per_category=prompts)
    for i, row in enumerate(rows):
        enc = encode_prompt(row, tokenizer)
        drafter = STANDDrafter(stochastic=stochastic, tree=tree)
        loop = SpeculativeDecoding(drafter)
        for t in range(trajectories):
            if not share:
                if not t:  # uncounted, and its store is cleared before the next: not run (the seeds stay per t)
                    continue
                drafter.reset()
            torch.manual_seed(100 * i + t)
            model.generate(**enc, max_new_tokens=n_tokens, do_sample=True, top_k=0, top_p=1.0, temperature=0.6,
                           custom_generate=loop)
            if t:  # trajectories 2..4: the ones that can draw on earlier trajectories of the prompt
                s = loop.summary()
                tokens, steps = tokens + s["tokens"], steps + s["steps"]
    return tokens / steps


_CONFIGS = {"stochastic, shared": dict(stochastic=True, share=True),
            "deterministic, shared": dict(stochastic=False, share=True),
            "stochastic, per trajectory": dict(stochastic=True, share=False),
            "stochastic, shared, hand-set tree": dict(stochastic=True, share=True, tree=HAND_SET_TREE)}


class _Figures(dict):
    """Tokens per target forward at T=0.6 on 2 math benchmark prompts x 4 trajectories (trajectories 2-4 counted),
    computed on first use per configuration (the default run needs two; the slow tests the other two). The default
    tree is the profiled one (profiled on distillation prompts, never these)."""

    def __init__(self, smollm):
        super().__init__()
        self.smollm = smollm

    def __missing__(self, key):
        self[key] = _stand_tokens_per_forward(self.smollm, **_CONFIGS[key])
        print("STAND tokens per target forward at T=0.6:", {k: round(v, 3) for k, v in self.items()})
        return self[key]


@pytest.fixture(scope="module")
def stand_figures(smollm):
    return _Figures(smollm)


@pytest.mark.real_model
def test_a_shared_store_accepts_more_than_one_per_trajectory_real_model(stand_figures):
    """The paper's cross-trajectory reuse: sharing the store across a prompt's sampled trajectories accepts more
    per target forward than a fresh store per trajectory (measured 1.76 against 1.26 with the profiled tree)."""
    assert stand_figures["stochastic, shared"] > stand_figures["stochastic, per trajectory"], stand_figures


@pytest.mark.real_model
@pytest.mark.slow  # one more configuration (about 30 s); a strict xfail: not reproduced
@pytest.mark.xfail(strict=True, reason=(
    "not reproduced at T=0.6 on the default model: stochastic drafting 1.76 tokens per target forward against 1.82 "
    "for deterministic drafting of the ranked stored tokens (profiled 17-node tree; 1.71 against 2.01 with the "
    "hand-set tree); with one-hot drafts the recursive rejection accepts exactly the target's mass on the drafted "
    "siblings, which the store's ranking captures well at low temperature. At T=1.0 (hand-set tree, measured once, "
    "not tested): 1.40 against 1.36"))
def test_stochastic_drafting_accepts_more_than_deterministic_real_model(stand_figures):
    """The paper's stochastic-drafting claim at T > 0 (here T=0.6): more accepted per target forward than
    deterministic n-gram drafting from the same kind of store."""
    assert stand_figures["stochastic, shared"] > stand_figures["deterministic, shared"], stand_figures


@pytest.mark.real_model
@pytest.mark.slow  # one more configuration; a small margin (1.76 against 1.71)
def test_the_profiled_tree_accepts_more_than_the_hand_set_tree_real_model(stand_figures):
    """The paper's data-driven tree: the 17 nodes kept by acceptance profiling on distillation prompts accept more
    per target forward than the hand-set 17-node tree on the benchmark prompts (measured 1.76 against 1.71)."""
    assert stand_figures["stochastic, shared"] > stand_figures["stochastic, shared, hand-set tree"], stand_figures
