"""Token Recycling: adjacency-matrix updates, the static tree, persistence across prompts, losslessness."""

from __future__ import annotations

import pytest
import torch

from hf_decoding_ext.core.models import encode_prompts
from hf_decoding_ext.speculative import SpeculativeDecoding
from hf_decoding_ext.speculative.drafters.base import VerifyResult
from hf_decoding_ext.speculative.drafters.merged import MergedDrafter
from hf_decoding_ext.speculative.drafters.prompt_lookup import PromptLookupDrafter
from hf_decoding_ext.speculative.drafters.token_recycling import (
    CPU_MAX_NODES,
    NODE_PRIORITY,
    PAPER_TREE_CHILDREN,
    TokenRecyclingDrafter,
    expand_template,
)


class _State:
    """The few GenerationState fields a drafter reads."""

    def __init__(self, model, ids):
        self.model = model
        self.input_ids = ids


def test_paper_tree_and_priority_prefixes_are_valid_subtrees():
    paths = expand_template(PAPER_TREE_CHILDREN)
    assert len(paths) == 80 and max(len(p) for p in paths) == 6
    assert set(NODE_PRIORITY) <= set(paths) and len(set(NODE_PRIORITY)) == len(NODE_PRIORITY)
    for i, p in enumerate(NODE_PRIORITY):
        assert len(p) == 1 or p[:-1] in NODE_PRIORITY[:i]
    for n in (1, 5, 16, 40, 80):
        d = TokenRecyclingDrafter(max_nodes=n)
        assert d.num_nodes == n and all(int(p) < i for i, p in enumerate(d._parents))
    assert TokenRecyclingDrafter(max_nodes=None).num_nodes == 80
    assert TokenRecyclingDrafter(max_depth=2, max_nodes=None).num_nodes == 8 + 21
    for bad in ({"k": 0}, {"max_depth": 0}, {"max_nodes": 0}, {"max_nodes": "big"}, {"k": 4, "max_nodes": None}):
        with pytest.raises(ValueError):
            TokenRecyclingDrafter(**bad)


def _drafter_paths(d: TokenRecyclingDrafter) -> list[tuple[int, ...]]:
    """Rank paths of the drafter's static tree, from its parents and ranks."""
    paths: list[tuple[int, ...]] = []
    for parent, rank in zip(d._parents.tolist(), d._ranks.tolist()):
        paths.append((paths[parent] if parent >= 0 else ()) + (rank,))
    return paths


def test_max_nodes_keeps_the_most_often_accepted_nodes():
    """The tree of ``n`` nodes is the best-first tree by the acceptance counted per node on the distillation prompts
    (shipped gains): the first ``n`` nodes of that order, laid out in it (parents first)."""
    full = TokenRecyclingDrafter(max_nodes=None)
    order, gains = full._template, full.node_gains
    assert gains is not None and len(order) == len(gains) == 80 and order[0] == (0,)
    assert set(order) == set(expand_template(PAPER_TREE_CHILDREN))
    for i, path in enumerate(order):  # best-first: the highest gain among the nodes whose parent is picked
        frontier = [p for p in order[i:] if len(p) == 1 or p[:-1] in set(order[:i])]
        assert gains[i] >= max(gains[order.index(p)] for p in frontier) - 1e-12
    for n in (1, 3, 16, 40, 80, 200):
        paths = _drafter_paths(TokenRecyclingDrafter(max_nodes=n))
        assert paths == order[:n]
    shallow = _drafter_paths(TokenRecyclingDrafter(max_depth=2, max_nodes=10))
    assert shallow == [p for p in order if len(p) <= 2][:10]


def test_without_shipped_gains_the_fallback_priority_is_used(monkeypatch):
    from hf_decoding_ext.speculative.policies import tuning

    monkeypatch.setattr(tuning, "shipped_entry", lambda name: None)
    bfs = expand_template(PAPER_TREE_CHILDREN)
    ranking = list(NODE_PRIORITY) + [p for p in bfs if p not in set(NODE_PRIORITY)]
    d = TokenRecyclingDrafter(max_nodes=16)
    assert d.node_gains is None and _drafter_paths(d) == ranking[:16]


def test_auto_size_follows_the_device(tiny_llama, monkeypatch):
    """max_nodes="auto": the node budget of the verify-cost curve measured on the running model and the shipped
    acceptance gains (issue 16); without gains, the hand-set CPU size."""
    from hf_decoding_ext.speculative.policies import tuning
    from hf_decoding_ext.speculative.policies.tree_policy import VerifyCostCurve, node_budget

    curve = VerifyCostCurve((1, 4, 8, 16, 96), (1.0, 1.0, 1.1, 1.5, 4.0))
    monkeypatch.setattr(tuning, "device_curve", lambda model, kernels="auto": curve)
    d = TokenRecyclingDrafter()
    gains = d.node_gains  # counted on the distillation prompts, one per template node, in pick order
    assert gains is not None and len(gains) == 80
    d.begin(_State(tiny_llama, torch.tensor([[3, 4]])))
    assert d.num_nodes == node_budget(curve, gains)
    monkeypatch.setattr(tuning, "device_curve", lambda model, kernels="auto": VerifyCostCurve((1, 96), (1.0, 1.0)))
    d.begin(_State(tiny_llama, torch.tensor([[3, 4]])))
    free = node_budget(VerifyCostCurve((1, 96), (1.0, 1.0)), gains)
    assert d.num_nodes == free == max(i for i, g in enumerate(gains) if g > 0) + 1  # free: every accepted node pays
    monkeypatch.setattr(tuning, "shipped_entry", lambda name: None)
    monkeypatch.setattr(tuning, "shipped_gains", lambda name: None)
    d = TokenRecyclingDrafter()
    d.begin(_State(tiny_llama, torch.tensor([[3, 4]])))
    assert d.num_nodes == CPU_MAX_NODES  # no statistics: the hand-set CPU size


