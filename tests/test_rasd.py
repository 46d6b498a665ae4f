"""RASD (arXiv 2503.03434): tree fusion, retrieval pruning, losslessness and the paper's property.

- the core fusion utility: longest-prefix matching of several trees, the best nodes under one budget,
  prefix-closed, per-tree node maps;
- the context retrieval returns every earlier occurrence's continuation, most recent first;
- pruning keeps only continuations whose first token is among the draft model's top-k first tokens, and values
  the retrieval trie by that probability times the branch share;
- the fused draft: the draft tree's nodes are kept when retrieval finds nothing, retrieved branches enter the tree
  when they match; greedy output token-identical to greedy on a tiny model; sampling exact in distribution;
- the real default model with the shipped EAGLE/FSPAD head: at the same node budget, more tokens per target forward
  than the head's tree alone and than prompt lookup alone on copy-heavy prompts (summaries and questions about a
  pasted document).
"""

from __future__ import annotations

import pytest
import torch

from hf_decoding_ext.core.tree import DraftTree, fuse_trees
from hf_decoding_ext.speculative import SpeculativeDecoding
from hf_decoding_ext.core.suffix_index import context_continuations
from hf_decoding_ext.speculative.drafters.rasd import RASDDrafter


def _tiny_eagle(model):
    from hf_decoding_ext.speculative.heads.eagle import EagleDrafterConfig, EagleDrafterModel

    torch.manual_seed(0)
    cfg = EagleDrafterConfig(hidden_size=model.config.hidden_size, vocab_size=model.config.vocab_size,
                             num_draft_tokens=3)
    cfg.from_base_config(model.config)
    return EagleDrafterModel(cfg).attach(model).eval()


def test_fuse_trees_matches_prefixes_and_keeps_the_best_nodes():
    a = DraftTree(torch.tensor([5, 6, 7, 8]), [-1, 0, -1, 1])  # 5 -> 6 -> 8, and 7
    b = DraftTree.chain(torch.tensor([5, 6, 9, 4]))  # 5 -> 6 -> 9 -> 4
    va, vb = [0.6, 0.3, 0.2, 0.1], [0.5, 0.45, 0.4, 0.35]
    fused, maps = fuse_trees([a, b], [va, vb], max_nodes=None)
    # longest-prefix matching: "5 6" is shared, every distinct path appears once
    assert len(fused) == 6
    paths = {tuple(int(fused.tokens[j]) for j in fused.path_to(i)) for i in range(len(fused))}
    assert paths == {(5,), (5, 6), (5, 6, 8), (7,), (5, 6, 9), (5, 6, 9, 4)}
    assert maps[0][0] == maps[1][0] and maps[0][1] == maps[1][1]
    # the budget keeps the highest-valued nodes (shared nodes take the larger value), prefix-closed
    fused, maps = fuse_trees([a, b], [va, vb], max_nodes=4)
    assert fused.tokens.tolist() == [5, 6, 9, 4] and fused.parents.tolist() == [-1, 0, 1, 2]
    assert maps == [[0, 1, -1, -1], [0, 1, 2, 3]]
    fused, _ = fuse_trees([a, b], [va, vb], max_nodes=5)
    assert sorted(fused.tokens.tolist()) == [4, 5, 6, 7, 9]  # 7 (0.2) beats 8 (0.1)
    with pytest.raises(ValueError):
        fuse_trees([a], [va[:2]], 3)
    sampled = DraftTree.chain(torch.tensor([1]), torch.full((1, 4), 0.25))
    with pytest.raises(ValueError, match="deterministic"):
        fuse_trees([sampled], [[1.0]], 3)


def test_context_continuations():
    ids = torch.tensor([1, 2, 3, 9, 1, 2, 4, 5, 7, 1, 2])
    assert context_continuations(ids, length=3) == [[4, 5, 7], [3, 9, 1]]  # "1 2" twice, most recent first
    assert context_continuations(ids, length=3, limit=1) == [[4, 5, 7]]
    assert context_continuations(torch.tensor([1, 2, 3]), length=2) == []
    # the longest suffix wins: "7 1 2" occurs nowhere before, "1 2" does
    assert context_continuations(torch.tensor([7, 1, 2, 8, 1, 2]), length=1, max_ngram=3) == [[8]]


