"""core.candidates: candidate pools from one batched rollout and the reranking loop (tiny models)."""

from __future__ import annotations

import pytest
import torch

from hf_decoding_ext.core.candidates import CandidatePool, RerankingLoop, Selection, sample_pool
from hf_decoding_ext.core.loop import DecodingLoop
from hf_decoding_ext.core.scoring import LogProbScorer

PROMPTS = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 9, 5, 6]])
MASK = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
SAMPLE = dict(do_sample=True, pad_token_id=0, eos_token_id=2, top_k=None, top_p=None)


class _PoolProbe(DecodingLoop):
    """Samples pools inside generate() and keeps them (the state's output is left empty)."""

    def __init__(self, n, seed):
        self.n, self.seed, self.pools = n, seed, None

    def run(self, state):
        self.pools = sample_pool(state, self.n, generator=torch.Generator().manual_seed(self.seed))
        state.unfinished[:] = False


class MostLikely(RerankingLoop):
    def select(self, pool, state, row):
        return Selection(int(pool.logprobs.argmax()), pool.logprobs.float())


class LeastLikely(RerankingLoop):
    def select(self, pool, state, row):
        return Selection(int(pool.logprobs.argmin()), -pool.logprobs.float())


def _pools(model, n=5, seed=0, **kw):
    probe = _PoolProbe(n, seed)
    model.generate(PROMPTS, attention_mask=MASK, custom_generate=probe, max_new_tokens=6, **{**SAMPLE, **kw})
    return probe.pools


def test_pool_logprobs_match_a_recomputation(tiny_model):
    pools = _pools(tiny_model, temperature=1.0)
    scorer = LogProbScorer(tiny_model)
    assert len(pools) == 2
    for pool in pools:
        assert isinstance(pool, CandidatePool) and len(pool) == 5
        assert all(1 <= len(t) <= 6 for t in pool.tokens)
        assert all((e == "eos") == (t[-1] == 2) for e, t in zip(pool.ends, pool.tokens))
        again = scorer.score(pool.tokens, pool.prompt).double()
        torch.testing.assert_close(pool.logprobs, again, atol=1e-4, rtol=0)
        torch.testing.assert_close(pool.proposal_logprobs, pool.logprobs, atol=1e-6, rtol=0)  # untruncated T=1
    assert pools[0].prompt.tolist() == [5, 6, 7]


def test_pool_records_the_truncated_proposal(tiny_llama):
    pools = _pools(tiny_llama, temperature=0.7, top_k=4)
    for pool in pools:
        # the proposal is sharper than the model: each candidate is at least as likely under it
        assert bool((pool.proposal_logprobs >= pool.logprobs - 1e-9).all())
        assert bool((pool.proposal_logprobs > pool.logprobs + 1e-6).any())


def test_pools_are_reproducible_from_the_seed(tiny_llama):
    assert _pools(tiny_llama, seed=3)[1].tokens == _pools(tiny_llama, seed=3)[1].tokens
    assert _pools(tiny_llama, seed=3)[1].tokens != _pools(tiny_llama, seed=4)[1].tokens


@pytest.mark.parametrize("loop_cls", [MostLikely, LeastLikely])
def test_reranking_loop_returns_the_selected_candidate(tiny_model, loop_cls):
    loop = loop_cls(n=6, seed=1)
    out = tiny_model.generate(PROMPTS, attention_mask=MASK, custom_generate=loop, max_new_tokens=8,
                              return_dict_in_generate=True, output_scores=True, **SAMPLE)
    new = out.sequences[:, PROMPTS.shape[1]:]
    for row in range(2):
        pool = out.candidates[row]
        assert len(pool) == 6
        lp = LogProbScorer(tiny_model).score(pool, PROMPTS[row][MASK[row].bool()])
        want = pool[int(lp.argmax() if loop_cls is MostLikely else lp.argmin())]
        got = new[row].tolist()[:len(want)]
        assert got == want
        assert all(t == 0 for t in new[row].tolist()[len(want):])  # padded after eos
        assert out.selection_scores[row].shape == (6,)
    assert len(out.scores) == new.shape[1]
    # the recorded scores are those that drew the chosen tokens (finite where a token was drawn)
    first = torch.stack([out.scores[0][r, new[r, 0]] for r in range(2)])
    assert bool(torch.isfinite(first).all())


def test_reranking_loop_refuses_greedy_and_bad_arguments(tiny_llama):
    with pytest.raises(ValueError, match="do_sample=True"):
        tiny_llama.generate(PROMPTS, attention_mask=MASK, custom_generate=MostLikely(n=2), max_new_tokens=3,
                            do_sample=False, pad_token_id=0)
    with pytest.raises(ValueError, match="n must be a positive integer, got 0"):
        MostLikely(n=0)
    with pytest.raises(ValueError, match="seed"):
        MostLikely(n=2, seed="x")


def test_select_out_of_range_is_an_error(tiny_llama):
    class Bad(RerankingLoop):
        def select(self, pool, state, row):
            return Selection(len(pool), torch.zeros(len(pool)))

    with pytest.raises(ValueError, match="returned index 3 for a pool of 3"):
        tiny_llama.generate(PROMPTS, attention_mask=MASK, custom_generate=Bad(n=3), max_new_tokens=3, **SAMPLE)