def test_tree_is_filled_from_the_adjacency_matrix_and_updated_from_logits(tiny_llama):
    d = TokenRecyclingDrafter(k=2, tree={(): 2, (0,): 2, (1,): 1}, max_nodes=None)
    state = _State(tiny_llama, torch.tensor([[3, 4, 5]]))
    d.begin(state)
    assert d.propose(state).tree.tokens.numel() == 0  # empty rows: everything pruned
    d.adjacency[5] = torch.tensor([10, 11])
    d.adjacency[10] = torch.tensor([20, 21])
    draft = d.propose(state)  # 11's row is empty: its child is pruned
    assert _drafter_paths(d) == [(0,), (0, 0), (1,), (1, 0), (0, 1)]  # by acceptance on the distillation prompts
    assert draft.tree.tokens.tolist() == [10, 20, 11, 21] and draft.tree.parents.tolist() == [-1, 0, -1, 0]
    assert draft.info["node_ids"] == [0, 1, 2, 4]  # node 3, (1, 0), dropped
    vocab = d.adjacency.shape[0]
    logits = torch.randn(1 + 4, vocab)
    committed = torch.randn(2, vocab)  # at tokens 3 and 4 (uncached prompt)
    d.observe(state, VerifyResult(draft, logits, None, [0], [10, 7], committed_top_k=committed.topk(2).indices))
    top = lambda x: x.topk(2).indices.tolist()  # noqa: E731
    assert d.adjacency[5].tolist() == top(logits[0])
    for node, tok in enumerate([10, 20, 11, 21]):
        assert d.adjacency[tok].tolist() == top(logits[node + 1])
    assert d.adjacency[3].tolist() == top(committed[0]) and d.adjacency[4].tolist() == top(committed[1])
    d.reset()
    assert d.adjacency is None


@pytest.mark.parametrize("max_nodes", [None, 8])
def test_greedy_lossless_on_tiny_models(tiny_model, max_nodes):
    loop = SpeculativeDecoding(TokenRecyclingDrafter(max_nodes=max_nodes))
    for prompt in ([3, 4, 5, 3, 4, 5, 3, 4], [7, 6, 5, 4, 3, 9, 9]):
        ids = torch.tensor([prompt])
        ref = tiny_model.generate(ids, max_new_tokens=30, do_sample=False)
        out = tiny_model.generate(ids, max_new_tokens=30, do_sample=False, custom_generate=loop)
        assert torch.equal(ref, out)
    assert loop.summary()["tokens_per_forward"] > 1.0


def test_merged_drafter_is_lossless_and_each_drafter_sees_its_nodes(tiny_model):
    tr = TokenRecyclingDrafter(max_nodes=8)
    for cap in (None, 6):
        loop = SpeculativeDecoding(MergedDrafter([PromptLookupDrafter(num_tokens=4), tr], max_nodes=cap))
        for prompt in ([3, 4, 5, 3, 4, 5, 3, 4], [7, 6, 5, 4, 3, 9, 9]):
            ids = torch.tensor([prompt])
            ref = tiny_model.generate(ids, max_new_tokens=30, do_sample=False)
            out = tiny_model.generate(ids, max_new_tokens=30, do_sample=False, custom_generate=loop)
            assert torch.equal(ref, out)
        if cap is not None:
            assert max(s.draft_size for s in loop.last_stats) <= cap
    # the recycled matrix was filled through the merged drafter: its rows are the target's top-k
    assert int((tr.adjacency[:, 0] >= 0).sum()) > 10
    with pytest.raises(ValueError):
        MergedDrafter([])


@pytest.mark.real_model
def test_hot_start_and_lossless_on_real_model(smollm):
    """The matrix persists across calls (the paper's hot start): a second pass drafts better, output unchanged."""
    from hf_decoding_ext.bench.prompts import load_prompts

    model, tokenizer = smollm
    drafter = TokenRecyclingDrafter(max_nodes=CPU_MAX_NODES)  # a fixed size: "auto" depends on the machine's timing
    loop = SpeculativeDecoding(drafter)
    rows = load_prompts(categories=["qa", "math_reasoning"], per_category=1)
    encs = [encode_prompts(tokenizer, row["prompt"]) for row in rows]
    refs = [model.generate(**enc, max_new_tokens=64, do_sample=False) for enc in encs]
    cold, hot = [], []
    for passes in (cold, hot):
        for row, enc, ref in zip(rows, encs, refs):
            out = model.generate(**enc, max_new_tokens=64, do_sample=False, custom_generate=loop)
            assert torch.equal(out, ref), row["id"]
            passes.append(loop.summary()["tokens_per_forward"])
    assert drafter.num_nodes == CPU_MAX_NODES
    assert min(cold) > 1.1 and sum(hot) > sum(cold), (cold, hot)
    drafter.reset()
    assert drafter.adjacency is None
