"""ADED (arXiv 2407.12021): the adaptive tri-gram table, the PUCT draft search, losslessness and the paper's
adaptation property on the real model.

- the table counts the tri-grams of the prompt and of every emitted token (frequencies, back-off to bigrams);
  frozen after the prompt with ``adaptive=False``;
- the search: a deterministic table gives the chain of its tokens; with branching it spends visits on the likelier
  branch, keeps the tree prefix-closed and within the node budget;
- greedy token identity on tiny models;
- the real default model over 256 greedy tokens: accepted tokens per step rise from the first half of the generation
  to the second (adaptation) and beat a frozen table (prompt tri-grams only).
"""

from __future__ import annotations

import pytest
import torch

from hf_decoding_ext.speculative import SpeculativeDecoding
from hf_decoding_ext.speculative.drafters.aded import ADEDDrafter
from hf_decoding_ext.speculative.drafters.base import Draft, VerifyResult
from hf_decoding_ext.core.tree import DraftTree


class _State:
    def __init__(self, ids):
        self.input_ids = torch.tensor([ids])


def test_table_and_search():
    d = ADEDDrafter(max_nodes=4, simulations=16, max_depth=4)
    d.begin(_State([1, 2, 3, 4, 1, 2, 3]))
    assert d.table.lookup([1, 2]) == ([3], [1.0]) and d.table.lookup([2, 3]) == ([4], [1.0])
    assert d.search([2, 3]) == [(4,), (4, 1), (4, 1, 2), (4, 1, 2, 3)]  # the only continuation, as a chain
    d.table.update([2, 3], [5], [1.0])  # "2 3" -> 4 (2 of 3) or 5 (1 of 3)
    d.table.update([2, 3], [4], [1.0])
    paths = d.search([2, 3])
    assert len(paths) == 4 and paths[0] == (4,) and (4, 1) in paths  # the likelier branch first and deeper
    assert all(len(p) == 1 or p[:-1] in paths for p in paths)  # prefix-closed
    # observe: emitted tokens enter the table (adaptive) or not (frozen)
    draft = Draft(DraftTree.chain([4]))
    d.observe(_State([1, 2, 3]), VerifyResult(draft, torch.zeros(2, 10), None, [0], [4, 9]))
    assert d.table.lookup([3, 4]) == ([1, 9], [0.5, 0.5])  # "3 4 1" from the prompt, "3 4 9" emitted
    frozen = ADEDDrafter(adaptive=False)
    frozen.begin(_State([1, 2, 3]))
    frozen.observe(_State([1, 2, 3]), VerifyResult(draft, torch.zeros(2, 10), None, [0], [4, 9]))
    assert frozen.table.lookup([4, 9]) is None and frozen.table.lookup([3, 4]) is None
    for bad in ({"max_nodes": 0}, {"simulations": 0}, {"c_puct": -1.0}, {"adaptive": 1}):
        with pytest.raises(ValueError):
            ADEDDrafter(**bad)


def test_greedy_is_token_identical_on_tiny_models(tiny_model):
    ids = torch.tensor([[1, 5, 9, 3, 1, 5, 9, 3]])
    ref = tiny_model.generate(ids, max_new_tokens=30, do_sample=False, pad_token_id=0)
    loop = SpeculativeDecoding(ADEDDrafter())
    out = tiny_model.generate(ids, max_new_tokens=30, do_sample=False, pad_token_id=0, custom_generate=loop)
    assert torch.equal(out, ref)
    assert loop.summary()["mean_accepted"] > 0


@pytest.mark.real_model
@pytest.mark.parametrize("n_prompts", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_acceptance_adapts_over_a_long_generation_real_model(smollm, n_prompts):
    """Greedy, 2 benchmark prompts (4 in the slow run, the registry's figures) x 256 tokens (eos suppressed):
    accepted draft tokens per step in the second half of each generation exceed the first half, and the adaptive
    table beats the frozen one over the whole run."""
    from hf_decoding_ext.bench.prompts import interleaved_prompts
    from hf_decoding_ext.bench.speed import encode_prompt

    model, tokenizer = smollm
    figures = {}
    for name, adaptive in (("adaptive", True), ("frozen", False)):
        first = second = steps1 = steps2 = 0
        for row in interleaved_prompts(n_prompts):
            loop = SpeculativeDecoding(ADEDDrafter(adaptive=adaptive))  # a fresh table per prompt
            model.generate(**encode_prompt(row, tokenizer), max_new_tokens=256, min_new_tokens=256,
                           do_sample=False, custom_generate=loop)
            stats, produced = loop.last_stats, 0
            for s in stats:
                if produced < 128:
                    first, steps1 = first + s.accepted, steps1 + 1
                else:
                    second, steps2 = second + s.accepted, steps2 + 1
                produced += s.appended
        figures[name] = {"first_half": first / steps1, "second_half": second / steps2,
                         "all": (first + second) / (steps1 + steps2)}
    print("ADED accepted draft tokens per step:", figures)
    assert figures["adaptive"]["second_half"] > figures["adaptive"]["first_half"], figures
    assert figures["adaptive"]["all"] > figures["frozen"]["all"], figures
