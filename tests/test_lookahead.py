"""Lookahead Decoding drafter: window mask/positions, n-gram pool, lossless greedy, tokens per forward."""

import pytest
import torch

from hf_decoding_ext.speculative import SpeculativeDecoding
from hf_decoding_ext.speculative.drafters.lookahead import LookaheadDrafter, lookahead_pattern



def _reference_mask(level_sizes):
    """The reference implementation's lookahead mask (root column 0 included), written block by block."""
    size = level_sizes[0] + 1
    total = size * len(level_sizes)
    allowed = torch.zeros(total, total, dtype=torch.bool)
    for level in range(len(level_sizes)):
        for r in range(size):
            row = level * size + r
            allowed[row, : r + 1] = True  # causal over block 0 (root + level 0)
            for k in range(1, level + 1):
                allowed[row, k * size + r] = True  # the same column in the levels above
    return allowed


@pytest.mark.parametrize("w,n", [(4, 3), (5, 4), (3, 5)])
def test_window_mask_and_positions_match_the_paper(w, n):
    sizes = [w - 1] + [w] * (n - 2)
    allowed, depth = lookahead_pattern(sizes)
    ref = _reference_mask(sizes)
    # drop the root (column/row 0 of block 0), which is the committed token here
    keep = torch.ones(ref.shape[0], dtype=torch.bool)
    keep[0] = False
    assert torch.equal(allowed, ref[keep][:, keep])
    # positions: level 0 token j at j + 1, level l token r at l + r (reference's ids_list)
    expected = list(range(1, w)) + [lvl + r for lvl in range(1, n - 1) for r in range(w)]
    assert depth.tolist() == expected
    # every side node sees a contiguous run of offsets 1..depth (a causal sequence through the window)
    for i in range(allowed.shape[0]):
        seen = sorted(depth[allowed[i]].tolist())
        assert seen == list(range(1, int(depth[i]) + 1))


def test_pool_and_window_update_after_a_step():
    d = LookaheadDrafter(window_size=3, ngram_size=4, max_guesses=2)
    d._eos, d._seq_tokens = {2}, [50]
    d.levels = [[10, 11], [20, 21, 22], [30, 31, 32]]  # steady state: W - 1, W, W tokens
    d.fill_level = 2
    d.update_window(root=9, outputs=[40, 41, 42])
    assert d.pool == {9: [(20, 30, 40)], 10: [(21, 31, 41)], 11: [(22, 32, 42)]}
    assert d.levels == [[21, 22], [30, 31, 32], [40, 41, 42]]
    d.update_window(root=7, outputs=[2, 43, 44])  # eos in the new level is replaced by a sequence token
    assert d.levels[2] == [50, 43, 44] and d.pool[7] == [(30, 40, 2)]
    d.add_ngram(9, [1, 1, 1])
    d.add_ngram(9, [20, 30, 40])  # re-inserted: most recent
    d.add_ngram(9, [5, 5, 5])  # G = 2: least recently used (1, 1, 1) is evicted
    assert d.pool[9] == [(20, 30, 40), (5, 5, 5)]


def test_warmup_fills_levels_then_verifies(tiny_llama):
    d = LookaheadDrafter(window_size=4, ngram_size=4, seed=1)
    loop = SpeculativeDecoding(d)
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    tiny_llama.generate(ids, max_new_tokens=1, do_sample=False, custom_generate=loop)
    assert d.fill_level == 1 and [len(x) for x in d.levels[:2]] == [4, 5]
    out = tiny_llama.generate(ids, max_new_tokens=6, do_sample=False, custom_generate=loop,
                              return_dict_in_generate=True)
    sizes = [s.draft_size for s in out.spec_stats]
    assert sizes[:2] == [0, 0]  # no verification branch during the N - 2 warm-up steps
    assert d.fill_level == 2 and [len(x) for x in d.levels] == [3, 4, 4]
    assert d.pool and all(len(v) == 3 for entries in d.pool.values() for v in entries)
    with pytest.raises(ValueError):
        LookaheadDrafter(ngram_size=2)


def test_greedy_lossless_on_tiny_models(tiny_model):
    for w, n in ((4, 3), (7, 5)):
        loop = SpeculativeDecoding(LookaheadDrafter(window_size=w, ngram_size=n))
        for prompt, length in (([3, 4, 5, 3, 4, 5, 3, 4], 30), ([7, 6, 5, 4, 3, 9, 9], 17), ([11, 12], 5)):
            ids = torch.tensor([prompt])
            ref = tiny_model.generate(ids, max_new_tokens=length, do_sample=False)
            out = tiny_model.generate(ids, max_new_tokens=length, do_sample=False, custom_generate=loop)
            assert torch.equal(ref, out)


def test_keep_pool_and_pool_from_prompt(tiny_llama):
    d = LookaheadDrafter(window_size=4, ngram_size=3, keep_pool=True, pool_from_prompt=True)
    loop = SpeculativeDecoding(d)
    ids = torch.tensor([[3, 4, 5, 3, 4, 5]])
    tiny_llama.generate(ids, max_new_tokens=1, do_sample=False, custom_generate=loop)
    assert (4, 5) in d.pool[3] and (5, 3) in d.pool[4]  # the prompt's 3-grams
    before = {k: list(v) for k, v in d.pool.items()}
    tiny_llama.generate(torch.tensor([[9, 10]]), max_new_tokens=1, do_sample=False, custom_generate=loop)
    assert all(set(v) <= set(d.pool[k]) for k, v in before.items())
    d.reset()
    assert d.pool == {}
