"""Jacobi / GS-Jacobi drafter: the Jacobi update, block handling, lossless greedy, tokens per forward."""

import pytest
import torch

from hf_decoding_ext.speculative import SpeculativeDecoding
from hf_decoding_ext.speculative.drafters.base import VerifyResult
from hf_decoding_ext.speculative.drafters.jacobi import JacobiDrafter



def test_jacobi_update_is_the_argmax_after_the_accepted_prefix():
    d = JacobiDrafter(block_size=5, mode="jacobi", init_token=0)
    logits = torch.zeros(5, 10)
    for row, tok in enumerate([4, 5, 6, 7, 8]):  # argmax at the root and at guesses 1..4
        logits[row, tok] = 1.0
    assert d.jacobi_update(logits, 0) == [5, 6, 7, 8]
    assert d.jacobi_update(logits, 2) == [7, 8]
    assert d.jacobi_update(logits, 4) == []


class _State:
    def __init__(self, ids):
        self.input_ids = torch.tensor([ids])


def _observe(d, state, draft, logits, accepted):
    d.observe(state, VerifyResult(draft, logits, None, accepted, []))


def test_sliding_and_block_iterates():
    logits = torch.zeros(4, 10)
    for row, tok in enumerate([4, 5, 6, 7]):
        logits[row, tok] = 1.0
    # sliding Jacobi: remaining argmaxes, padded with the init token back to block_size - 1 guesses
    d = JacobiDrafter(block_size=4, mode="jacobi", init_token=1)
    d._init = 1
    draft = d.propose(_State([3, 3]))
    assert draft.tree.tokens.tolist() == [1, 1, 1] and draft.tree.parents.tolist() == [-1, 0, 1]
    _observe(d, _State([3, 3]), draft, logits, [0])  # guess 1 accepted, bonus 5: next iterate 6, 7 (+ pad)
    assert d.propose(_State([3, 3, 1, 5])).tree.tokens.tolist() == [6, 7, 1]
    # GS-Jacobi: the iterate stays inside the block; a solved block starts a new one of init tokens
    g = JacobiDrafter(block_size=4, init_token=1)
    g._init, g._block_last = 1, -1
    draft = g.propose(_State([3, 3]))  # block = input positions 1..4: root + 3 guesses
    assert draft.tree.tokens.tolist() == [1, 1, 1] and g._block_last == 4
    _observe(g, _State([3, 3]), draft, logits, [])  # nothing accepted, bonus 4 at position 2
    assert g.propose(_State([3, 3, 4])).tree.tokens.tolist() == [5, 6]
    _observe(g, _State([3, 3, 4]), g.propose(_State([3, 3, 4])), logits[:3], [0])  # root now at 4 = block end
    assert g.propose(_State([3, 3, 4, 5, 5])).tree.tokens.tolist() == []
    assert g.propose(_State([3, 3, 4, 5, 5, 9])).tree.tokens.tolist() == [1, 1, 1]  # new block
    with pytest.raises(ValueError):
        JacobiDrafter(block_size=1)
    with pytest.raises(ValueError):
        JacobiDrafter(mode="seidel")


@pytest.mark.parametrize("mode", ["gs-jacobi", "jacobi"])
def test_greedy_lossless_on_tiny_models(tiny_model, mode):
    for block in (2, 4):
        loop = SpeculativeDecoding(JacobiDrafter(block_size=block, mode=mode))
        for prompt, length in (([3, 4, 5, 3, 4, 5, 3, 4], 30), ([7, 6, 5, 4, 3, 9, 9], 17), ([11, 12], 5)):
            ids = torch.tensor([prompt])
            ref = tiny_model.generate(ids, max_new_tokens=length, do_sample=False)
            out = tiny_model.generate(ids, max_new_tokens=length, do_sample=False, custom_generate=loop)
            assert torch.equal(ref, out)


def test_fixed_point_iteration_converges_on_a_self_consistent_block(tiny_llama):
    """Guesses already at the fixed point (the greedy continuation) are all accepted in one step."""
    ids = torch.tensor([[3, 4, 5]])
    greedy = tiny_llama.generate(ids, max_new_tokens=6, do_sample=False)[0, 3:].tolist()
    d = JacobiDrafter(block_size=4, mode="jacobi", init_token=0)
    loop = SpeculativeDecoding(d)
    d.begin = lambda state: setattr(d, "guess", greedy[:3]) or setattr(d, "_init", 0)
    out = tiny_llama.generate(ids, max_new_tokens=4, do_sample=False, custom_generate=loop)
    assert out[0, 3:].tolist() == greedy[:4] and loop.summary()["steps"] == 1