def test_pruning_keeps_continuations_the_draft_model_supports(tiny_llama):
    d = RASDDrafter(_tiny_eagle(tiny_llama), prune_top_k=2, max_nodes=4)
    q = torch.zeros(tiny_llama.config.vocab_size)
    q[10], q[11], q[12] = 0.5, 0.3, 0.2
    tree, values = d.prune([[10, 3, 4], [12, 5], [11, 3], [10, 3, 6]], q)
    assert sorted(tree.tokens[tree.depth == 1].tolist()) == [10, 11]  # 12 is outside the top-2
    by_path = {tuple(int(tree.tokens[j]) for j in tree.path_to(i)): v for i, v in enumerate(values)}
    assert by_path[(10,)] == pytest.approx(0.5 * 2 / 3) and by_path[(10, 3, 4)] == pytest.approx(0.5 / 3)
    assert by_path[(11,)] == pytest.approx(0.3 / 3)
    tree, values = d.prune([[12, 1]], q)
    assert len(tree) == 0 and values == []
    for bad in ({"max_nodes": 0}, {"prune_top_k": 1.5}, {"retrieval": "rest"}, {"min_ngram": 4}):
        with pytest.raises(ValueError):
            RASDDrafter(_tiny_eagle(tiny_llama), **bad)


def test_fused_draft_and_greedy_identity_on_a_tiny_model(tiny_llama, monkeypatch):
    torch.manual_seed(1)
    vocab = tiny_llama.config.vocab_size
    drafter = RASDDrafter(_tiny_eagle(tiny_llama), max_nodes=6, prune_top_k=vocab)  # prune nothing
    loop = SpeculativeDecoding(drafter)
    block = torch.randint(3, vocab, (12,))
    ids = torch.cat([block, block, block[:3]])[None]  # a repeated block: retrieval has a long match
    ref = tiny_llama.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0)
    out = tiny_llama.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0, custom_generate=loop)
    assert torch.equal(out, ref)
    # a step with retrieval: the fused tree has retrieved nodes beyond the head's tree, within the budget
    assert drafter.last_info["nodes"] <= 6
    seen_retrieval = []
    orig = drafter.propose

    def spy(state):
        draft = orig(state)
        seen_retrieval.append(drafter.last_info.get("retrieval_nodes", 0))
        return draft

    drafter.propose = spy
    # a head that (by its measured accuracies) rarely gets anything right: retrieved branches outrank its nodes
    monkeypatch.setattr(drafter.model_drafter.head.config, "head_accuracies", [[0.001] * 4] * 3)
    tiny_llama.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, custom_generate=loop)
    assert max(seen_retrieval) > 0
    monkeypatch.undo()
    # no retrieval match at all: the head's tree alone
    drafter.propose = orig
    plain = torch.arange(3, 3 + 10)[None] % vocab
    ref = tiny_llama.generate(plain, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(tiny_llama.generate(plain, max_new_tokens=6, do_sample=False, pad_token_id=0,
                                           custom_generate=loop), ref)


def test_sampling_is_exact_in_distribution():
    from tests.test_speculative_engine import (
        _chi_square_pvalue,
        _exact_sequence_distribution,
        _peaky_tiny_llama,
        _sample_counts,
    )

    target = _peaky_tiny_llama(seed=4, vocab=6)
    prompt = [1, 2, 3, 1, 2]
    exact = _exact_sequence_distribution(target, prompt, length=2, vocab=6)
    loop = SpeculativeDecoding(RASDDrafter(_tiny_eagle(target), max_nodes=4, prune_top_k=6))
    n = 1500
    counts = _sample_counts(target, prompt, 2, n, loop)
    assert _chi_square_pvalue(counts, exact, n) > 1e-3


@pytest.mark.real_model
def test_fused_tree_accepts_more_than_either_part_at_the_same_budget_real_model(smollm):
    """Greedy, 4 copy-heavy benchmark prompts (2 summarisation, 2 RAG questions: a pasted document) x 64 tokens,
    8 nodes each: tokens per target forward of RASD against the EAGLE/FSPAD head's tree alone and prompt lookup
    alone (an 8-token chain)."""
    from hf_decoding_ext.bench.prompts import load_prompts
    from hf_decoding_ext.bench.speed import encode_prompt
    from hf_decoding_ext.speculative.drafters.eagle import EagleDrafter
    from hf_decoding_ext.speculative.drafters.prompt_lookup import PromptLookupDrafter

    model, tokenizer = smollm
    rows = load_prompts(["summarization", "rag_qa"], per_category=2)
    arms = {"rasd": RASDDrafter.for_model(model, max_nodes=8),
            "eagle": EagleDrafter.for_model(model, max_nodes=8),
            "prompt-lookup": PromptLookupDrafter(num_tokens=8)}
    figures, outputs = {}, {}
    for name, drafter in arms.items():
        loop = SpeculativeDecoding(drafter)
        tokens = steps = 0
        outputs[name] = []
        for row in rows:
            out = model.generate(**encode_prompt(row, tokenizer), max_new_tokens=64, do_sample=False,
                                 custom_generate=loop)
            outputs[name].append(out)
            tokens += sum(s.appended for s in loop.last_stats)
            steps += len(loop.last_stats)
        figures[name] = tokens / steps
    print("tokens per target forward:", figures)
    for a, b in zip(outputs["rasd"], outputs["eagle"]):
        assert torch.equal(a, b)  # both token-identical to greedy
    assert figures["rasd"] >= max(figures["eagle"], figures["prompt-lookup"]), figures
